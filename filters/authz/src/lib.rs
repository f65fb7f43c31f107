//! txmesh_authz.wasm: proxy-wasm glue for `txmesh_core::authz`.
//!
//! One engine per root context; each request is decided at its headers:
//! allowed requests continue, denied ones get a 403 JSON answer and never
//! reach the app.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;
use txmesh_core::authz::{AuthzConfig, AuthzEngine, Verdict};
use txmesh_host::{raw, WasmHost};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { engine: None }) });
}}

struct Root {
    engine: Option<Rc<AuthzEngine>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let raw_cfg = raw::get_buffer(raw::BUFFER_PLUGIN_CONFIGURATION, 0, size);
        let cfg = match AuthzConfig::parse(&raw_cfg) {
            Ok(c) => c,
            Err(e) => {
                raw::log(4, &format!("invalid plugin configuration {e}"));
                return false;
            }
        };
        match AuthzEngine::new(cfg, &WasmHost::default()) {
            Ok(e) => {
                raw::log(
                    2,
                    &format!(
                        "configured ({} rules, default {}, {} coordinator patterns)",
                        e.config().rules.len(),
                        e.config().default.as_str(),
                        e.config().coordinators.len()
                    ),
                );
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
        let Some(engine) = &self.engine else {
            // Not configured: on_configure failed and Envoy refused the
            // config; nothing reaches here. Deny to be sure.
            raw::send_local_response(
                403,
                &[("content-type", "application/json")],
                br#"{"error":"forbidden","principal":"unknown"}"#,
            );
            return Action::Pause;
        };
        match engine.on_request_headers(&WasmHost::default()) {
            Verdict::Allow => Action::Continue,
            Verdict::Deny(body) => {
                raw::send_local_response(403, &[("content-type", "application/json")], &body);
                Action::Pause
            }
        }
    }
}
