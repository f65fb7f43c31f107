//! The stack txmeshctl's tests run against: etcd, and order -> payment, each
//! app behind a sidecar with the txn filter (`POST /checkout` begins).
#![allow(dead_code)]

use serde_json::json;
use std::sync::{Arc, RwLock};
use txmesh_tests::envoy::Envoy;
use txmesh_tests::{Downstream, Etcd, Filter, Sidecar, TxnApp, Vote};

pub struct Stack {
    pub etcd: Etcd,
    pub payment: TxnApp,
    pub pay_sc: Envoy,
    pub order: TxnApp,
    pub order_sc: Envoy,
}

impl Stack {
    pub fn start() -> Self {
        let etcd = Etcd::start();
        let cfg =
            |n: &str| json!({"begin": [{"method": "POST", "path_prefix": "/checkout"}], "node": n});
        let payment = TxnApp::start("payment", Vote::Commit);
        let pay_sc = Sidecar::new("payment")
            .app(&payment.server)
            .etcd(&etcd)
            .filter(Filter::txn(cfg("payment")))
            .start();
        let calls = Arc::new(RwLock::new(Vec::new()));
        let order = TxnApp::calling("order", Vote::Commit, calls.clone());
        let order_sc = Sidecar::new("order")
            .app(&order.server)
            .etcd(&etcd)
            .filter(Filter::txn(cfg("order")))
            .route("payment", &[pay_sc.inbound_addr()])
            .start();
        *calls.write().unwrap() = vec![Downstream {
            host: "payment".into(),
            outbound_port: order_sc.ports.outbound,
        }];
        Self {
            etcd,
            payment,
            pay_sc,
            order,
            order_sc,
        }
    }

    /// The sidecars' status endpoints (their inbound listeners here).
    pub fn sidecars(&self) -> Vec<String> {
        vec![
            format!("http://{}", self.order_sc.inbound_addr()),
            format!("http://{}", self.pay_sc.inbound_addr()),
        ]
    }
}
