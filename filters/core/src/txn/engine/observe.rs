//! The transaction metrics (the decision log line is built by the root, see root.rs).

use super::*;
use crate::host::{Family, Label};
use crate::labels::TXN_LABELS;

const OUTCOME: Label = Label::named(TXN_LABELS[0]);
const REASON: Label = Label::named(TXN_LABELS[1]);

pub static DURATION: Family = Family::new(
    MetricKind::Histogram,
    "txmesh_txn_duration_milliseconds",
    &[OUTCOME],
);
pub static PARTICIPANTS: Family =
    Family::new(MetricKind::Histogram, "txmesh_txn_participants", &[]);
pub static TOTAL: Family = Family::new(MetricKind::Counter, "txmesh_txn_total", &[OUTCOME, REASON]);
pub static IN_FLIGHT: Family = Family::new(MetricKind::Gauge, "txmesh_txn_in_flight", &[]);
pub static IN_DOUBT: Family = Family::new(MetricKind::Gauge, "txmesh_txn_in_doubt", &[]);
pub static STUCK: Family = Family::new(MetricKind::Gauge, "txmesh_txn_phase2_stuck", &[]);
pub static INTERNAL_ERRORS: Family =
    Family::new(MetricKind::Counter, "txmesh_txn_internal_errors_total", &[]);

/// The txn filter's stat families.
pub static FAMILIES: [&Family; 7] = [
    &DURATION,
    &PARTICIPANTS,
    &TOTAL,
    &IN_FLIGHT,
    &IN_DOUBT,
    &STUCK,
    &INTERNAL_ERRORS,
];

impl TxnEngine {
    /// A root decided: how long it took and how many took part.
    pub(super) fn decided_metrics(
        &mut self,
        h: &impl FilterHost,
        outcome: Outcome,
        duration_ms: u64,
        participants: u64,
    ) {
        let o = outcome.as_str();
        let id = match self.metrics.duration.get(o) {
            Some(id) => Some(*id),
            None => {
                let id = h.define_metric(&DURATION, &[o]).ok();
                if let Some(id) = id {
                    self.metrics.duration.insert(o, id);
                }
                id
            }
        };
        if let Some(id) = id {
            let _ = h.record_metric(id, duration_ms);
        }
        if self.metrics.participants.is_none() {
            self.metrics.participants = h.define_metric(&PARTICIPANTS, &[]).ok();
        }
        if let Some(id) = self.metrics.participants {
            let _ = h.record_metric(id, participants);
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
                let id = h.define_metric(&TOTAL, &[o, r]).ok();
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
            self.metrics.in_flight = h.define_metric(&IN_FLIGHT, &[]).ok();
        }
        if let Some(id) = self.metrics.in_flight {
            let _ = h.increment_metric(id, delta);
        }
    }

    pub(super) fn gauge(&mut self, h: &impl FilterHost, which: Gauge, delta: i64) {
        let (slot, family) = match which {
            Gauge::InDoubt => (&mut self.metrics.in_doubt, &IN_DOUBT),
            Gauge::Stuck => (&mut self.metrics.stuck, &STUCK),
            Gauge::InternalErrors => (&mut self.metrics.internal_errors, &INTERNAL_ERRORS),
        };
        if slot.is_none() {
            *slot = h.define_metric(family, &[]).ok();
        }
        if let Some(id) = *slot {
            let _ = h.increment_metric(id, delta);
        }
    }

    /// Defines the transaction metrics up front so they show (at zero) from the start.
    pub fn define_metrics(&mut self, h: &impl FilterHost) {
        self.gauge_in_flight(h, 0);
        self.gauge(h, Gauge::InDoubt, 0);
        self.gauge(h, Gauge::Stuck, 0);
        self.gauge(h, Gauge::InternalErrors, 0);
        if self.metrics.participants.is_none() {
            self.metrics.participants = h.define_metric(&PARTICIPANTS, &[]).ok();
        }
    }
}
