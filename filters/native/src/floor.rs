//! The bench's floor (feature `floor`, never in the shipped module): a
//! filter that sets one request header and bumps one counter, so that
//! bench-filters measures, in the same run as the real filters, what Envoy's
//! dynamic-module filter and one labeled-free stat cost by themselves.

use txmesh_core::host::{Family, MetricKind, Metrics, RequestHeaders};

static FLOOR: Family = Family::new(MetricKind::Counter, "txmesh_floor_requests_total", &[]);

/// The floor's stat families.
pub static FAMILIES: [&Family; 1] = [&FLOOR];

/// The counter's id on this worker.
pub fn define(h: &impl Metrics) -> Option<u32> {
    h.define_metric(&FLOOR, &[]).ok()
}

pub fn on_request_headers(h: &(impl Metrics + RequestHeaders), counter: Option<u32>) {
    h.set_request_header("x-txmesh-floor", Some("1"));
    if let Some(id) = counter {
        let _ = h.increment_metric(id, 1);
    }
}
