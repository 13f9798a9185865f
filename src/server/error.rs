//! `ApiError`: the one place an error becomes an HTTP status and a Matrix `errcode`.
//!
//! Every error body is `application/json` with `errcode` and `error`; nothing else in the server
//! chooses a status for a failure. Converting an error never logs.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotJson(String),
    #[error("{0}")]
    BadJson(String),
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("unrecognized request")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("too many requests in flight; retry later")]
    LimitExceeded { retry_after_ms: u64 },
    #[error("timed out reading the request body")]
    BodyTimeout,
    /// Some devices were neither delivered nor rejected: the homeserver must retry.
    #[error("{failed} of {total} devices could not be delivered; retry later")]
    Undelivered { failed: usize, total: usize, rejected: Vec<String> },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotJson(_) | ApiError::BadJson(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::LimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Undelivered { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn errcode(&self) -> &'static str {
        match self {
            ApiError::NotJson(_) => "M_NOT_JSON",
            ApiError::BadJson(_) => "M_BAD_JSON",
            ApiError::TooLarge { .. } => "M_TOO_LARGE",
            ApiError::NotFound | ApiError::MethodNotAllowed { .. } => "M_UNRECOGNIZED",
            ApiError::LimitExceeded { .. } => "M_LIMIT_EXCEEDED",
            ApiError::BodyTimeout
            | ApiError::Undelivered { .. }
            | ApiError::Unavailable(_)
            | ApiError::Internal => "M_UNKNOWN",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "errcode": self.errcode(), "error": self.to_string() });
        match &self {
            ApiError::LimitExceeded { retry_after_ms } => {
                body["retry_after_ms"] = json!(retry_after_ms)
            }
            ApiError::Undelivered { rejected, .. } => body["rejected"] = json!(rejected),
            _ => {}
        }
        let mut response = (self.status(), Json(body)).into_response();
        match self {
            ApiError::MethodNotAllowed { allow } => {
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::LimitExceeded { retry_after_ms } => {
                let secs = retry_after_ms.div_ceil(1000).max(1);
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        response
    }
}
