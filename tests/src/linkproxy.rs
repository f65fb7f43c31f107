//! A link proxy: the faults a kernel without `netem` cannot make. One
//! instance stands on one link (a sidecar's cluster endpoint: another pod's
//! sidecar, or an etcd member), listening on 127.0.0.1 inside the *calling*
//! pod, so that its upstream connections leave from that pod and that pod's
//! nftables rules still apply to them. It reads HTTP/1.1 messages (every link
//! between sidecars and to etcd's JSON gateway is HTTP/1.1 here) and forwards
//! each request on a connection of its own to the target, then, depending on
//! its [`Mode`], delays it (with jitter), holds it until a later request has
//! overtaken it (reordering), sends it a second time later (a duplicate
//! arriving after the original, as a retransmission or a retried call would),
//! or forwards it and loses the answer (the request took effect, the caller
//! never hears). Anything it cannot parse as HTTP/1.1 is copied unchanged.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to each request on its link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward as is.
    Pass,
    /// Wait `ms` ± `jitter_ms` before forwarding.
    Delay { ms: u64, jitter_ms: u64 },
    /// Hold every other request (the first after the mode is set, the
    /// third, ...) until a later one has been forwarded (or `hold_ms`
    /// passed): later requests overtake it.
    Reorder { hold_ms: u64 },
    /// Forward, answer, then send the same request again within `within_ms`.
    Duplicate { within_ms: u64 },
    /// Forward; then, for `percent` of requests, close the caller's
    /// connection instead of answering.
    DropAnswer { percent: u64 },
}

/// What the proxy has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub delayed: u64,
    /// Requests that a later request overtook.
    pub reordered: u64,
    pub duplicated: u64,
    pub answers_dropped: u64,
    /// Connections copied byte for byte (not HTTP/1.1).
    pub raw: u64,
}

struct Link {
    name: String,
    target: SocketAddr,
    netns: Option<String>,
    mode: Mutex<Mode>,
    counts: Mutex<Counts>,
    /// Requests forwarded so far, and a signal for held requests.
    forwarded: Mutex<u64>,
    overtaken: Condvar,
    rng: AtomicU64,
    /// Requests since the mode was set (reordering holds the even ones).
    since_set: AtomicU64,
    stop: AtomicBool,
}

impl Link {
    fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner()));
    }
    fn below(&self, n: u64) -> u64 {
        let mut r =
            txmesh_core::rng::SplitMix64(self.rng.fetch_add(0x9e37_79b9, Ordering::Relaxed));
        r.below(n.max(1))
    }
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Moves the calling thread into the link's pod; false if it is gone.
    fn enter(&self) -> bool {
        match &self.netns {
            Some(ns) => match crate::netns::enter_ns(ns) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("[linkproxy {}] cannot enter {ns}: {e}", self.name);
                    false
                }
            },
            None => true,
        }
    }
}

/// One link's proxy; stops accepting when dropped.
pub struct LinkProxy {
    addr: SocketAddr,
    link: Arc<Link>,
}

impl LinkProxy {
    /// A proxy to `target`, listening on 127.0.0.1 in `pod` (or in this
    /// process's namespace), in mode [`Mode::Pass`].
    pub fn start(
        name: &str,
        pod: Option<&crate::netns::Pod>,
        target: SocketAddr,
        seed: u64,
    ) -> Self {
        let link = Arc::new(Link {
            name: name.to_string(),
            target,
            netns: pod.map(|p| p.ns.clone()),
            mode: Mutex::new(Mode::Pass),
            counts: Mutex::new(Counts::default()),
            forwarded: Mutex::new(0),
            overtaken: Condvar::new(),
            rng: AtomicU64::new(seed),
            since_set: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let l = link.clone();
        std::thread::Builder::new()
            .name(format!("linkproxy-{name}"))
            .spawn(move || {
                if !l.enter() {
                    return;
                }
                let listener = match TcpListener::bind(("127.0.0.1", 0)) {
                    Ok(s) => s,
                    Err(e) => panic!("linkproxy {}: bind: {e}", l.name),
                };
                let _ = tx.send(listener.local_addr());
                for conn in listener.incoming() {
                    if l.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let l = l.clone();
                    // Spawned from a thread in the pod: in the pod too.
                    std::thread::spawn(move || serve(&l, conn));
                }
            })
            .unwrap_or_else(|e| panic!("linkproxy thread: {e}"));
        let addr = rx
            .recv()
            .unwrap_or_else(|e| panic!("linkproxy {name}: {e}"))
            .unwrap_or_else(|e| panic!("linkproxy {name}: {e}"));
        LinkProxy { addr, link }
    }

    /// Where the link's caller connects (127.0.0.1 in its pod).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: Mode) {
        *self.link.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
        self.link.since_set.store(0, Ordering::SeqCst);
        self.link.overtaken.notify_all();
    }

    pub fn counts(&self) -> Counts {
        *self.link.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.link.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection from its own namespace.
        let (l, addr) = (self.link.clone(), self.addr);
        let _ = std::thread::spawn(move || {
            if l.enter() {
                let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
            }
        })
        .join();
    }
}

/// The HTTP/1.1 message kinds (a response's body framing differs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Response,
}

/// Reads one HTTP/1.1 message verbatim (head and body). `Ok(None)` at a
/// clean end of stream before a message.
fn read_message(r: &mut BufReader<TcpStream>, kind: Kind) -> std::io::Result<Option<Vec<u8>>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut msg = Vec::new();
    let (mut length, mut chunked, mut close) = (None::<usize>, false, false);
    let mut first = true;
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return if msg.is_empty() {
                Ok(None)
            } else {
                Err(bad("eof in head"))
            };
        }
        msg.extend_from_slice(&line);
        if msg.len() > 64 * 1024 {
            return Err(bad("head too long"));
        }
        let text = String::from_utf8_lossy(&line)
            .trim_end()
            .to_ascii_lowercase();
        if first {
            first = false;
            let ok = match kind {
                Kind::Request => text.ends_with(" http/1.1") || text.ends_with(" http/1.0"),
                Kind::Response => text.starts_with("http/1."),
            };
            if !ok {
                return Err(bad("not HTTP/1.1"));
            }
            continue;
        }
        if text.is_empty() {
            break;
        }
        if let Some((k, v)) = text.split_once(':') {
            let v = v.trim();
            match k.trim() {
                "content-length" => length = v.parse().ok(),
                "transfer-encoding" => chunked = v.contains("chunked"),
                "connection" => close = v.contains("close"),
                _ => {}
            }
        }
    }
    if chunked {
        loop {
            let mut size_line = Vec::new();
            r.read_until(b'\n', &mut size_line)?;
            msg.extend_from_slice(&size_line);
            let hex = String::from_utf8_lossy(&size_line);
            let size = usize::from_str_radix(hex.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = Vec::new();
                    r.read_until(b'\n', &mut t)?;
                    msg.extend_from_slice(&t);
                    if t == b"\r\n" || t.is_empty() {
                        return Ok(Some(msg));
                    }
                }
            }
            let start = msg.len();
            msg.resize(start + size + 2, 0);
            r.read_exact(&mut msg[start..])?;
        }
    }
    match (length, kind, close) {
        (Some(n), _, _) => {
            let start = msg.len();
            msg.resize(start + n, 0);
            r.read_exact(&mut msg[start..])?;
        }
        // A response without a length ends with its connection.
        (None, Kind::Response, true) => {
            r.read_to_end(&mut msg)?;
        }
        (None, _, _) => {}
    }
    Ok(Some(msg))
}

fn connect(l: &Link) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let up = TcpStream::connect_timeout(&l.target, Duration::from_secs(2))?;
    up.set_read_timeout(Some(Duration::from_secs(60)))?;
    let _ = up.set_nodelay(true);
    let reader = BufReader::new(up.try_clone()?);
    Ok((up, reader))
}

/// One caller connection: request by request, each treated by the mode
/// current when it arrives.
fn serve(l: &Arc<Link>, down: TcpStream) {
    let _ = down.set_nodelay(true);
    let Ok(down_read) = down.try_clone() else {
        return;
    };
    let mut down_r = BufReader::new(down_read);
    let mut down_w = down;
    // HTTP/1.1 starts with a method; anything else (the HTTP/2 preface,
    // TLS) is copied as it is.
    const METHODS: [&[u8]; 6] = [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH "];
    let is_http1 = match down_r.fill_buf() {
        Ok(b) if !b.is_empty() => METHODS.iter().any(|m| b.starts_with(m)),
        _ => return,
    };
    if !is_http1 {
        l.count(|c| c.raw += 1);
        return copy_raw(l, down_r, down_w);
    }
    let mut up: Option<(TcpStream, BufReader<TcpStream>)> = None;
    loop {
        let Ok(Some(req)) = read_message(&mut down_r, Kind::Request) else {
            return;
        };
        l.count(|c| c.requests += 1);
        let mode = l.mode();
        let nth = l.since_set.fetch_add(1, Ordering::SeqCst);
        let my_turn = {
            let f = l.forwarded.lock().unwrap_or_else(|e| e.into_inner());
            *f
        };
        match mode {
            Mode::Delay { ms, jitter_ms } => {
                l.count(|c| c.delayed += 1);
                let d = ms.saturating_sub(jitter_ms) + l.below(2 * jitter_ms + 1);
                std::thread::sleep(Duration::from_millis(d));
            }
            Mode::Reorder { hold_ms } if nth % 2 == 0 => {
                let until = Instant::now() + Duration::from_millis(hold_ms);
                let mut f = l.forwarded.lock().unwrap_or_else(|e| e.into_inner());
                while *f == my_turn && Instant::now() < until {
                    let left = until.saturating_duration_since(Instant::now());
                    f = l
                        .overtaken
                        .wait_timeout(f, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                if *f != my_turn {
                    l.count(|c| c.reordered += 1);
                }
            }
            Mode::Pass
            | Mode::Reorder { .. }
            | Mode::Duplicate { .. }
            | Mode::DropAnswer { .. } => {}
        }
        if up.is_none() {
            up = connect(l).ok();
        }
        let Some((up_w, up_r)) = up.as_mut() else {
            return;
        };
        if up_w.write_all(&req).is_err() {
            return;
        }
        let resp = match read_message(up_r, Kind::Response) {
            Ok(Some(m)) => m,
            _ => return,
        };
        {
            let mut f = l.forwarded.lock().unwrap_or_else(|e| e.into_inner());
            *f += 1;
        }
        l.overtaken.notify_all();
        match mode {
            Mode::DropAnswer { percent } if l.below(100) < percent => {
                l.count(|c| c.answers_dropped += 1);
                let _ = down_w.shutdown(std::net::Shutdown::Both);
                return;
            }
            Mode::Duplicate { within_ms } => {
                l.count(|c| c.duplicated += 1);
                let (l2, after) = (l.clone(), l.below(within_ms + 1));
                let req = req.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(after));
                    if let Ok((mut w, mut r)) = connect(&l2) {
                        let _ = w.write_all(&req);
                        let _ = read_message(&mut r, Kind::Response);
                    }
                });
            }
            Mode::Pass | Mode::Delay { .. } | Mode::Reorder { .. } | Mode::DropAnswer { .. } => {}
        }
        if down_w.write_all(&resp).is_err() {
            return;
        }
    }
}

/// Copies a connection both ways unchanged (what is not HTTP/1.1).
fn copy_raw(l: &Arc<Link>, down_r: BufReader<TcpStream>, mut down_w: TcpStream) {
    let Ok((mut up_w, up_r)) = connect(l) else {
        return;
    };
    let _ = up_w.write_all(down_r.buffer());
    let mut up_r = up_r.into_inner();
    let _ = up_r.set_read_timeout(None);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_r, &mut down_w);
        let _ = down_w.shutdown(std::net::Shutdown::Both);
    });
    let mut inner = down_r.into_inner();
    let _ = std::io::copy(&mut inner, &mut up_w);
    let _ = up_w.shutdown(std::net::Shutdown::Both);
}
