//! `top`: live rates from each sidecar's admin endpoint.

use crate::common::*;
use crate::{Cli, Output};
use serde_json::{json, Value};
use std::time::Duration;

/// Sums of the counters and gauges `top` shows, from one scrape.
#[derive(Default, Clone, Copy)]
pub(crate) struct Sample {
    requests: f64,
    committed: f64,
    aborted: f64,
    in_flight: f64,
    in_doubt: f64,
}

pub(crate) fn scrape(agent: &ureq::Agent, admin: &str) -> Option<Sample> {
    let url = format!("{}/stats/prometheus", admin.trim_end_matches('/'));
    let text = agent
        .get(&url)
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    let m = txmesh_core::prom::Scrape::parse(&text);
    Some(Sample {
        requests: m.sum("txmesh_requests_total", &[("reporter", "inbound")]),
        committed: m.sum("txmesh_txn_total", &[("outcome", "committed")]),
        aborted: m.sum("txmesh_txn_total", &[("outcome", "aborted")]),
        in_flight: m.sum("txmesh_txn_in_flight", &[]),
        in_doubt: m.sum("txmesh_txn_in_doubt", &[]),
    })
}

pub(crate) fn top(cli: &Cli, admins: &[String], interval: u64, iterations: Option<u64>) -> Res<()> {
    use std::io::IsTerminal;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let interval = Duration::from_secs(interval.max(1));
    let tty = std::io::stdout().is_terminal() && cli.output == Output::Table;
    let mut prev: Vec<Option<Sample>> = admins.iter().map(|a| scrape(&agent, a)).collect();
    if prev.iter().all(Option::is_none) {
        return Err(Fail(format!(
            "cannot reach any Envoy admin ({}): is the stack up? (`make up`; --admin or TXMESH_ADMINS elsewhere)",
            admins.join(", ")
        )));
    }
    let mut n = 0u64;
    loop {
        std::thread::sleep(interval);
        n += 1;
        let secs = interval.as_secs_f64();
        let now: Vec<Option<Sample>> = admins.iter().map(|a| scrape(&agent, a)).collect();
        let rows: Vec<Value> = admins
            .iter()
            .zip(now.iter().zip(&prev))
            .map(|(a, (cur, old))| match (cur, old) {
                (Some(c), Some(o)) => json!({"admin": a, "up": true,
                    "requests_per_s": ((c.requests - o.requests) / secs).max(0.0),
                    "commits_per_s": ((c.committed - o.committed) / secs).max(0.0),
                    "aborts_per_s": ((c.aborted - o.aborted) / secs).max(0.0),
                    "in_flight": c.in_flight, "in_doubt": c.in_doubt}),
                _ => json!({"admin": a, "up": cur.is_some()}),
            })
            .collect();
        if cli.output == Output::Json {
            println!("{}", Value::Array(rows));
        } else {
            if tty {
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "txmeshctl top — every {}s (Ctrl-C to stop)\n",
                interval.as_secs()
            );
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let f = |k: &str| {
                        r[k].as_f64()
                            .map(|v| format!("{v:.1}"))
                            .unwrap_or_else(|| "-".into())
                    };
                    vec![
                        r["admin"].as_str().unwrap_or("").to_string(),
                        if r["up"].as_bool() == Some(true) {
                            "up".into()
                        } else {
                            "unreachable".into()
                        },
                        f("requests_per_s"),
                        f("commits_per_s"),
                        f("aborts_per_s"),
                        f("in_flight"),
                        f("in_doubt"),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ENVOY ADMIN",
                    "STATE",
                    "REQ/S",
                    "COMMITS/S",
                    "ABORTS/S",
                    "IN FLIGHT",
                    "IN DOUBT",
                ],
                &table,
            );
        }
        prev = now;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
    }
}
