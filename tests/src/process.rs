//! Child processes owned by a test.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Children are forked by one long-lived thread. `PR_SET_PDEATHSIG` fires
/// when the *thread* that forked the child exits, so a child started from a
/// short-lived thread (a fault injector restarting a process) would die with
/// that thread; forked from this thread, it dies only with the process.
fn spawn_from_long_lived_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .unwrap_or_else(|e| panic!("spawner thread: {e}"));
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    reply_rx
        .recv()
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// A child process killed when dropped. Started with `PR_SET_PDEATHSIG` (from
/// a long-lived thread), so it also dies if the test process is killed outright. When dropped during a
/// panic, prints the tail of its log files.
pub struct ChildGuard {
    pub name: String,
    child: Child,
    logs: Vec<PathBuf>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `<dir>/<name>.out`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path, extra_logs: Vec<PathBuf>) -> Self {
        let out_path = dir.join(format!("{name}.out"));
        // Appended: a restarted process keeps its earlier runs' output.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", out_path.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("dup {}: {e}", out_path.display()));
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let program = cmd.get_program().to_os_string();
        let child = spawn_from_long_lived_thread(cmd)
            .unwrap_or_else(|e| panic!("cannot start {name} ({program:?}): {e}"));
        let mut logs = vec![out_path];
        logs.extend(extra_logs);
        Self {
            name: name.to_string(),
            child,
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the process (SIGSTOP: it keeps its sockets and state
    /// but answers nothing until SIGCONT; SIGTERM: a graceful exit).
    pub fn signal(&self, sig: libc::c_int) {
        signal(self.pid(), sig);
    }

    /// `Some(exit status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `secs` for the process to exit by itself.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// All log text of the process so far.
    pub fn log_text(&self) -> String {
        self.logs
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn print_tail(&self, lines: usize) {
        for p in &self.logs {
            let Ok(f) = std::fs::File::open(p) else {
                continue;
            };
            let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
            let start = all.len().saturating_sub(lines);
            eprintln!(
                "----- {} ({}), last {} lines -----",
                self.name,
                p.display(),
                all.len() - start
            );
            for l in &all[start..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_tail(80);
        }
        self.kill();
    }
}

/// Sends `sig` to a child of ours by pid.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: a plain signal to a child of ours (killed on drop either way).
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}
