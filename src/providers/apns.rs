//! Apple Push Notification service, HTTP/2 provider API (`POST /3/device/{token}`).
//!
//! Auth is an ES256 provider token (JWT signed with `ring` from the team's `.p8` key, re-signed
//! every [`TOKEN_LIFETIME`] and at once after `ExpiredProviderToken`) or a TLS client
//! certificate. All devices of an app share one pooled HTTP/2 connection; hyper reconnects after
//! GOAWAY or a reset. Payloads follow what Sygnal-era clients (Element iOS) expect: `loc-key`
//! alerts for full notifications, `default_payload` + ids for `event_id_only`, a bare badge for
//! count updates; always within Apple's 4096-byte limit.
//!
//! Payload building and response mapping are pure functions. Never logs the JWT, the key, or a
//! full device token.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use super::http::{ClientIdentity, HttpClient, Protocol, exchange};
use super::{AppLabels, Fit, Outcome, Skip, fit_json, retry_after};
use crate::config::{ApnsAuth, ApnsConfig, ProxyConfig};
use crate::metrics::Metrics;
use crate::notification::{Device, Notification, Prio};

/// Apple's limit for a regular notification payload.
pub const MAX_PAYLOAD: usize = 4096;
/// How long a provider token is reused: Apple refuses tokens older than an hour and
/// throttles re-signing more often than every 20 minutes.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(40 * 60);
/// What may be shortened to fit: texts, not ids, not the alert's key or the sound.
const FIT: Fit<'static> = Fit {
    limit: MAX_PAYLOAD,
    keep: &["event_id", "room_id", "loc-key", "sound"],
    pinned: &["aps"],
};
/// How long APNs keeps trying to reach an offline device.
const EXPIRATION: Duration = Duration::from_secs(24 * 3600);

/// A request ready to send (and re-send on retry).
pub struct ApnsRequest {
    /// The device token as APNs wants it in the path (hex when converted).
    token: String,
    payload: Bytes,
    priority: &'static str,
}

impl std::fmt::Debug for ApnsRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsRequest")
            .field("token", &super::pushkey_hash(&self.token))
            .field("payload_bytes", &self.payload.len())
            .field("priority", &self.priority)
            .finish()
    }
}

/// One APNs app.
pub struct Apns {
    client: HttpClient,
    base_url: String,
    topic: HeaderValue,
    push_type: HeaderValue,
    convert_to_hex: bool,
    send_badge_counts: bool,
    signer: Option<TokenSigner>,
    limiter: Semaphore,
    labels: AppLabels,
    metrics: Arc<Metrics>,
}

impl Apns {
    pub fn new(
        config: &ApnsConfig,
        proxy: Option<&ProxyConfig>,
        labels: AppLabels,
        metrics: Arc<Metrics>,
    ) -> Result<Apns, String> {
        let (identity, signer) = match &config.auth {
            ApnsAuth::Token { key_pkcs8, key_id, team_id } => {
                (None, Some(TokenSigner::new(key_pkcs8, key_id, team_id)?))
            }
            ApnsAuth::Certificate { chain, key } => (Some(ClientIdentity { chain, key }), None),
        };
        let client = super::http::client(&config.upstream, proxy, identity, Protocol::Http2Only)?;
        let header = |v: &str, what: &str| {
            HeaderValue::from_str(v)
                .map_err(|_| format!("{what} {v:?} is not a valid header value"))
        };
        Ok(Apns {
            client,
            base_url: config.upstream.base_url.clone(),
            topic: header(&config.topic, "topic")?,
            push_type: header(config.push_type.as_deref().unwrap_or("alert"), "push_type")?,
            convert_to_hex: config.convert_device_token_to_hex,
            send_badge_counts: config.send_badge_counts,
            signer,
            limiter: Semaphore::new(config.max_concurrency),
            labels,
            metrics,
        })
    }

    pub fn prepare(&self, n: &Notification, d: &Device) -> Result<ApnsRequest, Skip> {
        let token = device_token(&d.pushkey, self.convert_to_hex)?;
        let Some(mut payload) = build_payload(n, d, self.send_badge_counts) else {
            return Err(Skip::NothingToSend);
        };
        let payload = Bytes::from(fit(&mut payload));
        let priority = if n.prio == Prio::Low { "5" } else { "10" };
        Ok(ApnsRequest { token, payload, priority })
    }

    pub async fn send(&self, r: &ApnsRequest) -> Outcome {
        let Ok(_permit) = self.limiter.acquire().await else {
            return Outcome::Failed("provider is shutting down".into());
        };
        let jwt = self.signer.as_ref().map(TokenSigner::token);
        let expiration =
            (SystemTime::now() + EXPIRATION).duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/3/device/{}", self.base_url, r.token))
            .header("apns-topic", self.topic.clone())
            .header("apns-push-type", self.push_type.clone())
            .header("apns-priority", r.priority)
            .header("apns-expiration", expiration.as_secs())
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(jwt) = &jwt {
            let Ok(mut bearer) = HeaderValue::from_str(&format!("bearer {jwt}")) else {
                return Outcome::Failed("provider token is not a valid header value".into());
            };
            bearer.set_sensitive(true);
            builder = builder.header(http::header::AUTHORIZATION, bearer);
        }
        let request = match builder.body(Full::new(r.payload.clone())) {
            Ok(req) => req,
            Err(e) => return Outcome::Failed(format!("cannot build request: {e}")),
        };
        let started = Instant::now();
        let answer = match exchange(&self.client, request).await {
            Ok(answer) => answer,
            Err(why) => {
                self.metrics.upstream(&self.labels, "error", started.elapsed());
                return Outcome::Retry { after: None, reason: why };
            }
        };
        self.metrics.upstream(&self.labels, answer.status.as_str(), started.elapsed());
        let (status, body, after) = (answer.status, answer.body, retry_after(&answer.headers));
        let outcome = map_response(status, &body, after);
        if let (Outcome::Retry { .. }, Some(signer), Some(jwt)) = (&outcome, &self.signer, &jwt)
            && reason(&body).as_deref() == Some("ExpiredProviderToken")
        {
            signer.expire(jwt);
        }
        outcome
    }
}

/// Serializes a payload within Apple's 4096 bytes, shortening texts if needed.
pub fn fit(payload: &mut Value) -> Vec<u8> {
    fit_json(payload, &FIT)
}

/// The token as it goes into the request path: APNs wants hex; homeservers usually store the
/// base64 form the iOS SDK hands out, so it is converted when configured.
pub fn device_token(pushkey: &str, convert_to_hex: bool) -> Result<String, Skip> {
    if convert_to_hex {
        let trimmed = pushkey.trim_end_matches('=');
        let bytes = STANDARD_NO_PAD.decode(trimmed).map_err(|_| {
            Skip::BadPushkey("pushkey is not base64 (convert_device_token_to_hex is on)".into())
        })?;
        if bytes.is_empty() {
            return Err(Skip::BadPushkey("pushkey is empty".into()));
        }
        Ok(hex::encode(bytes))
    } else if !pushkey.is_empty() && pushkey.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(pushkey.to_ascii_lowercase())
    } else {
        Err(Skip::BadPushkey("pushkey is not a hex device token".into()))
    }
}

/// The JSON payload for one device, or `None` when there is nothing to show or count.
pub fn build_payload(n: &Notification, d: &Device, send_badge_counts: bool) -> Option<Value> {
    let mut payload: Map<String, Value> = d.default_payload().cloned().unwrap_or_default();
    let badge = (send_badge_counts
        && (n.counts.unread.is_some() || n.counts.missed_calls.is_some()))
    .then(|| n.counts.badge());

    if n.event_id.is_some() && (n.event_type.is_none() || d.event_id_only()) {
        // event_id_only: the app's notification service extension fetches the event itself.
        if let Some(room_id) = &n.room_id {
            payload.insert("room_id".into(), room_id.clone().into());
        }
        if let Some(event_id) = &n.event_id {
            payload.insert("event_id".into(), event_id.clone().into());
        }
        if let Some(unread) = n.counts.unread {
            payload.insert("unread_count".into(), unread.into());
        }
        if let Some(missed) = n.counts.missed_calls {
            payload.insert("missed_calls".into(), missed.into());
        }
        // No `aps.badge`: the app's extension computes it from `unread_count` (DESIGN §3).
        return Some(Value::Object(payload));
    }

    if n.is_badge_only() {
        return badge.map(|b| json!({ "aps": { "badge": b } }));
    }

    let alert = alert(n);
    if alert.is_none() && badge.is_none() {
        return None;
    }
    let aps = aps(&mut payload);
    if let Some((loc_key, loc_args)) = alert {
        aps.insert("alert".into(), json!({ "loc-key": loc_key, "loc-args": loc_args }));
    }
    if let Some(badge) = badge {
        aps.insert("badge".into(), badge.into());
    }
    if let Some(sound) = d.sound() {
        aps.insert("sound".into(), sound.into());
    }
    if let Some(room_id) = &n.room_id {
        payload.insert("room_id".into(), room_id.clone().into());
    }
    if let Some(event_id) = &n.event_id {
        payload.insert("event_id".into(), event_id.clone().into());
    }
    Some(Value::Object(payload))
}

fn aps(payload: &mut Map<String, Value>) -> &mut Map<String, Value> {
    let entry = payload.entry("aps").or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut().expect("made an object above")
}

/// The localisable alert (`loc-key`, `loc-args`) Element iOS's `Localizable.strings` knows.
fn alert(n: &Notification) -> Option<(&'static str, Vec<String>)> {
    let from = n.sender_display_name.clone().or_else(|| n.sender.clone()).unwrap_or_default();
    let room = n.room_name.clone().or_else(|| n.room_alias.clone());
    let content = n.content.as_ref();
    let text = |key: &str| content.and_then(|c| c.get(key)).and_then(Value::as_str);
    let event_type = n.event_type.as_deref()?;
    match event_type {
        "m.room.message" | "m.room.encrypted" => {
            let body = text("body").map(str::to_owned);
            let msgtype = text("msgtype");
            Some(match (msgtype, body, room) {
                (Some("m.image"), Some(b), Some(r)) => {
                    ("IMAGE_FROM_USER_IN_ROOM", vec![from, b, r])
                }
                (Some("m.image"), Some(b), None) => ("IMAGE_FROM_USER", vec![from, b]),
                (Some("m.emote"), Some(b), Some(r)) => {
                    ("ACTION_FROM_USER_IN_ROOM", vec![r, from, b])
                }
                (Some("m.emote"), Some(b), None) => ("ACTION_FROM_USER", vec![from, b]),
                (Some(_), Some(b), Some(r)) => {
                    ("MSG_FROM_USER_IN_ROOM_WITH_CONTENT", vec![from, r, b])
                }
                (Some(_), Some(b), None) => ("MSG_FROM_USER_WITH_CONTENT", vec![from, b]),
                (_, _, Some(r)) => ("MSG_FROM_USER_IN_ROOM", vec![from, r]),
                (_, _, None) => ("MSG_FROM_USER", vec![from]),
            })
        }
        "m.call.invite" => {
            let video = content
                .and_then(|c| c.get("offer"))
                .and_then(|o| o.get("sdp"))
                .and_then(Value::as_str)
                .is_some_and(|sdp| sdp.contains("m=video"));
            Some((if video { "VIDEO_CALL_FROM_USER" } else { "VOICE_CALL_FROM_USER" }, vec![from]))
        }
        "m.room.member" => {
            let invited = n.user_is_target == Some(true) && text("membership") == Some("invite");
            match (invited, room) {
                (true, Some(r)) => Some(("USER_INVITE_TO_NAMED_ROOM", vec![from, r])),
                (true, None) => Some(("USER_INVITE_TO_CHAT", vec![from])),
                (false, _) => Some(("MSG_FROM_USER", vec![from])),
            }
        }
        _ => Some(("MSG_FROM_USER", vec![from])),
    }
}

/// `reason` from an APNs error body.
fn reason(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("reason")?.as_str().map(str::to_owned)
}

/// Maps an APNs answer to an [`Outcome`] (DESIGN §3's table).
pub fn map_response(status: StatusCode, body: &[u8], after: Option<Duration>) -> Outcome {
    let reason = reason(body).unwrap_or_default();
    let described = || format!("APNs {} {}", status.as_u16(), reason).trim_end().to_owned();
    match status.as_u16() {
        200 => Outcome::Delivered,
        410 => Outcome::Rejected(described()),
        400 if matches!(
            reason.as_str(),
            "BadDeviceToken" | "DeviceTokenNotForTopic" | "TopicDisallowed"
        ) =>
        {
            Outcome::Rejected(described())
        }
        403 if reason == "ExpiredProviderToken" => {
            Outcome::Retry { after: Some(Duration::ZERO), reason: described() }
        }
        429 => Outcome::Retry { after, reason: described() },
        500..=599 => Outcome::Retry { after, reason: described() },
        _ => Outcome::Failed(described()),
    }
}

/// Signs and caches the ES256 provider token.
struct TokenSigner {
    key: EcdsaKeyPair,
    header_b64: String,
    team_id: String,
    rng: ring::rand::SystemRandom,
    current: RwLock<Option<(Arc<str>, Instant)>>,
}

impl TokenSigner {
    fn new(pkcs8: &[u8], key_id: &str, team_id: &str) -> Result<TokenSigner, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|_| "key_file: not a P-256 private key".to_owned())?;
        let header = json!({ "alg": "ES256", "kid": key_id });
        Ok(TokenSigner {
            key,
            header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
            team_id: team_id.to_owned(),
            rng,
            current: RwLock::new(None),
        })
    }

    /// The current token, signing a new one when it is older than [`TOKEN_LIFETIME`].
    fn token(&self) -> Arc<str> {
        if let Some((jwt, at)) = &*self.current.read().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < TOKEN_LIFETIME
        {
            return jwt.clone();
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some((jwt, at)) = &*current
            && at.elapsed() < TOKEN_LIFETIME
        {
            return jwt.clone();
        }
        let jwt: Arc<str> = self.sign().into();
        *current = Some((jwt.clone(), Instant::now()));
        jwt
    }

    /// Forgets `used` (APNs said it expired), unless another request already replaced it.
    fn expire(&self, used: &str) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(jwt, _)| &**jwt == used) {
            *current = None;
        }
    }

    fn sign(&self) -> String {
        let iat = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = json!({ "iss": self.team_id, "iat": iat });
        let signing_input =
            format!("{}.{}", self.header_b64, URL_SAFE_NO_PAD.encode(claims.to_string()));
        // Signing with a valid key only fails if the system RNG does; an unsigned token would
        // then be refused by APNs as InvalidProviderToken, which maps to Failed.
        let signature =
            self.key.sign(&self.rng, signing_input.as_bytes()).map(|s| URL_SAFE_NO_PAD.encode(s));
        format!("{signing_input}.{}", signature.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::Counts;

    fn device() -> Device {
        Device { app_id: "a".into(), pushkey: "AAEC".into(), ..Default::default() }
    }

    #[test]
    fn token_conversion() {
        assert_eq!(device_token("AAEC", true).unwrap(), "000102");
        assert_eq!(device_token("AAECAw==", true).unwrap(), "00010203");
        assert!(matches!(device_token("not base64!", true), Err(Skip::BadPushkey(_))));
        assert_eq!(device_token("ABCDEF", false).unwrap(), "abcdef");
        assert!(matches!(device_token("../x", false), Err(Skip::BadPushkey(_))));
    }

    #[test]
    fn counts_only_is_a_bare_badge() {
        let n = Notification {
            counts: Counts { unread: Some(2), missed_calls: Some(1) },
            ..Default::default()
        };
        assert_eq!(build_payload(&n, &device(), true), Some(json!({"aps": {"badge": 3}})));
        assert_eq!(build_payload(&n, &device(), false), None);
    }

    #[test]
    fn message_in_named_room() {
        let n = Notification {
            event_id: Some("$e".into()),
            room_id: Some("!r".into()),
            event_type: Some("m.room.message".into()),
            sender: Some("@bob:x".into()),
            sender_display_name: Some("Bob".into()),
            room_name: Some("Lunch".into()),
            content: Some(
                json!({"msgtype": "m.text", "body": "pizza?"}).as_object().unwrap().clone(),
            ),
            ..Default::default()
        };
        let p = build_payload(&n, &device(), true).unwrap();
        assert_eq!(p["aps"]["alert"]["loc-key"], "MSG_FROM_USER_IN_ROOM_WITH_CONTENT");
        assert_eq!(p["aps"]["alert"]["loc-args"], json!(["Bob", "Lunch", "pizza?"]));
        assert_eq!(p["event_id"], "$e");
        assert!(p["aps"].get("badge").is_none());
    }

    #[test]
    fn response_table() {
        let r = |s: u16, body: &str| {
            map_response(StatusCode::from_u16(s).unwrap(), body.as_bytes(), None)
        };
        assert_eq!(r(200, ""), Outcome::Delivered);
        assert!(matches!(r(410, r#"{"reason":"Unregistered"}"#), Outcome::Rejected(_)));
        for reason in ["BadDeviceToken", "DeviceTokenNotForTopic", "TopicDisallowed"] {
            assert!(matches!(r(400, &format!(r#"{{"reason":"{reason}"}}"#)), Outcome::Rejected(_)));
        }
        assert!(matches!(r(400, r#"{"reason":"PayloadTooLarge"}"#), Outcome::Failed(_)));
        assert!(matches!(r(403, r#"{"reason":"ExpiredProviderToken"}"#), Outcome::Retry { .. }));
        assert!(matches!(r(403, r#"{"reason":"InvalidProviderToken"}"#), Outcome::Failed(_)));
        assert!(matches!(r(429, r#"{"reason":"TooManyRequests"}"#), Outcome::Retry { .. }));
        assert!(matches!(r(503, ""), Outcome::Retry { .. }));
    }
}
