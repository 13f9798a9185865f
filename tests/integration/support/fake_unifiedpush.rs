//! A loopback fake of the UnifiedPush distributor herald's `unifiedpush`
//! provider sends to.
//!
//! **[`FakeDistributor`]** is a UnifiedPush distributor's push server (like
//! ntfy): `POST /up/{id}` accepts any id as a topic, refuses unsubscribed ids
//! (410) and bodies over `max_body` (413), then answers the next scripted
//! [`PushReply`] or 201 Created.
//!
//! It shares its plumbing with the Web Push fake in [`super::fake_webpush`]:
//! requests are recorded, counted in flight and held the same way, and it
//! listens and serves TLS as described there.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::fake_webpush::{
    Common, PushReply, READ_LIMIT, Refusal, created_response, error_response, refuse, server_tls,
};
use super::server::{ConnInfo, FakeServer};
use super::tls::TestCa;

/// One request to `POST /up/{id}` as the fake distributor saw it.
#[derive(Clone, Debug)]
pub struct RecordedUp {
    pub id: String,
    /// Status the fake answered; 0 for [`PushReply::Reset`].
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// ALPN negotiated on the connection (`Some(b"h2")`), `None` without TLS.
    pub alpn: Option<Vec<u8>>,
    /// Which connection it came on (1 = first accepted).
    pub conn_id: u64,
}

impl RecordedUp {
    /// The body parsed as JSON (`None` if it is not JSON).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A request header as a string (`None` if absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct UpState {
    /// Ids handed out by [`FakeDistributor::endpoint`].
    known: Mutex<HashSet<String>>,
    gone: Mutex<HashSet<String>>,
    forget_unknown: AtomicBool,
    common: Common<RecordedUp>,
}

/// A running fake UnifiedPush distributor; see the module docs.
pub struct FakeDistributor {
    server: FakeServer,
    state: Arc<UpState>,
}

impl FakeDistributor {
    /// Starts on `127.0.0.1:<ephemeral>`, with TLS from `tls` when given.
    pub async fn start(tls: Option<&TestCa>) -> FakeDistributor {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), tls).await
    }

    /// Like [`FakeDistributor::start`] but on `ip` (e.g. `127.0.0.2`).
    pub async fn start_on(ip: IpAddr, tls: Option<&TestCa>) -> FakeDistributor {
        let state = Arc::new(UpState {
            known: Mutex::new(HashSet::new()),
            gone: Mutex::new(HashSet::new()),
            forget_unknown: AtomicBool::new(false),
            common: Common::new(),
        });
        let router = Router::new()
            .route("/up/{id}", post(handle_up))
            .fallback(|| async { error_response(404, "no such resource", None) })
            .with_state(state.clone());
        let server = FakeServer::start_on(SocketAddr::new(ip, 0), router, server_tls(tls)).await;
        FakeDistributor { server, state }
    }

    /// `http://IP:PORT` or `https://IP:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The underlying server (connection counters, shutdown).
    pub fn server(&self) -> &FakeServer {
        &self.server
    }

    /// The UnifiedPush endpoint for topic `id`: `{url}/up/{id}`.
    pub fn endpoint(&self, id: &str) -> String {
        self.state.known.lock().unwrap().insert(id.to_owned());
        format!("{}/up/{id}", self.url())
    }

    /// Ends topic `id`: later pushes to it get 410 Gone.
    pub fn unsubscribe(&self, id: &str) {
        self.state.gone.lock().unwrap().insert(id.to_owned());
    }

    /// With `true`, ids never passed to [`Self::endpoint`] get 404 (default: any id is fine).
    pub fn forget_unknown(&self, on: bool) {
        self.state.forget_unknown.store(on, Ordering::SeqCst);
    }

    /// Largest accepted body in bytes (default
    /// [`DEFAULT_MAX_BODY`](super::fake_webpush::DEFAULT_MAX_BODY)); larger gets 413.
    pub fn set_max_body(&self, bytes: usize) {
        self.state.common.max_body.store(bytes, Ordering::SeqCst);
    }

    /// Queues `replies` (FIFO) for pushes to `id`; once used up, pushes get 201
    /// again. Refused requests do not consume a reply.
    pub fn respond(&self, id: &str, replies: Vec<PushReply>) {
        self.state.common.scripts.push(id, replies);
    }

    /// Scripted replies not consumed yet.
    pub fn pending_replies(&self) -> usize {
        self.state.common.scripts.pending()
    }

    /// Every request recorded so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedUp> {
        self.state.common.requests.all()
    }

    pub fn request_count(&self) -> usize {
        self.state.common.requests.len()
    }

    /// Waits until at least `n` requests were recorded (panics after `timeout`).
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedUp> {
        self.state.common.requests.wait_for(n, timeout, "UnifiedPush").await
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

async fn handle_up(
    State(state): State<Arc<UpState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let conn = parts.extensions.get::<ConnInfo>();
    let raw = axum::body::to_bytes(body, READ_LIMIT).await;
    let record = RecordedUp {
        id: id.clone(),
        status: 0,
        headers: parts.headers.clone(),
        body: raw.as_ref().cloned().unwrap_or_default(),
        alpn: conn.and_then(|c| c.alpn.clone()),
        conn_id: conn.map_or(0, |c| c.id),
    };
    let max_body = state.common.max_body.load(Ordering::SeqCst);
    let refusal = if state.gone.lock().unwrap().contains(&id) {
        Some(refuse(410, "topic has been unsubscribed"))
    } else if state.forget_unknown.load(Ordering::SeqCst)
        && !state.known.lock().unwrap().contains(&id)
    {
        Some(refuse(404, "no such topic"))
    } else if !raw.as_ref().is_ok_and(|raw| raw.len() <= max_body) {
        Some(refuse(413, format!("body exceeds {max_body} bytes")))
    } else {
        None
    };
    if let Some(Refusal(status, message)) = refusal {
        state.common.requests.push(RecordedUp { status, ..record });
        return error_response(status, &message, None);
    }
    state.common.answer(&id, |status| RecordedUp { status, ..record }, created_response).await
}
