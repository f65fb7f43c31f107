//! The shop stack for tests: etcd, the three services (real processes) and
//! their sidecars (txn + metrics filters; the router on order's outbound, as
//! in envoy/order-sidecar.yaml), on free ports. The services register
//! themselves in etcd.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::process::Command;
use txmesh_tests::envoy::{http2, original_dst_cluster, Envoy};
use txmesh_tests::ports::free_port;
use txmesh_tests::process::ChildGuard;
use txmesh_tests::{wait_for, Client, Etcd, Filter, Sidecar};

pub struct Stack {
    pub etcd: Etcd,
    pub order_sc: Envoy,
    pub payment_sc: Envoy,
    pub inventory_sc: Envoy,
    pub services: Vec<ChildGuard>,
    pub dir: std::path::PathBuf,
    pub client: Client,
}

pub fn txn_cfg(node: &str) -> Value {
    json!({"begin": [{"method": "POST", "path_prefix": "/checkout"}], "node": node, "default_timeout_ms": 5000})
}

impl Stack {
    pub fn start() -> Self {
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
        // inventory takes prepare/commit/abort as txmesh.v1.Participant
        // (gRPC, HTTP/2 to the app), as envoy/inventory-sidecar.yaml says.
        let mut grpc_cfg = txn_cfg("inventory");
        grpc_cfg["app_protocol"] = json!("grpc");
        let inventory_sc = Sidecar::new("inventory")
            .app_addr(std::net::SocketAddr::from(([127, 0, 0, 1], ports[2])))
            .app_http2()
            .etcd(&etcd)
            .filter(Filter::txn(grpc_cfg))
            .filter(Filter::metrics(json!({"workload": "inventory"})))
            .start();
        let router = Filter::router(json!({"poll_interval_ms": 200, "services": {
            "payment": {"strategy": "peak_ewma"},
            "inventory": {"strategy": "peak_ewma"},
        }}));
        let order_sc = Sidecar::new("order")
            .app_addr(std::net::SocketAddr::from(([127, 0, 0, 1], ports[0])))
            .etcd(&etcd)
            .inbound_filter(Filter::txn(txn_cfg("order")))
            .inbound_filter(Filter::metrics(json!({"workload": "order"})))
            .outbound_filter(router)
            .outbound_filter(Filter::txn(txn_cfg("order")))
            .outbound_filter(Filter::metrics(json!({"workload": "order"})))
            .route_cluster(original_dst_cluster("payment", "x-txmesh-endpoint"))
            // inventory speaks gRPC (shop.v1.Inventory): HTTP/2.
            .route_cluster(http2(original_dst_cluster(
                "inventory",
                "x-txmesh-endpoint",
            )))
            .start();
        let spawn = |name: &str, port: u16, sc: &Envoy, outbound: bool| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_shop"));
            cmd.arg(name)
                .args(["--port", &port.to_string()])
                .arg("--db")
                .arg(dir.join(format!("{name}.db")))
                .args(["--sidecar-inbound", &sc.ports.inbound.to_string()])
                .args(["--register", &etcd.url()]);
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
        // The router knows both services before the first checkout.
        order_sc.scrape_until("payment and inventory registered", |s| {
            ["payment", "inventory"]
                .iter()
                .all(|svc| s.sum("txmesh_router_endpoints", &[("service", svc)]) == 1.0)
        });
        Stack {
            etcd,
            order_sc,
            payment_sc,
            inventory_sc,
            services,
            dir,
            client,
        }
    }

    pub fn checkout(&self, body: &str) -> txmesh_tests::Resp {
        self.client.must(
            "POST",
            &self.order_sc.inbound_url("/checkout"),
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    }

    pub fn balance(&self, c: &str) -> i64 {
        let r = self.client.must(
            "GET",
            &self.payment_sc.inbound_url(&format!("/accounts/{c}")),
            &[],
            b"",
        );
        r.json()["balance"].as_i64().unwrap()
    }

    pub fn stock(&self, sku: &str) -> i64 {
        let r = self.client.must(
            "GET",
            &self.inventory_sc.inbound_url(&format!("/stock/{sku}")),
            &[],
            b"",
        );
        r.json()["available"].as_i64().unwrap()
    }

    pub fn order(&self, id: i64) -> Value {
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
