//! libtxmesh.so: txmesh-core's filters as an Envoy dynamic module (the
//! native tier; docs/native.md). One module provides the filters, chosen by
//! the `filter_name` of Envoy's `DynamicModuleFilter`; each takes exactly the
//! JSON its wasm twin takes, parsed by the same parser in core.
//!
//! Threads: Envoy creates a filter config on the main thread and streams on
//! its workers. The parsed config is shared (read-only); each worker builds
//! its own engine from it on its first stream (engines keep per-worker
//! caches, as the wasm filters keep one per VM), so no lock is taken per
//! request.
//!
//! Never panics across the boundary: `panic = "abort"` in the native
//! profile, and the workspace lints deny unwrap, expect and panic.

pub mod abi;
#[cfg(feature = "floor")]
mod floor;
mod host;
mod poller;
mod ticker;

use abi::{ConfigEnvoyPtr, EnvoyBuffer, FilterEnvoyPtr};
use host::{Families, NativeHost};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use txmesh_core::authz::{AuthzConfig, AuthzEngine, Verdict};
use txmesh_core::host::Family;
use txmesh_core::host::Verdict as HostVerdict;
use txmesh_core::metrics::{MetricsConfig, MetricsEngine, MetricsStream};
use txmesh_core::router::config::RouterConfig;
use txmesh_core::router::engine::{Routed, RouterEngine};

/// Which filter a config is.
enum Kind {
    Authz(AuthzConfig),
    Metrics(MetricsConfig),
    Router(RouterConfig),
    /// The bench's floor (feature `floor`).
    #[cfg(feature = "floor")]
    Floor,
}

impl Kind {
    fn families(&self) -> &'static [&'static Family] {
        match self {
            Kind::Authz(_) => &txmesh_core::authz::FAMILIES,
            Kind::Metrics(_) => &txmesh_core::metrics::FAMILIES,
            Kind::Router(_) => &txmesh_core::router::engine::FAMILIES,
            #[cfg(feature = "floor")]
            Kind::Floor => &floor::FAMILIES,
        }
    }
}

/// One filter config: what Envoy's `filter_name` and `filter_config` said,
/// and the stat families defined for it.
pub struct Config {
    /// First, so that it is dropped first: its thread stops before the rest
    /// goes (the counters not yet recorded, at most one tick's, are lost
    /// with the config). Held only to be dropped with the config.
    _ticker: ticker::Ticker,
    id: u64,
    kind: Kind,
    families: Families,
    /// The router's registry poller on the main thread (router configs).
    poller: Option<poller::Poller>,
}

/// A worker's engine for one config.
enum Engine {
    Authz(AuthzEngine),
    Metrics(MetricsEngine),
    /// A router that follows the main thread's poller (refreshed from its
    /// own requests: `RouterEngine::following`).
    Router(Box<RouterEngine>),
    /// The bench's floor: its counter's id (feature `floor`).
    #[cfg(feature = "floor")]
    Floor(Option<u32>),
}

thread_local! {
    /// This worker's engines, by config id (a config reload adds one; the
    /// old one stays until the worker ends: bounded by reloads).
    static ENGINES: RefCell<HashMap<u64, Engine>> = RefCell::new(HashMap::new());
}

/// Why a config was refused.
fn refuse(filter_name: &str, why: &str) -> *const c_void {
    host::log(
        abi::LOG_ERROR,
        &format!("txmesh native filter {filter_name:?}: {why}"),
    );
    std::ptr::null()
}

/// Whether the host is the Envoy these declarations match (a callback only
/// it exports is there).
fn host_matches() -> bool {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks
    // the symbol up.
    !unsafe { libc::dlsym(libc::RTLD_DEFAULT, abi::PROBE_SYMBOL.as_ptr()) }.is_null()
}

/// Checks the host's ABI before anything else runs: a module built for
/// Envoy 1.40 refuses to load into another Envoy instead of crashing it.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    if host_matches() {
        return abi::ABI_VERSION.as_ptr();
    }
    // Not this ABI: its log callback may differ too, so say it on stderr
    // (Envoy's log goes there as well).
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "libtxmesh.so: this module is built for Envoy {} (dynamic-modules ABI {}); this Envoy lacks {} — refusing to load. Use the build for this Envoy, or the wasm filters.",
        abi::ENVOY_VERSION,
        abi::ABI_VERSION.to_string_lossy(),
        abi::PROBE_SYMBOL.to_string_lossy(),
    );
    std::ptr::null()
}

/// A filter config: `name` is the `filter_name` (metrics, authz, router),
/// `config` the `filter_config` string (the wasm filter's JSON).
///
/// # Safety
/// Envoy passes buffers valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    // SAFETY: Envoy's buffers, valid during this call.
    let (name, config) = unsafe { (name.bytes(), config.bytes()) };
    let name = String::from_utf8_lossy(name).into_owned();
    let kind = match name.as_str() {
        // Refusals worded as the wasm filter's.
        "authz" => match AuthzConfig::parse(config) {
            Ok(c) => Kind::Authz(c),
            Err(e) => return refuse(&name, &format!("invalid plugin configuration {e}")),
        },
        "metrics" => match MetricsConfig::parse(config) {
            Ok(c) => Kind::Metrics(c),
            Err(e) => return refuse(&name, &format!("invalid plugin configuration {e}")),
        },
        "router" => match RouterConfig::parse(config) {
            Ok(c) => Kind::Router(c),
            Err(e) => return refuse(&name, &format!("invalid plugin configuration {e}")),
        },
        #[cfg(feature = "floor")]
        "floor" => Kind::Floor,
        other => {
            return refuse(
                other,
                "unknown filter_name (the module provides \"authz\", \"metrics\", \"router\")",
            )
        }
    };
    let families = match Families::define(config_envoy, kind.families()) {
        Ok(f) => f,
        Err(e) => return refuse(&name, &format!("cannot define its metrics: {e}")),
    };
    let mut described = String::new();
    let poller = match &kind {
        Kind::Router(c) => {
            let host = NativeHost::on_config(config_envoy, &families);
            let mut engine = RouterEngine::new(c.clone(), &host);
            engine.define_metrics(&host);
            described = format!(" ({})", engine.describe());
            Some(poller::Poller::new(engine))
        }
        Kind::Authz(_) | Kind::Metrics(_) => None,
        #[cfg(feature = "floor")]
        Kind::Floor => None,
    };
    let ticker = match ticker::Ticker::start(config_envoy, &name) {
        Ok(t) => t,
        Err(e) => return refuse(&name, &e),
    };
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let cfg = Config {
        _ticker: ticker,
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        kind,
        families,
        poller,
    };
    host::log(
        abi::LOG_INFO,
        &format!("txmesh native filter {name:?} configured{described}"),
    );
    Box::into_raw(Box::new(cfg)) as *const c_void
}

/// # Safety
/// `config` is a pointer this module returned from `config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *mut c_void) {
    if !config.is_null() {
        // SAFETY: created by Box::into_raw in config_new, destroyed once.
        drop(unsafe { Box::from_raw(config as *mut Config) });
    }
}

/// One stream's filter: which config it belongs to, and what the metrics
/// filter or the router kept from its request headers.
struct Stream {
    config: *const Config,
    metrics: Option<MetricsStream>,
    routed: Option<Routed>,
}

/// # Safety
/// `config` is a pointer this module returned from `config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy: FilterEnvoyPtr,
) -> *mut c_void {
    Box::into_raw(Box::new(Stream {
        config: config as *const Config,
        metrics: None,
        routed: None,
    })) as *mut c_void
}

/// # Safety
/// `filter` is a pointer this module returned from `filter_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *mut c_void) {
    if !filter.is_null() {
        // SAFETY: created by Box::into_raw in filter_new, destroyed once.
        drop(unsafe { Box::from_raw(filter as *mut Stream) });
    }
}

/// Runs `f` with this worker's engine for the stream's config (built on
/// first use).
fn with_engine<R>(
    envoy: FilterEnvoyPtr,
    filter: *mut c_void,
    f: impl FnOnce(&mut Engine, &mut Stream, &NativeHost) -> R,
) -> Option<R> {
    if filter.is_null() {
        return None;
    }
    // SAFETY: a Stream this module created; Envoy calls its hooks on one
    // thread, one at a time.
    let stream = unsafe { &mut *(filter as *mut Stream) };
    if stream.config.is_null() {
        return None;
    }
    // SAFETY: Envoy keeps a filter's config alive while it has streams.
    let config = unsafe { &*stream.config };
    let host = NativeHost::new(envoy, &config.families);
    ENGINES.with(|engines| {
        let mut engines = engines.borrow_mut();
        let engine = match engines.entry(config.id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let built = match &config.kind {
                    Kind::Authz(c) => AuthzEngine::new(c.clone(), &host).map(Engine::Authz),
                    Kind::Metrics(c) => MetricsEngine::new(c.clone(), &host).map(Engine::Metrics),
                    Kind::Router(c) => {
                        let mut engine = RouterEngine::new(c.clone(), &host);
                        engine.define_metrics(&host);
                        Ok(Engine::Router(Box::new(engine.following())))
                    }
                    #[cfg(feature = "floor")]
                    Kind::Floor => Ok(Engine::Floor(floor::define(&host))),
                };
                match built {
                    Ok(e) => v.insert(e),
                    Err(e) => {
                        host::log(abi::LOG_ERROR, &format!("txmesh native filter: {e}"));
                        return None;
                    }
                }
            }
        };
        Some(f(engine, stream, &host))
    })
}

/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoyPtr,
    filter: *mut c_void,
    end_of_stream: bool,
) -> u32 {
    let next = with_engine(envoy, filter, |engine, stream, host| match engine {
        Engine::Authz(e) => match e.on_request_headers(host) {
            Verdict::Allow => Next::Continue,
            Verdict::Deny(body) => Next::Deny(body),
        },
        Engine::Metrics(e) => {
            stream.metrics = MetricsStream::on_request_headers(e, host)
                .map(|s| s.ended_at_headers(end_of_stream));
            Next::Continue
        }
        Engine::Router(engine) => {
            let (routed, verdict) = engine.on_request_headers(host, 0);
            stream.routed = routed;
            match verdict {
                HostVerdict::Continue => Next::Continue,
                // The router answered the stream itself (503, no endpoint).
                HostVerdict::Pause => Next::Answered,
            }
        }
        #[cfg(feature = "floor")]
        Engine::Floor(counter) => {
            floor::on_request_headers(host, *counter);
            Next::Continue
        }
    })
    // No engine (its metrics could not be defined): deny rather than guess,
    // as the wasm filter does.
    .unwrap_or_else(|| Next::Deny(txmesh_core::authz::denial_body(b"unknown")));
    match next {
        Next::Continue => abi::CONTINUE,
        Next::Answered => abi::STOP_ITERATION,
        Next::Deny(body) => {
            host::deny(envoy, body);
            abi::STOP_ITERATION
        }
    }
}

/// What a stream's request headers come to.
enum Next {
    Continue,
    /// The engine sent the local reply itself.
    Answered,
    /// Denied: the authz filter's answer (403, or gRPC status 7).
    Deny(Vec<u8>),
}

/// The end of a stream (Envoy's log phase): the metrics filter records it.
///
/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    filter: *mut c_void,
) {
    with_engine(envoy, filter, |engine, stream, host| match engine {
        Engine::Metrics(e) => {
            if let Err(err) = e.finish(host, stream.metrics.take()) {
                host::log(abi::LOG_WARN, &format!("cannot record metrics: {err}"));
            }
        }
        Engine::Router(engine) => {
            if let Some(r) = stream.routed.take() {
                engine.on_log(host, &r);
            }
        }
        Engine::Authz(_) => {}
        #[cfg(feature = "floor")]
        Engine::Floor(_) => {}
    });
}

/// A config's tick on the main thread (its scheduler's event): the
/// counters its workers summed are recorded, and the router's poller ticks.
///
/// # Safety
/// `config` is a pointer this module returned from `config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    config_envoy: ConfigEnvoyPtr,
    config: *const c_void,
    _event_id: u64,
) {
    // SAFETY: a Config this module created, alive while Envoy calls its hooks.
    let Some(config) = (unsafe { (config as *const Config).as_ref() }) else {
        return;
    };
    let failed = config.families.flush(config_envoy);
    if failed > 0 {
        host::log(
            abi::LOG_WARN,
            &format!("txmesh native filter: {failed} counter(s) could not be recorded"),
        );
    }
    if let Some(p) = &config.poller {
        p.tick(config_envoy, &config.families);
    }
}

/// A router config's poller, from the config pointer Envoy hands a config
/// hook (None for other filters).
///
/// # Safety
/// `config` is null or a pointer this module returned from `config_new`,
/// alive while Envoy calls its hooks.
unsafe fn poller_of<'a>(config: *const c_void) -> Option<(&'a Config, &'a poller::Poller)> {
    // SAFETY: by the caller's contract.
    let config = unsafe { (config as *const Config).as_ref() }?;
    Some((config, config.poller.as_ref()?))
}

/// A config-level callout's answer (the router's registry read), on the
/// main thread.
///
/// # Safety
/// `config` is a pointer this module returned from `config_new`; the
/// headers and chunks are Envoy's, valid for this call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    config_envoy: ConfigEnvoyPtr,
    config: *const c_void,
    callout_id: u64,
    result: u32,
    headers: *const abi::EnvoyHttpHeader,
    headers_len: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_len: usize,
) {
    // SAFETY: by this function's contract.
    if let Some((config, p)) = unsafe { poller_of(config) } {
        // SAFETY: Envoy's arrays, valid for this call.
        let resp = unsafe {
            poller::callout_response(result, headers, headers_len, body_chunks, body_chunks_len)
        };
        p.answered(config_envoy, &config.families, callout_id, resp);
    }
}

// The hooks Envoy requires of an HTTP filter module that txmesh's filters
// do not act on: pass everything through.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
) -> u32 {
    abi::CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _callout_id: u64,
    _result: u32,
    _headers: *const c_void,
    _headers_len: usize,
    _body_chunks: *const EnvoyBuffer,
    _body_chunks_len: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _stream_id: u64,
    _headers: *const c_void,
    _headers_len: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_len: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _stream_id: u64,
    _trailers: *const c_void,
    _trailers_len: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: FilterEnvoyPtr,
    _filter: *mut c_void,
) {
}
