//! The status endpoint (`GET /txmesh/txns/<id>`), the listing
//! (`GET /txmesh/txns`) and the recent-outcomes ring behind them.

use super::effect::{error_reply, json_reply, Cx, Effect, OpCall, OpEvent, Step};
use super::record::{cas_answer, decision_read, outcome_name, record_call};
use super::*;

/// A status query that needs etcd.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum StatusOp {
    /// Reading the decision. `resolve`: past deadline + grace, CAS-abort if
    /// there is none; else answer `miss`.
    Reading {
        ctx: u32,
        txn: TxnId,
        resolve: bool,
        miss: &'static str,
        until_ms: u64,
    },
    /// CAS-writing an abort for an in-doubt transaction someone asked about.
    Resolving { ctx: u32, txn: TxnId, until_ms: u64 },
}

fn status_body(txn: &TxnId, outcome: &str) -> String {
    Obj::new()
        .str("txn", &txn.to_string())
        .str("outcome", outcome)
        .build()
}

impl StatusOp {
    pub fn until_ms(&self) -> u64 {
        match self {
            StatusOp::Reading { until_ms, .. } | StatusOp::Resolving { until_ms, .. } => *until_ms,
        }
    }

    pub fn step(self, ev: OpEvent, cx: &Cx) -> Step<Self> {
        let unreachable =
            |ctx: u32, e: &str| error_reply(ctx, 503, &format!("etcd unreachable: {e}"));
        match (self, ev) {
            (
                StatusOp::Reading {
                    ctx,
                    txn,
                    resolve,
                    miss,
                    ..
                },
                OpEvent::Answer(OpCall::Read, a),
            ) => {
                match decision_read(&a) {
                    Ok(Some(v)) => Step::end(vec![json_reply(ctx, 200, status_body(&txn, outcome_name(&v)))]),
                    Ok(None) if resolve => {
                        // In doubt past deadline + grace: abort it, first write wins.
                        let d = Decision {
                            txn,
                            outcome: Outcome::Aborted,
                            participants: Vec::new(),
                            coordinator: cx.node.to_string(),
                            time_ms: cx.now_ms,
                            reason: "in_doubt".to_string(),
                            trace: String::new(),
                            begun_ms: 0,
                            refused_by: None,
                        };
                        let call = record_call(cx.cfg, &d, None);
                        let next = StatusOp::Resolving {
                            ctx,
                            txn,
                            until_ms: cx.etcd_deadline(),
                        };
                        Step::stay(next, vec![Effect::for_op(ctx, call, OpCall::Record)])
                    }
                    Ok(None) => Step::end(vec![json_reply(ctx, 200, status_body(&txn, miss))]),
                    Err(e) => Step::end(vec![unreachable(ctx, &e)]),
                }
            }
            (StatusOp::Resolving { ctx, txn, .. }, OpEvent::Answer(OpCall::Record, a)) => {
                match cas_answer(&a) {
                    Ok(CasResult::Created) => Step::end(vec![
                        Effect::Log(
                            LogLevel::Warn,
                            format!("txn {txn}: in doubt past its deadline with no decision; recorded abort (asked by a participant)"),
                        ),
                        json_reply(ctx, 200, status_body(&txn, "aborted")),
                    ]),
                    Ok(CasResult::Exists(v)) => {
                        Step::end(vec![json_reply(ctx, 200, status_body(&txn, outcome_name(&v)))])
                    }
                    Err(e) => Step::end(vec![unreachable(ctx, &e)]),
                }
            }
            (StatusOp::Reading { ctx, .. } | StatusOp::Resolving { ctx, .. }, OpEvent::Expired) => {
                Step::end(vec![unreachable(ctx, "no answer")])
            }
            (StatusOp::Reading { .. } | StatusOp::Resolving { .. }, OpEvent::StreamGone) => {
                Step::end(Vec::new())
            }
            (
                op @ (StatusOp::Reading { .. } | StatusOp::Resolving { .. }),
                OpEvent::Answer(call, _),
            ) => Step::impossible(op, format!("status query got an answer to {}", call.name())),
        }
    }
}

impl TxnEngine {
    pub(super) fn status(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        txn: TxnId,
    ) -> (Stream, Verdict) {
        let now = h.now_ms();
        let grace = self.cfg.in_doubt_grace_ms;
        let entry = self.table.get(h, &txn);
        let local = match &entry {
            Some(e) => match e.phase {
                Phase::Committed => Some("committed"),
                Phase::Aborted => Some("aborted"),
                // Root: undecided while its own coordinator works on it —
                // whatever the time: the root decides (a record, or its
                // abort); resolving under it could abort a one-phase commit
                // already on its way to the app.
                Phase::Active | Phase::Preparing
                    if e.role == Role::Root
                        && (!seeded::active(Bug::ResolveUnderRoot)
                            || now < e.deadline_ms.saturating_add(grace)) =>
                {
                    Some("active")
                }
                Phase::Active if now < e.deadline_ms => Some("active"),
                // A participant that may be prepared: the decision may
                // already be in etcd; ask it (and resolve past deadline + grace).
                _ => None,
            },
            None => self.recent(h, &txn).map(Outcome::as_str),
        };
        if let Some(outcome) = local {
            h.send_reply(ctx, 200, &[JSON], status_body(&txn, outcome).as_bytes());
            return (Stream::Pass, Verdict::Pause);
        }
        // The deadline, if anyone knows it: our table, or the id itself —
        // never the caller (a past x-txmesh-deadline must not let anyone
        // abort a live transaction).
        let deadline = entry
            .as_ref()
            .map(|e| e.deadline_ms)
            .or_else(|| txn.deadline_ms());
        let deadline = if seeded::active(Bug::StatusTrustsCaller) {
            h.request_header(id::DEADLINE_HEADER)
                .and_then(|v| id::parse_deadline(&v).ok())
                .or(deadline)
        } else {
            deadline
        };
        let resolve = deadline.is_some_and(|d| now >= d.saturating_add(grace));
        let miss = if entry.is_some() { "active" } else { "unknown" };
        let call = record::etcd_call(
            &self.cfg,
            "/v3/kv/range",
            etcd::range_body(&etcd::decision_key(&txn)),
        );
        let op = StatusOp::Reading {
            ctx,
            txn,
            resolve,
            miss,
            until_ms: now + self.cfg.etcd_timeout_ms + TICK_SLACK_MS,
        };
        let step = Step::stay(
            Op::Status(op),
            vec![Effect::for_op(ctx, call, OpCall::Read)],
        );
        self.settle_op(h, ctx, step);
        (Stream::Owned, Verdict::Pause)
    }

    /// `GET /txmesh/txns?state=in-doubt|active|all`: what this sidecar's table holds.
    pub(super) fn listing(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        path: &[u8],
    ) -> (Stream, Verdict) {
        let query = path.splitn(2, |&b| b == b'?').nth(1).unwrap_or_default();
        let mut state: &[u8] = b"all";
        for pair in query.split(|&b| b == b'&') {
            if let Some(v) = pair.strip_prefix(b"state=") {
                state = v;
            }
        }
        if !matches!(state, b"all" | b"active" | b"in-doubt" | b"stuck") {
            return self.reject(
                h,
                ctx,
                400,
                "state must be one of in-doubt, stuck, active, all",
            );
        }
        let now = h.now_ms();
        // Past the deadline, the grace and the phase-2 give-up time, and
        // still here: phase 2 or in-doubt resolution is stuck (still retrying).
        let stuck_after = self
            .cfg
            .in_doubt_grace_ms
            .saturating_add(self.cfg.phase2_give_up_ms);
        let mut items = Vec::new();
        for e in self.table.all(h) {
            let in_doubt = match e.phase {
                Phase::Active | Phase::Preparing => now > e.deadline_ms,
                // Decided here, phase 2 not yet acknowledged by everyone.
                Phase::Committed | Phase::Aborted => true,
            };
            let stuck = in_doubt && now > e.deadline_ms.saturating_add(stuck_after);
            let keep = match state {
                b"in-doubt" => in_doubt,
                b"stuck" => stuck,
                b"active" => !in_doubt,
                _ => true,
            };
            if !keep {
                continue;
            }
            let role = match e.role {
                Role::Root => "root",
                Role::Sub => "sub",
                Role::Participant => "participant",
            };
            let participants: Vec<String> = e.participants.iter().map(|(c, _)| c.clone()).collect();
            items.push(
                Obj::new()
                    .str("txn", &e.txn.to_string())
                    .str("role", role)
                    .str("phase", e.phase.as_str())
                    .bool("in_doubt", in_doubt)
                    .bool("stuck", stuck)
                    .num("deadline_ms", e.deadline_ms)
                    .strs("participants", &participants)
                    .build(),
            );
        }
        let body = Obj::new()
            .str("node", &self.node)
            .raw("txns", &format!("[{}]", items.join(",")))
            .build();
        h.send_reply(ctx, 200, &[JSON], body.as_bytes());
        (Stream::Pass, Verdict::Pause)
    }

    pub(super) fn recent_key(txn: &TxnId) -> String {
        format!("txmesh.txn.r.{}", txn.hashes().0 % RECENT_SLOTS)
    }

    pub(super) fn remember(h: &impl FilterHost, txn: &TxnId, outcome: Outcome) {
        let v = format!("{txn} {}", outcome.as_str());
        let _ = h.shared_set(&Self::recent_key(txn), v.as_bytes(), None);
    }

    pub(super) fn recent(&self, h: &impl FilterHost, txn: &TxnId) -> Option<Outcome> {
        let v = h.shared_get(&Self::recent_key(txn)).0?;
        let s = std::str::from_utf8(&v).ok()?;
        let (id, outcome) = s.split_once(' ')?;
        (id == txn.to_string()).then(|| Outcome::parse(outcome))?
    }
}
