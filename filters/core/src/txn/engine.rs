//! The transaction engine: one per plugin root (one per Envoy worker and
//! listener), driven by events — request headers, response headers, callout
//! answers, ticks, stream end. See docs/protocol.md for the protocol.
//!
//! Work is split by who can carry it:
//! - an **op** belongs to one paused HTTP stream: the root's prepare and
//!   decision ([`root`]), a sub-coordinator's prepare or cascade ([`sub`]),
//!   a status query ([`status`]); its callouts are dispatched from that
//!   stream's context and answered there;
//! - a **job** is phase-2 work that outlives the client's stream ([`phase2`]):
//!   commit or abort retries, a decision record still to write, an unknown
//!   outcome to resolve; it is dispatched from the root context's tick.
//!
//! Each is an enum whose variants carry their data, stepped by pure
//! transitions — (state, event) in, next state and [`effect::Effect`]s out.
//! This file routes events to them and keeps their maps; [`admission`]
//! decides what a request is; [`effect`] carries effects out.

use super::cause::Cause;
use super::config::{AppProtocol, Direction, TxnConfig};
use super::etcd::{self, CasResult, Decision, Outcome};
use super::id::{self, TxnHeader, TxnId};
use super::pb;
use super::seeded::{self, Bug};
use super::table::{Entry, Mark, Phase, Role, Table, TableError};
use super::tree::{self, Child};
use crate::grpc;
use crate::host::{
    Callout, CalloutResponse, FilterHost, GrpcMethod, LogLevel, MetricKind, ResponsePart, Verdict,
};
use crate::json::Obj;
use effect::{Answer, Call, Effect, OpEvent, Step};
use phase2::Job;
use root::RootOp;
use serde::Deserialize;
use status::StatusOp;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use sub::{SubFinish, SubPrepare};
use verify::Verify;
use vote::Target;

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
        Some((c, ep)) if is_endpoint(ep) => (c, Some(ep)),
        _ => (participant, None),
    }
}

/// Whether `s` has the shape of an `ip:port` endpoint as txmesh_router
/// writes it (`10.0.0.7:8080`, `[fd00::7]:8080`): an IPv4 or bracketed IPv6
/// address of address characters, and a port 1–65535. A shape check, not a
/// parser (core's `SocketAddr` parser costs ~4 KiB of `.wasm`); Envoy's
/// override-host policy takes only endpoints it knows anyway.
pub fn is_endpoint(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65_535).contains(&p));
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            v6.len() >= 2
                && v6.len() <= 39
                && v6.contains(':')
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => {
            let parts: Vec<&str> = host.split('.').collect();
            parts.len() == 4
                && parts.iter().all(|p| {
                    !p.is_empty()
                        && p.len() <= 3
                        && p.bytes().all(|b| b.is_ascii_digit())
                        && p.parse::<u16>().is_ok_and(|n| n <= 255)
                })
        }
    };
    port_ok && host_ok
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
    /// A business call inside `txn` to this sidecar's app: its answer
    /// reports the app's call tree to the caller (`x-txmesh-children`).
    Business { txn: TxnId },
    /// The app's call that enlisted `participant` in `txn`: its answer may
    /// report the participant's call tree.
    Enlisted { txn: TxnId, participant: String },
    /// The engine owns this stream (an op is running for it).
    Owned,
}

/// The app's answer to a root's request as its response headers tell it;
/// None: a gRPC answer whose status comes in the trailers.
fn app_answer_at_headers(h: &impl FilterHost, end_of_stream: bool) -> Option<root::AppAnswer> {
    let status: Option<u16> = h
        .response_header(":status")
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok());
    let grpc_answer = h
        .response_header("content-type")
        .is_some_and(|c| grpc::is_grpc(&c));
    if !grpc_answer || status != Some(200) || seeded::active(Bug::GrpcStatusIgnored) {
        return Some(root::AppAnswer::Http(status));
    }
    match h.response_header(grpc::STATUS) {
        // Trailers-only: the headers are the whole answer.
        Some(v) => Some(root::AppAnswer::Grpc {
            status: grpc::parse_status(&v),
            at: ResponsePart::Headers,
        }),
        None if end_of_stream => Some(root::AppAnswer::Grpc {
            status: None,
            at: ResponsePart::Headers,
        }),
        None => None,
    }
}

/// The work running for one paused stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Op {
    Root(Box<RootOp>),
    SubPrepare(SubPrepare),
    SubFinish(SubFinish),
    Status(StatusOp),
    Verify(Verify),
}

impl Op {
    fn root(op: RootOp) -> Self {
        Op::Root(Box::new(op))
    }

    /// When its current stage must have ended (the tick expires it).
    fn until_ms(&self) -> u64 {
        match self {
            Op::Root(o) => o.until_ms(),
            Op::SubPrepare(o) => o.deadline_ms,
            Op::SubFinish(o) => o.until_ms,
            Op::Status(o) => o.until_ms(),
            Op::Verify(o) => o.until_ms,
        }
    }

    fn step(self, ev: OpEvent, cx: &effect::Cx) -> Step<Op> {
        match self {
            Op::Root(o) => (*o).step(ev, cx).map(Op::root),
            Op::SubPrepare(o) => o.step(ev, cx).map(Op::SubPrepare),
            Op::SubFinish(o) => o.step(ev, cx).map(Op::SubFinish),
            Op::Status(o) => o.step(ev, cx).map(Op::Status),
            Op::Verify(o) => o.step(ev, cx).map(Op::Verify),
        }
    }
}

/// The transaction counters and gauges besides `txmesh_txn_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gauge {
    /// `txmesh_txn_in_doubt`
    InDoubt,
    /// `txmesh_txn_phase2_stuck`: jobs past `phase2_give_up_ms`, still retrying.
    Stuck,
    /// `txmesh_txn_internal_errors_total`: events a state could not take.
    InternalErrors,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TxnMetrics {
    total: HashMap<(&'static str, &'static str), u32>,
    duration: HashMap<&'static str, u32>,
    participants: Option<u32>,
    in_flight: Option<u32>,
    in_doubt: Option<u32>,
    stuck: Option<u32>,
    internal_errors: Option<u32>,
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
    /// Where the recovery loop's scan of pending-work keys goes on (the key
    /// after the last one seen; None: from the start).
    recovery_cursor: Option<String>,
    /// Finished commits whose pending-work keys go and whose records go
    /// under the retention lease, together (one etcd write per
    /// [`UNPEND_INTERVAL_MS`] instead of one per transaction).
    unpend: Vec<TxnId>,
    next_unpend_ms: u64,
    /// The retention leases (granted by the elected engine).
    leases: Leases,
    /// See [`TxnEngine::set_root_context`].
    root_ctx: u32,
    /// A streaming gRPC call inside a transaction was let through unenlisted
    /// (logged once per engine).
    streaming_logged: bool,
}

/// How often finished transactions' pending-work keys are deleted, in one
/// etcd request. Far below `recovery_after_ms`: the recovery loop never sees
/// a finished transaction's key as pending work.
pub const UNPEND_INTERVAL_MS: u64 = 100;
/// Transactions per unpend request: two operations each (a delete, a
/// lease put) within etcd's default `--max-txn-ops` of 128.
pub const UNPEND_BATCH: usize = 64;

/// The retention lease grants of the elected engine (checked every tick).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Leases {
    /// Whether this engine won the last election (it grants the leases).
    leader: bool,
    /// The last bucket whose lease etcd confirmed.
    granted: Option<u64>,
    /// A grant in flight.
    asking: bool,
    /// After a failed grant: not again before this time.
    retry_at_ms: u64,
    /// The last grant failed (logged once, until one succeeds).
    failing: bool,
}

/// How long after a failed lease grant the next one goes.
const LEASE_RETRY_MS: u64 = 1_000;

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
            self.stuck,
            self.internal_errors,
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
        self.recovery_cursor.hash(state);
        (&self.unpend, self.next_unpend_ms, self.root_ctx).hash(state);
        self.leases.hash(state);
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
            recovery_cursor: None,
            unpend: Vec::new(),
            next_unpend_ms: 0,
            leases: Leases::default(),
            root_ctx: 0,
            streaming_logged: false,
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

    // ----- response headers ------------------------------------------------

    /// The app's response headers (`end_of_stream`: nothing follows them).
    pub fn on_response_headers(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        stream: &mut Stream,
        end_of_stream: bool,
    ) -> Verdict {
        match stream {
            Stream::Root { .. } => match app_answer_at_headers(h, end_of_stream) {
                Some(answer) => self.root_answered(h, ctx, stream, answer),
                // A gRPC answer's status comes in its trailers: headers
                // and messages go on, the trailers are held.
                None => Verdict::Continue,
            },
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
            Stream::Business { txn } => {
                self.report_tree(h, txn);
                Verdict::Continue
            }
            Stream::Enlisted { txn, participant } => {
                if let Some(v) = h.response_header(tree::CHILDREN_HEADER) {
                    let reported = match tree::parse(&v) {
                        Ok(children) => tree::render(&children),
                        Err(_) => vote::UNTRACKABLE.to_string(),
                    };
                    let _ = self.table.update(h, txn, |e| {
                        e.set_tree(participant, reported.clone());
                        Ok(())
                    });
                }
                Verdict::Continue
            }
            Stream::Pass | Stream::Owned => Verdict::Continue,
        }
    }

    /// The app's response trailers: a gRPC root's answer is final here.
    pub fn on_response_trailers(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        stream: &mut Stream,
    ) -> Verdict {
        match stream {
            Stream::Root { .. } => {
                let answer = root::AppAnswer::Grpc {
                    status: h
                        .response_trailer(grpc::STATUS)
                        .and_then(|v| grpc::parse_status(&v)),
                    at: ResponsePart::Trailers,
                };
                self.root_answered(h, ctx, stream, answer)
            }
            Stream::LeafFinish { .. }
            | Stream::Business { .. }
            | Stream::Enlisted { .. }
            | Stream::Pass
            | Stream::Owned => Verdict::Continue,
        }
    }

    /// A root's app answered for good: the stream is the engine's from
    /// here (its op, or nothing once decided).
    fn root_answered(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        stream: &mut Stream,
        answer: root::AppAnswer,
    ) -> Verdict {
        match std::mem::replace(stream, Stream::Owned) {
            Stream::Root {
                txn,
                deadline_ms,
                started_ms,
                started_us,
                trace,
            } => {
                let begun = root::Begun {
                    ctx,
                    txn,
                    deadline_ms,
                    started_ms,
                    started_us,
                    trace,
                };
                self.root_respond(h, begun, answer)
            }
            // Not a root's stream: left as it was.
            other @ (Stream::Pass
            | Stream::LeafFinish { .. }
            | Stream::Business { .. }
            | Stream::Enlisted { .. }
            | Stream::Owned) => {
                *stream = other;
                Verdict::Continue
            }
        }
    }

    /// Tells the caller of a business call whom this sidecar's app has
    /// enlisted in `txn` (with their own trees), so that a prepare, commit
    /// or abort reaching another replica, or this sidecar after a restart,
    /// still reaches them.
    fn report_tree(&self, h: &impl FilterHost, txn: &TxnId) {
        let Some(e) = self.table.get(h, txn) else {
            return;
        };
        let children: Vec<Child> = e
            .participants
            .iter()
            .filter(|(c, _)| *c != self.cfg.app_cluster)
            .map(|(c, _)| Child {
                name: c.clone(),
                tree: e.tree_of(c).to_string(),
            })
            .collect();
        if children.is_empty() {
            return;
        }
        let v = tree::render(&children);
        // Too large to carry: say so (the caller's parse fails, and the
        // coordinator aborts rather than lose a participant).
        let v = if v.len() > tree::MAX_LEN {
            "(too-large)"
        } else {
            &v
        };
        h.set_response_field(ResponsePart::Headers, tree::CHILDREN_HEADER, v);
    }

    /// The app answered the request that began a transaction: freeze its
    /// participants and start the root's prepare.
    fn root_respond(
        &mut self,
        h: &impl FilterHost,
        b: root::Begun,
        answer: root::AppAnswer,
    ) -> Verdict {
        let (ctx, txn) = (b.ctx, b.txn);
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
                Entry::new(txn, b.deadline_ms, Role::Root)
            }
        };
        let targets = self.root_targets(&entry);
        let (step, verdict) = RootOp::start(b, targets, answer, &self.cx(h));
        self.settle_op(h, ctx, step.map(Op::root));
        verdict
    }

    /// A root's participants: every enlisted cluster, then its own app.
    fn root_targets(&self, entry: &Entry) -> Vec<Target> {
        let mut targets: Vec<Target> = entry
            .participants
            .iter()
            .map(|(c, _)| Target::new(c.clone(), c.clone(), entry.tree_of(c).to_string()))
            .collect();
        targets.push(Target::new(
            self.node.clone(),
            self.cfg.app_cluster.clone(),
            String::new(),
        ));
        targets
    }

    // ----- callouts, ticks, stream end ---------------------------------------

    pub fn on_callout(&mut self, h: &impl FilterHost, token: u32, resp: CalloutResponse) {
        let Some(route) = self.calls.remove(&token) else {
            return; // answered after its op or job ended: ignore
        };
        self.deliver(h, route, Answer::Got(resp));
    }

    /// Called from the root context every [`TICK_MS`]: enforces deadlines the
    /// callout timeouts may miss, and drives phase-2 jobs.
    pub fn on_tick(&mut self, h: &impl FilterHost) {
        let now = h.now_ms();
        let mut expired: Vec<u32> = self
            .ops
            .iter()
            .filter(|(_, op)| now >= op.until_ms())
            .map(|(ctx, _)| *ctx)
            .collect();
        expired.sort_unstable();
        for ctx in expired {
            self.step_op(h, ctx, OpEvent::Expired);
        }
        if now >= self.next_scan_ms {
            self.next_scan_ms = now.saturating_add(self.cfg.recovery_interval_ms);
            self.leases.leader = self.elect(h, now);
            if self.leases.leader {
                self.resolve_in_doubt(h, now);
                self.recover(h);
            }
        }
        if self.leases.leader {
            self.grant_lease(h, now);
        }
        self.drive_jobs(h);
        if now >= self.next_unpend_ms && !self.unpend.is_empty() {
            self.flush_unpend(h, now);
        }
    }

    /// The stream went away (client reset, or completed). Envoy cancels its
    /// callouts, so anything still running for it moves to a job.
    pub fn on_stream_done(&mut self, h: &impl FilterHost, ctx: u32, stream: &Stream) {
        if let Stream::Root { txn, trace, .. } = stream {
            if !self.ops.contains_key(&ctx) && !self.jobs.contains_key(txn) {
                self.client_gone_before_answer(h, *txn, trace.clone());
            }
        }
        self.step_op(h, ctx, OpEvent::StreamGone);
    }

    /// The client left before the app answered: abort; nobody was asked to
    /// prepare, so no record is written.
    fn client_gone_before_answer(
        &mut self,
        h: &impl FilterHost,
        txn: TxnId,
        trace: Option<String>,
    ) {
        let Ok(entry) = self.table.update(h, &txn, |e| {
            if e.phase == Phase::Active {
                e.phase = Phase::Aborted;
            }
            Ok(())
        }) else {
            return;
        };
        if entry.phase != Phase::Aborted {
            return;
        }
        let parts = self
            .root_targets(&entry)
            .into_iter()
            .map(|t| phase2::Participant {
                name: t.name,
                cluster: t.cluster,
                tree: t.tree,
                vote: None,
            })
            .collect();
        let start = phase2::Start::Deliver {
            outcome: Outcome::Aborted,
            write_record: false,
        };
        let job = Job::new(
            txn,
            parts,
            entry.deadline_ms,
            trace.unwrap_or_default(),
            start,
            Cause::ClientGone,
            &self.cx(h),
        );
        self.run(
            h,
            vec![
                Effect::Log(
                    LogLevel::Warn,
                    format!("txn {txn}: client went away before the app answered; aborting"),
                ),
                Effect::Count(Some(Outcome::Aborted), Cause::ClientGone),
                Effect::InFlight(-1),
                Effect::Remember(txn, Outcome::Aborted),
                Effect::StartJob(Box::new(job)),
            ],
        );
    }
}

mod admission;
mod effect;
mod observe;
/// The txn filter's stat families (a native host defines them up front).
pub use observe::FAMILIES;
mod phase2;
mod record;
mod recovery;
mod root;
mod status;
mod sub;
mod verify;
mod vote;

#[cfg(test)]
mod tests;
