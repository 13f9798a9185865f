//! `GET /sync`: what changed for a user's device since a token.
//!
//! A token is `s{stream}_{to_device}`: the main stream position (events, membership, receipts,
//! account data) and the last to-device message handed out. Syncing with a token acknowledges
//! (deletes) the device's to-device messages up to it. At most [`TO_DEVICE_LIMIT`] messages go
//! out per response, in arrival order; the rest follow in the next ones.
//!
//! Runs on a blocking thread with the connection; the long-poll wait lives in the API handler.

use rusqlite::Connection;
use serde_json::{Map, Value, json};

use super::api::error::{ApiResult, MatrixError};
use super::{Homeserver, PUSH_RULES, store};

pub const TO_DEVICE_LIMIT: usize = 100;
const TIMELINE_LIMIT: usize = 50;

/// A parsed `since`/`next_batch` token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncToken {
    pub stream: i64,
    pub to_device: i64,
}

impl SyncToken {
    pub fn parse(token: &str) -> ApiResult<SyncToken> {
        let bad = || MatrixError::invalid_param(format!("malformed sync token {token:?}"));
        let (stream, to_device) =
            token.strip_prefix('s').and_then(|t| t.split_once('_')).ok_or_else(bad)?;
        Ok(SyncToken {
            stream: stream.parse().map_err(|_| bad())?,
            to_device: to_device.parse().map_err(|_| bad())?,
        })
    }

    pub fn render(&self) -> String {
        format!("s{}_{}", self.stream, self.to_device)
    }
}

/// One sync response, and whether it holds anything (an empty one makes a long-poll wait).
pub fn sync_once(
    hs: &Homeserver,
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    since: Option<SyncToken>,
    full_state: bool,
) -> ApiResult<(Value, bool)> {
    let initial = since.is_none();
    let viewer = Viewer { conn, user_id, device_id };
    let since = since.unwrap_or_default();
    if since.to_device > 0 {
        store::ack_to_device(conn, user_id, device_id, since.to_device)?;
    }
    let upto = store::current_stream(conn)?;
    let mut next = SyncToken { stream: upto, to_device: since.to_device };
    let mut any = false;

    let messages =
        store::to_device_messages(conn, user_id, device_id, since.to_device, TO_DEVICE_LIMIT)?;
    if let Some((last, _)) = messages.last() {
        next.to_device = *last;
        any = true;
    }
    let to_device: Vec<Value> = messages.into_iter().map(|(_, m)| m).collect();

    let mut account_data = Vec::new();
    let mut saw_rules = false;
    for (kind, content) in store::account_data_since(conn, user_id, since.stream)? {
        let content = if kind == PUSH_RULES {
            saw_rules = true;
            json!({ "global": hs.merged_rules(conn, user_id)? })
        } else {
            content
        };
        account_data.push(json!({ "type": kind, "content": content }));
    }
    if initial && !saw_rules {
        account_data.push(json!({
            "type": PUSH_RULES,
            "content": { "global": hs.merged_rules(conn, user_id)? },
        }));
    }
    any |= !account_data.is_empty();

    let mut join = Map::new();
    for (room_id, joined_at) in store::rooms_with_membership(conn, user_id, "join")? {
        // A room joined since the token is new to this device: its state and recent timeline.
        let fresh = initial || joined_at > since.stream;
        let span = Span { since: if fresh { 0 } else { since.stream }, upto, full_state };
        if let Some(room) = joined_room(&viewer, &room_id, span)? {
            join.insert(room_id, room);
        }
    }
    let mut invite = Map::new();
    for (room_id, invited_at) in store::rooms_with_membership(conn, user_id, "invite")? {
        if initial || invited_at > since.stream {
            invite.insert(
                room_id.clone(),
                json!({"invite_state": {"events": stripped_state(conn, &room_id, user_id)?}}),
            );
        }
    }
    let mut leave = Map::new();
    if !initial {
        for (room_id, left_at) in store::rooms_with_membership(conn, user_id, "leave")? {
            if left_at > since.stream {
                let (events, _) = store::room_events(conn, &room_id, left_at - 1, left_at, 1)?;
                let events = viewer.events(events.into_iter().map(|(_, e)| e))?;
                leave.insert(room_id, json!({"timeline": {"events": events, "limited": false}}));
            }
        }
    }
    // A full-state sync always has something to say (the state), so it never waits.
    any |= full_state || !join.is_empty() || !invite.is_empty() || !leave.is_empty();

    let response = json!({
        "next_batch": next.render(),
        "rooms": { "join": join, "invite": invite, "leave": leave },
        "account_data": { "events": account_data },
        "to_device": { "events": to_device },
    });
    Ok((response, any))
}

/// Who a sync is for: events are shaped for this user's device.
struct Viewer<'a> {
    conn: &'a Connection,
    user_id: &'a str,
    device_id: &'a str,
}

impl Viewer<'_> {
    /// Events as this device sees them: `unsigned.transaction_id` only on events this very
    /// device sent (the spec: "the same client which sent it").
    fn events(&self, events: impl IntoIterator<Item = Value>) -> ApiResult<Vec<Value>> {
        events
            .into_iter()
            .map(|mut event| {
                if event["sender"] == self.user_id
                    && let Some(event_id) = event["event_id"].as_str()
                    && let Some(txn) =
                        store::txn_of(self.conn, event_id, self.user_id, self.device_id)?
                {
                    event["unsigned"]["transaction_id"] = json!(txn);
                }
                Ok(event)
            })
            .collect()
    }
}

/// What part of a room's history a sync covers.
#[derive(Clone, Copy)]
struct Span {
    /// Events after this stream (0: the room is new to the device).
    since: i64,
    upto: i64,
    /// Send the whole current state even for an incremental sync.
    full_state: bool,
}

/// A joined room's section, or `None` when nothing in it changed for this user.
fn joined_room(viewer: &Viewer<'_>, room_id: &str, span: Span) -> ApiResult<Option<Value>> {
    let (conn, user_id) = (viewer.conn, viewer.user_id);
    let fresh = span.since == 0;
    let (events, limited) =
        store::room_events(conn, room_id, span.since, span.upto, TIMELINE_LIMIT)?;
    let receipts =
        if fresh { Vec::new() } else { store::receipts_since(conn, room_id, span.since, user_id)? };
    // The viewer's own receipts (public and private) are among `receipts`.
    if !fresh && !span.full_state && events.is_empty() && receipts.is_empty() {
        return Ok(None);
    }
    let first = events.first().map_or(span.upto, |(s, _)| *s);
    let state: Vec<Value> = if limited && !fresh && !span.full_state {
        // The timeline skips part of what happened: its state changes go in `state`.
        viewer.events(store::state_between(conn, room_id, span.since, first)?)?
    } else if fresh || span.full_state {
        // The state before the timeline starts: current state not in the timeline.
        let in_timeline: std::collections::HashSet<&str> =
            events.iter().filter_map(|(_, e)| e["event_id"].as_str()).collect();
        let state = store::room_state(conn, room_id)?
            .into_iter()
            .filter(|e| !in_timeline.contains(e["event_id"].as_str().unwrap_or_default()));
        viewer.events(state)?
    } else {
        Vec::new()
    };
    let mut receipt_content = Map::new();
    for (event_id, reader, kind, ts) in receipts {
        let entry = receipt_content.entry(event_id).or_insert_with(|| json!({}));
        entry[&kind][&reader] = json!({ "ts": ts });
    }
    let ephemeral: Vec<Value> = if receipt_content.is_empty() {
        Vec::new()
    } else {
        vec![json!({ "type": "m.receipt", "content": receipt_content })]
    };
    let (notification_count, highlight_count) = store::room_counts(conn, room_id, user_id)?;
    let timeline = viewer.events(events.into_iter().map(|(_, e)| e))?;
    Ok(Some(json!({
        "timeline": {
            "events": timeline, "limited": limited, "prev_batch": format!("s{}_0", first - 1),
        },
        "state": { "events": state },
        "ephemeral": { "events": ephemeral },
        "account_data": { "events": [] },
        "unread_notifications": {
            "notification_count": notification_count,
            "highlight_count": highlight_count,
        },
    })))
}

/// State events an invitee sees, stripped (the spec's recommended set).
const STRIPPED_STATE: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
];

/// The stripped state an invitee sees: the recommended events and their own membership (not
/// the other members').
fn stripped_state(conn: &Connection, room_id: &str, user_id: &str) -> ApiResult<Vec<Value>> {
    Ok(store::room_state(conn, room_id)?
        .into_iter()
        .filter(|e| match e["type"].as_str() {
            Some("m.room.member") => e["state_key"] == user_id,
            Some(kind) => STRIPPED_STATE.contains(&kind),
            None => false,
        })
        .map(|e| {
            json!({
                "type": e["type"], "state_key": e["state_key"], "sender": e["sender"],
                "content": e["content"],
            })
        })
        .collect())
}
