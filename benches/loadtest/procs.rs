//! The processes under test: spawning herald (or the bare baseline) pinned to a core, waiting
//! until it serves, reading its CPU time and memory from `/proc`, and stopping it.
//!
//! Pinning goes through `taskset` (util-linux) rather than `sched_setaffinity`, because the
//! crate forbids `unsafe` and this keeps the bench free of a `libc` dependency.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The server under test runs here; the generator and the fake upstream on [`GENERATOR_CORE`].
pub const SERVER_CORE: usize = 0;
pub const GENERATOR_CORE: usize = 1;

/// Whether processes are pinned, and why not when they are not.
#[derive(Debug, Clone)]
pub struct Pinning {
    pub applied: bool,
    pub note: String,
}

impl Pinning {
    /// Pins this process (all its threads; call it before any runtime starts) to
    /// [`GENERATOR_CORE`] when `taskset` exists and there are at least two cores.
    pub fn pin_self() -> Pinning {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return Pinning { applied: false, note: format!("only {cores} core available") };
        }
        let pid = std::process::id().to_string();
        let core = GENERATOR_CORE.to_string();
        match Command::new("taskset")
            .args(["-a", "-cp", &core, &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(status) if status.success() => Pinning {
                applied: true,
                note: format!(
                    "server under test on core {SERVER_CORE}, generator + fake upstream on core {GENERATOR_CORE}"
                ),
            },
            Ok(status) => Pinning { applied: false, note: format!("taskset failed ({status})") },
            Err(_) => Pinning { applied: false, note: "taskset not found".to_owned() },
        }
    }
}

/// A child server process (herald or the bare baseline).
pub struct Server {
    child: Child,
    pub pid: u32,
    pub started: Instant,
}

impl Server {
    /// Starts `program args`, through `taskset -c SERVER_CORE` when pinning applies. Its stderr
    /// goes to `stderr_file`, its stdout nowhere.
    pub fn spawn(
        program: &Path,
        args: &[&str],
        pinning: &Pinning,
        stderr_file: &Path,
    ) -> std::io::Result<Server> {
        let mut command = if pinning.applied {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(SERVER_CORE.to_string()).arg(program);
            c
        } else {
            Command::new(program)
        };
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(stderr_file)?);
        let started = Instant::now();
        let child = command.spawn()?;
        // taskset execs the program, so the pid is the server's own.
        Ok(Server { pid: child.id(), child, started })
    }

    /// Polls `GET http://addr{path}` every 2 ms until it answers 200; returns the time since
    /// spawn. Gives up after `limit`, or when the process exits.
    pub async fn wait_ready(
        &mut self,
        addr: SocketAddr,
        path: &str,
        limit: Duration,
    ) -> Result<Duration, String> {
        loop {
            if probe(addr, path).await {
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status} before it was ready"));
            }
            if self.started.elapsed() > limit {
                return Err(format!("not ready after {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(&format!("/proc/{}/stat", self.pid)).unwrap_or(0)
    }

    pub fn memory(&self) -> Memory {
        Memory::read(self.pid)
    }

    /// SIGTERM, then SIGKILL if it has not exited within 3 s. Returns whether it exited on its
    /// own (successfully) after SIGTERM.
    pub async fn stop(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            // Async, so the fake upstream keeps answering while herald drains.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Server {
    /// Never leave a server running behind an error or a panic.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn probe(addr: SocketAddr, path: &str) -> bool {
    let Ok(tcp) = TcpStream::connect(addr).await else { return false };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let request = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::new())
        .expect("probe request");
    matches!(sender.send_request(request).await, Ok(r) if r.status() == http::StatusCode::OK)
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`: now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak so far.
    pub peak_kib: u64,
}

impl Memory {
    pub fn read(pid: u32) -> Memory {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Memory { rss_kib: field("VmRSS:"), peak_kib: field("VmHWM:") }
    }
}

/// `utime + stime` of the process whose `stat` file is at `path`, in clock ticks.
pub fn cpu_ticks(path: &str) -> Option<u64> {
    let stat = fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name (which may contain spaces): state is the
    // first, utime the 12th and stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// This process's own CPU time, in clock ticks.
pub fn own_cpu_ticks() -> u64 {
    cpu_ticks("/proc/self/stat").unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when that fails).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// A loopback address with a port that was free a moment ago (the child binds it).
pub fn free_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Busy and total jiffies of every core, from `/proc/stat` (index = core number).
pub fn core_jiffies() -> Vec<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal (guest time is inside user).
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// How busy each core was between two [`core_jiffies`] readings (0.0–1.0), all processes.
pub fn core_busy(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let total = a.1.saturating_sub(b.1);
            if total == 0 { 0.0 } else { a.0.saturating_sub(b.0) as f64 / total as f64 }
        })
        .collect()
}
