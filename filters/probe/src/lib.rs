//! txmesh_probe.wasm — benchmarks only (BENCHMARKS.md, "What a host call
//! costs"). Exports the three callbacks a filter that sees the whole stream
//! needs (context create, request headers, log) and, in one of them, repeats
//! one kind of host call `n` times. `bench-filters` with `BENCH_PROFILE=1`
//! runs it with `n = 0` and `n = N` for each kind: the difference in Envoy's
//! CPU per request, divided by N, is what one such call costs.
//!
//! Config: `{"op": "property", "path": ["response", "code"], "n": 16}`;
//! `op` one of `none`, `property` (`path`), `get_header` / `set_header`
//! (`name`; request headers), `get_headers` (all request headers in one
//! call), `counter`, `histogram`, `clock` (wall), `monotonic_clock`,
//! `shared_get` (`name`: the key), `metrics_logic` (txmesh_metrics' own
//! per-request work — request headers, observation, label tuple, stat-id
//! lookup — against a host that answers at once: the filter's cost inside
//! the VM, without its host calls). `property` runs at the log phase (where
//! the filters read attributes), the rest at request headers.

use serde::Deserialize;
use std::cell::RefCell;
use txmesh_core::host::{
    Clock, Family, HostError, Metrics, Properties, RequestHeaders, SharedData, SharedSetError,
};
use txmesh_core::metrics::{MetricsConfig, MetricsEngine, MetricsStream};
use txmesh_host::raw;

/// A host that answers every call at once, with the values of a `200` to a
/// bodyless GET from an unknown peer.
struct Instant;

impl Metrics for Instant {
    fn define_metric(&self, _: &'static Family, _: &[&str]) -> Result<u32, HostError> {
        Ok(1)
    }
    fn increment_metric(&self, _: u32, _: i64) -> Result<(), HostError> {
        Ok(())
    }
    fn record_metric(&self, _: u32, _: u64) -> Result<(), HostError> {
        Ok(())
    }
}
impl SharedData for Instant {
    fn shared_get(&self, _: &str) -> (Option<Vec<u8>>, Option<u32>) {
        (Some(b"1".to_vec()), Some(1))
    }
    fn shared_set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), SharedSetError> {
        Ok(())
    }
}
impl RequestHeaders for Instant {
    fn request_header(&self, _: &str) -> Option<Vec<u8>> {
        None
    }
    fn set_request_header(&self, _: &str, _: Option<&str>) {}
}
impl Properties for Instant {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let v: u64 = if path == ["response", "code"] { 200 } else { 0 };
        Some(v.to_le_bytes().to_vec())
    }
}
impl Clock for Instant {
    fn now_us(&self) -> u64 {
        1_700_000_000_000_000
    }
}

/// The kind of host call a probe repeats.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Op {
    #[default]
    None,
    Property,
    GetHeader,
    GetHeaders,
    SetHeader,
    Counter,
    Histogram,
    Clock,
    MonotonicClock,
    SharedGet,
    MetricsLogic,
}

impl Op {
    /// Attributes are read where the filters read them: at the log phase.
    fn at_log(self) -> bool {
        matches!(self, Op::Property | Op::MetricsLogic)
    }
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Probe {
    op: Op,
    #[serde(default)]
    n: u32,
    #[serde(default)]
    path: Vec<String>,
    #[serde(default)]
    name: String,
    #[serde(skip)]
    metric: u32,
}

thread_local! {
    static PROBE: RefCell<Probe> = RefCell::new(Probe::default());
    static METRICS: RefCell<Option<MetricsEngine>> = const { RefCell::new(None) };
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root: u32, size: usize) -> u32 {
    let bytes = raw::get_buffer(raw::BUFFER_PLUGIN_CONFIGURATION, 0, size);
    let mut p: Probe = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => {
            raw::log(4, &format!("invalid plugin configuration {e}"));
            return 0;
        }
    };
    let kind = match p.op {
        Op::Counter => Some((0, "counter")),
        Op::Histogram => Some((2, "histogram")),
        _ => None,
    };
    if let Some((kind, name)) = kind {
        match raw::define_metric(kind, &format!("txmesh_probe_{name}")) {
            Ok(id) => p.metric = id,
            Err(_) => return 0,
        }
    }
    if p.op == Op::MetricsLogic {
        let engine = MetricsConfig::parse(br#"{"workload":"bench","reporter":"inbound"}"#)
            .ok()
            .and_then(|c| MetricsEngine::new(c, &Instant).ok());
        METRICS.with(|m| *m.borrow_mut() = engine);
    }
    if p.op == Op::SharedGet {
        let _ = raw::set_shared(&p.name, b"12345678", None);
    }
    PROBE.with(|c| *c.borrow_mut() = p);
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_ctx: u32, _root: u32) {}

fn run(at_log: bool) {
    PROBE.with(|c| {
        let p = c.borrow();
        if p.op.at_log() != at_log {
            return;
        }
        let path: Vec<&str> = p.path.iter().map(String::as_str).collect();
        let mut sink = 0usize;
        for i in 0..p.n {
            match p.op {
                Op::Property => sink += raw::get_property(&path).map_or(0, |v| v.len()),
                Op::GetHeader => {
                    sink +=
                        raw::get_header(raw::MAP_REQUEST_HEADERS, &p.name).map_or(0, |v| v.len())
                }
                Op::GetHeaders => {
                    sink += raw::get_header_pairs(raw::MAP_REQUEST_HEADERS).map_or(0, |v| v.len())
                }
                Op::SetHeader => {
                    raw::set_header(raw::MAP_REQUEST_HEADERS, &p.name, Some(b"1"));
                }
                Op::Counter => sink += raw::increment_metric(p.metric, 1) as usize,
                Op::Histogram => sink += raw::record_metric(p.metric, u64::from(i)) as usize,
                Op::Clock => sink += raw::now_nanos() as usize & 1,
                Op::MonotonicClock => sink += raw::monotonic_nanos() as usize & 1,
                Op::SharedGet => sink += raw::get_shared(&p.name).0.map_or(0, |v| v.len()),
                Op::MetricsLogic => METRICS.with(|m| {
                    if let Some(engine) = m.borrow_mut().as_mut() {
                        let s = MetricsStream::on_request_headers(engine, &Instant)
                            .map(|s| s.ended_at_headers(true));
                        sink += usize::from(engine.finish(&Instant, s).ok().flatten().is_some());
                    }
                }),
                Op::None => {}
            }
        }
        std::hint::black_box(sink);
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_ctx: u32, _headers: usize, _eos: u32) -> u32 {
    run(false);
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_ctx: u32) {
    run(true);
}
