//! The whole push flow end to end: a message in a room of the embedded homeserver → the
//! recipient's push rules → their HTTP pusher → the real herald gateway → a loopback fake APNs
//! or FCM, looked at where the phone would see it (the provider request).
//!
//! Waits are bounded polls with a deadline, never sleeps. "Nothing was pushed" is shown with a
//! barrier: a later push that the pusher queue (strictly ordered per pusher) or another user's
//! pusher must send after the one that should not exist. Timing assertions are lower bounds
//! only. The restart test runs the real `herald homeserver` binary and kills it with SIGKILL.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::support::fake_apns::Reply;
use crate::support::fake_fcm::FcmReply;
use crate::support::gateway::{Settings, WithApns, WithFcm, apns_token, client, send};
use crate::support::matrix::{SERVER_NAME, TestHomeserver, User, esc};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
const APNS_APP: &str = "im.example.ios";
const FCM_APP: &str = "im.example.android";
const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";
/// How long any single wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Provider: one fake (APNs or FCM) behind a real gateway, seen through one shape of push.
// ---------------------------------------------------------------------------------------------

/// One request the fake provider received, reduced to what these tests compare.
#[derive(Clone, Debug)]
struct Push {
    /// The device token as the provider sees it (APNs: hex; FCM: the pushkey).
    token: String,
    /// What the fake answered (200 = delivered).
    status: u16,
    /// The event id in the payload (`None` for a badge-only update).
    event_id: Option<String>,
    /// `apns-priority: 10` / `android.priority: HIGH`.
    high: bool,
    /// The whole payload (APNs JSON; FCM `message`).
    body: Value,
}

impl Push {
    fn delivered(&self) -> bool {
        self.status == 200
    }
}

/// A real gateway wired to a fake provider.
enum Provider {
    Apns(WithApns),
    Fcm(WithFcm),
}

/// A pusher's device: the pushkey the homeserver stores and the token the provider sees.
#[derive(Clone, Debug)]
struct Device {
    pushkey: String,
    token: String,
}

impl Provider {
    async fn apns(settings: Settings) -> Provider {
        Provider::Apns(WithApns::start(APNS_APP, settings).await)
    }

    async fn fcm(settings: Settings) -> Provider {
        Provider::Fcm(WithFcm::start(FCM_APP, settings, "").await)
    }

    fn app_id(&self) -> &'static str {
        match self {
            Provider::Apns(_) => APNS_APP,
            Provider::Fcm(_) => FCM_APP,
        }
    }

    /// Device number `n` of this provider.
    fn device(&self, n: u8) -> Device {
        match self {
            Provider::Apns(_) => {
                let (pushkey, token) = apns_token(n);
                Device { pushkey, token }
            }
            Provider::Fcm(_) => {
                let key = format!("fcm-registration-token-{n}");
                Device { pushkey: key.clone(), token: key }
            }
        }
    }

    /// The gateway's notify URL.
    fn notify_url(&self) -> String {
        match self {
            Provider::Apns(s) => s.gw.url(NOTIFY_PATH),
            Provider::Fcm(s) => s.gw.url(NOTIFY_PATH),
        }
    }

    /// Every request the fake received, oldest first.
    fn pushes(&self) -> Vec<Push> {
        match self {
            Provider::Apns(s) => s
                .fake
                .requests()
                .into_iter()
                .map(|r| Push {
                    high: r.header("apns-priority") == Some("10"),
                    event_id: r.body["event_id"].as_str().map(str::to_owned),
                    token: r.token,
                    status: r.status,
                    body: r.body,
                })
                .collect(),
            Provider::Fcm(s) => s
                .fake
                .requests()
                .into_iter()
                .map(|r| {
                    let message = r.message().clone();
                    Push {
                        token: message["token"].as_str().unwrap_or_default().to_owned(),
                        status: r.status,
                        event_id: message["data"]["event_id"].as_str().map(str::to_owned),
                        high: message["android"]["priority"] == "HIGH",
                        body: message,
                    }
                })
                .collect(),
        }
    }

    /// The requests for `device`, oldest first.
    fn pushes_to(&self, device: &Device) -> Vec<Push> {
        self.pushes().into_iter().filter(|p| p.token == device.token).collect()
    }

    /// Waits until `device` got at least `n` requests; returns all of its requests.
    async fn wait_for(&self, device: &Device, n: usize) -> Vec<Push> {
        eventually(&format!("{n} push(es) to {}", device.token), || {
            let pushes = self.pushes_to(device);
            (pushes.len() >= n).then_some(pushes)
        })
        .await
    }

    /// Waits until `device` got at least `n` delivered pushes; returns those.
    async fn wait_delivered(&self, device: &Device, n: usize) -> Vec<Push> {
        eventually(&format!("{n} delivered push(es) to {}", device.token), || {
            let pushes: Vec<Push> =
                self.pushes_to(device).into_iter().filter(Push::delivered).collect();
            (pushes.len() >= n).then_some(pushes)
        })
        .await
    }

    /// The provider will say the device's token is dead (APNs 410 Unregistered, FCM 404
    /// UNREGISTERED).
    fn reject(&self, device: &Device) {
        match self {
            Provider::Apns(s) => s.fake.respond(&device.token, vec![Reply::unregistered()]),
            Provider::Fcm(s) => s.fake.respond(&device.token, vec![FcmReply::unregistered()]),
        }
    }

    /// The provider will fail the next `n` requests for the device (APNs 500, FCM 503
    /// UNAVAILABLE).
    fn fail(&self, device: &Device, n: usize) {
        match self {
            Provider::Apns(s) => {
                s.fake.respond(&device.token, vec![Reply::internal_server_error(); n]);
            }
            Provider::Fcm(s) => s.fake.respond(&device.token, vec![FcmReply::unavailable(None); n]),
        }
    }

    /// The unread count a push carries: APNs `aps.badge` (or `unread_count` for
    /// `event_id_only`), FCM `data.unread`.
    fn unread(&self, push: &Push) -> Option<u64> {
        match self {
            Provider::Apns(_) => {
                push.body["aps"]["badge"].as_u64().or_else(|| push.body["unread_count"].as_u64())
            }
            Provider::Fcm(_) => push.body["data"]["unread"].as_str().and_then(|s| s.parse().ok()),
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, failing the test after [`DEADLINE`].
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(started.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Front: a switchable pass-through in front of the gateway that records the homeserver's tries.
// ---------------------------------------------------------------------------------------------

/// One POST the homeserver made to the front.
#[derive(Clone, Debug)]
struct Attempt {
    at: Instant,
    /// The notify body the homeserver sent.
    body: Value,
    /// What the front answered (503 while down, else the gateway's status).
    status: u16,
}

impl Attempt {
    fn event_id(&self) -> Option<&str> {
        self.body["notification"]["event_id"].as_str()
    }
}

struct FrontState {
    /// The gateway's notify URL.
    target: String,
    up: AtomicBool,
    /// Answers to give before anything else, oldest first: a status and a `Retry-After`.
    script: Mutex<VecDeque<(StatusCode, Option<u64>)>>,
    attempts: Mutex<Vec<Attempt>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A loopback "gateway" that answers 503 while down and otherwise forwards every notify to the
/// real gateway, recording when each homeserver attempt arrived.
struct Front {
    addr: SocketAddr,
    state: Arc<FrontState>,
    task: JoinHandle<()>,
}

impl Front {
    async fn start(target: String, up: bool) -> Front {
        let state = Arc::new(FrontState {
            target,
            up: AtomicBool::new(up),
            script: Mutex::default(),
            attempts: Mutex::default(),
            client: client(),
        });
        let router = Router::new().route(NOTIFY_PATH, post(front_notify)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Front { addr, state, task }
    }

    /// The notify URL to give the pusher.
    fn url(&self) -> String {
        format!("http://{}{NOTIFY_PATH}", self.addr)
    }

    fn set_up(&self, up: bool) {
        self.state.up.store(up, Ordering::SeqCst);
    }

    /// The next attempts get these answers (status, `Retry-After` seconds) instead of the
    /// gateway's, one each, whether the front is up or down.
    fn answer_next(&self, answers: &[(u16, Option<u64>)]) {
        let mut script = self.state.script.lock().unwrap();
        for (status, retry_after) in answers {
            script.push_back((StatusCode::from_u16(*status).unwrap(), *retry_after));
        }
    }

    fn attempts(&self) -> Vec<Attempt> {
        self.state.attempts.lock().unwrap().clone()
    }

    /// Waits until the homeserver made at least `n` attempts; returns them all.
    async fn wait_for(&self, n: usize) -> Vec<Attempt> {
        eventually(&format!("{n} attempt(s) at the gateway"), || {
            let attempts = self.attempts();
            (attempts.len() >= n).then_some(attempts)
        })
        .await
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn front_notify(State(state): State<Arc<FrontState>>, body: Bytes) -> Response {
    let at = Instant::now();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let scripted = state.script.lock().unwrap().pop_front();
    if let Some((status, retry_after)) = scripted {
        let error = json!({"errcode": "M_UNKNOWN", "error": "scripted answer (test)"});
        state.attempts.lock().unwrap().push(Attempt { at, body: json, status: status.as_u16() });
        let mut response =
            (status, [(http::header::CONTENT_TYPE, "application/json")], error.to_string())
                .into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(http::header::RETRY_AFTER, seconds.into());
        }
        return response;
    }
    let (status, answer) = if state.up.load(Ordering::SeqCst) {
        let reply = send(&state.client, Method::POST, &state.target, body.to_vec()).await;
        (reply.status, reply.raw)
    } else {
        let down = json!({"errcode": "M_UNKNOWN", "error": "gateway is down (test)"});
        (StatusCode::SERVICE_UNAVAILABLE, Bytes::from(down.to_string()))
    };
    state.attempts.lock().unwrap().push(Attempt { at, body: json, status: status.as_u16() });
    (status, [(http::header::CONTENT_TYPE, "application/json")], answer).into_response()
}

// ---------------------------------------------------------------------------------------------
// Matrix helpers
// ---------------------------------------------------------------------------------------------

async fn set_displayname(user: &User, name: &str) {
    let path = format!("/profile/{}/displayname", esc(&user.user_id));
    let reply = user.put(&path, &json!({"displayname": name})).await;
    assert_eq!(reply.status, 200, "displayname: {}", reply.json);
}

/// `creator` makes a room with `members` (invited, then joined), with an optional name.
async fn room_with(creator: &User, members: &[&User], name: Option<&str>) -> String {
    let invite: Vec<&str> = members.iter().map(|u| u.user_id.as_str()).collect();
    let mut body = json!({"invite": invite});
    if let Some(name) = name {
        body["name"] = json!(name);
    }
    let room = creator.create_room(body).await;
    for member in members {
        member.join(&room).await;
    }
    room
}

/// The user's unread notifications over all joined rooms, as `/sync` reports them.
async fn unread_total(user: &User) -> u64 {
    let sync = user.sync(None, 0).await;
    sync["rooms"]["join"]
        .as_object()
        .map(|rooms| {
            rooms
                .values()
                .map(|r| r["unread_notifications"]["notification_count"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

async fn pushers(user: &User) -> Vec<Value> {
    let reply = user.get("/pushers").await;
    assert_eq!(reply.status, 200, "pushers: {}", reply.json);
    reply.json["pushers"].as_array().cloned().unwrap_or_default()
}

async fn set_pusher(user: &User, provider: &Provider, device: &Device, url: &str, data: Value) {
    user.set_pusher(provider.app_id(), &device.pushkey, url, data).await;
}

fn event_ids(pushes: &[Push]) -> Vec<Option<&str>> {
    pushes.iter().map(|p| p.event_id.as_deref()).collect()
}

/// A fresh homeserver with `alice` and then `bob` registered on it.
async fn alice_and_bob() -> (TestHomeserver, User, User) {
    let hs = TestHomeserver::start().await;
    let alice = hs.register("alice").await;
    let bob = hs.register("bob").await;
    (hs, alice, bob)
}

/// Gives `user` a default pusher for `device(n)` of `p` whose gateway URL is `url`; returns
/// that device.
async fn pushing_to(user: &User, p: &Provider, n: u8, url: &str) -> Device {
    let device = p.device(n);
    set_pusher(user, p, &device, url, json!({})).await;
    device
}

/// Alice and Bob in a DM on a fresh homeserver; Bob's phone (`device(n)` of `p`) has a pusher
/// whose gateway URL is `url`.
async fn dm_with_bob_pushing_to(
    p: &Provider,
    n: u8,
    url: &str,
) -> (TestHomeserver, User, User, String, Device) {
    let (hs, alice, bob) = alice_and_bob().await;
    let dm = room_with(&alice, &[&bob], None).await;
    let bob_phone = pushing_to(&bob, p, n, url).await;
    (hs, alice, bob, dm, bob_phone)
}

// ---------------------------------------------------------------------------------------------
// 1. A message reaches the recipient's phone, once, with the right payload and priority.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn apns_message_pushes_once_to_the_recipient_with_ids_name_badge_and_sound() {
    let p = Provider::apns(Settings::default()).await;
    let (_hs, alice, bob) = alice_and_bob().await;
    set_displayname(&alice, "Alice").await;
    let dm = room_with(&alice, &[&bob], None).await;
    let alice_phone = pushing_to(&alice, &p, 1, &p.notify_url()).await;
    let bob_phone = pushing_to(&bob, &p, 2, &p.notify_url()).await;

    let event = alice.send_text(&dm, "hello there").await;
    let pushes = p.wait_for(&bob_phone, 1).await;
    let push = &pushes[0];
    assert!(push.delivered(), "{push:?}");
    assert_eq!(push.event_id.as_deref(), Some(event.as_str()), "{}", push.body);
    assert_eq!(push.body["room_id"], json!(dm));
    assert_eq!(
        push.body["aps"]["alert"],
        json!({"loc-key": "MSG_FROM_USER_WITH_CONTENT", "loc-args": ["Alice", "hello there"]}),
        "the sender's display name, not their user id"
    );
    let unread = unread_total(&bob).await;
    assert!(unread >= 1);
    assert_eq!(p.unread(push), Some(unread), "badge = bob's unread total: {}", push.body);
    assert_eq!(push.body["aps"]["sound"], "default", "room_one_to_one sets sound: default");
    assert!(push.high, "a sound makes the push high priority (apns-priority 10)");

    // Barrier for alice's phone: her first push must be bob's reply, so her own message never
    // reached her device.
    let reply = bob.send_text(&dm, "hi").await;
    let to_alice = p.wait_for(&alice_phone, 1).await;
    assert_eq!(event_ids(&to_alice), [Some(reply.as_str())]);
    // Bob's reply marks the room read (sending an event moves his receipt), so his phone
    // also gets a badge-only update of 0 after the message: one event push, exactly once.
    let to_bob = p.pushes_to(&bob_phone);
    let events: Vec<_> = event_ids(&to_bob).into_iter().flatten().collect();
    assert_eq!(events, [event.as_str()], "exactly once");
}

#[tokio::test]
async fn apns_mention_is_high_priority_and_a_plain_group_message_is_not() {
    let p = Provider::apns(Settings::default()).await;
    let (hs, alice, bob) = alice_and_bob().await;
    let carol = hs.register("carol").await;
    set_displayname(&alice, "Alice").await;
    let group = room_with(&alice, &[&bob, &carol], Some("Lunch")).await;
    let bob_phone = pushing_to(&bob, &p, 3, &p.notify_url()).await;

    let plain = alice.send_text(&group, "pizza?").await;
    let pushes = p.wait_for(&bob_phone, 1).await;
    let push = &pushes[0];
    assert_eq!(push.event_id.as_deref(), Some(plain.as_str()));
    assert_eq!(push.body["aps"]["alert"]["loc-args"], json!(["Alice", "Lunch", "pizza?"]));
    assert!(!push.high, "`.m.rule.message` has no sound or highlight: apns-priority 5");
    assert!(push.body["aps"].get("sound").is_none(), "{}", push.body);
    assert_eq!(p.unread(push), Some(unread_total(&bob).await));

    let mention = alice.send_mention(&group, &bob.user_id, "you there?").await;
    let pushes = p.wait_for(&bob_phone, 2).await;
    let push = &pushes[1];
    assert_eq!(push.event_id.as_deref(), Some(mention.as_str()));
    assert!(push.high, "a mention highlights: apns-priority 10");
    assert_eq!(push.body["aps"]["sound"], "default");
    assert_eq!(p.unread(push), Some(unread_total(&bob).await));
    assert_eq!(pushes.len(), 2);
}

#[tokio::test]
async fn fcm_message_carries_ids_name_unread_and_priority_then_a_receipt_clears_it() {
    let p = Provider::fcm(Settings::default()).await;
    let (hs, alice, bob) = alice_and_bob().await;
    let carol = hs.register("carol").await;
    set_displayname(&alice, "Alice").await;
    let dm = room_with(&alice, &[&bob], None).await;
    let group = room_with(&alice, &[&bob, &carol], Some("Lunch")).await;
    let bob_phone = pushing_to(&bob, &p, 1, &p.notify_url()).await;

    let first = alice.send_text(&dm, "hello there").await;
    let pushes = p.wait_for(&bob_phone, 1).await;
    let data = &pushes[0].body["data"];
    assert_eq!(data["event_id"], json!(first));
    assert_eq!(data["room_id"], json!(dm));
    assert_eq!(data["sender"], json!(alice.user_id));
    assert_eq!(data["sender_display_name"], "Alice");
    assert_eq!(data["content_body"], "hello there");
    assert_eq!(p.unread(&pushes[0]), Some(unread_total(&bob).await));
    // FCM has no sound field: the sound tweak shows as high priority.
    assert_eq!(data["prio"], "high");
    assert!(pushes[0].high, "android.priority HIGH: {}", pushes[0].body);

    // Reading the DM clears the badge: a counts-only push, still sent although unread is 0.
    bob.receipt(&dm, &first).await;
    assert_eq!(unread_total(&bob).await, 0);
    let pushes = p.wait_for(&bob_phone, 2).await;
    assert_badge_clear(&pushes[1]);

    let plain = alice.send_text(&group, "pizza?").await;
    let pushes = p.wait_for(&bob_phone, 3).await;
    assert_eq!(pushes[2].event_id.as_deref(), Some(plain.as_str()));
    assert_eq!(pushes[2].body["data"]["prio"], "normal");
    assert!(!pushes[2].high, "android.priority NORMAL: {}", pushes[2].body);
    assert_eq!(p.unread(&pushes[2]), Some(1));

    let mention = alice.send_mention(&group, &bob.user_id, "you there?").await;
    let pushes = p.wait_for(&bob_phone, 4).await;
    assert_eq!(pushes[3].event_id.as_deref(), Some(mention.as_str()));
    assert!(pushes[3].high, "{}", pushes[3].body);
    assert_eq!(p.unread(&pushes[3]), Some(2));
    assert_eq!(unread_total(&bob).await, 2);

    bob.receipt(&group, &mention).await;
    let pushes = p.wait_for(&bob_phone, 5).await;
    assert_badge_clear(&pushes[4]);
    assert_eq!(pushes.len(), 5, "{:?}", event_ids(&pushes));
}

/// An FCM counts-only push with `unread: "0"` and nothing about an event.
fn assert_badge_clear(push: &Push) {
    assert!(push.delivered());
    assert_eq!(push.event_id, None, "{}", push.body);
    assert_eq!(push.body["data"], json!({"prio": "normal", "unread": "0"}));
    assert!(!push.high, "{}", push.body);
}

// ---------------------------------------------------------------------------------------------
// 2. What must not push.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn notices_and_muted_rooms_do_not_push_while_other_rooms_do() {
    let p = Provider::apns(Settings::default()).await;
    let (_hs, alice, bob) = alice_and_bob().await;
    let open = room_with(&alice, &[&bob], None).await;
    let muted = room_with(&alice, &[&bob], None).await;
    let mute = format!("/pushrules/global/room/{}", esc(&muted));
    let reply = bob.put(&mute, &json!({"actions": []})).await;
    assert_eq!(reply.status, 200, "mute: {}", reply.json);
    let bob_phone = pushing_to(&bob, &p, 4, &p.notify_url()).await;

    alice
        .send(&open, "m.room.message", json!({"msgtype": "m.notice", "body": "bot says hi"}))
        .await;
    let in_muted = alice.send_text(&muted, "shh").await;
    // Bob's queue is ordered: had the notice or the muted message pushed, they would come first.
    let barrier = alice.send_text(&open, "hello there").await;
    let pushes = p.wait_for(&bob_phone, 1).await;
    assert_eq!(event_ids(&pushes), [Some(barrier.as_str())], "only the open room's message");

    // The mute holds for later messages too, and the open room still pushes.
    alice.send_text(&muted, "still shh").await;
    let second = alice.send_text(&open, "again").await;
    let pushes = p.wait_for(&bob_phone, 2).await;
    assert_eq!(event_ids(&pushes), [Some(barrier.as_str()), Some(second.as_str())]);
    assert!(p.pushes().iter().all(|p| p.event_id.as_deref() != Some(in_muted.as_str())));
}

// ---------------------------------------------------------------------------------------------
// 3. A read receipt sends a badge-only update.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn read_receipt_sends_a_badge_only_update_of_zero() {
    let p = Provider::apns(Settings::default()).await;
    let (_hs, alice, bob, dm, bob_phone) = dm_with_bob_pushing_to(&p, 5, &p.notify_url()).await;

    let first = alice.send_text(&dm, "one").await;
    let second = alice.send_text(&dm, "two").await;
    let pushes = p.wait_for(&bob_phone, 2).await;
    assert_eq!(event_ids(&pushes), [Some(first.as_str()), Some(second.as_str())]);
    assert!(p.unread(&pushes[1]).unwrap() >= 2, "{}", pushes[1].body);

    bob.receipt(&dm, &second).await;
    let pushes = p.wait_for(&bob_phone, 3).await;
    let badge = &pushes[2];
    assert!(badge.delivered());
    assert_eq!(badge.body, json!({"aps": {"badge": 0}}), "counts only, no alert, no sound");
    assert!(!badge.high, "badge updates go at apns-priority 5");
    assert_eq!(unread_total(&bob).await, 0);

    // A receipt that changes nothing sends nothing: the next push is the next message.
    bob.receipt(&dm, &second).await;
    let third = alice.send_text(&dm, "three").await;
    let pushes = p.wait_for(&bob_phone, 4).await;
    assert_eq!(pushes[3].event_id.as_deref(), Some(third.as_str()), "{:?}", event_ids(&pushes));
    assert_eq!(p.unread(&pushes[3]), Some(1));
}

#[tokio::test]
async fn receipt_while_a_badge_update_is_in_flight_still_clears_the_badge() {
    let p = Provider::apns(Settings::default()).await;
    let (_hs, alice, bob) = alice_and_bob().await;
    let first_room = room_with(&alice, &[&bob], None).await;
    let second_room = room_with(&alice, &[&bob], None).await;
    let bob_phone = pushing_to(&bob, &p, 11, &p.notify_url()).await;
    let one = alice.send_text(&first_room, "one").await;
    let two = alice.send_text(&second_room, "two").await;
    p.wait_for(&bob_phone, 2).await;

    // The provider holds the next push (the badge after the first receipt) for half a second
    // (under the gateway's 1 s upstream timeout); the second receipt lands while it is in flight.
    let Provider::Apns(apns) = &p else { unreachable!() };
    apns.fake.respond(&bob_phone.token, vec![Reply::Delay(Duration::from_millis(500))]);
    bob.receipt(&first_room, &one).await;
    let pushes = p.wait_for(&bob_phone, 3).await;
    assert_eq!(pushes[2].body, json!({"aps": {"badge": 1}}));
    bob.receipt(&second_room, &two).await;
    assert_eq!(unread_total(&bob).await, 0);

    // The phone must end up with badge 0, not stay at 1 until the next message.
    let pushes = eventually("a badge-0 update", || {
        let pushes = p.pushes_to(&bob_phone);
        pushes.iter().any(|p| p.body == json!({"aps": {"badge": 0}})).then_some(pushes)
    })
    .await;
    assert_eq!(pushes.len(), 4, "{:?}", pushes.iter().map(|p| &p.body).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// 4. A pushkey the provider says is dead removes the pusher.
// ---------------------------------------------------------------------------------------------

async fn rejected_pushkey_removes_the_pusher(p: Provider) {
    let (hs, alice, bob) = alice_and_bob().await;
    let carol = hs.register("carol").await;
    let room = room_with(&alice, &[&bob, &carol], None).await;
    let bob_phone = pushing_to(&bob, &p, 6, &p.notify_url()).await;
    let carol_phone = pushing_to(&carol, &p, 7, &p.notify_url()).await;
    assert_eq!(pushers(&bob).await.len(), 1);
    p.reject(&bob_phone);

    let first = alice.send_text(&room, "one").await;
    let pushes = p.wait_for(&bob_phone, 1).await;
    assert_eq!(pushes[0].event_id.as_deref(), Some(first.as_str()));
    assert!(!pushes[0].delivered());
    let started = Instant::now();
    loop {
        if pushers(&bob).await.is_empty() {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "bob's pusher was not removed after the rejection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pushers(&carol).await.len(), 1, "only the rejected pusher goes");

    // Carol's pusher is the barrier: once her push for the next message arrived, bob's phone
    // would have had one too if his pusher were still running.
    let second = alice.send_text(&room, "two").await;
    let to_carol = p.wait_for(&carol_phone, 2).await;
    assert_eq!(event_ids(&to_carol), [Some(first.as_str()), Some(second.as_str())]);
    alice.send_text(&room, "three").await;
    p.wait_for(&carol_phone, 3).await;
    assert_eq!(p.pushes_to(&bob_phone).len(), 1, "nothing after the rejection");
    assert!(pushers(&bob).await.is_empty());
}

#[tokio::test]
async fn apns_unregistered_removes_the_pusher() {
    rejected_pushkey_removes_the_pusher(Provider::apns(Settings::default()).await).await;
}

#[tokio::test]
async fn fcm_unregistered_removes_the_pusher() {
    rejected_pushkey_removes_the_pusher(Provider::fcm(Settings::default()).await).await;
}

// ---------------------------------------------------------------------------------------------
// 5. A failing provider: the homeserver backs off, then delivers everything in order, once.
// ---------------------------------------------------------------------------------------------

/// How many provider failures the first message meets.
const FAILURES: usize = 3;

async fn outage_backs_off_then_delivers_in_order_once(p: Provider) {
    let front = Front::start(p.notify_url(), true).await;
    let (_hs, alice, _bob, dm, bob_phone) = dm_with_bob_pushing_to(&p, 8, &front.url()).await;
    // The gateway makes one upstream attempt per notify (`attempts: 1`), so every homeserver
    // attempt meets exactly one scripted failure.
    p.fail(&bob_phone, FAILURES);

    let mut sent = vec![alice.send_text(&dm, "one").await];
    let first_try = front.wait_for(1).await;
    assert_eq!(first_try[0].status, 502, "the gateway answers 502 when the provider failed");
    for body in ["two", "three"] {
        sent.push(alice.send_text(&dm, body).await);
    }
    let delivered = p.wait_delivered(&bob_phone, 3).await;
    let sent: Vec<Option<&str>> = sent.iter().map(|e| Some(e.as_str())).collect();
    assert_eq!(event_ids(&delivered), sent, "all three, in send order");

    // Barrier: a fourth message; any repeat of the first three would come before it.
    let fourth = alice.send_text(&dm, "four").await;
    let delivered = p.wait_delivered(&bob_phone, 4).await;
    assert_eq!(delivered[3].event_id.as_deref(), Some(fourth.as_str()));
    assert_eq!(delivered.len(), 4, "each message delivered exactly once");
    let all = p.pushes_to(&bob_phone);
    assert_eq!(all.len(), FAILURES + 4, "{:?}", event_ids(&all));
    assert!(all[..FAILURES].iter().all(|p| !p.delivered() && p.event_id.as_deref() == sent[0]));

    // The homeserver retried only the first message while it failed, with growing gaps.
    let attempts = front.attempts();
    let tries: Vec<&Attempt> =
        attempts.iter().filter(|a| a.event_id() == sent[0]).collect::<Vec<_>>();
    assert_eq!(tries.len(), FAILURES + 1, "{attempts:?}");
    let order: Vec<Option<&str>> = attempts.iter().map(Attempt::event_id).collect();
    assert_eq!(&order[..FAILURES + 1], vec![sent[0]; FAILURES + 1], "no skipping ahead");
    let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1].at - w[0].at).collect();
    let mut floor = Duration::from_millis(900);
    for (i, gap) in gaps.iter().enumerate() {
        assert!(*gap >= floor, "retry {i} came after {gap:?}, expected at least {floor:?}");
        floor *= 2;
    }
    assert!(gaps.windows(2).all(|w| w[1] > w[0]), "gaps grow: {gaps:?}");
}

#[tokio::test]
async fn apns_outage_backs_off_then_delivers_in_order_once() {
    let settings = Settings { attempts: 1, ..Settings::default() };
    outage_backs_off_then_delivers_in_order_once(Provider::apns(settings).await).await;
}

#[tokio::test]
async fn fcm_outage_backs_off_then_delivers_in_order_once() {
    let settings = Settings { attempts: 1, ..Settings::default() };
    outage_backs_off_then_delivers_in_order_once(Provider::fcm(settings).await).await;
}

// ---------------------------------------------------------------------------------------------
// 6. SIGKILL and restart lose nothing.
// ---------------------------------------------------------------------------------------------

/// `herald homeserver` as a child process; killed (SIGKILL) when dropped.
struct HomeserverProcess {
    child: Child,
    base: String,
    /// Kept open so the child never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl HomeserverProcess {
    async fn start(db: &Path, log: &Path) -> HomeserverProcess {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = Command::new(HERALD)
            .args(["homeserver", "--bind", "127.0.0.1:0", "--server-name", SERVER_NAME])
            .arg("--db")
            .arg(db)
            .arg("--allow-insecure-pushers")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("herald homeserver starts");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let read = tokio::task::spawn_blocking(move || {
            let mut stdout = stdout;
            let mut line = String::new();
            loop {
                line.clear();
                if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                    return (stdout, None);
                }
                if let Some(url) = line.trim().strip_prefix("listening on ") {
                    return (stdout, Some(url.to_owned()));
                }
            }
        });
        let (stdout, base) = match tokio::time::timeout(DEADLINE, read).await {
            Ok(joined) => joined.unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("herald homeserver did not report its address within {DEADLINE:?}");
            }
        };
        let Some(base) = base else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "herald homeserver exited before listening:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        };
        HomeserverProcess { child, base, _stdout: stdout }
    }

    /// SIGKILL, then reap.
    fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL the homeserver");
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "killed, not exited: {status:?}");
    }
}

impl Drop for HomeserverProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigkilled_homeserver_delivers_every_queued_notification_and_to_device_after_restart() {
    let p = Provider::apns(Settings::default()).await;
    let front = Front::start(p.notify_url(), false).await;
    let dir = tempfile::tempdir().unwrap();
    let (db, log) = (dir.path().join("hs.db"), dir.path().join("hs.log"));

    let mut first = HomeserverProcess::start(&db, &log).await;
    let alice = User::register(&first.base, "alice").await;
    let bob = User::register(&first.base, "bob").await;
    let dm = room_with(&alice, &[&bob], None).await;
    let bob_phone = pushing_to(&bob, &p, 9, &front.url()).await;

    let mut sent = Vec::new();
    for body in ["one", "two", "three"] {
        sent.push(alice.send_text(&dm, body).await);
    }
    let to_device = json!({"messages": {bob.user_id.clone(): {bob.device_id.clone(): {"n": 1}}}});
    let reply = alice.put("/sendToDevice/m.test.ping/txn-1", &to_device).await;
    assert_eq!(reply.status, 200, "sendToDevice: {}", reply.json);
    // The pusher is failing (and backing off) when the process dies.
    let tries = front.wait_for(1).await;
    assert_eq!(tries[0].status, 503);
    assert_eq!(tries[0].event_id(), Some(sent[0].as_str()));
    first.kill_9();
    let tries_before_kill = front.attempts().len();

    let second = HomeserverProcess::start(&db, &log).await;
    let (mut alice, mut bob) = (alice, bob);
    alice.base = second.base.clone();
    bob.base = second.base.clone();
    front.set_up(true);

    let delivered = p.wait_delivered(&bob_phone, 3).await;
    let expected: Vec<Option<&str>> = sent.iter().map(|e| Some(e.as_str())).collect();
    assert_eq!(event_ids(&delivered), expected, "every queued notification, in order");
    // Barrier: a new message after the restart; a repeat of the first three would precede it.
    let fourth = alice.send_text(&dm, "four").await;
    let delivered = p.wait_delivered(&bob_phone, 4).await;
    assert_eq!(delivered[3].event_id.as_deref(), Some(fourth.as_str()));
    assert_eq!(delivered.len(), 4, "exactly once: {:?}", event_ids(&delivered));
    let attempts = front.attempts();
    let after_restart = attempts.get(tries_before_kill).and_then(Attempt::event_id);
    assert_eq!(after_restart, Some(sent[0].as_str()), "the restarted queue resumes at the first");

    // Bob's old access token still works, and the to-device message survived the kill.
    let sync = bob.sync(None, 0).await;
    let events = sync["to_device"]["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        events,
        [json!({"sender": alice.user_id, "type": "m.test.ping", "content": {"n": 1}})],
        "{sync}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. event_id_only pushers never carry the message.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn event_id_only_pusher_carries_no_message_content() {
    let p = Provider::apns(Settings::default()).await;
    let front = Front::start(p.notify_url(), true).await;
    let (_hs, alice, bob) = alice_and_bob().await;
    set_displayname(&alice, "Alice").await;
    let dm = room_with(&alice, &[&bob], Some("Secret Room")).await;
    let bob_phone = p.device(10);
    set_pusher(&bob, &p, &bob_phone, &front.url(), json!({"format": "event_id_only"})).await;

    let event = alice.send_text(&dm, "the secret lunch plans").await;
    let pushes = p.wait_for(&bob_phone, 1).await;
    let push = &pushes[0];
    assert!(push.delivered());
    assert_eq!(push.event_id.as_deref(), Some(event.as_str()));
    assert_eq!(push.body["room_id"], json!(dm));
    assert_eq!(p.unread(push), Some(unread_total(&bob).await));
    let text = push.body.to_string();
    for secret in ["secret lunch", "Alice", "Secret Room", "m.room.message", "@alice"] {
        assert!(!text.contains(secret), "{secret:?} leaked into the APNs payload: {text}");
    }
    assert!(push.body.get("aps").is_none(), "no alert: {text}");

    // What the homeserver sent the gateway: ids, prio and counts only (DESIGN §4).
    let sent = &front.wait_for(1).await[0].body["notification"];
    let mut keys: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["counts", "devices", "event_id", "prio", "room_id"], "{sent}");
}

// ---------------------------------------------------------------------------------------------
// 8. Regressions of the review fixes (79e219e).
// ---------------------------------------------------------------------------------------------

/// `(event id, status)` of each attempt at the front.
fn tries(front: &Front) -> Vec<(Option<String>, u16)> {
    front.attempts().iter().map(|a| (a.event_id().map(str::to_owned), a.status)).collect()
}

#[tokio::test]
async fn a_notification_the_gateway_refuses_is_skipped_not_retried() {
    let p = Provider::apns(Settings::default()).await;
    let front = Front::start(p.notify_url(), true).await;
    let (_hs, alice, _bob, dm, bob_phone) = dm_with_bob_pushing_to(&p, 12, &front.url()).await;
    // A 400 and a 413 say this very request is wrong: sending it again cannot help.
    front.answer_next(&[(400, None), (413, None)]);
    let sent = [
        alice.send_text(&dm, "one").await,
        alice.send_text(&dm, "two").await,
        alice.send_text(&dm, "three").await,
    ];
    let delivered = p.wait_delivered(&bob_phone, 1).await;
    assert_eq!(event_ids(&delivered), [Some(sent[2].as_str())], "the refused two are skipped");
    // The queue is ordered: a retry of the first two would come before any later message.
    let four = alice.send_text(&dm, "four").await;
    let delivered = p.wait_delivered(&bob_phone, 2).await;
    assert_eq!(event_ids(&delivered), [Some(sent[2].as_str()), Some(four.as_str())]);
    let expected = [
        (Some(sent[0].clone()), 400),
        (Some(sent[1].clone()), 413),
        (Some(sent[2].clone()), 200),
        (Some(four), 200),
    ];
    assert_eq!(tries(&front), expected, "each tried once, none retried");
}

#[tokio::test]
async fn a_rate_limited_or_unavailable_gateway_is_retried_honouring_retry_after() {
    let p = Provider::apns(Settings::default()).await;
    let front = Front::start(p.notify_url(), true).await;
    let (_hs, alice, _bob, dm, bob_phone) = dm_with_bob_pushing_to(&p, 13, &front.url()).await;
    // 429 asks for 2 s (more than the first backoff step, 1 s); 503 then backs off 2 s.
    front.answer_next(&[(429, Some(2)), (503, None)]);
    let one = alice.send_text(&dm, "one").await;
    let delivered = p.wait_delivered(&bob_phone, 1).await;
    assert_eq!(event_ids(&delivered), [Some(one.as_str())]);
    let expected = [(Some(one.clone()), 429), (Some(one.clone()), 503), (Some(one), 200)];
    assert_eq!(tries(&front), expected, "the same notification until it went through");
    let attempts = front.attempts();
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= Duration::from_millis(1900), "Retry-After: 2 was not honoured: {gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(1900), "the second backoff step is 2 s: {gaps:?}");
}

#[tokio::test]
async fn sending_a_message_clears_the_senders_badge() {
    let p = Provider::apns(Settings::default()).await;
    let url = p.notify_url();
    let (_hs, alice, bob, dm, bob_phone) = dm_with_bob_pushing_to(&p, 14, &url).await;
    let hello = alice.send_text(&dm, "hello").await;
    let pushes = p.wait_for(&bob_phone, 1).await;
    assert_eq!(event_ids(&pushes), [Some(hello.as_str())]);
    assert_eq!(p.unread(&pushes[0]), Some(1));

    // Bob answers: sending reads the room, so his phone's badge goes to 0.
    bob.send_text(&dm, "hi").await;
    assert_eq!(unread_total(&bob).await, 0);
    let pushes = p.wait_for(&bob_phone, 2).await;
    assert_eq!(pushes[1].body, json!({"aps": {"badge": 0}}), "a badge-only update");
}

#[tokio::test]
async fn leaving_a_room_with_unread_notifications_updates_the_badge() {
    let p = Provider::apns(Settings::default()).await;
    let (_hs, alice, bob) = alice_and_bob().await;
    let left = room_with(&alice, &[&bob], None).await;
    let kept = room_with(&alice, &[&bob], None).await;
    let bob_phone = pushing_to(&bob, &p, 15, &p.notify_url()).await;
    let one = alice.send_text(&left, "one").await;
    let two = alice.send_text(&kept, "two").await;
    let pushes = p.wait_for(&bob_phone, 2).await;
    assert_eq!(event_ids(&pushes), [Some(one.as_str()), Some(two.as_str())]);
    assert_eq!(p.unread(&pushes[1]), Some(2));

    let reply = bob.post(&format!("/rooms/{}/leave", esc(&left)), &json!({})).await;
    assert_eq!(reply.status, 200, "leave: {}", reply.json);
    assert_eq!(unread_total(&bob).await, 1);
    let pushes = p.wait_for(&bob_phone, 3).await;
    assert_eq!(pushes[2].body, json!({"aps": {"badge": 1}}), "the left room no longer counts");
}
