//! The decision record: its CAS-create (first write wins), the pending-work
//! key written with a commit, and what etcd's answers mean.

use super::effect::Answer;
use super::vote::Vote;
use super::*;

/// The CAS-create of a decision record; with `pending`, the same etcd
/// transaction also writes this coordinator's pending-work key.
pub(super) fn record_call(
    cfg: &TxnConfig,
    d: &Decision,
    pending: Option<(String, String)>,
) -> Callout {
    let key = etcd::decision_key(&d.txn);
    let value = d.to_json();
    let body = match &pending {
        Some((k, v)) => etcd::cas_create_with_body(&key, &value, (k, v)),
        None if d.outcome == Outcome::Aborted && seeded::active(Bug::AbortWithoutCas) => {
            seeded::unconditional_put_body(&key, &value)
        }
        None => etcd::cas_create_body(&key, &value),
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
    }
}

/// A participant's state in the pending-work record: owed a commit, has
/// acknowledged it, or owed nothing (read-only).
pub(super) fn pending_state(vote: Option<&Vote>, acked: bool) -> &'static str {
    match (vote, acked) {
        (Some(Vote::Commit), false) => "commit",
        (Some(Vote::Commit), true) => "acked",
        (Some(Vote::ReadOnly | Vote::Abort { .. }) | None, _) => "readonly",
    }
}

/// The pending-work key and value of a commit decision owned by `node`:
/// each participant with what it is owed (see [`pending_state`]).
pub(super) fn pending_record<'a>(
    node: &str,
    txn: &TxnId,
    now: u64,
    deadline_ms: u64,
    parts: impl Iterator<Item = (&'a String, &'a String, &'static str, &'a String)>,
) -> (String, String) {
    let targets: Vec<(String, String, &str, String)> = parts
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

/// Whether a failed etcd call certainly never reached etcd (Envoy could not
/// connect), so nothing it carried can have been applied.
pub(super) fn certainly_not_sent(answer: &Answer) -> bool {
    match answer {
        Answer::NotSent(_) => true,
        Answer::Got(resp) if resp.status == Some(503) => {
            let body = String::from_utf8_lossy(&resp.body);
            body.contains("no healthy upstream")
                || body.contains("connection failure")
                || body.contains("Connection refused")
        }
        Answer::Got(_) => false,
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
