//! txmesh_metrics.wasm: proxy-wasm glue for `txmesh_core::metrics`.

use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use txmesh_core::metrics::{MetricsConfig, MetricsEngine, MetricsStream};
use txmesh_host::WasmHost;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { engine: None }) });
}}

struct Root {
    engine: Option<Rc<RefCell<MetricsEngine>>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let Some(config) = txmesh_host::plugin_config(size, MetricsConfig::parse) else {
            return false;
        };
        match MetricsEngine::new(config, &WasmHost::default()) {
            Ok(engine) => {
                info!(
                    "configured (workload {}, max_label_tuples {})",
                    engine.workload(),
                    engine.config().max_label_tuples
                );
                self.engine = Some(Rc::new(RefCell::new(engine)));
                true
            }
            Err(e) => {
                error!("cannot define metrics: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            engine: self.engine.clone(),
            state: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    engine: Option<Rc<RefCell<MetricsEngine>>>,
    state: Option<MetricsStream>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Some(Ok(engine)) = self.engine.as_ref().map(|e| e.try_borrow()) {
            self.state = MetricsStream::on_request_headers(&engine, &WasmHost::default());
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let (Some(engine), Some(state)) = (&self.engine, &self.state) else {
            return;
        };
        let Ok(mut engine) = engine.try_borrow_mut() else {
            return;
        };
        let obs = state.observe(&engine, &WasmHost::default());
        if let Err(e) = engine.record(&WasmHost::default(), &obs) {
            warn!("cannot record metrics: {e}");
        }
    }
}
