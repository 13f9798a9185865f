//! OAuth2 access tokens for a Google service account (the RFC 7523 JWT-bearer grant FCM v1
//! needs), fetched over the app's own HTTP client so `proxy`, `ca_file` and timeouts apply to
//! the token exchange exactly as to FCM itself.
//!
//! `gcp_auth` parses the service-account key and makes the RS256 signature; this module builds
//! the assertion, posts it to the file's `token_uri`, caches the token until shortly before it
//! expires, lets only one refresh run at a time, and drops a token FCM refused (401) so the next
//! send fetches a new one. Never logs the assertion, the key or a token.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use serde::Deserialize;
use serde_json::json;

use super::http::{HttpClient, exchange};

/// The OAuth scope FCM HTTP v1 requires.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// A token is replaced this long before Google says it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// Why no token could be had: `Transient` is worth a retry, `Refused` is a credentials problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Transient(String),
    Refused(String),
}

#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    token_uri: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A cached access token.
#[derive(Clone)]
pub struct AccessToken {
    value: Arc<str>,
    renew_at: Instant,
}

impl AccessToken {
    pub fn as_str(&self) -> &str {
        &self.value
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// Tokens for one service account.
pub struct TokenSource {
    account: gcp_auth::CustomServiceAccount,
    client_email: String,
    token_uri: String,
    client: HttpClient,
    current: RwLock<Option<AccessToken>>,
    refresh: tokio::sync::Mutex<()>,
}

impl TokenSource {
    pub fn new(service_account_json: &str, client: HttpClient) -> Result<TokenSource, String> {
        let account = gcp_auth::CustomServiceAccount::from_json(service_account_json)
            .map_err(|e| format!("service account: {e}"))?;
        let key: KeyFile = serde_json::from_str(service_account_json)
            .map_err(|e| format!("service account: {e}"))?;
        key.token_uri
            .parse::<http::Uri>()
            .map_err(|e| format!("service account token_uri: {e}"))?;
        Ok(TokenSource {
            account,
            client_email: key.client_email,
            token_uri: key.token_uri,
            client,
            current: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
        })
    }

    fn cached(&self) -> Option<AccessToken> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|t| Instant::now() < t.renew_at).cloned()
    }

    /// A valid token: the cached one, or a new one from `token_uri` (one fetch at a time).
    pub async fn get(&self) -> Result<AccessToken, TokenError> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let _refreshing = self.refresh.lock().await;
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let token = self.fetch().await?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(token)
    }

    /// Drops `stale` (FCM refused it) unless a newer token already replaced it.
    pub fn invalidate(&self, stale: &AccessToken) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|t| t.value == stale.value) {
            *current = None;
        }
    }

    async fn fetch(&self) -> Result<AccessToken, TokenError> {
        let assertion = self.assertion().map_err(TokenError::Refused)?;
        let body = format!("grant_type={}&assertion={assertion}", GRANT_TYPE.replace(':', "%3A"));
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.token_uri)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| TokenError::Refused(format!("token request: {e}")))?;
        let started = Instant::now();
        let answer = exchange(&self.client, request).await.map_err(TokenError::Transient)?;
        let status = answer.status.as_u16();
        if status == 429 || answer.status.is_server_error() {
            return Err(TokenError::Transient(format!("token endpoint answered {status}")));
        }
        if !answer.status.is_success() {
            // Google's OAuth errors carry only an error code and a description, never secrets.
            let error = serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_default();
            return Err(TokenError::Refused(
                format!("token endpoint answered {status} {error}").trim_end().to_owned(),
            ));
        }
        let parsed: TokenResponse = serde_json::from_slice(&answer.body).map_err(|_| {
            TokenError::Transient("token endpoint answered 200 without an access_token".into())
        })?;
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600).min(24 * 3600));
        Ok(AccessToken {
            value: parsed.access_token.into(),
            renew_at: started + lifetime.saturating_sub(EXPIRY_MARGIN),
        })
    }

    /// The signed JWT: `iss` the service account, `aud` its `token_uri`, valid for an hour.
    fn assertion(&self) -> Result<String, String> {
        let iat = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let header = json!({ "alg": "RS256", "typ": "JWT" });
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + 3600,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .account
            .signer()
            .sign(signing_input.as_bytes())
            .map_err(|e| format!("signing: {e}"))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}
