//! Wiring and lifecycle: config → metrics, providers, dispatcher → routers → listeners, then
//! serve until shutdown and drain within `shutdown_grace`.
//!
//! Tests boot this same `App` on port 0 and read the bound addresses back, so there is no
//! second, test-only wiring. Building binds the sockets (a busy port fails here, before
//! anything is served); [`App::run`] serves.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::server::{self, AppState};

/// A built, bound, not yet serving gateway.
pub struct App {
    state: AppState,
    listeners: Vec<(TcpListener, Router)>,
    addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    shutdown_grace: std::time::Duration,
}

impl App {
    /// Builds every component and binds every listener.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let metrics = Arc::new(Metrics::new());
        let dispatcher = Dispatcher::new(&config, metrics.clone())?;
        let state = AppState {
            dispatcher: Arc::new(dispatcher),
            metrics,
            inflight: Arc::new(tokio::sync::Semaphore::new(config.max_inflight_requests)),
            ready: Arc::new(AtomicBool::new(false)),
            request_deadline: config.request_deadline,
            max_body_bytes: config.max_body_bytes,
        };
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
            let mut stop = stop_rx.clone();
            let service = router.into_make_service();
            servers.spawn(async move {
                axum::serve(listener, service)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            });
        }
        self.state.ready.store(true, Ordering::Release);
        info!(listen = ?self.addrs, admin = %self.admin_addr, "herald is serving");

        tokio::select! {
            () = shutdown => info!("shutting down: draining in-flight requests"),
            Some(res) = servers.join_next() => {
                res.context("server task panicked")?.context("server failed")?;
            }
        }
        self.state.ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            while let Some(res) = servers.join_next().await {
                if let Ok(Err(e)) = res {
                    warn!(error = %e, "server stopped with an error");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(grace = ?self.shutdown_grace, "shutdown grace period over; dropping unfinished requests");
            servers.abort_all();
        }
        info!("stopped");
        Ok(())
    }
}
