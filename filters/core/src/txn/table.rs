//! The process-wide transaction table, in proxy-wasm shared data.
//!
//! Shared data is never freed and has no delete, so the table is a fixed set
//! of keys reused forever: `max_in_flight` bucket keys `txmesh.txn.b.<i>`,
//! each holding up to [`BUCKET_CAP`] entries, plus one counter key
//! `txmesh.txn.count`. An id hashes to two buckets (its two halves; ids are
//! random) and lives in the emptier one, so a bucket overflows only when the
//! table is nearly full. Every write is a compare-and-swap, so workers on
//! other threads see a consistent table. The counter enforces the capacity
//! exactly: when it reaches `max_in_flight`, inserts fail with [`TableError::Full`].
//!
//! Entries past `deadline + reclaim_after` are reclaimed by the next insert
//! into their bucket, so a crashed coordinator elsewhere cannot leak slots.

use super::id::TxnId;
use crate::host::{SharedData, SharedSetError};

pub const BUCKET_CAP: usize = 4;
const COUNT_KEY: &str = "txmesh.txn.count";
const CAS_ATTEMPTS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This sidecar began the transaction: it is the root coordinator.
    Root,
    /// This sidecar's app was called in the transaction and called others:
    /// a sub-coordinator for its children.
    Sub,
    /// This sidecar's app was called in the transaction (a leaf, so far).
    Participant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Active,
    Preparing,
    Committed,
    Aborted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Active => "active",
            Phase::Preparing => "preparing",
            Phase::Committed => "committed",
            Phase::Aborted => "aborted",
        }
    }
}

/// What a participant voted, as far as this sidecar knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Unknown,
    Commit,
    ReadOnly,
    Abort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub txn: TxnId,
    pub deadline_ms: u64,
    pub role: Role,
    pub phase: Phase,
    /// Enlisted clusters (children), in enlistment order, with their votes.
    pub participants: Vec<(String, Mark)>,
    /// The call tree each child reported below itself (`x-txmesh-children`),
    /// for children that have one.
    pub trees: Vec<(String, String)>,
    /// The mesh identities (mTLS peer URI SANs) that called this app inside
    /// the transaction: its coordinators, the only ones whose commit or
    /// abort it takes without asking etcd.
    pub parents: Vec<String>,
}

/// The most coordinators one participant entry remembers.
pub const MAX_PARENTS: usize = 4;

impl Entry {
    pub fn new(txn: TxnId, deadline_ms: u64, role: Role) -> Self {
        Self {
            txn,
            deadline_ms,
            role,
            phase: Phase::Active,
            participants: Vec::new(),
            trees: Vec::new(),
            parents: Vec::new(),
        }
    }

    /// Takes on the children its coordinator carried (`x-txmesh-children`:
    /// those it lacks, and the newer trees) and the local app.
    pub fn adopt(&mut self, carried: &[super::tree::Child], app: &str) {
        for c in carried {
            if !self.participants.iter().any(|(p, _)| *p == c.name) {
                self.participants.push((c.name.clone(), Mark::Unknown));
            }
            if !c.tree.is_empty() {
                self.set_tree(&c.name, c.tree.clone());
            }
        }
        if !self.participants.iter().any(|(c, _)| c == app) {
            self.participants.push((app.to_string(), Mark::Unknown));
        }
    }

    /// Remembers `peer` as a coordinator (up to [`MAX_PARENTS`]); false if
    /// there was no room.
    pub fn add_parent(&mut self, peer: &str) -> bool {
        if self.parents.iter().any(|p| p == peer) {
            return true;
        }
        if self.parents.len() >= MAX_PARENTS {
            return false;
        }
        self.parents.push(peer.to_string());
        true
    }

    /// The tree `child` reported below itself ("" if none).
    pub fn tree_of(&self, child: &str) -> &str {
        self.trees
            .iter()
            .find(|(c, _)| c == child)
            .map_or("", |(_, t)| t.as_str())
    }

    /// Records the tree `child` reported (replacing an older report).
    pub fn set_tree(&mut self, child: &str, tree: String) {
        self.trees.retain(|(c, _)| c != child);
        if !tree.is_empty() {
            self.trees.push((child.to_string(), tree));
        }
    }

    fn encode(&self, out: &mut String) {
        use std::fmt::Write;
        let role = match self.role {
            Role::Root => 'R',
            Role::Sub => 'S',
            Role::Participant => 'P',
        };
        let phase = match self.phase {
            Phase::Active => 'A',
            Phase::Preparing => 'P',
            Phase::Committed => 'C',
            Phase::Aborted => 'X',
        };
        let _ = write!(out, "{} {} {role} {phase}", self.txn, self.deadline_ms);
        for (c, m) in &self.participants {
            let m = match m {
                Mark::Unknown => '?',
                Mark::Commit => 'c',
                Mark::ReadOnly => 'r',
                Mark::Abort => 'a',
            };
            let _ = write!(out, " {m}{c}");
        }
        for (c, t) in &self.trees {
            let _ = write!(out, " >{c}={t}");
        }
        for p in &self.parents {
            let _ = write!(out, " ^{p}");
        }
        out.push('\n');
    }

    fn decode(line: &str) -> Option<Self> {
        let mut f = line.split(' ');
        let txn = TxnId::parse(f.next()?.as_bytes()).ok()?;
        let deadline_ms = f.next()?.parse().ok()?;
        let role = match f.next()? {
            "R" => Role::Root,
            "S" => Role::Sub,
            "P" => Role::Participant,
            _ => return None,
        };
        let phase = match f.next()? {
            "A" => Phase::Active,
            "P" => Phase::Preparing,
            "C" => Phase::Committed,
            "X" => Phase::Aborted,
            _ => return None,
        };
        let mut participants = Vec::new();
        let mut trees = Vec::new();
        let mut parents = Vec::new();
        for p in f {
            if let Some(parent) = p.strip_prefix('^') {
                parents.push(parent.to_string());
                continue;
            }
            if let Some(t) = p.strip_prefix('>') {
                let (c, tree) = t.split_once('=')?;
                trees.push((c.to_string(), tree.to_string()));
                continue;
            }
            let mut chars = p.chars();
            let mark = match chars.next()? {
                '?' => Mark::Unknown,
                'c' => Mark::Commit,
                'r' => Mark::ReadOnly,
                'a' => Mark::Abort,
                _ => return None,
            };
            participants.push((chars.as_str().to_string(), mark));
        }
        Some(Self {
            txn,
            deadline_ms,
            role,
            phase,
            participants,
            trees,
            parents,
        })
    }
}

fn decode_bucket(v: &[u8]) -> Vec<Entry> {
    std::str::from_utf8(v)
        .map(|s| s.lines().filter_map(Entry::decode).collect())
        .unwrap_or_default()
}

fn encode_bucket(entries: &[Entry]) -> String {
    let mut s = String::new();
    for e in entries {
        e.encode(&mut s);
    }
    s
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    /// `max_in_flight` entries exist.
    Full,
    /// Both buckets of this id are full (the table is nearly full).
    BucketFull,
    /// Lost too many CAS races in a row.
    Busy,
    Exists,
    NotFound,
    /// The update function refused the change.
    Rejected(String),
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::Full => f.write_str("transaction table full"),
            TableError::BucketFull => f.write_str("transaction table full (bucket)"),
            TableError::Busy => f.write_str("transaction table busy"),
            TableError::Exists => f.write_str("transaction already in table"),
            TableError::NotFound => f.write_str("transaction not in table"),
            TableError::Rejected(r) => f.write_str(r),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Table {
    buckets: u32,
    max: u32,
    /// Root and Sub entries: kept this long past the deadline (phase 2 may
    /// still be running).
    reclaim_after_ms: u64,
}

/// Participant (leaf) entries are only needed until the deadline: they carry
/// it to the app's outbound calls and answer status queries.
pub const PARTICIPANT_RECLAIM_MS: u64 = 5_000;

impl Table {
    pub fn new(max_in_flight: u32, reclaim_after_ms: u64) -> Self {
        Self {
            buckets: max_in_flight.max(1),
            max: max_in_flight,
            reclaim_after_ms,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.max
    }

    fn live(&self, e: &Entry, now_ms: u64) -> bool {
        // A participant that may hold prepared work stays until its outcome
        // is known (the in-doubt scan resolves it, however long etcd is away).
        if e.phase == Phase::Preparing && e.role != Role::Root {
            return true;
        }
        let keep = match e.role {
            Role::Participant => PARTICIPANT_RECLAIM_MS.min(self.reclaim_after_ms),
            Role::Root | Role::Sub => self.reclaim_after_ms,
        };
        e.deadline_ms.saturating_add(keep) >= now_ms
    }

    fn bucket_keys(&self, txn: &TxnId) -> [String; 2] {
        let (a, b) = txn.hashes();
        let n = u64::from(self.buckets);
        [
            format!("txmesh.txn.b.{}", a % n),
            format!("txmesh.txn.b.{}", b % n),
        ]
    }

    fn read(h: &impl SharedData, key: &str) -> (Vec<Entry>, Option<u32>) {
        let (v, cas) = h.shared_get(key);
        (v.as_deref().map(decode_bucket).unwrap_or_default(), cas)
    }

    /// Number of entries (all roles).
    pub fn count(&self, h: &impl SharedData) -> u32 {
        h.shared_get(COUNT_KEY)
            .0
            .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0)
    }

    fn add_count(
        &self,
        h: &impl SharedData,
        delta: i64,
        check_max: bool,
    ) -> Result<(), TableError> {
        for _ in 0..CAS_ATTEMPTS {
            let (v, cas) = h.shared_get(COUNT_KEY);
            let cur = v
                .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0);
            let next = (i64::from(cur) + delta).max(0);
            if check_max && delta > 0 && next > i64::from(self.max) {
                return Err(TableError::Full);
            }
            let next = u32::try_from(next).unwrap_or(u32::MAX);
            match h.shared_set(COUNT_KEY, &next.to_le_bytes(), cas) {
                Ok(()) => return Ok(()),
                Err(SharedSetError::CasMismatch) => continue,
                Err(SharedSetError::Other(_)) => return Err(TableError::Busy),
            }
        }
        Err(TableError::Busy)
    }

    pub fn get(&self, h: &impl SharedData, txn: &TxnId) -> Option<Entry> {
        self.bucket_keys(txn)
            .iter()
            .find_map(|k| Self::read(h, k).0.into_iter().find(|e| e.txn == *txn))
    }

    /// Inserts a new entry; `Full` when the table is at capacity.
    pub fn insert(&self, h: &impl SharedData, entry: Entry, now_ms: u64) -> Result<(), TableError> {
        if let Err(e) = self.add_count(h, 1, true) {
            // Full: entries of crashed or vanished coordinators may have
            // expired anywhere in the table. Sweep once, then try again.
            if e != TableError::Full || self.sweep_expired(h, now_ms) == 0 {
                return Err(e);
            }
            self.add_count(h, 1, true)?;
        }
        let r = self.insert_counted(h, entry, now_ms);
        if r.is_err() {
            let _ = self.add_count(h, -1, false);
        }
        r
    }

    fn insert_counted(
        &self,
        h: &impl SharedData,
        entry: Entry,
        now_ms: u64,
    ) -> Result<(), TableError> {
        let keys = self.bucket_keys(&entry.txn);
        for _ in 0..CAS_ATTEMPTS {
            let mut reads: Vec<(Vec<Entry>, Option<u32>, usize)> = Vec::with_capacity(2);
            for k in &keys {
                let (mut entries, cas) = Self::read(h, k);
                if entries.iter().any(|e| e.txn == entry.txn) {
                    return Err(TableError::Exists);
                }
                let before = entries.len();
                entries.retain(|e| self.live(e, now_ms));
                let reclaimed = before - entries.len();
                reads.push((entries, cas, reclaimed));
            }
            // The emptier of the two buckets.
            let pick = match (reads.first(), reads.get(1)) {
                (Some(a), Some(b)) if b.0.len() < a.0.len() => 1,
                _ => 0,
            };
            let (Some(key), Some((entries, cas, reclaimed))) =
                (keys.get(pick), reads.get_mut(pick))
            else {
                return Err(TableError::Busy);
            };
            if entries.len() >= BUCKET_CAP {
                return Err(TableError::BucketFull);
            }
            entries.push(entry.clone());
            match h.shared_set(key, encode_bucket(entries).as_bytes(), *cas) {
                Ok(()) => {
                    if *reclaimed > 0 {
                        let _ = self.add_count(h, -(*reclaimed as i64), false);
                    }
                    return Ok(());
                }
                Err(SharedSetError::CasMismatch) => continue,
                Err(SharedSetError::Other(_)) => return Err(TableError::Busy),
            }
        }
        Err(TableError::Busy)
    }

    /// Every entry (O(buckets); for listings and the in-doubt scan).
    pub fn all(&self, h: &impl SharedData) -> Vec<Entry> {
        (0..self.buckets)
            .flat_map(|i| Self::read(h, &format!("txmesh.txn.b.{i}")).0)
            .collect()
    }

    /// Drops every entry past `deadline + reclaim_after` (O(buckets); only
    /// run when the table is full). Returns how many were dropped.
    pub fn sweep_expired(&self, h: &impl SharedData, now_ms: u64) -> usize {
        let mut dropped = 0;
        for i in 0..self.buckets {
            let key = format!("txmesh.txn.b.{i}");
            for _ in 0..CAS_ATTEMPTS {
                let (mut entries, cas) = Self::read(h, &key);
                let before = entries.len();
                entries.retain(|e| self.live(e, now_ms));
                if entries.len() == before {
                    break;
                }
                if h.shared_set(&key, encode_bucket(&entries).as_bytes(), cas)
                    .is_ok()
                {
                    dropped += before - entries.len();
                    break;
                }
            }
        }
        if dropped > 0 {
            let _ = self.add_count(h, -(dropped as i64), false);
        }
        dropped
    }

    /// Applies `f` to the entry of `txn` atomically and returns the new entry.
    pub fn update(
        &self,
        h: &impl SharedData,
        txn: &TxnId,
        f: impl Fn(&mut Entry) -> Result<(), String>,
    ) -> Result<Entry, TableError> {
        // One body for every caller's closure (a copy per closure cost the
        // wasm filter ~5 KB).
        self.update_with(h, txn, &f)
    }

    fn update_with(
        &self,
        h: &impl SharedData,
        txn: &TxnId,
        f: &dyn Fn(&mut Entry) -> Result<(), String>,
    ) -> Result<Entry, TableError> {
        for _ in 0..CAS_ATTEMPTS {
            let mut found = false;
            for k in self.bucket_keys(txn) {
                let (mut entries, cas) = Self::read(h, &k);
                let Some(e) = entries.iter_mut().find(|e| e.txn == *txn) else {
                    continue;
                };
                found = true;
                f(e).map_err(TableError::Rejected)?;
                let updated = e.clone();
                match h.shared_set(&k, encode_bucket(&entries).as_bytes(), cas) {
                    Ok(()) => return Ok(updated),
                    Err(SharedSetError::CasMismatch) => break,
                    Err(SharedSetError::Other(_)) => return Err(TableError::Busy),
                }
            }
            if !found {
                return Err(TableError::NotFound);
            }
        }
        Err(TableError::Busy)
    }

    /// Removes the entry of `txn`; true if it was there.
    pub fn remove(&self, h: &impl SharedData, txn: &TxnId) -> bool {
        for _ in 0..CAS_ATTEMPTS {
            let mut retry = false;
            for k in self.bucket_keys(txn) {
                let (mut entries, cas) = Self::read(h, &k);
                let before = entries.len();
                entries.retain(|e| e.txn != *txn);
                if entries.len() == before {
                    continue;
                }
                match h.shared_set(&k, encode_bucket(&entries).as_bytes(), cas) {
                    Ok(()) => {
                        let _ = self.add_count(h, -1, false);
                        return true;
                    }
                    Err(_) => {
                        retry = true;
                        break;
                    }
                }
            }
            if !retry {
                return false;
            }
        }
        false
    }

    /// Enlists `cluster` as a child of `txn`, creating the entry (as `fresh`)
    /// when this sidecar has none. Refused once the transaction is preparing
    /// or decided, or when it has `max_participants` children.
    pub fn enlist(
        &self,
        h: &impl SharedData,
        fresh: Entry,
        cluster: &str,
        max_participants: usize,
        now_ms: u64,
    ) -> Result<Entry, TableError> {
        let add = |e: &mut Entry| {
            if e.phase != Phase::Active {
                return Err(format!(
                    "transaction {} is {}: it takes no new participants",
                    e.txn,
                    e.phase.as_str()
                ));
            }
            if !e.participants.iter().any(|(c, _)| c == cluster) {
                if e.participants.len() >= max_participants {
                    return Err(format!(
                        "transaction {} already has {max_participants} participants here (max_participants)",
                        e.txn
                    ));
                }
                e.participants.push((cluster.to_string(), Mark::Unknown));
            }
            if e.role == Role::Participant {
                e.role = Role::Sub;
            }
            Ok(())
        };
        for _ in 0..4 {
            match self.update(h, &fresh.txn, add) {
                Err(TableError::NotFound) => {}
                other => return other,
            }
            let mut e = fresh.clone();
            add(&mut e).map_err(TableError::Rejected)?;
            match self.insert(h, e.clone(), now_ms) {
                Ok(()) => return Ok(e),
                Err(TableError::Exists) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(TableError::Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn id(n: u8) -> TxnId {
        let mut b = [0u8; 16];
        b[0] = n;
        b[8] = n.wrapping_mul(7).wrapping_add(3);
        TxnId::from_bytes(b).unwrap()
    }

    #[test]
    fn entry_round_trips() {
        let mut e = Entry::new(id(1), 123, Role::Sub);
        e.phase = Phase::Preparing;
        e.participants = vec![
            ("payment".into(), Mark::Commit),
            ("outbound|8080||inv.shop".into(), Mark::ReadOnly),
            ("x".into(), Mark::Unknown),
            ("y".into(), Mark::Abort),
        ];
        e.set_tree("payment", "bank(ledger),fraud".into());
        e.add_parent("spiffe://cluster.local/ns/shop/sa/order");
        let mut s = String::new();
        e.encode(&mut s);
        assert_eq!(Entry::decode(s.trim_end()).unwrap(), e);
        assert!(Entry::decode("garbage").is_none());
    }

    #[test]
    fn insert_get_update_remove() {
        let h = FakeHost::new();
        let t = Table::new(8, 1000);
        t.insert(&h, Entry::new(id(1), 100, Role::Root), 0).unwrap();
        assert_eq!(
            t.insert(&h, Entry::new(id(1), 100, Role::Root), 0),
            Err(TableError::Exists)
        );
        assert_eq!(t.count(&h), 1);
        let e = t
            .update(&h, &id(1), |e| {
                e.phase = Phase::Preparing;
                Ok(())
            })
            .unwrap();
        assert_eq!(e.phase, Phase::Preparing);
        assert_eq!(t.get(&h, &id(1)).unwrap().phase, Phase::Preparing);
        assert_eq!(t.update(&h, &id(2), |_| Ok(())), Err(TableError::NotFound));
        assert!(t.remove(&h, &id(1)));
        assert!(!t.remove(&h, &id(1)));
        assert_eq!(t.count(&h), 0);
        assert!(t.get(&h, &id(1)).is_none());
    }

    #[test]
    fn capacity_is_exact_and_slots_are_reused() {
        let h = FakeHost::new();
        let t = Table::new(3, 1000);
        for n in 1..=3 {
            t.insert(&h, Entry::new(id(n), 100, Role::Root), 0).unwrap();
        }
        assert_eq!(
            t.insert(&h, Entry::new(id(4), 100, Role::Root), 0),
            Err(TableError::Full)
        );
        assert_eq!(t.count(&h), 3);
        assert!(t.remove(&h, &id(2)));
        t.insert(&h, Entry::new(id(4), 100, Role::Root), 0).unwrap();
        // Many transactions through a small table: the key set stays fixed.
        for n in 10..250u8 {
            t.remove(&h, &id(n.wrapping_sub(1)));
            let _ = t.insert(&h, Entry::new(id(n), 100, Role::Root), 0);
        }
        let keys = h.shared.borrow().len();
        assert!(keys <= 3 + 1, "{keys} shared-data keys for a 3-slot table");
    }

    #[test]
    fn expired_entries_are_reclaimed() {
        let h = FakeHost::new();
        let t = Table::new(1, 50);
        t.insert(&h, Entry::new(id(1), 100, Role::Sub), 0).unwrap();
        // Not yet expired (100 + 50 >= 150): full.
        assert_eq!(
            t.insert(&h, Entry::new(id(2), 100, Role::Root), 150),
            Err(TableError::Full)
        );
        // Expired: the full table is swept and the slot reused.
        t.insert(&h, Entry::new(id(2), 100, Role::Root), 151)
            .unwrap();
        assert_eq!(t.count(&h), 1);
        assert!(t.get(&h, &id(1)).is_none());
        assert!(t.get(&h, &id(2)).is_some());
    }

    #[test]
    fn enlist_creates_upgrades_and_refuses() {
        let h = FakeHost::new();
        let t = Table::new(8, 1000);
        t.insert(&h, Entry::new(id(1), 100, Role::Participant), 0)
            .unwrap();
        let e = t
            .enlist(&h, Entry::new(id(1), 999, Role::Sub), "c", 2, 0)
            .unwrap();
        assert_eq!(e.role, Role::Sub);
        assert_eq!(e.deadline_ms, 100, "existing entry keeps its deadline");
        assert_eq!(e.participants, vec![("c".to_string(), Mark::Unknown)]);
        // Same cluster twice: enlisted once.
        let e = t
            .enlist(&h, Entry::new(id(1), 999, Role::Sub), "c", 2, 0)
            .unwrap();
        assert_eq!(e.participants.len(), 1);
        t.enlist(&h, Entry::new(id(1), 999, Role::Sub), "d", 2, 0)
            .unwrap();
        let err = t
            .enlist(&h, Entry::new(id(1), 999, Role::Sub), "e", 2, 0)
            .unwrap_err();
        assert!(
            matches!(err, TableError::Rejected(ref m) if m.contains("max_participants")),
            "{err}"
        );
        // Unknown here: created.
        let e = t
            .enlist(&h, Entry::new(id(2), 500, Role::Sub), "c", 2, 0)
            .unwrap();
        assert_eq!((e.role, e.deadline_ms), (Role::Sub, 500));
        // Preparing: no new participants.
        t.update(&h, &id(2), |e| {
            e.phase = Phase::Preparing;
            Ok(())
        })
        .unwrap();
        let err = t
            .enlist(&h, Entry::new(id(2), 500, Role::Sub), "z", 2, 0)
            .unwrap_err();
        assert!(
            matches!(err, TableError::Rejected(ref m) if m.contains("is preparing")),
            "{err}"
        );
    }

    #[test]
    fn cas_contention_is_retried() {
        let h = FakeHost::new();
        let t = Table::new(8, 1000);
        *h.cas_failures.borrow_mut() = 5;
        t.insert(&h, Entry::new(id(1), 100, Role::Root), 0).unwrap();
        assert_eq!(t.count(&h), 1);
        assert!(t.get(&h, &id(1)).is_some());
    }
}
