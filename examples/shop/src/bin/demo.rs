//! The checkout scenario: N checkouts at concurrency C through the ingress,
//! then the outcome table, latency, the invariants read from the three
//! databases, and an excerpt of txmesh metrics. Exits 1 if an invariant fails.
//!
//! shop-demo [--ingress URL] [--data DIR] [--admin URL] [--checkouts N] [--concurrency C] [--seed S]
//! (`shop-demo --help`)

use rusqlite::{Connection, OpenFlags};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use txmesh_shop::services::{CUSTOMERS, SKUS};

/// The scenario's generator (txmesh-core's splitmix64: a seed replays a run).
use txmesh_core::rng::SplitMix64 as Rng;

/// The checkout scenario through the shop's ingress, then the invariants
/// read from the three databases.
#[derive(clap::Parser)]
struct Args {
    /// The shop's ingress (default: 127.0.0.1 at $TXMESH_INGRESS_PORT, else 10000).
    #[arg(long)]
    ingress: Option<String>,
    /// The services' databases.
    #[arg(long, default_value = ".txmesh/data")]
    data: String,
    /// The order sidecar's admin (for the metrics excerpt).
    #[arg(long, default_value = "http://127.0.0.1:15000")]
    admin: String,
    /// Checkouts to run.
    #[arg(long, default_value_t = 200)]
    checkouts: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// The scenario's seed (a seed replays the same checkouts).
    #[arg(long, default_value_t = 2026)]
    seed: u64,
}

fn open(dir: &str, name: &str) -> Connection {
    let path = format!("{dir}/{name}.db");
    Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("cannot open {path}: {e}"))
}

fn count(c: &Connection, sql: &str) -> i64 {
    count_where(c, sql, [])
}

/// A `SELECT count(*)`'s answer, -1 if the query fails (an invariant then fails).
fn count_where(c: &Connection, sql: &str, params: impl rusqlite::Params) -> i64 {
    c.query_row(sql, params, |r| r.get(0)).unwrap_or(-1)
}

fn main() {
    let Args {
        ingress,
        data,
        admin,
        checkouts: n,
        concurrency: conc,
        seed,
    } = clap::Parser::parse();
    let ingress = ingress.unwrap_or_else(|| {
        let port = std::env::var("TXMESH_INGRESS_PORT").unwrap_or_else(|_| "10000".into());
        format!("http://127.0.0.1:{port}")
    });

    println!("[demo] {n} checkouts at concurrency {conc} through {ingress} (seed {seed})");
    // Orders confirmed before this run (make up keeps data across runs).
    let before = count(
        &open(&data, "order"),
        "SELECT count(*) FROM orders WHERE state = 'confirmed'",
    );
    let customers: Vec<(&str, u64)> = vec![("alice", 40), ("bob", 30), ("carol", 20), ("dave", 10)];
    let skus: Vec<(&str, u64)> = vec![
        ("widget", 60),
        ("gadget", 25),
        ("gizmo", 10),
        ("unobtainium", 5),
    ];
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<(String, f64)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..conc {
            s.spawn(|| {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build()
                    .into();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    let mut r = Rng(seed ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
                    let customer = r.pick(&customers).copied().unwrap_or("alice");
                    let mut sku = r.pick(&skus).copied().unwrap_or("widget");
                    let mut qty = 1 + r.below(3) as i64;
                    // A few bad requests: they must leave nothing behind.
                    match r.below(100) {
                        0 => sku = "nothing",
                        1 => qty = 0,
                        _ => {}
                    }
                    let body = serde_json::json!({"customer": customer, "sku": sku, "qty": qty})
                        .to_string();
                    let t = Instant::now();
                    let outcome = match agent
                        .post(&format!("{ingress}/checkout"))
                        .header("content-type", "application/json")
                        .send(body)
                    {
                        Ok(mut resp) => {
                            let status = resp.status().as_u16();
                            let text = resp.body_mut().read_to_string().unwrap_or_default();
                            let v: serde_json::Value =
                                serde_json::from_str(&text).unwrap_or_default();
                            match status {
                                200 => "committed".to_string(),
                                409 => format!("aborted: {}", v["reason"].as_str().unwrap_or("?")),
                                400 => "rejected: bad request (400)".to_string(),
                                s => format!("error: HTTP {s}"),
                            }
                        }
                        Err(e) => format!("error: {e}"),
                    };
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    results.lock().unwrap().push((outcome, ms));
                    let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if d % (n / 10).max(1) == 0 || d == n {
                        println!(
                            "[demo] {d}/{n} checkouts done ({:.1}s)",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap();
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for (o, _) in &results {
        *by.entry(o.clone()).or_insert(0) += 1;
    }
    let mut lat: Vec<f64> = results.iter().map(|(_, ms)| *ms).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!();
    println!("| outcome | checkouts |");
    println!("| --- | ---: |");
    for (o, c) in &by {
        println!("| {o} | {c} |");
    }
    println!();
    println!(
        "latency: p50 {:.1} ms, p99 {:.1} ms; {:.1} checkouts/s",
        pct(0.5),
        pct(0.99),
        n as f64 / secs
    );

    // Phase 2 finishes after the answers: wait until nothing is in flight.
    println!("\n[demo] waiting for phase 2 to finish everywhere...");
    let (order, payment, inventory) = (
        open(&data, "order"),
        open(&data, "payment"),
        open(&data, "inventory"),
    );
    let in_flight = || {
        count(
            &order,
            "SELECT count(*) FROM orders WHERE state = 'pending'",
        ) + count(
            &payment,
            "SELECT count(*) FROM holds WHERE state IN ('pending', 'held')",
        ) + count(
            &inventory,
            "SELECT count(*) FROM reservations WHERE state IN ('pending', 'held')",
        )
    };
    let t = Instant::now();
    while in_flight() > 0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }

    let committed = *by.get("committed").unwrap_or(&0) as i64;
    let seed_money: i64 = CUSTOMERS.iter().map(|(_, b)| b).sum();
    let mut checks: Vec<(String, bool)> = Vec::new();
    let money = count(&payment, "SELECT sum(balance) FROM accounts")
        + count(
            &payment,
            "SELECT COALESCE(sum(amount), 0) FROM holds WHERE state = 'charged'",
        );
    checks.push((
        format!("money conserved: balances + charged = {money} (seeded {seed_money})"),
        money == seed_money,
    ));
    for (sku, stock, _) in SKUS {
        let now = inventory
            .query_row(
                "SELECT s.available + COALESCE((SELECT sum(qty) FROM reservations r WHERE r.sku = s.sku AND r.state = 'shipped'), 0) FROM stock s WHERE s.sku = ?1",
                [sku],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(-1);
        checks.push((
            format!("stock conserved for {sku}: available + shipped = {now} (seeded {stock})"),
            now == *stock,
        ));
    }
    let confirmed = count(
        &order,
        "SELECT count(*) FROM orders WHERE state = 'confirmed'",
    );
    checks.push((
        format!("every committed checkout is a confirmed order ({committed} committed now, {before} before, {confirmed} confirmed)"),
        confirmed == before + committed,
    ));
    // Cross-database: each confirmed order has exactly one payment and one stock movement.
    let mut st = order
        .prepare("SELECT txn, customer, sku, qty, amount FROM orders WHERE state = 'confirmed'")
        .unwrap();
    let rows: Vec<(String, String, String, i64, i64)> = st
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .filter_map(Result::ok)
        .collect();
    let mut mismatched = 0;
    for (txn, customer, sku, qty, amount) in &rows {
        let paid = count_where(
            &payment,
            "SELECT count(*) FROM holds WHERE txn = ?1 AND state = 'charged' AND customer = ?2 AND amount = ?3",
            rusqlite::params![txn, customer, amount],
        );
        let shipped = count_where(
            &inventory,
            "SELECT count(*) FROM reservations WHERE txn = ?1 AND state = 'shipped' AND sku = ?2 AND qty = ?3",
            rusqlite::params![txn, sku, qty],
        );
        if paid != 1 || shipped != 1 {
            mismatched += 1;
        }
    }
    checks.push((format!("every confirmed order has exactly one payment and one stock movement ({mismatched} do not)"), mismatched == 0));
    let charged = count(
        &payment,
        "SELECT count(*) FROM holds WHERE state = 'charged'",
    );
    let shipped = count(
        &inventory,
        "SELECT count(*) FROM reservations WHERE state = 'shipped'",
    );
    checks.push((format!("no payment or stock movement without a confirmed order ({charged} charged, {shipped} shipped, {confirmed} orders)"), charged == confirmed && shipped == confirmed));
    let left = in_flight();
    checks.push((
        format!("nothing left pending or reserved ({left} rows)"),
        left == 0,
    ));
    let undecided = ["order", "payment", "inventory"]
        .iter()
        .zip([&order, &payment, &inventory])
        .map(|(_, c)| {
            count(
                c,
                "SELECT count(*) FROM txns WHERE state IN ('working', 'prepared')",
            )
        })
        .sum::<i64>();
    checks.push((
        format!("no transaction left undecided in any service ({undecided})"),
        undecided == 0,
    ));

    println!("\n| invariant | holds |");
    println!("| --- | :---: |");
    for (c, ok) in &checks {
        println!("| {c} | {} |", if *ok { "yes" } else { "**NO**" });
    }

    // What the sidecars counted.
    if let Ok(mut r) = ureq::get(&format!("{admin}/stats/prometheus")).call() {
        let text = r.body_mut().read_to_string().unwrap_or_default();
        println!("\n[demo] txmesh metrics at {admin}/stats/prometheus (excerpt):");
        for l in text.lines().filter(|l| {
            (l.starts_with("txmesh_txn_total")
                || l.starts_with("txmesh_txn_in_flight")
                || l.starts_with("txmesh_router_requests_total")
                || l.starts_with("txmesh_requests_total{reporter=\"inbound\"")
                // order's gRPC calls to inventory, by grpc-status.
                || (l.starts_with("txmesh_requests_total{reporter=\"outbound\"")
                    && l.contains("request_protocol=\"grpc\"")))
                && !l.ends_with(" 0")
        }) {
            println!("  {l}");
        }
    }
    if checks.iter().all(|(_, ok)| *ok) {
        println!("\n[demo] all invariants hold");
    } else {
        println!("\n[demo] INVARIANT VIOLATED");
        std::process::exit(1);
    }
}
