//! A loopback fake of the Web Push service herald's `webpush` provider sends
//! to, the VAPID key helpers its tests need, and the plumbing it shares with
//! the UnifiedPush distributor fake in [`super::fake_unifiedpush`].
//!
//! **[`FakePushService`]** is an RFC 8030 push service (like Mozilla autopush or
//! FCM's web push endpoint). [`FakePushService::subscribe`] plays the browser:
//! it makes a P-256 key pair and a 16-byte auth secret, keeps the private half
//! and hands out the endpoint `{url}/push/{id}` with the public `p256dh`/`auth`.
//! `POST /push/{id}` is checked like a real push service does, in this order:
//!
//! 0. the id: unknown → 404, unsubscribed ([`FakePushService::unsubscribe`]) → 410;
//! 1. `Authorization: vapid t=<JWT>, k=<key>` (RFC 8292): missing or malformed,
//!    a JWT header other than `{"typ":"JWT","alg":"ES256"}` (`typ` optional) or
//!    an ES256 signature `k` does not verify → 401; a `k` other than the VAPID key
//!    the fake was started with → 403; claim `aud` other than this server's origin
//!    (`scheme://ip:port`, as in [`FakePushService::url`]), `exp` not an integer in
//!    (now, now + 24 h], or `sub` other than the expected subject → 401;
//! 2. `TTL` present and a non-negative integer → else 400;
//! 3. `Content-Encoding: aes128gcm` → else 415;
//! 4. a body of at most `max_body` bytes (4096 by default) → else 413;
//! 5. the body decrypts (RFC 8188 `aes128gcm`, a single record, keys per RFC
//!    8291) with the subscription's key and auth secret, and its padding ends in
//!    the last-record delimiter `0x02` → else 400. [`decrypt_aes128gcm`] is
//!    written with ring and p256 alone, independent of the `web-push-native`
//!    crate herald encrypts with.
//!
//! Refusals carry an autopush-like JSON body `{"code":…,"error":…,"message":…}`
//! whose `message` names the failed check. Valid requests get the next scripted
//! [`PushReply`] for their id ([`FakePushService::respond`]) or 201 Created with
//! `Location: /message/N`.
//!
//! Both fakes (this one and
//! [`FakeDistributor`](super::fake_unifiedpush::FakeDistributor)) record every
//! request reaching their route, refused ones too. Requests that pass the
//! checks are counted as in flight until answered (see `max_in_flight`) and
//! wait while the fake is held (`hold`/`release`), for concurrency-limit
//! tests. Both listen on `127.0.0.1:0`, or with `start_on` on
//! another loopback address such as `127.0.0.2`; with TLS they present the test
//! CA's certificate, which is valid for `127.0.0.1` and `localhost` only, and
//! offer ALPN `h2` and `http/1.1`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, StatusCode};
use p256::elliptic_curve::rand_core::{OsRng, RngCore};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use ring::{aead, hkdf};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::server::{
    ConnAction, ConnInfo, FakeServer, Recorder, Scripts, sign_es256_jwt, unix_now,
};
use super::tls::TestCa;

/// The largest body accepted unless changed with `set_max_body` (RFC 8030 §7.2:
/// push services must accept at least 4096 bytes).
pub const DEFAULT_MAX_BODY: usize = 4096;
/// How far ahead a VAPID `exp` may lie (RFC 8292 §2).
const MAX_VAPID_LIFETIME: u64 = 24 * 60 * 60;
/// Bodies are read up to this size; a larger one is refused with 413 at once.
pub(super) const READ_LIMIT: usize = 1 << 20;
/// A test-only SEC1 (`-----BEGIN EC PRIVATE KEY-----`) P-256 key made by openssl.
pub const VAPID_SEC1_PEM: &str = include_str!("../../fixtures/vapid-sec1.pem");

/// A scripted answer for one request that passed the fake's checks.
#[derive(Clone, Debug)]
pub enum PushReply {
    /// Answer `status` (with a JSON error body unless 2xx), plus
    /// `Retry-After: SECS` when `retry_after` is set.
    Status { status: u16, retry_after: Option<u64> },
    /// Wait this long (counted as in flight), then answer 201.
    Delay(Duration),
    /// Reset the TCP connection (RST) without answering.
    Reset,
}

impl PushReply {
    /// Answer `status`, e.g. `PushReply::status(410)`.
    pub fn status(status: u16) -> PushReply {
        PushReply::Status { status, retry_after: None }
    }

    /// Answer `status` with `Retry-After: SECS`, e.g. `PushReply::retry_after(429, 7)`.
    pub fn retry_after(status: u16, secs: u64) -> PushReply {
        PushReply::Status { status, retry_after: Some(secs) }
    }
}

// ---------------------------------------------------------------------------
// FakePushService

/// A browser-like push subscription handed out by [`FakePushService::subscribe`].
#[derive(Clone, Debug)]
pub struct Subscription {
    /// The fake's opaque id for it, the last segment of `endpoint`.
    pub id: String,
    /// `{url}/push/{id}`
    pub endpoint: String,
    /// The public key, a 65-byte uncompressed P-256 point, base64url without padding.
    pub p256dh: String,
    /// The 16-byte auth secret, base64url without padding.
    pub auth: String,
}

/// One request to `POST /push/{id}` as the fake push service saw it.
#[derive(Clone, Debug)]
pub struct RecordedPush {
    pub id: String,
    /// Status the fake answered; 0 for [`PushReply::Reset`].
    pub status: u16,
    pub headers: HeaderMap,
    /// Length of the body as received (encrypted).
    pub body_len: usize,
    /// The decrypted message without padding, when decryption succeeded.
    pub plaintext: Option<Vec<u8>>,
    /// The VAPID JWT claims, once the signature verified (even if a claim was refused).
    pub claims: Option<Value>,
    /// ALPN negotiated on the connection (`Some(b"h2")`), `None` without TLS.
    pub alpn: Option<Vec<u8>>,
    /// Which connection it came on (1 = first accepted).
    pub conn_id: u64,
}

impl RecordedPush {
    /// The plaintext parsed as JSON (`None` if not decrypted or not JSON).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(self.plaintext.as_deref()?).ok()
    }

    /// A request header as a string (`None` if absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `TTL` header as a number of seconds.
    pub fn ttl(&self) -> Option<u64> {
        self.header("ttl")?.parse().ok()
    }

    /// The `Urgency` header (RFC 8030 §5.3).
    pub fn urgency(&self) -> Option<&str> {
        self.header("urgency")
    }

    /// The `Topic` header (RFC 8030 §5.4).
    pub fn topic(&self) -> Option<&str> {
        self.header("topic")
    }
}

/// What the fake keeps of a subscription: the browser's private half.
struct SubscriptionKeys {
    secret: p256::SecretKey,
    auth: [u8; 16],
    gone: bool,
}

struct PushState {
    /// `scheme://ip:port`, the only accepted VAPID `aud`; set right after binding.
    origin: OnceLock<String>,
    vapid_public: Vec<u8>,
    vapid_subject: String,
    subscriptions: Mutex<HashMap<String, SubscriptionKeys>>,
    next_subscription: AtomicU64,
    next_message: AtomicU64,
    common: Common<RecordedPush>,
}

/// A running fake RFC 8030 push service; see the module docs.
pub struct FakePushService {
    server: FakeServer,
    state: Arc<PushState>,
}

impl FakePushService {
    /// Starts on `127.0.0.1:<ephemeral>`, with TLS from `tls` when given. Pushes
    /// must be VAPID-signed by the key whose public half is `vapid_public_b64`
    /// (base64url, uncompressed point) with `sub` = `vapid_subject`.
    pub async fn start(
        tls: Option<&TestCa>,
        vapid_public_b64: &str,
        vapid_subject: &str,
    ) -> FakePushService {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), tls, vapid_public_b64, vapid_subject).await
    }

    /// Like [`FakePushService::start`] but on `ip` (e.g. `127.0.0.2`).
    pub async fn start_on(
        ip: IpAddr,
        tls: Option<&TestCa>,
        vapid_public_b64: &str,
        vapid_subject: &str,
    ) -> FakePushService {
        let state = Arc::new(PushState {
            origin: OnceLock::new(),
            vapid_public: decode_b64(vapid_public_b64).expect("VAPID public key is base64url"),
            vapid_subject: vapid_subject.to_owned(),
            subscriptions: Mutex::new(HashMap::new()),
            next_subscription: AtomicU64::new(1),
            next_message: AtomicU64::new(1),
            common: Common::new(),
        });
        let router = Router::new()
            .route("/push/{id}", post(handle_push))
            .fallback(|| async { error_response(404, "no such resource", None) })
            .with_state(state.clone());
        let server = FakeServer::start_on(SocketAddr::new(ip, 0), router, server_tls(tls)).await;
        state.origin.set(server.url()).expect("origin set once");
        FakePushService { server, state }
    }

    /// `http://IP:PORT` or `https://IP:PORT`, also the VAPID `aud` it expects.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The underlying server (connection counters, shutdown).
    pub fn server(&self) -> &FakeServer {
        &self.server
    }

    /// Creates a new subscription, as a browser's `pushManager.subscribe` would.
    pub fn subscribe(&self) -> Subscription {
        let secret = p256::SecretKey::random(&mut OsRng);
        let mut auth = [0u8; 16];
        OsRng.fill_bytes(&mut auth);
        let mut tag = [0u8; 8];
        OsRng.fill_bytes(&mut tag);
        let n = self.state.next_subscription.fetch_add(1, Ordering::SeqCst);
        let id = format!("sub{n}-{}", hex::encode(tag));
        let subscription = Subscription {
            endpoint: format!("{}/push/{id}", self.url()),
            p256dh: URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes()),
            auth: URL_SAFE_NO_PAD.encode(auth),
            id: id.clone(),
        };
        let keys = SubscriptionKeys { secret, auth, gone: false };
        self.state.subscriptions.lock().unwrap().insert(id, keys);
        subscription
    }

    /// Ends subscription `id`: later pushes to it get 410 Gone.
    pub fn unsubscribe(&self, id: &str) {
        if let Some(keys) = self.state.subscriptions.lock().unwrap().get_mut(id) {
            keys.gone = true;
        }
    }

    /// Largest accepted body in bytes (default [`DEFAULT_MAX_BODY`]); larger gets 413.
    pub fn set_max_body(&self, bytes: usize) {
        self.state.common.max_body.store(bytes, Ordering::SeqCst);
    }

    /// Queues `replies` (FIFO) for pushes to subscription `id`; once used up,
    /// pushes get 201 again. Refused requests do not consume a reply.
    pub fn respond(&self, id: &str, replies: Vec<PushReply>) {
        self.state.common.scripts.push(id, replies);
    }

    /// Scripted replies not consumed yet.
    pub fn pending_replies(&self) -> usize {
        self.state.common.scripts.pending()
    }

    /// Every request recorded so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedPush> {
        self.state.common.requests.all()
    }

    pub fn request_count(&self) -> usize {
        self.state.common.requests.len()
    }

    /// Waits until at least `n` requests were recorded (panics after `timeout`).
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedPush> {
        self.state.common.requests.wait_for(n, timeout, "Web Push").await
    }

    pub fn clear_requests(&self) {
        self.state.common.requests.clear();
    }

    /// Valid requests being handled right now (held, delayed or being answered).
    pub fn in_flight(&self) -> usize {
        self.state.common.gate.in_flight()
    }

    /// The most valid requests that were ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.common.gate.max_in_flight()
    }

    /// Waits until at least `n` requests are in flight (panics after `timeout`).
    pub async fn wait_for_in_flight(&self, n: usize, timeout: Duration) {
        self.state.common.gate.wait_for(n, timeout).await;
    }

    /// Makes every valid request from now on wait, in flight, until [`Self::release`].
    pub fn hold(&self) {
        self.state.common.gate.hold();
    }

    /// Lets held requests and all later ones go.
    pub fn release(&self) {
        self.state.common.gate.release();
    }
}

async fn handle_push(
    State(state): State<Arc<PushState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let conn = parts.extensions.get::<ConnInfo>();
    let mut record = RecordedPush {
        id: id.clone(),
        status: 0,
        headers: parts.headers.clone(),
        body_len: 0,
        plaintext: None,
        claims: None,
        alpn: conn.and_then(|c| c.alpn.clone()),
        conn_id: conn.map_or(0, |c| c.id),
    };
    let checked = match axum::body::to_bytes(body, READ_LIMIT).await {
        Ok(raw) => {
            record.body_len = raw.len();
            check_push(&state, &id, &parts.headers, &raw, &mut record)
        }
        Err(_) => Err(Refusal(413, format!("body larger than {READ_LIMIT} bytes"))),
    };
    if let Err(Refusal(status, message)) = checked {
        record.status = status;
        state.common.requests.push(record);
        return error_response(status, &message, None);
    }
    let ttl = parts.headers.get("ttl").cloned();
    let created = || {
        let n = state.next_message.fetch_add(1, Ordering::SeqCst);
        let mut response = created_response();
        response
            .headers_mut()
            .insert(http::header::LOCATION, format!("/message/{n}").parse().expect("header value"));
        // RFC 8030 §5.2: the push service answers with the TTL it applies.
        if let Some(ttl) = ttl {
            response.headers_mut().insert("ttl", ttl);
        }
        response
    };
    state.common.answer(&id, |status| RecordedPush { status, ..record }, created).await
}

/// The push service's checks, in the order of the module docs.
fn check_push(
    state: &PushState,
    id: &str,
    headers: &HeaderMap,
    raw: &[u8],
    record: &mut RecordedPush,
) -> Result<(), Refusal> {
    let (secret, auth) = match state.subscriptions.lock().unwrap().get(id) {
        None => return Err(refuse(404, "no such subscription")),
        Some(keys) if keys.gone => return Err(refuse(410, "subscription has been removed")),
        Some(keys) => (keys.secret.clone(), keys.auth),
    };
    let origin = state.origin.get().expect("origin");
    verify_vapid(headers, origin, &state.vapid_public, &state.vapid_subject, &mut record.claims)?;

    let ttl = headers.get("ttl").ok_or_else(|| refuse(400, "missing TTL header"))?;
    let ttl_ok = ttl.to_str().is_ok_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
    if !ttl_ok {
        return Err(refuse(400, "TTL must be a non-negative integer"));
    }
    let encoding = headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    if !encoding.is_some_and(|e| e.trim().eq_ignore_ascii_case("aes128gcm")) {
        return Err(refuse(415, "Content-Encoding must be aes128gcm"));
    }
    let max_body = state.common.max_body.load(Ordering::SeqCst);
    if raw.len() > max_body {
        return Err(refuse(413, format!("body of {} bytes exceeds {max_body}", raw.len())));
    }
    let plaintext = decrypt_aes128gcm(raw, &secret, &auth)
        .map_err(|e| refuse(400, format!("cannot decrypt the body: {e}")))?;
    record.plaintext = Some(plaintext);
    Ok(())
}

/// Checks `Authorization: vapid t=<JWT>, k=<key>` (RFC 8292). Stores the claims
/// in `claims` as soon as the signature verified.
fn verify_vapid(
    headers: &HeaderMap,
    origin: &str,
    expected_key: &[u8],
    subject: &str,
    claims: &mut Option<Value>,
) -> Result<(), Refusal> {
    let unauthorized = |message: &str| refuse(401, message);
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization header"))?;
    let (jwt, key_b64) = value
        .to_str()
        .ok()
        .and_then(parse_vapid_authorization)
        .ok_or_else(|| unauthorized("Authorization is not `vapid t=<JWT>, k=<key>`"))?;
    let mut parts = jwt.split('.');
    let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unauthorized("VAPID JWT does not have three segments"));
    };
    let header = decode_json(header_b64).ok_or_else(|| unauthorized("VAPID JWT header"))?;
    if header["alg"] != "ES256" {
        return Err(unauthorized("VAPID JWT alg must be ES256"));
    }
    if header.get("typ").is_some_and(|typ| typ != "JWT") {
        return Err(unauthorized("VAPID JWT typ must be JWT"));
    }
    let key = decode_b64(key_b64).ok_or_else(|| unauthorized("VAPID k is not base64url"))?;
    let signature =
        decode_b64(sig_b64).ok_or_else(|| unauthorized("VAPID JWT signature is not base64url"))?;
    let signed = &jwt[..header_b64.len() + 1 + claims_b64.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| unauthorized("VAPID JWT signature does not verify with k"))?;
    let payload = decode_json(claims_b64)
        .filter(Value::is_object)
        .ok_or_else(|| unauthorized("VAPID JWT claims are not a JSON object"))?;
    *claims = Some(payload.clone());

    if key != expected_key {
        return Err(refuse(403, "VAPID k does not match the subscription's applicationServerKey"));
    }
    if payload["aud"] != origin {
        return Err(refuse(401, format!("VAPID aud {} is not {origin}", payload["aud"])));
    }
    let exp = payload["exp"].as_u64().ok_or_else(|| unauthorized("VAPID exp not an integer"))?;
    let now = unix_now();
    if exp <= now {
        return Err(unauthorized("VAPID exp has passed"));
    }
    if exp > now + MAX_VAPID_LIFETIME {
        return Err(unauthorized("VAPID exp is more than 24 hours ahead"));
    }
    if payload["sub"] != subject {
        return Err(refuse(401, format!("VAPID sub {} is not {subject:?}", payload["sub"])));
    }
    Ok(())
}

/// Splits `vapid t=<JWT>, k=<key>` (parameters in any order, values optionally
/// quoted) into `(jwt, key)`.
fn parse_vapid_authorization(value: &str) -> Option<(&str, &str)> {
    let (scheme, params) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("vapid") {
        return None;
    }
    let (mut t, mut k) = (None, None);
    for param in params.split(',') {
        let (name, value) = param.trim().split_once('=')?;
        let value = value.trim().trim_matches('"');
        match name.trim().to_ascii_lowercase().as_str() {
            "t" => t = Some(value),
            "k" => k = Some(value),
            _ => {}
        }
    }
    Some((t?, k?))
}

/// Base64url, with or without padding.
fn decode_b64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

fn decode_json(segment: &str) -> Option<Value> {
    serde_json::from_slice(&decode_b64(segment)?).ok()
}

/// A length for ring's HKDF output.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Decrypts a Web Push message body (RFC 8291): RFC 8188 `aes128gcm` with a
/// single record, keyed from ECDH between the subscription's private key
/// `ua_secret` and the sender's key in the header's keyid, and the subscription's
/// `auth` secret. Returns the plaintext with its padding removed, or what failed.
pub fn decrypt_aes128gcm(
    body: &[u8],
    ua_secret: &p256::SecretKey,
    auth: &[u8],
) -> Result<Vec<u8>, &'static str> {
    // Header (RFC 8188 §2.1): salt(16) || rs(4, big endian) || idlen(1) || keyid.
    const FIXED: usize = 16 + 4 + 1;
    if body.len() < FIXED {
        return Err("shorter than the aes128gcm header");
    }
    let salt = &body[..16];
    let rs = u32::from_be_bytes(body[16..20].try_into().expect("four bytes")) as usize;
    if body[20] != 65 {
        return Err("keyid is not a 65-byte P-256 public key");
    }
    let keyid = body.get(FIXED..FIXED + 65).ok_or("keyid is truncated")?;
    let record = &body[FIXED + 65..];
    if rs < 18 {
        return Err("record size below 18");
    }
    if record.len() < 17 {
        return Err("record shorter than tag and delimiter");
    }
    if record.len() > rs {
        return Err("more than one record");
    }

    // RFC 8291 §3.3–3.4: ECDH, then the auth secret mixes into the IKM.
    let as_public = p256::PublicKey::from_sec1_bytes(keyid).map_err(|_| "keyid is not on P-256")?;
    let shared = p256::ecdh::diffie_hellman(ua_secret.to_nonzero_scalar(), as_public.as_affine());
    let ua_public = ua_secret.public_key().to_encoded_point(false);
    let prk_key = hkdf::Salt::new(hkdf::HKDF_SHA256, auth).extract(shared.raw_secret_bytes());
    let mut ikm = [0u8; 32];
    let key_info: &[&[u8]] = &[b"WebPush: info\0", ua_public.as_bytes(), keyid];
    prk_key.expand(key_info, Len(32)).and_then(|okm| okm.fill(&mut ikm)).map_err(|_| "HKDF")?;

    // RFC 8188 §2.2–2.3: content-encryption key and nonce from the salt.
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&ikm);
    let cek: aead::UnboundKey = prk
        .expand(&[b"Content-Encoding: aes128gcm\0"], &aead::AES_128_GCM)
        .map_err(|_| "HKDF")?
        .into();
    let mut nonce = [0u8; 12];
    prk.expand(&[b"Content-Encoding: nonce\0"], Len(12))
        .and_then(|okm| okm.fill(&mut nonce))
        .map_err(|_| "HKDF")?;

    let mut buffer = record.to_vec();
    let padded = aead::LessSafeKey::new(cek)
        .open_in_place(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::empty(), &mut buffer)
        .map_err(|_| "AES-GCM authentication failed")?;
    let delimiter = padded.iter().rposition(|&b| b != 0).ok_or("no padding delimiter")?;
    if padded[delimiter] != 2 {
        return Err("padding delimiter is not 0x02 (last record)");
    }
    Ok(padded[..delimiter].to_vec())
}

// ---------------------------------------------------------------------------
// Shared with `FakeDistributor` in `fake_unifiedpush`

/// A refused request: status and the message naming the failed check.
pub(super) struct Refusal(pub(super) u16, pub(super) String);

pub(super) fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

/// Recording, scripts, body limit and the in-flight gate, for either fake.
pub(super) struct Common<T> {
    pub(super) requests: Recorder<T>,
    pub(super) scripts: Scripts<PushReply>,
    pub(super) max_body: AtomicUsize,
    pub(super) gate: Gate,
}

impl<T: Clone> Common<T> {
    pub(super) fn new() -> Self {
        Common {
            requests: Recorder::new(),
            scripts: Scripts::default(),
            max_body: AtomicUsize::new(DEFAULT_MAX_BODY),
            gate: Gate::new(),
        }
    }

    /// Answers a request that passed the checks: takes the scripted reply for
    /// `id`, counts the request in flight, records it (`record` gets the status),
    /// waits while held, then answers the reply or `success()`.
    pub(super) async fn answer(
        &self,
        id: &str,
        record: impl FnOnce(u16) -> T,
        success: impl FnOnce() -> Response,
    ) -> Response {
        let reply = self.scripts.pop(id);
        let status = match &reply {
            None | Some(PushReply::Delay(_)) => 201,
            Some(PushReply::Status { status, .. }) => *status,
            Some(PushReply::Reset) => 0,
        };
        let _in_flight = self.gate.enter();
        self.requests.push(record(status));
        self.gate.wait_released().await;
        match reply {
            None => success(),
            Some(PushReply::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                success()
            }
            Some(PushReply::Status { status, retry_after }) => {
                error_response(status, "scripted reply", retry_after)
            }
            Some(PushReply::Reset) => ConnAction::ResetConnection.response(),
        }
    }
}

/// Counts requests in flight, remembers the most at once, and holds them while set.
pub(super) struct Gate {
    in_flight: watch::Sender<usize>,
    max_in_flight: AtomicUsize,
    held: watch::Sender<bool>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            in_flight: watch::Sender::new(0),
            max_in_flight: AtomicUsize::new(0),
            held: watch::Sender::new(false),
        }
    }

    /// Counts one request in flight until the returned guard drops (also when
    /// the client goes away and the handler is cancelled).
    fn enter(&self) -> InFlight<'_> {
        self.in_flight.send_modify(|n| {
            *n += 1;
            self.max_in_flight.fetch_max(*n, Ordering::SeqCst);
        });
        InFlight(self)
    }

    async fn wait_released(&self) {
        let mut held = self.held.subscribe();
        // The sender lives as long as `self`, so this only ends by release.
        let _ = held.wait_for(|held| !*held).await;
    }

    pub(super) fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    pub(super) fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    pub(super) async fn wait_for(&self, n: usize, timeout: Duration) {
        let mut count = self.in_flight.subscribe();
        if tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await.is_err() {
            panic!(
                "timed out after {timeout:?} waiting for {n} request(s) in flight; got {}",
                self.in_flight()
            );
        }
    }

    pub(super) fn hold(&self) {
        self.held.send_replace(true);
    }

    pub(super) fn release(&self) {
        self.held.send_replace(false);
    }
}

struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n -= 1);
    }
}

pub(super) fn server_tls(ca: Option<&TestCa>) -> Option<Arc<rustls::ServerConfig>> {
    ca.map(|ca| ca.server_config(&[b"h2", b"http/1.1"]))
}

pub(super) fn created_response() -> Response {
    StatusCode::CREATED.into_response()
}

/// An autopush-like error body, `{"code":…,"error":…,"message":…}`; 2xx get none.
pub(super) fn error_response(status: u16, message: &str, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).expect("status");
    let mut builder = http::Response::builder().status(status);
    if let Some(secs) = retry_after {
        builder = builder.header(http::header::RETRY_AFTER, secs.to_string());
    }
    let body = if status.is_success() {
        Body::empty()
    } else {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        let error = status.canonical_reason().unwrap_or("Error");
        Body::from(
            json!({ "code": status.as_u16(), "error": error, "message": message }).to_string(),
        )
    };
    builder.body(body).expect("response").into_response()
}

// ---------------------------------------------------------------------------
// VAPID keys and tokens

/// A fresh VAPID key pair: `(PKCS#8 PEM "-----BEGIN PRIVATE KEY-----", public
/// key as a base64url 65-byte uncompressed point)`.
pub fn vapid_key() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("generate VAPID P-256 key");
    (key.serialize_pem(), URL_SAFE_NO_PAD.encode(key.public_key_raw()))
}

/// The base64url uncompressed public key of a SEC1 `EC PRIVATE KEY` PEM such as
/// [`VAPID_SEC1_PEM`].
pub fn public_key_b64_of_sec1(pem: &str) -> String {
    let key = p256::SecretKey::from_sec1_pem(pem).expect("SEC1 P-256 private key PEM");
    URL_SAFE_NO_PAD.encode(key.public_key().to_encoded_point(false).as_bytes())
}

/// A VAPID JWT as a well-behaved sender makes it: ES256 over
/// `{"typ":"JWT","alg":"ES256"}.{"aud":AUD,"exp":EXP,"sub":SUB}`.
pub fn sign_vapid_jwt(pkcs8_pem: &str, aud: &str, exp: u64, sub: &str) -> String {
    let header = json!({ "typ": "JWT", "alg": "ES256" });
    sign_es256_jwt(pkcs8_pem, &header, &json!({ "aud": aud, "exp": exp, "sub": sub }))
}

/// The `Authorization` value for `jwt` and public key `k`: `vapid t=JWT, k=K`.
pub fn vapid_authorization(jwt: &str, public_b64: &str) -> String {
    format!("vapid t={jwt}, k={public_b64}")
}
