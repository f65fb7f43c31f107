//! Admission: what a request is (a begin, a call inside a transaction, a
//! control call), enlisting the participants an app calls, and handing a
//! control call to the op that runs it.

use super::effect::Step;
use super::*;

/// The caller's mesh identity: the URI SAN of its mTLS certificate, if it
/// showed one (a printable string, at most 256 bytes).
fn peer_identity(h: &impl FilterHost) -> Option<String> {
    h.property(&["connection", "uri_san_peer_certificate"])
        .filter(|v| !v.is_empty() && v.len() <= 256 && v.iter().all(u8::is_ascii_graphic))
        .and_then(|v| String::from_utf8(v).ok())
}

impl TxnEngine {
    pub fn on_request_headers(&mut self, h: &impl FilterHost, ctx: u32) -> (Stream, Verdict) {
        let direction = match self.cfg.direction {
            Some(d) => Some(d),
            None => h
                .property(&["xds", "listener_direction"])
                .as_deref()
                .and_then(Direction::from_listener_direction),
        };
        let path = h.request_header(":path").unwrap_or_default();
        let txn = id::read_txn(
            h.request_header(id::TXN_HEADER).as_deref(),
            h.request_header(id::BAGGAGE_HEADER).as_deref(),
        );
        match direction {
            Some(Direction::Inbound) => self.inbound(h, ctx, &path, txn),
            Some(Direction::Outbound) => self.outbound(h, ctx, &path, txn),
            None => {
                // Without a direction the filter cannot know its role: refuse
                // transactional requests rather than guess.
                match txn {
                    Ok(TxnHeader::Absent) => (Stream::Pass, Verdict::Continue),
                    _ => self.reject(
                        h,
                        ctx,
                        500,
                        "txmesh_txn cannot tell inbound from outbound: set \"direction\" in its config or traffic_direction on the listener",
                    ),
                }
            }
        }
    }

    pub(super) fn reject(
        &self,
        h: &impl FilterHost,
        ctx: u32,
        status: u16,
        msg: &str,
    ) -> (Stream, Verdict) {
        h.send_reply(ctx, status, &[JSON], &json_error(msg));
        (Stream::Pass, Verdict::Pause)
    }

    /// The deadline of a call inside transaction `txn`: the one its id
    /// carries (minted by the root), else `x-txmesh-deadline` (ids made up
    /// by an app or an older txmesh).
    fn txn_deadline(&self, h: &impl FilterHost, txn: &TxnId, now: u64) -> Result<u64, String> {
        match txn.deadline_ms() {
            Some(d) if d <= now => Err(format!(
                "transaction {txn} is past its deadline ({d}, now {now})"
            )),
            Some(d) => Ok(d),
            None => self.deadline_from(h, now),
        }
    }

    /// A new transaction's deadline: the default, or less if the client
    /// asks (`x-txmesh-deadline`, or a gRPC client's `grpc-timeout`).
    fn deadline_from(&self, h: &impl FilterHost, now: u64) -> Result<u64, String> {
        let mut default = now.saturating_add(self.cfg.default_timeout_ms);
        if let Some(v) = h.request_header(grpc::TIMEOUT) {
            default = default.min(now.saturating_add(grpc::parse_timeout(&v)?));
        }
        match h.request_header(id::DEADLINE_HEADER) {
            None => Ok(default),
            Some(v) => {
                let d = id::parse_deadline(&v)?;
                if d <= now {
                    return Err(format!(
                        "{} {d} is in the past (now {now})",
                        id::DEADLINE_HEADER
                    ));
                }
                Ok(d.min(default))
            }
        }
    }

    fn inbound(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        path: &[u8],
        txn: Result<TxnHeader, String>,
    ) -> (Stream, Verdict) {
        let txn = match txn {
            Ok(t) => t,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        if path.starts_with(b"/txmesh/") {
            return self.control(h, ctx, path, txn);
        }
        let method = h.request_header(":method").unwrap_or_default();
        match txn {
            TxnHeader::Absent if self.cfg.begins(&method, path) => self.begin(h, ctx),
            TxnHeader::Absent => (Stream::Pass, Verdict::Continue),
            TxnHeader::New if self.cfg.allow_client_begin || self.cfg.begins(&method, path) => {
                self.begin(h, ctx)
            }
            TxnHeader::New => self.reject(
                h,
                ctx,
                400,
                "x-txmesh-txn: new is not allowed here: no begin rule matches this request and allow_client_begin is off",
            ),
            TxnHeader::Id(txn) => {
                let now = h.now_ms();
                let deadline = match self.txn_deadline(h, &txn, now) {
                    Ok(d) => d,
                    Err(e) => return self.reject(h, ctx, 400, &e),
                };
                // Remember the txn, its deadline and who called (its
                // coordinator) for this app's outbound calls and for control
                // calls. A full table only costs the deadline hint.
                let peer = peer_identity(h);
                match self.table.get(h, &txn) {
                    None => {
                        let mut e = Entry::new(txn, deadline, Role::Participant);
                        if let Some(p) = &peer {
                            e.add_parent(p);
                        }
                        let _ = self.table.insert(h, e, now);
                    }
                    Some(e) => {
                        if let Some(p) = peer.filter(|p| !e.parents.contains(p)) {
                            let _ = self.table.update(h, &txn, |e| {
                                e.add_parent(&p);
                                Ok(())
                            });
                        }
                    }
                }
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                h.set_request_header(id::DEADLINE_HEADER, Some(&deadline.to_string()));
                (Stream::Business { txn }, Verdict::Continue)
            }
        }
    }

    fn begin(&mut self, h: &impl FilterHost, ctx: u32) -> (Stream, Verdict) {
        let now = h.now_ms();
        let deadline = match self.deadline_from(h, now) {
            Ok(d) => d,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        let txn = TxnId::mint(deadline, h.random_id());
        match self
            .table
            .insert(h, Entry::new(txn, deadline, Role::Root), now)
        {
            Ok(()) => {}
            Err(TableError::Full | TableError::BucketFull) => {
                let msg = format!(
                    "transaction table full: {} transactions in flight in this sidecar (max_in_flight); retry later",
                    self.table.capacity()
                );
                return self.reject(h, ctx, 503, &msg);
            }
            Err(e) => return self.reject(h, ctx, 503, &format!("cannot begin a transaction: {e}")),
        }
        self.gauge_in_flight(h, 1);
        h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
        h.set_request_header(id::DEADLINE_HEADER, Some(&deadline.to_string()));
        let trace = h
            .request_header("traceparent")
            .as_deref()
            .and_then(id::trace_id);
        (
            Stream::Root {
                txn,
                deadline_ms: deadline,
                started_ms: now,
                started_us: h.now_us(),
                trace,
            },
            Verdict::Continue,
        )
    }

    fn outbound(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        path: &[u8],
        txn: Result<TxnHeader, String>,
    ) -> (Stream, Verdict) {
        let txn = match txn {
            Ok(TxnHeader::Absent) => return (Stream::Pass, Verdict::Continue),
            Ok(TxnHeader::New) => {
                return self.reject(
                    h,
                    ctx,
                    400,
                    "x-txmesh-txn: new is only accepted by the initiator's inbound sidecar",
                )
            }
            Ok(TxnHeader::Id(t)) => t,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        if path.starts_with(b"/txmesh/") {
            // An app talking to control endpoints (e.g. asking for a status)
            // enlists nobody.
            return (Stream::Pass, Verdict::Continue);
        }
        if self.cfg.is_streaming(path) {
            // Only unary calls take part: this one goes on outside the
            // transaction (its headers removed, so nobody below enlists).
            h.set_request_header(id::TXN_HEADER, None);
            h.set_request_header(id::DEADLINE_HEADER, None);
            if !self.streaming_logged {
                self.streaming_logged = true;
                h.log(
                    LogLevel::Warn,
                    &format!(
                        "txn {txn}: the streaming gRPC call {} is not part of the transaction (only unary calls are enlisted; logged once)",
                        String::from_utf8_lossy(path)
                    ),
                );
            }
            return (Stream::Pass, Verdict::Continue);
        }
        let Some(cluster) = h
            .property(&["xds", "cluster_name"])
            .and_then(|c| String::from_utf8(c).ok())
            .filter(|c| super::super::config::is_cluster_name(c))
        else {
            // No route: Envoy answers 404 itself; nothing to enlist.
            return (Stream::Pass, Verdict::Continue);
        };
        // Routed to one instance by txmesh_router: that instance is the
        // participant, and every control call must reach it again.
        let cluster = match h
            .request_header(ENDPOINT_HEADER)
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|v| is_endpoint(v))
        {
            Some(ep) => format!("{cluster}@{ep}"),
            None => cluster,
        };
        if !tree::carriable(&cluster) {
            let msg = format!(
                "cannot enlist {cluster}: a participant's name must not contain any of ( ) , = (it travels in {})",
                tree::CHILDREN_HEADER
            );
            return self.reject(h, ctx, 409, &msg);
        }
        let now = h.now_ms();
        let deadline = match self.txn_deadline(h, &txn, now) {
            Ok(d) => d,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        let fresh = Entry::new(txn, deadline, Role::Sub);
        match self
            .table
            .enlist(h, fresh, &cluster, self.cfg.max_participants as usize, now)
        {
            Ok(entry) => {
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                h.set_request_header(id::DEADLINE_HEADER, Some(&entry.deadline_ms.to_string()));
                let participant = cluster;
                (Stream::Enlisted { txn, participant }, Verdict::Continue)
            }
            Err(TableError::Rejected(msg)) => self.reject(h, ctx, 409, &msg),
            Err(TableError::Full | TableError::BucketFull) => {
                let msg = format!(
                    "transaction table full: {} transactions in flight in this sidecar (max_in_flight); retry later",
                    self.table.capacity()
                );
                self.reject(h, ctx, 503, &msg)
            }
            Err(e) => self.reject(h, ctx, 503, &format!("cannot enlist {cluster}: {e}")),
        }
    }

    fn control(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        path: &[u8],
        txn: TxnHeader,
    ) -> (Stream, Verdict) {
        let method = h.request_header(":method").unwrap_or_default();
        let path_only = path.split(|&b| b == b'?').next().unwrap_or(path);
        if path_only == b"/txmesh/txns" {
            if method != b"GET" {
                return self.reject(h, ctx, 405, "use GET for /txmesh/txns");
            }
            return self.listing(h, ctx, path);
        }
        if let Some(id_part) = path_only.strip_prefix(STATUS_PREFIX.as_bytes()) {
            if method != b"GET" {
                return self.reject(h, ctx, 405, "use GET for /txmesh/txns/<id>");
            }
            return match TxnId::parse(id_part) {
                Ok(t) => self.status(h, ctx, t),
                Err(e) => self.reject(h, ctx, 400, &e),
            };
        }
        let kind = match path_only {
            b"/txmesh/prepare" => None,
            b"/txmesh/commit" => Some(Outcome::Committed),
            b"/txmesh/abort" => Some(Outcome::Aborted),
            _ => return self.reject(h, ctx, 404, "unknown txmesh endpoint"),
        };
        if method != b"POST" {
            return self.reject(h, ctx, 405, "txmesh control endpoints take POST");
        }
        let txn = match txn {
            TxnHeader::Id(t) => t,
            _ => {
                return self.reject(
                    h,
                    ctx,
                    400,
                    "a control request needs x-txmesh-txn with a transaction id",
                )
            }
        };
        // The call tree below this participant, as its coordinator knows
        // it: whichever replica of it, or this sidecar after a restart,
        // cascades to the same children.
        let carried = match h.request_header(tree::CHILDREN_HEADER) {
            _ if seeded::active(Bug::IgnoreCarriedTree) => Vec::new(),
            None => Vec::new(),
            Some(v) => match tree::parse(&v) {
                Ok(c) => c,
                Err(e) => return self.reject(h, ctx, 400, &e),
            },
        };
        let entry = self.table.get(h, &txn);
        let has_children = !carried.is_empty()
            || entry
                .as_ref()
                .is_some_and(|e| e.role == Role::Sub && !e.participants.is_empty());
        // A commit or abort from anyone but the participant's coordinators
        // (the identities that called its app inside the transaction) is
        // taken only if etcd holds the same decision.
        if let Some(outcome) = kind {
            let peer = peer_identity(h);
            let parents = entry.as_ref().map_or(&[][..], |e| e.parents.as_slice());
            let trusted = match &peer {
                Some(p) => parents.iter().any(|x| x == p),
                // No mTLS here at all: nothing to tell callers apart by.
                None => parents.is_empty(),
            };
            if !trusted && !seeded::active(Bug::TrustAnyCaller) {
                let step = Verify::start(
                    ctx,
                    txn,
                    outcome,
                    peer.unwrap_or_default(),
                    carried,
                    !parents.is_empty(),
                    &self.cx(h),
                );
                self.settle_op(h, ctx, step.map(Op::Verify));
                return (Stream::Owned, Verdict::Pause);
            }
        }
        match (kind, has_children) {
            (None, true) => self.sub_prepare(h, ctx, txn, entry, carried),
            (Some(outcome), true) => self.sub_finish(h, ctx, txn, entry, carried, outcome),
            // A gRPC app takes commit and abort from its sidecar, as a call
            // on txmesh.v1.Participant (an op with one target).
            (Some(outcome), false) if self.cfg.app_protocol == AppProtocol::Grpc => {
                self.sub_finish(h, ctx, txn, entry, carried, outcome)
            }
            (Some(_), false) => {
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                (Stream::LeafFinish { txn }, Verdict::Continue)
            }
            (None, false) if entry.is_none() && seeded::active(Bug::UnknownPrepareYes) => {
                h.send_reply(ctx, 200, &[JSON], br#"{"vote":"commit"}"#);
                (Stream::Pass, Verdict::Pause)
            }
            // A leaf: the sidecar asks its app itself (an op with one target),
            // so it knows the vote — a read-only voter's entry goes at once.
            // From the moment the prepare goes out the app may be prepared:
            // the entry is marked preparing (in-doubt resolution watches it).
            (None, false) => self.sub_prepare(h, ctx, txn, entry, carried),
        }
    }

    // ----- sub-coordinator -------------------------------------------------

    /// A prepare for a transaction with children here (known from the
    /// table, or carried by the coordinator): fan out to them and the app.
    /// A prepare this sidecar cannot track is refused with an abort vote.
    fn sub_prepare(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        txn: TxnId,
        entry: Option<Entry>,
        carried: Vec<Child>,
    ) -> (Stream, Verdict) {
        let now = h.now_ms();
        let app = self.cfg.app_cluster.clone();
        let merge = |e: &mut Entry| {
            e.phase = Phase::Preparing;
            if !carried.is_empty() {
                e.role = Role::Sub;
            }
            e.adopt(&carried, &app);
            Ok(())
        };
        let entry = match entry {
            Some(mut known) => match self.table.update(h, &txn, merge) {
                Ok(e) => e,
                Err(_) => {
                    // Not recorded (busy, or freed meanwhile): go on with
                    // what is known; its coordinator resolves it.
                    let _ = merge(&mut known);
                    known
                }
            },
            None => {
                let role = if carried.is_empty() {
                    Role::Participant
                } else {
                    Role::Sub
                };
                let mut fresh = Entry::new(txn, self.known_deadline(h, &txn, now), role);
                let _ = merge(&mut fresh);
                match self.table.insert(h, fresh.clone(), now) {
                    Ok(()) => fresh,
                    Err(e) => return self.refuse_prepare(h, ctx, &e),
                }
            }
        };
        let forget = seeded::active(Bug::SubForgetsChildren);
        let targets = entry
            .participants
            .iter()
            .filter(|(c, _)| !forget || *c == app)
            .map(|(c, _)| Target::new(self.name_of(c), c.clone(), entry.tree_of(c).to_string()))
            .collect();
        let step = SubPrepare::start(ctx, entry.txn, entry.deadline_ms, targets, &self.cx(h));
        self.settle_op(h, ctx, step.map(Op::SubPrepare));
        (Stream::Owned, Verdict::Pause)
    }

    /// A prepare this sidecar cannot track (its table is full): an abort
    /// vote naming the cause, the app never asked.
    fn refuse_prepare(&self, h: &impl FilterHost, ctx: u32, e: &TableError) -> (Stream, Verdict) {
        let body = Obj::new()
            .str("vote", "abort")
            .str(
                "reason",
                &format!("this sidecar cannot track the transaction: {e}"),
            )
            .str("participant", &self.node)
            .build();
        h.send_reply(ctx, 200, &[JSON], body.as_bytes());
        (Stream::Pass, Verdict::Pause)
    }

    /// The deadline of a transaction this sidecar has no entry for: the
    /// id's (even if past: resolve soon), else the caller's, else the default.
    fn known_deadline(&self, h: &impl FilterHost, txn: &TxnId, now: u64) -> u64 {
        txn.deadline_ms()
            .or_else(|| {
                h.request_header(id::DEADLINE_HEADER)
                    .and_then(|v| id::parse_deadline(&v).ok())
            })
            .unwrap_or_else(|| now.saturating_add(self.cfg.default_timeout_ms))
    }

    /// This node's name for its own app, else the cluster.
    pub(super) fn name_of(&self, cluster: &str) -> String {
        if cluster == self.cfg.app_cluster {
            self.node.clone()
        } else {
            cluster.to_string()
        }
    }

    /// A commit or abort for a transaction with children here: cascade to
    /// them (all but read-only voters, and for commit all but no voters)
    /// and the app. Without an entry (another replica, or a restart) every
    /// carried child is told: commit and abort are idempotent, and both are
    /// acknowledged for work a participant does not hold.
    pub(super) fn sub_finish(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        txn: TxnId,
        entry: Option<Entry>,
        carried: Vec<Child>,
        outcome: Outcome,
    ) -> (Stream, Verdict) {
        let now = h.now_ms();
        let app = self.cfg.app_cluster.clone();
        let phase = match outcome {
            Outcome::Committed => Phase::Committed,
            Outcome::Aborted => Phase::Aborted,
        };
        let _ = self.table.update(h, &txn, |e| {
            e.phase = phase;
            Ok(())
        });
        let deadline_ms = entry
            .as_ref()
            .map_or_else(|| self.known_deadline(h, &txn, now), |e| e.deadline_ms);
        let mut known = entry.unwrap_or_else(|| Entry::new(txn, deadline_ms, Role::Sub));
        known.adopt(&carried, &app);
        let targets = known
            .participants
            .iter()
            .filter(|(_, mark)| match outcome {
                Outcome::Committed => *mark != Mark::ReadOnly && *mark != Mark::Abort,
                Outcome::Aborted => *mark != Mark::ReadOnly,
            })
            .map(|(c, _)| (self.name_of(c), c.clone(), known.tree_of(c).to_string()))
            .collect();
        let step: Step<SubFinish> =
            SubFinish::start(ctx, txn, outcome, deadline_ms, targets, &self.cx(h));
        self.settle_op(h, ctx, step.map(Op::SubFinish));
        (Stream::Owned, Verdict::Pause)
    }
}
