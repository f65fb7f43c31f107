//! Transactions under faults, on real processes: sidecars killed with SIGKILL
//! and restarted, etcd stopped and started, participants unreachable.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use txmesh_tests::{wait_for, Vote};

#[test]
fn root_killed_after_the_decision_redrives_phase_two_after_restart() {
    let mut shop = Shop::start(Vote::Commit, Vote::Commit);
    // Nobody can acknowledge phase 2 yet.
    for app in shop.apps() {
        app.set_down(true);
    }
    let r = shop.checkout();
    assert_eq!(r.status, 200, "{}", r.text());
    let txn = txn_of(&r);
    assert_eq!(decision(&shop.etcd, &txn).unwrap()["outcome"], "committed");
    let pending = format!("txmesh/pending/order/{txn}");
    assert!(
        shop.etcd.get(&pending).is_some(),
        "the root owns pending work"
    );
    // Phase 2 has tried every app (and failed) before the root dies.
    for app in shop.apps() {
        wait_for(10, &format!("a commit attempt at {}", app.name), || {
            (!app.server.requests_to("/txmesh/commit").is_empty()).then_some(())
        });
    }
    shop.order_sc.crash();
    for app in shop.apps() {
        app.set_down(false);
        assert_eq!(app.record(&txn).commits, 0);
    }
    shop.order_sc.restart();
    for app in shop.apps() {
        wait_for(
            20,
            &format!("{} commit after the root's restart", app.name),
            || (app.record(&txn).commits >= 1).then_some(()),
        );
        assert_eq!(app.record(&txn).aborts, 0);
    }
    wait_for(10, "pending key deleted", || {
        shop.etcd.get(&pending).is_none().then_some(())
    });
    assert!(
        shop.order_sc
            .log()
            .contains(&format!("txn {txn}: commit recorded")),
        "recovery logged"
    );
}

#[test]
fn root_killed_before_the_decision_participants_abort_via_cas() {
    let grace = 1000u64;
    let mut shop = Shop::start_with(
        Vote::Stall(Duration::from_millis(2500)),
        Vote::Commit,
        &json!({"in_doubt_grace_ms": grace, "recovery_interval_ms": 200}),
    );
    let begun = Instant::now();
    let url = shop.order_sc.inbound_url("/checkout");
    std::thread::scope(|s| {
        let client = s.spawn(move || txmesh_tests::Client::new().request("POST", &url, &[], b"{}"));
        // inventory and the order app have voted yes; payment is stalling.
        wait_for(5, "inventory prepared", || {
            shop.inventory
                .records()
                .values()
                .any(|r| r.voted.as_deref() == Some("commit"))
                .then_some(())
        });
        shop.order_sc.crash();
        assert!(
            client.join().unwrap().is_err(),
            "the client loses its connection"
        );
    });
    let txn = shop.inventory.records().keys().next().unwrap().clone();
    for app in [&shop.inventory, &shop.payment] {
        wait_for(
            10,
            &format!("{} aborted through the CAS path", app.name),
            || (app.record(&txn).aborts >= 1).then_some(()),
        );
        assert_eq!(app.record(&txn).commits, 0);
    }
    // Deadline (2 s) + grace + 2 s.
    let limit = Duration::from_millis(2000 + grace + 2000);
    assert!(
        begun.elapsed() < limit,
        "resolved after {:?}",
        begun.elapsed()
    );
    let d = decision(&shop.etcd, &txn).expect("abort recorded by a participant's sidecar");
    assert_eq!(d["outcome"], "aborted");
    assert_eq!(d["reason"], "in_doubt");
}

#[test]
fn a_participant_back_from_a_crash_learns_the_outcome_from_its_sidecar() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    shop.inventory.set_down(true);
    let r = shop.checkout();
    assert_eq!(r.status, 200);
    let txn = txn_of(&r);
    // The app comes back holding a prepared transaction: it asks its sidecar.
    let deadline = shop.inventory.server.requests_to("/work")[0]
        .header("x-txmesh-deadline")
        .unwrap();
    let s = shop.client.must(
        "GET",
        &shop
            .inventory_sc
            .inbound_url(&format!("/txmesh/txns/{txn}")),
        &[("x-txmesh-deadline", &deadline)],
        b"",
    );
    assert_eq!(s.json(), json!({"txn": txn, "outcome": "committed"}));
    shop.inventory.set_down(false);
    wait_for(10, "the root's retries reach it too", || {
        (shop.inventory.record(&txn).commits >= 1).then_some(())
    });
}

#[test]
fn etcd_stopped_and_started_mid_run_leaves_nothing_half_committed() {
    let mut shop = Shop::start(Vote::Commit, Vote::Commit);
    let mut outcomes = Vec::new();
    for i in 0..12 {
        if i == 4 {
            shop.etcd.stop();
        }
        if i == 8 {
            shop.etcd.start_again();
        }
        let r = shop.checkout();
        let txn = r.header("x-txmesh-txn").unwrap().to_string();
        let want = if (4..8).contains(&i) { 409 } else { 200 };
        assert_eq!(r.status, want, "checkout {i}: {}", r.text());
        outcomes.push((txn, r.status));
    }
    for (txn, status) in &outcomes {
        for app in shop.apps() {
            if *status == 200 {
                wait_for(10, "commit", || {
                    (app.record(txn).commits == 1).then_some(())
                });
            } else {
                wait_for(10, "abort", || (app.record(txn).aborts >= 1).then_some(()));
                assert_eq!(app.record(txn).commits, 0, "{} committed {txn}", app.name);
            }
        }
        let d = decision(&shop.etcd, txn);
        match status {
            200 => assert_eq!(d.unwrap()["outcome"], "committed"),
            _ => assert!(d.is_none_or(|d| d["outcome"] == "aborted")),
        }
    }
}

/// Duplicate and reordered control calls at a participant's sidecar (no
/// mTLS here: every caller counts as the coordinator; identities are
/// tests/it/security.rs's business): exactly what reaches the app, what the
/// sidecar answers, and what it keeps.
#[test]
fn duplicate_and_reordered_control_calls_reach_the_app_as_sent() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    let r = shop.checkout();
    let txn = txn_of(&r);
    wait_for(10, "commit", || {
        (shop.payment.record(&txn).commits == 1).then_some(())
    });
    let post = |path: &str, t: &str| {
        shop.client.must(
            "POST",
            &shop.payment_sc.inbound_url(path),
            &[("x-txmesh-txn", t)],
            b"",
        )
    };
    let reached = |path: &str, t: &str| {
        shop.payment
            .server
            .requests_to(path)
            .iter()
            .filter(|r| r.header("x-txmesh-txn").as_deref() == Some(t))
            .count()
    };
    let phase = |t: &str| {
        let l = shop.client.must(
            "GET",
            &shop.payment_sc.inbound_url("/txmesh/txns?state=all"),
            &[],
            b"",
        );
        l.json()["txns"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["txn"] == t))
            .map(|e| e["phase"].as_str().unwrap_or_default().to_string())
    };
    // A duplicate commit (a coordinator's retry): passed on once more — the
    // app's commit is idempotent by contract — and answered as the app did.
    assert_eq!(post("/txmesh/commit", &txn).status, 200);
    assert_eq!(reached("/txmesh/commit", &txn), 2);
    assert_eq!(phase(&txn), None, "a finished participant keeps no entry");
    // An abort overtaking its prepare: passed on to the app once; the late
    // prepare too, the app's vote relayed as is, and the sidecar keeps no
    // entry for a transaction its app refused.
    let other = "0af7651916cd43dd8448eb211c80319c";
    assert_eq!(post("/txmesh/abort", other).status, 200);
    assert_eq!(reached("/txmesh/abort", other), 1);
    let v = post("/txmesh/prepare", other).json();
    assert_eq!(v["vote"], "abort");
    assert_eq!(reached("/txmesh/prepare", other), 1);
    assert_eq!(reached("/txmesh/commit", other), 0);
    // Refused here, so never in doubt: its entry waits for the coordinator's
    // abort as aborted, not preparing (no in-doubt resolution, no record).
    assert_eq!(phase(other).as_deref(), Some("aborted"));
    let m = shop.payment_sc.scrape();
    assert_eq!(m.sum("txmesh_txn_internal_errors_total", &[]), 0.0);
}
