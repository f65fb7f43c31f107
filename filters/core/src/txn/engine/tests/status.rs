//! The status endpoint and the listing.

use super::*;

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
fn status_resolves_an_in_doubt_transaction_for_a_recovering_app() {
    let h = Host::new();
    let mut e = engine(&h, r#"{"node":"payment"}"#);
    // The app restarted holding a prepared txn whose deadline (carried by
    // its id) passed long ago; this sidecar never saw it.
    let old = TxnId::mint(990_000, [3; 16]);
    h.request(1, "GET", &format!("/txmesh/txns/{old}"), &[]);
    e.on_request_headers(&h, 3);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/range"]);
    answer(&h, &mut e, &calls, "etcd", ok(r#"{"header":{}}"#));
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"], "no decision: CAS abort");
    answer(&h, &mut e, &calls, "etcd", ok(CREATED));
    let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st), (3, 200));
    assert_eq!(body, format!(r#"{{"txn":"{old}","outcome":"aborted"}}"#));
    // Within its deadline, whatever the caller claims: no resolution, "unknown".
    let live = TxnId::mint(1_009_000, [4; 16]);
    let no_deadline = TxnId::parse(ID.as_bytes()).unwrap();
    for (txn, ctx) in [(live, 4), (no_deadline, 5)] {
        h.request(
            1,
            "GET",
            &format!("/txmesh/txns/{txn}"),
            &[("x-txmesh-deadline", "1")],
        );
        e.on_request_headers(&h, ctx);
        let calls = h.take_calls();
        answer(&h, &mut e, &calls, "etcd", ok(r#"{"header":{}}"#));
        assert!(
            h.take_calls().is_empty(),
            "{txn}: no CAS on the caller's deadline"
        );
        let (c, _, _, body) = h.replies.borrow().last().unwrap().clone();
        assert_eq!(c, ctx);
        assert_eq!(body, format!(r#"{{"txn":"{txn}","outcome":"unknown"}}"#));
    }
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
