//! What a `.wasm`'s size costs an Envoy: time from start to ready (the VM
//! compiled, every worker's plugin configured) and resident memory, with no
//! filter and with the txn filter (this build, and optionally other builds
//! of it to compare), at one and two workers. The memory a worker adds is
//! the difference between the two. BENCHMARKS.md, "What the txn filter's
//! size costs".
//!
//! bench-startup [--rounds N] [--compare PATH]...

use std::path::PathBuf;
use std::time::Instant;
use txmesh_tests::{median, Filter, Sidecar, Upstream};

#[derive(clap::Parser)]
struct Args {
    /// Starts per variant and worker count (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Another build of txmesh_txn.wasm to measure in the same run.
    #[arg(long)]
    compare: Vec<PathBuf>,
}

/// Resident memory once it has settled: V8 tiers code up in the background
/// after start, so sample until two readings 100 ms apart differ by less
/// than 64 KiB (at most 5 s; then the last reading).
fn settled_rss_mib(pid: u32) -> f64 {
    let until = Instant::now() + std::time::Duration::from_secs(5);
    let mut last = txmesh_tests::rss_kib(pid);
    while Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = txmesh_tests::rss_kib(pid);
        if now.abs_diff(last) < 64 {
            last = now;
            break;
        }
        last = now;
    }
    last as f64 / 1024.0
}

/// The txn filter loaded from `path`.
fn txn_from(path: &std::path::Path) -> Filter {
    let mut f = Filter::txn(serde_json::json!({
        "begin": [{"method": "POST", "path_prefix": "/checkout"}],
        "node": "bench",
    }));
    f.0["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] =
        serde_json::Value::String(path.display().to_string());
    f
}

fn main() {
    let args: Args = clap::Parser::parse();
    let app = Upstream::fast();
    let current = txmesh_tests::wasm("txmesh_txn");
    let mut variants: Vec<(String, Option<PathBuf>)> = vec![("no filter".into(), None)];
    for p in std::iter::once(&current).chain(&args.compare) {
        let size = std::fs::metadata(p).map_or(0, |m| m.len());
        let label = if *p == current {
            "this build"
        } else {
            "compared"
        };
        variants.push((format!("txn, {size} bytes ({label})"), Some(p.clone())));
    }
    println!(
        "## bench-startup: Envoy start to ready, and RSS when ready (medians of {} starts)\n",
        args.rounds
    );
    println!("| variant | workers | start to ready (ms) | RSS (MiB) |");
    println!("| --- | ---: | ---: | ---: |");
    let mut rows = Vec::new();
    for (name, path) in &variants {
        for workers in [1u32, 2] {
            let (mut ms, mut rss) = (Vec::new(), Vec::new());
            for _ in 0..args.rounds {
                let mut sc = Sidecar::new("bench").app(&app).concurrency(workers);
                if let Some(p) = path {
                    sc = sc.filter(txn_from(p));
                }
                let t = Instant::now();
                let envoy = sc.start();
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                rss.push(settled_rss_mib(envoy.guard.pid()));
            }
            let (ms, rss) = (median(ms), median(rss));
            println!("| {name} | {workers} | {ms:.0} | {rss:.1} |");
            rows.push((name.clone(), workers, ms, rss));
        }
    }
    println!("\nWhat each variant adds to no filter (ms to ready; MiB at 1 worker; MiB per further worker):\n");
    let base = |w: u32| {
        rows.iter()
            .find(|r| r.0 == "no filter" && r.1 == w)
            .map(|r| (r.2, r.3))
    };
    for (name, _) in variants.iter().skip(1) {
        let get = |w: u32| {
            rows.iter()
                .find(|r| &r.0 == name && r.1 == w)
                .map(|r| (r.2, r.3))
        };
        if let (Some(b1), Some(b2), Some(v1), Some(v2)) = (base(1), base(2), get(1), get(2)) {
            println!(
                "- {name}: {:+.0} ms to ready (1 worker), {:+.0} ms (2 workers); {:+.1} MiB at 1 worker, {:+.1} MiB per further worker",
                v1.0 - b1.0,
                v2.0 - b2.0,
                v1.1 - b1.1,
                (v2.1 - v1.1) - (b2.1 - b1.1)
            );
        }
    }
}
