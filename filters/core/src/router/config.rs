//! Plugin configuration of `txmesh_router.wasm` (JSON). See docs/router.md.

use crate::config::{parse_json, ConfigError};
use crate::labels::is_clean_value;
use serde::Deserialize;
use std::collections::BTreeMap;

/// How a service's endpoint is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    Random,
    /// Smooth weighted round robin over the registry's weights.
    Weighted,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Power of two choices over `ewma_rtt × (pending + 1)` (linkerd's balancer).
    PeakEwma,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::Weighted => "weighted",
            Strategy::LeastRequest => "least_request",
            Strategy::PeakEwma => "peak_ewma",
        }
    }
    /// Whether picks read the endpoints' live load (in-flight, latency).
    pub fn uses_load(self) -> bool {
        matches!(self, Strategy::LeastRequest | Strategy::PeakEwma)
    }
}

/// How the destination service of a request is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ServiceFrom {
    /// The route's cluster (`xds.cluster_name`): one cluster per service.
    #[default]
    Cluster,
    /// The request's `:authority` without port: one shared cluster.
    Authority,
}

/// Passive outlier ejection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// Consecutive failures (5xx, connect failure, reset) that eject; 0 disables ejection.
    #[serde(default = "d_consecutive")]
    pub consecutive_failures: u32,
    /// First ejection lasts this long; the n-th ejection in a row n times as long.
    #[serde(default = "d_base_ejection")]
    pub base_ejection_ms: u64,
    /// Cap of one ejection.
    #[serde(default = "d_max_ejection")]
    pub max_ejection_ms: u64,
    /// Never more than this share of a service's endpoints ejected at once
    /// (at least one endpoint may always be ejected).
    #[serde(default = "d_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: d_consecutive(),
            base_ejection_ms: d_base_ejection(),
            max_ejection_ms: d_max_ejection(),
            max_ejection_percent: d_max_ejection_percent(),
        }
    }
}

/// Routing of one destination service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub strategy: Strategy,
    /// The Envoy cluster whose requests go to this service (`service_from:
    /// cluster`); absent: the service name.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Prefer endpoints in `local_zone`; use other zones only when no local
    /// endpoint is available (all ejected, drained or saturated).
    #[serde(default)]
    pub zone_preference: bool,
    /// A local endpoint with this many requests in flight (from this worker)
    /// counts as saturated for zone preference. Absent: never saturated.
    #[serde(default)]
    pub spill_over_pending: Option<u32>,
    #[serde(default)]
    pub outlier: Outlier,
    /// Peak-EWMA decay (linkerd: 10 s).
    #[serde(default = "d_decay")]
    pub ewma_decay_ms: u64,
    /// Latency assumed for an endpoint with no sample yet (linkerd: 30 ms).
    #[serde(default = "d_default_rtt")]
    pub default_rtt_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Names this router's shared state (two router filters in one VM with
    /// different registries need different names).
    #[serde(default = "d_name")]
    pub name: String,
    /// Envoy cluster of etcd's JSON gateway.
    #[serde(default = "d_etcd_cluster")]
    pub etcd_cluster: String,
    /// Registry key prefix: `<prefix><service>/<address>`.
    #[serde(default = "d_prefix")]
    pub registry_prefix: String,
    /// How often the registry is read.
    #[serde(default = "d_poll")]
    pub poll_interval_ms: u64,
    /// Deadline of one registry read.
    #[serde(default = "d_poll_timeout")]
    pub poll_timeout_ms: u64,
    /// The request header carrying the pick to Envoy (ORIGINAL_DST
    /// `http_header_name` or `override_host` header source). Always
    /// overwritten; removed from requests the router does not route.
    #[serde(default = "d_header")]
    pub endpoint_header: String,
    /// This sidecar's zone. Absent: node metadata `ZONE`, else none.
    #[serde(default)]
    pub local_zone: Option<String>,
    #[serde(default)]
    pub service_from: ServiceFrom,
    /// Bound on endpoints across all services (shared slots, metrics).
    #[serde(default = "d_max_endpoints")]
    pub max_endpoints: u32,
    pub services: BTreeMap<String, ServiceConfig>,
}

fn d_consecutive() -> u32 {
    5
}
fn d_base_ejection() -> u64 {
    30_000
}
fn d_max_ejection() -> u64 {
    300_000
}
fn d_max_ejection_percent() -> u32 {
    50
}
fn d_decay() -> u64 {
    10_000
}
fn d_default_rtt() -> u64 {
    30
}
fn d_name() -> String {
    "router".to_string()
}
fn d_etcd_cluster() -> String {
    "etcd".to_string()
}
fn d_prefix() -> String {
    super::registry::DEFAULT_PREFIX.to_string()
}
fn d_poll() -> u64 {
    500
}
fn d_poll_timeout() -> u64 {
    1_000
}
fn d_header() -> String {
    "x-txmesh-endpoint".to_string()
}
fn d_max_endpoints() -> u32 {
    256
}

pub const MAX_MAX_ENDPOINTS: u32 = 4096;

impl RouterConfig {
    /// Parses and validates; every error names the offending field.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let cfg: Self = parse_json(bytes)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if !name_ok(&self.name) {
            return Err(ConfigError::at(
                "name",
                format!("{:?}: 1 to 64 characters of A-Z a-z 0-9 - _ .", self.name),
            ));
        }
        if self.etcd_cluster.is_empty() {
            return Err(ConfigError::at("etcd_cluster", "must not be empty"));
        }
        if !self.registry_prefix.ends_with('/') || self.registry_prefix.len() < 2 {
            return Err(ConfigError::at(
                "registry_prefix",
                format!("{:?} must end with `/`", self.registry_prefix),
            ));
        }
        if !(50..=60_000).contains(&self.poll_interval_ms) {
            return Err(ConfigError::at(
                "poll_interval_ms",
                format!("must be 50 to 60000, got {}", self.poll_interval_ms),
            ));
        }
        if !(10..=60_000).contains(&self.poll_timeout_ms) {
            return Err(ConfigError::at(
                "poll_timeout_ms",
                format!("must be 10 to 60000, got {}", self.poll_timeout_ms),
            ));
        }
        let header_ok = !self.endpoint_header.is_empty()
            && self
                .endpoint_header
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !header_ok {
            return Err(ConfigError::at(
                "endpoint_header",
                format!(
                    "{:?} must be a lowercase header name (a-z 0-9 -)",
                    self.endpoint_header
                ),
            ));
        }
        if let Some(z) = &self.local_zone {
            if !is_clean_value(z) {
                return Err(ConfigError::at(
                    "local_zone",
                    format!("{z:?}: 1 to 64 characters of A-Z a-z 0-9 _ . : / | -"),
                ));
            }
        }
        if self.max_endpoints == 0 || self.max_endpoints > MAX_MAX_ENDPOINTS {
            return Err(ConfigError::at(
                "max_endpoints",
                format!(
                    "must be 1 to {MAX_MAX_ENDPOINTS}, got {}",
                    self.max_endpoints
                ),
            ));
        }
        if self.services.is_empty() {
            return Err(ConfigError::at(
                "services",
                "no service configured: the router would route nothing",
            ));
        }
        let mut clusters = BTreeMap::new();
        for (name, s) in &self.services {
            let at = |field: &str| format!("services.{name}.{field}");
            if !is_clean_value(name) || name.contains('/') {
                return Err(ConfigError::at(
                    format!("services.{name}"),
                    "a service name is 1 to 64 characters of A-Z a-z 0-9 _ . : | -",
                ));
            }
            let cluster = s.cluster.clone().unwrap_or_else(|| name.clone());
            if cluster.is_empty() {
                return Err(ConfigError::at(at("cluster"), "must not be empty"));
            }
            if let Some(other) = clusters.insert(cluster.clone(), name.clone()) {
                return Err(ConfigError::at(
                    at("cluster"),
                    format!("cluster {cluster:?} already routes service {other:?}"),
                ));
            }
            let o = &s.outlier;
            if o.base_ejection_ms == 0 || o.base_ejection_ms > o.max_ejection_ms {
                return Err(ConfigError::at(
                    at("outlier.base_ejection_ms"),
                    format!(
                        "must be at least 1 and at most max_ejection_ms ({}), got {}",
                        o.max_ejection_ms, o.base_ejection_ms
                    ),
                ));
            }
            if o.max_ejection_percent > 100 {
                return Err(ConfigError::at(
                    at("outlier.max_ejection_percent"),
                    format!("must be 0 to 100, got {}", o.max_ejection_percent),
                ));
            }
            if s.ewma_decay_ms == 0 {
                return Err(ConfigError::at(at("ewma_decay_ms"), "must be at least 1"));
            }
            if s.default_rtt_ms == 0 || s.default_rtt_ms > 60_000 {
                return Err(ConfigError::at(
                    at("default_rtt_ms"),
                    format!("must be 1 to 60000, got {}", s.default_rtt_ms),
                ));
            }
            if s.spill_over_pending == Some(0) {
                return Err(ConfigError::at(
                    at("spill_over_pending"),
                    "must be at least 1 (absent: never saturated)",
                ));
            }
        }
        Ok(())
    }

    /// The service a route's cluster routes to.
    pub fn service_of_cluster(&self, cluster: &[u8]) -> Option<&str> {
        self.services
            .iter()
            .find(|(name, s)| s.cluster.as_deref().unwrap_or(name).as_bytes() == cluster)
            .map(|(name, _)| name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(cfg: &str) -> ConfigError {
        RouterConfig::parse(cfg.as_bytes()).unwrap_err()
    }

    #[test]
    fn defaults() {
        let c =
            RouterConfig::parse(br#"{"services":{"payment":{"strategy":"peak_ewma"}}}"#).unwrap();
        assert_eq!(c.endpoint_header, "x-txmesh-endpoint");
        assert_eq!(c.registry_prefix, "txmesh/services/");
        assert_eq!(c.poll_interval_ms, 500);
        assert_eq!(c.max_endpoints, 256);
        let s = &c.services["payment"];
        assert_eq!(s.strategy, Strategy::PeakEwma);
        assert_eq!(s.ewma_decay_ms, 10_000);
        assert_eq!(s.default_rtt_ms, 30);
        assert_eq!(s.outlier, Outlier::default());
        assert_eq!(c.service_of_cluster(b"payment"), Some("payment"));
        assert_eq!(c.service_of_cluster(b"other"), None);
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(r#"{"services":{"p":{"strategy":"fastest"}}}"#);
        assert_eq!(e.path, "services.p.strategy");
        assert!(e.message.contains("unknown variant `fastest`"), "{e}");
        assert!(e.message.contains("peak_ewma"), "{e}");
        assert_eq!(err(r#"{}"#).path, ".");
        assert!(err(r#"{}"#).message.contains("missing field `services`"));
        assert_eq!(err(r#"{"services":{}}"#).path, "services");
        let e = err(
            r#"{"services":{"p":{"strategy":"random","outlier":{"max_ejection_percent":101}}}}"#,
        );
        assert_eq!(e.path, "services.p.outlier.max_ejection_percent");
        assert_eq!(e.message, "must be 0 to 100, got 101");
        let e = err(r#"{"endpoint_header":"X-Pick","services":{"p":{"strategy":"random"}}}"#);
        assert_eq!(e.path, "endpoint_header");
        let e = err(
            r#"{"services":{"a":{"strategy":"random","cluster":"c"},"b":{"strategy":"random","cluster":"c"}}}"#,
        );
        assert_eq!(e.path, "services.b.cluster");
        assert_eq!(e.message, "cluster \"c\" already routes service \"a\"");
        let e = err(r#"{"poll_interval_ms":1,"services":{"p":{"strategy":"random"}}}"#);
        assert_eq!(e.path, "poll_interval_ms");
        let e = err(r#"{"services":{"p":{"strategy":"random","typo":1}}}"#);
        assert_eq!(e.path, "services.p.typo");
        let e = err(r#"{"registry_prefix":"x","services":{"p":{"strategy":"random"}}}"#);
        assert_eq!(e.path, "registry_prefix");
        let e = err(r#"{"services":{"a/b":{"strategy":"random"}}}"#);
        assert_eq!(e.path, "services.a/b");
    }
}
