//! A participant app for transaction tests: a real HTTP server implementing
//! the three participant endpoints, recording every call per transaction,
//! voting as told, and (for initiators and middle tiers) calling other
//! services through its sidecar's outbound listener, forwarding only
//! `x-txmesh-txn` as the protocol asks of apps.

use crate::http::Client;
use crate::upstream::{Recorded, Reply, Upstream};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How a participant answers `/txmesh/prepare`.
#[derive(Clone, Debug, PartialEq)]
pub enum Vote {
    Commit,
    ReadOnly,
    /// `{"vote":"abort","reason":...}`
    No(String),
    /// Answers commit after this long (past the deadline: a stall).
    Stall(Duration),
    /// Answers commit once the test opens the latch (at most 10 s): a
    /// prepare held for exactly as long as the test needs, on any machine.
    Until(Latch),
    /// Answers with this HTTP status and no vote.
    Fail(u16),
}

/// A latch a test opens; prepares voting [`Vote::Until`] wait for it.
#[derive(Clone, Debug, Default)]
pub struct Latch(Arc<std::sync::atomic::AtomicBool>);

impl Latch {
    pub fn open(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    /// Waits until the latch is open, at most `at_most`.
    pub fn wait(&self, at_most: Duration) {
        let until = std::time::Instant::now() + at_most;
        while !self.0.load(std::sync::atomic::Ordering::SeqCst) && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl PartialEq for Latch {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

type VoteFn = Arc<dyn Fn(&str) -> Vote + Send + Sync>;

/// What a business request answers once its downstream calls are made:
/// JSON with this status, or a scripted reply (a gRPC answer).
#[derive(Clone, Debug)]
enum BusinessReply {
    Status(u16),
    Scripted(Reply),
}

/// Per-transaction record of one participant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TxnRecord {
    pub business: u32,
    pub prepares: u32,
    pub commits: u32,
    pub aborts: u32,
    pub voted: Option<String>,
}

impl TxnRecord {
    /// The state the participant ended in: committed, aborted, or prepared (in doubt).
    pub fn state(&self) -> &'static str {
        if self.commits > 0 {
            "committed"
        } else if self.aborts > 0 {
            "aborted"
        } else if self.voted.as_deref() == Some("commit") {
            "prepared"
        } else {
            "none"
        }
    }
}

#[derive(Default)]
struct State {
    txns: BTreeMap<String, TxnRecord>,
    /// When each transaction's commit vote was answered (until its commit).
    prepared_at: std::collections::HashMap<String, std::time::Instant>,
    /// How long each committed transaction held its prepared state: from
    /// the commit vote to the commit, µs (read by the benchmarks).
    held_us: Vec<u64>,
    /// How long each business request took the app (its downstream calls
    /// included), µs, and whether it carried a transaction (benchmarks).
    work_us: Vec<(bool, u64)>,
    /// When each transaction's first commit arrived, once
    /// [`TxnApp::keep_commit_times`] asked for it (benchmarks: phase 2's
    /// delivery against the client's answer).
    commit_times: Option<Vec<(String, std::time::Instant)>>,
    /// Calls to control paths without a transaction header, or other oddities.
    errors: Vec<String>,
}

pub struct TxnApp {
    pub name: String,
    pub server: Upstream,
    state: Arc<Mutex<State>>,
    vote: Arc<RwLock<VoteFn>>,
    business_status: Arc<RwLock<BusinessReply>>,
    /// While set, commit and abort answer 503 and change nothing (the app is
    /// "down" for phase 2).
    down: Arc<RwLock<bool>>,
    /// While set, a business request, its downstream calls made, waits for
    /// this latch (at most 10 s) before answering.
    hold: Arc<RwLock<Option<Latch>>>,
    /// While set, a commit waits for this latch (at most 10 s) before it is
    /// applied.
    hold_commit: Arc<RwLock<Option<Latch>>>,
}

/// A downstream call the app makes on each business request: `Host: host`
/// through `outbound` (the app's sidecar outbound listener).
#[derive(Clone, Debug)]
pub struct Downstream {
    pub host: String,
    pub outbound_port: u16,
}

impl Downstream {
    /// One call per host, each through the outbound listener at `outbound_port`.
    pub fn each(hosts: &[&str], outbound_port: u16) -> Vec<Self> {
        hosts
            .iter()
            .map(|h| Self {
                host: h.to_string(),
                outbound_port,
            })
            .collect()
    }
}

impl TxnApp {
    pub fn start(name: &str, vote: Vote) -> Self {
        Self::calling(name, vote, Arc::new(RwLock::new(Vec::new())))
    }

    /// An app that calls `downstream` (filled in later, once the sidecars
    /// exist) on every business request.
    pub fn calling(name: &str, vote: Vote, downstream: Arc<RwLock<Vec<Downstream>>>) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let v = vote.clone();
        let vote: Arc<RwLock<VoteFn>> = Arc::new(RwLock::new(Arc::new(move |_: &str| v.clone())));
        let business_status = Arc::new(RwLock::new(BusinessReply::Status(200)));
        let down = Arc::new(RwLock::new(false));
        let hold: Arc<RwLock<Option<Latch>>> = Arc::new(RwLock::new(None));
        let hold_commit: Arc<RwLock<Option<Latch>>> = Arc::new(RwLock::new(None));
        let (st, vf, bs, nm, dn, hd, hc) = (
            state.clone(),
            vote.clone(),
            business_status.clone(),
            name.to_string(),
            down.clone(),
            hold.clone(),
            hold_commit.clone(),
        );
        let client = Client::new();
        let server = Upstream::with(move |r: &Recorded| {
            if *dn.read().unwrap_or_else(|e| e.into_inner())
                && (r.path == "/txmesh/commit" || r.path == "/txmesh/abort")
            {
                return Reply::status(503);
            }
            if r.path == "/txmesh/commit" {
                let latch = hc.read().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(l) = latch {
                    l.wait(Duration::from_secs(10));
                }
            }
            let reply = handle(r, &nm, &st, &vf, &bs, &downstream, &client);
            if !r.path.starts_with("/txmesh/") {
                let latch = hd.read().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(l) = latch {
                    l.wait(Duration::from_secs(10));
                }
            }
            reply
        });
        Self {
            name: name.to_string(),
            server,
            state,
            vote,
            business_status,
            down,
            hold,
            hold_commit,
        }
    }

    /// Commits wait for `latch` before they are applied (None: at once).
    pub fn hold_commits(&self, latch: Option<Latch>) {
        *self.hold_commit.write().unwrap_or_else(|e| e.into_inner()) = latch;
    }

    /// Business requests, their downstream calls made, wait for `latch`
    /// before answering (None: answer at once).
    pub fn hold_answers(&self, latch: Option<Latch>) {
        *self.hold.write().unwrap_or_else(|e| e.into_inner()) = latch;
    }

    /// Votes by transaction id (for mixed-outcome runs).
    pub fn vote_by(&self, f: impl Fn(&str) -> Vote + Send + Sync + 'static) {
        *self.vote.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(f);
    }

    pub fn set_vote(&self, v: Vote) {
        self.vote_by(move |_| v.clone());
    }

    /// Commit and abort fail (503) while `down` (phase 2 cannot reach the app).
    pub fn set_down(&self, down: bool) {
        *self.down.write().unwrap_or_else(|e| e.into_inner()) = down;
    }

    /// The status business requests answer with (default 200).
    pub fn set_business_status(&self, s: u16) {
        *self
            .business_status
            .write()
            .unwrap_or_else(|e| e.into_inner()) = BusinessReply::Status(s);
    }

    /// Business requests answer `reply` (e.g. [`Reply::grpc`]) once their
    /// downstream calls are made.
    pub fn set_business_reply(&self, reply: Reply) {
        *self
            .business_status
            .write()
            .unwrap_or_else(|e| e.into_inner()) = BusinessReply::Scripted(reply);
    }

    /// The first transaction (in id order) whose record satisfies `f`.
    pub fn txn_where(&self, f: impl Fn(&TxnRecord) -> bool) -> Option<String> {
        self.records()
            .into_iter()
            .find(|(_, r)| f(r))
            .map(|(t, _)| t)
    }

    pub fn record(&self, txn: &str) -> TxnRecord {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .txns
            .get(txn)
            .cloned()
            .unwrap_or_default()
    }

    /// Forgets every record and recorded request (long benchmark runs).
    pub fn forget(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .txns
            .clear();
        self.take_held_us();
        self.take_work_us();
        self.server.clear();
    }

    pub fn records(&self) -> BTreeMap<String, TxnRecord> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .txns
            .clone()
    }

    /// How long committed transactions held their prepared state (the
    /// commit vote to the commit), µs, since the last call; forgets them.
    pub fn take_held_us(&self) -> Vec<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.prepared_at.clear();
        std::mem::take(&mut st.held_us)
    }

    /// How long business requests took the app (downstream calls
    /// included), µs, without and with a transaction, since the last call;
    /// forgets them.
    pub fn take_work_us(&self) -> (Vec<u64>, Vec<u64>) {
        let work =
            std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).work_us);
        let (txn, plain): (Vec<_>, Vec<_>) = work.into_iter().partition(|(t, _)| *t);
        (
            plain.into_iter().map(|(_, us)| us).collect(),
            txn.into_iter().map(|(_, us)| us).collect(),
        )
    }

    /// From now on, note when each transaction's first commit arrives
    /// ([`TxnApp::take_commit_times`]).
    pub fn keep_commit_times(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.commit_times.get_or_insert_with(Vec::new);
    }

    /// When each transaction's first commit arrived since the last call;
    /// forgets them. Empty unless [`TxnApp::keep_commit_times`] was called.
    pub fn take_commit_times(&self) -> Vec<(String, std::time::Instant)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.commit_times
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn errors(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .errors
            .clone()
    }

    /// Control calls (prepare/commit/abort) received in total.
    pub fn control_calls(&self) -> u32 {
        self.records()
            .values()
            .map(|r| r.prepares + r.commits + r.aborts)
            .sum()
    }
}

fn handle(
    r: &Recorded,
    name: &str,
    state: &Mutex<State>,
    vote: &RwLock<VoteFn>,
    business_status: &RwLock<BusinessReply>,
    downstream: &RwLock<Vec<Downstream>>,
    client: &Client,
) -> Reply {
    let txn = r.header("x-txmesh-txn");
    let path = r.path.split('?').next().unwrap_or("").to_string();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    if path.starts_with("/txmesh/") {
        let Some(txn) = txn else {
            lock().errors.push(format!("{path} without x-txmesh-txn"));
            return Reply::status(400);
        };
        match path.as_str() {
            "/txmesh/prepare" => {
                let v = (vote.read().unwrap_or_else(|e| e.into_inner()))(&txn);
                let (reply, voted) = match v {
                    Vote::Commit => (
                        Reply::ok().json(serde_json::json!({"vote": "commit"})),
                        "commit",
                    ),
                    Vote::ReadOnly => (
                        Reply::ok().json(serde_json::json!({"vote": "readonly"})),
                        "readonly",
                    ),
                    Vote::No(reason) => (
                        Reply::ok().json(serde_json::json!({"vote": "abort", "reason": reason})),
                        "abort",
                    ),
                    Vote::Until(latch) => {
                        latch.wait(Duration::from_secs(10));
                        (
                            Reply::ok().json(serde_json::json!({"vote": "commit"})),
                            "commit",
                        )
                    }
                    Vote::Stall(d) => {
                        std::thread::sleep(d);
                        (
                            Reply::ok().json(serde_json::json!({"vote": "commit"})),
                            "commit",
                        )
                    }
                    Vote::Fail(s) => (Reply::status(s), "fail"),
                };
                let mut st = lock();
                let rec = st.txns.entry(txn.clone()).or_default();
                rec.prepares += 1;
                // A prepare that arrives after an abort is refused (no hanging reservation).
                if rec.aborts > 0 {
                    rec.voted = Some("abort".into());
                    return Reply::ok()
                        .json(serde_json::json!({"vote": "abort", "reason": "already aborted"}));
                }
                rec.voted = Some(voted.into());
                if voted == "commit" {
                    st.prepared_at.insert(txn, std::time::Instant::now());
                }
                reply
            }
            "/txmesh/commit" => {
                let mut st = lock();
                let rec = st.txns.entry(txn.clone()).or_default();
                rec.commits += 1;
                let first = rec.commits == 1;
                if rec.aborts > 0 {
                    st.errors
                        .push(format!("{name}: commit after abort for {txn}"));
                }
                if let Some(t) = st.prepared_at.remove(&txn) {
                    st.held_us
                        .push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                if let Some(times) = st.commit_times.as_mut().filter(|_| first) {
                    times.push((txn, std::time::Instant::now()));
                }
                Reply::ok()
            }
            "/txmesh/abort" => {
                let mut st = lock();
                let rec = st.txns.entry(txn.clone()).or_default();
                rec.aborts += 1;
                st.prepared_at.remove(&txn);
                let rec = st.txns.entry(txn.clone()).or_default();
                if rec.commits > 0 {
                    st.errors
                        .push(format!("{name}: abort after commit for {txn}"));
                }
                Reply::ok()
            }
            other => Reply::status(404).body(format!("{other}?")),
        }
    } else {
        if let Some(t) = &txn {
            lock().txns.entry(t.clone()).or_default().business += 1;
        }
        let started = std::time::Instant::now();
        let calls = downstream.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut failed = Vec::new();
        for d in calls {
            let mut headers = vec![("host", d.host.as_str())];
            if let Some(t) = &txn {
                headers.push(("x-txmesh-txn", t.as_str()));
            }
            let url = format!("http://127.0.0.1:{}/work", d.outbound_port);
            match client.request("POST", &url, &headers, b"{}") {
                Ok(resp) if (200..300).contains(&resp.status) => {}
                Ok(resp) => failed.push(format!(
                    "{} answered {}: {}",
                    d.host,
                    resp.status,
                    resp.text()
                )),
                Err(e) => failed.push(format!("{}: {e}", d.host)),
            }
        }
        if !failed.is_empty() {
            return Reply::status(502).body(failed.join("; "));
        }
        let business = business_status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        lock().work_us.push((txn.is_some(), us));
        match business {
            BusinessReply::Status(status) => {
                Reply::status(status).json(serde_json::json!({"service": name, "txn": txn}))
            }
            BusinessReply::Scripted(reply) => reply,
        }
    }
}

/// The checkout call graph: `order` calls `payment` and `inventory` through
/// its sidecar's outbound listener; each app sits behind the sidecar `side`
/// builds for it (name, app).
pub struct Checkout {
    pub order: TxnApp,
    pub payment: TxnApp,
    pub inventory: TxnApp,
    pub order_sc: crate::envoy::Envoy,
    pub pay_sc: crate::envoy::Envoy,
    pub inv_sc: crate::envoy::Envoy,
}

impl Checkout {
    pub fn start(
        payment_vote: Vote,
        inventory_vote: Vote,
        side: impl Fn(&str, &TxnApp) -> crate::Sidecar,
    ) -> Self {
        let calls = Arc::new(RwLock::new(Vec::new()));
        let order = TxnApp::calling("order", Vote::Commit, calls.clone());
        let payment = TxnApp::start("payment", payment_vote);
        let inventory = TxnApp::start("inventory", inventory_vote);
        let pay_sc = side("payment", &payment).start();
        let inv_sc = side("inventory", &inventory).start();
        let order_sc = side("order", &order)
            .route("payment", &[pay_sc.inbound_addr()])
            .route("inventory", &[inv_sc.inbound_addr()])
            .start();
        *calls.write().unwrap_or_else(|e| e.into_inner()) =
            Downstream::each(&["payment", "inventory"], order_sc.ports.outbound);
        Self {
            order,
            payment,
            inventory,
            order_sc,
            pay_sc,
            inv_sc,
        }
    }
}
