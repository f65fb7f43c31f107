//! Self-registration in the txmesh service registry (docs/router.md): the
//! instance's address under `txmesh/services/<service>/<address>`, attached
//! to a 10 s etcd lease kept alive every 3 s, re-registered when the lease is
//! lost (etcd restarted, a long pause), revoked on shutdown.

use base64::Engine;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TTL_S: u64 = 10;

pub struct Registration {
    etcd: String,
    key: String,
    value: String,
    lease: Arc<AtomicI64>,
    agent: ureq::Agent,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

impl Registration {
    /// Starts keeping `service` at `address` registered in the etcd at `etcd`
    /// (`http://host:port`).
    pub fn start(etcd: &str, service: &str, address: &str, zone: Option<&str>) -> Arc<Self> {
        let mut value = json!({"address": address, "version": env!("CARGO_PKG_VERSION")});
        if let Some(z) = zone {
            value["zone"] = json!(z);
        }
        let r = Arc::new(Self {
            etcd: etcd.trim_end_matches('/').to_string(),
            key: format!("txmesh/services/{service}/{address}"),
            value: value.to_string(),
            lease: Arc::new(AtomicI64::new(0)),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(3)))
                .build()
                .into(),
        });
        let me = r.clone();
        std::thread::spawn(move || {
            let mut failing = false;
            loop {
                match me.tick() {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        eprintln!("registry: {e} (etcd {}); retrying every 3 s", me.etcd);
                        failing = true;
                    }
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_secs(3));
            }
        });
        r
    }

    fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.etcd);
        let mut r = self
            .agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body.to_string().as_bytes())
            .map_err(|e| format!("{url}: {e}"))?;
        let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
        if r.status() != 200 {
            return Err(format!("{url} answered {}: {text}", r.status()));
        }
        serde_json::from_str(&text).map_err(|e| format!("{url}: {e}"))
    }

    /// Registers (new lease) or renews the lease; a lost lease registers again.
    fn tick(&self) -> Result<(), String> {
        let lease = self.lease.load(Ordering::SeqCst);
        if lease != 0 {
            let v = self.post("/v3/lease/keepalive", json!({"ID": lease.to_string()}))?;
            // A lease etcd no longer knows comes back without a TTL.
            let ttl = v["result"]["TTL"]
                .as_str()
                .and_then(|t| t.parse::<i64>().ok());
            if ttl.unwrap_or(0) > 0 {
                return Ok(());
            }
            eprintln!("registry: lease {lease} lost; registering again");
        }
        let v = self.post("/v3/lease/grant", json!({"TTL": TTL_S}))?;
        let id: i64 = v["ID"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("lease grant answered {v}"))?;
        self.post(
            "/v3/kv/put",
            json!({"key": b64(&self.key), "value": b64(&self.value), "lease": id.to_string()}),
        )?;
        self.lease.store(id, Ordering::SeqCst);
        eprintln!(
            "registry: registered {} (lease {id}, ttl {TTL_S} s)",
            self.key
        );
        Ok(())
    }

    /// Leaves the registry at once (shutdown).
    pub fn revoke(&self) {
        let lease = self.lease.swap(0, Ordering::SeqCst);
        if lease == 0 {
            return;
        }
        match self.post("/v3/lease/revoke", json!({"ID": lease.to_string()})) {
            Ok(_) => eprintln!("registry: left ({} removed)", self.key),
            Err(e) => {
                eprintln!("registry: cannot revoke lease {lease}: {e} (it expires in {TTL_S} s)")
            }
        }
    }
}
