//! Provider adapters: a closed enum over APNs, FCM HTTP v1, WebPush, UnifiedPush and the `log`
//! provider.
//!
//! Each adapter owns one pooled HTTP client aimed at a base URL from config, so tests and
//! benchmarks point it at loopback fakes. Turning a notification into a request
//! ([`Provider::prepare`]) and an upstream answer into an [`Outcome`] are pure functions in each
//! adapter; [`Provider::send`] makes exactly one attempt. Retries, deadlines and dedup belong to
//! `dispatch`, never here.
//!
//! Adapters never log key material, OAuth tokens, JWTs or full pushkeys (see [`pushkey_hash`]).

pub mod apns;
pub mod endpoint;
pub mod fcm;
pub mod http;
pub mod log;
pub mod oauth;
pub mod unifiedpush;
pub mod webpush;

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

/// Why [`Provider::prepare`] built no request for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Nothing to send (a badge update for an app with `send_badge_counts: false`): done.
    NothingToSend,
    /// The pushkey cannot be used with this provider at all: report it rejected.
    BadPushkey(String),
}

/// A provider-ready request, built once per device and re-sent on retries.
#[derive(Debug)]
pub enum Prepared {
    Apns(apns::ApnsRequest),
    Fcm(fcm::FcmRequest),
    WebPush(webpush::WebPushRequest),
    UnifiedPush(unifiedpush::UnifiedPushRequest),
    Log(log::LogRequest),
}

/// One configured app's adapter.
// Built once per app at startup and kept behind an `Arc`: variant size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Provider {
    Apns(apns::Apns),
    Fcm(fcm::Fcm),
    WebPush(webpush::WebPush),
    UnifiedPush(unifiedpush::UnifiedPush),
    Log(log::LogProvider),
}

/// Labels every upstream metric of one app carries, with the app's most used series already
/// registered (see [`Metrics::app_labels`]), so the hot path records without a registry lookup.
#[derive(Clone)]
pub struct AppLabels {
    pub app: Arc<str>,
    pub provider: &'static str,
    pub(crate) handles: Arc<crate::metrics::AppHandles>,
}

impl std::fmt::Debug for AppLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppLabels")
            .field("app", &self.app)
            .field("provider", &self.provider)
            .finish()
    }
}

/// Why an adapter (or the dedup store) could not be built: bad TLS material and the like.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct BuildError {
    /// The config key at fault, e.g. `apps.im.example.ios`.
    pub key: String,
    pub message: String,
}

impl Provider {
    pub fn build(
        app: &AppConfig,
        proxy: Option<&ProxyConfig>,
        metrics: &Arc<Metrics>,
    ) -> Result<Provider, BuildError> {
        let err = |message: String| BuildError { key: format!("apps.{}", app.pattern), message };
        let labels = |provider| metrics.app_labels(&app.pattern, provider);
        Ok(match &app.kind {
            AppKind::Apns(c) => Provider::Apns(
                apns::Apns::new(c, proxy, labels("apns"), metrics.clone()).map_err(err)?,
            ),
            AppKind::Fcm(c) => {
                Provider::Fcm(fcm::Fcm::new(c, proxy, labels("fcm"), metrics.clone()).map_err(err)?)
            }
            AppKind::WebPush(c) => Provider::WebPush(
                webpush::WebPush::new(c, proxy, labels("webpush"), metrics.clone()).map_err(err)?,
            ),
            AppKind::UnifiedPush(c) => Provider::UnifiedPush(
                unifiedpush::UnifiedPush::new(c, proxy, labels("unifiedpush"), metrics.clone())
                    .map_err(err)?,
            ),
            AppKind::Log => Provider::Log(log::LogProvider::new(labels("log"))),
        })
    }

    /// `apns`, `fcm`, `webpush`, `unifiedpush` or `log`: the `provider` metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Apns(_) => "apns",
            Provider::Fcm(_) => "fcm",
            Provider::WebPush(_) => "webpush",
            Provider::UnifiedPush(_) => "unifiedpush",
            Provider::Log(_) => "log",
        }
    }

    /// Builds the request for one device, or says why there is none to send.
    pub fn prepare(&self, n: &Notification, d: &Device) -> Result<Prepared, Skip> {
        match self {
            Provider::Apns(p) => p.prepare(n, d).map(Prepared::Apns),
            Provider::Fcm(p) => p.prepare(n, d).map(Prepared::Fcm),
            Provider::WebPush(p) => p.prepare(n, d).map(Prepared::WebPush),
            Provider::UnifiedPush(p) => p.prepare(n, d).map(Prepared::UnifiedPush),
            Provider::Log(p) => Ok(Prepared::Log(p.prepare(n, d))),
        }
    }

    /// One attempt; the caller bounds it in time.
    pub async fn send(&self, request: &Prepared) -> Outcome {
        match (self, request) {
            (Provider::Apns(p), Prepared::Apns(r)) => p.send(r).await,
            (Provider::Fcm(p), Prepared::Fcm(r)) => p.send(r).await,
            (Provider::WebPush(p), Prepared::WebPush(r)) => p.send(r).await,
            (Provider::UnifiedPush(p), Prepared::UnifiedPush(r)) => p.send(r).await,
            (Provider::Log(p), Prepared::Log(r)) => p.send(r),
            _ => Outcome::Failed("internal error: request prepared for another provider".into()),
        }
    }
}

/// The notification's event fields as the Push Gateway API names them (`event_id, room_id, type,
/// sender, sender_display_name, room_name, room_alias, prio, content`) and its `counts`: what
/// the WebPush and UnifiedPush payloads pass on as they came.
pub(crate) fn notification_fields(n: &Notification) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let fields = [
        ("event_id", &n.event_id),
        ("room_id", &n.room_id),
        ("type", &n.event_type),
        ("sender", &n.sender),
        ("sender_display_name", &n.sender_display_name),
        ("room_name", &n.room_name),
        ("room_alias", &n.room_alias),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            out.insert(key.to_owned(), Value::String(v.clone()));
        }
    }
    out.insert("prio".into(), n.prio.as_str().into());
    if let Some(content) = &n.content {
        out.insert("content".into(), Value::Object(content.clone()));
    }
    let mut counts = serde_json::Map::new();
    if let Some(unread) = n.counts.unread {
        counts.insert("unread".into(), unread.into());
    }
    if let Some(missed) = n.counts.missed_calls {
        counts.insert("missed_calls".into(), missed.into());
    }
    out.insert("counts".into(), Value::Object(counts));
    out
}

/// A short, stable, non-reversible tag for a pushkey, for logs: 8 hex digits of its SHA-256.
pub fn pushkey_hash(pushkey: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, pushkey.as_bytes());
    hex::encode(&digest.as_ref()[..4])
}

/// `Retry-After` in seconds (the HTTP-date form is not used by push providers), capped at an
/// hour: any wait that long is past every request deadline anyway.
pub(crate) fn retry_after(headers: &::http::HeaderMap) -> Option<Duration> {
    let v = headers.get(::http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(|secs| Duration::from_secs(secs.min(3600)))
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

/// What [`fit_json`] may touch.
pub(crate) struct Fit<'a> {
    /// The size limit of the serialized JSON, in bytes.
    pub limit: usize,
    /// Strings under these keys are never shortened, and these members never dropped.
    pub keep: &'a [&'a str],
    /// Top-level members never dropped (their strings may still be shortened).
    pub pinned: &'a [&'a str],
}

/// Serializes `value` within `fit.limit` bytes, in time linear in its size whatever its shape:
/// first the longest strings are shortened evenly on char boundaries (ending in `…`); if keys,
/// numbers and structure alone are still too large, the largest top-level members are dropped.
/// Only a value whose `keep` parts alone exceed the limit comes back oversized.
pub(crate) fn fit_json(value: &mut Value, fit: &Fit<'_>) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    // Shortening works on exact escaped lengths, so one round normally suffices; the bound only
    // guards against surprises.
    for _ in 0..3 {
        if bytes.len() <= fit.limit || !shorten_strings(value, bytes.len() - fit.limit, fit.keep) {
            break;
        }
        bytes = serde_json::to_vec(value).unwrap_or_default();
    }
    if bytes.len() > fit.limit {
        drop_members(value, bytes.len() - fit.limit, fit);
        bytes = serde_json::to_vec(value).unwrap_or_default();
    }
    bytes
}

/// Bytes `c` takes inside a JSON string as serde_json writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

fn escaped_str_len(s: &str) -> usize {
    s.chars().map(escaped_len).sum()
}

/// Cuts `s` so its escaped form takes at most `max` bytes, ending in `…` when there is room.
fn truncate_escaped(s: &mut String, max: usize) {
    const ELLIPSIS: char = '…';
    if escaped_str_len(s) <= max {
        return;
    }
    let budget = max.saturating_sub(ELLIPSIS.len_utf8());
    let mut used = 0;
    let mut cut = 0;
    for (i, c) in s.char_indices() {
        if used + escaped_len(c) > budget {
            break;
        }
        used += escaped_len(c);
        cut = i + c.len_utf8();
    }
    s.truncate(cut);
    if max >= ELLIPSIS.len_utf8() {
        s.push(ELLIPSIS);
    }
}

/// Shortens the longest unkept strings to a common cap chosen so that at least `over` bytes
/// are saved. Returns false when there was nothing left to shorten.
fn shorten_strings(value: &mut Value, over: usize, keep: &[&str]) -> bool {
    let mut strings: Vec<&mut String> = Vec::new();
    let mut stack: Vec<&mut Value> = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if !s.is_empty() => strings.push(s),
            Value::Array(items) => stack.extend(items.iter_mut()),
            Value::Object(map) => stack.extend(
                map.iter_mut().filter(|(k, _)| !keep.contains(&k.as_str())).map(|(_, v)| v),
            ),
            _ => {}
        }
    }
    if strings.is_empty() {
        return false;
    }
    let lens: Vec<usize> = strings.iter().map(|s| escaped_str_len(s)).collect();
    let saved_at = |cap: usize| lens.iter().map(|&l| l.saturating_sub(cap)).sum::<usize>();
    // The largest cap that still saves enough: binary search, as savings fall as the cap rises.
    let (mut lo, mut hi) = (0usize, lens.iter().copied().max().unwrap_or(0));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if saved_at(mid) >= over { lo = mid } else { hi = mid - 1 }
    }
    for (s, len) in strings.into_iter().zip(lens) {
        if len > lo {
            truncate_escaped(s, lo);
        }
    }
    true
}

/// Removes the largest unkept top-level members of an object until `over` bytes are gone.
fn drop_members(value: &mut Value, over: usize, fit: &Fit<'_>) {
    let Value::Object(map) = value else { return };
    let mut sizes: Vec<(usize, String)> = map
        .iter()
        .filter(|(k, _)| !fit.keep.contains(&k.as_str()) && !fit.pinned.contains(&k.as_str()))
        .map(|(k, v)| {
            (escaped_str_len(k) + 4 + serde_json::to_vec(v).map_or(0, |b| b.len()), k.clone())
        })
        .collect();
    sizes.sort_unstable_by_key(|(size, _)| std::cmp::Reverse(*size));
    let mut removed = 0;
    for (size, key) in sizes {
        if removed >= over {
            break;
        }
        map.remove(&key);
        removed += size;
    }
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
        let out = fit_json(&mut v, &Fit { limit: 1000, keep: &["event_id"], pinned: &[] });
        assert!(out.len() <= 1000);
        assert_eq!(v["event_id"].as_str().unwrap().len(), 300);
        assert_eq!(v["b"], "short");
        assert!(v["a"].as_str().unwrap().ends_with('…'));
    }

    #[test]
    fn fit_json_handles_escaped_and_multibyte_text() {
        let mut v = json!({"a": "\"\u{1F600}\n".repeat(2000)});
        let out = fit_json(&mut v, &Fit { limit: 4096, keep: &[], pinned: &[] });
        assert!(out.len() <= 4096, "{}", out.len());
        assert!(serde_json::from_slice::<Value>(&out).is_ok());
    }

    #[test]
    fn fit_json_shortens_evenly_and_exactly() {
        let mut v = json!({"a": "a".repeat(3000), "b": "b".repeat(3000), "c": "tiny"});
        let out = fit_json(&mut v, &Fit { limit: 4096, keep: &[], pinned: &[] });
        assert!(out.len() <= 4096 && out.len() > 4000, "{}", out.len());
        let (a, b) = (v["a"].as_str().unwrap().len(), v["b"].as_str().unwrap().len());
        assert!(a.abs_diff(b) <= 3, "{a} vs {b}");
        assert_eq!(v["c"], "tiny");
    }

    #[test]
    fn fit_json_drops_members_when_keys_alone_are_too_big() {
        // 20,000 members: quadratic work would not finish in any reasonable time.
        let mut map = serde_json::Map::new();
        for i in 0..20_000 {
            map.insert(format!("content_field_{i}"), json!("v"));
        }
        map.insert("event_id".into(), json!("$keep"));
        let mut v = Value::Object(map);
        let out = fit_json(&mut v, &Fit { limit: 4096, keep: &["event_id"], pinned: &[] });
        assert!(out.len() <= 4096, "{}", out.len());
        assert_eq!(v["event_id"], "$keep");
    }

    #[test]
    fn pushkey_hash_is_short_and_stable() {
        assert_eq!(pushkey_hash("abc"), pushkey_hash("abc"));
        assert_eq!(pushkey_hash("abc").len(), 8);
        assert_ne!(pushkey_hash("abc"), pushkey_hash("abd"));
    }
}
