//! gRPC apps in transactions, on real Envoy: a gRPC call's success is its
//! final `grpc-status` (trailers, or a trailers-only answer), never
//! `:status` alone; the outcome travels back as trailing metadata.
//!
//! The initiator here is a gRPC app (HTTP/2 from its sidecar, answers
//! framed as gRPC); it enlists `payment` and `inventory`, HTTP apps, through
//! its sidecar. The client speaks gRPC on the wire (`txmesh_tests::grpc`),
//! so each test sees exactly where the status came: headers or trailers.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;
use txmesh_tests::envoy::Envoy;
use txmesh_tests::{grpc, wait_for, Checkout, Reply, TxnApp, Vote};

const CHECKOUT: &str = "/shop.v1.Order/Checkout";

struct GrpcShop {
    etcd: txmesh_tests::Etcd,
    order: TxnApp,
    payment: TxnApp,
    inventory: TxnApp,
    order_sc: Envoy,
    /// Kept running (dropping a sidecar stops it).
    _others: [Envoy; 2],
}

impl GrpcShop {
    /// order (gRPC, begins a transaction on `/shop.v1.Order/Checkout`) ->
    /// {payment, inventory} (HTTP), every participant voting commit.
    fn start() -> Self {
        Self::voting(Vote::Commit, Vote::Commit)
    }

    fn voting(payment_vote: Vote, inventory_vote: Vote) -> Self {
        let etcd = txmesh_tests::Etcd::start();
        let extra = json!({"begin": [{"method": "POST", "path_prefix": CHECKOUT}]});
        let g = Checkout::start(payment_vote, inventory_vote, |name, app| {
            let sc = sidecar_with(name, app, etcd.addr(), &extra);
            if name == "order" {
                sc.app_http2()
            } else {
                sc
            }
        });
        GrpcShop {
            etcd,
            order: g.order,
            payment: g.payment,
            inventory: g.inventory,
            order_sc: g.order_sc,
            _others: [g.pay_sc, g.inv_sc],
        }
    }

    fn checkout(&self) -> grpc::Answer {
        self.checkout_with(&[])
    }

    fn checkout_with(&self, metadata: &[(&str, &str)]) -> grpc::Answer {
        grpc_checkout(&self.order_sc, metadata)
    }

    fn apps(&self) -> [&TxnApp; 3] {
        [&self.order, &self.payment, &self.inventory]
    }

    /// `txmesh_txn_total` at the order sidecar for this outcome and reason
    /// (0 when Envoy has no such series).
    fn txns(&self, outcome: &str, reason: &str) -> f64 {
        self.order_sc.scrape().sum(
            "txmesh_txn_total",
            &[("outcome", outcome), ("reason", reason)],
        )
    }
}

/// The transaction id the initiator's app was given (its only business call).
fn only_txn(app: &TxnApp) -> String {
    let reqs = app.server.requests_to(CHECKOUT);
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    reqs[0]
        .header("x-txmesh-txn")
        .unwrap_or_else(|| panic!("the app got no x-txmesh-txn: {:?}", reqs[0]))
}

/// Nobody was asked to prepare; each participant got its abort and no commit.
fn assert_aborted_unprepared(shop: &GrpcShop, txn: &str) {
    for app in shop.apps() {
        wait_for(10, &format!("{}'s abort", app.name), || {
            (app.record(txn).aborts >= 1).then_some(())
        });
        let rec = app.record(txn);
        assert_eq!((rec.prepares, rec.commits), (0, 0), "{}: {rec:?}", app.name);
    }
}

#[test]
fn an_ok_grpc_answer_commits_and_says_so_in_the_trailers() {
    let shop = GrpcShop::start();
    shop.order.set_business_reply(Reply::grpc(0));
    let a = shop.checkout();
    assert_eq!((a.http, a.grpc_status()), (200, Some(0)), "{a:?}");
    assert!(!a.trailers_only(), "{a:?}");
    assert_eq!(a.trailer("x-txmesh-outcome"), Some("committed"), "{a:?}");
    let txn = only_txn(&shop.order);
    assert_eq!(a.trailer("x-txmesh-txn"), Some(txn.as_str()), "{a:?}");
    assert_committed_once(&shop.apps(), &txn);
    assert_eq!(
        decision(&shop.etcd, &txn).map(|d| d["outcome"].clone()),
        Some(json!("committed"))
    );
}

#[test]
fn grpc_status_13_in_the_trailers_aborts_although_the_status_was_200() {
    let shop = GrpcShop::start();
    shop.order.set_business_reply(Reply::grpc(13));
    let a = shop.checkout();
    // The client sees the app's own failure, marked aborted.
    assert_eq!((a.http, a.grpc_status()), (200, Some(13)), "{a:?}");
    assert!(!a.trailers_only(), "{a:?}");
    assert_eq!(a.trailer("x-txmesh-outcome"), Some("aborted"), "{a:?}");
    let txn = only_txn(&shop.order);
    assert_aborted_unprepared(&shop, &txn);
    // Presumed abort: nobody prepared, so no record is written.
    assert_eq!(decision(&shop.etcd, &txn), None);
    assert_eq!(shop.txns("aborted", "grpc_error"), 1.0);
    assert_eq!(shop.txns("committed", "ok"), 0.0);
}

#[test]
fn a_trailers_only_error_aborts() {
    let shop = GrpcShop::start();
    shop.order.set_business_reply(Reply::grpc_trailers_only(9));
    let a = shop.checkout();
    assert_eq!((a.http, a.grpc_status()), (200, Some(9)), "{a:?}");
    assert!(a.trailers_only(), "{a:?}");
    assert_eq!(a.header("x-txmesh-outcome"), Some("aborted"), "{a:?}");
    let txn = only_txn(&shop.order);
    assert_aborted_unprepared(&shop, &txn);
    assert_eq!(shop.txns("aborted", "grpc_error"), 1.0);
    assert_eq!(shop.txns("committed", "ok"), 0.0);
}

#[test]
fn a_no_vote_reaches_a_grpc_client_as_aborted_with_the_reason() {
    let shop = GrpcShop::voting(Vote::Commit, Vote::No("out of stock: 100% sold".into()));
    shop.order.set_business_reply(Reply::grpc(0));
    let a = shop.checkout();
    // The app's OK is replaced: ABORTED, naming who and why (the message
    // percent-encoded as gRPC asks), in the trailers.
    assert_eq!((a.http, a.grpc_status()), (200, Some(10)), "{a:?}");
    assert!(!a.trailers_only(), "{a:?}");
    assert_eq!(
        a.trailer("grpc-message"),
        Some("transaction aborted by inventory: out of stock: 100%25 sold"),
        "{a:?}"
    );
    assert_eq!(a.trailer("x-txmesh-outcome"), Some("aborted"), "{a:?}");
    let txn = only_txn(&shop.order);
    assert_eq!(a.trailer("x-txmesh-txn"), Some(txn.as_str()), "{a:?}");
    for app in shop.apps() {
        wait_for(10, &format!("{}'s abort", app.name), || {
            (app.record(&txn).aborts >= 1).then_some(())
        });
        assert_eq!(app.record(&txn).commits, 0, "{}", app.name);
    }
    assert_eq!(shop.txns("aborted", "vote_abort"), 1.0);
}

#[test]
fn grpc_timeout_bounds_the_transaction() {
    // payment stalls past the client's 800 ms (the configured timeout is 2 s).
    let shop = GrpcShop::voting(Vote::Stall(Duration::from_millis(3000)), Vote::Commit);
    shop.order.set_business_reply(Reply::grpc(0));
    let before = txmesh_tests::epoch_ms();
    let a = shop.checkout_with(&[("grpc-timeout", "800m")]);
    let after = txmesh_tests::epoch_ms();
    assert_eq!(a.grpc_status(), Some(10), "{a:?}");
    assert_eq!(
        a.trailer("grpc-message"),
        Some("transaction aborted by payment: no answer before the deadline"),
        "{a:?}"
    );
    // The transaction's deadline is the client's: 800 ms after its call.
    let deadline: u64 = shop.order.server.requests_to(CHECKOUT)[0]
        .header("x-txmesh-deadline")
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no deadline given to the app"));
    assert!(
        (before + 800..=after + 800).contains(&deadline),
        "deadline {deadline}, call from {before} to {after}"
    );
    eprintln!("aborted {} ms after the call", after - before);
    assert_eq!(shop.txns("aborted", "timeout"), 1.0);
}

/// order (HTTP, begins on `/checkout`) -> inventory, a gRPC app that takes
/// prepare, commit and abort as `txmesh.v1.Participant` from its sidecar.
struct GrpcParticipantShop {
    etcd: txmesh_tests::Etcd,
    order: TxnApp,
    inventory: grpc::Participant,
    order_sc: Envoy,
    inventory_sc: Envoy,
}

impl GrpcParticipantShop {
    fn start(vote: grpc::Vote) -> Self {
        Self::with_root(vote, false)
    }

    /// `grpc_root`: order is a gRPC app too (begins on
    /// `/shop.v1.Order/Checkout`, answers gRPC): gRPC end to end.
    fn with_root(vote: grpc::Vote, grpc_root: bool) -> Self {
        let etcd = txmesh_tests::Etcd::start();
        let inventory = grpc::Participant::start("inventory", vote);
        let mut cfg = txn_cfg("inventory");
        cfg["app_protocol"] = json!("grpc");
        let inventory_sc = txmesh_tests::Sidecar::new("inventory")
            .app(&inventory.server)
            .app_http2()
            .etcd_addr(etcd.addr())
            .filter(txmesh_tests::Filter::txn(cfg))
            .start();
        let calls = std::sync::Arc::new(std::sync::RwLock::new(Vec::new()));
        let order = TxnApp::calling("order", Vote::Commit, calls.clone());
        let order_sc = if grpc_root {
            order.set_business_reply(Reply::grpc(0));
            let extra = json!({"begin": [{"method": "POST", "path_prefix": CHECKOUT}]});
            sidecar_with("order", &order, etcd.addr(), &extra).app_http2()
        } else {
            sidecar("order", &order, etcd.addr())
        }
        .route("inventory", &[inventory_sc.inbound_addr()])
        .start();
        *calls.write().unwrap_or_else(|e| e.into_inner()) =
            txmesh_tests::Downstream::each(&["inventory"], order_sc.ports.outbound);
        GrpcParticipantShop {
            etcd,
            order,
            inventory,
            order_sc,
            inventory_sc,
        }
    }

    /// `txn` aborted: order's app got its abort, inventory no commit, and
    /// inventory saw nothing the contract forbids.
    fn assert_aborted(&self, txn: &str) {
        wait_for(10, "order's abort", || {
            (self.order.record(txn).aborts >= 1).then_some(())
        });
        assert_eq!(self.inventory.record(txn).commits, 0);
        assert!(
            self.inventory.errors().is_empty(),
            "{:?}",
            self.inventory.errors()
        );
    }

    /// A gRPC client's checkout (the shop started `with_root(_, true)`).
    fn grpc_checkout(&self, metadata: &[(&str, &str)]) -> grpc::Answer {
        grpc_checkout(&self.order_sc, metadata)
    }

    fn checkout(&self) -> txmesh_tests::Resp {
        txmesh_tests::Client::new().must(
            "POST",
            &self.order_sc.inbound_url("/checkout"),
            &[("content-type", "application/json")],
            b"{}",
        )
    }
}

#[test]
fn a_grpc_participant_commits_through_its_sidecar() {
    let shop = GrpcParticipantShop::start(grpc::Vote::Commit);
    let r = shop.checkout();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    let txn = txn_of(&r);
    wait_for(10, "inventory's commit", || {
        (shop.inventory.record(&txn).commits == 1).then_some(())
    });
    let rec = shop.inventory.record(&txn);
    assert_eq!(
        (rec.business, rec.prepares, rec.commits, rec.aborts),
        (1, 1, 1, 0),
        "{rec:?}"
    );
    assert_committed_once(&[&shop.order], &txn);
    assert_eq!(
        decision(&shop.etcd, &txn).map(|d| d["outcome"].clone()),
        Some(json!("committed"))
    );
    assert!(
        shop.inventory.errors().is_empty(),
        "{:?}",
        shop.inventory.errors()
    );
    // Only gRPC reached the app for control: no HTTP /txmesh/ call.
    assert!(shop
        .inventory
        .server
        .requests_to("/txmesh/prepare")
        .is_empty());
}

#[test]
fn a_grpc_participants_no_vote_aborts_with_its_reason() {
    let shop = GrpcParticipantShop::start(grpc::Vote::No("out of stock".into()));
    let r = shop.checkout();
    assert_eq!(r.status, 409, "{}", r.text());
    let v = r.json();
    assert_eq!(v["reason"], "out of stock");
    assert_eq!(v["participant"], "inventory");
    let txn = v["txn"].as_str().unwrap_or_default().to_string();
    shop.assert_aborted(&txn);
    assert_eq!(shop.order.record(&txn).commits, 0);
}

/// Bytes that are not a `PrepareResponse`, and a failed call: abort votes
/// that say what was wrong; the VM goes on serving.
#[test]
fn a_malformed_or_failed_grpc_prepare_is_an_abort_vote() {
    let shop = GrpcParticipantShop::start(grpc::Vote::Malformed);
    let r = shop.checkout();
    assert_eq!(r.status, 409, "{}", r.text());
    let v = r.json();
    assert_eq!(v["participant"], "inventory");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not valid protobuf"), "{reason}");
    let txn = v["txn"].as_str().unwrap_or_default().to_string();
    wait_for(10, "inventory's abort", || {
        (shop.inventory.record(&txn).aborts >= 1).then_some(())
    });
    let log = shop.inventory_sc.log();
    assert!(!log.contains("panicked"), "{log}");
    // The same sidecar, a failing app: the gRPC status is the reason.
    shop.inventory.set_vote(grpc::Vote::Fail(13));
    let r = shop.checkout();
    assert_eq!(r.status, 409, "{}", r.text());
    let reason = r.json()["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.starts_with("Prepare failed: grpc-status 13"),
        "{reason}"
    );
}

/// Only unary calls can be transactions: a begin rule naming a streaming
/// method (as `grpc_streaming` declares it) is refused at load.
#[test]
fn a_begin_rule_on_a_streaming_method_is_refused_at_load() {
    let app = txmesh_tests::Upstream::start();
    let err = txmesh_tests::Sidecar::new("order")
        .app(&app)
        .filter(txmesh_tests::Filter::txn(json!({
            "begin": [{"path_prefix": "/shop.v1.Order/Watch"}],
            "grpc_streaming": ["/shop.v1.Order/Watch"],
        })))
        .try_start()
        .err()
        .unwrap_or_else(|| panic!("Envoy must refuse the config"));
    assert!(
        err.contains("invalid plugin configuration at `begin[0].path_prefix`: \"/shop.v1.Order/Watch\" names the streaming gRPC method"),
        "{err}"
    );
}

/// gRPC end to end (a gRPC client, initiator and participant): the
/// participant's VOTE_ABORT reaches the client as ABORTED with its reason.
#[test]
fn a_grpc_participants_no_reaches_a_grpc_client_as_aborted() {
    let shop = GrpcParticipantShop::with_root(grpc::Vote::No("sold out".into()), true);
    let a = shop.grpc_checkout(&[]);
    assert_eq!(a.grpc_status(), Some(10), "{a:?}");
    assert_eq!(
        a.trailer("grpc-message"),
        Some("transaction aborted by inventory: sold out"),
        "{a:?}"
    );
    let txn = a.trailer("x-txmesh-txn").unwrap_or_default().to_string();
    shop.assert_aborted(&txn);
}

/// A gRPC participant slower than the client's grpc-timeout: the
/// transaction aborts at that deadline, not the configured 2 s.
#[test]
fn a_grpc_participant_slower_than_grpc_timeout_aborts_on_time() {
    // inventory answers its prepare only once the test has the client's
    // answer: never before the deadline, on any machine.
    let answered = txmesh_tests::Latch::default();
    let shop = GrpcParticipantShop::with_root(grpc::Vote::Until(answered.clone()), true);
    let (t, before) = (std::time::Instant::now(), txmesh_tests::epoch_ms());
    let a = shop.grpc_checkout(&[("grpc-timeout", "700m")]);
    let (took, after) = (t.elapsed(), txmesh_tests::epoch_ms());
    answered.open();
    assert_eq!(a.grpc_status(), Some(10), "{a:?}");
    assert_eq!(
        a.trailer("grpc-message"),
        Some("transaction aborted by inventory: no answer before the deadline"),
        "{a:?}"
    );
    eprintln!("aborted after {took:?} (grpc-timeout 700 ms, configured 2 s)");
    let txn = a.trailer("x-txmesh-txn").unwrap_or_default().to_string();
    // The deadline the transaction ran under (in its id) is the client's:
    // 700 ms after its call, not the configured 2 s.
    let d = txmesh_core::txn::id::TxnId::parse(txn.as_bytes())
        .ok()
        .and_then(|id| id.deadline_ms())
        .unwrap_or_else(|| panic!("{txn}: no deadline in the id"));
    assert!(
        (before + 700..=after + 700).contains(&d),
        "deadline {d}, call from {before} to {after}"
    );
    wait_for(10, "inventory's abort", || {
        (shop.inventory.record(&txn).aborts >= 1).then_some(())
    });
    assert_eq!(shop.inventory.record(&txn).commits, 0);
}

/// A gRPC client's `Checkout` through order's sidecar.
fn grpc_checkout(order_sc: &txmesh_tests::envoy::Envoy, metadata: &[(&str, &str)]) -> grpc::Answer {
    grpc::unary(
        order_sc.inbound_addr(),
        "order",
        CHECKOUT,
        b"",
        metadata,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}
