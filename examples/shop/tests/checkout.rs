//! The shop's three services as real processes behind real sidecars and etcd:
//! checkouts commit or abort atomically, bad requests leave nothing behind.

mod stack;

use stack::Stack;
use txmesh_tests::wait_for;

#[test]
fn checkouts_commit_and_abort_atomically() {
    let s = Stack::start();
    // alice buys two widgets.
    let r = s.checkout(r#"{"customer": "alice", "sku": "widget", "qty": 2}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    let v = r.json();
    assert_eq!(v["outcome"], "committed");
    assert_eq!(v["amount"], 5_000);
    let id = v["order_id"].as_i64().unwrap();
    wait_for(10, "phase 2", || {
        (s.balance("alice") == 995_000).then_some(())
    });
    assert_eq!(s.stock("widget"), 998);
    wait_for(10, "order confirmed", || {
        (s.order(id)["state"] == "confirmed").then_some(())
    });

    // dave has no money: payment says no, nothing moves.
    let r = s.checkout(r#"{"customer": "dave", "sku": "widget", "qty": 1}"#);
    assert_eq!(r.status, 409, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (
            v["outcome"].as_str(),
            v["reason"].as_str(),
            v["participant"].as_str()
        ),
        (Some("aborted"), Some("insufficient_funds"), Some("payment"))
    );
    wait_drained(&s);
    assert_eq!((s.balance("dave"), s.stock("widget")), (0, 998));

    // Only 3 gizmos: 4 is out of stock, alice keeps her money.
    let r = s.checkout(r#"{"customer": "alice", "sku": "gizmo", "qty": 4}"#);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["reason"], "out_of_stock");
    wait_drained(&s);
    assert_eq!((s.balance("alice"), s.stock("gizmo")), (995_000, 3));

    // order called inventory over gRPC: its outbound metrics count each
    // reservation under its grpc-status (three checkouts, three
    // reservations: gizmo ×4 is refused at prepare, not at the reservation).
    let out = s.order_sc.scrape();
    let grpc = |status: &str| {
        out.sum(
            "txmesh_requests_total",
            &[
                ("reporter", "outbound"),
                ("destination_service", "inventory"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", status),
            ],
        )
    };
    assert_eq!(grpc("0"), 3.0, "{}", out.text_of("txmesh_requests_total"));

    // inventory's part went over gRPC: its sidecar reached the app on
    // HTTP/2 only (txmesh.v1.Participant and the business calls alike).
    let scrape = s.inventory_sc.scrape();
    let app = [("envoy_cluster_name", "local_app")];
    assert!(
        scrape.sum("envoy_cluster_upstream_cx_http2_total", &app) >= 1.0,
        "{}",
        scrape.text_of("local_app")
    );
    assert_eq!(
        scrape.sum("envoy_cluster_upstream_cx_http1_total", &app),
        0.0
    );
}

#[test]
fn bad_requests_are_400_and_leave_no_transaction_behind() {
    let s = Stack::start();
    for (body, msg) in [
        ("{not json", "invalid JSON"),
        (
            r#"{"customer": "alice", "sku": "widget", "qty": 0}"#,
            "qty must be positive",
        ),
        (
            r#"{"customer": "alice", "sku": "nothing", "qty": 1}"#,
            "unknown sku",
        ),
        (
            r#"{"customer": "mallory", "sku": "widget", "qty": 1}"#,
            "unknown customer",
        ),
        (r#"{"sku": "widget"}"#, "want {"),
    ] {
        let r = s.checkout(body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.header("x-txmesh-outcome"), Some("aborted"));
        let err = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(err.contains(msg), "{body}: {err}");
    }
    // Every sidecar's table is empty again: whatever phase 2 there was is over.
    wait_drained(&s);
    assert_eq!((s.balance("alice"), s.stock("widget")), (1_000_000, 1_000));
}

/// Waits until every sidecar's transaction table is empty: phase 2 (an
/// abort releasing a hold) is over, so balances and stock are final.
fn wait_drained(s: &Stack) {
    for sc in [&s.order_sc, &s.payment_sc, &s.inventory_sc] {
        wait_for(10, "tables drained", || {
            let l = s
                .client
                .must("GET", &sc.inbound_url("/txmesh/txns?state=all"), &[], b"")
                .json();
            (l["txns"].as_array().map_or(0, Vec::len) == 0).then_some(())
        });
    }
}
