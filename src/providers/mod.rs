//! Provider adapters: a closed enum over APNs, FCM HTTP v1 and the `log` provider.
//!
//! Each adapter owns one pooled HTTP client aimed at a base URL from config, so tests and
//! benchmarks point it at loopback fakes. Turning a notification into a request
//! ([`Provider::prepare`]) and an upstream answer into an [`Outcome`] are pure functions in each
//! adapter; [`Provider::send`] makes exactly one attempt. Retries, deadlines and dedup belong to
//! `dispatch`, never here.
//!
//! Adapters never log key material, OAuth tokens, JWTs or full pushkeys (see [`pushkey_hash`]).

pub mod apns;
pub mod fcm;
pub mod http;
pub mod log;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::config::{AppConfig, AppKind, ProxyConfig};
use crate::metrics::Metrics;
use crate::notification::{Device, Notification};

/// The result of one attempt to push to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted the push.
    Delivered,
    /// The provider says the pushkey is permanently invalid: the homeserver should drop it.
    Rejected(String),
    /// A transient failure worth another attempt, after `after` when the provider said so.
    Retry { after: Option<Duration>, reason: String },
    /// Not delivered, and retrying the same request will not help (config or payload problem).
    Failed(String),
}

/// A provider-ready request, built once per device and re-sent on retries.
#[derive(Debug)]
pub enum Prepared {
    Apns(apns::ApnsRequest),
    Fcm(fcm::FcmRequest),
    Log(log::LogRequest),
}

/// One configured app's adapter.
// Built once per app at startup and kept behind an `Arc`: variant size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Provider {
    Apns(apns::Apns),
    Fcm(fcm::Fcm),
    Log(log::LogProvider),
}

/// Labels every upstream metric of one app carries.
#[derive(Debug, Clone)]
pub struct AppLabels {
    pub app: Arc<str>,
    pub provider: &'static str,
}

/// Why an adapter could not be built (bad TLS material and the like).
#[derive(Debug, thiserror::Error)]
#[error("apps.{app}: {message}")]
pub struct BuildError {
    pub app: String,
    pub message: String,
}

impl Provider {
    pub fn build(
        app: &AppConfig,
        proxy: Option<&ProxyConfig>,
        metrics: &Arc<Metrics>,
    ) -> Result<Provider, BuildError> {
        let err = |message: String| BuildError { app: app.pattern.clone(), message };
        let labels = |provider| AppLabels { app: app.pattern.as_str().into(), provider };
        Ok(match &app.kind {
            AppKind::Apns(c) => Provider::Apns(
                apns::Apns::new(c, proxy, labels("apns"), metrics.clone()).map_err(err)?,
            ),
            AppKind::Fcm(c) => {
                Provider::Fcm(fcm::Fcm::new(c, proxy, labels("fcm"), metrics.clone()).map_err(err)?)
            }
            AppKind::Log => Provider::Log(log::LogProvider::new(labels("log"))),
        })
    }

    /// `apns`, `fcm` or `log`: the `provider` metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Apns(_) => "apns",
            Provider::Fcm(_) => "fcm",
            Provider::Log(_) => "log",
        }
    }

    /// Builds the request for one device. `Err` is a final outcome reached without any request:
    /// `Rejected` for a malformed pushkey, `Delivered` when there is nothing to send (a badge
    /// update for an app with `send_badge_counts: false`).
    pub fn prepare(&self, n: &Notification, d: &Device) -> Result<Prepared, Outcome> {
        match self {
            Provider::Apns(p) => p.prepare(n, d).map(Prepared::Apns),
            Provider::Fcm(p) => p.prepare(n, d).map(Prepared::Fcm),
            Provider::Log(p) => Ok(Prepared::Log(p.prepare(n, d))),
        }
    }

    /// One attempt; the caller bounds it in time.
    pub async fn send(&self, request: &Prepared) -> Outcome {
        match (self, request) {
            (Provider::Apns(p), Prepared::Apns(r)) => p.send(r).await,
            (Provider::Fcm(p), Prepared::Fcm(r)) => p.send(r).await,
            (Provider::Log(p), Prepared::Log(r)) => p.send(r),
            _ => Outcome::Failed("internal error: request prepared for another provider".into()),
        }
    }
}

/// A short, stable, non-reversible tag for a pushkey, for logs: 8 hex digits of its SHA-256.
pub fn pushkey_hash(pushkey: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, pushkey.as_bytes());
    hex::encode(&digest.as_ref()[..4])
}

/// `Retry-After` in seconds (the HTTP-date form is not used by push providers).
pub(crate) fn retry_after(headers: &::http::HeaderMap) -> Option<Duration> {
    let v = headers.get(::http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Cuts `s` to at most `max` bytes on a char boundary, ending in `…` when it was cut.
pub(crate) fn truncate_text(s: &mut String, max: usize) {
    const ELLIPSIS: &str = "…";
    if s.len() <= max {
        return;
    }
    let mut cut = max.saturating_sub(ELLIPSIS.len());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    if max >= ELLIPSIS.len() {
        s.push_str(ELLIPSIS);
    }
}

/// Serializes `value`, shortening its longest string leaves (never those under a key in
/// `protected`) until the JSON fits in `limit` bytes. Gives up, returning the smallest form it
/// reached, only when no string is left to shorten.
pub(crate) fn fit_json(value: &mut Value, limit: usize, protected: &[&str]) -> Vec<u8> {
    loop {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        if bytes.len() <= limit {
            return bytes;
        }
        let over = bytes.len() - limit;
        let Some(longest) = longest_string(value, protected) else { return bytes };
        if longest.is_empty() {
            return bytes;
        }
        // JSON escaping can make a char cost more than its UTF-8 length; cutting by the
        // overflow (plus the ellipsis) converges in a few rounds at most.
        let target = longest.len().saturating_sub(over + 3);
        truncate_text(longest, target);
    }
}

fn longest_string<'a>(value: &'a mut Value, protected: &[&str]) -> Option<&'a mut String> {
    let mut best: Option<&'a mut String> = None;
    let mut stack: Vec<&'a mut Value> = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if best.as_ref().is_none_or(|b| s.len() > b.len()) => best = Some(s),
            Value::Array(items) => stack.extend(items.iter_mut()),
            Value::Object(map) => stack.extend(
                map.iter_mut().filter(|(k, _)| !protected.contains(&k.as_str())).map(|(_, v)| v),
            ),
            _ => {}
        }
    }
    best.filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn truncate_respects_char_boundaries() {
        let mut s = "héllo wörld".to_string();
        truncate_text(&mut s, 6);
        assert!(s.len() <= 6 && s.ends_with('…'), "{s}");
        let mut short = "ok".to_string();
        truncate_text(&mut short, 6);
        assert_eq!(short, "ok");
    }

    #[test]
    fn fit_json_cuts_the_longest_text_and_spares_protected_keys() {
        let mut v = json!({"event_id": "e".repeat(300), "a": "x".repeat(5000), "b": "short"});
        let out = fit_json(&mut v, 1000, &["event_id"]);
        assert!(out.len() <= 1000);
        assert_eq!(v["event_id"].as_str().unwrap().len(), 300);
        assert_eq!(v["b"], "short");
        assert!(v["a"].as_str().unwrap().ends_with('…'));
    }

    #[test]
    fn fit_json_handles_escaped_and_multibyte_text() {
        let mut v = json!({"a": "\"\u{1F600}\n".repeat(2000)});
        let out = fit_json(&mut v, 4096, &[]);
        assert!(out.len() <= 4096, "{}", out.len());
        assert!(serde_json::from_slice::<Value>(&out).is_ok());
    }

    #[test]
    fn pushkey_hash_is_short_and_stable() {
        assert_eq!(pushkey_hash("abc"), pushkey_hash("abc"));
        assert_eq!(pushkey_hash("abc").len(), 8);
        assert_ne!(pushkey_hash("abc"), pushkey_hash("abd"));
    }
}
