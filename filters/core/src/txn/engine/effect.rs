//! The vocabulary between the pure transitions and the engine: what a
//! transition may see ([`Cx`], the events) and what it may ask for
//! ([`Effect`]). Transitions never touch the host; [`TxnEngine::run`]
//! carries their effects out, in order.

use super::phase2::Job;
use super::*;

/// What a transition knows about the world besides its own state.
pub(super) struct Cx<'a> {
    pub now_ms: u64,
    pub now_us: u64,
    pub cfg: &'a TxnConfig,
    /// This sidecar's name (votes, records, pending-work keys).
    pub node: &'a str,
}

impl Cx<'_> {
    /// When an etcd call sent now has failed for sure: its timeout and a
    /// tick's slack (the tick enforces it should the answer never come).
    pub fn etcd_deadline(&self) -> u64 {
        self.now_ms + self.cfg.etcd_timeout_ms + TICK_SLACK_MS
    }
}

/// A state machine's next state (None: it ended) and its effects.
#[derive(Debug)]
pub(super) struct Step<S> {
    pub next: Option<S>,
    pub effects: Vec<Effect>,
}

impl<S> Step<S> {
    pub fn stay(s: S, effects: Vec<Effect>) -> Self {
        Self {
            next: Some(s),
            effects,
        }
    }

    pub fn end(effects: Vec<Effect>) -> Self {
        Self {
            next: None,
            effects,
        }
    }

    pub fn map<T>(self, f: impl FnOnce(S) -> T) -> Step<T> {
        Step {
            next: self.next.map(f),
            effects: self.effects,
        }
    }

    /// An event the state cannot take: keep the state, count and log it.
    pub fn impossible(s: S, what: String) -> Self {
        Self::stay(s, vec![Effect::Impossible(what)])
    }
}

/// What came back for a callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    /// Envoy's answer (`status` None: no answer before its timeout).
    Got(CalloutResponse),
    /// The host refused to dispatch it: it certainly never left.
    NotSent(String),
}

impl Answer {
    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Got(r) => r.status,
            Answer::NotSent(_) => None,
        }
    }

    pub fn is_2xx(&self) -> bool {
        is_2xx(self.status())
    }

    /// For logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Answer::Got(CalloutResponse { status: None, .. }) => "no answer".to_string(),
            Answer::Got(CalloutResponse {
                status: Some(s), ..
            }) => format!("answered {s}"),
            Answer::NotSent(e) => format!("not sent: {e}"),
        }
    }
}

/// Which of an op's callouts an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum OpCall {
    /// The prepare to target `i`.
    Vote(usize),
    /// A sub-coordinator's commit/abort to target `i`.
    Ack(usize),
    /// The one-phase commit to the lone participant.
    Commit,
    /// A decision-record CAS.
    Record,
    /// A status query's read of the decision.
    Read,
}

impl OpCall {
    /// For logs (an unexpected answer).
    pub fn name(self) -> &'static str {
        match self {
            OpCall::Vote(_) => "a prepare",
            OpCall::Ack(_) => "a cascaded commit or abort",
            OpCall::Commit => "a one-phase commit",
            OpCall::Record => "a decision-record write",
            OpCall::Read => "a decision read",
        }
    }
}

/// An op's event.
#[derive(Debug)]
pub(super) enum OpEvent {
    Answer(OpCall, Answer),
    /// Its stage's deadline passed (seen from the tick).
    Expired,
    /// Its stream went away (Envoy cancelled its callouts).
    StreamGone,
}

/// Who an answer is for; kept per callout token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Call {
    /// An op's callout, dispatched from its stream's context.
    Op { ctx: u32, call: OpCall },
    /// Phase 2: commit/abort to a job's target `idx` (from the root context).
    JobTarget { txn: TxnId, idx: usize },
    /// Phase 2: the record a job owes (from the root context).
    JobRecord { txn: TxnId },
    /// The recovery loop's scan of this node's pending commits.
    Recovery,
    /// The grant of a retention lease (one time bucket's).
    Lease { bucket: u64 },
}

/// A change to the process-wide table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TableOp {
    SetPhase(TxnId, Phase),
    /// A sub-coordinator records a child's vote.
    Mark(TxnId, String, Mark),
    Remove(TxnId),
}

/// What a transition asks the engine to do.
#[derive(Debug)]
pub(super) enum Effect {
    /// Send a callout; its answer (or a refused dispatch, as
    /// [`Answer::NotSent`]) comes back to `route`.
    Dispatch {
        call: Callout,
        route: Call,
    },
    /// Fire and forget, from the root context (pending-work puts, deletes).
    Background(Callout),
    /// Answer stream `ctx` with a local reply.
    Reply {
        ctx: u32,
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// Let the root's response, held at `part`, go on with these fields
    /// set in that part.
    Resume {
        ctx: u32,
        part: ResponsePart,
        headers: Vec<(&'static str, String)>,
    },
    /// Still in the callback of the response's `part`: set these fields
    /// in the app's own response.
    MarkResponse(ResponsePart, Vec<(&'static str, String)>),
    Table(TableOp),
    /// Start phase 2 (driven at once, then from the tick).
    StartJob(Box<Job>),
    /// This coordinator's pending-work key for `txn` can go.
    Unpend(TxnId),
    /// Remember the outcome in the recent-outcomes ring.
    Remember(TxnId, Outcome),
    /// `txmesh_txn_total` (outcome None: unknown).
    Count(Option<Outcome>, Cause),
    /// `txmesh_txn_in_flight`.
    InFlight(i64),
    Gauge(Gauge, i64),
    /// A root decided: duration and participant histograms.
    Decided {
        outcome: Outcome,
        duration_ms: u64,
        participants: u64,
    },
    Log(LogLevel, String),
    /// A verified commit or abort of stream `ctx`: cascade it as its
    /// coordinator's would be.
    Finish {
        ctx: u32,
        txn: TxnId,
        outcome: Outcome,
        carried: Vec<Child>,
    },
    /// An event its state cannot take: counted
    /// (`txmesh_txn_internal_errors_total`) and logged; the state is kept.
    Impossible(String),
}

impl Effect {
    /// Sends `call` for stream `ctx`'s operation; the answer comes back as `op`.
    pub fn for_op(ctx: u32, call: Callout, op: OpCall) -> Effect {
        Effect::Dispatch {
            call,
            route: Call::Op { ctx, call: op },
        }
    }
}

pub(super) fn json_reply(ctx: u32, status: u16, body: String) -> Effect {
    Effect::Reply {
        ctx,
        status,
        headers: Vec::new(),
        body: body.into_bytes(),
    }
}

pub(super) fn error_reply(ctx: u32, status: u16, msg: &str) -> Effect {
    json_reply(ctx, status, Obj::new().str("error", msg).build())
}

impl TxnEngine {
    pub(super) fn cx(&self, h: &impl FilterHost) -> Cx<'_> {
        Cx {
            now_ms: h.now_ms(),
            now_us: h.now_us(),
            cfg: &self.cfg,
            node: &self.node,
        }
    }

    /// Steps the op of stream `ctx` (if any) with `ev` and carries out the
    /// effects. The op's callouts are forgotten when it ends or when its
    /// stage expired (their answers are then ignored).
    pub(super) fn step_op(&mut self, h: &impl FilterHost, ctx: u32, ev: OpEvent) {
        let Some(op) = self.ops.remove(&ctx) else {
            return;
        };
        if matches!(ev, OpEvent::Expired | OpEvent::StreamGone) {
            self.forget_calls(ctx);
        }
        let step = op.step(ev, &self.cx(h));
        self.settle_op(h, ctx, step);
    }

    pub(super) fn settle_op(&mut self, h: &impl FilterHost, ctx: u32, step: Step<Op>) {
        match step.next {
            Some(op) => {
                self.ops.insert(ctx, op);
            }
            None => self.forget_calls(ctx),
        }
        self.run(h, step.effects);
    }

    pub(super) fn forget_calls(&mut self, ctx: u32) {
        self.calls
            .retain(|_, c| !matches!(c, Call::Op { ctx: c_ctx, .. } if *c_ctx == ctx));
    }

    /// Carries out effects in order. A dispatch the host refuses comes back
    /// at once to its route as [`Answer::NotSent`].
    pub(super) fn run(&mut self, h: &impl FilterHost, effects: Vec<Effect>) {
        for effect in effects {
            self.apply(h, effect);
        }
    }

    fn apply(&mut self, h: &impl FilterHost, effect: Effect) {
        match effect {
            Effect::Dispatch { call, route } => {
                let sent = match route {
                    Call::Op { .. } => h.dispatch(&call),
                    Call::JobTarget { .. }
                    | Call::JobRecord { .. }
                    | Call::Recovery
                    | Call::Lease { .. } => h.dispatch_in(self.root_ctx, &call),
                };
                match sent {
                    Ok(token) => {
                        self.calls.insert(token, route);
                    }
                    Err(e) => self.deliver(h, route, Answer::NotSent(e.to_string())),
                }
            }
            Effect::Background(call) => {
                let _ = h.dispatch_in(self.root_ctx, &call);
            }
            Effect::Reply {
                ctx,
                status,
                headers,
                body,
            } => {
                let mut hs: Vec<(&str, &str)> = vec![JSON];
                hs.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
                h.send_reply(ctx, status, &hs, &body);
            }
            Effect::Resume { ctx, part, headers } => {
                let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                h.resume_response(ctx, part, &hs);
            }
            Effect::MarkResponse(part, headers) => {
                for (k, v) in &headers {
                    h.set_response_field(part, k, v);
                }
            }
            Effect::Table(op) => match op {
                TableOp::SetPhase(txn, phase) => {
                    let _ = self.table.update(h, &txn, |e| {
                        e.phase = phase;
                        Ok(())
                    });
                }
                TableOp::Mark(txn, cluster, mark) => {
                    let _ = self.table.update(h, &txn, |e| {
                        if let Some(p) = e.participants.iter_mut().find(|(c, _)| *c == cluster) {
                            p.1 = mark;
                        }
                        Ok(())
                    });
                }
                TableOp::Remove(txn) => {
                    self.table.remove(h, &txn);
                }
            },
            Effect::StartJob(job) => self.start_job(h, *job),
            Effect::Unpend(txn) => {
                self.unpend.push(txn);
                if self.unpend.len() >= UNPEND_BATCH {
                    self.flush_unpend(h, h.now_ms());
                }
            }
            Effect::Remember(txn, outcome) => Self::remember(h, &txn, outcome),
            Effect::Count(outcome, cause) => self.count_txn(h, outcome, cause),
            Effect::InFlight(delta) => self.gauge_in_flight(h, delta),
            Effect::Gauge(g, delta) => self.gauge(h, g, delta),
            Effect::Decided {
                outcome,
                duration_ms,
                participants,
            } => self.decided_metrics(h, outcome, duration_ms, participants),
            Effect::Log(level, msg) => h.log(level, &msg),
            Effect::Finish {
                ctx,
                txn,
                outcome,
                carried,
            } => {
                let entry = self.table.get(h, &txn);
                let _ = self.sub_finish(h, ctx, txn, entry, carried, outcome);
            }
            Effect::Impossible(what) => {
                h.log(
                    LogLevel::Error,
                    &format!("txmesh_txn internal error (ignored): {what}"),
                );
                self.gauge(h, Gauge::InternalErrors, 1);
            }
        }
    }

    /// Routes a callout's answer to the state machine it belongs to.
    pub(super) fn deliver(&mut self, h: &impl FilterHost, route: Call, answer: Answer) {
        match route {
            Call::Op { ctx, call } => self.step_op(h, ctx, OpEvent::Answer(call, answer)),
            Call::JobTarget { txn, idx } => {
                self.step_job(h, txn, |job, cx| job.on_target_answer(idx, &answer, cx))
            }
            Call::JobRecord { txn } => {
                self.step_job(h, txn, |job, cx| job.on_record_answer(&answer, cx))
            }
            Call::Recovery => self.recovery_answer(h, answer),
            Call::Lease { bucket } => self.lease_answer(h, bucket, &answer),
        }
    }
}
