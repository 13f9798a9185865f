//! FCM HTTP v1 end to end: herald ⇄ a fake FCM plus a fake Google OAuth2 token endpoint that
//! verifies the RS256 assertion `gcp_auth` signs. Every row of DESIGN §3's FCM table.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;

use crate::support::fake_fcm::FcmReply;
use crate::support::gateway::{FCM_PROJECT, Settings, WithFcm, assert_golden, badge, message};

const APP: &str = "im.example.android";

async fn setup_with(settings: Settings, extra: &str) -> WithFcm {
    WithFcm::start(APP, settings, extra).await
}

async fn setup() -> WithFcm {
    setup_with(Settings::default(), "").await
}

#[tokio::test]
async fn message_is_sent_with_an_oauth_token_from_the_service_account() {
    let s = setup().await;
    let r = s.gw.notify(&message("$fcm", &[(APP, "reg-token-1")])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    let reqs = s.fake.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].project_id, FCM_PROJECT);
    assert!(reqs[0].bearer.is_some());
    assert_eq!(s.fake.tokens_issued(), 1);
    assert_golden("fcm_full.json", &reqs[0].body);
}

#[tokio::test]
async fn visible_notification_and_android_options_are_merged() {
    let s = setup_with(
        Settings::default(),
        "    notification: true\n    android: { ttl: \"60s\", collapse_key: room }\n",
    )
    .await;
    let mut body = message("$vis", &[(APP, "reg-token-2")]);
    body["notification"]["prio"] = json!("low");
    body["notification"]["devices"][0]["data"] = json!({"default_payload": {"cs": 1, "tag": "x"}});
    assert_eq!(s.gw.notify(&body).await.status, StatusCode::OK);
    assert_golden("fcm_visible_low.json", &s.fake.requests()[0].body);
}

#[tokio::test]
async fn badge_clear_is_still_sent() {
    let s = setup().await;
    assert_eq!(s.gw.notify(&badge(0, &[(APP, "reg-token-3")])).await.status, StatusCode::OK);
    let reqs = s.fake.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].message()["data"]["unread"], "0");
}

#[tokio::test]
async fn token_is_cached_across_requests() {
    let s = setup().await;
    for i in 0..3 {
        let r =
            s.gw.notify(&message(&format!("$c{i}"), &[(APP, "reg-token-4"), (APP, "reg-token-5")]))
                .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(s.fake.request_count(), 6);
    assert_eq!(s.fake.token_requests(), 1, "one OAuth exchange serves every send");
}

#[tokio::test]
async fn unauthorized_refreshes_the_token_once_and_retries() {
    let s = setup().await;
    assert_eq!(s.gw.notify(&message("$a1", &[(APP, "reg-a")])).await.status, StatusCode::OK);
    s.fake.revoke_tokens();
    let r = s.gw.notify(&message("$a2", &[(APP, "reg-a"), (APP, "reg-b"), (APP, "reg-c")])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(s.fake.tokens_issued(), 2, "concurrent 401s trigger a single refresh");
}

#[tokio::test]
async fn permanent_token_errors_are_rejected() {
    let s = setup().await;
    s.fake.respond("dead", vec![FcmReply::unregistered()]);
    s.fake.respond("garbage", vec![FcmReply::invalid_token()]);
    s.fake.respond("other-sender", vec![FcmReply::sender_id_mismatch()]);
    let r =
        s.gw.notify(&message(
            "$perm",
            &[(APP, "dead"), (APP, "garbage"), (APP, "other-sender"), (APP, "fine")],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.rejected(), vec!["dead", "garbage", "other-sender"]);
    assert_eq!(s.fake.request_count(), 4);
}

#[tokio::test]
async fn transient_errors_are_retried() {
    let s = setup().await;
    s.fake.respond("t1", vec![FcmReply::unavailable(None), FcmReply::internal()]);
    s.fake.respond("t2", vec![FcmReply::quota_exceeded(Some(0))]);
    s.fake.respond("t3", vec![FcmReply::Reset]);
    let r = s.gw.notify(&message("$retry", &[(APP, "t1"), (APP, "t2"), (APP, "t3")])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(s.fake.pending_replies(), 0);
    assert_eq!(s.fake.request_count(), 3 + 2 + 2);
}

#[tokio::test]
async fn payload_errors_fail_without_retry_or_rejection() {
    let s = setup().await;
    s.fake.respond("p", vec![FcmReply::invalid_argument_payload()]);
    let r = s.gw.notify(&message("$payload", &[(APP, "p")])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.rejected().is_empty());
    assert_eq!(s.fake.request_count(), 1);
}

#[tokio::test]
async fn persistent_unavailability_is_502() {
    let s = setup().await;
    s.fake.respond("down", vec![FcmReply::unavailable(None); 3]);
    let r = s.gw.notify(&message("$down", &[(APP, "down")])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.errcode(), "M_UNKNOWN");
    assert_eq!(s.fake.request_count(), 3);
}

#[tokio::test]
async fn timeout_is_retried() {
    let s = setup_with(Settings { upstream_timeout: "300ms", ..Settings::default() }, "").await;
    s.fake.respond("slow", vec![FcmReply::Delay(Duration::from_secs(5))]);
    let r = s.gw.notify(&message("$slow", &[(APP, "slow")])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(s.fake.request_count(), 2);
}

#[tokio::test]
async fn token_endpoint_failure_is_502_not_a_rejection() {
    let s = setup_with(Settings { attempts: 1, ..Settings::default() }, "").await;
    s.fake.fail_token_endpoint(100);
    let r = s.gw.notify(&message("$noauth", &[(APP, "t")])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.json);
    assert!(r.rejected().is_empty());
    assert_eq!(s.fake.request_count(), 0);
}

#[tokio::test]
async fn long_fields_are_bounded() {
    let s = setup().await;
    let mut body = message("$long", &[(APP, "long")]);
    body["notification"]["content"]["body"] = json!("ж".repeat(3000));
    body["notification"]["room_name"] = json!("r".repeat(3000));
    assert_eq!(s.gw.notify(&body).await.status, StatusCode::OK);
    let data = s.fake.requests()[0].message()["data"].clone();
    assert!(serde_json::to_vec(&data).unwrap().len() <= 4096);
    assert!(data.as_object().unwrap().values().all(|v| v.as_str().unwrap().len() <= 1024));
    assert_eq!(data["event_id"], "$long");
}

#[tokio::test]
async fn the_token_exchange_and_the_send_both_use_the_proxy() {
    use crate::support::proxy::ConnectProxy;
    let proxy = ConnectProxy::start(None).await;
    let s = setup_with(Settings { proxy: Some(proxy.url("")), ..Settings::default() }, "").await;
    let (gw, fake) = (&s.gw, &s.fake);
    let r = gw.notify(&message("$proxied", &[(APP, "via-proxy")])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(fake.token_requests(), 1);
    assert_eq!(fake.request_count(), 1);
    let tunnels = proxy.tunnels();
    assert!(
        !tunnels.is_empty() && tunnels.iter().all(|t| *t == fake.server().addr().to_string()),
        "{tunnels:?}"
    );
}
