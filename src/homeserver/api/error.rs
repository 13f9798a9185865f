//! `MatrixError`: the one place a client-server API failure becomes an HTTP status and a Matrix
//! `errcode` (`{"errcode", "error"}` JSON). Database failures become 500 `M_UNKNOWN` and are
//! logged here, once, without request data.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub error: String,
}

pub type ApiResult<T> = Result<T, MatrixError>;

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<String>) -> Self {
        MatrixError { status, errcode, error: error.into() }
    }
    pub fn bad_request(errcode: &'static str, error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, errcode, error)
    }
    pub fn invalid_param(error: impl Into<String>) -> Self {
        Self::bad_request("M_INVALID_PARAM", error)
    }
    pub fn bad_json(error: impl Into<String>) -> Self {
        Self::bad_request("M_BAD_JSON", error)
    }
    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", error)
    }
    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", error)
    }
    pub fn limit_exceeded(error: impl Into<String>) -> Self {
        MatrixError::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", error)
    }

    pub fn unrecognized() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "unrecognized request")
    }
}

impl From<rusqlite::Error> for MatrixError {
    fn from(err: rusqlite::Error) -> Self {
        tracing::error!(error = %err, "homeserver database error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "internal database error")
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"errcode": self.errcode, "error": self.error}))).into_response()
    }
}
