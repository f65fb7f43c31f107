//! txmeshctl: see and steer what the txmesh sidecars do — transactions (their
//! decisions in etcd, what the sidecars hold), the service registry.
//! docs/operations.md has the details; `txmeshctl --help` the examples.

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use txmesh_core::txn::config::TxnConfig;
use txmesh_core::txn::etcd::{CasResult, Decision, Outcome};
use txmesh_core::txn::id::TxnId;

const EXAMPLES: &str = "Examples:
  txmeshctl txns                          decided transactions of the last hour, newest first
  txmeshctl txns --state in-doubt         what the sidecars hold past its deadline
  txmeshctl txns --state stuck            in doubt past the phase-2 give-up time, still retrying
  txmeshctl txns --since 10m --output json
  txmeshctl txn 0123456789abcdef0123456789abcdef
  txmeshctl txn abort 0123456789abcdef0123456789abcdef
  txmeshctl services                      every registered instance, zone, weight, lease TTL left
  txmeshctl services payment
  txmeshctl top                           live rates per sidecar, refreshed every 2 s (Ctrl-C to stop)
  txmeshctl top --iterations 3 --output json
  txmeshctl serve                         the transactions page on http://127.0.0.1:8099
  txmeshctl gate txn.json                 the match_delegate matcher that keeps other traffic
                                          out of the txn filter (txn.json: the filter's config)

Addresses default to the loopback stack of `make up`: etcd at
http://127.0.0.1:2379 and the sidecars' status listeners (:15008, :15108,
:15208). Use --etcd / TXMESH_ETCD and --sidecar / TXMESH_SIDECARS elsewhere.";

#[derive(Parser)]
#[command(name = "txmeshctl", version, about = "Operate a txmesh mesh: transactions and the service registry", after_help = EXAMPLES)]
struct Cli {
    /// etcd's JSON gateway (decisions, pending work, the registry).
    #[arg(
        long,
        global = true,
        env = "TXMESH_ETCD",
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: String,
    /// A sidecar's status endpoint (repeatable, or comma-separated in the env).
    #[arg(
        long = "sidecar",
        global = true,
        env = "TXMESH_SIDECARS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:15008,http://127.0.0.1:15108,http://127.0.0.1:15208"
    )]
    sidecars: Vec<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum State {
    InDoubt,
    /// In doubt past the phase-2 give-up time: still retrying, look at it.
    Stuck,
    Active,
    Committed,
    Aborted,
}

#[derive(Subcommand)]
enum Cmd {
    /// List transactions: decided ones from etcd, active / in-doubt ones from the sidecars.
    Txns {
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Only decisions this recent (e.g. 30s, 10m, 2h, 1d).
        #[arg(long, default_value = "1h", value_parser = parse_age)]
        since: Duration,
    },
    /// One transaction: outcome, participants, acknowledgements, timings; or `txn abort <id>`.
    Txn {
        /// `abort` followed by the id, or just the id.
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
    },
    /// The service registry: instances, zone, weight, version, lease TTL left.
    Services { name: Option<String> },
    /// A page of recent and in-doubt transactions with a latency plot
    /// (readable without Grafana), and its data at /api/txns.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8099")]
        listen: String,
    },
    /// Live rates per sidecar: requests, commits, aborts, in flight, in doubt
    /// (from each Envoy's admin /stats/prometheus).
    Top {
        /// Envoy admin addresses (default: the `make up` sidecars).
        #[arg(
            long = "admin",
            env = "TXMESH_ADMINS",
            value_delimiter = ',',
            default_value = "http://127.0.0.1:15000,http://127.0.0.1:15100,http://127.0.0.1:15200"
        )]
        admins: Vec<String>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Prints the `xds_matcher` that keeps traffic the txn filter would pass
    /// untouched out of the VM (Envoy's match_delegate around the filter;
    /// docs/protocol.md), for the filter's own JSON config (a file, or `-`).
    Gate { config: String },
}

/// A failure the user can act on: what failed, where, what to check. Exit 2.
struct Fail(String);

type Res<T> = Result<T, Fail>;

fn parse_age(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and s, m, h or d"))?;
    let secs = match unit {
        "s" => n,
        "m" | "" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

/// A transaction id as the sidecars parse it (txmesh-core).
fn valid_id(id: &str) -> Res<TxnId> {
    TxnId::parse(id.as_bytes()).map_err(|e| Fail(format!("{id:?} is not a transaction id: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Epoch milliseconds as this machine's local time, to the millisecond.
fn local_time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S%.3f %:z")
                .to_string()
        })
        .unwrap_or_else(|| format!("{ms} ms since the epoch"))
}

fn ago(ms: u64) -> String {
    let now = now_ms();
    if ms > now {
        return format!("in {}s", (ms - now).div_ceil(1000));
    }
    let s = (now - ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m{}s ago", s / 60, s % 60),
        _ => format!("{}h{}m ago", s / 3600, (s % 3600) / 60),
    }
}

/// The project's etcd client, with failures said as an operator needs them.
struct Etcd(txmesh_etcd::Etcd);

impl Etcd {
    fn new(url: &str) -> Self {
        Self(txmesh_etcd::Etcd::new(url))
    }

    fn fail(&self, e: txmesh_etcd::Error) -> Fail {
        match e {
            txmesh_etcd::Error::Unreachable { url, error } => Fail(format!(
                "cannot reach etcd at {url} ({error}).\n  Is etcd running? `make up` starts it on 127.0.0.1:2379; point elsewhere with --etcd or TXMESH_ETCD."
            )),
            other => Fail(format!("etcd at {}: {other}", self.0.url())),
        }
    }

    /// (key, value, lease id) under `prefix`.
    fn list(&self, prefix: &str) -> Res<Vec<(String, Vec<u8>, i64)>> {
        let kvs = self.0.list(prefix).map_err(|e| self.fail(e))?;
        Ok(kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value, kv.lease))
            .collect())
    }

    fn get(&self, key: &str) -> Res<Option<Vec<u8>>> {
        self.0.get(key).map_err(|e| self.fail(e))
    }
}

/// `GET <sidecar>/txmesh/txns...` on every sidecar; unreachable ones are
/// reported on stderr, the rest still answer.
fn from_sidecars(sidecars: &[String], path: &str) -> Vec<(String, Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    let mut out = Vec::new();
    for s in sidecars {
        let url = format!("{}{path}", s.trim_end_matches('/'));
        match agent.get(&url).call() {
            Ok(mut r) => {
                let text = r.body_mut().read_to_string().unwrap_or_default();
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) if r.status() == 200 => out.push((s.clone(), v)),
                    _ => eprintln!("txmeshctl: sidecar {s} answered {} to {path}: {text}", r.status()),
                }
            }
            Err(e) => eprintln!(
                "txmeshctl: cannot reach sidecar {s} ({e}); check the address (--sidecar / TXMESH_SIDECARS: a sidecar's plain status listener, :15008 for order in `make up`)"
            ),
        }
    }
    out
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

fn txns(cli: &Cli, state: Option<State>, since: Duration) -> Res<()> {
    let mut items: Vec<Value> = Vec::new();
    if matches!(state, None | Some(State::Committed) | Some(State::Aborted)) {
        let etcd = Etcd::new(&cli.etcd);
        let cutoff = now_ms().saturating_sub(since.as_millis() as u64);
        for (_, v, _) in etcd.list("txmesh/decisions/")? {
            let Ok(d) = serde_json::from_slice::<Value>(&v) else {
                continue;
            };
            let outcome = d["outcome"].as_str().unwrap_or("?");
            let t = d["time_ms"].as_u64().unwrap_or(0);
            let want = match state {
                Some(State::Committed) => outcome == "committed",
                Some(State::Aborted) => outcome == "aborted",
                _ => true,
            };
            if want && t >= cutoff {
                items.push(json!({"txn": d["txn"], "state": outcome, "time_ms": t,
                    "participants": d["participants"], "reason": d["reason"], "coordinator": d["coordinator"],
                    "refused_by": d["refused_by"], "detail": d["detail"]}));
            }
        }
    }
    if matches!(
        state,
        None | Some(State::InDoubt) | Some(State::Stuck) | Some(State::Active)
    ) {
        let q = match state {
            Some(State::InDoubt) => "in-doubt",
            Some(State::Stuck) => "stuck",
            Some(State::Active) => "active",
            _ => "all",
        };
        for (sc, v) in from_sidecars(&cli.sidecars, &format!("/txmesh/txns?state={q}")) {
            for t in v["txns"].as_array().cloned().unwrap_or_default() {
                let st = if t["stuck"].as_bool() == Some(true) {
                    "stuck"
                } else if t["in_doubt"].as_bool() == Some(true) {
                    "in-doubt"
                } else {
                    "active"
                };
                items.push(
                    json!({"txn": t["txn"], "state": st, "node": v["node"], "sidecar": sc,
                    "role": t["role"], "phase": t["phase"], "deadline_ms": t["deadline_ms"],
                    "participants": t["participants"]}),
                );
            }
        }
    }
    items.sort_by_key(|i| {
        std::cmp::Reverse(
            i["time_ms"]
                .as_u64()
                .or(i["deadline_ms"].as_u64())
                .unwrap_or(0),
        )
    });
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&items).unwrap_or_default()
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            let parts = i["participants"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let when = i["time_ms"].as_u64().map(ago).unwrap_or_else(|| {
                format!(
                    "deadline {}",
                    i["deadline_ms"].as_u64().map(ago).unwrap_or_default()
                )
            });
            let where_ = i["coordinator"]
                .as_str()
                .or(i["node"].as_str())
                .unwrap_or("")
                .to_string();
            vec![
                i["txn"].as_str().unwrap_or("").to_string(),
                i["state"].as_str().unwrap_or("").to_string(),
                match (i["reason"].as_str(), i["refused_by"].as_str()) {
                    (Some(r), Some(who)) => format!(
                        "{r} ({who}: {})",
                        i["detail"].as_str().unwrap_or("-")
                    ),
                    (Some(r), None) => r.to_string(),
                    (None, _) => i["phase"].as_str().unwrap_or("").to_string(),
                },
                where_,
                when,
                parts,
            ]
        })
        .collect();
    print_table(
        &[
            "TXN",
            "STATE",
            "REASON/PHASE",
            "COORDINATOR/NODE",
            "WHEN",
            "PARTICIPANTS",
        ],
        &rows,
    );
    Ok(())
}

fn txn_show(cli: &Cli, id: &str) -> Res<()> {
    valid_id(id)?;
    let etcd = Etcd::new(&cli.etcd);
    let decision = etcd
        .get(&format!("txmesh/decisions/{id}"))?
        .and_then(|v| serde_json::from_slice::<Value>(&v).ok());
    let pending: Vec<Value> = etcd
        .list("txmesh/pending/")?
        .into_iter()
        .filter(|(k, _, _)| k.ends_with(&format!("/{id}")))
        .filter_map(|(_, v, _)| serde_json::from_slice(&v).ok())
        .collect();
    let held: Vec<Value> = from_sidecars(&cli.sidecars, &format!("/txmesh/txns/{id}"))
        .into_iter()
        .map(|(sc, v)| json!({"sidecar": sc, "outcome": v["outcome"]}))
        .collect();
    let outcome = decision
        .as_ref()
        .and_then(|d| d["outcome"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| "undecided".to_string());
    let view = json!({"txn": id, "outcome": outcome, "decision": decision, "pending_phase2": pending, "sidecars": held});
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view).unwrap_or_default()
        );
        return Ok(());
    }
    println!("txn          {id}");
    println!("outcome      {outcome}");
    if let Some(d) = &decision {
        println!("reason       {}", d["reason"].as_str().unwrap_or("-"));
        if let Some(who) = d["refused_by"].as_str() {
            println!(
                "refused by   {who}: {}",
                d["detail"].as_str().unwrap_or("-")
            );
        }
        println!(
            "trace id     {}",
            d["trace"]
                .as_str()
                .unwrap_or("- (the request had no traceparent)")
        );
        println!("decided by   {}", d["coordinator"].as_str().unwrap_or("-"));
        if let Some(t) = d["time_ms"].as_u64() {
            println!("decided at   {} ({})", local_time(t), ago(t));
            if let Some(b) = d["begun_ms"].as_u64() {
                println!(
                    "took         {} ms from begin to decision",
                    t.saturating_sub(b)
                );
            }
        }
        let parts: Vec<&str> = d["participants"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "participants {}",
            if parts.is_empty() {
                "-".to_string()
            } else {
                parts.join(", ")
            }
        );
    } else {
        println!("             no decision in etcd: still running, or aborted by presumption (never prepared)");
    }
    for p in &pending {
        let targets: Vec<String> = p["targets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| {
                        format!(
                            "{}={}",
                            t["name"].as_str().unwrap_or("?"),
                            t["vote"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "phase 2      unfinished; acknowledgements: {}",
            targets.join(", ")
        );
    }
    if pending.is_empty() && decision.is_some() {
        println!(
            "phase 2      no unfinished work recorded (acknowledged, or never needed a retry)"
        );
    }
    for h in &held {
        println!(
            "sidecar      {} says {}",
            h["sidecar"].as_str().unwrap_or(""),
            h["outcome"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn txn_abort(cli: &Cli, id: &str) -> Res<()> {
    let txn = valid_id(id)?;
    let etcd = Etcd::new(&cli.etcd);
    let d = Decision {
        txn,
        outcome: Outcome::Aborted,
        participants: Vec::new(),
        coordinator: "txmeshctl".into(),
        time_ms: now_ms(),
        reason: "operator".into(),
        trace: String::new(),
        begun_ms: 0,
        refused_by: None,
    };
    // Under the default retention's lease, as a sidecar would write it
    // (granted here if no sidecar has yet: the ID is the bucket's).
    let retention = TxnConfig::default_retention();
    let lease = retention.lease_at(d.time_ms);
    etcd.0
        .ensure_lease(lease, retention.ttl_s())
        .map_err(|e| etcd.fail(e))?;
    let existing = match etcd.0.create_decision(&d, Some(lease)) {
        Ok(CasResult::Created) => None,
        Ok(CasResult::Exists(v)) => Some(v),
        Err(e) => return Err(etcd.fail(e)),
    };
    if existing.is_none() {
        if cli.output == Output::Json {
            println!(
                "{}",
                json!({"txn": id, "outcome": "aborted", "changed": true})
            );
        } else {
            println!("aborted {id}: the decision is in etcd; participants past their deadline obey it (in-doubt ones resolve within their grace period)");
        }
        return Ok(());
    }
    let d: Value = existing
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or(Value::Null);
    let outcome = d["outcome"].as_str().unwrap_or("?");
    let when = d["time_ms"].as_u64().map(ago).unwrap_or_default();
    Err(Fail(format!(
        "refused: {id} is already decided: {outcome} ({when}, by {}). A decision is final; txmeshctl only aborts undecided transactions.",
        d["coordinator"].as_str().unwrap_or("?")
    )))
}

fn services(cli: &Cli, name: Option<&str>) -> Res<()> {
    let etcd = Etcd::new(&cli.etcd);
    let prefix = match name {
        Some(n) => format!("txmesh/services/{n}/"),
        None => "txmesh/services/".to_string(),
    };
    let mut items = Vec::new();
    for (key, value, lease) in etcd.list(&prefix)? {
        let v: Value = serde_json::from_slice(&value).unwrap_or(Value::Null);
        let service = key
            .trim_start_matches("txmesh/services/")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let ttl = if lease != 0 {
            etcd.0.lease_ttl(lease).map_err(|e| etcd.fail(e))?
        } else {
            None
        };
        items.push(json!({"service": service, "address": v["address"], "zone": v["zone"], "weight": v["weight"].as_u64().unwrap_or(1),
            "version": v["version"], "lease": lease, "ttl_s": ttl}));
    }
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&items).unwrap_or_default()
        );
        return Ok(());
    }
    if items.is_empty() {
        println!("no instances registered under {prefix}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                i["service"].as_str().unwrap_or("").to_string(),
                i["address"].as_str().unwrap_or("?").to_string(),
                i["zone"].as_str().unwrap_or("-").to_string(),
                i["weight"].to_string(),
                i["version"].as_str().unwrap_or("-").to_string(),
                match i["ttl_s"].as_i64() {
                    Some(t) => format!("{t}s"),
                    None => "no lease".to_string(),
                },
            ]
        })
        .collect();
    print_table(
        &[
            "SERVICE",
            "ADDRESS",
            "ZONE",
            "WEIGHT",
            "VERSION",
            "LEASE TTL",
        ],
        &rows,
    );
    Ok(())
}

/// Sums of the counters and gauges `top` shows, from one scrape.
#[derive(Default, Clone, Copy)]
struct Sample {
    requests: f64,
    committed: f64,
    aborted: f64,
    in_flight: f64,
    in_doubt: f64,
}

/// Parses Prometheus text: the sum of every sample of `name` whose labels
/// contain all of `want` (`k="v"` fragments).
fn sum_metric(text: &str, name: &str, want: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            (metric == name && want.iter().all(|w| labels.contains(w)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn scrape(agent: &ureq::Agent, admin: &str) -> Option<Sample> {
    let url = format!("{}/stats/prometheus", admin.trim_end_matches('/'));
    let text = agent
        .get(&url)
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    Some(Sample {
        requests: sum_metric(&text, "txmesh_requests_total", &["reporter=\"inbound\""]),
        committed: sum_metric(&text, "txmesh_txn_total", &["outcome=\"committed\""]),
        aborted: sum_metric(&text, "txmesh_txn_total", &["outcome=\"aborted\""]),
        in_flight: sum_metric(&text, "txmesh_txn_in_flight", &[]),
        in_doubt: sum_metric(&text, "txmesh_txn_in_doubt", &[]),
    })
}

fn top(cli: &Cli, admins: &[String], interval: u64, iterations: Option<u64>) -> Res<()> {
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

const PAGE: &str = include_str!("page.html");

/// The page's data: the 100 newest decisions (with how long each took) and
/// what the sidecars hold in doubt.
fn page_data(cli: &Cli) -> Res<Value> {
    let etcd = Etcd::new(&cli.etcd);
    let mut decided: Vec<Value> = etcd
        .list("txmesh/decisions/")?
        .into_iter()
        .filter_map(|(_, v, _)| serde_json::from_slice::<Value>(&v).ok())
        .map(|mut d| {
            if let (Some(t), Some(b)) = (d["time_ms"].as_u64(), d["begun_ms"].as_u64()) {
                d["took_ms"] = json!(t.saturating_sub(b));
            }
            d
        })
        .collect();
    decided.sort_by_key(|d| std::cmp::Reverse(d["time_ms"].as_u64().unwrap_or(0)));
    decided.truncate(100);
    let in_doubt: Vec<Value> = from_sidecars(&cli.sidecars, "/txmesh/txns?state=in-doubt")
        .into_iter()
        .flat_map(|(_, v)| {
            let node = v["node"].clone();
            v["txns"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |mut t| {
                    t["node"] = node.clone();
                    t
                })
        })
        .collect();
    Ok(json!({"generated_ms": now_ms(), "decided": decided, "in_doubt": in_doubt}))
}

fn serve(cli: &Cli, listen: &str) -> Res<()> {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind(listen).map_err(|e| {
        Fail(format!(
            "cannot listen on {listen}: {e} (use --listen HOST:PORT)"
        ))
    })?;
    eprintln!(
        "txmeshctl: the transactions page on http://{listen}/ (data: /api/txns); Ctrl-C to stop"
    );
    for conn in l.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut first = String::new();
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => continue,
        });
        if reader.read_line(&mut first).is_err() {
            continue;
        }
        // Drain the request headers.
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let path = first.split_whitespace().nth(1).unwrap_or("/");
        let (status, ctype, body) = match path {
            "/" | "/index.html" => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
            "/api/txns" => match page_data(cli) {
                Ok(v) => ("200 OK", "application/json", v.to_string()),
                Err(Fail(e)) => (
                    "503 Service Unavailable",
                    "application/json",
                    json!({"error": e}).to_string(),
                ),
            },
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}

/// `txmeshctl gate <config.json|->`: the txn filter's gate, from the very
/// config the filter runs with (so the two cannot disagree).
fn gate(path: &str) -> Res<()> {
    let bytes = if path == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
            .map_err(|e| Fail(format!("cannot read the config from stdin: {e}")))?;
        b
    } else {
        std::fs::read(path).map_err(|e| Fail(format!("cannot read {path}: {e}")))?
    };
    let cfg = txmesh_core::txn::config::TxnConfig::parse(&bytes)
        .map_err(|e| Fail(format!("{path}: invalid txn filter config {e}")))?;
    let text =
        serde_json::to_string_pretty(&cfg.gate_matcher()).map_err(|e| Fail(e.to_string()))?;
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), format!("{text}\n").as_bytes());
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Txns { state, since } => txns(&cli, *state, *since),
        Cmd::Txn { args } => match args.as_slice() {
            [id] => txn_show(&cli, id),
            [verb, id] if verb == "abort" => txn_abort(&cli, id),
            [verb, _] => Err(Fail(format!(
                "unknown action {verb:?}: `txmeshctl txn <id>` or `txmeshctl txn abort <id>`"
            ))),
            _ => Err(Fail(
                "`txmeshctl txn <id>` or `txmeshctl txn abort <id>`".into(),
            )),
        },
        Cmd::Services { name } => services(&cli, name.as_deref()),
        Cmd::Serve { listen } => serve(&cli, listen),
        Cmd::Gate { config } => gate(config),
        Cmd::Top {
            admins,
            interval,
            iterations,
        } => top(&cli, admins, *interval, *iterations),
    };
    if let Err(Fail(msg)) = r {
        eprintln!("txmeshctl: {msg}");
        std::process::exit(2);
    }
}
