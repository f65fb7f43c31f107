//! txmesh_router.wasm: proxy-wasm glue for `txmesh_core::router::engine`.
//!
//! One engine per root context (per worker), shared with the HTTP contexts
//! that root creates. Every callback forwards to the engine; re-entrant
//! callbacks (the engine busy) do nothing.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use txmesh_core::router::config::RouterConfig;
use txmesh_core::router::engine::{Routed, RouterEngine, TICK_MS};
use txmesh_core::txn::engine::Verdict;
use txmesh_host::{callout_response, plugin_config, raw, with_engine, WasmHost};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root { id, engine: None }) });
}}

type Shared = Option<Rc<RefCell<RouterEngine>>>;

struct Root {
    id: u32,
    engine: Shared,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _trailers: usize) {
        let resp = callout_response(headers, body);
        with_engine(&self.engine, |e| {
            e.on_callout(&WasmHost::on(self.id), token, resp)
        });
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let Some(cfg) = plugin_config(size, RouterConfig::parse) else {
            return false;
        };
        let host = WasmHost::on(self.id);
        let mut engine = RouterEngine::new(cfg, &host);
        engine.define_metrics(&host);
        raw::log(2, &format!("configured ({})", engine.describe()));
        self.engine = Some(Rc::new(RefCell::new(engine)));
        self.set_tick_period(Duration::from_millis(TICK_MS));
        true
    }

    fn on_tick(&mut self) {
        with_engine(&self.engine, |e| e.on_tick(&WasmHost::on(self.id)));
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            id: context_id,
            engine: self.engine.clone(),
            routed: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
    engine: Shared,
    routed: Option<Routed>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let id = self.id;
        let Some((routed, verdict)) = with_engine(&self.engine, |e| {
            e.on_request_headers(&WasmHost::on(id), id)
        }) else {
            return Action::Continue;
        };
        self.routed = routed;
        match verdict {
            Verdict::Continue => Action::Continue,
            Verdict::Pause => Action::Pause,
        }
    }

    fn on_log(&mut self) {
        let Some(r) = self.routed.take() else { return };
        with_engine(&self.engine, |e| e.on_log(&WasmHost::on(self.id), &r));
    }
}
