//! The engine driven by a fake host: every protocol path, exact callouts,
//! exact replies.
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
    /// Calls made, without the recovery loop's periodic scans of pending work.
    fn take_calls(&self) -> Vec<(u32, Callout)> {
        self.take_all_calls()
            .into_iter()
            .filter(|(_, c)| !String::from_utf8_lossy(&c.body).contains("range_end"))
            .collect()
    }
    fn take_all_calls(&self) -> Vec<(u32, Callout)> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }
    fn header(&self, n: &str) -> Option<String> {
        self.base
            .request_header(n)
            .map(|v| String::from_utf8(v).unwrap())
    }
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

#[test]
fn commit_with_three_participants() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment", "inventory"]);
    h.status("200");
    assert_eq!(inb.on_response_headers(&h, 1, &stream), Verdict::Pause);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        [
            "inventory /txmesh/prepare",
            "local_app /txmesh/prepare",
            "payment /txmesh/prepare"
        ]
    );
    for (_, c) in &calls {
        assert_eq!(c.timeout_ms, 5000);
        assert!(c
            .headers
            .contains(&("x-txmesh-txn".to_string(), txn.to_string())));
    }
    // Late enlistment is refused once preparing.
    h.request(2, "POST", "/late", &[("x-txmesh-txn", &txn.to_string())]);
    h.cluster("shipping");
    let (_, v) = out.on_request_headers(&h, 150);
    assert_eq!(v, Verdict::Pause);
    let (ctx, st, _, body) = h.replies.borrow_mut().pop().unwrap();
    assert_eq!((ctx, st), (150, 409));
    assert!(
        body.contains("is preparing: it takes no new participants"),
        "{body}"
    );

    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "inventory", vote("commit"));
    assert!(h.calls.borrow().is_empty(), "no decision before every vote");
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    let body = String::from_utf8(calls[0].1.body.clone()).unwrap();
    assert!(body.contains(&crate::b64::encode(
        format!("txmesh/decisions/{txn}").as_bytes()
    )));
    assert!(
        h.resumed.borrow().is_empty(),
        "no answer before the decision is durable"
    );
    h.advance(3);
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    // The decision line times etcd's round trip apart from the rest.
    let line = h.logs.borrow().last().cloned().unwrap();
    assert!(
        line.contains(&format!("txn {txn} committed reason=ok ")),
        "{line}"
    );
    assert!(line.contains(" record_us=3000 etcd_us=3000"), "{line}");
    assert_eq!(
        h.resumed.borrow().as_slice(),
        &[(
            1,
            vec![
                ("x-txmesh-outcome".to_string(), "committed".to_string()),
                ("x-txmesh-txn".to_string(), txn.to_string())
            ]
        )]
    );
    // Phase 2 at once (not at the next tick), from the root context: the
    // commits outlive the client's stream.
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        [
            "inventory /txmesh/commit",
            "local_app /txmesh/commit",
            "payment /txmesh/commit"
        ]
    );
    assert!(from_root(&h, &calls));
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty(), "each commit is sent once");
    answer(&h, &mut inb, &calls, "payment", ok(""));
    answer(&h, &mut inb, &calls, "inventory", status(503));
    answer(&h, &mut inb, &calls, "local_app", ok(""));
    // inventory failed once: acknowledgements are recorded from now on.
    assert_eq!(paths(&h.take_calls()), ["etcd /v3/kv/put"]);
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty(), "retry waits for its backoff");
    h.advance(200);
    inb.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["inventory /txmesh/commit"]);
    answer(&h, &mut inb, &calls, "inventory", ok(""));
    assert_eq!(paths(&h.take_calls()), ["etcd /v3/kv/put"]);
    inb.on_tick(&h);
    assert!(!inb.busy());
    assert!(inb.table().get(&h, &txn).is_none());
    assert_eq!(inb.table().count(&h), 0);
    let logs = h.logs.borrow();
    assert!(
        logs.iter().any(|l| l.starts_with(&format!("txn {txn} committed reason=ok trace=- participants=payment:commit,inventory:commit,order:commit"))),
        "{logs:?}"
    );
    assert_eq!(
        h.base
            .counter("outcome=.=committed;.;reason=.=ok;.;txmesh_txn_total"),
        Some(1)
    );
}

#[test]
fn a_no_vote_aborts_everyone_and_names_the_participant() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment", "inventory"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(
        &h,
        &mut inb,
        &calls,
        "inventory",
        ok(r#"{"vote":"abort","reason":"out_of_stock"}"#),
    );
    let (ctx, st, headers, body) = h.replies.borrow()[0].clone();
    assert_eq!((ctx, st), (1, 409));
    assert!(headers.contains(&("x-txmesh-outcome".to_string(), "aborted".to_string())));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["txn"], txn.to_string());
    assert_eq!(v["outcome"], "aborted");
    assert_eq!(v["reason"], "out_of_stock");
    assert_eq!(v["participant"], "inventory");
    // The app's late vote is ignored.
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    inb.on_tick(&h);
    let calls = h.take_calls();
    // payment may be prepared: an abort record goes to etcd; everyone gets abort.
    assert_eq!(
        paths(&calls),
        [
            "etcd /v3/kv/txn",
            "inventory /txmesh/abort",
            "local_app /txmesh/abort",
            "payment /txmesh/abort"
        ]
    );
    assert!(!calls.iter().any(|(_, c)| c.path == "/txmesh/commit"));
}

#[test]
fn readonly_voters_get_no_phase_two() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment", "catalog"]);
    h.status("201");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "catalog", vote("readonly"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        ["local_app /txmesh/commit", "payment /txmesh/commit"]
    );
}

#[test]
fn all_readonly_commits_without_etcd() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &["catalog"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "catalog", vote("readonly"));
    answer(&h, &mut inb, &calls, "local_app", vote("readonly"));
    assert!(h.take_calls().is_empty());
    assert_eq!(h.resumed.borrow().len(), 1);
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty());
    assert!(inb.table().get(&h, &txn).is_none());
}

#[test]
fn one_participant_commits_in_one_phase() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &[]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["local_app /txmesh/prepare"]);
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["local_app /txmesh/commit"],
        "no etcd write in 1PC"
    );
    assert!(
        h.resumed.borrow().is_empty(),
        "1PC answers after the commit is acknowledged"
    );
    answer(&h, &mut inb, &calls, "local_app", ok(""));
    assert_eq!(h.resumed.borrow().len(), 1);
    assert!(inb.table().get(&h, &txn).is_none());
    // The status endpoint still knows.
    h.request(1, "GET", &format!("/txmesh/txns/{txn}"), &[]);
    inb.on_request_headers(&h, 9);
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!(st, 200);
    assert_eq!(body, format!(r#"{{"txn":"{txn}","outcome":"committed"}}"#));
}

#[test]
fn one_phase_commit_unacknowledged_falls_back_to_a_durable_decision() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, stream) = begin_with(&h, &mut inb, &mut out, &[]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "local_app", status(503));
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    assert_eq!(h.resumed.borrow().len(), 1);
    inb.on_tick(&h);
    assert_eq!(paths(&h.take_calls()), ["local_app /txmesh/commit"]);
}

#[test]
fn app_error_aborts_without_prepare() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("503");
    assert_eq!(inb.on_response_headers(&h, 1, &stream), Verdict::Pause);
    // No prepare, no record (nobody prepared): the aborts go out at once.
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["local_app /txmesh/abort", "payment /txmesh/abort"]
    );
    assert!(from_root(&h, &calls));
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 409);
    assert!(
        body.contains(r#""reason":"the app answered 503""#),
        "{body}"
    );
    assert!(body.contains(r#""participant":"order""#), "{body}");
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty(), "each abort is sent once");
}

#[test]
fn a_stalled_participant_aborts_at_the_deadline_from_the_tick() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    h.advance(4_999);
    inb.on_tick(&h);
    assert!(h.replies.borrow().is_empty());
    h.advance(1);
    inb.on_tick(&h);
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 409);
    assert!(
        body.contains(r#""reason":"no answer before the deadline""#),
        "{body}"
    );
    assert!(body.contains(r#""participant":"payment""#), "{body}");
    // The stalled answer arriving later changes nothing.
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    assert_eq!(h.replies.borrow().len(), 1);
    assert_eq!(
        h.base
            .counter("outcome=.=aborted;.;reason=.=timeout;.;txmesh_txn_total"),
        Some(1)
    );
}

#[test]
fn etcd_down_aborts_and_never_commits() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let refused = CalloutResponse {
        status: Some(503),
        body: b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused".to_vec(),
    };
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", refused.clone());
    // Nothing reached etcd: the same commit record is re-sent (another
    // member may answer), twice.
    for _ in 0..2 {
        let calls = h.take_calls();
        assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
        let body = String::from_utf8_lossy(&calls[0].1.body).to_string();
        assert_eq!(
            body.matches("request_put").count(),
            2,
            "the commit record (+ pending key) again"
        );
        answer(&h, &mut inb, &calls, "etcd", refused.clone());
    }
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"], "tries an abort record");
    let body = String::from_utf8_lossy(&calls[0].1.body).to_string();
    assert_eq!(
        body.matches("request_put").count(),
        1,
        "an abort record has no pending key"
    );
    answer(&h, &mut inb, &calls, "etcd", refused);
    let (_, st, headers, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 409);
    assert!(headers.contains(&("x-txmesh-outcome".to_string(), "aborted".to_string())));
    assert!(body.contains("etcd unavailable"), "{body}");
    for _ in 0..5 {
        h.advance(300);
        inb.on_tick(&h);
        let calls = h.take_calls();
        assert!(
            !calls.iter().any(|(_, c)| c.path == "/txmesh/commit"),
            "{calls:?}"
        );
        for (t, c) in calls {
            if c.path == "/txmesh/abort" {
                inb.on_callout(&h, t, ok(""));
            }
        }
    }
}

#[test]
fn an_ambiguous_etcd_failure_is_resolved_not_guessed() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    // The commit record write times out: it may have landed.
    answer(&h, &mut inb, &calls, "etcd", status(504));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", status(504));
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 503);
    assert!(body.contains(r#""outcome":"unknown""#), "{body}");
    // From the tick: an abort CAS that finds the commit record -> commit.
    inb.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["etcd /v3/kv/txn"],
        "no phase 2 before the truth is known"
    );
    let existing = format!(
        r#"{{"header":{{}},"responses":[{{"response_range":{{"kvs":[{{"value":"{}"}}]}}}}]}}"#,
        crate::b64::encode(format!(r#"{{"txn":"{txn}","outcome":"committed"}}"#).as_bytes())
    );
    answer(&h, &mut inb, &calls, "etcd", ok(&existing));
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        ["local_app /txmesh/commit", "payment /txmesh/commit"]
    );
}

#[test]
fn an_existing_abort_decision_wins_over_our_commit() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    let existing = format!(
        r#"{{"header":{{}},"responses":[{{"response_range":{{"kvs":[{{"value":"{}"}}]}}}}]}}"#,
        crate::b64::encode(br#"{"outcome":"aborted"}"#)
    );
    answer(&h, &mut inb, &calls, "etcd", ok(&existing));
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 409);
    assert!(body.contains("already recorded in etcd"), "{body}");
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        ["local_app /txmesh/abort", "payment /txmesh/abort"]
    );
}

#[test]
fn bad_input_is_rejected_before_forwarding() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let cases: &[(u64, &str, &[(&str, &str)], u16, &str)] = &[
        (
            1,
            "/x",
            &[("x-txmesh-txn", "ZZ")],
            400,
            "invalid x-txmesh-txn",
        ),
        (
            1,
            "/x",
            &[("x-txmesh-txn", "00000000000000000000000000000000")],
            400,
            "must not be all zero",
        ),
        (
            1,
            "/x",
            &[("x-txmesh-txn", "new")],
            400,
            "x-txmesh-txn: new is not allowed here",
        ),
        (
            1,
            "/checkout",
            &[("x-txmesh-deadline", "999")],
            400,
            "is in the past",
        ),
        (
            1,
            "/checkout",
            &[("x-txmesh-deadline", "soon")],
            400,
            "invalid x-txmesh-deadline",
        ),
        (
            2,
            "/pay",
            &[("x-txmesh-txn", "new")],
            400,
            "only accepted by the initiator's inbound sidecar",
        ),
        (
            2,
            "/pay",
            &[("baggage", "txmesh.txn=xyz")],
            400,
            "invalid baggage member",
        ),
        (1, "/txmesh/prepare", &[], 400, "needs x-txmesh-txn"),
        (1, "/txmesh/nope", &[], 404, "unknown txmesh endpoint"),
        (1, "/txmesh/txns/xyz", &[], 400, "32 lowercase hex"),
    ];
    for (i, (dir, path, headers, want, msg)) in cases.iter().enumerate() {
        h.request(
            *dir,
            if path.starts_with("/txmesh/txns") {
                "GET"
            } else {
                "POST"
            },
            path,
            headers,
        );
        let (_, v) = inb.on_request_headers(&h, 10 + i as u32);
        assert_eq!(v, Verdict::Pause, "{path} {headers:?}");
        let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
        assert_eq!(
            (ctx, st),
            (10 + i as u32, *want),
            "{path} {headers:?}: {body}"
        );
        assert!(body.contains(msg), "{path}: {body}");
        assert!(body.starts_with(r#"{"error":"#), "{body}");
    }
    assert_eq!(inb.table().count(&h), 0);
}

#[test]
fn client_deadline_shortens_but_never_lengthens() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    h.request(1, "POST", "/checkout", &[("x-txmesh-deadline", "1002000")]);
    inb.on_request_headers(&h, 1);
    assert_eq!(h.header("x-txmesh-deadline").unwrap(), "1002000");
    h.request(1, "POST", "/checkout", &[("x-txmesh-deadline", "9999999")]);
    inb.on_request_headers(&h, 2);
    assert_eq!(h.header("x-txmesh-deadline").unwrap(), "1005000");
}

#[test]
fn baggage_carries_the_id_and_is_normalized_to_the_header() {
    let h = Host::new();
    let mut out = engine(&h, CFG);
    let id = "0af7651916cd43dd8448eb211c80319c";
    h.request(
        2,
        "POST",
        "/pay",
        &[("baggage", &format!("a=b,txmesh.txn={id}"))],
    );
    h.cluster("payment");
    let (_, v) = out.on_request_headers(&h, 1);
    assert_eq!(v, Verdict::Continue);
    assert_eq!(h.header("x-txmesh-txn").unwrap(), id);
    let e = out
        .table()
        .get(&h, &TxnId::parse(id.as_bytes()).unwrap())
        .unwrap();
    assert_eq!(e.participants, vec![("payment".to_string(), Mark::Unknown)]);
}

#[test]
fn a_full_table_sheds_new_transactions_with_503() {
    let h = Host::new();
    let mut inb = engine(&h, r#"{"begin":[{"path_prefix":"/c"}],"max_in_flight":2}"#);
    for ctx in 1..=2 {
        h.request(1, "POST", "/c", &[]);
        assert_eq!(inb.on_request_headers(&h, ctx).1, Verdict::Continue);
    }
    h.request(1, "POST", "/c", &[]);
    assert_eq!(inb.on_request_headers(&h, 3).1, Verdict::Pause);
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 503);
    assert!(
        body.contains("transaction table full: 2 transactions in flight"),
        "{body}"
    );
}

#[test]
fn sub_coordinator_prepares_children_and_its_app_then_cascades() {
    let h = Host::new();
    let cfg = r#"{"node":"payment"}"#;
    let mut inb = engine(&h, cfg);
    let mut out = engine(&h, cfg);
    let id = "0af7651916cd43dd8448eb211c80319c";
    let txn = TxnId::parse(id.as_bytes()).unwrap();
    // The root calls payment; payment's app calls ledger.
    h.request(
        1,
        "POST",
        "/pay",
        &[("x-txmesh-txn", id), ("x-txmesh-deadline", "1003000")],
    );
    assert_eq!(inb.on_request_headers(&h, 1).1, Verdict::Continue);
    h.request(2, "POST", "/debit", &[("x-txmesh-txn", id)]);
    h.cluster("ledger");
    out.on_request_headers(&h, 2);
    assert_eq!(
        h.header("x-txmesh-deadline").unwrap(),
        "1003000",
        "deadline carried down"
    );
    // Prepare from the root.
    h.request(1, "POST", "/txmesh/prepare", &[("x-txmesh-txn", id)]);
    let (stream, v) = inb.on_request_headers(&h, 3);
    assert_eq!((stream, v), (Stream::Owned, Verdict::Pause));
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["ledger /txmesh/prepare", "local_app /txmesh/prepare"]
    );
    assert!(calls.iter().all(|(_, c)| c.timeout_ms == 3000));
    answer(&h, &mut inb, &calls, "ledger", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("readonly"));
    let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st, body.as_str()), (3, 200, r#"{"vote":"commit"}"#));
    // Commit cascades to the ledger, not to the read-only app.
    h.request(1, "POST", "/txmesh/commit", &[("x-txmesh-txn", id)]);
    inb.on_request_headers(&h, 4);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["ledger /txmesh/commit"]);
    answer(&h, &mut inb, &calls, "ledger", ok(""));
    let (ctx, st, _, _) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st), (4, 200));
    assert!(inb.table().get(&h, &txn).is_none());
}

#[test]
fn sub_coordinator_reports_a_child_no_and_who_said_it() {
    let h = Host::new();
    let mut inb = engine(&h, r#"{"node":"payment"}"#);
    let mut out = engine(&h, r#"{"node":"payment"}"#);
    let id = "0af7651916cd43dd8448eb211c80319c";
    h.request(2, "POST", "/debit", &[("x-txmesh-txn", id)]);
    h.cluster("ledger");
    out.on_request_headers(&h, 2);
    h.request(1, "POST", "/txmesh/prepare", &[("x-txmesh-txn", id)]);
    inb.on_request_headers(&h, 3);
    let calls = h.take_calls();
    answer(
        &h,
        &mut inb,
        &calls,
        "ledger",
        ok(r#"{"vote":"abort","reason":"insufficient_funds"}"#),
    );
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["vote"], "abort");
    assert_eq!(v["reason"], "insufficient_funds");
    assert_eq!(v["participant"], "ledger");
    // An abort cascade that a child does not acknowledge is a 503: the root retries.
    h.request(1, "POST", "/txmesh/abort", &[("x-txmesh-txn", id)]);
    inb.on_request_headers(&h, 4);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["ledger /txmesh/abort", "local_app /txmesh/abort"]
    );
    answer(&h, &mut inb, &calls, "ledger", status(500));
    answer(&h, &mut inb, &calls, "local_app", ok(""));
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!(st, 503);
    assert!(
        body.contains("not acknowledged by ledger (answered 500)"),
        "{body}"
    );
}

#[test]
fn leaf_control_requests_pass_through_and_free_the_entry() {
    let h = Host::new();
    let mut inb = engine(&h, r#"{"node":"inventory"}"#);
    let id = "0af7651916cd43dd8448eb211c80319c";
    let txn = TxnId::parse(id.as_bytes()).unwrap();
    h.request(1, "POST", "/reserve", &[("x-txmesh-txn", id)]);
    inb.on_request_headers(&h, 1);
    assert_eq!(inb.table().get(&h, &txn).unwrap().role, Role::Participant);
    h.request(1, "POST", "/txmesh/prepare", &[("x-txmesh-txn", id)]);
    assert_eq!(
        inb.on_request_headers(&h, 2),
        (Stream::Pass, Verdict::Continue)
    );
    assert_eq!(inb.table().get(&h, &txn).unwrap().phase, Phase::Preparing);
    h.request(1, "POST", "/txmesh/commit", &[("x-txmesh-txn", id)]);
    let (stream, v) = inb.on_request_headers(&h, 3);
    assert_eq!(
        (stream.clone(), v),
        (Stream::LeafFinish { txn }, Verdict::Continue)
    );
    h.status("200");
    inb.on_response_headers(&h, 3, &stream);
    assert!(inb.table().get(&h, &txn).is_none());
}

#[test]
fn status_reads_etcd_when_not_local() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let id = "0af7651916cd43dd8448eb211c80319c";
    h.request(1, "GET", &format!("/txmesh/txns/{id}"), &[]);
    let (_, v) = inb.on_request_headers(&h, 5);
    assert_eq!(v, Verdict::Pause);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/range"]);
    let found = format!(
        r#"{{"header":{{}},"kvs":[{{"value":"{}"}}]}}"#,
        crate::b64::encode(br#"{"outcome":"aborted"}"#)
    );
    answer(&h, &mut inb, &calls, "etcd", ok(&found));
    let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st), (5, 200));
    assert_eq!(body, format!(r#"{{"txn":"{id}","outcome":"aborted"}}"#));
    // Unknown everywhere.
    h.request(1, "GET", &format!("/txmesh/txns/{id}"), &[]);
    inb.on_request_headers(&h, 6);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", ok(r#"{"header":{}}"#));
    let (_, _, _, body) = h.replies.borrow().last().unwrap().clone();
    assert!(body.contains(r#""outcome":"unknown""#));
    // etcd down.
    h.request(1, "GET", &format!("/txmesh/txns/{id}"), &[]);
    inb.on_request_headers(&h, 7);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", status(503));
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!(st, 503);
    assert!(body.contains("etcd unreachable"), "{body}");
}

#[test]
fn client_gone_during_prepare_aborts_from_the_tick() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    inb.on_stream_done(&h, 1, &stream);
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        [
            "etcd /v3/kv/txn",
            "local_app /txmesh/abort",
            "payment /txmesh/abort"
        ]
    );
    assert_eq!(inb.table().get(&h, &txn).unwrap().phase, Phase::Aborted);
}

#[test]
fn memory_stays_flat_over_many_transactions() {
    let h = Host::new();
    let mut inb = engine(
        &h,
        r#"{"begin":[{"path_prefix":"/c"}],"max_in_flight":4,"node":"o"}"#,
    );
    for ctx in 0..2_000u32 {
        h.rand.set((ctx % 250) as u8);
        h.request(1, "POST", "/c", &[]);
        let (stream, _) = inb.on_request_headers(&h, ctx);
        h.status("200");
        inb.on_response_headers(&h, ctx, &stream);
        let calls = h.take_calls();
        answer(&h, &mut inb, &calls, "local_app", vote("commit"));
        let calls = h.take_calls();
        answer(&h, &mut inb, &calls, "local_app", ok(""));
        inb.on_stream_done(&h, ctx, &stream);
        h.advance(1);
    }
    assert_eq!(inb.table().count(&h), 0);
    assert!(!inb.busy());
    let keys = h.base.shared.borrow().len();
    assert!(keys <= 4 + 1 + 256, "{keys} shared-data keys");
}

// ----- in-doubt resolution, listing, recovery ---------------------------------

const ID: &str = "0af7651916cd43dd8448eb211c80319c";

fn etcd_value(v: &str) -> CalloutResponse {
    ok(&format!(
        r#"{{"header":{{}},"responses":[{{"response_range":{{"kvs":[{{"value":"{}"}}]}}}}]}}"#,
        crate::b64::encode(v.as_bytes())
    ))
}

/// A leaf participant sidecar that passed a prepare through and saw 200.
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
    assert_eq!((stream, v), (Stream::Pass, Verdict::Continue));
    let entry = e.table().get(h, &txn).unwrap();
    assert_eq!(
        (entry.phase, entry.deadline_ms),
        (Phase::Preparing, 1_002_000)
    );
    txn
}

#[test]
fn an_in_doubt_participant_resolves_to_abort_after_deadline_and_grace() {
    let h = Host::new();
    let mut e = engine(&h, r#"{"node":"inventory","in_doubt_grace_ms":2000}"#);
    let txn = prepared_leaf(&h, &mut e);
    // Before deadline + grace: the scan leaves it alone (only the recovery scan runs).
    h.advance(3_999);
    e.on_tick(&h);
    assert_eq!(
        paths(&h.take_all_calls()),
        ["etcd /v3/kv/range"],
        "only the pending scan"
    );
    h.advance(1_001);
    e.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["etcd /v3/kv/txn"],
        "CAS abort first, deliver after"
    );
    let body = String::from_utf8(calls[0].1.body.clone()).unwrap();
    assert!(body.contains(&crate::b64::encode(
        format!("txmesh/decisions/{txn}").as_bytes()
    )));
    answer(&h, &mut e, &calls, "etcd", ok(CREATED));
    e.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["local_app /txmesh/abort"]);
    answer(&h, &mut e, &calls, "local_app", ok(""));
    e.on_tick(&h);
    assert!(e.table().get(&h, &txn).is_none());
    assert!(h
        .logs
        .borrow()
        .iter()
        .any(|l| l.contains("in doubt (prepared, no decision 2000 ms past the deadline)")));
}

#[test]
fn an_in_doubt_participant_obeys_a_recorded_commit() {
    let h = Host::new();
    let mut e = engine(&h, r#"{"node":"inventory"}"#);
    let _txn = prepared_leaf(&h, &mut e);
    h.advance(5_000);
    e.on_tick(&h);
    let calls: Vec<_> = h
        .take_calls()
        .into_iter()
        .filter(|(_, c)| c.path == "/v3/kv/txn")
        .collect();
    answer(
        &h,
        &mut e,
        &calls,
        "etcd",
        etcd_value(r#"{"outcome":"committed"}"#),
    );
    e.on_tick(&h);
    assert_eq!(paths(&h.take_calls()), ["local_app /txmesh/commit"]);
}

#[test]
fn only_one_engine_per_sidecar_runs_the_scans() {
    let h = Host::new();
    let mut a = engine(&h, r#"{"node":"x"}"#);
    let mut b = engine(&h, r#"{"node":"x"}"#);
    a.on_tick(&h);
    assert_eq!(h.take_all_calls().len(), 1, "a leads: one pending scan");
    b.on_tick(&h);
    assert!(h.take_all_calls().is_empty(), "b follows");
    // a stops ticking (its worker is gone): b takes over after 3 intervals.
    h.advance(3_001);
    b.on_tick(&h);
    assert_eq!(h.take_all_calls().len(), 1);
}

#[test]
fn status_resolves_an_in_doubt_transaction_for_a_recovering_app() {
    let h = Host::new();
    let mut e = engine(&h, r#"{"node":"payment"}"#);
    // The app restarted holding a prepared txn whose deadline passed long ago.
    h.request(
        1,
        "GET",
        &format!("/txmesh/txns/{ID}"),
        &[("x-txmesh-deadline", "990000")],
    );
    e.on_request_headers(&h, 3);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/range"]);
    answer(&h, &mut e, &calls, "etcd", ok(r#"{"header":{}}"#));
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"], "no decision: CAS abort");
    answer(&h, &mut e, &calls, "etcd", ok(CREATED));
    let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st), (3, 200));
    assert_eq!(body, format!(r#"{{"txn":"{ID}","outcome":"aborted"}}"#));
    // Within the deadline: no resolution, "unknown".
    h.request(
        1,
        "GET",
        &format!("/txmesh/txns/{ID}"),
        &[("x-txmesh-deadline", "1009000")],
    );
    e.on_request_headers(&h, 4);
    let calls = h.take_calls();
    answer(&h, &mut e, &calls, "etcd", ok(r#"{"header":{}}"#));
    assert!(h.take_calls().is_empty());
    let (_, _, _, body) = h.replies.borrow().last().unwrap().clone();
    assert!(body.contains(r#""outcome":"unknown""#), "{body}");
}

#[test]
fn listing_shows_in_doubt_and_active_transactions() {
    let h = Host::new();
    let mut e = engine(&h, r#"{"node":"inventory"}"#);
    let txn = prepared_leaf(&h, &mut e);
    let other = "1af7651916cd43dd8448eb211c80319c";
    h.request(1, "POST", "/reserve", &[("x-txmesh-txn", other)]);
    e.on_request_headers(&h, 5);
    let mut list = |state: &str| {
        h.request(1, "GET", &format!("/txmesh/txns?state={state}"), &[]);
        e.on_request_headers(&h, 9);
        let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
        assert_eq!(st, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert_eq!(list("all")["txns"].as_array().unwrap().len(), 2);
    assert_eq!(list("in-doubt")["txns"].as_array().unwrap().len(), 0);
    h.advance(2_001); // past txn's deadline (1002000); other's default deadline is later
    let v = list("in-doubt");
    assert_eq!(v["node"], "inventory");
    assert_eq!(v["txns"].as_array().unwrap().len(), 1);
    assert_eq!(v["txns"][0]["txn"], txn.to_string());
    assert_eq!(v["txns"][0]["phase"], "preparing");
    assert_eq!(v["txns"][0]["role"], "participant");
    assert_eq!(list("active")["txns"][0]["txn"], other);
    h.request(1, "GET", "/txmesh/txns?state=bogus", &[]);
    e.on_request_headers(&h, 10);
    assert_eq!(h.replies.borrow().last().unwrap().1, 400);
}

#[test]
fn commit_records_carry_a_pending_key_and_recovery_redrives_it() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    let body: serde_json::Value = serde_json::from_slice(&calls[0].1.body).unwrap();
    let pkey =
        crate::b64::decode(body["success"][1]["request_put"]["key"].as_str().unwrap()).unwrap();
    assert_eq!(
        String::from_utf8(pkey).unwrap(),
        format!("txmesh/pending/order/{txn}")
    );
    let pval =
        crate::b64::decode(body["success"][1]["request_put"]["value"].as_str().unwrap()).unwrap();
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    // The sidecar "crashes": a fresh engine, same shared data gone too.
    let h2 = Host::new();
    h2.advance(10_000);
    let mut fresh = engine(&h2, CFG);
    fresh.on_tick(&h2);
    let calls = h2.take_all_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/range"]);
    let range = format!(
        r#"{{"header":{{}},"kvs":[{{"value":"{}"}}]}}"#,
        crate::b64::encode(&pval)
    );
    answer(&h2, &mut fresh, &calls, "etcd", ok(&range));
    fresh.on_tick(&h2);
    let calls = h2.take_calls();
    assert_eq!(
        paths(&calls),
        ["local_app /txmesh/commit", "payment /txmesh/commit"]
    );
    answer(&h2, &mut fresh, &calls, "payment", ok(""));
    answer(&h2, &mut fresh, &calls, "local_app", ok(""));
    fresh.on_tick(&h2);
    let calls = h2.take_calls();
    assert_eq!(
        paths(&calls),
        ["etcd /v3/kv/deleterange"],
        "pending key removed when done"
    );
    assert!(!fresh.busy());
}

#[test]
fn acknowledgements_are_recorded_once_phase_two_has_to_retry() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    inb.on_tick(&h);
    let calls = h.take_calls();
    // Both acknowledge at once: no extra etcd write.
    answer(&h, &mut inb, &calls, "local_app", ok(""));
    assert!(h.take_calls().is_empty());
    answer(&h, &mut inb, &calls, "payment", status(503));
    h.advance(200);
    inb.on_tick(&h);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", ok(""));
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["etcd /v3/kv/put"],
        "the acknowledgement is recorded"
    );
    let body: serde_json::Value = serde_json::from_slice(&calls[0].1.body).unwrap();
    let key = crate::b64::decode(body["key"].as_str().unwrap()).unwrap();
    assert_eq!(
        String::from_utf8(key).unwrap(),
        format!("txmesh/pending/order/{txn}")
    );
    let value = crate::b64::decode(body["value"].as_str().unwrap()).unwrap();
    let p: crate::txn::etcd::Pending = serde_json::from_slice(&value).unwrap();
    let states: Vec<(&str, &str)> = p
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.vote.as_str()))
        .collect();
    assert_eq!(states, [("payment", "acked"), ("order", "acked")]);
    inb.on_tick(&h);
    assert_eq!(paths(&h.take_calls()), ["etcd /v3/kv/deleterange"]);
}

#[test]
fn an_app_4xx_aborts_but_the_client_sees_the_apps_own_error() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("400");
    assert_eq!(inb.on_response_headers(&h, 1, &stream), Verdict::Continue);
    assert!(
        h.replies.borrow().is_empty(),
        "no 409 replacing the app's answer"
    );
    assert_eq!(h.response_header("x-txmesh-outcome").unwrap(), b"aborted");
    assert_eq!(
        h.response_header("x-txmesh-txn").unwrap(),
        txn.to_string().as_bytes()
    );
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        ["local_app /txmesh/abort", "payment /txmesh/abort"],
        "still aborted everywhere, nothing prepared"
    );
}

#[test]
fn a_routed_participant_is_pinned_to_its_instance() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    h.request(1, "POST", "/checkout", &[]);
    let (stream, _) = inb.on_request_headers(&h, 1);
    let id = h.header("x-txmesh-txn").unwrap();
    // The router picked 10.0.0.2:15006 for this call; a bad value pins nothing.
    h.request(
        2,
        "POST",
        "/pay",
        &[
            ("x-txmesh-txn", &id),
            ("x-txmesh-endpoint", "10.0.0.2:15006"),
        ],
    );
    h.cluster("payment");
    assert_eq!(out.on_request_headers(&h, 100).1, Verdict::Continue);
    h.request(
        2,
        "POST",
        "/reserve",
        &[
            ("x-txmesh-txn", &id),
            ("x-txmesh-endpoint", "not-an-address"),
        ],
    );
    h.cluster("inventory");
    assert_eq!(out.on_request_headers(&h, 101).1, Verdict::Continue);
    h.status("200");
    assert_eq!(inb.on_response_headers(&h, 1, &stream), Verdict::Pause);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        [
            "inventory /txmesh/prepare",
            "local_app /txmesh/prepare",
            "payment /txmesh/prepare"
        ]
    );
    let pinned = |c: &Callout| {
        c.headers
            .iter()
            .find(|(k, _)| k == "x-txmesh-endpoint")
            .map(|(_, v)| v.clone())
    };
    for (_, c) in &calls {
        let want = (c.cluster == "payment").then(|| "10.0.0.2:15006".to_string());
        assert_eq!(pinned(c), want, "{c:?}");
    }
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "inventory", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    inb.on_tick(&h);
    let calls = h.take_calls();
    let commit = calls.iter().find(|(_, c)| c.cluster == "payment").unwrap();
    assert_eq!(commit.1.path, "/txmesh/commit");
    assert_eq!(pinned(&commit.1).as_deref(), Some("10.0.0.2:15006"));
    let logs = h.logs.borrow();
    assert!(
        logs.iter()
            .any(|l| l.contains("participants=payment@10.0.0.2:15006:commit,inventory:commit")),
        "{logs:?}"
    );
}

/// Runs a 2-participant transaction (payment + the root's own app) to the
/// point where every commit is acknowledged.
fn commit_and_ack(h: &Host, inb: &mut TxnEngine, out: &mut TxnEngine) -> TxnId {
    let (txn, stream) = begin_with(h, inb, out, &["payment"]);
    h.status("200");
    inb.on_response_headers(h, 1, &stream);
    let calls = h.take_calls();
    answer(h, inb, &calls, "payment", vote("commit"));
    answer(h, inb, &calls, "local_app", vote("commit"));
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

#[test]
fn finished_transactions_pending_keys_are_deleted_together() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let first = commit_and_ack(&h, &mut inb, &mut out);
    inb.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["etcd /v3/kv/deleterange"],
        "the first at once"
    );
    let body: serde_json::Value = serde_json::from_slice(&calls[0].1.body).unwrap();
    let key = crate::b64::decode(body["key"].as_str().unwrap()).unwrap();
    assert_eq!(key, format!("txmesh/pending/order/{first}").into_bytes());
    // Two more finish within UNPEND_INTERVAL_MS: nothing until it has passed,
    // then one write deletes both.
    let b = commit_and_ack(&h, &mut inb, &mut out);
    let c = commit_and_ack(&h, &mut inb, &mut out);
    inb.on_tick(&h);
    assert!(
        h.take_calls().is_empty(),
        "batched until the interval passes"
    );
    h.advance(UNPEND_INTERVAL_MS);
    inb.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    let body: serde_json::Value = serde_json::from_slice(&calls[0].1.body).unwrap();
    let keys: Vec<String> = body["success"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| {
            let k = op["request_delete_range"]["key"].as_str().unwrap();
            String::from_utf8(crate::b64::decode(k).unwrap()).unwrap()
        })
        .collect();
    assert_eq!(
        keys,
        [
            format!("txmesh/pending/order/{b}"),
            format!("txmesh/pending/order/{c}")
        ]
    );
    assert!(!inb.busy());
    h.advance(UNPEND_INTERVAL_MS);
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty(), "nothing left to delete");
}

#[test]
fn the_decision_line_times_the_prepare_round_and_the_record_write() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.advance(3); // the app works
    h.status("200");
    inb.on_response_headers(&h, 1, &stream);
    let calls = h.take_calls();
    h.advance(5); // the prepare round
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    h.advance(2); // the record write
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    let logs = h.logs.borrow();
    let line = logs
        .iter()
        .find(|l| l.contains(" committed reason=ok "))
        .unwrap();
    assert!(
        line.contains(
            " prepare_ms=8 decide_ms=2 total_ms=10 app_us=3000 prepare_us=5000 record_us=2000"
        ),
        "{line}"
    );
}

/// The abort cause is typed: a sub-coordinator relays a child's timeout as
/// `"cause":"timeout"` and the root counts it as one; a participant's own
/// reason text is only text, whatever it says.
#[test]
fn a_relayed_timeout_counts_as_timeout_and_reason_text_decides_nothing() {
    for (body, reason) in [
        (
            r#"{"vote":"abort","reason":"no answer before the deadline","participant":"c","cause":"timeout"}"#,
            "timeout",
        ),
        (
            r#"{"vote":"abort","reason":"the deadline of our promo passed"}"#,
            "vote_abort",
        ),
        (
            r#"{"vote":"abort","reason":"x","cause":"something-new"}"#,
            "vote_abort",
        ),
    ] {
        let h = Host::new();
        let mut inb = engine(&h, CFG);
        let mut out = engine(&h, CFG);
        let (_, stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
        h.status("200");
        inb.on_response_headers(&h, 1, &stream);
        let calls = h.take_calls();
        answer(&h, &mut inb, &calls, "payment", ok(body));
        assert_eq!(h.replies.borrow()[0].1, 409, "{body}");
        let name = format!("outcome=.=aborted;.;reason=.={reason};.;txmesh_txn_total");
        assert_eq!(h.base.counter(&name), Some(1), "{body}");
    }
}

/// A sub-coordinator whose child did not answer by the deadline says so in
/// its vote (`"cause":"timeout"`), so its coordinator counts a timeout.
#[test]
fn a_sub_coordinator_relays_its_childs_timeout() {
    let h = Host::new();
    let mut e = engine(&h, r#"{"node":"payment"}"#);
    let mut out = engine(&h, r#"{"node":"payment"}"#);
    let id = "0af7651916cd43dd8448eb211c80319c";
    h.request(
        1,
        "POST",
        "/pay",
        &[("x-txmesh-txn", id), ("x-txmesh-deadline", "1003000")],
    );
    e.on_request_headers(&h, 1);
    h.request(2, "POST", "/reserve", &[("x-txmesh-txn", id)]);
    h.cluster("inventory");
    out.on_request_headers(&h, 2);
    h.request(
        1,
        "POST",
        "/txmesh/prepare",
        &[("x-txmesh-txn", id), ("x-txmesh-deadline", "1003000")],
    );
    let (_, v) = e.on_request_headers(&h, 3);
    assert_eq!(v, Verdict::Pause);
    let calls = h.take_calls();
    answer(&h, &mut e, &calls, "local_app", vote("commit"));
    h.advance(3_000);
    e.on_tick(&h);
    let (ctx, status, _, body) = h.replies.borrow()[0].clone();
    assert_eq!((ctx, status), (3, 200));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["vote"], "abort");
    assert_eq!(v["participant"], "inventory");
    assert_eq!(v["cause"], "timeout", "{body}");
}
