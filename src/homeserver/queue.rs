//! One task per pusher that sends the user's notifications to the pusher's gateway, in order.
//!
//! The queue is the user's `push_actions` after the pusher's persisted `position`: a task
//! sends the oldest unread one, and only a 200 from the gateway moves the position past it, so
//! a crash or restart resends at most the one in flight (the gateway deduplicates by event id)
//! and loses none. Failures back off from 1 s doubling to 1 h; a notification still failing
//! 24 h after its first failure is given up, and the queue moves on. A badge-only update is
//! sent once the queue is empty after a read receipt changed the user's unread count. A
//! gateway that rejects the pushkey removes the pusher.
//!
//! Notifications the user has already read (a receipt passed them while queued) are skipped.
//! Never logs pushkeys or URLs' query strings; a pusher is named by its row id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;
use serde_json::{Map, Value};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::api::error::ApiResult;
use super::pusher::{
    Backoff, Counts, GIVE_UP_AFTER, GatewayClient, PushInput, Pusher, SendError, badge_body,
    is_rejected, notify_body,
};
use super::pushrules::{Action, evaluator};
use super::{Homeserver, now_ms, store};

/// The pusher tasks and the one HTTP client they share.
pub struct Queues {
    client: GatewayClient,
    tasks: Mutex<HashMap<i64, JoinHandle<()>>>,
}

impl Queues {
    pub fn new(timeout: Duration) -> anyhow::Result<Queues> {
        Ok(Queues { client: GatewayClient::new(timeout)?, tasks: Mutex::default() })
    }

    /// Starts (or restarts) the task of pusher `id`.
    pub fn start(&self, hs: &Homeserver, id: i64) {
        let task = tokio::spawn(run(hs.clone(), id));
        if let Some(old) = self.lock().insert(id, task) {
            old.abort();
        }
    }

    /// Stops the task of pusher `id` (it was deleted or replaced).
    pub fn stop(&self, id: i64) {
        if let Some(task) = self.lock().remove(&id) {
            task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Queues {
    /// Stops every task.
    pub fn stop_all(&self) {
        for (_, task) in self.lock().drain() {
            task.abort();
        }
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Starts a task for every stored pusher.
pub fn start_all(hs: &Homeserver) -> anyhow::Result<()> {
    let ids: Vec<i64> = store::all_pushers(&hs.lock())?.iter().map(|p| p.id).collect();
    for id in ids {
        hs.queues().start(hs, id);
    }
    Ok(())
}

/// What a pusher task does next.
enum Job {
    /// The pusher is gone.
    Gone,
    /// Nothing to send: wait for a change.
    Idle,
    Send {
        url: String,
        body: Value,
        pushkey: String,
        item: Item,
        failing_since: Option<i64>,
    },
}

async fn run(hs: Homeserver, id: i64) {
    let mut changes = hs.subscribe();
    let mut attempt: u32 = 0;
    loop {
        changes.borrow_and_update();
        let job = match hs.db(move |_, conn| next_job(conn, id)).await {
            Ok(job) => job,
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (url, body, pushkey, item, failing_since) = match job {
            Job::Gone => return,
            Job::Idle => {
                if changes.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Job::Send { url, body, pushkey, item, failing_since } => {
                (url, body, pushkey, item, failing_since)
            }
        };
        let result = hs.queues().client.post(&url, &body).await;
        let outcome = match result {
            Ok(reply) if is_rejected(&reply, &pushkey) => {
                info!(
                    pusher = id,
                    "the gateway rejected this pusher's pushkey; removing the pusher"
                );
                let _ = hs.db(move |_, conn| Ok(store::delete_pusher_by_id(conn, id)?)).await;
                hs.queues().lock().remove(&id);
                return;
            }
            Ok(_) => {
                attempt = 0;
                debug!(pusher = id, ?item, "delivered to the gateway");
                Advance::Done
            }
            Err(err) if !err.is_retryable() => {
                // Sending it again cannot help (the gateway refused this very request), and
                // the queue is ordered: give up on it now rather than block the pusher a day.
                warn!(pusher = id, error = %err, "the gateway refused a notification; skipping it");
                attempt = 0;
                Advance::Done
            }
            Err(err) => {
                let now = now_ms();
                let since = failing_since.unwrap_or(now);
                if now - since >= GIVE_UP_AFTER.as_millis() as i64 {
                    warn!(pusher = id, error = %err, "gave up on a notification after 24 h of failures");
                    attempt = 0;
                    Advance::Done
                } else {
                    if failing_since.is_none() {
                        attempt = 0;
                    }
                    let mut delay = Backoff::DEFAULT.next(attempt);
                    if let SendError::Status { retry_after: Some(after), .. } = &err {
                        // Already capped at 1 h where the header is read.
                        delay = delay.max(*after);
                    }
                    attempt = attempt.saturating_add(1);
                    warn!(pusher = id, error = %err, retry_in = ?delay, "push to the gateway failed");
                    Advance::Retry { since: failing_since.is_none().then_some(now), delay }
                }
            }
        };
        let saved = hs
            .db(move |_, conn| {
                match (outcome, item) {
                    (Advance::Done, Item::Event(pos)) => store::set_pusher_position(conn, id, pos)?,
                    (Advance::Done, Item::Badge { seq }) => store::clear_badge(conn, id, seq)?,
                    (Advance::Retry { since: Some(t), .. }, item) => {
                        store::set_pusher_failing(conn, id, t, &item.key())?
                    }
                    (Advance::Retry { since: None, .. }, _) => {}
                }
                Ok(())
            })
            .await;
        if saved.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if let Advance::Retry { delay, .. } = outcome {
            tokio::time::sleep(delay).await;
        }
    }
}

/// What a send carries.
#[derive(Clone, Copy, Debug)]
enum Item {
    /// The notification at this stream.
    Event(i64),
    /// A badge update, answering badge request number `seq`.
    Badge { seq: i64 },
}

impl Item {
    /// How the item is named in `failing_item`.
    fn key(self) -> String {
        match self {
            Item::Event(stream) => format!("e{stream}"),
            Item::Badge { seq } => format!("b{seq}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Advance {
    Done,
    Retry { since: Option<i64>, delay: Duration },
}

fn next_job(conn: &mut Connection, id: i64) -> ApiResult<Job> {
    let Some(row) = store::pusher(conn, id)? else { return Ok(Job::Gone) };
    let Ok(pusher) = serde_json::from_value::<Pusher>(row.json.clone()) else {
        warn!(pusher = id, "stored pusher is unreadable; removing it");
        store::delete_pusher_by_id(conn, id)?;
        return Ok(Job::Gone);
    };
    let Some(url) = pusher.data.url.clone() else { return Ok(Job::Gone) };
    let pushkey_ts = u64::try_from(row.pushkey_ts / 1000).unwrap_or(0);
    let next = store::next_push_action(conn, &row.user_id, row.position)?;
    if next.is_none() && !row.badge_pending {
        return Ok(Job::Idle);
    }
    let counts = Counts { unread: store::total_unread(conn, &row.user_id)?, missed_calls: None };
    let (body, item) = match next {
        Some((stream, room_id, actions)) => {
            let Some(event) = store::event_by_stream(conn, stream)? else {
                store::set_pusher_position(conn, id, stream)?;
                return Ok(Job::Idle);
            };
            let tweaks = tweaks(&actions);
            let sender = event["sender"].as_str().unwrap_or_default();
            let member = store::state_event(conn, &room_id, "m.room.member", sender)?;
            let name = store::state_event(conn, &room_id, "m.room.name", "")?;
            let alias = store::state_event(conn, &room_id, "m.room.canonical_alias", "")?;
            let input = PushInput {
                sender_display_name: member
                    .as_ref()
                    .and_then(|m| m["content"]["displayname"].as_str()),
                room_name: name.as_ref().and_then(|n| n["content"]["name"].as_str()),
                room_alias: alias.as_ref().and_then(|a| a["content"]["alias"].as_str()),
                user_is_target: event["state_key"].as_str() == Some(row.user_id.as_str()),
                ..PushInput::new(&event, &pusher, pushkey_ts, &tweaks, counts)
            };
            (notify_body(&input), Item::Event(stream))
        }
        None if row.badge_pending => {
            (badge_body(&pusher, pushkey_ts, counts), Item::Badge { seq: row.badge_seq })
        }
        None => return Ok(Job::Idle),
    };
    // The failure clock belongs to one item: a new item starts with a clean slate.
    let failing_since = row.failing_since.filter(|_| row.failing_item == Some(item.key()));
    Ok(Job::Send { url, body, pushkey: row.pushkey, item, failing_since })
}

/// The tweaks of a notification's stored actions.
fn tweaks(actions: &Value) -> Map<String, Value> {
    let actions: Vec<Action> =
        actions.as_array().into_iter().flatten().cloned().filter_map(Action::from_json).collect();
    evaluator::tweaks(&actions)
}
