//! The root coordinator: from the app's answer to the decision. It asks
//! every participant to prepare, then — all yes — commits in one phase (a
//! lone participant) or writes the commit record (first write wins) and
//! answers the client; any no, timeout or etcd failure aborts. Pure
//! transitions: (state, event) in, next state and effects out.

use super::effect::{Answer, Cx, Effect, OpCall, OpEvent, Step, TableOp};
use super::phase2::{Job, Participant, Start};
use super::record::{
    cas_answer, pending_record, pending_state, record_call, write_failure, WriteFailure, NO_SPACE,
};
use super::vote::{ask_all, control_call, first_abort, refused_by, vote_of, Ballot, Target, Vote};
use super::*;
use crate::grpc;

/// The root's prepare and decision, for one client stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct RootOp {
    pub ctx: u32,
    pub txn: TxnId,
    pub deadline_ms: u64,
    pub started_ms: u64,
    pub trace: Option<String>,
    pub targets: Vec<Target>,
    pub times: Times,
    pub stage: RootStage,
    /// How the client is answered.
    pub answering: Answering,
}

/// The app's final answer to the request that began a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AppAnswer {
    /// An HTTP answer: its `:status` (None: missing or unreadable).
    Http(Option<u16>),
    /// A gRPC answer: its `grpc-status` (None: missing or unreadable), and
    /// the part of the response that carried it (held there).
    Grpc {
        status: Option<u32>,
        at: ResponsePart,
    },
}

impl AppAnswer {
    /// Why the app's answer aborts the transaction, and how the client
    /// learns it; None: it succeeded.
    fn failure(self) -> Option<(Cause, String, Tell)> {
        match self {
            AppAnswer::Http(status) if is_2xx(status) => None,
            // A 4xx is the client's to fix: it sees the app's own answer.
            AppAnswer::Http(Some(s @ 400..=499)) => {
                Some((Cause::AppError, format!("the app answered {s}"), Tell::Mark))
            }
            AppAnswer::Http(Some(s)) => Some((
                Cause::AppError,
                format!("the app answered {s}"),
                Tell::Reply,
            )),
            AppAnswer::Http(None) => Some((
                Cause::AppError,
                "the app gave no status".to_string(),
                Tell::Reply,
            )),
            AppAnswer::Grpc {
                status: Some(grpc::OK),
                ..
            } => None,
            // The client sees the app's own status, marked aborted.
            AppAnswer::Grpc {
                status: Some(s), ..
            } => Some((
                Cause::GrpcError,
                format!("the app answered grpc-status {s}"),
                Tell::Mark,
            )),
            AppAnswer::Grpc { status: None, .. } => Some((
                Cause::GrpcError,
                "the app's gRPC answer had no grpc-status".to_string(),
                Tell::Reply,
            )),
        }
    }

    fn answering(self) -> Answering {
        match self {
            AppAnswer::Http(_) => Answering::Http,
            AppAnswer::Grpc { at, .. } => Answering::Grpc(at),
        }
    }
}

/// How a root's client learns the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Answering {
    /// HTTP: the app's response, held at its headers, marked with the
    /// outcome; an abort is a local reply (409, or 503) in its place.
    Http,
    /// gRPC: the app's response, held at `part` (its trailers, or the
    /// headers of a trailers-only answer), marked with the outcome; an
    /// abort sets `grpc-status` 10 (ABORTED) there, with a `grpc-message`.
    Grpc(ResponsePart),
}

impl Answering {
    fn part(self) -> ResponsePart {
        match self {
            Answering::Http => ResponsePart::Headers,
            Answering::Grpc(part) => part,
        }
    }
}

/// When each step happened, for the decision log line (µs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(super) struct Times {
    /// The begin (the decision log's `app_us`).
    pub started_us: u64,
    /// The app's answer.
    pub responded_us: u64,
    /// The last vote (ms and µs).
    pub voted_ms: Option<u64>,
    pub voted_us: Option<u64>,
    /// The decision record's last write and etcd's answer (`etcd_us`).
    pub record_sent_us: u64,
    pub record_answered_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum RootStage {
    /// Prepares out; waiting for every vote (until the deadline).
    Voting,
    /// A lone participant voted commit; its commit is in flight.
    OnePhase { until_ms: u64 },
    /// The commit record (with the pending-work key) is being written.
    /// `call` is kept to re-send it when Envoy could not connect.
    WriteCommit {
        until_ms: u64,
        call: Callout,
        retries: u8,
    },
    /// The commit record's write failed; an abort record is being written
    /// to learn the truth. `maybe_applied`: the failed write may have
    /// reached etcd; `cause`: why it failed, for the abort.
    WriteAbort {
        until_ms: u64,
        maybe_applied: bool,
        cause: Cause,
        error: String,
    },
}

impl RootStage {
    pub fn name(&self) -> &'static str {
        match self {
            RootStage::Voting => "Voting",
            RootStage::OnePhase { .. } => "OnePhase",
            RootStage::WriteCommit { .. } => "WriteCommit",
            RootStage::WriteAbort { .. } => "WriteAbort",
        }
    }
}

/// How an aborting root tells its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tell {
    /// A 409 naming the cause and the participant.
    Reply,
    /// The app answered 4xx: let its own answer through, marked aborted.
    Mark,
}

/// What the root's stream knew when the app answered.
pub(super) struct Begun {
    pub ctx: u32,
    pub txn: TxnId,
    pub deadline_ms: u64,
    pub started_ms: u64,
    pub started_us: u64,
    pub trace: Option<String>,
}

impl RootOp {
    /// The app answered: prepare every participant, or abort at once (the
    /// app failed, or the deadline passed) with nobody asked.
    pub fn start(
        b: Begun,
        targets: Vec<Target>,
        answer: AppAnswer,
        cx: &Cx,
    ) -> (Step<RootOp>, Verdict) {
        let mut op = RootOp {
            ctx: b.ctx,
            txn: b.txn,
            deadline_ms: b.deadline_ms,
            started_ms: b.started_ms,
            trace: b.trace,
            targets,
            times: Times {
                started_us: b.started_us,
                responded_us: cx.now_us,
                ..Times::default()
            },
            stage: RootStage::Voting,
            answering: answer.answering(),
        };
        let me = cx.node.to_string();
        if let Some((cause, why, tell)) = answer.failure() {
            // Nobody was asked to prepare: abort everyone, write nothing
            // (presumed abort).
            let verdict = match tell {
                Tell::Mark => Verdict::Continue,
                Tell::Reply => Verdict::Pause,
            };
            return (op.abort(cause, &why, &me, false, tell, cx), verdict);
        }
        if cx.now_ms >= op.deadline_ms {
            let why = "the deadline passed before the app answered";
            return (
                op.abort(Cause::Timeout, why, &me, false, Tell::Reply, cx),
                Verdict::Pause,
            );
        }
        let mut effects = ask_all(op.ctx, &mut op.targets, &op.txn, op.deadline_ms, cx);
        // A target that could not be asked has voted already.
        let mut step = op.evaluate(cx);
        effects.append(&mut step.effects);
        step.effects = effects;
        (step, Verdict::Pause)
    }

    pub fn until_ms(&self) -> u64 {
        match &self.stage {
            RootStage::Voting => self.deadline_ms,
            RootStage::OnePhase { until_ms }
            | RootStage::WriteCommit { until_ms, .. }
            | RootStage::WriteAbort { until_ms, .. } => *until_ms,
        }
    }

    pub fn step(mut self, ev: OpEvent, cx: &Cx) -> Step<RootOp> {
        let no_answer = || Answer::Got(CalloutResponse::default());
        match (&self.stage, ev) {
            (RootStage::Voting, OpEvent::Answer(OpCall::Vote(i), a)) => {
                let Some(t) = self.targets.get_mut(i) else {
                    return Step::impossible(self, format!("a vote from target {i} of none"));
                };
                t.ballot = Ballot::Voted(vote_of(
                    &a,
                    &t.name,
                    cx.cfg.grpc_app(&t.cluster),
                    self.deadline_ms,
                    cx.now_ms,
                ));
                self.evaluate(cx)
            }
            (RootStage::Voting, OpEvent::Expired) => {
                for t in self.targets.iter_mut() {
                    if matches!(t.ballot, Ballot::Asked | Ballot::NotAsked) {
                        t.ballot = Ballot::Voted(Vote::Abort {
                            cause: Cause::Timeout,
                            reason: vote::NO_ANSWER.to_string(),
                            participant: t.name.clone(),
                        });
                    }
                }
                self.evaluate(cx)
            }
            (RootStage::Voting, OpEvent::StreamGone) => {
                let txn = self.txn;
                let mut effects = vec![
                    Effect::Log(
                        LogLevel::Warn,
                        format!("txn {txn}: client went away during prepare; aborting"),
                    ),
                    Effect::Table(TableOp::SetPhase(txn, Phase::Aborted)),
                    Effect::Count(Some(Outcome::Aborted), Cause::ClientGone),
                    Effect::InFlight(-1),
                    Effect::Remember(txn, Outcome::Aborted),
                ];
                let start = Start::Deliver {
                    outcome: Outcome::Aborted,
                    write_record: true,
                };
                effects.push(self.job(start, Cause::ClientGone, cx));
                Step::end(effects)
            }
            (RootStage::OnePhase { .. }, OpEvent::Answer(OpCall::Commit, a)) => {
                if a.is_2xx() {
                    self.committed(false, cx)
                } else {
                    // The commit may or may not have landed: make the
                    // decision durable and let phase 2 retry it.
                    self.write_record(cx)
                }
            }
            (RootStage::OnePhase { .. }, OpEvent::Expired) => self.write_record(cx),
            (RootStage::OnePhase { .. }, OpEvent::StreamGone) => {
                // The lone participant voted commit and its commit is out:
                // record commit and keep sending it.
                let start = Start::Deliver {
                    outcome: Outcome::Committed,
                    write_record: true,
                };
                Step::end(vec![Effect::InFlight(-1), self.job(start, Cause::Ok, cx)])
            }
            (RootStage::WriteCommit { .. }, OpEvent::Answer(OpCall::Record, a)) => {
                self.commit_record_answer(a, cx)
            }
            (RootStage::WriteCommit { .. }, OpEvent::Expired) => {
                self.commit_record_answer(no_answer(), cx)
            }
            (RootStage::WriteAbort { .. }, OpEvent::Answer(OpCall::Record, a)) => {
                self.abort_record_answer(a, cx)
            }
            (RootStage::WriteAbort { .. }, OpEvent::Expired) => {
                self.abort_record_answer(no_answer(), cx)
            }
            (RootStage::WriteCommit { .. } | RootStage::WriteAbort { .. }, OpEvent::StreamGone) => {
                let effects = vec![
                    Effect::Log(
                        LogLevel::Warn,
                        format!("txn {}: client went away while the decision was being written; resolving from etcd", self.txn),
                    ),
                    Effect::InFlight(-1),
                    self.job(Start::Resolve, Cause::Unknown, cx),
                    Effect::Gauge(Gauge::InDoubt, 1),
                ];
                Step::end(effects)
            }
            (
                stage @ (RootStage::Voting
                | RootStage::OnePhase { .. }
                | RootStage::WriteCommit { .. }
                | RootStage::WriteAbort { .. }),
                OpEvent::Answer(call, _),
            ) => {
                let what = format!(
                    "txn {}: root in {} got an answer to {}",
                    self.txn,
                    stage.name(),
                    call.name()
                );
                Step::impossible(self, what)
            }
        }
    }

    /// Decides what the votes so far decide.
    fn evaluate(mut self, cx: &Cx) -> Step<RootOp> {
        if let Some((cause, why, participant)) = first_abort(&self.targets) {
            return self.abort(cause, &why, &participant, true, Tell::Reply, cx);
        }
        let first_yes =
            seeded::active(Bug::FirstVoteDecides) && self.targets.iter().any(Target::voted_commit);
        if self.targets.iter().any(|t| t.vote().is_none()) && !first_yes {
            return Step::stay(self, Vec::new());
        }
        self.times.voted_ms = Some(cx.now_ms);
        self.times.voted_us = Some(cx.now_us);
        let commits = self.targets.iter().filter(|t| t.voted_commit()).count();
        if commits == 0 {
            // Everyone read-only: committed, nothing to do in phase 2.
            self.committed(false, cx)
        } else if self.targets.len() == 1 {
            self.one_phase(cx)
        } else if seeded::active(Bug::CommitBeforeRecord) {
            self.committed(true, cx)
        } else {
            self.write_record(cx)
        }
    }

    fn one_phase(mut self, cx: &Cx) -> Step<RootOp> {
        let Some(t) = self.targets.first() else {
            return Step::impossible(self, "one-phase commit with no participant".to_string());
        };
        let call = control_call(
            cx.cfg,
            &t.cluster,
            &t.tree,
            COMMIT_PATH,
            &self.txn,
            self.deadline_ms,
            cx.cfg.control_timeout_ms,
        );
        self.stage = RootStage::OnePhase {
            until_ms: cx.now_ms + cx.cfg.control_timeout_ms + TICK_SLACK_MS,
        };
        let effect = Effect::for_op(self.ctx, call, OpCall::Commit);
        Step::stay(self, vec![effect])
    }

    fn decision(&self, outcome: Outcome, cause: Cause, cx: &Cx) -> Decision {
        Decision {
            txn: self.txn,
            outcome,
            participants: self.targets.iter().map(|t| t.name.clone()).collect(),
            coordinator: cx.node.to_string(),
            time_ms: cx.now_ms,
            reason: cause.as_str().to_string(),
            trace: self.trace.clone().unwrap_or_default(),
            begun_ms: self.started_ms,
            refused_by: refused_by(self.targets.iter().map(Target::vote)),
        }
    }

    /// Writes the commit record (first write wins) before any commit is sent.
    fn write_record(mut self, cx: &Cx) -> Step<RootOp> {
        let d = self.decision(Outcome::Committed, Cause::Ok, cx);
        let parts = self
            .targets
            .iter()
            .map(|t| (&t.name, &t.cluster, pending_state(t.vote(), false), &t.tree));
        let pending = pending_record(cx.node, &self.txn, cx.now_ms, self.deadline_ms, parts);
        let call = record_call(cx.cfg, &d, Some(pending));
        self.stage = RootStage::WriteCommit {
            until_ms: cx.etcd_deadline(),
            call: call.clone(),
            retries: 0,
        };
        self.times.record_sent_us = cx.now_us;
        let route = self.route(OpCall::Record);
        Step::stay(self, vec![Effect::Dispatch { call, route }])
    }

    fn route(&self, call: OpCall) -> Call {
        Call::Op {
            ctx: self.ctx,
            call,
        }
    }

    fn commit_record_answer(mut self, a: Answer, cx: &Cx) -> Step<RootOp> {
        self.times.record_answered_us = cx.now_us;
        let error = match cas_answer(&a) {
            Ok(CasResult::Created) => return self.committed(true, cx),
            Ok(CasResult::Exists(v)) => return self.obey(&v, cx),
            Err(error) => error,
        };
        // Envoy could not connect: nothing reached etcd, so the same write
        // can go again (to another member, if one answers).
        let failure = write_failure(&a);
        if let RootStage::WriteCommit { call, retries, .. } = &mut self.stage {
            if failure == WriteFailure::NotSent && *retries < RECORD_RETRIES {
                *retries += 1;
                let call = call.clone();
                self.times.record_sent_us = cx.now_us;
                let route = self.route(OpCall::Record);
                return Step::stay(self, vec![Effect::Dispatch { call, route }]);
            }
        }
        // Learn the truth with an abort record: it wins if ours never landed.
        let cause = match failure {
            WriteFailure::NoSpace => Cause::EtcdNoSpace,
            WriteFailure::NotSent | WriteFailure::Unknown => Cause::EtcdUnavailable,
        };
        let d = self.decision(Outcome::Aborted, cause, cx);
        self.stage = RootStage::WriteAbort {
            until_ms: cx.etcd_deadline(),
            maybe_applied: failure == WriteFailure::Unknown,
            cause,
            error,
        };
        let call = record_call(cx.cfg, &d, None);
        let route = self.route(OpCall::Record);
        Step::stay(self, vec![Effect::Dispatch { call, route }])
    }

    fn abort_record_answer(self, a: Answer, cx: &Cx) -> Step<RootOp> {
        let RootStage::WriteAbort {
            maybe_applied,
            cause,
            error,
            ..
        } = &self.stage
        else {
            let what = format!(
                "txn {}: abort record answered in {}",
                self.txn,
                self.stage.name()
            );
            return Step::impossible(self, what);
        };
        let (maybe_applied, cause, error) = (*maybe_applied, *cause, error.clone());
        let me = cx.node.to_string();
        let unavailable = if cause == Cause::EtcdNoSpace {
            NO_SPACE
        } else {
            "etcd unavailable"
        };
        match cas_answer(&a) {
            Ok(CasResult::Created) => {
                let why = format!("the commit record could not be written ({error})");
                self.abort(cause, &why, &me, false, Tell::Reply, cx)
            }
            Ok(CasResult::Exists(v)) => self.obey(&v, cx),
            Err(_) if !maybe_applied => {
                // Nothing reached etcd: presumed abort is safe. The abort
                // record is written later, from the tick, once etcd is back.
                let why = format!("{unavailable}, no decision could be recorded ({error})");
                self.abort(cause, &why, &me, true, Tell::Reply, cx)
            }
            Err(e) => {
                // The commit record may have landed: the outcome is unknown
                // until etcd answers. Tell the client so, and resolve from the tick.
                let msg = format!(
                    "transaction outcome unknown: etcd did not confirm the decision ({error}; {e}); it will be resolved when etcd is reachable"
                );
                let tell = match self.answering {
                    Answering::Http => {
                        let body = Obj::new()
                            .str("txn", &self.txn.to_string())
                            .str("outcome", "unknown")
                            .str("error", &msg)
                            .build();
                        effect::json_reply(self.ctx, 503, body)
                    }
                    // UNKNOWN, not UNAVAILABLE: a client must not retry a
                    // transaction that may have committed.
                    Answering::Grpc(part) => Effect::Resume {
                        ctx: self.ctx,
                        part,
                        headers: vec![
                            (grpc::STATUS, grpc::UNKNOWN.to_string()),
                            (grpc::MESSAGE, grpc::encode_message(&msg)),
                            (id::TXN_HEADER, self.txn.to_string()),
                        ],
                    },
                };
                Step::end(vec![
                    Effect::Log(LogLevel::Error, format!("txn {} in doubt: {msg}", self.txn)),
                    tell,
                    Effect::Gauge(Gauge::InDoubt, 1),
                    Effect::InFlight(-1),
                    Effect::Count(None, Cause::Unknown),
                    self.job(Start::Resolve, Cause::Unknown, cx),
                ])
            }
        }
    }

    /// Obeys a decision found in etcd.
    fn obey(self, value: &[u8], cx: &Cx) -> Step<RootOp> {
        match etcd::outcome_of(value) {
            Some(Outcome::Committed) => self.committed(true, cx),
            _ if seeded::active(Bug::ObeyIgnoresAbort) => self.committed(true, cx),
            Some(Outcome::Aborted) | None => {
                let me = cx.node.to_string();
                let why = "an abort decision was already recorded in etcd (in-doubt resolution)";
                self.abort(Cause::DecidedElsewhere, why, &me, false, Tell::Reply, cx)
            }
        }
    }

    fn outcome_headers(&self, outcome: Outcome) -> Vec<(&'static str, String)> {
        vec![
            (id::OUTCOME_HEADER, outcome.as_str().to_string()),
            (id::TXN_HEADER, self.txn.to_string()),
        ]
    }

    /// The effects every decision has: the table, metrics, the log line,
    /// the recent-outcomes ring.
    fn decided(&self, outcome: Outcome, cause: Cause, why: &str, by: &str, cx: &Cx) -> Vec<Effect> {
        vec![
            Effect::Count(Some(outcome), cause),
            Effect::InFlight(-1),
            Effect::Decided {
                outcome,
                duration_ms: cx.now_ms.saturating_sub(self.started_ms),
                participants: self.targets.len() as u64,
            },
            Effect::Log(
                LogLevel::Info,
                self.decision_line(outcome, cause, why, by, cx),
            ),
            Effect::Remember(self.txn, outcome),
        ]
    }

    fn committed(self, phase2: bool, cx: &Cx) -> Step<RootOp> {
        let mut effects = vec![
            Effect::Table(TableOp::SetPhase(self.txn, Phase::Committed)),
            Effect::Resume {
                ctx: self.ctx,
                part: self.answering.part(),
                headers: self.outcome_headers(Outcome::Committed),
            },
        ];
        effects.extend(self.decided(Outcome::Committed, Cause::Ok, "", "", cx));
        effects.push(if phase2 {
            let start = Start::Deliver {
                outcome: Outcome::Committed,
                write_record: false,
            };
            self.job(start, Cause::Ok, cx)
        } else {
            Effect::Table(TableOp::Remove(self.txn))
        });
        Step::end(effects)
    }

    /// Aborts; `owe_record`: write an abort record if anyone may hold a
    /// prepared state.
    fn abort(
        self,
        cause: Cause,
        why: &str,
        participant: &str,
        owe_record: bool,
        tell: Tell,
        cx: &Cx,
    ) -> Step<RootOp> {
        let mut effects = vec![Effect::Table(TableOp::SetPhase(self.txn, Phase::Aborted))];
        let mut headers = self.outcome_headers(Outcome::Aborted);
        let who = split_pinned(participant).0;
        effects.push(match (tell, self.answering) {
            // Still in the callback of the part that decided: mark the
            // app's own answer and let it pass.
            (Tell::Mark, answering) => Effect::MarkResponse(answering.part(), headers),
            (Tell::Reply, Answering::Http) => Effect::Reply {
                ctx: self.ctx,
                status: cause.abort_status(),
                headers,
                body: Obj::new()
                    .str("txn", &self.txn.to_string())
                    .str("outcome", "aborted")
                    .str("reason", why)
                    .str("participant", who)
                    .build()
                    .into_bytes(),
            },
            (Tell::Reply, Answering::Grpc(part)) => {
                let msg = format!("transaction aborted by {who}: {why}");
                headers.push((grpc::STATUS, grpc::ABORTED.to_string()));
                headers.push((grpc::MESSAGE, grpc::encode_message(&msg)));
                Effect::Resume {
                    ctx: self.ctx,
                    part,
                    headers,
                }
            }
        });
        effects.extend(self.decided(Outcome::Aborted, cause, why, participant, cx));
        let someone_prepared = self
            .targets
            .iter()
            .any(|t| t.voted_commit() || t.ballot == Ballot::Asked);
        let start = Start::Deliver {
            outcome: Outcome::Aborted,
            write_record: owe_record && someone_prepared,
        };
        effects.push(self.job(start, cause, cx));
        Step::end(effects)
    }

    /// Phase 2 for this transaction's participants.
    fn job(&self, start: Start, cause: Cause, cx: &Cx) -> Effect {
        let parts = self
            .targets
            .iter()
            .map(|t| Participant {
                name: t.name.clone(),
                cluster: t.cluster.clone(),
                tree: t.tree.clone(),
                vote: t.vote().cloned(),
            })
            .collect();
        let trace = self.trace.clone().unwrap_or_default();
        let mut job = Job::new(self.txn, parts, self.deadline_ms, trace, start, cause, cx);
        job.begun_ms = self.started_ms;
        Effect::StartJob(Box::new(job))
    }

    /// The decision log line: who voted what, and where the time went.
    fn decision_line(
        &self,
        outcome: Outcome,
        cause: Cause,
        why: &str,
        by: &str,
        cx: &Cx,
    ) -> String {
        let now = cx.now_ms;
        let votes: Vec<String> = self
            .targets
            .iter()
            .map(|t| {
                let v = match &t.ballot {
                    Ballot::Voted(Vote::Commit) => "commit",
                    Ballot::Voted(Vote::ReadOnly) => "readonly",
                    Ballot::Voted(Vote::Abort { .. }) => "abort",
                    Ballot::Asked => "pending",
                    Ballot::NotAsked => "none",
                };
                format!("{}:{v}", t.name)
            })
            .collect();
        let times = &self.times;
        let prepare_ms = times.voted_ms.map_or("-".to_string(), |v| {
            v.saturating_sub(self.started_ms).to_string()
        });
        let decide_ms = times
            .voted_ms
            .map_or("-".to_string(), |v| now.saturating_sub(v).to_string());
        let mut line = format!(
            "txn {} {} reason={} trace={} participants={} prepare_ms={prepare_ms} decide_ms={decide_ms} total_ms={}",
            self.txn,
            outcome.as_str(),
            cause.as_str(),
            self.trace.as_deref().unwrap_or("-"),
            votes.join(","),
            now.saturating_sub(self.started_ms),
        );
        // The app's work (begin to its answer, downstream calls included),
        // the prepare round (its answer to the last vote) and the decision
        // (the last vote to now: the record write and the answer), in µs:
        // where a transaction's added latency goes.
        if let Some(v) = times.voted_us.filter(|_| times.responded_us > 0) {
            if times.started_us > 0 {
                let app = times.responded_us.saturating_sub(times.started_us);
                line.push_str(&format!(" app_us={app}"));
            }
            line.push_str(&format!(
                " prepare_us={} record_us={}",
                v.saturating_sub(times.responded_us),
                cx.now_us.saturating_sub(v)
            ));
            // Of the record step, etcd's round trip as the filter saw it
            // (the write dispatched to its answer's callback).
            if times.record_sent_us > 0 && times.record_answered_us >= times.record_sent_us {
                line.push_str(&format!(
                    " etcd_us={}",
                    times.record_answered_us - times.record_sent_us
                ));
            }
        }
        if !why.is_empty() {
            line.push_str(&format!(" why=\"{why}\" by={by}"));
        }
        line
    }
}
