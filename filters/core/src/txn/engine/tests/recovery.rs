//! In-doubt resolution, the leader election, the recovery loop.

use super::*;

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
