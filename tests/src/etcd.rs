//! A real etcd (Debian `etcd-server`) on free loopback ports, with a data dir
//! under the test's scratch dir; one member or a cluster of several. Talks to
//! it through etcd's JSON gateway.

use crate::http::Client;
use crate::ports::free_port;
use crate::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The registry key of `service`'s instance at `addr` (default prefix).
pub fn registry_key(service: &str, addr: std::net::SocketAddr) -> String {
    use txmesh_core::router::registry::{entry_key, DEFAULT_PREFIX};
    entry_key(DEFAULT_PREFIX, service, &addr.to_string())
}

pub struct Etcd {
    pub guard: ChildGuard,
    /// The address it listens on: loopback, or its pod's.
    pub host: std::net::Ipv4Addr,
    /// The pod it runs in (`None`: the test's own network namespace).
    pod: Option<crate::netns::Pod>,
    pub client_port: u16,
    pub peer_port: u16,
    pub dir: PathBuf,
    client: Client,
    name: String,
    initial: String,
    extra: Vec<String>,
}

impl Drop for Etcd {
    /// Stops etcd and removes its data dir (~120 MiB of preallocated WAL per
    /// member); the log stays for inspection.
    fn drop(&mut self) {
        self.guard.kill();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
    }
}

/// A client call's result, or the test fails with etcd's error.
fn must<T>(r: txmesh_etcd::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// The etcd binary: `$ETCD_BIN`, else `etcd` on PATH.
pub fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_string())
}

/// Where a member runs: its address and, in a pod network, its pod.
#[derive(Clone)]
struct Place {
    host: std::net::Ipv4Addr,
    pod: Option<crate::netns::Pod>,
}

impl Place {
    fn loopback() -> Self {
        Self {
            host: std::net::Ipv4Addr::LOCALHOST,
            pod: None,
        }
    }
}

/// Starts one etcd member. `state`: `new` for a fresh cluster,
/// `existing` to rejoin (ignored when the data dir already holds a member).
#[allow(clippy::too_many_arguments)]
fn spawn_member(
    name: &str,
    at: &Place,
    client: u16,
    peer: u16,
    dir: &Path,
    initial: &str,
    state: &str,
    extra: &[String],
) -> ChildGuard {
    let curl = format!("http://{}:{client}", at.host);
    let purl = format!("http://{}:{peer}", at.host);
    let mut cmd = match &at.pod {
        Some(pod) => pod.command(etcd_bin()),
        None => Command::new(etcd_bin()),
    };
    cmd.args(["--name", name])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            &curl,
            "--advertise-client-urls",
            &curl,
        ])
        .args([
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
        ])
        .args([
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            state,
        ])
        .args(["--log-level", "warn", "--logger", "zap"])
        .args(extra);
    ChildGuard::spawn(&format!("etcd-{name}"), cmd, dir, vec![])
}

/// A multi-member etcd cluster (each member its own process), on loopback or
/// one member per pod.
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// `n` members on loopback.
    pub fn start(n: usize) -> Self {
        Self::start_at(vec![Place::loopback(); n])
    }

    /// One member in each pod (their addresses, etcd's usual ports).
    pub fn start_in(pods: &[crate::netns::Pod]) -> Self {
        Self::start_at(
            pods.iter()
                .map(|p| Place {
                    host: p.ip,
                    pod: Some(p.clone()),
                })
                .collect(),
        )
    }

    fn start_at(places: Vec<Place>) -> Self {
        // In a pod every port is free: etcd's own. On loopback, free ones.
        let ports: Vec<(u16, u16)> = places
            .iter()
            .map(|p| match p.pod {
                Some(_) => (2379, 2380),
                None => (free_port(), free_port()),
            })
            .collect();
        let initial = ports
            .iter()
            .zip(&places)
            .enumerate()
            .map(|(i, ((_, p), at))| format!("m{i}=http://{}:{p}", at.host))
            .collect::<Vec<_>>()
            .join(",");
        let members: Vec<Etcd> = ports
            .iter()
            .zip(places)
            .enumerate()
            .map(|(i, ((c, p), at))| Etcd::member(&format!("m{i}"), at, *c, *p, &initial))
            .collect();
        for m in &members {
            m.wait_healthy();
        }
        Self { members }
    }

    /// `kill -9` member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(m) = self.members.get_mut(i) {
            m.stop();
        }
    }

    /// Restarts member `i` with its data dir and waits until it serves
    /// again (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        if let Some(m) = self.members.get_mut(i) {
            m.relaunch("existing");
            m.wait_healthy();
        }
    }

    pub fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.members.iter().map(Etcd::addr).collect()
    }

    /// A healthy member (waits up to 30 s: after a member restart the
    /// cluster may be electing a leader).
    pub fn any(&self) -> &Etcd {
        crate::wait_for(30, "a healthy etcd member (quorum)", || {
            self.members.iter().find(|m| m.healthy())
        })
    }
}

impl Etcd {
    /// A single-member etcd.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A single-member etcd with more flags (`--quota-backend-bytes`,
    /// `--auto-compaction-*`, ...).
    pub fn start_with(extra: &[&str]) -> Self {
        let (client, peer) = (free_port(), free_port());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let initial = format!("t=http://127.0.0.1:{peer}");
        let etcd = Self::member_with("t", Place::loopback(), client, peer, &initial, extra);
        etcd.wait_healthy();
        etcd
    }

    fn member(name: &str, at: Place, client_port: u16, peer_port: u16, initial: &str) -> Self {
        Self::member_with(name, at, client_port, peer_port, initial, Vec::new())
    }

    fn member_with(
        name: &str,
        at: Place,
        client_port: u16,
        peer_port: u16,
        initial: &str,
        extra: Vec<String>,
    ) -> Self {
        let dir = crate::scratch_dir(&format!("etcd-{name}"));
        let guard = spawn_member(
            name,
            &at,
            client_port,
            peer_port,
            &dir,
            initial,
            "new",
            &extra,
        );
        Self {
            extra,
            guard,
            host: at.host,
            pod: at.pod,
            client_port,
            peer_port,
            dir,
            client: Client::new(),
            name: name.to_string(),
            initial: initial.to_string(),
        }
    }

    fn relaunch(&mut self, state: &str) {
        self.guard.kill();
        let at = Place {
            host: self.host,
            pod: self.pod.clone(),
        };
        let guard = spawn_member(
            &self.name,
            &at,
            self.client_port,
            self.peer_port,
            &self.dir,
            &self.initial,
            state,
            &self.extra,
        );
        let old = std::mem::replace(&mut self.guard, guard);
        std::mem::forget(old); // already killed
    }

    fn healthy(&self) -> bool {
        self.client
            .get(&format!("{}/health", self.url()))
            .is_ok_and(|r| r.status == 200 && r.text().contains("true"))
    }

    fn wait_healthy(&self) {
        crate::wait_for(60, "etcd /health", || self.healthy().then_some(()));
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.client_port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.host, self.client_port))
    }

    /// The client (txmesh-etcd, the project's one etcd client): calls that
    /// return etcd's refusal instead of failing the test.
    pub fn client(&self) -> txmesh_etcd::Etcd {
        txmesh_etcd::Etcd::new(&self.url())
    }

    /// Puts `key`, retrying for up to 20 s while the cluster elects a leader.
    pub fn put_retrying(&self, key: &str, value: &str) {
        let c = self.client();
        crate::wait_for(20, "an etcd put to succeed", || {
            c.put(key, value.as_bytes()).ok()
        });
    }

    pub fn put(&self, key: &str, value: &str) {
        must(self.client().put(key, value.as_bytes()));
    }

    /// Grants a lease of `ttl_s` seconds; returns its id.
    pub fn lease_grant(&self, ttl_s: u64) -> i64 {
        must(self.client().lease_grant(ttl_s))
    }

    /// Renews a lease once.
    pub fn lease_keepalive(&self, id: i64) {
        must(self.client().lease_keepalive(id));
    }

    /// Revokes a lease (its keys go at once).
    pub fn lease_revoke(&self, id: i64) {
        must(self.client().lease_revoke(id));
    }

    /// Puts `key` attached to lease `lease`.
    pub fn put_leased(&self, key: &str, value: &str, lease: i64) {
        must(self.client().put_leased(key, value.as_bytes(), lease));
    }

    /// Registers `service`'s instance at `addr` in the router's registry
    /// (default prefix), its JSON `{"address": ...}` plus the fields of
    /// `extra`; attached to `lease` unless it is 0.
    pub fn register(
        &self,
        service: &str,
        addr: std::net::SocketAddr,
        extra: serde_json::Value,
        lease: i64,
    ) {
        let mut v = serde_json::json!({"address": addr.to_string()});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let key = registry_key(service, addr);
        if lease == 0 {
            self.put(&key, &v.to_string());
        } else {
            self.put_leased(&key, &v.to_string(), lease);
        }
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) {
        must(self.client().delete(key));
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<String> {
        must(self.client().get(key)).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Keys and values under `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<(String, String)> {
        must(self.client().list(prefix))
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect()
    }

    /// How many keys are under `prefix`.
    pub fn count(&self, prefix: &str) -> u64 {
        must(self.client().count(prefix))
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        must(self.client().revision()).unsigned_abs()
    }

    /// Frees space as docs/operations.md says: compact, defragment, disarm.
    pub fn free_space(&self) {
        must(self.client().free_space());
    }

    /// The alarms raised (`NOSPACE`, ...).
    pub fn alarms(&self) -> Vec<String> {
        must(self.client().alarms())
    }

    /// A gauge or counter from etcd's own `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let r = self
            .client
            .must("GET", &format!("{}/metrics", self.url()), &[], b"");
        crate::prom::Scrape::parse(&r.text()).sum(name, &[])
    }

    /// Stops etcd (to test behaviour while it is down).
    pub fn stop(&mut self) {
        self.guard.kill();
    }

    /// Starts etcd again on the same ports and data dir (after `stop`).
    pub fn start_again(&mut self) {
        self.relaunch("new");
        self.wait_healthy();
    }
}
