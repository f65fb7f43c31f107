//! Property tests ("fuzzing" with shrinking, bounded in time so they run in
//! `make test`): the authz policy matcher and path normalizer, and the header
//! and gRPC parsers every filter runs on untrusted bytes.

#![allow(clippy::indexing_slicing, clippy::unwrap_used)]

use proptest::prelude::*;
use txmesh_core::authz::{
    glob, normalize_path, strip_baggage_txn, Action, AuthzConfig, CONTROL_RULE,
};
use txmesh_core::txn::id::TxnHeader;
use txmesh_core::txn::id::{parse_deadline, read_txn, TxnId};
use txmesh_core::{grpc, txn::pb};

/// A plain recursive glob matcher to check the DP one against.
fn reference(p: &[u8], s: &[u8]) -> bool {
    match p {
        [] => s.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| reference(rest, &s[i..])),
        [b'*', rest @ ..] => (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| reference(rest, &s[i..])),
        [b'?', rest @ ..] => matches!(s.first(), Some(c) if *c != b'/') && reference(rest, &s[1..]),
        [c, rest @ ..] => s.first() == Some(c) && reference(rest, &s[1..]),
    }
}

fn policy() -> AuthzConfig {
    AuthzConfig::parse(
        br#"{"default": "allow",
             "coordinators": [{"glob": "spiffe://txmesh.local/ns/shop/sa/*"}],
             "rules": [{"name": "all", "action": "allow"}]}"#,
    )
    .unwrap()
}

/// One spelling of `/txmesh/<op>`: random case, doubled slashes, `./` and
/// `x/../` segments, percent-encoded letters, a query.
fn control_spelling() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec!["prepare", "commit", "abort", "txns/abc", ""]),
        prop::collection::vec(0u8..6, 0..40),
        any::<bool>(),
    )
        .prop_map(|(op, edits, query)| {
            let plain = format!("/txmesh/{op}");
            let mut out = Vec::new();
            for (i, c) in plain.bytes().enumerate() {
                let e = edits.get(i).copied().unwrap_or(0);
                match (c, e) {
                    (b'/', 1) => out.extend_from_slice(b"//"),
                    (b'/', 2) => out.extend_from_slice(b"/./"),
                    (b'/', 3) => out.extend_from_slice(b"/zz/../"),
                    (c, 4) if c.is_ascii_alphabetic() => out.push(c.to_ascii_uppercase()),
                    (c, 5) if c.is_ascii_alphanumeric() => {
                        out.extend_from_slice(format!("%{c:02X}").as_bytes())
                    }
                    (c, _) => out.push(c),
                }
            }
            if query {
                out.extend_from_slice(b"?x=/ok");
            }
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn glob_agrees_with_the_reference(
        p in prop::collection::vec(prop::sample::select(b"ab/*?".to_vec()), 0..10),
        s in prop::collection::vec(prop::sample::select(b"ab/".to_vec()), 0..12),
    ) {
        prop_assert_eq!(glob(&p, &s), reference(&p, &s));
    }

    #[test]
    fn no_spelling_of_a_control_path_passes_a_non_coordinator(path in control_spelling()) {
        let p = policy();
        prop_assert_eq!(
            p.decide(b"spiffe://evil.example/sa/x", b"POST", &path),
            (Action::Deny, CONTROL_RULE)
        );
        prop_assert_eq!(
            p.decide(b"anonymous", b"POST", &path),
            (Action::Deny, CONTROL_RULE)
        );
        prop_assert_eq!(
            p.decide(b"spiffe://txmesh.local/ns/shop/sa/order", b"POST", &path),
            (Action::Allow, CONTROL_RULE)
        );
    }

    #[test]
    fn the_matcher_and_normalizer_take_any_bytes(
        principal in prop::collection::vec(any::<u8>(), 0..80),
        method in prop::collection::vec(any::<u8>(), 0..10),
        path in prop::collection::vec(any::<u8>(), 0..120),
    ) {
        let p = policy();
        let (_, rule) = p.decide(&principal, &method, &path);
        prop_assert!(!rule.is_empty());
        if let Some(n) = normalize_path(&path) {
            // Normal forms are fixed points with no empty, `.` or `..` segment.
            prop_assert_eq!(normalize_path(n.as_bytes()), Some(n.clone()));
            prop_assert!(!n.contains("//") && !n.contains("/./") && !n.contains("/../"));
        }
    }

    #[test]
    fn header_parsers_take_any_bytes(
        txn in prop::collection::vec(any::<u8>(), 0..70),
        baggage in prop::collection::vec(any::<u8>(), 0..200),
        deadline in prop::collection::vec(any::<u8>(), 0..30),
    ) {
        let _ = read_txn(Some(&txn), Some(&baggage));
        let _ = parse_deadline(&deadline);
        if let Ok(id) = TxnId::parse(&txn) {
            let text = id.to_string();
            prop_assert_eq!(text.as_bytes(), &txn[..]);
        }
    }

    #[test]
    fn edge_baggage_never_keeps_a_txn(
        members in prop::collection::vec(
            (prop::sample::select(vec!["txmesh.txn", "TXMESH.TXN", " txmesh.txn ", "userId", "k"]),
             "[a-z0-9;= ]{0,12}"),
            0..6),
    ) {
        let b = members.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let kept = strip_baggage_txn(b.as_bytes()).unwrap();
        // What the txn filter would read from the sanitized baggage: no id.
        let read = read_txn(None, Some(kept.as_bytes()));
        prop_assert!(matches!(read, Ok(TxnHeader::Absent)), "{:?} from {:?}", read, kept);
    }

    #[test]
    fn valid_ids_round_trip(bytes in prop::array::uniform16(any::<u8>())) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        match TxnId::parse(hex.as_bytes()) {
            Ok(id) => prop_assert_eq!(id.to_string(), hex),
            Err(_) => prop_assert!(bytes.iter().all(|b| *b == 0)),
        }
    }

    /// A gRPC app's answer, a client's `grpc-timeout` and `grpc-status`,
    /// a `content-type`: any bytes give a value or an error, never a panic;
    /// a well-formed `PrepareResponse` decodes to its vote and reason.
    #[test]
    fn grpc_parsers_take_any_bytes(
        body in prop::collection::vec(any::<u8>(), 0..64),
        field in prop::collection::vec(any::<u8>(), 0..16),
        vote in 0i32..6,
        reason in "[ -~]{0,20}",
    ) {
        let _ = pb::vote(&body);
        let _ = grpc::parse_timeout(&field);
        let _ = grpc::parse_status(&field);
        let _ = grpc::is_grpc(&field);
        let _ = grpc::encode_message(&String::from_utf8_lossy(&body));
        use prost::Message;
        let bytes = pb::PrepareResponse { vote, reason: reason.clone() }.encode_to_vec();
        let (v, r) = pb::vote(&bytes).unwrap();
        prop_assert_eq!(v as i32, if vote <= 3 { vote } else { 0 });
        prop_assert_eq!(r, reason);
    }
}
