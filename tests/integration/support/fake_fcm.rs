//! A fake of FCM HTTP v1 plus Google's OAuth2 token endpoint, on one plain-HTTP
//! loopback server (`http://127.0.0.1:PORT`, HTTP/1.1 or h2c).
//!
//! **Token endpoint** `POST /token` (what a service account's `token_uri`
//! points at): takes the form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer
//! &assertion=<JWT>`. The assertion must be RS256-signed with the test key in
//! `tests/fixtures/fcm-test-key.pem` (verified with ring), with `iss` = the
//! service account's `client_email`, `aud` = this token URI, `scope` containing
//! `https://www.googleapis.com/auth/firebase.messaging`, and a sane `iat`/`exp`
//! (at most one hour). Base64url segments are accepted with or without padding
//! (gcp_auth pads). Failures answer 400 `{"error":"invalid_grant",…}` (or
//! `unsupported_grant_type`/`invalid_scope`/`invalid_request`), like Google.
//! Success answers `{"access_token":"ya29.fake-N","expires_in":3600,
//! "token_type":"Bearer"}` with a fresh token each time.
//!
//! **Send** `POST /v1/projects/{project_id}/messages:send`: needs
//! `authorization: Bearer <access token>` for a token that was issued, is not
//! revoked or expired (else 401 `UNAUTHENTICATED`), and belongs to a service
//! account of that project (else 403 `PERMISSION_DENIED`). The body must be
//! `{"message":{…}}` with exactly one of `token`/`topic`/`condition`, and
//! `message.data`, when present, must map strings to strings (else 400
//! `INVALID_ARGUMENT` with a `BadRequest` field violation, as FCM does). Valid
//! requests get the next scripted [`FcmReply`] for `message.token` (see
//! [`FakeFcm::respond`]) or 200 `{"name":"projects/P/messages/0:N"}`. Every
//! request reaching the send route is recorded ([`RecordedFcm`]).
//!
//! Errors use Google's JSON error shape:
//! `{"error":{"code":404,"message":"…","status":"NOT_FOUND","details":[{"@type":
//! "type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, StatusCode};
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use serde_json::{Value, json};

use super::server::{ConnAction, ConnInfo, FakeServer, Recorder, Scripts, unix_now};

/// The scope FCM HTTP v1 needs.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The OAuth2 JWT-bearer grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The test-only service-account private key (PKCS#8 RSA PEM).
pub const TEST_KEY_PEM: &str = include_str!("../../fixtures/fcm-test-key.pem");
/// Its public key as PKCS#1 `RSAPublicKey` DER (what ring verifies with).
const TEST_PUBLIC_KEY_DER: &[u8] = include_bytes!("../../fixtures/fcm-test-key.pub.der");

const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";

/// A scripted FCM answer for one send request.
#[derive(Clone, Debug)]
pub enum FcmReply {
    /// A Google error response. `fcm_error_code` adds an `FcmError` detail,
    /// `field_violation` (`(field, description)`) a `BadRequest` detail,
    /// `retry_after` a `retry-after` header.
    Error {
        http: u16,
        status: &'static str,
        fcm_error_code: Option<&'static str>,
        message: String,
        retry_after: Option<u64>,
        field_violation: Option<(&'static str, &'static str)>,
    },
    /// Wait this long, then answer 200 (for client timeout tests).
    Delay(Duration),
    /// Reset the TCP connection (RST) without answering.
    Reset,
}

impl FcmReply {
    fn error(
        http: u16,
        status: &'static str,
        fcm_error_code: Option<&'static str>,
        message: &str,
    ) -> FcmReply {
        FcmReply::Error {
            http,
            status,
            fcm_error_code,
            message: message.to_owned(),
            retry_after: None,
            field_violation: None,
        }
    }

    fn with_retry_after(mut self, secs: Option<u64>) -> FcmReply {
        if let FcmReply::Error { retry_after, .. } = &mut self {
            *retry_after = secs;
        }
        self
    }

    /// 404 NOT_FOUND / UNREGISTERED: the registration token is dead.
    pub fn unregistered() -> FcmReply {
        FcmReply::error(404, "NOT_FOUND", Some("UNREGISTERED"), "Requested entity was not found.")
    }

    /// 400 INVALID_ARGUMENT about `message.token`: the token is malformed.
    pub fn invalid_token() -> FcmReply {
        FcmReply::Error {
            http: 400,
            status: "INVALID_ARGUMENT",
            fcm_error_code: Some("INVALID_ARGUMENT"),
            message: "The registration token is not a valid FCM registration token".to_owned(),
            retry_after: None,
            field_violation: Some(("message.token", "Invalid registration token")),
        }
    }

    /// 400 INVALID_ARGUMENT about `message.data`: the payload is bad, not the token.
    pub fn invalid_argument_payload() -> FcmReply {
        FcmReply::Error {
            http: 400,
            status: "INVALID_ARGUMENT",
            fcm_error_code: Some("INVALID_ARGUMENT"),
            message: "Invalid value at 'message.data[0].value' (TYPE_STRING), 1".to_owned(),
            retry_after: None,
            field_violation: Some((
                "message.data[0].value",
                "Invalid value at 'message.data[0].value' (TYPE_STRING), 1",
            )),
        }
    }

    /// 403 PERMISSION_DENIED / SENDER_ID_MISMATCH: token belongs to another sender.
    pub fn sender_id_mismatch() -> FcmReply {
        FcmReply::error(403, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH"), "SenderId mismatch")
    }

    /// 503 UNAVAILABLE, optionally with `retry-after`.
    pub fn unavailable(retry_after: Option<u64>) -> FcmReply {
        FcmReply::error(
            503,
            "UNAVAILABLE",
            Some("UNAVAILABLE"),
            "The service is currently unavailable.",
        )
        .with_retry_after(retry_after)
    }

    /// 500 INTERNAL.
    pub fn internal() -> FcmReply {
        FcmReply::error(500, "INTERNAL", Some("INTERNAL"), "Internal error encountered.")
    }

    /// 429 RESOURCE_EXHAUSTED / QUOTA_EXCEEDED, optionally with `retry-after`.
    pub fn quota_exceeded(retry_after: Option<u64>) -> FcmReply {
        FcmReply::error(
            429,
            "RESOURCE_EXHAUSTED",
            Some("QUOTA_EXCEEDED"),
            "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute'.",
        )
        .with_retry_after(retry_after)
    }

    /// 401 UNAUTHENTICATED / THIRD_PARTY_AUTH_ERROR (bad APNs/web push credentials
    /// configured in Firebase; not our OAuth token).
    pub fn third_party_auth_error() -> FcmReply {
        FcmReply::error(
            401,
            "UNAUTHENTICATED",
            Some("THIRD_PARTY_AUTH_ERROR"),
            "Auth error from APNS or Web Push Service",
        )
    }
}

/// One send request as the fake FCM saw it.
#[derive(Clone, Debug)]
pub struct RecordedFcm {
    pub project_id: String,
    pub headers: HeaderMap,
    /// The whole JSON body (`{"message":{…}}`); `Null` if it was not JSON.
    pub body: Value,
    /// The access token from `authorization: Bearer …`, if any.
    pub bearer: Option<String>,
    pub version: http::Version,
    /// Which connection it came on (1 = first accepted).
    pub conn_id: u64,
    /// Status the fake answered; 0 for `Reset`.
    pub status: u16,
}

impl RecordedFcm {
    /// `message.token`, if the message targets a token.
    pub fn message_token(&self) -> Option<&str> {
        self.body["message"]["token"].as_str()
    }

    /// `message`, the FCM message object.
    pub fn message(&self) -> &Value {
        &self.body["message"]
    }
}

struct IssuedToken {
    project_id: String,
    expires_at: Instant,
}

struct FcmState {
    /// `http://127.0.0.1:PORT/token`, set right after binding.
    token_uri: OnceLock<String>,
    /// client_email -> project_id, for service accounts handed out.
    accounts: Mutex<HashMap<String, String>>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    tokens_issued: AtomicU64,
    token_requests: AtomicU64,
    token_lifetime_secs: AtomicU64,
    fail_token_requests: AtomicUsize,
    requests: Recorder<RecordedFcm>,
    scripts: Scripts<FcmReply>,
    next_message: AtomicU64,
}

/// A running fake FCM + OAuth2 token endpoint; see the module docs.
pub struct FakeFcm {
    server: FakeServer,
    state: Arc<FcmState>,
}

impl FakeFcm {
    pub async fn start() -> FakeFcm {
        let state = Arc::new(FcmState {
            token_uri: OnceLock::new(),
            accounts: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            tokens_issued: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            token_lifetime_secs: AtomicU64::new(3600),
            fail_token_requests: AtomicUsize::new(0),
            requests: Recorder::new(),
            scripts: Scripts::default(),
            next_message: AtomicU64::new(1),
        });
        let router = Router::new()
            .route("/token", post(handle_token))
            // `messages:send` is matched as a whole segment and checked in the handler.
            .route("/v1/projects/{project_id}/{method}", post(handle_send))
            .fallback(|| async {
                google_error(404, "NOT_FOUND", "Requested entity was not found.", vec![])
            })
            .with_state(state.clone());
        let server = FakeServer::start(router, None).await;
        state.token_uri.set(format!("{}/token", server.url())).expect("token_uri set once");
        FakeFcm { server, state }
    }

    /// `http://127.0.0.1:PORT` (the FCM endpoint base).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `http://127.0.0.1:PORT/token` (the OAuth2 token endpoint).
    pub fn token_uri(&self) -> String {
        self.state.token_uri.get().expect("token_uri").clone()
    }

    pub fn server(&self) -> &FakeServer {
        &self.server
    }

    /// `herald-test@PROJECT.iam.gserviceaccount.com`
    pub fn client_email(project_id: &str) -> String {
        format!("herald-test@{project_id}.iam.gserviceaccount.com")
    }

    /// A Google service-account key file (JSON) for `project_id`, whose `token_uri`
    /// is this fake's token endpoint. Registers the account with the fake.
    pub fn service_account_json(&self, project_id: &str) -> String {
        let client_email = Self::client_email(project_id);
        self.state.accounts.lock().unwrap().insert(client_email.clone(), project_id.to_owned());
        let doc = json!({
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": TEST_KEY_PEM,
            "client_email": client_email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!(
                "https://www.googleapis.com/robot/v1/metadata/x509/herald-test%40{project_id}.iam.gserviceaccount.com"
            ),
            "universe_domain": "googleapis.com",
        });
        serde_json::to_string_pretty(&doc).expect("service account JSON")
    }

    /// Access tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens_issued.load(Ordering::SeqCst)
    }

    /// Requests to the token endpoint so far (including failed ones).
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Invalidates every access token issued so far; sends using them get 401
    /// UNAUTHENTICATED until the client fetches a new one.
    pub fn revoke_tokens(&self) {
        self.state.tokens.lock().unwrap().clear();
    }

    /// `expires_in` for tokens issued from now on (default 3600); the fake also
    /// rejects a token once that time has passed.
    pub fn set_token_lifetime(&self, secs: u64) {
        self.state.token_lifetime_secs.store(secs, Ordering::SeqCst);
    }

    /// The next `n` token requests get 500 `{"error":"internal_failure"}`.
    pub fn fail_token_endpoint(&self, n: usize) {
        self.state.fail_token_requests.store(n, Ordering::SeqCst);
    }

    /// Every send request recorded so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedFcm> {
        self.state.requests.all()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.len()
    }

    /// Waits until at least `n` send requests were recorded (panics after `timeout`).
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedFcm> {
        self.state.requests.wait_for(n, timeout, "FCM").await
    }

    pub fn clear_requests(&self) {
        self.state.requests.clear();
    }

    /// Queues `replies` (FIFO) for sends whose `message.token` is `token`; once
    /// used up, that token gets 200 again. Requests the fake rejects itself
    /// (auth, malformed body) do not consume a scripted reply.
    pub fn respond(&self, token: &str, replies: Vec<FcmReply>) {
        self.state.scripts.push(token, replies);
    }

    /// Scripted replies not consumed yet.
    pub fn pending_replies(&self) -> usize {
        self.state.scripts.pending()
    }
}

// ---------------------------------------------------------------------------
// OAuth2 token endpoint

async fn handle_token(State(state): State<Arc<FcmState>>, req: Request) -> Response {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    let failing = state
        .fail_token_requests
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return oauth_error(500, "internal_failure", "Scripted token endpoint failure.");
    }
    let raw = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap_or_default();
    let form = parse_form(&String::from_utf8_lossy(&raw));
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());

    match field("grant_type") {
        Some(JWT_BEARER_GRANT) => {}
        Some(other) => {
            return oauth_error(
                400,
                "unsupported_grant_type",
                &format!("Invalid grant_type: {other}"),
            );
        }
        None => {
            return oauth_error(400, "invalid_request", "Missing required parameter: grant_type");
        }
    }
    let Some(assertion) = field("assertion") else {
        return oauth_error(400, "invalid_request", "Missing required parameter: assertion");
    };
    let token_uri = state.token_uri.get().expect("token_uri");
    let claims = match verify_assertion(assertion, token_uri) {
        Ok(claims) => claims,
        Err((error, description)) => return oauth_error(400, error, description),
    };
    let email = claims["iss"].as_str().unwrap_or_default();
    let Some(project_id) = state.accounts.lock().unwrap().get(email).cloned() else {
        return oauth_error(400, "invalid_grant", "Invalid grant: account not found");
    };

    let n = state.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
    let access_token = format!("ya29.fake-access-token-{n}");
    let lifetime = state.token_lifetime_secs.load(Ordering::SeqCst);
    state.tokens.lock().unwrap().insert(
        access_token.clone(),
        IssuedToken { project_id, expires_at: Instant::now() + Duration::from_secs(lifetime) },
    );
    json_response(
        200,
        json!({ "access_token": access_token, "expires_in": lifetime, "token_type": "Bearer" }),
    )
}

/// Checks the RS256 assertion JWT; returns its claims or `(error, description)`.
fn verify_assertion(
    assertion: &str,
    token_uri: &str,
) -> Result<Value, (&'static str, &'static str)> {
    const BAD_JWT: (&str, &str) = ("invalid_grant", "Invalid JWT Signature.");
    let mut parts = assertion.split('.');
    let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD_JWT);
    };
    let decode = |segment: &str| URL_SAFE_NO_PAD.decode(segment.trim_end_matches('='));
    let signature = decode(sig_b64).map_err(|_| BAD_JWT)?;
    let signed = &assertion[..header_b64.len() + 1 + claims_b64.len()];
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, TEST_PUBLIC_KEY_DER)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| BAD_JWT)?;
    let header: Value =
        decode(header_b64).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(BAD_JWT)?;
    let claims: Value =
        decode(claims_b64).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(BAD_JWT)?;
    if header["alg"] != "RS256" {
        return Err(BAD_JWT);
    }
    if claims["aud"] != token_uri {
        return Err(("invalid_grant", "Invalid JWT: Failed audience check."));
    }
    if claims["iss"].as_str().is_none() {
        return Err(("invalid_grant", "Invalid grant: account not found"));
    }
    let scopes = claims["scope"].as_str().unwrap_or_default();
    if !scopes.split(' ').any(|s| s == FCM_SCOPE) {
        return Err(("invalid_scope", "Invalid OAuth scope or ID token audience provided."));
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(("invalid_grant", "Invalid JWT: iat/exp missing."));
    };
    let now = unix_now();
    if exp <= iat || exp - iat > 3600 || iat > now + 300 || exp < now {
        return Err((
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        ));
    }
    Ok(claims)
}

/// Minimal `application/x-www-form-urlencoded` parser.
fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    json_response(status, json!({ "error": error, "error_description": description }))
}

// ---------------------------------------------------------------------------
// FCM HTTP v1 send

async fn handle_send(
    State(state): State<Arc<FcmState>>,
    Path((project_id, method)): Path<(String, String)>,
    req: Request,
) -> Response {
    if method != "messages:send" {
        return google_error(404, "NOT_FOUND", "Requested entity was not found.", vec![]);
    }
    let (parts, body) = req.into_parts();
    let conn_id = parts.extensions.get::<ConnInfo>().map_or(0, |c| c.id);
    let raw = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let bearer = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());

    let reply = match check_send(&state, &project_id, bearer.as_deref(), &raw, &body) {
        Some(rejection) => SendReply::Rejected(rejection),
        None => {
            let token = body["message"]["token"].as_str().unwrap_or_default();
            state.scripts.pop(token).map_or(SendReply::Ok, SendReply::Scripted)
        }
    };
    let status = match &reply {
        SendReply::Ok | SendReply::Scripted(FcmReply::Delay(_)) => 200,
        SendReply::Scripted(FcmReply::Error { http, .. }) => *http,
        SendReply::Scripted(FcmReply::Reset) => 0,
        SendReply::Rejected(response) => response.status().as_u16(),
    };
    state.requests.push(RecordedFcm {
        project_id: project_id.clone(),
        headers: parts.headers.clone(),
        body,
        bearer,
        version: parts.version,
        conn_id,
        status,
    });

    let success = || {
        let n = state.next_message.fetch_add(1, Ordering::SeqCst);
        json_response(200, json!({ "name": format!("projects/{project_id}/messages/0:{n}") }))
    };
    match reply {
        SendReply::Ok => success(),
        SendReply::Rejected(response) => response,
        SendReply::Scripted(FcmReply::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            success()
        }
        SendReply::Scripted(FcmReply::Reset) => ConnAction::ResetConnection.response(),
        SendReply::Scripted(FcmReply::Error {
            http,
            status,
            fcm_error_code,
            message,
            retry_after,
            field_violation,
        }) => {
            let mut details = Vec::new();
            if let Some(code) = fcm_error_code {
                details.push(json!({ "@type": FCM_ERROR_TYPE, "errorCode": code }));
            }
            if let Some((field, description)) = field_violation {
                details.push(json!({
                    "@type": BAD_REQUEST_TYPE,
                    "fieldViolations": [{ "field": field, "description": description }],
                }));
            }
            let mut response = google_error(http, status, &message, details);
            if let Some(secs) = retry_after {
                response.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    secs.to_string().parse().expect("header value"),
                );
            }
            response
        }
    }
}

enum SendReply {
    Ok,
    Scripted(FcmReply),
    Rejected(Response),
}

/// FCM's own checks; returns the rejection to send, if any.
fn check_send(
    state: &FcmState,
    project_id: &str,
    bearer: Option<&str>,
    raw: &[u8],
    body: &Value,
) -> Option<Response> {
    let Some(bearer) = bearer else {
        return Some(google_error(
            401,
            "UNAUTHENTICATED",
            "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            vec![],
        ));
    };
    let token_project = {
        let tokens = state.tokens.lock().unwrap();
        tokens.get(bearer).filter(|t| t.expires_at > Instant::now()).map(|t| t.project_id.clone())
    };
    let Some(token_project) = token_project else {
        return Some(google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            vec![],
        ));
    };
    if token_project != project_id {
        return Some(google_error(
            403,
            "PERMISSION_DENIED",
            &format!(
                "Permission 'cloudmessaging.messages.create' denied on resource '//cloudresourcemanager.googleapis.com/projects/{project_id}' (or it may not exist)."
            ),
            vec![],
        ));
    }
    let invalid = |message: &str, field: Option<(&str, &str)>| {
        let mut details = Vec::new();
        if let Some((field, description)) = field {
            details.push(json!({
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{ "field": field, "description": description }],
            }));
        }
        Some(google_error(400, "INVALID_ARGUMENT", message, details))
    };
    let Some(message) = body.get("message").filter(|m| m.is_object()) else {
        let what = if serde_json::from_slice::<Value>(raw).is_err() {
            "Invalid JSON payload received. Unexpected token."
        } else {
            "Invalid JSON payload received. Unknown name or missing \"message\"."
        };
        return invalid(what, None);
    };
    let targets =
        ["token", "topic", "condition"].iter().filter(|k| message.get(**k).is_some()).count();
    if targets != 1 {
        return invalid(
            "Exactly one of message.token, message.topic or message.condition must be set.",
            Some(("message", "Exactly one target must be set")),
        );
    }
    if let Some(data) = message.get("data") {
        let Some(data) = data.as_object() else {
            return invalid(
                "Invalid value at 'message.data' (type.googleapis.com/google.firebase.fcm.v1.Message.DataEntry), not a map",
                Some(("message.data", "Invalid value at 'message.data'")),
            );
        };
        if let Some((index, (_, value))) =
            data.iter().enumerate().find(|(_, (_, v))| !v.is_string())
        {
            let field = format!("message.data[{index}].value");
            let text = format!("Invalid value at '{field}' (TYPE_STRING), {value}");
            return invalid(&text, Some((&field, &text)));
        }
    }
    None
}

fn google_error(code: u16, status: &str, message: &str, details: Vec<Value>) -> Response {
    let mut error = json!({ "code": code, "message": message, "status": status });
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    json_response(code, json!({ "error": error }))
}

fn json_response(status: u16, body: Value) -> Response {
    http::Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header(http::header::CONTENT_TYPE, "application/json; charset=UTF-8")
        .body(Body::from(body.to_string()))
        .expect("response")
        .into_response()
}

/// Builds an RS256 assertion JWT for `client_email` with the test key, as a
/// service-account client would (for tests poking the token endpoint directly).
pub fn sign_assertion(client_email: &str, token_uri: &str, scope: &str, iat: u64) -> String {
    use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject;

    let der = PrivatePkcs8KeyDer::from_pem_slice(TEST_KEY_PEM.as_bytes()).expect("test key PEM");
    let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("RSA key");
    let header = json!({ "alg": "RS256", "typ": "JWT" });
    let claims = json!({
        "iss": client_email,
        "aud": token_uri,
        "scope": scope,
        "iat": iat,
        "exp": iat + 3600,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .expect("RS256 sign");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}
