//! Seeded bugs: deliberate protocol mistakes, each behind its own cargo
//! feature of txmesh-core (`seeded-bug-…`, off by default; `seeded-bugs`
//! turns on all of them). They exist to show that the checks can fail: the
//! model check (`tests/model/`) must find a counterexample for every one,
//! and each can be compiled into `txmesh_txn.wasm` (the txn filter crate
//! forwards the features) for the history checker on real Envoy.
//!
//! Without a feature, [`active`] is `false` at compile time and the code
//! behind it is dead: a normal build carries none of it.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// The root sends commit without waiting for the decision record.
    CommitBeforeRecord,
    /// Abort records are written unconditionally, not by CAS on "absent".
    AbortWithoutCas,
    /// A sidecar that does not know a transaction answers its prepare
    /// with a yes vote itself.
    UnknownPrepareYes,
    /// A sub-coordinator prepares only its own app, not its children.
    SubForgetsChildren,
    /// The root decides commit on the first yes vote.
    FirstVoteDecides,
    /// The root's commit CAS finding an abort record commits anyway.
    ObeyIgnoresAbort,
    /// A status query resolves on the caller's `x-txmesh-deadline`.
    StatusTrustsCaller,
    /// A control call's carried call tree (`x-txmesh-children`) is ignored.
    IgnoreCarriedTree,
    /// Phase 2 (in-doubt resolution included) ends at `phase2_give_up_ms`,
    /// dropping the table entry.
    AbandonInDoubt,
    /// A read-only voter's sidecar keeps its entry (and resolves it later).
    ReadOnlyKeepsEntry,
    /// A status query at the root's own sidecar resolves its live entry past
    /// deadline + grace.
    ResolveUnderRoot,
    /// A commit or abort is taken from any caller, coordinator or not.
    TrustAnyCaller,
    /// A commit's decision record goes under the retention lease when it
    /// is written, not when its phase 2 is done.
    LeaseOnCommit,
    /// A gRPC root is judged by `:status` alone (its `grpc-status` ignored).
    GrpcStatusIgnored,
}

impl Bug {
    pub const ALL: [Bug; 14] = [
        Bug::CommitBeforeRecord,
        Bug::AbortWithoutCas,
        Bug::UnknownPrepareYes,
        Bug::SubForgetsChildren,
        Bug::FirstVoteDecides,
        Bug::ObeyIgnoresAbort,
        Bug::StatusTrustsCaller,
        Bug::IgnoreCarriedTree,
        Bug::AbandonInDoubt,
        Bug::ReadOnlyKeepsEntry,
        Bug::ResolveUnderRoot,
        Bug::TrustAnyCaller,
        Bug::LeaseOnCommit,
        Bug::GrpcStatusIgnored,
    ];

    /// The cargo feature that compiles it in.
    pub fn feature(self) -> &'static str {
        match self {
            Bug::CommitBeforeRecord => "seeded-bug-commit-before-record",
            Bug::AbortWithoutCas => "seeded-bug-abort-without-cas",
            Bug::UnknownPrepareYes => "seeded-bug-unknown-prepare-yes",
            Bug::SubForgetsChildren => "seeded-bug-sub-forgets-children",
            Bug::FirstVoteDecides => "seeded-bug-first-vote-decides",
            Bug::ObeyIgnoresAbort => "seeded-bug-obey-ignores-abort",
            Bug::StatusTrustsCaller => "seeded-bug-status-trusts-caller",
            Bug::IgnoreCarriedTree => "seeded-bug-ignore-carried-tree",
            Bug::AbandonInDoubt => "seeded-bug-abandon-in-doubt",
            Bug::ReadOnlyKeepsEntry => "seeded-bug-read-only-keeps-entry",
            Bug::ResolveUnderRoot => "seeded-bug-resolve-under-root",
            Bug::TrustAnyCaller => "seeded-bug-trust-any-caller",
            Bug::LeaseOnCommit => "seeded-bug-lease-on-commit",
            Bug::GrpcStatusIgnored => "seeded-bug-grpc-status-ignored",
        }
    }

    fn compiled(self) -> bool {
        match self {
            Bug::CommitBeforeRecord => cfg!(feature = "seeded-bug-commit-before-record"),
            Bug::AbortWithoutCas => cfg!(feature = "seeded-bug-abort-without-cas"),
            Bug::UnknownPrepareYes => cfg!(feature = "seeded-bug-unknown-prepare-yes"),
            Bug::SubForgetsChildren => cfg!(feature = "seeded-bug-sub-forgets-children"),
            Bug::FirstVoteDecides => cfg!(feature = "seeded-bug-first-vote-decides"),
            Bug::ObeyIgnoresAbort => cfg!(feature = "seeded-bug-obey-ignores-abort"),
            Bug::StatusTrustsCaller => cfg!(feature = "seeded-bug-status-trusts-caller"),
            Bug::IgnoreCarriedTree => cfg!(feature = "seeded-bug-ignore-carried-tree"),
            Bug::AbandonInDoubt => cfg!(feature = "seeded-bug-abandon-in-doubt"),
            Bug::ReadOnlyKeepsEntry => cfg!(feature = "seeded-bug-read-only-keeps-entry"),
            Bug::ResolveUnderRoot => cfg!(feature = "seeded-bug-resolve-under-root"),
            Bug::TrustAnyCaller => cfg!(feature = "seeded-bug-trust-any-caller"),
            Bug::LeaseOnCommit => cfg!(feature = "seeded-bug-lease-on-commit"),
            Bug::GrpcStatusIgnored => cfg!(feature = "seeded-bug-grpc-status-ignored"),
        }
    }

    fn code(self) -> u8 {
        match self {
            Bug::CommitBeforeRecord => 1,
            Bug::AbortWithoutCas => 2,
            Bug::UnknownPrepareYes => 3,
            Bug::SubForgetsChildren => 4,
            Bug::FirstVoteDecides => 5,
            Bug::ObeyIgnoresAbort => 6,
            Bug::StatusTrustsCaller => 7,
            Bug::IgnoreCarriedTree => 8,
            Bug::AbandonInDoubt => 9,
            Bug::ReadOnlyKeepsEntry => 10,
            Bug::ResolveUnderRoot => 11,
            Bug::TrustAnyCaller => 12,
            Bug::LeaseOnCommit => 13,
            Bug::GrpcStatusIgnored => 14,
        }
    }
}

/// 0: every compiled-in bug is active (a wasm build); n: only the bug whose
/// code is n (the model check tries them one at a time).
static ONLY: AtomicU8 = AtomicU8::new(0);

/// Restricts the compiled-in bugs to one (`None`: all of them again).
pub fn only(bug: Option<Bug>) {
    ONLY.store(bug.map_or(0, Bug::code), Ordering::SeqCst);
}

/// Whether `bug` is in force.
#[inline]
pub fn active(bug: Bug) -> bool {
    bug.compiled() && {
        let only = ONLY.load(Ordering::Relaxed);
        only == 0 || only == bug.code()
    }
}

/// [`Bug::AbortWithoutCas`]'s write: an etcd transaction that puts the
/// record whatever is there (no compare), answered as a created record.
pub fn unconditional_put_body(key: &str, value: &str) -> String {
    use crate::b64;
    use crate::json::Obj;
    let put = Obj::new()
        .str("key", &b64::encode(key.as_bytes()))
        .str("value", &b64::encode(value.as_bytes()))
        .build();
    Obj::new()
        .raw(
            "success",
            &format!("[{}]", Obj::new().raw("request_put", &put).build()),
        )
        .build()
}

/// [`Bug::LeaseOnCommit`]'s write: the commit record's CAS with the record
/// already under the retention lease.
pub fn leased_commit_body(key: &str, value: &str, also: (&str, &str), lease: u64) -> String {
    super::etcd::cas_body(key, value, Some(lease), Some(also))
}
