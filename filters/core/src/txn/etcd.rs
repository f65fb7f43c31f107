//! Decision records in etcd, through etcd's JSON gateway (`/v3/kv/...`).
//!
//! Key `txmesh/decisions/<txn>`; value JSON
//! `{"txn", "outcome": "committed"|"aborted", "participants": [...],
//!   "coordinator", "time_ms", "reason"}`.
//! Written with a transaction whose compare is "key absent"
//! (`create_revision == 0`): the first write wins, later writers read it.

use super::id::TxnId;
use crate::b64;
use crate::json::Obj;
use serde::Deserialize;

pub const DECISION_PREFIX: &str = "txmesh/decisions/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Committed,
    Aborted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Aborted => "aborted",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "committed" => Some(Outcome::Committed),
            "aborted" => Some(Outcome::Aborted),
            _ => None,
        }
    }
}

pub fn decision_key(txn: &TxnId) -> String {
    format!("{DECISION_PREFIX}{txn}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub txn: TxnId,
    pub outcome: Outcome,
    pub participants: Vec<String>,
    pub coordinator: String,
    pub time_ms: u64,
    pub reason: String,
    /// W3C trace id of the request that began the transaction; empty: none.
    pub trace: String,
    /// When the transaction began (ms since the epoch); 0: unknown here.
    pub begun_ms: u64,
    /// An abort caused by a participant: who (its name) and why (its own
    /// reason, at most [`MAX_DETAIL`] bytes of printable ASCII).
    pub refused_by: Option<(String, String)>,
}

/// The longest participant reason a record keeps.
pub const MAX_DETAIL: usize = 120;

/// A participant's reason as a record keeps it: printable ASCII (anything
/// else becomes `?`), at most [`MAX_DETAIL`] bytes.
pub fn bounded_detail(s: &str) -> String {
    s.bytes()
        .take(MAX_DETAIL)
        .map(|b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

impl Decision {
    pub fn to_json(&self) -> String {
        let o = Obj::new()
            .str("txn", &self.txn.to_string())
            .str("outcome", self.outcome.as_str())
            .strs("participants", &self.participants)
            .str("coordinator", &self.coordinator)
            .num("time_ms", self.time_ms)
            .str("reason", &self.reason);
        let o = if self.begun_ms > 0 {
            o.num("begun_ms", self.begun_ms)
        } else {
            o
        };
        let o = match &self.refused_by {
            Some((who, why)) => o.str("refused_by", who).str("detail", &bounded_detail(why)),
            None => o,
        };
        if self.trace.is_empty() {
            o.build()
        } else {
            o.str("trace", &self.trace).build()
        }
    }
}

/// The outcome in a stored decision value (tolerant of extra fields).
pub fn outcome_of(value: &[u8]) -> Option<Outcome> {
    #[derive(Deserialize)]
    struct V {
        outcome: String,
    }
    serde_json::from_slice::<V>(value)
        .ok()
        .and_then(|v| Outcome::parse(&v.outcome))
}

/// Body of `POST /v3/kv/txn`: put `value` at `key` if the key is absent,
/// else read it; with `lease`, the record goes under that etcd lease (an
/// abort's record: it expires with the lease).
pub fn cas_create_body(key: &str, value: &str, lease: Option<u64>) -> String {
    cas_body(key, value, lease, None)
}

/// Like [`cas_create_body`] (no lease: a commit's record is leased only
/// when its phase 2 is done, see [`unpend_body`]), and in the same etcd
/// transaction also puts `also = (key, value)` (the coordinator's
/// pending-work key).
pub fn cas_create_with_body(key: &str, value: &str, also: (&str, &str)) -> String {
    cas_body(key, value, None, Some(also))
}

pub(crate) fn cas_body(
    key: &str,
    value: &str,
    lease: Option<u64>,
    also: Option<(&str, &str)>,
) -> String {
    let k = b64::encode(key.as_bytes());
    let compare = exists_compare(&k, "EQUAL");
    let put = |key: &str, value: &str, lease: Option<u64>| {
        let p = Obj::new()
            .str("key", &b64::encode(key.as_bytes()))
            .str("value", &b64::encode(value.as_bytes()));
        let p = match lease {
            Some(id) => p.str("lease", &id.to_string()),
            None => p,
        };
        Obj::new().raw("request_put", &p.build()).build()
    };
    let mut success = put(key, value, lease);
    if let Some((k2, v2)) = also {
        success = format!("{success},{}", put(k2, v2, None));
    }
    let range = Obj::new()
        .raw("request_range", &Obj::new().str("key", &k).build())
        .build();
    Obj::new()
        .raw("compare", &format!("[{compare}]"))
        .raw("success", &format!("[{success}]"))
        .raw("failure", &format!("[{range}]"))
        .build()
}

/// A compare on a key's `create_revision` against 0: `EQUAL` (absent) or
/// `GREATER` (present).
fn exists_compare(b64_key: &str, result: &str) -> String {
    Obj::new()
        .str("key", b64_key)
        .str("target", "CREATE")
        .str("create_revision", "0")
        .str("result", result)
        .build()
}

/// Body of `POST /v3/kv/txn` for finished commits, given as
/// `(pending-work key, decision key)`: deletes the pending-work keys and
/// puts each decision record under `lease`, keeping its value
/// (`ignore_value`), so that it expires with the lease. If a record is
/// missing (deleted by hand) the keys are deleted and no record is leased.
pub fn unpend_body(done: &[(String, String)], lease: u64) -> String {
    let op = |name: &str, body: String| Obj::new().raw(name, &body).build();
    let key = |k: &str| b64::encode(k.as_bytes());
    let deletes: Vec<String> = done
        .iter()
        .map(|(p, _)| {
            op(
                "request_delete_range",
                Obj::new().str("key", &key(p)).build(),
            )
        })
        .collect();
    let seals = done.iter().map(|(_, d)| {
        let put = Obj::new()
            .str("key", &key(d))
            .bool("ignore_value", true)
            .str("lease", &lease.to_string())
            .build();
        op("request_put", put)
    });
    let compares: Vec<String> = done
        .iter()
        .map(|(_, d)| exists_compare(&key(d), "GREATER"))
        .collect();
    let success: Vec<String> = deletes.iter().cloned().chain(seals).collect();
    Obj::new()
        .raw("compare", &format!("[{}]", compares.join(",")))
        .raw("success", &format!("[{}]", success.join(",")))
        .raw("failure", &format!("[{}]", deletes.join(",")))
        .build()
}

/// Decision-record retention: records expire with an etcd lease shared by
/// every sidecar of the mesh for one time bucket. A lease's ID is a
/// function of its bucket, so any sidecar can grant it (the second grant
/// answers "lease already exists") and any sidecar can write under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub retention_ms: u64,
    pub bucket_ms: u64,
}

impl Retention {
    pub fn new(retention_ms: u64) -> Self {
        Self {
            retention_ms,
            bucket_ms: (retention_ms / 8).clamp(500, 3_600_000),
        }
    }

    pub fn bucket(&self, now_ms: u64) -> u64 {
        now_ms / self.bucket_ms.max(1)
    }

    /// The lease of `bucket`: 22 bits of the bucket length (sidecars with
    /// another retention use other leases), 40 bits of the bucket number;
    /// positive and non-zero as etcd requires.
    pub fn lease_id(&self, bucket: u64) -> u64 {
        let tag = (self.bucket_ms % ((1 << 21) - 1)) | (1 << 21);
        (tag << 40) | (bucket & ((1 << 40) - 1))
    }

    /// The lease a record written at `now_ms` goes under.
    pub fn lease_at(&self, now_ms: u64) -> u64 {
        self.lease_id(self.bucket(now_ms))
    }

    /// A bucket's lease is granted up to half a bucket before the bucket
    /// begins and used until it ends: its TTL covers the retention past
    /// the last write under it (by half a bucket at least), and no write
    /// under it lives more than the retention and 2 buckets.
    pub fn ttl_s(&self) -> u64 {
        (self.retention_ms + 2 * self.bucket_ms).div_ceil(1000)
    }

    /// The next bucket to grant, given the last one granted: the current
    /// bucket, then the next one from half-way through the current one.
    pub fn due(&self, granted: Option<u64>, now_ms: u64) -> Option<u64> {
        let current = self.bucket(now_ms);
        let next = granted.map_or(current, |g| (g + 1).max(current));
        (next <= self.bucket(now_ms + self.bucket_ms / 2)).then_some(next)
    }
}

/// Body of `POST /v3/lease/grant` for lease `id`.
pub fn lease_grant_body(id: u64, ttl_s: u64) -> String {
    Obj::new()
        .str("TTL", &ttl_s.to_string())
        .str("ID", &id.to_string())
        .build()
}

/// A refusal etcd's JSON gateway answers with (`{"error", "code"}`, the
/// gRPC status code): the request was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `mvcc: database space exceeded`: the NOSPACE alarm is raised;
    /// nothing that writes is applied until an operator frees space.
    NoSpace,
    /// `lease already exists` (a lease grant someone else made first).
    LeaseExists,
    /// Any other refusal (`requested lease not found`, ...), by gRPC code.
    Other(u32),
}

/// The refusal in an error answer of etcd's gateway, if it is one.
pub fn refusal(body: &[u8]) -> Option<Refusal> {
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        error: String,
        code: u32,
    }
    let e: E = serde_json::from_slice(body).ok()?;
    Some(match e.code {
        // RESOURCE_EXHAUSTED is also "too many requests", which is not NOSPACE.
        8 if e.error.contains("space exceeded") => Refusal::NoSpace,
        9 if e.error.contains("lease already exists") => Refusal::LeaseExists,
        code => Refusal::Other(code),
    })
}

/// The pending-work key of a commit decision owned by `node`.
pub fn pending_key(node: &str, txn: &TxnId) -> String {
    format!("{PENDING_PREFIX}{node}/{txn}")
}

pub const PENDING_PREFIX: &str = "txmesh/pending/";

/// Body of `POST /v3/kv/range` for every key under `prefix` (at most `limit`).
pub fn range_prefix_body(prefix: &str, limit: u32) -> String {
    range_prefix_from_body(prefix, None, limit)
}

/// Like [`range_prefix_body`], starting at key `from` (inside the prefix):
/// pages through a prefix with more keys than one answer holds.
pub fn range_prefix_from_body(prefix: &str, from: Option<&str>, limit: u32) -> String {
    let start = from.filter(|f| f.starts_with(prefix)).unwrap_or(prefix);
    Obj::new()
        .str("key", &b64::encode(start.as_bytes()))
        .str("range_end", &b64::encode(&prefix_end(prefix)))
        .str("limit", &limit.to_string())
        .build()
}

/// The end of the key range holding every key under `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    end
}

/// Body of `POST /v3/kv/range` counting the keys under `prefix`.
pub fn count_prefix_body(prefix: &str) -> String {
    Obj::new()
        .str("key", &b64::encode(prefix.as_bytes()))
        .str("range_end", &b64::encode(&prefix_end(prefix)))
        .bool("count_only", true)
        .build()
}

/// Body of `POST /v3/kv/put`.
pub fn put_body(key: &str, value: &str) -> String {
    put_bytes_body(key, value.as_bytes(), None)
}

/// Body of `POST /v3/kv/put` of raw bytes, under `lease` if given.
pub fn put_bytes_body(key: &str, value: &[u8], lease: Option<i64>) -> String {
    let o = Obj::new()
        .str("key", &b64::encode(key.as_bytes()))
        .str("value", &b64::encode(value));
    match lease {
        Some(id) => o.str("lease", &id.to_string()).build(),
        None => o.build(),
    }
}

/// Body of `POST /v3/kv/deleterange` for one key.
pub fn delete_body(key: &str) -> String {
    Obj::new().str("key", &b64::encode(key.as_bytes())).build()
}

/// Body of `POST /v3/lease/keepalive`, `/v3/lease/revoke` and
/// `/v3/lease/timetolive` for lease `id`.
pub fn lease_body(id: i64) -> String {
    Obj::new().str("ID", &id.to_string()).build()
}

/// Every value in an answer to [`range_prefix_body`].
pub fn parse_range_values(body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let v: RangeResponse =
        serde_json::from_slice(body).map_err(|e| format!("etcd answered non-JSON: {e}"))?;
    if v.header.is_none() {
        return Err(no_header(body));
    }
    Ok(v.kvs
        .iter()
        .filter_map(|kv| b64::decode(&kv.value))
        .collect())
}

/// Keys and values, raw.
pub type Kvs = Vec<(Vec<u8>, Vec<u8>)>;

/// Every (key, value) in an answer to [`range_prefix_body`], and whether
/// etcd left some out (`more`: the limit was reached).
pub fn parse_range_kvs(body: &[u8]) -> Result<(Kvs, bool), String> {
    let v: RangeResponse =
        serde_json::from_slice(body).map_err(|e| format!("etcd answered non-JSON: {e}"))?;
    if v.header.is_none() {
        return Err(no_header(body));
    }
    let kvs = v
        .kvs
        .iter()
        .filter_map(|kv| Some((b64::decode(&kv.key)?, b64::decode(&kv.value)?)))
        .collect();
    Ok((kvs, v.more))
}

/// What a participant of a pending commit is owed (its `vote` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    /// Voted commit, not yet acknowledged the commit.
    Commit,
    /// Acknowledged the commit.
    Acked,
    /// Voted read-only: owed nothing.
    ReadOnly,
}

impl Owed {
    pub fn as_str(self) -> &'static str {
        match self {
            Owed::Commit => "commit",
            Owed::Acked => "acked",
            Owed::ReadOnly => "readonly",
        }
    }

    /// The field as written ([`Owed::as_str`]); anything else is owed
    /// nothing (this build never writes anything else).
    pub fn parse(v: &str) -> Owed {
        match v {
            "commit" => Owed::Commit,
            "acked" => Owed::Acked,
            _ => Owed::ReadOnly,
        }
    }
}

/// One participant of a pending commit, as the recovery loop needs it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PendingTarget {
    pub name: String,
    pub cluster: String,
    /// [`Owed`] as written ([`PendingTarget::owed`]).
    pub vote: String,
    /// Its call tree (`x-txmesh-children`), if it has one.
    #[serde(default)]
    pub tree: String,
}

impl PendingTarget {
    pub fn owed(&self) -> Owed {
        Owed::parse(&self.vote)
    }
}

/// The value of a pending-work key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Pending {
    pub txn: String,
    pub outcome: String,
    pub time_ms: u64,
    pub deadline_ms: u64,
    pub targets: Vec<PendingTarget>,
}

impl Pending {
    pub fn to_json(
        txn: &TxnId,
        outcome: Outcome,
        time_ms: u64,
        deadline_ms: u64,
        targets: &[(String, String, Owed, String)],
    ) -> String {
        let items: Vec<String> = targets
            .iter()
            .map(|(n, c, v, t)| {
                let o = Obj::new()
                    .str("name", n)
                    .str("cluster", c)
                    .str("vote", v.as_str());
                if t.is_empty() {
                    o.build()
                } else {
                    o.str("tree", t).build()
                }
            })
            .collect();
        Obj::new()
            .str("txn", &txn.to_string())
            .str("outcome", outcome.as_str())
            .num("time_ms", time_ms)
            .num("deadline_ms", deadline_ms)
            .raw("targets", &format!("[{}]", items.join(",")))
            .build()
    }
}

/// What a CAS-create came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasResult {
    /// Our value was written.
    Created,
    /// The key existed; its value.
    Exists(Vec<u8>),
}

#[derive(Deserialize)]
struct Kv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct RangeResponse {
    header: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    kvs: Vec<Kv>,
    #[serde(default)]
    more: bool,
}

#[derive(Deserialize)]
struct TxnOpResponse {
    #[serde(default)]
    response_range: Option<RangeResponse>,
}

#[derive(Deserialize)]
struct TxnResponse {
    header: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<TxnOpResponse>,
}

fn no_header(body: &[u8]) -> String {
    format!("etcd answered without a header: {}", truncate(body))
}

/// Parses the answer to [`cas_create_body`]. etcd omits `succeeded` when false.
pub fn parse_cas_response(body: &[u8]) -> Result<CasResult, String> {
    let v: TxnResponse =
        serde_json::from_slice(body).map_err(|e| format!("etcd answered non-JSON: {e}"))?;
    if v.header.is_none() {
        return Err(no_header(body));
    }
    if v.succeeded {
        return Ok(CasResult::Created);
    }
    v.responses
        .into_iter()
        .next()
        .and_then(|r| r.response_range)
        .and_then(|r| r.kvs.into_iter().next())
        .and_then(|kv| b64::decode(&kv.value))
        .map(CasResult::Exists)
        .ok_or_else(|| format!("etcd CAS failed but returned no value: {}", truncate(body)))
}

/// Body of `POST /v3/kv/range` for one key.
pub fn range_body(key: &str) -> String {
    Obj::new().str("key", &b64::encode(key.as_bytes())).build()
}

/// The value in an answer to [`range_body`]; `Ok(None)` when absent.
pub fn parse_range_response(body: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let v: RangeResponse =
        serde_json::from_slice(body).map_err(|e| format!("etcd answered non-JSON: {e}"))?;
    if v.header.is_none() {
        return Err(no_header(body));
    }
    Ok(v.kvs
        .into_iter()
        .next()
        .and_then(|kv| b64::decode(&kv.value)))
}

fn truncate(body: &[u8]) -> String {
    String::from_utf8_lossy(body.get(..200).unwrap_or(body)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_body_and_responses() {
        let body: serde_json::Value =
            serde_json::from_str(&cas_create_body("k", "v", None)).unwrap();
        assert_eq!(body["compare"][0]["key"], "aw==");
        assert_eq!(body["compare"][0]["create_revision"], "0");
        assert_eq!(body["success"][0]["request_put"]["value"], "dg==");
        // As etcd 3.4 answers: succeeded true, then (on the second write) omitted.
        assert_eq!(
            parse_cas_response(br#"{"header":{"revision":"5"},"succeeded":true,"responses":[{"response_put":{"header":{}}}]}"#),
            Ok(CasResult::Created)
        );
        let existing = br#"{"header":{"revision":"6"},"responses":[{"response_range":{"header":{},"kvs":[{"key":"aw==","value":"eyJvdXRjb21lIjoiYWJvcnRlZCJ9","create_revision":"5"}],"count":"1"}}]}"#;
        let r = parse_cas_response(existing).unwrap();
        assert_eq!(r, CasResult::Exists(br#"{"outcome":"aborted"}"#.to_vec()));
        if let CasResult::Exists(v) = r {
            assert_eq!(outcome_of(&v), Some(Outcome::Aborted));
        }
        assert!(parse_cas_response(b"upstream connect error").is_err());
        assert!(parse_cas_response(br#"{"error":"x","code":3}"#).is_err());
    }

    #[test]
    fn pending_index_bodies() {
        let body: serde_json::Value =
            serde_json::from_str(&cas_create_with_body("k", "v", ("p", "w"))).unwrap();
        assert_eq!(body["success"][1]["request_put"]["key"], "cA==");
        assert_eq!(body["success"][1]["request_put"]["value"], "dw==");
        let r: serde_json::Value =
            serde_json::from_str(&range_prefix_body("txmesh/pending/order/", 10)).unwrap();
        assert_eq!(
            crate::b64::decode(r["range_end"].as_str().unwrap()).unwrap(),
            b"txmesh/pending/order0"
        );
        let txn = TxnId::parse(b"0af7651916cd43dd8448eb211c80319c").unwrap();
        let j = Pending::to_json(
            &txn,
            Outcome::Committed,
            5,
            9,
            &[
                (
                    "payment".into(),
                    "payment".into(),
                    Owed::Commit,
                    String::new(),
                ),
                ("b".into(), "b".into(), Owed::Commit, "c(d)".into()),
            ],
        );
        let p: Pending = serde_json::from_str(&j).unwrap();
        assert_eq!(p.targets[0].cluster, "payment");
        assert_eq!(
            (p.targets[0].tree.as_str(), p.targets[1].tree.as_str()),
            ("", "c(d)")
        );
        assert_eq!(p.deadline_ms, 9);
        assert_eq!(
            parse_range_values(br#"{"header":{},"kvs":[{"value":"eA=="},{"value":"eQ=="}]}"#)
                .unwrap(),
            vec![b"x".to_vec(), b"y".to_vec()]
        );
        assert_eq!(
            pending_key("order", &txn),
            "txmesh/pending/order/0af7651916cd43dd8448eb211c80319c"
        );
    }

    #[test]
    fn range_and_decision() {
        assert_eq!(parse_range_response(br#"{"header":{}}"#), Ok(None));
        assert_eq!(
            parse_range_response(br#"{"header":{},"kvs":[{"value":"eA=="}]}"#),
            Ok(Some(b"x".to_vec()))
        );
        let d = Decision {
            refused_by: None,
            txn: TxnId::parse(b"0af7651916cd43dd8448eb211c80319c").unwrap(),
            outcome: Outcome::Committed,
            participants: vec!["payment".into()],
            coordinator: "order".into(),
            time_ms: 5,
            reason: "ok".into(),
            trace: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            begun_ms: 2,
        };
        assert!(d.to_json().ends_with(
            r#""reason":"ok","begun_ms":2,"trace":"4bf92f3577b34da6a3ce929d0e0e4736"}"#
        ));
        assert_eq!(outcome_of(d.to_json().as_bytes()), Some(Outcome::Committed));
        // An abort a participant caused names it, with its reason bounded.
        let long = format!("insufficient_funds\n{}", "x".repeat(500));
        let refused = Decision {
            outcome: Outcome::Aborted,
            reason: "vote_abort".into(),
            refused_by: Some(("payment".into(), long)),
            ..d.clone()
        };
        let v: serde_json::Value = serde_json::from_str(&refused.to_json()).unwrap();
        assert_eq!(v["refused_by"], "payment");
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.starts_with("insufficient_funds?xxx"), "{detail}");
        assert_eq!(detail.len(), MAX_DETAIL);
        assert_eq!(
            decision_key(&d.txn),
            "txmesh/decisions/0af7651916cd43dd8448eb211c80319c"
        );
    }

    #[test]
    fn retention_leases() {
        let r = Retention::new(86_400_000);
        assert_eq!(r.bucket_ms, 3_600_000);
        assert_eq!(r.ttl_s(), 86_400 + 7_200);
        let short = Retention::new(2_000);
        assert_eq!(short.bucket_ms, 500);
        assert_eq!(short.ttl_s(), 3);
        // One ID per bucket, distinct for another bucket length, positive.
        let (a, b) = (
            r.lease_id(r.bucket(1_700_000_000_000)),
            r.lease_at(1_700_003_600_000),
        );
        assert_eq!(b, a + 1);
        assert_ne!(short.lease_id(7), r.lease_id(7));
        assert!(a > 0 && a < (1 << 63));
        // Granted: the current bucket first, the next from half-way through.
        let start = 10 * r.bucket_ms;
        assert_eq!(r.due(None, start + 1), Some(10));
        assert_eq!(r.due(Some(10), start + 1), None);
        assert_eq!(r.due(Some(10), start + r.bucket_ms / 2), Some(11));
        assert_eq!(r.due(Some(11), start + r.bucket_ms / 2), None);
        // Long after the last grant: the current bucket, not the missed ones.
        assert_eq!(r.due(Some(3), start), Some(10));
        let g: serde_json::Value = serde_json::from_str(&lease_grant_body(42, 9)).unwrap();
        assert_eq!(
            (g["ID"].as_str(), g["TTL"].as_str()),
            (Some("42"), Some("9"))
        );
    }

    #[test]
    fn leased_records_and_unpend() {
        let abort: serde_json::Value =
            serde_json::from_str(&cas_create_body("k", "v", Some(7))).unwrap();
        assert_eq!(abort["success"][0]["request_put"]["lease"], "7");
        let commit: serde_json::Value =
            serde_json::from_str(&cas_create_with_body("k", "v", ("p", "w"))).unwrap();
        assert!(commit["success"][0]["request_put"].get("lease").is_none());
        let done = vec![
            ("p1".to_string(), "d1".to_string()),
            ("p2".to_string(), "d2".to_string()),
        ];
        let u: serde_json::Value = serde_json::from_str(&unpend_body(&done, 9)).unwrap();
        assert_eq!(u["compare"][1]["key"], crate::b64::encode(b"d2"));
        assert_eq!(u["compare"][1]["result"], "GREATER");
        assert_eq!(
            u["success"][0]["request_delete_range"]["key"],
            crate::b64::encode(b"p1")
        );
        assert_eq!(
            u["success"][3]["request_put"]["key"],
            crate::b64::encode(b"d2")
        );
        assert_eq!(u["success"][3]["request_put"]["ignore_value"], true);
        assert_eq!(u["success"][3]["request_put"]["lease"], "9");
        assert_eq!(u["failure"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn refusals_as_etcd_3_4_answers_them() {
        let no_space = br#"{"error":"etcdserver: mvcc: database space exceeded","message":"etcdserver: mvcc: database space exceeded","code":8}"#;
        assert_eq!(refusal(no_space), Some(Refusal::NoSpace));
        let busy = br#"{"error":"etcdserver: too many requests","code":8}"#;
        assert_eq!(refusal(busy), Some(Refusal::Other(8)));
        let exists = br#"{"error":"etcdserver: lease already exists","message":"etcdserver: lease already exists","code":9}"#;
        assert_eq!(refusal(exists), Some(Refusal::LeaseExists));
        let no_lease = br#"{"error":"etcdserver: requested lease not found","code":5}"#;
        assert_eq!(refusal(no_lease), Some(Refusal::Other(5)));
        assert_eq!(refusal(b"no healthy upstream"), None);
        assert_eq!(refusal(br#"{"header":{}}"#), None);
    }
}
