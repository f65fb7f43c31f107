//! The shop's three services as real processes behind real sidecars and etcd:
//! checkouts commit or abort atomically, bad requests leave nothing behind.

use serde_json::{json, Value};
use std::process::Command;
use txmesh_tests::envoy::Envoy;
use txmesh_tests::ports::free_port;
use txmesh_tests::process::ChildGuard;
use txmesh_tests::{wait_for, Client, Etcd, Filter, Sidecar};

struct Stack {
    _etcd: Etcd,
    order_sc: Envoy,
    payment_sc: Envoy,
    inventory_sc: Envoy,
    _services: Vec<ChildGuard>,
    client: Client,
}

fn txn_cfg(node: &str) -> Value {
    json!({"begin": [{"method": "POST", "path_prefix": "/checkout"}], "node": node, "default_timeout_ms": 5000})
}

impl Stack {
    fn start() -> Self {
        let etcd = Etcd::start();
        let dir = txmesh_tests::scratch_dir("shop");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let side = |name: &str, port: u16| {
            Sidecar::new(name)
                .app_addr(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .etcd(&etcd)
                .filter(Filter::txn(txn_cfg(name)))
                .filter(Filter::metrics(json!({"workload": name})))
        };
        let payment_sc = side("payment", ports[1]).start();
        let inventory_sc = side("inventory", ports[2]).start();
        let order_sc = side("order", ports[0])
            .route("payment", &[payment_sc.inbound_addr()])
            .route("inventory", &[inventory_sc.inbound_addr()])
            .start();
        let spawn = |name: &str, port: u16, sc: &Envoy, outbound: bool| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_shop"));
            cmd.arg(name)
                .args(["--port", &port.to_string()])
                .arg("--db")
                .arg(dir.join(format!("{name}.db")))
                .args(["--sidecar-inbound", &sc.ports.inbound.to_string()]);
            if outbound {
                cmd.args(["--sidecar-outbound", &sc.ports.outbound.to_string()]);
            }
            ChildGuard::spawn(name, cmd, &dir, vec![])
        };
        let services = vec![
            spawn("order", ports[0], &order_sc, true),
            spawn("payment", ports[1], &payment_sc, false),
            spawn("inventory", ports[2], &inventory_sc, false),
        ];
        let client = Client::new();
        for p in &ports {
            wait_for(20, "service /health", || {
                client
                    .get(&format!("http://127.0.0.1:{p}/health"))
                    .ok()
                    .filter(|r| r.status == 200)
            });
        }
        Stack {
            _etcd: etcd,
            order_sc,
            payment_sc,
            inventory_sc,
            _services: services,
            client,
        }
    }

    fn checkout(&self, body: &str) -> txmesh_tests::Resp {
        self.client.must(
            "POST",
            &self.order_sc.inbound_url("/checkout"),
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    }

    fn balance(&self, c: &str) -> i64 {
        let r = self.client.must(
            "GET",
            &self.payment_sc.inbound_url(&format!("/accounts/{c}")),
            &[],
            b"",
        );
        r.json()["balance"].as_i64().unwrap()
    }

    fn stock(&self, sku: &str) -> i64 {
        let r = self.client.must(
            "GET",
            &self.inventory_sc.inbound_url(&format!("/stock/{sku}")),
            &[],
            b"",
        );
        r.json()["available"].as_i64().unwrap()
    }

    fn order(&self, id: i64) -> Value {
        self.client
            .must(
                "GET",
                &self.order_sc.inbound_url(&format!("/orders/{id}")),
                &[],
                b"",
            )
            .json()
    }
}

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
        (s.balance("alice") == 95_000).then_some(())
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
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!((s.balance("dave"), s.stock("widget")), (0, 998));

    // Only 3 gizmos: 4 is out of stock, alice keeps her money.
    let r = s.checkout(r#"{"customer": "alice", "sku": "gizmo", "qty": 4}"#);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["reason"], "out_of_stock");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!((s.balance("alice"), s.stock("gizmo")), (95_000, 3));
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
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!((s.balance("alice"), s.stock("widget")), (100_000, 1_000));
    // Every sidecar's table is empty again.
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
