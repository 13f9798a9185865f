//! The whole flow for browsers and de-Googled phones: a message in a room of the embedded
//! homeserver → the recipient's push rules → their HTTP pushers → one herald with a `webpush`
//! and a `unifiedpush` app → the fake push service (which decrypts the message) and the fake
//! UnifiedPush distributor. Then a subscription the push service says is gone (410) removes its
//! pusher on the homeserver.

use std::time::Duration;

use serde_json::json;

use crate::support::fake_unifiedpush::FakeDistributor;
use crate::support::fake_webpush::{FakePushService, vapid_key};
use crate::support::gateway::{Settings, TestGateway};
use crate::support::matrix::{TestHomeserver, User};
use crate::support::tls::write_file;

const WEB_APP: &str = "im.example.web";
const UP_APP: &str = "im.example.android.up";
/// How long any single wait may take before the test fails (a liveness bound).
const DEADLINE: Duration = Duration::from_secs(15);

async fn pushers(user: &User) -> usize {
    let reply = user.get("/pushers").await;
    assert_eq!(reply.status, 200, "pushers: {}", reply.json);
    reply.json["pushers"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_message_reaches_a_browser_and_a_unifiedpush_phone_and_a_gone_subscription_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = vapid_key();
    let push_service = FakePushService::start(None, &public, "mailto:ops@example.org").await;
    let distributor = FakeDistributor::start(None).await;
    let key = write_file(dir.path(), "vapid.pem", pem);
    let apps = format!(
        "  \"{WEB_APP}\":\n    type: webpush\n    vapid_private_key_file: {}\n    vapid_subject: \"mailto:ops@example.org\"\n    allow_internal_endpoints: true\n\
         \x20 \"{UP_APP}\":\n    type: unifiedpush\n    allow_internal_endpoints: true\n",
        key.display()
    );
    let gw = TestGateway::start(&Settings { apps, ..Settings::default() }).await;
    let notify = gw.url("/_matrix/push/v1/notify");

    let hs = TestHomeserver::start().await;
    let alice = hs.register("alice").await;
    let bob = hs.register("bob").await;
    let room = alice.create_room(json!({"invite": [bob.user_id]})).await;
    bob.join(&room).await;
    let browser = push_service.subscribe();
    let data = json!({"endpoint": browser.endpoint, "auth": browser.auth, "events_only": true});
    bob.set_pusher(WEB_APP, &browser.p256dh, &notify, data).await;
    let phone = distributor.endpoint("bob-phone");
    bob.set_pusher(UP_APP, &phone, &notify, json!({"format": "event_id_only"})).await;

    let event = alice.send_text(&room, "lunch?").await;
    let web = push_service.wait_for_requests(1, DEADLINE).await;
    assert_eq!(web[0].status, 201);
    let decrypted = web[0].json().expect("the push service decrypted the message");
    assert_eq!(
        (decrypted["event_id"].as_str(), decrypted["room_id"].as_str()),
        (Some(event.as_str()), Some(room.as_str()))
    );
    assert_eq!(decrypted["content"]["body"], "lunch?");
    let up = distributor.wait_for_requests(1, DEADLINE).await;
    let n = &up[0].json().expect("JSON")["notification"];
    assert_eq!(n["event_id"], event.as_str());
    assert!(n.get("content").is_none(), "event_id_only: the homeserver sent no content: {n}");
    assert_eq!(n["devices"][0]["pushkey"], phone.as_str());

    // The browser unsubscribed: the push service answers 410, herald rejects the pushkey, and
    // the homeserver drops that pusher and keeps the other.
    push_service.unsubscribe(&browser.id);
    alice.send_text(&room, "still there?").await;
    let dropped = async {
        while pushers(&bob).await != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(DEADLINE, dropped).await.expect("the rejected pusher was not removed");
    let statuses: Vec<u16> = push_service.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 410]);
    assert_eq!(distributor.wait_for_requests(2, DEADLINE).await.len(), 2);
}
