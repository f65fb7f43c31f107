//! The named scenarios: call graphs, replicas, workers, clock skew and fault
//! budgets. docs/protocol.md lists each with its state count.

use crate::world::{Budget, Plan, Scenario, Service};

fn svc(name: &'static str, children: &[usize], plan: Plan) -> Service {
    Service {
        name,
        children: children.to_vec(),
        replicas: 1,
        plan,
        skew_ms: 0,
    }
}

/// a → b → c: a root, a sub-coordinator and a leaf.
fn depth3(b: Plan, c: Plan) -> Vec<Service> {
    vec![
        svc("a", &[1], Plan::Commit),
        svc("b", &[2], b),
        svc("c", &[], c),
    ]
}

/// a → b.
fn depth2(b: Plan) -> Vec<Service> {
    vec![svc("a", &[1], Plan::Commit), svc("b", &[], b)]
}

fn base(name: &'static str, services: Vec<Service>) -> Scenario {
    Scenario {
        name,
        services,
        workers: 1,
        budget: Budget::default(),
        fault_steps: 0,
        steps: 4,
        apps_ask: false,
        can_commit: true,
        can_abort: false,
        grpc_root: false,
    }
}

fn faults(mut sc: Scenario, budget: Budget, fault_steps: u8, steps: u8) -> Scenario {
    sc.budget = budget;
    sc.fault_steps = fault_steps;
    sc.steps = steps;
    sc
}

/// The scenarios `make test` runs: each property on every path of each.
pub fn short() -> Vec<Scenario> {
    vec![
        base("commit-depth2", depth2(Plan::Commit)),
        base("commit-depth3", depth3(Plan::Commit, Plan::Commit)),
        Scenario {
            can_abort: true,
            ..base("votes-depth3", depth3(Plan::Commit, Plan::CommitOrAbort))
        },
        Scenario {
            can_abort: true,
            ..faults(
                base("lossy-depth2", depth2(Plan::CommitOrAbort)),
                Budget {
                    total: 1,
                    lose: 1,
                    duplicate: 1,
                    delay: 1,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
        Scenario {
            apps_ask: true,
            ..faults(
                base("crash-depth2", depth2(Plan::Commit)),
                Budget {
                    total: 1,
                    crash: 1,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
        Scenario {
            can_abort: true,
            ..faults(
                base("etcd-depth2", depth2(Plan::Commit)),
                Budget {
                    total: 1,
                    lose: 1,
                    delay: 1,
                    etcd_down: 1,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
        Scenario {
            workers: 2,
            ..base("workers-depth2", depth2(Plan::Commit))
        },
        Scenario {
            can_abort: true,
            ..faults(
                base("lossy-depth3", depth3(Plan::Commit, Plan::CommitOrAbort)),
                Budget {
                    total: 1,
                    lose: 1,
                    duplicate: 1,
                    delay: 1,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
        skewed(),
        // b has two replicas; control calls land on either (issue 18: the
        // coordinator carries b's call tree, so either cascades to c).
        base("replicas-depth3", {
            let mut s = depth3(Plan::Commit, Plan::Commit);
            s[1].replicas = 2;
            s
        }),
        // b's sidecar (any pod) may restart between the business call and
        // the prepare: its table is lost, the carried tree is not.
        Scenario {
            apps_ask: true,
            ..faults(
                base("restart-sub-depth3", depth3(Plan::Commit, Plan::Commit)),
                Budget {
                    total: 1,
                    crash: 1,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
        // etcd down longer than phase2_give_up_ms, apps that never ask:
        // in-doubt resolution goes on until etcd is back (issue 18).
        Scenario {
            apps_ask: false,
            ..faults(
                base("etcd-outage-depth2", depth2(Plan::Commit)),
                Budget {
                    total: 2,
                    lose: 1,
                    etcd_down: 1,
                    ..Budget::default()
                },
                9,
                16,
            )
        },
        // A one-phase commit and its fallback record both late; the app asks
        // its sidecar (the root's) past the deadline (issue 18: the root's
        // own entry is never resolved under it).
        Scenario {
            apps_ask: true,
            ..faults(
                base("one-phase-late", vec![svc("a", &[], Plan::Commit)]),
                Budget {
                    total: 2,
                    delay: 2,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
        // Everyone votes read-only: the client is told committed, and no
        // read-only voter's sidecar may record anything else (issue 18).
        Scenario {
            steps: 6,
            ..base("read-only-depth3", {
                let mut s = depth3(Plan::ReadOnly, Plan::ReadOnly);
                s[0].plan = Plan::ReadOnly;
                s
            })
        },
        // A commit or abort from a mesh identity that is not the
        // participant's coordinator, to any service (issue 18: refused
        // unless etcd holds the same decision).
        faults(
            base("forged-control-depth3", depth3(Plan::Commit, Plan::Commit)),
            Budget {
                total: 1,
                forge: 1,
                ..Budget::default()
            },
            2,
            5,
        ),
        // A status query claiming a past deadline, to any pod (issue 18:
        // the deadline comes from the id, never from the caller).
        faults(
            base("forged-status-depth2", depth2(Plan::Commit)),
            Budget {
                total: 1,
                forge_status: 1,
                ..Budget::default()
            },
            2,
            5,
        ),
        // Decision records expire (every leased key at once, whenever the
        // checker likes) while a commit may be lost: a record is leased
        // only once nobody can still ask for it (issue 18, retention).
        Scenario {
            apps_ask: true,
            can_abort: true,
            ..faults(
                base("retention-depth2", depth2(Plan::CommitOrAbort)),
                Budget {
                    total: 2,
                    lose: 1,
                    expire: 1,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
        // The root's app speaks gRPC and may fail after its work is done
        // (grpc-status 13 in the trailers, after a 200): the failed call
        // never commits, though every participant would vote yes (issue 20).
        Scenario {
            grpc_root: true,
            can_abort: true,
            ..base("grpc-depth2", {
                let mut s = depth2(Plan::Commit);
                s[0].plan = Plan::CommitOrFails;
                s
            })
        },
        Scenario {
            apps_ask: true,
            can_abort: true,
            ..faults(
                base("one-phase", vec![svc("a", &[], Plan::CommitOrAbort)]),
                Budget {
                    total: 1,
                    lose: 1,
                    crash: 1,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
    ]
}

/// b's clock runs a second ahead: the deadline passes there first; one
/// message may be late.
fn skewed() -> Scenario {
    let mut s = depth2(Plan::Commit);
    s[1].skew_ms = 1_000;
    Scenario {
        can_abort: true,
        ..faults(
            base("skewed-depth2", s),
            Budget {
                total: 1,
                delay: 1,
                ..Budget::default()
            },
            3,
            6,
        )
    }
}

/// `make model-deep`: deeper trees under the same faults, two faults.
#[cfg(not(feature = "seeded-bugs"))]
pub fn deep() -> Vec<Scenario> {
    vec![
        Scenario {
            can_abort: true,
            ..faults(
                base("lossy2-depth3", depth3(Plan::Commit, Plan::CommitOrAbort)),
                Budget {
                    total: 2,
                    lose: 2,
                    duplicate: 1,
                    ..Budget::default()
                },
                2,
                8,
            )
        },
        Scenario {
            can_abort: true,
            apps_ask: true,
            ..faults(
                base("etcd-crash-depth2", depth2(Plan::Commit)),
                Budget {
                    total: 2,
                    lose: 1,
                    crash: 1,
                    etcd_down: 1,
                    ..Budget::default()
                },
                3,
                8,
            )
        },
        Scenario {
            workers: 2,
            can_abort: true,
            ..faults(
                base("workers-lossy-depth2", depth2(Plan::CommitOrAbort)),
                Budget {
                    total: 1,
                    lose: 1,
                    duplicate: 1,
                    ..Budget::default()
                },
                2,
                7,
            )
        },
    ]
}

/// Scenarios today's protocol fails, with the property each breaks: the
/// deployment-shapes issue turns them green one by one.
#[cfg(not(feature = "seeded-bugs"))]
pub fn known_failing() -> Vec<(Scenario, &'static str)> {
    Vec::new()
}

/// The scenario (one of [`short`], which the clean engine passes) that
/// catches a seeded bug.
#[cfg(feature = "seeded-bugs")]
pub fn catching(bug: txmesh_core::txn::seeded::Bug) -> Scenario {
    use txmesh_core::txn::seeded::Bug;
    let name = match bug {
        Bug::CommitBeforeRecord | Bug::SubForgetsChildren => "commit-depth3",
        Bug::FirstVoteDecides => "votes-depth3",
        Bug::UnknownPrepareYes => "crash-depth2",
        Bug::AbortWithoutCas | Bug::ObeyIgnoresAbort => "skewed-depth2",
        Bug::StatusTrustsCaller => "forged-status-depth2",
        Bug::IgnoreCarriedTree => "replicas-depth3",
        Bug::AbandonInDoubt => "etcd-outage-depth2",
        Bug::ReadOnlyKeepsEntry => "read-only-depth3",
        Bug::ResolveUnderRoot => "one-phase-late",
        Bug::TrustAnyCaller => "forged-control-depth3",
        Bug::LeaseOnCommit => "retention-depth2",
        Bug::GrpcStatusIgnored => "grpc-depth2",
    };
    short()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(skewed)
}
