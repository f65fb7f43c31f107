//! The sub-coordinator: a sidecar whose app enlisted children. Its
//! coordinator's prepare fans out to the children and its own app (one
//! vote back: any no wins, else commit if anyone must commit); the commit or
//! abort cascades the same way. A leaf's prepare is the same op with its app
//! as the only target. Pure transitions.

use super::effect::{error_reply, json_reply, Answer, Cx, Effect, OpCall, OpEvent, Step, TableOp};
use super::vote::{ask_all, control_call, first_abort, vote_of, Ballot, Target, Vote, NO_ANSWER};
use super::*;

/// A prepare fanned out below this sidecar, for its coordinator's stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct SubPrepare {
    pub ctx: u32,
    pub txn: TxnId,
    pub deadline_ms: u64,
    pub targets: Vec<Target>,
}

impl SubPrepare {
    pub fn start(
        ctx: u32,
        txn: TxnId,
        deadline_ms: u64,
        targets: Vec<Target>,
        cx: &Cx,
    ) -> Step<Self> {
        let mut op = SubPrepare {
            ctx,
            txn,
            deadline_ms,
            targets,
        };
        let effects = ask_all(ctx, &mut op.targets, &txn, deadline_ms, cx);
        op.evaluate(effects)
    }

    pub fn step(mut self, ev: OpEvent, cx: &Cx) -> Step<Self> {
        match ev {
            OpEvent::Answer(OpCall::Vote(i), a) => {
                let Some(t) = self.targets.get_mut(i) else {
                    return Step::impossible(self, format!("a vote from target {i} of none"));
                };
                let vote = vote_of(
                    &a,
                    &t.name,
                    cx.cfg.grpc_app(&t.cluster),
                    self.deadline_ms,
                    cx.now_ms,
                );
                let mark = match &vote {
                    Vote::Commit => Mark::Commit,
                    Vote::ReadOnly => Mark::ReadOnly,
                    Vote::Abort { .. } => Mark::Abort,
                };
                let effect = Effect::Table(TableOp::Mark(self.txn, t.cluster.clone(), mark));
                t.ballot = Ballot::Voted(vote);
                self.evaluate(vec![effect])
            }
            OpEvent::Expired => {
                for t in self.targets.iter_mut().filter(|t| t.vote().is_none()) {
                    t.ballot = Ballot::Voted(Vote::Abort {
                        cause: Cause::Timeout,
                        reason: NO_ANSWER.to_string(),
                        participant: t.name.clone(),
                    });
                }
                self.evaluate(Vec::new())
            }
            // The coordinator's call went away: it retries or aborts.
            OpEvent::StreamGone => Step::end(Vec::new()),
            OpEvent::Answer(
                call @ (OpCall::Ack(_) | OpCall::Commit | OpCall::Record | OpCall::Read),
                _,
            ) => {
                let what = format!(
                    "txn {}: sub-coordinator prepare got an answer to {}",
                    self.txn,
                    call.name()
                );
                Step::impossible(self, what)
            }
        }
    }

    /// One vote back once every vote is in (or at the first no).
    fn evaluate(self, mut effects: Vec<Effect>) -> Step<Self> {
        let body = if let Some((cause, why, participant)) = first_abort(&self.targets) {
            // The decision can only be abort now: this entry is no longer
            // preparing, so it is never resolved in doubt (no abort record
            // for a transaction this sidecar itself refused); it stays for
            // the coordinator's abort, which cascades to any child that is
            // prepared.
            effects.push(Effect::Table(TableOp::SetPhase(self.txn, Phase::Aborted)));
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
        } else if self.targets.iter().any(|t| t.vote().is_none()) {
            return Step::stay(self, effects);
        } else if self.targets.iter().any(Target::voted_commit) {
            Obj::new().str("vote", "commit").build()
        } else {
            // Nobody here holds anything: no phase 2 will come, nothing to
            // resolve — the entry goes (an in-doubt abort of a committed
            // read-only transaction would contradict what its client was told).
            if !seeded::active(Bug::ReadOnlyKeepsEntry) {
                effects.push(Effect::Table(TableOp::Remove(self.txn)));
            }
            Obj::new().str("vote", "readonly").build()
        };
        effects.push(json_reply(self.ctx, 200, body));
        Step::end(effects)
    }
}

/// A participant of a sub-coordinator's cascade.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct AckTarget {
    pub name: String,
    pub cluster: String,
    pub tree: String,
    pub ack: Ack,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Ack {
    Waiting,
    Acked,
    /// Why not (its answer, or none).
    Failed(String),
}

/// A commit or abort cascaded below this sidecar, for its coordinator's stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct SubFinish {
    pub ctx: u32,
    pub txn: TxnId,
    pub outcome: Outcome,
    pub until_ms: u64,
    pub targets: Vec<AckTarget>,
}

impl SubFinish {
    /// `targets`: (name, cluster, call tree) of everyone owed `outcome`.
    pub fn start(
        ctx: u32,
        txn: TxnId,
        outcome: Outcome,
        deadline_ms: u64,
        targets: Vec<(String, String, String)>,
        cx: &Cx,
    ) -> Step<Self> {
        let path = match outcome {
            Outcome::Committed => COMMIT_PATH,
            Outcome::Aborted => ABORT_PATH,
        };
        let timeout = cx.cfg.control_timeout_ms;
        let mut effects = Vec::new();
        let mut acks = Vec::new();
        for (i, (name, cluster, tree)) in targets.into_iter().enumerate() {
            effects.push(Effect::for_op(
                ctx,
                control_call(cx.cfg, &cluster, &tree, path, &txn, deadline_ms, timeout),
                OpCall::Ack(i),
            ));
            acks.push(AckTarget {
                name,
                cluster,
                tree,
                ack: Ack::Waiting,
            });
        }
        let op = SubFinish {
            ctx,
            txn,
            outcome,
            until_ms: cx.now_ms + timeout + TICK_SLACK_MS,
            targets: acks,
        };
        op.evaluate(effects)
    }

    pub fn step(mut self, ev: OpEvent, _cx: &Cx) -> Step<Self> {
        match ev {
            OpEvent::Answer(OpCall::Ack(i), a) => {
                let Some(t) = self.targets.get_mut(i) else {
                    return Step::impossible(
                        self,
                        format!("an acknowledgement from target {i} of none"),
                    );
                };
                t.ack = if a.is_2xx() {
                    Ack::Acked
                } else {
                    Ack::Failed(Answer::describe(&a))
                };
                self.evaluate(Vec::new())
            }
            OpEvent::Expired => {
                for t in self.targets.iter_mut().filter(|t| t.ack == Ack::Waiting) {
                    t.ack = Ack::Failed(NO_ANSWER.to_string());
                }
                self.evaluate(Vec::new())
            }
            OpEvent::StreamGone => Step::end(Vec::new()),
            OpEvent::Answer(
                call @ (OpCall::Vote(_) | OpCall::Commit | OpCall::Record | OpCall::Read),
                _,
            ) => {
                let what = format!(
                    "txn {}: sub-coordinator cascade got an answer to {}",
                    self.txn,
                    call.name()
                );
                Step::impossible(self, what)
            }
        }
    }

    fn evaluate(self, mut effects: Vec<Effect>) -> Step<Self> {
        let mut failed = Vec::new();
        for t in &self.targets {
            match &t.ack {
                Ack::Waiting => return Step::stay(self, effects),
                Ack::Acked => {}
                Ack::Failed(why) => failed.push(format!("{} ({why})", t.name)),
            }
        }
        if failed.is_empty() {
            effects.push(Effect::Table(TableOp::Remove(self.txn)));
            effects.push(json_reply(
                self.ctx,
                200,
                r#"{"acknowledged":true}"#.to_string(),
            ));
        } else {
            let msg = format!("not acknowledged by {}", failed.join(", "));
            effects.push(error_reply(self.ctx, 503, &msg));
        }
        Step::end(effects)
    }
}
