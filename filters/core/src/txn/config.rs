//! Plugin configuration of `txmesh_txn.wasm` (JSON). See docs/protocol.md.

use crate::config::{parse_json, ConfigError};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    /// From `xds.listener_direction` (1 = INBOUND, 2 = OUTBOUND).
    pub fn from_listener_direction(bytes: &[u8]) -> Option<Self> {
        match crate::props::as_u64(bytes)? {
            1 => Some(Direction::Inbound),
            2 => Some(Direction::Outbound),
            _ => None,
        }
    }
}

/// A request that begins a transaction on the initiator's inbound sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeginRule {
    /// HTTP method, exact (e.g. `POST`); absent: any.
    #[serde(default)]
    pub method: Option<String>,
    /// Path prefix (e.g. `/checkout`).
    pub path_prefix: String,
}

impl BeginRule {
    pub fn matches(&self, method: &[u8], path: &[u8]) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.as_bytes() == method)
            && path.starts_with(self.path_prefix.as_bytes())
    }
}

/// How this sidecar's own app takes prepare, commit and abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// The HTTP endpoints `/txmesh/prepare`, `/txmesh/commit`, `/txmesh/abort`.
    #[default]
    Http,
    /// The gRPC service `txmesh.v1.Participant` (`proto/txmesh/v1/participant.proto`).
    Grpc,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnConfig {
    /// `inbound` or `outbound`; absent: the listener's traffic direction.
    #[serde(default)]
    pub direction: Option<Direction>,
    /// Requests that begin a transaction (inbound only).
    #[serde(default)]
    pub begin: Vec<BeginRule>,
    /// Whether a client may begin one with `x-txmesh-txn: new` on any path.
    #[serde(default)]
    pub allow_client_begin: bool,
    #[serde(default = "d_default_timeout")]
    pub default_timeout_ms: u64,
    #[serde(default = "d_max_timeout")]
    pub max_timeout_ms: u64,
    /// Capacity of this sidecar's transaction table (all roles, all workers).
    #[serde(default = "d_max_in_flight")]
    pub max_in_flight: u32,
    /// Most participants one sidecar enlists for one transaction.
    #[serde(default = "d_max_participants")]
    pub max_participants: u32,
    /// Envoy cluster of the local app (prepare/commit/abort to this sidecar's own app).
    #[serde(default = "d_app_cluster")]
    pub app_cluster: String,
    /// `http` (default) or `grpc`: how the app takes prepare/commit/abort.
    /// Sidecar-to-sidecar control and the status query stay HTTP/JSON.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// Envoy cluster of etcd's JSON gateway.
    #[serde(default = "d_etcd_cluster")]
    pub etcd_cluster: String,
    /// Timeout of one etcd call.
    #[serde(default = "d_etcd_timeout")]
    pub etcd_timeout_ms: u64,
    /// Timeout of one phase-2 (commit/abort) call.
    #[serde(default = "d_control_timeout")]
    pub control_timeout_ms: u64,
    /// Phase-2 calls are retried with backoff until acknowledged, for at most this long.
    #[serde(default = "d_phase2_give_up")]
    pub phase2_give_up_ms: u64,
    /// This sidecar's name in decision records and logs; absent: node metadata
    /// `WORKLOAD_NAME`, else `unknown`. Must be unique per sidecar instance
    /// when a service runs several replicas (recovery scans by node).
    #[serde(default)]
    pub node: Option<String>,
    /// A participant prepared with no decision this long past the deadline is
    /// in doubt: its sidecar resolves it from etcd (CAS-writing abort if absent).
    #[serde(default = "d_grace")]
    pub in_doubt_grace_ms: u64,
    /// How often the elected worker scans for in-doubt and unfinished work.
    #[serde(default = "d_recovery_interval")]
    pub recovery_interval_ms: u64,
    /// A commit decision whose phase 2 has not finished this long after it was
    /// recorded is re-driven by the recovery loop.
    #[serde(default = "d_recovery_after")]
    pub recovery_after_ms: u64,
    /// How long a decision record stays in etcd once its phase 2 is done
    /// (commit) or from its writing (abort), under a shared etcd lease per
    /// time bucket (docs/protocol.md, "Decision-record retention").
    #[serde(default = "d_retention")]
    pub decision_retention_ms: u64,
    /// gRPC methods that stream (`/pkg.Service/Method`, or a service
    /// `/pkg.Service/`), as the app's `.proto` says: only unary calls can be
    /// part of a transaction, so a call to one is never enlisted, and a
    /// begin rule naming one is refused.
    #[serde(default)]
    pub grpc_streaming: Vec<String>,
}

fn d_default_timeout() -> u64 {
    5_000
}
fn d_max_timeout() -> u64 {
    30_000
}
fn d_max_in_flight() -> u32 {
    1024
}
fn d_max_participants() -> u32 {
    16
}
fn d_app_cluster() -> String {
    "local_app".to_string()
}
fn d_etcd_cluster() -> String {
    "etcd".to_string()
}
fn d_etcd_timeout() -> u64 {
    2_000
}
fn d_control_timeout() -> u64 {
    2_000
}
fn d_phase2_give_up() -> u64 {
    60_000
}
fn d_grace() -> u64 {
    2_000
}
fn d_recovery_interval() -> u64 {
    1_000
}
fn d_recovery_after() -> u64 {
    3_000
}
fn d_retention() -> u64 {
    86_400_000
}

/// Hard limits on config values.
pub const MAX_TIMEOUT_LIMIT_MS: u64 = 600_000;
pub const MAX_IN_FLIGHT_LIMIT: u32 = 65_536;
pub const MAX_PARTICIPANTS_LIMIT: u32 = 64;
/// A year: records kept longer are an archive, not a protocol's business.
pub const MAX_RETENTION_MS: u64 = 366 * 86_400_000;

impl TxnConfig {
    /// Whether calls to `cluster` are gRPC control calls (this sidecar's
    /// own app, speaking gRPC).
    pub fn grpc_app(&self, cluster: &str) -> bool {
        self.app_protocol == AppProtocol::Grpc && cluster == self.app_cluster
    }

    /// Whether `path` is a streaming gRPC method ([`TxnConfig::grpc_streaming`]).
    pub fn is_streaming(&self, path: &[u8]) -> bool {
        let path = path.split(|&b| b == b'?').next().unwrap_or(path);
        self.grpc_streaming.iter().any(|m| {
            if m.ends_with('/') {
                path.starts_with(m.as_bytes())
            } else {
                path == m.as_bytes()
            }
        })
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let cfg: Self = parse_json(bytes)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let range = |path: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(ConfigError::at(
                    path,
                    format!("must be between {lo} and {hi}, got {v}"),
                ))
            } else {
                Ok(())
            }
        };
        range(
            "max_timeout_ms",
            self.max_timeout_ms,
            1,
            MAX_TIMEOUT_LIMIT_MS,
        )?;
        range(
            "default_timeout_ms",
            self.default_timeout_ms,
            1,
            self.max_timeout_ms,
        )?;
        range(
            "max_in_flight",
            self.max_in_flight.into(),
            1,
            MAX_IN_FLIGHT_LIMIT.into(),
        )?;
        range(
            "max_participants",
            self.max_participants.into(),
            1,
            MAX_PARTICIPANTS_LIMIT.into(),
        )?;
        range("etcd_timeout_ms", self.etcd_timeout_ms, 1, 60_000)?;
        range("control_timeout_ms", self.control_timeout_ms, 1, 60_000)?;
        range("phase2_give_up_ms", self.phase2_give_up_ms, 1, 86_400_000)?;
        range("in_doubt_grace_ms", self.in_doubt_grace_ms, 0, 600_000)?;
        range(
            "decision_retention_ms",
            self.decision_retention_ms,
            1_000,
            MAX_RETENTION_MS,
        )?;
        range(
            "recovery_interval_ms",
            self.recovery_interval_ms,
            100,
            600_000,
        )?;
        range("recovery_after_ms", self.recovery_after_ms, 100, 3_600_000)?;
        for (name, v) in [
            ("app_cluster", &self.app_cluster),
            ("etcd_cluster", &self.etcd_cluster),
        ] {
            if !is_cluster_name(v) {
                return Err(ConfigError::at(
                    name,
                    format!("{v:?} is not a usable cluster name (non-empty, no whitespace)"),
                ));
            }
        }
        for (i, m) in self.grpc_streaming.iter().enumerate() {
            if !m.starts_with('/') || m.len() < 2 || m.bytes().any(|b| b.is_ascii_whitespace()) {
                return Err(ConfigError::at(
                    format!("grpc_streaming[{i}]"),
                    format!("must be a gRPC path like /pkg.Service/Method (or /pkg.Service/), got {m:?}"),
                ));
            }
        }
        for (i, r) in self.begin.iter().enumerate() {
            if let Some(m) = self
                .grpc_streaming
                .iter()
                .find(|m| m.starts_with(&r.path_prefix) || r.path_prefix.starts_with(m.as_str()))
            {
                return Err(ConfigError::at(
                    format!("begin[{i}].path_prefix"),
                    format!(
                        "{:?} names the streaming gRPC method {m:?} (grpc_streaming): only unary calls can be transactions",
                        r.path_prefix
                    ),
                ));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(ConfigError::at(
                    format!("begin[{i}].path_prefix"),
                    format!("must start with '/', got {:?}", r.path_prefix),
                ));
            }
            if r.path_prefix.starts_with("/txmesh/") {
                return Err(ConfigError::at(
                    format!("begin[{i}].path_prefix"),
                    "/txmesh/ paths are the control endpoints and cannot begin a transaction",
                ));
            }
            if let Some(m) = &r.method {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(ConfigError::at(
                        format!("begin[{i}].method"),
                        format!("must be an upper-case HTTP method, got {m:?}"),
                    ));
                }
            }
        }
        if let Some(n) = &self.node {
            if !crate::labels::is_clean_value(n) {
                return Err(ConfigError::at(
                    "node",
                    format!("{n:?}: 1 to 64 characters of A-Z a-z 0-9 _ . : / | -"),
                ));
            }
        }
        Ok(())
    }

    /// The decision records' retention leases.
    pub fn retention(&self) -> super::etcd::Retention {
        super::etcd::Retention::new(self.decision_retention_ms)
    }

    /// The retention leases of the default `decision_retention_ms`.
    pub fn default_retention() -> super::etcd::Retention {
        super::etcd::Retention::new(d_retention())
    }

    /// Whether a request begins a transaction by rule.
    pub fn begins(&self, method: &[u8], path: &[u8]) -> bool {
        self.begin.iter().any(|r| r.matches(method, path))
    }

    /// An Envoy `xds_matcher` for `envoy.filters.http.match_delegate`
    /// (`ExtensionWithMatcher` around the wasm filter) that **skips** the
    /// filter for every request it would pass through untouched, so that
    /// non-transactional traffic does not enter the VM for its request and
    /// response headers. The filter runs for: a request carrying
    /// `x-txmesh-txn`, a `baggage` header naming `txmesh.txn`, a control
    /// path (`/txmesh/`), and every begin rule. Conservative: a request it
    /// lets through that needed nothing is passed by the filter as before.
    pub fn gate_matcher(&self) -> serde_json::Value {
        use serde_json::json;
        let header = |name: &str, value_match: serde_json::Value| {
            json!({"single_predicate": {
                "input": {"name": "request-header", "typed_config": {
                    "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                    "header_name": name}},
                "value_match": value_match}})
        };
        let mut needs = vec![
            header(
                super::id::TXN_HEADER,
                json!({"safe_regex": {"google_re2": {}, "regex": ".*"}}),
            ),
            header(
                super::id::BAGGAGE_HEADER,
                json!({"contains": super::id::BAGGAGE_KEY}),
            ),
            header(":path", json!({"prefix": "/txmesh/"})),
        ];
        for r in &self.begin {
            let path = header(":path", json!({"prefix": r.path_prefix}));
            needs.push(match &r.method {
                Some(m) => json!({"and_matcher": {"predicate": [
                    header(":method", json!({"exact": m})),
                    path,
                ]}}),
                None => path,
            });
        }
        json!({"matcher_list": {"matchers": [{
            "predicate": {"not_matcher": {"or_matcher": {"predicate": needs}}},
            "on_match": {"action": {"name": "skip", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}}
        }]}})
    }
}

/// A cluster name usable in the table encoding: non-empty, printable, no whitespace.
pub fn is_cluster_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 200 && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evaluates the subset of Envoy's xds matcher that `gate_matcher`
    /// emits: whether the filter runs for a request (`headers` as sent).
    fn gate_runs(m: &serde_json::Value, headers: &[(&str, &str)]) -> bool {
        fn pred(p: &serde_json::Value, headers: &[(&str, &str)]) -> bool {
            if let Some(sp) = p.get("single_predicate") {
                let name = sp["input"]["typed_config"]["header_name"].as_str().unwrap();
                let Some(v) = headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v) else {
                    return false;
                };
                let vm = &sp["value_match"];
                return if let Some(x) = vm.get("exact") {
                    v == x.as_str().unwrap()
                } else if let Some(x) = vm.get("prefix") {
                    v.starts_with(x.as_str().unwrap())
                } else if let Some(x) = vm.get("contains") {
                    v.contains(x.as_str().unwrap())
                } else {
                    assert_eq!(vm["safe_regex"]["regex"], ".*");
                    true
                };
            }
            if let Some(o) = p.get("or_matcher") {
                return o["predicate"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|q| pred(q, headers));
            }
            if let Some(a) = p.get("and_matcher") {
                return a["predicate"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|q| pred(q, headers));
            }
            !pred(&p["not_matcher"], headers)
        }
        let [rule] = m["matcher_list"]["matchers"].as_array().unwrap().as_slice() else {
            panic!("one rule");
        };
        assert!(rule["on_match"]["action"]["typed_config"]["@type"]
            .as_str()
            .unwrap()
            .ends_with("SkipFilter"));
        !pred(&rule["predicate"], headers)
    }

    #[test]
    fn the_gate_lets_through_every_request_the_filter_acts_on() {
        let cfg = TxnConfig::parse(
            br#"{"begin":[{"method":"POST","path_prefix":"/checkout"},{"path_prefix":"/orders/"}]}"#,
        )
        .unwrap();
        let m = cfg.gate_matcher();
        const ID: &str = "0123456789abcdef0123456789abcdef";
        let runs: Vec<(&[(&str, &str)], bool)> = vec![
            // Nothing for the filter: skipped.
            (&[(":method", "GET"), (":path", "/products")], false),
            (&[(":method", "GET"), (":path", "/checkout")], false),
            (&[(":method", "POST"), (":path", "/txmeshx")], false),
            (
                &[(":method", "GET"), (":path", "/"), ("baggage", "user=1")],
                false,
            ),
            // A transaction, by header or baggage: the filter runs.
            (
                &[(":method", "GET"), (":path", "/p"), ("x-txmesh-txn", ID)],
                true,
            ),
            (
                &[(":method", "GET"), (":path", "/p"), ("x-txmesh-txn", "")],
                true,
            ),
            (
                &[
                    (":method", "GET"),
                    (":path", "/p"),
                    ("baggage", "a=1, txmesh.txn=x"),
                ],
                true,
            ),
            // Control endpoints and begin rules.
            (&[(":method", "POST"), (":path", "/txmesh/prepare")], true),
            (&[(":method", "GET"), (":path", "/txmesh/txns/x")], true),
            (&[(":method", "POST"), (":path", "/checkout?x=1")], true),
            (&[(":method", "DELETE"), (":path", "/orders/7")], true),
        ];
        for (headers, want) in runs {
            assert_eq!(gate_runs(&m, headers), want, "{headers:?}");
            // Whatever the filter would act on, the gate lets through.
            let h = |n: &str| {
                headers
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.as_bytes())
            };
            let acts = !matches!(
                super::super::id::read_txn(h("x-txmesh-txn"), h("baggage")),
                Ok(super::super::id::TxnHeader::Absent)
            ) || h(":path").unwrap().starts_with(b"/txmesh/")
                || cfg.begins(h(":method").unwrap(), h(":path").unwrap());
            assert!(!acts || want, "{headers:?}");
        }
    }

    #[test]
    fn defaults() {
        let c = TxnConfig::parse(b"").unwrap();
        assert_eq!(c.default_timeout_ms, 5000);
        assert_eq!(c.max_in_flight, 1024);
        assert_eq!(c.app_cluster, "local_app");
        assert!(!c.allow_client_begin);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"default_timeout_ms": 40000}"#, "at `default_timeout_ms`: must be between 1 and 30000, got 40000"),
            (r#"{"max_in_flight": 0}"#, "at `max_in_flight`: must be between 1 and 65536, got 0"),
            (r#"{"begin": [{"path_prefix": "checkout"}]}"#, "at `begin[0].path_prefix`: must start with '/', got \"checkout\""),
            (r#"{"begin": [{"method": "post", "path_prefix": "/c"}]}"#, "at `begin[0].method`: must be an upper-case HTTP method, got \"post\""),
            (r#"{"begin": [{"path_prefix": "/txmesh/x"}]}"#, "at `begin[0].path_prefix`: /txmesh/ paths are the control endpoints and cannot begin a transaction"),
            (r#"{"app_cluster": "a b"}"#, "at `app_cluster`: \"a b\" is not a usable cluster name (non-empty, no whitespace)"),
            (r#"{"app_protocol": "soap"}"#, "at `app_protocol`: unknown variant `soap`, expected `http` or `grpc` at line 1 column 23"),
            (r#"{"grpc_streaming": ["Watch"]}"#, "at `grpc_streaming[0]`: must be a gRPC path like /pkg.Service/Method (or /pkg.Service/), got \"Watch\""),
            (r#"{"grpc_streaming": ["/shop.v1.Inventory/Watch"], "begin": [{"path_prefix": "/shop.v1.Inventory/"}]}"#, "at `begin[0].path_prefix`: \"/shop.v1.Inventory/\" names the streaming gRPC method \"/shop.v1.Inventory/Watch\" (grpc_streaming): only unary calls can be transactions"),
        ];
        for (json, want) in cases {
            assert_eq!(
                TxnConfig::parse(json.as_bytes()).unwrap_err().to_string(),
                *want
            );
        }
        let e = TxnConfig::parse(br#"{"begin": [{"path": "/x"}]}"#).unwrap_err();
        assert_eq!(e.path, "begin[0].path");
    }

    #[test]
    fn streaming_methods_by_name_or_service() {
        let c = TxnConfig::parse(
            br#"{"grpc_streaming": ["/shop.v1.Inventory/Watch", "/shop.v1.Feed/"],
                 "begin": [{"path_prefix": "/shop.v1.Order/Checkout"}]}"#,
        )
        .unwrap();
        assert!(c.is_streaming(b"/shop.v1.Inventory/Watch"));
        assert!(!c.is_streaming(b"/shop.v1.Inventory/WatchMore"));
        assert!(!c.is_streaming(b"/shop.v1.Inventory/Reserve"));
        assert!(c.is_streaming(b"/shop.v1.Feed/Anything"));
        assert!(!c.is_streaming(b"/shop.v1.Feeds/X"));
    }

    #[test]
    fn begin_rules_match() {
        let c = TxnConfig::parse(
            br#"{"begin": [{"method": "POST", "path_prefix": "/checkout"}, {"path_prefix": "/any"}]}"#,
        )
        .unwrap();
        assert!(c.begins(b"POST", b"/checkout"));
        assert!(c.begins(b"POST", b"/checkout/x?y=1"));
        assert!(!c.begins(b"GET", b"/checkout"));
        assert!(c.begins(b"GET", b"/any/thing"));
        assert!(!c.begins(b"POST", b"/other"));
    }
}
