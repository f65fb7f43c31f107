//! The world the engines run in: pods (a sidecar with its workers' engines,
//! its shared data and its streams, and an app process), the services'
//! databases, a network of calls and answers, a modelled etcd, the client,
//! and a discrete clock. Every protocol decision is the engine's: this file
//! only moves bytes between engines, apps and etcd the way Envoy would, and
//! applies the faults a scenario allows.

use crate::etcd::Etcd;
use crate::host::{Effect, ModelHost};
use std::collections::{BTreeMap, BTreeSet};
use txmesh_core::host::{Callout, CalloutResponse, Verdict};
use txmesh_core::txn::config::TxnConfig;
use txmesh_core::txn::engine::{Stream, TxnEngine};
use txmesh_core::txn::etcd::Outcome;

/// The model clock starts here (ms since the epoch) and moves in steps.
pub const T0: u64 = 1_000_000;
pub const STEP: u64 = 1_000;
/// Every transaction's deadline is this long after its begin.
pub const TIMEOUT_MS: u64 = 2_000;
pub const GRACE_MS: u64 = 1_000;
/// Root contexts are 1 + the engine's index; streams are numbered from here.
const FIRST_STREAM: u32 = 100;
const APP: &str = "local_app";
const ETCD: &str = "etcd";

/// What a service's app votes when asked to prepare work it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Plan {
    Commit,
    Abort,
    ReadOnly,
    /// Either, explored both ways.
    CommitOrAbort,
    /// Does its work, then its business call answers a failure (HTTP 500,
    /// or gRPC `grpc-status: 13`); asked to prepare, it votes commit.
    Fails,
    /// Commit or Fails, explored both ways.
    CommitOrFails,
}

impl Plan {
    /// Whether the app's business answer is a failure.
    fn fails(self) -> bool {
        match self {
            Plan::Fails => true,
            Plan::Commit
            | Plan::Abort
            | Plan::ReadOnly
            | Plan::CommitOrAbort
            | Plan::CommitOrFails => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: &'static str,
    pub children: Vec<usize>,
    pub replicas: u8,
    pub plan: Plan,
    /// This service's clocks run this far ahead of the model clock.
    pub skew_ms: u64,
}

/// Faults a scenario may inject, each kind with its own budget, all before
/// `fault_steps`; from then on every crashed process is restarted and etcd
/// is up. The same record counts the faults a path has used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Budget {
    pub total: u8,
    pub lose: u8,
    pub duplicate: u8,
    /// A message held back past a clock step (a slow link, a slow etcd).
    pub delay: u8,
    pub crash: u8,
    pub etcd_down: u8,
    /// Control calls from an identity that is not the coordinator.
    pub forge: u8,
    /// Status queries with a caller-supplied deadline in the past.
    pub forge_status: u8,
    /// Every key under an etcd lease expires (retention ran out).
    pub expire: u8,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    /// Service 0 begins the transaction.
    pub services: Vec<Service>,
    /// Envoy workers per sidecar (each with an inbound and an outbound engine
    /// sharing the sidecar's table).
    pub workers: u8,
    pub budget: Budget,
    pub fault_steps: u8,
    pub steps: u8,
    /// Apps ask their sidecar for the outcome of work they hold prepared
    /// past the deadline (the participant's recovery duty).
    pub apps_ask: bool,
    /// A commit is among the outcomes (checked: the scenario is not vacuous).
    pub can_commit: bool,
    pub can_abort: bool,
    /// The root's app speaks gRPC: its answer is `:status` 200 and
    /// `application/grpc` in the headers, its `grpc-status` in the trailers.
    pub grpc_root: bool,
}

impl Scenario {
    pub fn pods(&self) -> Vec<(usize, u8)> {
        self.services
            .iter()
            .enumerate()
            .flat_map(|(s, svc)| (0..svc.replicas).map(move |r| (s, r)))
            .collect()
    }

    pub fn pod_of(&self, svc: usize, replica: u8) -> usize {
        self.pods()
            .iter()
            .position(|p| *p == (svc, replica))
            .unwrap_or(0)
    }

    fn node(&self, pod: usize) -> String {
        let (s, r) = self.pods()[pod];
        let svc = &self.services[s];
        if svc.replicas > 1 {
            format!("{}{}", svc.name, r + 1)
        } else {
            svc.name.to_string()
        }
    }

    fn config(&self, pod: usize, inbound: bool) -> TxnConfig {
        let begin = if self.pods()[pod].0 == 0 && inbound {
            r#"[{"method":"POST","path_prefix":"/checkout"}]"#
        } else {
            "[]"
        };
        let json = format!(
            r#"{{"direction":"{}","begin":{begin},"default_timeout_ms":{TIMEOUT_MS},
                "node":"{}","in_doubt_grace_ms":{GRACE_MS},"recovery_interval_ms":1000,
                "recovery_after_ms":1000,"etcd_timeout_ms":1000,"control_timeout_ms":1000,
                "phase2_give_up_ms":6000,"max_in_flight":4}}"#,
            if inbound { "inbound" } else { "outbound" },
            self.node(pod)
        );
        TxnConfig::parse(json.as_bytes()).expect("model config")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn of(c: &Callout) -> Self {
        Req {
            method: c.method.to_string(),
            path: c.path.clone(),
            headers: c.headers.clone(),
            body: c.body.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resp {
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    fn none() -> Self {
        Resp {
            status: None,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
    fn json(status: u16, body: &str) -> Self {
        Resp {
            status: Some(status),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }
    fn of(r: CalloutResponse) -> Self {
        Resp {
            status: r.status,
            headers: Vec::new(),
            body: r.body,
        }
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Who waits for an answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Caller {
    Client,
    /// Someone in the mesh that is not the transaction's coordinator.
    Attacker,
    /// A callout of an engine (`ctx`: the context it was dispatched from).
    Engine {
        pod: u8,
        life: u8,
        ctx: u32,
        token: u32,
    },
    /// An app's business call to another service.
    App {
        pod: u8,
    },
    /// The same call as it left through the app's sidecar (stream `ctx` of
    /// its outbound listener): the answer passes that stream's response
    /// path, then reaches the app.
    Outbound {
        pod: u8,
        life: u8,
        ctx: u32,
    },
    /// An app asking its sidecar for an outcome (recovery).
    AppAsk {
        pod: u8,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    /// Any replica of a service, through its sidecar's inbound listener.
    Service(u8),
    /// One pod's inbound listener.
    Pod(u8),
    /// One pod's app, directly (the sidecar's `local_app` cluster).
    App(u8),
    Etcd,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    Call { to: Dest, from: Caller, req: Req },
    Answer { to: Caller, resp: Resp },
}

/// Where an inbound stream is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum At {
    /// Passed to the app; its answer is awaited.
    App,
    /// Held by the engine (an op answers it).
    Engine,
    /// The app answered; the engine holds the response.
    Paused(Resp),
    /// An outbound call passed on to its destination; its answer is awaited.
    Upstream,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StreamRec {
    pub engine: u8,
    pub stream: Stream,
    pub caller: Caller,
    pub at: At,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pod {
    pub svc: u8,
    pub up: bool,
    pub life: u8,
    /// Index `worker * 2`: inbound; `worker * 2 + 1`: outbound.
    pub engines: Vec<TxnEngine>,
    pub shared: BTreeMap<String, Vec<u8>>,
    pub streams: BTreeMap<u32, StreamRec>,
    /// The app's business request in progress: its inbound stream, the
    /// calls it still waits for, whether one failed.
    pub busy: Option<(u32, u8, u8, bool)>,
    pub asking: bool,
    pub asked_at: Option<u8>,
}

/// A participant's work for the transaction, as its database holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Work {
    None,
    Working,
    Prepared,
    Committed,
    Aborted,
    ReadOnly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Voted {
    Commit,
    ReadOnly,
    Abort,
}

/// One service's database (replicas share it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Db {
    pub plan: Plan,
    pub work: Work,
    pub worked: bool,
    pub voted: Option<Voted>,
    pub deadline: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Told {
    Nothing,
    Committed,
    Aborted,
    /// 503 outcome unknown, or the connection failed.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct World {
    pub step: u8,
    pub pods: Vec<Pod>,
    pub dbs: Vec<Db>,
    pub etcd: Etcd,
    /// Messages in flight: all are delivered (or lost) before the clock
    /// moves, except those a `Delay` fault moved to `late`.
    pub net: BTreeSet<Msg>,
    pub late: BTreeSet<Msg>,
    pub client: Told,
    /// The root's app answered the client's call with a failure.
    pub root_failed: bool,
    pub txn: Option<String>,
    pub used: Budget,
    /// What an app saw that the protocol forbids.
    pub violations: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Deliver(Msg, u8, u8),
    DeliverLate(Msg, u8, u8),
    Duplicate(Msg, u8, u8),
    Lose(Msg),
    Delay(Msg),
    Advance,
    Release(u8),
    Ask(u8),
    Crash(u8),
    Restart(u8),
    EtcdDown,
    EtcdUp,
    Forge(u8, Outcome),
    ForgeStatus(u8),
    Expire,
}

fn new_engines(
    sc: &Scenario,
    pod: usize,
    life: u8,
    shared: &mut BTreeMap<String, Vec<u8>>,
    now: u64,
) -> Vec<TxnEngine> {
    let mut out = Vec::new();
    for e in 0..(sc.workers as usize * 2) {
        let mut h = ModelHost::new(std::mem::take(shared), now, e as u32 + 1);
        h.seed = ((pod as u64) << 16) | (u64::from(life) << 8) | e as u64;
        let mut engine = TxnEngine::new(sc.config(pod, e % 2 == 0), &h);
        engine.set_root_context(e as u32 + 1);
        *shared = h.shared.take();
        out.push(engine);
    }
    out
}

/// etcd calls that carry no decision: the recovery loop's scans, the
/// pending-work keys' upkeep (puts, and the unpend that also puts finished
/// commits' records under the retention lease) and the lease grants.
fn background(c: &Callout) -> bool {
    let body = String::from_utf8_lossy(&c.body);
    match c.path.as_str() {
        "/v3/kv/range" => body.contains("range_end"),
        "/v3/kv/put" | "/v3/kv/deleterange" | "/v3/lease/grant" => true,
        "/v3/kv/txn" => !body.contains("compare") || body.contains("ignore_value"),
        _ => false,
    }
}

impl World {
    pub fn new(sc: &Scenario, plans: &[Plan]) -> Self {
        let pods: Vec<Pod> = sc
            .pods()
            .iter()
            .enumerate()
            .map(|(i, (s, _))| {
                let mut shared = BTreeMap::new();
                let engines = new_engines(sc, i, 0, &mut shared, T0 + sc.services[*s].skew_ms);
                Pod {
                    svc: *s as u8,
                    up: true,
                    life: 0,
                    engines,
                    shared,
                    streams: BTreeMap::new(),
                    busy: None,
                    asking: false,
                    asked_at: None,
                }
            })
            .collect();
        let mut w = World {
            step: 0,
            pods,
            dbs: plans
                .iter()
                .map(|p| Db {
                    plan: *p,
                    work: Work::None,
                    worked: false,
                    voted: None,
                    deadline: 0,
                })
                .collect(),
            etcd: {
                // The mesh has been running: the retention leases of now
                // and of the next time bucket are granted.
                let r = sc.config(0, true).retention();
                let b = r.bucket(T0);
                Etcd {
                    leases: [r.lease_id(b), r.lease_id(b + 1)].into(),
                    ..Etcd::default()
                }
            },
            net: BTreeSet::new(),
            late: BTreeSet::new(),
            client: Told::Nothing,
            root_failed: false,
            txn: None,
            used: Budget::default(),
            violations: BTreeSet::new(),
        };
        w.net.insert(Msg::Call {
            to: Dest::Pod(0),
            from: Caller::Client,
            req: Req {
                method: "POST".into(),
                path: "/checkout".into(),
                headers: Vec::new(),
                body: Vec::new(),
            },
        });
        w
    }

    fn now(&self, sc: &Scenario, svc: u8) -> u64 {
        T0 + u64::from(self.step) * STEP + sc.services[svc as usize].skew_ms
    }

    fn can_fault(&self, sc: &Scenario, used: u8, limit: u8) -> bool {
        self.step < sc.fault_steps && self.used.total < sc.budget.total && used < limit
    }

    // ----- actions ---------------------------------------------------------

    pub fn actions(&self, sc: &Scenario, out: &mut Vec<Action>) {
        let workers = sc.workers;
        let targets = |m: &Msg| match m {
            Msg::Call {
                to: Dest::Service(s),
                ..
            } => (sc.services[*s as usize].replicas, workers),
            Msg::Call {
                to: Dest::Pod(_), ..
            } => (1, workers),
            _ => (1, 1),
        };
        for m in &self.late {
            let (replicas, workers_for) = targets(m);
            for r in 0..replicas {
                for wk in 0..workers_for {
                    out.push(Action::DeliverLate(m.clone(), r, wk));
                }
            }
        }
        for m in &self.net {
            let (replicas, workers_for) = targets(m);
            if self.can_fault(sc, self.used.delay, sc.budget.delay) {
                out.push(Action::Delay(m.clone()));
            }
            for r in 0..replicas {
                for wk in 0..workers_for {
                    out.push(Action::Deliver(m.clone(), r, wk));
                    let control = matches!(
                        m,
                        Msg::Call {
                            from: Caller::Engine { .. },
                            ..
                        }
                    );
                    if control && self.can_fault(sc, self.used.duplicate, sc.budget.duplicate) {
                        out.push(Action::Duplicate(m.clone(), r, wk));
                    }
                }
            }
            let losable = match m {
                Msg::Call { from, .. } => !matches!(from, Caller::Client | Caller::Attacker),
                Msg::Answer { to, resp } => resp.status.is_some() && *to != Caller::Attacker,
            };
            if losable && self.can_fault(sc, self.used.lose, sc.budget.lose) {
                out.push(Action::Lose(m.clone()));
            }
        }
        if self.step < sc.steps && self.net.is_empty() {
            out.push(Action::Advance);
        }
        for (s, db) in self.dbs.iter().enumerate() {
            if db.work == Work::Working && self.now(sc, s as u8) >= db.deadline {
                out.push(Action::Release(s as u8));
            }
        }
        for (i, p) in self.pods.iter().enumerate() {
            let db = &self.dbs[p.svc as usize];
            if sc.apps_ask
                && p.up
                && !p.asking
                && p.asked_at != Some(self.step)
                && db.work == Work::Prepared
                && self.now(sc, p.svc) >= db.deadline + GRACE_MS
            {
                out.push(Action::Ask(i as u8));
            }
            if p.up && self.can_fault(sc, self.used.crash, sc.budget.crash) {
                out.push(Action::Crash(i as u8));
            }
            if !p.up {
                out.push(Action::Restart(i as u8));
            }
        }
        if !self.etcd.down && self.can_fault(sc, self.used.etcd_down, sc.budget.etcd_down) {
            out.push(Action::EtcdDown);
        }
        if self.etcd.down {
            out.push(Action::EtcdUp);
        }
        if !self.etcd.leased.is_empty() && self.can_fault(sc, self.used.expire, sc.budget.expire) {
            out.push(Action::Expire);
        }
        if self.txn.is_some() {
            if self.can_fault(sc, self.used.forge, sc.budget.forge) {
                for s in 1..sc.services.len() {
                    out.push(Action::Forge(s as u8, Outcome::Committed));
                    out.push(Action::Forge(s as u8, Outcome::Aborted));
                }
            }
            if self.can_fault(sc, self.used.forge_status, sc.budget.forge_status) {
                for p in 0..self.pods.len() {
                    out.push(Action::ForgeStatus(p as u8));
                }
            }
        }
    }

    pub fn apply(&mut self, sc: &Scenario, a: Action) {
        match a {
            Action::Deliver(m, r, wk) => {
                self.net.remove(&m);
                self.deliver(sc, m, r, wk);
            }
            Action::DeliverLate(m, r, wk) => {
                self.late.remove(&m);
                self.deliver(sc, m, r, wk);
            }
            Action::Delay(m) => {
                self.fault(|u| &mut u.delay);
                self.net.remove(&m);
                self.late.insert(m);
            }
            Action::Duplicate(m, r, wk) => {
                self.fault(|u| &mut u.duplicate);
                self.deliver(sc, m, r, wk);
            }
            Action::Lose(m) => {
                self.fault(|u| &mut u.lose);
                self.net.remove(&m);
                let to = match m {
                    Msg::Call { from, .. } => from,
                    Msg::Answer { to, .. } => to,
                };
                self.net.insert(Msg::Answer {
                    to,
                    resp: Resp::none(),
                });
            }
            Action::Advance => {
                self.step += 1;
                if self.step >= sc.fault_steps {
                    // Faults stop: everything comes back.
                    for p in 0..self.pods.len() {
                        if !self.pods[p].up {
                            self.restart(sc, p);
                        }
                    }
                    self.etcd.down = false;
                }
                for p in 0..self.pods.len() {
                    if !self.pods[p].up {
                        continue;
                    }
                    for e in 0..self.pods[p].engines.len() {
                        let root = e as u32 + 1;
                        let (_, host) = self.run(sc, p, e, root, |_| {}, |eng, h| eng.on_tick(h));
                        self.effects(sc, p, host);
                    }
                }
            }
            Action::Release(s) => {
                let db = &mut self.dbs[s as usize];
                db.work = Work::Aborted;
            }
            Action::Ask(p) => {
                let pod = &mut self.pods[p as usize];
                pod.asking = true;
                pod.asked_at = Some(self.step);
                let db = &self.dbs[pod.svc as usize];
                let txn = self.txn.clone().unwrap_or_default();
                self.net.insert(Msg::Call {
                    to: Dest::Pod(p),
                    from: Caller::AppAsk { pod: p },
                    req: Req {
                        method: "GET".into(),
                        path: format!("/txmesh/txns/{txn}"),
                        headers: vec![("x-txmesh-deadline".into(), db.deadline.to_string())],
                        body: Vec::new(),
                    },
                });
            }
            Action::Crash(p) => {
                self.fault(|u| &mut u.crash);
                self.crash(p as usize);
            }
            Action::Restart(p) => self.restart(sc, p as usize),
            Action::EtcdDown => {
                self.fault(|u| &mut u.etcd_down);
                self.etcd.down = true;
            }
            Action::EtcdUp => self.etcd.down = false,
            Action::Expire => {
                self.fault(|u| &mut u.expire);
                self.etcd.expire();
            }
            Action::Forge(s, o) => {
                self.fault(|u| &mut u.forge);
                let path = match o {
                    Outcome::Committed => "/txmesh/commit",
                    Outcome::Aborted => "/txmesh/abort",
                };
                let txn = self.txn.clone().unwrap_or_default();
                self.net.insert(Msg::Call {
                    to: Dest::Service(s),
                    from: Caller::Attacker,
                    req: Req {
                        method: "POST".into(),
                        path: path.into(),
                        headers: vec![("x-txmesh-txn".into(), txn)],
                        body: Vec::new(),
                    },
                });
            }
            Action::ForgeStatus(p) => {
                self.fault(|u| &mut u.forge_status);
                let txn = self.txn.clone().unwrap_or_default();
                self.net.insert(Msg::Call {
                    to: Dest::Pod(p),
                    from: Caller::Attacker,
                    req: Req {
                        method: "GET".into(),
                        path: format!("/txmesh/txns/{txn}"),
                        headers: vec![("x-txmesh-deadline".into(), "1".into())],
                        body: Vec::new(),
                    },
                });
            }
        }
    }

    fn fault(&mut self, kind: impl FnOnce(&mut Budget) -> &mut u8) {
        self.used.total += 1;
        *kind(&mut self.used) += 1;
    }

    fn crash(&mut self, p: usize) {
        let pod = &mut self.pods[p];
        pod.up = false;
        pod.life += 1;
        pod.engines.clear();
        pod.shared.clear();
        // Every connection into the sidecar is reset.
        let streams = std::mem::take(&mut pod.streams);
        for (_, rec) in streams {
            self.answer(rec.caller, Resp::none());
        }
    }

    fn restart(&mut self, sc: &Scenario, p: usize) {
        let now = self.now(sc, self.pods[p].svc);
        let life = self.pods[p].life;
        let mut shared = BTreeMap::new();
        let engines = new_engines(sc, p, life, &mut shared, now);
        let pod = &mut self.pods[p];
        pod.engines = engines;
        pod.shared = shared;
        pod.up = true;
    }

    // ----- running an engine callback -------------------------------------

    fn tokens_in_use(&self, p: usize) -> BTreeSet<u32> {
        let mut used = BTreeSet::new();
        let mut note = |c: &Caller| {
            if let Caller::Engine { pod, token, .. } = c {
                if *pod as usize == p {
                    used.insert(*token);
                }
            }
        };
        for m in self.net.iter().chain(&self.late) {
            match m {
                Msg::Call { from, .. } => note(from),
                Msg::Answer { to, .. } => note(to),
            }
        }
        for pod in &self.pods {
            for rec in pod.streams.values() {
                note(&rec.caller);
            }
        }
        used
    }

    /// Runs `f` on engine `e` of pod `p` as the callback of context `ctx`,
    /// with the pod's shared data and clock; `setup` sets the stream's
    /// headers and properties.
    fn run<R>(
        &mut self,
        sc: &Scenario,
        p: usize,
        e: usize,
        ctx: u32,
        setup: impl FnOnce(&mut ModelHost),
        f: impl FnOnce(&mut TxnEngine, &ModelHost) -> R,
    ) -> (R, ModelHost) {
        let now = self.now(sc, self.pods[p].svc);
        let tokens = self.tokens_in_use(p);
        let pod = &mut self.pods[p];
        let mut host = ModelHost::new(std::mem::take(&mut pod.shared), now, ctx);
        host.seed = ((p as u64) << 16) | (u64::from(pod.life) << 8) | 0x80 | e as u64;
        *host.tokens_in_use.borrow_mut() = tokens;
        setup(&mut host);
        let r = f(&mut pod.engines[e], &host);
        pod.shared = host.shared.take();
        (r, host)
    }

    fn free_ctx(&self, p: usize) -> u32 {
        let streams = &self.pods[p].streams;
        (FIRST_STREAM..)
            .find(|c| !streams.contains_key(c))
            .unwrap_or(u32::MAX)
    }

    /// Carries out what a callback asked for.
    fn effects(&mut self, sc: &Scenario, p: usize, host: ModelHost) {
        let life = self.pods[p].life;
        for eff in host.effects.take() {
            match eff {
                Effect::Dispatch { from, token, call } => {
                    let caller = Caller::Engine {
                        pod: p as u8,
                        life,
                        ctx: from,
                        token,
                    };
                    if call.cluster == ETCD && background(&call) {
                        // Recovery scans and pending-key upkeep: answered at
                        // once (a reduction: their timing is not explored).
                        let resp = self.etcd_answer(&Req::of(&call));
                        self.deliver_answer(sc, caller, resp);
                        continue;
                    }
                    let to = match call.cluster.as_str() {
                        APP => Dest::App(p as u8),
                        ETCD => Dest::Etcd,
                        name => match sc.services.iter().position(|s| s.name == name) {
                            Some(s) => Dest::Service(s as u8),
                            None => {
                                self.violations
                                    .insert(format!("callout to unknown cluster {name}"));
                                continue;
                            }
                        },
                    };
                    self.net.insert(Msg::Call {
                        to,
                        from: Caller::Engine {
                            pod: p as u8,
                            life,
                            ctx: from,
                            token,
                        },
                        req: Req::of(&call),
                    });
                }
                Effect::Reply {
                    ctx,
                    status,
                    headers,
                    body,
                } => {
                    let resp = Resp {
                        status: Some(status),
                        headers,
                        body,
                    };
                    self.finish_stream(sc, p, ctx, resp);
                }
                Effect::Resume { ctx, headers } => {
                    let paused = match self.pods[p].streams.get(&ctx) {
                        Some(StreamRec {
                            at: At::Paused(r), ..
                        }) => Some(r.clone()),
                        _ => None,
                    };
                    if let Some(mut resp) = paused {
                        for (k, v) in headers {
                            resp.headers.retain(|(n, _)| *n != k);
                            resp.headers.push((k, v));
                        }
                        self.finish_stream(sc, p, ctx, resp);
                    }
                }
            }
        }
    }

    /// Stream `ctx` answers its caller with `resp` and ends (the engine's
    /// stream-done callback runs).
    fn finish_stream(&mut self, sc: &Scenario, p: usize, ctx: u32, resp: Resp) {
        let Some(rec) = self.pods[p].streams.remove(&ctx) else {
            return;
        };
        self.answer(rec.caller.clone(), resp);
        if !self.pods[p].up {
            return;
        }
        let stream = rec.stream.clone();
        self.stream_done(sc, p, rec.engine as usize, ctx, &stream);
    }

    /// The engine's stream-done callback for stream `ctx`, and its effects.
    fn stream_done(&mut self, sc: &Scenario, p: usize, engine: usize, ctx: u32, stream: &Stream) {
        let (_, host) = self.run(
            sc,
            p,
            engine,
            ctx,
            |_| {},
            |e, h| e.on_stream_done(h, ctx, stream),
        );
        self.effects(sc, p, host);
    }

    fn answer(&mut self, to: Caller, resp: Resp) {
        self.net.insert(Msg::Answer { to, resp });
    }

    // ----- delivery --------------------------------------------------------

    fn deliver(&mut self, sc: &Scenario, m: Msg, replica: u8, worker: u8) {
        match m {
            Msg::Call { to, from, req } => match to {
                Dest::Etcd => {
                    let resp = self.etcd_answer(&req);
                    self.answer(from, resp);
                }
                Dest::App(p) => {
                    let resp = self.app_control(self.pods[p as usize].svc, &req);
                    self.answer(from, resp);
                }
                Dest::Service(s) => {
                    let p = sc.pod_of(s as usize, replica);
                    self.inbound(sc, p, worker, from, req);
                }
                Dest::Pod(p) => self.inbound(sc, p as usize, worker, from, req),
            },
            Msg::Answer { to, resp } => self.deliver_answer(sc, to, resp),
        }
    }

    fn etcd_answer(&mut self, req: &Req) -> Resp {
        Resp::of(if self.etcd.down {
            Etcd::refused()
        } else {
            self.etcd.handle(&Callout {
                cluster: ETCD.into(),
                method: "POST",
                path: req.path.clone(),
                headers: Vec::new(),
                body: req.body.clone(),
                timeout_ms: 1,
                grpc: None,
            })
        })
    }

    fn deliver_answer(&mut self, sc: &Scenario, to: Caller, resp: Resp) {
        match to {
            Caller::Client => {
                self.client = match (resp.status, resp.header("x-txmesh-outcome")) {
                    (_, Some("committed")) => Told::Committed,
                    (_, Some("aborted")) => Told::Aborted,
                    _ => Told::Unknown,
                };
                if let Some(id) = resp.header("x-txmesh-txn") {
                    self.txn.get_or_insert(id.to_string());
                }
            }
            Caller::Attacker => {}
            Caller::Engine {
                pod,
                life,
                ctx,
                token,
            } => {
                let p = pod as usize;
                if !self.pods[p].up || self.pods[p].life != life {
                    return;
                }
                let engine = if (ctx as usize) >= 1 && (ctx as usize) <= self.pods[p].engines.len()
                {
                    ctx as usize - 1
                } else {
                    match self.pods[p].streams.get(&ctx) {
                        Some(rec) => rec.engine as usize,
                        // The stream ended: Envoy cancelled its callouts.
                        None => return,
                    }
                };
                let cr = CalloutResponse {
                    status: resp.status,
                    body: resp.body,
                };
                let (_, host) = self.run(
                    sc,
                    p,
                    engine,
                    ctx,
                    |_| {},
                    |e, h| e.on_callout(h, token, cr),
                );
                self.effects(sc, p, host);
            }
            Caller::App { pod } => {
                let p = pod as usize;
                let Some((ctx, life, waiting, failed)) = self.pods[p].busy else {
                    return;
                };
                let ok = matches!(resp.status, Some(200..=299));
                let waiting = waiting.saturating_sub(1);
                let failed = failed || !ok;
                if waiting > 0 {
                    self.pods[p].busy = Some((ctx, life, waiting, failed));
                } else {
                    self.pods[p].busy = None;
                    if self.pods[p].life == life {
                        let fails = failed || self.dbs[self.pods[p].svc as usize].plan.fails();
                        let status = if fails { 500 } else { 200 };
                        self.app_answers(sc, p, ctx, Resp::json(status, "{}"));
                    }
                }
            }
            Caller::Outbound { pod, life, ctx } => {
                let p = pod as usize;
                if self.pods[p].up && self.pods[p].life == life {
                    self.outbound_answer(sc, p, ctx, resp);
                }
            }
            Caller::AppAsk { pod } => {
                let p = pod as usize;
                self.pods[p].asking = false;
                let svc = self.pods[p].svc as usize;
                let body = String::from_utf8_lossy(&resp.body).into_owned();
                if body.contains(r#""outcome":"committed""#) {
                    self.apply_outcome(svc, Outcome::Committed);
                } else if body.contains(r#""outcome":"aborted""#) {
                    self.apply_outcome(svc, Outcome::Aborted);
                }
            }
        }
    }

    /// The mesh identity (mTLS URI SAN) a caller shows a sidecar's inbound
    /// listener: its service's, the attacker's own; none for the client and
    /// an app asking its own sidecar.
    fn identity_of(&self, sc: &Scenario, c: &Caller) -> Option<String> {
        let svc = |pod: u8| {
            let s = self.pods[pod as usize].svc as usize;
            format!("spiffe://model/{}", sc.services[s].name)
        };
        match c {
            Caller::Engine { pod, .. } | Caller::Outbound { pod, .. } | Caller::App { pod } => {
                Some(svc(*pod))
            }
            Caller::Attacker => Some("spiffe://model/attacker".into()),
            Caller::Client | Caller::AppAsk { .. } => None,
        }
    }

    /// A request arrives at pod `p`'s inbound listener, on `worker`.
    fn inbound(&mut self, sc: &Scenario, p: usize, worker: u8, from: Caller, req: Req) {
        if !self.pods[p].up {
            self.answer(from, Resp::none());
            return;
        }
        let from_caller = from.clone();
        let ctx = self.free_ctx(p);
        let e = worker as usize * 2;
        let mut headers = vec![
            (":method".to_string(), req.method.clone().into_bytes()),
            (":path".to_string(), req.path.clone().into_bytes()),
        ];
        headers.extend(
            req.headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
        );
        self.pods[p].streams.insert(
            ctx,
            StreamRec {
                engine: e as u8,
                stream: Stream::Pass,
                caller: from,
                at: At::Engine,
            },
        );
        let peer = self.identity_of(sc, &from_caller);
        let ((stream, verdict), host) = self.run(
            sc,
            p,
            e,
            ctx,
            |h| {
                *h.request_headers.borrow_mut() = headers;
                if let Some(id) = peer {
                    h.properties.push((
                        "connection.uri_san_peer_certificate".into(),
                        id.into_bytes(),
                    ));
                }
            },
            |eng, h| eng.on_request_headers(h, ctx),
        );
        let forwarded: Vec<(String, String)> = host
            .request_headers
            .borrow()
            .iter()
            .filter(|(k, _)| !k.starts_with(':'))
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        if let Some(rec) = self.pods[p].streams.get_mut(&ctx) {
            rec.stream = stream;
        }
        self.effects(sc, p, host);
        let Some(rec) = self.pods[p].streams.get_mut(&ctx) else {
            return; // answered already
        };
        if verdict == Verdict::Pause {
            return; // the engine holds it
        }
        rec.at = At::App;
        let req = Req {
            headers: forwarded,
            ..req
        };
        self.app_request(sc, p, ctx, req);
    }

    /// The app answers the request its sidecar passed on stream `ctx`; the
    /// answer goes back through the sidecar's response path.
    fn app_answers(&mut self, sc: &Scenario, p: usize, ctx: u32, resp: Resp) {
        let Some(rec) = self.pods[p].streams.get(&ctx) else {
            return; // the stream is gone (reset, or the sidecar crashed)
        };
        if rec.at != At::App {
            return;
        }
        let engine = rec.engine as usize;
        let mut stream = rec.stream.clone();
        let root = matches!(stream, Stream::Root { .. });
        let ok = matches!(resp.status, Some(200..=299));
        if root && !ok {
            self.root_failed = true;
        }
        let (verdict, host) = if root && sc.grpc_root {
            // The headers (the status is in the trailers)...
            let (verdict, host) = self.run(
                sc,
                p,
                engine,
                ctx,
                |h| {
                    *h.response_headers.borrow_mut() = vec![
                        (":status".into(), b"200".to_vec()),
                        ("content-type".into(), b"application/grpc".to_vec()),
                    ]
                },
                |e, h| e.on_response_headers(h, ctx, &mut stream, false),
            );
            if verdict == Verdict::Pause {
                // Held at the headers: the trailers wait behind them.
                (verdict, host)
            } else {
                // ...passed: the trailers decide.
                self.effects(sc, p, host);
                let status: &[u8] = if ok { b"0" } else { b"13" };
                self.run(
                    sc,
                    p,
                    engine,
                    ctx,
                    |h| {
                        *h.response_trailers.borrow_mut() =
                            vec![("grpc-status".into(), status.to_vec())]
                    },
                    |e, h| e.on_response_trailers(h, ctx, &mut stream),
                )
            }
        } else {
            let status = resp.status.map(|s| s.to_string()).unwrap_or_default();
            self.run(
                sc,
                p,
                engine,
                ctx,
                |h| {
                    *h.response_headers.borrow_mut() = vec![(":status".into(), status.into_bytes())]
                },
                |e, h| e.on_response_headers(h, ctx, &mut stream, true),
            )
        };
        let set: Vec<(String, String)> = host
            .response_headers
            .borrow()
            .iter()
            .filter(|(k, _)| !k.starts_with(':'))
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        if let Some(rec) = self.pods[p].streams.get_mut(&ctx) {
            rec.at = At::Paused(Resp {
                headers: set.clone(),
                ..resp.clone()
            });
            // What the engine made of the stream (a root's is its own now).
            rec.stream = stream;
        }
        self.effects(sc, p, host);
        if verdict == Verdict::Continue && self.pods[p].streams.contains_key(&ctx) {
            self.finish_stream(
                sc,
                p,
                ctx,
                Resp {
                    headers: set,
                    ..resp
                },
            );
        }
    }

    // ----- apps ------------------------------------------------------------

    fn app_request(&mut self, sc: &Scenario, p: usize, ctx: u32, req: Req) {
        let svc = self.pods[p].svc;
        if req.path.starts_with("/txmesh/") {
            let resp = self.app_control(svc, &req);
            self.app_answers(sc, p, ctx, resp);
            return;
        }
        // Business work: reserve, then call the children with the header.
        let Some(txn) = req.header("x-txmesh-txn").map(str::to_string) else {
            self.violations.insert(format!(
                "{} got a business call without a transaction",
                sc.services[svc as usize].name
            ));
            self.app_answers(sc, p, ctx, Resp::json(400, "{}"));
            return;
        };
        self.txn.get_or_insert(txn.clone());
        let deadline = req
            .header("x-txmesh-deadline")
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let db = &mut self.dbs[svc as usize];
        match db.work {
            Work::None => {
                db.work = Work::Working;
                db.worked = true;
                db.deadline = deadline;
            }
            // A repeated call for work in progress: nothing new.
            Work::Working => {}
            _ => {
                self.app_answers(sc, p, ctx, Resp::json(409, "{}"));
                return;
            }
        }
        let children = sc.services[svc as usize].children.clone();
        if children.is_empty() {
            let status = if self.dbs[svc as usize].plan.fails() {
                500
            } else {
                200
            };
            self.app_answers(sc, p, ctx, Resp::json(status, "{}"));
            return;
        }
        let life = self.pods[p].life;
        self.pods[p].busy = Some((ctx, life, children.len() as u8, false));
        for c in children {
            self.app_call(sc, p, c, &txn, deadline);
        }
    }

    /// The app of pod `p` calls service `child` through its sidecar's
    /// outbound listener (worker 0).
    fn app_call(&mut self, sc: &Scenario, p: usize, child: usize, txn: &str, deadline: u64) {
        if !self.pods[p].up {
            self.answer(Caller::App { pod: p as u8 }, Resp::none());
            return;
        }
        let ctx = self.free_ctx(p);
        let name = sc.services[child].name;
        let headers = vec![
            (":method".to_string(), b"POST".to_vec()),
            (":path".to_string(), b"/work".to_vec()),
            ("x-txmesh-txn".to_string(), txn.as_bytes().to_vec()),
            (
                "x-txmesh-deadline".to_string(),
                deadline.to_string().into_bytes(),
            ),
        ];
        self.pods[p].streams.insert(
            ctx,
            StreamRec {
                engine: 1,
                stream: Stream::Pass,
                caller: Caller::App { pod: p as u8 },
                at: At::Engine,
            },
        );
        let ((stream, verdict), host) = self.run(
            sc,
            p,
            1,
            ctx,
            |h| {
                *h.request_headers.borrow_mut() = headers;
                h.properties = vec![("xds.cluster_name".into(), name.as_bytes().to_vec())];
            },
            |e, h| e.on_request_headers(h, ctx),
        );
        let forwarded: Vec<(String, String)> = host
            .request_headers
            .borrow()
            .iter()
            .filter(|(k, _)| !k.starts_with(':'))
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        self.effects(sc, p, host);
        // Refused (a local reply answered the app), or passed on.
        if !self.pods[p].streams.contains_key(&ctx) {
            return;
        }
        if verdict != Verdict::Continue {
            if let Some(rec) = self.pods[p].streams.remove(&ctx) {
                self.stream_done(sc, p, rec.engine as usize, ctx, &stream);
            }
            return;
        }
        if let Some(rec) = self.pods[p].streams.get_mut(&ctx) {
            rec.stream = stream;
            rec.at = At::Upstream;
        }
        let life = self.pods[p].life;
        self.net.insert(Msg::Call {
            to: Dest::Service(child as u8),
            from: Caller::Outbound {
                pod: p as u8,
                life,
                ctx,
            },
            req: Req {
                method: "POST".into(),
                path: "/work".into(),
                headers: forwarded,
                body: Vec::new(),
            },
        });
    }

    /// The answer to an app's outbound call passes its sidecar's outbound
    /// stream (response headers, then the stream ends), then reaches the app.
    fn outbound_answer(&mut self, sc: &Scenario, p: usize, ctx: u32, resp: Resp) {
        let Some(rec) = self.pods[p].streams.get(&ctx) else {
            return;
        };
        if rec.at != At::Upstream {
            return;
        }
        let (engine, mut stream) = (rec.engine as usize, rec.stream.clone());
        let mut headers: Vec<(String, Vec<u8>)> = vec![(
            ":status".into(),
            resp.status
                .map(|s| s.to_string())
                .unwrap_or_default()
                .into_bytes(),
        )];
        headers.extend(
            resp.headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
        );
        let (_, host) = self.run(
            sc,
            p,
            engine,
            ctx,
            |h| *h.response_headers.borrow_mut() = headers,
            |e, h| e.on_response_headers(h, ctx, &mut stream, true),
        );
        self.effects(sc, p, host);
        if let Some(rec) = self.pods[p].streams.remove(&ctx) {
            self.stream_done(sc, p, rec.engine as usize, ctx, &stream);
        }
        self.deliver_answer(sc, Caller::App { pod: p as u8 }, resp);
    }

    /// A participant app's answer to a control call, by the contract in
    /// docs/protocol.md: prepare makes work durable and votes; commit and
    /// abort are idempotent; an abort of unknown work is acknowledged; a
    /// prepare of work it never did votes abort.
    fn app_control(&mut self, svc: u8, req: &Req) -> Resp {
        let name = format!("service {}", svc);
        let db = &mut self.dbs[svc as usize];
        match req.path.as_str() {
            "/txmesh/prepare" => {
                let vote = match db.work {
                    Work::Working => {
                        let v = match db.plan {
                            Plan::Commit
                            | Plan::CommitOrAbort
                            | Plan::Fails
                            | Plan::CommitOrFails => Voted::Commit,
                            Plan::Abort => Voted::Abort,
                            Plan::ReadOnly => Voted::ReadOnly,
                        };
                        db.work = match v {
                            Voted::Commit => Work::Prepared,
                            Voted::ReadOnly => Work::ReadOnly,
                            Voted::Abort => Work::Aborted,
                        };
                        db.voted = Some(v);
                        v
                    }
                    Work::Prepared | Work::Committed => Voted::Commit,
                    Work::ReadOnly => Voted::ReadOnly,
                    Work::Aborted => Voted::Abort,
                    Work::None => {
                        db.work = Work::Aborted;
                        db.voted = Some(Voted::Abort);
                        Voted::Abort
                    }
                };
                match vote {
                    Voted::Commit => Resp::json(200, r#"{"vote":"commit"}"#),
                    Voted::ReadOnly => Resp::json(200, r#"{"vote":"readonly"}"#),
                    Voted::Abort => Resp::json(200, r#"{"vote":"abort","reason":"no"}"#),
                }
            }
            "/txmesh/commit" => match db.work {
                Work::Prepared | Work::Committed => {
                    db.work = Work::Committed;
                    Resp::json(200, "{}")
                }
                Work::None | Work::ReadOnly => Resp::json(200, "{}"),
                Work::Working => {
                    self.violations
                        .insert(format!("{name}: commit of work never prepared"));
                    Resp::json(409, "{}")
                }
                Work::Aborted => {
                    if db.worked || db.voted.is_some() {
                        self.violations
                            .insert(format!("{name}: commit after abort"));
                    }
                    Resp::json(409, "{}")
                }
            },
            "/txmesh/abort" => match db.work {
                Work::Working | Work::Prepared => {
                    db.work = Work::Aborted;
                    Resp::json(200, "{}")
                }
                Work::None | Work::Aborted | Work::ReadOnly => Resp::json(200, "{}"),
                Work::Committed => {
                    self.violations
                        .insert(format!("{name}: abort after commit"));
                    Resp::json(409, "{}")
                }
            },
            _ => Resp::json(404, "{}"),
        }
    }

    /// An app applies an outcome it learned by asking (recovery).
    fn apply_outcome(&mut self, svc: usize, o: Outcome) {
        let db = &mut self.dbs[svc];
        match (db.work, o) {
            (Work::Prepared, Outcome::Committed) => db.work = Work::Committed,
            (Work::Prepared, Outcome::Aborted) => db.work = Work::Aborted,
            _ => {}
        }
    }

    // ----- what is checked -------------------------------------------------

    fn final_outcomes(&self) -> (bool, bool) {
        let committed = self.dbs.iter().any(|d| d.work == Work::Committed);
        let aborted = self.dbs.iter().any(|d| d.worked && d.work == Work::Aborted);
        (committed, aborted)
    }

    /// No app saw a forbidden step, and no two participants ended differently.
    pub fn agreement(&self) -> bool {
        let (c, a) = self.final_outcomes();
        self.violations.is_empty() && !(c && a)
    }

    /// A commit only if every participant that did work voted yes.
    pub fn validity(&self) -> bool {
        let (c, _) = self.final_outcomes();
        !c || self
            .dbs
            .iter()
            .filter(|d| d.worked)
            .all(|d| matches!(d.voted, Some(Voted::Commit | Voted::ReadOnly)))
    }

    /// The record in etcd agrees with every participant, and a commit that
    /// needed two or more prepared participants is recorded.
    pub fn record_matches(&self) -> bool {
        let (c, a) = self.final_outcomes();
        let yes = self
            .dbs
            .iter()
            .filter(|d| d.voted == Some(Voted::Commit))
            .count();
        match self.etcd.decision() {
            Some((Outcome::Committed, _)) => !a,
            Some((Outcome::Aborted, _)) => !c,
            None => !(c && yes >= 2),
        }
    }

    /// No decision record ever contradicted an earlier one (a commit record
    /// expired while someone could still ask, then an abort was recorded).
    pub fn one_decision(&self) -> bool {
        !self.etcd.contradicted
    }

    /// What the client was told agrees with the record and the participants.
    /// The call that began the transaction failed (its app answered a
    /// failure: HTTP non-2xx, gRPC non-OK): nothing commits, and the client
    /// is not told committed.
    pub fn failed_call_aborts(&self) -> bool {
        let (c, _) = self.final_outcomes();
        !self.root_failed
            || (!c
                && self.client != Told::Committed
                && self.etcd.decision().map(|d| d.0) != Some(Outcome::Committed))
    }

    pub fn client_matches(&self) -> bool {
        let (c, a) = self.final_outcomes();
        let record = self.etcd.decision().map(|d| d.0);
        match self.client {
            Told::Committed => !a && record != Some(Outcome::Aborted),
            Told::Aborted => !c && record != Some(Outcome::Committed),
            Told::Nothing | Told::Unknown => true,
        }
    }

    /// Everything that did work has an outcome, and the client an answer.
    pub fn decided(&self) -> bool {
        self.client != Told::Nothing
            && self
                .dbs
                .iter()
                .all(|d| !matches!(d.work, Work::Working | Work::Prepared))
    }

    /// No abort decided on a caller's word: an in-doubt abort is recorded
    /// only once some sidecar's clock is past the deadline and its grace.
    pub fn honest_deadline(&self, sc: &Scenario) -> bool {
        match self.etcd.decision() {
            Some((Outcome::Aborted, reason)) if reason == "in_doubt" => {
                let deadline = self.dbs[0].deadline;
                (0..sc.services.len()).any(|s| self.now(sc, s as u8) >= deadline + GRACE_MS)
            }
            _ => true,
        }
    }

    /// Some participant committed, or (all read-only) the client was told so.
    pub fn committed(&self) -> bool {
        self.final_outcomes().0 || self.client == Told::Committed
    }

    pub fn aborted(&self) -> bool {
        self.client == Told::Aborted
    }
}
