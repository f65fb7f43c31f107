//! The history checker: randomized transactions through a depth-3 call
//! graph — order → payment (two replicas, each its own sidecar, behind plain
//! round robin) → inventory — of participant processes over a three-member
//! etcd cluster, while a seeded fault schedule kills (SIGKILL) and restarts
//! sidecars, participant processes and etcd members, stops them (SIGSTOP)
//! for longer than the deadline and than the phase-2 give-up time, and takes
//! etcd's quorum away; participants vote no or stall, and clients drop
//! connections. After the faults heal it waits for recovery and checks the
//! participants' durable logs against etcd.
//!
//! Usage: chaos [--txns N] [--seed S] [--clients C] [--pace-ms MS]
//!              [--faults all|kill|stop] [--no-faults]
//! (`--pace-ms`: mean pause of each client between transactions, so that
//! faults land among them; `--faults`: which kinds, default all.)
//! Exit status: 0 when every check holds, 1 on any violation, 2 on bad usage.

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use txmesh_tests::envoy::Envoy;
use txmesh_tests::ports::free_port;
use txmesh_tests::process::ChildGuard;
use txmesh_tests::{Client, EtcdCluster, Filter, Sidecar};

/// The txn filter's `phase2_give_up_ms` in this run: SIGSTOP faults last
/// longer than it (and than the 1.5 s deadline).
const GIVE_UP_MS: u64 = 2_000;

/// The kinds of fault the schedule draws from.
#[derive(Clone, Copy)]
enum Fault {
    KillSidecar,
    KillApp,
    KillEtcd,
    EtcdQuorum,
    StopSidecar,
    StopApp,
    StopEtcd,
}

/// Which faults a run injects (`--faults`).
#[derive(Clone, Copy, clap::ValueEnum)]
enum Kinds {
    All,
    Kill,
    Stop,
}

impl Kinds {
    fn name(self) -> &'static str {
        match self {
            Kinds::All => "all",
            Kinds::Kill => "kill",
            Kinds::Stop => "stop",
        }
    }

    fn pick(self, r: &mut Rng) -> Fault {
        const KILLS: [Fault; 4] = [
            Fault::KillSidecar,
            Fault::KillApp,
            Fault::KillEtcd,
            Fault::EtcdQuorum,
        ];
        const STOPS: [Fault; 3] = [Fault::StopSidecar, Fault::StopApp, Fault::StopEtcd];
        let menu: Vec<Fault> = match self {
            Kinds::All => KILLS.iter().chain(&STOPS).copied().collect(),
            Kinds::Kill => KILLS.to_vec(),
            Kinds::Stop => STOPS.to_vec(),
        };
        menu[r.below(menu.len() as u64) as usize]
    }
}

/// Stops a process (SIGSTOP) for `how_long`, then lets it go on (SIGCONT):
/// it keeps its sockets and state but answers nothing meanwhile.
fn pause(pid: u32, how_long: Duration) {
    let pid = pid as libc::pid_t;
    // SAFETY: plain signals to a child of ours (killed on drop either way).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(how_long);
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

/// The schedules' generator (txmesh-core's splitmix64: a seed replays a run).
use txmesh_core::rng::SplitMix64 as Rng;

struct Proc {
    name: String,
    args: Vec<String>,
    guard: ChildGuard,
    dir: std::path::PathBuf,
}

impl Proc {
    fn spawn(name: &str, args: Vec<String>, dir: &std::path::Path) -> Self {
        let guard = Self::start(name, &args, dir);
        Proc {
            name: name.to_string(),
            args,
            guard,
            dir: dir.to_path_buf(),
        }
    }
    fn start(name: &str, args: &[String], dir: &std::path::Path) -> ChildGuard {
        let exe = std::env::current_exe()
            .expect("current exe")
            .with_file_name("participant");
        let mut cmd = Command::new(exe);
        cmd.args(args);
        ChildGuard::spawn(name, cmd, dir, vec![])
    }
    fn restart(&mut self) {
        self.guard.kill();
        let g = Self::start(&self.name, &self.args, &self.dir);
        let old = std::mem::replace(&mut self.guard, g);
        std::mem::forget(old);
    }
}

/// Sends a request on a raw connection and closes it after `after_ms`
/// without reading the answer: Envoy sees the downstream go away.
fn hang_up(url: &str, headers: &[(&str, &str)], after_ms: u64) {
    use std::io::Write;
    let rest = url.trim_start_matches("http://");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut s) = std::net::TcpStream::connect(authority) else {
        return;
    };
    let mut req = format!("POST /{path} HTTP/1.1\r\nhost: {authority}\r\ncontent-length: 2\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n{}");
    let _ = s.write_all(req.as_bytes());
    std::thread::sleep(Duration::from_millis(after_ms));
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn wait_port(port: u16) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {port}");
}

#[derive(Default, Debug, Clone)]
struct Seen {
    business: bool,
    vote: Option<String>,
    outcome: Option<String>,
    applied: u32,
    violations: Vec<String>,
    t_business: Option<u64>,
    t_outcome: Option<u64>,
}

fn read_log(path: &std::path::Path) -> BTreeMap<String, Seen> {
    let mut m: BTreeMap<String, Seen> = BTreeMap::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(txn) = v["txn"].as_str() else {
            continue;
        };
        let s = m.entry(txn.to_string()).or_default();
        let t = v["t"].as_u64();
        match v["op"].as_str() {
            Some("business") => {
                s.business = true;
                s.t_business = s.t_business.or(t);
            }
            Some("prepare") => s.vote = v["vote"].as_str().map(str::to_string),
            Some("commit") | Some("abort") => {
                s.applied += 1;
                s.outcome = Some(
                    if v["op"] == "commit" {
                        "committed"
                    } else {
                        "aborted"
                    }
                    .into(),
                );
                s.t_outcome = t;
            }
            Some("violation") => s.violations.push(line.to_string()),
            _ => {}
        }
    }
    m
}

/// The history checker: transactions through order → payment ×2 →
/// inventory under faults, then atomicity checked against etcd's records
/// (docs/protocol.md, "The history checker").
#[derive(clap::Parser)]
struct Args {
    /// Transactions to run.
    #[arg(long, default_value_t = 1000)]
    txns: usize,
    /// The schedule's seed (printed, so a run can be replayed).
    #[arg(long, default_value_t = 0x7a6d_6573_6800_0001)]
    seed: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Mean pause of each client between transactions (ms).
    #[arg(long, default_value_t = 500)]
    pace_ms: u64,
    /// Which faults to draw from.
    #[arg(long, value_enum, default_value_t = Kinds::All)]
    faults: Kinds,
    /// Run without faults (a baseline).
    #[arg(long)]
    no_faults: bool,
}

fn main() {
    let a = <Args as clap::Parser>::parse();
    let (txns, seed, clients, pace_ms, kinds) = (a.txns, a.seed, a.clients, a.pace_ms, a.faults);
    let faults_on = !a.no_faults;
    println!(
        "[chaos] {txns} transactions, {clients} clients, seed {seed}, faults {}",
        if faults_on { "on" } else { "off" }
    );
    println!("[chaos] replay: chaos --txns {txns} --seed {seed} --clients {clients} --pace-ms {pace_ms} --faults {}{}", kinds.name(), if faults_on { "" } else { " --no-faults" });

    let mut etcd = EtcdCluster::start(3);
    println!("[chaos] etcd: 3 members up");
    let dir = txmesh_tests::scratch_dir("chaos");
    // The apps' ports: payment has one per replica (its two pods share the
    // process, as replicas share a database).
    let ports: BTreeMap<&str, u16> = [
        ("order", free_port()),
        ("payment-1", free_port()),
        ("payment-2", free_port()),
        ("inventory", free_port()),
    ]
    .into();
    let cfg = |node: &str| {
        json!({"begin": [{"method": "POST", "path_prefix": "/checkout"}], "node": node,
               "default_timeout_ms": 1500, "in_doubt_grace_ms": 1000,
               "recovery_interval_ms": 500, "recovery_after_ms": 2000, "control_timeout_ms": 1000,
               "phase2_give_up_ms": GIVE_UP_MS})
    };
    let side = |node: &str| {
        Sidecar::new(node)
            .app_addr(std::net::SocketAddr::from(([127, 0, 0, 1], ports[node])))
            .etcd_members(&etcd.addrs())
            .filter(Filter::txn(cfg(node)))
    };
    let inv_sc = side("inventory").start();
    let pay_scs: Vec<Envoy> = ["payment-1", "payment-2"]
        .iter()
        .map(|n| side(n).route("inventory", &[inv_sc.inbound_addr()]).start())
        .collect();
    let pay_addrs: Vec<_> = pay_scs.iter().map(Envoy::inbound_addr).collect();
    let order_sc = side("order").route("payment", &pay_addrs).start();
    let log = |n: &str| dir.join(format!("{n}.log")).display().to_string();
    let listen = |node: &str, sc: &Envoy, outbound: bool| {
        let mut v = format!("{}:{}", ports[node], sc.ports.inbound);
        if outbound {
            v.push_str(&format!(":{}", sc.ports.outbound));
        }
        ["--listen".to_string(), v]
    };
    let mut payment_args = vec!["payment".to_string(), log("payment")];
    for (node, sc) in ["payment-1", "payment-2"].iter().zip(&pay_scs) {
        payment_args.extend(listen(node, sc, true));
    }
    payment_args.extend(["--calls".to_string(), "inventory".to_string()]);
    let mut order_args = vec!["order".to_string(), log("order")];
    order_args.extend(listen("order", &order_sc, true));
    order_args.extend(["--calls".to_string(), "payment".to_string()]);
    let mut inventory_args = vec!["inventory".to_string(), log("inventory")];
    inventory_args.extend(listen("inventory", &inv_sc, false));
    let mut procs: Vec<Proc> = vec![
        Proc::spawn("order", order_args, &dir),
        Proc::spawn("payment", payment_args, &dir),
        Proc::spawn("inventory", inventory_args, &dir),
    ];
    for p in ports.values() {
        wait_port(*p);
    }
    println!(
        "[chaos] order -> payment (2 replicas) -> inventory: 4 sidecars (--concurrency 2), 3 participant processes; logs in {}",
        dir.display()
    );

    let mut pay_scs = pay_scs.into_iter();
    let (Some(pay1), Some(pay2)) = (pay_scs.next(), pay_scs.next()) else {
        unreachable!("two payment sidecars")
    };
    let mut sidecars: Vec<(&str, Envoy)> = vec![
        ("order", order_sc),
        ("payment-1", pay1),
        ("payment-2", pay2),
        ("inventory", inv_sc),
    ];
    let checkout_url = sidecars[0].1.inbound_url("/checkout");
    let next = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let results: Mutex<Vec<(Option<String>, String)>> = Mutex::new(Vec::new());
    let fault_log: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());
    let started = Instant::now();

    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                let c = Client::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= txns {
                        break;
                    }
                    let mut r = Rng(seed ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
                    std::thread::sleep(Duration::from_millis(r.below(2 * pace_ms + 1)));
                    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
                    if r.chance(8) {
                        headers.push(("x-chaos-vote-payment", "no"));
                    }
                    match r.below(100) {
                        0..=7 => headers.push(("x-chaos-vote-inventory", "no")),
                        8..=9 => headers.push(("x-chaos-vote-inventory", "stall")),
                        _ => {}
                    }
                    // Some clients hang up mid-request (a dropped connection).
                    let res = if r.chance(4) {
                        hang_up(&checkout_url, &headers, r.below(40));
                        Err("client hung up".to_string())
                    } else {
                        c.request("POST", &checkout_url, &headers, b"{}")
                    };
                    let entry = match res {
                        Ok(resp) => {
                            let txn = resp.header("x-txmesh-txn").map(str::to_string);
                            let outcome = match resp.status {
                                200 => "committed",
                                409 => "aborted",
                                _ => "unknown",
                            };
                            (txn, outcome.to_string())
                        }
                        Err(_) => (None, "unknown".to_string()),
                    };
                    results.lock().unwrap().push(entry);
                }
            });
        }
        // The fault schedule.
        s.spawn(|| {
            if !faults_on {
                return;
            }
            let mut r = Rng(seed.rotate_left(17));
            while !done.load(Ordering::SeqCst) && next.load(Ordering::SeqCst) < txns {
                std::thread::sleep(Duration::from_millis(400 + r.below(1200)));
                if next.load(Ordering::SeqCst) >= txns {
                    break;
                }
                let kind = kinds.pick(&mut r);
                let down = Duration::from_millis(200 + r.below(1500));
                // Longer than the deadline (1.5 s) and than the give-up time.
                let stopped = Duration::from_millis(GIVE_UP_MS + 500 + r.below(2500));
                let (what, lasted) = match kind {
                    Fault::KillSidecar => {
                        let (name, sc) = &mut sidecars[r.below(4) as usize];
                        sc.crash();
                        std::thread::sleep(down);
                        sc.restart();
                        (format!("sidecar {name} killed"), down)
                    }
                    Fault::KillApp => {
                        let p = &mut procs[r.below(3) as usize];
                        p.guard.kill();
                        std::thread::sleep(down);
                        p.restart();
                        (format!("participant {} killed", p.name), down)
                    }
                    Fault::KillEtcd => {
                        let m = r.below(3) as usize;
                        etcd.kill(m);
                        std::thread::sleep(down);
                        etcd.restart(m);
                        ("etcd member killed".to_string(), down)
                    }
                    Fault::EtcdQuorum => {
                        let keep = r.below(3) as usize;
                        let gone: Vec<usize> = (0..3).filter(|m| *m != keep).collect();
                        for m in &gone {
                            etcd.kill(*m);
                        }
                        std::thread::sleep(down);
                        for m in &gone {
                            etcd.restart(*m);
                        }
                        ("etcd quorum lost (2 of 3 members killed)".to_string(), down)
                    }
                    Fault::StopSidecar => {
                        let (name, sc) = &sidecars[r.below(4) as usize];
                        pause(sc.guard.pid(), stopped);
                        (format!("sidecar {name} stopped (SIGSTOP)"), stopped)
                    }
                    Fault::StopApp => {
                        let p = &procs[r.below(3) as usize];
                        pause(p.guard.pid(), stopped);
                        (format!("participant {} stopped (SIGSTOP)", p.name), stopped)
                    }
                    Fault::StopEtcd => {
                        let m = &etcd.members[r.below(3) as usize];
                        pause(m.guard.pid(), stopped);
                        ("etcd member stopped (SIGSTOP)".to_string(), stopped)
                    }
                };
                *fault_log.lock().unwrap().entry(what.clone()).or_insert(0) += 1;
                println!(
                    "[chaos] {:>6.1}s fault: {what} for {} ms (txn {} of {txns})",
                    started.elapsed().as_secs_f64(),
                    lasted.as_millis(),
                    next.load(Ordering::SeqCst).min(txns)
                );
            }
        });
    });
    done.store(true, Ordering::SeqCst);
    let load_secs = started.elapsed().as_secs_f64();
    println!("[chaos] {txns} transactions submitted in {load_secs:.1}s; faults healed; waiting for recovery");

    // Recovery: every prepared participant learns an outcome.
    let names = ["order", "payment", "inventory"];
    let logs = |dir: &std::path::Path| -> BTreeMap<&str, BTreeMap<String, Seen>> {
        names
            .iter()
            .map(|n| (*n, read_log(&dir.join(format!("{n}.log")))))
            .collect()
    };
    let wait_start = Instant::now();
    let mut state = logs(&dir);
    loop {
        let undecided: usize = state
            .values()
            .map(|m| {
                m.values()
                    .filter(|s| s.vote.as_deref() == Some("commit") && s.outcome.is_none())
                    .count()
            })
            .sum();
        if undecided == 0 || wait_start.elapsed() > Duration::from_secs(90) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        state = logs(&dir);
    }
    let recovery_secs = wait_start.elapsed().as_secs_f64();

    // The checks.
    let decisions: BTreeMap<String, String> = etcd
        .any()
        .list("txmesh/decisions/")
        .into_iter()
        .filter_map(|(k, v)| {
            let txn = k.strip_prefix("txmesh/decisions/")?.to_string();
            let o = serde_json::from_str::<Value>(&v).ok()?["outcome"]
                .as_str()?
                .to_string();
            Some((txn, o))
        })
        .collect();
    let mut violations: Vec<String> = Vec::new();
    let all_txns: BTreeSet<String> = state.values().flat_map(|m| m.keys().cloned()).collect();
    let (mut commits, mut aborts, mut max_resolve) = (0, 0, 0u64);
    for txn in &all_txns {
        let per: Vec<(&str, Seen)> = names
            .iter()
            .map(|n| (*n, state[n].get(txn).cloned().unwrap_or_default()))
            .collect();
        for (n, s) in &per {
            for v in &s.violations {
                violations.push(format!("{txn}: {n} logged {v}"));
            }
            if s.applied > 1 {
                violations.push(format!("{txn}: {n} applied an outcome {} times", s.applied));
            }
            if s.vote.as_deref() == Some("commit") && s.outcome.is_none() {
                violations.push(format!("{txn}: {n} still in doubt (prepared, no outcome)"));
            }
            if let (Some(a), Some(b)) = (s.t_business, s.t_outcome) {
                max_resolve = max_resolve.max(b.saturating_sub(a));
            }
        }
        let outcomes: BTreeSet<&str> = per
            .iter()
            .filter_map(|(_, s)| s.outcome.as_deref())
            .collect();
        if outcomes.len() > 1 {
            violations.push(format!("{txn}: participants disagree: {per:?}"));
        }
        let committed = outcomes.contains("committed");
        if committed {
            commits += 1;
            for (n, s) in &per {
                if s.vote.as_deref() != Some("commit") {
                    violations.push(format!("{txn}: committed but {n} voted {:?}", s.vote));
                }
            }
            if decisions.get(txn).map(String::as_str) != Some("committed") {
                violations.push(format!(
                    "{txn}: committed without a commit record (etcd: {:?})",
                    decisions.get(txn)
                ));
            }
        } else {
            aborts += 1;
            if decisions.get(txn).map(String::as_str) == Some("committed") {
                violations.push(format!(
                    "{txn}: etcd says committed, participants did not commit: {per:?}"
                ));
            }
        }
    }
    let results = results.into_inner().unwrap();
    for (txn, seen) in &results {
        let Some(txn) = txn else { continue };
        let applied = names
            .iter()
            .filter_map(|n| state[n].get(txn)?.outcome.clone())
            .next();
        match (seen.as_str(), applied.as_deref()) {
            ("committed", Some("committed"))
            | ("aborted", Some("aborted") | None)
            | ("unknown", _) => {}
            (client, parts) => violations.push(format!(
                "{txn}: client saw {client}, participants applied {parts:?}"
            )),
        }
    }
    let client_unknown = results.iter().filter(|(_, o)| o == "unknown").count();
    let faults: u32 = fault_log.lock().unwrap().values().sum();

    println!();
    println!("| history check | value |");
    println!("| --- | ---: |");
    println!("| transactions submitted | {txns} |");
    println!("| transactions seen by participants | {} |", all_txns.len());
    println!("| committed | {commits} |");
    println!("| aborted | {aborts} |");
    println!("| client saw no outcome (hung up, sidecar killed) | {client_unknown} |");
    println!("| faults injected | {faults} |");
    for (k, v) in fault_log.lock().unwrap().iter() {
        println!("| &nbsp;&nbsp;{k} | {v} |");
    }
    println!("| decision records in etcd | {} |", decisions.len());
    println!(
        "| max time to resolve (business call to outcome applied) | {:.1} s |",
        max_resolve as f64 / 1000.0
    );
    println!("| recovery wait after faults healed | {recovery_secs:.1} s |");
    println!("| violations | {} |", violations.len());
    for v in violations.iter().take(20) {
        println!("[chaos] VIOLATION {v}");
    }
    drop(sidecars);
    drop(procs);
    if violations.is_empty() {
        println!("[chaos] OK: every transaction has one outcome, applied once by every participant that prepared, matching etcd; nothing in doubt");
    } else {
        println!(
            "[chaos] FAILED: {} violations (replay with --seed {seed})",
            violations.len()
        );
        std::process::exit(1);
    }
}
