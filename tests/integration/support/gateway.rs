//! Boots the real `herald::App` on 127.0.0.1:0 from a YAML config, exactly as the binary does,
//! and talks to it over HTTP/1.1.
//!
//! [`Settings`] holds the few top-level knobs tests change; apps are YAML fragments built by
//! [`apns_app`], [`fcm_app`] and friends, so no test carries a 60-line config literal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::fake_apns::FakeApns;
use super::fake_fcm::FakeFcm;
use super::tls::{TestCa, write_file};

/// Top-level settings; `Settings::default()` is quick to fail and quick to retry.
#[derive(Clone, Debug)]
pub struct Settings {
    pub request_deadline: &'static str,
    pub upstream_timeout: &'static str,
    pub attempts: u32,
    pub initial_backoff: &'static str,
    pub max_backoff: &'static str,
    pub max_body_bytes: usize,
    pub max_inflight_requests: usize,
    pub shutdown_grace: &'static str,
    pub separate_admin: bool,
    /// `proxy:` URL, when upstream connections must tunnel through one.
    pub proxy: Option<String>,
    /// YAML fragment for `apps:` (each line indented by two spaces).
    pub apps: String,
    /// The `dedup:` value (a YAML flow mapping), when not the default.
    pub dedup: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            request_deadline: "5s",
            upstream_timeout: "1s",
            attempts: 3,
            initial_backoff: "10ms",
            max_backoff: "50ms",
            max_body_bytes: 64 * 1024,
            max_inflight_requests: 64,
            shutdown_grace: "5s",
            separate_admin: true,
            proxy: None,
            apps: log_app("im.example.debug"),
            dedup: None,
        }
    }
}

impl Settings {
    pub fn yaml(&self) -> String {
        let admin = if self.separate_admin { "admin_listen: \"127.0.0.1:0\"\n" } else { "" };
        let proxy = self.proxy.as_ref().map(|p| format!("proxy: \"{p}\"\n")).unwrap_or_default();
        let dedup = self.dedup.as_ref().map(|d| format!("dedup: {d}\n")).unwrap_or_default();
        format!(
            "listen: \"127.0.0.1:0\"\n{admin}{proxy}{dedup}max_body_bytes: {}\nrequest_deadline: \"{}\"\nupstream_timeout: \"{}\"\n\
             retry: {{ attempts: {}, initial_backoff: \"{}\", max_backoff: \"{}\" }}\n\
             max_inflight_requests: {}\nshutdown_grace: \"{}\"\nlog: {{ level: debug }}\napps:\n{}",
            self.max_body_bytes,
            self.request_deadline,
            self.upstream_timeout,
            self.attempts,
            self.initial_backoff,
            self.max_backoff,
            self.max_inflight_requests,
            self.shutdown_grace,
            self.apps,
        )
    }
}

/// `type: log` app.
pub fn log_app(app_id: &str) -> String {
    format!("  \"{app_id}\":\n    type: log\n")
}

/// A token-auth APNs app aimed at `fake`, trusting `ca`; writes the key under `dir`.
pub fn apns_app(
    app_id: &str,
    dir: &Path,
    fake: &FakeApns,
    ca: &TestCa,
    p8_pem: &str,
    extra: &str,
) -> String {
    let key = write_file(dir, &format!("{app_id}.p8"), p8_pem);
    let ca_file = write_file(dir, "ca.pem", ca.cert_pem());
    format!(
        "  \"{app_id}\":\n    type: apns\n    key_file: {}\n    key_id: {APNS_KEY_ID}\n    team_id: {APNS_TEAM_ID}\n    \
         topic: {app_id}\n    endpoint: {}\n    ca_file: {}\n{extra}",
        key.display(),
        fake.url(),
        ca_file.display(),
    )
}

/// A device token as a homeserver stores it (base64, as iOS SDKs hand it out) and as APNs sees
/// it in the request path (hex).
pub fn apns_token(n: u8) -> (String, String) {
    use base64::Engine as _;
    let raw = [n; 32];
    (base64::engine::general_purpose::STANDARD.encode(raw), hex::encode(raw))
}

/// A gateway with one token-auth APNs app (`app_id`) aimed at a fresh fake APNs.
pub struct WithApns {
    pub gw: TestGateway,
    pub fake: FakeApns,
    /// Holds the key files; dropping it deletes them.
    pub dir: tempfile::TempDir,
}

impl WithApns {
    pub async fn start(app_id: &str, settings: Settings) -> WithApns {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (fake, p8) = FakeApns::start_token_auth(&ca, APNS_TEAM_ID, APNS_KEY_ID).await;
        let apps = apns_app(app_id, dir.path(), &fake, &ca, &p8, "");
        let gw = TestGateway::start(&Settings { apps, ..settings }).await;
        WithApns { gw, fake, dir }
    }
}

/// A gateway with one FCM app (`app_id`, plus `extra` YAML lines) aimed at a fresh fake FCM.
pub struct WithFcm {
    pub gw: TestGateway,
    pub fake: FakeFcm,
    _dir: tempfile::TempDir,
}

impl WithFcm {
    pub async fn start(app_id: &str, settings: Settings, extra: &str) -> WithFcm {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFcm::start().await;
        let apps = fcm_app(app_id, dir.path(), &fake, extra);
        let gw = TestGateway::start(&Settings { apps, ..settings }).await;
        WithFcm { gw, fake, _dir: dir }
    }
}

pub const APNS_KEY_ID: &str = "ABC123DEFG";
pub const APNS_TEAM_ID: &str = "TEAM123456";
pub const FCM_PROJECT: &str = "herald-test";

/// An FCM app aimed at `fake` (plain HTTP), its service account's `token_uri` at the fake too.
pub fn fcm_app(app_id: &str, dir: &Path, fake: &FakeFcm, extra: &str) -> String {
    let sa = write_file(dir, &format!("{app_id}.json"), fake.service_account_json(FCM_PROJECT));
    format!(
        "  \"{app_id}\":\n    type: fcm\n    service_account_file: {}\n    endpoint: {}\n{extra}",
        sa.display(),
        fake.url()
    )
}

/// A running gateway; dropping it stops it.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl TestGateway {
    pub async fn start(settings: &Settings) -> TestGateway {
        TestGateway::start_yaml(&settings.yaml()).await
    }

    /// Boots from a whole YAML text (for settings `Settings` does not cover).
    pub async fn start_yaml(yaml: &str) -> TestGateway {
        let config = herald::Config::from_yaml(yaml, "test.yaml", Path::new("."))
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{yaml}"));
        let app = herald::App::build(config).await.expect("app builds");
        let addr = app.addrs()[0];
        let admin_addr = app.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = rx.await;
        }));
        TestGateway { addr, admin_addr, stop: Some(tx), task: Some(task), client: client() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// POSTs a notify body; returns status, parsed JSON body and headers.
    pub async fn notify(&self, body: &Value) -> Reply {
        self.request(
            Method::POST,
            &self.url("/_matrix/push/v1/notify"),
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn request(&self, method: Method, url: &str, body: Vec<u8>) -> Reply {
        send(&self.client, method, url, body).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self.request(Method::GET, &self.admin_url("/metrics"), Vec::new()).await;
        String::from_utf8(r.raw.to_vec()).unwrap()
    }

    /// Signals shutdown and waits for `App::run` to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.expect("app task panicked")
    }

    pub fn begin_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// An HTTP answer as tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub raw: Bytes,
    pub json: Value,
}

impl Reply {
    pub fn errcode(&self) -> &str {
        self.json["errcode"].as_str().unwrap_or("")
    }

    pub fn rejected(&self) -> Vec<String> {
        let mut v: Vec<String> = self.json["rejected"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    body: Vec<u8>,
) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    exchange(client, request, Duration::from_secs(30)).await
}

/// Sends `request` and reads the whole answer (JSON parsed when it is JSON), failing the test
/// when no answer comes within `timeout`.
pub async fn exchange(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Reply {
    let response = tokio::time::timeout(timeout, client.request(request))
        .await
        .expect("the server answered in time")
        .expect("the request reached the server");
    let status = response.status();
    let headers = response.headers().clone();
    let raw = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Reply { status, headers, raw, json }
}

/// A notify body for `devices` given as `(app_id, pushkey)`, about one message event.
pub fn message(event_id: &str, devices: &[(&str, &str)]) -> Value {
    serde_json::json!({
        "notification": {
            "event_id": event_id,
            "room_id": "!lunch:example.org",
            "type": "m.room.message",
            "sender": "@bob:example.org",
            "sender_display_name": "Bob",
            "room_name": "Lunch",
            "prio": "high",
            "content": { "msgtype": "m.text", "body": "Pizza at noon?" },
            "counts": { "unread": 2, "missed_calls": 1 },
            "devices": devices.iter().map(|(app, key)| serde_json::json!({
                "app_id": app, "pushkey": key, "pushkey_ts": 1_700_000_000, "data": {}, "tweaks": { "sound": "bing" }
            })).collect::<Vec<_>>(),
        }
    })
}

/// A badge-only body (no event id).
pub fn badge(unread: u64, devices: &[(&str, &str)]) -> Value {
    serde_json::json!({
        "notification": {
            "counts": { "unread": unread },
            "devices": devices.iter().map(|(app, key)| serde_json::json!({ "app_id": app, "pushkey": key })).collect::<Vec<_>>(),
        }
    })
}

/// Path of a file under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Compares `actual` with the golden JSON file `name`, ignoring the keys in `volatile`
/// (top level or one object down). `HERALD_BLESS=1` rewrites the file.
pub fn assert_golden(name: &str, actual: &Value) {
    let path = fixture(name);
    if std::env::var_os("HERALD_BLESS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(actual).unwrap() + "\n").unwrap();
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()));
    let expected: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        actual,
        &expected,
        "outgoing payload differs from {}\nactual:\n{}",
        path.display(),
        serde_json::to_string_pretty(actual).unwrap()
    );
}
