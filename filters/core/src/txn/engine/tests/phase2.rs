//! Phase 2: acknowledgements recorded, pending-work keys deleted together
//! (and finished commits' records put under the retention lease).

use super::*;

#[test]
fn acknowledgements_are_recorded_once_phase_two_has_to_retry() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let txn = both_voted_commit(&h, &mut inb, &mut out);
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
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    let (deleted, leased) = unpended(&calls[0].1);
    assert_eq!(deleted, [format!("txmesh/pending/order/{txn}")]);
    assert_eq!(leased.len(), 1);
}

#[test]
fn finished_transactions_pending_keys_are_deleted_together() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let first = commit_and_ack(&h, &mut inb, &mut out);
    inb.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"], "the first at once");
    let (deleted, leased) = unpended(&calls[0].1);
    assert_eq!(deleted, [format!("txmesh/pending/order/{first}")]);
    // Its record now expires with the retention lease of this time bucket.
    let lease = TxnConfig::parse(CFG.as_bytes())
        .unwrap()
        .retention()
        .lease_at(h.now_ms());
    assert_eq!(
        leased,
        [(format!("txmesh/decisions/{first}"), lease.to_string())]
    );
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
    let (deleted, leased) = unpended(&calls[0].1);
    assert_eq!(
        deleted,
        [
            format!("txmesh/pending/order/{b}"),
            format!("txmesh/pending/order/{c}")
        ]
    );
    let records: Vec<&str> = leased.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        records,
        [
            format!("txmesh/decisions/{b}"),
            format!("txmesh/decisions/{c}")
        ]
    );
    assert!(!inb.busy());
    h.advance(UNPEND_INTERVAL_MS);
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty(), "nothing left to delete");
}
