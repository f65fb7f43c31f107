//! The transaction engine: one per plugin root (one per Envoy worker and
//! listener), driven by events — request headers, response headers, callout
//! answers, ticks, stream end. See docs/protocol.md for the protocol.
//!
//! Work is split by who can carry it:
//! - an **op** belongs to one paused HTTP stream (the root's client request,
//!   or an inbound control request at a sub-coordinator); its callouts are
//!   dispatched from that stream's context and answered there;
//! - a **job** is phase-2 work that outlives the client's stream (commit or
//!   abort retries, a decision record still to write): it belongs to the
//!   engine and is dispatched from the root context's tick.

use super::cause::Cause;
use super::config::{Direction, TxnConfig};
use super::etcd::{self, CasResult, Decision, Outcome};
use super::id::{self, TxnHeader, TxnId};
use super::seeded::{self, Bug};
use super::table::{Entry, Mark, Phase, Role, Table, TableError};
use crate::host::{Callout, CalloutResponse, FilterHost, LogLevel, MetricKind, Verdict};
use crate::json::Obj;
use crate::labels::encode;
use serde::Deserialize;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

pub const PREPARE_PATH: &str = "/txmesh/prepare";
pub const COMMIT_PATH: &str = "/txmesh/commit";
pub const ABORT_PATH: &str = "/txmesh/abort";
pub const STATUS_PREFIX: &str = "/txmesh/txns/";

/// How often the root context ticks (deadlines, phase-2 retries).
pub const TICK_MS: u64 = 20;
/// Slack added to a callout's own timeout before the tick gives up on it
/// (a callout to a cluster with no healthy host may never time out).
const TICK_SLACK_MS: u64 = 250;
/// Immediate re-sends of a decision-record write that could not connect.
const RECORD_RETRIES: u8 = 2;
/// Recently finished transactions remembered per process, for status queries.
const RECENT_SLOTS: u64 = 256;

/// The request header by which txmesh_router hands its pick (`ip:port`) to
/// Envoy. A participant reached through a routed request is enlisted as
/// `cluster@ip:port`, and its control calls carry the header again, so that
/// prepare, commit and abort reach the instance that did the work.
pub const ENDPOINT_HEADER: &str = "x-txmesh-endpoint";

/// `cluster@ip:port` (a participant pinned to an instance) → (`cluster`,
/// Some(`ip:port`)); anything else is a plain cluster name.
pub fn split_pinned(participant: &str) -> (&str, Option<&str>) {
    match participant.rsplit_once('@') {
        Some((c, ep)) if ep.parse::<std::net::SocketAddr>().is_ok() => (c, Some(ep)),
        _ => (participant, None),
    }
}

/// Per-stream state, kept by the glue's HTTP context.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Stream {
    #[default]
    Pass,
    /// This stream began `txn`: answer it when the transaction decides.
    Root {
        txn: TxnId,
        deadline_ms: u64,
        started_ms: u64,
        /// The begin, in µs (the decision log's `app_us`).
        started_us: u64,
        trace: Option<String>,
    },
    /// A commit/abort passing through to a leaf participant's app: free the
    /// table entry once the app acknowledges.
    LeafFinish { txn: TxnId },
    /// The engine owns this stream (an op is running for it).
    Owned,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Vote {
    Commit,
    ReadOnly,
    /// `cause`: [`Cause::VoteAbort`] (said no, failed) or [`Cause::Timeout`]
    /// (no answer before the deadline, here or below a sub-coordinator).
    Abort {
        cause: Cause,
        reason: String,
        participant: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Target {
    /// Name in votes, errors and logs: the cluster, or this node for its own app.
    name: String,
    cluster: String,
    vote: Option<Vote>,
    token: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OpKind {
    RootPrepare,
    SubPrepare,
    SubFinish(Outcome),
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Stage {
    Voting,
    /// Single participant voted commit; its commit is in flight.
    OnePhase,
    /// The commit record is being written.
    WriteCommit,
    /// The commit record write failed; writing an abort record to learn the
    /// truth. `maybe_applied`: the failed write may have reached etcd.
    WriteAbort {
        maybe_applied: bool,
        error: String,
    },
    Finishing,
    /// Reading the decision; `resolve`: past deadline + grace, abort if
    /// absent; else answer `miss`.
    StatusRead {
        resolve: bool,
        miss: &'static str,
    },
    /// CAS-writing an abort for an in-doubt transaction someone asked about.
    StatusResolve,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Op {
    kind: OpKind,
    ctx: u32,
    txn: TxnId,
    deadline_ms: u64,
    started_ms: u64,
    trace: Option<String>,
    targets: Vec<Target>,
    stage: Stage,
    /// When the current stage's callout (etcd, commit) must have answered.
    stage_deadline_ms: u64,
    voted_ms: Option<u64>,
    /// When the app answered and when the last vote arrived (µs), for the
    /// decision log's `prepare_us` and `record_us`.
    started_us: u64,
    responded_us: u64,
    voted_us: Option<u64>,
    /// When the decision record's last write went out and when etcd's answer
    /// came back (µs), for the decision log's `etcd_us`.
    record_sent_us: u64,
    record_answered_us: u64,
    /// The decision-record write in flight, kept to retry it when Envoy could
    /// not connect (another etcd member may answer).
    last_call: Option<Callout>,
    retries: u8,
    /// The app answered the client with a 4xx: abort, but let the client
    /// see the app's own error (bad input is the client's to fix).
    client_error: bool,
}

impl Op {
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: OpKind,
        ctx: u32,
        txn: TxnId,
        deadline_ms: u64,
        started_ms: u64,
        targets: Vec<Target>,
        stage: Stage,
        stage_deadline_ms: u64,
    ) -> Self {
        Self {
            kind,
            ctx,
            txn,
            deadline_ms,
            started_ms,
            trace: None,
            targets,
            stage,
            stage_deadline_ms,
            voted_ms: None,
            started_us: 0,
            responded_us: 0,
            voted_us: None,
            record_sent_us: 0,
            record_answered_us: 0,
            last_call: None,
            retries: 0,
            client_error: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Record {
    Done,
    /// Write an abort record (someone may be prepared).
    WriteAbort,
    /// Write the commit record (1PC fallback after the client left).
    WriteCommit,
    /// The outcome is unknown: CAS-abort and obey what etcd holds.
    Resolve,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct JobTarget {
    name: String,
    cluster: String,
    vote: Option<Vote>,
    acked: bool,
    inflight: bool,
    attempts: u32,
    next_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Job {
    outcome: Option<Outcome>,
    record: Record,
    record_inflight: bool,
    record_attempts: u32,
    record_next_ms: u64,
    targets: Vec<JobTarget>,
    deadline_ms: u64,
    give_up_ms: u64,
    cause: Cause,
    /// W3C trace id of the beginning request (empty: none).
    trace: String,
    /// Delete this coordinator's pending-work key in etcd when done.
    unpend: bool,
    /// Some participant did not acknowledge at once: from then on each
    /// acknowledgement is recorded in the pending-work key.
    degraded: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Call {
    Op {
        ctx: u32,
        target: Option<usize>,
    },
    JobTarget {
        txn: TxnId,
        idx: usize,
    },
    JobRecord {
        txn: TxnId,
    },
    /// The recovery loop's scan of this node's pending commits.
    Recovery,
}

/// The transaction counters and gauges besides `txmesh_txn_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gauge {
    /// `txmesh_txn_in_doubt`
    InDoubt,
    /// `txmesh_txn_phase2_abandoned_total`
    Abandoned,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TxnMetrics {
    total: HashMap<(&'static str, &'static str), u32>,
    duration: HashMap<&'static str, u32>,
    participants: Option<u32>,
    in_flight: Option<u32>,
    in_doubt: Option<u32>,
    abandoned: Option<u32>,
}

/// Clone, Eq and Hash so that the model check (`tests/model/`) can hold
/// engines in its states (the maps stay `HashMap`s: smaller in the `.wasm`
/// than `BTreeMap`s; [`Hash`] visits them in key order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnEngine {
    cfg: TxnConfig,
    node: String,
    table: Table,
    ops: HashMap<u32, Op>,
    jobs: HashMap<TxnId, Job>,
    calls: HashMap<u32, Call>,
    metrics: TxnMetrics,
    /// Random token of this engine in the leader election (one engine per
    /// sidecar runs the in-doubt scan and the recovery loop).
    token: u64,
    next_scan_ms: u64,
    recovery_inflight: bool,
    /// Pending-work keys of finished transactions, deleted together (one
    /// etcd write per [`UNPEND_INTERVAL_MS`] instead of one per transaction).
    unpend: Vec<String>,
    next_unpend_ms: u64,
    /// See [`TxnEngine::set_root_context`].
    root_ctx: u32,
}

/// How often finished transactions' pending-work keys are deleted, in one
/// etcd request. Far below `recovery_after_ms`: the recovery loop never sees
/// a finished transaction's key as pending work.
pub const UNPEND_INTERVAL_MS: u64 = 100;
/// Keys per delete request: etcd's default `--max-txn-ops`.
pub const UNPEND_BATCH: usize = 128;

const LEADER_KEY: &str = "txmesh.txn.leader";

/// Hashes a map in key order (its iteration order is arbitrary).
fn hash_sorted<K: Ord + Hash, V: Hash, H: Hasher>(m: &HashMap<K, V>, state: &mut H) {
    let mut entries: Vec<(&K, &V)> = m.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries.hash(state);
}

impl Hash for TxnMetrics {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_sorted(&self.total, state);
        hash_sorted(&self.duration, state);
        (
            self.participants,
            self.in_flight,
            self.in_doubt,
            self.abandoned,
        )
            .hash(state);
    }
}

impl Hash for TxnEngine {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.cfg.hash(state);
        self.node.hash(state);
        self.table.hash(state);
        hash_sorted(&self.ops, state);
        hash_sorted(&self.jobs, state);
        hash_sorted(&self.calls, state);
        self.metrics.hash(state);
        (self.token, self.next_scan_ms, self.recovery_inflight).hash(state);
        (&self.unpend, self.next_unpend_ms, self.root_ctx).hash(state);
    }
}

fn json_error(msg: &str) -> Vec<u8> {
    Obj::new().str("error", msg).build().into_bytes()
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// The answer to a stream the glue cannot track (its stream table is full):
/// status, headers, body. The txn filter never fails open, whether or not
/// the request is transactional.
pub fn untracked_reply() -> (u16, [(&'static str, &'static str); 1], Vec<u8>) {
    (
        503,
        [JSON],
        json_error("txmesh: too many streams in this sidecar"),
    )
}

fn is_2xx(s: Option<u16>) -> bool {
    matches!(s, Some(200..=299))
}

/// A participant's state in the pending-work record: owed a commit, has
/// acknowledged it, or owed nothing (read-only).
fn pending_state(vote: &Option<Vote>, acked: bool) -> &'static str {
    match (vote, acked) {
        (Some(Vote::Commit), false) => "commit",
        (Some(Vote::Commit), true) => "acked",
        _ => "readonly",
    }
}

fn backoff_ms(attempts: u32) -> u64 {
    (100u64 << attempts.min(5)).min(2_000)
}

/// The reason of a vote that never came.
const NO_ANSWER: &str = "no answer before the deadline";

fn parse_vote(resp: &CalloutResponse, name: &str) -> Vote {
    /// A sub-coordinator relays a child's timeout as `"cause":"timeout"`.
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum WireCause {
        Timeout,
        #[serde(other)]
        Other,
    }
    #[derive(Deserialize)]
    struct V {
        vote: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        participant: Option<String>,
        #[serde(default)]
        cause: Option<WireCause>,
    }
    let abort = |cause: Cause, reason: String| Vote::Abort {
        cause,
        reason,
        participant: name.to_string(),
    };
    match resp.status {
        None => abort(Cause::Timeout, NO_ANSWER.to_string()),
        Some(200) => match serde_json::from_slice::<V>(&resp.body) {
            Ok(v) if v.vote == "commit" => Vote::Commit,
            Ok(v) if v.vote == "readonly" => Vote::ReadOnly,
            Ok(v) => Vote::Abort {
                cause: match v.cause {
                    Some(WireCause::Timeout) => Cause::Timeout,
                    Some(WireCause::Other) | None => Cause::VoteAbort,
                },
                reason: v.reason.unwrap_or_else(|| format!("voted {}", v.vote)),
                participant: v.participant.unwrap_or_else(|| name.to_string()),
            },
            Err(_) => abort(
                Cause::VoteAbort,
                "prepare answered 200 without a vote".to_string(),
            ),
        },
        Some(s) => abort(Cause::VoteAbort, format!("prepare answered {s}")),
    }
}

/// What a decision-record CAS came to; an answer other than 200 is an error.
fn cas_answer(resp: &CalloutResponse) -> Result<CasResult, String> {
    if resp.status == Some(200) {
        etcd::parse_cas_response(&resp.body)
    } else {
        Err(format!("etcd answered {:?}", resp.status))
    }
}

/// Whether a failed etcd call certainly never reached etcd (Envoy could not
/// connect), so nothing it carried can have been applied.
fn certainly_not_sent(resp: &CalloutResponse) -> bool {
    if resp.status != Some(503) {
        return false;
    }
    let body = String::from_utf8_lossy(&resp.body);
    body.contains("no healthy upstream")
        || body.contains("connection failure")
        || body.contains("Connection refused")
}

impl TxnEngine {
    pub fn new(cfg: TxnConfig, host: &impl FilterHost) -> Self {
        let node = match &cfg.node {
            Some(n) => n.clone(),
            None => host
                .property(&["xds", "node", "metadata", "WORKLOAD_NAME"])
                .map(|b| crate::labels::sanitize_value(&b))
                .unwrap_or_else(|| "unknown".to_string()),
        };
        let table = Table::new(
            cfg.max_in_flight,
            cfg.phase2_give_up_ms.saturating_add(10_000),
        );
        Self {
            cfg,
            node,
            table,
            ops: HashMap::new(),
            jobs: HashMap::new(),
            calls: HashMap::new(),
            metrics: TxnMetrics::default(),
            token: u64::from_le_bytes({
                let r = host.random_id();
                let mut b = [0u8; 8];
                b.copy_from_slice(r.get(..8).unwrap_or(&[1; 8]));
                b
            }),
            next_scan_ms: 0,
            recovery_inflight: false,
            unpend: Vec::new(),
            next_unpend_ms: 0,
            root_ctx: 0,
        }
    }

    /// The root context this engine belongs to: phase 2, recovery and the
    /// pending-work deletes are dispatched from it, so they survive the
    /// stream that started them (0: dispatch from the current context).
    pub fn set_root_context(&mut self, ctx: u32) {
        self.root_ctx = ctx;
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// One line for the log at configure time.
    pub fn describe(&self) -> String {
        format!(
            "node {}, max_in_flight {}, etcd cluster {}, app cluster {}",
            self.node, self.cfg.max_in_flight, self.cfg.etcd_cluster, self.cfg.app_cluster
        )
    }

    pub fn config(&self) -> &TxnConfig {
        &self.cfg
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Whether anything is waiting on ticks (the glue may tick slower when idle).
    pub fn busy(&self) -> bool {
        !self.ops.is_empty() || !self.jobs.is_empty() || !self.unpend.is_empty()
    }

    // ----- request headers -------------------------------------------------

    pub fn on_request_headers(&mut self, h: &impl FilterHost, ctx: u32) -> (Stream, Verdict) {
        let direction = match self.cfg.direction {
            Some(d) => Some(d),
            None => h
                .property(&["xds", "listener_direction"])
                .as_deref()
                .and_then(Direction::from_listener_direction),
        };
        let path = h.request_header(":path").unwrap_or_default();
        let txn = id::read_txn(
            h.request_header(id::TXN_HEADER).as_deref(),
            h.request_header(id::BAGGAGE_HEADER).as_deref(),
        );
        match direction {
            Some(Direction::Inbound) => self.inbound(h, ctx, &path, txn),
            Some(Direction::Outbound) => self.outbound(h, ctx, &path, txn),
            None => {
                // Without a direction the filter cannot know its role: refuse
                // transactional requests rather than guess.
                match txn {
                    Ok(TxnHeader::Absent) => (Stream::Pass, Verdict::Continue),
                    _ => self.reject(
                        h,
                        ctx,
                        500,
                        "txmesh_txn cannot tell inbound from outbound: set \"direction\" in its config or traffic_direction on the listener",
                    ),
                }
            }
        }
    }

    fn reject(&self, h: &impl FilterHost, ctx: u32, status: u16, msg: &str) -> (Stream, Verdict) {
        h.send_reply(ctx, status, &[JSON], &json_error(msg));
        (Stream::Pass, Verdict::Pause)
    }

    fn deadline_from(&self, h: &impl FilterHost, now: u64) -> Result<u64, String> {
        let default = now.saturating_add(self.cfg.default_timeout_ms);
        match h.request_header(id::DEADLINE_HEADER) {
            None => Ok(default),
            Some(v) => {
                let d = id::parse_deadline(&v)?;
                if d <= now {
                    return Err(format!(
                        "{} {d} is in the past (now {now})",
                        id::DEADLINE_HEADER
                    ));
                }
                Ok(d.min(default))
            }
        }
    }

    fn inbound(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        path: &[u8],
        txn: Result<TxnHeader, String>,
    ) -> (Stream, Verdict) {
        let txn = match txn {
            Ok(t) => t,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        if path.starts_with(b"/txmesh/") {
            return self.control(h, ctx, path, txn);
        }
        let method = h.request_header(":method").unwrap_or_default();
        match txn {
            TxnHeader::Absent if self.cfg.begins(&method, path) => self.begin(h, ctx),
            TxnHeader::Absent => (Stream::Pass, Verdict::Continue),
            TxnHeader::New if self.cfg.allow_client_begin || self.cfg.begins(&method, path) => {
                self.begin(h, ctx)
            }
            TxnHeader::New => self.reject(
                h,
                ctx,
                400,
                "x-txmesh-txn: new is not allowed here: no begin rule matches this request and allow_client_begin is off",
            ),
            TxnHeader::Id(txn) => {
                let now = h.now_ms();
                let deadline = match self.deadline_from(h, now) {
                    Ok(d) => d,
                    Err(e) => return self.reject(h, ctx, 400, &e),
                };
                // Remember the txn and its deadline for this app's outbound
                // calls. A full table only costs the deadline hint.
                if self.table.get(h, &txn).is_none() {
                    let _ = self
                        .table
                        .insert(h, Entry::new(txn, deadline, Role::Participant), now);
                }
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                h.set_request_header(id::DEADLINE_HEADER, Some(&deadline.to_string()));
                (Stream::Pass, Verdict::Continue)
            }
        }
    }

    fn begin(&mut self, h: &impl FilterHost, ctx: u32) -> (Stream, Verdict) {
        let now = h.now_ms();
        let deadline = match self.deadline_from(h, now) {
            Ok(d) => d,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        let Some(txn) = (0..4).find_map(|_| TxnId::from_bytes(h.random_id())) else {
            return self.reject(h, ctx, 500, "cannot mint a transaction id");
        };
        match self
            .table
            .insert(h, Entry::new(txn, deadline, Role::Root), now)
        {
            Ok(()) => {}
            Err(TableError::Full | TableError::BucketFull) => {
                let msg = format!(
                    "transaction table full: {} transactions in flight in this sidecar (max_in_flight); retry later",
                    self.table.capacity()
                );
                return self.reject(h, ctx, 503, &msg);
            }
            Err(e) => return self.reject(h, ctx, 503, &format!("cannot begin a transaction: {e}")),
        }
        self.gauge_in_flight(h, 1);
        h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
        h.set_request_header(id::DEADLINE_HEADER, Some(&deadline.to_string()));
        let trace = h
            .request_header("traceparent")
            .as_deref()
            .and_then(id::trace_id);
        (
            Stream::Root {
                txn,
                deadline_ms: deadline,
                started_ms: now,
                started_us: h.now_us(),
                trace,
            },
            Verdict::Continue,
        )
    }

    fn outbound(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        path: &[u8],
        txn: Result<TxnHeader, String>,
    ) -> (Stream, Verdict) {
        let txn = match txn {
            Ok(TxnHeader::Absent) => return (Stream::Pass, Verdict::Continue),
            Ok(TxnHeader::New) => {
                return self.reject(
                    h,
                    ctx,
                    400,
                    "x-txmesh-txn: new is only accepted by the initiator's inbound sidecar",
                )
            }
            Ok(TxnHeader::Id(t)) => t,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        if path.starts_with(b"/txmesh/") {
            // An app talking to control endpoints (e.g. asking for a status)
            // enlists nobody.
            return (Stream::Pass, Verdict::Continue);
        }
        let Some(cluster) = h
            .property(&["xds", "cluster_name"])
            .and_then(|c| String::from_utf8(c).ok())
            .filter(|c| super::config::is_cluster_name(c))
        else {
            // No route: Envoy answers 404 itself; nothing to enlist.
            return (Stream::Pass, Verdict::Continue);
        };
        // Routed to one instance by txmesh_router: that instance is the
        // participant, and every control call must reach it again.
        let cluster = match h
            .request_header(ENDPOINT_HEADER)
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|v| v.parse::<std::net::SocketAddr>().is_ok())
        {
            Some(ep) => format!("{cluster}@{ep}"),
            None => cluster,
        };
        let now = h.now_ms();
        let deadline = match self.deadline_from(h, now) {
            Ok(d) => d,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        let fresh = Entry::new(txn, deadline, Role::Sub);
        match self
            .table
            .enlist(h, fresh, &cluster, self.cfg.max_participants as usize, now)
        {
            Ok(entry) => {
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                h.set_request_header(id::DEADLINE_HEADER, Some(&entry.deadline_ms.to_string()));
                (Stream::Pass, Verdict::Continue)
            }
            Err(TableError::Rejected(msg)) => self.reject(h, ctx, 409, &msg),
            Err(TableError::Full | TableError::BucketFull) => {
                let msg = format!(
                    "transaction table full: {} transactions in flight in this sidecar (max_in_flight); retry later",
                    self.table.capacity()
                );
                self.reject(h, ctx, 503, &msg)
            }
            Err(e) => self.reject(h, ctx, 503, &format!("cannot enlist {cluster}: {e}")),
        }
    }

    fn control(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        path: &[u8],
        txn: TxnHeader,
    ) -> (Stream, Verdict) {
        let method = h.request_header(":method").unwrap_or_default();
        let path_only = path.split(|&b| b == b'?').next().unwrap_or(path);
        if path_only == b"/txmesh/txns" {
            if method != b"GET" {
                return self.reject(h, ctx, 405, "use GET for /txmesh/txns");
            }
            return self.listing(h, ctx, path);
        }
        if let Some(id_part) = path_only.strip_prefix(STATUS_PREFIX.as_bytes()) {
            if method != b"GET" {
                return self.reject(h, ctx, 405, "use GET for /txmesh/txns/<id>");
            }
            return match TxnId::parse(id_part) {
                Ok(t) => self.status(h, ctx, t),
                Err(e) => self.reject(h, ctx, 400, &e),
            };
        }
        let kind = match path_only {
            b"/txmesh/prepare" => None,
            b"/txmesh/commit" => Some(Outcome::Committed),
            b"/txmesh/abort" => Some(Outcome::Aborted),
            _ => return self.reject(h, ctx, 404, "unknown txmesh endpoint"),
        };
        if method != b"POST" {
            return self.reject(h, ctx, 405, "txmesh control endpoints take POST");
        }
        let txn = match txn {
            TxnHeader::Id(t) => t,
            _ => {
                return self.reject(
                    h,
                    ctx,
                    400,
                    "a control request needs x-txmesh-txn with a transaction id",
                )
            }
        };
        let entry = self.table.get(h, &txn);
        let sub = entry
            .as_ref()
            .filter(|e| e.role == Role::Sub && !e.participants.is_empty());
        match (kind, sub) {
            (None, Some(e)) => {
                let e = e.clone();
                self.sub_prepare(h, ctx, e)
            }
            (Some(outcome), Some(e)) => {
                let e = e.clone();
                self.sub_finish(h, ctx, e, outcome)
            }
            (Some(_), None) => {
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                (Stream::LeafFinish { txn }, Verdict::Continue)
            }
            (None, None) if entry.is_none() && seeded::active(Bug::UnknownPrepareYes) => {
                h.send_reply(ctx, 200, &[JSON], br#"{"vote":"commit"}"#);
                (Stream::Pass, Verdict::Pause)
            }
            (None, None) => {
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                // From the moment the prepare goes to the app, the app may be
                // prepared: watch for a decision (in-doubt resolution). If it
                // votes no, a later abort is harmless; a commit can only be
                // decided with its yes.
                let now = h.now_ms();
                let marked = self.table.update(h, &txn, |e| {
                    e.phase = Phase::Preparing;
                    Ok(())
                });
                if marked == Err(TableError::NotFound) {
                    let deadline_ms = h
                        .request_header(id::DEADLINE_HEADER)
                        .and_then(|v| id::parse_deadline(&v).ok())
                        .unwrap_or_else(|| now.saturating_add(self.cfg.default_timeout_ms));
                    let mut e = Entry::new(txn, deadline_ms, Role::Participant);
                    e.phase = Phase::Preparing;
                    let _ = self.table.insert(h, e, now);
                }
                (Stream::Pass, Verdict::Continue)
            }
        }
    }

    // ----- status ----------------------------------------------------------

    // ----- response headers ------------------------------------------------

    pub fn on_response_headers(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        stream: &Stream,
    ) -> Verdict {
        match stream {
            Stream::Root {
                txn,
                deadline_ms,
                started_ms,
                started_us,
                trace,
            } => {
                let v = self.root_respond(h, ctx, *txn, *deadline_ms, *started_ms, trace.clone());
                if let Some(op) = self.ops.get_mut(&ctx) {
                    op.started_us = *started_us;
                }
                v
            }
            Stream::LeafFinish { txn } => {
                let status = h
                    .response_header(":status")
                    .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok());
                if is_2xx(status) {
                    if let Some(e) = self.table.get(h, txn) {
                        if e.role == Role::Participant {
                            self.table.remove(h, txn);
                        }
                    }
                }
                Verdict::Continue
            }
            Stream::Pass | Stream::Owned => Verdict::Continue,
        }
    }

    fn root_respond(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        txn: TxnId,
        deadline_ms: u64,
        started_ms: u64,
        trace: Option<String>,
    ) -> Verdict {
        let now = h.now_ms();
        let status: Option<u16> = h
            .response_header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok());
        // Freeze the participant set: later enlistments are refused.
        let entry = self.table.update(h, &txn, |e| {
            e.phase = Phase::Preparing;
            Ok(())
        });
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                h.log(
                    LogLevel::Error,
                    &format!("txn {txn}: table entry lost before prepare ({e}); aborting"),
                );
                Entry::new(txn, deadline_ms, Role::Root)
            }
        };
        let targets = self.root_targets(&entry);
        let mut op = Op {
            trace,
            responded_us: h.now_us(),
            ..Op::new(
                OpKind::RootPrepare,
                ctx,
                txn,
                deadline_ms,
                started_ms,
                targets,
                Stage::Voting,
                deadline_ms,
            )
        };
        if !is_2xx(status) {
            op.client_error = matches!(status, Some(400..=499));
            let why = match status {
                Some(s) => format!("the app answered {s}"),
                None => "the app gave no status".to_string(),
            };
            // Nobody was asked to prepare: abort everyone, write nothing
            // (presumed abort).
            let participant = self.node.clone();
            self.root_abort(
                h,
                &mut op,
                Cause::AppError,
                &why,
                &participant,
                Record::Done,
            );
            return if op.client_error {
                Verdict::Continue
            } else {
                Verdict::Pause
            };
        }
        if now >= deadline_ms {
            let participant = self.node.clone();
            self.root_abort(
                h,
                &mut op,
                Cause::Timeout,
                "the deadline passed before the app answered",
                &participant,
                Record::Done,
            );
            return Verdict::Pause;
        }
        self.dispatch_votes(h, &mut op, now);
        self.ops.insert(ctx, op);
        self.evaluate(h, ctx);
        Verdict::Pause
    }

    /// A root's participants: every enlisted cluster, then its own app.
    fn root_targets(&self, entry: &Entry) -> Vec<Target> {
        let mut targets: Vec<Target> = entry
            .participants
            .iter()
            .map(|(c, _)| Target {
                name: c.clone(),
                cluster: c.clone(),
                vote: None,
                token: None,
            })
            .collect();
        targets.push(Target {
            name: self.node.clone(),
            cluster: self.cfg.app_cluster.clone(),
            vote: None,
            token: None,
        });
        targets
    }

    fn control_call(
        cluster: &str,
        path: &str,
        txn: &TxnId,
        deadline_ms: u64,
        timeout_ms: u64,
    ) -> Callout {
        let mut headers = vec![
            (id::TXN_HEADER.to_string(), txn.to_string()),
            (id::DEADLINE_HEADER.to_string(), deadline_ms.to_string()),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        let (cluster, pinned) = split_pinned(cluster);
        if let Some(ep) = pinned {
            headers.push((ENDPOINT_HEADER.to_string(), ep.to_string()));
        }
        Callout {
            cluster: cluster.to_string(),
            method: "POST",
            path: path.to_string(),
            headers,
            body: Vec::new(),
            timeout_ms: timeout_ms.max(1),
        }
    }

    fn dispatch_votes(&mut self, h: &impl FilterHost, op: &mut Op, now: u64) {
        let timeout = op.deadline_ms.saturating_sub(now);
        for (i, t) in op.targets.iter_mut().enumerate() {
            let call =
                Self::control_call(&t.cluster, PREPARE_PATH, &op.txn, op.deadline_ms, timeout);
            match h.dispatch(&call) {
                Ok(token) => {
                    t.token = Some(token);
                    self.calls.insert(
                        token,
                        Call::Op {
                            ctx: op.ctx,
                            target: Some(i),
                        },
                    );
                }
                Err(e) => {
                    t.vote = Some(Vote::Abort {
                        cause: Cause::VoteAbort,
                        reason: format!("prepare could not be sent: {e}"),
                        participant: t.name.clone(),
                    })
                }
            }
        }
    }

    // ----- sub-coordinator -------------------------------------------------

    fn sub_prepare(&mut self, h: &impl FilterHost, ctx: u32, entry: Entry) -> (Stream, Verdict) {
        let now = h.now_ms();
        let app = self.cfg.app_cluster.clone();
        let updated = self.table.update(h, &entry.txn, |e| {
            e.phase = Phase::Preparing;
            if !e.participants.iter().any(|(c, _)| *c == app) {
                e.participants.push((app.clone(), Mark::Unknown));
            }
            Ok(())
        });
        let entry = updated.unwrap_or(entry);
        let forget = seeded::active(Bug::SubForgetsChildren);
        let targets = entry
            .participants
            .iter()
            .filter(|(c, _)| !forget || *c == app)
            .map(|(c, _)| Target {
                name: if *c == app {
                    self.node.clone()
                } else {
                    c.clone()
                },
                cluster: c.clone(),
                vote: None,
                token: None,
            })
            .collect();
        let mut op = Op::new(
            OpKind::SubPrepare,
            ctx,
            entry.txn,
            entry.deadline_ms,
            now,
            targets,
            Stage::Voting,
            entry.deadline_ms,
        );
        self.dispatch_votes(h, &mut op, now);
        self.ops.insert(ctx, op);
        self.evaluate(h, ctx);
        (Stream::Owned, Verdict::Pause)
    }

    fn sub_finish(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        entry: Entry,
        outcome: Outcome,
    ) -> (Stream, Verdict) {
        let now = h.now_ms();
        let app = self.cfg.app_cluster.clone();
        let _ = self.table.update(h, &entry.txn, |e| {
            e.phase = match outcome {
                Outcome::Committed => Phase::Committed,
                Outcome::Aborted => Phase::Aborted,
            };
            Ok(())
        });
        let mut marks = entry.participants.clone();
        if !marks.iter().any(|(c, _)| *c == app) {
            marks.push((app.clone(), Mark::Unknown));
        }
        let path = match outcome {
            Outcome::Committed => COMMIT_PATH,
            Outcome::Aborted => ABORT_PATH,
        };
        let mut op = Op::new(
            OpKind::SubFinish(outcome),
            ctx,
            entry.txn,
            now + self.cfg.control_timeout_ms,
            now,
            Vec::new(),
            Stage::Finishing,
            now + self.cfg.control_timeout_ms + TICK_SLACK_MS,
        );
        for (cluster, mark) in marks {
            let wanted = match outcome {
                Outcome::Committed => mark != Mark::ReadOnly && mark != Mark::Abort,
                Outcome::Aborted => mark != Mark::ReadOnly,
            };
            if !wanted {
                continue;
            }
            let name = if cluster == app {
                self.node.clone()
            } else {
                cluster.clone()
            };
            let call = Self::control_call(
                &cluster,
                path,
                &entry.txn,
                entry.deadline_ms,
                self.cfg.control_timeout_ms,
            );
            let idx = op.targets.len();
            let mut t = Target {
                name,
                cluster,
                vote: None,
                token: None,
            };
            match h.dispatch(&call) {
                Ok(token) => {
                    t.token = Some(token);
                    self.calls.insert(
                        token,
                        Call::Op {
                            ctx,
                            target: Some(idx),
                        },
                    );
                }
                Err(e) => {
                    t.vote = Some(Vote::Abort {
                        cause: Cause::VoteAbort,
                        reason: format!("not sent: {e}"),
                        participant: t.name.clone(),
                    })
                }
            }
            op.targets.push(t);
        }
        self.ops.insert(ctx, op);
        self.evaluate(h, ctx);
        (Stream::Owned, Verdict::Pause)
    }

    // ----- callouts --------------------------------------------------------

    pub fn on_callout(&mut self, h: &impl FilterHost, token: u32, resp: CalloutResponse) {
        let Some(call) = self.calls.remove(&token) else {
            return; // answered after its op ended: ignore
        };
        match call {
            Call::Op { ctx, target } => self.op_answer(h, ctx, target, resp),
            Call::JobTarget { txn, idx } => self.job_target_answer(h, txn, idx, resp),
            Call::JobRecord { txn } => self.job_record_answer(h, txn, resp),
            Call::Recovery => self.recovery_answer(h, resp),
        }
    }

    fn op_answer(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        target: Option<usize>,
        resp: CalloutResponse,
    ) {
        let Some(op) = self.ops.get_mut(&ctx) else {
            return;
        };
        let stage = op.stage.clone();
        match (&stage, target) {
            (Stage::Voting, Some(i)) => {
                // A callout cut off by its timeout (the remaining time to the
                // deadline) comes back as Envoy's 504 or as no answer.
                let late = h.now_ms() + TICK_SLACK_MS >= op.deadline_ms
                    && matches!(resp.status, None | Some(504));
                if let Some(t) = op.targets.get_mut(i) {
                    t.token = None;
                    let vote = if late {
                        Vote::Abort {
                            cause: Cause::Timeout,
                            reason: NO_ANSWER.to_string(),
                            participant: t.name.clone(),
                        }
                    } else {
                        parse_vote(&resp, &t.name)
                    };
                    t.vote = Some(vote.clone());
                    if op.kind == OpKind::SubPrepare {
                        let mark = match vote {
                            Vote::Commit => Mark::Commit,
                            Vote::ReadOnly => Mark::ReadOnly,
                            Vote::Abort { .. } => Mark::Abort,
                        };
                        let cluster = t.cluster.clone();
                        let txn = op.txn;
                        let _ = self.table.update(h, &txn, |e| {
                            if let Some(p) = e.participants.iter_mut().find(|(c, _)| *c == cluster)
                            {
                                p.1 = mark;
                            }
                            Ok(())
                        });
                    }
                }
                self.evaluate(h, ctx);
            }
            (Stage::Finishing, Some(i)) => {
                if let Some(t) = op.targets.get_mut(i) {
                    t.token = None;
                    t.vote = Some(if is_2xx(resp.status) {
                        Vote::Commit
                    } else {
                        Vote::Abort {
                            cause: Cause::VoteAbort,
                            reason: match resp.status {
                                Some(s) => format!("answered {s}"),
                                None => "no answer".to_string(),
                            },
                            participant: t.name.clone(),
                        }
                    });
                }
                self.evaluate(h, ctx);
            }
            (Stage::OnePhase, Some(_)) => {
                if is_2xx(resp.status) {
                    self.root_committed(h, ctx, false);
                } else {
                    // The commit may or may not have landed: make the decision
                    // durable and let phase 2 retry it.
                    self.write_record(h, ctx, Outcome::Committed);
                }
            }
            (Stage::WriteCommit, None) => self.commit_record_answer(h, ctx, resp),
            (Stage::WriteAbort { .. }, None) => self.abort_record_answer(h, ctx, resp),
            (Stage::StatusRead { resolve, miss }, None) => {
                let op_txn = op.txn;
                let found = match (resp.status, etcd::parse_range_response(&resp.body)) {
                    (Some(200), Ok(v)) => Ok(v),
                    (Some(200), Err(e)) => Err(e),
                    (s, _) => Err(format!("etcd answered {s:?}")),
                };
                match found {
                    Ok(Some(v)) => {
                        self.ops.remove(&ctx);
                        let o = etcd::outcome_of(&v).map_or("unknown", Outcome::as_str);
                        Self::status_reply(h, ctx, &op_txn, o);
                    }
                    Ok(None) if *resolve => {
                        // In doubt past deadline + grace: abort it, first write wins.
                        let d = Decision {
                            txn: op_txn,
                            outcome: Outcome::Aborted,
                            participants: Vec::new(),
                            coordinator: self.node.clone(),
                            time_ms: h.now_ms(),
                            reason: "in_doubt".to_string(),
                            trace: String::new(),
                            begun_ms: 0,
                        };
                        let call = Self::record_call(&self.cfg, &d, None);
                        match h.dispatch(&call) {
                            Ok(token) => {
                                self.calls.insert(token, Call::Op { ctx, target: None });
                                if let Some(op) = self.ops.get_mut(&ctx) {
                                    op.stage = Stage::StatusResolve;
                                }
                            }
                            Err(e) => {
                                self.ops.remove(&ctx);
                                h.send_reply(
                                    ctx,
                                    503,
                                    &[JSON],
                                    &json_error(&format!("etcd unreachable: {e}")),
                                );
                            }
                        }
                    }
                    Ok(None) => {
                        self.ops.remove(&ctx);
                        Self::status_reply(h, ctx, &op_txn, miss);
                    }
                    Err(e) => {
                        self.ops.remove(&ctx);
                        h.send_reply(
                            ctx,
                            503,
                            &[JSON],
                            &json_error(&format!("etcd unreachable: {e}")),
                        );
                    }
                }
            }
            (Stage::StatusResolve, None) => {
                let op_txn = op.txn;
                self.ops.remove(&ctx);
                let result = cas_answer(&resp);
                match result {
                    Ok(CasResult::Created) => {
                        h.log(
                            LogLevel::Warn,
                            &format!("txn {op_txn}: in doubt past its deadline with no decision; recorded abort (asked by a participant)"),
                        );
                        Self::status_reply(h, ctx, &op_txn, "aborted");
                    }
                    Ok(CasResult::Exists(v)) => {
                        let o = etcd::outcome_of(&v).map_or("unknown", Outcome::as_str);
                        Self::status_reply(h, ctx, &op_txn, o);
                    }
                    Err(e) => h.send_reply(
                        ctx,
                        503,
                        &[JSON],
                        &json_error(&format!("etcd unreachable: {e}")),
                    ),
                }
            }
            _ => {}
        }
    }

    /// Decides what an op can decide now.
    fn evaluate(&mut self, h: &impl FilterHost, ctx: u32) {
        let Some(op) = self.ops.get(&ctx) else {
            return;
        };
        match (op.kind, &op.stage) {
            (OpKind::RootPrepare, Stage::Voting) => {
                if let Some(Vote::Abort {
                    cause: r,
                    reason: why,
                    participant,
                }) = op.targets.iter().find_map(|t| match &t.vote {
                    Some(v @ Vote::Abort { .. }) => Some(v.clone()),
                    _ => None,
                }) {
                    let Some(mut op) = self.ops.remove(&ctx) else {
                        return;
                    };
                    self.forget_calls(ctx);
                    self.root_abort(h, &mut op, r, &why, &participant, Record::WriteAbort);
                    return;
                }
                let first_yes = seeded::active(Bug::FirstVoteDecides)
                    && op.targets.iter().any(|t| t.vote == Some(Vote::Commit));
                if op.targets.iter().any(|t| t.vote.is_none()) && !first_yes {
                    return;
                }
                let commits = op
                    .targets
                    .iter()
                    .filter(|t| t.vote == Some(Vote::Commit))
                    .count();
                let n_targets = op.targets.len();
                let now = h.now_ms();
                let now_us = h.now_us();
                if let Some(op) = self.ops.get_mut(&ctx) {
                    op.voted_ms = Some(now);
                    op.voted_us = Some(now_us);
                }
                if commits == 0 {
                    // Everyone read-only: committed, nothing to do in phase 2.
                    self.root_committed(h, ctx, false);
                } else if n_targets == 1 {
                    self.one_phase(h, ctx);
                } else if seeded::active(Bug::CommitBeforeRecord) {
                    self.root_committed(h, ctx, true);
                } else {
                    self.write_record(h, ctx, Outcome::Committed);
                }
            }
            (OpKind::SubPrepare, Stage::Voting) => {
                let abort = op.targets.iter().find_map(|t| match &t.vote {
                    Some(Vote::Abort {
                        cause,
                        reason,
                        participant,
                    }) => Some((*cause, reason.clone(), participant.clone())),
                    _ => None,
                });
                let body = if let Some((cause, why, participant)) = abort {
                    let o = Obj::new()
                        .str("vote", "abort")
                        .str("reason", &why)
                        // The service, not the instance, in answers.
                        .str("participant", split_pinned(&participant).0);
                    if cause == Cause::Timeout {
                        o.str("cause", "timeout").build()
                    } else {
                        o.build()
                    }
                } else if op.targets.iter().any(|t| t.vote.is_none()) {
                    return;
                } else if op.targets.iter().any(|t| t.vote == Some(Vote::Commit)) {
                    Obj::new().str("vote", "commit").build()
                } else {
                    Obj::new().str("vote", "readonly").build()
                };
                self.ops.remove(&ctx);
                self.forget_calls(ctx);
                h.send_reply(ctx, 200, &[JSON], body.as_bytes());
            }
            (OpKind::SubFinish(_), Stage::Finishing) => {
                if op.targets.iter().any(|t| t.vote.is_none()) {
                    return;
                }
                let failed: Vec<String> = op
                    .targets
                    .iter()
                    .filter_map(|t| match &t.vote {
                        Some(Vote::Abort {
                            reason,
                            participant,
                            ..
                        }) => Some(format!("{participant} ({reason})")),
                        _ => None,
                    })
                    .collect();
                let txn = op.txn;
                self.ops.remove(&ctx);
                if failed.is_empty() {
                    self.table.remove(h, &txn);
                    h.send_reply(ctx, 200, &[JSON], br#"{"acknowledged":true}"#);
                } else {
                    let msg = format!("not acknowledged by {}", failed.join(", "));
                    h.send_reply(ctx, 503, &[JSON], &json_error(&msg));
                }
            }
            _ => {}
        }
    }

    fn forget_calls(&mut self, ctx: u32) {
        self.calls
            .retain(|_, c| !matches!(c, Call::Op { ctx: c_ctx, .. } if *c_ctx == ctx));
    }

    fn one_phase(&mut self, h: &impl FilterHost, ctx: u32) {
        let Some(op) = self.ops.get_mut(&ctx) else {
            return;
        };
        let Some(t) = op.targets.first() else { return };
        let now = h.now_ms();
        let call = Self::control_call(
            &t.cluster,
            COMMIT_PATH,
            &op.txn,
            op.deadline_ms,
            self.cfg.control_timeout_ms,
        );
        match h.dispatch(&call) {
            Ok(token) => {
                op.stage = Stage::OnePhase;
                op.stage_deadline_ms = now + self.cfg.control_timeout_ms + TICK_SLACK_MS;
                self.calls.insert(
                    token,
                    Call::Op {
                        ctx,
                        target: Some(0),
                    },
                );
            }
            Err(_) => self.write_record(h, ctx, Outcome::Committed),
        }
    }

    fn decision(&self, op: &Op, outcome: Outcome, cause: Cause) -> Decision {
        Decision {
            txn: op.txn,
            outcome,
            participants: op.targets.iter().map(|t| t.name.clone()).collect(),
            coordinator: self.node.clone(),
            time_ms: 0,
            reason: cause.as_str().to_string(),
            trace: op.trace.clone().unwrap_or_default(),
            begun_ms: op.started_ms,
        }
    }

    /// The CAS-create of a decision record; with `pending`, the same etcd
    /// transaction also writes this coordinator's pending-work key.
    fn record_call(cfg: &TxnConfig, d: &Decision, pending: Option<(String, String)>) -> Callout {
        let key = etcd::decision_key(&d.txn);
        let value = d.to_json();
        let body = match &pending {
            Some((k, v)) => etcd::cas_create_with_body(&key, &value, (k, v)),
            None if d.outcome == Outcome::Aborted && seeded::active(Bug::AbortWithoutCas) => {
                seeded::unconditional_put_body(&key, &value)
            }
            None => etcd::cas_create_body(&key, &value),
        };
        Callout {
            cluster: cfg.etcd_cluster.clone(),
            method: "POST",
            path: "/v3/kv/txn".to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into_bytes(),
            timeout_ms: cfg.etcd_timeout_ms,
        }
    }

    /// The pending-work key and value of a commit decision owned by `node`:
    /// each participant with what it is owed (see [`pending_state`]).
    fn pending_record<'a>(
        node: &str,
        txn: &TxnId,
        now: u64,
        deadline_ms: u64,
        parts: impl Iterator<Item = (&'a String, &'a String, &'static str)>,
    ) -> (String, String) {
        let targets: Vec<(String, String, &str)> = parts
            .map(|(n, c, state)| (n.clone(), c.clone(), state))
            .collect();
        (
            etcd::pending_key(node, txn),
            etcd::Pending::to_json(txn, Outcome::Committed, now, deadline_ms, &targets),
        )
    }

    /// Writes the commit record (first write wins) before any commit is sent.
    fn write_record(&mut self, h: &impl FilterHost, ctx: u32, outcome: Outcome) {
        let Some(op) = self.ops.get(&ctx) else { return };
        let now = h.now_ms();
        let mut d = self.decision(op, outcome, Cause::Ok);
        d.time_ms = now;
        let pending = (outcome == Outcome::Committed).then(|| {
            let parts = op
                .targets
                .iter()
                .map(|t| (&t.name, &t.cluster, pending_state(&t.vote, false)));
            Self::pending_record(&self.node, &op.txn, now, op.deadline_ms, parts)
        });
        let call = Self::record_call(&self.cfg, &d, pending);
        match h.dispatch(&call) {
            Ok(token) => {
                self.calls.insert(token, Call::Op { ctx, target: None });
                if let Some(op) = self.ops.get_mut(&ctx) {
                    op.stage = Stage::WriteCommit;
                    op.stage_deadline_ms = now + self.cfg.etcd_timeout_ms + TICK_SLACK_MS;
                    op.last_call = Some(call);
                    op.record_sent_us = h.now_us();
                }
            }
            Err(e) => {
                let resp = CalloutResponse {
                    status: Some(503),
                    body: format!("no healthy upstream: {e}").into_bytes(),
                };
                self.commit_record_answer(h, ctx, resp);
            }
        }
    }

    fn commit_record_answer(&mut self, h: &impl FilterHost, ctx: u32, resp: CalloutResponse) {
        if let Some(op) = self.ops.get_mut(&ctx) {
            op.record_answered_us = h.now_us();
        }
        let result = if resp.status == Some(200) {
            etcd::parse_cas_response(&resp.body)
        } else {
            Err(format!(
                "etcd answered {}: {}",
                resp.status.map_or("nothing".to_string(), |s| s.to_string()),
                String::from_utf8_lossy(resp.body.get(..120).unwrap_or(&resp.body))
            ))
        };
        match result {
            Ok(CasResult::Created) => self.root_committed(h, ctx, true),
            Ok(CasResult::Exists(v)) => self.obey(h, ctx, &v),
            Err(error) => {
                // Envoy could not connect: nothing reached etcd, so the same
                // write can go again (to another member, if one answers).
                if certainly_not_sent(&resp) {
                    let retry = self
                        .ops
                        .get_mut(&ctx)
                        .filter(|op| op.retries < RECORD_RETRIES)
                        .and_then(|op| {
                            op.retries += 1;
                            op.last_call.clone()
                        });
                    if let Some(call) = retry {
                        if let Ok(token) = h.dispatch(&call) {
                            self.calls.insert(token, Call::Op { ctx, target: None });
                            if let Some(op) = self.ops.get_mut(&ctx) {
                                op.record_sent_us = h.now_us();
                            }
                            return;
                        }
                    }
                }
                // Learn the truth with an abort record: it wins if ours never landed.
                let maybe_applied = !certainly_not_sent(&resp);
                let Some(op) = self.ops.get(&ctx) else { return };
                let now = h.now_ms();
                let mut d = self.decision(op, Outcome::Aborted, Cause::EtcdUnavailable);
                d.time_ms = now;
                let call = Self::record_call(&self.cfg, &d, None);
                match h.dispatch(&call) {
                    Ok(token) => {
                        self.calls.insert(token, Call::Op { ctx, target: None });
                        if let Some(op) = self.ops.get_mut(&ctx) {
                            op.stage = Stage::WriteAbort {
                                maybe_applied,
                                error,
                            };
                            op.stage_deadline_ms = now + self.cfg.etcd_timeout_ms + TICK_SLACK_MS;
                        }
                    }
                    Err(e) => {
                        if let Some(op) = self.ops.get_mut(&ctx) {
                            op.stage = Stage::WriteAbort {
                                maybe_applied,
                                error: format!("{error}; {e}"),
                            };
                        }
                        self.abort_record_answer(h, ctx, CalloutResponse::default());
                    }
                }
            }
        }
    }

    fn abort_record_answer(&mut self, h: &impl FilterHost, ctx: u32, resp: CalloutResponse) {
        let Some(op) = self.ops.get(&ctx) else { return };
        let Stage::WriteAbort {
            maybe_applied,
            error,
        } = op.stage.clone()
        else {
            return;
        };
        let result = cas_answer(&resp);
        let Some(mut op) = self.ops.remove(&ctx) else {
            return;
        };
        self.forget_calls(ctx);
        let me = self.node.clone();
        match result {
            Ok(CasResult::Created) => {
                let why = format!("the commit record could not be written ({error})");
                self.root_abort(h, &mut op, Cause::EtcdUnavailable, &why, &me, Record::Done);
            }
            Ok(CasResult::Exists(v)) => {
                self.ops.insert(ctx, op);
                self.obey(h, ctx, &v);
            }
            Err(_) if !maybe_applied => {
                // Nothing reached etcd: presumed abort is safe. The abort
                // record is written later, from the tick, once etcd is back.
                let why = format!("etcd unavailable, no decision could be recorded ({error})");
                self.root_abort(
                    h,
                    &mut op,
                    Cause::EtcdUnavailable,
                    &why,
                    &me,
                    Record::WriteAbort,
                );
            }
            Err(e) => {
                // The commit record may have landed: the outcome is unknown
                // until etcd answers. Tell the client so, and resolve from the tick.
                let msg = format!(
                    "transaction outcome unknown: etcd did not confirm the decision ({error}; {e}); it will be resolved when etcd is reachable"
                );
                h.log(LogLevel::Error, &format!("txn {} in doubt: {msg}", op.txn));
                let body = Obj::new()
                    .str("txn", &op.txn.to_string())
                    .str("outcome", "unknown")
                    .str("error", &msg)
                    .build();
                h.send_reply(op.ctx, 503, &[JSON], body.as_bytes());
                self.gauge(h, Gauge::InDoubt, 1);
                self.gauge_in_flight(h, -1);
                self.count_txn(h, None, Cause::Unknown);
                self.start_job(h, &op, None, Record::Resolve, Cause::Unknown);
            }
        }
    }

    /// Obeys a decision found in etcd.
    fn obey(&mut self, h: &impl FilterHost, ctx: u32, value: &[u8]) {
        match etcd::outcome_of(value) {
            Some(Outcome::Committed) => self.root_committed(h, ctx, true),
            _ if seeded::active(Bug::ObeyIgnoresAbort) => self.root_committed(h, ctx, true),
            _ => {
                let Some(mut op) = self.ops.remove(&ctx) else {
                    return;
                };
                self.forget_calls(ctx);
                let me = self.node.clone();
                self.root_abort(
                    h,
                    &mut op,
                    Cause::DecidedElsewhere,
                    "an abort decision was already recorded in etcd (in-doubt resolution)",
                    &me,
                    Record::Done,
                );
            }
        }
    }

    fn root_committed(&mut self, h: &impl FilterHost, ctx: u32, phase2: bool) {
        let Some(op) = self.ops.remove(&ctx) else {
            return;
        };
        self.forget_calls(ctx);
        let now = h.now_ms();
        let _ = self.table.update(h, &op.txn, |e| {
            e.phase = Phase::Committed;
            Ok(())
        });
        let id = op.txn.to_string();
        h.resume_response(
            op.ctx,
            &[(id::OUTCOME_HEADER, "committed"), (id::TXN_HEADER, &id)],
        );
        self.finish_metrics(h, &op, Outcome::Committed, Cause::Ok, now);
        self.log_decision(h, &op, Outcome::Committed, Cause::Ok, "", "", now);
        Self::remember(h, &op.txn, Outcome::Committed);
        if phase2 {
            self.start_job(h, &op, Some(Outcome::Committed), Record::Done, Cause::Ok);
        } else {
            self.table.remove(h, &op.txn);
        }
    }

    fn root_abort(
        &mut self,
        h: &impl FilterHost,
        op: &mut Op,
        r: Cause,
        why: &str,
        participant: &str,
        record: Record,
    ) {
        let now = h.now_ms();
        let _ = self.table.update(h, &op.txn, |e| {
            e.phase = Phase::Aborted;
            Ok(())
        });
        let body = Obj::new()
            .str("txn", &op.txn.to_string())
            .str("outcome", "aborted")
            .str("reason", why)
            .str("participant", split_pinned(participant).0)
            .build();
        let txn_id = op.txn.to_string();
        if op.client_error {
            // Still in the response-headers callback: mark and let it pass.
            h.set_response_header(id::OUTCOME_HEADER, "aborted");
            h.set_response_header(id::TXN_HEADER, &txn_id);
        } else {
            h.send_reply(
                op.ctx,
                409,
                &[
                    JSON,
                    (id::OUTCOME_HEADER, "aborted"),
                    (id::TXN_HEADER, &txn_id),
                ],
                body.as_bytes(),
            );
        }
        self.finish_metrics(h, op, Outcome::Aborted, r, now);
        self.log_decision(h, op, Outcome::Aborted, r, why, participant, now);
        Self::remember(h, &op.txn, Outcome::Aborted);
        // An abort record matters only if someone may hold a prepared state.
        let someone_prepared = op
            .targets
            .iter()
            .any(|t| t.vote == Some(Vote::Commit) || (t.vote.is_none() && t.token.is_some()));
        let record = if record == Record::WriteAbort && !someone_prepared {
            Record::Done
        } else {
            record
        };
        self.start_job(h, op, Some(Outcome::Aborted), record, r);
    }

    // ----- phase-2 jobs ----------------------------------------------------

    // ----- ticks and stream end ---------------------------------------------

    /// Called from the root context every [`TICK_MS`]: enforces deadlines the
    /// callout timeouts may miss, and drives phase-2 jobs.
    pub fn on_tick(&mut self, h: &impl FilterHost) {
        let now = h.now_ms();
        let expired: Vec<u32> = self
            .ops
            .values()
            .filter(|op| match op.stage {
                Stage::Voting => now >= op.deadline_ms,
                _ => now >= op.stage_deadline_ms,
            })
            .map(|op| op.ctx)
            .collect();
        for ctx in expired {
            self.expire(h, ctx);
        }
        if now >= self.next_scan_ms {
            self.next_scan_ms = now.saturating_add(self.cfg.recovery_interval_ms);
            if self.elect(h, now) {
                self.resolve_in_doubt(h, now);
                self.recover(h);
            }
        }
        self.drive_jobs(h, now);
        if now >= self.next_unpend_ms && !self.unpend.is_empty() {
            self.flush_unpend(h, now);
        }
    }

    fn expire(&mut self, h: &impl FilterHost, ctx: u32) {
        let Some(op) = self.ops.get_mut(&ctx) else {
            return;
        };
        let no_answer = CalloutResponse::default();
        match op.stage.clone() {
            Stage::Voting | Stage::Finishing => {
                for t in op.targets.iter_mut().filter(|t| t.vote.is_none()) {
                    t.vote = Some(Vote::Abort {
                        cause: Cause::Timeout,
                        reason: NO_ANSWER.to_string(),
                        participant: t.name.clone(),
                    });
                    t.token = None;
                }
                self.forget_calls(ctx);
                self.evaluate(h, ctx);
            }
            Stage::OnePhase => {
                self.forget_calls(ctx);
                self.write_record(h, ctx, Outcome::Committed);
            }
            Stage::WriteCommit => {
                self.forget_calls(ctx);
                self.commit_record_answer(h, ctx, no_answer);
            }
            Stage::WriteAbort { .. } => {
                self.forget_calls(ctx);
                self.abort_record_answer(h, ctx, no_answer);
            }
            Stage::StatusRead { .. } | Stage::StatusResolve => {
                self.forget_calls(ctx);
                self.ops.remove(&ctx);
                h.send_reply(
                    ctx,
                    503,
                    &[JSON],
                    &json_error("etcd unreachable: no answer"),
                );
            }
        }
    }

    /// The stream went away (client reset, or completed). Envoy cancels its
    /// callouts, so anything still running for it moves to a job.
    pub fn on_stream_done(&mut self, h: &impl FilterHost, ctx: u32, stream: &Stream) {
        if let Stream::Root { txn, .. } = stream {
            if !self.ops.contains_key(&ctx) && !self.jobs.contains_key(txn) {
                // The response never came (client left before the app
                // answered): abort, nobody was asked to prepare.
                if let Ok(entry) = self.table.update(h, txn, |e| {
                    if e.phase == Phase::Active {
                        e.phase = Phase::Aborted;
                    }
                    Ok(())
                }) {
                    if entry.phase == Phase::Aborted && !self.jobs.contains_key(txn) {
                        let targets = self.root_targets(&entry);
                        let op = Op::new(
                            OpKind::RootPrepare,
                            ctx,
                            *txn,
                            entry.deadline_ms,
                            h.now_ms(),
                            targets,
                            Stage::Voting,
                            entry.deadline_ms,
                        );
                        h.log(
                            LogLevel::Warn,
                            &format!(
                                "txn {txn}: client went away before the app answered; aborting"
                            ),
                        );
                        self.count_txn(h, Some(Outcome::Aborted), Cause::ClientGone);
                        self.gauge_in_flight(h, -1);
                        Self::remember(h, txn, Outcome::Aborted);
                        self.start_job(
                            h,
                            &op,
                            Some(Outcome::Aborted),
                            Record::Done,
                            Cause::ClientGone,
                        );
                    }
                }
            }
        }
        let Some(op) = self.ops.remove(&ctx) else {
            return;
        };
        self.forget_calls(ctx);
        match (op.kind, &op.stage) {
            (OpKind::RootPrepare, Stage::Voting) => {
                let txn = op.txn;
                h.log(
                    LogLevel::Warn,
                    &format!("txn {txn}: client went away during prepare; aborting"),
                );
                let _ = self.table.update(h, &txn, |e| {
                    e.phase = Phase::Aborted;
                    Ok(())
                });
                self.count_txn(h, Some(Outcome::Aborted), Cause::ClientGone);
                self.gauge_in_flight(h, -1);
                Self::remember(h, &txn, Outcome::Aborted);
                self.start_job(
                    h,
                    &op,
                    Some(Outcome::Aborted),
                    Record::WriteAbort,
                    Cause::ClientGone,
                );
            }
            (OpKind::RootPrepare, Stage::OnePhase) => {
                // The lone participant voted commit and its commit is out:
                // record commit and keep sending it.
                self.start_job(
                    h,
                    &op,
                    Some(Outcome::Committed),
                    Record::WriteCommit,
                    Cause::Ok,
                );
            }
            (OpKind::RootPrepare, Stage::WriteCommit | Stage::WriteAbort { .. }) => {
                h.log(
                    LogLevel::Warn,
                    &format!("txn {}: client went away while the decision was being written; resolving from etcd", op.txn),
                );
                self.gauge_in_flight(h, -1);
                self.start_job(h, &op, None, Record::Resolve, Cause::Unknown);
                self.gauge(h, Gauge::InDoubt, 1);
            }
            // A sub-coordinator's caller went away: its coordinator retries or
            // aborts; nothing to keep.
            _ => {}
        }
    }
}

mod observe;
mod phase2;
mod recovery;
mod status;

#[cfg(test)]
mod tests;
