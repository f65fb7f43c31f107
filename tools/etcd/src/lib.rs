//! The one native etcd client of txmesh (txmeshctl, the shop's registry,
//! the test harness, the benchmarks): blocking calls to etcd's JSON gateway.
//!
//! It writes no request body and no key of its own: the bodies, the key
//! layout (`txmesh/decisions/`, `txmesh/pending/`), the decision record's
//! CAS and the answers' parsing are txmesh-core's (`txn::etcd`), the same
//! code the txn filter runs. Why the gateway and not gRPC: docs/architecture.md.

// `Value[...]` with a str key never panics (a missing field is Null).
#![allow(clippy::indexing_slicing)]

use serde_json::Value;
use std::fmt;
use std::time::Duration;
use txmesh_core::b64;
use txmesh_core::txn::etcd::{self as body, CasResult, Decision, Refusal};

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No connection, or no answer in time.
    Unreachable { url: String, error: String },
    /// etcd answered with an error (`refusal`: what it said, if it is one
    /// etcd's gateway names).
    Refused {
        path: String,
        status: u16,
        body: String,
        refusal: Option<Refusal>,
    },
    /// An answer that is not what the call expects.
    BadAnswer { path: String, error: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unreachable { url, error } => write!(f, "cannot reach etcd at {url} ({error})"),
            Error::Refused {
                path, status, body, ..
            } => write!(f, "etcd answered {status} to {path}: {body}"),
            Error::BadAnswer { path, error } => write!(f, "etcd's answer to {path}: {error}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// A key with its value and lease (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
}

/// A client of one etcd member (or anything serving its gateway).
#[derive(Debug, Clone)]
pub struct Etcd {
    url: String,
    agent: ureq::Agent,
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn decoded(v: &Value) -> Vec<u8> {
    v.as_str().and_then(b64::decode).unwrap_or_default()
}

impl Etcd {
    /// A client of `url` (`http://host:port`) with a 5 s timeout per call.
    pub fn new(url: &str) -> Self {
        Self::with_timeout(url, Duration::from_secs(5))
    }

    pub fn with_timeout(url: &str, timeout: Duration) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(timeout))
                .build()
                .into(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs `body` to `path` and returns the JSON answer of a 200.
    pub fn call(&self, path: &str, body: &str) -> Result<Value> {
        let url = format!("{}{path}", self.url);
        let mut r = self
            .agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body.as_bytes())
            .map_err(|e| Error::Unreachable {
                url: self.url.clone(),
                error: e.to_string(),
            })?;
        let text = r.body_mut().read_to_string().unwrap_or_default();
        let status = r.status().as_u16();
        if status != 200 {
            return Err(Error::Refused {
                path: path.to_string(),
                status,
                refusal: body::refusal(text.as_bytes()),
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|e| Error::BadAnswer {
            path: path.to_string(),
            error: format!("not JSON ({e}): {text}"),
        })
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let v = self.call("/v3/kv/range", &body::range_body(key))?;
        Ok(v["kvs"].get(0).map(|kv| decoded(&kv["value"])))
    }

    /// Every key under `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<Kv>> {
        let v = self.call("/v3/kv/range", &body::range_prefix_body(prefix, 0))?;
        Ok(v["kvs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|kv| Kv {
                        key: String::from_utf8_lossy(&decoded(&kv["key"])).into_owned(),
                        value: decoded(&kv["value"]),
                        lease: int(&kv["lease"]).unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// How many keys are under `prefix`.
    pub fn count(&self, prefix: &str) -> Result<u64> {
        let v = self.call("/v3/kv/range", &body::count_prefix_body(prefix))?;
        Ok(int(&v["count"]).unwrap_or(0).unsigned_abs())
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> Result<i64> {
        let v = self.call("/v3/kv/range", &body::count_prefix_body("\0"))?;
        int(&v["header"]["revision"]).ok_or_else(|| Error::BadAnswer {
            path: "/v3/kv/range".into(),
            error: format!("no revision in {v}"),
        })
    }

    pub fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.call("/v3/kv/put", &body::put_bytes_body(key, value, None))
            .map(drop)
    }

    /// Puts `key` under `lease` (it goes when the lease does).
    pub fn put_leased(&self, key: &str, value: &[u8], lease: i64) -> Result<()> {
        self.call("/v3/kv/put", &body::put_bytes_body(key, value, Some(lease)))
            .map(drop)
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        self.call("/v3/kv/deleterange", &body::delete_body(key))
            .map(drop)
    }

    /// A new lease of `ttl_s` seconds (etcd picks its ID).
    pub fn lease_grant(&self, ttl_s: u64) -> Result<i64> {
        let v = self.call("/v3/lease/grant", &body::lease_grant_body(0, ttl_s))?;
        int(&v["ID"]).ok_or_else(|| Error::BadAnswer {
            path: "/v3/lease/grant".into(),
            error: format!("no ID in {v}"),
        })
    }

    /// Grants lease `id` (a retention lease, whose ID is its time bucket's),
    /// unless someone already has: either way it exists afterwards.
    pub fn ensure_lease(&self, id: u64, ttl_s: u64) -> Result<()> {
        match self.call("/v3/lease/grant", &body::lease_grant_body(id, ttl_s)) {
            Ok(_)
            | Err(Error::Refused {
                refusal: Some(Refusal::LeaseExists),
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Renews a lease once; `None`: etcd no longer knows it.
    pub fn lease_keepalive(&self, id: i64) -> Result<Option<i64>> {
        let v = self.call("/v3/lease/keepalive", &body::lease_body(id))?;
        Ok(int(&v["result"]["TTL"]).filter(|ttl| *ttl > 0))
    }

    /// A lease's remaining time to live in seconds (`None`: unknown lease).
    pub fn lease_ttl(&self, id: i64) -> Result<Option<i64>> {
        let v = self.call("/v3/lease/timetolive", &body::lease_body(id))?;
        Ok(int(&v["TTL"]).filter(|ttl| *ttl >= 0))
    }

    /// Revokes a lease: its keys go at once.
    pub fn lease_revoke(&self, id: i64) -> Result<()> {
        self.call("/v3/lease/revoke", &body::lease_body(id))
            .map(drop)
    }

    /// A decision record, as stored.
    pub fn decision(&self, txn: &txmesh_core::txn::id::TxnId) -> Result<Option<Vec<u8>>> {
        self.get(&body::decision_key(txn))
    }

    /// The decision record's CAS-create, as a sidecar writes it: the first
    /// write wins; otherwise the record that is there.
    pub fn create_decision(&self, d: &Decision, lease: Option<u64>) -> Result<CasResult> {
        let key = body::decision_key(&d.txn);
        let v = self.call(
            "/v3/kv/txn",
            &body::cas_create_body(&key, &d.to_json(), lease),
        )?;
        body::parse_cas_response(v.to_string().as_bytes()).map_err(|error| Error::BadAnswer {
            path: "/v3/kv/txn".into(),
            error,
        })
    }

    /// What an operator does when etcd is out of space
    /// (docs/operations.md): compact to the current revision, defragment,
    /// disarm every alarm.
    pub fn free_space(&self) -> Result<()> {
        let rev = self.revision()?;
        let compact = format!(r#"{{"revision":"{rev}","physical":true}}"#);
        self.call("/v3/kv/compaction", &compact)?;
        self.call("/v3/maintenance/defragment", "{}")?;
        self.call("/v3/maintenance/alarm", r#"{"action":"GET"}"#)?["alarms"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .try_for_each(|a| {
                let disarm = serde_json::json!({"action": "DEACTIVATE", "memberID": a["memberID"], "alarm": a["alarm"]});
                self.call("/v3/maintenance/alarm", &disarm.to_string())
                    .map(drop)
            })
    }

    /// The alarms raised (`NOSPACE`, ...).
    pub fn alarms(&self) -> Result<Vec<String>> {
        let v = self.call("/v3/maintenance/alarm", r#"{"action":"GET"}"#)?;
        Ok(v["alarms"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["alarm"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_etcd_is_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let e = Etcd::with_timeout(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(1));
        assert_eq!(e.url(), format!("http://127.0.0.1:{port}"));
        let err = e.get("k").unwrap_err();
        assert!(
            matches!(&err, Error::Unreachable { url, .. } if url == e.url()),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("cannot reach etcd at"), "{err}");
    }

    #[test]
    fn integers_come_as_strings_or_numbers() {
        assert_eq!(int(&serde_json::json!("42")), Some(42));
        assert_eq!(int(&serde_json::json!(42)), Some(42));
        assert_eq!(int(&serde_json::json!(null)), None);
    }
}
