//! A fake of Apple's APNs provider API (`POST /3/device/{token}`).
//!
//! It listens on `https://127.0.0.1:PORT` with the test CA's certificate and
//! speaks HTTP/2 only (ALPN `h2`), like `api.push.apple.com`. Two auth modes:
//!
//! - **token auth** ([`FakeApns::start_token_auth`]): every request must carry
//!   `authorization: bearer <JWT>`, an ES256 JWT with header `{"alg":"ES256",
//!   "kid":KEY_ID}` and claims `{"iss":TEAM_ID,"iat":SECS}`. The signature is
//!   verified with ring against the P-256 key the fake generated (and handed out
//!   as a `.p8`-style PKCS#8 PEM). Missing token: 403 `MissingProviderToken`;
//!   bad header/claims/signature: 403 `InvalidProviderToken`; `iat` older than
//!   one hour: 403 `ExpiredProviderToken`.
//! - **certificate auth** ([`FakeApns::start_cert_auth`]): the TLS handshake
//!   requires a client certificate issued by the test CA; no JWT is needed.
//!
//! Like Apple, it checks the request: method must be POST (405
//! `MethodNotAllowed`), path `/3/device/<token>` (404 `BadPath`, 400
//! `MissingDeviceToken`), `apns-topic` present (400 `MissingTopic`),
//! `apns-push-type` one of Apple's types (400 `InvalidPushType`), `apns-priority`
//! 1/5/10 (400 `BadPriority`), `apns-expiration` an integer (400
//! `BadExpirationDate`), `apns-id` a UUID (400 `BadMessageId`), `apns-collapse-id`
//! at most 64 bytes (400 `BadCollapseId`), payload non-empty (400 `PayloadEmpty`)
//! and at most 4096 bytes, 5120 for VoIP (413 `PayloadTooLarge`). A payload that
//! is not JSON is accepted (Apple documents no error for it) and recorded as a
//! JSON string.
//!
//! Every request that reaches the handler is recorded ([`RecordedApns`]), even
//! rejected ones, before any scripted delay. Valid requests get the next scripted
//! [`Reply`] for their device token (see [`FakeApns::respond`]), or `200` with an
//! `apns-id` header when none is queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

use super::server::{
    ConnAction, ConnInfo, FakeServer, Recorder, Scripts, sign_es256_jwt, unix_now,
};
use super::tls::TestCa;

/// A scripted APNs answer for one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answer with `status`; `reason` becomes the JSON body `{"reason":…}` (410
    /// also gets `"timestamp"` in ms), `retry_after` a `retry-after` header.
    Status { status: u16, reason: Option<&'static str>, retry_after: Option<u64> },
    /// Wait this long, then answer 200 (for client timeout tests).
    Delay(Duration),
    /// Reset this HTTP/2 stream (`RST_STREAM`, INTERNAL_ERROR); the connection
    /// and its other streams stay up.
    Reset,
    /// Reset the whole TCP connection (RST), failing every stream on it.
    ResetConnection,
    /// Answer 200, then send `GOAWAY` and close the connection gracefully.
    Goaway,
}

impl Reply {
    /// 200 with an `apns-id` header.
    pub fn ok() -> Reply {
        Reply::Status { status: 200, reason: None, retry_after: None }
    }

    /// An error status with Apple's `reason` string, e.g. `Reply::status(410, "Unregistered")`.
    pub fn status(status: u16, reason: &'static str) -> Reply {
        Reply::Status { status, reason: Some(reason), retry_after: None }
    }

    /// Like [`Reply::status`] plus a `retry-after: SECS` header.
    pub fn status_retry_after(status: u16, reason: &'static str, retry_after: u64) -> Reply {
        Reply::Status { status, reason: Some(reason), retry_after: Some(retry_after) }
    }

    /// 410 `Unregistered` (with `timestamp`): the token is dead.
    pub fn unregistered() -> Reply {
        Reply::status(410, "Unregistered")
    }

    /// 400 `BadDeviceToken`: the token is malformed or for the other environment.
    pub fn bad_device_token() -> Reply {
        Reply::status(400, "BadDeviceToken")
    }

    /// 400 `DeviceTokenNotForTopic`.
    pub fn device_token_not_for_topic() -> Reply {
        Reply::status(400, "DeviceTokenNotForTopic")
    }

    /// 429 `TooManyRequests`, optionally with `retry-after`.
    pub fn too_many_requests(retry_after: Option<u64>) -> Reply {
        Reply::Status { status: 429, reason: Some("TooManyRequests"), retry_after }
    }

    /// 500 `InternalServerError`.
    pub fn internal_server_error() -> Reply {
        Reply::status(500, "InternalServerError")
    }

    /// 503 `ServiceUnavailable`, optionally with `retry-after`.
    pub fn service_unavailable(retry_after: Option<u64>) -> Reply {
        Reply::Status { status: 503, reason: Some("ServiceUnavailable"), retry_after }
    }

    /// 403 `ExpiredProviderToken` (forces the client to mint a new JWT).
    pub fn expired_provider_token() -> Reply {
        Reply::status(403, "ExpiredProviderToken")
    }
}

/// One request as the fake APNs saw it.
#[derive(Clone, Debug)]
pub struct RecordedApns {
    /// Device token from the path.
    pub token: String,
    pub headers: HeaderMap,
    /// The JSON payload (a JSON string holding the raw text if it was not JSON,
    /// `Null` if empty).
    pub body: serde_json::Value,
    /// The provider JWT from `authorization: bearer …`, if any (valid or not).
    pub jwt: Option<String>,
    pub version: Version,
    /// Which connection it came on (1 = first accepted), to check connection reuse.
    pub conn_id: u64,
    /// Status the fake answered; 0 for `Reset`/`ResetConnection`.
    pub status: u16,
}

impl RecordedApns {
    /// A request header as a string (`None` if absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

enum Auth {
    Token {
        team_id: String,
        key_id: String,
        /// Uncompressed SEC1 point (`04 || X || Y`).
        public_key: Vec<u8>,
    },
    Certificate,
}

struct ApnsState {
    auth: Auth,
    requests: Recorder<RecordedApns>,
    scripts: Scripts<Reply>,
    jwts: Mutex<Vec<String>>,
    next_id: AtomicU64,
}

/// A running fake APNs; see the module docs.
pub struct FakeApns {
    server: FakeServer,
    state: Arc<ApnsState>,
}

impl FakeApns {
    /// Starts a token-auth (JWT) APNs. Returns the fake and the `.p8` signing key
    /// (PKCS#8 PEM, `-----BEGIN PRIVATE KEY-----`) the gateway must use.
    pub async fn start_token_auth(ca: &TestCa, team_id: &str, key_id: &str) -> (FakeApns, String) {
        let (auth, p8) = token_auth(team_id, key_id);
        (Self::start(Some(ca.server_config(&[b"h2"])), auth).await, p8)
    }

    /// Like [`FakeApns::start_token_auth`] but plain-text HTTP/2 with prior knowledge (h2c),
    /// for herald's `endpoint: http://…`.
    pub async fn start_token_auth_h2c(team_id: &str, key_id: &str) -> (FakeApns, String) {
        let (auth, p8) = token_auth(team_id, key_id);
        (Self::start(None, auth).await, p8)
    }

    /// Starts a certificate-auth APNs: TLS requires a client certificate issued by
    /// `ca` (see [`TestCa::issue_client_cert`]).
    pub async fn start_cert_auth(ca: &TestCa) -> FakeApns {
        Self::start(Some(ca.server_config_requiring_client_cert(&[b"h2"])), Auth::Certificate).await
    }

    async fn start(tls: Option<Arc<rustls::ServerConfig>>, auth: Auth) -> FakeApns {
        let state = Arc::new(ApnsState {
            auth,
            requests: Recorder::new(),
            scripts: Scripts::default(),
            jwts: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let router = Router::new()
            .route("/3/device/{token}", any(handle_push))
            .fallback(handle_fallback)
            .with_state(state.clone());
        let server = FakeServer::start_http2_only(router, tls).await;
        FakeApns { server, state }
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// The underlying server (connection counters, shutdown).
    pub fn server(&self) -> &FakeServer {
        &self.server
    }

    /// Every request recorded so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedApns> {
        self.state.requests.all()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.len()
    }

    /// Waits until at least `n` requests were recorded (panics after `timeout`).
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedApns> {
        self.state.requests.wait_for(n, timeout, "APNs").await
    }

    /// Forgets the recorded requests (scripts and JWTs are kept).
    pub fn clear_requests(&self) {
        self.state.requests.clear();
    }

    /// Queues `replies` (FIFO) for requests to device `token`; once they are used
    /// up the token gets 200 again. Requests the fake rejects itself (auth,
    /// headers) do not consume a scripted reply.
    pub fn respond(&self, token: &str, replies: Vec<Reply>) {
        self.state.scripts.push(token, replies);
    }

    /// Scripted replies not consumed yet.
    pub fn pending_replies(&self) -> usize {
        self.state.scripts.pending()
    }

    /// Distinct provider JWTs seen, in order of first use (to assert re-signing).
    pub fn jwts_seen(&self) -> Vec<String> {
        self.state.jwts.lock().unwrap().clone()
    }
}

/// A fresh P-256 signing key: the fake's verifier and the `.p8` PEM the gateway signs with.
fn token_auth(team_id: &str, key_id: &str) -> (Auth, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("generate APNs P-256 key");
    let auth = Auth::Token {
        team_id: team_id.to_owned(),
        key_id: key_id.to_owned(),
        public_key: key.public_key_raw().to_vec(),
    };
    (auth, key.serialize_pem())
}

async fn handle_fallback(req: Request) -> Response {
    if req.uri().path().starts_with("/3/device") {
        apns_response(400, Some("MissingDeviceToken"), None, None)
    } else {
        apns_response(404, Some("BadPath"), None, None)
    }
}

async fn handle_push(
    State(state): State<Arc<ApnsState>>,
    Path(token): Path<String>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let conn = parts.extensions.get::<ConnInfo>().cloned();
    let raw = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();

    let jwt = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(strip_bearer)
        .map(str::to_owned);
    if let Some(jwt) = &jwt {
        let mut seen = state.jwts.lock().unwrap();
        if !seen.contains(jwt) {
            seen.push(jwt.clone());
        }
    }

    let verdict = check_request(&state, &parts.method, &parts.headers, conn.as_ref(), &raw);
    let reply = match verdict {
        Err((status, reason)) => Reply::status(status, reason),
        Ok(()) => state.scripts.pop(&token).unwrap_or_else(Reply::ok),
    };
    let status = match &reply {
        Reply::Status { status, .. } => *status,
        Reply::Delay(_) | Reply::Goaway => 200,
        Reply::Reset | Reply::ResetConnection => 0,
    };

    let body = if raw.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&raw).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&raw).into_owned())
        })
    };
    state.requests.push(RecordedApns {
        token,
        headers: parts.headers.clone(),
        body,
        jwt,
        version: parts.version,
        conn_id: conn.map_or(0, |c| c.id),
        status,
    });

    let apns_id = match parts.headers.get("apns-id").and_then(|v| v.to_str().ok()) {
        Some(id) if is_uuid(id) => id.to_owned(),
        _ => {
            let n = state.next_id.fetch_add(1, Ordering::SeqCst);
            format!("FA4E0000-0000-4000-8000-{n:012X}")
        }
    };
    match reply {
        Reply::Status { status, reason, retry_after } => {
            apns_response(status, reason, Some(&apns_id), retry_after)
        }
        Reply::Delay(delay) => {
            tokio::time::sleep(delay).await;
            apns_response(200, None, Some(&apns_id), None)
        }
        Reply::Reset => ConnAction::ResetStream.response(),
        Reply::ResetConnection => ConnAction::ResetConnection.response(),
        Reply::Goaway => ConnAction::Goaway.attach(apns_response(200, None, Some(&apns_id), None)),
    }
}

/// Apple's own checks, in roughly Apple's order. `Err((status, reason))` on failure.
fn check_request(
    state: &ApnsState,
    method: &Method,
    headers: &HeaderMap,
    conn: Option<&ConnInfo>,
    body: &[u8],
) -> Result<(), (u16, &'static str)> {
    if method != Method::POST {
        return Err((405, "MethodNotAllowed"));
    }
    match &state.auth {
        Auth::Certificate => {
            if conn.is_none_or(|c| c.client_certs.is_empty()) {
                return Err((403, "BadCertificate"));
            }
        }
        Auth::Token { team_id, key_id, public_key } => {
            let Some(value) = headers.get(http::header::AUTHORIZATION) else {
                return Err((403, "MissingProviderToken"));
            };
            verify_provider_token(value, team_id, key_id, public_key)
                .map_err(|reason| (403, reason))?;
        }
    }
    for name in [
        "apns-topic",
        "apns-push-type",
        "apns-priority",
        "apns-expiration",
        "apns-id",
        "apns-collapse-id",
    ] {
        if headers.get_all(name).iter().count() > 1 {
            return Err((400, "DuplicateHeaders"));
        }
    }
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if header("apns-topic").is_none_or(str::is_empty) {
        return Err((400, "MissingTopic"));
    }
    let push_type = header("apns-push-type");
    if let Some(push_type) = push_type {
        const TYPES: &[&str] = &[
            "alert",
            "background",
            "location",
            "voip",
            "complication",
            "fileprovider",
            "mdm",
            "liveactivity",
            "pushtotalk",
            "widgets",
        ];
        if !TYPES.contains(&push_type) {
            return Err((400, "InvalidPushType"));
        }
    }
    if let Some(priority) = header("apns-priority")
        && !matches!(priority, "1" | "5" | "10")
    {
        return Err((400, "BadPriority"));
    }
    if let Some(expiration) = header("apns-expiration")
        && expiration.parse::<u64>().is_err()
    {
        return Err((400, "BadExpirationDate"));
    }
    if let Some(id) = header("apns-id")
        && !is_uuid(id)
    {
        return Err((400, "BadMessageId"));
    }
    if let Some(collapse_id) = header("apns-collapse-id")
        && collapse_id.len() > 64
    {
        return Err((400, "BadCollapseId"));
    }
    if body.is_empty() {
        return Err((400, "PayloadEmpty"));
    }
    let limit = if push_type == Some("voip") { 5120 } else { 4096 };
    if body.len() > limit {
        return Err((413, "PayloadTooLarge"));
    }
    Ok(())
}

fn strip_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Verifies an APNs provider token; `Err(reason)` names Apple's 403 reason.
fn verify_provider_token(
    value: &HeaderValue,
    team_id: &str,
    key_id: &str,
    public_key: &[u8],
) -> Result<(), &'static str> {
    const INVALID: &str = "InvalidProviderToken";
    let value = value.to_str().map_err(|_| INVALID)?;
    let jwt = strip_bearer(value).ok_or(INVALID)?;
    let mut parts = jwt.split('.');
    let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(INVALID);
    };
    let decode_json = |segment: &str| -> Result<serde_json::Value, &'static str> {
        let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| INVALID)?;
        serde_json::from_slice(&bytes).map_err(|_| INVALID)
    };
    let header = decode_json(header_b64)?;
    let claims = decode_json(claims_b64)?;
    let signature = URL_SAFE_NO_PAD.decode(sig_b64).map_err(|_| INVALID)?;
    if signature.len() != 64 {
        return Err(INVALID);
    }
    let signed = &jwt[..header_b64.len() + 1 + claims_b64.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| INVALID)?;

    if header["alg"] != "ES256" || header["kid"] != key_id {
        return Err(INVALID);
    }
    if claims["iss"] != team_id {
        return Err(INVALID);
    }
    let iat = claims["iat"].as_u64().ok_or(INVALID)?;
    let now = unix_now();
    if iat > now + 60 {
        return Err(INVALID);
    }
    if now - iat > 3600 {
        return Err("ExpiredProviderToken");
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn apns_response(
    status: u16,
    reason: Option<&str>,
    apns_id: Option<&str>,
    retry_after: Option<u64>,
) -> Response {
    let mut builder =
        http::Response::builder().status(StatusCode::from_u16(status).expect("status"));
    if let Some(id) = apns_id {
        builder = builder.header("apns-id", id);
    }
    if let Some(secs) = retry_after {
        builder = builder.header(http::header::RETRY_AFTER, secs.to_string());
    }
    let body = match reason {
        None => Body::empty(),
        Some(reason) => {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
            let mut json = serde_json::json!({ "reason": reason });
            if status == 410 {
                json["timestamp"] = (unix_now() * 1000).into();
            }
            Body::from(json.to_string())
        }
    };
    builder.body(body).expect("response").into_response()
}

/// Mints an APNs provider token the way a well-behaved client does: ES256 over
/// `{"alg":"ES256","kid":KEY_ID}.{"iss":TEAM_ID,"iat":IAT}` with the `.p8` key.
pub fn sign_provider_token(p8_pem: &str, team_id: &str, key_id: &str, iat: u64) -> String {
    let header = serde_json::json!({ "alg": "ES256", "kid": key_id });
    sign_es256_jwt(p8_pem, &header, &serde_json::json!({ "iss": team_id, "iat": iat }))
}
