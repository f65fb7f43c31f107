//! txmesh_txn.wasm on real Envoy sidecars (separate processes, --concurrency 2),
//! real etcd, real participant HTTP servers.

mod common;

use common::*;
use serde_json::json;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use txmesh_tests::envoy::Envoy;
use txmesh_tests::{wait_for, Client, Downstream, Etcd, Filter, Latch, Sidecar, TxnApp, Vote};

#[test]
fn three_participants_commit() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    let r = shop.checkout();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    let txn = txn_of(&r);
    assert_eq!(txn.len(), 32);
    // etcd holds the commit decision, naming every participant.
    let d = decision(&shop.etcd, &txn).expect("decision in etcd");
    assert_eq!(d["outcome"], "committed");
    assert_eq!(d["coordinator"], "order");
    let mut names: Vec<String> = d["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["inventory", "order", "payment"]);
    // Each participant: one business call, exactly one prepare, then one commit.
    assert_committed_once(&shop.apps(), &txn);
    // The order app saw the transaction headers the sidecar minted.
    let first = &shop.order.server.requests_to("/checkout")[0];
    assert_eq!(first.header("x-txmesh-txn").as_deref(), Some(txn.as_str()));
    assert!(first
        .header("x-txmesh-deadline")
        .unwrap()
        .parse::<u64>()
        .is_ok());
    // And the status endpoint knows.
    let s = shop.client.must(
        "GET",
        &shop.order_sc.inbound_url(&format!("/txmesh/txns/{txn}")),
        &[],
        b"",
    );
    assert_eq!(s.json(), json!({"txn": txn, "outcome": "committed"}));
    // Phase 2 went out from the root context (it outlives the client's
    // stream) without a failed dispatch.
    let log = shop.order_sc.log();
    assert!(!log.contains("dispatch to"), "{log}");
}

#[test]
fn one_no_vote_aborts_everyone_and_names_who() {
    let shop = Shop::start(Vote::Commit, Vote::No("out_of_stock".into()));
    let r = shop.checkout();
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("aborted"));
    let v = r.json();
    assert_eq!(v["outcome"], "aborted");
    assert_eq!(v["reason"], "out_of_stock");
    assert_eq!(v["participant"], "inventory");
    let txn = v["txn"].as_str().unwrap().to_string();
    for app in shop.apps() {
        wait_for(10, &format!("{} abort", app.name), || {
            (app.record(&txn).aborts >= 1).then_some(())
        });
        assert_eq!(app.record(&txn).commits, 0, "{} got a commit", app.name);
    }
    // Someone voted yes, so the abort is recorded for in-doubt participants.
    wait_for(10, "abort record", || {
        decision(&shop.etcd, &txn).filter(|d| d["outcome"] == "aborted")
    });
}

#[test]
fn a_stalled_participant_aborts_at_the_deadline() {
    let shop = Shop::start(Vote::Stall(Duration::from_millis(3500)), Vote::Commit);
    let t = std::time::Instant::now();
    let r = shop.checkout();
    let took = t.elapsed();
    assert_eq!(r.status, 409, "{}", r.text());
    let v = r.json();
    assert_eq!(v["participant"], "payment");
    assert_eq!(v["reason"], "no answer before the deadline");
    assert!(
        took < Duration::from_millis(3400),
        "answered after {took:?}: the deadline is 2 s"
    );
    let txn = v["txn"].as_str().unwrap().to_string();
    for app in shop.apps() {
        wait_for(15, &format!("{} abort", app.name), || {
            (app.record(&txn).aborts >= 1).then_some(())
        });
        assert_eq!(app.record(&txn).commits, 0);
    }
}

#[test]
fn app_error_aborts_without_prepare() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    shop.order.set_business_status(500);
    let r = shop.checkout();
    assert_eq!(r.status, 409, "{}", r.text());
    let v = r.json();
    assert_eq!(v["reason"], "the app answered 500");
    assert_eq!(v["participant"], "order");
    let txn = v["txn"].as_str().unwrap().to_string();
    for app in shop.apps() {
        wait_for(10, &format!("{} abort", app.name), || {
            (app.record(&txn).aborts >= 1).then_some(())
        });
        let rec = app.record(&txn);
        assert_eq!((rec.prepares, rec.commits), (0, 0), "{}: {rec:?}", app.name);
    }
    assert_eq!(
        decision(&shop.etcd, &txn),
        None,
        "presumed abort: nothing written"
    );
}

#[test]
fn an_app_400_reaches_the_client_and_the_transaction_aborts() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    shop.order.set_business_status(400);
    let r = shop.checkout();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("aborted"));
    assert_eq!(r.json()["service"], "order", "the app's own body");
    let txn = txn_of(&r);
    for app in shop.apps() {
        wait_for(10, &format!("{} abort", app.name), || {
            (app.record(&txn).aborts >= 1).then_some(())
        });
        assert_eq!(app.record(&txn).prepares, 0);
    }
}

#[test]
fn a_readonly_voter_gets_no_phase_two() {
    let shop = Shop::start(Vote::Commit, Vote::ReadOnly);
    let r = shop.checkout();
    assert_eq!(r.status, 200, "{}", r.text());
    let txn = txn_of(&r);
    for app in [&shop.order, &shop.payment] {
        wait_for(10, &format!("{} commit", app.name), || {
            (app.record(&txn).commits == 1).then_some(())
        });
    }
    // The root's phase 2 is over once its pending-work key is gone: a job
    // ends only when every target it sent to has acknowledged, so a
    // (wrong) commit to inventory would have arrived by then.
    wait_for(10, "the root's phase 2 done", || {
        shop.etcd
            .get(&format!("txmesh/pending/order/{txn}"))
            .is_none()
            .then_some(())
    });
    let rec = shop.inventory.record(&txn);
    assert_eq!(
        (rec.prepares, rec.commits, rec.aborts),
        (1, 0, 0),
        "{rec:?}"
    );
}

#[test]
fn malformed_ids_and_deadlines_are_rejected_and_never_forwarded() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    let past = "1000";
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("x-txmesh-txn", "0AF7651916CD43DD8448EB211C80319C")],
            "invalid x-txmesh-txn",
        ),
        (
            &[("x-txmesh-txn", "00000000000000000000000000000000")],
            "must not be all zero",
        ),
        (&[("x-txmesh-txn", "abc")], "32 lowercase hex"),
        (
            &[("baggage", "txmesh.txn=nothex")],
            "invalid baggage member txmesh.txn",
        ),
        (&[("x-txmesh-deadline", past)], "is in the past"),
        (
            &[("x-txmesh-deadline", "tomorrow")],
            "invalid x-txmesh-deadline",
        ),
    ];
    for (headers, msg) in cases {
        for url in [
            shop.order_sc.inbound_url("/checkout"),
            shop.order_sc.outbound_url("/work"),
        ] {
            let mut h = headers.to_vec();
            h.push(("host", "payment"));
            // A begin on the inbound side needs no id; outbound needs one for the deadline case.
            if url.contains(&shop.order_sc.ports.outbound.to_string())
                && h.iter()
                    .all(|(k, _)| *k != "x-txmesh-txn" && *k != "baggage")
            {
                h.push(("x-txmesh-txn", "0af7651916cd43dd8448eb211c80319c"));
            }
            let r = shop.client.must("POST", &url, &h, b"{}");
            assert_eq!(r.status, 400, "{url} {h:?}: {}", r.text());
            let err = r.json()["error"].as_str().unwrap().to_string();
            assert!(err.contains(msg), "{url} {h:?}: {err}");
        }
    }
    // Nothing reached any app.
    for app in shop.apps() {
        assert_eq!(app.server.count(), 0, "{} saw a rejected request", app.name);
    }
    // Bytes that are not UTF-8 in the id: read as bytes, rejected, no crash.
    let raw = raw_request(
        shop.order_sc.ports.inbound,
        b"POST /checkout HTTP/1.1\r\nhost: x\r\nx-txmesh-txn: \xff\xfe0af7651916cd43dd8448eb211c8031\r\ncontent-length: 0\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // The sidecar still works afterwards.
    assert_eq!(shop.checkout().status, 200);
    assert_eq!(shop.order.server.requests_to("/checkout").len(), 1);
    for app in shop.apps() {
        wait_for(10, "phase 2", || (app.server.count() == 3).then_some(()));
    }
}

#[test]
fn etcd_down_aborts_new_transactions_and_nobody_commits() {
    let mut shop = Shop::start(Vote::Commit, Vote::Commit);
    shop.etcd.stop();
    for _ in 0..3 {
        let r = shop.checkout();
        assert_eq!(r.status, 409, "{}", r.text());
        let v = r.json();
        assert_eq!(v["outcome"], "aborted");
        assert!(
            v["reason"].as_str().unwrap().contains("etcd unavailable"),
            "{v}"
        );
    }
    // Every app gets its abort; a commit after it would be recorded by the
    // app as an error (and none can come: no record could be written).
    for app in shop.apps() {
        for txn in app.records().keys() {
            wait_for(10, &format!("{} aborts {txn}", app.name), || {
                (app.record(txn).aborts >= 1).then_some(())
            });
            assert_eq!(
                app.record(txn).commits,
                0,
                "{} committed {txn} without a durable decision",
                app.name
            );
        }
    }
}

#[test]
fn status_of_unknown_and_bad_ids() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    let url = |p: &str| shop.order_sc.inbound_url(p);
    let r = shop.client.must(
        "GET",
        &url("/txmesh/txns/0af7651916cd43dd8448eb211c80319c"),
        &[],
        b"",
    );
    assert_eq!(
        r.json(),
        json!({"txn": "0af7651916cd43dd8448eb211c80319c", "outcome": "unknown"})
    );
    let r = shop.client.must("GET", &url("/txmesh/txns/nope"), &[], b"");
    assert_eq!(r.status, 400);
    // An abort decision written by someone else is reported.
    shop.etcd.put(
        "txmesh/decisions/1af7651916cd43dd8448eb211c80319c",
        r#"{"outcome":"aborted"}"#,
    );
    let r = shop.client.must(
        "GET",
        &url("/txmesh/txns/1af7651916cd43dd8448eb211c80319c"),
        &[],
        b"",
    );
    assert_eq!(r.json()["outcome"], "aborted");
}

/// A status query cannot abort a live transaction by claiming its deadline
/// has passed: a sidecar that does not know the transaction (another pod's,
/// or one that restarted) takes the deadline from the id the root minted,
/// never from the caller's `x-txmesh-deadline`.
#[test]
fn a_forged_status_query_cannot_abort_a_live_transaction() {
    let held = Latch::default();
    let shop = Shop::start_with(
        Vote::Until(held.clone()),
        Vote::Commit,
        &json!({"default_timeout_ms": 15_000}),
    );
    let bystander_app = TxnApp::start("bystander", Vote::Commit);
    let bystander = sidecar("bystander", &bystander_app, shop.etcd.addr()).start();
    std::thread::scope(|s| {
        let checkout = s.spawn(|| shop.checkout());
        // payment did its work and will hold its prepare until the latch
        // opens: the transaction is live and cannot decide before that.
        let txn = wait_for(10, "payment's business call", || {
            shop.payment.txn_where(|r| r.business == 1)
        });
        let r = shop.client.must(
            "GET",
            &bystander.inbound_url(&format!("/txmesh/txns/{txn}")),
            &[("x-txmesh-deadline", "1")],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({"txn": txn, "outcome": "unknown"}));
        assert_eq!(
            decision(&shop.etcd, &txn),
            None,
            "a decision on the caller's word"
        );
        held.open();
        let r = checkout.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
        assert_eq!(decision(&shop.etcd, &txn).unwrap()["outcome"], "committed");
    });
}

/// A -> B -> C: B's sidecar is a sub-coordinator for C.
struct Chain {
    etcd: Etcd,
    a: TxnApp,
    b: TxnApp,
    c: TxnApp,
    a_sc: Envoy,
    b_sc: Envoy,
    c_sc: Envoy,
}

impl Chain {
    fn start(c_vote: Vote) -> Self {
        let etcd = Etcd::start();
        let a_calls = Arc::new(RwLock::new(Vec::new()));
        let b_calls = Arc::new(RwLock::new(Vec::new()));
        let a = TxnApp::calling("a", Vote::Commit, a_calls.clone());
        let b = TxnApp::calling("b", Vote::Commit, b_calls.clone());
        let c = TxnApp::start("c", c_vote);
        let c_sc = sidecar("c", &c, etcd.addr()).start();
        let b_sc = sidecar("b", &b, etcd.addr())
            .route("c", &[c_sc.inbound_addr()])
            .start();
        let a_sc = sidecar("a", &a, etcd.addr())
            .route("b", &[b_sc.inbound_addr()])
            .start();
        *a_calls.write().unwrap() = Downstream::each(&["b"], a_sc.ports.outbound);
        *b_calls.write().unwrap() = Downstream::each(&["c"], b_sc.ports.outbound);
        Chain {
            etcd,
            a,
            b,
            c,
            a_sc,
            b_sc,
            c_sc,
        }
    }
}

#[test]
fn depth_three_commits() {
    let chain = Chain::start(Vote::Commit);
    let r = Client::new().must("POST", &chain.a_sc.inbound_url("/checkout"), &[], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    let txn = txn_of(&r);
    assert_committed_once(&[&chain.a, &chain.b, &chain.c], &txn);
    // The root knows only its direct participant; b answered for c.
    let d = decision(&chain.etcd, &txn).unwrap();
    assert_eq!(d["participants"], json!(["b", "a"]));
}

#[test]
fn depth_three_aborts_when_the_leaf_says_no() {
    let chain = Chain::start(Vote::No("insufficient_funds".into()));
    let r = Client::new().must("POST", &chain.a_sc.inbound_url("/checkout"), &[], b"{}");
    assert_eq!(r.status, 409, "{}", r.text());
    let v = r.json();
    assert_eq!(v["reason"], "insufficient_funds");
    assert_eq!(
        v["participant"], "c",
        "the sub-coordinator passes up who said no"
    );
    let txn = v["txn"].as_str().unwrap().to_string();
    for app in [&chain.a, &chain.b, &chain.c] {
        wait_for(10, &format!("{} abort", app.name), || {
            (app.record(&txn).aborts >= 1).then_some(())
        });
        assert_eq!(app.record(&txn).commits, 0, "{}", app.name);
    }
}

/// etcd goes away for longer than `phase2_give_up_ms` while participants
/// are prepared and their coordinator is gone, and the participant apps
/// never ask. In-doubt resolution goes on (`txmesh_txn_phase2_stuck` counts
/// it) and, once etcd is back, every participant gets its outcome: abort,
/// recorded. `TXMESH_OUTAGE_S` sets the outage: 6 s here (past a 2 s
/// give-up); `make test-outage` runs 90 s past the default 60 s.
#[test]
fn in_doubt_participants_resolve_after_an_etcd_outage_longer_than_give_up() {
    let outage: u64 = std::env::var("TXMESH_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let give_up_ms = if outage >= 90 { 60_000 } else { 2_000 };
    let cfg = json!({
        "phase2_give_up_ms": give_up_ms,
        "in_doubt_grace_ms": 500,
        "recovery_interval_ms": 200,
    });
    let mut shop = Shop::start_with(Vote::Commit, Vote::Commit, &cfg);
    let held = Latch::default();
    shop.order.set_vote(Vote::Until(held.clone()));
    let n = 5;
    let url = shop.order_sc.inbound_url("/checkout");
    let burst: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || Client::new().request("POST", &url, &[], b"{}"))
        })
        .collect();
    let prepared = |app: &TxnApp| app.records().values().filter(|r| r.prepares == 1).count();
    wait_for(
        10,
        "every checkout prepared at payment and inventory",
        || (prepared(&shop.payment) == n && prepared(&shop.inventory) == n).then_some(()),
    );
    // etcd goes, then the coordinator: payment and inventory are in doubt.
    shop.etcd.stop();
    let down_at = std::time::Instant::now();
    shop.order_sc.crash();
    held.open();
    for b in burst {
        let _ = b.join();
    }
    let stuck = |sc: &Envoy| sc.scrape().value("txmesh_txn_phase2_stuck", &[]);
    wait_for(
        outage + give_up_ms / 1000 + 30,
        "in-doubt resolution counted stuck",
        || {
            (stuck(&shop.payment_sc) == n as f64 && stuck(&shop.inventory_sc) == n as f64)
                .then_some(())
        },
    );
    // ... and listed for operators (`txmeshctl txns --state stuck`).
    let listed = shop.client.must(
        "GET",
        &shop.payment_sc.inbound_url("/txmesh/txns?state=stuck"),
        &[],
        b"",
    );
    assert_eq!(
        listed.json()["txns"].as_array().map(Vec::len),
        Some(n),
        "{}",
        listed.text()
    );
    std::thread::sleep(Duration::from_secs(outage).saturating_sub(down_at.elapsed()));
    shop.etcd.start_again();
    let back_at = std::time::Instant::now();
    for app in [&shop.payment, &shop.inventory] {
        for txn in app.records().keys() {
            wait_for(120, &format!("{} resolves {txn}", app.name), || {
                (app.record(txn).aborts == 1).then_some(())
            });
            let r = app.record(txn);
            assert_eq!((r.prepares, r.commits, r.aborts), (1, 0, 1), "{}", app.name);
            assert_eq!(decision(&shop.etcd, txn).unwrap()["outcome"], "aborted");
        }
    }
    eprintln!(
        "{n} in-doubt transactions resolved {:.1} s after etcd came back ({} s outage, give-up {} s)",
        back_at.elapsed().as_secs_f64(),
        outage,
        give_up_ms / 1000
    );
    wait_for(30, "stuck back to zero", || {
        (stuck(&shop.payment_sc) == 0.0 && stuck(&shop.inventory_sc) == 0.0).then_some(())
    });
}

/// Everyone votes read-only: the client is told committed, and no
/// read-only voter's sidecar keeps anything to resolve — so nothing can later
/// record "aborted" for it.
#[test]
fn an_all_read_only_transaction_leaves_nothing_to_contradict_its_commit() {
    let chain = Chain::start(Vote::ReadOnly);
    chain.a.set_vote(Vote::ReadOnly);
    chain.b.set_vote(Vote::ReadOnly);
    let r = Client::new().must("POST", &chain.a_sc.inbound_url("/checkout"), &[], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    let txn = txn_of(&r);
    // The event that rules a later in-doubt abort out: no sidecar holds
    // the transaction any more.
    let holds = |sc: &Envoy| {
        let l = Client::new().must("GET", &sc.inbound_url("/txmesh/txns"), &[], b"");
        l.text().contains(&txn)
    };
    wait_for(10, "no sidecar holds the read-only transaction", || {
        (!holds(&chain.a_sc) && !holds(&chain.b_sc) && !holds(&chain.c_sc)).then_some(())
    });
    assert_eq!(
        decision(&chain.etcd, &txn),
        None,
        "no record contradicts the commit"
    );
    for app in [&chain.a, &chain.b, &chain.c] {
        let rec = app.record(&txn);
        assert_eq!(
            (rec.prepares, rec.commits, rec.aborts),
            (1, 0, 0),
            "{}",
            app.name
        );
    }
}

/// A one-phase commit still on its way to the app past the deadline and the
/// grace: a status query at the root's sidecar (the app asking after a
/// restart) answers "active" — resolving it would record abort under a
/// commit the app then applies.
#[test]
fn a_late_one_phase_commit_is_not_resolved_under_the_root() {
    let etcd = Etcd::start();
    let app = TxnApp::start("order", Vote::Commit);
    let mut cfg = txn_cfg("order");
    cfg["default_timeout_ms"] = json!(1000);
    cfg["in_doubt_grace_ms"] = json!(0);
    cfg["control_timeout_ms"] = json!(8000);
    let sc = Sidecar::new("order")
        .app(&app.server)
        .etcd(&etcd)
        .filter(Filter::txn(cfg))
        .start();
    let held = Latch::default();
    app.hold_commits(Some(held.clone()));
    let url = sc.inbound_url("/checkout");
    let checkout = std::thread::spawn(move || Client::new().must("POST", &url, &[], b"{}"));
    let txn = wait_for(10, "the one-phase commit reaches the app", || {
        app.txn_where(|r| r.prepares == 1)
    });
    // The sidecar's own clock is past the deadline (and the zero grace):
    // its listing says the transaction is in doubt.
    wait_for(10, "the root's sidecar past the deadline", || {
        let url = sc.inbound_url("/txmesh/txns?state=in-doubt");
        let l = Client::new().must("GET", &url, &[], b"");
        l.text().contains(&txn).then_some(())
    });
    let s = Client::new().must(
        "GET",
        &sc.inbound_url(&format!("/txmesh/txns/{txn}")),
        &[],
        b"",
    );
    assert_eq!(s.json(), json!({"txn": txn, "outcome": "active"}));
    held.open();
    let r = checkout.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    assert_eq!(app.record(&txn).commits, 1);
    assert_ne!(
        decision(&etcd, &txn).map(|d| d["outcome"].clone()),
        Some(json!("aborted"))
    );
}

/// Each app's records of `txn`, summed over its instances:
/// (business calls, prepares, commits, aborts).
fn totals(apps: &[&TxnApp], txn: &str) -> (u32, u32, u32, u32) {
    apps.iter()
        .map(|a| a.record(txn))
        .fold((0, 0, 0, 0), |t, r| {
            (
                t.0 + r.business,
                t.1 + r.prepares,
                t.2 + r.commits,
                t.3 + r.aborts,
            )
        })
}

/// a -> b -> c with two replicas of b (each its own sidecar and app
/// instance, as pods of one Deployment over one database) behind plain round
/// robin: prepares and commits land on either replica, often on the one
/// that did not do the work. It still cascades to c (a carries b's call
/// tree, `x-txmesh-children`): every transaction commits, c included.
#[test]
fn a_prepare_landing_on_another_replica_still_reaches_the_whole_tree() {
    let etcd = Etcd::start();
    let calls = || Arc::new(RwLock::new(Vec::new()));
    let (a_calls, b1_calls, b2_calls) = (calls(), calls(), calls());
    let a = TxnApp::calling("a", Vote::Commit, a_calls.clone());
    let b1 = TxnApp::calling("b", Vote::Commit, b1_calls.clone());
    let b2 = TxnApp::calling("b", Vote::Commit, b2_calls.clone());
    let c = TxnApp::start("c", Vote::Commit);
    let c_sc = sidecar("c", &c, etcd.addr()).start();
    let replica = |app: &TxnApp, node: &str| {
        sidecar_with("b", app, etcd.addr(), &json!({"node": node}))
            .route("c", &[c_sc.inbound_addr()])
            .start()
    };
    let (b1_sc, b2_sc) = (replica(&b1, "b-1"), replica(&b2, "b-2"));
    let a_sc = sidecar("a", &a, etcd.addr())
        .route("b", &[b1_sc.inbound_addr(), b2_sc.inbound_addr()])
        .start();
    *a_calls.write().unwrap() = Downstream::each(&["b"], a_sc.ports.outbound);
    *b1_calls.write().unwrap() = Downstream::each(&["c"], b1_sc.ports.outbound);
    *b2_calls.write().unwrap() = Downstream::each(&["c"], b2_sc.ports.outbound);
    let client = Client::new();
    let mut crossed = 0;
    for _ in 0..40 {
        let r = client.must("POST", &a_sc.inbound_url("/checkout"), &[], b"{}");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
        let txn = txn_of(&r);
        for (apps, name) in [(vec![&a], "a"), (vec![&b1, &b2], "b"), (vec![&c], "c")] {
            wait_for(10, &format!("{name} commits {txn}"), || {
                (totals(&apps, &txn).2 == 1).then_some(())
            });
            assert_eq!(totals(&apps, &txn), (1, 1, 1, 0), "{name} for {txn}");
        }
        let (r1, r2) = (b1.record(&txn), b2.record(&txn));
        if (r1.business, r1.prepares) != (r2.business, r2.prepares) {
            crossed += 1;
        }
    }
    assert!(crossed > 0, "no prepare landed on the other replica in 40");
    eprintln!("{crossed} of 40 prepares landed on the replica that did not do the work");
}

/// b's sidecar restarts (its table lost) between b's business call and the
/// prepare: the prepare still cascades to c, and the transaction commits.
#[test]
fn a_sub_coordinator_restarted_before_the_prepare_still_cascades() {
    let mut chain = Chain::start(Vote::Commit);
    let held = Latch::default();
    chain.a.hold_answers(Some(held.clone()));
    std::thread::scope(|s| {
        let url = chain.a_sc.inbound_url("/checkout");
        let checkout = s.spawn(move || Client::new().must("POST", &url, &[], b"{}"));
        // c did its work and b answered a; a's app holds its answer.
        let txn = wait_for(10, "c's business call", || {
            chain.c.txn_where(|r| r.business == 1)
        });
        wait_for(10, "b's answer to a", || {
            (chain.b.record(&txn).business == 1).then_some(())
        });
        chain.b_sc.restart();
        held.open();
        let r = checkout.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
        assert_committed_once(&[&chain.a, &chain.b, &chain.c], &txn);
    });
}

#[test]
fn two_hundred_concurrent_transactions_agree_with_etcd() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    // inventory says no for a quarter of the ids, payment for another eighth.
    shop.inventory.vote_by(|t| {
        if t.ends_with(['0', '1', '2', '3']) {
            Vote::No("out_of_stock".into())
        } else {
            Vote::Commit
        }
    });
    shop.payment.vote_by(|t| {
        if t.ends_with(['4', '5']) {
            Vote::No("insufficient_funds".into())
        } else {
            Vote::Commit
        }
    });
    let outcomes: Vec<(String, u16)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    (0..25)
                        .map(|_| {
                            let r = shop.checkout();
                            let txn =
                                r.header("x-txmesh-txn")
                                    .map(str::to_string)
                                    .unwrap_or_else(|| {
                                        r.json()["txn"]
                                            .as_str()
                                            .unwrap_or_else(|| panic!("{}", r.text()))
                                            .to_string()
                                    });
                            (txn, r.status)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(outcomes.len(), 200);
    let committed = outcomes.iter().filter(|(_, s)| *s == 200).count();
    let aborted = outcomes.iter().filter(|(_, s)| *s == 409).count();
    assert_eq!(committed + aborted, 200, "{outcomes:?}");
    assert!(
        committed > 50 && aborted > 50,
        "{committed} committed, {aborted} aborted"
    );
    // Wait for phase 2 to finish everywhere.
    wait_for(30, "phase 2 everywhere", || {
        outcomes
            .iter()
            .all(|(t, s)| {
                shop.apps().iter().all(|a| {
                    let st = a.record(t).state();
                    if *s == 200 {
                        st == "committed" || a.record(t).voted.as_deref() == Some("readonly")
                    } else {
                        st == "aborted" || st == "none"
                    }
                })
            })
            .then_some(())
    });
    for (txn, status) in &outcomes {
        let d = decision(&shop.etcd, txn);
        let want = if *status == 200 {
            "committed"
        } else {
            "aborted"
        };
        if *status == 200 {
            assert_eq!(
                d.as_ref().map(|d| d["outcome"].clone()),
                Some(json!("committed")),
                "{txn}"
            );
        } else if let Some(d) = &d {
            assert_eq!(d["outcome"], "aborted", "{txn}");
        }
        for app in shop.apps() {
            let rec = app.record(txn);
            assert!(
                rec.prepares <= 1 && rec.commits <= 1,
                "{}: {txn} {rec:?}",
                app.name
            );
            match want {
                "committed" => assert_eq!(rec.state(), "committed", "{} {txn} {rec:?}", app.name),
                _ => assert_eq!(rec.commits, 0, "{} committed aborted {txn}", app.name),
            }
        }
    }
    for app in shop.apps() {
        assert!(app.errors().is_empty(), "{}: {:?}", app.name, app.errors());
    }
    // Every slot was freed: the tables are empty again.
    let s = shop.order_sc.scrape();
    assert_eq!(s.value("txmesh_txn_in_flight", &[]), 0.0);
    assert_eq!(
        s.sum("txmesh_txn_total", &[("outcome", "committed")]),
        committed as f64
    );
    assert_eq!(
        s.sum("txmesh_txn_total", &[("outcome", "aborted")]),
        aborted as f64
    );
}

#[test]
fn a_full_table_sheds_new_transactions_and_existing_ones_finish() {
    let etcd = Etcd::start();
    // Both prepares are held until the third request has been shed (a
    // fixed stall would race with a slow machine).
    let held = Latch::default();
    let app = TxnApp::start("order", Vote::Until(held.clone()));
    let mut cfg = txn_cfg("order");
    cfg["max_in_flight"] = json!(2);
    cfg["default_timeout_ms"] = json!(15_000);
    let sc = Sidecar::new("order")
        .app(&app.server)
        .etcd(&etcd)
        .filter(Filter::txn(cfg))
        .start();
    let url = sc.inbound_url("/checkout");
    let results: Vec<u16> = std::thread::scope(|s| {
        let slow: Vec<_> = (0..2)
            .map(|_| s.spawn(|| Client::new().must("POST", &url, &[], b"").status))
            .collect();
        // Both hold their slot (stalled in prepare) before the third comes.
        sc.scrape_until("two transactions in flight", |s| {
            s.value("txmesh_txn_in_flight", &[]) == 2.0
        });
        let r = Client::new().must("POST", &url, &[], b"");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(
            r.json()["error"],
            "transaction table full: 2 transactions in flight in this sidecar (max_in_flight); retry later"
        );
        held.open();
        slow.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, [200, 200]);
    // Slots are reused.
    app.set_vote(Vote::Commit);
    for _ in 0..10 {
        assert_eq!(Client::new().must("POST", &url, &[], b"").status, 200);
    }
}

#[test]
fn decisions_are_logged_with_the_trace_id() {
    let shop = Shop::start(Vote::Commit, Vote::Commit);
    let r = shop.client.must(
        "POST",
        &shop.order_sc.inbound_url("/checkout"),
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
        b"{}",
    );
    assert_eq!(r.status, 200);
    let txn = txn_of(&r);
    let line = wait_for(5, "decision log line", || {
        shop.order_sc
            .log()
            .lines()
            .find(|l| l.contains(&format!("txn {txn} committed")))
            .map(str::to_string)
    });
    assert!(
        line.contains("trace=4bf92f3577b34da6a3ce929d0e0e4736"),
        "{line}"
    );
    assert!(
        line.contains("participants=payment:commit,inventory:commit,order:commit"),
        "{line}"
    );
    assert!(line.contains("prepare_ms="), "{line}");
}

/// The txn filter behind the gate `TxnConfig::gate_matcher` builds (Envoy's
/// match_delegate skips it for other traffic): transactions work exactly
/// as without it, control endpoints included, and other requests pass.
#[test]
fn a_gated_txn_filter_still_runs_every_transaction() {
    let etcd = Etcd::start();
    let gate = txmesh_core::txn::config::TxnConfig::parse(txn_cfg("x").to_string().as_bytes())
        .unwrap()
        .gate_matcher();
    let g = txmesh_tests::Checkout::start(Vote::Commit, Vote::Commit, |name, app| {
        Sidecar::new(name)
            .app(&app.server)
            .etcd(&etcd)
            .filter(Filter::txn(txn_cfg(name)).gated(gate.clone()))
    });
    let c = Client::new();
    let r = c.must(
        "POST",
        &g.order_sc.inbound_url("/checkout"),
        &[("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    let txn = txn_of(&r);
    assert_eq!(decision(&etcd, &txn).unwrap()["outcome"], "committed");
    assert_committed_once(&[&g.order, &g.payment, &g.inventory], &txn);
    // A control endpoint through the gate.
    let s = c.must(
        "GET",
        &g.order_sc.inbound_url(&format!("/txmesh/txns/{txn}")),
        &[],
        b"",
    );
    assert_eq!(s.json(), json!({"txn": txn, "outcome": "committed"}));
    // A malformed transaction header still meets the filter (400)...
    let bad = c.must(
        "GET",
        &g.pay_sc.inbound_url("/work"),
        &[("x-txmesh-txn", "not-an-id")],
        b"",
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    // ...and a request without one passes untouched.
    let plain = c.must("POST", &g.order_sc.inbound_url("/plain"), &[], b"{}");
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(plain.header("x-txmesh-outcome"), None);
}
