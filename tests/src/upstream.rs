//! Real HTTP servers (hyper; HTTP/1.1, and HTTP/2 with prior knowledge for
//! gRPC apps) whose behaviour a test scripts, recording every request they
//! receive. A reply may carry trailers (a gRPC answer's `grpc-status`).
//!
//! By default a server answers as the request asks, with these headers:
//! `x-test-status` (default 200), `x-test-delay-ms` (default 0) and
//! `x-test-body-size` (bytes of `x`, default 2). A test can instead install
//! its own handler (`Upstream::with`).

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::watch;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("upstream")
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
    })
}

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// What the upstream answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Sent after the body (HTTP/2: a trailing HEADERS frame).
    pub trailers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            trailers: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn ok() -> Self {
        Self::status(200)
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
    pub fn json(self, v: serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(v.to_string())
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn trailer(mut self, k: &str, v: &str) -> Self {
        self.trailers.push((k.to_string(), v.to_string()));
        self
    }

    /// A unary gRPC answer: one empty message, then `grpc-status` in the
    /// trailers.
    pub fn grpc(status: u32) -> Self {
        Self::grpc_message(b"").trailer("grpc-status", &status.to_string())
    }

    /// A unary gRPC answer OK with this (encoded) message.
    pub fn grpc_ok(message: &[u8]) -> Self {
        Self::grpc_message(message).trailer("grpc-status", "0")
    }

    fn grpc_message(message: &[u8]) -> Self {
        Reply::ok()
            .header("content-type", "application/grpc")
            .body(crate::grpc::frame(message))
    }

    /// A trailers-only gRPC answer: `grpc-status` in the headers, no body.
    pub fn grpc_trailers_only(status: u32) -> Self {
        Reply::ok()
            .header("content-type", "application/grpc")
            .header("grpc-status", &status.to_string())
    }

    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    /// The default behaviour: as the request's `x-test-*` headers ask.
    pub fn as_requested(r: &Recorded) -> Self {
        let num = |h: &str, d: u64| {
            r.header(h)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(d)
        };
        Reply::status(num("x-test-status", 200) as u16)
            .body(vec![b'x'; num("x-test-body-size", 2) as usize])
            .delay(Duration::from_millis(num("x-test-delay-ms", 0)))
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A running HTTP server on a free loopback port; stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    handler: Arc<RwLock<Handler>>,
    stop: watch::Sender<bool>,
}

impl Upstream {
    /// A server scripted by the request headers (see the module docs).
    pub fn start() -> Self {
        Self::with(Reply::as_requested)
    }

    /// A server answering with `handler`.
    pub fn with(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        Self::with_on(0, handler)
    }

    /// A server for load tests: answers 200 `ok` at once, records nothing.
    pub fn fast() -> Self {
        Self::build(0, None)
    }

    /// A server on a given loopback port (0: any free port).
    pub fn with_on(
        port: u16,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::build(port, Some(Arc::new(handler)))
    }

    fn build(port: u16, handler: Option<Handler>) -> Self {
        let fast = handler.is_none();
        let handler: Handler = handler.unwrap_or_else(|| Arc::new(|_: &Recorded| Reply::ok()));
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("upstream bind 127.0.0.1:{port}: {e}"));
        let addr = std_listener
            .local_addr()
            .unwrap_or_else(|e| panic!("upstream addr: {e}"));
        std_listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("nonblocking: {e}"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<RwLock<Handler>> = Arc::new(RwLock::new(handler));
        let (stop, stop_rx) = watch::channel(false);
        let rt = runtime();
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .unwrap_or_else(|e| panic!("tokio listener: {e}"));
        let (reqs, h) = (requests.clone(), handler.clone());
        rt.spawn(async move {
            let mut stop_rx = stop_rx;
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    acc = listener.accept() => {
                        let Ok((stream, _)) = acc else { continue };
                        // HTTP/2 answers go out in several writes (headers,
                        // data, trailers): no Nagle delay between them.
                        let _ = stream.set_nodelay(true);
                        let (reqs, h, mut stop_conn) = (reqs.clone(), h.clone(), stop_rx.clone());
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| serve(req, reqs.clone(), h.clone(), fast));
                            let server = auto::Builder::new(TokioExecutor::new());
                            let conn = server.serve_connection(TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {},
                                _ = stop_conn.changed() => {},
                            }
                        });
                    }
                }
            }
        });
        Self {
            addr,
            requests,
            handler,
            stop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the behaviour from now on.
    pub fn set_handler(&self, handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) {
        *self.handler.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(handler);
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests received on `path` (exact match, without query).
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.split('?').next() == Some(path))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn serve(
    req: hyper::Request<hyper::body::Incoming>,
    reqs: Arc<Mutex<Vec<Recorded>>>,
    handler: Arc<RwLock<Handler>>,
    fast: bool,
) -> Result<hyper::Response<BoxBody<Bytes, Infallible>>, hyper::Error> {
    if fast {
        let _ = req.into_body().collect().await?;
        return Ok(hyper::Response::new(
            Full::new(Bytes::from_static(b"ok")).boxed(),
        ));
    }
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    let body = req.into_body().collect().await?.to_bytes().to_vec();
    let rec = Recorded {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    };
    let h = handler.read().unwrap_or_else(|e| e.into_inner()).clone();
    // Handlers may block (an app calling other services): off the runtime.
    let (reply, rec) = tokio::task::spawn_blocking(move || (h(&rec), rec))
        .await
        .unwrap_or_else(|e| panic!("upstream handler panicked: {e}"));
    reqs.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut b = hyper::Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        b = b.header(k, v);
    }
    let body = Full::new(Bytes::from(reply.body));
    let body = if reply.trailers.is_empty() {
        body.boxed()
    } else {
        let mut trailers = hyper::HeaderMap::new();
        for (k, v) in &reply.trailers {
            if let (Ok(k), Ok(v)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                hyper::header::HeaderValue::from_str(v),
            ) {
                trailers.append(k, v);
            }
        }
        body.with_trailers(async move { Some(Ok(trailers)) })
            .boxed()
    };
    Ok(b.body(body)
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new()).boxed())))
}
