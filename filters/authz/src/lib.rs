//! txmesh_authz.wasm: proxy-wasm glue for `txmesh_core::authz`.
//!
//! One engine per root context; each request is decided at its headers:
//! allowed requests continue, denied ones get a 403 JSON answer and never
//! reach the app.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;
use txmesh_core::authz::{denial_body, AuthzConfig, AuthzEngine, Verdict};
use txmesh_host::{plugin_config, raw, WasmHost};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { engine: None }) });
}}

const JSON: (&str, &str) = ("content-type", "application/json");

struct Root {
    engine: Option<Rc<AuthzEngine>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let Some(cfg) = plugin_config(size, AuthzConfig::parse) else {
            return false;
        };
        match AuthzEngine::new(cfg, &WasmHost::default()) {
            Ok(e) => {
                raw::log(2, &format!("configured ({})", e.describe()));
                self.engine = Some(Rc::new(e));
                true
            }
            Err(e) => {
                raw::log(4, &format!("cannot define metrics: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            engine: self.engine.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    engine: Option<Rc<AuthzEngine>>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let verdict = match &self.engine {
            Some(engine) => engine.on_request_headers(&WasmHost::default()),
            // Not configured (Envoy refuses a failed configuration, so this
            // should not happen): deny rather than guess.
            None => Verdict::Deny(denial_body(b"unknown")),
        };
        match verdict {
            Verdict::Allow => Action::Continue,
            Verdict::Deny(body) => {
                raw::send_local_response(403, &[JSON], &body);
                Action::Pause
            }
        }
    }
}
