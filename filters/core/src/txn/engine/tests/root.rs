//! The root coordinator: votes, one phase, the decision record, aborts and how the client is told.

use super::*;

#[test]
fn commit_with_three_participants() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment", "inventory"]);
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
    for (_, c) in &calls {
        assert_eq!(c.timeout_ms, 5000);
        assert!(c
            .headers
            .contains(&("x-txmesh-txn".to_string(), txn.to_string())));
    }
    // Late enlistment is refused once preparing.
    h.request(2, "POST", "/late", &[("x-txmesh-txn", &txn.to_string())]);
    h.cluster("shipping");
    let (_, v) = out.on_request_headers(&h, 150);
    assert_eq!(v, Verdict::Pause);
    let (ctx, st, _, body) = h.replies.borrow_mut().pop().unwrap();
    assert_eq!((ctx, st), (150, 409));
    assert!(
        body.contains("is preparing: it takes no new participants"),
        "{body}"
    );

    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "inventory", vote("commit"));
    assert!(h.calls.borrow().is_empty(), "no decision before every vote");
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    let body = String::from_utf8(calls[0].1.body.clone()).unwrap();
    assert!(body.contains(&crate::b64::encode(
        format!("txmesh/decisions/{txn}").as_bytes()
    )));
    assert!(
        h.resumed.borrow().is_empty(),
        "no answer before the decision is durable"
    );
    h.advance(3);
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    // The decision line times etcd's round trip apart from the rest.
    let line = h.logs.borrow().last().cloned().unwrap();
    assert!(
        line.contains(&format!("txn {txn} committed reason=ok ")),
        "{line}"
    );
    assert!(line.contains(" record_us=3000 etcd_us=3000"), "{line}");
    assert_eq!(
        h.resumed.borrow().as_slice(),
        &[(
            1,
            vec![
                ("x-txmesh-outcome".to_string(), "committed".to_string()),
                ("x-txmesh-txn".to_string(), txn.to_string())
            ]
        )]
    );
    // Phase 2 at once (not at the next tick), from the root context: the
    // commits outlive the client's stream.
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        [
            "inventory /txmesh/commit",
            "local_app /txmesh/commit",
            "payment /txmesh/commit"
        ]
    );
    assert!(from_root(&h, &calls));
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty(), "each commit is sent once");
    answer(&h, &mut inb, &calls, "payment", ok(""));
    answer(&h, &mut inb, &calls, "inventory", status(503));
    answer(&h, &mut inb, &calls, "local_app", ok(""));
    // inventory failed once: acknowledgements are recorded from now on.
    assert_eq!(paths(&h.take_calls()), ["etcd /v3/kv/put"]);
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty(), "retry waits for its backoff");
    h.advance(200);
    inb.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["inventory /txmesh/commit"]);
    answer(&h, &mut inb, &calls, "inventory", ok(""));
    assert_eq!(paths(&h.take_calls()), ["etcd /v3/kv/put"]);
    inb.on_tick(&h);
    assert!(!inb.busy());
    assert!(inb.table().get(&h, &txn).is_none());
    assert_eq!(inb.table().count(&h), 0);
    let logs = h.logs.borrow();
    assert!(
        logs.iter().any(|l| l.starts_with(&format!("txn {txn} committed reason=ok trace=- participants=payment:commit,inventory:commit,order:commit"))),
        "{logs:?}"
    );
    assert_eq!(
        h.base
            .counter("outcome=.=committed;.;reason=.=ok;.;txmesh_txn_total"),
        Some(1)
    );
}

#[test]
fn a_no_vote_aborts_everyone_and_names_the_participant() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment", "inventory"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &mut stream, true);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(
        &h,
        &mut inb,
        &calls,
        "inventory",
        ok(r#"{"vote":"abort","reason":"out_of_stock"}"#),
    );
    let (ctx, st, headers, body) = h.replies.borrow()[0].clone();
    assert_eq!((ctx, st), (1, 409));
    assert!(headers.contains(&("x-txmesh-outcome".to_string(), "aborted".to_string())));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["txn"], txn.to_string());
    assert_eq!(v["outcome"], "aborted");
    assert_eq!(v["reason"], "out_of_stock");
    assert_eq!(v["participant"], "inventory");
    // The app's late vote is ignored.
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    inb.on_tick(&h);
    let calls = h.take_calls();
    // payment may be prepared: an abort record goes to etcd; everyone gets abort.
    assert_eq!(
        paths(&calls),
        [
            "etcd /v3/kv/txn",
            "inventory /txmesh/abort",
            "local_app /txmesh/abort",
            "payment /txmesh/abort"
        ]
    );
    assert!(!calls.iter().any(|(_, c)| c.path == "/txmesh/commit"));
    // The record names who said no, and why (operators: txmeshctl txn).
    let body: serde_json::Value = serde_json::from_slice(&calls[0].1.body).unwrap();
    let put = body["success"][0]["request_put"]["value"].as_str().unwrap();
    let record: serde_json::Value =
        serde_json::from_slice(&crate::b64::decode(put).unwrap()).unwrap();
    assert_eq!(
        (&record["reason"], &record["refused_by"], &record["detail"]),
        (
            &serde_json::json!("vote_abort"),
            &serde_json::json!("inventory"),
            &serde_json::json!("out_of_stock")
        )
    );
    // ... and when it began, so operators see how long an abort took.
    assert!(record["begun_ms"].as_u64().is_some(), "{record}");
}

#[test]
fn readonly_voters_get_no_phase_two() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment", "catalog"]);
    h.status("201");
    inb.on_response_headers(&h, 1, &mut stream, true);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "catalog", vote("readonly"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        ["local_app /txmesh/commit", "payment /txmesh/commit"]
    );
}

#[test]
fn all_readonly_commits_without_etcd() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["catalog"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &mut stream, true);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "catalog", vote("readonly"));
    answer(&h, &mut inb, &calls, "local_app", vote("readonly"));
    assert!(h.take_calls().is_empty());
    assert_eq!(h.resumed.borrow().len(), 1);
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty());
    assert!(inb.table().get(&h, &txn).is_none());
}

#[test]
fn one_participant_commits_in_one_phase() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, mut stream) = begin_with(&h, &mut inb, &mut out, &[]);
    h.status("200");
    inb.on_response_headers(&h, 1, &mut stream, true);
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["local_app /txmesh/prepare"]);
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["local_app /txmesh/commit"],
        "no etcd write in 1PC"
    );
    assert!(
        h.resumed.borrow().is_empty(),
        "1PC answers after the commit is acknowledged"
    );
    answer(&h, &mut inb, &calls, "local_app", ok(""));
    assert_eq!(h.resumed.borrow().len(), 1);
    assert!(inb.table().get(&h, &txn).is_none());
    // The status endpoint still knows.
    h.request(1, "GET", &format!("/txmesh/txns/{txn}"), &[]);
    inb.on_request_headers(&h, 9);
    let (_, st, _, body) = h.replies.borrow().last().unwrap().clone();
    assert_eq!(st, 200);
    assert_eq!(body, format!(r#"{{"txn":"{txn}","outcome":"committed"}}"#));
}

#[test]
fn one_phase_commit_unacknowledged_falls_back_to_a_durable_decision() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, mut stream) = begin_with(&h, &mut inb, &mut out, &[]);
    h.status("200");
    inb.on_response_headers(&h, 1, &mut stream, true);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "local_app", status(503));
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    assert_eq!(h.resumed.borrow().len(), 1);
    inb.on_tick(&h);
    assert_eq!(paths(&h.take_calls()), ["local_app /txmesh/commit"]);
}

#[test]
fn app_error_aborts_without_prepare() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("503");
    assert_eq!(
        inb.on_response_headers(&h, 1, &mut stream, true),
        Verdict::Pause
    );
    // No prepare, no record (nobody prepared): the aborts go out at once.
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["local_app /txmesh/abort", "payment /txmesh/abort"]
    );
    assert!(from_root(&h, &calls));
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 409);
    assert!(
        body.contains(r#""reason":"the app answered 503""#),
        "{body}"
    );
    assert!(body.contains(r#""participant":"order""#), "{body}");
    inb.on_tick(&h);
    assert!(h.take_calls().is_empty(), "each abort is sent once");
}

#[test]
fn a_stalled_participant_aborts_at_the_deadline_from_the_tick() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &mut stream, true);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    h.advance(4_999);
    inb.on_tick(&h);
    assert!(h.replies.borrow().is_empty());
    h.advance(1);
    inb.on_tick(&h);
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 409);
    assert!(
        body.contains(r#""reason":"no answer before the deadline""#),
        "{body}"
    );
    assert!(body.contains(r#""participant":"payment""#), "{body}");
    // The stalled answer arriving later changes nothing.
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    assert_eq!(h.replies.borrow().len(), 1);
    assert_eq!(
        h.base
            .counter("outcome=.=aborted;.;reason=.=timeout;.;txmesh_txn_total"),
        Some(1)
    );
}

#[test]
fn etcd_down_aborts_and_never_commits() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let _txn = both_voted_commit(&h, &mut inb, &mut out);
    let refused = CalloutResponse {
        status: Some(503),
        body: b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused".to_vec(),
    };
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", refused.clone());
    // Nothing reached etcd: the same commit record is re-sent (another
    // member may answer), twice.
    for _ in 0..2 {
        let calls = h.take_calls();
        assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
        let body = String::from_utf8_lossy(&calls[0].1.body).to_string();
        assert_eq!(
            body.matches("request_put").count(),
            2,
            "the commit record (+ pending key) again"
        );
        answer(&h, &mut inb, &calls, "etcd", refused.clone());
    }
    let calls = h.take_calls();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"], "tries an abort record");
    let body = String::from_utf8_lossy(&calls[0].1.body).to_string();
    assert_eq!(
        body.matches("request_put").count(),
        1,
        "an abort record has no pending key"
    );
    answer(&h, &mut inb, &calls, "etcd", refused);
    let (_, st, headers, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 409);
    assert!(headers.contains(&("x-txmesh-outcome".to_string(), "aborted".to_string())));
    assert!(body.contains("etcd unavailable"), "{body}");
    for _ in 0..5 {
        h.advance(300);
        inb.on_tick(&h);
        let calls = h.take_calls();
        assert!(
            !calls.iter().any(|(_, c)| c.path == "/txmesh/commit"),
            "{calls:?}"
        );
        for (t, c) in calls {
            if c.path == "/txmesh/abort" {
                inb.on_callout(&h, t, ok(""));
            }
        }
    }
}

#[test]
fn an_ambiguous_etcd_failure_is_resolved_not_guessed() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let txn = both_voted_commit(&h, &mut inb, &mut out);
    let calls = h.take_calls();
    // The commit record write times out: it may have landed.
    answer(&h, &mut inb, &calls, "etcd", status(504));
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", status(504));
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 503);
    assert!(body.contains(r#""outcome":"unknown""#), "{body}");
    // From the tick: an abort CAS that finds the commit record -> commit.
    inb.on_tick(&h);
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["etcd /v3/kv/txn"],
        "no phase 2 before the truth is known"
    );
    let existing = format!(
        r#"{{"header":{{}},"responses":[{{"response_range":{{"kvs":[{{"value":"{}"}}]}}}}]}}"#,
        crate::b64::encode(format!(r#"{{"txn":"{txn}","outcome":"committed"}}"#).as_bytes())
    );
    answer(&h, &mut inb, &calls, "etcd", ok(&existing));
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        ["local_app /txmesh/commit", "payment /txmesh/commit"]
    );
}

/// etcd's NOSPACE alarm refuses the commit record: nothing was applied, so
/// the transaction aborts at once (no "outcome unknown"), the client gets a
/// 503 naming the cause, the participants their aborts, and the abort
/// record is owed until etcd takes writes again.
#[test]
fn etcd_out_of_space_aborts_with_a_503_naming_the_cause() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let txn = both_voted_commit(&h, &mut inb, &mut out);
    let no_space = CalloutResponse {
        status: Some(429),
        body: br#"{"error":"etcdserver: mvcc: database space exceeded","message":"etcdserver: mvcc: database space exceeded","code":8}"#.to_vec(),
    };
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "etcd", no_space.clone());
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        ["etcd /v3/kv/txn"],
        "an abort record is tried"
    );
    answer(&h, &mut inb, &calls, "etcd", no_space.clone());
    let (_, st, headers, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 503);
    assert!(
        body.contains("etcd is out of space (NOSPACE alarm"),
        "{body}"
    );
    assert!(body.contains(r#""outcome":"aborted""#), "{body}");
    assert!(headers
        .iter()
        .any(|(k, v)| k == "x-txmesh-outcome" && v == "aborted"));
    assert_eq!(
        h.base
            .counter("outcome=.=aborted;.;reason=.=etcd_nospace;.;txmesh_txn_total"),
        Some(1)
    );
    let calls = h.take_calls();
    assert_eq!(
        paths(&calls),
        [
            "etcd /v3/kv/txn",
            "local_app /txmesh/abort",
            "payment /txmesh/abort"
        ]
    );
    // The owed abort record, refused again, is retried; once etcd takes it,
    // it goes under the retention lease.
    answer(&h, &mut inb, &calls, "etcd", no_space);
    h.advance(200);
    inb.on_tick(&h);
    let calls: Vec<_> = h
        .take_calls()
        .into_iter()
        .filter(|(_, c)| c.cluster == "etcd")
        .collect();
    assert_eq!(paths(&calls), ["etcd /v3/kv/txn"]);
    let body: serde_json::Value = serde_json::from_slice(&calls[0].1.body).unwrap();
    let put = &body["success"][0]["request_put"];
    let key = crate::b64::decode(put["key"].as_str().unwrap()).unwrap();
    assert_eq!(key, format!("txmesh/decisions/{txn}").into_bytes());
    assert!(put["lease"].as_str().is_some(), "{body}");
}

#[test]
fn an_existing_abort_decision_wins_over_our_commit() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let _txn = both_voted_commit(&h, &mut inb, &mut out);
    let calls = h.take_calls();
    let existing = format!(
        r#"{{"header":{{}},"responses":[{{"response_range":{{"kvs":[{{"value":"{}"}}]}}}}]}}"#,
        crate::b64::encode(br#"{"outcome":"aborted"}"#)
    );
    answer(&h, &mut inb, &calls, "etcd", ok(&existing));
    let (_, st, _, body) = h.replies.borrow()[0].clone();
    assert_eq!(st, 409);
    assert!(body.contains("already recorded in etcd"), "{body}");
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        ["local_app /txmesh/abort", "payment /txmesh/abort"]
    );
}

#[test]
fn client_gone_during_prepare_aborts_from_the_tick() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("200");
    inb.on_response_headers(&h, 1, &mut stream, true);
    let calls = h.take_calls();
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    inb.on_stream_done(&h, 1, &stream);
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        [
            "etcd /v3/kv/txn",
            "local_app /txmesh/abort",
            "payment /txmesh/abort"
        ]
    );
    assert_eq!(inb.table().get(&h, &txn).unwrap().phase, Phase::Aborted);
}

#[test]
fn an_app_4xx_aborts_but_the_client_sees_the_apps_own_error() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (txn, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.status("400");
    assert_eq!(
        inb.on_response_headers(&h, 1, &mut stream, true),
        Verdict::Continue
    );
    assert!(
        h.replies.borrow().is_empty(),
        "no 409 replacing the app's answer"
    );
    assert_eq!(h.response_header("x-txmesh-outcome").unwrap(), b"aborted");
    assert_eq!(
        h.response_header("x-txmesh-txn").unwrap(),
        txn.to_string().as_bytes()
    );
    inb.on_tick(&h);
    assert_eq!(
        paths(&h.take_calls()),
        ["local_app /txmesh/abort", "payment /txmesh/abort"],
        "still aborted everywhere, nothing prepared"
    );
}

#[test]
fn the_decision_line_times_the_prepare_round_and_the_record_write() {
    let h = Host::new();
    let mut inb = engine(&h, CFG);
    let mut out = engine(&h, CFG);
    let (_, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
    h.advance(3); // the app works
    h.status("200");
    inb.on_response_headers(&h, 1, &mut stream, true);
    let calls = h.take_calls();
    h.advance(5); // the prepare round
    answer(&h, &mut inb, &calls, "payment", vote("commit"));
    answer(&h, &mut inb, &calls, "local_app", vote("commit"));
    let calls = h.take_calls();
    h.advance(2); // the record write
    answer(&h, &mut inb, &calls, "etcd", ok(CREATED));
    let logs = h.logs.borrow();
    let line = logs
        .iter()
        .find(|l| l.contains(" committed reason=ok "))
        .unwrap();
    assert!(
        line.contains(
            " prepare_ms=8 decide_ms=2 total_ms=10 app_us=3000 prepare_us=5000 record_us=2000"
        ),
        "{line}"
    );
}

/// The abort cause is typed: a sub-coordinator relays a child's timeout as
/// `"cause":"timeout"` and the root counts it as one; a participant's own
/// reason text is only text, whatever it says.
#[test]
fn a_relayed_timeout_counts_as_timeout_and_reason_text_decides_nothing() {
    for (body, reason) in [
        (
            r#"{"vote":"abort","reason":"no answer before the deadline","participant":"c","cause":"timeout"}"#,
            "timeout",
        ),
        (
            r#"{"vote":"abort","reason":"the deadline of our promo passed"}"#,
            "vote_abort",
        ),
        (
            r#"{"vote":"abort","reason":"x","cause":"something-new"}"#,
            "vote_abort",
        ),
    ] {
        let h = Host::new();
        let mut inb = engine(&h, CFG);
        let mut out = engine(&h, CFG);
        let (_, mut stream) = begin_with(&h, &mut inb, &mut out, &["payment"]);
        h.status("200");
        inb.on_response_headers(&h, 1, &mut stream, true);
        let calls = h.take_calls();
        answer(&h, &mut inb, &calls, "payment", ok(body));
        assert_eq!(h.replies.borrow()[0].1, 409, "{body}");
        let name = format!("outcome=.=aborted;.;reason=.={reason};.;txmesh_txn_total");
        assert_eq!(h.base.counter(&name), Some(1), "{body}");
    }
}
