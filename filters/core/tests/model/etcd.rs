//! A modelled etcd: the JSON-gateway calls the engine makes, answered as
//! etcd 3.4 answers them, against one key space. Up or down: down, every
//! call is refused before it is sent (Envoy's "no healthy upstream").
//! Leases: keys written under a granted lease can all expire at any moment
//! (the checker's `Expire` fault: retention is adversarial), and every
//! decision record ever created is remembered, so that an expired commit
//! record followed by a new abort record is a violation, not a new truth.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use txmesh_core::b64;
use txmesh_core::host::{Callout, CalloutResponse};
use txmesh_core::txn::etcd::{outcome_of, Outcome, DECISION_PREFIX};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Etcd {
    pub kv: BTreeMap<String, Vec<u8>>,
    /// Keys under a lease (they go with `expire`).
    pub leased: BTreeSet<String>,
    pub leases: BTreeSet<u64>,
    /// The first decision record ever created, and whether a later one
    /// (after it expired) said otherwise.
    pub first: Option<(Outcome, String)>,
    pub contradicted: bool,
    pub down: bool,
}

fn key_of(v: &Value) -> Option<String> {
    let k = b64::decode(v.get("key")?.as_str()?)?;
    String::from_utf8(k).ok()
}

fn kv_json(k: &str, v: &[u8]) -> String {
    format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        b64::encode(k.as_bytes()),
        b64::encode(v)
    )
}

fn ok(body: String) -> CalloutResponse {
    CalloutResponse {
        status: Some(200),
        body: body.into_bytes(),
    }
}

impl Etcd {
    /// The decision recorded for the one transaction of the model (the
    /// first record, even if it has expired since).
    pub fn decision(&self) -> Option<(Outcome, String)> {
        self.first.clone()
    }

    /// Every leased key expires now.
    pub fn expire(&mut self) {
        for k in std::mem::take(&mut self.leased) {
            self.kv.remove(&k);
        }
    }

    fn error(status: u16, code: u32, msg: &str) -> CalloutResponse {
        CalloutResponse {
            status: Some(status),
            body: format!(r#"{{"error":"etcdserver: {msg}","code":{code}}}"#).into_bytes(),
        }
    }

    /// Why etcd would refuse a put, before applying anything.
    fn refuse_put(&self, op: &Value) -> Option<CalloutResponse> {
        let lease = op
            .get("lease")
            .and_then(|l| l.as_str()?.parse::<u64>().ok());
        if lease.is_some_and(|l| !self.leases.contains(&l)) {
            return Some(Self::error(404, 5, "requested lease not found"));
        }
        let ignore = op.get("ignore_value").and_then(Value::as_bool) == Some(true);
        if ignore && key_of(op).is_none_or(|k| !self.kv.contains_key(&k)) {
            return Some(Self::error(400, 3, "key not found"));
        }
        None
    }

    /// Whether a call would be answered now (down: refused at once).
    pub fn refused() -> CalloutResponse {
        CalloutResponse {
            status: Some(503),
            body: b"no healthy upstream".to_vec(),
        }
    }

    fn put(&mut self, op: &Value) -> Option<()> {
        let k = key_of(op)?;
        if op.get("lease").is_some() {
            self.leased.insert(k.clone());
        } else {
            self.leased.remove(&k);
        }
        if op.get("ignore_value").and_then(Value::as_bool) == Some(true) {
            return Some(());
        }
        let v = b64::decode(op.get("value")?.as_str()?)?;
        if k.starts_with(DECISION_PREFIX) {
            let reason = serde_json::from_slice::<Value>(&v)
                .ok()
                .and_then(|j| j.get("reason")?.as_str().map(str::to_string))
                .unwrap_or_default();
            if let Some(o) = outcome_of(&v) {
                match &self.first {
                    None => self.first = Some((o, reason)),
                    Some((first, _)) => self.contradicted |= *first != o,
                }
            }
        }
        self.kv.insert(k, v);
        Some(())
    }

    fn range(&self, req: &Value) -> String {
        let Some(k) = key_of(req) else {
            return r#"{"header":{}}"#.to_string();
        };
        let end = req
            .get("range_end")
            .and_then(|e| b64::decode(e.as_str()?))
            .and_then(|e| String::from_utf8(e).ok());
        let limit = req
            .get("limit")
            .and_then(|l| l.as_str()?.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let mut more = false;
        let kvs: Vec<String> = match end {
            Some(end) => {
                let all: Vec<String> = self
                    .kv
                    .range(k.clone()..end)
                    .map(|(k, v)| kv_json(k, v))
                    .collect();
                more = all.len() > limit;
                all.into_iter().take(limit).collect()
            }
            None => self
                .kv
                .get(&k)
                .map(|v| kv_json(&k, v))
                .into_iter()
                .collect(),
        };
        if kvs.is_empty() {
            r#"{"header":{}}"#.to_string()
        } else {
            format!(
                r#"{{"header":{{}},"kvs":[{}],"more":{more}}}"#,
                kvs.join(",")
            )
        }
    }

    /// Applies one call and answers it as etcd would.
    pub fn handle(&mut self, c: &Callout) -> CalloutResponse {
        let Ok(req) = serde_json::from_slice::<Value>(&c.body) else {
            return CalloutResponse {
                status: Some(400),
                body: Vec::new(),
            };
        };
        match c.path.as_str() {
            "/v3/kv/range" => ok(self.range(&req)),
            "/v3/lease/grant" => {
                let id = req
                    .get("ID")
                    .and_then(|l| l.as_str()?.parse::<u64>().ok())
                    .unwrap_or(0);
                if !self.leases.insert(id) {
                    return Self::error(400, 9, "lease already exists");
                }
                ok(format!(r#"{{"header":{{}},"ID":"{id}"}}"#))
            }
            "/v3/kv/put" => {
                if let Some(refused) = self.refuse_put(&req) {
                    return refused;
                }
                self.put(&req);
                ok(r#"{"header":{}}"#.to_string())
            }
            "/v3/kv/deleterange" => {
                if let Some(k) = key_of(&req) {
                    self.kv.remove(&k);
                    self.leased.remove(&k);
                }
                ok(r#"{"header":{}}"#.to_string())
            }
            "/v3/kv/txn" => {
                // Compares: create_revision against 0, EQUAL (absent) or
                // GREATER (present).
                let holds = req
                    .get("compare")
                    .and_then(Value::as_array)
                    .map(|cs| {
                        cs.iter().all(|c| {
                            let present = key_of(c).is_some_and(|k| self.kv.contains_key(&k));
                            match c.get("result").and_then(Value::as_str) {
                                Some("GREATER") => present,
                                _ => !present,
                            }
                        })
                    })
                    .unwrap_or(true);
                let branch = if holds { "success" } else { "failure" };
                let ops = req
                    .get(branch)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                // A refused put refuses the whole transaction.
                for op in &ops {
                    if let Some(refused) = op.get("request_put").and_then(|p| self.refuse_put(p)) {
                        return refused;
                    }
                }
                let mut responses = Vec::new();
                for op in ops {
                    if let Some(p) = op.get("request_put") {
                        self.put(p);
                        responses.push(r#"{"response_put":{}}"#.to_string());
                    } else if let Some(d) = op.get("request_delete_range") {
                        if let Some(k) = key_of(d) {
                            self.kv.remove(&k);
                            self.leased.remove(&k);
                        }
                        responses.push(r#"{"response_delete_range":{}}"#.to_string());
                    } else if let Some(r) = op.get("request_range") {
                        responses.push(format!(r#"{{"response_range":{}}}"#, self.range(r)));
                    }
                }
                // etcd omits `succeeded` when false.
                let succeeded = if holds { r#","succeeded":true"# } else { "" };
                ok(format!(
                    r#"{{"header":{{}}{succeeded},"responses":[{}]}}"#,
                    responses.join(",")
                ))
            }
            _ => CalloutResponse {
                status: Some(404),
                body: Vec::new(),
            },
        }
    }
}
