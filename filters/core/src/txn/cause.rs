//! Why a transaction ended as it did: one typed cause, mapped by `match` to
//! the low-cardinality `reason` of `txmesh_txn_total`, of decision records
//! and of the decision log line.

use super::etcd::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// Committed: every participant voted yes (or read-only).
    Ok,
    /// A participant voted no.
    VoteAbort,
    /// A participant did not answer its prepare before the deadline.
    Timeout,
    /// The initiating app failed (non-2xx): nobody was asked to prepare.
    AppError,
    /// The initiating gRPC app answered a non-OK `grpc-status` (or none):
    /// nobody was asked to prepare.
    GrpcError,
    /// No decision could be recorded: etcd refused or did not answer.
    EtcdUnavailable,
    /// No decision could be recorded: etcd is out of space (NOSPACE alarm).
    EtcdNoSpace,
    /// etcd already held an abort (someone resolved the transaction in doubt).
    DecidedElsewhere,
    /// The client went away before the decision.
    ClientGone,
    /// A participant's sidecar resolving a transaction in doubt.
    InDoubt,
    /// The coordinator could not learn the outcome (an ambiguous etcd write).
    Unknown,
    /// A recorded commit re-driven by the recovery loop.
    Recovered,
    /// An in-doubt or unknown transaction, resolved from etcd.
    Resolved(Outcome),
}

impl Cause {
    /// The reason as metrics, records and logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Ok => "ok",
            Cause::VoteAbort => "vote_abort",
            Cause::Timeout => "timeout",
            Cause::AppError => "app_error",
            Cause::GrpcError => "grpc_error",
            Cause::EtcdUnavailable => "etcd_unavailable",
            Cause::EtcdNoSpace => "etcd_nospace",
            Cause::DecidedElsewhere => "decided_elsewhere",
            Cause::ClientGone => "client_gone",
            Cause::InDoubt => "in_doubt",
            Cause::Unknown => "unknown",
            Cause::Recovered => "recovered",
            Cause::Resolved(Outcome::Committed) => "resolved_committed",
            Cause::Resolved(Outcome::Aborted) => "resolved_aborted",
        }
    }

    /// Whether the job's outcome is still to be learned from etcd.
    pub fn awaits_etcd(self) -> bool {
        match self {
            Cause::InDoubt | Cause::Unknown => true,
            Cause::Ok
            | Cause::VoteAbort
            | Cause::Timeout
            | Cause::AppError
            | Cause::GrpcError
            | Cause::EtcdUnavailable
            | Cause::EtcdNoSpace
            | Cause::DecidedElsewhere
            | Cause::ClientGone
            | Cause::Recovered
            | Cause::Resolved(_) => false,
        }
    }

    /// The status an aborted transaction's client gets: 409 (the
    /// transaction was refused), 503 when the mesh cannot decide at all.
    pub fn abort_status(self) -> u16 {
        match self {
            Cause::EtcdNoSpace => 503,
            Cause::Ok
            | Cause::VoteAbort
            | Cause::Timeout
            | Cause::AppError
            | Cause::GrpcError
            | Cause::EtcdUnavailable
            | Cause::DecidedElsewhere
            | Cause::ClientGone
            | Cause::InDoubt
            | Cause::Unknown
            | Cause::Recovered
            | Cause::Resolved(_) => 409,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_documented_names() {
        let all = [
            (Cause::Ok, "ok"),
            (Cause::VoteAbort, "vote_abort"),
            (Cause::Timeout, "timeout"),
            (Cause::AppError, "app_error"),
            (Cause::GrpcError, "grpc_error"),
            (Cause::EtcdUnavailable, "etcd_unavailable"),
            (Cause::EtcdNoSpace, "etcd_nospace"),
            (Cause::DecidedElsewhere, "decided_elsewhere"),
            (Cause::ClientGone, "client_gone"),
            (Cause::InDoubt, "in_doubt"),
            (Cause::Unknown, "unknown"),
            (Cause::Recovered, "recovered"),
            (Cause::Resolved(Outcome::Committed), "resolved_committed"),
            (Cause::Resolved(Outcome::Aborted), "resolved_aborted"),
        ];
        for (c, s) in all {
            assert_eq!(c.as_str(), s);
        }
        assert!(Cause::InDoubt.awaits_etcd() && Cause::Unknown.awaits_etcd());
        assert!(!Cause::Resolved(Outcome::Aborted).awaits_etcd());
    }
}
