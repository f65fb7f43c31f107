//! The history checker's network faults, each tool on its own: the link
//! proxy's modes (on loopback), pods as network namespaces with nftables
//! partitions and loss, and the cleanup of a checker killed with SIGKILL.
//! Pods need root (as `make test` runs here); without it these tests fail
//! with the reason.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use txmesh_tests::linkproxy::{LinkProxy, Mode};
use txmesh_tests::netns::{self, Direction, Net, Pod};
use txmesh_tests::{wait_for, Client, Upstream};

#[test]
fn link_proxy_delays_reorders_duplicates_and_loses_answers() {
    let up = Upstream::start();
    let p = LinkProxy::start("test", None, up.addr(), 1);
    let url = |path: &str| format!("http://{}{path}", p.addr());
    let c = Client::new();
    let post = |path: &str| c.request("POST", &url(path), &[], b"{}");

    assert_eq!(post("/pass").map(|r| r.status), Ok(200));
    assert_eq!(up.requests_to("/pass").len(), 1);

    p.set(Mode::Delay {
        ms: 300,
        jitter_ms: 0,
    });
    let t = Instant::now();
    assert_eq!(post("/slow").map(|r| r.status), Ok(200));
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(p.counts().delayed, 1);

    p.set(Mode::Duplicate { within_ms: 100 });
    assert_eq!(post("/twice").map(|r| r.status), Ok(200));
    wait_for(10, "the duplicate to arrive", || {
        (up.requests_to("/twice").len() == 2).then_some(())
    });
    assert_eq!(p.counts().duplicated, 1);

    p.set(Mode::DropAnswer { percent: 100 });
    let lost = post("/lost");
    assert!(lost.is_err(), "the answer should be lost: {lost:?}");
    assert_eq!(
        up.requests_to("/lost").len(),
        1,
        "the request itself arrived"
    );
    assert_eq!(p.counts().answers_dropped, 1);

    // Reordering: the first request after the mode is set is held until
    // the second has gone through.
    p.set(Mode::Reorder { hold_ms: 20_000 });
    let before = p.counts().requests;
    let addr = p.addr();
    let first = std::thread::spawn(move || {
        Client::new().request("POST", &format!("http://{addr}/first"), &[], b"{}")
    });
    wait_for(10, "the first request to reach the proxy", || {
        (p.counts().requests == before + 1).then_some(())
    });
    assert_eq!(post("/second").map(|r| r.status), Ok(200));
    let first = first.join().expect("first request thread");
    assert_eq!(first.map(|r| r.status), Ok(200));
    let order: Vec<String> = up
        .requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|p| p == "/first" || p == "/second")
        .collect();
    assert_eq!(order, ["/second", "/first"]);
    assert_eq!(p.counts().reordered, 1);
    assert_eq!(p.counts().requests, 6, "{:?}", p.counts());
}

fn require_pods() {
    if let Err(why) = netns::available() {
        panic!("these tests make network namespaces: {why}");
    }
    assert!(
        netns::nft_available(),
        "nft is missing: scripts/setup.sh installs Debian's nftables"
    );
}

/// A server in `pod` that answers every connection with "hi".
fn hello_server(pod: &Pod) -> SocketAddr {
    let pod = pod.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        pod.enter().expect("enter pod");
        let l = TcpListener::bind((pod.ip, 0)).expect("bind");
        tx.send(l.local_addr().expect("addr")).expect("send");
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"hi");
        }
    });
    rx.recv().expect("server address")
}

/// Whether a connection from `pod` (or from this process's namespace) to
/// `addr` gets the greeting within 500 ms.
fn reaches(pod: Option<&Pod>, addr: SocketAddr) -> bool {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(p) = pod {
                p.enter().expect("enter pod");
            }
            let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
                return false;
            };
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 2];
            c.read_exact(&mut buf).is_ok() && &buf == b"hi"
        })
        .join()
        .unwrap_or(false)
    })
}

#[test]
fn pods_reach_each_other_until_nftables_cuts_them() {
    require_pods();
    let net = Net::create(&["a", "b"]).expect("pods");
    let (a, b) = (net.pod("a").clone(), net.pod("b").clone());
    let at_b = hello_server(&b);
    assert!(reaches(Some(&a), at_b), "pod a reaches pod b");
    assert!(
        reaches(None, at_b),
        "the host reaches pod b over the bridge"
    );

    a.block(&[b.ip], Direction::Both).expect("block");
    assert!(!reaches(Some(&a), at_b), "a ↮ b");
    assert!(reaches(None, at_b), "others still reach b");
    a.heal().expect("heal");
    assert!(reaches(Some(&a), at_b), "healed");

    // One way: b's packets to a are dropped, so a's connection attempts
    // arrive but are never answered.
    b.block(&[a.ip], Direction::Outgoing).expect("block");
    assert!(!reaches(Some(&a), at_b), "b's answers to a are lost");
    assert!(reaches(None, at_b), "b still answers the host");
    b.heal().expect("heal");

    b.loss(100).expect("loss");
    assert!(!reaches(Some(&a), at_b), "everything lost");
    b.heal().expect("heal");
    assert!(reaches(Some(&a), at_b), "healed");
    b.heal().expect("healing twice is harmless");

    let names = net.names();
    drop(net);
    let left: Vec<String> = netns::leftovers()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn a_killed_checker_leaves_no_pods_behind() {
    require_pods();
    txmesh_tests::wasm("txmesh_txn");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["--txns", "100000", "--net", "pods", "--no-faults"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run chaos");
    let pid = child.id();
    let out = child.stdout.take().expect("stdout");
    // Up to the line that says every process is running in its pod.
    let mut seen = String::new();
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("participant processes") {
            break;
        }
    }
    let names = netns::leftovers_of(pid);
    assert_eq!(names.len(), 8, "7 pods and a bridge:\n{names:?}\n{seen}");
    let in_pods: Vec<u32> = names
        .iter()
        .filter(|n| n.starts_with("txmesh-"))
        .flat_map(|ns| {
            let out = Command::new("ip").args(["netns", "pids", ns]).output();
            let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let pids: Vec<u32> = text
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            pids
        })
        .collect();
    // 4 sidecars, 3 etcd members, 3 participant processes (payment is in
    // two pods).
    assert!(in_pods.len() >= 10, "processes in pods: {in_pods:?}");

    let t = Instant::now();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let _ = child.wait();
    wait_for(30, "the killed checker's pods to be removed", || {
        netns::leftovers_of(pid).is_empty().then_some(())
    });
    wait_for(30, "the processes in the pods to be gone", || {
        in_pods.iter().all(|p| gone(*p)).then_some(())
    });
    println!(
        "pods and {} processes gone {:.1} s after kill -9",
        in_pods.len(),
        t.elapsed().as_secs_f64()
    );
}
