//! A minimal HTTP CONNECT proxy on 127.0.0.1: reads `CONNECT host:port`, checks
//! `Proxy-Authorization` when configured, answers 200 and splices the two sockets. Records each
//! tunnel's target so tests can prove traffic went through it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub struct ConnectProxy {
    pub addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    /// `basic_auth`: the expected `Proxy-Authorization` value, e.g. `Basic dXNlcjpwYXNz`.
    pub async fn start(basic_auth: Option<&str>) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let expected = basic_auth.map(str::to_owned);
        let recorded = tunnels.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let expected = expected.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let _ = tunnel(client, expected, recorded).await;
                });
            }
        });
        ConnectProxy { addr, tunnels, task }
    }

    pub fn url(&self, userinfo: &str) -> String {
        format!("http://{userinfo}{}", self.addr)
    }

    /// `host:port` of every tunnel opened.
    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tunnel(
    client: TcpStream,
    expected: Option<String>,
    recorded: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        reader.get_mut().write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n").await?;
        return Ok(());
    };
    let target = target.to_owned();
    let mut auth = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).await?;
        if header == "\r\n" || header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("proxy-authorization")
        {
            auth = Some(value.trim().to_owned());
        }
    }
    if expected.is_some() && auth != expected {
        reader.get_mut().write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await?;
        return Ok(());
    }
    let mut upstream = TcpStream::connect(&target).await?;
    recorded.lock().unwrap().push(target);
    reader.get_mut().write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
    let mut client = reader.into_inner();
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
