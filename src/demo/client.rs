//! A minimal Matrix client for `herald demo`: JSON over plain HTTP/1.1 to the embedded
//! homeserver on 127.0.0.1, one request at a time, each bounded in time.
//!
//! Errors name the request and the homeserver's `errcode`, never an access token.

use std::fmt;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// The longest one client-server request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The password every demo account uses.
const PASSWORD: &str = "demo-password";

/// A homeserver's client-server API.
pub struct Matrix {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// A logged-in user.
#[derive(Clone)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    access_token: String,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl Matrix {
    /// A client for the homeserver at `base` (`http://127.0.0.1:PORT`).
    pub fn new(base: String) -> Matrix {
        Matrix { base, http: Client::builder(TokioExecutor::new()).build_http() }
    }

    /// `POST /register` with `m.login.dummy`.
    pub async fn register(&self, localpart: &str) -> anyhow::Result<Session> {
        let body = json!({
            "username": localpart, "password": PASSWORD, "auth": { "type": "m.login.dummy" },
        });
        let reply = self.call(None, Method::POST, "/register", &body).await?;
        let field = |name: &str| {
            reply[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("register {localpart}: no `{name}` in the answer"))
        };
        Ok(Session {
            user_id: field("user_id")?,
            device_id: field("device_id")?,
            access_token: field("access_token")?,
        })
    }

    /// A request to `/_matrix/client/v3{path}` (segments already escaped with [`esc`]); the
    /// JSON answer of a 200, else an error naming the request and the `errcode`.
    pub async fn call(
        &self,
        who: Option<&Session>,
        method: Method,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<Value> {
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let bytes = if body.is_null() { Vec::new() } else { serde_json::to_vec(body)? };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}/_matrix/client/v3{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(who) = who {
            request =
                request.header(http::header::AUTHORIZATION, format!("Bearer {}", who.access_token));
        }
        let request = request.body(Full::new(Bytes::from(bytes)))?;
        let answer = async {
            let response = self.http.request(request).await?;
            let status = response.status();
            let raw = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, raw))
        };
        let (status, raw) = tokio::time::timeout(REQUEST_TIMEOUT, answer)
            .await
            .with_context(|| format!("{what}: no answer from the homeserver in time"))?
            .with_context(|| format!("{what}: request failed"))?;
        let json: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        if !status.is_success() {
            let errcode = json["errcode"].as_str().unwrap_or("?");
            let error = json["error"].as_str().unwrap_or("");
            bail!("{what}: homeserver answered {status} {errcode} {error}");
        }
        Ok(json)
    }

    pub async fn get(&self, who: &Session, path: &str) -> anyhow::Result<Value> {
        self.call(Some(who), Method::GET, path, &Value::Null).await
    }

    pub async fn post(&self, who: &Session, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Some(who), Method::POST, path, &body).await
    }

    pub async fn put(&self, who: &Session, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Some(who), Method::PUT, path, &body).await
    }

    /// Sends a room event with a fresh transaction id; returns its event id.
    pub async fn send(
        &self,
        who: &Session,
        room_id: &str,
        kind: &str,
        content: Value,
    ) -> anyhow::Result<String> {
        let txn = crate::homeserver::random_id(9);
        let path = format!("/rooms/{}/send/{kind}/{txn}", esc(room_id));
        let reply = self.put(who, &path, content).await?;
        reply["event_id"].as_str().map(str::to_owned).context("send: no `event_id` in the answer")
    }
}

/// Percent-escapes a path segment (room ids hold `!` and `:`, event ids `$`).
pub fn esc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
