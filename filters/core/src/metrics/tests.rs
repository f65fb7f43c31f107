use super::*;
use crate::host::fake::FakeHost;

fn cfg(json: &str) -> MetricsConfig {
    MetricsConfig::parse(json.as_bytes()).unwrap()
}

fn stream_host(cluster: &str, code: u64, flags: u64) -> FakeHost {
    FakeHost::new()
        .prop(&["xds", "cluster_name"], cluster.as_bytes())
        .prop_u64(&["response", "code"], code)
        .prop_u64(&["response", "flags"], flags)
        .prop_u64(&["request", "size"], 10)
        .prop_u64(&["response", "size"], 2048)
}

const OUT_200: &str = "reporter=.=outbound;.;source_workload=.=order;.;destination_service=.=payment;.;response_code=.=200;.;response_flags=.=-;.;request_protocol=.=http;.;grpc_response_status=.=;.;";

#[test]
fn config_defaults_and_validation() {
    let c = cfg("");
    assert_eq!(c.reporter, None);
    assert_eq!(c.max_label_tuples, DEFAULT_MAX_LABEL_TUPLES);
    assert!(c.peer_header);

    let e = MetricsConfig::parse(br#"{"reporter": "sideways"}"#).unwrap_err();
    assert_eq!(e.path, "reporter");
    assert!(e.message.contains("unknown variant `sideways`"), "{e}");

    let e = MetricsConfig::parse(br#"{"max_label_tuple": 3}"#).unwrap_err();
    assert_eq!(e.path, "max_label_tuple");
    assert!(e.message.contains("unknown field"), "{e}");

    let e = MetricsConfig::parse(br#"{"max_label_tuples": 0}"#).unwrap_err();
    assert_eq!(
        e.to_string(),
        "at `max_label_tuples`: must be between 1 and 100000, got 0"
    );

    let e = MetricsConfig::parse(br#"{"workload": "a b"}"#).unwrap_err();
    assert_eq!(e.path, "workload");

    let e = MetricsConfig::parse(br#"{"destination_services": {"pay": "x;y"}}"#).unwrap_err();
    assert_eq!(e.path, "destination_services.pay");
}

#[test]
fn workload_from_config_then_node_metadata_then_unknown() {
    let host = FakeHost::new().prop(&["xds", "node", "metadata", "WORKLOAD_NAME"], b"inventory");
    let e = MetricsEngine::new(cfg(r#"{"workload":"order"}"#), &host).unwrap();
    assert_eq!(e.workload(), "order");
    let e = MetricsEngine::new(cfg("{}"), &host).unwrap();
    assert_eq!(e.workload(), "inventory");
    let e = MetricsEngine::new(cfg("{}"), &FakeHost::new()).unwrap();
    assert_eq!(e.workload(), "unknown");
}

#[test]
fn outbound_sets_peer_header_and_records_one_tuple() {
    let root = FakeHost::new();
    let mut engine =
        MetricsEngine::new(cfg(r#"{"reporter":"outbound","workload":"order"}"#), &root).unwrap();
    for _ in 0..3 {
        let s = stream_host("payment", 200, 0).header(PEER_HEADER, b"forged");
        s.clock_us.set(1_700_000_000_000_000);
        s.monotonic_us.set(5_000_000);
        let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
        assert_eq!(s.header_value(PEER_HEADER).unwrap(), b"order");
        // The duration is the monotonic clock's, in whole ms: a wall clock
        // stepped back an hour meanwhile changes nothing.
        s.clock_us.set(1_700_000_000_000_000 - 3_600_000_000);
        s.monotonic_us.set(5_012_999);
        let obs = st.observe(&engine, &s);
        assert_eq!(obs.duration_ms, 12);
        assert!(!engine.record(&root, &obs).unwrap());
    }
    assert_eq!(root.counter(&format!("{OUT_200}{REQUESTS_TOTAL}")), Some(3));
    assert_eq!(
        root.histogram(&format!("{OUT_200}{RESPONSE_BYTES}")),
        Some(vec![2048, 2048, 2048])
    );
    assert_eq!(
        root.histogram(&format!("{OUT_200}{REQUEST_DURATION}")),
        Some(vec![12, 12, 12])
    );
    // 1 overflow counter + 4 stats for the tuple, defined once each.
    assert_eq!(*root.define_calls.borrow(), 5);
}

#[test]
fn inbound_reads_and_removes_peer_header_and_maps_cluster() {
    let root = FakeHost::new();
    let engine = MetricsEngine::new(
        cfg(r#"{"reporter":"inbound","workload":"payment","destination_services":{"local_app":"payment-api"}}"#),
        &root,
    )
    .unwrap();
    let s = stream_host("local_app", 503, 0x2)
        .header(PEER_HEADER, b"ord er")
        .header("content-type", b"application/grpc+proto");
    let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
    assert_eq!(s.header_value(PEER_HEADER), None);
    let obs = st.observe(&engine, &s);
    assert_eq!(obs.source_workload, "ord_er");
    assert_eq!(obs.destination_service, "payment-api");
    assert_eq!(obs.response_code, 503);
    assert_eq!(obs.response_flags, "UH");
    assert_eq!(obs.request_protocol, "grpc");
    // No grpc-status at all (the call broke): said so.
    assert_eq!(obs.grpc_response_status, "unknown");

    // Unmapped inbound cluster: the destination is this workload.
    let s = stream_host("other_cluster", 200, 0);
    let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
    let obs = st.observe(&engine, &s);
    assert_eq!(obs.destination_service, "payment");
    assert_eq!(obs.source_workload, "unknown");
}

#[test]
fn a_stream_first_seen_at_the_log_phase_is_recorded() {
    let engine = MetricsEngine::new(
        cfg(r#"{"reporter":"inbound","workload":"payment"}"#),
        &FakeHost::new(),
    )
    .unwrap();
    // An earlier filter denied it: the request headers are as they came.
    let s = stream_host("local_app", 403, 0)
        .header(PEER_HEADER, b"intruder")
        .prop(&["request", "duration"], &7_900_000i64.to_le_bytes());
    s.monotonic_us.set(99_000_000);
    let st = MetricsStream::at_log(&engine, &s).unwrap();
    assert_eq!(
        s.header_value(PEER_HEADER).as_deref(),
        Some(&b"intruder"[..])
    );
    let obs = st.observe(&engine, &s);
    assert_eq!(obs.source_workload, "intruder");
    assert_eq!(obs.destination_service, "payment");
    assert_eq!(obs.response_code, 403);
    // The duration is the attribute's (7.9 ms), not the clock's.
    assert_eq!(obs.duration_ms, 7);

    // Outbound: this workload is the source, and nothing is set on a
    // request that is over; no duration attribute (a reset before the
    // headers were complete) is 0 ms.
    let engine = MetricsEngine::new(
        cfg(r#"{"reporter":"outbound","workload":"order"}"#),
        &FakeHost::new(),
    )
    .unwrap();
    let s = stream_host("payment", 0, 0);
    let obs = MetricsStream::at_log(&engine, &s)
        .unwrap()
        .observe(&engine, &s);
    assert_eq!(s.header_value(PEER_HEADER), None);
    assert_eq!(
        (
            obs.source_workload.as_str(),
            obs.response_code,
            obs.duration_ms
        ),
        ("order", 0, 0)
    );
}

#[test]
fn finish_records_a_stream_the_filter_first_sees_at_the_log_phase() {
    let mut engine = MetricsEngine::new(
        cfg(r#"{"reporter":"outbound","workload":"order"}"#),
        &FakeHost::new(),
    )
    .unwrap();
    let s =
        stream_host("payment", 200, 0).prop(&["request", "duration"], &12_000_000i64.to_le_bytes());
    assert_eq!(engine.finish(&s, None).unwrap(), Some(false));
    assert_eq!(s.counter(&format!("{OUT_200}{REQUESTS_TOTAL}")), Some(1));
    assert_eq!(
        s.histogram(&format!("{OUT_200}{REQUEST_DURATION}")),
        Some(vec![12])
    );
    // No reporter (no config, no listener direction): not recorded.
    let mut engine = MetricsEngine::new(cfg("{}"), &FakeHost::new()).unwrap();
    assert_eq!(engine.finish(&s, None).unwrap(), None);
}

#[test]
fn reporter_from_listener_direction() {
    let engine = MetricsEngine::new(cfg("{}"), &FakeHost::new()).unwrap();
    let s = FakeHost::new().prop_u64(&["xds", "listener_direction"], 1);
    let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
    assert_eq!(st.reporter, Reporter::Inbound);
    let s = FakeHost::new().prop_u64(&["xds", "listener_direction"], 2);
    let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
    assert_eq!(st.reporter, Reporter::Outbound);
    // Unspecified direction and no config: not recorded.
    let s = FakeHost::new().prop_u64(&["xds", "listener_direction"], 0);
    assert!(MetricsStream::on_request_headers(&engine, &s).is_none());
    assert!(MetricsStream::on_request_headers(&engine, &FakeHost::new()).is_none());
}

#[test]
fn no_cluster_outbound_is_unknown() {
    let engine = MetricsEngine::new(
        cfg(r#"{"reporter":"outbound","workload":"order"}"#),
        &FakeHost::new(),
    )
    .unwrap();
    let s = FakeHost::new()
        .prop_u64(&["response", "code"], 404)
        .prop_u64(&["response", "flags"], 0x100);
    s.monotonic_us.set(10_000_000);
    let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
    // A clock reading earlier at the end (a host whose monotonic clock is
    // not) gives 0, not a wrapped-around duration.
    s.monotonic_us.set(9_995_000);
    let obs = st.observe(&engine, &s);
    assert_eq!(obs.destination_service, "unknown");
    assert_eq!(obs.response_flags, "NR");
    assert_eq!(obs.duration_ms, 0);
}

fn record_to(engine: &mut MetricsEngine, root: &FakeHost, cluster: &str) -> bool {
    let s = stream_host(cluster, 200, 0);
    let st = MetricsStream::on_request_headers(engine, &s).unwrap();
    let obs = st.observe(engine, &s);
    engine.record(root, &obs).unwrap()
}

#[test]
fn tuple_bound_sends_the_rest_to_overflow() {
    let root = FakeHost::new();
    let c = cfg(r#"{"reporter":"outbound","workload":"order","max_label_tuples":2}"#);
    let mut engine = MetricsEngine::new(c, &root).unwrap();
    let overflowed: Vec<bool> = ["a", "b", "c", "d", "e", "a", "c"]
        .iter()
        .map(|d| record_to(&mut engine, &root, d))
        .collect();
    assert_eq!(overflowed, [false, false, true, true, true, false, true]);
    assert_eq!(root.counter(OVERFLOW_TOTAL), Some(4));
    let request_stats: Vec<String> = root
        .metric_names()
        .into_iter()
        .filter(|n| n.ends_with(REQUESTS_TOTAL))
        .collect();
    assert_eq!(request_stats.len(), 3, "{request_stats:?}");
    let other = "reporter=.=outbound;.;source_workload=.=other;.;destination_service=.=other;.;response_code=.=other;.;response_flags=.=other;.;request_protocol=.=other;.;grpc_response_status=.=other;.;txmesh_requests_total";
    assert_eq!(root.counter(other), Some(4));
}

#[test]
fn bound_is_shared_across_workers() {
    // Two engines (two workers) over the same shared data.
    let root = FakeHost::new();
    let c = cfg(r#"{"reporter":"outbound","workload":"order","max_label_tuples":2}"#);
    let mut w1 = MetricsEngine::new(c.clone(), &root).unwrap();
    let mut w2 = MetricsEngine::new(c, &root).unwrap();
    assert!(!record_to(&mut w1, &root, "a"));
    assert!(!record_to(&mut w2, &root, "b"));
    // Worker 1 has never seen "b" but finds it admitted in shared data.
    assert!(!record_to(&mut w1, &root, "b"));
    assert!(record_to(&mut w1, &root, "c"));
    assert!(record_to(&mut w2, &root, "c"));
}

#[test]
fn cas_contention_retries_then_admits() {
    let root = FakeHost::new();
    *root.cas_failures.borrow_mut() = 3;
    let c = cfg(r#"{"reporter":"outbound","workload":"order","max_label_tuples":5}"#);
    let mut engine = MetricsEngine::new(c, &root).unwrap();
    assert!(!record_to(&mut engine, &root, "a"));
    // Persistent contention: gives up and overflows rather than spin.
    *root.cas_failures.borrow_mut() = 1000;
    assert!(record_to(&mut engine, &root, "b"));
}

#[test]
fn a_bodyless_request_records_zero_request_bytes() {
    let engine = MetricsEngine::new(
        cfg(r#"{"reporter":"inbound","workload":"payment"}"#),
        &FakeHost::new(),
    )
    .unwrap();
    // The host claims 10 request bytes; a request that ended with its
    // headers has none, and its size is not read.
    let s = stream_host("local_app", 200, 0);
    let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
    assert_eq!(st.observe(&engine, &s).request_bytes, 10);
    let st = st.bodyless();
    assert_eq!(st.observe(&engine, &s).request_bytes, 0);
    assert_eq!(st.observe(&engine, &s).response_bytes, 2048);
}

#[test]
fn grpc_requests_carry_their_final_status() {
    let mut engine = MetricsEngine::new(
        cfg(r#"{"reporter":"outbound","workload":"order"}"#),
        &FakeHost::new(),
    )
    .unwrap();
    let s = stream_host("payment", 200, 0)
        .header("content-type", b"application/grpc")
        .prop_u64(&["response", "grpc_status"], 13);
    let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
    let obs = st.observe(&engine, &s);
    assert_eq!(
        (obs.request_protocol, obs.grpc_response_status.as_str()),
        ("grpc", "13")
    );
    engine.record(&s, &obs).unwrap();
    let grpc_13 = "reporter=.=outbound;.;source_workload=.=order;.;destination_service=.=payment;.;response_code=.=200;.;response_flags=.=-;.;request_protocol=.=grpc;.;grpc_response_status=.=13;.;";
    assert_eq!(s.counter(&format!("{grpc_13}{REQUESTS_TOTAL}")), Some(1));
    // HTTP: the label is empty (absent in Prometheus), and the attribute
    // is not read.
    let s = stream_host("payment", 200, 0).prop_u64(&["response", "grpc_status"], 13);
    let st = MetricsStream::on_request_headers(&engine, &s).unwrap();
    assert_eq!(st.observe(&engine, &s).grpc_response_status, "");
}
