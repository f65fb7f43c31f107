//! The cost of a transaction, for 1 participant (an initiator alone) and for
//! a 3-participant checkout (order -> payment,
//! inventory) through txmesh sidecars, with transactions (`POST /checkout`,
//! a begin rule) and without (`POST /plain`: the same sidecars, apps and calls,
//! no transaction), measured alternately in one run.
//!
//! Run: `make bench-txn` (or `cargo run --profile bench-native -p txmesh-tests --bin bench-txn -- [secs] [clients] [rounds]`).

use serde_json::json;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use txmesh_tests::{grpc, median, Checkout, Client, Etcd, Filter, Reply, Sidecar, TxnApp, Vote};

/// Transactions' ids with when the client had their answers.
type Answers = Vec<(String, Instant)>;

/// The pause of the paced single client: longer than phase 2 takes.
const THINK_MS: u64 = 20;

struct Run {
    rps: f64,
    p50: f64,
    p99: f64,
    ok: usize,
    errors: usize,
    /// Every answered request's latency, ms, sorted.
    lat: Vec<f64>,
    /// When the client had each transaction's answer (its id from
    /// `x-txmesh-txn`).
    answered: Answers,
}

/// The `p` quantile of sorted values.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// What the clients call: an HTTP URL, or a gRPC method at an address.
#[derive(Clone)]
enum Target {
    Http(String),
    Grpc {
        addr: std::net::SocketAddr,
        path: &'static str,
    },
}

/// A client thread's connection to a [`Target`], kept for its calls.
enum Conn {
    Http(Client),
    Grpc(grpc::Channel),
}

impl Conn {
    fn to(t: &Target) -> Self {
        match t {
            Target::Http(_) => Conn::Http(Client::keep_alive()),
            Target::Grpc { addr, .. } => Conn::Grpc(
                grpc::Channel::connect(*addr, "order", Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
        }
    }

    /// One call: `Some(txn id, if any)` when it succeeded (HTTP 200, gRPC OK).
    fn call(&mut self, t: &Target) -> Option<Option<String>> {
        match (self, t) {
            (Conn::Http(c), Target::Http(url)) => {
                match c.request("POST", url, &[("content-type", "application/json")], b"{}") {
                    Ok(r) if r.status == 200 => Some(r.header("x-txmesh-txn").map(str::to_string)),
                    _ => None,
                }
            }
            (Conn::Grpc(ch), Target::Grpc { path, .. }) => match ch.unary(path, b"", &[]) {
                Ok(a) if a.grpc_status() == Some(0) => {
                    Some(a.metadata("x-txmesh-txn").map(str::to_string))
                }
                _ => None,
            },
            _ => None,
        }
    }
}

/// `clients` closed-loop clients for `secs`; each waits `think` after each
/// answer (zero: back to back).
fn load(target: &Target, secs: u64, clients: usize, think: Duration) -> Run {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let results: Vec<(Vec<f64>, usize, Answers)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let mut c = Conn::to(target);
                    let mut lat = Vec::new();
                    let mut errors = 0;
                    let mut answered = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match c.call(target) {
                            Some(id) => {
                                let at = Instant::now();
                                lat.push((at - t).as_secs_f64() * 1e3);
                                if let Some(id) = id {
                                    answered.push((id, at));
                                }
                            }
                            None => errors += 1,
                        }
                        if !think.is_zero() {
                            std::thread::sleep(think);
                        }
                    }
                    (lat, errors, answered)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut lat: Vec<f64> = results
        .iter()
        .flat_map(|(l, _, _)| l.iter().copied())
        .collect();
    let errors = results.iter().map(|(_, e, _)| e).sum();
    let answered = results.into_iter().flat_map(|(_, _, a)| a).collect();
    lat.sort_by(f64::total_cmp);
    Run {
        // Throughput of the closed loop, think time included.
        rps: lat.len() as f64 / secs as f64,
        p50: quantile(&lat, 0.50),
        p99: quantile(&lat, 0.99),
        ok: lat.len(),
        errors,
        lat,
        answered,
    }
}

fn measure(
    graph: &str,
    (plain, txn): (&Target, &Target),
    secs: u64,
    rounds: usize,
    level: usize,
    think: Duration,
) -> Answers {
    let pace = if think.is_zero() {
        String::new()
    } else {
        format!(", {} ms between requests", think.as_millis())
    };
    println!("\n## {graph}: {level} closed-loop client(s){pace}\n");
    println!(
        "{:<6} {:<6} {:>9} {:>8} {:>8} {:>7} {:>6}",
        "round", "config", "req/s", "p50 ms", "p99 ms", "ok", "errors"
    );
    let (mut a, mut b): (Vec<Run>, Vec<Run>) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for (name, url, dst) in [("plain", plain, &mut a), ("txn", txn, &mut b)] {
            let run = load(url, secs, level, think);
            println!(
                "{:<6} {:<6} {:>9.1} {:>8.2} {:>8.2} {:>7} {:>6}",
                r + 1,
                name,
                run.rps,
                run.p50,
                run.p99,
                run.ok,
                run.errors
            );
            dst.push(run);
        }
    }
    let m = |v: &Vec<Run>, f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let (arps, brps) = (m(&a, |r| r.rps), m(&b, |r| r.rps));
    let (a50, b50) = (m(&a, |r| r.p50), m(&b, |r| r.p50));
    let (a99, b99) = (m(&a, |r| r.p99), m(&b, |r| r.p99));
    println!();
    println!("| {graph}, {level} client(s){pace}, median of {rounds} | no transaction | txmesh transaction | ratio txn/plain |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| throughput (checkouts/s) | {arps:.1} | {brps:.1} | {:.2} |",
        brps / arps
    );
    println!(
        "| p50 latency (ms) | {a50:.2} | {b50:.2} | {:.2} |",
        b50 / a50
    );
    println!(
        "| p99 latency (ms) | {a99:.2} | {b99:.2} | {:.2} |",
        b99 / a99
    );
    println!("| added p50 (ms) | | {:.2} | |", b50 - a50);
    // Every request of every round in one distribution: the numbers the
    // root's decision log (also pooled over the rounds) is compared with.
    let pooled = |v: &[Run]| {
        let mut all: Vec<f64> = v.iter().flat_map(|r| r.lat.iter().copied()).collect();
        all.sort_by(f64::total_cmp);
        quantile(&all, 0.5)
    };
    println!(
        "# every request of the {rounds} rounds pooled: p50 plain {:.2} ms, txn {:.2} ms (added {:.2} ms)",
        pooled(&a),
        pooled(&b),
        pooled(&b) - pooled(&a)
    );
    b.into_iter().flat_map(|r| r.answered).collect()
}

/// Phase 2 against the answer: for each transaction, when the last of its
/// participants' first commit arrived, relative to when the client had the
/// answer (both on this process's clock: the apps run in it). Negative: the
/// commit came before the answer reached the client.
fn phase2(answered: &[(String, Instant)], commits: Vec<(String, Instant)>) {
    let mut last: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    for (txn, at) in commits {
        let e = last.entry(txn).or_insert(at);
        *e = (*e).max(at);
    }
    let mut d: Vec<f64> = answered
        .iter()
        .filter_map(|(txn, ans)| {
            let c = *last.get(txn)?;
            Some(if c >= *ans {
                (c - *ans).as_secs_f64() * 1e3
            } else {
                -((*ans - c).as_secs_f64() * 1e3)
            })
        })
        .collect();
    if d.is_empty() {
        return;
    }
    d.sort_by(f64::total_cmp);
    let before = d.iter().filter(|v| **v < 0.0).count();
    println!(
        "# phase 2 after the answer ({} txns): the last participant's commit arrived a median {:.2} ms after the client had its answer (p99 {:.2} ms; {:.0}% before it)",
        d.len(),
        quantile(&d, 0.5),
        quantile(&d, 0.99),
        100.0 * before as f64 / d.len() as f64
    );
}

/// Where the time goes, from the root's decision log lines of one
/// measurement (`app_us`: begin to the app's answer; `prepare_us`: the app's
/// answer to the last vote; `record_us`: the last vote to the answer — the
/// etcd write, or the one-phase commit).
fn breakdown(log: &str) {
    let field = |line: &str, key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    let (mut app, mut prep, mut rec, mut etcd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in log.lines().filter(|l| l.contains(" committed reason=ok ")) {
        if let Some(e) = field(l, "etcd_us=") {
            etcd.push(e / 1000.0);
        }
        if let (Some(a), Some(p), Some(r)) = (
            field(l, "app_us="),
            field(l, "prepare_us="),
            field(l, "record_us="),
        ) {
            app.push(a / 1000.0);
            prep.push(p / 1000.0);
            rec.push(r / 1000.0);
        }
    }
    if prep.is_empty() {
        return;
    }
    let span: Vec<f64> = app
        .iter()
        .zip(&prep)
        .zip(&rec)
        .map(|((a, p), r)| a + p + r)
        .collect();
    println!(
        "# where the time goes (the root's decision log, {} committed txns, medians): the app's work (begin to its answer, downstream calls included) {:.2} ms, the prepare round {:.2} ms, the record write + answer {:.2} ms; the root's whole span (begin to the answer released) {:.2} ms",
        prep.len(),
        median(app),
        median(prep),
        median(rec),
        median(span)
    );
    if !etcd.is_empty() {
        println!(
            "# of the record write + answer: etcd's round trip as the filter saw it (the write dispatched to its answer's callback), median {:.2} ms over {} txns",
            median(etcd.clone()),
            etcd.len()
        );
    }
}

/// The initiating app's own time per business request (its downstream
/// calls included), as the app measured it.
fn work(app: &str, (plain, txn): (Vec<u64>, Vec<u64>)) {
    if plain.is_empty() || txn.is_empty() {
        return;
    }
    let ms = |v: Vec<u64>| median(v.into_iter().map(|us| us as f64 / 1e3).collect());
    println!(
        "# {app}'s own time per request (downstream calls included), medians: plain {:.3} ms, txn {:.3} ms",
        ms(plain),
        ms(txn)
    );
}

/// How long a participant held its prepared state (locks, reservations):
/// from its commit vote to the commit, as its app saw it.
fn held(app: &str, us: Vec<u64>) {
    if us.is_empty() {
        return;
    }
    let mut ms: Vec<f64> = us.into_iter().map(|us| us as f64 / 1e3).collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "# {app}'s prepared state held (its commit vote to the commit, {} txns): median {:.2} ms, p99 {:.2} ms",
        ms.len(),
        quantile(&ms, 0.5),
        quantile(&ms, 0.99)
    );
}

/// Checkouts per second and latency with and without txn, in one run
/// (BENCHMARKS.md, "Transactions").
#[derive(clap::Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(default_value_t = 5)]
    secs: u64,
    /// Concurrent clients.
    #[arg(default_value_t = 8)]
    clients: usize,
    /// Rounds (medians are reported).
    #[arg(default_value_t = 5)]
    rounds: usize,
    /// Only the gRPC graph (the HTTP graphs and the limits are skipped).
    #[arg(long)]
    grpc_only: bool,
}

fn main() {
    let Args {
        secs,
        clients,
        rounds,
        grpc_only,
    } = clap::Parser::parse();

    let etcd = Etcd::start();
    if grpc_only {
        grpc_graph(&etcd, secs, rounds, clients);
        return;
    }
    let cfg = |node: &str| {
        json!({"begin": [{"method": "POST", "path_prefix": "/checkout"}], "node": node,
               "default_timeout_ms": 5000, "max_in_flight": 4096})
    };
    let side = |n: &str, app: &TxnApp| {
        Sidecar::new(n)
            .app(&app.server)
            .etcd(&etcd)
            .route("etcdgw", &[etcd.addr()])
            .filter(Filter::txn(cfg(n)))
    };
    let g = Checkout::start(Vote::Commit, Vote::Commit, side);
    let order_sc = &g.order_sc;
    // The limit to compare with: one prepare round (a call through two
    // sidecars to a participant) plus one durable etcd write.
    let c = Client::keep_alive();
    let timed = |f: &dyn Fn()| {
        let mut v: Vec<f64> = (0..300)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let hop = timed(&|| {
        c.must(
            "POST",
            &order_sc.outbound_url("/plain"),
            &[("host", "payment")],
            b"{}",
        );
    });
    // One prepare round of the 3-participant graph: the two remote prepares
    // run in parallel (each through two sidecars; the coordinator's own
    // app's prepare, one hop, runs alongside and is not modelled). Measured
    // as the slower of two parallel calls, 300 times, median; two worker
    // threads started once and released together by a barrier.
    let round = {
        let start = std::sync::Barrier::new(3);
        let done = std::sync::Barrier::new(3);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for host in ["payment", "inventory"] {
                let (start, done, stop) = (&start, &done, &stop);
                let url = order_sc.outbound_url("/plain");
                s.spawn(move || {
                    let c = Client::keep_alive();
                    loop {
                        start.wait();
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                        c.must("POST", &url, &[("host", host)], b"{}");
                        done.wait();
                    }
                });
            }
            let m = timed(&|| {
                start.wait();
                done.wait();
            });
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            start.wait();
            m
        })
    };
    let put = timed(&|| {
        c.must(
            "POST",
            &format!("{}/v3/kv/put", etcd.url()),
            &[("content-type", "application/json")],
            txmesh_core::txn::etcd::put_body("bench", "x").as_bytes(),
        );
    });
    // The decision record's own shape: a compare-and-swap on the record key
    // (create revision 0) that puts the record and the pending-work key.
    let n = std::cell::Cell::new(0u64);
    let cas_at = |url: &str, host: &str| {
        timed(&|| {
            n.set(n.get() + 1);
            let key = format!("txmesh/txns/bench-{}", n.get());
            let pending = format!("txmesh/pending/bench/{}", n.get());
            let record =
                json!({"outcome": "committed", "participants": ["payment", "inventory", "order"],
                                "coordinator": "order", "reason": "ok", "time_ms": 1})
                .to_string();
            // The filter's own body (txmesh-core).
            let body =
                txmesh_core::txn::etcd::cas_create_with_body(&key, &record, (&pending, &record));
            c.must(
                "POST",
                url,
                &[("content-type", "application/json"), ("host", host)],
                body.as_bytes(),
            );
        })
    };
    let cas = cas_at(&format!("{}/v3/kv/txn", etcd.url()), "etcd");
    // The same write through one Envoy (the root sidecar's outbound listener,
    // a route to etcd): a sidecar reaches etcd only through Envoy.
    let cas_envoy = cas_at(&order_sc.outbound_url("/v3/kv/txn"), "etcdgw");
    println!(
        "# one call through two sidecars: median {hop:.2} ms; one prepare round (two such calls in parallel): median {round:.2} ms"
    );
    println!(
        "# one durable etcd write: a put, median {put:.2} ms; the decision record's compare-and-swap (record + pending key), median {cas:.2} ms (through one Envoy, as a sidecar sends it: {cas_envoy:.2} ms)"
    );
    println!(
        "# the limit: one prepare round + the decision record's write = {:.2} ms (with a single call and a plain put: {:.2} ms)",
        round + cas,
        hop + put
    );
    if secs == 0 {
        return;
    }
    // A 1-participant graph: an initiator that calls nobody (its own app is
    // the only participant: one-phase commit).
    let solo = TxnApp::calling("solo", Vote::Commit, Arc::new(RwLock::new(Vec::new())));
    let solo_sc = side("solo", &solo).start();
    println!("# {secs} s per run; {rounds} rounds, plain and txn alternating (A B A B ...)");
    println!(
        "# machine: {} cores; every sidecar Envoy --concurrency 2; etcd: 1 member on loopback",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    for (graph, sc, app, initiator, parts) in [
        (
            "1 participant (initiator only, one-phase commit)",
            &solo_sc,
            &solo,
            &solo,
            vec![&solo],
        ),
        (
            "3 participants (order -> payment, inventory)",
            order_sc,
            &g.payment,
            &g.order,
            vec![&g.order, &g.payment, &g.inventory],
        ),
    ] {
        for p in &parts {
            p.keep_commit_times();
        }
        let plain = Target::Http(sc.inbound_url("/plain"));
        let txn = Target::Http(sc.inbound_url("/checkout"));
        // Warm up both paths.
        load(&plain, 1, clients, Duration::ZERO);
        load(&txn, 1, clients, Duration::ZERO);
        // One client back to back, one client with a pause after each answer
        // (phase 2 of the previous transaction is over before the next one
        // begins), and `clients` back to back.
        for (level, think) in [
            (1usize, Duration::ZERO),
            (1, Duration::from_millis(THINK_MS)),
            (clients, Duration::ZERO),
        ] {
            let seen = sc.log().len();
            app.take_held_us();
            initiator.take_work_us();
            for p in &parts {
                p.take_commit_times();
            }
            let answered = measure(graph, (&plain, &txn), secs, rounds, level, think);
            breakdown(sc.log().get(seen..).unwrap_or(""));
            phase2(
                &answered,
                parts.iter().flat_map(|p| p.take_commit_times()).collect(),
            );
            work(&initiator.name, initiator.take_work_us());
            held(&app.name, app.take_held_us());
        }
    }
    grpc_graph(&etcd, secs, rounds, clients);
    let committed = order_sc
        .scrape()
        .sum("txmesh_txn_total", &[("outcome", "committed")]);
    println!("\n# transactions committed by the root during the run: {committed}");
    // The callouts' connection reuse: requests per connection, per cluster.
    let scrape = order_sc.scrape();
    for cluster in ["etcd", "local_app", "payment", "inventory"] {
        let l = [("envoy_cluster_name", cluster)];
        let rq = scrape.sum("envoy_cluster_upstream_rq_total", &l);
        let cx = scrape.sum("envoy_cluster_upstream_cx_total", &l);
        println!("# root sidecar, cluster {cluster}: {rq} requests over {cx} connections");
    }
}

/// The 3-participant graph with gRPC apps: the client calls order over
/// gRPC (`/shop.v1.Order/Checkout` begins a transaction, `/Plain` does not),
/// order calls payment and inventory, which take prepare/commit/abort as
/// `txmesh.v1.Participant` from their sidecars (`app_protocol: grpc`).
fn grpc_graph(etcd: &Etcd, secs: u64, rounds: usize, clients: usize) {
    let cfg = |node: &str, grpc_app: bool| {
        json!({"begin": [{"method": "POST", "path_prefix": "/shop.v1.Order/Checkout"}],
               "node": node, "default_timeout_ms": 5000, "max_in_flight": 4096,
               "app_protocol": if grpc_app { "grpc" } else { "http" }})
    };
    let parts: Vec<(grpc::Participant, txmesh_tests::envoy::Envoy)> = ["payment", "inventory"]
        .iter()
        .map(|n| {
            let p = grpc::Participant::start(n, grpc::Vote::Commit);
            let sc = Sidecar::new(n)
                .app(&p.server)
                .app_http2()
                .etcd(etcd)
                .filter(Filter::txn(cfg(n, true)))
                .start();
            (p, sc)
        })
        .collect();
    let calls = Arc::new(RwLock::new(Vec::new()));
    let order = TxnApp::calling("order", Vote::Commit, calls.clone());
    order.set_business_reply(Reply::grpc(0));
    let mut sc = Sidecar::new("order")
        .app(&order.server)
        .app_http2()
        .etcd(etcd)
        .filter(Filter::txn(cfg("order", false)));
    for (p, psc) in &parts {
        sc = sc.route(&p.name, &[psc.inbound_addr()]);
    }
    let order_sc = sc.start();
    *calls.write().unwrap_or_else(|e| e.into_inner()) =
        txmesh_tests::Downstream::each(&["payment", "inventory"], order_sc.ports.outbound);
    let addr = order_sc.inbound_addr();
    let plain = Target::Grpc {
        addr,
        path: "/shop.v1.Order/Plain",
    };
    let txn = Target::Grpc {
        addr,
        path: "/shop.v1.Order/Checkout",
    };
    load(&plain, 1, clients, Duration::ZERO);
    load(&txn, 1, clients, Duration::ZERO);
    let graph = "3 participants over gRPC (order -> payment, inventory; gRPC apps)";
    for level in [1usize, clients] {
        measure(graph, (&plain, &txn), secs, rounds, level, Duration::ZERO);
    }
    let s = order_sc.scrape();
    println!(
        "\n# gRPC graph: transactions committed by the root: {}, aborted: {}",
        s.sum("txmesh_txn_total", &[("outcome", "committed")]) + 0.0,
        s.sum("txmesh_txn_total", &[("outcome", "aborted")]) + 0.0
    );
    for (p, _) in &parts {
        assert!(p.errors().is_empty(), "{}: {:?}", p.name, p.errors());
    }
}
