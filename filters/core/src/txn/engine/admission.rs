//! Admission: what a request is (a begin, a call inside a transaction, a
//! control call), enlisting the participants an app calls, and handing a
//! control call to the op that runs it.

use super::effect::Step;
use super::*;

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

    fn deadline_from(&self, h: &impl FilterHost, now: u64) -> Result<u64, String> {
        let default = now.saturating_add(self.cfg.default_timeout_ms);
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
                let deadline = match self.deadline_from(h, now) {
                    Ok(d) => d,
                    Err(e) => return self.reject(h, ctx, 400, &e),
                };
                // Remember the txn and its deadline for this app's outbound
                // calls. A full table only costs the deadline hint.
                if self.table.get(h, &txn).is_none() {
                    let _ = self
                        .table
                        .insert(h, Entry::new(txn, deadline, Role::Participant), now);
                }
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                h.set_request_header(id::DEADLINE_HEADER, Some(&deadline.to_string()));
                (Stream::Pass, Verdict::Continue)
            }
        }
    }

    fn begin(&mut self, h: &impl FilterHost, ctx: u32) -> (Stream, Verdict) {
        let now = h.now_ms();
        let deadline = match self.deadline_from(h, now) {
            Ok(d) => d,
            Err(e) => return self.reject(h, ctx, 400, &e),
        };
        let Some(txn) = (0..4).find_map(|_| TxnId::from_bytes(h.random_id())) else {
            return self.reject(h, ctx, 500, "cannot mint a transaction id");
        };
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
            .filter(|v| v.parse::<std::net::SocketAddr>().is_ok())
        {
            Some(ep) => format!("{cluster}@{ep}"),
            None => cluster,
        };
        let now = h.now_ms();
        let deadline = match self.deadline_from(h, now) {
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
                (Stream::Pass, Verdict::Continue)
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
        let entry = self.table.get(h, &txn);
        let sub = entry
            .as_ref()
            .filter(|e| e.role == Role::Sub && !e.participants.is_empty());
        match (kind, sub) {
            (None, Some(e)) => {
                let e = e.clone();
                self.sub_prepare(h, ctx, e)
            }
            (Some(outcome), Some(e)) => {
                let e = e.clone();
                self.sub_finish(h, ctx, e, outcome)
            }
            (Some(_), None) => {
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                (Stream::LeafFinish { txn }, Verdict::Continue)
            }
            (None, None) if entry.is_none() && seeded::active(Bug::UnknownPrepareYes) => {
                h.send_reply(ctx, 200, &[JSON], br#"{"vote":"commit"}"#);
                (Stream::Pass, Verdict::Pause)
            }
            (None, None) => {
                h.set_request_header(id::TXN_HEADER, Some(&txn.to_string()));
                // From the moment the prepare goes to the app, the app may be
                // prepared: watch for a decision (in-doubt resolution). If it
                // votes no, a later abort is harmless; a commit can only be
                // decided with its yes.
                let now = h.now_ms();
                let marked = self.table.update(h, &txn, |e| {
                    e.phase = Phase::Preparing;
                    Ok(())
                });
                if marked == Err(TableError::NotFound) {
                    let deadline_ms = h
                        .request_header(id::DEADLINE_HEADER)
                        .and_then(|v| id::parse_deadline(&v).ok())
                        .unwrap_or_else(|| now.saturating_add(self.cfg.default_timeout_ms));
                    let mut e = Entry::new(txn, deadline_ms, Role::Participant);
                    e.phase = Phase::Preparing;
                    let _ = self.table.insert(h, e, now);
                }
                (Stream::Pass, Verdict::Continue)
            }
        }
    }

    // ----- sub-coordinator -------------------------------------------------

    fn sub_prepare(&mut self, h: &impl FilterHost, ctx: u32, entry: Entry) -> (Stream, Verdict) {
        let app = self.cfg.app_cluster.clone();
        let updated = self.table.update(h, &entry.txn, |e| {
            e.phase = Phase::Preparing;
            if !e.participants.iter().any(|(c, _)| *c == app) {
                e.participants.push((app.clone(), Mark::Unknown));
            }
            Ok(())
        });
        let entry = updated.unwrap_or(entry);
        let forget = seeded::active(Bug::SubForgetsChildren);
        let targets = entry
            .participants
            .iter()
            .filter(|(c, _)| !forget || *c == app)
            .map(|(c, _)| Target::new(self.name_of(c), c.clone()))
            .collect();
        let step = SubPrepare::start(ctx, entry.txn, entry.deadline_ms, targets, &self.cx(h));
        self.settle_op(h, ctx, step.map(Op::SubPrepare));
        (Stream::Owned, Verdict::Pause)
    }

    /// This node's name for its own app, else the cluster.
    pub(super) fn name_of(&self, cluster: &str) -> String {
        if cluster == self.cfg.app_cluster {
            self.node.clone()
        } else {
            cluster.to_string()
        }
    }

    fn sub_finish(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        entry: Entry,
        outcome: Outcome,
    ) -> (Stream, Verdict) {
        let app = self.cfg.app_cluster.clone();
        let phase = match outcome {
            Outcome::Committed => Phase::Committed,
            Outcome::Aborted => Phase::Aborted,
        };
        let _ = self.table.update(h, &entry.txn, |e| {
            e.phase = phase;
            Ok(())
        });
        let mut marks = entry.participants.clone();
        if !marks.iter().any(|(c, _)| *c == app) {
            marks.push((app.clone(), Mark::Unknown));
        }
        let targets = marks
            .into_iter()
            .filter(|(_, mark)| match outcome {
                Outcome::Committed => *mark != Mark::ReadOnly && *mark != Mark::Abort,
                Outcome::Aborted => *mark != Mark::ReadOnly,
            })
            .map(|(cluster, _)| (self.name_of(&cluster), cluster))
            .collect();
        let step: Step<SubFinish> = SubFinish::start(
            ctx,
            entry.txn,
            outcome,
            entry.deadline_ms,
            targets,
            &self.cx(h),
        );
        self.settle_op(h, ctx, step.map(Op::SubFinish));
        (Stream::Owned, Verdict::Pause)
    }
}
