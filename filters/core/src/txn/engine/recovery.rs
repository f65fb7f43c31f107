//! Recovery and in-doubt resolution: the elected engine's scan of the
//! table for participants prepared past deadline + grace, and the recovery
//! loop re-driving this node's recorded commits after a crash.

use super::effect::{Answer, Effect};
use super::phase2::{Job, Participant, Start};
use super::vote::Vote;
use super::*;
use crate::txn::etcd::Owed;

/// Pending-work keys read per recovery scan.
const RECOVERY_PAGE: u32 = 64;

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
            let name_of = |c: &String| {
                if *c == app {
                    self.node.clone()
                } else {
                    c.clone()
                }
            };
            let mut parts: Vec<Participant> = e
                .participants
                .iter()
                .filter(|(_, m)| *m != Mark::ReadOnly)
                .map(|(c, m)| Participant {
                    name: name_of(c),
                    cluster: c.clone(),
                    tree: e.tree_of(c).to_string(),
                    vote: Some(match m {
                        Mark::Abort => Vote::Abort {
                            cause: Cause::VoteAbort,
                            reason: String::new(),
                            participant: c.clone(),
                        },
                        Mark::Unknown | Mark::Commit | Mark::ReadOnly => Vote::Commit,
                    }),
                })
                .collect();
            if !e.participants.iter().any(|(c, _)| *c == app) {
                parts.push(Participant {
                    name: self.node.clone(),
                    cluster: app,
                    tree: String::new(),
                    vote: Some(Vote::Commit),
                });
            }
            let log = Effect::Log(
                LogLevel::Warn,
                format!(
                    "txn {}: in doubt (prepared, no decision {grace} ms past the deadline); resolving from etcd",
                    e.txn
                ),
            );
            let job = Job::new(
                e.txn,
                parts,
                e.deadline_ms,
                String::new(),
                Start::Resolve,
                Cause::InDoubt,
                &self.cx(h),
            );
            self.run(h, vec![log, Effect::StartJob(Box::new(job))]);
        }
    }

    /// Re-drives this node's commit decisions whose phase 2 has not finished
    /// (after a crash of this sidecar, or a participant down for long).
    pub(super) fn recover(&mut self, h: &impl FilterHost) {
        if self.recovery_inflight {
            return;
        }
        let prefix = format!("{}{}/", etcd::PENDING_PREFIX, self.node);
        let body =
            etcd::range_prefix_from_body(&prefix, self.recovery_cursor.as_deref(), RECOVERY_PAGE);
        let call = record::etcd_call(&self.cfg, "/v3/kv/range", body);
        self.recovery_inflight = true;
        self.run(
            h,
            vec![Effect::Dispatch {
                call,
                route: Call::Recovery,
            }],
        );
    }

    pub(super) fn recovery_answer(&mut self, h: &impl FilterHost, answer: Answer) {
        self.recovery_inflight = false;
        let Answer::Got(resp) = answer else {
            return; // not sent: the next scan tries again
        };
        if resp.status != Some(200) {
            return; // etcd unreachable: the next scan tries again
        }
        let Ok((kvs, more)) = etcd::parse_range_kvs(&resp.body) else {
            return;
        };
        // Page on from after the last key (a stuck page must not starve
        // the keys behind it); back to the start once the prefix is done.
        self.recovery_cursor = kvs
            .last()
            .filter(|_| more)
            .and_then(|(k, _)| String::from_utf8(k.clone()).ok())
            .map(|k| k + "\0");
        let now = h.now_ms();
        for (_, v) in kvs {
            // Jobs are bounded like the table: what is left stays in etcd
            // for a later scan, nothing is lost.
            if self.jobs.len() >= self.cfg.max_in_flight as usize {
                break;
            }
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
            let parts = p
                .targets
                .iter()
                .map(|t| Participant {
                    name: t.name.clone(),
                    cluster: t.cluster.clone(),
                    tree: t.tree.clone(),
                    vote: Some(match t.owed() {
                        Owed::Commit => Vote::Commit,
                        Owed::Acked | Owed::ReadOnly => Vote::ReadOnly,
                    }),
                })
                .collect();
            let start = Start::Deliver {
                outcome: Outcome::Committed,
                write_record: false,
            };
            let job = Job::new(
                txn,
                parts,
                p.deadline_ms,
                String::new(),
                start,
                Cause::Recovered,
                &self.cx(h),
            );
            self.start_job(h, job);
        }
    }
}
