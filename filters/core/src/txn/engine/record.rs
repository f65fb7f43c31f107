//! The decision record: its CAS-create (first write wins), the pending-work
//! key written with a commit, and what etcd's answers mean.

use super::effect::{Answer, Call, Effect};
use super::vote::Vote;
use super::*;
use crate::txn::etcd::Refusal;

/// The CAS-create of a decision record; with `pending`, the same etcd
/// transaction also writes this coordinator's pending-work key. An abort's
/// record goes under the retention lease of the time it is decided; a
/// commit's only once its phase 2 is done (`etcd::unpend_body`).
pub(super) fn record_call(
    cfg: &TxnConfig,
    d: &Decision,
    pending: Option<(String, String)>,
) -> Callout {
    let key = etcd::decision_key(&d.txn);
    let value = d.to_json();
    let lease = cfg.retention().lease_at(d.time_ms);
    let body = match &pending {
        Some((k, v)) if seeded::active(Bug::LeaseOnCommit) => {
            seeded::leased_commit_body(&key, &value, (k, v), lease)
        }
        Some((k, v)) => etcd::cas_create_with_body(&key, &value, (k, v)),
        None if d.outcome == Outcome::Aborted && seeded::active(Bug::AbortWithoutCas) => {
            seeded::unconditional_put_body(&key, &value)
        }
        None => {
            let lease = (d.outcome == Outcome::Aborted).then_some(lease);
            etcd::cas_create_body(&key, &value, lease)
        }
    };
    etcd_call(cfg, "/v3/kv/txn", body)
}

/// A call to etcd's JSON gateway.
pub(super) fn etcd_call(cfg: &TxnConfig, path: &str, body: String) -> Callout {
    Callout {
        cluster: cfg.etcd_cluster.clone(),
        method: "POST",
        path: path.to_string(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.into_bytes(),
        timeout_ms: cfg.etcd_timeout_ms,
        grpc: None,
    }
}

/// A participant's state in the pending-work record: owed a commit, has
/// acknowledged it, or owed nothing (read-only).
pub(super) fn pending_state(vote: Option<&Vote>, acked: bool) -> etcd::Owed {
    match (vote, acked) {
        (Some(Vote::Commit), false) => etcd::Owed::Commit,
        (Some(Vote::Commit), true) => etcd::Owed::Acked,
        (Some(Vote::ReadOnly | Vote::Abort { .. }) | None, _) => etcd::Owed::ReadOnly,
    }
}

/// The pending-work key and value of a commit decision owned by `node`:
/// each participant with what it is owed (see [`pending_state`]).
pub(super) fn pending_record<'a>(
    node: &str,
    txn: &TxnId,
    now: u64,
    deadline_ms: u64,
    parts: impl Iterator<Item = (&'a String, &'a String, etcd::Owed, &'a String)>,
) -> (String, String) {
    let targets: Vec<(String, String, etcd::Owed, String)> = parts
        .map(|(n, c, state, tree)| (n.clone(), c.clone(), state, tree.clone()))
        .collect();
    (
        etcd::pending_key(node, txn),
        etcd::Pending::to_json(txn, Outcome::Committed, now, deadline_ms, &targets),
    )
}

/// What a decision-record CAS came to; an answer other than 200 is an error.
pub(super) fn cas_answer(answer: &Answer) -> Result<CasResult, String> {
    match answer {
        Answer::Got(resp) if resp.status == Some(200) => etcd::parse_cas_response(&resp.body),
        Answer::Got(resp) => Err(format!(
            "etcd answered {}: {}",
            resp.status.map_or("nothing".to_string(), |s| s.to_string()),
            String::from_utf8_lossy(resp.body.get(..120).unwrap_or(&resp.body))
        )),
        Answer::NotSent(e) => Err(format!("not sent: {e}")),
    }
}

/// What a client is told when etcd's NOSPACE alarm stops every decision.
pub(super) const NO_SPACE: &str = "etcd is out of space (NOSPACE alarm: an operator must compact, defragment and disarm it, see docs/operations.md)";

/// What a failed record write tells about whether it landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteFailure {
    /// Envoy could not connect: it never reached etcd.
    NotSent,
    /// etcd refused it for its NOSPACE alarm: not applied, and nothing
    /// that writes will be until an operator frees space.
    NoSpace,
    /// No answer, or one that does not say: it may have been applied.
    Unknown,
}

pub(super) fn write_failure(answer: &Answer) -> WriteFailure {
    match answer {
        Answer::NotSent(_) => WriteFailure::NotSent,
        Answer::Got(resp) if resp.status == Some(503) => {
            let body = String::from_utf8_lossy(&resp.body);
            if body.contains("no healthy upstream")
                || body.contains("connection failure")
                || body.contains("Connection refused")
            {
                WriteFailure::NotSent
            } else {
                WriteFailure::Unknown
            }
        }
        Answer::Got(resp) => match etcd::refusal(&resp.body) {
            Some(Refusal::NoSpace) => WriteFailure::NoSpace,
            Some(Refusal::LeaseExists | Refusal::Other(_)) | None => WriteFailure::Unknown,
        },
    }
}

/// A decision record's value read from etcd, as an outcome name for a status answer.
pub(super) fn outcome_name(value: &[u8]) -> &'static str {
    etcd::outcome_of(value).map_or("unknown", Outcome::as_str)
}

/// What a read of the decision key found: its value, if there is one; an
/// answer other than 200 (or none) is an error.
pub(super) fn decision_read(answer: &Answer) -> Result<Option<Vec<u8>>, String> {
    match answer {
        Answer::Got(r) if r.status == Some(200) => etcd::parse_range_response(&r.body),
        other => Err(other.describe()),
    }
}

impl TxnEngine {
    /// Grants the retention lease records will be written under next (the
    /// current bucket's, then the next one's ahead of time), one at a time.
    pub(super) fn grant_lease(&mut self, h: &impl FilterHost, now: u64) {
        let retention = self.cfg.retention();
        if self.leases.asking || now < self.leases.retry_at_ms {
            return;
        }
        let Some(bucket) = retention.due(self.leases.granted, now) else {
            return;
        };
        let body = etcd::lease_grant_body(retention.lease_id(bucket), retention.ttl_s());
        let call = etcd_call(&self.cfg, "/v3/lease/grant", body);
        self.leases.asking = true;
        self.run(
            h,
            vec![Effect::Dispatch {
                call,
                route: Call::Lease { bucket },
            }],
        );
    }

    /// etcd answered a lease grant: granted now or before (by any sidecar),
    /// or to be asked again at the next scan.
    pub(super) fn lease_answer(&mut self, h: &impl FilterHost, bucket: u64, a: &Answer) {
        self.leases.asking = false;
        let granted = match a {
            Answer::Got(r) if r.status == Some(200) => true,
            Answer::Got(r) => etcd::refusal(&r.body) == Some(Refusal::LeaseExists),
            Answer::NotSent(_) => false,
        };
        if granted {
            self.leases.granted = Some(bucket.max(self.leases.granted.unwrap_or(0)));
            self.leases.failing = false;
            let now = h.now_ms();
            self.grant_lease(h, now);
        } else {
            self.leases.retry_at_ms = h.now_ms().saturating_add(LEASE_RETRY_MS);
            if !std::mem::replace(&mut self.leases.failing, true) {
                h.log(
                    LogLevel::Warn,
                    &format!(
                        "retention lease of bucket {bucket} not granted ({}); asking again every second",
                        a.describe()
                    ),
                );
            }
        }
    }
}
