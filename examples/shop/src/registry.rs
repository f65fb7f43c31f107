//! Self-registration in the txmesh service registry (docs/router.md): the
//! instance's address under `txmesh/services/<service>/<address>`, attached
//! to a 10 s etcd lease kept alive every 3 s, re-registered when the lease is
//! lost (etcd restarted, a long pause), revoked on shutdown.

use serde_json::json;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use txmesh_core::router::registry::{entry_key, DEFAULT_PREFIX};
use txmesh_etcd::Etcd;

const TTL_S: u64 = 10;

pub struct Registration {
    etcd: Etcd,
    key: String,
    value: String,
    lease: Arc<AtomicI64>,
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
            etcd: Etcd::with_timeout(etcd, Duration::from_secs(3)),
            key: entry_key(DEFAULT_PREFIX, service, address),
            value: value.to_string(),
            lease: Arc::new(AtomicI64::new(0)),
        });
        let me = r.clone();
        std::thread::spawn(move || {
            let mut failing = false;
            loop {
                match me.tick() {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        eprintln!("registry: {e}; retrying every 3 s");
                        failing = true;
                    }
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_secs(3));
            }
        });
        r
    }

    /// Registers (new lease) or renews the lease; a lost lease registers again.
    fn tick(&self) -> txmesh_etcd::Result<()> {
        let lease = self.lease.load(Ordering::SeqCst);
        if lease != 0 {
            if self.etcd.lease_keepalive(lease)?.is_some() {
                return Ok(());
            }
            eprintln!("registry: lease {lease} lost; registering again");
        }
        let id = self.etcd.lease_grant(TTL_S)?;
        self.etcd.put_leased(&self.key, self.value.as_bytes(), id)?;
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
        match self.etcd.lease_revoke(lease) {
            Ok(()) => eprintln!("registry: left ({} removed)", self.key),
            Err(e) => {
                eprintln!("registry: cannot revoke lease {lease}: {e} (it expires in {TTL_S} s)")
            }
        }
    }
}
