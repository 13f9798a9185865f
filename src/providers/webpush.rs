//! WebPush: RFC 8030 delivery to the push service at each device's `data.endpoint`, with the
//! payload encrypted for the browser (RFC 8291 `aes128gcm`) and the
//! request signed with the app's VAPID key (RFC 8292: an ES256 JWT signed with `ring`).
//!
//! The message key comes from an ephemeral ECDH with the browser's key and HKDF, both with
//! `ring` (about a quarter of the cost of the pure-Rust curve `web-push-native` uses: measured
//! in `benches/payloads.rs`); `ece-native`, the content-coding layer under `web-push-native`,
//! writes the `aes128gcm` record.
//!
//! A device is a browser push subscription: the pushkey is its `p256dh` public key and
//! `data.auth` its authentication secret (both base64url, as `PushSubscription.getKey` gives
//! them); without `auth` nothing can be encrypted, so the pushkey is rejected. The endpoint is
//! vetted by [`super::endpoint`] before any connection: herald is never an open proxy into the
//! operator's network.
//!
//! Never logs the endpoint URL (it is a bearer capability, like a pushkey), the subscription
//! keys, the VAPID key or a JWT.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::Full;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};

use super::endpoint::{Checked, EndpointClient, Size, is_absolute_url};
use super::{AppLabels, Fit, Outcome, Skip, fit_json, notification_fields};
use crate::config::{ProxyConfig, VapidKey, WebPushConfig};
use crate::metrics::Metrics;
use crate::notification::{Device, Notification, Prio};

/// The largest request body a push service must accept (RFC 8030 §7.2).
pub const MAX_BODY: usize = 4096;
/// What `aes128gcm` adds to the plaintext in one record: a header of 86 bytes (salt 16, record
/// size 4, key id length 1, key id 65), the padding delimiter and the 16-byte tag.
pub const OVERHEAD: usize = 86 + 1 + 16;
/// The plaintext JSON limit, so the encrypted body stays within [`MAX_BODY`].
pub const MAX_PAYLOAD: usize = MAX_BODY - OVERHEAD;
/// The plaintext limit of the one re-send after a push service refused a message as too large.
pub const SHORTENED_PAYLOAD: usize = 1024;
/// Never shortened: the client needs them intact to fetch the event.
const PROTECTED: &[&str] = &["event_id", "room_id"];
/// How long a VAPID JWT is valid (RFC 8292 allows at most 24 hours).
const JWT_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// A cached JWT is re-signed once it is this old, so every JWT sent has hours left.
const JWT_REUSE: Duration = Duration::from_secs(60 * 60);
/// Push service origins whose JWTs are cached; past this the cache starts over.
const MAX_CACHED_JWTS: usize = 1024;

/// A push ready to encrypt and send (and re-send on retry).
pub struct WebPushRequest {
    endpoint: String,
    /// The browser's public key, uncompressed (65 bytes).
    ua_public: Vec<u8>,
    auth: [u8; 16],
    /// The plaintext JSON, kept to shorten it after a 413.
    payload: Value,
    /// `payload` serialized within [`MAX_PAYLOAD`].
    plaintext: Vec<u8>,
    prio: Prio,
    topic: Option<String>,
}

impl std::fmt::Debug for WebPushRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The endpoint is a capability URL and the keys are the subscription's secrets.
        f.debug_struct("WebPushRequest")
            .field("plaintext_bytes", &self.plaintext.len())
            .field("prio", &self.prio)
            .field("topic", &self.topic.is_some())
            .finish()
    }
}

/// One WebPush app.
pub struct WebPush {
    endpoints: EndpointClient,
    vapid: Vapid,
}

impl WebPush {
    pub fn new(
        config: &WebPushConfig,
        proxy: Option<&ProxyConfig>,
        labels: AppLabels,
        metrics: Arc<Metrics>,
    ) -> Result<WebPush, String> {
        Ok(WebPush {
            endpoints: EndpointClient::new(&config.endpoints, proxy, labels, metrics)?,
            vapid: Vapid::new(&config.vapid, &config.vapid_subject)?,
        })
    }

    pub fn prepare(&self, n: &Notification, d: &Device) -> Result<WebPushRequest, Skip> {
        let data = d.data.as_ref();
        let flag = |name| data.and_then(|m| m.get(name)).and_then(Value::as_bool) == Some(true);
        let ua_public = decode_b64(&d.pushkey)
            .and_then(|bytes| p256::PublicKey::from_sec1_bytes(&bytes).ok())
            .map(|key| {
                use p256::elliptic_curve::sec1::ToEncodedPoint as _;
                key.to_encoded_point(false).as_bytes().to_vec()
            })
            .ok_or_else(|| {
                Skip::BadPushkey("pushkey is not a base64url P-256 public key (p256dh)".into())
            })?;
        let auth = match data.and_then(|m| m.get("auth")) {
            None => return Err(Skip::BadPushkey("data.auth is missing".into())),
            Some(v) => v
                .as_str()
                .and_then(decode_b64)
                .and_then(|a| <[u8; 16]>::try_from(a).ok())
                .ok_or_else(|| {
                Skip::BadPushkey("data.auth is not a base64url 16-byte secret".into())
            })?,
        };
        let endpoint = match data.and_then(|m| m.get("endpoint")).and_then(Value::as_str) {
            Some(url) if is_absolute_url(url) => url,
            _ => return Err(Skip::BadPushkey("data.endpoint is not an absolute URL".into())),
        };
        if flag("events_only") && n.event_id.is_none() {
            return Err(Skip::NothingToSend);
        }
        let mut payload = build_payload(n, d);
        let plaintext = fit(&mut payload, MAX_PAYLOAD);
        let topic = match &n.room_id {
            Some(room) if flag("only_last_per_room") => Some(topic(room)),
            _ => None,
        };
        Ok(WebPushRequest {
            endpoint: endpoint.to_owned(),
            ua_public,
            auth,
            payload,
            plaintext,
            prio: n.prio,
            topic,
        })
    }

    pub async fn send(&self, r: &WebPushRequest) -> Outcome {
        let build = |checked: &Checked, size| self.request(r, checked, size);
        self.endpoints.post(&r.endpoint, r.prio, build).await
    }

    /// Encrypts `r` (shortened on [`Size::Shortened`]) into a signed request for `checked`.
    fn request(
        &self,
        r: &WebPushRequest,
        checked: &Checked,
        size: Size,
    ) -> Result<Request<Full<Bytes>>, String> {
        let plaintext = match size {
            Size::Full => r.plaintext.clone(),
            Size::Shortened => fit(&mut r.payload.clone(), SHORTENED_PAYLOAD),
        };
        let body = encrypt(plaintext, &r.ua_public, &r.auth)?;
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(checked.uri.clone())
            .header(http::header::AUTHORIZATION, self.vapid.authorization(&origin(&checked.uri))?)
            .header(http::header::CONTENT_ENCODING, "aes128gcm")
            .header(http::header::CONTENT_TYPE, "application/octet-stream");
        if let Some(topic) = &r.topic {
            builder = builder.header("topic", topic);
        }
        builder.body(Full::new(body.into())).map_err(|e| format!("cannot build request: {e}"))
    }
}

/// Encrypts `plaintext` for a browser (RFC 8291 §3): a fresh key pair per message, the shared
/// secret mixed with the subscription's `auth` into the input key, then one `aes128gcm` record
/// whose header names the fresh public key.
pub fn encrypt(plaintext: Vec<u8>, ua_public: &[u8], auth: &[u8; 16]) -> Result<Vec<u8>, String> {
    use ring::agreement::{ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
    use ring::hkdf::{HKDF_SHA256, KeyType, Salt};
    use ring::rand::{SecureRandom as _, SystemRandom};

    /// HKDF output lengths are types in ring.
    struct Len(usize);
    impl KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let failed = |what: &str| format!("cannot encrypt the message ({what})");
    let rng = SystemRandom::new();
    let ephemeral =
        EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| failed("key generation"))?;
    let as_public = ephemeral.compute_public_key().map_err(|_| failed("key generation"))?;
    let mut ikm = [0u8; 32];
    agree_ephemeral(ephemeral, &UnparsedPublicKey::new(&ECDH_P256, ua_public), |shared| {
        let info: [&[u8]; 3] = [b"WebPush: info\0", ua_public, as_public.as_ref()];
        Salt::new(HKDF_SHA256, auth)
            .extract(shared)
            .expand(&info, Len(ikm.len()))
            .and_then(|okm| okm.fill(&mut ikm))
    })
    .map_err(|_| failed("key agreement"))?
    .map_err(|_| failed("key derivation"))?;
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(|_| failed("random salt"))?;
    // One record, and RFC 8291 §4 wants `rs` greater than plaintext, delimiter and tag: 4096
    // fits every message herald sends (the last record is not padded up to it).
    ece_native::encrypt(ikm, salt, as_public.as_ref(), std::iter::once(plaintext), MAX_BODY as u32)
        .map_err(|e| failed(&e.to_string()))
}

/// The decrypted JSON a browser's service worker receives: the device's `default_payload`,
/// then the event's fields, then `counts` (DESIGN §3).
pub fn build_payload(n: &Notification, d: &Device) -> Value {
    let mut payload = d.default_payload().cloned().unwrap_or_default();
    payload.extend(notification_fields(n));
    let membership = n.content.as_ref().and_then(|c| c.get("membership")).and_then(Value::as_str);
    if let Some(m) = membership {
        payload.insert("membership".into(), m.into());
    }
    Value::Object(payload)
}

/// The plaintext one device gets: [`build_payload`] serialized within [`MAX_PAYLOAD`].
pub fn fitted_payload(n: &Notification, d: &Device) -> Vec<u8> {
    fit(&mut build_payload(n, d), MAX_PAYLOAD)
}

/// Serializes `payload` within `limit` bytes, shortening content first.
fn fit(payload: &mut Value, limit: usize) -> Vec<u8> {
    fit_json(payload, &Fit { limit, keep: PROTECTED, pinned: &["counts", "prio"] })
}

/// The `Topic` for a room: 32 base64url characters (RFC 8030 §5.4's limit) of its SHA-256, so
/// a push service keeps only the newest undelivered message per room.
fn topic(room_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, room_id.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest.as_ref()[..24])
}

/// Base64url or standard base64, padded or not: clients differ in what they send.
fn decode_b64(text: &str) -> Option<Vec<u8>> {
    let normalized: String = text
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    URL_SAFE_NO_PAD.decode(normalized).ok()
}

/// `scheme://host[:port]`, the JWT's audience (RFC 8292 §2): lower-case, the port only when not
/// the scheme's default.
fn origin(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("https");
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    match uri.port_u16() {
        Some(443) if scheme == "https" => format!("{scheme}://{host}"),
        Some(80) if scheme == "http" => format!("{scheme}://{host}"),
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

/// Signs VAPID JWTs and caches one per push service origin.
struct Vapid {
    key: EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    public_b64: String,
    subject: String,
    /// origin → (`Authorization` value, when it was signed).
    cache: Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

impl Vapid {
    fn new(key: &VapidKey, subject: &str) -> Result<Vapid, String> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            key.private_scalar(),
            key.public_point(),
            &rng,
        )
        .map_err(|_| "vapid_private_key_file: not a usable P-256 key pair".to_owned())?;
        Ok(Vapid {
            key: pair,
            rng,
            public_b64: key.public_b64(),
            subject: subject.to_owned(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// `vapid t=<JWT>, k=<public key>` for a push service at `origin`.
    fn authorization(&self, origin: &str) -> Result<HeaderValue, String> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((value, signed)) = cache.get(origin)
            && signed.elapsed() < JWT_REUSE
        {
            return Ok(value.clone());
        }
        if cache.len() >= MAX_CACHED_JWTS {
            cache.clear();
        }
        let jwt = self.sign(origin)?;
        let mut value = HeaderValue::from_str(&format!("vapid t={jwt}, k={}", self.public_b64))
            .map_err(|_| "the VAPID header is not a valid header value".to_owned())?;
        value.set_sensitive(true);
        cache.insert(origin.to_owned(), (value.clone(), Instant::now()));
        Ok(value)
    }

    fn sign(&self, audience: &str) -> Result<String, String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let claims =
            json!({ "aud": audience, "exp": (now + JWT_LIFETIME).as_secs(), "sub": self.subject });
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let signing_input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        // Signing fails only if the system RNG does.
        let signature = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| "cannot sign the VAPID JWT (system RNG failed)".to_owned())?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::Counts;

    fn subscription() -> (String, String) {
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let public = secret.public_key().to_encoded_point(false);
        (URL_SAFE_NO_PAD.encode(public.as_bytes()), URL_SAFE_NO_PAD.encode([7u8; 16]))
    }

    fn device(pushkey: &str, data: Value) -> Device {
        Device {
            app_id: "web".into(),
            pushkey: pushkey.into(),
            data: data.as_object().cloned(),
            ..Default::default()
        }
    }

    #[test]
    fn payload_carries_event_fields_counts_and_defaults() {
        let n = Notification {
            event_id: Some("$e".into()),
            room_id: Some("!r".into()),
            event_type: Some("m.room.member".into()),
            prio: Prio::Low,
            counts: Counts { unread: Some(3), missed_calls: None },
            content: json!({"membership": "invite"}).as_object().cloned(),
            ..Default::default()
        };
        let d = device("k", json!({"default_payload": {"aps": 1, "event_id": "overridden"}}));
        let p = build_payload(&n, &d);
        assert_eq!(p["event_id"], "$e");
        assert_eq!(p["aps"], 1);
        assert_eq!(p["membership"], "invite");
        assert_eq!(p["prio"], "low");
        assert_eq!(p["counts"], json!({"unread": 3}));
    }

    #[test]
    fn long_content_is_shortened_within_the_limit() {
        let n = Notification {
            event_id: Some("$e".repeat(100)),
            content: json!({"body": "é".repeat(5000)}).as_object().cloned(),
            ..Default::default()
        };
        let mut p = build_payload(&n, &device("k", json!({})));
        assert!(fit(&mut p, MAX_PAYLOAD).len() <= MAX_PAYLOAD);
        assert_eq!(p["event_id"], "$e".repeat(100));
        assert!(fit(&mut p, SHORTENED_PAYLOAD).len() <= SHORTENED_PAYLOAD);
    }

    fn provider() -> WebPush {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let config = crate::config::EndpointsConfig {
            allowed_endpoints: vec![],
            allow_internal_endpoints: false,
            ttl: Duration::from_secs(60),
            extra_roots: vec![],
            max_concurrency: 4,
            max_concurrency_per_host: 2,
        };
        let config = WebPushConfig {
            vapid: VapidKey::from_pem(pem.serialize_pem().as_bytes()).unwrap(),
            vapid_subject: "mailto:ops@example.com".into(),
            endpoints: config,
        };
        let metrics = Arc::new(Metrics::new());
        WebPush::new(&config, None, metrics.app_labels("web", "webpush"), metrics).unwrap()
    }

    #[test]
    fn prepare_rejects_unusable_subscriptions() {
        let p = provider();
        let (key, auth) = subscription();
        let n = Notification { event_id: Some("$e".into()), ..Default::default() };
        let ok = json!({"endpoint": "https://push.example.org/x", "auth": auth});
        assert!(p.prepare(&n, &device(&key, ok.clone())).is_ok());
        for (pushkey, data, why) in [
            (key.as_str(), json!({"endpoint": "https://push.example.org/x"}), "data.auth"),
            (key.as_str(), json!({"endpoint": "https://p.example/x", "auth": "AAAA"}), "data.auth"),
            (key.as_str(), json!({"auth": auth}), "data.endpoint"),
            (key.as_str(), json!({"endpoint": "/relative", "auth": auth}), "data.endpoint"),
            ("not-a-key", ok.clone(), "p256dh"),
            (&key[..20], ok.clone(), "p256dh"),
        ] {
            match p.prepare(&n, &device(pushkey, data)) {
                Err(Skip::BadPushkey(reason)) => assert!(reason.contains(why), "{reason}"),
                other => panic!("expected a rejection naming {why}, got {other:?}"),
            }
        }
        // Standard base64 with padding, as some clients send it, is read too.
        let standard =
            base64::engine::general_purpose::STANDARD.encode(URL_SAFE_NO_PAD.decode(&key).unwrap());
        assert!(p.prepare(&n, &device(&standard, ok.clone())).is_ok());
        // events_only skips badge updates, not events.
        let events_only =
            json!({"endpoint": "https://p.example/x", "auth": auth, "events_only": true});
        let badge = Notification {
            counts: Counts { unread: Some(1), missed_calls: None },
            ..Default::default()
        };
        assert!(matches!(
            p.prepare(&badge, &device(&key, events_only.clone())),
            Err(Skip::NothingToSend)
        ));
        assert!(p.prepare(&n, &device(&key, events_only)).is_ok());
    }

    #[test]
    /// A round trip through `web-push-native`'s decryption (which shares `ece-native`'s record
    /// code); the fake push service's decryption, checked on RFC 8291's example, is the
    /// independent check of the integration tests.
    fn encryption_round_trips_through_web_push_native() {
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        let browser = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let public = browser.public_key().to_encoded_point(false);
        let auth = [9u8; 16];
        let message = br#"{"event_id":"$e"}"#.to_vec();
        let body = encrypt(message.clone(), public.as_bytes(), &auth).unwrap();
        assert_eq!(body.len(), message.len() + OVERHEAD);
        let web_auth = web_push_native::Auth::clone_from_slice(&auth);
        assert_eq!(web_push_native::decrypt(body.clone(), &browser, &web_auth).unwrap(), message);
        // A fresh key and salt per message: the same plaintext never encrypts the same way.
        assert_ne!(encrypt(message, public.as_bytes(), &auth).unwrap(), body);
        assert!(encrypt(vec![1], &[4; 65], &auth).is_err(), "not a point on the curve");
    }

    #[test]
    fn topic_is_per_room_and_within_rfc_limits() {
        let a = topic("!a:example.org");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(a, topic("!a:example.org"));
        assert_ne!(a, topic("!b:example.org"));
    }

    #[test]
    fn origin_drops_path_and_default_ports() {
        let o = |u: &str| origin(&u.parse().unwrap());
        assert_eq!(o("https://push.example.org/wpush/v2/abc?x=1"), "https://push.example.org");
        assert_eq!(o("https://push.example.org:443/x"), "https://push.example.org");
        assert_eq!(o("https://127.0.0.1:8443/x"), "https://127.0.0.1:8443");
        assert_eq!(o("https://Push.Example.ORG/x"), "https://push.example.org");
        assert_eq!(o("http://[::1]:80/x"), "http://[::1]");
    }

    #[test]
    fn vapid_jwt_verifies_and_is_reused_per_origin() {
        let p = provider();
        let value = p.vapid.authorization("https://push.example.org").unwrap();
        assert!(value.is_sensitive());
        let text = value.to_str().unwrap();
        let (t, k) = text.strip_prefix("vapid t=").unwrap().split_once(", k=").unwrap();
        assert_eq!(k, p.vapid.public_b64);
        let (signing_input, signature) = t.rsplit_once('.').unwrap();
        let public = URL_SAFE_NO_PAD.decode(k).unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public)
            .verify(signing_input.as_bytes(), &URL_SAFE_NO_PAD.decode(signature).unwrap())
            .expect("signature verifies");
        let claims: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD.decode(signing_input.split_once('.').unwrap().1).unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], "https://push.example.org");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        assert_eq!(p.vapid.authorization("https://push.example.org").unwrap(), value);
        assert_ne!(p.vapid.authorization("https://other.example.org").unwrap(), value);
    }
}
