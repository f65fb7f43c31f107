//! Authorization (`txmesh_authz.wasm`): who may call what, by the peer's mTLS
//! identity (the URI SAN of its certificate, a SPIFFE id). See docs/security.md.
//!
//! A policy is a list of rules (principals × methods × path prefixes → allow
//! or deny); the first rule that matches decides, else the default. Paths
//! under `/txmesh/` (the transaction control endpoints) and the methods of
//! the gRPC control service `txmesh.v1.Participant` are decided apart:
//! allowed only to the listed coordinators, whatever the rules say. Paths are
//! normalized first (percent-decoding, `//`, `.` and `..` segments, case of
//! the control prefix) so that no spelling of a control path slips through.

use crate::config::{parse_json, ConfigError};
use crate::host::{Family, HostError, Label, MetricKind, Metrics, Properties, RequestHeaders};
use crate::json::Obj;
use crate::labels::{is_clean_value, AUTHZ_LABELS};
use serde::Deserialize;

pub const DECISIONS_TOTAL: &str = "txmesh_authz_decisions_total";

/// `txmesh_authz_decisions_total{decision, rule}`.
pub static DECISIONS: Family = Family::new(
    MetricKind::Counter,
    DECISIONS_TOTAL,
    &[Label::named(AUTHZ_LABELS[0]), Label::named(AUTHZ_LABELS[1])],
);

/// The authz filter's stat families.
pub static FAMILIES: [&Family; 1] = [&DECISIONS];
/// The principal of a request without a (verified) peer certificate.
pub const ANONYMOUS: &str = "anonymous";
/// The transaction control endpoints.
pub const CONTROL_PREFIX: &str = "/txmesh/";
/// The gRPC participant control service (`/txmesh.v1.Participant/Prepare`…).
pub const GRPC_CONTROL_SERVICE: &str = "/txmesh.v1.Participant";
/// Rule label of the decisions on control paths.
pub const CONTROL_RULE: &str = "txmesh-control";
pub const DEFAULT_RULE: &str = "default";
pub const MAX_RULES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// How a principal is matched: `{"exact": …}`, `{"prefix": …}` or
/// `{"glob": …}` (`*` any run of characters except `/`, `**` any run,
/// `?` one character other than `/`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Principal {
    Exact(String),
    Prefix(String),
    Glob(String),
}

impl Principal {
    pub fn matches(&self, p: &[u8]) -> bool {
        match self {
            Principal::Exact(e) => e.as_bytes() == p,
            Principal::Prefix(x) => p.starts_with(x.as_bytes()),
            Principal::Glob(g) => glob(g.as_bytes(), p),
        }
    }
}

/// Glob match without recursion blow-up (iterative, backtracking to the last
/// star only): `*` = any run without `/`, `**` = any run, `?` = one non-`/`.
pub fn glob(pat: &[u8], s: &[u8]) -> bool {
    // Tokens: literal byte, '?', single star, double star.
    #[derive(Clone, Copy, PartialEq)]
    enum T {
        Lit(u8),
        One,
        Star,
        Any,
    }
    let mut toks = Vec::with_capacity(pat.len());
    let mut i = 0;
    while let Some(&c) = pat.get(i) {
        match c {
            b'*' if pat.get(i + 1) == Some(&b'*') => {
                toks.push(T::Any);
                i += 2;
            }
            b'*' => {
                toks.push(T::Star);
                i += 1;
            }
            b'?' => {
                toks.push(T::One);
                i += 1;
            }
            c => {
                toks.push(T::Lit(c));
                i += 1;
            }
        }
    }
    // Dynamic programming over (token, position): O(len(pat) × len(s)).
    let n = s.len();
    let mut cur = vec![false; n + 1];
    if let Some(c0) = cur.first_mut() {
        *c0 = true;
    }
    for t in &toks {
        let mut next = vec![false; n + 1];
        match t {
            T::Lit(_) | T::One => {
                // next[j + 1] = cur[j] and s[j] fits.
                for ((nx, c), ch) in next.iter_mut().skip(1).zip(cur.iter()).zip(s.iter()) {
                    *nx = *c
                        && match t {
                            T::Lit(l) => ch == l,
                            _ => *ch != b'/',
                        };
                }
            }
            T::Star | T::Any => {
                let mut reach = false;
                for (j, (nx, c)) in next.iter_mut().zip(cur.iter()).enumerate() {
                    reach |= *c;
                    *nx = reach;
                    if *t == T::Star && s.get(j) == Some(&b'/') {
                        reach = false;
                    }
                }
            }
        }
        cur = next;
    }
    cur.last().copied().unwrap_or(false)
}

/// One rule. Empty `principals`, `methods` or `paths` match anything.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Label value in `txmesh_authz_decisions_total{rule}`.
    pub name: String,
    pub action: Action,
    #[serde(default)]
    pub principals: Vec<Principal>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path prefixes, matched against the normalized path.
    #[serde(default)]
    pub paths: Vec<String>,
}

impl Rule {
    fn matches(&self, principal: &[u8], method: &[u8], path: &str) -> bool {
        (self.principals.is_empty() || self.principals.iter().any(|p| p.matches(principal)))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m.as_bytes() == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| path.starts_with(p.as_str())))
    }
}

/// Headers a client outside the mesh must never set; removed at the edge
/// before any filter acts on them (docs/security.md).
pub const EDGE_STRIPPED: [&str; 4] = [
    "x-txmesh-outcome",
    "x-txmesh-deadline",
    "x-txmesh-endpoint",
    "x-txmesh-source-workload",
];

/// Edge mode (the ingress): sanitize what clients send.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    /// Keep `x-txmesh-txn: new` (a client may begin a transaction where the
    /// initiator's txn filter allows it); any other value is removed.
    #[serde(default)]
    pub allow_txn_begin: bool,
    /// More headers to remove (lowercase names), e.g. a router's custom
    /// `endpoint_header`.
    #[serde(default)]
    pub strip: Vec<String>,
}

impl Edge {
    /// Removes what a client must not control: the txmesh headers, a
    /// transaction id (unless `new` is allowed), the `txmesh.txn` member of
    /// W3C `baggage` (other members stay).
    pub fn sanitize(&self, h: &impl RequestHeaders) {
        for name in EDGE_STRIPPED
            .iter()
            .copied()
            .chain(self.strip.iter().map(String::as_str))
        {
            h.set_request_header(name, None);
        }
        if let Some(v) = h.request_header(crate::txn::id::TXN_HEADER) {
            if !(self.allow_txn_begin && v == b"new") {
                h.set_request_header(crate::txn::id::TXN_HEADER, None);
            }
        }
        if let Some(b) = h.request_header(crate::txn::id::BAGGAGE_HEADER) {
            match strip_baggage_txn(&b) {
                Some(kept) if kept.len() == b.len() => {}
                Some(kept) if kept.is_empty() => {
                    h.set_request_header(crate::txn::id::BAGGAGE_HEADER, None)
                }
                Some(kept) => h.set_request_header(crate::txn::id::BAGGAGE_HEADER, Some(&kept)),
                None => h.set_request_header(crate::txn::id::BAGGAGE_HEADER, None),
            }
        }
    }
}

/// `baggage` without its `txmesh.txn` members; `None` when not UTF-8.
pub fn strip_baggage_txn(b: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(b).ok()?;
    let kept: Vec<&str> = text
        .split(',')
        .filter(|m| {
            let key = m.split(['=', ';']).next().unwrap_or("").trim();
            !key.eq_ignore_ascii_case("txmesh.txn") && !m.trim().is_empty()
        })
        .map(str::trim)
        .collect();
    if kept.len() == text.split(',').count() {
        return Some(text.to_string());
    }
    Some(kept.join(","))
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// When no rule matches.
    pub default: Action,
    /// Principals allowed on `/txmesh/*` (the mesh's sidecars).
    #[serde(default)]
    pub coordinators: Vec<Principal>,
    /// Present at the mesh's edge: sanitize client headers first.
    #[serde(default)]
    pub edge: Option<Edge>,
}

impl AuthzConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let c: Self = parse_json(bytes)?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.rules.len() > MAX_RULES {
            return Err(ConfigError::at(
                "rules",
                format!("at most {MAX_RULES} rules, got {}", self.rules.len()),
            ));
        }
        let check_principal = |at: String, p: &Principal| -> Result<(), ConfigError> {
            let (kind, v) = match p {
                Principal::Exact(v) => ("exact", v),
                Principal::Prefix(v) => ("prefix", v),
                Principal::Glob(v) => ("glob", v),
            };
            if v.is_empty() {
                return Err(ConfigError::at(at, format!("empty {kind} principal")));
            }
            if v.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(ConfigError::at(
                    at,
                    format!("{kind} principal {v:?} has spaces or non-ASCII characters"),
                ));
            }
            Ok(())
        };
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            if !is_clean_value(&r.name) || r.name == CONTROL_RULE || r.name == DEFAULT_RULE {
                return Err(ConfigError::at(
                    at("name"),
                    format!(
                        "{:?}: 1 to 64 characters of A-Z a-z 0-9 _ . : / | -, not {CONTROL_RULE:?} or {DEFAULT_RULE:?}",
                        r.name
                    ),
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(ConfigError::at(
                    at("name"),
                    format!("{:?} names two rules", r.name),
                ));
            }
            for (j, p) in r.principals.iter().enumerate() {
                check_principal(at(&format!("principals[{j}]")), p)?;
            }
            for (j, m) in r.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(ConfigError::at(
                        at(&format!("methods[{j}]")),
                        format!("{m:?} is not an upper-case HTTP method"),
                    ));
                }
            }
            for (j, p) in r.paths.iter().enumerate() {
                if !p.starts_with('/') || normalize_path(p.as_bytes()).as_deref() != Some(p) {
                    return Err(ConfigError::at(
                        at(&format!("paths[{j}]")),
                        format!("{p:?} must be a normalized path prefix starting with `/`"),
                    ));
                }
            }
        }
        for (j, p) in self.coordinators.iter().enumerate() {
            check_principal(format!("coordinators[{j}]"), p)?;
        }
        if let Some(e) = &self.edge {
            for (j, n) in e.strip.iter().enumerate() {
                if n.is_empty()
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    || n.starts_with(':')
                {
                    return Err(ConfigError::at(
                        format!("edge.strip[{j}]"),
                        format!("{n:?} is not a lowercase header name"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The decision for one request and the rule that made it.
    pub fn decide(&self, principal: &[u8], method: &[u8], raw_path: &[u8]) -> (Action, &str) {
        let Some(path) = normalize_path(raw_path) else {
            // A path that cannot be normalized is nobody's business.
            return (Action::Deny, DEFAULT_RULE);
        };
        if is_control(&path) {
            let ok = self.coordinators.iter().any(|c| c.matches(principal));
            return (if ok { Action::Allow } else { Action::Deny }, CONTROL_RULE);
        }
        match self
            .rules
            .iter()
            .find(|r| r.matches(principal, method, &path))
        {
            Some(r) => (r.action, r.name.as_str()),
            None => (self.default, DEFAULT_RULE),
        }
    }
}

/// Whether a normalized path is a control path: `/txmesh` or the gRPC
/// control service, then the end or a `/` (case-insensitively: an app may
/// route paths without regard to case).
pub fn is_control(path: &str) -> bool {
    let p = path.as_bytes();
    [CONTROL_PREFIX.trim_end_matches('/'), GRPC_CONTROL_SERVICE]
        .iter()
        .any(|head| {
            let head = head.as_bytes();
            p.get(..head.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(head))
                && matches!(p.get(head.len()), None | Some(b'/'))
        })
}

/// The path without query, percent-decoded, with `//` merged and `.`/`..`
/// segments resolved. `None` for bad percent-encoding, a decoded NUL, `/`,
/// `\` or `?` (an encoded separator), or a path not starting with `/`.
pub fn normalize_path(raw: &[u8]) -> Option<String> {
    let raw = raw.split(|&b| b == b'?' || b == b'#').next().unwrap_or(&[]);
    if raw.first() != Some(&b'/') {
        return None;
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let hi = hex(*raw.get(i + 1)?)?;
            let lo = hex(*raw.get(i + 2)?)?;
            let c = (hi * 16 + lo) as u8;
            if matches!(c, 0 | b'/' | b'\\' | b'?') {
                return None;
            }
            decoded.push(c);
            i += 3;
        } else {
            if b == b'\\' || b == 0 {
                return None;
            }
            decoded.push(b);
            i += 1;
        }
    }
    let mut segs: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for s in &segs {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() || decoded.ends_with(b"/") {
        out.push(b'/');
    }
    String::from_utf8(out).ok()
}

/// The principal of the current stream: the peer certificate's URI SAN, or
/// [`ANONYMOUS`].
pub fn principal_of(h: &impl Properties) -> Vec<u8> {
    match h.property(&["connection", "uri_san_peer_certificate"]) {
        Some(v) if !v.is_empty() => v,
        _ => ANONYMOUS.as_bytes().to_vec(),
    }
}

/// The body of a 403: `{"error": "forbidden", "principal": ...}`.
pub fn denial_body(principal: &[u8]) -> Vec<u8> {
    Obj::new()
        .str("error", "forbidden")
        .str("principal", &String::from_utf8_lossy(principal))
        .build()
        .into_bytes()
}

/// A local reply: status, headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: Vec<u8>,
}

/// How a denied request is answered: 403 with the JSON `body`; a gRPC client
/// (`grpc`: its content-type is gRPC) gets what gRPC defines for it instead,
/// a trailers-only answer with `grpc-status: 7` (PERMISSION_DENIED). A host
/// whose local replies Envoy already turns into gRPC's form (proxy-wasm's)
/// passes `grpc = false`; the dynamic-modules ABI does not, so the native
/// host passes the request's own.
pub fn denial_reply(body: Vec<u8>, grpc: bool) -> Reply {
    if grpc {
        Reply {
            status: 200,
            headers: vec![
                ("content-type", "application/grpc"),
                ("grpc-status", "7"),
                ("grpc-message", "forbidden"),
            ],
            body: Vec::new(),
        }
    } else {
        Reply {
            status: 403,
            headers: vec![("content-type", "application/json")],
            body,
        }
    }
}

/// A decision to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer 403 with this JSON body.
    Deny(Vec<u8>),
}

/// The filter: config plus stat ids per (rule, decision), defined once.
pub struct AuthzEngine {
    cfg: AuthzConfig,
    /// (rule, decision) -> stat id.
    stats: Vec<(String, Action, u32)>,
}

impl AuthzEngine {
    pub fn new(cfg: AuthzConfig, m: &impl Metrics) -> Result<Self, HostError> {
        let mut rules: Vec<String> = cfg.rules.iter().map(|r| r.name.clone()).collect();
        rules.push(CONTROL_RULE.to_string());
        rules.push(DEFAULT_RULE.to_string());
        let mut stats = Vec::new();
        for r in rules {
            for a in [Action::Allow, Action::Deny] {
                let id = m.define_metric(&DECISIONS, &[a.as_str(), &r])?;
                stats.push((r.clone(), a, id));
            }
        }
        Ok(Self { cfg, stats })
    }

    pub fn config(&self) -> &AuthzConfig {
        &self.cfg
    }

    /// One line for the log at configure time.
    pub fn describe(&self) -> String {
        format!(
            "{} rules, default {}, {} coordinator patterns",
            self.cfg.rules.len(),
            self.cfg.default.as_str(),
            self.cfg.coordinators.len()
        )
    }

    /// Sanitizes (at the edge), decides the current request and counts the
    /// decision.
    pub fn on_request_headers(&self, h: &(impl RequestHeaders + Properties + Metrics)) -> Verdict {
        if let Some(edge) = &self.cfg.edge {
            edge.sanitize(h);
        }
        let principal = principal_of(h);
        let method = h.request_header(":method").unwrap_or_default();
        let path = h.request_header(":path").unwrap_or_default();
        let (action, rule) = self.cfg.decide(&principal, &method, &path);
        if let Some((_, _, id)) = self
            .stats
            .iter()
            .find(|(r, a, _)| r == rule && *a == action)
        {
            let _ = h.increment_metric(*id, 1);
        }
        match action {
            Action::Allow => Verdict::Allow,
            Action::Deny => Verdict::Deny(denial_body(&principal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    const ORDER: &[u8] = b"spiffe://txmesh.local/ns/shop/sa/order";
    const MALLORY: &[u8] = b"spiffe://evil.example/ns/x/sa/mallory";

    fn policy() -> AuthzConfig {
        AuthzConfig::parse(
            br#"{
              "default": "deny",
              "coordinators": [{"prefix": "spiffe://txmesh.local/ns/shop/sa/"}],
              "rules": [
                {"name": "no-admin", "action": "deny", "paths": ["/admin"]},
                {"name": "order-pays", "action": "allow",
                 "principals": [{"exact": "spiffe://txmesh.local/ns/shop/sa/order"}],
                 "methods": ["POST"], "paths": ["/charge", "/reserve"]},
                {"name": "shop-reads", "action": "allow",
                 "principals": [{"glob": "spiffe://txmesh.local/ns/*/sa/*"}], "methods": ["GET"]},
                {"name": "health", "action": "allow", "principals": [{"exact": "anonymous"}], "paths": ["/health"]}
              ]
            }"#,
        )
        .unwrap()
    }

    #[test]
    fn allow_deny_first_match_default_glob() {
        let p = policy();
        // allow
        assert_eq!(
            p.decide(ORDER, b"POST", b"/charge"),
            (Action::Allow, "order-pays")
        );
        // the method must match
        assert_eq!(
            p.decide(ORDER, b"DELETE", b"/charge"),
            (Action::Deny, "default")
        );
        // deny, and first match wins over the later allow
        assert_eq!(
            p.decide(ORDER, b"GET", b"/admin/x"),
            (Action::Deny, "no-admin")
        );
        // glob: * does not cross '/'
        assert_eq!(
            p.decide(
                b"spiffe://txmesh.local/ns/shop/sa/payment",
                b"GET",
                b"/stock/x"
            ),
            (Action::Allow, "shop-reads")
        );
        assert_eq!(
            p.decide(
                b"spiffe://txmesh.local/ns/shop/extra/sa/payment",
                b"GET",
                b"/stock/x"
            ),
            (Action::Deny, "default")
        );
        // default
        assert_eq!(
            p.decide(MALLORY, b"GET", b"/stock"),
            (Action::Deny, "default")
        );
        assert_eq!(
            p.decide(b"anonymous", b"GET", b"/health"),
            (Action::Allow, "health")
        );
        let open = AuthzConfig::parse(br#"{"default": "allow"}"#).unwrap();
        assert_eq!(
            open.decide(MALLORY, b"GET", b"/x"),
            (Action::Allow, "default")
        );
    }

    #[test]
    fn control_paths_only_for_coordinators_in_any_spelling() {
        let p = policy();
        for path in [
            &b"/txmesh/prepare"[..],
            b"/txmesh/commit",
            b"/txmesh/abort?x=1",
            b"//txmesh/prepare",
            b"/./txmesh/prepare",
            b"/a/../txmesh/commit",
            b"/TXMESH/abort",
            b"/%74xmesh/prepare",
            b"/txmesh",
            b"/txmesh/",
            b"/txmesh.v1.Participant/Prepare",
            b"/txmesh.v1.participant/Commit",
            b"//txmesh.v1.Participant/Abort",
            b"/txmesh.v1.Participant",
        ] {
            assert_eq!(
                p.decide(MALLORY, b"POST", path),
                (Action::Deny, CONTROL_RULE),
                "{}",
                String::from_utf8_lossy(path)
            );
            assert_eq!(
                p.decide(ORDER, b"POST", path),
                (Action::Allow, CONTROL_RULE)
            );
        }
        // An allow-everything rule does not open the control paths.
        let open = AuthzConfig::parse(
            br#"{"default": "allow", "rules": [{"name": "all", "action": "allow"}]}"#,
        )
        .unwrap();
        assert_eq!(
            open.decide(ORDER, b"POST", b"/txmesh/prepare"),
            (Action::Deny, CONTROL_RULE)
        );
        // Not a control path.
        assert_eq!(
            p.decide(ORDER, b"GET", b"/txmeshy"),
            (Action::Allow, "shop-reads")
        );
        assert_ne!(
            p.decide(MALLORY, b"POST", b"/txmesh.v1.ParticipantX/Prepare")
                .1,
            CONTROL_RULE
        );
        // Encoded separators are refused.
        assert_eq!(
            p.decide(ORDER, b"GET", b"/a%2ftxmesh"),
            (Action::Deny, DEFAULT_RULE)
        );
        assert_eq!(
            p.decide(ORDER, b"GET", b"/bad%zz"),
            (Action::Deny, DEFAULT_RULE)
        );
    }

    #[test]
    fn normalizes_paths() {
        let n = |p: &[u8]| normalize_path(p);
        assert_eq!(n(b"/a//b/./c/../d?q=1").as_deref(), Some("/a/b/d"));
        assert_eq!(n(b"/").as_deref(), Some("/"));
        assert_eq!(n(b"/a/").as_deref(), Some("/a/"));
        assert_eq!(n(b"/../..").as_deref(), Some("/"));
        assert_eq!(n(b"/%41").as_deref(), Some("/A"));
        assert_eq!(n(b"a"), None);
        assert_eq!(n(b"/%2F"), None);
        assert_eq!(n(b"/%00"), None);
        assert_eq!(n(b"/a\\b"), None);
        assert_eq!(n(&[b'/', 0xff]), None);
    }

    #[test]
    fn globs() {
        assert!(glob(b"a*c", b"abbbc"));
        assert!(!glob(b"a*c", b"ab/c"));
        assert!(glob(b"a**c", b"ab/c"));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a?c", b"a/c"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"a", b""));
        assert!(glob(
            b"spiffe://x/ns/*/sa/*",
            b"spiffe://x/ns/shop/sa/order"
        ));
    }

    #[test]
    fn bad_policies_are_refused_with_the_path() {
        let e = |s: &str| AuthzConfig::parse(s.as_bytes()).unwrap_err();
        let x = e(r#"{"rules": []}"#);
        assert!(x.message.contains("missing field `default`"), "{x}");
        let x = e(r#"{"default": "maybe"}"#);
        assert_eq!(x.path, "default");
        let x = e(
            r#"{"default": "deny", "rules": [{"name": "r", "action": "allow", "principals": [{"regex": "x"}]}]}"#,
        );
        assert_eq!(x.path, "rules[0].principals[0]");
        let x = e(
            r#"{"default": "deny", "rules": [{"name": "r", "action": "allow", "methods": ["get"]}]}"#,
        );
        assert_eq!(x.path, "rules[0].methods[0]");
        let x = e(
            r#"{"default": "deny", "rules": [{"name": "r", "action": "allow", "paths": ["/a/../b"]}]}"#,
        );
        assert_eq!(x.path, "rules[0].paths[0]");
        let x = e(
            r#"{"default": "deny", "rules": [{"name": "r", "action": "allow"}, {"name": "r", "action": "deny"}]}"#,
        );
        assert_eq!(x.path, "rules[1].name");
        assert_eq!(x.message, "\"r\" names two rules");
        let x = e(r#"{"default": "deny", "coordinators": [{"exact": ""}]}"#);
        assert_eq!(x.path, "coordinators[0]");
        let x = e(r#"{"default": "deny", "rules": [{"name": "default", "action": "deny"}]}"#);
        assert_eq!(x.path, "rules[0].name");
    }

    #[test]
    fn edge_strips_what_clients_must_not_control() {
        let forged = || {
            FakeHost::new()
                .header(":method", b"POST")
                .header(":path", b"/checkout")
                .header("x-txmesh-outcome", b"committed")
                .header("x-txmesh-endpoint", b"6.6.6.6:66")
                .header("x-txmesh-deadline", b"99999999999999")
                .header("x-txmesh-source-workload", b"order")
                .header(
                    "baggage",
                    b"userId=alice, txmesh.txn=0123456789abcdef0123456789abcdef;p=1,k=v",
                )
                .header("x-other", b"kept")
        };
        let strict = Edge::default();
        let h = forged().header("x-txmesh-txn", b"new");
        strict.sanitize(&h);
        for n in EDGE_STRIPPED.iter().chain(&["x-txmesh-txn"]) {
            assert_eq!(h.header_value(n), None, "{n}");
        }
        assert_eq!(h.header_value("baggage").unwrap(), b"userId=alice,k=v");
        assert_eq!(h.header_value("x-other").unwrap(), b"kept");
        // Beginning from outside, where allowed: only `new` passes.
        let open = Edge {
            allow_txn_begin: true,
            strip: vec!["x-pick".into()],
        };
        let h = forged()
            .header("x-txmesh-txn", b"new")
            .header("x-pick", b"1.2.3.4:5");
        open.sanitize(&h);
        assert_eq!(h.header_value("x-txmesh-txn").unwrap(), b"new");
        assert_eq!(h.header_value("x-pick"), None);
        let h = forged().header("x-txmesh-txn", b"0123456789abcdef0123456789abcdef");
        open.sanitize(&h);
        assert_eq!(h.header_value("x-txmesh-txn"), None);
        // Baggage that was only the txn member goes; non-UTF-8 baggage goes.
        let h = FakeHost::new().header("baggage", b"txmesh.txn=01");
        strict.sanitize(&h);
        assert_eq!(h.header_value("baggage"), None);
        let h = FakeHost::new().header("baggage", &[0xff, b'a']);
        strict.sanitize(&h);
        assert_eq!(h.header_value("baggage"), None);
        let h = FakeHost::new().header("baggage", b"a=1");
        strict.sanitize(&h);
        assert_eq!(h.header_value("baggage").unwrap(), b"a=1");
    }

    #[test]
    fn engine_counts_and_answers_403() {
        let h = FakeHost::new()
            .header(":method", b"POST")
            .header(":path", b"/txmesh/prepare")
            .prop(&["connection", "uri_san_peer_certificate"], MALLORY);
        let e = AuthzEngine::new(policy(), &h).unwrap();
        assert_eq!(
            e.on_request_headers(&h),
            Verdict::Deny(
                br#"{"error":"forbidden","principal":"spiffe://evil.example/ns/x/sa/mallory"}"#
                    .to_vec()
            )
        );
        assert_eq!(
            h.counter("decision=.=deny;.;rule=.=txmesh-control;.;txmesh_authz_decisions_total"),
            Some(1)
        );
        // No certificate: anonymous.
        let h2 = FakeHost::new()
            .header(":method", b"GET")
            .header(":path", b"/health");
        assert_eq!(e.on_request_headers(&h2), Verdict::Allow);
        let h3 = FakeHost::new()
            .header(":method", b"GET")
            .header(":path", b"/stock");
        assert_eq!(
            e.on_request_headers(&h3),
            Verdict::Deny(br#"{"error":"forbidden","principal":"anonymous"}"#.to_vec())
        );
        // 6 rules incl. control and default, two decisions each, defined once.
        assert_eq!(*h.define_calls.borrow(), 12);
    }

    #[test]
    fn a_denial_is_a_403_or_grpc_permission_denied() {
        let body = denial_body(b"spiffe://x");
        let http = denial_reply(body.clone(), false);
        assert_eq!(
            (http.status, http.headers, http.body),
            (
                403,
                vec![("content-type", "application/json")],
                body.clone()
            )
        );
        let grpc = denial_reply(body, true);
        assert_eq!(grpc.status, 200);
        assert!(grpc.headers.contains(&("grpc-status", "7")));
        assert!(grpc.body.is_empty());
    }
}
