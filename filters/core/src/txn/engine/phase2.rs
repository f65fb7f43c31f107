//! Phase 2: jobs that outlive the client's stream — commit or abort sent
//! to every participant until acknowledged, a decision record still owed,
//! an unknown outcome resolved from etcd — and the batched deletes of
//! finished transactions' pending-work keys. A job is driven from the root
//! context's tick; its transitions are pure.

use super::effect::{Answer, Cx, Effect, Step, TableOp};
use super::record::{cas_answer, etcd_call, pending_record, pending_state, record_call};
use super::vote::{control_call, Vote};
use super::*;

/// One send that is retried with backoff until it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Send {
    /// To (re)send at `at_ms`; `attempts` failed so far.
    Due {
        at_ms: u64,
        attempts: u32,
    },
    InFlight {
        attempts: u32,
    },
}

impl Send {
    fn now() -> Self {
        Send::Due {
            at_ms: 0,
            attempts: 0,
        }
    }

    fn due(&self, now: u64) -> Option<u32> {
        match *self {
            Send::Due { at_ms, attempts } if now >= at_ms => Some(attempts),
            Send::Due { .. } | Send::InFlight { .. } => None,
        }
    }

    fn attempts(&self) -> u32 {
        match *self {
            Send::Due { attempts, .. } | Send::InFlight { attempts } => attempts,
        }
    }

    /// It failed: again after a backoff.
    fn failed(&self, now: u64) -> Self {
        let attempts = self.attempts() + 1;
        Send::Due {
            at_ms: now + backoff_ms(attempts),
            attempts,
        }
    }
}

fn backoff_ms(attempts: u32) -> u64 {
    (100u64 << attempts.min(5)).min(2_000)
}

/// What a job has to do about the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Duty {
    /// The outcome is unknown: CAS-write abort, then deliver what etcd holds.
    Resolve(Send),
    /// Deliver `outcome`. `record`: a record still to write (a commit is
    /// sent only once its record is durable; aborts go out meanwhile).
    Deliver {
        outcome: Outcome,
        record: Option<Send>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Delivery {
    Owed(Send),
    Acked,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct JobTarget {
    pub name: String,
    pub cluster: String,
    /// Its call tree (sent with the commit or abort).
    pub tree: String,
    /// Its vote, if known (decides what it is owed).
    pub vote: Option<Vote>,
    pub delivery: Delivery,
}

/// A participant handed to phase 2.
pub(super) struct Participant {
    pub name: String,
    pub cluster: String,
    pub tree: String,
    pub vote: Option<Vote>,
}

/// How a job begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    Resolve,
    Deliver {
        outcome: Outcome,
        write_record: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Job {
    pub txn: TxnId,
    pub duty: Duty,
    pub targets: Vec<JobTarget>,
    pub deadline_ms: u64,
    pub give_up_ms: u64,
    pub cause: Cause,
    /// W3C trace id of the beginning request (empty: none).
    pub trace: String,
    /// When the root began the transaction (0: unknown here), for the record.
    pub begun_ms: u64,
    /// Delete this coordinator's pending-work key in etcd when done.
    pub unpend: bool,
    /// Some participant did not acknowledge at once: from then on each
    /// acknowledgement is recorded in the pending-work key.
    pub degraded: bool,
    /// Past `phase2_give_up_ms` and still retrying (counted in
    /// `txmesh_txn_phase2_stuck`, listed as `stuck`): never dropped.
    pub stuck: bool,
}

/// Whether a participant that voted `vote` is owed `outcome`.
pub(super) fn wants(outcome: Outcome, vote: Option<&Vote>) -> bool {
    match outcome {
        Outcome::Committed => vote == Some(&Vote::Commit),
        Outcome::Aborted => vote != Some(&Vote::ReadOnly),
    }
}

impl Job {
    pub fn new(
        txn: TxnId,
        parts: Vec<Participant>,
        deadline_ms: u64,
        trace: String,
        start: Start,
        cause: Cause,
        cx: &Cx,
    ) -> Self {
        let (duty, unpend) = match start {
            Start::Resolve => (Duty::Resolve(Send::now()), false),
            Start::Deliver {
                outcome,
                write_record,
            } => (
                Duty::Deliver {
                    outcome,
                    record: write_record.then(Send::now),
                },
                // A commit recorded by the root carries its pending-work key.
                outcome == Outcome::Committed && !write_record,
            ),
        };
        Job {
            txn,
            duty,
            targets: parts
                .into_iter()
                .map(|p| JobTarget {
                    name: p.name,
                    cluster: p.cluster,
                    tree: p.tree,
                    vote: p.vote,
                    delivery: Delivery::Owed(Send::now()),
                })
                .collect(),
            deadline_ms,
            give_up_ms: cx.now_ms.saturating_add(cx.cfg.phase2_give_up_ms),
            cause,
            trace,
            begun_ms: 0,
            unpend,
            degraded: false,
            stuck: false,
        }
    }

    fn pending(&self, cx: &Cx) -> (String, String) {
        let parts = self.targets.iter().map(|t| {
            let acked = t.delivery == Delivery::Acked;
            (
                &t.name,
                &t.cluster,
                pending_state(t.vote.as_ref(), acked),
                &t.tree,
            )
        });
        pending_record(cx.node, &self.txn, cx.now_ms, self.deadline_ms, parts)
    }

    /// One step: the record it owes, the commits or aborts that are due,
    /// and its end (all acknowledged, or given up).
    pub fn drive(mut self, cx: &Cx) -> Step<Self> {
        let now = cx.now_ms;
        let txn = self.txn;
        let mut effects = Vec::new();
        // 1. The record, if one is owed.
        let owed = match self.duty {
            Duty::Resolve(send) => send.due(now).map(|a| (Outcome::Aborted, a)),
            Duty::Deliver {
                outcome,
                record: Some(send),
            } => send.due(now).map(|a| (outcome, a)),
            Duty::Deliver { record: None, .. } => None,
        };
        if let Some((outcome, attempts)) = owed {
            let d = Decision {
                txn,
                outcome,
                participants: self.targets.iter().map(|t| t.name.clone()).collect(),
                coordinator: cx.node.to_string(),
                time_ms: now,
                reason: self.cause.as_str().to_string(),
                trace: self.trace.clone(),
                begun_ms: self.begun_ms,
                refused_by: super::vote::refused_by(self.targets.iter().map(|t| t.vote.as_ref())),
            };
            let pending = (outcome == Outcome::Committed).then(|| self.pending(cx));
            if pending.is_some() {
                self.unpend = true;
            }
            let inflight = Send::InFlight { attempts };
            self.duty = match self.duty {
                Duty::Resolve(_) => Duty::Resolve(inflight),
                Duty::Deliver { outcome, .. } => Duty::Deliver {
                    outcome,
                    record: Some(inflight),
                },
            };
            effects.push(Effect::Dispatch {
                call: record_call(cx.cfg, &d, pending),
                route: Call::JobRecord { txn },
            });
        }
        // 2. Deliveries: a commit only once its record is durable; an
        // unknown outcome waits for etcd.
        let deliver = match self.duty {
            Duty::Resolve(_) => None,
            Duty::Deliver {
                outcome: Outcome::Committed,
                record: Some(_),
            } => None,
            Duty::Deliver { outcome, .. } => Some(outcome),
        };
        if let Some(outcome) = deliver {
            let path = match outcome {
                Outcome::Committed => COMMIT_PATH,
                Outcome::Aborted => ABORT_PATH,
            };
            for (idx, t) in self.targets.iter_mut().enumerate() {
                let Delivery::Owed(send) = t.delivery else {
                    continue;
                };
                let Some(attempts) = send.due(now) else {
                    continue;
                };
                if !wants(outcome, t.vote.as_ref()) {
                    continue;
                }
                let call = control_call(
                    cx.cfg,
                    &t.cluster,
                    &t.tree,
                    path,
                    &txn,
                    self.deadline_ms,
                    cx.cfg.control_timeout_ms,
                );
                t.delivery = Delivery::Owed(Send::InFlight { attempts });
                effects.push(Effect::Dispatch {
                    call,
                    route: Call::JobTarget { txn, idx },
                });
            }
        }
        // 3. Done, or given up?
        let done = match self.duty {
            Duty::Deliver {
                outcome,
                record: None,
            } => self
                .targets
                .iter()
                .all(|t| t.delivery == Delivery::Acked || !wants(outcome, t.vote.as_ref())),
            Duty::Deliver {
                record: Some(_), ..
            }
            | Duty::Resolve(_) => false,
        };
        if done {
            if self.unpend {
                effects.push(Effect::Unpend(txn));
            }
            if self.stuck {
                effects.push(Effect::Gauge(Gauge::Stuck, -1));
                effects.push(Effect::Log(
                    LogLevel::Warn,
                    format!("txn {txn}: phase 2 finished after being stuck"),
                ));
            }
            effects.push(Effect::Table(TableOp::Remove(txn)));
            return Step::end(effects);
        }
        if now >= self.give_up_ms && seeded::active(Bug::AbandonInDoubt) {
            effects.push(Effect::Table(TableOp::Remove(txn)));
            return Step::end(effects);
        }
        if now >= self.give_up_ms && !self.stuck {
            // Past the give-up time: say so, count it, and go on retrying —
            // a participant may hold locks until it hears the outcome, and an
            // in-doubt one until etcd answers.
            self.stuck = true;
            let missing: Vec<String> = self
                .targets
                .iter()
                .filter(|t| t.delivery != Delivery::Acked)
                .map(|t| t.name.clone())
                .collect();
            let (outcome, record_pending) = match self.duty {
                Duty::Resolve(_) => ("unknown: etcd has not answered", true),
                Duty::Deliver { outcome, record } => (outcome.as_str(), record.is_some()),
            };
            effects.push(Effect::Log(
                LogLevel::Error,
                format!(
                    "txn {txn}: phase 2 ({outcome}) stuck for {} ms, still retrying; unacknowledged: {}; record pending: {record_pending}",
                    cx.cfg.phase2_give_up_ms,
                    missing.join(","),
                ),
            ));
            effects.push(Effect::Gauge(Gauge::Stuck, 1));
        }
        Step::stay(self, effects)
    }

    /// A participant answered a commit or abort.
    pub fn on_target_answer(mut self, idx: usize, a: &Answer, cx: &Cx) -> Step<Self> {
        let now = cx.now_ms;
        let txn = self.txn;
        let Some(t) = self.targets.get_mut(idx) else {
            return Step::impossible(
                self,
                format!("txn {txn}: phase-2 answer from target {idx} of none"),
            );
        };
        let Delivery::Owed(send @ Send::InFlight { .. }) = t.delivery else {
            let what = format!(
                "txn {txn}: phase-2 answer from {} with nothing in flight",
                t.name
            );
            return Step::impossible(self, what);
        };
        if a.is_2xx() {
            t.delivery = Delivery::Acked;
            if self.unpend && self.degraded {
                // Record who has acknowledged, so a recovery after a crash
                // re-sends only to the others.
                let (key, value) = self.pending(cx);
                let put = etcd_call(cx.cfg, "/v3/kv/put", etcd::put_body(&key, &value));
                return Step::stay(self, vec![Effect::Background(put)]);
            }
            return Step::stay(self, Vec::new());
        }
        let next = send.failed(now);
        t.delivery = Delivery::Owed(next);
        let attempts = next.attempts();
        let outcome = match self.duty {
            Duty::Deliver { outcome, .. } => outcome.as_str(),
            Duty::Resolve(_) => "?",
        };
        let msg = format!(
            "txn {txn}: {outcome} not acknowledged by {} ({}), retry {attempts} in {} ms",
            t.name,
            a.describe(),
            backoff_ms(attempts)
        );
        self.degraded = true;
        Step::stay(self, vec![Effect::Log(LogLevel::Warn, msg)])
    }

    /// etcd answered the record this job owed.
    pub fn on_record_answer(mut self, a: &Answer, cx: &Cx) -> Step<Self> {
        let txn = self.txn;
        let send = match self.duty {
            Duty::Resolve(send @ Send::InFlight { .. }) => send,
            Duty::Deliver {
                record: Some(send @ Send::InFlight { .. }),
                ..
            } => send,
            Duty::Resolve(Send::Due { .. }) | Duty::Deliver { .. } => {
                return Step::impossible(
                    self,
                    format!("txn {txn}: a record answer with no record in flight"),
                );
            }
        };
        let mut effects = Vec::new();
        let decided = match (self.duty, cas_answer(a)) {
            (Duty::Resolve(_), Ok(CasResult::Created)) => Some(Outcome::Aborted),
            (Duty::Deliver { outcome, .. }, Ok(CasResult::Created)) => Some(outcome),
            (duty, Ok(CasResult::Exists(v))) => match (duty, etcd::outcome_of(&v)) {
                (Duty::Resolve(_), found) => found,
                (Duty::Deliver { outcome, .. }, Some(found)) if found != outcome => {
                    effects.push(Effect::Log(
                        LogLevel::Error,
                        format!(
                            "txn {txn}: etcd holds {} but this coordinator decided {}; obeying etcd",
                            found.as_str(),
                            outcome.as_str()
                        ),
                    ));
                    Some(found)
                }
                (Duty::Deliver { outcome, .. }, _) => Some(outcome),
            },
            (_, Err(_)) => None,
        };
        let Some(outcome) = decided else {
            // etcd unreachable (or a record it cannot read): again later.
            let next = send.failed(cx.now_ms);
            self.duty = match self.duty {
                Duty::Resolve(_) => Duty::Resolve(next),
                Duty::Deliver { outcome, .. } => Duty::Deliver {
                    outcome,
                    record: Some(next),
                },
            };
            return Step::stay(self, effects);
        };
        self.duty = Duty::Deliver {
            outcome,
            record: None,
        };
        if self.cause.awaits_etcd() {
            effects.push(Effect::Log(
                LogLevel::Warn,
                format!(
                    "txn {txn}: in-doubt outcome resolved from etcd: {}",
                    outcome.as_str()
                ),
            ));
            if self.cause == Cause::Unknown {
                // The root's own unknown outcome (counted in txmesh_txn_in_doubt).
                effects.push(Effect::Gauge(Gauge::InDoubt, -1));
            }
            self.cause = Cause::Resolved(outcome);
        }
        Step::stay(self, effects)
    }
}

impl TxnEngine {
    pub(super) fn start_job(&mut self, h: &impl FilterHost, job: Job) {
        let txn = job.txn;
        self.jobs.insert(txn, job);
        // Phase 2 starts now, not at the next tick: participants hold their
        // prepared state (locks) until it arrives.
        self.step_job(h, txn, Job::drive);
    }

    /// Steps `txn`'s job (if any) and carries out the effects; a job that
    /// ended is forgotten with its calls in flight (their answers are then
    /// ignored).
    pub(super) fn step_job(
        &mut self,
        h: &impl FilterHost,
        txn: TxnId,
        f: impl FnOnce(Job, &Cx) -> Step<Job>,
    ) {
        let Some(job) = self.jobs.remove(&txn) else {
            return;
        };
        let step = f(job, &self.cx(h));
        match step.next {
            Some(job) => {
                self.jobs.insert(txn, job);
            }
            None => self.calls.retain(|_, c| {
                !matches!(c, Call::JobTarget { txn: t, .. } | Call::JobRecord { txn: t } if *t == txn)
            }),
        }
        self.run(h, step.effects);
    }

    pub(super) fn drive_jobs(&mut self, h: &impl FilterHost) {
        let mut txns: Vec<TxnId> = self.jobs.keys().copied().collect();
        txns.sort();
        for txn in txns {
            self.step_job(h, txn, Job::drive);
        }
    }

    /// Deletes finished commits' pending-work keys and puts their records
    /// under the retention lease, up to [`UNPEND_BATCH`] in one request.
    /// Fire and forget: if it is lost (or refused), the recovery loop
    /// re-sends the (idempotent) commits and unpends them again.
    pub(super) fn flush_unpend(&mut self, h: &impl FilterHost, now: u64) {
        self.next_unpend_ms = now.saturating_add(UNPEND_INTERVAL_MS);
        let lease = self.cfg.retention().lease_at(now);
        while !self.unpend.is_empty() {
            let n = self.unpend.len().min(UNPEND_BATCH);
            let done: Vec<(String, String)> = self
                .unpend
                .drain(..n)
                .map(|txn| {
                    (
                        etcd::pending_key(&self.node, &txn),
                        etcd::decision_key(&txn),
                    )
                })
                .collect();
            let body = etcd::unpend_body(&done, lease);
            let _ = h.dispatch_in(self.root_ctx, &etcd_call(&self.cfg, "/v3/kv/txn", body));
        }
    }
}
