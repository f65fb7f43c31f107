//! Decision-record retention and etcd out of space, on real Envoy and etcd
//! (issue 18, point 5; docs/protocol.md "Decision-record retention",
//! docs/operations.md "etcd out of space").

mod common;

use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use txmesh_tests::{wait_for, Client, Etcd, Vote};

const DECISIONS: &str = "txmesh/decisions/";
const PENDING: &str = "txmesh/pending/";

/// Checkouts through the shop with a short retention: every one commits,
/// the decision records expire behind them (at any moment no more records
/// than the checkouts of the last lease lifetime, plus those in flight),
/// all are gone after it, and etcd's in-use size stays flat under its
/// periodic compaction. `make test` runs 2,000; `make test-retention`
/// 50,000 (`TXMESH_RETENTION_TXNS`).
#[test]
fn decision_records_expire_and_etcd_stays_bounded() {
    let n: usize = std::env::var("TXMESH_RETENTION_TXNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let retention_ms = 2_000;
    let etcd = Etcd::start_with(&[
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=5s",
    ]);
    let cfg = json!({"decision_retention_ms": retention_ms});
    let shop = Shop::start_on(etcd, Vote::Commit, Vote::Commit, &cfg);
    // A lease lives at most its TTL past its last record; etcd revokes
    // expired leases within about a second.
    let ttl_s = txmesh_core::txn::etcd::Retention::new(retention_ms).ttl_s();
    let window = Duration::from_secs(ttl_s + 3);
    let clients = 8;
    let url = shop.order_sc.inbound_url("/checkout");
    let started = Instant::now();
    let done_at: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (url, done_at, next, failures) =
                (url.clone(), done_at.clone(), next.clone(), failures.clone());
            std::thread::spawn(move || {
                let client = Client::new();
                while next.fetch_add(1, Ordering::SeqCst) < n {
                    let r = client.request("POST", &url, &[], b"{}");
                    match r {
                        Ok(r) if r.status == 200 => {
                            done_at.lock().unwrap().push(started.elapsed());
                        }
                        Ok(r) => {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{}: {}", r.status, r.text()))
                        }
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    // Sample etcd while the checkouts run.
    let mut samples: Vec<(Duration, u64, u64)> = Vec::new();
    let mut in_use_early = None;
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(500));
        let at = started.elapsed();
        let (d, p) = (shop.etcd.count(DECISIONS), shop.etcd.count(PENDING));
        samples.push((at, d, p));
        if in_use_early.is_none() && done_at.lock().unwrap().len() >= n / 4 {
            in_use_early = Some(shop.etcd.metric("etcd_mvcc_db_total_size_in_use_in_bytes"));
        }
    }
    for w in workers {
        w.join().unwrap();
    }
    let took = started.elapsed();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let done_at = done_at.lock().unwrap().clone();
    assert_eq!(done_at.len(), n);
    // Bounded: each sample holds no more records than the checkouts
    // answered within one lease lifetime before it, plus those in flight;
    // no more pending-work keys than the checkouts of the last 2 s (phase
    // 2 and the batched unpend take a fraction of that).
    let answered_within = |at: Duration, window: Duration| {
        done_at
            .iter()
            .filter(|d| **d + window >= at && **d <= at + Duration::from_secs(1))
            .count() as u64
    };
    let mut worst = 0;
    for (at, decisions, pending) in &samples {
        let recent = answered_within(*at, window);
        assert!(
            *decisions <= recent + clients as u64,
            "at {at:?}: {decisions} decision records, but only {recent} checkouts in the last {window:?}"
        );
        let just_now = answered_within(*at, Duration::from_secs(2));
        assert!(
            *pending <= just_now + clients as u64,
            "at {at:?}: {pending} pending-work keys, {just_now} checkouts in the last 2 s"
        );
        worst = worst.max(*decisions);
    }
    // Every record expires once the load stops.
    let quiet = Instant::now();
    wait_for(ttl_s + 60, "every decision record expired", || {
        (shop.etcd.count(DECISIONS) == 0 && shop.etcd.count(PENDING) == 0).then_some(())
    });
    let drained = quiet.elapsed();
    // Flat: after a compaction cycle, etcd uses no more than it did a
    // quarter of the way in (plus slack for bbolt's page granularity).
    let early = in_use_early.expect("sampled a quarter of the way in");
    let revision = shop.etcd.revision();
    wait_for(60, "a periodic compaction past the run", || {
        (shop.etcd.metric("etcd_debugging_mvcc_compact_revision") >= revision as f64).then_some(())
    });
    let late = shop.etcd.metric("etcd_mvcc_db_total_size_in_use_in_bytes");
    eprintln!(
        "{n} checkouts in {:.1} s ({:.0}/s); at most {worst} decision records at once; \
         all expired {:.1} s after the load; etcd in use {:.0} KiB at 1/4, {:.0} KiB at the end",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        drained.as_secs_f64(),
        early / 1024.0,
        late / 1024.0
    );
    assert!(
        late <= early * 1.5 + 512.0 * 1024.0,
        "etcd in use grew from {early} to {late} bytes"
    );
}

/// A commit whose participant cannot be reached keeps its decision record
/// for as long as phase 2 goes on, far past the retention; once delivered,
/// the record expires like any other.
#[test]
fn a_record_outlives_its_retention_while_phase_two_is_owed() {
    let retention_ms = 1_000;
    let cfg = json!({"decision_retention_ms": retention_ms, "phase2_give_up_ms": 1_000});
    let shop = Shop::start_with(Vote::Commit, Vote::Commit, &cfg);
    shop.payment.set_down(true);
    let r = shop.checkout();
    assert_eq!(r.status, 200, "{}", r.text());
    let txn = txn_of(&r);
    let key = format!("{DECISIONS}{txn}");
    // Past the retention and the lease's whole lifetime, phase 2 to payment
    // still failing: the record stays (and the coordinator's pending key).
    let retention = txmesh_core::txn::etcd::Retention::new(retention_ms);
    let ttl = Duration::from_secs(retention.ttl_s());
    let stuck = || shop.order_sc.scrape().value("txmesh_txn_phase2_stuck", &[]);
    wait_for(30, "phase 2 counted stuck", || {
        (stuck() == 1.0).then_some(())
    });
    // The event that rules expiry out: the lease of the decision's time
    // bucket — the one any record written then went under — is gone, and
    // with it everything etcd kept under it.
    let decided_ms = decision(&shop.etcd, &txn).and_then(|d| d["time_ms"].as_u64());
    let lease = retention.lease_at(decided_ms.unwrap_or_default());
    wait_for(
        ttl.as_secs() + 30,
        "the decision bucket's lease to expire",
        || {
            let ttl_left = shop.etcd.client().lease_ttl(lease as i64).ok()?;
            ttl_left.is_none().then_some(())
        },
    );
    let record = decision(&shop.etcd, &txn);
    assert_eq!(
        record.as_ref().map(|d| d["outcome"].clone()),
        Some(json!("committed")),
        "record {key} expired while phase 2 is owed (and was replaced: {record:?})"
    );
    assert_eq!(shop.etcd.count(&format!("{PENDING}order/")), 1);
    assert_eq!(shop.payment.record(&txn).commits, 0);
    shop.payment.set_down(false);
    // Every job retrying it (the root's, a recovery re-drive, payment's own
    // in-doubt resolution) may land once the app is back: commit is
    // idempotent by contract.
    wait_for(30, "payment commits", || {
        (shop.payment.record(&txn).commits >= 1).then_some(())
    });
    assert_eq!(shop.payment.record(&txn).aborts, 0);
    let delivered = Instant::now();
    wait_for(
        ttl.as_secs() + 60,
        "the record expires once delivered",
        || shop.etcd.get(&key).is_none().then_some(()),
    );
    eprintln!(
        "record expired {:.1} s after phase 2 finished (lease TTL {} s)",
        delivered.elapsed().as_secs_f64(),
        ttl.as_secs()
    );
    assert_eq!(shop.etcd.count(PENDING), 0);
}

/// etcd out of space (its NOSPACE alarm): new transactions abort with a
/// 503 that names the cause, participants get their aborts, nobody commits;
/// once an operator frees space (docs/operations.md: compact, defragment,
/// disarm), transactions commit again and every one of them is resolved
/// and recorded.
#[test]
fn etcd_out_of_space_is_a_clear_503_and_everything_resolves_after_space_is_freed() {
    let etcd = Etcd::start_with(&["--quota-backend-bytes=8388608"]);
    let cfg = json!({"recovery_interval_ms": 200, "recovery_after_ms": 500});
    let shop = Shop::start_on(etcd, Vote::Commit, Vote::Commit, &cfg);
    let before = shop.checkout();
    assert_eq!(before.status, 200, "{}", before.text());
    wait_for(10, "the first checkout's phase 2 done", || {
        (shop.etcd.count(PENDING) == 0).then_some(())
    });
    // Fill etcd until it raises the alarm.
    let junk = vec![b'x'; 400 * 1024];
    let mut filled = 0;
    let etcd = shop.etcd.client();
    let refusal = loop {
        match etcd.put(&format!("junk/{filled}"), &junk) {
            Ok(()) => filled += 1,
            Err(e) => break e,
        }
        assert!(filled < 200, "etcd never ran out of space");
    };
    assert!(
        matches!(
            refusal,
            txmesh_etcd::Error::Refused {
                refusal: Some(txmesh_core::txn::etcd::Refusal::NoSpace),
                ..
            }
        ),
        "{refusal}"
    );
    assert_eq!(shop.etcd.alarms(), ["NOSPACE"]);
    let mut refused = Vec::new();
    for _ in 0..3 {
        let r = shop.checkout();
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("x-txmesh-outcome"), Some("aborted"));
        let v = r.json();
        assert_eq!(v["outcome"], "aborted", "{v}");
        let reason = v["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("etcd is out of space (NOSPACE alarm"),
            "{reason}"
        );
        refused.push(txn_of(&r));
    }
    for app in shop.apps() {
        for txn in &refused {
            wait_for(20, &format!("{} aborts {txn}", app.name), || {
                (app.record(txn).aborts == 1).then_some(())
            });
            assert_eq!(app.record(txn).commits, 0, "{} committed {txn}", app.name);
        }
    }
    let m = shop.order_sc.scrape();
    assert_eq!(
        m.value(
            "txmesh_txn_total",
            &[("outcome", "aborted"), ("reason", "etcd_nospace")]
        ),
        3.0
    );
    // The operator frees space.
    for i in 0..filled {
        shop.etcd.delete(&format!("junk/{i}"));
    }
    shop.etcd.free_space();
    assert!(shop.etcd.alarms().is_empty());
    let after = shop.checkout();
    assert_eq!(after.status, 200, "{}", after.text());
    // The abort records owed while etcd was full are written now; every
    // transaction's record agrees with every participant.
    for txn in &refused {
        wait_for(30, &format!("the abort record of {txn}"), || {
            decision(&shop.etcd, txn).filter(|d| d["outcome"] == "aborted")
        });
    }
    for txn in [txn_of(&before), txn_of(&after)] {
        assert_eq!(decision(&shop.etcd, &txn).unwrap()["outcome"], "committed");
        assert_committed_once(&shop.apps(), &txn);
    }
    wait_for(30, "no pending work left", || {
        (shop.etcd.count(PENDING) == 0).then_some(())
    });
}
