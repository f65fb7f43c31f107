//! An exhaustive model check of txmesh's transaction protocol (stateright).
//!
//! The model: a root coordinator R with children P0 (a leaf participant) and
//! S (a sub-coordinator whose own app is P1 and whose child is P2); etcd holds
//! the decision record, written only by compare-and-swap on "absent". Faults,
//! within a budget: any message lost, any message delivered twice (and in any
//! order), any sidecar crashed (its volatile state lost) and restarted. Time
//! is one event: the deadline passes.
//!
//! What the implementation does, as modelled:
//! - R prepares its children; all yes -> CAS commit (if it finds abort, it
//!   aborts); any no, or the deadline -> abort (the abort record is written
//!   later, best effort); phase 2 is sent to each child.
//! - S prepares its children when asked, answers the combined vote, cascades
//!   commit/abort; it remembers nothing across a crash.
//! - After a crash R restarts; its recovery loop re-drives a commit recorded
//!   in etcd (the pending-work key); anything else it has forgotten.
//! - A participant holding a prepared state past the deadline is resolved by
//!   its sidecar (alive): CAS abort if etcd has no decision, then apply what
//!   etcd holds. S does the same for its children. A participant that was
//!   never asked to prepare releases its tentative work at the deadline.
//! - Participants refuse a prepare after an abort and treat duplicates as no-ops.
//!
//! Properties: agreement (no participant commits while another aborts, no
//! commit after abort or abort after commit), validity (a commit only if every
//! participant voted yes), the record matches (a committed participant implies
//! a commit record), and termination (every participant decides once faults
//! stop: checked at every terminal state).

#![allow(clippy::indexing_slicing)]

use stateright::{Checker, Model, Property};
use std::collections::BTreeSet;

const P: usize = 3; // P0 (leaf under R), P1 (S's app), P2 (leaf under S)

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    Commit,
    Abort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Part {
    Working,
    Prepared,
    Committed,
    Aborted,
}

/// Who a message is for / from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Node {
    R,
    S,
    P(usize),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    Prepare(Node),
    Vote { from: Node, to: Node, yes: bool },
    Decide(Node, Outcome),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Root {
    Working,
    /// votes of P0 and S
    Preparing([Option<bool>; 2]),
    /// decided; `sent`: phase 2 sent in this life
    Decided(Outcome, bool),
    /// restarted without anything to do
    Idle,
    Crashed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Sub {
    Idle,
    /// votes of P1 and P2; `answered`: vote sent up
    Preparing([Option<bool>; 2], bool),
    Crashed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    parts: [Part; P],
    voted_no: [bool; P],
    /// a participant's sidecar (P0, P2; P1's sidecar is S) is up
    leaf_up: [bool; P],
    root: Root,
    sub: Sub,
    etcd: Option<Outcome>,
    net: BTreeSet<Msg>,
    timed_out: bool,
    faults: u8,
    /// a protocol violation seen by a participant (commit after abort, ...)
    violation: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    RootStart,
    Deliver(Msg),
    Duplicate(Msg),
    Lose(Msg),
    Vote(usize, bool),
    RootDecide,
    RootSend,
    RootWriteAbort,
    SubAnswer,
    Timeout,
    Resolve(usize),
    SubResolve,
    CrashRoot,
    RestartRoot,
    CrashSub,
    RestartSub,
    CrashLeaf(usize),
    RestartLeaf(usize),
}

struct Txmesh {
    max_faults: u8,
}

/// The sidecar that relays for participant `i`.
fn parent(i: usize) -> Node {
    if i == 0 {
        Node::R
    } else {
        Node::S
    }
}

impl State {
    fn sidecar_up(&self, i: usize) -> bool {
        if i == 1 {
            self.sub != Sub::Crashed
        } else {
            self.leaf_up.get(i).copied().unwrap_or(false)
        }
    }

    /// A participant applies an outcome.
    fn apply(&mut self, i: usize, o: Outcome) {
        let p = &mut self.parts[i];
        *p = match (*p, o) {
            (Part::Committed, Outcome::Abort) | (Part::Aborted, Outcome::Commit) => {
                self.violation = true;
                *p
            }
            (Part::Working, Outcome::Commit) => {
                // commit without a prepare: a protocol bug
                self.violation = true;
                Part::Committed
            }
            (_, Outcome::Commit) => Part::Committed,
            (_, Outcome::Abort) => Part::Aborted,
        };
    }

    /// CAS "absent -> o"; returns what etcd holds afterwards.
    fn cas(&mut self, o: Outcome) -> Outcome {
        *self.etcd.get_or_insert(o)
    }
}

/// No protocol violation seen, and not both a commit and an abort.
fn agreement(s: &State) -> bool {
    let split = s.parts.contains(&Part::Committed) && s.parts.contains(&Part::Aborted);
    !s.violation && !split
}

impl Model for Txmesh {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            parts: [Part::Working; P],
            voted_no: [false; P],
            leaf_up: [true; P],
            root: Root::Working,
            sub: Sub::Idle,
            etcd: None,
            net: BTreeSet::new(),
            timed_out: false,
            faults: 0,
            violation: false,
        }]
    }

    fn actions(&self, s: &State, a: &mut Vec<Action>) {
        let can_fault = s.faults < self.max_faults;
        if s.root == Root::Working {
            a.push(Action::RootStart);
        }
        for m in &s.net {
            a.push(Action::Deliver(m.clone()));
            if can_fault {
                a.push(Action::Duplicate(m.clone()));
                a.push(Action::Lose(m.clone()));
            }
        }
        for i in 0..P {
            // A participant asked to prepare votes either way (once).
            if s.parts[i] == Part::Working
                && s.net.contains(&Msg::Prepare(Node::P(i)))
                && !s.voted_no[i]
            {
                a.push(Action::Vote(i, true));
                a.push(Action::Vote(i, false));
            }
            if s.timed_out
                && matches!(s.parts[i], Part::Prepared | Part::Working)
                && s.sidecar_up(i)
            {
                a.push(Action::Resolve(i));
            }
            if can_fault && i != 1 && s.leaf_up[i] {
                a.push(Action::CrashLeaf(i));
            }
            if i != 1 && !s.leaf_up[i] {
                a.push(Action::RestartLeaf(i));
            }
        }
        match &s.root {
            Root::Preparing(_) => a.push(Action::RootDecide),
            Root::Decided(_, false) => a.push(Action::RootSend),
            Root::Decided(Outcome::Abort, true) if s.etcd.is_none() => {
                a.push(Action::RootWriteAbort)
            }
            _ => {}
        }
        if let Sub::Preparing(v, false) = &s.sub {
            if v.iter().all(Option::is_some) || v.contains(&Some(false)) {
                a.push(Action::SubAnswer);
            }
        }
        if s.timed_out && matches!(s.sub, Sub::Preparing(..)) {
            a.push(Action::SubResolve);
        }
        if !s.timed_out {
            a.push(Action::Timeout);
        }
        if can_fault && s.root != Root::Crashed {
            a.push(Action::CrashRoot);
        }
        if s.root == Root::Crashed {
            a.push(Action::RestartRoot);
        }
        if can_fault && s.sub != Sub::Crashed {
            a.push(Action::CrashSub);
        }
        if s.sub == Sub::Crashed {
            a.push(Action::RestartSub);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::RootStart => {
                s.root = Root::Preparing([None, None]);
                s.net.insert(Msg::Prepare(Node::P(0)));
                s.net.insert(Msg::Prepare(Node::S));
            }
            Action::Duplicate(m) => {
                s.faults += 1;
                // delivered now, and still in flight
                self.deliver(&mut s, &m);
            }
            Action::Lose(m) => {
                s.faults += 1;
                s.net.remove(&m);
            }
            Action::Deliver(m) => {
                s.net.remove(&m);
                self.deliver(&mut s, &m);
            }
            Action::Vote(i, yes) => {
                if yes {
                    s.parts[i] = Part::Prepared;
                } else {
                    s.voted_no[i] = true;
                    s.parts[i] = Part::Aborted;
                }
                s.net.remove(&Msg::Prepare(Node::P(i)));
                s.net.insert(Msg::Vote {
                    from: Node::P(i),
                    to: parent(i),
                    yes,
                });
            }
            Action::RootDecide => {
                let Root::Preparing(v) = s.root else {
                    return None;
                };
                if v.contains(&Some(false)) || (s.timed_out && v.contains(&None)) {
                    s.root = Root::Decided(Outcome::Abort, false);
                } else if v.iter().all(|x| *x == Some(true)) {
                    let o = s.cas(Outcome::Commit);
                    s.root = Root::Decided(o, false);
                } else {
                    return None;
                }
            }
            Action::RootSend => {
                let Root::Decided(o, false) = s.root else {
                    return None;
                };
                s.net.insert(Msg::Decide(Node::P(0), o));
                s.net.insert(Msg::Decide(Node::S, o));
                s.root = Root::Decided(o, true);
            }
            Action::RootWriteAbort => {
                s.cas(Outcome::Abort);
            }
            Action::SubAnswer => {
                let Sub::Preparing(v, false) = s.sub else {
                    return None;
                };
                let yes = v.iter().all(|x| *x == Some(true));
                s.net.insert(Msg::Vote {
                    from: Node::S,
                    to: Node::R,
                    yes,
                });
                s.sub = Sub::Preparing(v, true);
            }
            Action::Timeout => s.timed_out = true,
            Action::Resolve(i) => match s.parts[i] {
                // never asked to prepare: release the tentative work
                Part::Working => s.parts[i] = Part::Aborted,
                _ => {
                    let o = s.cas(Outcome::Abort);
                    s.apply(i, o);
                }
            },
            Action::SubResolve => {
                let o = s.cas(Outcome::Abort);
                s.net.insert(Msg::Decide(Node::P(1), o));
                s.net.insert(Msg::Decide(Node::P(2), o));
                s.sub = Sub::Idle;
            }
            Action::CrashRoot => {
                s.faults += 1;
                s.root = Root::Crashed;
            }
            Action::RestartRoot => {
                // the recovery loop re-drives a recorded commit (pending key)
                s.root = match s.etcd {
                    Some(Outcome::Commit) => Root::Decided(Outcome::Commit, false),
                    _ => Root::Idle,
                };
            }
            Action::CrashSub => {
                s.faults += 1;
                s.sub = Sub::Crashed;
            }
            Action::RestartSub => s.sub = Sub::Idle,
            Action::CrashLeaf(i) => {
                s.faults += 1;
                s.leaf_up[i] = false;
            }
            Action::RestartLeaf(i) => s.leaf_up[i] = true,
        }
        (s != *last).then_some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("agreement", |_, s: &State| agreement(s)),
            Property::always(
                "validity: commit only if every participant voted yes",
                |_, s: &State| !s.parts.contains(&Part::Committed) || s.voted_no.iter().all(|n| !n),
            ),
            Property::always(
                "a committed participant implies a commit record",
                |_, s: &State| {
                    !s.parts.contains(&Part::Committed) || s.etcd == Some(Outcome::Commit)
                },
            ),
            Property::eventually("every participant decides", |_, s: &State| {
                s.parts
                    .iter()
                    .all(|p| matches!(p, Part::Committed | Part::Aborted))
            }),
            Property::sometimes("a transaction commits", |_, s: &State| {
                s.parts.iter().all(|p| *p == Part::Committed)
            }),
            Property::sometimes("a transaction aborts", |_, s: &State| {
                s.parts.iter().all(|p| *p == Part::Aborted)
            }),
        ]
    }
}

impl Txmesh {
    fn deliver(&self, s: &mut State, m: &Msg) {
        match *m {
            Msg::Prepare(Node::S) => match &s.sub {
                Sub::Crashed => {}
                Sub::Preparing(_, _) => {}
                Sub::Idle => {
                    s.sub = Sub::Preparing([None, None], false);
                    s.net.insert(Msg::Prepare(Node::P(1)));
                    s.net.insert(Msg::Prepare(Node::P(2)));
                }
            },
            Msg::Prepare(Node::P(i)) => {
                if !s.sidecar_up(i) {
                    return;
                }
                match s.parts[i] {
                    // left in flight: the participant votes with Action::Vote
                    Part::Working => {
                        s.net.insert(m.clone());
                    }
                    // a prepare after an abort is refused; duplicates re-answer
                    Part::Aborted => {
                        s.net.insert(Msg::Vote {
                            from: Node::P(i),
                            to: parent(i),
                            yes: false,
                        });
                    }
                    Part::Prepared | Part::Committed => {
                        s.net.insert(Msg::Vote {
                            from: Node::P(i),
                            to: parent(i),
                            yes: true,
                        });
                    }
                }
            }
            Msg::Prepare(Node::R) => {}
            Msg::Vote {
                from,
                to: Node::R,
                yes,
            } => {
                if let Root::Preparing(mut v) = s.root {
                    let idx = if from == Node::S { 1 } else { 0 };
                    if v[idx].is_none() {
                        v[idx] = Some(yes);
                        s.root = Root::Preparing(v);
                    }
                }
            }
            Msg::Vote {
                from: Node::P(i),
                to: Node::S,
                yes,
            } => {
                if let Sub::Preparing(mut v, answered) = s.sub.clone() {
                    let idx = i - 1;
                    if v[idx].is_none() {
                        v[idx] = Some(yes);
                        s.sub = Sub::Preparing(v, answered);
                    }
                }
            }
            Msg::Vote { .. } => {}
            Msg::Decide(Node::S, o) => {
                if s.sub != Sub::Crashed {
                    // cascade to S's app and child
                    s.net.insert(Msg::Decide(Node::P(1), o));
                    s.net.insert(Msg::Decide(Node::P(2), o));
                    s.sub = Sub::Idle;
                }
            }
            Msg::Decide(Node::P(i), o) => {
                if s.sidecar_up(i) {
                    s.apply(i, o);
                }
            }
            Msg::Decide(Node::R, _) => {}
        }
    }
}

#[test]
fn the_protocol_is_safe_and_decides_under_faults() {
    let checker = Txmesh { max_faults: 2 }.checker().spawn_bfs().join();
    checker.assert_properties();
    let states = checker.unique_state_count();
    println!("txmesh 2PC model: {states} states, up to 2 faults, all properties hold");
    assert!(states > 1_000, "the model explored only {states} states");
}

#[test]
fn the_checker_catches_a_broken_protocol() {
    // The same model with one rule broken must fail: a root that commits on
    // its own votes without the CAS (ignoring an abort record) lets an
    // in-doubt abort and a commit both happen.
    struct Broken(Txmesh);
    impl Model for Broken {
        type State = State;
        type Action = Action;
        fn init_states(&self) -> Vec<State> {
            self.0.init_states()
        }
        fn actions(&self, s: &State, a: &mut Vec<Action>) {
            self.0.actions(s, a)
        }
        fn next_state(&self, last: &State, action: Action) -> Option<State> {
            if let (Action::RootDecide, Root::Preparing(v)) = (&action, &last.root) {
                if v.iter().all(|x| *x == Some(true)) {
                    let mut s = last.clone();
                    s.etcd = Some(Outcome::Commit); // overwrite: no CAS
                    s.root = Root::Decided(Outcome::Commit, false);
                    return Some(s);
                }
            }
            self.0.next_state(last, action)
        }
        fn properties(&self) -> Vec<Property<Self>> {
            vec![Property::always("agreement", |_, s: &State| agreement(s))]
        }
    }
    let checker = Broken(Txmesh { max_faults: 1 })
        .checker()
        .spawn_bfs()
        .join();
    assert!(
        checker.discovery("agreement").is_some(),
        "the checker should find the agreement violation"
    );
}
