//! The status endpoint (`GET /txmesh/txns/<id>`), the listing
//! (`GET /txmesh/txns`) and the recent-outcomes ring behind them.

use super::*;

impl TxnEngine {
    pub(super) fn status(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        txn: TxnId,
    ) -> (Stream, Verdict) {
        let now = h.now_ms();
        let grace = self.cfg.in_doubt_grace_ms;
        let entry = self.table.get(h, &txn);
        let local = match &entry {
            Some(e) => match e.phase {
                Phase::Committed => Some("committed"),
                Phase::Aborted => Some("aborted"),
                // Root: undecided while its own coordinator works on it.
                Phase::Active | Phase::Preparing
                    if e.role == Role::Root && now < e.deadline_ms.saturating_add(grace) =>
                {
                    Some("active")
                }
                Phase::Active if now < e.deadline_ms => Some("active"),
                // A participant that may be prepared: the decision may
                // already be in etcd; ask it (and resolve past deadline + grace).
                _ => None,
            },
            None => self.recent(h, &txn).map(Outcome::as_str),
        };
        if let Some(outcome) = local {
            Self::status_reply(h, ctx, &txn, outcome);
            return (Stream::Pass, Verdict::Pause);
        }
        // The deadline, if anyone knows it: our table, or the asking app.
        let deadline = entry.as_ref().map(|e| e.deadline_ms).or_else(|| {
            h.request_header(id::DEADLINE_HEADER)
                .and_then(|v| id::parse_deadline(&v).ok())
        });
        let resolve = deadline.is_some_and(|d| now >= d.saturating_add(grace));
        let miss = if entry.is_some() { "active" } else { "unknown" };
        let call = Callout {
            cluster: self.cfg.etcd_cluster.clone(),
            method: "POST",
            path: "/v3/kv/range".to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: etcd::range_body(&etcd::decision_key(&txn)).into_bytes(),
            timeout_ms: self.cfg.etcd_timeout_ms,
        };
        match h.dispatch(&call) {
            Ok(token) => {
                self.calls.insert(token, Call::Op { ctx, target: None });
                self.ops.insert(
                    ctx,
                    Op::new(
                        OpKind::Status,
                        ctx,
                        txn,
                        deadline.unwrap_or(0),
                        now,
                        Vec::new(),
                        Stage::StatusRead { resolve, miss },
                        now + self.cfg.etcd_timeout_ms + TICK_SLACK_MS,
                    ),
                );
                (Stream::Owned, Verdict::Pause)
            }
            Err(e) => self.reject(h, ctx, 503, &format!("etcd unreachable: {e}")),
        }
    }

    /// `GET /txmesh/txns?state=in-doubt|active|all`: what this sidecar's table holds.
    pub(super) fn listing(
        &mut self,
        h: &impl FilterHost,
        ctx: u32,
        path: &[u8],
    ) -> (Stream, Verdict) {
        let query = path.splitn(2, |&b| b == b'?').nth(1).unwrap_or_default();
        let mut state: &[u8] = b"all";
        for pair in query.split(|&b| b == b'&') {
            if let Some(v) = pair.strip_prefix(b"state=") {
                state = v;
            }
        }
        if !matches!(state, b"all" | b"active" | b"in-doubt") {
            return self.reject(h, ctx, 400, "state must be one of in-doubt, active, all");
        }
        let now = h.now_ms();
        let mut items = Vec::new();
        for e in self.table.all(h) {
            let in_doubt = match e.phase {
                Phase::Active | Phase::Preparing => now > e.deadline_ms,
                // Decided here, phase 2 not yet acknowledged by everyone.
                Phase::Committed | Phase::Aborted => true,
            };
            let keep = match state {
                b"in-doubt" => in_doubt,
                b"active" => !in_doubt,
                _ => true,
            };
            if !keep {
                continue;
            }
            let role = match e.role {
                Role::Root => "root",
                Role::Sub => "sub",
                Role::Participant => "participant",
            };
            let participants: Vec<String> = e.participants.iter().map(|(c, _)| c.clone()).collect();
            items.push(
                Obj::new()
                    .str("txn", &e.txn.to_string())
                    .str("role", role)
                    .str("phase", e.phase.as_str())
                    .bool("in_doubt", in_doubt)
                    .num("deadline_ms", e.deadline_ms)
                    .strs("participants", &participants)
                    .build(),
            );
        }
        let body = Obj::new()
            .str("node", &self.node)
            .raw("txns", &format!("[{}]", items.join(",")))
            .build();
        h.send_reply(ctx, 200, &[JSON], body.as_bytes());
        (Stream::Pass, Verdict::Pause)
    }

    pub(super) fn status_reply(h: &impl FilterHost, ctx: u32, txn: &TxnId, outcome: &str) {
        let body = Obj::new()
            .str("txn", &txn.to_string())
            .str("outcome", outcome)
            .build();
        h.send_reply(ctx, 200, &[JSON], body.as_bytes());
    }

    pub(super) fn recent_key(txn: &TxnId) -> String {
        format!("txmesh.txn.r.{}", txn.hashes().0 % RECENT_SLOTS)
    }

    pub(super) fn remember(h: &impl FilterHost, txn: &TxnId, outcome: Outcome) {
        let v = format!("{txn} {}", outcome.as_str());
        let _ = h.shared_set(&Self::recent_key(txn), v.as_bytes(), None);
    }

    pub(super) fn recent(&self, h: &impl FilterHost, txn: &TxnId) -> Option<Outcome> {
        let v = h.shared_get(&Self::recent_key(txn)).0?;
        let s = std::str::from_utf8(&v).ok()?;
        let (id, outcome) = s.split_once(' ')?;
        (id == txn.to_string()).then(|| Outcome::parse(outcome))?
    }
}
