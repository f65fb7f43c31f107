//! txmesh_metrics.wasm: proxy-wasm glue for `txmesh_core::metrics`.
//!
//! Exports only the callbacks it uses (`txmesh_host::rt`): a stream costs
//! three calls into the VM — context create, request headers, log. A stream
//! another filter answered before its request headers reached this one is
//! recorded at the log phase alone (`MetricsStream::at_log`).

use std::cell::RefCell;
use txmesh_core::metrics::{MetricsConfig, MetricsEngine, MetricsStream};
use txmesh_host::rt::Contexts;
use txmesh_host::{create_stream, install_root, plugin_config, raw, with_contexts, WasmHost};

thread_local! {
    static CONTEXTS: RefCell<Contexts<MetricsEngine, Option<MetricsStream>>> =
        RefCell::new(Contexts::default());
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
    let Some(config) = plugin_config(size, MetricsConfig::parse) else {
        return 0;
    };
    match MetricsEngine::new(config, &WasmHost::default()) {
        Ok(engine) => {
            raw::log(
                2,
                &format!(
                    "configured (workload {}, max_label_tuples {})",
                    engine.workload(),
                    engine.config().max_label_tuples
                ),
            );
            install_root(&CONTEXTS, root, engine, None)
        }
        Err(e) => {
            raw::log(4, &format!("cannot define metrics: {e}"));
            0
        }
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(ctx: u32, root: u32) {
    create_stream(&CONTEXTS, "txmesh_metrics", ctx, root, None);
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(ctx: u32, _headers: usize, eos: u32) -> u32 {
    with_contexts(&CONTEXTS, |c| {
        if let Some((engine, state)) = c.stream_mut(ctx) {
            *state = MetricsStream::on_request_headers(engine, &WasmHost::default())
                .map(|s| s.ended_at_headers(eos != 0));
        }
    });
    0 // Continue
}

#[no_mangle]
pub extern "C" fn proxy_on_log(ctx: u32) {
    with_contexts(&CONTEXTS, |c| {
        let Some((engine, state)) = c.finish(ctx) else {
            return;
        };
        // No state (an earlier filter answered first): recorded all the same.
        if let Err(e) = engine.finish(&WasmHost::default(), state) {
            raw::log(3, &format!("cannot record metrics: {e}"));
        }
    });
}
