//! txmesh_txn.wasm: proxy-wasm glue for `txmesh_core::txn::engine`.
//!
//! One engine per root context (per worker and listener), shared with the
//! HTTP contexts that root creates. Exports only the callbacks it uses
//! (`txmesh_host::rt`): per stream, context create, request headers,
//! response headers and log; per root, configure, tick and callout answers.
//! Every callback forwards to the engine; re-entrant callbacks (the table
//! busy) do nothing.

use std::cell::RefCell;
use txmesh_core::txn::config::TxnConfig;
use txmesh_core::txn::engine::{Stream, TxnEngine, Verdict, TICK_MS};
use txmesh_host::rt::Contexts;
use txmesh_host::{callout_response, create_stream, plugin_config, raw, with_contexts, WasmHost};

thread_local! {
    static CONTEXTS: RefCell<Contexts<TxnEngine, Stream>> = RefCell::new(Contexts::default());
}

const CONTINUE: u32 = 0;
const PAUSE: u32 = 1;

fn action(v: Verdict) -> u32 {
    match v {
        Verdict::Continue => CONTINUE,
        Verdict::Pause => PAUSE,
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
    let Some(cfg) = plugin_config(size, TxnConfig::parse) else {
        return 0;
    };
    let host = WasmHost::on(root);
    let mut engine = TxnEngine::new(cfg, &host);
    engine.define_metrics(&host);
    raw::log(
        2,
        &format!(
            "configured (node {}, max_in_flight {}, etcd cluster {}, app cluster {})",
            engine.node(),
            engine.config().max_in_flight,
            engine.config().etcd_cluster,
            engine.config().app_cluster
        ),
    );
    if with_contexts(&CONTEXTS, |c| c.set_root(root, engine)).is_none() {
        return 0;
    }
    raw::set_tick_period(TICK_MS as u32);
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root: u32) {
    with_contexts(&CONTEXTS, |c| {
        if let Some(e) = c.root_mut(root) {
            e.on_tick(&WasmHost::on(root));
        }
    });
}

/// A callout's answer goes to the engine of the context that made it; if
/// that stream has ended, to every engine (tokens are unique in a VM and an
/// engine ignores tokens it does not own).
#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    ctx: u32,
    token: u32,
    headers: usize,
    body: usize,
    _trailers: usize,
) {
    let resp = callout_response(headers, body);
    with_contexts(&CONTEXTS, |c| {
        let host = WasmHost::on(ctx);
        match c.engine_of(ctx) {
            Some(e) => e.on_callout(&host, token, resp),
            None => {
                for (_, e) in c.roots_mut() {
                    e.on_callout(&host, token, resp.clone());
                }
            }
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(ctx: u32, root: u32) {
    create_stream(&CONTEXTS, "txmesh_txn", ctx, root, Stream::Pass);
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(ctx: u32, _headers: usize, _eos: u32) -> u32 {
    let verdict = with_contexts(&CONTEXTS, |c| {
        let (engine, stream) = c.stream_mut(ctx)?;
        let (s, verdict) = engine.on_request_headers(&WasmHost::on(ctx), ctx);
        *stream = s;
        Some(verdict)
    })
    .flatten();
    match verdict {
        Some(v) => action(v),
        // Not tracked (the stream table is full): the txn filter never fails
        // open, whether or not this request is transactional.
        None => {
            raw::send_local_response(
                503,
                &[("content-type", "application/json")],
                br#"{"error":"txmesh: too many streams in this sidecar"}"#,
            );
            PAUSE
        }
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(ctx: u32, _headers: usize, _eos: u32) -> u32 {
    with_contexts(&CONTEXTS, |c| {
        let (engine, stream) = c.stream_mut(ctx)?;
        Some(action(engine.on_response_headers(
            &WasmHost::on(ctx),
            ctx,
            stream,
        )))
    })
    .flatten()
    .unwrap_or(CONTINUE)
}

#[no_mangle]
pub extern "C" fn proxy_on_log(ctx: u32) {
    with_contexts(&CONTEXTS, |c| {
        if let Some((engine, stream)) = c.finish(ctx) {
            engine.on_stream_done(&WasmHost::on(ctx), ctx, &stream);
        }
    });
}
