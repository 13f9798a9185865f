//! SQLite persistence for the embedded homeserver: the schema and every query. The only module
//! that writes SQL, so a schema change touches this file alone.
//!
//! One connection, in WAL mode with `synchronous=FULL`: a write that returned is on disk, so a
//! homeserver killed with SIGKILL loses no event, notification, pusher position or to-device
//! message. Callers hold the connection only inside `spawn_blocking` (see `Homeserver::db`),
//! never across an `.await`.
//!
//! Positions: one counter, `stream`, orders everything `/sync` reports except to-device
//! messages (events, membership, receipts, account data); to-device messages have their own
//! ids, so a sync can return 100 of them without skipping any.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::Value;

pub use rusqlite::Error as DbError;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('stream', 0), ('schema_version', 1);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY, password_hash TEXT NOT NULL, displayname TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS access_tokens (
    token TEXT PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    stream INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, room_id TEXT NOT NULL,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_room ON events (room_id, stream);
CREATE TABLE IF NOT EXISTS room_state (
    room_id TEXT NOT NULL, type TEXT NOT NULL, state_key TEXT NOT NULL, stream INTEGER NOT NULL,
    PRIMARY KEY (room_id, type, state_key)
);
CREATE TABLE IF NOT EXISTS members (
    room_id TEXT NOT NULL, user_id TEXT NOT NULL, membership TEXT NOT NULL, displayname TEXT,
    stream INTEGER NOT NULL, joined_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX IF NOT EXISTS members_by_user ON members (user_id, membership);
-- A transaction is identified by its device and its request path (room and event type).
CREATE TABLE IF NOT EXISTS txns (
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, room_id TEXT NOT NULL, type TEXT NOT NULL,
    txn_id TEXT NOT NULL, event_id TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, room_id, type, txn_id)
);
CREATE INDEX IF NOT EXISTS txns_by_event ON txns (event_id);
CREATE TABLE IF NOT EXISTS receipts (
    room_id TEXT NOT NULL, user_id TEXT NOT NULL, receipt_type TEXT NOT NULL,
    event_id TEXT NOT NULL, event_stream INTEGER NOT NULL, ts INTEGER NOT NULL,
    stream INTEGER NOT NULL, PRIMARY KEY (room_id, user_id, receipt_type)
);
-- How far each member has read a room: their latest m.read or m.read.private receipt, but
-- never before they joined (what happened before, an invite included, is not unread).
CREATE VIEW IF NOT EXISTS read_marks AS
SELECT m.room_id, m.user_id, MAX(m.joined_at, COALESCE((
    SELECT MAX(r.event_stream) FROM receipts r
    WHERE r.room_id = m.room_id AND r.user_id = m.user_id
      AND r.receipt_type IN ('m.read', 'm.read.private')), 0)) AS upto
FROM members m;
CREATE TABLE IF NOT EXISTS push_actions (
    user_id TEXT NOT NULL, event_stream INTEGER NOT NULL, room_id TEXT NOT NULL,
    actions TEXT NOT NULL, highlight INTEGER NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY (user_id, event_stream)
);
CREATE INDEX IF NOT EXISTS push_actions_by_room ON push_actions (user_id, room_id, event_stream);
CREATE TABLE IF NOT EXISTS account_data (
    user_id TEXT NOT NULL, type TEXT NOT NULL, content TEXT NOT NULL, stream INTEGER NOT NULL,
    PRIMARY KEY (user_id, type)
);
CREATE TABLE IF NOT EXISTS pushers (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL, json TEXT NOT NULL, pushkey_ts INTEGER NOT NULL,
    position INTEGER NOT NULL, badge_pending INTEGER NOT NULL DEFAULT 0,
    badge_seq INTEGER NOT NULL DEFAULT 0, failing_since INTEGER, failing_item TEXT,
    UNIQUE (user_id, app_id, pushkey)
);
CREATE TABLE IF NOT EXISTS to_device (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, device_id TEXT NOT NULL,
    sender TEXT NOT NULL, type TEXT NOT NULL, content TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS to_device_inbox ON to_device (user_id, device_id, id);
CREATE TABLE IF NOT EXISTS to_device_txns (
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, type TEXT NOT NULL, txn_id TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, type, txn_id)
);
"#;

/// Opens (creating if needed) the database at `path`; `:memory:` works for tests.
pub fn open(path: &Path) -> Result<Connection, DbError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Takes the next position of the main stream.
pub fn next_stream(tx: &Transaction<'_>) -> Result<i64, DbError> {
    tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'stream' RETURNING value",
        [],
        |r| r.get(0),
    )
}

pub fn current_stream(conn: &Connection) -> Result<i64, DbError> {
    conn.query_row("SELECT value FROM meta WHERE key = 'stream'", [], |r| r.get(0))
}

fn json(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

// ---- accounts ----

pub fn create_user(conn: &Connection, user_id: &str, password_hash: &str) -> Result<bool, DbError> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO users (user_id, password_hash) VALUES (?1, ?2)",
        params![user_id, password_hash],
    )?;
    Ok(n == 1)
}

pub fn user_exists(conn: &Connection, user_id: &str) -> Result<bool, DbError> {
    conn.query_row("SELECT 1 FROM users WHERE user_id = ?1", [user_id], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
}

pub fn password_hash(conn: &Connection, user_id: &str) -> Result<Option<String>, DbError> {
    conn.query_row("SELECT password_hash FROM users WHERE user_id = ?1", [user_id], |r| r.get(0))
        .optional()
}

pub fn add_device(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    token: &str,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT OR IGNORE INTO devices (user_id, device_id) VALUES (?1, ?2)",
        params![user_id, device_id],
    )?;
    // Logging in again as an existing device invalidates its older tokens (the spec).
    conn.execute(
        "DELETE FROM access_tokens WHERE user_id = ?1 AND device_id = ?2",
        params![user_id, device_id],
    )?;
    conn.execute(
        "INSERT INTO access_tokens (token, user_id, device_id) VALUES (?1, ?2, ?3)",
        params![token, user_id, device_id],
    )?;
    Ok(())
}

pub fn devices(conn: &Connection, user_id: &str) -> Result<Vec<String>, DbError> {
    let mut stmt = conn.prepare_cached("SELECT device_id FROM devices WHERE user_id = ?1")?;
    stmt.query_map([user_id], |r| r.get(0))?.collect()
}

/// `(user_id, device_id)` for an access token.
pub fn token_owner(conn: &Connection, token: &str) -> Result<Option<(String, String)>, DbError> {
    conn.query_row("SELECT user_id, device_id FROM access_tokens WHERE token = ?1", [token], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// Logs a token out; a device left with no token is deleted with its to-device inbox.
pub fn delete_token(conn: &mut Connection, token: &str) -> Result<(), DbError> {
    let tx = conn.transaction()?;
    let owner: Option<(String, String)> = tx
        .query_row(
            "DELETE FROM access_tokens WHERE token = ?1 RETURNING user_id, device_id",
            [token],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((user_id, device_id)) = owner {
        let in_use: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM access_tokens WHERE user_id = ?1 AND device_id = ?2)",
            params![user_id, device_id],
            |r| r.get(0),
        )?;
        if !in_use {
            tx.execute(
                "DELETE FROM devices WHERE user_id = ?1 AND device_id = ?2",
                params![user_id, device_id],
            )?;
            tx.execute(
                "DELETE FROM to_device WHERE user_id = ?1 AND device_id = ?2",
                params![user_id, device_id],
            )?;
        }
    }
    tx.commit()
}

pub fn displayname(conn: &Connection, user_id: &str) -> Result<Option<String>, DbError> {
    conn.query_row("SELECT displayname FROM users WHERE user_id = ?1", [user_id], |r| r.get(0))
        .optional()
        .map(Option::flatten)
}

pub fn set_displayname(
    conn: &Connection,
    user_id: &str,
    name: Option<&str>,
) -> Result<(), DbError> {
    conn.execute("UPDATE users SET displayname = ?2 WHERE user_id = ?1", params![user_id, name])
        .map(drop)
}

// ---- rooms and events ----

/// Stores an event at `stream` and, for state events, makes it the room's current state.
pub fn insert_event(
    tx: &Transaction<'_>,
    stream: i64,
    event_id: &str,
    room_id: &str,
    event: &Value,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO events (stream, event_id, room_id, json) VALUES (?1, ?2, ?3, ?4)",
        params![stream, event_id, room_id, event.to_string()],
    )?;
    if let Some(state_key) = event.get("state_key").and_then(Value::as_str) {
        let kind = event["type"].as_str().unwrap_or_default();
        tx.execute(
            "INSERT OR REPLACE INTO room_state (room_id, type, state_key, stream)
             VALUES (?1, ?2, ?3, ?4)",
            params![room_id, kind, state_key, stream],
        )?;
        if kind == "m.room.member" {
            let content = &event["content"];
            // `joined_at` moves only when the user joins from another membership.
            tx.execute(
                "INSERT INTO members (room_id, user_id, membership, displayname, stream, joined_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, CASE WHEN ?3 = 'join' THEN ?5 ELSE 0 END)
                 ON CONFLICT (room_id, user_id) DO UPDATE SET
                   joined_at = CASE WHEN excluded.membership = 'join' AND membership != 'join'
                                    THEN excluded.stream ELSE joined_at END,
                   membership = excluded.membership, displayname = excluded.displayname,
                   stream = excluded.stream",
                params![
                    room_id,
                    state_key,
                    content["membership"].as_str().unwrap_or("leave"),
                    content["displayname"].as_str(),
                    stream
                ],
            )?;
        }
    }
    Ok(())
}

pub fn event_by_id(conn: &Connection, event_id: &str) -> Result<Option<(i64, Value)>, DbError> {
    conn.query_row("SELECT stream, json FROM events WHERE event_id = ?1", [event_id], |r| {
        Ok((r.get(0)?, json(r.get(1)?)))
    })
    .optional()
}

pub fn event_by_stream(conn: &Connection, stream: i64) -> Result<Option<Value>, DbError> {
    conn.query_row("SELECT json FROM events WHERE stream = ?1", [stream], |r| Ok(json(r.get(0)?)))
        .optional()
}

pub fn room_exists(conn: &Connection, room_id: &str) -> Result<bool, DbError> {
    conn.query_row(
        "SELECT 1 FROM room_state WHERE room_id = ?1 AND type = 'm.room.create'",
        [room_id],
        |_| Ok(()),
    )
    .optional()
    .map(|r| r.is_some())
}

/// The current state event `(type, state_key)` of a room.
pub fn state_event(
    conn: &Connection,
    room_id: &str,
    kind: &str,
    state_key: &str,
) -> Result<Option<Value>, DbError> {
    conn.query_row(
        "SELECT e.json FROM room_state s JOIN events e ON e.stream = s.stream
         WHERE s.room_id = ?1 AND s.type = ?2 AND s.state_key = ?3",
        params![room_id, kind, state_key],
        |r| Ok(json(r.get(0)?)),
    )
    .optional()
}

/// Every current state event of a room.
pub fn room_state(conn: &Connection, room_id: &str) -> Result<Vec<Value>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.json FROM room_state s JOIN events e ON e.stream = s.stream
         WHERE s.room_id = ?1 ORDER BY s.stream",
    )?;
    stmt.query_map([room_id], |r| Ok(json(r.get(0)?)))?.collect()
}

/// State events that became current in `(after, before)`: what changed in the part of a
/// room's history a limited timeline leaves out.
pub fn state_between(
    conn: &Connection,
    room_id: &str,
    after: i64,
    before: i64,
) -> Result<Vec<Value>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.json FROM room_state s JOIN events e ON e.stream = s.stream
         WHERE s.room_id = ?1 AND s.stream > ?2 AND s.stream < ?3 ORDER BY s.stream",
    )?;
    stmt.query_map(params![room_id, after, before], |r| Ok(json(r.get(0)?)))?.collect()
}

/// A user's membership of a room (`join`, `invite`, `leave`, `ban`), if any.
pub fn membership(
    conn: &Connection,
    room_id: &str,
    user_id: &str,
) -> Result<Option<String>, DbError> {
    conn.query_row(
        "SELECT membership FROM members WHERE room_id = ?1 AND user_id = ?2",
        params![room_id, user_id],
        |r| r.get(0),
    )
    .optional()
}

/// Joined members with their room display names.
pub fn joined_members(
    conn: &Connection,
    room_id: &str,
) -> Result<Vec<(String, Option<String>)>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, displayname FROM members WHERE room_id = ?1 AND membership = 'join'",
    )?;
    stmt.query_map([room_id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
}

/// Rooms where the user's membership is `membership`, with the stream where it began (for
/// `join`, when they joined: a later display-name change does not count).
pub fn rooms_with_membership(
    conn: &Connection,
    user_id: &str,
    membership: &str,
) -> Result<Vec<(String, i64)>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_id, CASE WHEN membership = 'join' THEN joined_at ELSE stream END
         FROM members WHERE user_id = ?1 AND membership = ?2",
    )?;
    stmt.query_map(params![user_id, membership], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
}

/// Events of a room in `(after, upto]`, the newest `limit` of them, oldest first; and whether
/// older ones in the range were left out.
pub fn room_events(
    conn: &Connection,
    room_id: &str,
    after: i64,
    upto: i64,
    limit: usize,
) -> Result<(Vec<(i64, Value)>, bool), DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT stream, json FROM events WHERE room_id = ?1 AND stream > ?2 AND stream <= ?3
         ORDER BY stream DESC LIMIT ?4",
    )?;
    let mut events: Vec<(i64, Value)> = stmt
        .query_map(params![room_id, after, upto, limit as i64 + 1], |r| {
            Ok((r.get(0)?, json(r.get(1)?)))
        })?
        .collect::<Result<_, _>>()?;
    let limited = events.len() > limit;
    events.truncate(limit);
    events.reverse();
    Ok((events, limited))
}

/// The event a device already sent with this transaction id to this room and event type.
pub fn txn_event(
    conn: &Connection,
    sender: (&str, &str),
    room_id: &str,
    kind: &str,
    txn_id: &str,
) -> Result<Option<String>, DbError> {
    conn.query_row(
        "SELECT event_id FROM txns WHERE user_id = ?1 AND device_id = ?2 AND room_id = ?3
           AND type = ?4 AND txn_id = ?5",
        params![sender.0, sender.1, room_id, kind, txn_id],
        |r| r.get(0),
    )
    .optional()
}

/// The transaction id `device_id` of `user_id` sent `event_id` with, if that device sent it.
pub fn txn_of(
    conn: &Connection,
    event_id: &str,
    user_id: &str,
    device_id: &str,
) -> Result<Option<String>, DbError> {
    conn.query_row(
        "SELECT txn_id FROM txns WHERE event_id = ?1 AND user_id = ?2 AND device_id = ?3",
        params![event_id, user_id, device_id],
        |r| r.get(0),
    )
    .optional()
}

pub fn insert_txn(
    tx: &Transaction<'_>,
    sender: (&str, &str),
    room_id: &str,
    kind: &str,
    txn_id: &str,
    event_id: &str,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO txns (user_id, device_id, room_id, type, txn_id, event_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![sender.0, sender.1, room_id, kind, txn_id, event_id],
    )
    .map(drop)
}

// ---- receipts, push actions and counts ----

/// Stores a receipt; returns false when the user already had one at or after that event.
pub fn set_receipt(
    tx: &Transaction<'_>,
    room_id: &str,
    user_id: &str,
    receipt_type: &str,
    event_id: &str,
    event_stream: i64,
    ts: i64,
) -> Result<bool, DbError> {
    let current: Option<i64> = tx
        .query_row(
            "SELECT event_stream FROM receipts
             WHERE room_id = ?1 AND user_id = ?2 AND receipt_type = ?3",
            params![room_id, user_id, receipt_type],
            |r| r.get(0),
        )
        .optional()?;
    if current.is_some_and(|c| c >= event_stream) {
        return Ok(false);
    }
    let stream = next_stream(tx)?;
    tx.execute(
        "INSERT OR REPLACE INTO receipts
         (room_id, user_id, receipt_type, event_id, event_stream, ts, stream)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![room_id, user_id, receipt_type, event_id, event_stream, ts, stream],
    )?;
    Ok(true)
}

/// The stream of the latest event the user has read in a room: their later receipt
/// (`m.read` or `m.read.private`), or when they joined if that is later; 0 for non-members.
pub fn read_upto(conn: &Connection, room_id: &str, user_id: &str) -> Result<i64, DbError> {
    conn.query_row(
        "SELECT upto FROM read_marks WHERE room_id = ?1 AND user_id = ?2",
        params![room_id, user_id],
        |r| r.get(0),
    )
    .optional()
    .map(|upto| upto.unwrap_or(0))
}

/// Receipts of a room changed after `since` that `viewer` may see (everyone's `m.read`, only
/// their own `m.read.private`): `(event_id, user_id, receipt_type, ts)`.
pub fn receipts_since(
    conn: &Connection,
    room_id: &str,
    since: i64,
    viewer: &str,
) -> Result<Vec<(String, String, String, i64)>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id, user_id, receipt_type, ts FROM receipts
         WHERE room_id = ?1 AND stream > ?2
           AND (receipt_type = 'm.read' OR (receipt_type = 'm.read.private' AND user_id = ?3))",
    )?;
    stmt.query_map(params![room_id, since, viewer], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?
    .collect()
}

pub fn insert_push_action(
    tx: &Transaction<'_>,
    user_id: &str,
    event_stream: i64,
    room_id: &str,
    actions: &Value,
    highlight: bool,
    ts: i64,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT OR REPLACE INTO push_actions
         (user_id, event_stream, room_id, actions, highlight, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![user_id, event_stream, room_id, actions.to_string(), highlight, ts],
    )
    .map(drop)
}

/// Unread `(notification_count, highlight_count)` of a user in a room.
pub fn room_counts(conn: &Connection, room_id: &str, user_id: &str) -> Result<(u64, u64), DbError> {
    let read = read_upto(conn, room_id, user_id)?;
    conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(highlight), 0) FROM push_actions
         WHERE user_id = ?1 AND room_id = ?2 AND event_stream > ?3",
        params![user_id, room_id, read],
        |r| Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, i64>(1)?.max(0) as u64)),
    )
}

/// The user's unread notifications over every joined room (the badge).
pub fn total_unread(conn: &Connection, user_id: &str) -> Result<u64, DbError> {
    conn.query_row(
        "SELECT COUNT(*) FROM push_actions p
         JOIN members m ON m.room_id = p.room_id AND m.user_id = p.user_id AND m.membership = 'join'
         JOIN read_marks k ON k.room_id = p.room_id AND k.user_id = p.user_id
         WHERE p.user_id = ?1 AND p.event_stream > k.upto",
        [user_id],
        |r| Ok(r.get::<_, i64>(0)?.max(0) as u64),
    )
}

/// One row of `GET /notifications`.
pub struct NotificationRow {
    pub event_stream: i64,
    pub room_id: String,
    pub actions: Value,
    pub highlight: bool,
    pub ts: i64,
    pub event: Value,
    pub read: bool,
}

/// The user's notifications older than `before` (newest first), at most `limit`.
pub fn notifications(
    conn: &Connection,
    user_id: &str,
    before: i64,
    limit: usize,
    only_highlight: bool,
) -> Result<Vec<NotificationRow>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.event_stream, p.room_id, p.actions, p.highlight, p.ts, e.json,
                p.event_stream <= COALESCE(k.upto, 0)
         FROM push_actions p JOIN events e ON e.stream = p.event_stream
         LEFT JOIN read_marks k ON k.room_id = p.room_id AND k.user_id = p.user_id
         WHERE p.user_id = ?1 AND p.event_stream < ?2 AND (?3 = 0 OR p.highlight = 1)
         ORDER BY p.event_stream DESC LIMIT ?4",
    )?;
    stmt.query_map(params![user_id, before, only_highlight, limit as i64], |r| {
        Ok(NotificationRow {
            event_stream: r.get(0)?,
            room_id: r.get(1)?,
            actions: json(r.get(2)?),
            highlight: r.get(3)?,
            ts: r.get(4)?,
            event: json(r.get(5)?),
            read: r.get(6)?,
        })
    })?
    .collect()
}

// ---- account data ----

pub fn account_data(
    conn: &Connection,
    user_id: &str,
    kind: &str,
) -> Result<Option<Value>, DbError> {
    conn.query_row(
        "SELECT content FROM account_data WHERE user_id = ?1 AND type = ?2",
        params![user_id, kind],
        |r| Ok(json(r.get(0)?)),
    )
    .optional()
}

pub fn set_account_data(
    tx: &Transaction<'_>,
    user_id: &str,
    kind: &str,
    content: &Value,
) -> Result<(), DbError> {
    let stream = next_stream(tx)?;
    tx.execute(
        "INSERT OR REPLACE INTO account_data (user_id, type, content, stream)
         VALUES (?1, ?2, ?3, ?4)",
        params![user_id, kind, content.to_string(), stream],
    )
    .map(drop)
}

/// Account data types of the user changed after `since`.
pub fn account_data_since(
    conn: &Connection,
    user_id: &str,
    since: i64,
) -> Result<Vec<(String, Value)>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT type, content FROM account_data WHERE user_id = ?1 AND stream > ?2",
    )?;
    stmt.query_map(params![user_id, since], |r| Ok((r.get(0)?, json(r.get(1)?))))?.collect()
}

// ---- pushers ----

/// A stored pusher and its queue position. No `Debug`: it holds the pushkey and the URL.
#[derive(Clone)]
pub struct PusherRow {
    pub id: i64,
    pub user_id: String,
    pub app_id: String,
    pub pushkey: String,
    pub json: Value,
    pub pushkey_ts: i64,
    /// The stream of the last notification handled (sent or given up).
    pub position: i64,
    pub badge_pending: bool,
    /// Bumped by every badge request, so a send clears only the request it answered.
    pub badge_seq: i64,
    /// When the first failed attempt of the current notification was (ms since the epoch).
    pub failing_since: Option<i64>,
    /// Which item (`e<stream>` or `b<seq>`) `failing_since` is about.
    pub failing_item: Option<String>,
}

const PUSHER_COLUMNS: &str = "id, user_id, app_id, pushkey, json, pushkey_ts, position, \
     badge_pending, failing_since, badge_seq, failing_item";

fn pusher_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PusherRow> {
    Ok(PusherRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        app_id: r.get(2)?,
        pushkey: r.get(3)?,
        json: json(r.get(4)?),
        pushkey_ts: r.get(5)?,
        position: r.get(6)?,
        badge_pending: r.get(7)?,
        failing_since: r.get(8)?,
        badge_seq: r.get(9)?,
        failing_item: r.get(10)?,
    })
}

/// Adds or replaces a pusher; a new one starts at the current stream (no backlog). Returns its
/// id and the ids of pushers it replaced or removed.
pub fn upsert_pusher(
    tx: &Transaction<'_>,
    user_id: &str,
    app_id: &str,
    pushkey: &str,
    json: &Value,
    append: bool,
    now_ms: i64,
) -> Result<(i64, Vec<i64>), DbError> {
    let mut removed = Vec::new();
    if !append {
        // Without `append`, the same app_id + pushkey for any other user is removed.
        let mut stmt = tx.prepare_cached(
            "DELETE FROM pushers WHERE app_id = ?1 AND pushkey = ?2 AND user_id != ?3 RETURNING id",
        )?;
        removed = stmt
            .query_map(params![app_id, pushkey, user_id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
    }
    let existing: Option<i64> = tx
        .query_row(
            "SELECT id FROM pushers WHERE user_id = ?1 AND app_id = ?2 AND pushkey = ?3",
            params![user_id, app_id, pushkey],
            |r| r.get(0),
        )
        .optional()?;
    let id = match existing {
        Some(id) => {
            tx.execute(
                "UPDATE pushers SET json = ?2 WHERE id = ?1",
                params![id, json.to_string()],
            )?;
            id
        }
        None => {
            let position = current_stream(tx)?;
            tx.query_row(
                "INSERT INTO pushers (user_id, app_id, pushkey, json, pushkey_ts, position)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                params![user_id, app_id, pushkey, json.to_string(), now_ms, position],
                |r| r.get(0),
            )?
        }
    };
    Ok((id, removed))
}

/// Removes a user's pusher; returns its id if there was one.
pub fn delete_pusher(
    conn: &Connection,
    user_id: &str,
    app_id: &str,
    pushkey: &str,
) -> Result<Option<i64>, DbError> {
    conn.query_row(
        "DELETE FROM pushers WHERE user_id = ?1 AND app_id = ?2 AND pushkey = ?3 RETURNING id",
        params![user_id, app_id, pushkey],
        |r| r.get(0),
    )
    .optional()
}

pub fn delete_pusher_by_id(conn: &Connection, id: i64) -> Result<(), DbError> {
    conn.execute("DELETE FROM pushers WHERE id = ?1", [id]).map(drop)
}

pub fn pushers_of(conn: &Connection, user_id: &str) -> Result<Vec<PusherRow>, DbError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {PUSHER_COLUMNS} FROM pushers WHERE user_id = ?1 ORDER BY id"
    ))?;
    stmt.query_map([user_id], pusher_row)?.collect()
}

pub fn all_pushers(conn: &Connection) -> Result<Vec<PusherRow>, DbError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {PUSHER_COLUMNS} FROM pushers ORDER BY id"))?;
    stmt.query_map([], pusher_row)?.collect()
}

pub fn pusher(conn: &Connection, id: i64) -> Result<Option<PusherRow>, DbError> {
    conn.query_row(&format!("SELECT {PUSHER_COLUMNS} FROM pushers WHERE id = ?1"), [id], pusher_row)
        .optional()
}

/// The next notification for a pusher's user after `position` that is still unread:
/// `(event_stream, room_id, actions)`.
pub fn next_push_action(
    conn: &Connection,
    user_id: &str,
    position: i64,
) -> Result<Option<(i64, String, Value)>, DbError> {
    conn.query_row(
        "SELECT p.event_stream, p.room_id, p.actions FROM push_actions p
         JOIN members m ON m.room_id = p.room_id AND m.user_id = p.user_id
           AND m.membership IN ('join', 'invite')
         JOIN read_marks k ON k.room_id = p.room_id AND k.user_id = p.user_id
         WHERE p.user_id = ?1 AND p.event_stream > ?2 AND p.event_stream > k.upto
         ORDER BY p.event_stream LIMIT 1",
        params![user_id, position],
        |r| Ok((r.get(0)?, r.get(1)?, json(r.get(2)?))),
    )
    .optional()
}

pub fn set_pusher_position(conn: &Connection, id: i64, position: i64) -> Result<(), DbError> {
    conn.execute(
        "UPDATE pushers SET position = MAX(position, ?2), failing_since = NULL WHERE id = ?1",
        params![id, position],
    )
    .map(drop)
}

/// Records when `item` first failed to send.
pub fn set_pusher_failing(
    conn: &Connection,
    id: i64,
    since: i64,
    item: &str,
) -> Result<(), DbError> {
    conn.execute(
        "UPDATE pushers SET failing_since = ?2, failing_item = ?3 WHERE id = ?1",
        params![id, since, item],
    )
    .map(drop)
}

/// Clears a pusher's badge request if no newer one came while it was being sent.
pub fn clear_badge(conn: &Connection, id: i64, seq: i64) -> Result<(), DbError> {
    conn.execute(
        "UPDATE pushers SET badge_pending = 0, failing_since = NULL
         WHERE id = ?1 AND badge_seq = ?2",
        params![id, seq],
    )
    .map(drop)
}

/// Marks a badge update due for every pusher of the user.
pub fn request_badge(tx: &Transaction<'_>, user_id: &str) -> Result<(), DbError> {
    tx.execute(
        "UPDATE pushers SET badge_pending = 1, badge_seq = badge_seq + 1 WHERE user_id = ?1",
        [user_id],
    )
    .map(drop)
}

// ---- to-device ----

/// Records a to-device transaction; false if it was seen before (then nothing is stored).
pub fn claim_to_device_txn(
    tx: &Transaction<'_>,
    sender: (&str, &str),
    kind: &str,
    txn_id: &str,
) -> Result<bool, DbError> {
    let n = tx.execute(
        "INSERT OR IGNORE INTO to_device_txns (user_id, device_id, type, txn_id)
         VALUES (?1, ?2, ?3, ?4)",
        params![sender.0, sender.1, kind, txn_id],
    )?;
    Ok(n == 1)
}

pub fn insert_to_device(
    tx: &Transaction<'_>,
    user_id: &str,
    device_id: &str,
    sender: &str,
    kind: &str,
    content: &Value,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO to_device (user_id, device_id, sender, type, content)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user_id, device_id, sender, kind, content.to_string()],
    )
    .map(drop)
}

/// How many unacknowledged to-device messages the device holds.
pub fn to_device_inbox_len(
    tx: &Transaction<'_>,
    user_id: &str,
    device_id: &str,
) -> Result<u64, DbError> {
    tx.query_row(
        "SELECT COUNT(*) FROM to_device WHERE user_id = ?1 AND device_id = ?2",
        params![user_id, device_id],
        |row| row.get::<_, i64>(0),
    )
    .map(|n| u64::try_from(n).unwrap_or(0))
}

/// Deletes the device's messages up to `upto` (acknowledged by a sync with that token).
pub fn ack_to_device(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    upto: i64,
) -> Result<(), DbError> {
    conn.execute(
        "DELETE FROM to_device WHERE user_id = ?1 AND device_id = ?2 AND id <= ?3",
        params![user_id, device_id, upto],
    )
    .map(drop)
}

/// The device's messages after `after`, oldest first, at most `limit`: `(id, event)`.
pub fn to_device_messages(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<(i64, Value)>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, sender, type, content FROM to_device
         WHERE user_id = ?1 AND device_id = ?2 AND id > ?3 ORDER BY id LIMIT ?4",
    )?;
    stmt.query_map(params![user_id, device_id, after, limit as i64], |r| {
        let (sender, kind, content): (String, String, String) = (r.get(1)?, r.get(2)?, r.get(3)?);
        Ok((
            r.get(0)?,
            serde_json::json!({"sender": sender, "type": kind, "content": json(content)}),
        ))
    })?
    .collect()
}
