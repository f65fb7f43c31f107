//! Votes, the participants asked for them, and the control calls that ask.

use super::effect::{Answer, Cx, Effect, OpCall};
use super::*;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Vote {
    Commit,
    ReadOnly,
    /// `cause`: [`Cause::VoteAbort`] (said no, failed) or [`Cause::Timeout`]
    /// (no answer before the deadline, here or below a sub-coordinator).
    Abort {
        cause: Cause,
        reason: String,
        participant: String,
    },
}

/// The first participant that voted no (or did not answer), with its
/// reason: what an abort's decision record names.
pub(super) fn refused_by<'a>(
    votes: impl Iterator<Item = Option<&'a Vote>>,
) -> Option<(String, String)> {
    votes.flatten().find_map(|v| match v {
        Vote::Abort {
            cause,
            reason,
            participant,
        } => {
            let why = if reason.is_empty() {
                cause.as_str()
            } else {
                reason
            };
            Some((participant.clone(), why.to_string()))
        }
        Vote::Commit | Vote::ReadOnly => None,
    })
}

/// Where a participant stands in a prepare round.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Ballot {
    /// Not asked (the transaction ended before its prepare went out).
    NotAsked,
    /// Asked, no answer yet: it may be prepared.
    Asked,
    Voted(Vote),
}

/// A participant of a prepare round.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Target {
    /// Name in votes, errors and logs: the cluster, or this node for its own app.
    pub name: String,
    pub cluster: String,
    /// The call tree it reported below itself (sent with every control call).
    pub tree: String,
    pub ballot: Ballot,
}

impl Target {
    pub fn new(name: String, cluster: String, tree: String) -> Self {
        Self {
            name,
            cluster,
            tree,
            ballot: Ballot::NotAsked,
        }
    }

    pub fn vote(&self) -> Option<&Vote> {
        match &self.ballot {
            Ballot::NotAsked | Ballot::Asked => None,
            Ballot::Voted(v) => Some(v),
        }
    }

    pub fn voted_commit(&self) -> bool {
        self.ballot == Ballot::Voted(Vote::Commit)
    }
}

/// The reason of a vote that never came.
pub(super) const NO_ANSWER: &str = "no answer before the deadline";

/// The first abort among `targets`' votes.
pub(super) fn first_abort(targets: &[Target]) -> Option<(Cause, String, String)> {
    targets.iter().find_map(|t| match t.vote() {
        Some(Vote::Abort {
            cause,
            reason,
            participant,
        }) => Some((*cause, reason.clone(), participant.clone())),
        Some(Vote::Commit | Vote::ReadOnly) | None => None,
    })
}

/// A prepare's answer as a vote. A callout cut off by its timeout (the time
/// left to the deadline) comes back as Envoy's 504 or as no answer: a
/// timeout vote when the deadline is (about) here.
/// A prepare's answer as a vote (`grpc`: the answer of a gRPC app's
/// `Prepare`).
pub(super) fn vote_of(
    answer: &Answer,
    name: &str,
    grpc: bool,
    deadline_ms: u64,
    now_ms: u64,
) -> Vote {
    let late = now_ms + TICK_SLACK_MS >= deadline_ms && matches!(answer.status(), None | Some(504));
    match answer {
        Answer::Got(_) if late => Vote::Abort {
            cause: Cause::Timeout,
            reason: NO_ANSWER.to_string(),
            participant: name.to_string(),
        },
        Answer::Got(resp) => parse_vote(resp, name, grpc),
        Answer::NotSent(e) => Vote::Abort {
            cause: Cause::VoteAbort,
            reason: format!("prepare could not be sent: {e}"),
            participant: name.to_string(),
        },
    }
}

fn abort_vote(cause: Cause, reason: String, name: &str) -> Vote {
    Vote::Abort {
        cause,
        reason,
        participant: name.to_string(),
    }
}

/// A prepare's answer (`grpc`: a gRPC app's `PrepareResponse`): anything
/// but a clear commit or read-only vote is an abort, naming what was wrong.
fn parse_vote(resp: &CalloutResponse, name: &str, grpc: bool) -> Vote {
    match resp.status {
        None => abort_vote(Cause::Timeout, NO_ANSWER.to_string(), name),
        Some(200) if grpc => grpc_vote(&resp.body, name),
        Some(200) => json_vote(&resp.body, name),
        Some(_) if grpc => abort_vote(
            Cause::VoteAbort,
            format!("Prepare failed: {}", String::from_utf8_lossy(&resp.body)),
            name,
        ),
        Some(s) => abort_vote(Cause::VoteAbort, format!("prepare answered {s}"), name),
    }
}

/// `{"vote": …}` from an HTTP participant or a sidecar.
fn json_vote(body: &[u8], name: &str) -> Vote {
    /// A sub-coordinator relays a child's timeout as `"cause":"timeout"`.
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum WireCause {
        Timeout,
        #[serde(other)]
        Other,
    }
    #[derive(Deserialize)]
    struct V {
        vote: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        participant: Option<String>,
        #[serde(default)]
        cause: Option<WireCause>,
    }
    match serde_json::from_slice::<V>(body) {
        Ok(v) if v.vote == "commit" => Vote::Commit,
        Ok(v) if v.vote == "readonly" => Vote::ReadOnly,
        Ok(v) => Vote::Abort {
            cause: match v.cause {
                Some(WireCause::Timeout) => Cause::Timeout,
                Some(WireCause::Other) | None => Cause::VoteAbort,
            },
            reason: v.reason.unwrap_or_else(|| format!("voted {}", v.vote)),
            participant: v.participant.unwrap_or_else(|| name.to_string()),
        },
        Err(_) => abort_vote(
            Cause::VoteAbort,
            "prepare answered 200 without a vote".to_string(),
            name,
        ),
    }
}

/// A gRPC app's `PrepareResponse`.
fn grpc_vote(body: &[u8], name: &str) -> Vote {
    match pb::vote(body) {
        Ok((pb::Vote::Commit, _)) => Vote::Commit,
        Ok((pb::Vote::ReadOnly, _)) => Vote::ReadOnly,
        Ok((pb::Vote::Abort, reason)) if !reason.is_empty() => {
            abort_vote(Cause::VoteAbort, reason, name)
        }
        Ok((pb::Vote::Abort, _)) => abort_vote(Cause::VoteAbort, "voted abort".to_string(), name),
        Ok((pb::Vote::Unspecified, _)) => abort_vote(
            Cause::VoteAbort,
            "the app's PrepareResponse has no vote".to_string(),
            name,
        ),
        Err(e) => abort_vote(Cause::VoteAbort, e, name),
    }
}

/// A prepare, commit or abort to `cluster` (pinned to an instance when the
/// participant was reached through txmesh_router).
pub(super) fn control_call(
    cfg: &TxnConfig,
    cluster: &str,
    tree: &str,
    path: &str,
    txn: &TxnId,
    deadline_ms: u64,
    timeout_ms: u64,
) -> Callout {
    // This sidecar's own gRPC app: the same call on txmesh.v1.Participant.
    if let Some(m) = pb::ControlMethod::of_path(path).filter(|_| cfg.grpc_app(cluster)) {
        let id = txn.to_string();
        return Callout {
            cluster: cluster.to_string(),
            method: "POST",
            path: format!("/{}/{}", pb::SERVICE, m.name()),
            body: pb::request(m, &id, deadline_ms),
            headers: vec![
                (id::TXN_HEADER.to_string(), id),
                (id::DEADLINE_HEADER.to_string(), deadline_ms.to_string()),
            ],
            timeout_ms: timeout_ms.max(1),
            grpc: Some(GrpcMethod {
                service: pb::SERVICE,
                method: m.name(),
            }),
        };
    }
    let mut headers = vec![
        (id::TXN_HEADER.to_string(), txn.to_string()),
        (id::DEADLINE_HEADER.to_string(), deadline_ms.to_string()),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    if !tree.is_empty() {
        headers.push((tree::CHILDREN_HEADER.to_string(), tree.to_string()));
    }
    let (cluster, pinned) = split_pinned(cluster);
    if let Some(ep) = pinned {
        headers.push((ENDPOINT_HEADER.to_string(), ep.to_string()));
    }
    Callout {
        cluster: cluster.to_string(),
        method: "POST",
        path: path.to_string(),
        headers,
        body: Vec::new(),
        timeout_ms: timeout_ms.max(1),
        grpc: None,
    }
}

/// The tree recorded for a participant whose report could not be read (or
/// was too large): it cannot be prepared safely.
pub(super) const UNTRACKABLE: &str = "!";

/// The prepares of a round: one dispatch per target, each then asked; a
/// target whose call tree could not be tracked votes abort at once.
pub(super) fn ask_all(
    ctx: u32,
    targets: &mut [Target],
    txn: &TxnId,
    deadline_ms: u64,
    cx: &Cx,
) -> Vec<Effect> {
    let timeout = deadline_ms.saturating_sub(cx.now_ms);
    let mut effects = Vec::new();
    for (i, t) in targets.iter_mut().enumerate() {
        if t.tree == UNTRACKABLE {
            t.ballot = Ballot::Voted(Vote::Abort {
                cause: Cause::VoteAbort,
                reason: format!(
                    "its calls below could not be tracked (invalid or too large {})",
                    tree::CHILDREN_HEADER
                ),
                participant: t.name.clone(),
            });
            continue;
        }
        t.ballot = Ballot::Asked;
        effects.push(Effect::for_op(
            ctx,
            control_call(
                cx.cfg,
                &t.cluster,
                &t.tree,
                PREPARE_PATH,
                txn,
                deadline_ms,
                timeout,
            ),
            OpCall::Vote(i),
        ));
    }
    effects
}
