//! gRPC on the wire, for tests that must control or see every frame: the
//! length-prefixed message framing, and a unary client (HTTP/2 with prior
//! knowledge, as a sidecar's plaintext listener takes it) that returns the
//! answer's headers, messages and trailers apart — so a test can tell a
//! trailers-only answer from one whose `grpc-status` came after the body.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::time::Duration;

/// `message` as one gRPC frame: uncompressed flag, 4-byte length, bytes.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A unary call's answer as it arrived.
#[derive(Debug, Clone)]
pub struct Answer {
    /// `:status`.
    pub http: u16,
    pub headers: Vec<(String, String)>,
    /// The body (gRPC frames).
    pub body: Vec<u8>,
    /// Empty for a trailers-only answer (its status is in `headers`).
    pub trailers: Vec<(String, String)>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
    pub fn trailer(&self, name: &str) -> Option<&str> {
        find(&self.trailers, name)
    }
    /// Whether `grpc-status` came in the headers with no body or trailers.
    pub fn trailers_only(&self) -> bool {
        self.trailers.is_empty() && self.header("grpc-status").is_some()
    }
    /// The final `grpc-status` (trailers, else a trailers-only answer's headers).
    pub fn grpc_status(&self) -> Option<u32> {
        self.metadata("grpc-status")?.parse().ok()
    }
    /// A metadata key from wherever the answer's status is: the trailers,
    /// else the headers.
    pub fn metadata(&self, name: &str) -> Option<&str> {
        self.trailer(name).or_else(|| self.header(name))
    }
}

fn find<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Calls `path` (`/package.Service/Method`) at `addr` with one message and
/// `metadata`; at most `timeout` in all (connection included).
pub fn unary(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    message: &[u8],
    metadata: &[(&str, &str)],
    timeout: Duration,
) -> Result<Answer, String> {
    Channel::connect(addr, authority, timeout)?.unary(path, message, metadata)
}

/// One HTTP/2 connection for any number of unary calls (a client thread's
/// own: it runs on a runtime of its own, driven by each call).
pub struct Channel {
    rt: tokio::runtime::Runtime,
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: String,
    timeout: Duration,
}

impl Channel {
    /// Connects to `addr`; each call then takes at most `timeout`.
    pub fn connect(addr: SocketAddr, authority: &str, timeout: Duration) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let send = rt.block_on(async {
            let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| format!("connect {addr}: no answer within {timeout:?}"))?
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("h2 handshake with {addr}: {e}"))?;
            tokio::spawn(conn);
            Ok::<_, String>(send)
        })?;
        Ok(Channel {
            rt,
            send,
            authority: authority.to_string(),
            timeout,
        })
    }

    /// One unary call of `path` with one message and `metadata`.
    pub fn unary(
        &mut self,
        path: &str,
        message: &[u8],
        metadata: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let timeout = self.timeout;
        let mut req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in metadata {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(frame(message))))
            .map_err(|e| format!("request: {e}"))?;
        let send = &mut self.send;
        self.rt.block_on(async {
            tokio::time::timeout(timeout, async {
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| format!("{path}: {e}"))?;
                let http = resp.status().as_u16();
                let pairs = |m: &hyper::HeaderMap| -> Vec<(String, String)> {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect()
                };
                let headers = pairs(resp.headers());
                let collected = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("{path} body: {e}"))?;
                let trailers = collected.trailers().map(pairs).unwrap_or_default();
                Ok(Answer {
                    http,
                    headers,
                    body: collected.to_bytes().to_vec(),
                    trailers,
                })
            })
            .await
            .map_err(|_| format!("no answer to {path} within {timeout:?}"))?
        })
    }
}

/// The message of a one-message gRPC body (None: not one whole frame).
pub fn unframe(body: &[u8]) -> Option<&[u8]> {
    let (head, rest) = body.split_at_checked(5)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    (head[0] == 0 && rest.len() == len).then_some(rest)
}

/// How a [`Participant`] answers `Prepare`.
#[derive(Clone, Debug, PartialEq)]
pub enum Vote {
    Commit,
    ReadOnly,
    No(String),
    /// Answers OK with bytes that are not a `PrepareResponse`.
    Malformed,
    /// Answers with this gRPC status and no message.
    Fail(u32),
    /// Votes commit once the test opens the latch (at most 10 s): a prepare
    /// held for exactly as long as the test needs.
    Until(crate::Latch),
}

/// A gRPC app that implements `txmesh.v1.Participant` (decoding and
/// encoding the messages with txmesh-core's `prost` types) and takes its
/// business calls over HTTP: what each transaction saw, as
/// [`crate::TxnRecord`]s, plus any breach of the contract its sidecar made.
pub struct Participant {
    pub name: String,
    pub server: crate::Upstream,
    state: std::sync::Arc<std::sync::Mutex<ParticipantState>>,
}

#[derive(Default)]
struct ParticipantState {
    txns: std::collections::BTreeMap<String, crate::TxnRecord>,
    vote: Option<Vote>,
    errors: Vec<String>,
}

impl Participant {
    pub fn start(name: &str, vote: Vote) -> Self {
        use prost::Message;
        use txmesh_core::txn::pb;
        let state = std::sync::Arc::new(std::sync::Mutex::new(ParticipantState {
            vote: Some(vote),
            ..ParticipantState::default()
        }));
        let st = state.clone();
        let server = crate::Upstream::with(move |r: &crate::Recorded| {
            let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
            let Some(method) = r.path.strip_prefix("/txmesh.v1.Participant/") else {
                // Business call.
                if let Some(t) = r.header("x-txmesh-txn") {
                    s.txns.entry(t).or_default().business += 1;
                }
                return crate::Reply::ok().json(serde_json::json!({"ok": true}));
            };
            let Some(msg) = unframe(&r.body) else {
                s.errors.push(format!("{method}: not one gRPC frame"));
                return crate::Reply::grpc(3);
            };
            let txn = match method {
                "Prepare" => pb::PrepareRequest::decode(msg).map(|m| m.txn),
                _ => pb::FinishRequest::decode(msg).map(|m| m.txn),
            };
            let Ok(txn) = txn else {
                s.errors.push(format!("{method}: bad message"));
                return crate::Reply::grpc(3);
            };
            if r.header("x-txmesh-txn").as_deref() != Some(txn.as_str()) {
                s.errors
                    .push(format!("{method}: metadata and message disagree"));
            }
            let vote = s.vote.clone();
            let rec = s.txns.entry(txn.clone()).or_default();
            match method {
                "Prepare" => {
                    rec.prepares += 1;
                    if let Some(Vote::Until(latch)) = &vote {
                        // The state is not held while waiting.
                        drop(s);
                        latch.wait(Duration::from_secs(10));
                        s = st.lock().unwrap_or_else(|e| e.into_inner());
                    }
                    let rec = s.txns.entry(txn.clone()).or_default();
                    let (v, reason) = match vote {
                        Some(Vote::Commit | Vote::Until(_)) | None => (pb::Vote::Commit, ""),
                        Some(Vote::ReadOnly) => (pb::Vote::ReadOnly, ""),
                        Some(Vote::No(ref why)) => (pb::Vote::Abort, why.as_str()),
                        Some(Vote::Malformed) => {
                            rec.voted = Some("malformed".into());
                            return crate::Reply::grpc_ok(&[0xff, 0xff, 0xff]);
                        }
                        Some(Vote::Fail(code)) => {
                            rec.voted = Some("fail".into());
                            return crate::Reply::grpc(code);
                        }
                    };
                    rec.voted = Some(
                        match v {
                            pb::Vote::Commit => "commit",
                            pb::Vote::ReadOnly => "readonly",
                            pb::Vote::Abort | pb::Vote::Unspecified => "abort",
                        }
                        .into(),
                    );
                    let answer = pb::PrepareResponse {
                        vote: v as i32,
                        reason: reason.to_string(),
                    };
                    crate::Reply::grpc_ok(&answer.encode_to_vec())
                }
                "Commit" => {
                    rec.commits += 1;
                    if rec.aborts > 0 {
                        s.errors.push(format!("commit after abort for {txn}"));
                    }
                    crate::Reply::grpc_ok(b"")
                }
                "Abort" => {
                    rec.aborts += 1;
                    if rec.commits > 0 {
                        s.errors.push(format!("abort after commit for {txn}"));
                    }
                    crate::Reply::grpc_ok(b"")
                }
                other => {
                    s.errors.push(format!("unknown method {other}"));
                    crate::Reply::grpc(12)
                }
            }
        });
        Participant {
            name: name.to_string(),
            server,
            state,
        }
    }

    pub fn set_vote(&self, vote: Vote) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).vote = Some(vote);
    }

    pub fn record(&self, txn: &str) -> crate::TxnRecord {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.txns.get(txn).cloned().unwrap_or_default()
    }

    pub fn errors(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .errors
            .clone()
    }
}
