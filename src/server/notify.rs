//! `POST /_matrix/push/v1/notify`: read → parse → dispatch (with dedup) → answer.
//!
//! The answer is 200 `{"rejected": […]}` only when every device was delivered or rejected;
//! otherwise 502 with the same `rejected` list, so the homeserver retries and dedup keeps the
//! retry from alerting anyone twice. The whole request, body read included, is bounded by
//! `request_deadline`; reading the body alone by [`BODY_READ_TIMEOUT`] (or the deadline, if
//! shorter), so a client trickling its body cannot hold an in-flight permit for long. Never
//! answers 200 for a device that was not delivered.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::AppState;
use super::error::ApiError;
use crate::notification::{self, NotifyResponse, ParseError};

/// How long after the request started its body must be fully read (408 otherwise). Homeservers
/// send a few kilobytes at once; only a stalled or malicious client takes longer.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /_matrix/push/v1/notify` with a `unifiedpush` app configured: UnifiedPush's gateway
/// discovery, which tells a distributor that herald is a Matrix gateway.
pub async fn discovery() -> Response {
    Json(serde_json::json!({ "unifiedpush": { "gateway": "matrix" } })).into_response()
}

pub async fn notify(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let response = match handle(&state, request, started).await {
        Ok(ok) => Json(ok).into_response(),
        Err(e) => e.into_response(),
    };
    state.metrics.notify_answered(response.status().as_u16(), started.elapsed());
    response
}

async fn handle(
    state: &AppState,
    request: Request,
    started: Instant,
) -> Result<NotifyResponse, ApiError> {
    let Ok(_permit) = Arc::clone(&state.inflight).try_acquire_owned() else {
        return Err(ApiError::LimitExceeded { retry_after_ms: 1000 });
    };
    let _gauge = GaugeGuard::new(state);
    let deadline = started + state.request_deadline;
    let body_deadline = started + state.request_deadline.min(BODY_READ_TIMEOUT);
    let body = read_body(request.into_body(), state.max_body_bytes, body_deadline).await?;
    let notification = notification::parse(&body).map_err(|e| match e {
        ParseError::NotJson(m) => ApiError::NotJson(m),
        ParseError::BadJson(m) => ApiError::BadJson(m),
    })?;
    state.metrics.notification_received(notification.devices.len());
    let summary = state.dispatcher.dispatch(&notification, deadline).await;
    let rejected = summary.rejected();
    match summary.failed() {
        0 => Ok(NotifyResponse { rejected }),
        failed => Err(ApiError::Undelivered { failed, total: summary.results.len(), rejected }),
    }
}

async fn read_body(body: Body, limit: usize, deadline: Instant) -> Result<bytes::Bytes, ApiError> {
    match tokio::time::timeout_at(deadline, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(ApiError::TooLarge { limit });
                }
                source = s.source();
            }
            Err(ApiError::BadJson(format!("could not read the request body: {e}")))
        }
    }
}

/// Keeps `herald_inflight_requests` right however the handler exits.
struct GaugeGuard<'a>(&'a AppState);

impl<'a> GaugeGuard<'a> {
    fn new(state: &'a AppState) -> Self {
        state.metrics.inflight().increment(1.0);
        GaugeGuard(state)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.metrics.inflight().decrement(1.0);
    }
}

/// Early 413 from `Content-Length`, before any of the body is read.
pub fn declared_too_large(headers: &axum::http::HeaderMap, limit: usize) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > limit as u64)
}
