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
    let txn = both_voted_commit(&h, &mut inb, &mut out);
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
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    let (deleted, _) = unpended(&calls[0].1);
    assert_eq!(
        deleted,
        [format!("txmesh/pending/order/{txn}")],
        "pending key removed when done"
    );
    assert!(!fresh.busy());
}

/// etcd unreachable past `phase2_give_up_ms`: in-doubt resolution is never
/// dropped — it is counted stuck, listed, retried, and resolves once etcd
/// answers.
#[test]
fn in_doubt_resolution_outlasts_the_give_up_time_and_is_counted_stuck() {
    let h = Host::new();
    let cfg = r#"{"node":"inventory","in_doubt_grace_ms":2000,"phase2_give_up_ms":1000}"#;
    let mut e = engine(&h, cfg);
    e.define_metrics(&h);
    let txn = prepared_leaf(&h, &mut e);
    h.advance(5_000);
    e.on_tick(&h);
    // etcd is away: every CAS attempt fails, for far longer than the give-up time.
    for _ in 0..40 {
        for (t, _) in h.take_calls() {
            e.on_callout(&h, t, status(503));
        }
        h.advance(500);
        e.on_tick(&h);
    }
    assert_eq!(h.base.counter("txmesh_txn_phase2_stuck"), Some(1));
    assert!(e.table().get(&h, &txn).is_some(), "never dropped");
    h.request(1, "GET", "/txmesh/txns?state=stuck", &[]);
    e.on_request_headers(&h, 7);
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!(st, 200);
    assert!(
        body.contains(&txn.to_string()) && body.contains(r#""stuck":true"#),
        "{body}"
    );
    // etcd is back: the CAS lands, the abort is delivered, the gauge drops.
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    answer(&h, &mut e, &calls, "etcd", ok(CREATED));
    e.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["local_app /txmesh/abort"]);
    answer(&h, &mut e, &calls, "local_app", ok(""));
    e.on_tick(&h);
    assert!(e.table().get(&h, &txn).is_none());
    assert_eq!(h.base.counter("txmesh_txn_phase2_stuck"), Some(0));
}

/// More pending-work keys than one scan reads: the loop pages on, so a page
/// of stuck ones cannot starve the rest.
#[test]
fn recovery_pages_through_every_pending_key() {
    let h = Host::new();
    let mut e = engine(&h, r#"{"node":"order"}"#);
    e.on_tick(&h);
    let scan = h.take_all_calls();
    assert_eq!(paths(&scan), ["etcd /v3/kv/range"]);
    let first: serde_json::Value = serde_json::from_slice(&scan[0].1.body).unwrap();
    assert_eq!(
        crate::b64::decode(first["key"].as_str().unwrap()).unwrap(),
        b"txmesh/pending/order/"
    );
    let last_key = crate::b64::encode(b"txmesh/pending/order/ffff");
    let page =
        format!(r#"{{"header":{{}},"kvs":[{{"key":"{last_key}","value":"e30="}}],"more":true}}"#);
    e.on_callout(&h, scan[0].0, ok(&page));
    h.advance(1_000);
    e.on_tick(&h);
    let scan = h.take_all_calls();
    let next: serde_json::Value = serde_json::from_slice(&scan[0].1.body).unwrap();
    assert_eq!(
        crate::b64::decode(next["key"].as_str().unwrap()).unwrap(),
        b"txmesh/pending/order/ffff\0",
        "the next scan starts after the last key"
    );
    // The end of the prefix: back to the start.
    e.on_callout(&h, scan[0].0, ok(r#"{"header":{},"kvs":[]}"#));
    h.advance(1_000);
    e.on_tick(&h);
    let scan = h.take_all_calls();
    let again: serde_json::Value = serde_json::from_slice(&scan[0].1.body).unwrap();
    assert_eq!(
        crate::b64::decode(again["key"].as_str().unwrap()).unwrap(),
        b"txmesh/pending/order/"
    );
}

/// The elected engine grants the retention lease of the current time
/// bucket, then the next one's half-way through the current bucket (it
/// looks every tick); a grant someone else made first counts; a failed one
/// is asked again a second later.
#[test]
fn the_leader_grants_retention_leases_ahead_of_time() {
    let h = Host::new();
    let mut e = engine(&h, r#"{"node":"order","decision_retention_ms":80000}"#);
    let r = TxnConfig::parse(br#"{"decision_retention_ms":80000}"#)
        .unwrap()
        .retention();
    assert_eq!(r.bucket_ms, 10_000);
    // Start at the beginning of a bucket.
    h.advance(r.bucket_ms - h.now_ms() % r.bucket_ms);
    let grants = |h: &Host| -> Vec<(u32, Callout)> {
        h.take_every_call()
            .into_iter()
            .filter(|(_, c)| c.path == "/v3/lease/grant")
            .collect()
    };
    let body = |c: &Callout| -> (String, String) {
        let v: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
        (
            v["ID"].as_str().unwrap().into(),
            v["TTL"].as_str().unwrap().into(),
        )
    };
    e.on_tick(&h);
    let g = grants(&h);
    assert_eq!(g.len(), 1);
    let now_bucket = r.bucket(h.now_ms());
    assert_eq!(
        body(&g[0].1),
        (r.lease_id(now_bucket).to_string(), "100".to_string())
    );
    // Another sidecar granted it first: as good.
    let exists = CalloutResponse {
        status: Some(400),
        body: br#"{"error":"etcdserver: lease already exists","code":9}"#.to_vec(),
    };
    e.on_callout(&h, g[0].0, exists);
    assert!(grants(&h).is_empty(), "the next bucket is not due yet");
    h.advance(r.bucket_ms / 2);
    e.on_tick(&h);
    let g = grants(&h);
    assert_eq!(body(&g[0].1).0, r.lease_id(now_bucket + 1).to_string());
    // Refused (etcd down): asked again a second later, not at every tick.
    e.on_callout(&h, g[0].0, status(503));
    h.advance(TICK_MS);
    e.on_tick(&h);
    assert!(grants(&h).is_empty());
    h.advance(1_000);
    e.on_tick(&h);
    let g = grants(&h);
    assert_eq!(body(&g[0].1).0, r.lease_id(now_bucket + 1).to_string());
    // Refused again: still one warning for the outage, not one a second.
    e.on_callout(&h, g[0].0, status(503));
    let warned = |h: &Host| {
        h.logs
            .borrow()
            .iter()
            .filter(|l| l.contains("not granted"))
            .count()
    };
    assert_eq!(warned(&h), 1);
    h.advance(1_000);
    e.on_tick(&h);
    let g = grants(&h);
    e.on_callout(&h, g[0].0, ok(r#"{"header":{},"ID":"1","TTL":"100"}"#));
    h.advance(1_000);
    e.on_tick(&h);
    assert!(grants(&h).is_empty(), "both buckets granted");
}
