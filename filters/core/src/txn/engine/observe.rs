//! Metrics and the decision log line of a transaction the root decided.

use super::*;

impl TxnEngine {
    pub(super) fn finish_metrics(
        &mut self,
        h: &impl FilterHost,
        op: &Op,
        outcome: Outcome,
        r: Cause,
        now: u64,
    ) {
        if op.kind != OpKind::RootPrepare {
            return;
        }
        self.count_txn(h, Some(outcome), r);
        self.gauge_in_flight(h, -1);
        let o = outcome.as_str();
        let id = match self.metrics.duration.get(o) {
            Some(id) => Some(*id),
            None => {
                let name = encode(&[("outcome", o)], "txmesh_txn_duration_milliseconds");
                let id = h.define_metric(MetricKind::Histogram, &name).ok();
                if let Some(id) = id {
                    self.metrics.duration.insert(o, id);
                }
                id
            }
        };
        if let Some(id) = id {
            let _ = h.record_metric(id, now.saturating_sub(op.started_ms));
        }
        if self.metrics.participants.is_none() {
            self.metrics.participants = h
                .define_metric(MetricKind::Histogram, "txmesh_txn_participants")
                .ok();
        }
        if let Some(id) = self.metrics.participants {
            let _ = h.record_metric(id, op.targets.len() as u64);
        }
    }

    /// `outcome` None: unknown (etcd did not confirm the decision).
    pub(super) fn count_txn(
        &mut self,
        h: &impl FilterHost,
        outcome: Option<Outcome>,
        cause: Cause,
    ) {
        let o = outcome.map_or("unknown", Outcome::as_str);
        let r = cause.as_str();
        let id = match self.metrics.total.get(&(o, r)) {
            Some(id) => Some(*id),
            None => {
                let name = encode(&[("outcome", o), ("reason", r)], "txmesh_txn_total");
                let id = h.define_metric(MetricKind::Counter, &name).ok();
                if let Some(id) = id {
                    self.metrics.total.insert((o, r), id);
                }
                id
            }
        };
        if let Some(id) = id {
            let _ = h.increment_metric(id, 1);
        }
    }

    pub(super) fn gauge_in_flight(&mut self, h: &impl FilterHost, delta: i64) {
        if self.metrics.in_flight.is_none() {
            self.metrics.in_flight = h
                .define_metric(MetricKind::Gauge, "txmesh_txn_in_flight")
                .ok();
        }
        if let Some(id) = self.metrics.in_flight {
            let _ = h.increment_metric(id, delta);
        }
    }

    pub(super) fn gauge(&mut self, h: &impl FilterHost, which: Gauge, delta: i64) {
        let (slot, kind, name) = match which {
            Gauge::InDoubt => (
                &mut self.metrics.in_doubt,
                MetricKind::Gauge,
                "txmesh_txn_in_doubt",
            ),
            Gauge::Abandoned => (
                &mut self.metrics.abandoned,
                MetricKind::Counter,
                "txmesh_txn_phase2_abandoned_total",
            ),
        };
        if slot.is_none() {
            *slot = h.define_metric(kind, name).ok();
        }
        if let Some(id) = *slot {
            let _ = h.increment_metric(id, delta);
        }
    }

    /// Defines the transaction metrics up front so they show (at zero) from the start.
    pub fn define_metrics(&mut self, h: &impl FilterHost) {
        self.gauge_in_flight(h, 0);
        self.gauge(h, Gauge::InDoubt, 0);
        self.gauge(h, Gauge::Abandoned, 0);
        if self.metrics.participants.is_none() {
            self.metrics.participants = h
                .define_metric(MetricKind::Histogram, "txmesh_txn_participants")
                .ok();
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn log_decision(
        &self,
        h: &impl FilterHost,
        op: &Op,
        outcome: Outcome,
        r: Cause,
        why: &str,
        participant: &str,
        now: u64,
    ) {
        if op.kind != OpKind::RootPrepare {
            return;
        }
        let votes: Vec<String> = op
            .targets
            .iter()
            .map(|t| {
                let v = match &t.vote {
                    Some(Vote::Commit) => "commit",
                    Some(Vote::ReadOnly) => "readonly",
                    Some(Vote::Abort { .. }) => "abort",
                    None if t.token.is_some() => "pending",
                    None => "none",
                };
                format!("{}:{v}", t.name)
            })
            .collect();
        let prepare_ms = op.voted_ms.map_or("-".to_string(), |v| {
            v.saturating_sub(op.started_ms).to_string()
        });
        let decide_ms = op
            .voted_ms
            .map_or("-".to_string(), |v| now.saturating_sub(v).to_string());
        let mut line = format!(
            "txn {} {} reason={} trace={} participants={} prepare_ms={prepare_ms} decide_ms={decide_ms} total_ms={}",
            op.txn,
            outcome.as_str(),
            r.as_str(),
            op.trace.as_deref().unwrap_or("-"),
            votes.join(","),
            now.saturating_sub(op.started_ms),
        );
        // The app's work (begin to its answer, downstream calls included),
        // the prepare round (its answer to the last vote) and the decision
        // (the last vote to now: the record write and the answer), in µs:
        // where a transaction's added latency goes.
        if let Some(v) = op.voted_us.filter(|_| op.responded_us > 0) {
            if op.started_us > 0 {
                let app = op.responded_us.saturating_sub(op.started_us);
                line.push_str(&format!(" app_us={app}"));
            }
            line.push_str(&format!(
                " prepare_us={} record_us={}",
                v.saturating_sub(op.responded_us),
                h.now_us().saturating_sub(v)
            ));
            // Of the record step, etcd's round trip as the filter saw it
            // (the write dispatched to its answer's callback).
            if op.record_sent_us > 0 && op.record_answered_us >= op.record_sent_us {
                line.push_str(&format!(
                    " etcd_us={}",
                    op.record_answered_us - op.record_sent_us
                ));
            }
        }
        if !why.is_empty() {
            line.push_str(&format!(" why=\"{why}\" by={participant}"));
        }
        h.log(LogLevel::Info, &line);
    }
}
