//! The router driven by a fake host: registry reads, every strategy, zone
//! preference, ejection, exact replies and metrics.

use super::*;
use crate::b64;
use crate::host::{RequestHeaders, SharedData};
use crate::testhost::Host as Fake;
use std::collections::BTreeMap;

const P: &str = crate::router::registry::DEFAULT_PREFIX;

fn cfg(json: &str) -> RouterConfig {
    RouterConfig::parse(json.as_bytes()).unwrap()
}

fn engine(h: &Fake, json: &str) -> RouterEngine {
    let mut e = RouterEngine::new(cfg(json), h);
    e.define_metrics(h);
    e
}

/// An etcd range answer with these (service, address, extra JSON fields).
fn range_answer(eps: &[(&str, &str, &str)]) -> CalloutResponse {
    let kvs: Vec<String> = eps
        .iter()
        .map(|(s, a, extra)| {
            let key = format!("{P}{s}/{a}");
            let sep = if extra.is_empty() { "" } else { "," };
            let value = format!(r#"{{"address":"{a}"{sep}{extra}}}"#);
            format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                b64::encode(key.as_bytes()),
                b64::encode(value.as_bytes())
            )
        })
        .collect();
    CalloutResponse {
        status: Some(200),
        body: format!(
            r#"{{"header":{{"revision":"9"}},"kvs":[{}],"count":"{}"}}"#,
            kvs.join(","),
            eps.len()
        )
        .into_bytes(),
    }
}

/// Two endpoints of `payment`.
const TWO: &[(&str, &str, &str)] = &[
    ("payment", "10.0.0.1:80", ""),
    ("payment", "10.0.0.2:80", ""),
];

/// The endpoint the router picked for the current request.
fn picked(h: &Fake) -> String {
    String::from_utf8(h.base.request_header("x-txmesh-endpoint").unwrap()).unwrap()
}

/// Ticks once, answers the registry read the tick made, ticks again so the
/// table is picked up.
fn load(h: &Fake, e: &mut RouterEngine, eps: &[(&str, &str, &str)]) {
    h.calls.borrow_mut().clear();
    e.on_tick(h);
    let calls = std::mem::take(&mut *h.calls.borrow_mut());
    assert_eq!(calls.len(), 1, "one registry read per poll: {calls:?}");
    let (token, c) = &calls[0];
    assert_eq!(c.cluster, "etcd");
    assert_eq!(c.path, "/v3/kv/range");
    e.on_callout(h, *token, range_answer(eps));
    e.on_tick(h);
    h.advance(500);
}

fn request(h: &Fake, cluster: &str, headers: &[(&str, &str)]) {
    h.base.clear_stream();
    h.cluster_name(cluster);
    for (k, v) in headers {
        h.base.set_request_header(k, Some(v));
    }
}

/// One full request: route, `ms` pass, then log with this status.
fn route(h: &Fake, e: &mut RouterEngine, cluster: &str, status: u64, ms: u64) -> Option<String> {
    request(h, cluster, &[]);
    let (r, v) = e.on_request_headers(h, 7);
    let picked = h
        .base
        .request_header("x-txmesh-endpoint")
        .map(|b| String::from_utf8(b).unwrap());
    if let Some(r) = r {
        assert_eq!(v, Verdict::Continue);
        h.advance(ms);
        h.log_phase(status, 0);
        e.on_log(h, &r);
    }
    picked
}

fn counts(picks: impl IntoIterator<Item = Option<String>>) -> BTreeMap<String, u32> {
    let mut m = BTreeMap::new();
    for p in picks {
        *m.entry(p.unwrap_or_else(|| "none".into())).or_insert(0) += 1;
    }
    m
}

impl Fake {
    fn cluster_name(&self, c: &str) {
        self.base
            .properties
            .borrow_mut()
            .insert("xds.cluster_name".into(), c.as_bytes().to_vec());
    }
    /// The log phase's attributes. The stream's duration is the router's
    /// clock between its two callbacks (`advance`), not an attribute.
    fn log_phase(&self, status: u64, flags: u64) {
        let mut p = self.base.properties.borrow_mut();
        p.insert("response.code".into(), status.to_le_bytes().to_vec());
        p.insert("response.flags".into(), flags.to_le_bytes().to_vec());
    }
}

const RR: &str = r#"{"services":{"payment":{"strategy":"round_robin"}}}"#;

#[test]
fn polls_the_registry_and_round_robins_evenly() {
    let h = Fake::new();
    let mut e = engine(&h, RR);
    load(
        &h,
        &mut e,
        &[
            ("payment", "10.0.0.1:80", ""),
            ("payment", "10.0.0.2:80", ""),
            ("payment", "10.0.0.3:80", ""),
            ("inventory", "10.0.0.9:80", ""),
        ],
    );
    let c = counts((0..300).map(|_| route(&h, &mut e, "payment", 200, 1)));
    assert_eq!(
        c,
        BTreeMap::from([
            ("10.0.0.1:80".into(), 100),
            ("10.0.0.2:80".into(), 100),
            ("10.0.0.3:80".into(), 100)
        ])
    );
    let picks = "router_service=.=payment;.;router_endpoint=.=10.0.0.2:80;.;router_zone=.=none;.;txmesh_router_picks_total";
    assert_eq!(h.base.counter(picks), Some(100));
    let reqs = picks.replace("picks", "requests");
    assert_eq!(h.base.counter(&reqs), Some(100));
    // The registry body asks for the whole prefix.
    let gauge = "router_service=.=payment;.;txmesh_router_endpoints";
    assert!(h.base.metric_names().contains(&gauge.to_string()));
    // inventory is not routed by this router: no metrics for it.
    assert!(!h.base.metric_names().iter().any(|n| n.contains("10.0.0.9")));
    assert_eq!(h.base.counter(REGISTRY_UPDATES_TOTAL), Some(1));
}

#[test]
fn weighted_is_exact() {
    let h = Fake::new();
    let mut e = engine(&h, r#"{"services":{"payment":{"strategy":"weighted"}}}"#);
    load(
        &h,
        &mut e,
        &[
            ("payment", "10.0.0.1:80", r#""weight":90"#),
            ("payment", "10.0.0.2:80", r#""weight":10"#),
            ("payment", "10.0.0.3:80", r#""weight":0"#),
        ],
    );
    let c = counts((0..2000).map(|_| route(&h, &mut e, "payment", 200, 1)));
    assert_eq!(
        c,
        BTreeMap::from([("10.0.0.1:80".into(), 1800), ("10.0.0.2:80".into(), 200)])
    );
}

#[test]
fn no_endpoint_and_not_loaded_are_clear_503s() {
    let h = Fake::new();
    let mut e = engine(&h, RR);
    request(&h, "payment", &[]);
    let (r, v) = e.on_request_headers(&h, 3);
    assert_eq!((r, v), (None, Verdict::Pause));
    let replies = std::mem::take(&mut *h.replies.borrow_mut());
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, 3);
    assert_eq!(replies[0].1, 503);
    assert_eq!(
        replies[0].3,
        r#"{"error":"registry not read yet","service":"payment"}"#
    );
    load(&h, &mut e, &[("inventory", "10.0.0.9:80", "")]);
    request(&h, "payment", &[]);
    let (r, v) = e.on_request_headers(&h, 4);
    assert_eq!((r, v), (None, Verdict::Pause));
    let replies = std::mem::take(&mut *h.replies.borrow_mut());
    assert_eq!(
        replies[0].3,
        r#"{"error":"no endpoints","service":"payment"}"#
    );
    assert!(replies[0]
        .2
        .contains(&("x-txmesh-router".to_string(), "no-endpoint".to_string())));
    assert_eq!(
        h.base
            .counter("router_service=.=payment;.;txmesh_router_no_endpoint_total"),
        Some(2)
    );
}

#[test]
fn client_supplied_endpoint_header_never_survives() {
    let h = Fake::new();
    let mut e = engine(&h, RR);
    load(&h, &mut e, &[("payment", "10.0.0.1:80", "")]);
    // Routed: overwritten with the pick.
    request(&h, "payment", &[("x-txmesh-endpoint", "6.6.6.6:66")]);
    e.on_request_headers(&h, 1);
    assert_eq!(
        h.base.request_header("x-txmesh-endpoint").unwrap(),
        b"10.0.0.1:80"
    );
    // Not routed by this router: removed.
    request(&h, "elsewhere", &[("x-txmesh-endpoint", "6.6.6.6:66")]);
    assert_eq!(e.on_request_headers(&h, 2), (None, Verdict::Continue));
    assert_eq!(h.base.request_header("x-txmesh-endpoint"), None);
}

#[test]
fn membership_changes_follow_the_registry_and_reuse_slots() {
    let h = Fake::new();
    let mut e = engine(&h, RR);
    load(&h, &mut e, &[("payment", "10.0.0.1:80", "")]);
    load(&h, &mut e, TWO);
    let c = counts((0..10).map(|_| route(&h, &mut e, "payment", 200, 1)));
    assert_eq!(c.len(), 2);
    load(&h, &mut e, &[("payment", "10.0.0.2:80", "")]);
    let c = counts((0..10).map(|_| route(&h, &mut e, "payment", 200, 1)));
    assert_eq!(c, BTreeMap::from([("10.0.0.2:80".into(), 10)]));
    // A third instance takes the slot the first one left.
    load(
        &h,
        &mut e,
        &[
            ("payment", "10.0.0.2:80", ""),
            ("payment", "10.0.0.3:80", ""),
        ],
    );
    let table = Table::decode(&h.base.shared_get("txmesh.router.router.table").0.unwrap()).unwrap();
    let slots: Vec<_> = table
        .endpoints
        .iter()
        .map(|e| (e.address.clone(), e.slot))
        .collect();
    assert_eq!(
        slots,
        vec![("10.0.0.2:80".into(), 1), ("10.0.0.3:80".into(), 0)]
    );
    assert_eq!(table.generation, 4);
}

#[test]
fn registry_failures_keep_the_table_log_once_and_count() {
    let h = Fake::new();
    let mut e = engine(&h, RR);
    load(&h, &mut e, &[("payment", "10.0.0.1:80", "")]);
    for answer in [
        CalloutResponse {
            status: Some(503),
            body: vec![],
        },
        CalloutResponse::default(),
        CalloutResponse {
            status: Some(200),
            body: b"garbage".to_vec(),
        },
    ] {
        e.on_tick(&h);
        let (token, _) = h.calls.borrow_mut().pop().unwrap();
        e.on_callout(&h, token, answer);
        h.advance(500);
    }
    // A read nobody answers: the tick enforces the deadline.
    e.on_tick(&h);
    assert_eq!(h.calls.borrow_mut().drain(..).count(), 1);
    h.advance(1000);
    e.on_tick(&h);
    assert_eq!(h.base.counter(REGISTRY_ERRORS_TOTAL), Some(4));
    let warns: Vec<_> = h
        .logs
        .borrow()
        .iter()
        .filter(|l| l.starts_with("registry unreachable"))
        .cloned()
        .collect();
    assert_eq!(
        warns,
        vec!["registry unreachable (cluster etcd: etcd answered 503); keeping the last table: 1 endpoints, generation 1"]
    );
    assert_eq!(
        route(&h, &mut e, "payment", 200, 1).as_deref(),
        Some("10.0.0.1:80")
    );
    // The tick that gave up on the read started the next one; it answers.
    let (token, _) = h.calls.borrow_mut().pop().unwrap();
    e.on_callout(&h, token, range_answer(&[("payment", "10.0.0.1:80", "")]));
    assert!(h
        .logs
        .borrow()
        .iter()
        .any(|l| l == "registry reachable again"));
    assert_eq!(h.base.counter(REGISTRY_ERRORS_TOTAL), Some(4));
}

#[test]
fn one_poller_per_process() {
    let h = Fake::new();
    let mut a = engine(&h, RR);
    let mut b = engine(&h, RR);
    a.on_tick(&h);
    b.on_tick(&h);
    let calls = std::mem::take(&mut *h.calls.borrow_mut());
    assert_eq!(calls.len(), 1);
    a.on_callout(
        &h,
        calls[0].0,
        range_answer(&[("payment", "10.0.0.1:80", "")]),
    );
    b.on_tick(&h);
    assert_eq!(
        route(&h, &mut b, "payment", 200, 1).as_deref(),
        Some("10.0.0.1:80")
    );
    // The poller's lease runs out without renewal: b takes over.
    h.advance(1_600);
    b.on_tick(&h);
    assert_eq!(h.calls.borrow().len(), 1);
}

#[test]
fn a_following_engine_refreshes_from_its_requests_and_never_polls() {
    let h = Fake::new();
    let mut poller = engine(&h, RR);
    let mut follower = engine(&h, RR).following();
    // Before anything is published: its refresh finds no table, a clear 503.
    assert_eq!(route(&h, &mut follower, "payment", 200, 1), None);
    // The poller publishes, no time passes: the shared data changed, so the
    // follower's next request reads the table and routes.
    poller.on_tick(&h);
    let calls = std::mem::take(&mut *h.calls.borrow_mut());
    assert_eq!(calls.len(), 1);
    poller.on_callout(&h, calls[0].0, range_answer(TWO));
    assert!(route(&h, &mut follower, "payment", 200, 1).is_some());
    // Nothing written since and within the tick: not one shared-data call.
    let before = *h.base.shared_calls.borrow();
    assert!(route(&h, &mut follower, "payment", 200, 1).is_some());
    assert_eq!(*h.base.shared_calls.borrow(), before);
    // A tick later it refreshes (its gauges), still without a write.
    h.advance(TICK_MS);
    assert!(route(&h, &mut follower, "payment", 200, 1).is_some());
    assert!(*h.base.shared_calls.borrow() > before);
    // Long past the poller's lease: a follower never calls etcd.
    h.advance(10_000);
    let picks: Vec<_> = (0..4)
        .map(|_| route(&h, &mut follower, "payment", 200, 1))
        .collect();
    assert!(h.calls.borrow().is_empty(), "{:?}", h.calls.borrow());
    assert_eq!(
        counts(picks),
        BTreeMap::from([("10.0.0.1:80".into(), 2), ("10.0.0.2:80".into(), 2)])
    );
}

#[test]
fn ejection_after_consecutive_failures_then_return() {
    let h = Fake::new();
    let mut e = engine(
        &h,
        r#"{"services":{"payment":{"strategy":"round_robin","outlier":{"consecutive_failures":3,"base_ejection_ms":1000}}}}"#,
    );
    load(&h, &mut e, TWO);
    // .1 fails every time, .2 succeeds.
    let mut seen = Vec::new();
    for _ in 0..20 {
        request(&h, "payment", &[]);
        let (r, _) = e.on_request_headers(&h, 1);
        let r = r.unwrap();
        let ep = picked(&h);
        let status = if ep == "10.0.0.1:80" { 503 } else { 200 };
        h.advance(1);
        h.log_phase(status, 0);
        e.on_log(&h, &r);
        seen.push(ep);
    }
    let bad = seen.iter().filter(|s| *s == "10.0.0.1:80").count();
    assert_eq!(bad, 3, "{seen:?}");
    let l = "router_service=.=payment;.;router_endpoint=.=10.0.0.1:80;.;router_zone=.=none;.;";
    assert_eq!(
        h.base.counter(&format!("{l}txmesh_router_ejections_total")),
        Some(1)
    );
    assert_eq!(
        h.base.counter(&format!("{l}txmesh_router_errors_total")),
        Some(3)
    );
    assert!(h.logs.borrow().iter().any(|m| m
        == "ejected payment endpoint 10.0.0.1:80 for 1000 ms (ejection 1 in a row) after 3 consecutive failures"));
    // Another worker sees the ejection at its next tick.
    let mut other = engine(&h, RR);
    other.on_tick(&h);
    let c = counts((0..4).map(|_| route(&h, &mut other, "payment", 200, 1)));
    assert_eq!(c, BTreeMap::from([("10.0.0.2:80".into(), 4)]));
    // After the ejection time it is back.
    h.advance(1000);
    let c = counts((0..4).map(|_| route(&h, &mut e, "payment", 200, 1)));
    assert_eq!(c.get("10.0.0.1:80"), Some(&2));
}

#[test]
fn ejection_cap_and_panic_mode() {
    let h = Fake::new();
    let mut e = engine(
        &h,
        r#"{"services":{"payment":{"strategy":"round_robin","outlier":{"consecutive_failures":1,"max_ejection_percent":50}}}}"#,
    );
    load(&h, &mut e, TWO);
    // Both fail: only one may be ejected (50% of 2).
    for _ in 0..10 {
        route(&h, &mut e, "payment", 503, 1);
    }
    let ejections: i64 = ["10.0.0.1:80", "10.0.0.2:80"]
        .iter()
        .map(|a| {
            h.base
                .counter(&format!("router_service=.=payment;.;router_endpoint=.={a};.;router_zone=.=none;.;txmesh_router_ejections_total"))
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(ejections, 1);
    // One endpoint, ejected: still picked (better than nothing).
    let mut one = engine(
        &h,
        r#"{"name":"solo","services":{"payment":{"strategy":"random","outlier":{"consecutive_failures":1}}}}"#,
    );
    load(&h, &mut one, &[("payment", "10.0.0.7:80", "")]);
    route(&h, &mut one, "payment", 503, 1);
    assert_eq!(
        route(&h, &mut one, "payment", 200, 1).as_deref(),
        Some("10.0.0.7:80")
    );
}

#[test]
fn zone_preference_keeps_local_and_spills_over() {
    let h = Fake::new();
    let mut e = engine(
        &h,
        r#"{"local_zone":"z1","services":{"payment":{"strategy":"round_robin","zone_preference":true,"outlier":{"consecutive_failures":2,"max_ejection_percent":100}}}}"#,
    );
    load(
        &h,
        &mut e,
        &[
            ("payment", "10.0.0.1:80", r#""zone":"z1""#),
            ("payment", "10.0.0.2:80", r#""zone":"z1""#),
            ("payment", "10.0.0.3:80", r#""zone":"z2""#),
        ],
    );
    let c = counts((0..10).map(|_| route(&h, &mut e, "payment", 200, 1)));
    assert_eq!(
        c,
        BTreeMap::from([("10.0.0.1:80".into(), 5), ("10.0.0.2:80".into(), 5)])
    );
    // Both local endpoints fail twice: ejected, traffic spills to z2.
    for _ in 0..4 {
        route(&h, &mut e, "payment", 503, 1);
    }
    let c = counts((0..6).map(|_| route(&h, &mut e, "payment", 200, 1)));
    assert_eq!(c, BTreeMap::from([("10.0.0.3:80".into(), 6)]));
    let zone_label = "router_service=.=payment;.;router_endpoint=.=10.0.0.3:80;.;router_zone=.=z2;.;txmesh_router_picks_total";
    assert_eq!(h.base.counter(zone_label), Some(6));
}

#[test]
fn zone_spill_over_when_local_is_saturated() {
    let h = Fake::new();
    let mut e = engine(
        &h,
        r#"{"local_zone":"z1","services":{"payment":{"strategy":"round_robin","zone_preference":true,"spill_over_pending":2}}}"#,
    );
    load(
        &h,
        &mut e,
        &[
            ("payment", "10.0.0.1:80", r#""zone":"z1""#),
            ("payment", "10.0.0.3:80", r#""zone":"z2""#),
        ],
    );
    // Two in flight on the local endpoint (never logged): the third spills.
    let mut picks = Vec::new();
    for _ in 0..3 {
        request(&h, "payment", &[]);
        e.on_request_headers(&h, 1).0.unwrap();
        picks.push(picked(&h));
    }
    assert_eq!(picks, vec!["10.0.0.1:80", "10.0.0.1:80", "10.0.0.3:80"]);
}

#[test]
fn least_request_prefers_the_idle_endpoint() {
    let h = Fake::new();
    let mut e = engine(
        &h,
        r#"{"services":{"payment":{"strategy":"least_request"}}}"#,
    );
    load(&h, &mut e, TWO);
    // Requests that never finish pile up: picks alternate, keeping both level.
    let mut inflight = BTreeMap::new();
    for _ in 0..10 {
        request(&h, "payment", &[]);
        e.on_request_headers(&h, 1).0.unwrap();
        let ep = picked(&h);
        *inflight.entry(ep).or_insert(0) += 1;
    }
    assert_eq!(
        inflight,
        BTreeMap::from([
            ("10.0.0.1:80".to_string(), 5),
            ("10.0.0.2:80".to_string(), 5)
        ])
    );
}

#[test]
fn peak_ewma_starves_the_slow_endpoint() {
    let h = Fake::new();
    let mut e = engine(&h, r#"{"services":{"payment":{"strategy":"peak_ewma"}}}"#);
    load(
        &h,
        &mut e,
        &[
            ("payment", "10.0.0.1:80", ""),
            ("payment", "10.0.0.2:80", ""),
            ("payment", "10.0.0.3:80", ""),
            ("payment", "10.0.0.4:80", ""),
            ("payment", "10.0.0.5:80", ""),
        ],
    );
    let mut picks = Vec::new();
    for _ in 0..1000 {
        request(&h, "payment", &[]);
        let (r, _) = e.on_request_headers(&h, 1);
        let r = r.unwrap();
        let ep = picked(&h);
        let ms = if ep == "10.0.0.1:80" { 55 } else { 5 };
        h.advance(ms);
        h.log_phase(200, 0);
        e.on_log(&h, &r);
        picks.push(Some(ep));
    }
    let c = counts(picks);
    let slow = c["10.0.0.1:80"];
    assert!(slow < 40, "slow endpoint got {slow} of 1000: {c:?}");
    // The estimate is published as a gauge every tick.
    e.on_tick(&h);
    let g = "router_service=.=payment;.;router_endpoint=.=10.0.0.1:80;.;router_zone=.=none;.;txmesh_router_ewma_latency_milliseconds";
    assert!(h.base.histogram(g).unwrap().last().copied().unwrap() >= 40);
}

#[test]
fn authority_mode_strips_the_port() {
    let h = Fake::new();
    let mut e = engine(
        &h,
        r#"{"service_from":"authority","services":{"payment":{"strategy":"random"}}}"#,
    );
    load(&h, &mut e, &[("payment", "10.0.0.1:80", "")]);
    request(&h, "shared", &[(":authority", "payment:8080")]);
    assert!(e.on_request_headers(&h, 1).0.is_some());
    request(&h, "shared", &[(":authority", "payment")]);
    assert!(e.on_request_headers(&h, 1).0.is_some());
    request(&h, "shared", &[(":authority", "other:8080")]);
    assert!(e.on_request_headers(&h, 1).0.is_none());
}

#[test]
fn invalid_registry_entries_are_skipped_and_logged() {
    let h = Fake::new();
    let mut e = engine(&h, RR);
    load(
        &h,
        &mut e,
        &[("payment", "10.0.0.1:80", ""), ("payment", "nowhere", "")],
    );
    assert!(h.logs.borrow().iter().any(|l| l
        == "registry: 1 invalid entries ignored, first: txmesh/services/payment/nowhere: address \"nowhere\" is not ip:port"));
    assert_eq!(
        route(&h, &mut e, "payment", 200, 1).as_deref(),
        Some("10.0.0.1:80")
    );
}

#[test]
fn in_flight_requests_carry_their_start_time() {
    let h = Fake::new();
    let mut e = engine(&h, r#"{"services":{"payment":{"strategy":"peak_ewma"}}}"#);
    load(&h, &mut e, &[("payment", "10.0.0.1:80", "")]);
    let at = h.now.get();
    request(&h, "payment", &[]);
    let r = e.on_request_headers(&h, 1).0.unwrap();
    let ep = |e: &RouterEngine| e.services[0].eps[0].load.clone();
    assert_eq!((ep(&e).pending, ep(&e).pending_since_sum_ms), (1, at));
    h.advance(40);
    h.log_phase(200, 0);
    e.on_log(&h, &r);
    assert_eq!((ep(&e).pending, ep(&e).pending_since_sum_ms), (0, 0));
    assert_eq!(ep(&e).ewma_us, 40_000);
}

#[test]
fn a_wall_clock_step_neither_skews_a_sample_nor_ends_an_ejection() {
    let h = Fake::new();
    let mut e = engine(
        &h,
        r#"{"services":{"payment":{"strategy":"peak_ewma","outlier":{"consecutive_failures":1}}}}"#,
    );
    load(&h, &mut e, TWO);
    request(&h, "payment", &[]);
    let r = e.on_request_headers(&h, 1).0.unwrap();
    let first = picked(&h);
    let i = e.services[0]
        .eps
        .iter()
        .position(|p| p.address == first)
        .unwrap();
    // The wall clock jumps an hour while the request runs 40 ms.
    h.step_wall(3_600_000);
    h.advance(40);
    h.log_phase(200, 0);
    e.on_log(&h, &r);
    assert_eq!(e.services[0].eps[i].load.ewma_us, 40_000);
    // The other endpoint fails once: ejected; another hour's step on the
    // wall clock does not end its ejection.
    let other = if first == "10.0.0.1:80" {
        "10.0.0.2:80"
    } else {
        "10.0.0.1:80"
    };
    loop {
        request(&h, "payment", &[]);
        let r = e.on_request_headers(&h, 1).0.unwrap();
        let ep = picked(&h);
        h.advance(1);
        h.log_phase(if ep == other { 503 } else { 200 }, 0);
        e.on_log(&h, &r);
        if ep == other {
            break;
        }
    }
    h.step_wall(3_600_000);
    let c = counts((0..20).map(|_| route(&h, &mut e, "payment", 200, 1)));
    assert_eq!(c, BTreeMap::from([(first, 20)]), "{other} stays ejected");
}

#[test]
fn healthy_requests_make_no_shared_data_calls() {
    let h = Fake::new();
    let mut e = engine(
        &h,
        r#"{"services":{"payment":{"strategy":"peak_ewma","outlier":{"consecutive_failures":2}}}}"#,
    );
    load(&h, &mut e, TWO);
    let before = *h.base.shared_calls.borrow();
    for _ in 0..100 {
        assert!(route(&h, &mut e, "payment", 200, 3).is_some());
    }
    assert_eq!(
        *h.base.shared_calls.borrow(),
        before,
        "picks and logs stay in the worker"
    );
    // A failure is shared (read + CAS write), and so is the success that
    // resets its count; after that, nothing again.
    let mut calls = Vec::new();
    for status in [503, 200, 200] {
        let n = *h.base.shared_calls.borrow();
        // Route to .1 only: make it the cheaper one by far.
        e.services[0].eps[1].load.ewma_us = 1_000_000;
        e.services[0].eps[1].load.stamp_ms = h.now.get();
        assert_eq!(
            route(&h, &mut e, "payment", status, 3).as_deref(),
            Some("10.0.0.1:80")
        );
        calls.push(*h.base.shared_calls.borrow() - n);
    }
    assert_eq!(calls, [2, 2, 0]);
}
