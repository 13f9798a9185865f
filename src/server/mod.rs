//! The HTTP surface, kept apart from serving so tests can drive it with `oneshot`.
//!
//! Routes (DESIGN §3):
//! - `POST /_matrix/push/v1/notify` — the Push Gateway API ([`notify`]);
//! - `GET /_matrix/push/v1/notify` — UnifiedPush gateway discovery, when a `unifiedpush` app is
//!   configured (otherwise 405 like any wrong method);
//! - `GET /health`, `GET /ready` — on every listener ([`admin`]);
//! - `GET /metrics` — Prometheus text, on the admin listener (or the main one when shared);
//! - anything else: 404 `M_UNRECOGNIZED`; a known path with the wrong method: 405
//!   `M_UNRECOGNIZED` with `Allow`.

pub mod admin;
pub mod error;
pub mod notify;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use tracing::{error, info_span};

use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use error::ApiError;

pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    /// Permits for concurrent notify requests; none left → 429.
    pub inflight: Arc<tokio::sync::Semaphore>,
    pub ready: Arc<AtomicBool>,
    pub request_deadline: Duration,
    pub max_body_bytes: usize,
    /// A `unifiedpush` app is configured: answer the UnifiedPush discovery GET.
    pub unifiedpush_gateway: bool,
}

/// The notify listener's routes (plus `/metrics` when `with_metrics`, i.e. no admin listener).
pub fn router(state: AppState, with_metrics: bool) -> Router {
    let notify = if state.unifiedpush_gateway {
        only(post(notify::notify).get(notify::discovery), "GET, HEAD, POST")
    } else {
        only(post(notify::notify), "POST")
    };
    let routes = Router::new()
        .route(NOTIFY_PATH, notify)
        .route("/health", only(get(admin::health), "GET, HEAD"))
        .route("/ready", only(get(admin::ready), "GET, HEAD"));
    let routes = if with_metrics {
        routes.route("/metrics", only(get(admin::metrics), "GET, HEAD"))
    } else {
        routes
    };
    layered(routes, state)
}

/// The admin listener's routes.
pub fn admin_router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/health", only(get(admin::health), "GET, HEAD"))
        .route("/ready", only(get(admin::ready), "GET, HEAD"))
        .route("/metrics", only(get(admin::metrics), "GET, HEAD"));
    layered(routes, state)
}

fn only(route: MethodRouter<AppState>, allow: &'static str) -> MethodRouter<AppState> {
    route.fallback(move || async move { ApiError::MethodNotAllowed { allow } })
}

/// Layers, outermost first:
/// 1. request id — set (or kept from the caller) first so every later layer and log sees it;
/// 2. trace — one span per request carrying that id, so provider logs inherit it;
/// 3. catch-panic — a bug answers 500 JSON instead of dropping the connection;
/// 4. early 413 — refuses a declared oversized body before reading any of it.
///
/// No timeout layer: the notify handler bounds itself by `request_deadline`, so its answer is
/// always a Matrix error body rather than a bare 408.
fn layered(routes: Router<AppState>, state: AppState) -> Router {
    let limit = state.max_body_bytes;
    routes
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn(move |req: Request, next: Next| early_limit(req, next, limit)))
        .layer(CatchPanicLayer::custom(|_| {
            error!("handler panicked");
            ApiError::Internal.into_response()
        }))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            info_span!("request", id = %id, method = %req.method(), path = %req.uri().path())
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(Counter::default()))
        .with_state(state)
}

async fn early_limit(req: Request, next: Next, limit: usize) -> Response {
    if req.method() == Method::POST && notify::declared_too_large(req.headers(), limit) {
        return ApiError::TooLarge { limit }.into_response();
    }
    next.run(req).await
}

/// Request ids: a per-process random prefix and a counter, cheap and unique enough to grep.
#[derive(Clone)]
struct Counter {
    prefix: u32,
    next: Arc<AtomicU64>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter { prefix: rand::random(), next: Arc::new(AtomicU64::new(1)) }
    }
}

impl MakeRequestId for Counter {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{:08x}-{n}", self.prefix)).ok().map(RequestId::new)
    }
}
