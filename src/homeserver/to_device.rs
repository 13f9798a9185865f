//! Send-to-device messaging: `PUT /sendToDevice/{eventType}/{txnId}` fills each target
//! device's inbox; `/sync` hands the inbox out in arrival order and a later sync with that
//! `next_batch` deletes what it acknowledged (see `sync.rs`).
//!
//! A message is stored, durably, before the request is answered, and kept until acknowledged.
//! A transaction id seen before from the same device stores nothing again. This server does
//! not federate: a message for another server's user is refused as a whole, storing nothing.
//! Neither is a request that would take a device past `max_to_device_inbox` unacknowledged
//! messages (429 `M_LIMIT_EXCEEDED`, the transaction id stays unused so a retry can succeed).

use rusqlite::Connection;
use serde_json::{Map, Value};

use super::api::error::{ApiResult, MatrixError};
use super::{Homeserver, store};

/// Stores the messages of one `sendToDevice` request. `messages` is the body's `messages`
/// object: `{user_id: {device_id or "*": content}}`. Returns how many device messages were
/// stored (0 for a repeated transaction).
pub fn send(
    hs: &Homeserver,
    conn: &mut Connection,
    sender: (&str, &str),
    kind: &str,
    txn_id: &str,
    messages: &Map<String, Value>,
) -> ApiResult<usize> {
    let sender_user = sender.0;
    // Check everything before storing anything.
    for (user_id, devices) in messages {
        if !hs.is_local(user_id) {
            return Err(MatrixError::invalid_param(format!(
                "cannot send to {user_id}: this homeserver does not federate, so only users on \
                 {} can receive to-device messages",
                hs.server_name()
            )));
        }
        let Some(devices) = devices.as_object() else {
            return Err(MatrixError::bad_json(format!(
                "`messages.{user_id}` must be an object of device ids to contents"
            )));
        };
        if let Some((device, _)) = devices.iter().find(|(_, content)| !content.is_object()) {
            return Err(MatrixError::bad_json(format!(
                "the message for {user_id}'s device {device} must be a JSON object"
            )));
        }
    }
    let tx = conn.transaction()?;
    if !store::claim_to_device_txn(&tx, sender, kind, txn_id)? {
        return Ok(0);
    }
    let mut stored = 0;
    for (user_id, devices) in messages {
        let Some(devices) = devices.as_object() else { continue };
        // One message per device per transaction: a message for the device by name wins over
        // `*`. Unknown users and devices receive nothing, as on other homeservers.
        for device in store::devices(&tx, user_id)? {
            if let Some(content) = devices.get(&device).or_else(|| devices.get("*")) {
                let limit = hs.config().max_to_device_inbox;
                if store::to_device_inbox_len(&tx, user_id, &device)? >= limit {
                    // Dropping `tx` rolls back every message stored so far and the txn claim.
                    return Err(MatrixError::limit_exceeded(format!(
                        "{user_id}'s device {device} already holds {limit} unread to-device \
                         messages; retry after it syncs"
                    )));
                }
                store::insert_to_device(&tx, user_id, &device, sender_user, kind, content)?;
                stored += 1;
            }
        }
    }
    tx.commit()?;
    if stored > 0 {
        hs.notify_change();
    }
    Ok(stored)
}
