//! A real etcd (Debian `etcd-server`) on free loopback ports, with a data dir
//! under the test's scratch dir. Talks to it through etcd's JSON gateway.

use crate::http::Client;
use crate::ports::free_port;
use crate::process::ChildGuard;
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

pub struct Etcd {
    pub guard: ChildGuard,
    pub client_port: u16,
    pub peer_port: u16,
    pub dir: PathBuf,
    client: Client,
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The etcd binary: `$ETCD_BIN`, else `etcd` on PATH.
pub fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_string())
}

impl Etcd {
    pub fn start() -> Self {
        let dir = crate::scratch_dir("etcd");
        let (client_port, peer_port) = (free_port(), free_port());
        let curl = format!("http://127.0.0.1:{client_port}");
        let purl = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(etcd_bin());
        cmd.args(["--name", "t"])
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
            .args(["--initial-cluster", &format!("t={purl}")])
            .args(["--log-level", "warn", "--logger", "zap"]);
        let guard = ChildGuard::spawn("etcd", cmd, &dir, vec![]);
        let etcd = Self {
            guard,
            client_port,
            peer_port,
            dir,
            client: Client::new(),
        };
        crate::wait_for(30, "etcd /health", || {
            let r = etcd.client.get(&format!("{curl}/health")).ok()?;
            (r.status == 200 && r.text().contains("true")).then_some(())
        });
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let r = self.client.must(
            "POST",
            &format!("{}{path}", self.url()),
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "etcd {path}: {}", r.text());
        r.json()
    }

    pub fn put(&self, key: &str, value: &str) {
        self.post(
            "/v3/kv/put",
            json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())}),
        );
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<String> {
        let v = self.post("/v3/kv/range", json!({"key": b64(key.as_bytes())}));
        let kv = v.get("kvs")?.get(0)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(kv.get("value")?.as_str()?)
            .ok()?;
        Some(String::from_utf8_lossy(&raw).into_owned())
    }

    /// Keys and values under `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<(String, String)> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let v = self.post(
            "/v3/kv/range",
            json!({"key": b64(prefix.as_bytes()), "range_end": b64(&end)}),
        );
        let dec = |s: &Value| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(s.as_str().unwrap_or(""))
                .unwrap_or_default();
            String::from_utf8_lossy(&raw).into_owned()
        };
        v.get("kvs")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|kv| (dec(&kv["key"]), dec(&kv["value"])))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops etcd (to test behaviour while it is down).
    pub fn stop(&mut self) {
        self.guard.kill();
    }

    /// Starts etcd again on the same ports and data dir (after `stop`).
    pub fn start_again(&mut self) {
        self.guard.kill();
        let curl = self.url();
        let purl = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_bin());
        cmd.args(["--name", "t"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
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
            .args(["--initial-cluster", &format!("t={purl}")])
            .args(["--log-level", "warn", "--logger", "zap"]);
        let guard = ChildGuard::spawn("etcd-again", cmd, &self.dir, vec![]);
        let old = std::mem::replace(&mut self.guard, guard);
        std::mem::forget(old);
        crate::wait_for(30, "etcd /health after restart", || {
            let r = self.client.get(&format!("{curl}/health")).ok()?;
            (r.status == 200 && r.text().contains("true")).then_some(())
        });
    }
}
