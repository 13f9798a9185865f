//! The `log` provider: writes a one-line summary of each push and counts it delivered.
//!
//! It is the shipped default app, so `cargo run` works with no credentials, and it is how an
//! operator watches what a homeserver sends before wiring up Apple or Google. It logs the
//! pushkey only as a short hash, and never the message content.

use tracing::info;

use super::{AppLabels, Outcome, pushkey_hash};
use crate::notification::{Device, Notification};

/// What one push would have carried, minus content.
#[derive(Debug)]
pub struct LogRequest {
    pushkey_hash: String,
    event_id: Option<String>,
    room_id: Option<String>,
    event_type: Option<String>,
    prio: &'static str,
    unread: Option<u64>,
    missed_calls: Option<u64>,
}

pub struct LogProvider {
    labels: AppLabels,
}

impl LogProvider {
    pub fn new(labels: AppLabels) -> LogProvider {
        LogProvider { labels }
    }

    pub fn prepare(&self, n: &Notification, d: &Device) -> LogRequest {
        LogRequest {
            pushkey_hash: pushkey_hash(&d.pushkey),
            event_id: n.event_id.clone(),
            room_id: n.room_id.clone(),
            event_type: n.event_type.clone(),
            prio: n.prio.as_str(),
            unread: n.counts.unread,
            missed_calls: n.counts.missed_calls,
        }
    }

    pub fn send(&self, r: &LogRequest) -> Outcome {
        info!(
            app = %self.labels.app,
            pushkey = %r.pushkey_hash,
            event_id = r.event_id.as_deref().unwrap_or("-"),
            room_id = r.room_id.as_deref().unwrap_or("-"),
            event_type = r.event_type.as_deref().unwrap_or("-"),
            prio = r.prio,
            unread = r.unread.unwrap_or(0),
            missed_calls = r.missed_calls.unwrap_or(0),
            "push (log provider)"
        );
        Outcome::Delivered
    }
}
