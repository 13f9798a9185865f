//! Wiring and lifecycle: config → metrics, providers, dispatcher → routers → listeners, then
//! serve until shutdown and drain within `shutdown_grace`.
//!
//! Tests boot this same `App` on port 0 and read the bound addresses back, so there is no
//! second, test-only wiring. Building binds the sockets (a busy port fails here, before
//! anything is served); [`App::run`] serves.
//!
//! Serving is our own accept loop over hyper-util rather than `axum::serve`, which builds hyper
//! without a timer: here a client gets [`HEADER_READ_TIMEOUT`] to send each request head, and a
//! listener holds at most [`MAX_CONNECTIONS_PER_LISTENER`] connections, so slow or idle clients
//! cannot pile up forever.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::config::{AppKind, Config};
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::server::{self, AppState};

/// How often recorded metrics are folded in. Histogram samples are buffered raw until then
/// (8 bytes each, two per request): at 30,000 requests/s, every second is about 0.5 MB.
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A built, bound, not yet serving gateway.
pub struct App {
    state: AppState,
    listeners: Vec<(TcpListener, Router)>,
    addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    shutdown_grace: Duration,
}

impl App {
    /// Builds every component and binds every listener.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let metrics = Arc::new(Metrics::new());
        let dispatcher = Dispatcher::new(&config, metrics.clone())?;
        // With a shared dedup store, start serving once it has answered (or failed to: pushes
        // never wait for it), so a reachable Redis deduplicates from the first request.
        if let Some(store) = dispatcher.dedup().shared() {
            store.settled().await;
        }
        let state = AppState {
            dispatcher: Arc::new(dispatcher),
            metrics,
            inflight: Arc::new(tokio::sync::Semaphore::new(config.max_inflight_requests)),
            ready: Arc::new(AtomicBool::new(false)),
            request_deadline: config.request_deadline,
            max_body_bytes: config.max_body_bytes,
            unifiedpush_gateway: config
                .apps
                .iter()
                .any(|app| matches!(app.kind, AppKind::UnifiedPush(_))),
        };
        for app in &config.apps {
            if let Some(key) = app.vapid_public_key() {
                // Public: web clients pass it to `pushManager.subscribe` as applicationServerKey.
                info!(app = %app.pattern, vapid_public_key = %key, "webpush app");
            }
        }
        let main_router = server::router(state.clone(), config.admin_listen.is_none());
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for addr in &config.listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            addrs.push(listener.local_addr()?);
            listeners.push((listener, main_router.clone()));
        }
        let admin_addr = match config.admin_listen {
            None => addrs[0],
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (admin)"))?;
                let bound = listener.local_addr()?;
                listeners.push((listener, server::admin_router(state.clone())));
                bound
            }
        };
        Ok(App { state, listeners, addrs, admin_addr, shutdown_grace: config.shutdown_grace })
    }

    /// Where `/notify` is served (port 0 in the config resolved to the real port).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Where `/metrics` is served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// for up to `shutdown_grace`, and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        for (listener, router) in self.listeners {
            servers.spawn(serve(listener, router, stop_rx.clone()));
        }
        // Histogram samples are kept until upkeep folds them in: do it whether or not anybody
        // scrapes `/metrics`, or an unscraped herald grows without bound.
        let metrics = self.state.metrics.clone();
        let upkeep = AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP_EVERY);
            loop {
                tick.tick().await;
                metrics.upkeep();
            }
        }));
        self.state.ready.store(true, Ordering::Release);
        info!(listen = ?self.addrs, admin = %self.admin_addr, "herald is serving");

        tokio::select! {
            () = shutdown => info!("shutting down: draining in-flight requests"),
            Some(res) = servers.join_next() => {
                // `serve` only returns once told to stop, so this is a panic.
                res.context("server task panicked")?;
            }
        }
        self.state.ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            while let Some(res) = servers.join_next().await {
                if let Err(e) = res {
                    warn!(error = %e, "server task failed while draining");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(grace = ?self.shutdown_grace, "shutdown grace period over; dropping unfinished requests");
            // Each server task owns its connections' tasks, so aborting it drops them too.
            servers.abort_all();
        }
        drop(upkeep);
        info!("stopped");
        Ok(())
    }
}

// === serving one listener ===

/// How long a client may take to send a request head (from the moment herald starts waiting
/// for it, so it also bounds idle keep-alive connections), and how long a new connection may
/// take to send its first one. Slower clients are disconnected without an answer.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Open connections per listener; at the cap, herald stops accepting until one closes (the
/// kernel's backlog holds the rest).
pub const MAX_CONNECTIONS_PER_LISTENER: usize = 16_384;

/// Pause after an accept error such as EMFILE, so a full fd table does not become a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// HTTP/1.1 with a header-read timeout, or HTTP/2 (prior knowledge) with keep-alive pings.
fn connection_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// Accepts and serves connections until `stop` turns true, then closes the listening socket,
/// asks every connection to finish its current request and close, and waits for them.
///
/// Connection tasks live in a `JoinSet` owned here, so aborting this task drops them all.
async fn serve(listener: TcpListener, router: Router, mut stop: watch::Receiver<bool>) {
    let builder = connection_builder();
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_LISTENER));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let (stream, slot) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                warn!(error = %e, "cannot accept connections; retrying shortly");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        // Set once hyper has read a whole request head; a connection that never gets there
        // (silent, or stuck before hyper knows HTTP/1 from HTTP/2) is closed below.
        let seen_request = Arc::new(AtomicBool::new(false));
        let service = TowerToHyperService::new(router.clone().map_request({
            let seen_request = seen_request.clone();
            move |request: Request<Incoming>| {
                seen_request.store(true, Ordering::Relaxed);
                request
            }
        }));
        let connection =
            graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = tokio::time::sleep(HEADER_READ_TIMEOUT) => {
                    if !seen_request.load(Ordering::Relaxed) {
                        debug!("closing a connection that sent no request in time");
                        return;
                    }
                    connection.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
}

/// Waits for a free connection slot, then for a connection.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, OwnedSemaphorePermit)> {
    let slot = Arc::clone(slots).acquire_owned().await.expect("the semaphore is never closed");
    let (stream, _peer) = listener.accept().await?;
    Ok((stream, slot))
}

/// Errors about one connection that went away before it was accepted: not worth a pause.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
