//! txmesh_authz.wasm: proxy-wasm glue for `txmesh_core::authz`.
//!
//! One engine per root context; each request is decided at its headers:
//! allowed requests continue, denied ones get a 403 JSON answer and never
//! reach the app. Exports only context create and request headers
//! (`txmesh_host::rt`): two calls into the VM per stream.

use std::cell::RefCell;
use txmesh_core::authz::{denial_body, denial_reply, AuthzConfig, AuthzEngine, Verdict};
use txmesh_host::rt::Contexts;
use txmesh_host::{install_root, plugin_config, raw, with_contexts, WasmHost};

thread_local! {
    static CONTEXTS: RefCell<Contexts<AuthzEngine, ()>> = RefCell::new(Contexts::default());
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
    let Some(cfg) = plugin_config(size, AuthzConfig::parse) else {
        return 0;
    };
    match AuthzEngine::new(cfg, &WasmHost::default()) {
        Ok(e) => {
            raw::log(2, &format!("configured ({})", e.describe()));
            install_root(&CONTEXTS, root, e, None)
        }
        Err(e) => {
            raw::log(4, &format!("cannot define metrics: {e}"));
            0
        }
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(ctx: u32, root: u32) {
    with_contexts(&CONTEXTS, |c| c.note(ctx, root));
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(ctx: u32, _headers: usize, _eos: u32) -> u32 {
    let verdict = with_contexts(&CONTEXTS, |c| {
        c.noted_engine(ctx)
            .map(|engine| engine.on_request_headers(&WasmHost::default()))
    })
    .flatten()
    // No engine for this stream (should not happen: Envoy refuses a failed
    // configuration): deny rather than guess.
    .unwrap_or_else(|| Verdict::Deny(denial_body(b"unknown")));
    match verdict {
        Verdict::Allow => 0, // Continue
        Verdict::Deny(body) => {
            // Envoy turns this into grpc-status 7 for a gRPC client itself.
            let r = denial_reply(body, false);
            raw::send_local_response(r.status, &r.headers, &r.body);
            1 // StopIteration
        }
    }
}
