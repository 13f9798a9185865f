//! Boots the embedded homeserver (`herald::homeserver::Homeserver`) on 127.0.0.1:0 with a fresh
//! SQLite file, and a small Matrix client that talks to it over HTTP/1.1 with access tokens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use herald::homeserver::{Homeserver, HomeserverConfig};
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::gateway::{Reply, client, exchange};

/// Longer than the longest long-poll a test makes.
const ANSWER_WITHIN: Duration = Duration::from_secs(150);

pub const SERVER_NAME: &str = "test.local";

/// A homeserver serving on a loopback port; stops when dropped.
pub struct TestHomeserver {
    pub hs: Homeserver,
    pub addr: SocketAddr,
    pub db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestHomeserver {
    /// A fresh server that accepts http:// pushers on loopback.
    pub async fn start() -> TestHomeserver {
        let dir = tempfile::tempdir().unwrap();
        let mut config = HomeserverConfig::new(SERVER_NAME, dir.path().join("hs.db"));
        config.allow_insecure_pushers = true;
        config.pusher_timeout = Duration::from_secs(2);
        let mut hs = TestHomeserver::start_with(config).await;
        hs._dir = Some(dir);
        hs
    }

    pub async fn start_with(config: HomeserverConfig) -> TestHomeserver {
        let db = config.db.clone();
        let hs = Homeserver::open(config).expect("homeserver opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = hs.clone();
        let task = tokio::spawn(async move {
            let _ = serving.serve(listener, async { drop(stopped.await) }).await;
        });
        TestHomeserver { hs, addr, db, stop: Some(stop), task: Some(task), _dir: None }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers `localpart` (password "pw") and returns a logged-in client.
    pub async fn register(&self, localpart: &str) -> User {
        User::register(&self.base(), localpart).await
    }
}

impl Drop for TestHomeserver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.hs.stop_pushers();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A logged-in user of a homeserver.
#[derive(Clone)]
pub struct User {
    pub base: String,
    pub user_id: String,
    pub device_id: String,
    pub token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl User {
    pub async fn register(base: &str, localpart: &str) -> User {
        let client = client();
        let body =
            json!({"username": localpart, "password": "pw", "auth": {"type": "m.login.dummy"}});
        let reply =
            raw(&client, Method::POST, &format!("{base}/_matrix/client/v3/register"), None, &body)
                .await;
        assert_eq!(reply.status, 200, "register {localpart}: {}", reply.json);
        User::from_session(base, client, &reply.json)
    }

    /// A second device of an existing user, by password login.
    pub async fn login(base: &str, localpart: &str) -> User {
        let client = client();
        let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart}, "password": "pw"});
        let reply =
            raw(&client, Method::POST, &format!("{base}/_matrix/client/v3/login"), None, &body)
                .await;
        assert_eq!(reply.status, 200, "login {localpart}: {}", reply.json);
        User::from_session(base, client, &reply.json)
    }

    fn from_session(base: &str, client: Client<HttpConnector, Full<Bytes>>, json: &Value) -> User {
        User {
            base: base.to_owned(),
            user_id: json["user_id"].as_str().unwrap().to_owned(),
            device_id: json["device_id"].as_str().unwrap().to_owned(),
            token: json["access_token"].as_str().unwrap().to_owned(),
            client,
        }
    }

    /// A request to `/_matrix/client/v3{path}` (`path` starts with `/`; already escaped).
    pub async fn call(&self, method: Method, path: &str, body: &Value) -> Reply {
        let url = format!("{}/_matrix/client/v3{path}", self.base);
        raw(&self.client, method, &url, Some(&self.token), body).await
    }

    /// Like [`User::call`], with the body sent as given.
    pub async fn call_bytes(&self, method: Method, path: &str, body: Vec<u8>) -> Reply {
        let url = format!("{}/_matrix/client/v3{path}", self.base);
        raw_bytes(&self.client, method, &url, Some(&self.token), body).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, &Value::Null).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.call(Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.call(Method::PUT, path, body).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, &Value::Null).await
    }

    /// Creates a room with `body` as the `createRoom` request; returns its id.
    pub async fn create_room(&self, body: Value) -> String {
        let reply = self.post("/createRoom", &body).await;
        assert_eq!(reply.status, 200, "createRoom: {}", reply.json);
        reply.json["room_id"].as_str().unwrap().to_owned()
    }

    pub async fn join(&self, room_id: &str) {
        let reply = self.post(&format!("/rooms/{}/join", esc(room_id)), &json!({})).await;
        assert_eq!(reply.status, 200, "join: {}", reply.json);
    }

    /// Sends an event with a fresh transaction id; returns the event id.
    pub async fn send(&self, room_id: &str, kind: &str, content: Value) -> String {
        let txn = herald::homeserver::random_id(9);
        let path = format!("/rooms/{}/send/{kind}/{txn}", esc(room_id));
        let reply = self.put(&path, &content).await;
        assert_eq!(reply.status, 200, "send: {}", reply.json);
        reply.json["event_id"].as_str().unwrap().to_owned()
    }

    /// A text message that mentions `user_id` in `m.mentions`.
    pub async fn send_mention(&self, room_id: &str, user_id: &str, body: &str) -> String {
        let content =
            json!({"msgtype": "m.text", "body": body, "m.mentions": {"user_ids": [user_id]}});
        self.send(room_id, "m.room.message", content).await
    }

    pub async fn send_text(&self, room_id: &str, body: &str) -> String {
        self.send(room_id, "m.room.message", json!({"msgtype": "m.text", "body": body})).await
    }

    /// `GET /sync` with an optional `since` and a timeout in ms.
    pub async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let mut path = format!("/sync?timeout={timeout_ms}");
        if let Some(since) = since {
            path.push_str(&format!("&since={}", esc(since)));
        }
        let reply = self.get(&path).await;
        assert_eq!(reply.status, 200, "sync: {}", reply.json);
        reply.json
    }

    pub async fn receipt(&self, room_id: &str, event_id: &str) {
        let path = format!("/rooms/{}/receipt/m.read/{}", esc(room_id), esc(event_id));
        let reply = self.post(&path, &json!({})).await;
        assert_eq!(reply.status, 200, "receipt: {}", reply.json);
    }

    /// Registers an HTTP pusher pointing at `gateway_url` (the full notify URL).
    pub async fn set_pusher(&self, app_id: &str, pushkey: &str, gateway_url: &str, data: Value) {
        let mut data = if data.is_object() { data } else { json!({}) };
        data["url"] = json!(gateway_url);
        let body = json!({
            "kind": "http", "app_id": app_id, "pushkey": pushkey, "app_display_name": "Test",
            "device_display_name": "Phone", "lang": "en", "data": data,
        });
        let reply = self.post("/pushers/set", &body).await;
        assert_eq!(reply.status, 200, "pushers/set: {}", reply.json);
    }
}

/// Percent-escapes a path segment (room ids hold `!` and `:`, event ids `$`).
pub fn esc(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A request to `{base}{path}` (`path` is the whole escaped path, e.g.
/// `/_matrix/client/versions`), with an access token in the `Authorization` header if given.
pub async fn request(
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> Reply {
    raw(&client(), method, &format!("{base}{path}"), token, body).await
}

/// Like [`request`], with the body sent as given (for bodies that are not JSON, or huge).
pub async fn request_bytes(
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    raw_bytes(&client(), method, &format!("{base}{path}"), token, body).await
}

async fn raw(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> Reply {
    let bytes = if body.is_null() { Vec::new() } else { serde_json::to_vec(body).unwrap() };
    raw_bytes(client, method, url, token, bytes).await
}

async fn raw_bytes(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    token: Option<&str>,
    bytes: Vec<u8>,
) -> Reply {
    let mut request =
        Request::builder().method(method).uri(url).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Full::new(Bytes::from(bytes))).unwrap();
    exchange(client, request, ANSWER_WITHIN).await
}

/// A request to `{base}{path}` with no body, no token and exactly the given extra headers (for
/// CORS preflights and the like).
pub async fn request_with_headers(
    base: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = Request::builder().method(method).uri(format!("{base}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    exchange(&client(), request, ANSWER_WITHIN).await
}
