//! The load generator: N HTTP/1.1 keep-alive connections, each sending
//! `POST /_matrix/push/v1/notify` back to back (closed loop), or at a fixed pace (open loop, for
//! the soak), with a fresh `event_id` per request. Latency goes into one HDR histogram per
//! connection, merged at the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};

pub const APNS_APP: &str = "im.bench.ios";
pub const FCM_APP: &str = "im.bench.android";
pub const WEBPUSH_APP: &str = "im.bench.web";
pub const UNIFIEDPUSH_APP: &str = "im.bench.up";
/// `https://host:port` of the fake push service (the fake upstream's second listener), set
/// once the upstream runs; device endpoints in the WebPush and UnifiedPush bodies point there.
static PUSH_BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Where the WebPush and UnifiedPush bodies' endpoints point from now on.
pub fn set_push_base(base: String) {
    let _ = PUSH_BASE.set(base);
}

fn push_base() -> &'static str {
    PUSH_BASE.get().map_or("https://127.0.0.1:9", String::as_str)
}
const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";
const EVENT_ID_SLOT: &str = "@@EVENT_ID@@";
/// With `--repeat-event-ids`, requests cycle through this many event ids.
const REPEATED_IDS: u64 = 1024;
/// Latencies are recorded in microseconds, up to a minute.
const MAX_LATENCY_US: u64 = 60_000_000;

/// The body variants of the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BodyKind {
    /// 1 device, full format: content, sender, room name, counts.
    One,
    /// 4 devices (2 APNs + 2 FCM), full format.
    Four,
    /// 1 device, `event_id_only` format.
    EventIdOnly,
    /// 1 browser: encrypted (RFC 8291) and VAPID-signed, to a push service.
    Webpush,
    /// 1 UnifiedPush device: the notification JSON POSTed to its endpoint.
    Unifiedpush,
}

impl BodyKind {
    pub const ALL: [BodyKind; 5] = [
        BodyKind::One,
        BodyKind::Four,
        BodyKind::EventIdOnly,
        BodyKind::Webpush,
        BodyKind::Unifiedpush,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BodyKind::One => "one",
            BodyKind::Four => "four",
            BodyKind::EventIdOnly => "event-id-only",
            BodyKind::Webpush => "webpush",
            BodyKind::Unifiedpush => "unifiedpush",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            BodyKind::One => "1 device, full format (APNs and FCM alternately)",
            BodyKind::Four => "4 devices: 2 APNs + 2 FCM, full format",
            BodyKind::EventIdOnly => "1 device, event_id_only (APNs and FCM alternately)",
            BodyKind::Webpush => "1 browser, full format, WebPush (encrypted, VAPID)",
            BodyKind::Unifiedpush => "1 phone, full format, UnifiedPush (plain JSON)",
        }
    }

    /// Upstream sends (and dedup entries) per request.
    pub fn devices(self) -> u64 {
        match self {
            BodyKind::Four => 4,
            BodyKind::One | BodyKind::EventIdOnly | BodyKind::Webpush | BodyKind::Unifiedpush => 1,
        }
    }
}

/// A request body split around its `event_id`, so each request costs two copies, not a
/// serialisation.
struct Template {
    head: Bytes,
    tail: Bytes,
}

impl Template {
    fn new(notification: Value) -> Template {
        let text = json!({ "notification": notification }).to_string();
        let (head, tail) = text.split_once(EVENT_ID_SLOT).expect("template has an event_id slot");
        Template {
            head: Bytes::copy_from_slice(head.as_bytes()),
            tail: Bytes::copy_from_slice(tail.as_bytes()),
        }
    }

    fn render(&self, event_id: &str) -> Bytes {
        let mut body = Vec::with_capacity(self.head.len() + event_id.len() + self.tail.len());
        body.extend_from_slice(&self.head);
        body.extend_from_slice(event_id.as_bytes());
        body.extend_from_slice(&self.tail);
        Bytes::from(body)
    }
}

/// An APNs device as a homeserver stores it: a base64 32-byte token.
fn apns_device(n: u8, event_id_only: bool) -> Value {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode([n; 32]);
    device(APNS_APP, &token, event_id_only)
}

/// An FCM device: registration tokens are ~160 characters.
fn fcm_device(n: u8, event_id_only: bool) -> Value {
    let token = format!(
        "f{n:02}Xb7cQ2SxeUm3Jd9:APA91bGq0wK3cZk8V1nRrTq5HgYp2LmX7sDfGhJkL9zXcVbNm1QwErTyUiOpAsDfGhJkLzXcVbNmQwErTyUiOp1a2S3d4F5g6H7j8K9l0ZxCvBnMqWeRtYuIoP"
    );
    device(FCM_APP, &token, event_id_only)
}

/// A browser subscription: a fixed P-256 key (`p256dh`), auth secret and endpoint.
fn webpush_device() -> Value {
    use base64::Engine as _;
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let browser = p256::SecretKey::from_slice(&[7; 32]).expect("a valid scalar").public_key();
    json!({
        "app_id": WEBPUSH_APP, "pushkey": b64(browser.to_encoded_point(false).as_bytes()),
        "pushkey_ts": 1_700_000_000,
        "data": {"endpoint": format!("{}/wp/v2/gAAAAABnbench", push_base()), "auth": b64(&[9; 16])},
    })
}

/// A UnifiedPush device: the pushkey is its endpoint.
fn unifiedpush_device() -> Value {
    let endpoint = format!("{}/up/upAbCdEfGhIjKl?up=1", push_base());
    json!({"app_id": UNIFIEDPUSH_APP, "pushkey": endpoint, "pushkey_ts": 1_700_000_000, "data": {}})
}

fn device(app_id: &str, pushkey: &str, event_id_only: bool) -> Value {
    let data = if event_id_only { json!({"format": "event_id_only"}) } else { json!({}) };
    json!({
        "app_id": app_id, "pushkey": pushkey, "pushkey_ts": 1_700_000_000,
        "data": data, "tweaks": {"sound": "default"},
    })
}

fn full(devices: Vec<Value>) -> Value {
    json!({
        "event_id": EVENT_ID_SLOT,
        "room_id": "!VbWpXqKcNoRtUsYzAb:example.org",
        "type": "m.room.message",
        "sender": "@alice.smith:example.org",
        "sender_display_name": "Alice Smith",
        "room_name": "Weekend hiking trip",
        "room_alias": "#hiking:example.org",
        "prio": "high",
        "content": {
            "msgtype": "m.text",
            "body": "Are we still on for Saturday? I checked the forecast and it looks dry until about four o'clock.",
        },
        "counts": {"unread": 3, "missed_calls": 0},
        "devices": devices,
    })
}

fn event_id_only(device: Value) -> Value {
    json!({
        "event_id": EVENT_ID_SLOT,
        "room_id": "!VbWpXqKcNoRtUsYzAb:example.org",
        "prio": "high",
        "counts": {"unread": 3},
        "devices": [device],
    })
}

/// The bodies one kind cycles through.
fn templates(kind: BodyKind) -> Vec<Template> {
    let notifications = match kind {
        BodyKind::One => vec![full(vec![apns_device(1, false)]), full(vec![fcm_device(1, false)])],
        BodyKind::Four => vec![full(vec![
            apns_device(1, false),
            apns_device(2, false),
            fcm_device(1, false),
            fcm_device(2, false),
        ])],
        BodyKind::EventIdOnly => {
            vec![event_id_only(apns_device(1, true)), event_id_only(fcm_device(1, true))]
        }
        BodyKind::Webpush => vec![full(vec![webpush_device()])],
        BodyKind::Unifiedpush => vec![full(vec![unifiedpush_device()])],
    };
    notifications.into_iter().map(Template::new).collect()
}

/// One rendered body, for the size shown in the report.
pub fn sample_body(kind: BodyKind) -> Bytes {
    templates(kind)[0].render("$sample")
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: SocketAddr,
    pub kind: BodyKind,
    pub connections: usize,
    /// Not measured.
    pub warmup: Duration,
    /// Measured, after the warm-up.
    pub duration: Duration,
    /// `None`: closed loop. `Some(rps)`: the whole run paced to `rps` requests per second.
    pub rate: Option<f64>,
    pub repeat_event_ids: bool,
}

/// Live counters for progress reports (all requests, warm-up included).
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub failed: AtomicU64,
}

/// What one run measured (the window after the warm-up only).
#[derive(Debug)]
pub struct Outcome {
    pub latency_us: Histogram<u64>,
    /// 200 answers.
    pub ok: u64,
    /// Answers other than 200.
    pub bad_status: u64,
    /// Connections that broke (they are reopened).
    pub conn_errors: u64,
    /// The first non-200 answer or connection error, for diagnosis.
    pub first_error: Option<String>,
    pub window: Duration,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        (self.ok + self.bad_status) as f64 / self.window.as_secs_f64()
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }
}

/// The measured window, shared by all connections.
#[derive(Clone, Copy)]
pub struct Window {
    pub from: Instant,
    pub until: Instant,
}

/// Runs `plan`; `window` is when measuring starts and ends (the caller samples CPU then).
pub async fn run(plan: &Plan, window: Window, progress: Arc<Progress>) -> Outcome {
    let templates = Arc::new(templates(plan.kind));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..plan.connections {
        let pace = plan.rate.map(|rps| {
            let period = Duration::from_secs_f64(plan.connections as f64 / rps);
            // Stagger the connections evenly over one period.
            let offset = period.mul_f64(conn as f64 / plan.connections as f64);
            (start + offset, period)
        });
        let ctx = Connection {
            id: conn as u64,
            connections: plan.connections as u64,
            addr: plan.addr,
            templates: templates.clone(),
            repeat_event_ids: plan.repeat_event_ids,
            window,
            pace,
            progress: progress.clone(),
        };
        tasks.spawn(ctx.run());
    }
    let mut outcome = Outcome {
        latency_us: new_histogram(),
        ok: 0,
        bad_status: 0,
        conn_errors: 0,
        first_error: None,
        window: window.until - window.from,
    };
    while let Some(joined) = tasks.join_next().await {
        let stats = joined.expect("connection task panicked");
        outcome.latency_us.add(&stats.latency_us).expect("histograms share bounds");
        outcome.ok += stats.ok;
        outcome.bad_status += stats.bad_status;
        outcome.conn_errors += stats.conn_errors;
        outcome.first_error = outcome.first_error.or(stats.first_error);
    }
    outcome
}

/// The plan window for a run starting now.
pub fn window_after(warmup: Duration, duration: Duration) -> Window {
    let from = Instant::now() + warmup;
    Window { from, until: from + duration }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("histogram bounds")
}

struct Connection {
    id: u64,
    connections: u64,
    addr: SocketAddr,
    templates: Arc<Vec<Template>>,
    repeat_event_ids: bool,
    window: Window,
    pace: Option<(Instant, Duration)>,
    progress: Arc<Progress>,
}

struct ConnStats {
    latency_us: Histogram<u64>,
    ok: u64,
    bad_status: u64,
    conn_errors: u64,
    first_error: Option<String>,
}

impl Connection {
    async fn run(self) -> ConnStats {
        let mut stats = ConnStats {
            latency_us: new_histogram(),
            ok: 0,
            bad_status: 0,
            conn_errors: 0,
            first_error: None,
        };
        let mut ticks = self.pace.map(|(at, period)| {
            let mut t = tokio::time::interval_at(at, period);
            t.set_missed_tick_behavior(MissedTickBehavior::Burst);
            t
        });
        let host = self.addr.to_string();
        let mut seq: u64 = 0;
        'reconnect: while Instant::now() < self.window.until {
            let mut sender = match self.connect().await {
                Ok(sender) => sender,
                Err(e) => {
                    stats.conn_errors += 1;
                    stats.first_error.get_or_insert(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            loop {
                if let Some(ticks) = &mut ticks {
                    ticks.tick().await;
                }
                if Instant::now() >= self.window.until {
                    break 'reconnect;
                }
                let template = &self.templates[(seq % self.templates.len() as u64) as usize];
                let body = template.render(&self.event_id(seq));
                seq += 1;
                let request = Request::post(NOTIFY_PATH)
                    .header(header::HOST, &host)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body))
                    .expect("notify request");
                if sender.ready().await.is_err() {
                    stats.conn_errors += 1;
                    continue 'reconnect;
                }
                let sent = Instant::now();
                let answer = match sender.send_request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        match response.into_body().collect().await {
                            Ok(body) => Ok((status, body.to_bytes())),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                };
                let done = Instant::now();
                let (status, body) = match answer {
                    Ok(answer) => answer,
                    Err(e) => {
                        stats.conn_errors += 1;
                        self.progress.failed.fetch_add(1, Ordering::Relaxed);
                        stats.first_error.get_or_insert(format!("request: {e}"));
                        continue 'reconnect;
                    }
                };
                self.progress.done.fetch_add(1, Ordering::Relaxed);
                if status != StatusCode::OK {
                    self.progress.failed.fetch_add(1, Ordering::Relaxed);
                    stats.first_error.get_or_insert_with(|| {
                        format!(
                            "{status}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        )
                    });
                }
                if done >= self.window.from && done <= self.window.until {
                    let micros = (done - sent).as_micros().min(u128::from(MAX_LATENCY_US)) as u64;
                    stats.latency_us.saturating_record(micros.max(1));
                    if status == StatusCode::OK {
                        stats.ok += 1;
                    } else {
                        stats.bad_status += 1;
                    }
                }
            }
        }
        stats
    }

    async fn connect(
        &self,
    ) -> Result<
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        Box<dyn std::error::Error + Send + Sync>,
    > {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// `$` + 43 characters, like a v4 room's event id; unique per (connection, sequence)
    /// unless `--repeat-event-ids`.
    fn event_id(&self, seq: u64) -> String {
        if self.repeat_event_ids {
            let n = (seq * self.connections + self.id) % REPEATED_IDS;
            format!("$repeat{n:036}")
        } else {
            format!("${:08x}{seq:035}", self.id)
        }
    }
}
