//! `GET /sync` (with the long-poll) and `PUT /sendToDevice/{eventType}/{txnId}`.

use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use serde_json::{Value, json};

use super::error::{ApiResult, MatrixError};
use super::{Auth, JsonObject, Path, query_param};
use crate::homeserver::sync::{SyncToken, sync_once};
use crate::homeserver::{Homeserver, to_device};

/// The longest a sync waits, whatever `timeout` asks.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

/// Answers at once when anything changed since `since` (or on an initial sync); otherwise
/// waits up to `timeout` ms for a change.
pub async fn sync(
    State(hs): State<Homeserver>,
    auth: Auth,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = query.as_deref();
    let since = query_param(query, "since")
        .filter(|s| !s.is_empty())
        .map(|s| SyncToken::parse(&s))
        .transpose()?;
    let full_state = query_param(query, "full_state").as_deref() == Some("true");
    let timeout = match query_param(query, "timeout") {
        None => Duration::ZERO,
        Some(t) => Duration::from_millis(t.parse().map_err(|_| {
            MatrixError::invalid_param("`timeout` must be a number of milliseconds")
        })?),
    }
    .min(MAX_TIMEOUT);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changes = hs.subscribe();
    loop {
        changes.borrow_and_update();
        let (user, device) = (auth.user_id.clone(), auth.device_id.clone());
        let (response, any) =
            hs.db(move |hs, conn| sync_once(hs, conn, &user, &device, since, full_state)).await?;
        if any || since.is_none() {
            return Ok(Json(response));
        }
        if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
            return Ok(Json(response));
        }
    }
}

pub async fn send_to_device(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((kind, txn)): Path<(String, String)>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let messages = match body.get("messages") {
        Some(Value::Object(m)) => m.clone(),
        None | Some(Value::Null) => {
            return Err(MatrixError::bad_request("M_MISSING_PARAM", "missing `messages`"));
        }
        Some(_) => return Err(MatrixError::bad_json("`messages` must be an object of user ids")),
    };
    hs.db(move |hs, conn| {
        to_device::send(hs, conn, (&auth.user_id, &auth.device_id), &kind, &txn, &messages)
    })
    .await?;
    Ok(Json(json!({})))
}
