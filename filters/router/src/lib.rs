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
use txmesh_host::{callout_response, raw, WasmHost};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root { id, engine: None }) });
}}

type Shared = Rc<RefCell<RouterEngine>>;

struct Root {
    id: u32,
    engine: Option<Shared>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _trailers: usize) {
        let resp = callout_response(headers, body);
        if let Some(Ok(mut e)) = self.engine.as_ref().map(|e| e.try_borrow_mut()) {
            e.on_callout(&WasmHost::on(self.id), token, resp);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let raw_cfg = raw::get_buffer(raw::BUFFER_PLUGIN_CONFIGURATION, 0, size);
        let cfg = match RouterConfig::parse(&raw_cfg) {
            Ok(c) => c,
            Err(e) => {
                raw::log(4, &format!("invalid plugin configuration {e}"));
                return false;
            }
        };
        let host = WasmHost::on(self.id);
        let mut engine = RouterEngine::new(cfg, &host);
        engine.define_metrics(&host);
        let services: Vec<String> = engine
            .config()
            .services
            .iter()
            .map(|(n, s)| format!("{n}={}", s.strategy.as_str()))
            .collect();
        raw::log(
            2,
            &format!(
                "configured (registry {} via cluster {}, every {} ms; zone {}; header {}; services {})",
                engine.config().registry_prefix,
                engine.config().etcd_cluster,
                engine.config().poll_interval_ms,
                engine.zone().unwrap_or("none"),
                engine.config().endpoint_header,
                services.join(",")
            ),
        );
        self.engine = Some(Rc::new(RefCell::new(engine)));
        self.set_tick_period(Duration::from_millis(TICK_MS));
        true
    }

    fn on_tick(&mut self) {
        if let Some(Ok(mut e)) = self.engine.as_ref().map(|e| e.try_borrow_mut()) {
            e.on_tick(&WasmHost::on(self.id));
        }
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
    engine: Option<Shared>,
    routed: Option<Routed>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Some(Ok(mut e)) = self.engine.as_ref().map(|e| e.try_borrow_mut()) else {
            return Action::Continue;
        };
        let (routed, verdict) = e.on_request_headers(&WasmHost::on(self.id), self.id);
        self.routed = routed;
        match verdict {
            Verdict::Continue => Action::Continue,
            Verdict::Pause => Action::Pause,
        }
    }

    fn on_log(&mut self) {
        let Some(r) = self.routed.take() else { return };
        if let Some(Ok(mut e)) = self.engine.as_ref().map(|e| e.try_borrow_mut()) {
            e.on_log(&WasmHost::on(self.id), &r);
        }
    }
}
