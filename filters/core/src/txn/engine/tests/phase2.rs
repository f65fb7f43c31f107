//! Phase 2: acknowledgements recorded, pending-work keys deleted together.

use super::*;

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
