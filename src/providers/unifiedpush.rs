//! UnifiedPush: herald as the Matrix gateway of the UnifiedPush spec. The pushkey is the
//! device's UnifiedPush endpoint URL (at its distributor's push server: ntfy, NextPush, …), and
//! herald POSTs the notification JSON to it; the app on the phone reads the Matrix
//! notification format it already knows.
//!
//! The body is the request's `{"notification": …}` with `devices` reduced to this device,
//! within 4096 bytes (content shortened). The endpoint is vetted by [`super::endpoint`] before
//! any connection. Never logs the endpoint URL: it is the pushkey.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::{Value, json};

use super::endpoint::{Checked, EndpointClient, Size, is_absolute_url};
use super::{AppLabels, Fit, Outcome, Skip, fit_json, notification_fields};
use crate::config::{ProxyConfig, UnifiedPushConfig};
use crate::metrics::Metrics;
use crate::notification::{Device, Notification, Prio};

/// The largest body a UnifiedPush server must accept.
pub const MAX_BODY: usize = 4096;
/// The limit of the one re-send after a push server refused a message as too large.
pub const SHORTENED_BODY: usize = 1024;
/// `{"notification":` and `}` around the notification object.
const WRAPPER: usize = 17;
/// Never shortened: the app needs them to fetch the event, to know the push is its own, and to
/// read it in the format it asked for.
const PROTECTED: &[&str] = &["event_id", "room_id", "app_id", "pushkey", "format"];

/// A push ready to send (and re-send on retry).
pub struct UnifiedPushRequest {
    /// The device's pushkey, which is the endpoint URL.
    endpoint: String,
    /// The `notification` object, kept to shorten it after a 413.
    notification: Value,
    body: Bytes,
    prio: Prio,
}

impl std::fmt::Debug for UnifiedPushRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The endpoint is the pushkey, and the body contains it.
        f.debug_struct("UnifiedPushRequest")
            .field("body_bytes", &self.body.len())
            .field("prio", &self.prio)
            .finish()
    }
}

/// One UnifiedPush app.
pub struct UnifiedPush {
    endpoints: EndpointClient,
}

impl UnifiedPush {
    pub fn new(
        config: &UnifiedPushConfig,
        proxy: Option<&ProxyConfig>,
        labels: AppLabels,
        metrics: Arc<Metrics>,
    ) -> Result<UnifiedPush, String> {
        Ok(UnifiedPush {
            endpoints: EndpointClient::new(&config.endpoints, proxy, labels, metrics)?,
        })
    }

    pub fn prepare(&self, n: &Notification, d: &Device) -> Result<UnifiedPushRequest, Skip> {
        if !is_absolute_url(&d.pushkey) {
            return Err(Skip::BadPushkey("pushkey is not an absolute endpoint URL".into()));
        }
        let mut notification = build_notification(n, d);
        let body = wrap(&mut notification, MAX_BODY);
        Ok(UnifiedPushRequest { endpoint: d.pushkey.clone(), notification, body, prio: n.prio })
    }

    pub async fn send(&self, r: &UnifiedPushRequest) -> Outcome {
        self.endpoints.post(&r.endpoint, r.prio, |checked, size| request(r, checked, size)).await
    }
}

/// The POST of `r` to its vetted endpoint, shortened on [`Size::Shortened`].
fn request(
    r: &UnifiedPushRequest,
    checked: &Checked,
    size: Size,
) -> Result<Request<Full<Bytes>>, String> {
    let body = match size {
        Size::Full => r.body.clone(),
        Size::Shortened => wrap(&mut r.notification.clone(), SHORTENED_BODY),
    };
    Request::builder()
        .method(Method::POST)
        .uri(checked.uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| format!("cannot build request: {e}"))
}

/// The notification as the homeserver sent it, with `devices` reduced to `d`.
pub fn build_notification(n: &Notification, d: &Device) -> Value {
    let mut out = notification_fields(n);
    if let Some(target) = n.user_is_target {
        out.insert("user_is_target".into(), target.into());
    }
    let mut device = json!({ "app_id": d.app_id, "pushkey": d.pushkey });
    if let Some(data) = &d.data {
        device["data"] = Value::Object(data.clone());
    }
    if let Some(tweaks) = &d.tweaks {
        device["tweaks"] = Value::Object(tweaks.clone());
    }
    out.insert("devices".into(), json!([device]));
    Value::Object(out)
}

/// The body one device's endpoint gets: [`build_notification`] wrapped within [`MAX_BODY`].
pub fn fitted_body(n: &Notification, d: &Device) -> Bytes {
    wrap(&mut build_notification(n, d), MAX_BODY)
}

/// `{"notification": …}` within `limit` bytes, shortening content first.
fn wrap(notification: &mut Value, limit: usize) -> Bytes {
    let fit = Fit {
        limit: limit.saturating_sub(WRAPPER),
        keep: PROTECTED,
        pinned: &["devices", "counts", "prio"],
    };
    let inner = fit_json(notification, &fit);
    let mut body = Vec::with_capacity(inner.len() + WRAPPER);
    body.extend_from_slice(br#"{"notification":"#);
    body.extend_from_slice(&inner);
    body.push(b'}');
    body.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::Counts;

    #[test]
    fn body_is_the_notification_for_this_device_only() {
        let n = Notification {
            event_id: Some("$e".into()),
            room_id: Some("!r".into()),
            counts: Counts { unread: Some(2), missed_calls: Some(1) },
            content: json!({"body": "x".repeat(10_000), "msgtype": "m.text"}).as_object().cloned(),
            ..Default::default()
        };
        let d = Device {
            app_id: "org.example.up".into(),
            pushkey: "https://ntfy.example.org/upAbC?up=1".into(),
            data: json!({"format": "event_id_only"}).as_object().cloned(),
            ..Default::default()
        };
        let mut notification = build_notification(&n, &d);
        let body = wrap(&mut notification, MAX_BODY);
        assert!(body.len() <= MAX_BODY, "{}", body.len());
        let v: Value = serde_json::from_slice(&body).unwrap();
        let sent = &v["notification"];
        assert_eq!(sent["event_id"], "$e");
        assert_eq!(sent["counts"], json!({"unread": 2, "missed_calls": 1}));
        assert_eq!(sent["prio"], "high");
        assert_eq!(sent["devices"].as_array().unwrap().len(), 1);
        assert_eq!(sent["devices"][0]["pushkey"], d.pushkey);
        assert_eq!(sent["devices"][0]["data"]["format"], "event_id_only");
        assert!(sent["content"]["body"].as_str().unwrap().ends_with('…'));
        let short = wrap(&mut notification, SHORTENED_BODY);
        assert!(short.len() <= SHORTENED_BODY, "{}", short.len());
        let v: Value = serde_json::from_slice(&short).unwrap();
        assert_eq!(v["notification"]["devices"][0]["pushkey"], d.pushkey);
    }
}
