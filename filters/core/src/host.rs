//! The host as txmesh sees it: headers, properties, shared data, metrics.
//!
//! Each trait is small so that a state machine can be driven by a fake in unit
//! tests and by the proxy-wasm SDK in Envoy.

/// Kind of an Envoy stat defined from wasm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A host call failed (the host returned an error status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError(pub String);

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stat label: its Prometheus name, and the key that carries it inside a
/// wasm stat name (`labels::encode`; the bootstrap's `stats_tags` turn it
/// back into a tag). The router's keys are prefixed so that `service=` does
/// not also match inside `destination_service=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Label {
    pub name: &'static str,
    pub key: &'static str,
}

impl Label {
    /// A label whose wasm key is its name.
    pub const fn named(name: &'static str) -> Self {
        Label { name, key: name }
    }
}

/// A family of stats: one name and kind, a fixed list of labels. Each
/// filter declares its families once; a host defines a stat of a family for
/// given label values. The wasm host encodes the values into the stat name;
/// a native host defines every family with its label names when the filter
/// config is created (Envoy freezes definitions after that) and records with
/// the values as real tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Family {
    pub kind: MetricKind,
    pub name: &'static str,
    pub labels: &'static [Label],
}

impl Family {
    pub const fn new(kind: MetricKind, name: &'static str, labels: &'static [Label]) -> Self {
        Family { kind, name, labels }
    }

    /// The wasm stat name of the stat with these label values (Istio's
    /// `key=.=value;.;` encoding; values must be sanitized).
    pub fn encoded(&self, values: &[&str]) -> String {
        let pairs: Vec<(&str, &str)> = self
            .labels
            .iter()
            .zip(values)
            .map(|(l, v)| (l.key, *v))
            .collect();
        crate::labels::encode(&pairs, self.name)
    }
}

/// Envoy stats defined by the plugin.
pub trait Metrics {
    /// Defines (or looks up) the stat of `family` with these label values
    /// (one per label, in the family's order). Costly in Envoy (the wasm host
    /// takes the symbol-table lock): call once per value tuple and cache the id.
    fn define_metric(&self, family: &'static Family, values: &[&str]) -> Result<u32, HostError>;
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError>;
    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError>;
}

/// Result of a compare-and-swap write to shared data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedSetError {
    /// Someone else wrote the key since we read it.
    CasMismatch,
    Other(String),
}

/// Process-wide key/value store shared by all workers of one `vm_id`.
/// Entries are never freed and cannot be deleted: callers must bound their keys.
pub trait SharedData {
    /// Value and CAS token of a key; `(None, None)` when absent.
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes a key. With `cas = Some(token)` the write fails with
    /// [`SharedSetError::CasMismatch`] if the key changed since that token was read.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedSetError>;
    /// A number that changes whenever any key is written, for hosts that
    /// keep one (the native module); `None` where the host has none
    /// (proxy-wasm). Lets a cache of shared data know when to read again.
    fn shared_version(&self) -> Option<u64> {
        None
    }
}

/// The request side of one HTTP stream.
pub trait RequestHeaders {
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    fn set_request_header(&self, name: &str, value: Option<&str>);
}

/// The host's clocks. Reading one costs 0.15–0.25 µs, a quarter of an
/// attribute (BENCHMARKS.md "What a host call costs"): filters time a stream
/// with two readings of the monotonic clock rather than reading
/// `request.duration`.
pub trait Clock {
    /// The wall clock (`proxy_get_current_time_nanoseconds`), µs since the
    /// Unix epoch: for deadlines and records other processes read.
    fn now_us(&self) -> u64;
    /// A monotonic clock, µs from an arbitrary origin: for durations (it
    /// does not jump when the wall clock is stepped). Defaults to the wall
    /// clock (fakes).
    fn monotonic_us(&self) -> u64 {
        self.now_us()
    }
}

/// Stream and connection attributes (`get_property`).
pub trait Properties {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
}

/// Log levels of [`FilterHost::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// An HTTP callout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Callout {
    pub cluster: String,
    pub method: &'static str,
    pub path: String,
    /// Headers (a gRPC call: its initial metadata).
    pub headers: Vec<(String, String)>,
    /// The body (a gRPC call: the request message).
    pub body: Vec<u8>,
    pub timeout_ms: u64,
    /// A gRPC unary call to this service and method instead of an HTTP call.
    pub grpc: Option<GrpcMethod>,
}

/// A gRPC method a callout calls (`/service/method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrpcMethod {
    pub service: &'static str,
    pub method: &'static str,
}

/// The answer to a callout: `status` is `None` when there was no HTTP
/// response (timeout, reset, cancelled).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct CalloutResponse {
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

impl CalloutResponse {
    /// A gRPC call's answer as an engine reads answers: OK is 200 with the
    /// response message; DEADLINE_EXCEEDED (4) and UNAVAILABLE (14, which
    /// is also what Envoy reports for a timeout) are no answer; any other
    /// status is 502 with the status and its message as the body.
    pub fn from_grpc(status: u32, body: Vec<u8>) -> Self {
        match status {
            0 => CalloutResponse {
                status: Some(200),
                body,
            },
            4 | 14 => CalloutResponse {
                status: None,
                body: Vec::new(),
            },
            s => {
                let mut text = format!("grpc-status {s}").into_bytes();
                if !body.is_empty() {
                    text.extend_from_slice(b": ");
                    text.extend(body.iter().take(200));
                }
                CalloutResponse {
                    status: Some(502),
                    body: text,
                }
            }
        }
    }
}

/// Which part of a response a filter reads, edits or holds: its headers,
/// or its trailers (where a gRPC answer with a body puts `grpc-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponsePart {
    Headers,
    Trailers,
}

/// What a filter engine needs from Envoy beyond headers, properties, shared
/// data and metrics: clocks, callouts, replies to paused streams, logs.
pub trait FilterHost: SharedData + Metrics + RequestHeaders + Properties + Clock {
    /// Milliseconds (same clock as [`Clock::now_us`]).
    fn now_ms(&self) -> u64;
    fn random_id(&self) -> [u8; 16];
    /// Dispatches from the current context; answers come back to it.
    fn dispatch(&self, c: &Callout) -> Result<u32, HostError>;
    /// Dispatches from context `ctx` (the root context: the call outlives
    /// the current stream, whose callouts Envoy cancels when it ends); 0:
    /// from the current context.
    fn dispatch_in(&self, ctx: u32, c: &Callout) -> Result<u32, HostError> {
        let _ = ctx;
        self.dispatch(c)
    }
    /// A local reply on stream `ctx` (paused in its request or response).
    fn send_reply(&self, ctx: u32, status: u16, headers: &[(&str, &str)], body: &[u8]);
    /// Resumes the response of stream `ctx`, paused at `part`, with these
    /// fields set in that part.
    fn resume_response(&self, ctx: u32, part: ResponsePart, fields: &[(&str, &str)]);
    /// A header of the current stream's response.
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// A trailer of the current stream's response (in its trailers callback).
    fn response_trailer(&self, name: &str) -> Option<Vec<u8>>;
    /// Sets a field of the current stream's response (during the callback
    /// of that part).
    fn set_response_field(&self, part: ResponsePart, name: &str, value: &str);
    fn log(&self, level: LogLevel, msg: &str);
}

/// What the glue does with the stream after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Stop iteration: the engine resumes or answers the stream later, or
    /// already sent a local reply.
    Pause,
}

pub mod fake {
    //! In-memory host for unit tests, built builder-style.
    use super::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default, Debug)]
    pub struct FakeHost {
        pub request_headers: RefCell<Vec<(String, Vec<u8>)>>,
        pub properties: RefCell<HashMap<String, Vec<u8>>>,
        pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        /// name -> (kind, id)
        pub metric_ids: RefCell<BTreeMap<String, (MetricKind, u32)>>,
        /// id -> counter value, or histogram samples
        pub counters: RefCell<BTreeMap<u32, i64>>,
        pub samples: RefCell<BTreeMap<u32, Vec<u64>>>,
        pub define_calls: RefCell<u32>,
        /// When set, every CAS write fails this many times first.
        pub cas_failures: RefCell<u32>,
        /// Shared-data reads and writes made so far.
        pub shared_calls: RefCell<u32>,
        /// Shared-data writes that succeeded ([`SharedData::shared_version`]).
        pub shared_writes: std::cell::Cell<u64>,
        /// The wall clock and the monotonic clock, in µs ([`Clock`]);
        /// tests move them.
        pub clock_us: std::cell::Cell<u64>,
        pub monotonic_us: std::cell::Cell<u64>,
    }

    impl FakeHost {
        pub fn new() -> Self {
            Self::default()
        }
        pub fn header(self, name: &str, value: &[u8]) -> Self {
            self.request_headers
                .borrow_mut()
                .push((name.to_ascii_lowercase(), value.to_vec()));
            self
        }
        pub fn prop(self, path: &[&str], value: &[u8]) -> Self {
            self.properties
                .borrow_mut()
                .insert(path.join("."), value.to_vec());
            self
        }
        pub fn prop_u64(self, path: &[&str], value: u64) -> Self {
            self.prop(path, &value.to_le_bytes())
        }
        pub fn clear_stream(&self) {
            self.request_headers.borrow_mut().clear();
            self.properties.borrow_mut().clear();
        }
        /// Counter value by full stat name.
        pub fn counter(&self, name: &str) -> Option<i64> {
            let ids = self.metric_ids.borrow();
            let (_, id) = ids.get(name)?;
            self.counters.borrow().get(id).copied()
        }
        /// Histogram samples by full stat name.
        pub fn histogram(&self, name: &str) -> Option<Vec<u64>> {
            let ids = self.metric_ids.borrow();
            let (_, id) = ids.get(name)?;
            self.samples.borrow().get(id).cloned()
        }
        pub fn metric_names(&self) -> Vec<String> {
            self.metric_ids.borrow().keys().cloned().collect()
        }
        pub fn header_value(&self, name: &str) -> Option<Vec<u8>> {
            self.request_header(name)
        }
    }

    impl Clock for FakeHost {
        fn now_us(&self) -> u64 {
            self.clock_us.get()
        }
        fn monotonic_us(&self) -> u64 {
            self.monotonic_us.get()
        }
    }

    impl Metrics for FakeHost {
        fn define_metric(
            &self,
            family: &'static Family,
            values: &[&str],
        ) -> Result<u32, HostError> {
            let (kind, name) = (family.kind, family.encoded(values));
            let name = name.as_str();
            *self.define_calls.borrow_mut() += 1;
            let mut ids = self.metric_ids.borrow_mut();
            let next = ids.len() as u32 + 1;
            let (k, id) = *ids.entry(name.to_string()).or_insert((kind, next));
            if k != kind {
                return Err(HostError(format!("{name} redefined as another kind")));
            }
            Ok(id)
        }
        fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
            *self.counters.borrow_mut().entry(id).or_insert(0) += delta;
            Ok(())
        }
        fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
            self.samples.borrow_mut().entry(id).or_default().push(value);
            Ok(())
        }
    }

    impl SharedData for FakeHost {
        fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            *self.shared_calls.borrow_mut() += 1;
            match self.shared.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            }
        }
        fn shared_set(
            &self,
            key: &str,
            value: &[u8],
            cas: Option<u32>,
        ) -> Result<(), SharedSetError> {
            *self.shared_calls.borrow_mut() += 1;
            {
                let mut fails = self.cas_failures.borrow_mut();
                if cas.is_some() && *fails > 0 {
                    *fails -= 1;
                    return Err(SharedSetError::CasMismatch);
                }
            }
            let mut map = self.shared.borrow_mut();
            let current = map.get(key).map(|(_, c)| *c);
            if let (Some(want), Some(have)) = (cas, current) {
                if want != have {
                    return Err(SharedSetError::CasMismatch);
                }
            }
            let next = current.unwrap_or(0) + 1;
            map.insert(key.to_string(), (value.to_vec(), next));
            self.shared_writes.set(self.shared_writes.get() + 1);
            Ok(())
        }
        fn shared_version(&self) -> Option<u64> {
            Some(self.shared_writes.get())
        }
    }

    impl RequestHeaders for FakeHost {
        fn request_header(&self, name: &str) -> Option<Vec<u8>> {
            let name = name.to_ascii_lowercase();
            self.request_headers
                .borrow()
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        }
        fn set_request_header(&self, name: &str, value: Option<&str>) {
            let name = name.to_ascii_lowercase();
            let mut headers = self.request_headers.borrow_mut();
            headers.retain(|(n, _)| *n != name);
            if let Some(v) = value {
                headers.push((name, v.as_bytes().to_vec()));
            }
        }
    }

    impl Properties for FakeHost {
        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            self.properties.borrow().get(&path.join(".")).cloned()
        }
    }
}
