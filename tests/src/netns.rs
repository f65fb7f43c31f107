//! Pods as network namespaces: each pod (an app and its sidecar, or one etcd
//! member) gets its own network namespace with its own address on a bridge
//! the run creates, like Kubernetes pods on a node. Processes start inside a
//! pod with [`Pod::command`]; a thread enters one with [`Pod::enter`] (its
//! sockets are then the pod's); faults are nftables rules in a pod's own
//! namespace ([`Pod::block`], [`Pod::loss`], [`Pod::heal`]).
//!
//! Everything a run creates is named after its process id and a counter
//! (`txmesh-<pid>-<n>-<pod>` namespaces, bridge `txm<pid>-<n>`) and removed three ways: on drop; by a reaper
//! process that waits for the run's end (the read end of a pipe only the run
//! holds) and so also cleans up after `kill -9`; and by [`sweep_stale`], which
//! every new run calls first for names whose process is gone. Needs root
//! (`ip netns`, veth, bridges) and, for faults, `nft` (Debian's nftables).

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// One pod: a network namespace with one address on the run's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// The namespace's name (`ip netns`).
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// The pods of one run and the bridge that joins them. Removed on drop.
pub struct Net {
    id: RunId,
    bridge: String,
    /// The bridge's own address: the run's process (the root namespace)
    /// reaches every pod through it.
    pub host_ip: Ipv4Addr,
    pub pods: Vec<Pod>,
    /// The reaper's stdin: closed when this process ends, however it ends.
    _reaper: Option<Child>,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One pod network: the owning process and its counter (one digit, so that
/// `txm<pid>-<n>v<i>` stays within Linux's 15-byte interface names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RunId {
    pid: u32,
    n: u32,
}

impl RunId {
    fn ns_prefix(self) -> String {
        format!("txmesh-{}-{}-", self.pid, self.n)
    }
    fn bridge(self) -> String {
        format!("txm{}-{}", self.pid, self.n)
    }
    /// The owner of a leftover name (a namespace or a bridge), if it is ours.
    fn of(name: &str) -> Option<RunId> {
        let rest = name
            .strip_prefix("txmesh-")
            .or_else(|| name.strip_prefix("txm"))?;
        let mut it = rest.splitn(3, '-');
        let pid = it.next()?.parse().ok()?;
        let n = it.next()?.parse().ok()?;
        Some(RunId { pid, n })
    }
    /// The shell commands that remove this network's namespaces (killing what
    /// still runs in them) and its bridge; each step tolerates what is gone.
    fn cleanup_script(self) -> String {
        format!(
            "for ns in $(ip netns list | awk '{{print $1}}' | grep '^{prefix}'); do \
               ip netns pids \"$ns\" | xargs -r kill -9; ip netns del \"$ns\"; done; \
             ip link del {bridge} 2>/dev/null; true",
            prefix = self.ns_prefix(),
            bridge = self.bridge()
        )
    }
}

/// The namespaces and bridges left by runs of this harness (any process id).
pub fn leftovers() -> Vec<String> {
    let mut v: Vec<String> = output(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("txmesh-"))
        .map(str::to_string)
        .collect();
    v.extend(
        output(&["ip", "-o", "link", "show", "type", "bridge"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter(|n| n.starts_with("txm") && RunId::of(n).is_some())
            .map(str::to_string),
    );
    v
}

/// The leftovers of process `pid`'s runs (see [`leftovers`]).
pub fn leftovers_of(pid: u32) -> Vec<String> {
    leftovers()
        .into_iter()
        .filter(|n| RunId::of(n).is_some_and(|r| r.pid == pid))
        .collect()
}

/// Removes what runs whose process is gone left behind (idempotent).
pub fn sweep_stale() {
    let mut dead: Vec<RunId> = leftovers()
        .iter()
        .filter_map(|n| RunId::of(n))
        .filter(|r| !std::path::Path::new(&format!("/proc/{}", r.pid)).exists())
        .collect();
    dead.sort_unstable_by_key(|r| (r.pid, r.n));
    dead.dedup();
    for r in dead {
        let _ = run(&["sh", "-c", &r.cleanup_script()]);
    }
}

/// Whether this machine can make pods, and if not, why not.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("network namespaces need root (ip netns, veth, bridges)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err("`ip` (iproute2) is not installed".into());
    }
    Ok(())
}

/// Whether `nft` (nftables) is there for partition and loss faults.
pub fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Net {
    /// Creates one namespace per name, each with a veth on a new bridge and an
    /// address in a /24 of its own (10.a.b.0/24 from the process id and the
    /// counter; the next one when that is in use).
    pub fn create(names: &[&str]) -> Result<Net, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        available()?;
        sweep_stale();
        let pid = std::process::id();
        let addrs = output(&["ip", "-o", "addr"]);
        let (id, a, b) = (0..10)
            .map(|_| {
                let n = NEXT.fetch_add(1, Ordering::SeqCst) % 10;
                let a = 100 + (pid % 100) as u8;
                let b = (((pid / 100) % 25) * 10 + n) as u8;
                (RunId { pid, n }, a, b)
            })
            .find(|(id, a, b)| {
                !addrs.contains(&format!(" 10.{a}.{b}."))
                    && !leftovers().iter().any(|l| RunId::of(l) == Some(*id))
            })
            .ok_or("no free 10.x.y.0/24 subnet or network name for this process")?;
        let bridge = id.bridge();
        // The reaper first, so that even a failure half-way is cleaned up.
        let script = format!("read _ignored; {}", id.cleanup_script());
        let mut reaper = Command::new("sh");
        reaper
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe. A session of its own: a Ctrl-C
        // to the run's process group does not take the reaper with it.
        unsafe {
            reaper.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let reaper = reaper.spawn().map_err(|e| format!("reaper: {e}"))?;
        let host_ip = Ipv4Addr::new(10, a, b, 1);
        let mut net = Net {
            id,
            bridge: bridge.clone(),
            host_ip,
            pods: Vec::new(),
            _reaper: Some(reaper),
        };
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &bridge,
        ])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{}{name}", id.ns_prefix());
            let ip = Ipv4Addr::new(10, a, b, 2 + i as u8);
            let host_end = format!("{bridge}v{i}");
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            run(&["ip", "link", "set", &host_end, "master", &bridge, "up"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            net.pods.push(Pod {
                name: name.to_string(),
                ns,
                ip,
            });
        }
        Ok(net)
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// What this run created, by name (namespaces and the bridge).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.pods.iter().map(|p| p.ns.clone()).collect();
        v.push(self.bridge.clone());
        v
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = run(&["sh", "-c", &self.id.cleanup_script()]);
    }
}

/// Which way a partition cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Nothing in either direction.
    Both,
    /// Packets from this pod to the peers are dropped; theirs still arrive
    /// (a request gets through, its answer does not, or the reverse).
    Outgoing,
}

impl Pod {
    /// `program` to be run inside this pod (`ip netns exec`, which execs it:
    /// the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Moves the calling thread into this pod's network namespace: sockets
    /// it creates from now on, and threads it spawns, are the pod's.
    pub fn enter(&self) -> std::io::Result<()> {
        enter_ns(&self.ns)
    }

    fn nft(&self, script: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| format!("nft: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft in {} failed: {}\n{script}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Replaces this pod's fault rules with `rules` (chain `input` and
    /// `output` statements of table `inet txmesh`).
    fn set_rules(&self, input: &[String], out: &[String]) -> Result<(), String> {
        let mut s = String::from(
            "table inet txmesh {}\ndelete table inet txmesh\ntable inet txmesh {\n\
             chain input { type filter hook input priority 0; policy accept;\n",
        );
        for r in input {
            s.push_str(&format!("  {r}\n"));
        }
        s.push_str("}\nchain output { type filter hook output priority 0; policy accept;\n");
        for r in out {
            s.push_str(&format!("  {r}\n"));
        }
        s.push_str("}\n}\n");
        self.nft(&s)
    }

    /// Cuts this pod off from `peers` (a partition), replacing earlier faults.
    pub fn block(&self, peers: &[Ipv4Addr], dir: Direction) -> Result<(), String> {
        let set = peers
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let out = vec![format!("ip daddr {{ {set} }} drop")];
        let input = match dir {
            Direction::Both => vec![format!("ip saddr {{ {set} }} drop")],
            Direction::Outgoing => vec![],
        };
        self.set_rules(&input, &out)
    }

    /// Drops `percent` of the packets this pod sends and receives on its
    /// network (not loopback), at random (nftables `numgen random`).
    pub fn loss(&self, percent: u32) -> Result<(), String> {
        // nftables checks the bound against numgen's range (0-99).
        let rule = |dir: &str| match percent {
            0 => vec![],
            1..=99 => vec![format!(
                "{dir} \"eth0\" numgen random mod 100 < {percent} drop"
            )],
            _ => vec![format!("{dir} \"eth0\" drop")],
        };
        self.set_rules(&rule("iifname"), &rule("oifname"))
    }

    /// Removes this pod's fault rules.
    pub fn heal(&self) -> Result<(), String> {
        self.nft("table inet txmesh {}\ndelete table inet txmesh\n")
    }
}

/// Moves the calling thread into network namespace `ns` (`/run/netns/<ns>`).
pub fn enter_ns(ns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only affects this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
