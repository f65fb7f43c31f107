//! mTLS between sidecars, txmesh_authz.wasm and edge sanitizing, on real
//! Envoys with certificates from scripts/certs.sh.

use serde_json::{json, Value};
use txmesh_tests::envoy::Envoy;
use txmesh_tests::{spiffe, Certs, Client, Filter, Sidecar, TxnApp, Upstream, Vote};

fn coordinators() -> Value {
    json!(["order", "payment", "inventory"]
        .iter()
        .map(|n| json!({"exact": spiffe(n)}))
        .collect::<Vec<_>>())
}

/// A client-side Envoy calling `payment` at `target`, configured by `f`.
fn client(name: &str, target: &Envoy, f: impl FnOnce(Sidecar) -> Sidecar) -> Envoy {
    f(Sidecar::new(name).route("payment", &[target.inbound_addr()])).start()
}

fn call(
    c: &Client,
    via: &Envoy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut h = vec![("host", "payment")];
    h.extend_from_slice(headers);
    let r = c.must(method, &via.outbound_url(path), &h, b"");
    (r.status, r.text())
}

/// Sum of the inbound listener's stats whose name ends with `suffix`.
fn listener_stat(e: &Envoy, suffix: &str) -> u64 {
    let text = Client::new()
        .must("GET", &e.admin_url("/stats?filter=ssl"), &[], b"")
        .text();
    text.lines()
        .filter(|l| l.starts_with("listener.") && l.contains(&format!(".ssl.{suffix}:")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn inbound_requires_a_certificate_from_the_mesh_ca() {
    let certs = Certs::make("mesh", &["order", "payment"]);
    let rogue = Certs::make("rogue", &["order"]);
    let app = Upstream::start();
    let payment = Sidecar::new("payment")
        .app(&app)
        .mtls(&certs, "payment")
        .start();
    let plain = client("plain", &payment, |s| s);
    let nocert = client("nocert", &payment, |s| s.tls_without_cert(&certs));
    let foreign = client("foreign", &payment, |s| s.mtls(&rogue, "order"));
    let order = client("order", &payment, |s| s.mtls(&certs, "order"));
    let c = Client::new();
    for (who, via) in [
        ("plain", &plain),
        ("no certificate", &nocert),
        ("another CA", &foreign),
    ] {
        let (status, body) = call(&c, via, "GET", "/stock/widget", &[]);
        assert_eq!(status, 503, "{who}: {body}");
    }
    assert_eq!(
        app.requests().len(),
        0,
        "no request without a mesh certificate reaches the app"
    );
    assert!(listener_stat(&payment, "fail_verify_no_cert") >= 1);
    assert!(listener_stat(&payment, "connection_error") >= 2);
    let (status, body) = call(&c, &order, "GET", "/stock/widget", &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.requests().len(), 1);
    // A plain-text request straight at the inbound port gets no HTTP answer.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(payment.inbound_addr()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = s.write_all(b"GET /stock/widget HTTP/1.1\r\nhost: payment\r\n\r\n");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert!(
        !buf[..n].starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(app.requests().len(), 1);
}

#[test]
fn a_non_coordinator_gets_403_on_the_control_endpoints() {
    let certs = Certs::make("ctl", &["order", "payment", "intruder"]);
    let app = Upstream::start();
    let payment = Sidecar::new("payment")
        .app(&app)
        .mtls(&certs, "payment")
        .inbound_filter(Filter::authz(
            json!({"default": "allow", "coordinators": coordinators()}),
        ))
        .inbound_filter(Filter::txn(json!({"node": "payment"})))
        .start();
    let intruder = client("intruder", &payment, |s| s.mtls(&certs, "intruder"));
    let order = client("order", &payment, |s| s.mtls(&certs, "order"));
    let c = Client::new();
    let txn = "0123456789abcdef0123456789abcdef";
    let deadline = (txmesh_tests::epoch_ms() + 5000).to_string();
    let h = [
        ("x-txmesh-txn", txn),
        ("x-txmesh-deadline", deadline.as_str()),
    ];
    for path in [
        "/txmesh/prepare",
        "/txmesh/commit",
        "/txmesh/abort",
        "//TXMESH/./abort",
    ] {
        let (status, body) = call(&c, &intruder, "POST", path, &h);
        assert_eq!(status, 403, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"error": "forbidden", "principal": spiffe("intruder")}),
            "{path}"
        );
    }
    assert_eq!(
        app.requests().len(),
        0,
        "the participant app never sees them"
    );
    // The intruder may still call the business API (default allow).
    assert_eq!(call(&c, &intruder, "GET", "/stock/widget", &[]).0, 200);
    // A coordinator passes: once order has called payment inside the
    // transaction (so payment's sidecar knows order as its coordinator), its
    // abort reaches the app.
    assert_eq!(call(&c, &order, "POST", "/work", &h).0, 200);
    let (status, body) = call(&c, &order, "POST", "/txmesh/abort", &h);
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.requests_to("/txmesh/abort").len(), 1);
    payment.scrape_counts(&[
        (
            DECISIONS,
            &[("decision", "deny"), ("rule", "txmesh-control")],
            4.0,
        ),
        (
            DECISIONS,
            &[("decision", "allow"), ("rule", "txmesh-control")],
            1.0,
        ),
    ]);
}

#[test]
fn policy_rules_allow_deny_first_match_default_glob() {
    let certs = Certs::make("rules", &["order", "payment", "intruder"]);
    let app = Upstream::start();
    let policy = json!({
        "default": "deny",
        "coordinators": coordinators(),
        "rules": [
            {"name": "no-admin", "action": "deny", "paths": ["/admin"]},
            {"name": "order-charges", "action": "allow",
             "principals": [{"exact": spiffe("order")}], "methods": ["POST"], "paths": ["/charge"]},
            {"name": "mesh-reads", "action": "allow",
             "principals": [{"glob": "spiffe://txmesh.local/ns/*/sa/*"}], "methods": ["GET"]},
        ],
    });
    let payment = Sidecar::new("payment")
        .app(&app)
        .mtls(&certs, "payment")
        .inbound_filter(Filter::authz(policy))
        .start();
    let order = client("order", &payment, |s| s.mtls(&certs, "order"));
    let intruder = client("intruder", &payment, |s| s.mtls(&certs, "intruder"));
    let c = Client::new();
    // allow (exact principal, method, path)
    assert_eq!(call(&c, &order, "POST", "/charge", &[]).0, 200);
    // default: the same path, another principal / another method
    assert_eq!(call(&c, &intruder, "POST", "/charge", &[]).0, 403);
    assert_eq!(call(&c, &order, "PUT", "/charge", &[]).0, 403);
    // glob: any workload of the trust domain may read
    assert_eq!(call(&c, &intruder, "GET", "/stock/widget", &[]).0, 200);
    // deny, first match: /admin is refused although mesh-reads would allow GET
    assert_eq!(call(&c, &order, "GET", "/admin/users", &[]).0, 403);
    assert_eq!(call(&c, &order, "GET", "/x/../admin", &[]).0, 403);
    let paths: Vec<String> = app.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, vec!["/charge", "/stock/widget"]);
    payment.scrape_counts(&[
        (
            DECISIONS,
            &[("decision", "allow"), ("rule", "order-charges")],
            1.0,
        ),
        (
            DECISIONS,
            &[("decision", "allow"), ("rule", "mesh-reads")],
            1.0,
        ),
        (
            DECISIONS,
            &[("decision", "deny"), ("rule", "no-admin")],
            2.0,
        ),
        (DECISIONS, &[("decision", "deny"), ("rule", "default")], 2.0),
    ]);
}

const DECISIONS: &str = "txmesh_authz_decisions_total";

#[test]
fn a_bad_policy_is_refused_with_the_field() {
    let app = Upstream::start();
    let err = Sidecar::new("payment")
        .app(&app)
        .inbound_filter(Filter::authz(json!({
            "default": "deny",
            "rules": [{"name": "r", "action": "allow", "principals": [{"regex": ".*"}]}],
        })))
        .try_start()
        .err()
        .expect("Envoy must refuse the policy");
    assert!(
        err.contains(
            "invalid plugin configuration at `rules[0].principals[0]`: unknown variant `regex`"
        ),
        "{err}"
    );
}

/// The ingress strips what a client must not control before anything acts on
/// it: a forged transaction id (header or baggage), outcome, routing pick.
#[test]
fn forged_headers_through_the_ingress_have_no_effect() {
    let etcd = txmesh_tests::Etcd::start();
    let order_app = TxnApp::start("order", Vote::Commit);
    let order = Sidecar::new("order")
        .app(&order_app.server)
        .etcd(&etcd)
        .inbound_filter(Filter::txn(json!({
            "node": "order",
            "begin": [{"method": "POST", "path_prefix": "/checkout"}],
            "allow_client_begin": true,
        })))
        .start();
    let ingress = |edge: Value| {
        Sidecar::new("ingress")
            .outbound_filter(Filter::authz(json!({"default": "allow", "edge": edge})))
            .route("order", &[order.inbound_addr()])
            .start()
    };
    let strict = ingress(json!({}));
    let c = Client::new();
    let known = "0123456789abcdef0123456789abcdef";
    let forged = [
        ("host", "order"),
        ("x-txmesh-txn", known),
        (
            "baggage",
            "txmesh.txn=0123456789abcdef0123456789abcdef,user=alice",
        ),
        ("x-txmesh-outcome", "committed"),
        ("x-txmesh-endpoint", "6.6.6.6:66"),
        ("x-txmesh-deadline", "1"),
    ];
    let r = c.must("POST", &strict.outbound_url("/checkout"), &forged, b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    let minted = r.header("x-txmesh-txn").unwrap().to_string();
    assert_ne!(minted, known, "the forged id was not used");
    let got = order_app.server.requests();
    let business = got.iter().find(|q| q.path == "/checkout").unwrap();
    assert_eq!(
        business.header("x-txmesh-txn").as_deref(),
        Some(minted.as_str())
    );
    assert_eq!(business.header("x-txmesh-endpoint"), None);
    assert_eq!(business.header("x-txmesh-outcome"), None);
    assert_eq!(business.header("baggage").as_deref(), Some("user=alice"));
    assert_eq!(
        order_app.records().keys().cloned().collect::<Vec<_>>(),
        vec![minted]
    );

    // A forged id on a path that does not begin a transaction: stripped, so
    // no transaction is joined or touched.
    let before = order_app.records().len();
    let r = c.must(
        "POST",
        &strict.outbound_url("/orders/1"),
        &[("host", "order"), ("x-txmesh-txn", known)],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-txmesh-txn"), None);
    assert_eq!(order_app.records().len(), before);

    // Where beginning from outside is allowed, `new` passes (and only `new`).
    let open = ingress(json!({"allow_txn_begin": true}));
    let r = c.must(
        "POST",
        &open.outbound_url("/orders/2"),
        &[("host", "order"), ("x-txmesh-txn", "new")],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    assert_eq!(order_app.records().len(), before + 1);
}

/// A mesh identity that did not enlist a participant cannot decide for it:
/// with payment's own certificate, a commit sent to inventory and an abort
/// sent to payment for an undecided checkout are refused (403, nothing
/// applied) — neither is the coordinator of the other, and etcd holds no such
/// decision — and the checkout then commits everywhere.
#[test]
fn a_commit_or_abort_from_a_non_coordinator_identity_is_refused() {
    use txmesh_tests::{wait_for, Checkout, Etcd, Latch};
    let certs = Certs::make("forge", &["order", "payment", "inventory", "edge"]);
    let etcd = Etcd::start();
    let held = Latch::default();
    let shop = Checkout::start(Vote::Until(held.clone()), Vote::Commit, |name, app| {
        Sidecar::new(name)
            .app(&app.server)
            .etcd_addr(etcd.addr())
            .mtls(&certs, name)
            .filter(Filter::txn(json!({
                "begin": [{"method": "POST", "path_prefix": "/checkout"}],
                "default_timeout_ms": 15000,
                "node": name,
            })))
    });
    let edge = Sidecar::new("edge")
        .route("order", &[shop.order_sc.inbound_addr()])
        .mtls(&certs, "edge")
        .start();
    // Someone holding payment's certificate, able to reach both services.
    let mallory = Sidecar::new("mallory")
        .route("payment", &[shop.pay_sc.inbound_addr()])
        .route("inventory", &[shop.inv_sc.inbound_addr()])
        .mtls(&certs, "payment")
        .start();
    std::thread::scope(|s| {
        let url = edge.outbound_url("/checkout");
        let checkout =
            s.spawn(move || Client::new().must("POST", &url, &[("host", "order")], b"{}"));
        let txn = wait_for(10, "payment's business call", || {
            shop.payment.txn_where(|r| r.business == 1)
        });
        let c = Client::new();
        for (host, path) in [
            ("inventory", "/txmesh/commit"),
            ("payment", "/txmesh/abort"),
        ] {
            let r = c.must(
                "POST",
                &mallory.outbound_url(path),
                &[("host", host), ("x-txmesh-txn", &txn)],
                b"",
            );
            assert_eq!(r.status, 403, "{host}{path}: {}", r.text());
            assert_eq!(r.json()["principal"], spiffe("payment"), "{}", r.text());
        }
        assert_eq!(shop.inventory.record(&txn).commits, 0, "nothing applied");
        assert_eq!(shop.payment.record(&txn).aborts, 0, "nothing applied");
        held.open();
        let r = checkout.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
        for app in [&shop.order, &shop.payment, &shop.inventory] {
            wait_for(10, &format!("{} commits", app.name), || {
                (app.record(&txn).commits == 1).then_some(())
            });
            let rec = app.record(&txn);
            assert_eq!(
                (rec.prepares, rec.commits, rec.aborts),
                (1, 1, 0),
                "{}",
                app.name
            );
        }
    });
}

/// Rules on gRPC methods (`/package.Service/Method`), and the gRPC control
/// service `txmesh.v1.Participant` kept to coordinators like `/txmesh/*`,
/// whatever the rules say. A denial reaches a gRPC client as Envoy's
/// trailers-only PERMISSION_DENIED (7), and the app sees nothing.
#[test]
fn rules_on_grpc_methods_and_the_grpc_control_service() {
    let app = Upstream::with(|_| txmesh_tests::Reply::grpc(0));
    let inventory = Sidecar::new("inventory")
        .app(&app)
        .app_http2()
        .inbound_filter(Filter::authz(json!({
            "default": "deny",
            "coordinators": coordinators(),
            "rules": [
                {"name": "no-ship", "action": "deny", "paths": ["/shop.v1.Inventory/Ship"]},
                {"name": "inventory-api", "action": "allow",
                 "principals": [{"exact": "anonymous"}], "methods": ["POST"],
                 "paths": ["/shop.v1.Inventory/"]},
                // Does not open the control service.
                {"name": "everything", "action": "allow", "principals": [{"exact": "anonymous"}]},
            ],
        })))
        .start();
    let grpc_status = |path: &str| {
        let a = txmesh_tests::grpc::unary(
            inventory.inbound_addr(),
            "inventory",
            path,
            b"",
            &[],
            std::time::Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (a.grpc_status(), a.trailers_only())
    };
    assert_eq!(grpc_status("/shop.v1.Inventory/Reserve"), (Some(0), false));
    assert_eq!(grpc_status("/shop.v1.Inventory/Ship"), (Some(7), true));
    for m in ["Prepare", "Commit", "Abort"] {
        assert_eq!(
            grpc_status(&format!("/txmesh.v1.Participant/{m}")),
            (Some(7), true),
            "{m}"
        );
    }
    let paths: Vec<String> = app.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, vec!["/shop.v1.Inventory/Reserve"]);
    inventory.scrape_counts(&[
        (
            DECISIONS,
            &[("decision", "allow"), ("rule", "inventory-api")],
            1.0,
        ),
        (DECISIONS, &[("decision", "deny"), ("rule", "no-ship")], 1.0),
        (
            DECISIONS,
            &[("decision", "deny"), ("rule", "txmesh-control")],
            3.0,
        ),
    ]);
}
