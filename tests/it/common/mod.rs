//! The shop topology shared by the transaction tests: order -> {payment,
//! inventory}, each app behind its own sidecar, one etcd.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::time::Duration;
use txmesh_tests::envoy::Envoy;
use txmesh_tests::{Checkout, Client, Etcd, Filter, Resp, Sidecar, TxnApp, Vote};

pub fn txn_cfg(node: &str) -> Value {
    json!({
        "begin": [{"method": "POST", "path_prefix": "/checkout"}],
        "default_timeout_ms": 2000,
        "node": node,
    })
}

pub fn sidecar(name: &str, app: &TxnApp, etcd_addr: std::net::SocketAddr) -> Sidecar {
    sidecar_with(name, app, etcd_addr, &json!({}))
}

pub fn sidecar_with(
    name: &str,
    app: &TxnApp,
    etcd_addr: std::net::SocketAddr,
    extra: &Value,
) -> Sidecar {
    let mut cfg = txn_cfg(name);
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    Sidecar::new(name)
        .app(&app.server)
        .etcd_addr(etcd_addr)
        .filter(Filter::txn(cfg))
}

/// order -> {payment, inventory}, each app behind its own sidecar.
pub struct Shop {
    pub etcd: Etcd,
    pub order: TxnApp,
    pub payment: TxnApp,
    pub inventory: TxnApp,
    pub order_sc: Envoy,
    pub payment_sc: Envoy,
    pub inventory_sc: Envoy,
    pub client: Client,
}

impl Shop {
    pub fn start(payment_vote: Vote, inventory_vote: Vote) -> Self {
        Self::start_with(payment_vote, inventory_vote, &json!({}))
    }

    /// With extra txn filter settings merged into every sidecar's config.
    pub fn start_with(payment_vote: Vote, inventory_vote: Vote, extra: &Value) -> Self {
        Self::start_on(Etcd::start(), payment_vote, inventory_vote, extra)
    }

    /// On an etcd of the test's own (flags: quota, compaction).
    pub fn start_on(etcd: Etcd, payment_vote: Vote, inventory_vote: Vote, extra: &Value) -> Self {
        let g = Checkout::start(payment_vote, inventory_vote, |name, app| {
            sidecar_with(name, app, etcd.addr(), extra)
        });
        Shop {
            etcd,
            order: g.order,
            payment: g.payment,
            inventory: g.inventory,
            order_sc: g.order_sc,
            payment_sc: g.pay_sc,
            inventory_sc: g.inv_sc,
            client: Client::new(),
        }
    }

    pub fn checkout(&self) -> Resp {
        self.client.must(
            "POST",
            &self.order_sc.inbound_url("/checkout"),
            &[("content-type", "application/json")],
            b"{\"sku\":\"widget\"}",
        )
    }

    pub fn apps(&self) -> [&TxnApp; 3] {
        [&self.order, &self.payment, &self.inventory]
    }
}

pub fn txn_of(r: &Resp) -> String {
    r.header("x-txmesh-txn")
        .unwrap_or_else(|| panic!("no x-txmesh-txn on the response: {r:?}"))
        .to_string()
}

/// Sends raw bytes as an HTTP/1.1 request and returns the raw response head.
pub fn raw_request(port: u16, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

pub fn decision(etcd: &Etcd, txn: &str) -> Option<Value> {
    etcd.get(&format!("txmesh/decisions/{txn}"))
        .map(|v| serde_json::from_str(&v).unwrap())
}

/// Each app: one business call, exactly one prepare, then one commit (waits
/// up to 10 s for the commit: phase 2 runs after the answer).
pub fn assert_committed_once(apps: &[&TxnApp], txn: &str) {
    for app in apps {
        txmesh_tests::wait_for(10, &format!("{} commit", app.name), || {
            (app.record(txn).commits == 1).then_some(())
        });
        let rec = app.record(txn);
        assert_eq!(
            (rec.business, rec.prepares, rec.commits, rec.aborts),
            (1, 1, 1, 0),
            "{}: {rec:?}",
            app.name
        );
        assert!(app.errors().is_empty(), "{}: {:?}", app.name, app.errors());
    }
}
