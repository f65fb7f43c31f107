//! Prometheus labels through Envoy stats: Istio's `name=.=value;.;` encoding.
//!
//! A wasm stat is named `l1=.=v1;.;l2=.=v2;.;metric`; the bootstrap's
//! `stats_config.stats_tags` has one regex per label,
//! `(l1=\.=(.*?);\.;)`, that cuts the pair out of the name and turns it into a
//! tag, so `/stats/prometheus` shows `metric{l1="v1",l2="v2"}`.

/// The txn filter's stat labels (`txmesh_txn_total{outcome,reason}`).
pub const TXN_LABELS: [&str; 2] = ["outcome", "reason"];
/// The authz filter's stat labels (`txmesh_authz_decisions_total{decision,rule}`).
pub const AUTHZ_LABELS: [&str; 2] = ["decision", "rule"];

/// Every `stats_tags` entry a txmesh bootstrap needs, defined once for the
/// configs, their generator and the tests: (Prometheus label, key encoded
/// in the stat names — the router's are prefixed, so that `service=` does
/// not also match inside `destination_service=`).
pub fn stats_tags() -> Vec<(&'static str, &'static str)> {
    crate::metrics::LABELS
        .iter()
        .chain(&TXN_LABELS)
        .chain(&AUTHZ_LABELS)
        .map(|t| (*t, *t))
        .chain(crate::router::engine::LABEL_KEYS)
        .collect()
}

/// Longest label value kept; longer values are cut (bounded stat names).
pub const MAX_VALUE_LEN: usize = 64;

/// Makes a label value safe for the encoding: keeps `[A-Za-z0-9_.:/|-]`,
/// replaces any other byte with `_`, cuts at [`MAX_VALUE_LEN`], and turns an
/// empty value into `unknown`. Input is bytes: header values need not be UTF-8.
pub fn sanitize_value(raw: &[u8]) -> String {
    if raw.is_empty() {
        return "unknown".to_string();
    }
    raw.iter()
        .take(MAX_VALUE_LEN)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'|' | b'-') {
                b as char
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether a value is already in the safe form (used to validate config).
pub fn is_clean_value(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_VALUE_LEN && sanitize_value(v.as_bytes()) == v
}

/// Builds `k1=.=v1;.;k2=.=v2;.;metric`. Values must be sanitized.
pub fn encode(pairs: &[(&str, &str)], metric: &str) -> String {
    let mut out = String::with_capacity(metric.len() + pairs.len() * 24);
    for (k, v) in pairs {
        out.push_str(k);
        out.push_str("=.=");
        out.push_str(v);
        out.push_str(";.;");
    }
    out.push_str(metric);
    out
}

/// The `stats_tags` regex that extracts label `name` (for bootstrap configs).
pub fn stats_tag_regex(name: &str) -> String {
    format!("({name}=\\.=(.*?);\\.;)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filters_labels_are_stats_tags_once() {
        let tags = stats_tags();
        let names: std::collections::BTreeSet<&str> = tags.iter().map(|(t, _)| *t).collect();
        assert_eq!(names.len(), tags.len(), "{tags:?}");
        for want in [
            "reporter",
            "request_protocol",
            "outcome",
            "reason",
            "decision",
            "rule",
        ] {
            assert!(names.contains(want), "{want} missing from {tags:?}");
        }
        assert!(tags.contains(&("service", "router_service")), "{tags:?}");
    }

    #[test]
    fn sanitizes_bytes() {
        assert_eq!(sanitize_value(b"payment"), "payment");
        assert_eq!(sanitize_value(b""), "unknown");
        assert_eq!(sanitize_value(b"a;.;b=.=c"), "a_._b_._c");
        assert_eq!(sanitize_value(&[0xff, b'x', b' ']), "_x_");
        assert_eq!(
            sanitize_value(b"outbound|8080||payment.shop.svc.cluster.local"),
            "outbound|8080||payment.shop.svc.cluster.local"
        );
        assert_eq!(sanitize_value(&[b'a'; 200]).len(), MAX_VALUE_LEN);
    }

    #[test]
    fn clean_values() {
        assert!(is_clean_value("order-v2"));
        assert!(!is_clean_value(""));
        assert!(!is_clean_value("has space"));
        assert!(!is_clean_value(&"x".repeat(65)));
    }

    #[test]
    fn encodes_istio_style() {
        assert_eq!(
            encode(
                &[("reporter", "inbound"), ("response_code", "200")],
                "m_total"
            ),
            "reporter=.=inbound;.;response_code=.=200;.;m_total"
        );
        assert_eq!(stats_tag_regex("reporter"), r"(reporter=\.=(.*?);\.;)");
    }
}
