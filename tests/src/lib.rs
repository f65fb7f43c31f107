//! Integration harness for txmesh: real Envoy, real etcd, real HTTP upstreams,
//! all on loopback with free ports. Every process a test starts is owned by a
//! guard that kills it when the test ends (also on panic) and, when the test
//! failed, prints the process's log.
//!
//! One line each:
//! ```text
//! let app = Upstream::start();                       // scripted HTTP server
//! let etcd = Etcd::start();                          // etcd on free ports
//! let sidecar = Sidecar::new("order").app(&app)
//!     .route("payment", payment.addr())
//!     .filter(Filter::metrics(json!({"workload": "order"})))
//!     .start();
//! ```

pub mod certs;
pub mod envoy;
pub mod etcd;
pub mod grpc;
pub mod http;
pub mod linkproxy;
pub mod netns;
pub mod ports;
pub mod process;
pub mod prom;
pub mod txnapp;
pub mod upstream;

pub use certs::{spiffe, Certs};
pub use envoy::{Filter, Sidecar};
pub use etcd::{Etcd, EtcdCluster};
pub use http::{Client, Resp};
pub use prom::Scrape;
pub use txnapp::{Checkout, Downstream, Latch, TxnApp, TxnRecord, Vote};
pub use upstream::{Recorded, Reply, Upstream};

use std::path::PathBuf;

/// The workspace root (parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where `make build-native` puts libtxmesh.so (profile `native`).
pub fn native_dir() -> PathBuf {
    target_dir().join("native")
}

/// The native module; panics with the command to run when it is missing.
pub fn native_module() -> PathBuf {
    let p = native_dir().join("libtxmesh.so");
    assert!(
        p.exists(),
        "{} is missing: run `make build-native` (or `make test`, which builds it) first",
        p.display()
    );
    p
}

/// Path of a release wasm artifact, e.g. `wasm("txmesh_metrics")`. Panics
/// with the command to run when it has not been built. `TXMESH_WASM_DIR`
/// points at another build (a txn filter with a seeded bug compiled in:
/// `make chaos-seeded`).
pub fn wasm(name: &str) -> PathBuf {
    let dir = std::env::var_os("TXMESH_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip1/release"));
    let p = dir.join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run `make build` (or `make test`, which builds it) first",
        p.display()
    );
    p
}

/// The Envoy binary: `$ENVOY_BIN`, else `.venv/bin/envoy` (installed by `scripts/setup.sh`).
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join(".venv/bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found at {}: run `scripts/setup.sh` or set ENVOY_BIN",
        p.display()
    );
    p
}

/// A fresh directory for one test's files (configs, logs, data dirs), under
/// `target/it/`. Kept after the run so a failure can be inspected; the first
/// call in a process removes the directories of processes that have ended
/// (etcd data dirs are large: runs must not fill the disk).
pub fn scratch_dir(label: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| sweep_scratch(&target_dir().join("it")));
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = target_dir()
        .join("it")
        .join(format!("{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}

/// Removes `<label>-<pid>-<n>` directories whose process is gone.
fn sweep_scratch(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `secs` with `what`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The median of a benchmark's samples (the upper one for an even count).
/// The wall clock in epoch ms (what transaction deadlines are in).
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A process's resident memory (VmRSS), KiB; 0 if unknown.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
