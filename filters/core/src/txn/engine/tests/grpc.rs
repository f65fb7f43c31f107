//! A gRPC app as the root: success is the final `grpc-status` (trailers,
//! or a trailers-only answer), and the outcome goes where the status is.

use super::*;
use crate::host::ResponsePart;

impl Host {
    /// The app's gRPC response headers: 200, `application/grpc`, and a
    /// `grpc-status` only for a trailers-only answer.
    fn grpc_headers(&self, trailers_only_status: Option<&str>) {
        self.status("200");
        self.response.borrow_mut().push((
            "content-type".to_string(),
            b"application/grpc+proto".to_vec(),
        ));
        if let Some(s) = trailers_only_status {
            self.response
                .borrow_mut()
                .push(("grpc-status".to_string(), s.as_bytes().to_vec()));
        }
    }
    fn grpc_trailers(&self, status: Option<&str>) {
        *self.trailers.borrow_mut() = status
            .map(|s| ("grpc-status".to_string(), s.as_bytes().to_vec()))
            .into_iter()
            .collect();
    }
    fn trailer(&self, name: &str) -> Option<String> {
        self.response_trailer(name)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }
}

fn txns(h: &Host, outcome: &str, reason: &str) -> Option<i64> {
    h.base.counter(&format!(
        "outcome=.={outcome};.;reason=.={reason};.;txmesh_txn_total"
    ))
}

#[test]
fn headers_pass_and_the_trailers_decide() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.grpc_headers(None);
    assert_eq!(
        inb.on_response_headers(&h, 1, &mut stream, false),
        Verdict::Continue
    );
    assert!(h.take_calls().is_empty(), "no prepare before the status");
    assert!(matches!(stream, Stream::Root { .. }), "{stream:?}");
    h.grpc_trailers(Some("0"));
    assert_eq!(inb.on_response_trailers(&h, 1, &mut stream), Verdict::Pause);
    assert_eq!(stream, Stream::Owned);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["local_app /txmesh/prepare", "payment /txmesh/prepare"]
    );
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    // Resumed at the trailers, marked committed.
    assert_eq!(*h.resumed_at.borrow(), [ResponsePart::Trailers]);
    let (ctx, fields) = h.resumed.borrow()[0].clone();
    assert_eq!(ctx, 1);
    assert!(
        fields.contains(&("x-txmesh-outcome".into(), "committed".into())),
        "{fields:?}"
    );
    assert!(fields.contains(&("x-txmesh-txn".into(), txn.to_string())));
    assert_eq!(txns(&h, "committed", "ok"), Some(1));
}

#[test]
fn a_failed_status_in_the_trailers_aborts_without_a_prepare() {
    for status in [Some("13"), Some("2"), None, Some("x")] {
        let h = Host::new();
        let mut inb = engine(&h, CFG);
        let mut out = engine(&h, CFG);
        let (_, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
        h.grpc_headers(None);
        inb.on_response_headers(&h, 1, &mut stream, false);
        h.grpc_trailers(status);
        let verdict = inb.on_response_trailers(&h, 1, &mut stream);
        // Everyone is told to abort; nobody was asked to prepare.
        assert_eq!(
            paths(&h.take_calls()),
            ["local_app /txmesh/abort", "payment /txmesh/abort"],
            "{status:?}"
        );
        assert_eq!(txns(&h, "aborted", "grpc_error"), Some(1), "{status:?}");
        assert!(h.replies.borrow().is_empty(), "{status:?}: no local reply");
        match status {
            // A status the app gave: its own answer goes on, marked.
            Some("13" | "2") => {
                assert_eq!(verdict, Verdict::Continue);
                assert_eq!(h.trailer("x-txmesh-outcome").as_deref(), Some("aborted"));
                assert!(h.resumed.borrow().is_empty());
            }
            // None (or unreadable): ABORTED in its place.
            _ => {
                assert_eq!(verdict, Verdict::Pause, "{status:?}");
                assert_eq!(*h.resumed_at.borrow(), [ResponsePart::Trailers]);
                let fields = &h.resumed.borrow()[0].1;
                assert!(
                    fields.contains(&("grpc-status".into(), "10".into())),
                    "{fields:?}"
                );
                assert!(
                    fields.contains(&(
                        "grpc-message".into(),
                        "transaction aborted by order: the app's gRPC answer had no grpc-status"
                            .into()
                    )),
                    "{fields:?}"
                );
            }
        }
    }
}

#[test]
fn a_trailers_only_answer_decides_at_the_headers() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.grpc_headers(Some("0"));
    assert_eq!(
        inb.on_response_headers(&h, 1, &mut stream, true),
        Verdict::Pause
    );
    let calls = h.take_calls();
    assert_eq!(paths(&calls).len(), 2, "{:?}", paths(&calls));
    // payment says no: ABORTED replaces the OK in the held headers.
    answer(
        &h,
        &mut inb,
        &calls,
        "payment",
        ok(r#"{"vote":"abort","reason":"sold out"}"#),
    );
    assert_eq!(*h.resumed_at.borrow(), [ResponsePart::Headers]);
    let fields = &h.resumed.borrow()[0].1;
    assert!(
        fields.contains(&("grpc-status".into(), "10".into())),
        "{fields:?}"
    );
    assert!(
        fields.contains(&("x-txmesh-outcome".into(), "aborted".into())),
        "{fields:?}"
    );
    assert!(h.replies.borrow().is_empty(), "no local reply");
}

#[test]
fn a_grpc_answer_that_is_not_200_is_judged_by_its_status() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.grpc_headers(None);
    *h.response.borrow_mut() = vec![
        (":status".to_string(), b"503".to_vec()),
        ("content-type".to_string(), b"application/grpc".to_vec()),
    ];
    assert_eq!(
        inb.on_response_headers(&h, 1, &mut stream, false),
        Verdict::Pause
    );
    // A local reply (Envoy makes it a gRPC answer for a gRPC request).
    assert_eq!(h.replies.borrow().len(), 1);
    assert_eq!(txns(&h, "aborted", "app_error"), Some(1));
}

#[test]
fn grpc_timeout_bounds_the_deadline() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    // Shorter than the configured 5 s: it wins (rounded up to the ms).
    h.request(1, "POST", "/checkout", &[("grpc-timeout", "300000u")]);
    let (_, v) = inb.on_request_headers(&h, 1);
    assert_eq!(v, Verdict::Continue);
    assert_eq!(h.header("x-txmesh-deadline").unwrap(), "1000300");
    // Longer: the configured timeout stays.
    h.request(1, "POST", "/checkout", &[("grpc-timeout", "1H")]);
    let (_, v) = inb.on_request_headers(&h, 2);
    assert_eq!(v, Verdict::Continue);
    assert_eq!(h.header("x-txmesh-deadline").unwrap(), "1005000");
    // Malformed: refused, nothing begun.
    h.request(1, "POST", "/checkout", &[("grpc-timeout", "5 seconds")]);
    let (_, v) = inb.on_request_headers(&h, 3);
    assert_eq!(v, Verdict::Pause);
    let (ctx, status, _, body) = h.replies.borrow_mut().pop().unwrap();
    assert_eq!((ctx, status), (3, 400));
    assert!(body.contains("grpc-timeout"), "{body}");
}

#[test]
fn a_streaming_call_inside_a_transaction_is_not_enlisted() {
    let cfg = r#"{"begin":[{"method":"POST","path_prefix":"/checkout"}],"node":"order",
        "grpc_streaming":["/shop.v1.Inventory/Watch"]}"#;
    let h = Host::new();
    let mut inb = engine(&h, cfg);
    let mut out = engine(&h, cfg);
    h.request(1, "POST", "/checkout", &[]);
    let (_, v) = inb.on_request_headers(&h, 1);
    assert_eq!(v, Verdict::Continue);
    let txn = h.header("x-txmesh-txn").unwrap();
    for ctx in [100, 101] {
        h.request(
            2,
            "POST",
            "/shop.v1.Inventory/Watch",
            &[("x-txmesh-txn", &txn)],
        );
        h.cluster("inventory");
        let (stream, v) = out.on_request_headers(&h, ctx);
        assert_eq!((stream, v), (Stream::Pass, Verdict::Continue));
        // It goes on outside the transaction.
        assert_eq!(h.header("x-txmesh-txn"), None);
        assert_eq!(h.header("x-txmesh-deadline"), None);
    }
    let id = TxnId::parse(txn.as_bytes()).unwrap();
    assert!(inb.table().get(&h, &id).unwrap().participants.is_empty());
    let warned = h
        .logs
        .borrow()
        .iter()
        .filter(|l| l.contains("streaming gRPC call /shop.v1.Inventory/Watch is not part"))
        .count();
    assert_eq!(warned, 1, "logged once: {:?}", h.logs.borrow());
    // A unary call is enlisted as ever.
    h.request(
        2,
        "POST",
        "/shop.v1.Inventory/Reserve",
        &[("x-txmesh-txn", &txn)],
    );
    h.cluster("inventory");
    let (stream, _) = out.on_request_headers(&h, 102);
    assert!(matches!(stream, Stream::Enlisted { .. }), "{stream:?}");
}
