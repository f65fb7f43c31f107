//! The engine driven by a fake host: every protocol path, exact callouts,
//! exact replies. This file holds the shared fixtures; the tests are split
//! like the engine.
#![allow(clippy::type_complexity)]

use super::*;
use crate::host::RequestHeaders;
use crate::testhost::Host;

impl Host {
    /// Sets up a request on a listener of the given direction (1 in, 2 out).
    fn request(&self, dir: u64, method: &str, path: &str, headers: &[(&str, &str)]) {
        self.base.request_headers.borrow_mut().clear();
        self.base.properties.borrow_mut().clear();
        self.base
            .properties
            .borrow_mut()
            .insert("xds.listener_direction".into(), dir.to_le_bytes().to_vec());
        self.base.set_request_header(":method", Some(method));
        self.base.set_request_header(":path", Some(path));
        for (k, v) in headers {
            self.base.set_request_header(k, Some(v));
        }
    }
    fn cluster(&self, c: &str) {
        self.base
            .properties
            .borrow_mut()
            .insert("xds.cluster_name".into(), c.as_bytes().to_vec());
    }
    fn status(&self, s: &str) {
        *self.response.borrow_mut() = vec![(":status".to_string(), s.as_bytes().to_vec())];
    }
    /// Calls made, without the recovery loop's periodic scans of pending
    /// work and the retention lease grants.
    fn take_calls(&self) -> Vec<(u32, Callout)> {
        self.take_all_calls()
            .into_iter()
            .filter(|(_, c)| !String::from_utf8_lossy(&c.body).contains("range_end"))
            .collect()
    }
    /// Calls made, without the retention lease grants (`tests/recovery.rs`
    /// has those).
    fn take_all_calls(&self) -> Vec<(u32, Callout)> {
        self.take_every_call()
            .into_iter()
            .filter(|(_, c)| c.path != "/v3/lease/grant")
            .collect()
    }
    fn take_every_call(&self) -> Vec<(u32, Callout)> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }
    fn header(&self, n: &str) -> Option<String> {
        self.base
            .request_header(n)
            .map(|v| String::from_utf8(v).unwrap())
    }
}

/// An unpend request (`etcd::unpend_body`): the pending-work keys it
/// deletes and the decision keys it puts under a lease (with the lease).
fn unpended(c: &Callout) -> (Vec<String>, Vec<(String, String)>) {
    assert_eq!(c.path, "/v3/kv/txn");
    let body: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
    let key = |v: &serde_json::Value| {
        String::from_utf8(crate::b64::decode(v["key"].as_str().unwrap()).unwrap()).unwrap()
    };
    let (mut deleted, mut leased) = (Vec::new(), Vec::new());
    for op in body["success"].as_array().unwrap() {
        if let Some(d) = op.get("request_delete_range") {
            deleted.push(key(d));
        } else {
            let p = &op["request_put"];
            assert_eq!(p["ignore_value"], true, "the record's value is kept");
            leased.push((key(p), p["lease"].as_str().unwrap().to_string()));
        }
    }
    let failure = body["failure"].as_array().unwrap();
    assert_eq!(
        failure.len(),
        deleted.len(),
        "a missing record: keys still go"
    );
    (deleted, leased)
}

/// A transaction of the root (order) with one enlisted participant
/// (payment): the app answered 200 and both voted commit; the commit
/// record's write is the next call.
fn both_voted_commit(h: &Host, inb: &mut TxnEngine, out: &mut TxnEngine) -> TxnId {
    let (txn, mut stream) = begin_with(h, inb, out, &["payment"]);
    h.status("200");
    inb.on_response_headers(h, 1, &mut stream, true);
    let calls = h.take_calls();
    answer(h, inb, &calls, "payment", vote("commit"));
    answer(h, inb, &calls, "local_app", vote("commit"));
    txn
}

fn ok(body: &str) -> CalloutResponse {
    CalloutResponse {
        status: Some(200),
        body: body.as_bytes().to_vec(),
    }
}
fn vote(v: &str) -> CalloutResponse {
    ok(&format!(r#"{{"vote":"{v}"}}"#))
}
fn status(s: u16) -> CalloutResponse {
    CalloutResponse {
        status: Some(s),
        body: Vec::new(),
    }
}
const CREATED: &str = r#"{"header":{"revision":"2"},"succeeded":true}"#;

/// The root context the test engines belong to.
const ROOT: u32 = 900;

fn engine(h: &Host, cfg: &str) -> TxnEngine {
    let mut e = TxnEngine::new(TxnConfig::parse(cfg.as_bytes()).unwrap(), h);
    e.set_root_context(ROOT);
    e
}

/// Whether every one of `calls` was dispatched from the root context (so
/// it outlives the stream that started it).
fn from_root(h: &Host, calls: &[(u32, Callout)]) -> bool {
    let d = h.dispatched_in.borrow();
    calls
        .iter()
        .all(|(t, _)| d.iter().any(|(dt, ctx)| dt == t && *ctx == ROOT))
}

const CFG: &str = r#"{"begin":[{"method":"POST","path_prefix":"/checkout"}],"node":"order","default_timeout_ms":5000}"#;

/// Begins a transaction on ctx 1 and enlists the given clusters from an
/// outbound engine sharing the table. Returns the txn id.
fn begin_with(
    h: &Host,
    inb: &mut TxnEngine,
    out: &mut TxnEngine,
    clusters: &[&str],
) -> (TxnId, Stream) {
    h.request(1, "POST", "/checkout", &[]);
    let (stream, v) = inb.on_request_headers(h, 1);
    assert_eq!(v, Verdict::Continue);
    let id = h.header("x-txmesh-txn").unwrap();
    assert_eq!(h.header("x-txmesh-deadline").unwrap(), "1005000");
    let txn = TxnId::parse(id.as_bytes()).unwrap();
    for (i, c) in clusters.iter().enumerate() {
        h.request(2, "POST", "/pay", &[("x-txmesh-txn", &id)]);
        h.cluster(c);
        let (_, v) = out.on_request_headers(h, 100 + i as u32);
        assert_eq!(v, Verdict::Continue);
        assert_eq!(h.header("x-txmesh-deadline").unwrap(), "1005000");
    }
    (txn, stream)
}

fn answer(
    h: &Host,
    e: &mut TxnEngine,
    calls: &[(u32, Callout)],
    cluster: &str,
    r: CalloutResponse,
) {
    let (t, _) = calls
        .iter()
        .find(|(_, c)| c.cluster == cluster)
        .unwrap_or_else(|| panic!("no call to {cluster} in {calls:?}"));
    e.on_callout(h, *t, r);
}

fn paths(calls: &[(u32, Callout)]) -> Vec<String> {
    let mut v: Vec<String> = calls
        .iter()
        .map(|(_, c)| format!("{} {}", c.cluster, c.path))
        .collect();
    v.sort();
    v
}

fn etcd_value(v: &str) -> CalloutResponse {
    ok(&format!(
        r#"{{"header":{{}},"responses":[{{"response_range":{{"kvs":[{{"value":"{}"}}]}}}}]}}"#,
        crate::b64::encode(v.as_bytes())
    ))
}

/// A leaf participant sidecar whose app voted commit to the prepare it
/// asked on its coordinator's behalf.
fn prepared_leaf(h: &Host, e: &mut TxnEngine) -> TxnId {
    let txn = TxnId::parse(ID.as_bytes()).unwrap();
    h.request(
        1,
        "POST",
        "/reserve",
        &[("x-txmesh-txn", ID), ("x-txmesh-deadline", "1002000")],
    );
    e.on_request_headers(h, 1);
    h.request(1, "POST", "/txmesh/prepare", &[("x-txmesh-txn", ID)]);
    let (stream, v) = e.on_request_headers(h, 2);
    assert_eq!((stream, v), (Stream::Owned, Verdict::Pause));
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["local_app /txmesh/prepare"]);
    answer(h, e, &calls, "local_app", vote("commit"));
    let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st, body.as_str()), (2, 200, r#"{"vote":"commit"}"#));
    let entry = e.table().get(h, &txn).unwrap();
    assert_eq!(
        (entry.phase, entry.deadline_ms),
        (Phase::Preparing, 1_002_000)
    );
    txn
}

/// Runs a 2-participant transaction (payment + the root's own app) to the
/// point where every commit is acknowledged.
fn commit_and_ack(h: &Host, inb: &mut TxnEngine, out: &mut TxnEngine) -> TxnId {
    let txn = both_voted_commit(h, inb, out);
    let calls = h.take_calls();
    answer(h, inb, &calls, "etcd", ok(CREATED));
    inb.on_tick(h);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["local_app /txmesh/commit", "payment /txmesh/commit"]
    );
    answer(h, inb, &calls, "local_app", ok(""));
    answer(h, inb, &calls, "payment", ok(""));
    txn
}

/// A transaction id the tests make up (a participant sees it first).
const ID: &str = "0af7651916cd43dd8448eb211c80319c";

mod admission;
mod grpc;
mod phase2;
mod recovery;
mod root;
mod status;
mod sub;
