//! Load balancing under a bad endpoint: five upstream servers, one of them
//! slow (+50 ms on every request) or stalling (2 s per request for the middle
//! third of the run, like linkerd's published case), behind one Envoy with
//! txmesh_router. Three services list the same five servers, one per
//! strategy (round_robin, least_request, peak_ewma); each is driven at the
//! same fixed rate (open loop: latency counts from each request's scheduled
//! time, so a stalled request also delays what queues behind it), in
//! alternating rounds within one run. Reports p50/p99, success rate and the
//! share of requests the bad endpoint got, and p99 relative to round robin.
//!
//! Run: `make bench-router` (or `bench-router [secs] [rate] [rounds]`).

use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use txmesh_tests::envoy::original_dst_cluster;
use txmesh_tests::{median, Client, Etcd, Filter, Reply, Sidecar, Upstream};

const STRATEGIES: [&str; 3] = ["round_robin", "least_request", "peak_ewma"];

#[derive(Clone, Copy, Debug)]
struct Run {
    p50: f64,
    p99: f64,
    ok: f64,
    bad_share: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `rate` requests/s for `secs` at `url` with Host `service`, from 32 client
/// threads (request i is due at start + i/rate).
fn drive(url: &str, service: &str, rate: u64, secs: u64) -> (Vec<f64>, usize) {
    let total = rate * secs;
    let lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let failed = Arc::new(Mutex::new(0usize));
    let start = Instant::now() + Duration::from_millis(100);
    let threads = 32u64;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (url, service, lat, failed) = (
                url.to_string(),
                service.to_string(),
                lat.clone(),
                failed.clone(),
            );
            std::thread::spawn(move || {
                let c = Client::keep_alive();
                let mut i = t;
                while i < total {
                    let due = start + Duration::from_micros(i * 1_000_000 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let r = c.request("GET", &url, &[("host", &service)], b"");
                    let ms = due.elapsed().as_secs_f64() * 1000.0;
                    if !matches!(r, Ok(ref r) if r.status == 200) {
                        *failed.lock().unwrap() += 1;
                    }
                    lat.lock().unwrap().push(ms);
                    i += threads;
                }
            })
        })
        .collect();
    for h in hs {
        let _ = h.join();
    }
    let mut v = std::mem::take(&mut *lat.lock().unwrap());
    v.sort_by(f64::total_cmp);
    let failed = *failed.lock().unwrap();
    (v, failed)
}

fn scenario(name: &str, stall: bool, secs: u64, rate: u64, rounds: usize) {
    let etcd = Etcd::start();
    let t0 = Arc::new(Mutex::new(Instant::now()));
    let ups: Vec<Upstream> = (0..5)
        .map(|i| {
            let t0 = t0.clone();
            Upstream::with(move |_| {
                if i != 0 {
                    return Reply::ok();
                }
                if !stall {
                    return Reply::ok().delay(Duration::from_millis(50));
                }
                // Stalls 2 s for the middle third of each run.
                let e = t0.lock().unwrap().elapsed().as_secs_f64();
                let third = secs as f64 / 3.0;
                if e >= third && e < 2.0 * third {
                    Reply::ok().delay(Duration::from_secs(2))
                } else {
                    Reply::ok()
                }
            })
        })
        .collect();
    let mut services = serde_json::Map::new();
    let mut sc = Sidecar::new("bench").etcd(&etcd).concurrency(1);
    for s in STRATEGIES {
        services.insert(s.replace('_', "-"), json!({"strategy": s}));
        sc = sc.route_cluster(original_dst_cluster(
            &s.replace('_', "-"),
            "x-txmesh-endpoint",
        ));
        for u in &ups {
            etcd.register(&s.replace('_', "-"), u.addr(), json!({}), 0);
        }
    }
    let envoy = sc
        .outbound_filter(Filter::router(
            json!({"poll_interval_ms": 200, "services": services}),
        ))
        .start();
    let url = envoy.outbound_url("/");
    std::thread::sleep(Duration::from_secs(1));
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); STRATEGIES.len()];
    for round in 0..rounds {
        for (k, s) in STRATEGIES.iter().enumerate() {
            let svc = s.replace('_', "-");
            let before = ups[0].count();
            *t0.lock().unwrap() = Instant::now();
            let (lat, failed) = drive(&url, &svc, rate, secs);
            let bad = ups[0].count() - before;
            let n = lat.len().max(1) as f64;
            let r = Run {
                p50: pct(&lat, 0.50),
                p99: pct(&lat, 0.99),
                ok: 100.0 * (n - failed as f64) / n,
                bad_share: 100.0 * bad as f64 / n,
            };
            eprintln!(
                "[bench-router] {name} round {} {s}: p50 {:.1} ms, p99 {:.1} ms, success {:.2}%, bad endpoint {:.1}%",
                round + 1,
                r.p50,
                r.p99,
                r.ok,
                r.bad_share
            );
            runs[k].push(r);
        }
    }
    let rr_p99 = median(runs[0].iter().map(|r| r.p99).collect());
    println!("\n### {name}: {rate} req/s for {secs} s, {rounds} rounds (medians)\n");
    println!(
        "| strategy | p50 ms | p99 ms | p99 / round_robin | success % | to the bad endpoint % |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (k, s) in STRATEGIES.iter().enumerate() {
        let m = |f: fn(&Run) -> f64| median(runs[k].iter().map(f).collect());
        let p99 = m(|r| r.p99);
        println!(
            "| {s} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} |",
            m(|r| r.p50),
            p99,
            p99 / rr_p99,
            m(|r| r.ok),
            m(|r| r.bad_share)
        );
    }
    println!(
        "\nraw p99 ms per round: {}",
        STRATEGIES
            .iter()
            .enumerate()
            .map(|(k, s)| format!(
                "{s} {:?}",
                runs[k]
                    .iter()
                    .map(|r| (r.p99 * 10.0).round() / 10.0)
                    .collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// Endpoint picking under a slow or failing endpoint: each strategy's
/// latency and success (BENCHMARKS.md, "Load balancing").
#[derive(clap::Parser)]
struct Args {
    /// Seconds per scenario and strategy.
    #[arg(default_value_t = 15)]
    secs: u64,
    /// Requests per second.
    #[arg(default_value_t = 200)]
    rate: u64,
    /// Rounds (medians are reported).
    #[arg(default_value_t = 2)]
    rounds: usize,
}

fn main() {
    let Args { secs, rate, rounds } = clap::Parser::parse();
    println!("## bench-router: 5 endpoints, Envoy --concurrency 1, txmesh_router, ORIGINAL_DST");
    scenario("one endpoint 50 ms slower", false, secs, rate, rounds);
    scenario(
        "one endpoint stalls 2 s (middle third of each run)",
        true,
        secs,
        rate,
        rounds,
    );
}
