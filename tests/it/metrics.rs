//! txmesh_metrics.wasm on real Envoy: exact counts under exact labels.

use serde_json::json;
use txmesh_tests::{Client, Filter, Scrape, Sidecar, Upstream};

const REQ: &str = "txmesh_requests_total";

fn labels<'a>(
    reporter: &'a str,
    source: &'a str,
    dest: &'a str,
    code: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("reporter", reporter),
        ("source_workload", source),
        ("destination_service", dest),
        ("response_code", code),
        ("response_flags", "-"),
        ("request_protocol", "http"),
    ]
}

/// `txmesh_requests_total` under (reporter, source, destination, code),
/// no flags, HTTP.
fn requests(s: &Scrape, [r, src, dst, code]: [&str; 4]) -> f64 {
    s.value(REQ, &labels(r, src, dst, code))
}

#[test]
fn scripted_mix_is_counted_exactly_on_both_sidecars() {
    let app = Upstream::start();
    // payment's sidecar: reporter and workload come from the listener
    // direction and node metadata (no plugin config).
    let payment = Sidecar::new("payment")
        .app(&app)
        .filter(Filter::metrics(json!({})))
        .start();
    let order = Sidecar::new("order")
        .route("payment", &[payment.inbound_addr()])
        .filter(Filter::metrics(json!({"workload": "order"})))
        .start();

    let c = Client::new();
    let body = vec![b'r'; 120];
    let send = |status: &str, n: usize| {
        for _ in 0..n {
            let r = c.must(
                "POST",
                &order.outbound_url("/pay"),
                &[
                    ("host", "payment"),
                    ("x-test-status", status),
                    ("x-test-delay-ms", "50"),
                    ("x-test-body-size", "300"),
                    // A client cannot forge who it is: the outbound sidecar overwrites it.
                    ("x-txmesh-source-workload", "mallory"),
                ],
                &body,
            );
            assert_eq!(r.status.to_string(), status);
            assert_eq!(r.body.len(), 300);
        }
    };
    send("200", 7);
    send("503", 3);
    send("404", 2);
    // Two requests straight to payment's inbound listener: no calling sidecar.
    for _ in 0..2 {
        let r = c.must("GET", &payment.inbound_url("/direct"), &[], b"");
        assert_eq!(r.status, 200);
    }

    // The app never sees the exchange header, and saw every request once.
    assert_eq!(app.count(), 14);
    assert!(app
        .requests()
        .iter()
        .all(|r| r.header("x-txmesh-source-workload").is_none()));

    let out = order.scrape_until("outbound histograms", |s| {
        s.sum(
            "txmesh_request_duration_milliseconds_count",
            &[("reporter", "outbound")],
        ) == 12.0
    });
    assert_eq!(requests(&out, ["outbound", "order", "payment", "200"]), 7.0);
    assert_eq!(requests(&out, ["outbound", "order", "payment", "503"]), 3.0);
    assert_eq!(requests(&out, ["outbound", "order", "payment", "404"]), 2.0);
    assert_eq!(out.find(REQ, &[]).len(), 3, "{}", out.text_of(REQ));
    assert_eq!(out.value("txmesh_metrics_label_overflow_total", &[]), 0.0);

    let ok = labels("outbound", "order", "payment", "200");
    assert_eq!(
        out.value("txmesh_request_duration_milliseconds_count", &ok),
        7.0
    );
    let dur = out.value("txmesh_request_duration_milliseconds_sum", &ok);
    assert!(
        dur >= 7.0 * 50.0,
        "duration sum {dur} < 7 x 50 ms injected delay"
    );
    // 120-byte request bodies: all in (100, 250]; 300-byte responses: all in (250, 500].
    let bucket = |m: &str, le: &str| {
        let mut l = ok.clone();
        l.push(("le", le));
        out.value(m, &l)
    };
    assert_eq!(bucket("txmesh_request_bytes_bucket", "100"), 0.0);
    assert_eq!(bucket("txmesh_request_bytes_bucket", "250"), 7.0);
    assert_eq!(bucket("txmesh_response_bytes_bucket", "250"), 0.0);
    assert_eq!(bucket("txmesh_response_bytes_bucket", "500"), 7.0);
    // Envoy's histograms keep two significant digits (log-linear bins of
    // width 10 between 100 and 1000): a sum is exact to within 5%.
    let approx = |m: &str, want: f64| {
        let got = out.value(m, &ok);
        assert!(
            (got - want).abs() <= want * 0.05,
            "{m} = {got}, sent {want}"
        );
    };
    approx("txmesh_response_bytes_sum", 7.0 * 300.0);
    approx("txmesh_request_bytes_sum", 7.0 * 120.0);

    let inb = payment.scrape_until("inbound histograms", |s| {
        s.sum("txmesh_request_duration_milliseconds_count", &[]) == 14.0
    });
    assert_eq!(requests(&inb, ["inbound", "order", "payment", "200"]), 7.0);
    assert_eq!(requests(&inb, ["inbound", "order", "payment", "503"]), 3.0);
    assert_eq!(requests(&inb, ["inbound", "order", "payment", "404"]), 2.0);
    assert_eq!(
        requests(&inb, ["inbound", "unknown", "payment", "200"]),
        2.0
    );
    assert_eq!(inb.find(REQ, &[]).len(), 4, "{}", inb.text_of(REQ));
    assert!(inb.find(REQ, &[("source_workload", "mallory")]).is_empty());
}

#[test]
fn no_healthy_upstream_is_counted_with_uh() {
    let sidecar = Sidecar::new("order")
        .route("ghost", &[])
        .filter(Filter::metrics(json!({"workload": "order"})))
        .start();
    let c = Client::new();
    for _ in 0..2 {
        let r = c.must("GET", &sidecar.outbound_url("/"), &[("host", "ghost")], b"");
        assert_eq!(r.status, 503);
    }
    let s = sidecar.scrape_until("the UH request count", |s| s.sum(REQ, &[]) == 2.0);
    let l = [
        ("reporter", "outbound"),
        ("source_workload", "order"),
        ("destination_service", "ghost"),
        ("response_code", "503"),
        ("response_flags", "UH"),
        ("request_protocol", "http"),
    ];
    assert_eq!(s.value(REQ, &l), 2.0);
}

#[test]
fn requests_an_earlier_filter_answers_are_counted_too() {
    // As the shop's inbound sidecars run them: authz before metrics. A denial
    // never reaches the metrics filter's request-headers callback; it is
    // recorded at the log phase all the same.
    let app = Upstream::start();
    let payment = Sidecar::new("payment")
        .app(&app)
        .inbound_filter(Filter::authz(json!({
            "default": "allow",
            "rules": [{"name": "no-admin", "action": "deny", "paths": ["/admin"]}],
        })))
        .inbound_filter(Filter::metrics(
            json!({"workload": "payment", "reporter": "inbound"}),
        ))
        .start();
    let c = Client::new();
    let peer = [("x-txmesh-source-workload", "order")];
    for _ in 0..2 {
        let r = c.must("GET", &payment.inbound_url("/admin/users"), &peer, b"");
        assert_eq!(r.status, 403);
    }
    for _ in 0..3 {
        let r = c.must("GET", &payment.inbound_url("/pay"), &peer, b"");
        assert_eq!(r.status, 200);
    }
    assert_eq!(app.count(), 3);
    // Histograms reach the admin endpoint at a stats flush.
    let s = payment.scrape_until("five requests and their durations", |s| {
        s.sum(REQ, &[]) == 5.0 && s.sum("txmesh_request_duration_milliseconds_count", &[]) == 5.0
    });
    assert_eq!(requests(&s, ["inbound", "order", "payment", "403"]), 2.0);
    assert_eq!(requests(&s, ["inbound", "order", "payment", "200"]), 3.0);
    assert_eq!(s.find(REQ, &[]).len(), 2, "{}", s.text_of(REQ));
    let denied = labels("inbound", "order", "payment", "403");
    assert_eq!(
        s.value("txmesh_request_duration_milliseconds_count", &denied),
        2.0
    );
}

#[test]
fn label_tuples_are_bounded_and_overflow_is_counted() {
    let apps: Vec<Upstream> = (0..5).map(|_| Upstream::start()).collect();
    let names = ["a", "b", "c", "d", "e"];
    let mut sc = Sidecar::new("order").filter(Filter::metrics(
        json!({"workload": "order", "max_label_tuples": 2}),
    ));
    for (n, app) in names.iter().zip(&apps) {
        sc = sc.route(n, &[app.addr()]);
    }
    let sidecar = sc.start();
    let c = Client::new();
    for n in names {
        let r = c.must("GET", &sidecar.outbound_url("/"), &[("host", n)], b"");
        assert_eq!(r.status, 200);
    }
    let s = sidecar.scrape_until("5 requests", |s| s.sum(REQ, &[]) == 5.0);
    let series = s.find(REQ, &[]);
    assert_eq!(series.len(), 3, "{}", s.text_of(REQ));
    let other = [
        ("reporter", "outbound"),
        ("source_workload", "other"),
        ("destination_service", "other"),
        ("response_code", "other"),
        ("response_flags", "other"),
        ("request_protocol", "other"),
    ];
    assert_eq!(s.value(REQ, &other), 3.0);
    assert_eq!(s.value("txmesh_metrics_label_overflow_total", &[]), 3.0);
    // The two admitted tuples are the first two destinations seen.
    assert_eq!(requests(&s, ["outbound", "order", "a", "200"]), 1.0);
    assert_eq!(requests(&s, ["outbound", "order", "b", "200"]), 1.0);
}

#[test]
fn bad_plugin_config_is_refused_with_one_clear_line() {
    for (policy, config, line) in [
        (
            "FAIL_CLOSED",
            json!({"max_label_tuples": 0}),
            "invalid plugin configuration at `max_label_tuples`: must be between 1 and 100000, got 0",
        ),
        (
            "FAIL_OPEN",
            json!({"workload": "order", "destination_service": {}}),
            "invalid plugin configuration at `destination_service`: unknown field `destination_service`",
        ),
        (
            "FAIL_CLOSED",
            json!("{\"reporter\": \"outbound\""),
            "invalid plugin configuration at `.`: EOF while parsing an object",
        ),
    ] {
        let err = match Sidecar::new("bad")
            .filter(Filter::metrics(config.clone()).failure_policy(policy))
            .try_start()
        {
            Ok(_) => panic!("envoy started with bad config {config}"),
            Err(log) => log,
        };
        // Envoy refuses the whole bootstrap, whatever the failure_policy:
        // failure_policy governs VM failures at run time, not a bad config.
        assert!(err.starts_with("envoy exited with exit status: 1"), "{err}");
        assert_eq!(
            err.lines().filter(|l| l.contains(line)).count(),
            1,
            "want exactly one line with {line:?} in:\n{err}"
        );
        let refused = txmesh_tests::envoy::FilterHost::current().config_refusal("txmesh_metrics");
        assert!(err.contains(&refused), "{err}");
    }
}

/// gRPC requests carry their final `grpc-status` (trailers, or a
/// trailers-only answer) as `grpc_response_status`; HTTP requests none.
#[test]
fn grpc_requests_are_labelled_with_their_grpc_status() {
    let app = Upstream::with(|r| match r.path.as_str() {
        "/shop.v1.Inventory/Reserve" => txmesh_tests::Reply::grpc(0),
        "/shop.v1.Inventory/Ship" => txmesh_tests::Reply::grpc(13),
        "/shop.v1.Inventory/Count" => txmesh_tests::Reply::grpc_trailers_only(5),
        _ => txmesh_tests::Reply::ok(),
    });
    let inventory = Sidecar::new("inventory")
        .app(&app)
        .app_http2()
        .filter(Filter::metrics(json!({"workload": "inventory"})))
        .start();
    let call = |method: &str, n: usize| {
        for _ in 0..n {
            let a = txmesh_tests::grpc::unary(
                inventory.inbound_addr(),
                "inventory",
                &format!("/shop.v1.Inventory/{method}"),
                b"",
                &[],
                std::time::Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(a.http, 200, "{a:?}");
        }
    };
    call("Reserve", 3);
    call("Ship", 2);
    call("Count", 1);
    Client::new().must("GET", &inventory.inbound_url("/health"), &[], b"");
    let grpc = |status: &'static str| {
        let mut l = labels("inbound", "unknown", "inventory", "200");
        l[5] = ("request_protocol", "grpc");
        l.push(("grpc_response_status", status));
        l
    };
    let s = inventory.scrape_until("6 gRPC and 1 HTTP requests", |s| s.sum(REQ, &[]) == 7.0);
    assert_eq!(s.value(REQ, &grpc("0")), 3.0, "{}", s.text_of(REQ));
    assert_eq!(s.value(REQ, &grpc("13")), 2.0, "{}", s.text_of(REQ));
    assert_eq!(s.value(REQ, &grpc("5")), 1.0, "{}", s.text_of(REQ));
    let http = labels("inbound", "unknown", "inventory", "200");
    let found = s.find(REQ, &http);
    assert_eq!(found.len(), 1, "{}", s.text_of(REQ));
    assert_eq!(found[0].value, 1.0);
    assert_eq!(
        found[0]
            .labels
            .get("grpc_response_status")
            .map(String::as_str),
        Some(""),
        "{}",
        s.text_of(REQ)
    );
}
