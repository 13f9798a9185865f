//! The embedded homeserver's client-server API over HTTP, end to end: every route and its error
//! paths (exact statuses and errcodes), `/sync` (long-poll, unread counts, invites, leaves,
//! to-device), `GET /notifications`, the push-rules API and pushers.
//!
//! Each test starts its own server on a fresh SQLite file. Nothing sleeps to synchronise: a
//! long-poll is observed by its answer, and [`let_it_wait`] only gives a spawned request time
//! to reach the server (by yielding) so that the wake-up path is the one exercised.

use std::time::{Duration, Instant};

use herald::homeserver::HomeserverConfig;
use http::Method;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::support::gateway::Reply;
use crate::support::matrix::{
    TestHomeserver, User, esc, request, request_bytes, request_with_headers,
};

// ---- helpers ----

/// A fresh server and a registered user (password "pw") for each localpart.
async fn users<const N: usize>(names: [&str; N]) -> (TestHomeserver, [User; N]) {
    let server = TestHomeserver::start().await;
    let mut registered = Vec::with_capacity(N);
    for name in names {
        registered.push(server.register(name).await);
    }
    let Ok(users) = registered.try_into() else { unreachable!("one user per name") };
    (server, users)
}

/// A `public_chat` room of `owner` that each of `others` joined without an invite, so nothing
/// is unread for anyone yet.
async fn public_room(owner: &User, others: &[&User]) -> String {
    let room = owner.create_room(json!({"preset": "public_chat"})).await;
    for user in others {
        user.join(&room).await;
    }
    room
}

/// `/rooms/{room}{rest}` with the room id escaped.
fn room_path(room: &str, rest: &str) -> String {
    format!("/rooms/{}{rest}", esc(room))
}

#[track_caller]
fn assert_error(reply: &Reply, status: u16, errcode: &str) {
    assert_eq!(
        (reply.status.as_u16(), reply.errcode()),
        (status, errcode),
        "unexpected answer: {}",
        reply.json
    );
}

#[track_caller]
fn assert_ok(reply: &Reply) {
    assert_eq!(reply.status, 200, "unexpected answer: {}", reply.json);
}

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().expect("next_batch").to_owned()
}

/// `(notification_count, highlight_count)` of `room` in a sync response.
#[track_caller]
fn counts(sync: &Value, room: &str) -> (u64, u64) {
    let unread = &sync["rooms"]["join"][room]["unread_notifications"];
    let count = |name: &str| unread[name].as_u64().unwrap_or_else(|| panic!("no {name}: {sync}"));
    (count("notification_count"), count("highlight_count"))
}

/// The user's unread `(notifications, highlights)` in `room`, from an initial sync.
async fn unread(user: &User, room: &str) -> (u64, u64) {
    counts(&user.sync(None, 0).await, room)
}

/// The timeline events of a joined room in a sync response.
fn timeline(sync: &Value, room: &str) -> Vec<Value> {
    sync["rooms"]["join"][room]["timeline"]["events"].as_array().cloned().unwrap_or_default()
}

/// `GET /rooms/{room}/state/{rest}` (`rest` is `type` or `type/key`, escaped).
async fn state(user: &User, room: &str, rest: &str) -> Reply {
    user.get(&room_path(room, &format!("/state/{rest}"))).await
}

/// The `state/{rest}` of a user's member event.
fn member(user: &User) -> String {
    format!("m.room.member/{}", esc(&user.user_id))
}

fn event_ids(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["event_id"].as_str().unwrap_or_default().to_owned()).collect()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// `PUT /rooms/{room}/send/m.room.message/{txn}` with a text message.
async fn send_with_txn(user: &User, room: &str, txn: &str, body: &str) -> Reply {
    let content = json!({"msgtype": "m.text", "body": body});
    user.put(&room_path(room, &format!("/send/m.room.message/{txn}")), &content).await
}

async fn post_receipt(user: &User, room: &str, kind: &str, event: &str) -> Reply {
    user.post(&room_path(room, &format!("/receipt/{kind}/{}", esc(event))), &json!({})).await
}

/// `PUT /sendToDevice/m.test/{txn}` with `messages` as the body's `messages`.
async fn send_to_device(user: &User, txn: &str, messages: Value) -> Reply {
    user.put(&format!("/sendToDevice/m.test/{txn}"), &json!({"messages": messages})).await
}

fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

/// Starts `GET /sync?since=…&timeout=…` for `user` in a task.
fn spawn_sync(user: &User, since: &str, timeout_ms: u64) -> JoinHandle<Value> {
    let (user, since) = (user.clone(), since.to_owned());
    tokio::spawn(async move { user.sync(Some(&since), timeout_ms).await })
}

/// Yields to the runtime (which polls I/O and blocking-task completions between yields) for a
/// short while, so that a spawned long-poll reaches the server and starts waiting. Correctness
/// never depends on it: a sync that starts late still has to return the event.
async fn let_it_wait() {
    let until = Instant::now() + Duration::from_millis(100);
    while Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

/// Awaits a spawned sync, which must answer well within its own timeout.
async fn woken(waiter: JoinHandle<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the long-poll woke up long before its 60 s timeout")
        .expect("sync task")
}

/// `GET /pushrules/global/`.
async fn global_rules(user: &User) -> Value {
    let reply = user.get("/pushrules/global/").await;
    assert_ok(&reply);
    reply.json
}

fn rule_ids(rules: &Value, kind: &str) -> Vec<String> {
    rules[kind]
        .as_array()
        .unwrap_or_else(|| panic!("no {kind} rules: {rules}"))
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn put_rule(user: &User, kind: &str, rule: &str, query: &str, body: Value) -> Reply {
    user.put(&format!("/pushrules/global/{kind}/{}{query}", esc(rule)), &body).await
}

/// A content rule body that notifies and highlights on `pattern`.
fn content_rule(pattern: &str) -> Value {
    json!({"pattern": pattern, "actions": ["notify", {"set_tweak": "highlight"}]})
}

async fn notifications(user: &User, query: &str) -> Value {
    let reply = user.get(&format!("/notifications{query}")).await;
    assert_ok(&reply);
    reply.json
}

fn notified_ids(page: &Value) -> Vec<String> {
    let list = page["notifications"].as_array().expect("notifications");
    list.iter().map(|n| n["event"]["event_id"].as_str().unwrap_or_default().to_owned()).collect()
}

/// A valid `POST /pushers/set` body for a loopback gateway nobody listens on.
fn pusher_body(app_id: &str, pushkey: &str) -> Value {
    json!({
        "kind": "http", "app_id": app_id, "pushkey": pushkey, "app_display_name": "Test",
        "device_display_name": "Phone", "lang": "en",
        "data": {"url": "http://127.0.0.1:9/_matrix/push/v1/notify"},
    })
}

async fn pushers(user: &User) -> Vec<Value> {
    let reply = user.get("/pushers").await;
    assert_ok(&reply);
    reply.json["pushers"].as_array().cloned().expect("pushers array")
}

// ---- versions, accounts and authentication ----

#[tokio::test]
async fn versions_and_login_flows_need_no_token() {
    let server = TestHomeserver::start().await;
    let versions =
        request(&server.base(), Method::GET, "/_matrix/client/versions", None, &Value::Null).await;
    assert_ok(&versions);
    let list = versions.json["versions"].as_array().expect("versions");
    assert!(list.contains(&json!("v1.7")), "{}", versions.json);
    let flows =
        request(&server.base(), Method::GET, "/_matrix/client/v3/login", None, &Value::Null).await;
    assert_ok(&flows);
    assert_eq!(flows.json["flows"], json!([{"type": "m.login.password"}]));
}

#[tokio::test]
async fn register_without_auth_answers_401_with_the_dummy_flow() {
    let server = TestHomeserver::start().await;
    let body = json!({"username": "alice", "password": "pw"});
    let reply =
        request(&server.base(), Method::POST, "/_matrix/client/v3/register", None, &body).await;
    assert_eq!(reply.status, 401, "{}", reply.json);
    assert_eq!(reply.json["flows"], json!([{"stages": ["m.login.dummy"]}]));
    assert!(reply.json["session"].is_string(), "{}", reply.json);
    // Nothing was created: the name is still free.
    server.register("alice").await;
}

async fn register_reply(server: &TestHomeserver, body: Value) -> Reply {
    let mut body = body;
    body["auth"] = json!({"type": "m.login.dummy"});
    request(&server.base(), Method::POST, "/_matrix/client/v3/register", None, &body).await
}

#[tokio::test]
async fn register_refuses_a_taken_name() {
    let (server, [_alice]) = users(["alice"]).await;
    let again = register_reply(&server, json!({"username": "alice", "password": "x"})).await;
    assert_error(&again, 400, "M_USER_IN_USE");
    let upper = register_reply(&server, json!({"username": "ALICE", "password": "x"})).await;
    assert_error(&upper, 400, "M_USER_IN_USE");
}

#[tokio::test]
async fn register_refuses_an_invalid_username() {
    let server = TestHomeserver::start().await;
    for name in ["not valid", "emoji🙂", "colon:name", ""] {
        let reply = register_reply(&server, json!({"username": name, "password": "pw"})).await;
        assert_error(&reply, 400, "M_INVALID_USERNAME");
    }
}

#[tokio::test]
async fn register_without_a_password_is_missing_param() {
    let server = TestHomeserver::start().await;
    let reply = register_reply(&server, json!({"username": "alice"})).await;
    assert_error(&reply, 400, "M_MISSING_PARAM");
}

#[tokio::test]
async fn login_with_the_right_password_opens_a_new_device() {
    let (server, [alice]) = users(["alice"]).await;
    let phone = User::login(&server.base(), "alice").await;
    assert_eq!(phone.user_id, alice.user_id);
    assert_ne!(phone.device_id, alice.device_id);
    assert_ne!(phone.token, alice.token);
    let whoami = phone.get("/account/whoami").await;
    assert_ok(&whoami);
    assert_eq!(whoami.json["user_id"], alice.user_id);
    assert_eq!(whoami.json["device_id"], phone.device_id);
}

#[tokio::test]
async fn login_with_a_wrong_password_or_an_unknown_user_is_forbidden() {
    let (server, [_alice]) = users(["alice"]).await;
    for (user, password) in
        [("alice", "wrong"), ("nobody", "pw"), ("@alice:elsewhere.example", "pw")]
    {
        let body = json!({"type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user}, "password": password});
        let reply =
            request(&server.base(), Method::POST, "/_matrix/client/v3/login", None, &body).await;
        assert_error(&reply, 403, "M_FORBIDDEN");
    }
    let body = json!({"type": "m.login.token", "token": "x"});
    let reply =
        request(&server.base(), Method::POST, "/_matrix/client/v3/login", None, &body).await;
    assert_error(&reply, 400, "M_UNKNOWN");
}

#[tokio::test]
async fn a_logged_out_token_is_unknown() {
    let (server, [alice]) = users(["alice"]).await;
    let phone = User::login(&server.base(), "alice").await;
    assert_ok(&alice.post("/logout", &json!({})).await);
    assert_error(&alice.get("/account/whoami").await, 401, "M_UNKNOWN_TOKEN");
    assert_ok(&phone.get("/account/whoami").await);
}

#[tokio::test]
async fn logout_deletes_the_device() {
    let (server, [alice, bob]) = users(["alice", "bob"]).await;
    let phone = User::login(&server.base(), "alice").await;
    assert_ok(&phone.post("/logout", &json!({})).await);
    assert_ok(&send_to_device(&bob, "t1", json!({ &alice.user_id: {"*": {"n": 1}} })).await);
    // Logging in again with the old device id makes a new device, which got nothing.
    let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user",
        "user": "alice"}, "password": "pw", "device_id": phone.device_id});
    let login =
        request(&server.base(), Method::POST, "/_matrix/client/v3/login", None, &body).await;
    assert_ok(&login);
    let token = login.json["access_token"].as_str().unwrap();
    let sync =
        request(&server.base(), Method::GET, "/_matrix/client/v3/sync", Some(token), &Value::Null)
            .await;
    assert_ok(&sync);
    assert!(to_device_events(&sync.json).is_empty(), "{}", sync.json);
    assert_eq!(to_device_events(&alice.sync(None, 0).await).len(), 1);
}

#[tokio::test]
async fn a_request_without_a_token_is_missing_token() {
    let server = TestHomeserver::start().await;
    let path = "/_matrix/client/v3/account/whoami";
    let none = request(&server.base(), Method::GET, path, None, &Value::Null).await;
    assert_error(&none, 401, "M_MISSING_TOKEN");
    let bogus = request(&server.base(), Method::GET, path, Some("syt_nope"), &Value::Null).await;
    assert_error(&bogus, 401, "M_UNKNOWN_TOKEN");
}

#[tokio::test]
async fn the_access_token_query_parameter_authenticates() {
    let (server, [alice]) = users(["alice"]).await;
    let path = format!("/_matrix/client/v3/account/whoami?access_token={}", esc(&alice.token));
    let reply = request(&server.base(), Method::GET, &path, None, &Value::Null).await;
    assert_ok(&reply);
    assert_eq!(reply.json["user_id"], alice.user_id);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_m_not_json() {
    let (_server, [alice]) = users(["alice"]).await;
    let reply = alice.call_bytes(Method::POST, "/createRoom", b"{\"name\": ".to_vec()).await;
    assert_error(&reply, 400, "M_NOT_JSON");
}

#[tokio::test]
async fn a_body_that_is_not_an_object_is_m_bad_json() {
    let (_server, [alice]) = users(["alice"]).await;
    for body in ["[1, 2]", "\"room\"", "42"] {
        let reply = alice.call_bytes(Method::POST, "/createRoom", body.as_bytes().to_vec()).await;
        assert_error(&reply, 400, "M_BAD_JSON");
    }
}

#[tokio::test]
async fn an_unknown_path_is_m_unrecognized() {
    let (server, [alice]) = users(["alice"]).await;
    assert_error(&alice.get("/no/such/endpoint").await, 404, "M_UNRECOGNIZED");
    let r0 =
        request(&server.base(), Method::GET, "/_matrix/client/r0/sync", None, &Value::Null).await;
    assert_error(&r0, 404, "M_UNRECOGNIZED");
    assert_error(&alice.delete("/sync").await, 405, "M_UNRECOGNIZED");
}

#[tokio::test]
async fn a_body_over_one_mebibyte_is_413() {
    let (server, [alice]) = users(["alice"]).await;
    let room = public_room(&alice, &[]).await;
    let body = json!({"msgtype": "m.text", "body": "x".repeat((1 << 20) + 1024)});
    let path = format!("/_matrix/client/v3{}", room_path(&room, "/send/m.room.message/big"));
    let bytes = serde_json::to_vec(&body).unwrap();
    let reply = request_bytes(&server.base(), Method::PUT, &path, Some(&alice.token), bytes).await;
    assert_error(&reply, 413, "M_TOO_LARGE");
    assert!(
        timeline(&alice.sync(None, 0).await, &room).iter().all(|e| e["type"] != "m.room.message")
    );
}

// ---- rooms ----

#[tokio::test]
async fn create_room_sets_name_topic_preset_and_invites() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = alice
        .create_room(json!({"name": "Lunch", "topic": "Where?", "preset": "private_chat",
                            "invite": [bob.user_id]}))
        .await;
    assert_eq!(state(&alice, &room, "m.room.name").await.json, json!({"name": "Lunch"}));
    assert_eq!(state(&alice, &room, "m.room.topic").await.json, json!({"topic": "Where?"}));
    let join_rules = state(&alice, &room, "m.room.join_rules").await;
    assert_eq!(join_rules.json, json!({"join_rule": "invite"}));
    let power = state(&alice, &room, "m.room.power_levels").await;
    assert_eq!(power.json["users"][&alice.user_id], 100);
    assert_eq!(state(&alice, &room, &member(&bob)).await.json["membership"], "invite");
    let invite_state = &bob.sync(None, 0).await["rooms"]["invite"][&room]["invite_state"]["events"];
    let events = invite_state.as_array().expect("bob is invited");
    assert!(events.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Lunch"));
}

#[tokio::test]
async fn a_public_chat_room_is_joinable_by_anyone() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let rule = alice.get(&room_path(&room, "/state/m.room.join_rules")).await;
    assert_eq!(rule.json, json!({"join_rule": "public"}));
    // The `/join/{roomIdOrAlias}` form.
    let joined = bob.post(&format!("/join/{}", esc(&room)), &json!({})).await;
    assert_ok(&joined);
    assert_eq!(joined.json["room_id"], room);
    let members = alice.get(&room_path(&room, "/joined_members")).await;
    assert!(members.json["joined"].get(&bob.user_id).is_some(), "{}", members.json);
}

#[tokio::test]
async fn an_invite_only_room_refuses_the_uninvited() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let refused = bob.post(&room_path(&room, "/join"), &json!({})).await;
    assert_error(&refused, 403, "M_FORBIDDEN");
    let invited = alice.post(&room_path(&room, "/invite"), &json!({"user_id": bob.user_id})).await;
    assert_ok(&invited);
    bob.join(&room).await;
    let members = bob.get(&room_path(&room, "/joined_members")).await;
    assert_ok(&members);
    assert_eq!(members.json["joined"].as_object().unwrap().len(), 2);
}

#[tokio::test]
async fn create_room_refuses_unknown_and_remote_invitees_and_presets() {
    let (_server, [alice]) = users(["alice"]).await;
    let unknown = alice.post("/createRoom", &json!({"invite": ["@nobody:test.local"]})).await;
    assert_error(&unknown, 404, "M_NOT_FOUND");
    let remote = alice.post("/createRoom", &json!({"invite": ["@bob:elsewhere.example"]})).await;
    assert_error(&remote, 400, "M_INVALID_PARAM");
    let preset = alice.post("/createRoom", &json!({"preset": "secret_chat"})).await;
    assert_error(&preset, 400, "M_INVALID_PARAM");
    let name = alice.post("/createRoom", &json!({"name": 5})).await;
    assert_error(&name, 400, "M_BAD_JSON");
    let sync = alice.sync(None, 0).await;
    assert_eq!(sync["rooms"]["join"], json!({}), "no room was created");
}

#[tokio::test]
async fn invite_checks_the_inviter_and_the_invitee() {
    let (_server, [alice, bob, carol]) = users(["alice", "bob", "carol"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let invite = |by: &User, body: Value| {
        let (by, room) = (by.clone(), room.clone());
        async move { by.post(&room_path(&room, "/invite"), &body).await }
    };
    let outsider = invite(&carol, json!({"user_id": alice.user_id})).await;
    assert_error(&outsider, 403, "M_FORBIDDEN");
    let unknown = invite(&alice, json!({"user_id": "@nobody:test.local"})).await;
    assert_error(&unknown, 404, "M_NOT_FOUND");
    let remote = invite(&alice, json!({"user_id": "@carol:elsewhere.example"})).await;
    assert_error(&remote, 400, "M_INVALID_PARAM");
    let joined = invite(&alice, json!({"user_id": bob.user_id})).await;
    assert_error(&joined, 403, "M_FORBIDDEN");
    assert_error(&invite(&alice, json!({})).await, 400, "M_MISSING_PARAM");
    assert_ok(&invite(&alice, json!({"user_id": carol.user_id})).await);
    assert_eq!(state(&alice, &room, &member(&carol)).await.json["membership"], "invite");
}

#[tokio::test]
async fn joining_an_unknown_room_or_an_alias_is_not_found() {
    let (_server, [alice]) = users(["alice"]).await;
    let unknown = alice.post(&room_path("!nope:test.local", "/join"), &json!({})).await;
    assert_error(&unknown, 404, "M_NOT_FOUND");
    let alias = alice.post(&format!("/join/{}", esc("#lunch:test.local")), &json!({})).await;
    assert_error(&alias, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn leave_removes_the_member() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    assert_ok(&bob.post(&room_path(&room, "/leave"), &json!({})).await);
    let members = alice.get(&room_path(&room, "/joined_members")).await;
    assert!(members.json["joined"].get(&bob.user_id).is_none(), "{}", members.json);
    let send = send_with_txn(&bob, &room, "t1", "still here?").await;
    assert_error(&send, 403, "M_FORBIDDEN");
    assert_error(&bob.post(&room_path(&room, "/leave"), &json!({})).await, 403, "M_FORBIDDEN");
    let unknown = bob.post(&room_path("!nope:test.local", "/leave"), &json!({})).await;
    assert_error(&unknown, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn a_repeated_txn_id_stores_one_event() {
    let (_server, [alice]) = users(["alice"]).await;
    let room = public_room(&alice, &[]).await;
    let first = send_with_txn(&alice, &room, "txn1", "once").await;
    let again = send_with_txn(&alice, &room, "txn1", "once").await;
    assert_ok(&first);
    assert_ok(&again);
    assert_eq!(first.json["event_id"], again.json["event_id"]);
    let events = timeline(&alice.sync(None, 0).await, &room);
    let messages = of_type(&events, "m.room.message");
    assert_eq!(messages.len(), 1, "{events:?}");
    assert_eq!(messages[0]["event_id"], first.json["event_id"]);
}

#[tokio::test]
async fn sending_needs_a_joined_room() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[]).await;
    assert_error(&send_with_txn(&bob, &room, "t1", "hi").await, 403, "M_FORBIDDEN");
    let unknown = send_with_txn(&bob, "!nope:test.local", "t2", "hi").await;
    assert_error(&unknown, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn state_can_be_set_and_read_with_an_empty_or_a_given_key() {
    let (_server, [alice]) = users(["alice"]).await;
    let room = public_room(&alice, &[]).await;
    let topic =
        alice.put(&room_path(&room, "/state/m.room.topic"), &json!({"topic": "cake"})).await;
    assert_ok(&topic);
    assert!(topic.json["event_id"].as_str().is_some_and(|id| id.starts_with('$')));
    let read = alice.get(&room_path(&room, "/state/m.room.topic")).await;
    assert_eq!(read.json, json!({"topic": "cake"}));
    let keyed = room_path(&room, "/state/org.example.flag/k1");
    assert_ok(&alice.put(&keyed, &json!({"on": true})).await);
    assert_eq!(alice.get(&keyed).await.json, json!({"on": true}));
    let missing = alice.get(&room_path(&room, "/state/org.example.flag/k2")).await;
    assert_error(&missing, 404, "M_NOT_FOUND");
    let full = alice.get(&room_path(&room, "/state")).await;
    assert_ok(&full);
    let all = full.json.as_array().expect("an array of state events");
    assert!(all.iter().any(|e| e["type"] == "m.room.topic" && e["state_key"] == ""));
    assert!(all.iter().any(|e| e["type"] == "org.example.flag" && e["state_key"] == "k1"));
    let own = room_path(&room, &format!("/state/{}", member(&alice)));
    assert_error(&alice.put(&own, &json!({"membership": "leave"})).await, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn a_trailing_slash_state_path_is_the_empty_state_key() {
    let (_server, [alice]) = users(["alice"]).await;
    let room = public_room(&alice, &[]).await;
    let put = alice.put(&room_path(&room, "/state/m.room.topic/"), &json!({"topic": "pie"})).await;
    assert_ok(&put);
    assert_eq!(alice.get(&room_path(&room, "/state/m.room.topic")).await.json["topic"], "pie");
    assert_eq!(alice.get(&room_path(&room, "/state/m.room.topic/")).await.json["topic"], "pie");
}

#[tokio::test]
async fn a_member_without_power_cannot_set_the_room_name() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let name = room_path(&room, "/state/m.room.name");
    assert_error(&bob.put(&name, &json!({"name": "Bob's"})).await, 403, "M_FORBIDDEN");
    assert_ok(&alice.put(&name, &json!({"name": "Alice's"})).await);
    assert_eq!(bob.get(&name).await.json, json!({"name": "Alice's"}));
}

#[tokio::test]
async fn state_and_members_are_hidden_from_non_members() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[]).await;
    for path in ["/state", "/state/m.room.create", "/joined_members"] {
        assert_error(&bob.get(&room_path(&room, path)).await, 403, "M_FORBIDDEN");
        let unknown = bob.get(&room_path("!nope:test.local", path)).await;
        assert_error(&unknown, 404, "M_NOT_FOUND");
    }
}

#[tokio::test]
async fn displayname_changes_update_the_profile_and_member_events() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let path = format!("/profile/{}/displayname", esc(&bob.user_id));
    assert_ok(&bob.put(&path, &json!({"displayname": "Robert"})).await);
    assert_eq!(alice.get(&path).await.json, json!({"displayname": "Robert"}));
    let profile = alice.get(&format!("/profile/{}", esc(&bob.user_id))).await;
    assert_eq!(profile.json, json!({"displayname": "Robert"}));
    let event = state(&alice, &room, &member(&bob)).await;
    assert_eq!(event.json, json!({"membership": "join", "displayname": "Robert"}));
    let members = alice.get(&room_path(&room, "/joined_members")).await;
    assert_eq!(members.json["joined"][&bob.user_id]["display_name"], "Robert");
}

#[tokio::test]
async fn displayname_errors() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let unknown = alice.get(&format!("/profile/{}/displayname", esc("@nobody:test.local"))).await;
    assert_error(&unknown, 404, "M_NOT_FOUND");
    let profile = alice.get(&format!("/profile/{}", esc("@nobody:test.local"))).await;
    assert_error(&profile, 404, "M_NOT_FOUND");
    let path = format!("/profile/{}/displayname", esc(&bob.user_id));
    assert_error(&alice.put(&path, &json!({"displayname": "Bobby"})).await, 403, "M_FORBIDDEN");
    assert_error(&bob.put(&path, &json!({"displayname": 5})).await, 400, "M_BAD_JSON");
}

#[tokio::test]
async fn capabilities_report_the_room_version() {
    let (_server, [alice]) = users(["alice"]).await;
    let reply = alice.get("/capabilities").await;
    assert_ok(&reply);
    let caps = &reply.json["capabilities"];
    assert_eq!(caps["m.room_versions"]["default"], "10");
    assert_eq!(caps["m.room_versions"]["available"]["10"], "stable");
    assert_eq!(caps["m.change_password"]["enabled"], false);
}

#[tokio::test]
async fn filters_are_accepted() {
    let (_server, [alice]) = users(["alice"]).await;
    let path = format!("/user/{}/filter", esc(&alice.user_id));
    let created = alice.post(&path, &json!({"room": {"timeline": {"limit": 10}}})).await;
    assert_ok(&created);
    let id = created.json["filter_id"].as_str().expect("filter_id").to_owned();
    assert_ok(&alice.get(&format!("{path}/{id}")).await);
}

#[tokio::test]
async fn account_data_round_trips_and_reaches_sync() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let since = next_batch(&alice.sync(None, 0).await);
    let path = format!("/user/{}/account_data/org.example.prefs", esc(&alice.user_id));
    assert_error(&alice.get(&path).await, 404, "M_NOT_FOUND");
    assert_ok(&alice.put(&path, &json!({"theme": "dark"})).await);
    assert_eq!(alice.get(&path).await.json, json!({"theme": "dark"}));
    assert_error(&bob.get(&path).await, 403, "M_FORBIDDEN");
    assert_error(&bob.put(&path, &json!({})).await, 403, "M_FORBIDDEN");
    let sync = alice.sync(Some(&since), 0).await;
    let events = sync["account_data"]["events"].as_array().expect("account data");
    assert_eq!(events, &[json!({"type": "org.example.prefs", "content": {"theme": "dark"}})]);
    let rules = format!("/user/{}/account_data/m.push_rules", esc(&alice.user_id));
    let read = alice.get(&rules).await;
    assert_eq!(rule_ids(&read.json["global"], "override")[0], ".m.rule.master");
    // The spec (v1.10): push rules have their own API; setting them here is a 405.
    assert_error(&alice.put(&rules, &json!({"global": {}})).await, 405, "M_BAD_JSON");
}

// ---- /sync ----

#[tokio::test]
async fn initial_sync_has_state_timeline_and_the_default_push_rules() {
    let (_server, [alice]) = users(["alice"]).await;
    let room = alice.create_room(json!({"name": "Lunch"})).await;
    let message = alice.send_text(&room, "hello").await;
    let sync = alice.sync(None, 0).await;
    let joined = &sync["rooms"]["join"][&room];
    let mut all: Vec<Value> = joined["state"]["events"].as_array().expect("state").clone();
    all.extend(timeline(&sync, &room));
    for kind in ["m.room.create", "m.room.member", "m.room.power_levels", "m.room.name"] {
        assert!(all.iter().any(|e| e["type"] == kind), "no {kind} in {joined}");
    }
    assert_eq!(event_ids(&timeline(&sync, &room)).last(), Some(&message));
    let data = sync["account_data"]["events"].as_array().expect("account data");
    let rules = data.iter().find(|e| e["type"] == "m.push_rules").expect("m.push_rules");
    let global = &rules["content"]["global"];
    assert_eq!(rule_ids(global, "override")[0], ".m.rule.master");
    assert_eq!(global["override"][0]["enabled"], false);
    assert!(rule_ids(global, "underride").contains(&".m.rule.message".to_owned()));
    assert!(sync["next_batch"].is_string());
}

#[tokio::test]
async fn incremental_sync_returns_only_new_events() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let quiet = public_room(&alice, &[&bob]).await;
    alice.send_text(&room, "before").await;
    let since = next_batch(&bob.sync(None, 0).await);
    let one = alice.send_text(&room, "one").await;
    let two = alice.send_text(&room, "two").await;
    let sync = bob.sync(Some(&since), 0).await;
    assert_eq!(event_ids(&timeline(&sync, &room)), [one, two]);
    assert_eq!(sync["rooms"]["join"][&room]["timeline"]["limited"], false);
    assert_eq!(sync["rooms"]["join"][&room]["state"]["events"], json!([]));
    assert!(sync["rooms"]["join"].get(&quiet).is_none(), "an unchanged room: {sync}");
    assert_eq!(sync["account_data"]["events"], json!([]));
    // Nothing new since then: an empty answer after the (short) timeout.
    let empty = bob.sync(Some(&next_batch(&sync)), 0).await;
    assert_eq!(empty["rooms"]["join"], json!({}));
}

#[tokio::test]
async fn a_long_poll_sync_wakes_when_another_user_sends() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let since = next_batch(&bob.sync(None, 0).await);
    let waiter = spawn_sync(&bob, &since, 60_000);
    let_it_wait().await;
    assert!(!waiter.is_finished(), "the long-poll answered before anything happened");
    let event = alice.send_text(&room, "wake up").await;
    let sync = woken(waiter).await;
    assert_eq!(event_ids(&timeline(&sync, &room)), [event]);
}

#[tokio::test]
async fn a_long_poll_sync_with_nothing_new_waits_for_its_timeout() {
    let (_server, [alice]) = users(["alice"]).await;
    public_room(&alice, &[]).await;
    let since = next_batch(&alice.sync(None, 0).await);
    let started = Instant::now();
    let sync = alice.sync(Some(&since), 300).await;
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    assert_eq!(sync["rooms"]["join"], json!({}));
    assert_eq!(next_batch(&sync), since);
}

#[tokio::test]
async fn full_state_still_limits_the_timeline_by_since() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    alice.send_text(&room, "old").await;
    let since = next_batch(&bob.sync(None, 0).await);
    let new = alice.send_text(&room, "new").await;
    let reply = bob.get(&format!("/sync?full_state=true&since={}", esc(&since))).await;
    assert_ok(&reply);
    assert_eq!(event_ids(&timeline(&reply.json, &room)), [new], "{}", reply.json);
    let state = reply.json["rooms"]["join"][&room]["state"]["events"].as_array().unwrap().clone();
    assert!(of_type(&state, "m.room.create").len() == 1, "the full state: {state:?}");
}

#[tokio::test]
async fn full_state_still_acknowledges_to_device_messages() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    assert_ok(&send_to_device(&alice, "t1", json!({ &bob.user_id: {"*": {"n": 1}} })).await);
    let first = bob.sync(None, 0).await;
    assert_eq!(to_device_events(&first).len(), 1);
    let since = next_batch(&first);
    let reply = bob.get(&format!("/sync?full_state=true&since={}", esc(&since))).await;
    assert_ok(&reply);
    assert!(to_device_events(&reply.json).is_empty(), "delivered twice: {}", reply.json);
}

#[tokio::test]
async fn an_invite_appears_under_rooms_invite() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let since = next_batch(&bob.sync(None, 0).await);
    let room = alice.create_room(json!({"name": "Party", "invite": [bob.user_id]})).await;
    let sync = bob.sync(Some(&since), 0).await;
    let events = sync["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no invite: {sync}"))
        .clone();
    let me = events.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id);
    assert_eq!(me.expect("bob's member event")["content"]["membership"], "invite");
    assert!(sync["rooms"]["join"].get(&room).is_none());
    // Once joined, the room moves to rooms.join.
    bob.join(&room).await;
    let joined = bob.sync(Some(&next_batch(&sync)), 0).await;
    assert!(joined["rooms"]["join"].get(&room).is_some(), "{joined}");
    assert!(joined["rooms"]["invite"].get(&room).is_none(), "{joined}");
}

#[tokio::test]
async fn a_leave_appears_under_rooms_leave() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let since = next_batch(&bob.sync(None, 0).await);
    assert_ok(&bob.post(&room_path(&room, "/leave"), &json!({})).await);
    let sync = bob.sync(Some(&since), 0).await;
    let events = &sync["rooms"]["leave"][&room]["timeline"]["events"];
    assert_eq!(events[0]["type"], "m.room.member", "{sync}");
    assert_eq!(events[0]["state_key"], bob.user_id);
    assert_eq!(events[0]["content"]["membership"], "leave");
    assert!(sync["rooms"]["join"].get(&room).is_none(), "{sync}");
    // Later messages in the room do not reach bob.
    alice.send_text(&room, "gone?").await;
    let later = bob.sync(Some(&next_batch(&sync)), 0).await;
    assert_eq!(later["rooms"]["join"], json!({}));
    assert_eq!(later["rooms"]["leave"], json!({}));
}

#[tokio::test]
async fn a_malformed_since_or_timeout_is_invalid_param() {
    let (_server, [alice]) = users(["alice"]).await;
    for query in ["since=garbage", "since=s1", "since=sx_1", "since=1_2", "timeout=soon"] {
        let reply = alice.get(&format!("/sync?{query}")).await;
        assert_error(&reply, 400, "M_INVALID_PARAM");
    }
}

#[tokio::test]
async fn transaction_id_is_shown_only_to_the_sender() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    assert_ok(&send_with_txn(&alice, &room, "my-txn", "hello").await);
    let find = |sync: &Value| {
        let events = timeline(sync, &room);
        events.into_iter().find(|e| e["type"] == "m.room.message").expect("the message")
    };
    let own = find(&alice.sync(None, 0).await);
    assert_eq!(own["unsigned"]["transaction_id"], "my-txn");
    let other = find(&bob.sync(None, 0).await);
    assert!(other["unsigned"].get("transaction_id").is_none(), "{other}");
}

#[tokio::test]
async fn transaction_id_is_hidden_from_the_senders_other_devices() {
    let (server, [alice]) = users(["alice"]).await;
    let phone = User::login(&server.base(), "alice").await;
    let room = public_room(&alice, &[]).await;
    assert_ok(&send_with_txn(&alice, &room, "my-txn", "hello").await);
    let events = timeline(&phone.sync(None, 0).await, &room);
    let message = of_type(&events, "m.room.message")[0].clone();
    assert!(message["unsigned"].get("transaction_id").is_none(), "{message}");
}

#[tokio::test]
async fn a_display_name_change_does_not_replay_the_timeline() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    alice.send_text(&room, "old news").await;
    let since = next_batch(&bob.sync(None, 0).await);
    let path = format!("/profile/{}/displayname", esc(&bob.user_id));
    assert_ok(&bob.put(&path, &json!({"displayname": "Robert"})).await);
    let sync = bob.sync(Some(&since), 0).await;
    let events = timeline(&sync, &room);
    assert_eq!(events.len(), 1, "only the new member event: {events:?}");
    assert_eq!(events[0]["content"]["displayname"], "Robert");
    assert_eq!(sync["rooms"]["join"][&room]["state"]["events"], json!([]));
}

#[tokio::test]
async fn a_public_read_receipt_reaches_the_others_sync() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let event = alice.send_text(&room, "read me").await;
    let since = next_batch(&alice.sync(None, 0).await);
    bob.receipt(&room, &event).await;
    let sync = alice.sync(Some(&since), 0).await;
    let ephemeral = &sync["rooms"]["join"][&room]["ephemeral"]["events"][0];
    assert_eq!(ephemeral["type"], "m.receipt", "{sync}");
    assert!(ephemeral["content"][&event]["m.read"][&bob.user_id]["ts"].is_i64(), "{sync}");
}

#[tokio::test]
async fn another_members_private_receipt_is_not_synced() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let event = alice.send_text(&room, "read me quietly").await;
    let since = next_batch(&alice.sync(None, 0).await);
    assert_ok(&post_receipt(&bob, &room, "m.read.private", &event).await);
    let sync = alice.sync(Some(&since), 0).await;
    let ephemeral = &sync["rooms"]["join"][&room]["ephemeral"]["events"];
    assert!(ephemeral.as_array().is_none_or(Vec::is_empty), "{sync}");
    // Bob's own sync does show it.
    let own = bob.sync(Some(&since), 0).await;
    let receipt = &own["rooms"]["join"][&room]["ephemeral"]["events"][0]["content"][&event];
    assert!(receipt["m.read.private"][&bob.user_id].is_object(), "{own}");
}

#[tokio::test]
async fn another_members_private_receipt_does_not_end_a_long_poll() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let event = alice.send_text(&room, "read me quietly").await;
    let since = next_batch(&alice.sync(None, 0).await);
    assert_ok(&post_receipt(&bob, &room, "m.read.private", &event).await);
    let started = Instant::now();
    let sync = alice.sync(Some(&since), 300).await;
    assert!(sync["rooms"]["join"].get(&room).is_none(), "nothing changed for alice: {sync}");
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
}

// ---- unread counts ----

#[tokio::test]
async fn a_message_counts_for_the_other_member_only() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    assert_eq!(unread(&bob, &room).await, (0, 0));
    alice.send_text(&room, "lunch?").await;
    assert_eq!(unread(&bob, &room).await, (1, 0));
    assert_eq!(unread(&alice, &room).await, (0, 0), "the sender's own message");
}

#[tokio::test]
async fn a_message_counts_as_unread_for_the_other_member_until_read() {
    let server = TestHomeserver::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({"invite": [bob.user_id]})).await;
    bob.join(&room).await;
    let first = bob.sync(None, 0).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let event = alice.send_text(&room, "lunch?").await;
    let next = bob.sync(Some(&since), 5_000).await;
    let joined = &next["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["events"][0]["event_id"], event);
    assert_eq!(joined["unread_notifications"]["notification_count"], 1, "{next}");
    bob.receipt(&room, &event).await;
    let read = bob.sync(Some(next["next_batch"].as_str().unwrap()), 0).await;
    assert_eq!(read["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 0);
    let reply = bob.get(&format!("/rooms/{}/state/m.room.create", esc(&room))).await;
    assert_eq!(reply.status, 200);
}

/// Bob, in a room with Alice, named "Robert".
async fn robert_room() -> (TestHomeserver, User, User, String) {
    let (server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let path = format!("/profile/{}/displayname", esc(&bob.user_id));
    assert_ok(&bob.put(&path, &json!({"displayname": "Robert"})).await);
    (server, alice, bob, room)
}

#[tokio::test]
async fn a_mention_by_display_name_highlights() {
    let (_server, alice, bob, room) = robert_room().await;
    alice.send_text(&room, "Robert, lunch?").await;
    assert_eq!(unread(&bob, &room).await, (1, 1));
    alice.send_text(&room, "Roberta is coming too").await;
    assert_eq!(unread(&bob, &room).await, (2, 1), "a longer word is no mention");
}

#[tokio::test]
async fn a_mention_in_m_mentions_highlights() {
    let (_server, alice, bob, room) = robert_room().await;
    alice.send_mention(&room, &bob.user_id, "lunch?").await;
    assert_eq!(unread(&bob, &room).await, (1, 1));
}

#[tokio::test]
async fn m_mentions_turns_off_the_display_name_match() {
    let (_server, alice, bob, room) = robert_room().await;
    let other = json!({"msgtype": "m.text", "body": "Robert, lunch?", "m.mentions": {}});
    alice.send(&room, "m.room.message", other).await;
    assert_eq!(unread(&bob, &room).await, (1, 0));
}

#[tokio::test]
async fn a_notice_does_not_count() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let notice = json!({"msgtype": "m.notice", "body": "the bot says hi"});
    alice.send(&room, "m.room.message", notice).await;
    assert_eq!(unread(&bob, &room).await, (0, 0));
}

#[tokio::test]
async fn a_read_receipt_clears_the_counts_up_to_its_event() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let first = alice.send_text(&room, "one").await;
    let second = alice.send_text(&room, "two").await;
    assert_eq!(unread(&bob, &room).await, (2, 0));
    bob.receipt(&room, &first).await;
    assert_eq!(unread(&bob, &room).await, (1, 0));
    bob.receipt(&room, &second).await;
    assert_eq!(unread(&bob, &room).await, (0, 0));
    // An older receipt does not move the position back.
    bob.receipt(&room, &first).await;
    assert_eq!(unread(&bob, &room).await, (0, 0));
}

#[tokio::test]
async fn a_private_read_receipt_clears_the_counts() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let event = alice.send_text(&room, "psst").await;
    assert_eq!(unread(&bob, &room).await, (1, 0));
    assert_ok(&post_receipt(&bob, &room, "m.read.private", &event).await);
    assert_eq!(unread(&bob, &room).await, (0, 0));
}

#[tokio::test]
async fn the_later_of_the_public_and_private_receipts_wins() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let e1 = alice.send_text(&room, "one").await;
    let e2 = alice.send_text(&room, "two").await;
    let e3 = alice.send_text(&room, "three").await;
    assert_ok(&post_receipt(&bob, &room, "m.read", &e1).await);
    assert_eq!(unread(&bob, &room).await, (2, 0));
    assert_ok(&post_receipt(&bob, &room, "m.read.private", &e3).await);
    assert_eq!(unread(&bob, &room).await, (0, 0), "the private receipt is later");
    alice.send_text(&room, "four").await;
    // A public receipt that moves but stays before the private one changes nothing.
    assert_ok(&post_receipt(&bob, &room, "m.read", &e2).await);
    assert_eq!(unread(&bob, &room).await, (1, 0));
}

#[tokio::test]
async fn receipt_errors() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let elsewhere = public_room(&alice, &[]).await;
    let foreign = alice.send_text(&elsewhere, "not here").await;
    let unknown = post_receipt(&bob, &room, "m.read", "$nope").await;
    assert_error(&unknown, 404, "M_NOT_FOUND");
    let wrong_room = post_receipt(&bob, &room, "m.read", &foreign).await;
    assert_error(&wrong_room, 400, "M_INVALID_PARAM");
    let event = alice.send_text(&room, "hi").await;
    let kind = post_receipt(&bob, &room, "m.seen", &event).await;
    assert_error(&kind, 400, "M_INVALID_PARAM");
    let outsider = post_receipt(&bob, &elsewhere, "m.read", &foreign).await;
    assert_error(&outsider, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn read_markers_move_the_read_position() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let event = alice.send_text(&room, "mark me").await;
    let fully_read = json!({"m.fully_read": event});
    assert_ok(&bob.post(&room_path(&room, "/read_markers"), &fully_read).await);
    assert_eq!(unread(&bob, &room).await, (1, 0), "m.fully_read alone moves no count");
    let markers = json!({"m.fully_read": event, "m.read.private": event});
    assert_ok(&bob.post(&room_path(&room, "/read_markers"), &markers).await);
    assert_eq!(unread(&bob, &room).await, (0, 0));
    let bad = bob.post(&room_path(&room, "/read_markers"), &json!({"m.read": 5})).await;
    assert_error(&bad, 400, "M_BAD_JSON");
}

// ---- GET /notifications ----

/// Alice and Bob in a public room; Alice sent `n` messages; returns their ids, oldest first.
async fn notified_room(n: usize) -> (TestHomeserver, User, User, String, Vec<String>) {
    let (server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let mut sent = Vec::new();
    for i in 0..n {
        sent.push(alice.send_text(&room, &format!("message {i}")).await);
    }
    (server, alice, bob, room, sent)
}

#[tokio::test]
async fn notifications_are_newest_first_and_paginate() {
    let (_server, _alice, bob, room, sent) = notified_room(5).await;
    let page1 = notifications(&bob, "?limit=2").await;
    assert_eq!(notified_ids(&page1), [sent[4].clone(), sent[3].clone()]);
    assert_eq!(page1["notifications"][0]["room_id"], room);
    assert_eq!(page1["notifications"][0]["actions"][0], "notify");
    assert!(page1["notifications"][0]["ts"].is_i64());
    let token = page1["next_token"].as_str().expect("next_token").to_owned();
    let page2 = notifications(&bob, &format!("?limit=2&from={token}")).await;
    assert_eq!(notified_ids(&page2), [sent[2].clone(), sent[1].clone()]);
    let token = page2["next_token"].as_str().expect("next_token").to_owned();
    let page3 = notifications(&bob, &format!("?limit=2&from={token}")).await;
    assert_eq!(notified_ids(&page3), [sent[0].clone()]);
    assert!(page3.get("next_token").is_none(), "the last page: {page3}");
    let all = notifications(&bob, "").await;
    assert_eq!(notified_ids(&all), sent.iter().rev().cloned().collect::<Vec<_>>());
}

#[tokio::test]
async fn notifications_only_highlight_lists_mentions() {
    let (_server, alice, bob, room, sent) = notified_room(2).await;
    let highlighted = alice.send_mention(&room, &bob.user_id, "ping").await;
    alice.send_text(&room, "after").await;
    let page = notifications(&bob, "?only=highlight").await;
    assert_eq!(notified_ids(&page), [highlighted]);
    let all = notifications(&bob, "").await;
    assert_eq!(notified_ids(&all).len(), sent.len() + 2);
}

#[tokio::test]
async fn notifications_read_flag_follows_the_receipt() {
    let (_server, _alice, bob, room, sent) = notified_room(3).await;
    let read_flags = |page: &Value| -> Vec<bool> {
        let list = page["notifications"].as_array().unwrap();
        list.iter().map(|n| n["read"].as_bool().expect("read flag")).collect()
    };
    assert_eq!(read_flags(&notifications(&bob, "").await), [false, false, false]);
    bob.receipt(&room, &sent[1]).await;
    assert_eq!(read_flags(&notifications(&bob, "").await), [false, true, true]);
}

#[tokio::test]
async fn notifications_with_a_bad_from_or_limit_are_invalid_param() {
    let (_server, [alice]) = users(["alice"]).await;
    assert_error(&alice.get("/notifications?from=abc").await, 400, "M_INVALID_PARAM");
    assert_error(&alice.get("/notifications?limit=-1").await, 400, "M_INVALID_PARAM");
    assert_eq!(notifications(&alice, "").await["notifications"], json!([]));
}

// ---- push rules ----

#[tokio::test]
async fn push_rules_are_served_whole_and_by_scope() {
    let (_server, [alice]) = users(["alice"]).await;
    let whole = alice.get("/pushrules/").await;
    assert_ok(&whole);
    let global = global_rules(&alice).await;
    assert_eq!(whole.json["global"], global);
    assert_eq!(alice.get("/pushrules").await.json, whole.json);
    assert_eq!(alice.get("/pushrules/global").await.json, global);
    assert_eq!(rule_ids(&global, "override")[0], ".m.rule.master");
    assert_eq!(rule_ids(&global, "content"), [".m.rule.contains_user_name"]);
    assert_eq!(global["content"][0]["pattern"], "alice");
    let underride = rule_ids(&global, "underride");
    assert_eq!(underride.last().map(String::as_str), Some(".m.rule.encrypted"));
    let master = alice.get("/pushrules/global/override/.m.rule.master").await;
    assert_eq!(
        (master.json["default"].clone(), master.json["enabled"].clone()),
        (json!(true), json!(false))
    );
}

#[tokio::test]
async fn a_content_rule_can_be_put_read_back_and_used() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    assert_ok(&put_rule(&bob, "content", "cake", "", content_rule("cake")).await);
    let rule = bob.get("/pushrules/global/content/cake").await;
    assert_ok(&rule);
    assert_eq!(rule.json["rule_id"], "cake");
    assert_eq!(rule.json["pattern"], "cake");
    assert_eq!(rule.json["enabled"], true);
    assert_eq!(rule.json["default"], false);
    assert_eq!(rule.json["actions"], json!(["notify", {"set_tweak": "highlight"}]));
    assert_eq!(rule_ids(&global_rules(&bob).await, "content")[0], "cake");
    alice.send_text(&room, "there is cake").await;
    assert_eq!(unread(&bob, &room).await, (1, 1));
}

#[tokio::test]
async fn before_and_after_place_user_rules() {
    let (_server, [alice]) = users(["alice"]).await;
    for id in ["a", "b"] {
        assert_ok(&put_rule(&alice, "content", id, "", content_rule(id)).await);
    }
    // A new rule without before/after goes first among the user's rules.
    let ids = rule_ids(&global_rules(&alice).await, "content");
    assert_eq!(ids, ["b", "a", ".m.rule.contains_user_name"]);
    assert_ok(&put_rule(&alice, "content", "c", "?after=b", content_rule("c")).await);
    assert_ok(&put_rule(&alice, "content", "d", "?before=b", content_rule("d")).await);
    let ids = rule_ids(&global_rules(&alice).await, "content");
    assert_eq!(ids, ["d", "b", "c", "a", ".m.rule.contains_user_name"]);
    // Moving an existing rule.
    assert_ok(&put_rule(&alice, "content", "d", "?after=a", content_rule("d")).await);
    let ids = rule_ids(&global_rules(&alice).await, "content");
    assert_eq!(ids, ["b", "c", "a", "d", ".m.rule.contains_user_name"]);
}

#[tokio::test]
async fn placing_a_rule_before_a_missing_rule_is_m_unknown() {
    let (_server, [alice]) = users(["alice"]).await;
    let reply = put_rule(&alice, "content", "x", "?before=nope", content_rule("x")).await;
    assert_error(&reply, 400, "M_UNKNOWN");
    let default =
        put_rule(&alice, "content", "x", "?after=.m.rule.contains_user_name", content_rule("x"));
    assert_error(&default.await, 400, "M_INVALID_PARAM");
    assert_eq!(rule_ids(&global_rules(&alice).await, "content"), [".m.rule.contains_user_name"]);
}

#[tokio::test]
async fn a_rule_id_starting_with_a_dot_is_refused() {
    let (_server, [alice]) = users(["alice"]).await;
    let reply = put_rule(&alice, "content", ".m.rule.mine", "", content_rule("x")).await;
    assert_error(&reply, 400, "M_INVALID_PARAM");
    let bad = [
        ("content", "nopattern", json!({"actions": ["notify"]})),
        ("room", "not-a-room", json!({"actions": []})),
        ("override", "noactions", json!({"conditions": []})),
        ("sender", "@x:test.local", json!({"actions": [], "conditions": []})),
    ];
    for (kind, id, body) in bad {
        assert_error(&put_rule(&alice, kind, id, "", body).await, 400, "M_INVALID_PARAM");
    }
}

#[tokio::test]
async fn a_deleted_user_rule_is_not_found() {
    let (_server, [alice]) = users(["alice"]).await;
    assert_ok(&put_rule(&alice, "content", "cake", "", content_rule("cake")).await);
    assert_ok(&alice.delete("/pushrules/global/content/cake").await);
    assert_error(&alice.get("/pushrules/global/content/cake").await, 404, "M_NOT_FOUND");
    assert_error(&alice.delete("/pushrules/global/content/cake").await, 404, "M_NOT_FOUND");
    assert_error(&alice.get("/pushrules/global/content/cake/enabled").await, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn a_server_default_rule_cannot_be_deleted() {
    let (_server, [alice]) = users(["alice"]).await;
    let reply = alice.delete("/pushrules/global/underride/.m.rule.message").await;
    assert_error(&reply, 400, "M_INVALID_PARAM");
    assert_ok(&alice.get("/pushrules/global/underride/.m.rule.message").await);
}

/// Alice, Bob and Carol in a public room (three members: `.m.rule.message` decides messages).
async fn three_member_room() -> (TestHomeserver, User, User, String) {
    let (server, [alice, bob, carol]) = users(["alice", "bob", "carol"]).await;
    let room = public_room(&alice, &[&bob, &carol]).await;
    (server, alice, bob, room)
}

#[tokio::test]
async fn disabling_the_message_default_stops_counting() {
    let (_server, alice, bob, room) = three_member_room().await;
    let path = "/pushrules/global/underride/.m.rule.message/enabled";
    assert_eq!(bob.get(path).await.json, json!({"enabled": true}));
    assert_ok(&bob.put(path, &json!({"enabled": false})).await);
    assert_eq!(bob.get(path).await.json, json!({"enabled": false}));
    let rule = bob.get("/pushrules/global/underride/.m.rule.message").await;
    assert_eq!(
        (rule.json["enabled"].clone(), rule.json["default"].clone()),
        (json!(false), json!(true))
    );
    alice.send_text(&room, "anyone?").await;
    assert_eq!(unread(&bob, &room).await, (0, 0));
    assert_ok(&bob.put(path, &json!({"enabled": true})).await);
    alice.send_text(&room, "anyone now?").await;
    assert_eq!(unread(&bob, &room).await, (1, 0));
    assert_error(&bob.put(path, &json!({"enabled": "yes"})).await, 400, "M_INVALID_PARAM");
}

#[tokio::test]
async fn the_actions_of_a_server_default_can_be_changed() {
    let (_server, alice, bob, room) = three_member_room().await;
    let path = "/pushrules/global/underride/.m.rule.message/actions";
    assert_eq!(bob.get(path).await.json, json!({"actions": ["notify"]}));
    let loud = json!({"actions": ["notify", {"set_tweak": "highlight"}]});
    assert_ok(&bob.put(path, &loud).await);
    assert_eq!(bob.get(path).await.json, loud);
    alice.send_text(&room, "anyone?").await;
    assert_eq!(unread(&bob, &room).await, (1, 1));
    assert_error(&bob.put(path, &json!({"actions": "notify"})).await, 400, "M_INVALID_PARAM");
    let missing = bob.put("/pushrules/global/underride/.m.rule.nope/actions", &loud).await;
    assert_error(&missing, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn an_unknown_rule_kind_is_refused() {
    let (_server, [alice]) = users(["alice"]).await;
    assert_error(&alice.get("/pushrules/global/device/x").await, 400, "M_INVALID_PARAM");
    let put = put_rule(&alice, "device", "x", "", json!({"actions": []})).await;
    assert_error(&put, 400, "M_INVALID_PARAM");
    assert_error(&alice.delete("/pushrules/global/device/x").await, 400, "M_INVALID_PARAM");
    let enabled = alice.get("/pushrules/global/device/x/enabled").await;
    assert_error(&enabled, 400, "M_INVALID_PARAM");
}

#[tokio::test]
async fn a_rule_change_reaches_the_next_sync_as_account_data() {
    let (_server, [alice]) = users(["alice"]).await;
    let since = next_batch(&alice.sync(None, 0).await);
    let waiter = spawn_sync(&alice, &since, 60_000);
    let_it_wait().await;
    assert!(!waiter.is_finished(), "the long-poll answered before anything happened");
    assert_ok(&put_rule(&alice, "content", "cake", "", content_rule("cake")).await);
    let sync = woken(waiter).await;
    let data = sync["account_data"]["events"].as_array().expect("account data");
    let rules = data.iter().find(|e| e["type"] == "m.push_rules").expect("m.push_rules");
    let content = rule_ids(&rules["content"]["global"], "content");
    assert_eq!(content, ["cake", ".m.rule.contains_user_name"], "the merged rules");
}

#[tokio::test]
async fn a_muted_room_stops_counting() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let muted = public_room(&alice, &[&bob]).await;
    let loud = public_room(&alice, &[&bob]).await;
    assert_ok(&put_rule(&bob, "room", &muted, "", json!({"actions": []})).await);
    let rule = bob.get(&format!("/pushrules/global/room/{}", esc(&muted))).await;
    assert_eq!(rule.json["rule_id"], muted);
    alice.send_text(&muted, "shh").await;
    alice.send_text(&loud, "hey").await;
    let sync = bob.sync(None, 0).await;
    assert_eq!(counts(&sync, &muted), (0, 0));
    assert_eq!(counts(&sync, &loud), (1, 0));
}

// ---- pushers ----

#[tokio::test]
async fn pushers_are_listed_after_being_set() {
    let (_server, [alice]) = users(["alice"]).await;
    assert!(pushers(&alice).await.is_empty());
    assert_ok(&alice.post("/pushers/set", &pusher_body("org.example.app", "key1")).await);
    let listed = pushers(&alice).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["app_id"], "org.example.app");
    assert_eq!(listed[0]["pushkey"], "key1");
    assert_eq!(listed[0]["kind"], "http");
    assert_eq!(listed[0]["data"]["url"], "http://127.0.0.1:9/_matrix/push/v1/notify");
    // The same app id and pushkey again updates rather than adds.
    let mut renamed = pusher_body("org.example.app", "key1");
    renamed["device_display_name"] = json!("Tablet");
    assert_ok(&alice.post("/pushers/set", &renamed).await);
    let listed = pushers(&alice).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["device_display_name"], "Tablet");
}

#[tokio::test]
async fn pusher_validation_errors() {
    let (_server, [alice]) = users(["alice"]).await;
    let with = |change: &dyn Fn(&mut Value)| {
        let mut body = pusher_body("org.example.app", "key1");
        change(&mut body);
        body
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("no data.url", with(&|b| b["data"] = json!({})), "M_MISSING_PARAM"),
        ("no data", with(&|b| drop(b.as_object_mut().unwrap().remove("data"))), "M_MISSING_PARAM"),
        ("no kind", with(&|b| drop(b.as_object_mut().unwrap().remove("kind"))), "M_MISSING_PARAM"),
        (
            "http to another host",
            with(&|b| b["data"]["url"] = json!("http://push.example.org/_matrix/push/v1/notify")),
            "M_INVALID_PARAM",
        ),
        (
            "a path other than notify",
            with(&|b| b["data"]["url"] = json!("https://push.example.org/notify")),
            "M_INVALID_PARAM",
        ),
        ("email", with(&|b| b["kind"] = json!("email")), "M_INVALID_PARAM"),
        ("unknown kind", with(&|b| b["kind"] = json!("carrier_pigeon")), "M_INVALID_PARAM"),
        ("unknown format", with(&|b| b["data"]["format"] = json!("full")), "M_INVALID_PARAM"),
        ("app_id a number", with(&|b| b["app_id"] = json!(7)), "M_BAD_JSON"),
        ("empty pushkey", with(&|b| b["pushkey"] = json!("")), "M_INVALID_PARAM"),
    ];
    for (what, body, errcode) in cases {
        let reply = alice.post("/pushers/set", &body).await;
        assert_eq!(
            (reply.status.as_u16(), reply.errcode()),
            (400, errcode),
            "{what}: {}",
            reply.json
        );
    }
    assert!(pushers(&alice).await.is_empty(), "nothing stored");
}

#[tokio::test]
async fn a_null_kind_deletes_the_pusher() {
    let (_server, [alice]) = users(["alice"]).await;
    assert_ok(&alice.post("/pushers/set", &pusher_body("org.example.app", "key1")).await);
    assert_ok(&alice.post("/pushers/set", &pusher_body("org.example.app", "key2")).await);
    let delete = json!({"kind": null, "app_id": "org.example.app", "pushkey": "key1"});
    assert_ok(&alice.post("/pushers/set", &delete).await);
    let left = pushers(&alice).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["pushkey"], "key2");
}

#[tokio::test]
async fn a_pushkey_moves_to_the_latest_user_without_append() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    assert_ok(&alice.post("/pushers/set", &pusher_body("org.example.app", "shared")).await);
    assert_ok(&bob.post("/pushers/set", &pusher_body("org.example.app", "shared")).await);
    assert!(pushers(&alice).await.is_empty(), "alice's pusher was removed");
    assert_eq!(pushers(&bob).await.len(), 1);
}

#[tokio::test]
async fn append_keeps_the_other_users_pusher() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    assert_ok(&alice.post("/pushers/set", &pusher_body("org.example.app", "shared")).await);
    let mut body = pusher_body("org.example.app", "shared");
    body["append"] = json!(true);
    assert_ok(&bob.post("/pushers/set", &body).await);
    assert_eq!(pushers(&alice).await.len(), 1);
    assert_eq!(pushers(&bob).await.len(), 1);
}

// ---- send-to-device ----

#[tokio::test]
async fn to_device_star_reaches_every_device_of_the_user() {
    let (server, [alice, bob]) = users(["alice", "bob"]).await;
    let phone = User::login(&server.base(), "bob").await;
    let messages = json!({ &bob.user_id: {"*": {"hello": "everyone"}} });
    assert_ok(&send_to_device(&alice, "t1", messages).await);
    for device in [&bob, &phone] {
        let events = to_device_events(&device.sync(None, 0).await);
        assert_eq!(
            events,
            [json!({"sender": alice.user_id, "type": "m.test", "content": {"hello": "everyone"}})]
        );
    }
    assert!(to_device_events(&alice.sync(None, 0).await).is_empty());
}

#[tokio::test]
async fn to_device_for_one_device_reaches_only_it() {
    let (server, [alice, bob]) = users(["alice", "bob"]).await;
    let phone = User::login(&server.base(), "bob").await;
    let messages = json!({ &bob.user_id: {&phone.device_id: {"for": "phone"}} });
    assert_ok(&send_to_device(&alice, "t1", messages).await);
    let on_phone = to_device_events(&phone.sync(None, 0).await);
    assert_eq!(on_phone.len(), 1);
    assert_eq!(on_phone[0]["content"], json!({"for": "phone"}));
    assert!(to_device_events(&bob.sync(None, 0).await).is_empty());
    // An unknown device or user receives nothing, and is no error.
    let nobody = json!({ &bob.user_id: {"NOSUCHDEVICE": {}}, "@nobody:test.local": {"*": {}} });
    assert_ok(&send_to_device(&alice, "t2", nobody).await);
    assert!(to_device_events(&bob.sync(None, 0).await).is_empty());
}

#[tokio::test]
async fn two_hundred_fifty_to_device_messages_arrive_in_order_over_three_syncs() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    for n in 0..250 {
        let messages = json!({ &bob.user_id: {&bob.device_id: {"n": n}} });
        assert_ok(&send_to_device(&alice, &format!("t{n}"), messages).await);
    }
    let mut received = Vec::new();
    let mut since: Option<String> = None;
    for expected in [100, 100, 50] {
        let sync = bob.sync(since.as_deref(), 0).await;
        let events = to_device_events(&sync);
        assert_eq!(events.len(), expected, "{sync}");
        received.extend(events.iter().map(|e| e["content"]["n"].as_u64().unwrap()));
        since = Some(next_batch(&sync));
    }
    assert_eq!(received, (0..250).collect::<Vec<u64>>());
    let after = bob.sync(since.as_deref(), 0).await;
    assert!(to_device_events(&after).is_empty(), "{after}");
    // Acknowledged means deleted: even a fresh initial sync gets none.
    assert!(to_device_events(&bob.sync(None, 0).await).is_empty());
}

#[tokio::test]
async fn unacknowledged_to_device_messages_are_handed_out_again() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let messages = json!({ &bob.user_id: {"*": {"keep": "me"}} });
    assert_ok(&send_to_device(&alice, "t1", messages).await);
    assert_eq!(to_device_events(&bob.sync(None, 0).await).len(), 1);
    // The next_batch of that sync was never used, so nothing was acknowledged.
    assert_eq!(to_device_events(&bob.sync(None, 0).await).len(), 1);
}

#[tokio::test]
async fn a_repeated_to_device_txn_id_stores_nothing() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let first = json!({ &bob.user_id: {"*": {"n": 1}} });
    let second = json!({ &bob.user_id: {"*": {"n": 2}} });
    assert_ok(&send_to_device(&alice, "same", first).await);
    assert_ok(&send_to_device(&alice, "same", second).await);
    let events = to_device_events(&bob.sync(None, 0).await);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["content"], json!({"n": 1}));
    // The same txn id from another user is another transaction.
    assert_ok(&send_to_device(&bob, "same", json!({ &alice.user_id: {"*": {"n": 3}} })).await);
    assert_eq!(to_device_events(&alice.sync(None, 0).await).len(), 1);
}

#[tokio::test]
async fn to_device_for_a_remote_user_is_refused_naming_them() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let remote = "@carol:elsewhere.example";
    let messages = json!({ &bob.user_id: {"*": {"n": 1}}, remote: {"*": {"n": 2}} });
    let reply = send_to_device(&alice, "t1", messages).await;
    assert_error(&reply, 400, "M_INVALID_PARAM");
    let error = reply.json["error"].as_str().unwrap_or_default();
    assert!(error.contains(remote), "{error}");
    assert!(to_device_events(&bob.sync(None, 0).await).is_empty(), "nothing stored");
}

#[tokio::test]
async fn to_device_content_must_be_an_object() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let reply = send_to_device(&alice, "t1", json!({ &bob.user_id: {"*": "text"} })).await;
    assert_error(&reply, 400, "M_BAD_JSON");
    let reply = send_to_device(&alice, "t2", json!({ &bob.user_id: ["*"] })).await;
    assert_error(&reply, 400, "M_BAD_JSON");
    let reply = send_to_device(&alice, "t3", json!([])).await;
    assert_error(&reply, 400, "M_BAD_JSON");
    let missing = alice.put("/sendToDevice/m.test/t4", &json!({})).await;
    assert_error(&missing, 400, "M_MISSING_PARAM");
}

#[tokio::test]
async fn a_full_to_device_inbox_refuses_the_whole_request_until_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = HomeserverConfig::new("test.local", dir.path().join("hs.db"));
    config.max_to_device_inbox = 3;
    let server = TestHomeserver::start_with(config).await;
    let (alice, bob, carol) = (
        server.register("alice").await,
        server.register("bob").await,
        server.register("carol").await,
    );
    for txn in ["t1", "t2", "t3"] {
        assert_ok(&send_to_device(&alice, txn, json!({ &bob.user_id: {"*": {"n": txn}} })).await);
    }
    // carol's inbox has room, bob's has not: nothing is stored for either.
    let both = json!({ &carol.user_id: {"*": {"n": "t4"}}, &bob.user_id: {"*": {"n": "t4"}} });
    let refused = send_to_device(&alice, "t4", both.clone()).await;
    assert_error(&refused, 429, "M_LIMIT_EXCEEDED");
    assert!(to_device_events(&carol.sync(None, 0).await).is_empty(), "all or nothing");
    // bob reads (a sync, then the next one acknowledges): the same transaction id now goes
    // through, since the refused request used nothing up.
    let first = bob.sync(None, 0).await;
    assert_eq!(to_device_events(&first).len(), 3);
    let acked = bob.sync(Some(&next_batch(&first)), 0).await;
    assert!(to_device_events(&acked).is_empty());
    assert_ok(&send_to_device(&alice, "t4", both).await);
    assert_eq!(to_device_events(&carol.sync(None, 0).await).len(), 1);
    assert_eq!(to_device_events(&bob.sync(Some(&next_batch(&acked)), 0).await).len(), 1);
}

#[tokio::test]
async fn a_long_poll_sync_wakes_for_a_to_device_message() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let since = next_batch(&bob.sync(None, 0).await);
    let waiter = spawn_sync(&bob, &since, 60_000);
    let_it_wait().await;
    assert!(!waiter.is_finished(), "the long-poll answered before anything happened");
    assert_ok(&send_to_device(&alice, "t1", json!({ &bob.user_id: {"*": {"knock": 1}} })).await);
    let sync = woken(waiter).await;
    assert_eq!(to_device_events(&sync).len(), 1, "{sync}");
}

// ---- regressions of the review fixes (79e219e) ----

/// `POST /createRoom` as `user`, without asserting success.
async fn create_room_reply(user: &User, body: Value) -> Reply {
    user.post("/createRoom", &body).await
}

/// The room ids `user` has joined, from an initial sync.
async fn joined_rooms(user: &User) -> Vec<String> {
    let sync = user.sync(None, 0).await;
    sync["rooms"]["join"]
        .as_object()
        .map(|rooms| rooms.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn initial_state_cannot_hold_member_or_create_events() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let forged_member = json!({"type": "m.room.member", "state_key": bob.user_id,
                               "content": {"membership": "join"}});
    let forged_create = json!({"type": "m.room.create", "state_key": "",
                               "content": {"creator": bob.user_id, "room_version": "1"}});
    for event in [forged_member, forged_create] {
        let body = json!({"preset": "public_chat", "initial_state": [event]});
        let reply = create_room_reply(&alice, body).await;
        assert_error(&reply, 400, "M_INVALID_PARAM");
    }
    assert!(joined_rooms(&bob).await.is_empty(), "bob was put in no room");
    let invited = &bob.sync(None, 0).await["rooms"]["invite"];
    assert_eq!(invited, &json!({}), "nor invited anywhere");
    assert!(joined_rooms(&alice).await.is_empty(), "no room was created");
}

#[tokio::test]
async fn initial_state_content_must_be_an_object() {
    let (_server, [alice]) = users(["alice"]).await;
    for content in [json!("cake"), json!(["cake"]), json!(5), Value::Null] {
        let event = json!({"type": "m.room.topic", "state_key": "", "content": content});
        let reply = create_room_reply(&alice, json!({"initial_state": [event]})).await;
        assert_error(&reply, 400, "M_BAD_JSON");
    }
    assert!(joined_rooms(&alice).await.is_empty(), "no room was created");
}

#[tokio::test]
async fn a_state_key_that_is_another_users_id_is_theirs_alone() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let flag = |key: &str| json!({"type": "org.example.flag", "state_key": key, "content": {}});
    let theirs = create_room_reply(&alice, json!({"initial_state": [flag(&bob.user_id)]})).await;
    assert_error(&theirs, 403, "M_FORBIDDEN");
    assert!(joined_rooms(&alice).await.is_empty(), "no room was created");
    // Her own user id is hers to use, in `initial_state` and through `PUT /state`.
    let room = alice.create_room(json!({"initial_state": [flag(&alice.user_id)]})).await;
    let own = room_path(&room, &format!("/state/org.example.flag/{}", esc(&alice.user_id)));
    assert_eq!(alice.get(&own).await.json, json!({}));
    assert_ok(&alice.put(&own, &json!({"on": true})).await);
    // Alice has every power level in her room, and still cannot set bob's key.
    let other = room_path(&room, &format!("/state/org.example.flag/{}", esc(&bob.user_id)));
    assert_error(&alice.put(&other, &json!({"on": true})).await, 403, "M_FORBIDDEN");
    assert_error(&alice.get(&other).await, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn the_creator_cannot_invite_themselves() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let reply = create_room_reply(&alice, json!({"invite": [bob.user_id, alice.user_id]})).await;
    assert_error(&reply, 400, "M_INVALID_PARAM");
    assert!(joined_rooms(&alice).await.is_empty(), "no room was created");
    assert_eq!(bob.sync(None, 0).await["rooms"]["invite"], json!({}), "bob was not invited");
}

#[tokio::test]
async fn a_limited_incremental_sync_carries_the_state_changes_it_skips() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let since = next_batch(&bob.sync(None, 0).await);
    let renamed = alice.put(&room_path(&room, "/state/m.room.name"), &json!({"name": "Pie"})).await;
    assert_ok(&renamed);
    // More messages after the rename than one timeline holds (50).
    for n in 0..55 {
        alice.send_text(&room, &format!("message {n}")).await;
    }
    let sync = bob.sync(Some(&since), 0).await;
    let joined = &sync["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["limited"], true, "{joined}");
    let events = timeline(&sync, &room);
    assert_eq!(events.len(), 50);
    assert!(of_type(&events, "m.room.name").is_empty(), "the rename is before the timeline");
    let state = joined["state"]["events"].as_array().expect("state events").clone();
    let names = of_type(&state, "m.room.name");
    assert_eq!(names.len(), 1, "the skipped rename: {state:?}");
    assert_eq!(names[0]["event_id"], renamed.json["event_id"]);
    assert_eq!(names[0]["content"], json!({"name": "Pie"}));
    // Only what changed in the gap: not the state bob already had.
    assert!(of_type(&state, "m.room.create").is_empty(), "{state:?}");
}

#[tokio::test]
async fn a_txn_id_is_scoped_to_its_room_and_event_type() {
    let (_server, [alice]) = users(["alice"]).await;
    let first = public_room(&alice, &[]).await;
    let second = public_room(&alice, &[]).await;
    let in_first = send_with_txn(&alice, &first, "same", "in the first room").await;
    let in_second = send_with_txn(&alice, &second, "same", "in the second room").await;
    let custom_path = room_path(&first, "/send/org.example.custom/same");
    let custom = alice.put(&custom_path, &json!({"n": 1})).await;
    for reply in [&in_first, &in_second, &custom] {
        assert_ok(reply);
    }
    let ids = [&in_first, &in_second, &custom].map(|r| r.json["event_id"].clone());
    assert!(ids[0] != ids[1] && ids[0] != ids[2] && ids[1] != ids[2], "three events: {ids:?}");
    let sync = alice.sync(None, 0).await;
    let events = timeline(&sync, &first);
    let messages = of_type(&events, "m.room.message");
    assert_eq!(messages.len(), 1, "{events:?}");
    assert_eq!(messages[0]["content"]["body"], "in the first room");
    assert_eq!(of_type(&events, "org.example.custom")[0]["event_id"], ids[2]);
    let events = timeline(&sync, &second);
    assert_eq!(of_type(&events, "m.room.message")[0]["content"]["body"], "in the second room");
    // The same path again is still the same transaction.
    let again = send_with_txn(&alice, &second, "same", "in the second room").await;
    assert_eq!(again.json["event_id"], ids[1]);
}

#[tokio::test]
async fn a_to_device_txn_id_is_scoped_to_its_event_type() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    assert_ok(&send_to_device(&alice, "same", json!({ &bob.user_id: {"*": {"n": 1}} })).await);
    let other = json!({"messages": { &bob.user_id: {"*": {"n": 2}} }});
    assert_ok(&alice.put("/sendToDevice/m.other/same", &other).await);
    let events = to_device_events(&bob.sync(None, 0).await);
    let seen: Vec<(Value, Value)> =
        events.iter().map(|e| (e["type"].clone(), e["content"].clone())).collect();
    assert_eq!(
        seen,
        [(json!("m.test"), json!({"n": 1})), (json!("m.other"), json!({"n": 2}))],
        "both stored"
    );
}

#[tokio::test]
async fn sending_an_event_marks_the_room_read_for_the_sender() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    alice.send_text(&room, "one").await;
    alice.send_text(&room, "two").await;
    assert_eq!(unread(&bob, &room).await, (2, 0));
    let since = next_batch(&bob.sync(None, 0).await);
    bob.send_text(&room, "read them both").await;
    let sync = bob.sync(Some(&since), 0).await;
    assert_eq!(counts(&sync, &room), (0, 0), "{sync}");
    // A state event counts as well: alice has bob's message unread until she sets the topic.
    assert_eq!(unread(&alice, &room).await, (1, 0));
    assert_ok(&alice.put(&room_path(&room, "/state/m.room.topic"), &json!({"topic": "t"})).await);
    assert_eq!(unread(&alice, &room).await, (0, 0));
}

#[tokio::test]
async fn inviting_needs_the_invite_power_level() {
    let (_server, [alice, bob, carol]) = users(["alice", "bob", "carol"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let power = state(&alice, &room, "m.room.power_levels").await;
    assert_eq!(
        (power.json["invite"].clone(), power.json["users"].get(&bob.user_id)),
        (json!(50), None)
    );
    let invite_carol = json!({"user_id": carol.user_id});
    let by_bob = bob.post(&room_path(&room, "/invite"), &invite_carol).await;
    assert_error(&by_bob, 403, "M_FORBIDDEN");
    assert_error(&state(&alice, &room, &member(&carol)).await, 404, "M_NOT_FOUND");
    assert_eq!(carol.sync(None, 0).await["rooms"]["invite"], json!({}), "carol was not invited");
    assert_ok(&alice.post(&room_path(&room, "/invite"), &invite_carol).await);
    // In a private_chat room the invite level is 0: any member may invite.
    let private_chat = json!({"preset": "private_chat", "invite": [bob.user_id]});
    let private = alice.create_room(private_chat).await;
    bob.join(&private).await;
    assert_ok(&bob.post(&room_path(&private, "/invite"), &invite_carol).await);
}

#[tokio::test]
async fn power_levels_are_read_one_way_for_events_and_invites() {
    // Older room versions allow levels as strings holding an integer; every check must read
    // them the same way (the event check once read "60" as 0 while the invite check did not).
    let (_server, [alice, bob, carol, dave]) = users(["alice", "bob", "carol", "dave"]).await;
    let room = public_room(&alice, &[&bob, &carol]).await;
    let levels = json!({
        "users": {&alice.user_id: 100, &bob.user_id: "60", &carol.user_id: {"not": "a level"}},
        "users_default": 10, "invite": 60, "state_default": 60, "events_default": 0,
        "events": {"m.room.power_levels": 100},
    });
    assert_ok(&alice.put(&room_path(&room, "/state/m.room.power_levels"), &levels).await);
    let topic = json!({"topic": "bob may"});
    assert_ok(&bob.put(&room_path(&room, "/state/m.room.topic"), &topic).await);
    // carol's unusable entry counts as users_default (10): below both thresholds.
    let denied = carol.put(&room_path(&room, "/state/m.room.topic"), &json!({"topic": "no"})).await;
    assert_error(&denied, 403, "M_FORBIDDEN");
    assert!(
        denied.json["error"].as_str().unwrap_or_default().contains("has 10"),
        "{}",
        denied.json
    );
    let invite_dave = json!({"user_id": dave.user_id});
    assert_error(&carol.post(&room_path(&room, "/invite"), &invite_dave).await, 403, "M_FORBIDDEN");
    assert_ok(&bob.post(&room_path(&room, "/invite"), &invite_dave).await);
}

#[tokio::test]
async fn invite_state_shows_the_invitee_only_their_own_membership() {
    let (_server, [alice, bob, carol]) = users(["alice", "bob", "carol"]).await;
    let body = json!({"name": "Party", "invite": [bob.user_id, carol.user_id]});
    let room = alice.create_room(body).await;
    let sync = bob.sync(None, 0).await;
    let events = sync["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no invite: {sync}"))
        .clone();
    let members = of_type(&events, "m.room.member");
    assert_eq!(members.len(), 1, "only bob's own member event: {events:?}");
    assert_eq!(members[0]["state_key"], bob.user_id);
    assert_eq!(members[0]["content"]["membership"], "invite");
    let names = of_type(&events, "m.room.name");
    assert_eq!(names.len(), 1, "{events:?}");
    assert_eq!(names[0]["content"], json!({"name": "Party"}));
    let text = Value::Array(events).to_string();
    assert!(!text.contains(&carol.user_id), "another invitee leaked: {text}");
}

#[tokio::test]
async fn a_thread_receipt_does_not_clear_the_main_timeline() {
    let (_server, [alice, bob]) = users(["alice", "bob"]).await;
    let room = public_room(&alice, &[&bob]).await;
    let root = alice.send_text(&room, "one").await;
    let second = alice.send_text(&room, "two").await;
    let path = room_path(&room, &format!("/receipt/m.read/{}", esc(&second)));
    assert_ok(&bob.post(&path, &json!({"thread_id": root})).await);
    assert_eq!(unread(&bob, &room).await, (2, 0), "a receipt in a thread");
    assert_error(&bob.post(&path, &json!({"thread_id": 5})).await, 400, "M_BAD_JSON");
    assert_ok(&bob.post(&path, &json!({"thread_id": "main"})).await);
    assert_eq!(unread(&bob, &room).await, (0, 0), "a receipt on the main timeline");
}

#[tokio::test]
async fn to_device_star_and_a_named_device_send_one_message_per_device() {
    let (server, [alice, bob]) = users(["alice", "bob"]).await;
    let phone = User::login(&server.base(), "bob").await;
    let tablet = User::login(&server.base(), "bob").await;
    let messages =
        json!({ &bob.user_id: {"*": {"for": "everyone"}, &phone.device_id: {"for": "phone"}} });
    assert_ok(&send_to_device(&alice, "t1", messages).await);
    let contents = |sync: &Value| -> Vec<Value> {
        to_device_events(sync).iter().map(|e| e["content"].clone()).collect()
    };
    assert_eq!(contents(&phone.sync(None, 0).await), [json!({"for": "phone"})]);
    for other in [&bob, &tablet] {
        assert_eq!(contents(&other.sync(None, 0).await), [json!({"for": "everyone"})]);
    }
}

#[tokio::test]
async fn an_event_over_64_kib_is_too_large() {
    let (_server, [alice]) = users(["alice"]).await;
    let room = public_room(&alice, &[]).await;
    let big = json!({"msgtype": "m.text", "body": "x".repeat(65_536)});
    let reply = alice.put(&room_path(&room, "/send/m.room.message/big"), &big).await;
    assert_error(&reply, 413, "M_TOO_LARGE");
    let topic = json!({"topic": "x".repeat(65_536)});
    let reply = alice.put(&room_path(&room, "/state/m.room.topic"), &topic).await;
    assert_error(&reply, 413, "M_TOO_LARGE");
    // Well under the limit is fine (the whole event is measured, not only the content).
    let fits = json!({"msgtype": "m.text", "body": "x".repeat(60_000)});
    assert_ok(&alice.put(&room_path(&room, "/send/m.room.message/fits"), &fits).await);
    let events = timeline(&alice.sync(None, 0).await, &room);
    let messages = of_type(&events, "m.room.message");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["content"]["body"].as_str().map(str::len), Some(60_000));
    assert!(of_type(&events, "m.room.topic").is_empty());
}

#[tokio::test]
async fn a_user_has_at_most_twenty_pushers() {
    let (_server, [alice]) = users(["alice"]).await;
    for n in 0..20 {
        assert_ok(
            &alice.post("/pushers/set", &pusher_body("org.example.app", &format!("k{n}"))).await,
        );
    }
    let extra = alice.post("/pushers/set", &pusher_body("org.example.app", "k20")).await;
    assert_error(&extra, 400, "M_LIMIT_EXCEEDED");
    // Replacing one (same app id and pushkey) is no new pusher.
    let mut renamed = pusher_body("org.example.app", "k0");
    renamed["device_display_name"] = json!("Tablet");
    assert_ok(&alice.post("/pushers/set", &renamed).await);
    let listed = pushers(&alice).await;
    assert_eq!(listed.len(), 20);
    assert!(listed.iter().any(|p| p["pushkey"] == "k0" && p["device_display_name"] == "Tablet"));
    assert!(listed.iter().all(|p| p["pushkey"] != "k20"), "{listed:?}");
    // Deleting one makes room for another.
    let delete = json!({"kind": null, "app_id": "org.example.app", "pushkey": "k1"});
    assert_ok(&alice.post("/pushers/set", &delete).await);
    assert_ok(&alice.post("/pushers/set", &pusher_body("org.example.app", "k20")).await);
    assert_eq!(pushers(&alice).await.len(), 20);
}

#[tokio::test]
async fn a_cors_preflight_is_answered_for_any_origin() {
    let server = TestHomeserver::start().await;
    let origin = ("origin", "https://app.example.org");
    let preflight = [
        origin,
        ("access-control-request-method", "GET"),
        ("access-control-request-headers", "authorization"),
    ];
    let reply = request_with_headers(
        &server.base(),
        Method::OPTIONS,
        "/_matrix/client/v3/sync",
        &preflight,
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.headers);
    let header = |reply: &Reply, name: &str| {
        reply.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_lowercase()
    };
    assert_eq!(header(&reply, "access-control-allow-origin"), "*");
    assert!(header(&reply, "access-control-allow-methods").contains("get"), "{:?}", reply.headers);
    assert!(
        header(&reply, "access-control-allow-headers").contains("authorization"),
        "{:?}",
        reply.headers
    );
    // The request that follows carries the header too.
    let versions =
        request_with_headers(&server.base(), Method::GET, "/_matrix/client/versions", &[origin])
            .await;
    assert_ok(&versions);
    assert_eq!(header(&versions, "access-control-allow-origin"), "*");
}

#[tokio::test]
async fn m_fully_read_cannot_be_set_as_account_data() {
    let (_server, [alice]) = users(["alice"]).await;
    let path = format!("/user/{}/account_data/m.fully_read", esc(&alice.user_id));
    let reply = alice.put(&path, &json!({"event_id": "$somewhere"})).await;
    assert_error(&reply, 405, "M_BAD_JSON");
    assert_error(&alice.get(&path).await, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn logging_in_again_as_a_device_invalidates_its_older_token() {
    let (server, [alice]) = users(["alice"]).await;
    let phone = User::login(&server.base(), "alice").await;
    let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user",
        "user": "alice"}, "password": "pw", "device_id": alice.device_id});
    let login =
        request(&server.base(), Method::POST, "/_matrix/client/v3/login", None, &body).await;
    assert_ok(&login);
    assert_eq!(login.json["device_id"], alice.device_id);
    let token = login.json["access_token"].as_str().expect("access_token");
    assert_ne!(token, alice.token);
    assert_error(&alice.get("/account/whoami").await, 401, "M_UNKNOWN_TOKEN");
    let path = "/_matrix/client/v3/account/whoami";
    let whoami = request(&server.base(), Method::GET, path, Some(token), &Value::Null).await;
    assert_ok(&whoami);
    assert_eq!(whoami.json["device_id"], alice.device_id);
    assert_ok(&phone.get("/account/whoami").await);
}

#[tokio::test]
async fn a_malformed_path_parameter_is_a_matrix_error() {
    let (_server, [alice, _bob]) = users(["alice", "bob"]).await;
    // %FF does not decode to UTF-8: axum's own rejection would be plain text.
    let reply = alice.get("/rooms/%FF/state").await;
    assert_error(&reply, 400, "M_INVALID_PARAM");
    assert!(reply.json["error"].as_str().unwrap().contains("path"), "{}", reply.json);
}
