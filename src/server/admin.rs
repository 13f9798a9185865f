//! Admin routes: `GET /health` (the process is up), `GET /ready` (it accepts notifications;
//! 503 while draining; with a shared dedup store, whether that store is up) and `GET /metrics` (Prometheus text format).
//!
//! These routes never touch providers or the network, so they stay fast under any load.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;

pub async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        // A shared dedup store that is down does not make herald unready: pushes go on with
        // local dedup. It is reported here (and in `herald_dedup_store_up`).
        match state.dispatcher.dedup().shared() {
            None => Json(json!({ "status": "ready" })).into_response(),
            Some(store) => Json(json!({
                "status": "ready",
                "dedup": { "backend": "redis", "store": store.health().as_str() },
            }))
            .into_response(),
        }
    } else {
        ApiError::Unavailable("shutting down".into()).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
