//! Memory over many transactions: the 3-participant checkout (order ->
//! payment, inventory) through txmesh sidecars, driven by closed-loop clients
//! until `txns` transactions or `minutes` have passed, sampling each Envoy's
//! RSS (VmRSS). The txn filter's tables are bounded and reuse their
//! shared-data keys, so RSS must stay flat after warm-up.
//!
//! Run: `make bench-memory` (or `bench-memory [txns] [minutes] [clients]`).

use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use txmesh_tests::{rss_kib, Checkout, Client, Etcd, Filter, Sidecar, Vote};

/// Sidecar RSS over many transactions (BENCHMARKS.md, "Memory").
#[derive(clap::Parser)]
struct Args {
    /// Transactions to run at the most.
    #[arg(default_value_t = 1_000_000)]
    target: u64,
    /// Minutes to run at the most.
    #[arg(default_value_t = 20)]
    minutes: u64,
    /// Concurrent clients.
    #[arg(default_value_t = 8)]
    clients: usize,
}

fn main() {
    let Args {
        target,
        minutes,
        clients,
    } = clap::Parser::parse();
    let etcd = Etcd::start();
    let cfg = |node: &str| {
        json!({"begin": [{"method": "POST", "path_prefix": "/checkout"}], "node": node,
               "default_timeout_ms": 5000, "max_in_flight": 4096})
    };
    let g = Checkout::start(Vote::Commit, Vote::Commit, |n, app| {
        Sidecar::new(n)
            .app(&app.server)
            .etcd(&etcd)
            .filter(Filter::txn(cfg(n)))
            .filter(Filter::metrics(json!({"workload": n})))
    });
    let Checkout {
        order,
        payment,
        inventory,
        order_sc,
        pay_sc,
        inv_sc,
    } = &g;
    let pids = [
        ("order (root)", order_sc.guard.pid()),
        ("payment", pay_sc.guard.pid()),
        ("inventory", inv_sc.guard.pid()),
    ];
    let url = order_sc.inbound_url("/checkout");
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(minutes * 60);
    let run = |n: u64, until: Instant| {
        std::thread::scope(|s| {
            for _ in 0..clients {
                let (done, failed, url) = (done.clone(), failed.clone(), url.clone());
                s.spawn(move || {
                    let c = Client::keep_alive();
                    while done.load(Ordering::Relaxed) < n && Instant::now() < until {
                        match c.request(
                            "POST",
                            &url,
                            &[("content-type", "application/json")],
                            b"{}",
                        ) {
                            Ok(r) if r.status == 200 => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
    };
    // Warm-up: V8, allocators, connection pools, the tables' first fill.
    let warm = 5_000u64.min(target / 10).max(100);
    run(warm, stop_at);
    let base: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    println!("# bench-memory: 3-participant checkouts, {clients} clients, until {target} txns or {minutes} min; RSS in MiB");
    println!(
        "| txns | elapsed s | txn/s | {} |",
        pids.iter()
            .map(|(n, _)| format!("{n} RSS"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!(
        "| ---: | ---: | ---: | {} |",
        pids.iter().map(|_| "---:").collect::<Vec<_>>().join(" | ")
    );
    let t0 = Instant::now();
    let start_done = done.load(Ordering::Relaxed);
    let row = |d: u64| {
        let e = t0.elapsed().as_secs_f64();
        println!(
            "| {d} | {e:.0} | {:.0} | {} |",
            (d - start_done) as f64 / e.max(0.001),
            pids.iter()
                .map(|(_, p)| format!("{:.1}", rss_kib(*p) as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    };
    row(done.load(Ordering::Relaxed));
    let step = (target / 20).max(1000);
    let mut next = start_done + step;
    while done.load(Ordering::Relaxed) < target && Instant::now() < stop_at {
        run(next.min(target), stop_at);
        // The test apps keep a record per txn (this process, not Envoy).
        for a in [&order, &payment, &inventory] {
            a.forget();
        }
        row(done.load(Ordering::Relaxed));
        next += step;
    }
    let end: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    println!();
    println!("| sidecar | RSS after warm-up (MiB) | RSS at the end (MiB) | growth (MiB) |");
    println!("| --- | ---: | ---: | ---: |");
    for (i, (n, _)) in pids.iter().enumerate() {
        println!(
            "| {n} | {:.1} | {:.1} | {:+.1} |",
            base[i] as f64 / 1024.0,
            end[i] as f64 / 1024.0,
            (end[i] as f64 - base[i] as f64) / 1024.0
        );
    }
    println!(
        "\n# {} transactions committed after warm-up ({} before), {} failed requests, {:.0} s",
        done.load(Ordering::Relaxed) - start_done,
        start_done,
        failed.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
}
