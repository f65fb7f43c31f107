//! Recovery and in-doubt resolution: the elected engine's scan of the
//! table for participants prepared past deadline + grace, and the recovery
//! loop re-driving this node's recorded commits after a crash.

use super::*;

impl TxnEngine {
    /// One engine per sidecar (all workers and listeners share the VM's
    /// shared data) holds the leader key; another takes over when it has not
    /// renewed it for three scan intervals.
    pub(super) fn elect(&mut self, h: &impl FilterHost, now: u64) -> bool {
        let (value, cas) = h.shared_get(LEADER_KEY);
        let current = value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| {
                let (t, at) = v.split_once(' ')?;
                Some((t.parse::<u64>().ok()?, at.parse::<u64>().ok()?))
            });
        let stale = |at: u64| now > at.saturating_add(3 * self.cfg.recovery_interval_ms);
        let mine = match current {
            None => true,
            Some((t, _)) if t == self.token => true,
            Some((_, at)) => stale(at),
        };
        mine && h
            .shared_set(LEADER_KEY, format!("{} {now}", self.token).as_bytes(), cas)
            .is_ok()
    }

    /// Participants (and sub-coordinators) prepared with no decision past
    /// deadline + grace: resolve from etcd, CAS-writing abort if there is no
    /// decision, then deliver the outcome. No one waits on a dead coordinator.
    pub(super) fn resolve_in_doubt(&mut self, h: &impl FilterHost, now: u64) {
        let grace = self.cfg.in_doubt_grace_ms;
        for e in self.table.all(h) {
            if e.role == Role::Root
                || e.phase != Phase::Preparing
                || now < e.deadline_ms.saturating_add(grace)
                || self.jobs.contains_key(&e.txn)
            {
                continue;
            }
            let app = self.cfg.app_cluster.clone();
            let mut targets: Vec<Target> = e
                .participants
                .iter()
                .filter(|(_, m)| *m != Mark::ReadOnly)
                .map(|(c, m)| Target {
                    name: if *c == app {
                        self.node.clone()
                    } else {
                        c.clone()
                    },
                    cluster: c.clone(),
                    vote: Some(match m {
                        Mark::Abort => Vote::Abort {
                            cause: Cause::VoteAbort,
                            reason: String::new(),
                            participant: c.clone(),
                        },
                        _ => Vote::Commit,
                    }),
                    token: None,
                })
                .collect();
            if !e.participants.iter().any(|(c, _)| *c == app) {
                targets.push(Target {
                    name: self.node.clone(),
                    cluster: app,
                    vote: Some(Vote::Commit),
                    token: None,
                });
            }
            h.log(
                LogLevel::Warn,
                &format!(
                    "txn {}: in doubt (prepared, no decision {grace} ms past the deadline); resolving from etcd",
                    e.txn
                ),
            );
            let op = Op::new(
                OpKind::SubPrepare,
                0,
                e.txn,
                e.deadline_ms,
                now,
                targets,
                Stage::Finishing,
                now,
            );
            self.start_job(h, &op, None, Record::Resolve, Cause::InDoubt);
        }
    }

    /// Re-drives this node's commit decisions whose phase 2 has not finished
    /// (after a crash of this sidecar, or a participant down for long).
    pub(super) fn recover(&mut self, h: &impl FilterHost) {
        if self.recovery_inflight {
            return;
        }
        let prefix = format!("{}{}/", etcd::PENDING_PREFIX, self.node);
        let call = Callout {
            cluster: self.cfg.etcd_cluster.clone(),
            method: "POST",
            path: "/v3/kv/range".to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: etcd::range_prefix_body(&prefix, 64).into_bytes(),
            timeout_ms: self.cfg.etcd_timeout_ms,
        };
        if let Ok(token) = h.dispatch_in(self.root_ctx, &call) {
            self.recovery_inflight = true;
            self.calls.insert(token, Call::Recovery);
        }
    }

    pub(super) fn recovery_answer(&mut self, h: &impl FilterHost, resp: CalloutResponse) {
        self.recovery_inflight = false;
        if resp.status != Some(200) {
            return; // etcd unreachable: the next scan tries again
        }
        let Ok(values) = etcd::parse_range_values(&resp.body) else {
            return;
        };
        let now = h.now_ms();
        for v in values {
            let Ok(p) = serde_json::from_slice::<etcd::Pending>(&v) else {
                continue;
            };
            let Ok(txn) = TxnId::parse(p.txn.as_bytes()) else {
                continue;
            };
            if self.jobs.contains_key(&txn)
                || now < p.time_ms.saturating_add(self.cfg.recovery_after_ms)
                || Outcome::parse(&p.outcome) != Some(Outcome::Committed)
            {
                continue;
            }
            h.log(
                LogLevel::Warn,
                &format!(
                    "txn {txn}: commit recorded {} ms ago and not acknowledged by everyone; re-driving phase 2",
                    now.saturating_sub(p.time_ms)
                ),
            );
            let targets = p
                .targets
                .iter()
                .map(|t| Target {
                    name: t.name.clone(),
                    cluster: t.cluster.clone(),
                    vote: Some(if t.vote == "commit" {
                        Vote::Commit
                    } else {
                        Vote::ReadOnly
                    }),
                    token: None,
                })
                .collect();
            let op = Op::new(
                OpKind::RootPrepare,
                0,
                txn,
                p.deadline_ms,
                now,
                targets,
                Stage::Finishing,
                now,
            );
            self.start_job(
                h,
                &op,
                Some(Outcome::Committed),
                Record::Done,
                Cause::Recovered,
            );
        }
    }
}
