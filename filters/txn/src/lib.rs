//! txmesh_txn.wasm: proxy-wasm glue for `txmesh_core::txn::engine`.
//!
//! One engine per root context (per worker and listener), shared with the
//! HTTP contexts that root creates. Every callback forwards to the engine;
//! re-entrant callbacks (the engine busy) do nothing.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use txmesh_core::txn::config::TxnConfig;
use txmesh_core::txn::engine::{Stream, TxnEngine, Verdict, TICK_MS};
use txmesh_host::{callout_response, plugin_config, raw, with_engine, WasmHost};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root { id, engine: None }) });
}}

type Shared = Rc<RefCell<TxnEngine>>;

struct Root {
    id: u32,
    engine: Option<Shared>,
}

/// Hands a callout's answer to the engine, acting as context `id`.
fn callout_answered(engine: &Option<Shared>, id: u32, token: u32, headers: usize, body: usize) {
    let resp = callout_response(headers, body);
    with_engine(engine, |e| e.on_callout(&WasmHost::on(id), token, resp));
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _trailers: usize) {
        callout_answered(&self.engine, self.id, token, headers, body);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let Some(cfg) = plugin_config(size, TxnConfig::parse) else {
            return false;
        };
        let host = WasmHost::on(self.id);
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
            stream: Stream::Pass,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
    engine: Option<Shared>,
    stream: Stream,
}

fn action(v: Verdict) -> Action {
    match v {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _trailers: usize) {
        callout_answered(&self.engine, self.id, token, headers, body);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let id = self.id;
        let Some((stream, verdict)) = with_engine(&self.engine, |e| {
            e.on_request_headers(&WasmHost::on(id), id)
        }) else {
            return Action::Continue;
        };
        self.stream = stream;
        action(verdict)
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let (id, stream) = (self.id, &self.stream);
        with_engine(&self.engine, |e| {
            action(e.on_response_headers(&WasmHost::on(id), id, stream))
        })
        .unwrap_or(Action::Continue)
    }

    fn on_log(&mut self) {
        let (id, stream) = (self.id, &self.stream);
        with_engine(&self.engine, |e| {
            e.on_stream_done(&WasmHost::on(id), id, stream)
        });
    }
}
