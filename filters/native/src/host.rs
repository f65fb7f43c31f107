//! txmesh-core's host traits on the dynamic-modules ABI.

use crate::abi::{self, ConfigEnvoyPtr, EnvoyBuffer, FilterEnvoyPtr, ModuleBuffer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;
use txmesh_core::host::{
    Callout, Clock, Family, FilterHost, HostError, LogLevel, MetricKind, Metrics, Properties,
    RequestHeaders, ResponsePart, SharedData, SharedSetError,
};

/// Logs through Envoy (its `dynamic_modules` logger).
pub fn log(level: u32, msg: &str) {
    // SAFETY: a module buffer valid for the call.
    unsafe { abi::envoy_dynamic_module_callback_log(level, ModuleBuffer::of(msg.as_bytes())) }
}

/// A local reply on the stream.
pub fn send_response(f: FilterEnvoyPtr, status: u32, headers: &[(&str, &str)], body: &[u8]) {
    let hs = module_headers(headers);
    // SAFETY: every buffer lives until the call returns.
    unsafe {
        abi::envoy_dynamic_module_callback_http_send_response(
            f,
            status,
            hs.as_ptr(),
            hs.len(),
            ModuleBuffer::of(body),
            ModuleBuffer::of(b"txmesh"),
        )
    }
}

/// Headers as the ABI takes them, borrowing `headers` (which must outlive
/// the call they are passed to).
fn module_headers(headers: &[(&str, &str)]) -> Vec<abi::ModuleHttpHeader> {
    headers
        .iter()
        .map(|(k, v)| abi::ModuleHttpHeader {
            key_ptr: k.as_ptr(),
            key_len: k.len(),
            value_ptr: v.as_ptr(),
            value_len: v.len(),
        })
        .collect()
}

/// A denied request's answer (`txmesh_core::authz::denial_reply`): 403 with
/// the JSON body, or for a gRPC request the trailers-only `grpc-status: 7`
/// that Envoy makes of the wasm filter's local reply but not of a module's.
pub fn deny(f: FilterEnvoyPtr, body: Vec<u8>) {
    let grpc = request_header(f, b"content-type").is_some_and(|ct| txmesh_core::grpc::is_grpc(&ct));
    let r = txmesh_core::authz::denial_reply(body, grpc);
    send_response(f, u32::from(r.status), &r.headers, &r.body);
}

/// The first value of request header `name`.
fn request_header(f: FilterEnvoyPtr, name: &[u8]) -> Option<Vec<u8>> {
    header(f, abi::REQUEST_HEADERS, name)
}

/// The first value of header `name` in the stream's headers of this type.
fn header(f: FilterEnvoyPtr, header_type: u32, name: &[u8]) -> Option<Vec<u8>> {
    let mut out = EnvoyBuffer::EMPTY;
    // SAFETY: `out` is written by Envoy; the key lives for the call.
    let found = unsafe {
        abi::envoy_dynamic_module_callback_http_get_header(
            f,
            header_type,
            ModuleBuffer::of(name),
            &mut out,
            0,
            std::ptr::null_mut(),
        )
    };
    if !found || out.ptr.is_null() {
        return None;
    }
    // SAFETY: Envoy's buffer, valid until the end of this hook; copied.
    Some(unsafe { out.bytes() }.to_vec())
}

/// The stat families of one filter config and their Envoy ids, defined
/// while the config is created (Envoy freezes definitions after it); and
/// the counter increments its workers have summed since the config's last
/// tick.
///
/// Why counters are summed: the ABI resolves a labeled stat's tag values on
/// every record (~0.9 µs each, BENCHMARKS.md), and a counter's increments
/// add up. So a worker adds to its own entry here (one uncontended lock, no
/// tag resolution) and the config's tick on the main thread records the
/// sums with the config-level call: counters are at most one tick (100 ms)
/// late. Gauges and histograms are recorded at once.
pub struct Families {
    defs: Vec<(&'static Family, usize)>,
    pending: Mutex<HashMap<(u64, u32), Pending>>,
}

/// A counter's increments not yet recorded: the stat (its family's Envoy id
/// and label values) and the sum.
struct Pending {
    envoy_id: usize,
    values: Vec<String>,
    delta: u64,
}

static NEXT_THREAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// This thread's key in the pending sums (stat ids are per thread).
    static THREAD_KEY: u64 = NEXT_THREAD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl Families {
    pub fn define(config: ConfigEnvoyPtr, families: &[&'static Family]) -> Result<Self, String> {
        let mut out = Vec::with_capacity(families.len());
        for f in families {
            let names: Vec<ModuleBuffer> = f
                .labels
                .iter()
                .map(|l| ModuleBuffer::of(l.name.as_bytes()))
                .collect();
            let name = ModuleBuffer::of(f.name.as_bytes());
            let define = match f.kind {
                MetricKind::Counter => {
                    abi::envoy_dynamic_module_callback_http_filter_config_define_counter
                }
                MetricKind::Gauge => {
                    abi::envoy_dynamic_module_callback_http_filter_config_define_gauge
                }
                MetricKind::Histogram => {
                    abi::envoy_dynamic_module_callback_http_filter_config_define_histogram
                }
            };
            let mut id = 0usize;
            // SAFETY: buffers live until the call returns; `id` is written.
            let r = unsafe { define(config, name, names.as_ptr(), names.len(), &mut id) };
            if r != abi::METRICS_SUCCESS {
                return Err(format!("defining {} failed (result {r})", f.name));
            }
            out.push((*f, id));
        }
        Ok(Families {
            defs: out,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Records the counters' sums since the last flush on the config (the
    /// config's tick, on the main thread). Returns how many could not be
    /// recorded.
    pub fn flush(&self, config: ConfigEnvoyPtr) -> usize {
        let due: Vec<(usize, Vec<String>, u64)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending
                .values_mut()
                .filter(|p| p.delta > 0)
                .map(|p| (p.envoy_id, p.values.clone(), std::mem::take(&mut p.delta)))
                .collect()
        };
        let mut failed = 0;
        for (envoy_id, values, delta) in due {
            let buffers: Vec<ModuleBuffer> = values
                .iter()
                .map(|v| ModuleBuffer::of(v.as_bytes()))
                .collect();
            // SAFETY: buffers live until the call returns.
            let r = unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                    config,
                    envoy_id,
                    buffers.as_ptr(),
                    buffers.len(),
                    delta,
                )
            };
            if r != abi::METRICS_SUCCESS {
                failed += 1;
            }
        }
        failed
    }

    /// Adds `delta` to this thread's sum for stat `id`.
    fn add(&self, id: u32, stat: &Stat, delta: u64) {
        let key = (THREAD_KEY.with(|k| *k), id);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending
            .entry(key)
            .or_insert_with(|| Pending {
                envoy_id: stat.envoy_id,
                values: stat.values.clone(),
                delta: 0,
            })
            .delta += delta;
    }

    /// The Envoy id of `family` (by identity: families are statics).
    fn id(&self, family: &'static Family) -> Option<usize> {
        self.defs
            .iter()
            .find(|(f, _)| std::ptr::eq(*f, family))
            .map(|(_, id)| *id)
    }
}

/// The most labels a family has (the metrics filter's seven, with room).
const MAX_LABELS: usize = 8;

/// A stat the engines defined: its family's Envoy id and label values.
struct Stat {
    kind: MetricKind,
    envoy_id: usize,
    values: Vec<String>,
}

/// This thread's stats: an engine's stat id is an index into `stats`; a
/// tuple defined again (an endpoint back in the registry) gets its old id.
/// Bounded by the engines' own bounds (the metrics filter's
/// `max_label_tuples`, the router's `max_endpoints` per table).
#[derive(Default)]
struct Stats {
    stats: Vec<Stat>,
    /// (family, its Envoy id, label values) -> stat id.
    ids: HashMap<(&'static str, usize, Vec<String>), u32>,
}

thread_local! {
    static STATS: RefCell<Stats> = RefCell::new(Stats::default());
}

/// Where a hook runs: on a stream (a worker), or on the filter config
/// (the main thread: the router's poller).
#[derive(Clone, Copy)]
enum Target {
    Stream(FilterEnvoyPtr),
    Config(ConfigEnvoyPtr),
}

/// The host for one hook call, on one stream or on the filter config.
pub struct NativeHost<'a> {
    target: Target,
    families: &'a Families,
}

impl<'a> NativeHost<'a> {
    /// A stream's host (a worker's hook).
    pub fn new(filter: FilterEnvoyPtr, families: &'a Families) -> Self {
        Self {
            target: Target::Stream(filter),
            families,
        }
    }

    /// The filter config's host (a main-thread hook): no stream, so no
    /// headers or attributes; stats recorded on the config; callouts from
    /// the config, answered on the main thread.
    pub fn on_config(config: ConfigEnvoyPtr, families: &'a Families) -> Self {
        Self {
            target: Target::Config(config),
            families,
        }
    }

    /// The stream this hook runs on (none on the config).
    fn stream(&self) -> Option<FilterEnvoyPtr> {
        match self.target {
            Target::Stream(f) => Some(f),
            Target::Config(_) => None,
        }
    }

    fn record(&self, id: u32, value: u64, how: Record) -> Result<(), HostError> {
        STATS.with(|stats| {
            let stats = stats.borrow();
            let Some(s) = stats.stats.get(id as usize) else {
                return Err(HostError(format!("no stat {id}")));
            };
            let Some(op) = Op::of(s.kind, how) else {
                return Err(HostError(format!("stat {id} cannot be recorded so")));
            };
            // A worker's counter: summed, recorded by the config's tick.
            if let (Op::Count, Target::Stream(_)) = (op, self.target) {
                self.families.add(id, s, value);
                return Ok(());
            }
            // On the stack: families have at most MAX_LABELS labels.
            let mut values = [ModuleBuffer::NONE; MAX_LABELS];
            let n = s.values.len().min(MAX_LABELS);
            for (b, v) in values.iter_mut().zip(&s.values) {
                *b = ModuleBuffer::of(v.as_bytes());
            }
            let p = values.as_ptr();
            // SAFETY: buffers live until the call returns.
            let r = unsafe {
                match self.target {
                    Target::Stream(f) => op.on_stream()(f, s.envoy_id, p, n, value),
                    Target::Config(c) => op.on_config()(c, s.envoy_id, p, n, value),
                }
            };
            match r {
                abi::METRICS_SUCCESS => Ok(()),
                other => Err(HostError(format!("recording stat {id}: result {other}"))),
            }
        })
    }
}

/// How a value goes into a stat: added, taken away, or a sample (a
/// histogram's value, a gauge's new level).
#[derive(Clone, Copy)]
enum Record {
    Add,
    Sub,
    Sample,
}

/// The ABI call that records a value into a stat of some kind.
#[derive(Clone, Copy)]
enum Op {
    Count,
    GaugeUp,
    GaugeDown,
    GaugeSet,
    Observe,
}

type StreamRecord =
    unsafe extern "C" fn(FilterEnvoyPtr, usize, *const ModuleBuffer, usize, u64) -> u32;
type ConfigRecord =
    unsafe extern "C" fn(ConfigEnvoyPtr, usize, *const ModuleBuffer, usize, u64) -> u32;

impl Op {
    fn of(kind: MetricKind, how: Record) -> Option<Op> {
        match (kind, how) {
            (MetricKind::Counter, Record::Add) => Some(Op::Count),
            (MetricKind::Gauge, Record::Add) => Some(Op::GaugeUp),
            (MetricKind::Gauge, Record::Sub) => Some(Op::GaugeDown),
            (MetricKind::Gauge, Record::Sample) => Some(Op::GaugeSet),
            (MetricKind::Histogram, Record::Sample) => Some(Op::Observe),
            (MetricKind::Counter, Record::Sub | Record::Sample)
            | (MetricKind::Histogram, Record::Add | Record::Sub) => None,
        }
    }

    fn on_stream(self) -> StreamRecord {
        match self {
            Op::Count => abi::envoy_dynamic_module_callback_http_filter_increment_counter,
            Op::GaugeUp => abi::envoy_dynamic_module_callback_http_filter_increment_gauge,
            Op::GaugeDown => abi::envoy_dynamic_module_callback_http_filter_decrement_gauge,
            Op::GaugeSet => abi::envoy_dynamic_module_callback_http_filter_set_gauge,
            Op::Observe => abi::envoy_dynamic_module_callback_http_filter_record_histogram_value,
        }
    }

    fn on_config(self) -> ConfigRecord {
        match self {
            Op::Count => abi::envoy_dynamic_module_callback_http_filter_config_increment_counter,
            Op::GaugeUp => abi::envoy_dynamic_module_callback_http_filter_config_increment_gauge,
            Op::GaugeDown => abi::envoy_dynamic_module_callback_http_filter_config_decrement_gauge,
            Op::GaugeSet => abi::envoy_dynamic_module_callback_http_filter_config_set_gauge,
            Op::Observe => {
                abi::envoy_dynamic_module_callback_http_filter_config_record_histogram_value
            }
        }
    }
}

impl Metrics for NativeHost<'_> {
    fn define_metric(&self, family: &'static Family, values: &[&str]) -> Result<u32, HostError> {
        let Some(envoy_id) = self.families.id(family) else {
            return Err(HostError(format!(
                "{} was not defined with the filter config",
                family.name
            )));
        };
        if values.len() != family.labels.len() || values.len() > MAX_LABELS {
            return Err(HostError(format!(
                "{}: {} label values for {} labels",
                family.name,
                values.len(),
                family.labels.len()
            )));
        }
        STATS.with(|stats| {
            let mut stats = stats.borrow_mut();
            let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
            if let Some(id) = stats.ids.get(&(family.name, envoy_id, values.clone())) {
                return Ok(*id);
            }
            let id =
                u32::try_from(stats.stats.len()).map_err(|_| HostError("too many stats".into()))?;
            stats
                .ids
                .insert((family.name, envoy_id, values.clone()), id);
            stats.stats.push(Stat {
                kind: family.kind,
                envoy_id,
                values,
            });
            Ok(id)
        })
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
        match delta {
            0 => Ok(()),
            d if d > 0 => self.record(id, d.unsigned_abs(), Record::Add),
            d => self.record(id, d.unsigned_abs(), Record::Sub),
        }
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        self.record(id, value, Record::Sample)
    }
}

impl RequestHeaders for NativeHost<'_> {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        request_header(self.stream()?, name.as_bytes())
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let Some(filter) = self.stream() else { return };
        let value = value.map_or(ModuleBuffer::NONE, |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: buffers live for the call; a null value removes the header.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                filter,
                abi::REQUEST_HEADERS,
                ModuleBuffer::of(name.as_bytes()),
                value,
            );
        }
    }
}

/// How an attribute reads: a string, or an integer (handed to core as 8
/// little-endian bytes, as proxy-wasm's `get_property` hands them).
enum Attr {
    Str(u32),
    Int(u32),
}

impl Properties for NativeHost<'_> {
    /// The attributes the engines read, by Envoy's attribute id (the ABI has
    /// no path lookup). `xds.node` does not answer on this ABI: the metrics
    /// filter's `workload` comes from its config.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let filter = self.stream()?;
        let attr = match path {
            ["connection", "uri_san_peer_certificate"] => {
                Attr::Str(abi::ATTR_CONNECTION_URI_SAN_PEER_CERTIFICATE)
            }
            ["xds", "cluster_name"] => Attr::Str(abi::ATTR_XDS_CLUSTER_NAME),
            ["xds", "listener_direction"] => Attr::Int(abi::ATTR_XDS_LISTENER_DIRECTION),
            ["response", "code"] => Attr::Int(abi::ATTR_RESPONSE_CODE),
            ["response", "flags"] => Attr::Int(abi::ATTR_RESPONSE_FLAGS),
            ["response", "grpc_status"] => Attr::Int(abi::ATTR_RESPONSE_GRPC_STATUS),
            ["response", "size"] => Attr::Int(abi::ATTR_RESPONSE_SIZE),
            ["request", "size"] => Attr::Int(abi::ATTR_REQUEST_SIZE),
            ["request", "duration"] => Attr::Int(abi::ATTR_REQUEST_DURATION),
            _ => return None,
        };
        match attr {
            Attr::Str(id) => {
                let mut out = EnvoyBuffer::EMPTY;
                // SAFETY: `out` is written by Envoy.
                let found = unsafe {
                    abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                        filter, id, &mut out,
                    )
                };
                // SAFETY: Envoy's buffer, valid until the end of this hook; copied.
                found.then(|| unsafe { out.bytes() }.to_vec())
            }
            Attr::Int(id) => {
                let mut n = 0u64;
                // SAFETY: `n` is written by Envoy.
                let found = unsafe {
                    abi::envoy_dynamic_module_callback_http_filter_get_attribute_int(
                        filter, id, &mut n,
                    )
                };
                found.then(|| n.to_le_bytes().to_vec())
            }
        }
    }
}

impl Clock for NativeHost<'_> {
    fn now_us(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }
    fn monotonic_us(&self) -> u64 {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let origin = ORIGIN.get_or_init(std::time::Instant::now);
        u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// Process-wide key/value data shared by every worker (the metrics
/// filter's admitted label tuples): a plain lock, held for one map operation.
/// Bounded by its users' keys (`max_label_tuples` markers and a count).
static SHARED: std::sync::Mutex<Option<SharedMap>> = std::sync::Mutex::new(None);

/// key -> (value, CAS token).
type SharedMap = HashMap<String, (Vec<u8>, u32)>;

/// How many writes the shared data has taken ([`SharedData::shared_version`]:
/// a following router reads its table again when this moves).
static SHARED_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl SharedData for NativeHost<'_> {
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        let map = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        match map.as_ref().and_then(|m| m.get(key)) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedSetError> {
        let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        let map = guard.get_or_insert_with(HashMap::new);
        let current = map.get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, current) {
            if want != have {
                return Err(SharedSetError::CasMismatch);
            }
        }
        let next = current.unwrap_or(0).wrapping_add(1);
        map.insert(key.to_string(), (value.to_vec(), next));
        SHARED_WRITES.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn shared_version(&self) -> Option<u64> {
        Some(SHARED_WRITES.load(std::sync::atomic::Ordering::Acquire))
    }
}

impl FilterHost for NativeHost<'_> {
    fn now_ms(&self) -> u64 {
        self.now_us() / 1000
    }

    fn random_id(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if usize::try_from(n).ok() != Some(b.len()) {
            // No entropy: the clock, mixed (ids stay unique per process; the
            // engines reject all-zero).
            let t = txmesh_core::rng::mix(self.now_us() ^ self.monotonic_us().rotate_left(32));
            b[..8].copy_from_slice(&t.to_le_bytes());
            b[8..].copy_from_slice(&txmesh_core::rng::mix(t).to_le_bytes());
        }
        b
    }

    /// A callout from the filter config (the main thread's poller): its
    /// answer comes to `on_http_filter_config_http_callout_done`. Streams
    /// make none (the native router's workers only follow).
    fn dispatch(&self, c: &Callout) -> Result<u32, HostError> {
        let Target::Config(config) = self.target else {
            return Err(HostError(
                "callouts are made from the filter config, not from a stream".into(),
            ));
        };
        if c.grpc.is_some() {
            return Err(HostError(
                "gRPC calls are not in the native module yet".into(),
            ));
        }
        let host = c.cluster.as_str();
        let mut hs: Vec<(&str, &str)> =
            vec![(":method", c.method), (":path", &c.path), ("host", host)];
        hs.extend(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let headers = module_headers(&hs);
        let mut id = 0u64;
        // SAFETY: every buffer lives until the call returns; `id` is written.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                config,
                &mut id,
                ModuleBuffer::of(c.cluster.as_bytes()),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(&c.body),
                c.timeout_ms,
            )
        };
        if r != abi::CALLOUT_INIT_SUCCESS {
            return Err(HostError(format!(
                "callout to cluster {} refused (init result {r})",
                c.cluster
            )));
        }
        u32::try_from(id).map_err(|_| HostError(format!("callout id {id} out of range")))
    }

    /// A local reply on this hook's stream (`ctx` is the wasm host's notion;
    /// a native hook answers its own stream).
    fn send_reply(&self, _ctx: u32, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        if let Some(f) = self.stream() {
            send_response(f, u32::from(status), headers, body);
        }
    }

    /// Not used by the native filters (none pauses a response).
    fn resume_response(&self, _ctx: u32, _part: ResponsePart, _fields: &[(&str, &str)]) {}

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        header(self.stream()?, abi::RESPONSE_HEADERS, name.as_bytes())
    }

    /// Not used by the native filters (none reads trailers).
    fn response_trailer(&self, _name: &str) -> Option<Vec<u8>> {
        None
    }

    /// Not used by the native filters (none edits a response).
    fn set_response_field(&self, _part: ResponsePart, _name: &str, _value: &str) {}

    fn log(&self, level: LogLevel, msg: &str) {
        let level = match level {
            LogLevel::Debug => abi::LOG_DEBUG,
            LogLevel::Info => abi::LOG_INFO,
            LogLevel::Warn => abi::LOG_WARN,
            LogLevel::Error => abi::LOG_ERROR,
        };
        log(level, msg);
    }
}
