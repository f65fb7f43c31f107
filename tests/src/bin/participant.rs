//! A participant service for the history checker: a separate process that can
//! be killed with SIGKILL, implementing the participant contract with every
//! state change appended to a log file (a process kill loses nothing the
//! kernel has accepted), and recovering on start by asking its sidecar for the
//! outcome of every transaction it holds prepared.
//!
//! Usage: participant <name> <log file>
//!        --listen <port>:<sidecar inbound>[:<sidecar outbound>][@<netns>]...
//!        [--calls <downstream host>]...
//!
//! Each `--listen` is one replica's pod: the port the app listens on behind
//! that replica's sidecar, and the sidecar's listeners (business calls that
//! arrive there go downstream through the same replica's outbound sidecar).
//! The replicas share this process's state, as replicas share a database.
//! With `@<netns>` the replica is in that pod (network namespace): its
//! listener and every call it makes (downstream, recovery) are the pod's.
//!
//! Per-transaction behaviour comes from the business request's
//! `x-chaos-vote-<name>` header (`no` or `stall`; default: commit), which an
//! initiator forwards to its downstream calls.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use txmesh_tests::{Client, Recorded, Reply, Upstream};

#[derive(Default, Clone, Debug)]
struct Txn {
    deadline: Option<String>,
    plan: Option<String>,
    vote: Option<String>,
    outcome: Option<String>,
}

struct Participant {
    name: String,
    log: Mutex<std::fs::File>,
    txns: Mutex<BTreeMap<String, Txn>>,
}

impl Participant {
    fn append(&self, mut line: serde_json::Value) {
        line["t"] = serde_json::json!(txmesh_tests::epoch_ms());
        let mut f = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(f, "{line}");
    }

    fn load(path: &str) -> BTreeMap<String, Txn> {
        let mut txns: BTreeMap<String, Txn> = BTreeMap::new();
        let Ok(text) = std::fs::read_to_string(path) else {
            return txns;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(txn) = v["txn"].as_str() else {
                continue;
            };
            let t = txns.entry(txn.to_string()).or_default();
            match v["op"].as_str() {
                Some("business") => {
                    t.deadline = v["deadline"].as_str().map(str::to_string);
                    t.plan = v["plan"].as_str().map(str::to_string);
                }
                Some("prepare") => t.vote = v["vote"].as_str().map(str::to_string),
                Some("commit") => t.outcome = Some("committed".into()),
                Some("abort") => t.outcome = Some("aborted".into()),
                _ => {}
            }
        }
        txns
    }

    /// Applies an outcome once; a conflicting one is logged as a violation.
    fn apply(&self, txn: &str, outcome: &str, via: &str) {
        let mut txns = self.txns.lock().unwrap_or_else(|e| e.into_inner());
        let t = txns.entry(txn.to_string()).or_default();
        match t.outcome.as_deref() {
            Some(o) if o == outcome => self.append(
                serde_json::json!({"op": "duplicate", "txn": txn, "outcome": outcome, "via": via}),
            ),
            Some(o) => self.append(serde_json::json!({
                "op": "violation", "txn": txn, "had": o, "got": outcome, "via": via
            })),
            None => {
                if outcome == "committed" && t.vote.as_deref() != Some("commit") {
                    self.append(serde_json::json!({"op": "violation", "txn": txn, "had": "unprepared", "got": outcome, "via": via}));
                }
                t.outcome = Some(outcome.to_string());
                let op = if outcome == "committed" {
                    "commit"
                } else {
                    "abort"
                };
                self.append(serde_json::json!({"op": op, "txn": txn, "via": via}));
            }
        }
    }
}

/// One replica's ports: the app's, and its sidecar's listeners; its pod.
#[derive(Clone)]
struct Pod {
    port: u16,
    inbound: u16,
    outbound: Option<u16>,
    netns: Option<String>,
}

impl Pod {
    /// Moves the calling thread into this replica's pod (if it has one).
    fn enter(&self) {
        if let Some(ns) = &self.netns {
            if let Err(e) = txmesh_tests::netns::enter_ns(ns) {
                eprintln!("cannot enter network namespace {ns}: {e}");
                std::process::exit(1);
            }
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: participant <name> <log file> --listen <port>:<sidecar inbound>[:<sidecar outbound>]... [--calls <host>]...");
    std::process::exit(2);
}

fn parse_pod(s: &str) -> Option<Pod> {
    let (s, netns) = match s.split_once('@') {
        Some((ports, ns)) => (ports, Some(ns.to_string())),
        None => (s, None),
    };
    let mut it = s.split(':').map(str::parse::<u16>);
    let port = it.next()?.ok()?;
    let inbound = it.next()?.ok()?;
    let outbound = match it.next() {
        Some(p) => Some(p.ok()?),
        None => None,
    };
    Some(Pod {
        port,
        inbound,
        outbound,
        netns,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(log_path)) = (args.get(1).cloned(), args.get(2).cloned()) else {
        usage()
    };
    let (mut pods, mut downstream) = (Vec::new(), Vec::new());
    let mut rest = args.iter().skip(3);
    while let Some(flag) = rest.next() {
        match (flag.as_str(), rest.next()) {
            ("--listen", Some(v)) => pods.push(parse_pod(v).unwrap_or_else(|| usage())),
            ("--calls", Some(v)) => downstream.push(v.clone()),
            _ => usage(),
        }
    }
    if pods.is_empty() {
        usage();
    }

    let txns = Participant::load(&log_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("open log");
    let p = Arc::new(Participant {
        name: name.clone(),
        log: Mutex::new(file),
        txns: Mutex::new(txns),
    });
    p.append(serde_json::json!({"op": "start", "txn": null}));

    // Handlers run on a shared thread pool: each enters its replica's pod
    // first, so that its calls (and its client's connections) are the pod's.
    let _servers: Vec<Upstream> = pods
        .iter()
        .map(|pod| {
            let (handler_p, downstream, outbound) = (p.clone(), downstream.clone(), pod.outbound);
            let client = Client::new();
            let here = pod.clone();
            pod.enter(); // the listener is bound in the pod
            Upstream::with_on(pod.port, move |r: &Recorded| {
                here.enter();
                handle(&handler_p, r, outbound, &downstream, &client)
            })
        })
        .collect();

    // Recovery: ask a sidecar about every transaction held prepared (each
    // replica's in turn: one may be stopped).
    let clients: Vec<Client> = pods.iter().map(|_| Client::new()).collect();
    for round in 0usize.. {
        let undecided: Vec<(String, Option<String>)> = p
            .txns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, t)| t.vote.as_deref() == Some("commit") && t.outcome.is_none())
            .map(|(id, t)| (id.clone(), t.deadline.clone()))
            .collect();
        let (pod, client) = (&pods[round % pods.len()], &clients[round % pods.len()]);
        pod.enter();
        let inbound = pod.inbound;
        for (txn, deadline) in undecided {
            let url = format!("http://127.0.0.1:{inbound}/txmesh/txns/{txn}");
            let mut headers = vec![];
            if let Some(d) = &deadline {
                headers.push(("x-txmesh-deadline", d.as_str()));
            }
            if let Ok(r) = client.request("GET", &url, &headers, b"") {
                if r.status == 200 {
                    let v = r.json();
                    if let Some(o @ ("committed" | "aborted")) = v["outcome"].as_str() {
                        p.apply(&txn, o, "recovery");
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn handle(
    p: &Participant,
    r: &Recorded,
    outbound: Option<u16>,
    downstream: &[String],
    client: &Client,
) -> Reply {
    let txn = r.header("x-txmesh-txn");
    let path = r.path.split('?').next().unwrap_or("").to_string();
    let json = |v: serde_json::Value| Reply::ok().json(v);
    match (path.as_str(), txn) {
        ("/txmesh/prepare", Some(txn)) => {
            let (plan, prior) = {
                let txns = p.txns.lock().unwrap_or_else(|e| e.into_inner());
                let t = txns.get(&txn).cloned().unwrap_or_default();
                (t.plan.clone(), t)
            };
            if prior.outcome.as_deref() == Some("aborted") {
                return json(serde_json::json!({"vote": "abort", "reason": "already aborted"}));
            }
            if let Some(v) = prior.vote {
                return json(serde_json::json!({"vote": v}));
            }
            let vote = match plan.as_deref() {
                Some("no") => "abort",
                Some("stall") => {
                    std::thread::sleep(Duration::from_millis(3_000));
                    "commit"
                }
                _ => "commit",
            };
            {
                let mut txns = p.txns.lock().unwrap_or_else(|e| e.into_inner());
                let t = txns.entry(txn.clone()).or_default();
                // An abort may have overtaken the (stalled) prepare.
                if t.outcome.as_deref() == Some("aborted") {
                    return json(serde_json::json!({"vote": "abort", "reason": "already aborted"}));
                }
                t.vote = Some(vote.to_string());
                if vote == "abort" {
                    t.outcome = Some("aborted".into());
                }
            }
            p.append(serde_json::json!({"op": "prepare", "txn": txn, "vote": vote}));
            if vote == "abort" {
                p.append(serde_json::json!({"op": "abort", "txn": txn, "via": "own no vote"}));
            }
            json(serde_json::json!({"vote": vote, "reason": format!("{} says no", p.name)}))
        }
        ("/txmesh/commit", Some(txn)) => {
            p.apply(&txn, "committed", "commit");
            Reply::ok()
        }
        ("/txmesh/abort", Some(txn)) => {
            p.apply(&txn, "aborted", "abort");
            Reply::ok()
        }
        (p2, None) if p2.starts_with("/txmesh/") => Reply::status(400),
        (_, txn) => {
            let plan = r.header(&format!("x-chaos-vote-{}", p.name));
            if let Some(t) = &txn {
                let deadline = r.header("x-txmesh-deadline");
                {
                    let mut txns = p.txns.lock().unwrap_or_else(|e| e.into_inner());
                    let e = txns.entry(t.clone()).or_default();
                    e.deadline = deadline.clone();
                    e.plan = plan.clone();
                }
                p.append(serde_json::json!({"op": "business", "txn": t, "deadline": deadline, "plan": plan}));
            }
            if let Some(port) = outbound {
                for d in downstream {
                    let mut headers: Vec<(String, String)> = vec![("host".into(), d.clone())];
                    if let Some(t) = &txn {
                        headers.push(("x-txmesh-txn".into(), t.clone()));
                    }
                    for (k, v) in &r.headers {
                        if k.starts_with("x-chaos-vote-") {
                            headers.push((k.clone(), String::from_utf8_lossy(v).into_owned()));
                        }
                    }
                    let h: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let url = format!("http://127.0.0.1:{port}/work");
                    match client.request("POST", &url, &h, b"{}") {
                        Ok(resp) if (200..300).contains(&resp.status) => {}
                        Ok(resp) => {
                            return Reply::status(502).body(format!("{d} answered {}", resp.status))
                        }
                        Err(e) => return Reply::status(502).body(format!("{d}: {e}")),
                    }
                }
            }
            json(serde_json::json!({"service": p.name, "txn": txn}))
        }
    }
}
