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
/// `metadata`; at most `timeout` in all.
pub fn unary(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    message: &[u8],
    metadata: &[(&str, &str)],
    timeout: Duration,
) -> Result<Answer, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        tokio::time::timeout(timeout, call(addr, authority, path, message, metadata))
            .await
            .map_err(|_| format!("no answer from {addr}{path} within {timeout:?}"))?
    })
}

async fn call(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    message: &[u8],
    metadata: &[(&str, &str)],
) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h2 handshake with {addr}: {e}"))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in metadata {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(frame(message))))
        .map_err(|e| format!("request: {e}"))?;
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
}
