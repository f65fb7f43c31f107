//! txmesh_router.wasm: proxy-wasm glue for `txmesh_core::router::engine`.
//!
//! One engine per root context (per worker), shared with the HTTP contexts
//! that root creates. Exports only the callbacks it uses (`txmesh_host::rt`):
//! per stream, context create, request headers and log; per root, configure,
//! tick and the registry poll's answers. Re-entrant callbacks (the table
//! busy) do nothing.

use std::cell::RefCell;
use txmesh_core::router::config::RouterConfig;
use txmesh_core::router::engine::{Routed, RouterEngine, TICK_MS};
use txmesh_host::rt::Contexts;
use txmesh_host::{
    action, create_stream, install_root, plugin_config, raw, with_contexts, WasmHost,
};

thread_local! {
    static CONTEXTS: RefCell<Contexts<RouterEngine, Option<Routed>>> =
        RefCell::new(Contexts::default());
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
    let Some(cfg) = plugin_config(size, RouterConfig::parse) else {
        return 0;
    };
    let host = WasmHost::on(root);
    let mut engine = RouterEngine::new(cfg, &host);
    engine.define_metrics(&host);
    raw::log(2, &format!("configured ({})", engine.describe()));
    install_root(&CONTEXTS, root, engine, Some(TICK_MS))
}

txmesh_host::export_tick_and_callouts!(CONTEXTS);

#[no_mangle]
pub extern "C" fn proxy_on_context_create(ctx: u32, root: u32) {
    create_stream(&CONTEXTS, "txmesh_router", ctx, root, None);
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(ctx: u32, _headers: usize, _eos: u32) -> u32 {
    let verdict = with_contexts(&CONTEXTS, |c| {
        let (engine, routed) = c.stream_mut(ctx)?;
        let (r, verdict) = engine.on_request_headers(&WasmHost::on(ctx), ctx);
        *routed = r;
        Some(verdict)
    })
    .flatten();
    verdict.map_or(0, action)
}

#[no_mangle]
pub extern "C" fn proxy_on_log(ctx: u32) {
    with_contexts(&CONTEXTS, |c| {
        if let Some((engine, Some(r))) = c.finish(ctx) {
            engine.on_log(&WasmHost::on(ctx), &r);
        }
    });
}
