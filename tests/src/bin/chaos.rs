//! The history checker: randomized transactions through a depth-3 call
//! graph — order → payment (two replicas, each its own sidecar, behind plain
//! round robin) → inventory — of participant processes over a three-member
//! etcd cluster, under a seeded fault schedule, then atomicity checked
//! against etcd and against what each client was told.
//!
//! Pods: each service replica (its app and its sidecar) and each etcd member
//! runs in a network namespace of its own, joined by a bridge
//! (`txmesh_tests::netns`), so that the network can fail between them. Where
//! the machine cannot make namespaces, everything runs on loopback and the
//! checker says so.
//!
//! Faults, one at a time, each healed after a bounded time:
//! - process: kill -9 and restart of a sidecar, a participant process or an
//!   etcd member; etcd's quorum killed; SIGSTOP of any of them past the
//!   deadline and the phase-2 give-up time;
//! - partition (nftables in a pod): the root's sidecar ↮ etcd while it still
//!   reaches its participants; a participant ↮ its coordinator; a
//!   participant's answers to its coordinator lost (one way); an etcd member
//!   ↮ the other two;
//! - loss: a pod drops a random 10–40% of its packets;
//! - link proxy (`txmesh_tests::linkproxy`, on every sidecar→sidecar and
//!   sidecar→etcd link): delay with jitter, reordering, duplicated requests,
//!   answers lost after the request took effect.
//!
//! The schedule takes the kinds in turn (partition, proxy, process, loss:
//! those the run's `--faults` and network allow), the fault within a kind at
//! random. Every client call and answer, every control message a participant
//! saw, every fault and every decision record goes into one history file
//! (JSON lines, by time), kept after the run; a violation names the first
//! violating transaction with its history.
//!
//! Exit status: 0 when every check holds, 1 on any violation, 2 on bad usage.

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use txmesh_tests::envoy::Envoy;
use txmesh_tests::linkproxy::{LinkProxy, Mode};
use txmesh_tests::netns::{Direction, Net, Pod};
use txmesh_tests::ports::free_port;
use txmesh_tests::process::ChildGuard;
use txmesh_tests::{epoch_ms, Client, EtcdCluster, Filter, Sidecar};

/// The schedules' generator (txmesh-core's splitmix64: a seed replays a run).
use txmesh_core::rng::SplitMix64 as Rng;

/// The txn filter's `phase2_give_up_ms` in this run: SIGSTOP faults last
/// longer than it (and than the 1.5 s deadline).
const GIVE_UP_MS: u64 = 2_000;

/// The services (payment has two replicas, each a pod of its own).
const PODS: [&str; 4] = ["order", "payment-1", "payment-2", "inventory"];
const ETCD_PODS: [&str; 3] = ["etcd-0", "etcd-1", "etcd-2"];
/// The participant processes (payment's replicas share one, as replicas
/// share a database).
const SERVICES: [&str; 3] = ["order", "payment", "inventory"];

/// The kinds of fault, taken in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Process,
    Partition,
    Loss,
    Proxy,
}

/// Which faults a run injects (`--faults`).
#[derive(Clone, Copy, clap::ValueEnum)]
enum Kinds {
    /// Process, partition, loss and link-proxy faults.
    All,
    /// Partitions, packet loss and link-proxy faults.
    Network,
    /// Kills and SIGSTOPs.
    Process,
    /// Kills only.
    Kill,
    /// SIGSTOPs only.
    Stop,
}

impl Kinds {
    fn name(self) -> &'static str {
        match self {
            Kinds::All => "all",
            Kinds::Network => "network",
            Kinds::Process => "process",
            Kinds::Kill => "kill",
            Kinds::Stop => "stop",
        }
    }

    /// The categories this run takes in turn (`nft`: partitions and loss
    /// need pods and nftables). A partition and a link-proxy fault come
    /// first, so that even a short run has both.
    fn categories(self, nft: bool) -> Vec<Category> {
        use Category::*;
        let order = match self {
            Kinds::All => vec![Partition, Proxy, Process, Loss],
            Kinds::Network => vec![Partition, Proxy, Loss],
            Kinds::Process | Kinds::Kill | Kinds::Stop => vec![Process],
        };
        order
            .into_iter()
            .filter(|c| nft || !matches!(c, Partition | Loss))
            .collect()
    }

    fn kills(self) -> bool {
        !matches!(self, Kinds::Stop)
    }

    fn stops(self) -> bool {
        !matches!(self, Kinds::Kill)
    }
}

/// Where the run's processes live (`--net`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum NetMode {
    /// Pods when this machine can make network namespaces, else loopback.
    Auto,
    /// Pods, or fail.
    Pods,
    /// Everything on 127.0.0.1 (no partitions or packet loss).
    Loopback,
}

/// The history checker: transactions through order → payment ×2 →
/// inventory under faults, then atomicity checked against etcd's records
/// and what clients were told (docs/protocol.md, "The history checker").
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
    /// Pods (network namespaces) or loopback.
    #[arg(long, value_enum, default_value_t = NetMode::Auto)]
    net: NetMode,
    /// Run without faults (a baseline).
    #[arg(long)]
    no_faults: bool,
}

use txmesh_tests::process::signal;

/// A participant process (restartable with the same arguments).
struct Proc {
    name: String,
    args: Vec<String>,
    guard: ChildGuard,
    dir: PathBuf,
}

impl Proc {
    fn spawn(name: &str, args: Vec<String>, dir: &Path) -> Self {
        let guard = Self::start(name, &args, dir);
        Proc {
            name: name.to_string(),
            args,
            guard,
            dir: dir.to_path_buf(),
        }
    }
    fn start(name: &str, args: &[String], dir: &Path) -> ChildGuard {
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

/// Runs `f` on a thread inside `pod` (or here, on loopback).
fn in_pod<T: Send>(pod: Option<&Pod>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(p) = pod {
                p.enter()
                    .unwrap_or_else(|e| panic!("enter pod {}: {e}", p.name));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| panic!("thread in pod panicked"))
    })
}

/// Waits until something listens on `addr` as seen from `pod`.
fn wait_listening(pod: Option<&Pod>, addr: SocketAddr) {
    in_pod(pod, || {
        txmesh_tests::wait_for(20, &format!("a listener on {addr}"), || {
            std::net::TcpStream::connect(addr).ok()
        });
    });
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

/// The run's events as they happen (clients, faults); merged with the
/// participants' logs and etcd's records into the history file at the end.
struct Events(Mutex<Vec<Value>>);

impl Events {
    fn push(&self, mut v: Value) {
        v["t"] = json!(epoch_ms());
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(v);
    }
}

/// What one participant service saw of one transaction.
#[derive(Default, Debug, Clone)]
struct Seen {
    vote: Option<String>,
    outcome: Option<String>,
    applied: u32,
    violations: Vec<String>,
    t_business: Option<u64>,
    t_outcome: Option<u64>,
}

/// A participant's log: its lines (for the history) and, per transaction,
/// what it saw.
fn read_log(path: &Path) -> (Vec<Value>, BTreeMap<String, Seen>) {
    let mut m: BTreeMap<String, Seen> = BTreeMap::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    for v in &lines {
        let Some(txn) = v["txn"].as_str() else {
            continue;
        };
        let s = m.entry(txn.to_string()).or_default();
        let t = v["t"].as_u64();
        match v["op"].as_str() {
            Some("business") => s.t_business = s.t_business.or(t),
            Some("prepare") => s.vote = v["vote"].as_str().map(str::to_string),
            Some(op @ ("commit" | "abort")) => {
                s.applied += 1;
                s.outcome = Some(
                    if op == "commit" {
                        "committed"
                    } else {
                        "aborted"
                    }
                    .into(),
                );
                s.t_outcome = t;
            }
            Some("violation") => s.violations.push(v.to_string()),
            _ => {}
        }
    }
    (lines, m)
}

/// The network the run built: pods and link proxies, or loopback. (Fields
/// drop in order: the proxies before the pods they live in.)
struct Topology {
    /// Link proxies by (from pod, to): "order" → "payment-1", "payment-1" → "etcd-0".
    links: BTreeMap<(String, String), LinkProxy>,
    /// The next proxy's seed.
    seed: u64,
    net: Option<Net>,
}

impl Topology {
    fn pod(&self, name: &str) -> Option<&Pod> {
        self.net.as_ref().map(|n| n.pod(name))
    }
    fn ip(&self, name: &str) -> std::net::Ipv4Addr {
        self.pod(name)
            .map_or(std::net::Ipv4Addr::LOCALHOST, |p| p.ip)
    }
    /// A proxy on the link from `from`'s pod to `target` (named `to`).
    fn link(&mut self, from: &str, to: &str, target: SocketAddr) -> SocketAddr {
        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let p = LinkProxy::start(&format!("{from}->{to}"), self.pod(from), target, self.seed);
        let addr = p.addr();
        self.links.insert((from.to_string(), to.to_string()), p);
        addr
    }
}

fn main() {
    let a = <Args as clap::Parser>::parse();
    let (txns, seed, clients, pace_ms, kinds) = (a.txns, a.seed, a.clients, a.pace_ms, a.faults);
    let faults_on = !a.no_faults;
    println!(
        "[chaos] {txns} transactions, {clients} clients, seed {seed}, faults {}",
        if faults_on { kinds.name() } else { "off" }
    );

    // Pods, or loopback.
    let names: Vec<&str> = PODS.iter().chain(&ETCD_PODS).copied().collect();
    let net = match a.net {
        NetMode::Loopback => None,
        NetMode::Pods | NetMode::Auto => match Net::create(&names) {
            Ok(n) => Some(n),
            Err(e) if a.net == NetMode::Pods => {
                eprintln!("[chaos] cannot make pods: {e}");
                std::process::exit(2);
            }
            Err(e) => {
                println!("[chaos] network namespaces unavailable ({e}): loopback mode, no partitions or packet loss (link-proxy faults still on)");
                None
            }
        },
    };
    let nft = net.is_some() && txmesh_tests::netns::nft_available();
    if net.is_some() && !nft {
        println!("[chaos] nft (Debian package nftables) is missing: no partitions or packet loss; `scripts/setup.sh` installs it");
    }
    let net_label = match &net {
        Some(n) => {
            println!(
                "[chaos] pods: {} (bridge address {})",
                n.names().join(" "),
                n.host_ip
            );
            "pods"
        }
        None => "loopback",
    };
    let net_arg = match (a.net, &net) {
        (NetMode::Auto, _) => "auto",
        (NetMode::Pods, _) => "pods",
        (NetMode::Loopback, _) => "loopback",
    };
    println!("[chaos] replay: chaos --txns {txns} --seed {seed} --clients {clients} --pace-ms {pace_ms} --faults {} --net {net_arg}{}", kinds.name(), if faults_on { "" } else { " --no-faults" });
    let categories = kinds.categories(nft);
    let mut topo = Topology {
        net,
        links: BTreeMap::new(),
        seed,
    };

    let mut etcd = match &topo.net {
        Some(n) => {
            let pods: Vec<Pod> = ETCD_PODS.iter().map(|p| n.pod(p).clone()).collect();
            EtcdCluster::start_in(&pods)
        }
        None => EtcdCluster::start(3),
    };
    println!("[chaos] etcd: 3 members up ({net_label})");
    let dir = txmesh_tests::scratch_dir("chaos");
    let events = Events(Mutex::new(Vec::new()));

    // The apps' ports (in a pod, any port is free; free_port keeps loopback
    // mode working with the same code).
    let ports: BTreeMap<&str, u16> = PODS.iter().map(|p| (*p, free_port())).collect();
    let cfg = |node: &str| {
        json!({"begin": [{"method": "POST", "path_prefix": "/checkout"}], "node": node,
               "default_timeout_ms": 1500, "in_doubt_grace_ms": 1000,
               "recovery_interval_ms": 500, "recovery_after_ms": 2000, "control_timeout_ms": 1000,
               "phase2_give_up_ms": GIVE_UP_MS})
    };
    // Every sidecar reaches etcd and the next hop through a link proxy in
    // its own pod.
    let side = |topo: &mut Topology, node: &str| {
        let members: Vec<SocketAddr> = etcd
            .addrs()
            .into_iter()
            .zip(ETCD_PODS)
            .map(|(addr, m)| topo.link(node, m, addr))
            .collect();
        let mut s = Sidecar::new(node)
            .app_addr(SocketAddr::from(([127, 0, 0, 1], ports[node])))
            .etcd_members(&members)
            .filter(Filter::txn(cfg(node)));
        if let Some(p) = topo.pod(node) {
            s = s.pod(p);
        }
        s
    };
    let inv_sc = side(&mut topo, "inventory").start();
    let mut pay_scs: Vec<Envoy> = Vec::new();
    for n in ["payment-1", "payment-2"] {
        let s = side(&mut topo, n);
        let to_inv = topo.link(n, "inventory", inv_sc.inbound_addr());
        pay_scs.push(s.route("inventory", &[to_inv]).start());
    }
    let s = side(&mut topo, "order");
    let to_pay: Vec<SocketAddr> = ["payment-1", "payment-2"]
        .iter()
        .zip(&pay_scs)
        .map(|(n, sc)| topo.link("order", n, sc.inbound_addr()))
        .collect();
    let order_sc = s.route("payment", &to_pay).start();

    let log = |n: &str| dir.join(format!("{n}.log")).display().to_string();
    let listen = |node: &str, sc: &Envoy, outbound: bool| {
        let mut v = format!("{}:{}", ports[node], sc.ports.inbound);
        if outbound {
            v.push_str(&format!(":{}", sc.ports.outbound));
        }
        if let Some(p) = topo.pod(node) {
            v.push_str(&format!("@{}", p.ns));
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
    for (pod, port) in &ports {
        wait_listening(topo.pod(pod), SocketAddr::from(([127, 0, 0, 1], *port)));
    }
    println!(
        "[chaos] order -> payment (2 replicas) -> inventory: 4 sidecars (--concurrency 2), 3 participant processes, {} link proxies; logs in {}",
        topo.links.len(),
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
        for client in 0..clients {
            let (events, results, next, checkout_url) = (&events, &results, &next, &checkout_url);
            s.spawn(move || {
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
                    let plan: BTreeMap<&str, &str> = headers[1..].iter().copied().collect();
                    // Some clients hang up mid-request (a dropped connection).
                    let hangs_up = r.chance(4);
                    events.push(json!({"src": "client", "op": "call", "client": client, "n": i, "plan": plan, "hangs_up": hangs_up}));
                    let res = if hangs_up {
                        hang_up(checkout_url, &headers, r.below(40));
                        Err("client hung up".to_string())
                    } else {
                        c.request("POST", checkout_url, &headers, b"{}")
                    };
                    let entry = match res {
                        Ok(resp) => {
                            let txn = resp.header("x-txmesh-txn").map(str::to_string);
                            let told = match resp.status {
                                200 => "committed",
                                409 => "aborted",
                                _ => "unknown",
                            };
                            events.push(json!({"src": "client", "op": "answer", "n": i, "txn": txn,
                                "status": resp.status, "told": told,
                                "reason": resp.header("x-txmesh-reason")}));
                            (txn, told.to_string())
                        }
                        Err(e) => {
                            events.push(json!({"src": "client", "op": "answer", "n": i, "txn": null, "told": "unknown", "error": e}));
                            (None, "unknown".to_string())
                        }
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
            let mut turn = 0usize;
            while !done.load(Ordering::SeqCst) && next.load(Ordering::SeqCst) < txns {
                std::thread::sleep(Duration::from_millis(400 + r.below(1200)));
                if next.load(Ordering::SeqCst) >= txns {
                    break;
                }
                let category = categories[turn % categories.len()];
                turn += 1;
                let f = inject(
                    category,
                    kinds,
                    &mut r,
                    &topo,
                    &mut sidecars,
                    &mut procs,
                    &mut etcd,
                    &events,
                );
                *fault_log
                    .lock()
                    .unwrap()
                    .entry(f.kind.to_string())
                    .or_insert(0) += 1;
                println!(
                    "[chaos] {:>6.1}s fault: {} for {} ms (txn {} of {txns})",
                    started.elapsed().as_secs_f64(),
                    f.what,
                    f.lasted.as_millis(),
                    next.load(Ordering::SeqCst).min(txns)
                );
            }
        });
    });
    done.store(true, Ordering::SeqCst);
    let load_secs = started.elapsed().as_secs_f64();
    println!("[chaos] {txns} transactions submitted in {load_secs:.1}s; faults healed; waiting for recovery");

    // Recovery: every prepared participant learns an outcome.
    let logs = |dir: &Path| -> BTreeMap<&str, (Vec<Value>, BTreeMap<String, Seen>)> {
        SERVICES
            .iter()
            .map(|n| (*n, read_log(&dir.join(format!("{n}.log")))))
            .collect()
    };
    let wait_start = Instant::now();
    let mut state = logs(&dir);
    loop {
        let undecided: usize = state
            .values()
            .map(|(_, m)| {
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

    // The decision records.
    let records: Vec<(String, Value)> = etcd
        .any()
        .list("txmesh/decisions/")
        .into_iter()
        .filter_map(|(k, v)| {
            let txn = k.strip_prefix("txmesh/decisions/")?.to_string();
            Some((txn, serde_json::from_str::<Value>(&v).ok()?))
        })
        .collect();
    let decisions: BTreeMap<String, String> = records
        .iter()
        .filter_map(|(txn, v)| Some((txn.clone(), v["outcome"].as_str()?.to_string())))
        .collect();
    let results = results.into_inner().unwrap();
    let seen: BTreeMap<&str, BTreeMap<String, Seen>> =
        state.iter().map(|(n, (_, m))| (*n, m.clone())).collect();
    let violations = check(&seen, &decisions, &results);

    // The history: everything, by time.
    let mut history: Vec<Value> = events.0.into_inner().unwrap_or_else(|e| e.into_inner());
    for (n, (lines, _)) in &state {
        for l in lines {
            let mut l = l.clone();
            l["src"] = json!(format!("app:{n}"));
            history.push(l);
        }
    }
    let read_at = epoch_ms();
    for (txn, v) in &records {
        history.push(
            json!({"src": "etcd", "op": "record", "txn": txn, "record": v,
            "t": v["time_ms"].as_u64().unwrap_or(read_at)}),
        );
    }
    history.sort_by_key(|v| v["t"].as_u64().unwrap_or(0));
    let history_path = dir.join("history.jsonl");
    let text: String = history.iter().map(|v| format!("{v}\n")).collect();
    if let Err(e) = std::fs::write(&history_path, text) {
        eprintln!("[chaos] cannot write {}: {e}", history_path.display());
    }

    let all_txns: BTreeSet<&String> = seen.values().flat_map(|m| m.keys()).collect();
    let committed = all_txns
        .iter()
        .filter(|t| {
            seen.values()
                .any(|m| m.get(**t).and_then(|s| s.outcome.as_deref()) == Some("committed"))
        })
        .count();
    let max_resolve = seen
        .values()
        .flat_map(|m| m.values())
        .filter_map(|s| Some(s.t_outcome?.saturating_sub(s.t_business?)))
        .max()
        .unwrap_or(0);
    let client_unknown = results.iter().filter(|(_, o)| o == "unknown").count();
    let faults: u32 = fault_log.lock().unwrap().values().sum();
    let mut proxied = txmesh_tests::linkproxy::Counts::default();
    for p in topo.links.values() {
        let c = p.counts();
        proxied.requests += c.requests;
        proxied.delayed += c.delayed;
        proxied.reordered += c.reordered;
        proxied.duplicated += c.duplicated;
        proxied.answers_dropped += c.answers_dropped;
    }

    println!();
    println!(
        "| history check ({net_label}, faults {}) | value |",
        if faults_on { kinds.name() } else { "off" }
    );
    println!("| --- | ---: |");
    println!("| transactions submitted | {txns} |");
    println!("| transactions seen by participants | {} |", all_txns.len());
    println!("| committed | {committed} |");
    println!("| aborted | {} |", all_txns.len() - committed);
    println!("| client saw no outcome (hung up, sidecar killed) | {client_unknown} |");
    println!("| faults injected | {faults} |");
    for (k, v) in fault_log.lock().unwrap().iter() {
        println!("| &nbsp;&nbsp;{k} | {v} |");
    }
    println!(
        "| link proxies: requests / delayed / reordered / duplicated / answers lost | {} / {} / {} / {} / {} |",
        proxied.requests, proxied.delayed, proxied.reordered, proxied.duplicated, proxied.answers_dropped
    );
    println!("| decision records in etcd | {} |", decisions.len());
    println!(
        "| max time to resolve (business call to outcome applied) | {:.1} s |",
        max_resolve as f64 / 1000.0
    );
    println!("| recovery wait after faults healed | {recovery_secs:.1} s |");
    println!("| violations | {} |", violations.len());
    println!(
        "[chaos] history: {} ({} events)",
        history_path.display(),
        history.len()
    );
    for (txn, v) in violations.iter().take(20) {
        println!("[chaos] VIOLATION {txn}: {v}");
    }
    if let Some(first) = first_violating(&violations, &history) {
        println!("[chaos] the first violating transaction, {first}, in the history:");
        for line in excerpt(&history, &first) {
            println!("  {line}");
        }
    }
    drop(sidecars);
    drop(procs);
    drop(etcd);
    drop(topo);
    if violations.is_empty() {
        println!("[chaos] OK: every transaction has one outcome, applied once by every participant that prepared, matching etcd and what its client was told; nothing in doubt");
    } else {
        println!(
            "[chaos] FAILED: {} violations (replay with --seed {seed})",
            violations.len()
        );
        std::process::exit(1);
    }
}

/// One injected fault, for the log.
struct Injected {
    /// The kind (the fault table's row).
    kind: &'static str,
    what: String,
    lasted: Duration,
}

/// The process faults.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ProcessFault {
    KillSidecar,
    KillApp,
    KillEtcd,
    EtcdQuorum,
    StopSidecar,
    StopApp,
    StopEtcd,
}

impl ProcessFault {
    const ALL: [ProcessFault; 7] = [
        ProcessFault::KillSidecar,
        ProcessFault::KillApp,
        ProcessFault::KillEtcd,
        ProcessFault::EtcdQuorum,
        ProcessFault::StopSidecar,
        ProcessFault::StopApp,
        ProcessFault::StopEtcd,
    ];

    fn label(self) -> &'static str {
        match self {
            ProcessFault::KillSidecar => "kill -9 sidecar",
            ProcessFault::KillApp => "kill -9 participant",
            ProcessFault::KillEtcd => "kill -9 etcd member",
            ProcessFault::EtcdQuorum => "etcd quorum lost (2 of 3 killed)",
            ProcessFault::StopSidecar => "SIGSTOP sidecar",
            ProcessFault::StopApp => "SIGSTOP participant",
            ProcessFault::StopEtcd => "SIGSTOP etcd member",
        }
    }

    fn is_stop(self) -> bool {
        matches!(
            self,
            ProcessFault::StopSidecar | ProcessFault::StopApp | ProcessFault::StopEtcd
        )
    }
}

/// A fault chosen with its target: [`Fault::apply`] breaks, [`Fault::undo`]
/// heals.
enum Fault<'a> {
    KillSidecar(usize),
    KillApp(usize),
    /// One member, or two (quorum lost).
    KillEtcd(Vec<usize>),
    Stop(u32),
    Block(&'a Pod, Vec<std::net::Ipv4Addr>, Direction),
    Loss(&'a Pod, u32),
    Link(&'a LinkProxy, Mode),
}

impl Fault<'_> {
    fn apply(&self, sidecars: &mut [(&str, Envoy)], procs: &mut [Proc], etcd: &mut EtcdCluster) {
        let must = |r: Result<(), String>| {
            if let Err(e) = r {
                eprintln!("[chaos] fault rule failed: {e}");
            }
        };
        match self {
            Fault::KillSidecar(i) => sidecars[*i].1.crash(),
            Fault::KillApp(i) => procs[*i].guard.kill(),
            Fault::KillEtcd(ms) => ms.iter().for_each(|m| etcd.kill(*m)),
            Fault::Stop(pid) => signal(*pid, libc::SIGSTOP),
            Fault::Block(pod, peers, dir) => must(pod.block(peers, *dir)),
            Fault::Loss(pod, pct) => must(pod.loss(*pct)),
            Fault::Link(proxy, mode) => proxy.set(*mode),
        }
    }

    fn undo(&self, sidecars: &mut [(&str, Envoy)], procs: &mut [Proc], etcd: &mut EtcdCluster) {
        match self {
            Fault::KillSidecar(i) => sidecars[*i].1.restart(),
            Fault::KillApp(i) => procs[*i].restart(),
            Fault::KillEtcd(ms) => ms.iter().for_each(|m| etcd.restart(*m)),
            Fault::Stop(pid) => signal(*pid, libc::SIGCONT),
            Fault::Block(pod, ..) | Fault::Loss(pod, _) => {
                if let Err(e) = pod.heal() {
                    eprintln!("[chaos] healing {} failed: {e}", pod.name);
                }
            }
            Fault::Link(proxy, _) => proxy.set(Mode::Pass),
        }
    }
}

/// Injects one fault of `category`, lets it last its time, heals it.
#[allow(clippy::too_many_arguments)]
fn inject(
    category: Category,
    kinds: Kinds,
    r: &mut Rng,
    topo: &Topology,
    sidecars: &mut [(&str, Envoy)],
    procs: &mut [Proc],
    etcd: &mut EtcdCluster,
    events: &Events,
) -> Injected {
    let down = Duration::from_millis(200 + r.below(1500));
    // Longer than the deadline (1.5 s) and than the give-up time.
    let stopped = Duration::from_millis(GIVE_UP_MS + 500 + r.below(2500));
    let cut = Duration::from_millis(500 + r.below(3000));
    let ip = |n: &str| topo.ip(n);
    let etcd_ips: Vec<std::net::Ipv4Addr> = ETCD_PODS.iter().map(|m| ip(m)).collect();
    let pod = |name: &str| {
        topo.pod(name)
            .unwrap_or_else(|| unreachable!("network rules run only with pods"))
    };
    // (coordinator, participant) edges of the call graph.
    const EDGES: [(&str, &str); 4] = [
        ("order", "payment-1"),
        ("order", "payment-2"),
        ("payment-1", "inventory"),
        ("payment-2", "inventory"),
    ];
    let (kind, what, lasted, fault): (&'static str, String, Duration, Fault) = match category {
        Category::Process => {
            let menu: Vec<ProcessFault> = ProcessFault::ALL
                .into_iter()
                .filter(|f| {
                    if f.is_stop() {
                        kinds.stops()
                    } else {
                        kinds.kills()
                    }
                })
                .collect();
            let f = menu[r.below(menu.len() as u64) as usize];
            let (what, fault) = match f {
                ProcessFault::KillSidecar => {
                    let i = r.below(4) as usize;
                    (
                        format!("sidecar {} killed", sidecars[i].0),
                        Fault::KillSidecar(i),
                    )
                }
                ProcessFault::KillApp => {
                    let i = r.below(3) as usize;
                    (
                        format!("participant {} killed", procs[i].name),
                        Fault::KillApp(i),
                    )
                }
                ProcessFault::KillEtcd => {
                    let m = r.below(3) as usize;
                    (
                        format!("etcd member {} killed", ETCD_PODS[m]),
                        Fault::KillEtcd(vec![m]),
                    )
                }
                ProcessFault::EtcdQuorum => {
                    let keep = r.below(3) as usize;
                    let gone = (0..3).filter(|m| *m != keep).collect();
                    (
                        "etcd quorum lost (2 of 3 members killed)".to_string(),
                        Fault::KillEtcd(gone),
                    )
                }
                ProcessFault::StopSidecar => {
                    let (name, sc) = &sidecars[r.below(4) as usize];
                    (
                        format!("sidecar {name} stopped (SIGSTOP)"),
                        Fault::Stop(sc.guard.pid()),
                    )
                }
                ProcessFault::StopApp => {
                    let p = &procs[r.below(3) as usize];
                    (
                        format!("participant {} stopped (SIGSTOP)", p.name),
                        Fault::Stop(p.guard.pid()),
                    )
                }
                ProcessFault::StopEtcd => {
                    let m = r.below(3) as usize;
                    (
                        format!("etcd member {} stopped (SIGSTOP)", ETCD_PODS[m]),
                        Fault::Stop(etcd.members[m].guard.pid()),
                    )
                }
            };
            let lasted = if f.is_stop() { stopped } else { down };
            (f.label(), what, lasted, fault)
        }
        Category::Partition => match r.below(4) {
            0 => (
                "partition: root sidecar ↮ etcd",
                "order ↮ etcd (order still reaches payment)".to_string(),
                cut,
                Fault::Block(pod("order"), etcd_ips.clone(), Direction::Both),
            ),
            1 => {
                let (c, p) = EDGES[r.below(4) as usize];
                (
                    "partition: participant ↮ coordinator",
                    format!("{p} ↮ {c}"),
                    cut,
                    Fault::Block(pod(p), vec![ip(c)], Direction::Both),
                )
            }
            2 => {
                let (c, p) = EDGES[r.below(4) as usize];
                (
                    "one-way: participant's packets to its coordinator lost",
                    format!("{p} → {c} dropped ({c} → {p} still arrives)"),
                    cut,
                    Fault::Block(pod(p), vec![ip(c)], Direction::Outgoing),
                )
            }
            _ => {
                let m = r.below(3) as usize;
                let others: Vec<_> = (0..3).filter(|o| *o != m).map(|o| etcd_ips[o]).collect();
                (
                    "partition: etcd minority ↮ majority",
                    format!(
                        "{} ↮ the other two members (clients still reach it)",
                        ETCD_PODS[m]
                    ),
                    cut,
                    Fault::Block(pod(ETCD_PODS[m]), others, Direction::Both),
                )
            }
        },
        Category::Loss => {
            let all: Vec<&str> = PODS.iter().chain(&ETCD_PODS).copied().collect();
            let name = all[r.below(all.len() as u64) as usize];
            let pct = 10 + r.below(31) as u32;
            (
                "packet loss",
                format!("{name} drops {pct}% of its packets"),
                cut,
                Fault::Loss(pod(name), pct),
            )
        }
        Category::Proxy => {
            // Half on the links between sidecars (prepare, commit, abort,
            // status), half on a sidecar's links to etcd.
            let to_etcd = r.chance(50);
            let links: Vec<&(String, String)> = topo
                .links
                .keys()
                .filter(|(_, to)| to.starts_with("etcd-") == to_etcd)
                .collect();
            let key = links[r.below(links.len() as u64) as usize];
            let ms = 50 + r.below(350);
            let (kind, mode) = match r.below(4) {
                0 => (
                    "link: delay and jitter",
                    Mode::Delay {
                        ms,
                        jitter_ms: ms / 2,
                    },
                ),
                1 => (
                    "link: reordering",
                    Mode::Reorder {
                        hold_ms: 100 + r.below(500),
                    },
                ),
                2 => (
                    "link: duplicated requests",
                    Mode::Duplicate {
                        within_ms: r.below(1500),
                    },
                ),
                _ => (
                    "link: answers lost",
                    Mode::DropAnswer {
                        percent: 30 + r.below(71),
                    },
                ),
            };
            let what = format!("{} → {}: {mode:?}", key.0, key.1);
            (kind, what, cut, Fault::Link(&topo.links[key], mode))
        }
    };
    events.push(json!({"src": "fault", "op": "start", "kind": kind, "what": what}));
    fault.apply(sidecars, procs, etcd);
    // The fault itself: it lasts this long (the schedule's bounded time).
    std::thread::sleep(lasted);
    fault.undo(sidecars, procs, etcd);
    events.push(json!({"src": "fault", "op": "heal", "kind": kind}));
    Injected { kind, what, lasted }
}

/// The checks, per transaction: (transaction, what is wrong).
fn check(
    seen: &BTreeMap<&str, BTreeMap<String, Seen>>,
    decisions: &BTreeMap<String, String>,
    results: &[(Option<String>, String)],
) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    let all: BTreeSet<&String> = seen.values().flat_map(|m| m.keys()).collect();
    for txn in all {
        let per: Vec<(&str, Seen)> = SERVICES
            .iter()
            .map(|n| (*n, seen[n].get(txn).cloned().unwrap_or_default()))
            .collect();
        let mut bad = |what: String| v.push((txn.clone(), what));
        for (n, s) in &per {
            for line in &s.violations {
                bad(format!("{n} logged {line}"));
            }
            if s.applied > 1 {
                bad(format!("{n} applied an outcome {} times", s.applied));
            }
            if s.vote.as_deref() == Some("commit") && s.outcome.is_none() {
                bad(format!(
                    "{n} still in doubt (prepared, no outcome) after healing"
                ));
            }
        }
        let outcomes: BTreeSet<&str> = per
            .iter()
            .filter_map(|(_, s)| s.outcome.as_deref())
            .collect();
        if outcomes.len() > 1 {
            bad(format!("participants disagree: {per:?}"));
        }
        let record = decisions.get(txn).map(String::as_str);
        if outcomes.contains("committed") {
            for (n, s) in &per {
                if s.vote.as_deref() != Some("commit") {
                    bad(format!("committed but {n} voted {:?}", s.vote));
                }
            }
            if record != Some("committed") {
                bad(format!(
                    "committed without a commit record (etcd: {record:?})"
                ));
            }
        } else if record == Some("committed") {
            bad(format!(
                "etcd says committed, participants did not commit: {per:?}"
            ));
        }
    }
    for (txn, told) in results {
        let Some(txn) = txn else { continue };
        let applied = SERVICES
            .iter()
            .filter_map(|n| seen[n].get(txn)?.outcome.clone())
            .next();
        let record = decisions.get(txn).map(String::as_str);
        match (told.as_str(), applied.as_deref(), record) {
            ("committed", Some("committed"), Some("committed"))
            | ("aborted", Some("aborted") | None, Some("aborted") | None)
            | ("unknown", _, _) => {}
            (client, parts, rec) => v.push((
                txn.clone(),
                format!("client was told {client}; participants applied {parts:?}; etcd's record: {rec:?}"),
            )),
        }
    }
    v
}

/// The violating transaction whose history starts first.
fn first_violating(violations: &[(String, String)], history: &[Value]) -> Option<String> {
    let bad: BTreeSet<&str> = violations.iter().map(|(t, _)| t.as_str()).collect();
    history
        .iter()
        .find_map(|e| e["txn"].as_str().filter(|t| bad.contains(t)))
        .map(str::to_string)
}

/// Every history line about `txn`: its events, its client's call, and the
/// faults around it.
fn excerpt(history: &[Value], txn: &str) -> Vec<String> {
    let mine: Vec<&Value> = history
        .iter()
        .filter(|e| e["txn"].as_str() == Some(txn))
        .collect();
    let calls: BTreeSet<u64> = mine.iter().filter_map(|e| e["n"].as_u64()).collect();
    let t0 = mine.first().and_then(|e| e["t"].as_u64()).unwrap_or(0);
    let t1 = mine
        .last()
        .and_then(|e| e["t"].as_u64())
        .unwrap_or(u64::MAX);
    history
        .iter()
        .filter(|e| {
            let t = e["t"].as_u64().unwrap_or(0);
            e["txn"].as_str() == Some(txn)
                || (e["src"] == "client" && e["n"].as_u64().is_some_and(|n| calls.contains(&n)))
                || (e["src"] == "fault" && t + 5_000 >= t0 && t <= t1)
        })
        .map(Value::to_string)
        .collect()
}
