//! A real `redis-server` on a loopback port, for the shared-dedup tests: started, stopped and
//! started again on the same port, as an operator's Redis goes away and comes back.
//!
//! Needs `redis-server` on the PATH (Debian: `apt-get install redis-server`; `.ci/run` installs
//! it). Without it [`RedisServer::start`] returns `None` and the tests say so and pass, unless
//! `HERALD_REQUIRE_REDIS=1` (set by `.ci/run`), where a missing server fails them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tls::{TestCa, write_file};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// The server's working directory (and the TLS files, for a TLS server).
    dir: tempfile::TempDir,
    /// Extra `redis-server` arguments (TLS, a password).
    args: Vec<String>,
    tls: bool,
}

impl RedisServer {
    /// Starts a server on a free port, or `None` when `redis-server` is not installed (and not
    /// required).
    pub fn start() -> Option<RedisServer> {
        RedisServer::start_with(tempfile::tempdir().unwrap(), Vec::new(), false)
    }

    /// A server that speaks only TLS (with the `localhost` certificate of `ca`) and requires
    /// `password`.
    pub fn start_tls(ca: &TestCa, password: &str) -> Option<RedisServer> {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.server_pem();
        let cert = write_file(dir.path(), "redis.crt", cert);
        let key = write_file(dir.path(), "redis.key", key);
        let ca_file = write_file(dir.path(), "ca.pem", ca.cert_pem());
        RedisServer::start_with(
            dir,
            vec![
                "--tls-cert-file".into(),
                cert.display().to_string(),
                "--tls-key-file".into(),
                key.display().to_string(),
                "--tls-ca-cert-file".into(),
                ca_file.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
                "--requirepass".into(),
                password.into(),
            ],
            true,
        )
    }

    fn start_with(dir: tempfile::TempDir, args: Vec<String>, tls: bool) -> Option<RedisServer> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            let required = std::env::var("HERALD_REQUIRE_REDIS").is_ok_and(|v| v == "1");
            assert!(!required, "redis-server is required here: apt-get install redis-server");
            eprintln!("skipping: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        // The kernel picks the port; it is free again once this listener is dropped.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = RedisServer { port, child: None, dir, args, tls };
        server.resume();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to the clients) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a Redis
    /// that is overloaded or behind a black-holing network.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts the server again on the same port (empty: persistence is off) and waits until it
    /// answers PING.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let port = self.port.to_string();
        let ports: [&str; 4] = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(ports)
            .args(&self.args)
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let started = Instant::now();
        while !self.pings() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Answers PING (plain) or accepts connections (TLS: a listening port is enough here).
    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        if self.tls {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// Runs one command over RESP and returns the raw answer (for inspecting stored keys).
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("redis is up");
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the server pauses: answers here are small and come in one piece.
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.ends_with(b"\r\n") {
                break;
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a frozen (SIGSTOPped) server too.
        self.stop();
    }
}
