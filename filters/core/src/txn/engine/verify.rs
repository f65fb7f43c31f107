//! A commit or abort from an identity that is not the participant's
//! coordinator (not among the mTLS identities that called its app inside the
//! transaction, or none known after a restart): taken only if etcd holds the
//! same decision, else refused with 403. Pure transitions.

use super::effect::{error_reply, Cx, Effect, OpCall, OpEvent, Step};
use super::record::{decision_read, etcd_call};
use super::*;

/// Checking a control call's outcome against the recorded decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Verify {
    pub ctx: u32,
    pub txn: TxnId,
    pub outcome: Outcome,
    /// The caller's identity ("" if it showed none), for the refusal.
    pub peer: String,
    /// The call tree it carried, passed on if the decision agrees.
    pub carried: Vec<Child>,
    /// Whether this sidecar knows the participant's coordinators (then any
    /// other identity is refused unless the decision agrees).
    pub known_coordinators: bool,
    pub until_ms: u64,
}

impl Verify {
    pub fn start(
        ctx: u32,
        txn: TxnId,
        outcome: Outcome,
        peer: String,
        carried: Vec<Child>,
        known_coordinators: bool,
        cx: &Cx,
    ) -> Step<Self> {
        let call = etcd_call(
            cx.cfg,
            "/v3/kv/range",
            etcd::range_body(&etcd::decision_key(&txn)),
        );
        let op = Verify {
            ctx,
            txn,
            outcome,
            peer,
            carried,
            known_coordinators,
            until_ms: cx.etcd_deadline(),
        };
        Step::stay(op, vec![Effect::for_op(ctx, call, OpCall::Read)])
    }

    pub fn step(self, ev: OpEvent, _cx: &Cx) -> Step<Self> {
        match ev {
            OpEvent::Answer(OpCall::Read, a) => match decision_read(&a) {
                Ok(Some(v)) if etcd::outcome_of(&v) == Some(self.outcome) => {
                    Step::end(vec![Effect::Finish {
                        ctx: self.ctx,
                        txn: self.txn,
                        outcome: self.outcome,
                        carried: self.carried,
                    }])
                }
                // No decision, and nobody known here to ask for an abort:
                // acknowledged, the app untouched. Nobody can be prepared for
                // a decided abort without its record (the root writes one
                // whenever anyone may be), and an app's unprepared work goes
                // at its deadline.
                Ok(None) if self.outcome == Outcome::Aborted && !self.known_coordinators => {
                    Step::end(vec![effect::json_reply(
                        self.ctx,
                        200,
                        r#"{"acknowledged":true,"applied":false}"#.to_string(),
                    )])
                }
                Ok(_) => self.refuse(),
                Err(e) => Step::end(vec![error_reply(
                    self.ctx,
                    503,
                    &format!("cannot check the decision: etcd unreachable: {e}"),
                )]),
            },
            OpEvent::Expired => Step::end(vec![error_reply(
                self.ctx,
                503,
                "cannot check the decision: etcd unreachable: no answer",
            )]),
            OpEvent::StreamGone => Step::end(Vec::new()),
            OpEvent::Answer(
                call @ (OpCall::Vote(_) | OpCall::Ack(_) | OpCall::Commit | OpCall::Record),
                _,
            ) => {
                let what = format!(
                    "txn {}: verification got an answer to {}",
                    self.txn,
                    call.name()
                );
                Step::impossible(self, what)
            }
        }
    }

    fn refuse(self) -> Step<Self> {
        let what = match self.outcome {
            Outcome::Committed => "commit",
            Outcome::Aborted => "abort",
        };
        let peer = if self.peer.is_empty() {
            "a caller without a mesh identity"
        } else {
            &self.peer
        };
        let msg = format!(
            "{peer} may not {what} transaction {}: it is not this participant's coordinator and etcd holds no such decision",
            self.txn
        );
        Step::end(vec![
            Effect::Log(LogLevel::Warn, format!("txn {}: refused: {msg}", self.txn)),
            Effect::Reply {
                ctx: self.ctx,
                status: 403,
                headers: Vec::new(),
                body: Obj::new()
                    .str("error", &msg)
                    .str("principal", &self.peer)
                    .build()
                    .into_bytes(),
            },
        ])
    }
}
