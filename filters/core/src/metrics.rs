//! RED metrics in the spirit of Istio's standard metrics.
//!
//! One [`MetricsEngine`] per plugin root (one per Envoy worker): it owns the
//! cache of stat ids per label tuple. One [`MetricsStream`] per HTTP stream: it
//! reads what it needs from the request headers, and at the log phase hands a
//! complete observation to the engine.
//!
//! Cardinality is bounded process-wide: the set of admitted label tuples lives
//! in shared data (shared by all workers of the VM). Once `max_label_tuples`
//! tuples exist, new tuples are recorded under the overflow tuple (every label
//! but `reporter` set to `other`) and counted in
//! `txmesh_metrics_label_overflow_total`.

use crate::config::{parse_json, ConfigError};
use crate::flags;
use crate::host::{
    Clock, Family, HostError, Label, MetricKind, Metrics, Properties, RequestHeaders, SharedData,
    SharedSetError,
};
use crate::labels::{encode, is_clean_value, sanitize_value};
use crate::props;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

pub const REQUESTS_TOTAL: &str = "txmesh_requests_total";
pub const REQUEST_DURATION: &str = "txmesh_request_duration_milliseconds";
pub const REQUEST_BYTES: &str = "txmesh_request_bytes";
pub const RESPONSE_BYTES: &str = "txmesh_response_bytes";
pub const OVERFLOW_TOTAL: &str = "txmesh_metrics_label_overflow_total";

/// Label names, in the order they are encoded into stat names.
pub const LABELS: [&str; 7] = [
    "reporter",
    "source_workload",
    "destination_service",
    "response_code",
    "response_flags",
    "request_protocol",
    "grpc_response_status",
];

/// The labels of every per-request stat (Istio's, in [`LABELS`] order).
pub const REQUEST_LABELS: [Label; 7] = [
    Label::named(LABELS[0]),
    Label::named(LABELS[1]),
    Label::named(LABELS[2]),
    Label::named(LABELS[3]),
    Label::named(LABELS[4]),
    Label::named(LABELS[5]),
    Label::named(LABELS[6]),
];

pub static REQUESTS: Family = Family::new(MetricKind::Counter, REQUESTS_TOTAL, &REQUEST_LABELS);
pub static DURATION: Family = Family::new(MetricKind::Histogram, REQUEST_DURATION, &REQUEST_LABELS);
pub static REQUEST_SIZE: Family =
    Family::new(MetricKind::Histogram, REQUEST_BYTES, &REQUEST_LABELS);
pub static RESPONSE_SIZE: Family =
    Family::new(MetricKind::Histogram, RESPONSE_BYTES, &REQUEST_LABELS);
pub static OVERFLOW: Family = Family::new(MetricKind::Counter, OVERFLOW_TOTAL, &[]);

/// The metrics filter's stat families.
pub static FAMILIES: [&Family; 5] = [
    &REQUESTS,
    &DURATION,
    &REQUEST_SIZE,
    &RESPONSE_SIZE,
    &OVERFLOW,
];

/// Header by which an outbound sidecar tells the inbound sidecar who is
/// calling (Istio's metadata exchange, reduced to the workload name). Always
/// overwritten on outbound, removed on inbound before the app sees it.
pub const PEER_HEADER: &str = "x-txmesh-source-workload";

/// Shared-data key holding the number of admitted label tuples (u32 LE).
const TUPLE_COUNT_KEY: &str = "txmesh.metrics.tuple_count";
/// Prefix of the shared-data key marking one admitted tuple.
const TUPLE_KEY_PREFIX: &str = "txmesh.metrics.tuple.";
/// CAS attempts before a new tuple is sent to overflow.
const CAS_ATTEMPTS: u32 = 16;

pub const DEFAULT_MAX_LABEL_TUPLES: u32 = 1000;
pub const MAX_MAX_LABEL_TUPLES: u32 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    Inbound,
    Outbound,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Inbound => "inbound",
            Reporter::Outbound => "outbound",
        }
    }
    /// From the `xds.listener_direction` attribute (envoy.config.core.v3.TrafficDirection:
    /// 1 = INBOUND, 2 = OUTBOUND).
    pub fn from_listener_direction(bytes: &[u8]) -> Option<Self> {
        match props::as_u64(bytes)? {
            1 => Some(Reporter::Inbound),
            2 => Some(Reporter::Outbound),
            _ => None,
        }
    }
}

/// Plugin configuration of `txmesh_metrics.wasm` (JSON). See docs/metrics.md.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `inbound` or `outbound`. When absent, taken from the listener's
    /// `traffic_direction` (attribute `xds.listener_direction`).
    #[serde(default)]
    pub reporter: Option<Reporter>,
    /// This sidecar's workload name. When absent: node metadata `WORKLOAD_NAME`,
    /// else `unknown`.
    #[serde(default)]
    pub workload: Option<String>,
    /// Envoy cluster name -> `destination_service` label value. Unmapped
    /// clusters: the cluster name (outbound) or this workload (inbound).
    #[serde(default)]
    pub destination_services: BTreeMap<String, String>,
    /// Bound on distinct label tuples in this Envoy (all workers, all
    /// listeners sharing the VM).
    #[serde(default = "default_max_label_tuples")]
    pub max_label_tuples: u32,
    /// Send/accept the source workload header between sidecars.
    #[serde(default = "default_true")]
    pub peer_header: bool,
}

fn default_max_label_tuples() -> u32 {
    DEFAULT_MAX_LABEL_TUPLES
}
fn default_true() -> bool {
    true
}

impl MetricsConfig {
    /// Parses and validates; every error names the offending field.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let cfg: Self = parse_json(bytes)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(w) = &self.workload {
            check_label_value("workload", w)?;
        }
        for (cluster, service) in &self.destination_services {
            if cluster.is_empty() {
                return Err(ConfigError::at(
                    "destination_services",
                    "cluster name must not be empty",
                ));
            }
            check_label_value(&format!("destination_services.{cluster}"), service)?;
        }
        if self.max_label_tuples == 0 || self.max_label_tuples > MAX_MAX_LABEL_TUPLES {
            return Err(ConfigError::at(
                "max_label_tuples",
                format!(
                    "must be between 1 and {MAX_MAX_LABEL_TUPLES}, got {}",
                    self.max_label_tuples
                ),
            ));
        }
        Ok(())
    }
}

fn check_label_value(path: &str, v: &str) -> Result<(), ConfigError> {
    if is_clean_value(v) {
        Ok(())
    } else {
        Err(ConfigError::at(
            path,
            format!(
                "{v:?} is not a valid label value: 1 to 64 characters of A-Z a-z 0-9 _ . : / | -"
            ),
        ))
    }
}

/// Everything recorded for one finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub reporter: Reporter,
    pub source_workload: String,
    pub destination_service: String,
    pub response_code: u32,
    pub response_flags: String,
    pub request_protocol: &'static str,
    /// A gRPC request's final `grpc-status` (trailers, or a trailers-only
    /// answer; `unknown` if it had none); empty for HTTP (Istio's
    /// convention: the label is then absent in Prometheus).
    pub grpc_response_status: String,
    pub duration_ms: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Observation {
    /// The label values, in [`LABELS`] order (`code`: the response code as
    /// text), borrowed: a request recorded under a known tuple allocates
    /// only its code and its key.
    fn label_values<'a>(&'a self, code: &'a str) -> [&'a str; 7] {
        [
            self.reporter.as_str(),
            &self.source_workload,
            &self.destination_service,
            code,
            &self.response_flags,
            self.request_protocol,
            &self.grpc_response_status,
        ]
    }
}

/// A tuple's key (its labels encoded): the id cache's and shared data's key.
fn tuple_key(values: &[&str; 7]) -> String {
    let mut pairs = [("", ""); 7];
    for (p, (l, v)) in pairs.iter_mut().zip(LABELS.iter().zip(values)) {
        *p = (l, v);
    }
    encode(&pairs, "")
}

/// The overflow tuple's label values: every label but `reporter` is `other`.
fn overflow_values(reporter: Reporter) -> [&'static str; 7] {
    let o = "other";
    [reporter.as_str(), o, o, o, o, o, o]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TupleIds {
    requests: u32,
    duration: u32,
    request_bytes: u32,
    response_bytes: u32,
}

impl TupleIds {
    fn define(host: &impl Metrics, v: &[&str; 7]) -> Result<Self, HostError> {
        Ok(Self {
            requests: host.define_metric(&REQUESTS, v)?,
            duration: host.define_metric(&DURATION, v)?,
            request_bytes: host.define_metric(&REQUEST_SIZE, v)?,
            response_bytes: host.define_metric(&RESPONSE_SIZE, v)?,
        })
    }
}

/// Per-root (per-worker) state: config and the stat-id cache.
pub struct MetricsEngine {
    config: MetricsConfig,
    workload: String,
    /// tuple key -> ids (admitted) or None (known to overflow).
    tuples: HashMap<String, Option<TupleIds>>,
    /// Ids of the overflow tuple, per reporter (inbound, outbound).
    overflow: (Option<TupleIds>, Option<TupleIds>),
    overflow_counter: u32,
}

impl MetricsEngine {
    /// Builds the engine at configure time: resolves the workload name and
    /// defines the overflow counter (the only stat defined up front).
    pub fn new(
        config: MetricsConfig,
        host: &(impl Metrics + Properties),
    ) -> Result<Self, HostError> {
        let workload = match &config.workload {
            Some(w) => w.clone(),
            None => host
                .property(&["xds", "node", "metadata", "WORKLOAD_NAME"])
                .map(|b| sanitize_value(&b))
                .unwrap_or_else(|| "unknown".to_string()),
        };
        let overflow_counter = host.define_metric(&OVERFLOW, &[])?;
        Ok(Self {
            config,
            workload,
            tuples: HashMap::new(),
            overflow: (None, None),
            overflow_counter,
        })
    }

    pub fn config(&self) -> &MetricsConfig {
        &self.config
    }

    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// The log phase of a stream: observes and records it — from the state
    /// kept at its request headers, or, when there is none (an earlier filter
    /// answered first), from [`MetricsStream::at_log`]. `Ok(None)`: not
    /// recorded (the reporter cannot be known); else whether it went to the
    /// overflow tuple.
    pub fn finish(
        &mut self,
        host: &(impl RequestHeaders + Properties + Clock + Metrics + SharedData),
        state: Option<MetricsStream>,
    ) -> Result<Option<bool>, HostError> {
        let Some(state) = state.or_else(|| MetricsStream::at_log(self, host)) else {
            return Ok(None);
        };
        let obs = state.observe(self, host);
        self.record(host, &obs).map(Some)
    }

    /// Records one finished request. Returns whether it went to the overflow tuple.
    pub fn record(
        &mut self,
        host: &(impl Metrics + SharedData),
        obs: &Observation,
    ) -> Result<bool, HostError> {
        let code = obs.response_code.to_string();
        let values = obs.label_values(&code);
        let key = tuple_key(&values);
        let (ids, overflowed) = match self.lookup(host, &key, &values)? {
            Some(ids) => (ids, false),
            None => (self.overflow_ids(host, obs.reporter)?, true),
        };
        if overflowed {
            host.increment_metric(self.overflow_counter, 1)?;
        }
        host.increment_metric(ids.requests, 1)?;
        host.record_metric(ids.duration, obs.duration_ms)?;
        host.record_metric(ids.request_bytes, obs.request_bytes)?;
        host.record_metric(ids.response_bytes, obs.response_bytes)?;
        Ok(overflowed)
    }

    fn overflow_ids(
        &mut self,
        host: &impl Metrics,
        reporter: Reporter,
    ) -> Result<TupleIds, HostError> {
        let slot = match reporter {
            Reporter::Inbound => &mut self.overflow.0,
            Reporter::Outbound => &mut self.overflow.1,
        };
        if let Some(ids) = slot {
            return Ok(*ids);
        }
        let ids = TupleIds::define(host, &overflow_values(reporter))?;
        *slot = Some(ids);
        Ok(ids)
    }

    /// Cached ids of an admitted tuple, admitting it if there is room.
    fn lookup(
        &mut self,
        host: &(impl Metrics + SharedData),
        key: &str,
        values: &[&str; 7],
    ) -> Result<Option<TupleIds>, HostError> {
        if let Some(hit) = self.tuples.get(key) {
            return Ok(*hit);
        }
        let max = self.config.max_label_tuples;
        let admitted = admit(host, key, max);
        let ids = if admitted {
            Some(TupleIds::define(host, values)?)
        } else {
            None
        };
        // The local cache holds at most `max` admitted tuples plus as many
        // known-overflow ones; beyond that, misses ask shared data again.
        if self.tuples.len() < 2 * max as usize {
            self.tuples.insert(key.to_string(), ids);
        }
        Ok(ids)
    }
}

/// Admits a tuple process-wide if fewer than `max` are admitted. A tuple
/// already admitted by another worker is found by its marker key.
fn admit(host: &impl SharedData, key: &str, max: u32) -> bool {
    let marker = format!("{TUPLE_KEY_PREFIX}{key}");
    if host.shared_get(&marker).0.is_some() {
        return true;
    }
    for _ in 0..CAS_ATTEMPTS {
        let (value, cas) = host.shared_get(TUPLE_COUNT_KEY);
        let count = value
            .as_deref()
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0);
        if count >= max {
            return false;
        }
        match host.shared_set(TUPLE_COUNT_KEY, &(count + 1).to_le_bytes(), cas) {
            // Two workers racing on the same new tuple may both take a slot:
            // the bound still holds, one slot is spent twice.
            Ok(()) => return host.shared_set(&marker, b"1", None).is_ok(),
            Err(SharedSetError::CasMismatch) => continue,
            Err(SharedSetError::Other(_)) => return false,
        }
    }
    false
}

/// Per-stream state of the metrics filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsStream {
    reporter: Reporter,
    source_workload: String,
    grpc: bool,
    /// The monotonic clock at request headers (µs): the duration is
    /// measured from here, which costs two clock readings instead of the
    /// `request.duration` attribute (≈1 µs). `None` for a stream first seen
    /// at the log phase ([`MetricsStream::at_log`]): the attribute then.
    started_us: Option<u64>,
    /// The request ended with its headers: its body size is 0, no need to
    /// ask the host (one call fewer per bodyless request).
    bodyless: bool,
}

impl MetricsStream {
    /// At request headers: decides the reporter, exchanges the peer header,
    /// and notes the protocol. `None` when the reporter cannot be known (no
    /// config and no listener direction): the stream is then not recorded.
    pub fn on_request_headers(
        engine: &MetricsEngine,
        host: &(impl RequestHeaders + Properties + Clock),
    ) -> Option<Self> {
        Self::from_request(engine, host, true)
    }

    /// At the log phase of a stream whose request headers this filter never
    /// saw: a filter before it in the chain answered at request headers (an
    /// authz denial, the router's 503, a txn rejection or shed) or the
    /// stream ended before they were complete. Such a stream is still
    /// recorded — a denial is a request the service answered — with the
    /// labels read from the request headers as they are at the end (the peer
    /// header left as it is) and the duration from `request.duration` (one
    /// attribute, only on this path). `None` as for
    /// [`MetricsStream::on_request_headers`].
    pub fn at_log(
        engine: &MetricsEngine,
        host: &(impl RequestHeaders + Properties + Clock),
    ) -> Option<Self> {
        Self::from_request(engine, host, false)
    }

    /// The stream's labels from its request headers; `live`: at request
    /// headers (exchange the peer header, start the clock), else at the log
    /// phase (read only).
    fn from_request(
        engine: &MetricsEngine,
        host: &(impl RequestHeaders + Properties + Clock),
        live: bool,
    ) -> Option<Self> {
        let cfg = engine.config();
        let reporter = match cfg.reporter {
            Some(r) => r,
            None => {
                Reporter::from_listener_direction(&host.property(&["xds", "listener_direction"])?)?
            }
        };
        let source_workload = match reporter {
            Reporter::Outbound => {
                if live && cfg.peer_header {
                    host.set_request_header(PEER_HEADER, Some(engine.workload()));
                }
                engine.workload().to_string()
            }
            Reporter::Inbound => {
                if cfg.peer_header {
                    let peer = host.request_header(PEER_HEADER);
                    if live && peer.is_some() {
                        host.set_request_header(PEER_HEADER, None);
                    }
                    peer.map(|p| sanitize_value(&p))
                        .unwrap_or_else(|| "unknown".to_string())
                } else {
                    "unknown".to_string()
                }
            }
        };
        let grpc = host
            .request_header("content-type")
            .is_some_and(|ct| crate::grpc::is_grpc(&ct));
        Some(Self {
            reporter,
            source_workload,
            grpc,
            started_us: live.then(|| host.monotonic_us()),
            bodyless: false,
        })
    }

    /// Marks a request that ended with its headers (`end_of_stream` at
    /// request headers): recorded with 0 request bytes.
    pub fn bodyless(mut self) -> Self {
        self.bodyless = true;
        self
    }

    /// [`MetricsStream::bodyless`] when the request headers came with
    /// `end_of_stream`.
    pub fn ended_at_headers(self, end_of_stream: bool) -> Self {
        if end_of_stream {
            self.bodyless()
        } else {
            self
        }
    }

    /// At the log phase: builds the observation from stream attributes.
    pub fn observe(&self, engine: &MetricsEngine, host: &(impl Properties + Clock)) -> Observation {
        let prop_u64 = |path: &[&str]| {
            host.property(path)
                .as_deref()
                .and_then(props::as_u64)
                .unwrap_or(0)
        };
        // Inbound, the destination is this workload unless a cluster is
        // mapped: skip the (costly) property read when nothing is mapped.
        let cluster = if self.reporter == Reporter::Inbound
            && engine.config().destination_services.is_empty()
        {
            None
        } else {
            host.property(&["xds", "cluster_name"])
        };
        let mapped = cluster.as_deref().and_then(|c| {
            props::as_str(c).and_then(|c| engine.config().destination_services.get(c))
        });
        let destination_service = match (mapped, self.reporter, cluster.as_deref()) {
            (Some(s), _, _) => s.clone(),
            (None, Reporter::Inbound, _) => engine.workload().to_string(),
            (None, Reporter::Outbound, Some(c)) if !c.is_empty() => sanitize_value(c),
            (None, Reporter::Outbound, _) => "unknown".to_string(),
        };
        Observation {
            reporter: self.reporter,
            source_workload: self.source_workload.clone(),
            destination_service,
            response_code: u32::try_from(prop_u64(&["response", "code"])).unwrap_or(0),
            response_flags: flags::render(prop_u64(&["response", "flags"])),
            request_protocol: if self.grpc { "grpc" } else { "http" },
            // One more attribute, for gRPC requests only.
            grpc_response_status: if self.grpc {
                host.property(&["response", "grpc_status"])
                    .as_deref()
                    .and_then(props::as_u64)
                    .map_or_else(|| "unknown".to_string(), |s| s.to_string())
            } else {
                String::new()
            },
            duration_ms: match self.started_us {
                Some(t) => host.monotonic_us().saturating_sub(t) / 1000,
                None => {
                    host.property(&["request", "duration"])
                        .as_deref()
                        .and_then(props::as_i64_clamped)
                        .unwrap_or(0)
                        / 1_000_000
                }
            },
            request_bytes: if self.bodyless {
                0
            } else {
                prop_u64(&["request", "size"])
            },
            response_bytes: prop_u64(&["response", "size"]),
        }
    }
}

#[cfg(test)]
mod tests;
