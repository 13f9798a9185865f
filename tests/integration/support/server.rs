//! A generic loopback HTTP server for the fake upstreams.
//!
//! [`FakeServer`] binds `127.0.0.1:0` before returning (so it is ready as soon as
//! `start` resolves), optionally terminates TLS with tokio-rustls, and serves each
//! connection with `hyper_util::server::conn::auto::Builder`, which speaks
//! HTTP/1.1 and HTTP/2 (h2 over ALPN with TLS, h2c prior knowledge without).
//! Dropping it (or [`FakeServer::shutdown`]) stops the accept loop and aborts
//! every open connection.
//!
//! Every request handed to the axum router carries a [`ConnInfo`] extension
//! (connection number, peer address, negotiated ALPN, client certificates).
//!
//! # Misbehaving on purpose
//!
//! A handler makes the transport misbehave by putting a [`ConnAction`] into the
//! *response* extensions (see [`ConnAction::response`]):
//!
//! - [`ConnAction::ResetStream`]: no response; on HTTP/2 the stream gets
//!   `RST_STREAM(INTERNAL_ERROR)` while the connection and its other streams live
//!   on; on HTTP/1.1 the connection is closed without an answer.
//! - [`ConnAction::ResetConnection`]: no response; the whole TCP connection is
//!   dropped with `SO_LINGER=0`, so the client sees a TCP RST
//!   ("connection reset by peer"), failing every request in flight on it.
//! - [`ConnAction::Goaway`]: the response *is* sent, then the connection shuts
//!   down gracefully (HTTP/2 `GOAWAY`; HTTP/1.1 closes after this response), so the
//!   client's next request needs a new connection.
//!
//! [`FakeServer::start_raw_reset`] is a server that resets every TCP connection
//! as soon as it is accepted, before any TLS or HTTP.
//!
//! The file also holds small helpers shared by the fakes: [`Recorder`] (a
//! request log one can wait on), [`Scripts`] (per-key FIFO reply queues) and
//! [`sign_es256_jwt`] (the JWTs APNs clients and VAPID senders make).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Facts about the connection a request arrived on (a request extension).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// 1 for the first connection the server accepted, 2 for the next, …
    pub id: u64,
    pub peer: SocketAddr,
    /// ALPN protocol negotiated by TLS (`Some(b"h2")`), `None` without TLS/ALPN.
    pub alpn: Option<Vec<u8>>,
    /// Client certificate chain presented during the TLS handshake (empty if none).
    pub client_certs: Vec<CertificateDer<'static>>,
}

/// Transport-level misbehaviour requested by a handler (a response extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnAction {
    /// HTTP/2: `RST_STREAM` this stream only. HTTP/1.1: close the connection.
    ResetStream,
    /// Drop the whole TCP connection with a RST; nothing is answered.
    ResetConnection,
    /// Send this response, then shut the connection down gracefully (GOAWAY).
    Goaway,
}

impl ConnAction {
    /// An empty `200` response carrying this action.
    pub fn response(self) -> Response {
        self.attach(().into_response())
    }

    /// Attaches this action to `response` (only `Goaway` actually sends it).
    pub fn attach(self, mut response: Response) -> Response {
        response.extensions_mut().insert(self);
        response
    }
}

#[derive(Clone, Copy)]
enum Protocols {
    Auto,
    Http2Only,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    tls_failures: AtomicU64,
}

/// A running loopback server; see the module docs.
pub struct FakeServer {
    addr: SocketAddr,
    tls: bool,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl FakeServer {
    /// Serves `router` on `127.0.0.1:<ephemeral>`, with TLS when `tls` is given.
    /// HTTP/1.1 and HTTP/2 are both accepted.
    pub async fn start(router: Router, tls: Option<Arc<ServerConfig>>) -> FakeServer {
        Self::start_inner(router, tls, Protocols::Auto).await
    }

    /// Like [`FakeServer::start`] but speaks HTTP/2 only (like APNs): an HTTP/1.1
    /// client gets a protocol error instead of a response.
    pub async fn start_http2_only(router: Router, tls: Option<Arc<ServerConfig>>) -> FakeServer {
        Self::start_inner(router, tls, Protocols::Http2Only).await
    }

    /// Like [`FakeServer::start`] but binds `addr`, e.g. `127.0.0.2:0` for a
    /// second, distinct loopback host; `url()` then names that address.
    pub async fn start_on(
        addr: SocketAddr,
        router: Router,
        tls: Option<Arc<ServerConfig>>,
    ) -> FakeServer {
        let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        let stats = Arc::new(Stats::default());
        let is_tls = tls.is_some();
        let acceptor = tls.map(TlsAcceptor::from);
        let task =
            tokio::spawn(accept_loop(listener, router, acceptor, Protocols::Auto, stats.clone()));
        FakeServer { addr, tls: is_tls, stats, task }
    }

    /// A server that accepts TCP connections and immediately resets them
    /// (RST, before any TLS or HTTP byte). `url()` is `http://…`.
    pub async fn start_raw_reset() -> FakeServer {
        let listener = bind().await;
        let addr = listener.local_addr().expect("local_addr");
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn({
            let stats = stats.clone();
            async move {
                loop {
                    if let Ok((tcp, _)) = listener.accept().await {
                        stats.connections.fetch_add(1, Ordering::SeqCst);
                        let _ = tcp.set_zero_linger();
                        drop(tcp);
                    }
                }
            }
        });
        FakeServer { addr, tls: false, stats, task }
    }

    async fn start_inner(
        router: Router,
        tls: Option<Arc<ServerConfig>>,
        protocols: Protocols,
    ) -> FakeServer {
        let listener = bind().await;
        let addr = listener.local_addr().expect("local_addr");
        let stats = Arc::new(Stats::default());
        let is_tls = tls.is_some();
        let acceptor = tls.map(TlsAcceptor::from);
        let task = tokio::spawn(accept_loop(listener, router, acceptor, protocols, stats.clone()));
        FakeServer { addr, tls: is_tls, stats, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` with TLS, `http://127.0.0.1:PORT` without.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// TCP connections accepted so far (including ones whose TLS handshake failed).
    pub fn connections_accepted(&self) -> u64 {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed (e.g. a client without the required certificate).
    pub fn tls_handshake_failures(&self) -> u64 {
        self.stats.tls_failures.load(Ordering::SeqCst)
    }

    /// Stops accepting and aborts every open connection (also done on drop).
    pub fn shutdown(&self) {
        self.task.abort();
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind(("127.0.0.1", 0)).await.expect("bind 127.0.0.1:0")
}

/// Owns every connection task in a `JoinSet`, so aborting this task (on drop of
/// the `FakeServer`) aborts all connections too.
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    acceptor: Option<TlsAcceptor>,
    protocols: Protocols,
    stats: Arc<Stats>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                let id = stats.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = tcp.set_nodelay(true);
                let reset = Arc::new(AtomicBool::new(false));
                let io = ResetOnDrop { inner: tcp, reset: reset.clone() };
                let router = router.clone();
                let acceptor = acceptor.clone();
                let stats = stats.clone();
                conns.spawn(async move {
                    match acceptor {
                        None => {
                            let info = ConnInfo { id, peer, alpn: None, client_certs: Vec::new() };
                            serve_connection(io, router, info, protocols, reset).await;
                        }
                        Some(acceptor) => {
                            let tls = match acceptor.accept(io).await {
                                Ok(tls) => tls,
                                Err(_) => {
                                    stats.tls_failures.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                            };
                            let (_, session) = tls.get_ref();
                            let info = ConnInfo {
                                id,
                                peer,
                                alpn: session.alpn_protocol().map(<[u8]>::to_vec),
                                client_certs: session
                                    .peer_certificates()
                                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                                    .unwrap_or_default(),
                            };
                            serve_connection(tls, router, info, protocols, reset).await;
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The error a service returns to make hyper reset the stream.
#[derive(Debug)]
struct ResetRequested;

impl std::fmt::Display for ResetRequested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fake server: reset requested by handler")
    }
}

impl std::error::Error for ResetRequested {}

async fn serve_connection<I>(
    io: I,
    router: Router,
    info: ConnInfo,
    protocols: Protocols,
    reset: Arc<AtomicBool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (signal_tx, mut signal_rx) = mpsc::unbounded_channel::<ConnAction>();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let router = router.clone();
        let info = info.clone();
        let signal_tx = signal_tx.clone();
        async move {
            req.extensions_mut().insert(info);
            let response = match router.oneshot(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            match response.extensions().get::<ConnAction>().copied() {
                None => Ok(response),
                Some(ConnAction::ResetStream) => Err(ResetRequested),
                Some(ConnAction::ResetConnection) => {
                    let _ = signal_tx.send(ConnAction::ResetConnection);
                    // The connection task drops the connection; on HTTP/2 this
                    // stream runs in its own task, so end it once that happened.
                    signal_tx.closed().await;
                    Err(ResetRequested)
                }
                Some(ConnAction::Goaway) => {
                    let _ = signal_tx.send(ConnAction::Goaway);
                    Ok(response)
                }
            }
        }
    });

    let mut builder = auto::Builder::new(TokioExecutor::new());
    if let Protocols::Http2Only = protocols {
        builder = builder.http2_only();
    }
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            Some(action) = signal_rx.recv() => match action {
                ConnAction::ResetConnection => {
                    reset.store(true, Ordering::SeqCst);
                    return; // drops `conn`, hence the socket, with SO_LINGER=0
                }
                ConnAction::Goaway | ConnAction::ResetStream => conn.as_mut().graceful_shutdown(),
            },
        }
    }
}

/// A `TcpStream` that is closed with a RST (`SO_LINGER=0`) when dropped after
/// `reset` was set, instead of the usual FIN.
struct ResetOnDrop {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResetOnDrop {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResetOnDrop {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An append-only log of recorded requests that tests can wait on.
pub struct Recorder<T> {
    items: Mutex<Vec<T>>,
    count: watch::Sender<usize>,
}

impl<T: Clone> Default for Recorder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> Recorder<T> {
    pub fn new() -> Self {
        Recorder { items: Mutex::new(Vec::new()), count: watch::Sender::new(0) }
    }

    pub fn push(&self, item: T) {
        let mut items = self.items.lock().unwrap();
        items.push(item);
        self.count.send_replace(items.len());
    }

    pub fn all(&self) -> Vec<T> {
        self.items.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.items.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        let mut items = self.items.lock().unwrap();
        items.clear();
        self.count.send_replace(0);
    }

    /// Waits until at least `n` items were recorded and returns all of them.
    /// Panics (naming `what`) if that takes longer than `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration, what: &str) -> Vec<T> {
        let mut rx = self.count.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n)).await;
        if reached.is_err() {
            panic!(
                "timed out after {timeout:?} waiting for {n} {what} request(s); got {}",
                self.len()
            );
        }
        self.all()
    }
}

/// Per-key FIFO queues of scripted replies (the key is a device token).
pub struct Scripts<R> {
    queues: Mutex<HashMap<String, VecDeque<R>>>,
}

impl<R> Default for Scripts<R> {
    fn default() -> Self {
        Scripts { queues: Mutex::new(HashMap::new()) }
    }
}

impl<R> Scripts<R> {
    /// Appends `replies` to the queue for `key`.
    pub fn push(&self, key: &str, replies: impl IntoIterator<Item = R>) {
        self.queues.lock().unwrap().entry(key.to_owned()).or_default().extend(replies);
    }

    /// Takes the next scripted reply for `key`, if any.
    pub fn pop(&self, key: &str) -> Option<R> {
        self.queues.lock().unwrap().get_mut(key)?.pop_front()
    }

    /// Scripted replies not consumed yet, over all keys.
    pub fn pending(&self) -> usize {
        self.queues.lock().unwrap().values().map(VecDeque::len).sum()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// An ES256 JWT over `header` and `claims`, signed with a P-256 PKCS#8 PEM key: what APNs
/// clients and VAPID senders make, and hand-made bad tokens.
pub fn sign_es256_jwt(
    pkcs8_pem: &str,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject;

    let der = PrivatePkcs8KeyDer::from_pem_slice(pkcs8_pem.as_bytes()).expect("PKCS#8 PEM");
    let rng = ring::rand::SystemRandom::new();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_pkcs8_der(), &rng)
            .expect("P-256 PKCS#8 key");
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key.sign(&rng, signing_input.as_bytes()).expect("ES256 sign");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}
