//! Firebase Cloud Messaging, HTTP v1 API (`POST /v1/projects/{project}/messages:send`).
//!
//! OAuth2 access tokens come from [`super::oauth::TokenSource`], over this app's own client (so
//! `proxy` and `ca_file` apply to the token exchange too); a 401 from FCM drops the token and the
//! retry fetches a new one.
//!
//! Messages are data messages (what Element Android and other Sygnal clients expect), with an
//! optional visible `notification` block. Payload building and response mapping are pure.
//! Never logs access tokens, the service-account key, or a full registration token.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use super::http::{HttpClient, Protocol, exchange};
use super::oauth::{TokenError, TokenSource};
use super::{AppLabels, Fit, Outcome, Skip, fit_json, retry_after, truncate_text};
use crate::config::{FcmConfig, ProxyConfig};
use crate::metrics::Metrics;
use crate::notification::{Device, Notification, Prio};

/// FCM's limit on a message's `data`, JSON-encoded with its keys.
pub const MAX_DATA: usize = 4096;
/// herald's limit on one `data` value, so one long field cannot crowd out the rest.
pub const MAX_FIELD: usize = 1024;
/// Never shortened: the client needs them intact to fetch the event.
const PROTECTED: &[&str] = &["event_id", "room_id"];

/// A message ready to send (and re-send on retry).
pub struct FcmRequest {
    body: Bytes,
}

impl std::fmt::Debug for FcmRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body holds the registration token.
        f.debug_struct("FcmRequest").field("body_bytes", &self.body.len()).finish()
    }
}

/// One FCM app.
pub struct Fcm {
    client: HttpClient,
    send_url: String,
    tokens: TokenSource,
    notification: bool,
    android: Map<String, Value>,
    send_badge_counts: bool,
    limiter: Semaphore,
    labels: AppLabels,
    metrics: Arc<Metrics>,
}

impl Fcm {
    pub fn new(
        config: &FcmConfig,
        proxy: Option<&ProxyConfig>,
        labels: AppLabels,
        metrics: Arc<Metrics>,
    ) -> Result<Fcm, String> {
        let client = super::http::client(&config.upstream, proxy, None, Protocol::Any)?;
        Ok(Fcm {
            client: client.clone(),
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                config.upstream.base_url, config.project_id
            ),
            tokens: TokenSource::new(&config.service_account_json, client.clone())?,
            notification: config.notification,
            android: config.android.clone(),
            send_badge_counts: config.send_badge_counts,
            limiter: Semaphore::new(config.max_concurrency),
            labels,
            metrics,
        })
    }

    pub fn prepare(&self, n: &Notification, d: &Device) -> Result<FcmRequest, Skip> {
        if d.pushkey.is_empty() {
            return Err(Skip::BadPushkey("pushkey is empty".into()));
        }
        if n.is_badge_only() && !self.send_badge_counts {
            return Err(Skip::NothingToSend);
        }
        let message = build_message(n, d, self.send_badge_counts, self.notification, &self.android);
        let body = serde_json::to_vec(&json!({ "message": message })).unwrap_or_default();
        Ok(FcmRequest { body: body.into() })
    }

    pub async fn send(&self, r: &FcmRequest) -> Outcome {
        let Ok(_permit) = self.limiter.acquire().await else {
            return Outcome::Failed("provider is shutting down".into());
        };
        let started = Instant::now();
        let token = match self.tokens.get().await {
            Ok(t) => t,
            Err(e) => {
                self.metrics.upstream(&self.labels, "token_error", started.elapsed());
                return match e {
                    TokenError::Transient(why) => {
                        Outcome::Retry { after: None, reason: format!("OAuth token: {why}") }
                    }
                    TokenError::Refused(why) => Outcome::Failed(format!("OAuth token: {why}")),
                };
            }
        };
        let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {}", token.as_str())) else {
            return Outcome::Failed("OAuth token is not a valid header value".into());
        };
        bearer.set_sensitive(true);
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.send_url)
            .header(http::header::AUTHORIZATION, bearer)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(r.body.clone()));
        let request = match request {
            Ok(req) => req,
            Err(e) => return Outcome::Failed(format!("cannot build request: {e}")),
        };
        let answer = match exchange(&self.client, request).await {
            Ok(answer) => answer,
            Err(why) => {
                self.metrics.upstream(&self.labels, "error", started.elapsed());
                return Outcome::Retry { after: None, reason: why };
            }
        };
        self.metrics.upstream(&self.labels, answer.status.as_str(), started.elapsed());
        if answer.status == StatusCode::UNAUTHORIZED {
            self.tokens.invalidate(&token);
        }
        map_response(answer.status, &answer.body, retry_after(&answer.headers))
    }
}

/// The `message` object for one device (without the outer `{"message": …}`).
pub fn build_message(
    n: &Notification,
    d: &Device,
    send_badge_counts: bool,
    visible: bool,
    android: &Map<String, Value>,
) -> Value {
    let mut data = Map::new();
    if let Some(defaults) = d.default_payload() {
        for (k, v) in defaults {
            let s = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            data.insert(k.clone(), Value::String(s));
        }
    }
    let mut put = |key: &str, value: Option<&String>| {
        if let Some(v) = value {
            data.insert(key.to_owned(), Value::String(v.clone()));
        }
    };
    put("event_id", n.event_id.as_ref());
    put("type", n.event_type.as_ref());
    put("sender", n.sender.as_ref());
    put("room_name", n.room_name.as_ref());
    put("room_alias", n.room_alias.as_ref());
    put("sender_display_name", n.sender_display_name.as_ref());
    put("room_id", n.room_id.as_ref());
    let membership = n.content.as_ref().and_then(|c| c.get("membership")).and_then(Value::as_str);
    if let Some(m) = membership {
        data.insert("membership".into(), m.into());
    }
    data.insert("prio".into(), (if n.prio == Prio::Low { "normal" } else { "high" }).into());
    if send_badge_counts {
        if let Some(unread) = n.counts.unread {
            data.insert("unread".into(), unread.to_string().into());
        }
        if let Some(missed) = n.counts.missed_calls {
            data.insert("missed_calls".into(), missed.to_string().into());
        }
    }
    if let Some(content) = &n.content {
        for (k, v) in content {
            if let Value::String(s) = v {
                data.insert(format!("content_{k}"), s.clone().into());
            }
        }
    }
    for (k, v) in data.iter_mut() {
        if let Value::String(s) = v
            && !PROTECTED.contains(&k.as_str())
        {
            truncate_text(s, MAX_FIELD);
        }
    }
    let mut data = Value::Object(data);
    fit_json(
        &mut data,
        &Fit { limit: MAX_DATA, keep: PROTECTED, pinned: &["prio", "unread", "missed_calls"] },
    );

    let mut android_block = Map::new();
    android_block
        .insert("priority".into(), (if n.prio == Prio::Low { "NORMAL" } else { "HIGH" }).into());
    for (k, v) in android {
        android_block.insert(k.clone(), v.clone());
    }
    let mut message = json!({ "token": d.pushkey, "data": data, "android": android_block });
    if visible && !n.is_badge_only() {
        let title = n.room_name.as_ref().or(n.sender_display_name.as_ref()).or(n.sender.as_ref());
        let mut body = n
            .content
            .as_ref()
            .and_then(|c| c.get("body"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| "New message".to_owned());
        truncate_text(&mut body, MAX_FIELD);
        let mut block = Map::new();
        if let Some(t) = title {
            let mut t = t.clone();
            truncate_text(&mut t, 256);
            block.insert("title".into(), t.into());
        }
        block.insert("body".into(), body.into());
        message["notification"] = Value::Object(block);
    }
    message
}

/// Maps an FCM v1 answer to an [`Outcome`] (DESIGN §3's table).
pub fn map_response(
    status: StatusCode,
    body: &[u8],
    after: Option<std::time::Duration>,
) -> Outcome {
    let error: Value = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned())
        .unwrap_or(Value::Null);
    let rpc_status = error.get("status").and_then(Value::as_str).unwrap_or_default();
    let details =
        error.get("details").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let error_code =
        details.iter().find_map(|d| d.get("errorCode").and_then(Value::as_str)).unwrap_or_default();
    let about_token = details.iter().any(|d| {
        d.get("fieldViolations").and_then(Value::as_array).is_some_and(|fv| {
            fv.iter().any(|f| f.get("field").and_then(Value::as_str) == Some("message.token"))
        })
    }) || error
        .get("message")
        .and_then(Value::as_str)
        .is_some_and(|m| m.to_ascii_lowercase().contains("registration token"));
    let code = if error_code.is_empty() { rpc_status } else { error_code };
    let described = || format!("FCM {} {}", status.as_u16(), code).trim_end().to_owned();
    match status.as_u16() {
        200 => Outcome::Delivered,
        404 if matches!(error_code, "UNREGISTERED") || rpc_status == "NOT_FOUND" => {
            Outcome::Rejected(described())
        }
        400 if rpc_status == "INVALID_ARGUMENT" && about_token => Outcome::Rejected(described()),
        403 if error_code == "SENDER_ID_MISMATCH" => Outcome::Rejected(described()),
        401 => Outcome::Retry { after: Some(std::time::Duration::ZERO), reason: described() },
        429 | 500..=599 => Outcome::Retry { after, reason: described() },
        _ if matches!(rpc_status, "UNAVAILABLE" | "INTERNAL") => {
            Outcome::Retry { after, reason: described() }
        }
        _ => Outcome::Failed(described()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::Counts;

    fn device() -> Device {
        Device { app_id: "a".into(), pushkey: "tok".into(), ..Default::default() }
    }

    #[test]
    fn data_values_are_strings_and_bounded() {
        let n = Notification {
            event_id: Some("$e".into()),
            room_id: Some("!r".into()),
            event_type: Some("m.room.message".into()),
            counts: Counts { unread: Some(0), missed_calls: None },
            content: Some(
                json!({"body": "x".repeat(5000), "msgtype": "m.text", "n": 3})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            ..Default::default()
        };
        let m = build_message(&n, &device(), true, false, &Map::new());
        let data = m["data"].as_object().unwrap();
        assert!(data.values().all(Value::is_string));
        assert_eq!(data["unread"], "0");
        assert!(data["content_body"].as_str().unwrap().len() <= MAX_FIELD);
        assert!(!data.contains_key("content_n"));
        assert!(serde_json::to_vec(&m["data"]).unwrap().len() <= MAX_DATA);
        assert_eq!(m["android"]["priority"], "HIGH");
    }

    #[test]
    fn response_table() {
        let err = |code: u16, status: &str, details: Value| {
            json!({"error": {"code": code, "message": "m", "status": status, "details": details}})
                .to_string()
        };
        let r = |s: u16, body: String| {
            map_response(StatusCode::from_u16(s).unwrap(), body.as_bytes(), None)
        };
        assert_eq!(r(200, "{}".into()), Outcome::Delivered);
        let fcm = |c: &str| json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": c}]);
        assert!(matches!(r(404, err(404, "NOT_FOUND", fcm("UNREGISTERED"))), Outcome::Rejected(_)));
        let token_violation = json!([{"@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.token", "description": "bad"}]}]);
        assert!(matches!(
            r(400, err(400, "INVALID_ARGUMENT", token_violation)),
            Outcome::Rejected(_)
        ));
        let data_violation = json!([{"@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.data", "description": "bad"}]}]);
        assert!(matches!(r(400, err(400, "INVALID_ARGUMENT", data_violation)), Outcome::Failed(_)));
        assert!(matches!(
            r(403, err(403, "PERMISSION_DENIED", fcm("SENDER_ID_MISMATCH"))),
            Outcome::Rejected(_)
        ));
        assert!(matches!(r(403, err(403, "PERMISSION_DENIED", json!([]))), Outcome::Failed(_)));
        assert!(matches!(r(401, err(401, "UNAUTHENTICATED", json!([]))), Outcome::Retry { .. }));
        assert!(matches!(
            r(429, err(429, "RESOURCE_EXHAUSTED", fcm("QUOTA_EXCEEDED"))),
            Outcome::Retry { .. }
        ));
        assert!(matches!(r(503, err(503, "UNAVAILABLE", json!([]))), Outcome::Retry { .. }));
        assert!(matches!(r(500, "oops".into()), Outcome::Retry { .. }));
    }
}
