//! txmesh_txn.wasm: proxy-wasm glue for `txmesh_core::txn::engine`.
//!
//! One engine per root context (per worker and listener), shared with the
//! HTTP contexts that root creates. Exports only the callbacks it uses
//! (`txmesh_host::rt`): per stream, context create, request headers,
//! response headers and log; per root, configure, tick and callout answers.
//! Every callback forwards to the engine; re-entrant callbacks (the table
//! busy) do nothing.

use std::cell::RefCell;
use txmesh_core::host::Verdict;
use txmesh_core::txn::config::TxnConfig;
use txmesh_core::txn::engine::{untracked_reply, Stream, TxnEngine, TICK_MS};
use txmesh_host::rt::Contexts;
use txmesh_host::{
    action, create_stream, install_root, plugin_config, raw, with_contexts, WasmHost,
};

thread_local! {
    static CONTEXTS: RefCell<Contexts<TxnEngine, Stream>> = RefCell::new(Contexts::default());
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
    let Some(cfg) = plugin_config(size, TxnConfig::parse) else {
        return 0;
    };
    let host = WasmHost::on(root);
    let mut engine = TxnEngine::new(cfg, &host);
    engine.set_root_context(root);
    engine.define_metrics(&host);
    raw::log(2, &format!("configured ({})", engine.describe()));
    install_root(&CONTEXTS, root, engine, Some(TICK_MS))
}

txmesh_host::export_tick_and_callouts!(CONTEXTS);

/// A unary gRPC call to a gRPC app (`txmesh.v1.Participant`) answered OK.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(ctx: u32, token: u32, size: usize) {
    let body = raw::get_buffer(raw::BUFFER_GRPC_RECEIVE, 0, size);
    txmesh_host::deliver_grpc(&CONTEXTS, ctx, token, 0, body, |e, h, t, resp| {
        e.on_callout(h, t, resp)
    });
}

/// A unary gRPC call failed (`status`, with the host's message).
#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(ctx: u32, token: u32, status: u32) {
    let message = raw::grpc_status_message();
    txmesh_host::deliver_grpc(&CONTEXTS, ctx, token, status, message, |e, h, t, resp| {
        e.on_callout(h, t, resp)
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
    verdict.map_or_else(
        || {
            // Not tracked (the stream table is full).
            let (status, headers, body) = untracked_reply();
            raw::send_local_response(status, &headers, &body);
            action(Verdict::Pause)
        },
        action,
    )
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(ctx: u32, _headers: usize, eos: u32) -> u32 {
    with_contexts(&CONTEXTS, |c| {
        let (engine, stream) = c.stream_mut(ctx)?;
        Some(engine.on_response_headers(&WasmHost::on(ctx), ctx, stream, eos != 0))
    })
    .flatten()
    .map_or(action(Verdict::Continue), action)
}

/// A gRPC root's `grpc-status` comes here (its trailers are held until
/// the decision); every other stream passes.
#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(ctx: u32, _trailers: usize) -> u32 {
    with_contexts(&CONTEXTS, |c| {
        let (engine, stream) = c.stream_mut(ctx)?;
        Some(engine.on_response_trailers(&WasmHost::on(ctx), ctx, stream))
    })
    .flatten()
    .map_or(action(Verdict::Continue), action)
}

#[no_mangle]
pub extern "C" fn proxy_on_log(ctx: u32) {
    with_contexts(&CONTEXTS, |c| {
        if let Some((engine, stream)) = c.finish(ctx) {
            engine.on_stream_done(&WasmHost::on(ctx), ctx, &stream);
        }
    });
}
