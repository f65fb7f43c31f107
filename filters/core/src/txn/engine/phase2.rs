//! Phase 2: jobs that outlive the client's stream — commit or abort sent
//! to every participant until acknowledged, a decision record still owed,
//! and the batched deletes of finished transactions' pending-work keys.

use super::*;

impl TxnEngine {
    pub(super) fn start_job(
        &mut self,
        h: &impl FilterHost,
        op: &Op,
        outcome: Option<Outcome>,
        record: Record,
        r: Cause,
    ) {
        let now = h.now_ms();
        let targets: Vec<JobTarget> = op
            .targets
            .iter()
            .map(|t| JobTarget {
                name: t.name.clone(),
                cluster: t.cluster.clone(),
                vote: t.vote.clone(),
                acked: false,
                inflight: false,
                attempts: 0,
                next_ms: now,
            })
            .collect();
        let job = Job {
            outcome,
            record,
            record_inflight: false,
            record_attempts: 0,
            record_next_ms: now,
            targets,
            deadline_ms: op.deadline_ms,
            give_up_ms: now.saturating_add(self.cfg.phase2_give_up_ms),
            cause: r,
            trace: op.trace.clone().unwrap_or_default(),
            unpend: outcome == Some(Outcome::Committed) && record == Record::Done,
            degraded: false,
        };
        self.jobs.insert(op.txn, job);
        // Phase 2 starts now, not at the next tick: participants hold their
        // prepared state (locks) until it arrives.
        self.drive_job(h, op.txn, now);
    }

    pub(super) fn wants(outcome: Outcome, vote: &Option<Vote>) -> bool {
        match outcome {
            Outcome::Committed => *vote == Some(Vote::Commit),
            Outcome::Aborted => *vote != Some(Vote::ReadOnly),
        }
    }

    pub(super) fn job_target_answer(
        &mut self,
        h: &impl FilterHost,
        txn: TxnId,
        idx: usize,
        resp: CalloutResponse,
    ) {
        let now = h.now_ms();
        let Some(job) = self.jobs.get_mut(&txn) else {
            return;
        };
        let Some(t) = job.targets.get_mut(idx) else {
            return;
        };
        t.inflight = false;
        if is_2xx(resp.status) {
            t.acked = true;
            if job.unpend && job.degraded {
                // Record who has acknowledged, so a recovery after a crash
                // re-sends only to the others.
                let parts = job
                    .targets
                    .iter()
                    .map(|t| (&t.name, &t.cluster, pending_state(&t.vote, t.acked)));
                let (key, value) =
                    Self::pending_record(&self.node, &txn, now, job.deadline_ms, parts);
                let call = Callout {
                    cluster: self.cfg.etcd_cluster.clone(),
                    method: "POST",
                    path: "/v3/kv/put".to_string(),
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: etcd::put_body(&key, &value).into_bytes(),
                    timeout_ms: self.cfg.etcd_timeout_ms,
                };
                let _ = h.dispatch_in(self.root_ctx, &call);
            }
        } else {
            job.degraded = true;
            t.attempts += 1;
            t.next_ms = now + backoff_ms(t.attempts);
            let outcome = job.outcome.map_or("?", Outcome::as_str);
            h.log(
                LogLevel::Warn,
                &format!(
                    "txn {txn}: {outcome} not acknowledged by {} ({}), retry {} in {} ms",
                    t.name,
                    resp.status
                        .map_or("no answer".to_string(), |s| format!("answered {s}")),
                    t.attempts,
                    backoff_ms(t.attempts)
                ),
            );
        }
    }

    pub(super) fn job_record_answer(
        &mut self,
        h: &impl FilterHost,
        txn: TxnId,
        resp: CalloutResponse,
    ) {
        let now = h.now_ms();
        let Some(job) = self.jobs.get_mut(&txn) else {
            return;
        };
        job.record_inflight = false;
        let result = cas_answer(&resp);
        match result {
            Ok(CasResult::Created) => {
                if job.record == Record::Resolve {
                    job.outcome = Some(Outcome::Aborted);
                }
                job.record = Record::Done;
            }
            Ok(CasResult::Exists(v)) => {
                let found = etcd::outcome_of(&v);
                match (job.record, found) {
                    (Record::Resolve, Some(o)) => job.outcome = Some(o),
                    (_, Some(o)) if Some(o) != job.outcome => {
                        h.log(
                            LogLevel::Error,
                            &format!(
                                "txn {txn}: etcd holds {} but this coordinator decided {}; obeying etcd",
                                o.as_str(),
                                job.outcome.map_or("?", Outcome::as_str)
                            ),
                        );
                        job.outcome = Some(o);
                    }
                    _ => {}
                }
                job.record = Record::Done;
            }
            Err(_) => {
                job.record_attempts += 1;
                job.record_next_ms = now + backoff_ms(job.record_attempts);
            }
        }
        if job.record == Record::Done && job.cause.awaits_etcd() {
            let was_root = job.cause == Cause::Unknown;
            let resolved = job.outcome.map_or("?", Outcome::as_str);
            h.log(
                LogLevel::Warn,
                &format!("txn {txn}: in-doubt outcome resolved from etcd: {resolved}"),
            );
            if let Some(o) = job.outcome {
                job.cause = Cause::Resolved(o);
            }
            if was_root {
                self.gauge(h, Gauge::InDoubt, -1);
            }
        }
    }

    /// Deletes finished transactions' pending-work keys, up to
    /// [`UNPEND_BATCH`] in one request. Fire and forget: if it is lost, the
    /// recovery loop re-sends the (idempotent) commits and deletes the keys.
    pub(super) fn flush_unpend(&mut self, h: &impl FilterHost, now: u64) {
        self.next_unpend_ms = now.saturating_add(UNPEND_INTERVAL_MS);
        while !self.unpend.is_empty() {
            let n = self.unpend.len().min(UNPEND_BATCH);
            let keys: Vec<String> = self.unpend.drain(..n).collect();
            let (path, body) = match keys.as_slice() {
                [one] => ("/v3/kv/deleterange", etcd::delete_body(one)),
                many => ("/v3/kv/txn", etcd::delete_many_body(many)),
            };
            let _ = h.dispatch_in(
                self.root_ctx,
                &Callout {
                    cluster: self.cfg.etcd_cluster.clone(),
                    method: "POST",
                    path: path.to_string(),
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: body.into_bytes(),
                    timeout_ms: self.cfg.etcd_timeout_ms,
                },
            );
        }
    }

    pub(super) fn drive_jobs(&mut self, h: &impl FilterHost, now: u64) {
        let txns: Vec<TxnId> = self.jobs.keys().copied().collect();
        for txn in txns {
            self.drive_job(h, txn, now);
        }
    }

    /// One step of `txn`'s phase-2 job: the record it owes, the commits or
    /// aborts that are due, and its end. Dispatches from the root context.
    pub(super) fn drive_job(&mut self, h: &impl FilterHost, txn: TxnId, now: u64) {
        let Some(job) = self.jobs.get_mut(&txn) else {
            return;
        };
        // 1. The record, if one is owed.
        if job.record != Record::Done && !job.record_inflight && now >= job.record_next_ms {
            let outcome = match job.record {
                Record::WriteCommit => Outcome::Committed,
                _ => Outcome::Aborted,
            };
            let d = Decision {
                txn,
                outcome,
                participants: job.targets.iter().map(|t| t.name.clone()).collect(),
                coordinator: self.node.clone(),
                time_ms: now,
                reason: job.cause.as_str().to_string(),
                trace: job.trace.clone(),
                begun_ms: 0,
            };
            let pending = (outcome == Outcome::Committed).then(|| {
                let parts = job
                    .targets
                    .iter()
                    .map(|t| (&t.name, &t.cluster, pending_state(&t.vote, false)));
                Self::pending_record(&self.node, &txn, now, job.deadline_ms, parts)
            });
            if pending.is_some() {
                job.unpend = true;
            }
            let call = Self::record_call(&self.cfg, &d, pending);
            if let Ok(token) = h.dispatch_in(self.root_ctx, &call) {
                job.record_inflight = true;
                self.calls.insert(token, Call::JobRecord { txn });
            } else {
                job.record_attempts += 1;
                job.record_next_ms = now + backoff_ms(job.record_attempts);
            }
        }
        let Some(job) = self.jobs.get_mut(&txn) else {
            return;
        };
        // A commit is sent only once its record is durable; an unknown
        // outcome waits for etcd.
        let ready = match (job.outcome, job.record) {
            (None, _) => false,
            (Some(Outcome::Committed), r) => r == Record::Done,
            (Some(Outcome::Aborted), Record::Resolve) => false,
            (Some(Outcome::Aborted), _) => true,
        };
        if ready {
            if let Some(outcome) = job.outcome {
                let path = match outcome {
                    Outcome::Committed => COMMIT_PATH,
                    Outcome::Aborted => ABORT_PATH,
                };
                for idx in 0..job.targets.len() {
                    let Some(t) = job.targets.get(idx) else {
                        continue;
                    };
                    if t.acked || t.inflight || now < t.next_ms || !Self::wants(outcome, &t.vote) {
                        continue;
                    }
                    let call = Self::control_call(
                        &t.cluster,
                        path,
                        &txn,
                        job.deadline_ms,
                        self.cfg.control_timeout_ms,
                    );
                    let dispatched = h.dispatch_in(self.root_ctx, &call);
                    if let Some(t) = job.targets.get_mut(idx) {
                        match dispatched {
                            Ok(token) => {
                                t.inflight = true;
                                self.calls.insert(token, Call::JobTarget { txn, idx });
                            }
                            Err(_) => {
                                t.attempts += 1;
                                t.next_ms = now + backoff_ms(t.attempts);
                            }
                        }
                    }
                }
            }
        }
        // 2. Done, or given up?
        let Some(job) = self.jobs.get(&txn) else {
            return;
        };
        let all_acked = job.outcome.is_some_and(|o| {
            job.targets
                .iter()
                .all(|t| t.acked || !Self::wants(o, &t.vote))
        }) && job.record == Record::Done;
        if all_acked {
            if job.unpend {
                self.unpend.push(etcd::pending_key(&self.node, &txn));
                if self.unpend.len() >= UNPEND_BATCH {
                    self.flush_unpend(h, now);
                }
            }
            self.end_job(h, txn);
        } else if now >= job.give_up_ms {
            let missing: Vec<&str> = job
                .targets
                .iter()
                .filter(|t| !t.acked)
                .map(|t| t.name.as_str())
                .collect();
            h.log(
                LogLevel::Error,
                &format!(
                    "txn {txn}: phase 2 ({}) abandoned after {} ms; unacknowledged: {}; record pending: {}",
                    job.outcome.map_or("unknown", Outcome::as_str),
                    self.cfg.phase2_give_up_ms,
                    missing.join(","),
                    job.record != Record::Done
                ),
            );
            self.end_job(h, txn);
            self.gauge(h, Gauge::Abandoned, 1);
        }
    }

    /// Forgets `txn`'s phase-2 job: the job, its calls in flight (their
    /// answers are then ignored) and its table entry.
    pub(super) fn end_job(&mut self, h: &impl FilterHost, txn: TxnId) {
        self.jobs.remove(&txn);
        self.calls.retain(|_, c| {
            !matches!(c, Call::JobTarget { txn: t, .. } | Call::JobRecord { txn: t } if *t == txn)
        });
        self.table.remove(h, &txn);
    }
}
