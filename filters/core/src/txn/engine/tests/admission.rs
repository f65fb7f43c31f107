//! Admission: bad input, deadlines, baggage, a full table, enlistment (pinned participants), memory.

use super::*;

#[test]
fn bad_input_is_rejected_before_forwarding() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let cases: &[(u64, &str, &[(&str, &str)], u16, &str)] = &[
        (
            1,
            "/x",
            &[("x-txmesh-txn", "ZZ")],
            400,
            "invalid x-txmesh-txn",
        ),
        (
            1,
            "/x",
            &[("x-txmesh-txn", "00000000000000000000000000000000")],
            400,
            "must not be all zero",
        ),
        (
            1,
            "/x",
            &[("x-txmesh-txn", "new")],
            400,
            "x-txmesh-txn: new is not allowed here",
        ),
        (
            1,
            "/checkout",
            &[("x-txmesh-deadline", "999")],
            400,
            "is in the past",
        ),
        (
            1,
            "/checkout",
            &[("x-txmesh-deadline", "soon")],
            400,
            "invalid x-txmesh-deadline",
        ),
        (
            2,
            "/pay",
            &[("x-txmesh-txn", "new")],
            400,
            "only accepted by the initiator's inbound sidecar",
        ),
        (
            2,
            "/pay",
            &[("baggage", "txmesh.txn=xyz")],
            400,
            "invalid baggage member",
        ),
        (1, "/txmesh/prepare", &[], 400, "needs x-txmesh-txn"),
        (1, "/txmesh/nope", &[], 404, "unknown txmesh endpoint"),
        (1, "/txmesh/txns/xyz", &[], 400, "32 lowercase hex"),
    ];
    for (i, (dir, path, headers, want, msg)) in cases.iter().enumerate() {
        h.request(
            *dir,
            if path.starts_with("/txmesh/txns") {
                "GET"
            } else {
                "POST"
            },
            path,
            headers,
        );
        let (_, v) = inb.on_request_headers(&h, 10 + i as u32);
        assert_eq!(v, Verdict::Pause, "{path} {headers:?}");
        let (ctx, st, _, body) = h.replies.borrow().last().unwrap().clone();
        assert_eq!(
            (ctx, st),
            (10 + i as u32, *want),
            "{path} {headers:?}: {body}"
        );
        assert!(body.contains(msg), "{path}: {body}");
        assert!(body.starts_with(r#"{"error":"#), "{body}");
    }
    assert_eq!(inb.table().count(&h), 0);
}

#[test]
fn client_deadline_shortens_but_never_lengthens() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    h.request(1, "POST", "/checkout", &[("x-txmesh-deadline", "1002000")]);
    inb.on_request_headers(&h, 1);
    assert_eq!(h.header("x-txmesh-deadline").unwrap(), "1002000");
    h.request(1, "POST", "/checkout", &[("x-txmesh-deadline", "9999999")]);
    inb.on_request_headers(&h, 2);
    assert_eq!(h.header("x-txmesh-deadline").unwrap(), "1005000");
}

#[test]
fn baggage_carries_the_id_and_is_normalized_to_the_header() {
    let h = Host::new();
    let mut out = engine(&h, CFG);
    let id = "0af7651916cd43dd8448eb211c80319c";
    h.request(
        2,
        "POST",
        "/pay",
        &[("baggage", &format!("a=b,txmesh.txn={id}"))],
    );
    h.cluster("payment");
    let (_, v) = out.on_request_headers(&h, 1);
    assert_eq!(v, Verdict::Continue);
    assert_eq!(h.header("x-txmesh-txn").unwrap(), id);
    let e = out
        .table()
        .get(&h, &TxnId::parse(id.as_bytes()).unwrap())
        .unwrap();
    assert_eq!(e.participants, vec![("payment".to_string(), Mark::Unknown)]);
}

#[test]
fn a_full_table_sheds_new_transactions_with_503() {
    let h = Host::new();
    let mut inb = engine(&h, r#"{"begin":[{"path_prefix":"/c"}],"max_in_flight":2}"#);
    for ctx in 1..=2 {
        h.request(1, "POST", "/c", &[]);
        assert_eq!(inb.on_request_headers(&h, ctx).1, Verdict::Continue);
    }
    h.request(1, "POST", "/c", &[]);
    assert_eq!(inb.on_request_headers(&h, 3).1, Verdict::Pause);
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 503);
    assert!(
        body.contains("transaction table full: 2 transactions in flight"),
        "{body}"
    );
}

#[test]
fn memory_stays_flat_over_many_transactions() {
    let h = Host::new();
    let mut inb = engine(
        &h,
        r#"{"begin":[{"path_prefix":"/c"}],"max_in_flight":4,"node":"o"}"#,
    );
    for ctx in 0..2_000u32 {
        h.rand.set((ctx % 250) as u8);
        h.request(1, "POST", "/c", &[]);
        let (mut stream, _) = inb.on_request_headers(&h, ctx);
        h.status("200");
        inb.on_response_headers(&h, ctx, &mut stream, true);
        let calls = h.take_calls();
        answer(&h, &mut inb, &calls, "local_app", vote("commit"));
        let calls = h.take_calls();
        answer(&h, &mut inb, &calls, "local_app", ok(""));
        inb.on_stream_done(&h, ctx, &stream);
        h.advance(1);
    }
    assert_eq!(inb.table().count(&h), 0);
    assert!(!inb.busy());
    let keys = h.base.shared.borrow().len();
    assert!(keys <= 4 + 1 + 256, "{keys} shared-data keys");
}

#[test]
fn a_routed_participant_is_pinned_to_its_instance() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    h.request(1, "POST", "/checkout", &[]);
    let (mut stream, _) = inb.on_request_headers(&h, 1);
    let id = h.header("x-txmesh-txn").unwrap();
    // The router picked 10.0.0.2:15006 for this call; a bad value pins nothing.
    h.request(
        2,
        "POST",
        "/pay",
        &[
            ("x-txmesh-txn", &id),
            ("x-txmesh-endpoint", "10.0.0.2:15006"),
        ],
    );
    h.cluster("payment");
    assert_eq!(out.on_request_headers(&h, 100).1, Verdict::Continue);
    h.request(
        2,
        "POST",
        "/reserve",
        &[
            ("x-txmesh-txn", &id),
            ("x-txmesh-endpoint", "not-an-address"),
        ],
    );
    h.cluster("inventory");
    assert_eq!(out.on_request_headers(&h, 101).1, Verdict::Continue);
    h.status("200");
    assert_eq!(
        inb.on_response_headers(&h, 1, &mut stream, true),
        Verdict::Pause
    );
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        [
            "inventory /txmesh/prepare",
            "local_app /txmesh/prepare",
            "payment /txmesh/prepare"
        ]
    );
    let pinned = |c: &Callout| {
        c.headers
            .iter()
            .find(|(k, _)| k == "x-txmesh-endpoint")
            .map(|(_, v)| v.clone())
    };
    for (_, c) in &calls {
        let want = (c.cluster == "payment").then(|| "10.0.0.2:15006".to_string());
        assert_eq!(pinned(c), want, "{c:?}");
    }
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "inventory", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    inb.on_tick(&h);
    let calls = h.take_calls();
    let commit = calls.iter().find(|(_, c)| c.cluster == "payment").unwrap();
    assert_eq!(commit.1.path, "/txmesh/commit");
    assert_eq!(pinned(&commit.1).as_deref(), Some("10.0.0.2:15006"));
    let logs = h.logs.borrow();
    assert!(
        logs.iter()
            .any(|l| l.contains("participants=payment@10.0.0.2:15006:commit,inventory:commit")),
        "{logs:?}"
    );
}

/// The endpoint shape check agrees with std's `SocketAddr` parser on what
/// txmesh_router writes, and refuses what it does not.
#[test]
fn endpoint_shapes() {
    for ok in [
        "10.0.0.7:8080",
        "127.0.0.1:1",
        "255.255.255.255:65535",
        "[fd00::7]:8080",
        "[::1]:15006",
    ] {
        assert!(is_endpoint(ok), "{ok}");
        assert!(ok.parse::<std::net::SocketAddr>().is_ok(), "{ok}");
    }
    for bad in [
        "",
        "payment",
        "10.0.0.7",
        "10.0.0.7:",
        "10.0.0.7:0",
        "10.0.0.7:65536",
        "10.0.0.256:80",
        "10.0.0:80",
        "10.0.0.7.1:80",
        "host:80",
        "[fd00::7:8080",
        "fd00::7:8080",
        "[zz::1]:80",
        "10.0.0.7:8o",
    ] {
        assert!(!is_endpoint(bad), "{bad}");
    }
    assert_eq!(
        split_pinned("payment@10.0.0.7:8080"),
        ("payment", Some("10.0.0.7:8080"))
    );
    assert_eq!(split_pinned("payment@nowhere"), ("payment@nowhere", None));
}
