//! The sub-coordinator and leaf control calls.

use super::*;

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
    // The sidecar asks its app itself, and relays the vote.
    h.request(1, "POST", "/txmesh/prepare", &[("x-txmesh-txn", id)]);
    assert_eq!(
        inb.on_request_headers(&h, 2),
        (Stream::Owned, Verdict::Pause)
    );
    assert_eq!(inb.table().get(&h, &txn).unwrap().phase, Phase::Preparing);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((st, body.as_str()), (200, r#"{"vote":"commit"}"#));
    h.request(1, "POST", "/txmesh/commit", &[("x-txmesh-txn", id)]);
    let (mut stream, v) = inb.on_request_headers(&h, 3);
    assert_eq!(
        (stream.clone(), v),
        (Stream::LeafFinish { txn }, Verdict::Continue)
    );
    h.status("200");
    inb.on_response_headers(&h, 3, &mut stream, true);
    assert!(inb.table().get(&h, &txn).is_none());
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

/// The call tree travels up on business answers and back down on control
/// calls: a sidecar that never saw the transaction (another replica, or a
/// restart) still cascades to the children its coordinator carried.
#[test]
fn the_call_tree_travels_up_and_back_down_to_any_replica() {
    let h = Host::new();
    let cfg = r#"{"node":"payment"}"#;
    let (mut inb, mut out) = (engine(&h, cfg), engine(&h, cfg));
    let txn = TxnId::mint(1_003_000, [9; 16]);
    let id = txn.to_string();
    // payment's app calls ledger (which reported its own child, audit).
    h.request(1, "POST", "/pay", &[("x-txmesh-txn", &id)]);
    let (mut business, _) = inb.on_request_headers(&h, 1);
    assert_eq!(business, Stream::Business { txn });
    h.request(2, "POST", "/debit", &[("x-txmesh-txn", &id)]);
    h.cluster("ledger");
    let (mut enlisted, _) = out.on_request_headers(&h, 2);
    h.status("200");
    h.response
        .borrow_mut()
        .push(("x-txmesh-children".into(), b"audit".to_vec()));
    out.on_response_headers(&h, 2, &mut enlisted, true);
    // payment's answer to its caller reports the tree below it.
    h.status("200");
    inb.on_response_headers(&h, 1, &mut business, true);
    assert_eq!(
        h.response_header("x-txmesh-children").as_deref(),
        Some(&b"ledger(audit)"[..])
    );
    // Another replica of payment (its own table) gets the prepare with the
    // tree: it prepares ledger (carrying audit) and its app.
    let other = Host::new();
    let mut replica = engine(&other, cfg);
    other.request(
        1,
        "POST",
        "/txmesh/prepare",
        &[
            ("x-txmesh-txn", &id),
            ("x-txmesh-children", "ledger(audit)"),
        ],
    );
    assert_eq!(replica.on_request_headers(&other, 3).0, Stream::Owned);
    let calls = other.take_calls();
    assert_eq!(
        paths(&calls),
        ["ledger /txmesh/prepare", "local_app /txmesh/prepare"]
    );
    let (_, to_ledger) = calls.iter().find(|(_, c)| c.cluster == "ledger").unwrap();
    assert!(to_ledger
        .headers
        .contains(&("x-txmesh-children".to_string(), "audit".to_string())));
    answer(&other, &mut replica, &calls, "ledger", vote("commit"));
    answer(&other, &mut replica, &calls, "local_app", vote("commit"));
    let (_, st, _, body) = other.replies.borrow().last().unwrap().clone();
    assert_eq!((st, body.as_str()), (200, r#"{"vote":"commit"}"#));
    // A third, restarted one gets the commit: it tells ledger and its app.
    let fresh = Host::new();
    let mut restarted = engine(&fresh, cfg);
    fresh.request(
        1,
        "POST",
        "/txmesh/commit",
        &[
            ("x-txmesh-txn", &id),
            ("x-txmesh-children", "ledger(audit)"),
        ],
    );
    restarted.on_request_headers(&fresh, 4);
    let calls = fresh.take_calls();
    assert_eq!(
        paths(&calls),
        ["ledger /txmesh/commit", "local_app /txmesh/commit"]
    );
    // A malformed tree is a 400, never a guess.
    fresh.request(
        1,
        "POST",
        "/txmesh/prepare",
        &[("x-txmesh-txn", &id), ("x-txmesh-children", "ledger(")],
    );
    restarted.on_request_headers(&fresh, 5);
    let (ctx, st, _, body) = fresh.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st), (5, 400), "{body}");
}

/// A read-only vote leaves nothing to resolve: the leaf's entry goes at
/// once, so no in-doubt abort can contradict the commit its client was told.
#[test]
fn a_read_only_leaf_forgets_the_transaction_at_once() {
    let h = Host::new();
    let mut inb = engine(&h, r#"{"node":"catalog"}"#);
    let txn = TxnId::mint(1_002_000, [5; 16]);
    let id = txn.to_string();
    h.request(1, "GET", "/price", &[("x-txmesh-txn", &id)]);
    inb.on_request_headers(&h, 1);
    h.request(1, "POST", "/txmesh/prepare", &[("x-txmesh-txn", &id)]);
    inb.on_request_headers(&h, 2);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "local_app", vote("readonly"));
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((st, body.as_str()), (200, r#"{"vote":"readonly"}"#));
    assert!(inb.table().get(&h, &txn).is_none());
    // Long past the deadline and the grace: nothing to resolve, no etcd call.
    h.advance(10_000);
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty());
}

/// A leaf whose app votes no is not in doubt: the decision can only be
/// abort. Its entry is kept (for the coordinator's abort) but no longer
/// preparing, so it is never resolved from etcd.
#[test]
fn a_leaf_that_voted_no_is_never_resolved_in_doubt() {
    let h = Host::new();
    let mut inb = engine(&h, r#"{"node":"inventory"}"#);
    let txn = TxnId::mint(1_002_000, [7; 16]);
    let id = txn.to_string();
    h.request(1, "POST", "/reserve", &[("x-txmesh-txn", &id)]);
    inb.on_request_headers(&h, 1);
    h.request(1, "POST", "/txmesh/prepare", &[("x-txmesh-txn", &id)]);
    inb.on_request_headers(&h, 2);
    let calls = h.take_calls();
    answer(
        &h,
        &mut inb,
        &calls,
        "local_app",
        ok(r#"{"vote":"abort","reason":"out_of_stock"}"#),
    );
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!(st, 200);
    assert!(body.contains(r#""vote":"abort""#), "{body}");
    assert_eq!(inb.table().get(&h, &txn).unwrap().phase, Phase::Aborted);
    // Long past the deadline and the grace: nothing to resolve, no etcd call.
    h.advance(10_000);
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty());
}

/// Commit and abort only from the participant's coordinators (the mTLS
/// identities that called its app in the transaction), unless etcd holds the
/// same decision; an abort nobody here can tie to a decision is acknowledged
/// without reaching the app.
#[test]
fn control_calls_from_other_identities_need_the_recorded_decision() {
    let h = Host::new();
    let mut inb = engine(&h, r#"{"node":"inventory"}"#);
    let txn = TxnId::mint(1_005_000, [6; 16]);
    let id = txn.to_string();
    let peer = |h: &Host, who: &str| {
        h.base.properties.borrow_mut().insert(
            "connection.uri_san_peer_certificate".into(),
            format!("spiffe://shop/{who}").into_bytes(),
        );
    };
    // order calls inventory inside the transaction: order is its coordinator.
    h.request(1, "POST", "/reserve", &[("x-txmesh-txn", &id)]);
    peer(&h, "order");
    inb.on_request_headers(&h, 1);
    assert_eq!(
        inb.table().get(&h, &txn).unwrap().parents,
        ["spiffe://shop/order"]
    );
    // payment's commit: etcd holds no decision -> 403, the app never asked.
    h.request(1, "POST", "/txmesh/commit", &[("x-txmesh-txn", &id)]);
    peer(&h, "payment");
    assert_eq!(
        inb.on_request_headers(&h, 2),
        (Stream::Owned, Verdict::Pause)
    );
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/range"]);
    answer(&h, &mut inb, &calls, "etcd", ok(r#"{"header":{}}"#));
    let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st), (2, 403), "{body}");
    assert!(
        body.contains(r#""principal":"spiffe://shop/payment""#),
        "{body}"
    );
    assert!(h.take_calls().is_empty(), "nothing reached the app");
    // The same commit once etcd holds it: applied.
    h.request(1, "POST", "/txmesh/commit", &[("x-txmesh-txn", &id)]);
    peer(&h, "payment");
    inb.on_request_headers(&h, 3);
    let calls = h.take_calls();
    let found = format!(
        r#"{{"header":{{}},"kvs":[{{"value":"{}"}}]}}"#,
        crate::b64::encode(br#"{"outcome":"committed"}"#)
    );
    answer(&h, &mut inb, &calls, "etcd", ok(&found));
    assert_eq!(paths(&h.take_calls()), ["local_app /txmesh/commit"]);
    // order's own abort of another transaction this sidecar never saw, with
    // no decision recorded: acknowledged, the app untouched.
    let other = TxnId::mint(1_005_000, [7; 16]).to_string();
    h.request(1, "POST", "/txmesh/abort", &[("x-txmesh-txn", &other)]);
    peer(&h, "order");
    inb.on_request_headers(&h, 4);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", ok(r#"{"header":{}}"#));
    let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!((ctx, st), (4, 200), "{body}");
    assert!(body.contains(r#""applied":false"#), "{body}");
    assert!(h.take_calls().is_empty());
}
