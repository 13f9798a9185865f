//! Rooms and their events: create, join, invite, leave, send, state, display names and read
//! receipts, with push-rule evaluation for every new event.
//!
//! Every new event is evaluated, in the transaction that stores it, against the push rules of
//! each joined local member but the sender (and of the invitee, for an invite). A match that
//! notifies becomes a `push_actions` row: it counts as unread until the member's receipt passes
//! it, and the member's pushers send it. No event is stored without its notifications, and no
//! notification without its event.
//!
//! Runs on a blocking thread with the connection (see [`Homeserver::db`]); never awaits.

use axum::http::StatusCode;
use rusqlite::{Connection, Transaction};
use serde_json::{Map, Value, json};

use super::api::error::{ApiResult, MatrixError};
use super::pushrules::{Action, DisplayName, FlatEvent, PowerLevels, RoomCtx};
use super::{Homeserver, now_ms, random_id, store};

/// The spec's limit on a whole event, as JSON.
pub const MAX_EVENT_BYTES: usize = 65_536;

/// The room version herald's rooms claim (no federation, so only the event shapes matter).
pub const ROOM_VERSION: &str = "10";

/// An event about to be stored.
pub struct NewEvent<'a> {
    pub room_id: &'a str,
    pub sender: &'a str,
    pub kind: &'a str,
    pub state_key: Option<&'a str>,
    pub content: Value,
}

/// Stores an event, evaluates push rules for the members, and returns `(event_id, stream)`.
/// The caller commits and then calls [`Homeserver::notify_change`].
pub fn append(
    hs: &Homeserver,
    tx: &Transaction<'_>,
    new: NewEvent<'_>,
) -> ApiResult<(String, i64)> {
    let stream = store::next_stream(tx)?;
    let event_id = format!("${}", random_id(24));
    let ts = now_ms();
    let mut event = json!({
        "event_id": event_id,
        "room_id": new.room_id,
        "sender": new.sender,
        "type": new.kind,
        "content": new.content,
        "origin_server_ts": ts,
        "unsigned": {},
    });
    if let Some(key) = new.state_key {
        event["state_key"] = json!(key);
    }
    if event.to_string().len() > MAX_EVENT_BYTES {
        return Err(MatrixError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            format!("events are limited to {MAX_EVENT_BYTES} bytes"),
        ));
    }
    store::insert_event(tx, stream, &event_id, new.room_id, &event)?;
    evaluate_push(hs, tx, &event, stream, ts)?;
    Ok((event_id, stream))
}

/// Runs every target member's push rules over `event` and records the notifying matches.
fn evaluate_push(
    hs: &Homeserver,
    tx: &Transaction<'_>,
    event: &Value,
    stream: i64,
    ts: i64,
) -> ApiResult<()> {
    let room_id = event["room_id"].as_str().unwrap_or_default();
    let sender = event["sender"].as_str().unwrap_or_default();
    let mut targets = store::joined_members(tx, room_id)?;
    let member_count = targets.len() as u64;
    if event["type"] == "m.room.member"
        && event["content"]["membership"] == "invite"
        && let Some(invitee) = event["state_key"].as_str()
        && !targets.iter().any(|(u, _)| u == invitee)
    {
        targets.push((invitee.to_owned(), None));
    }
    targets.retain(|(user, _)| user != sender);
    if targets.is_empty() {
        return Ok(());
    }
    let power_levels = power_levels(tx, room_id)?;
    let flat = FlatEvent::new(event);
    for (user, display_name) in targets {
        let rules = hs.compiled_rules(tx, &user)?;
        let display_name = display_name.as_deref().map(DisplayName::new);
        let room = RoomCtx {
            member_count: Some(member_count),
            display_name: display_name.as_ref(),
            power_levels: power_levels.as_ref(),
        };
        if let Some(found) = rules.evaluate(&flat, &room)
            && found.notify
        {
            let actions = Value::Array(found.actions.iter().map(Action::to_json).collect());
            store::insert_push_action(tx, &user, stream, room_id, &actions, found.highlight(), ts)?;
        }
    }
    Ok(())
}

fn require_room(conn: &Connection, room_id: &str) -> ApiResult<()> {
    if store::room_exists(conn, room_id)? {
        Ok(())
    } else {
        Err(MatrixError::not_found(format!("unknown room {room_id}")))
    }
}

pub(crate) fn require_joined(conn: &Connection, room_id: &str, user_id: &str) -> ApiResult<()> {
    require_room(conn, room_id)?;
    match store::membership(conn, room_id, user_id)?.as_deref() {
        Some("join") => Ok(()),
        _ => Err(MatrixError::forbidden(format!("{user_id} is not joined to {room_id}"))),
    }
}

/// The room's power levels, or `None` before it has any (then nothing is restricted).
fn power_levels(conn: &Connection, room_id: &str) -> ApiResult<Option<PowerLevels>> {
    Ok(store::state_event(conn, room_id, "m.room.power_levels", "")?
        .map(|e| PowerLevels::from_content(&e["content"])))
}

/// Sending `kind` (a state event when `state`) needs its level from the room's power levels.
fn check_power(
    conn: &Connection,
    room_id: &str,
    user_id: &str,
    kind: &str,
    state: bool,
) -> ApiResult<()> {
    let Some(levels) = power_levels(conn, room_id)? else { return Ok(()) };
    let (needed, have) = (levels.event_level(kind, state), levels.user_level(user_id));
    if have >= needed {
        Ok(())
    } else {
        Err(MatrixError::forbidden(format!(
            "sending {kind} needs power level {needed}; {user_id} has {have}"
        )))
    }
}

/// Inviting needs the room's `invite` power level (0 by default).
fn check_invite_power(conn: &Connection, room_id: &str, user_id: &str) -> ApiResult<()> {
    let Some(levels) = power_levels(conn, room_id)? else { return Ok(()) };
    let (needed, have) = (levels.invite, levels.user_level(user_id));
    if have >= needed {
        Ok(())
    } else {
        Err(MatrixError::forbidden(format!("inviting needs power level {needed}; you have {have}")))
    }
}

/// `POST /createRoom`: the creator joins; the preset, name, topic, initial state and invites
/// become the room's first events. Returns the room id.
pub fn create_room(
    hs: &Homeserver,
    conn: &mut Connection,
    creator: &str,
    request: &Map<String, Value>,
) -> ApiResult<String> {
    let str_field = |name: &str| -> ApiResult<Option<&str>> {
        match request.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(MatrixError::bad_json(format!("`{name}` must be a string"))),
        }
    };
    let preset = str_field("preset")?.unwrap_or(if str_field("visibility")? == Some("public") {
        "public_chat"
    } else {
        "private_chat"
    });
    if !matches!(preset, "private_chat" | "public_chat" | "trusted_private_chat") {
        return Err(MatrixError::invalid_param(format!("unknown preset {preset:?}")));
    }
    let invites: Vec<String> = match request.get("invite") {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|_| MatrixError::bad_json("`invite` must be a list of user ids"))?,
    };
    for user in &invites {
        check_invitee(hs, conn, user)?;
        if user == creator {
            return Err(MatrixError::invalid_param("the creator cannot invite themselves"));
        }
    }
    let initial_state: Vec<Map<String, Value>> = match request.get("initial_state") {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|_| MatrixError::bad_json("`initial_state` must be a list of state events"))?,
    };
    let is_direct = request.get("is_direct").and_then(Value::as_bool).unwrap_or(false);
    let name = str_field("name")?;
    let topic = str_field("topic")?;

    let room_id = format!("!{}:{}", random_id(18), hs.server_name());
    let mut users = json!({ creator: 100 });
    if preset == "trusted_private_chat" {
        for user in &invites {
            users[user] = json!(100);
        }
    }
    let mut power_levels = json!({
        "users": users, "users_default": 0, "events_default": 0, "state_default": 50,
        "ban": 50, "kick": 50, "redact": 50, "invite": if preset == "public_chat" { 50 } else { 0 },
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100,
        },
        "notifications": { "room": 50 },
    });
    if let Some(Value::Object(overrides)) = request.get("power_level_content_override") {
        for (k, v) in overrides {
            power_levels[k] = v.clone();
        }
    }
    let mut create =
        request.get("creation_content").and_then(Value::as_object).cloned().unwrap_or_default();
    create.insert("creator".into(), json!(creator));
    create.insert("room_version".into(), json!(ROOM_VERSION));
    let join_rule = if preset == "public_chat" { "public" } else { "invite" };

    let creator_name = store::displayname(conn, creator)?;
    let tx = conn.transaction()?;
    let state = |kind: &str, key: &str, content: Value| -> ApiResult<()> {
        let new =
            NewEvent { room_id: &room_id, sender: creator, kind, state_key: Some(key), content };
        append(hs, &tx, new).map(drop)
    };
    state("m.room.create", "", Value::Object(create))?;
    state("m.room.member", creator, member_content("join", creator_name.as_deref(), false))?;
    state("m.room.power_levels", "", power_levels)?;
    state("m.room.join_rules", "", json!({"join_rule": join_rule}))?;
    state("m.room.history_visibility", "", json!({"history_visibility": "shared"}))?;
    for event in &initial_state {
        let kind = event.get("type").and_then(Value::as_str).ok_or_else(|| {
            MatrixError::bad_json("every `initial_state` event needs a string `type`")
        })?;
        if matches!(kind, "m.room.member" | "m.room.create") {
            return Err(MatrixError::invalid_param(format!(
                "{kind} cannot be in `initial_state`: use `invite` and `creation_content`"
            )));
        }
        let key = event.get("state_key").and_then(Value::as_str).unwrap_or("");
        check_state_key(creator, key)?;
        let content = match event.get("content") {
            None => json!({}),
            Some(content @ Value::Object(_)) => content.clone(),
            Some(_) => {
                return Err(MatrixError::bad_json("`initial_state` contents must be objects"));
            }
        };
        state(kind, key, content)?;
    }
    if let Some(name) = name {
        state("m.room.name", "", json!({"name": name}))?;
    }
    if let Some(topic) = topic {
        state("m.room.topic", "", json!({"topic": topic}))?;
    }
    for user in &invites {
        let name = store::displayname(&tx, user)?;
        state("m.room.member", user, member_content("invite", name.as_deref(), is_direct))?;
    }
    tx.commit()?;
    hs.notify_change();
    Ok(room_id)
}

fn member_content(membership: &str, displayname: Option<&str>, is_direct: bool) -> Value {
    let mut content = json!({ "membership": membership });
    if let Some(name) = displayname {
        content["displayname"] = json!(name);
    }
    if is_direct {
        content["is_direct"] = json!(true);
    }
    content
}

fn check_invitee(hs: &Homeserver, conn: &Connection, user_id: &str) -> ApiResult<()> {
    if !hs.is_local(user_id) {
        return Err(MatrixError::invalid_param(format!(
            "cannot invite {user_id}: this homeserver does not federate"
        )));
    }
    if !store::user_exists(conn, user_id)? {
        return Err(MatrixError::not_found(format!("unknown user {user_id}")));
    }
    Ok(())
}

/// Writes a membership event for `target` and commits.
fn set_membership(
    hs: &Homeserver,
    conn: &mut Connection,
    room_id: &str,
    sender: &str,
    target: &str,
    membership: &str,
) -> ApiResult<String> {
    let name = store::displayname(conn, target)?;
    let tx = conn.transaction()?;
    let new = NewEvent {
        room_id,
        sender,
        kind: "m.room.member",
        state_key: Some(target),
        content: member_content(membership, name.as_deref(), false),
    };
    let before = store::total_unread(&tx, target)?;
    let (event_id, _) = append(hs, &tx, new)?;
    if membership == "leave" && store::total_unread(&tx, target)? != before {
        // The room's unread notifications no longer count towards the badge.
        store::request_badge(&tx, target)?;
    }
    tx.commit()?;
    hs.notify_change();
    Ok(event_id)
}

/// `POST /rooms/{roomId}/join`: allowed when invited, already joined, or the room is public.
pub fn join(hs: &Homeserver, conn: &mut Connection, user_id: &str, room_id: &str) -> ApiResult<()> {
    require_room(conn, room_id)?;
    match store::membership(conn, room_id, user_id)?.as_deref() {
        Some("join") => return Ok(()),
        Some("invite") => {}
        Some("ban") => return Err(MatrixError::forbidden("you are banned from this room")),
        _ => {
            let rule = store::state_event(conn, room_id, "m.room.join_rules", "")?;
            if rule.as_ref().map(|e| &e["content"]["join_rule"]) != Some(&json!("public")) {
                return Err(MatrixError::forbidden(format!("{room_id} is invite-only")));
            }
        }
    }
    set_membership(hs, conn, room_id, user_id, user_id, "join").map(drop)
}

/// `POST /rooms/{roomId}/invite`.
pub fn invite(
    hs: &Homeserver,
    conn: &mut Connection,
    sender: &str,
    room_id: &str,
    target: &str,
) -> ApiResult<()> {
    require_joined(conn, room_id, sender)?;
    check_invitee(hs, conn, target)?;
    check_invite_power(conn, room_id, sender)?;
    match store::membership(conn, room_id, target)?.as_deref() {
        Some("join") => {
            return Err(MatrixError::forbidden(format!("{target} is already in the room")));
        }
        Some("invite") => return Ok(()),
        Some("ban") => return Err(MatrixError::forbidden(format!("{target} is banned"))),
        _ => {}
    }
    set_membership(hs, conn, room_id, sender, target, "invite").map(drop)
}

/// `POST /rooms/{roomId}/leave`: also declines an invite.
pub fn leave(
    hs: &Homeserver,
    conn: &mut Connection,
    user_id: &str,
    room_id: &str,
) -> ApiResult<()> {
    require_room(conn, room_id)?;
    match store::membership(conn, room_id, user_id)?.as_deref() {
        Some("join" | "invite") => {
            set_membership(hs, conn, room_id, user_id, user_id, "leave").map(drop)
        }
        _ => Err(MatrixError::forbidden(format!("{user_id} is not in {room_id}"))),
    }
}

/// `PUT /rooms/{roomId}/send/{eventType}/{txnId}`: idempotent per user, device and txn id.
pub fn send(
    hs: &Homeserver,
    conn: &mut Connection,
    sender: (&str, &str),
    room_id: &str,
    kind: &str,
    txn_id: &str,
    content: Value,
) -> ApiResult<String> {
    let user_id = sender.0;
    if let Some(event_id) = store::txn_event(conn, sender, room_id, kind, txn_id)? {
        return Ok(event_id);
    }
    require_joined(conn, room_id, user_id)?;
    check_power(conn, room_id, user_id, kind, false)?;
    let tx = conn.transaction()?;
    let new = NewEvent { room_id, sender: user_id, kind, state_key: None, content };
    let (event_id, stream) = append(hs, &tx, new)?;
    store::insert_txn(&tx, sender, room_id, kind, txn_id, &event_id)?;
    read_own_event(&tx, room_id, user_id, &event_id, stream)?;
    tx.commit()?;
    hs.notify_change();
    Ok(event_id)
}

/// `PUT /rooms/{roomId}/state/{eventType}/{stateKey}`. Membership changes go through the
/// membership endpoints.
pub fn set_state(
    hs: &Homeserver,
    conn: &mut Connection,
    sender: &str,
    room_id: &str,
    kind: &str,
    state_key: &str,
    content: Value,
) -> ApiResult<String> {
    if kind == "m.room.member" || kind == "m.room.create" {
        return Err(MatrixError::forbidden(format!(
            "{kind} cannot be set here: use the membership endpoints"
        )));
    }
    require_joined(conn, room_id, sender)?;
    check_state_key(sender, state_key)?;
    check_power(conn, room_id, sender, kind, true)?;
    let tx = conn.transaction()?;
    let new = NewEvent { room_id, sender, kind, state_key: Some(state_key), content };
    let (event_id, stream) = append(hs, &tx, new)?;
    read_own_event(&tx, room_id, sender, &event_id, stream)?;
    tx.commit()?;
    hs.notify_change();
    Ok(event_id)
}

/// A state key that is a user id belongs to that user alone (the room authorization rules).
fn check_state_key(sender: &str, state_key: &str) -> ApiResult<()> {
    if state_key.starts_with('@') && state_key != sender {
        return Err(MatrixError::forbidden(format!(
            "state key {state_key} is another user's: only they can set it"
        )));
    }
    Ok(())
}

/// Sending an event marks the room read up to it (the spec: a receipt moves "whether via the
/// API or by sending an event"); a changed unread total asks the pushers for a badge update.
fn read_own_event(
    tx: &Transaction<'_>,
    room_id: &str,
    user_id: &str,
    event_id: &str,
    stream: i64,
) -> ApiResult<()> {
    let before = store::total_unread(tx, user_id)?;
    if store::set_receipt(tx, room_id, user_id, "m.read", event_id, stream, now_ms())?
        && store::total_unread(tx, user_id)? != before
    {
        store::request_badge(tx, user_id)?;
    }
    Ok(())
}

/// Sets the user's display name, and updates their member event in every joined room.
pub fn set_displayname(
    hs: &Homeserver,
    conn: &mut Connection,
    user_id: &str,
    name: Option<&str>,
) -> ApiResult<()> {
    let rooms = store::rooms_with_membership(conn, user_id, "join")?;
    let tx = conn.transaction()?;
    store::set_displayname(&tx, user_id, name)?;
    for (room_id, _) in rooms {
        let new = NewEvent {
            room_id: &room_id,
            sender: user_id,
            kind: "m.room.member",
            state_key: Some(user_id),
            content: member_content("join", name, false),
        };
        append(hs, &tx, new)?;
    }
    tx.commit()?;
    hs.notify_change();
    Ok(())
}

/// `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}`. A read receipt that moves the
/// user's read position also asks each of their pushers for a badge update.
pub fn receipt(
    hs: &Homeserver,
    conn: &mut Connection,
    user_id: &str,
    room_id: &str,
    receipt_type: &str,
    event_id: &str,
) -> ApiResult<()> {
    if !matches!(receipt_type, "m.read" | "m.read.private" | "m.fully_read") {
        return Err(MatrixError::invalid_param(format!("unknown receipt type {receipt_type:?}")));
    }
    require_joined(conn, room_id, user_id)?;
    let Some((event_stream, event)) = store::event_by_id(conn, event_id)? else {
        return Err(MatrixError::not_found(format!("unknown event {event_id}")));
    };
    if event["room_id"] != room_id {
        return Err(MatrixError::invalid_param(format!("{event_id} is not in {room_id}")));
    }
    if receipt_type == "m.fully_read" {
        // The read marker is room account data, which this server does not keep; it moves no
        // count.
        return Ok(());
    }
    let before = store::total_unread(conn, user_id)?;
    let tx = conn.transaction()?;
    let moved =
        store::set_receipt(&tx, room_id, user_id, receipt_type, event_id, event_stream, now_ms())?;
    if moved && store::total_unread(&tx, user_id)? != before {
        store::request_badge(&tx, user_id)?;
    }
    tx.commit()?;
    hs.notify_change();
    Ok(())
}
