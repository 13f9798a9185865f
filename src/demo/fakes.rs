//! Loopback stand-ins for Apple's and Google's push services, for `herald demo`: each records
//! what the gateway sent and answers the way the real service would. They check the request's
//! shape and that a provider token came with it, but verify no signature. They listen on
//! 127.0.0.1 only.
//!
//! Routes:
//! - [`FakeApns`]: `POST /3/device/{token}` → 200 with an `apns-id`, or 410 `Unregistered` for
//!   the one dead token it was started with. Speaks HTTP/2 with prior knowledge (h2c), which is
//!   what herald's APNs adapter uses for an `http://` endpoint.
//! - [`FakeFcm`]: `POST /token` (the OAuth2 token endpoint a service account's `token_uri`
//!   names) → `{"access_token","expires_in","token_type"}`; `POST
//!   /v1/projects/{project}/messages:send` → 200 `{"name": …}`.
//!
//! The recorded provider token is never kept: only whether one was present.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The largest request body a fake reads (real payloads are at most 4 KiB).
const MAX_BODY: usize = 64 * 1024;

/// The access token the fake OAuth2 endpoint hands out and the fake FCM expects.
const ACCESS_TOKEN: &str = "demo-access-token";

/// What a fake has recorded, oldest first, and a way to wait for more.
pub struct Recorder<T> {
    items: Mutex<Vec<T>>,
    count: watch::Sender<usize>,
}

impl<T: Clone> Recorder<T> {
    fn new() -> Recorder<T> {
        Recorder { items: Mutex::new(Vec::new()), count: watch::Sender::new(0) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, item: T) {
        let n = {
            let mut items = self.lock();
            items.push(item);
            items.len()
        };
        self.count.send_replace(n);
    }

    /// How many were recorded so far.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Everything recorded from index `from` on.
    pub fn since(&self, from: usize) -> Vec<T> {
        self.lock().get(from..).map(<[T]>::to_vec).unwrap_or_default()
    }

    /// Waits until at least `n` were recorded; `false` if `timeout` passed first.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let mut count = self.count.subscribe();
        matches!(tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await, Ok(Ok(_)))
    }
}

/// One push as the fake APNs received it.
#[derive(Clone)]
pub struct ApnsPush {
    /// The device token from the path (hex).
    pub token: String,
    /// `apns-priority`: 10 (now), 5 (when convenient for the phone).
    pub priority: Option<String>,
    /// The JSON payload (`Null` if it was not JSON).
    pub payload: Value,
    /// What the fake answered.
    pub status: u16,
}

/// A running fake APNs; stops when dropped.
pub struct FakeApns {
    server: Server,
    pub pushes: Arc<Recorder<ApnsPush>>,
}

impl FakeApns {
    /// Starts on 127.0.0.1:0. Pushes to `dead_token` (hex) get 410 `Unregistered`.
    pub async fn start(dead_token: String) -> std::io::Result<FakeApns> {
        let pushes = Arc::new(Recorder::new());
        let recorder = pushes.clone();
        let next_id = Arc::new(AtomicU64::new(1));
        let server = Server::start(move |parts, body| {
            apns_reply(&recorder, &dead_token, &next_id, parts, &body)
        })
        .await?;
        Ok(FakeApns { server, pushes })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.server.url()
    }
}

fn apns_reply(
    pushes: &Recorder<ApnsPush>,
    dead_token: &str,
    next_id: &AtomicU64,
    parts: &Parts,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let Some(token) = parts.uri.path().strip_prefix("/3/device/") else {
        return json_response(StatusCode::NOT_FOUND, &json!({ "reason": "BadPath" }));
    };
    if parts.method != Method::POST {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "reason": "MethodNotAllowed" }),
        );
    }
    let header =
        |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let authorized = header(header::AUTHORIZATION.as_str())
        .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
    let (status, reply) = if !authorized {
        (StatusCode::FORBIDDEN, Some(json!({ "reason": "MissingProviderToken" })))
    } else if header("apns-topic").is_none() {
        (StatusCode::BAD_REQUEST, Some(json!({ "reason": "MissingTopic" })))
    } else if token == dead_token {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        (StatusCode::GONE, Some(json!({ "reason": "Unregistered", "timestamp": now })))
    } else {
        (StatusCode::OK, None)
    };
    pushes.push(ApnsPush {
        token: token.to_owned(),
        priority: header("apns-priority"),
        payload: serde_json::from_slice(body).unwrap_or(Value::Null),
        status: status.as_u16(),
    });
    let apns_id = header("apns-id").unwrap_or_else(|| {
        format!("DE0A0000-0000-4000-8000-{:012X}", next_id.fetch_add(1, Ordering::Relaxed))
    });
    let mut response = match reply {
        Some(reply) => json_response(status, &reply),
        None => Response::new(Full::new(Bytes::new())),
    };
    if let Ok(value) = apns_id.parse() {
        response.headers_mut().insert("apns-id", value);
    }
    response
}

/// One message as the fake FCM received it.
#[derive(Clone)]
pub struct FcmMessage {
    /// The `message` object of the body (`Null` if absent).
    pub message: Value,
}

/// A running fake FCM HTTP v1 plus OAuth2 token endpoint; stops when dropped.
pub struct FakeFcm {
    server: Server,
    pub messages: Arc<Recorder<FcmMessage>>,
    /// Access tokens handed out.
    pub tokens_issued: Arc<AtomicU64>,
}

impl FakeFcm {
    /// Starts on 127.0.0.1:0.
    pub async fn start() -> std::io::Result<FakeFcm> {
        let messages = Arc::new(Recorder::new());
        let tokens_issued = Arc::new(AtomicU64::new(0));
        let (recorder, issued, next_name) =
            (messages.clone(), tokens_issued.clone(), Arc::new(AtomicU64::new(1)));
        let server = Server::start(move |parts, body| {
            fcm_reply(&recorder, &issued, &next_name, parts, &body)
        })
        .await?;
        Ok(FakeFcm { server, messages, tokens_issued })
    }

    /// `http://127.0.0.1:PORT` (the FCM endpoint).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `http://127.0.0.1:PORT/token` (a service account's `token_uri`).
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.server.url())
    }
}

fn fcm_reply(
    messages: &Recorder<FcmMessage>,
    tokens_issued: &AtomicU64,
    next_name: &AtomicU64,
    parts: &Parts,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let path = parts.uri.path();
    if parts.method == Method::POST && path == "/token" {
        tokens_issued.fetch_add(1, Ordering::Relaxed);
        return json_response(
            StatusCode::OK,
            &json!({ "access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer" }),
        );
    }
    let project = path.strip_prefix("/v1/projects/").and_then(|p| p.strip_suffix("/messages:send"));
    let (Some(project), &Method::POST) = (project, &parts.method) else {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "Requested entity was not found.");
    };
    let bearer = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if bearer != Some(&format!("Bearer {ACCESS_TOKEN}")) {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = body.get("message").cloned().unwrap_or(Value::Null);
    if message.get("token").and_then(Value::as_str).is_none() {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.",
        );
    }
    messages.push(FcmMessage { message });
    let n = next_name.fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, &json!({ "name": format!("projects/{project}/messages/0:{n}") }))
}

fn google_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({ "error": { "code": status.as_u16(), "message": message, "status": code } }),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// A loopback HTTP server (HTTP/1.1, or HTTP/2 with prior knowledge) that reads each request
/// body whole and answers with `handler`. Aborting its task on drop closes every connection.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    async fn start<H>(handler: H) -> std::io::Result<Server>
    where
        H: Fn(&Parts, Bytes) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let handler = handler.clone();
                        let service = service_fn(move |request: http::Request<Incoming>| {
                            let handler = handler.clone();
                            async move {
                                let (parts, body) = request.into_parts();
                                let response = match Limited::new(body, MAX_BODY).collect().await {
                                    Ok(body) => handler(&parts, body.to_bytes()),
                                    Err(_) => json_response(
                                        StatusCode::PAYLOAD_TOO_LARGE,
                                        &json!({ "reason": "PayloadTooLarge" }),
                                    ),
                                };
                                Ok::<_, Infallible>(response)
                            }
                        });
                        connections.spawn(async move {
                            let builder = Builder::new(TokioExecutor::new());
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        });
                    }
                    Some(_) = connections.join_next() => {}
                }
            }
        });
        Ok(Server { addr, task })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
