//! The embedded homeserver's client-server API over HTTP.

use serde_json::json;

use crate::support::matrix::{TestHomeserver, esc};

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
