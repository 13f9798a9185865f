//! APNs end to end: herald ⇄ a TLS + HTTP/2 fake APNs that verifies the ES256 provider token.
//! Every row of DESIGN §3's APNs table, the payload goldens, and the transport failures.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;

use crate::support::fake_apns::{FakeApns, Reply};
use crate::support::gateway::{
    APNS_KEY_ID, APNS_TEAM_ID, Settings, TestGateway, WithApns, apns_app, apns_token as token,
    assert_golden, badge, message,
};
use crate::support::tls::{TestCa, write_file};

const APP: &str = "im.example.ios";

async fn setup_with(settings: Settings) -> WithApns {
    WithApns::start(APP, settings).await
}

async fn setup() -> WithApns {
    setup_with(Settings::default()).await
}

#[tokio::test]
async fn full_message_is_delivered_with_signed_token_and_headers() {
    let s = setup().await;
    let (key, hex) = token(1);
    let r = s.gw.notify(&message("$full", &[(APP, &key)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.json, json!({"rejected": []}));
    let reqs = s.fake.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.token, hex);
    assert_eq!(req.version, http::Version::HTTP_2);
    assert_eq!(req.header("apns-topic"), Some(APP));
    assert_eq!(req.header("apns-push-type"), Some("alert"));
    assert_eq!(req.header("apns-priority"), Some("10"));
    let expiration: u64 = req.header("apns-expiration").unwrap().parse().unwrap();
    assert!(expiration > crate::support::server::unix_now());
    assert!(req.jwt.is_some());
    assert_golden("apns_full.json", &req.body);
}

#[tokio::test]
async fn low_priority_uses_apns_priority_5() {
    let s = setup().await;
    let (key, _) = token(2);
    let mut body = message("$low", &[(APP, &key)]);
    body["notification"]["prio"] = json!("low");
    assert_eq!(s.gw.notify(&body).await.status, StatusCode::OK);
    assert_eq!(s.fake.requests()[0].header("apns-priority"), Some("5"));
}

#[tokio::test]
async fn event_id_only_payload_merges_default_payload() {
    let s = setup().await;
    let (key, _) = token(3);
    let body = json!({"notification": {
        "event_id": "$eio", "room_id": "!room:example.org", "counts": {"unread": 4},
        "devices": [{"app_id": APP, "pushkey": key, "data": {"format": "event_id_only",
            "default_payload": {"aps": {"mutable-content": 1, "alert": {"loc-key": "Notification", "loc-args": []}}}}}]
    }});
    assert_eq!(s.gw.notify(&body).await.status, StatusCode::OK);
    assert_golden("apns_event_id_only.json", &s.fake.requests()[0].body);
}

#[tokio::test]
async fn badge_only_is_a_bare_badge_and_never_deduplicated() {
    let s = setup().await;
    let (key, _) = token(4);
    for _ in 0..2 {
        assert_eq!(s.gw.notify(&badge(5, &[(APP, &key)])).await.status, StatusCode::OK);
    }
    let reqs = s.fake.requests();
    assert_eq!(reqs.len(), 2, "badge updates have no event_id and are sent every time");
    assert_golden("apns_badge.json", &reqs[0].body);
}

#[tokio::test]
async fn oversized_content_is_shortened_to_4096_bytes_not_failed() {
    let s = setup().await;
    let (key, _) = token(5);
    let mut body = message("$big", &[(APP, &key)]);
    body["notification"]["content"]["body"] = json!("ü".repeat(6000));
    let r = s.gw.notify(&body).await;
    assert_eq!(r.status, StatusCode::OK);
    let sent = &s.fake.requests()[0].body;
    assert!(sent.to_string().len() <= 4096, "{}", sent.to_string().len());
    assert_eq!(sent["event_id"], "$big");
    assert!(sent["aps"]["alert"]["loc-args"][2].as_str().unwrap().ends_with('…'));
}

#[tokio::test]
async fn permanent_token_errors_are_rejected() {
    let s = setup().await;
    let replies = [
        Reply::unregistered(),
        Reply::bad_device_token(),
        Reply::device_token_not_for_topic(),
        Reply::status(400, "TopicDisallowed"),
    ];
    let mut devices = Vec::new();
    for (i, reply) in replies.into_iter().enumerate() {
        let (key, hex) = token(10 + i as u8);
        s.fake.respond(&hex, vec![reply]);
        devices.push(key);
    }
    let (good, _) = token(20);
    let mut list: Vec<(&str, &str)> = devices.iter().map(|k| (APP, k.as_str())).collect();
    list.push((APP, &good));
    let r = s.gw.notify(&message("$perm", &list)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    let mut expected = devices.clone();
    expected.sort();
    assert_eq!(r.rejected(), expected);
    assert_eq!(s.fake.request_count(), 5, "rejections are not retried");
}

#[tokio::test]
async fn transient_errors_are_retried_until_delivered() {
    let s = setup().await;
    let (a, ha) = token(30);
    let (b, hb) = token(31);
    let (c, hc) = token(32);
    s.fake.respond(&ha, vec![Reply::internal_server_error(), Reply::service_unavailable(None)]);
    s.fake.respond(&hb, vec![Reply::too_many_requests(Some(0))]);
    s.fake.respond(&hc, vec![Reply::Reset]);
    let r = s.gw.notify(&message("$transient", &[(APP, &a), (APP, &b), (APP, &c)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.json, json!({"rejected": []}));
    assert_eq!(s.fake.request_count(), 3 + 2 + 2);
    assert_eq!(s.fake.pending_replies(), 0);
}

#[tokio::test]
async fn retries_exhausted_answer_502_so_the_homeserver_retries() {
    let s = setup().await;
    let (key, hex) = token(40);
    let (gone, gone_hex) = token(41);
    s.fake.respond(&hex, vec![Reply::service_unavailable(None); 3]);
    s.fake.respond(&gone_hex, vec![Reply::unregistered()]);
    let r = s.gw.notify(&message("$exhausted", &[(APP, &key), (APP, &gone)])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.errcode(), "M_UNKNOWN");
    assert_eq!(r.rejected(), vec![gone.clone()], "known rejections travel with the 502");
    assert_eq!(s.fake.requests().iter().filter(|q| q.token == hex).count(), 3, "attempts: 3");
}

#[tokio::test]
async fn other_client_errors_fail_without_retry() {
    let s = setup().await;
    let (key, hex) = token(42);
    s.fake.respond(&hex, vec![Reply::status(400, "PayloadTooLarge")]);
    let r = s.gw.notify(&message("$payload", &[(APP, &key)])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.rejected().is_empty(), "a config or payload error must never drop a good pushkey");
    assert_eq!(s.fake.request_count(), 1);
}

#[tokio::test]
async fn retry_after_beyond_the_deadline_fails_fast() {
    let s = setup_with(Settings { request_deadline: "3s", ..Settings::default() }).await;
    let (key, hex) = token(43);
    s.fake.respond(&hex, vec![Reply::too_many_requests(Some(60))]);
    let r = s.gw.notify(&message("$later", &[(APP, &key)])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(s.fake.request_count(), 1, "no retry can fit before the deadline");
}

#[tokio::test]
async fn upstream_timeout_is_retried_and_deadline_bounds_the_request() {
    let s = setup_with(Settings {
        upstream_timeout: "300ms",
        request_deadline: "2s",
        attempts: 10,
        ..Settings::default()
    })
    .await;
    let (key, hex) = token(44);
    // The first attempt hangs past upstream_timeout; the second succeeds.
    s.fake.respond(&hex, vec![Reply::Delay(Duration::from_secs(5))]);
    let r = s.gw.notify(&message("$slow", &[(APP, &key)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(s.fake.request_count(), 2);

    // Every attempt hangs: the request deadline (not the attempt budget) ends it with a 502.
    let (key, hex) = token(45);
    s.fake.respond(&hex, vec![Reply::Delay(Duration::from_secs(30)); 10]);
    let r = s.gw.notify(&message("$stuck", &[(APP, &key)])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(s.fake.requests().iter().filter(|q| q.token == hex).count() < 10);
}

#[tokio::test]
async fn expired_provider_token_is_re_signed_and_retried() {
    let s = setup().await;
    let (key, hex) = token(50);
    s.fake.respond(&hex, vec![Reply::expired_provider_token()]);
    let r = s.gw.notify(&message("$expired", &[(APP, &key)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    let jwts: Vec<_> = s.fake.requests().iter().map(|q| q.jwt.clone().unwrap()).collect();
    assert_eq!(jwts.len(), 2);
    assert_ne!(jwts[0], jwts[1], "a new token is signed after ExpiredProviderToken");
}

#[tokio::test]
async fn provider_token_is_reused_across_requests_and_connection_is_shared() {
    let s = setup().await;
    let keys: Vec<_> = (60..70).map(token).collect();
    let devices: Vec<(&str, &str)> = keys.iter().map(|(k, _)| (APP, k.as_str())).collect();
    assert_eq!(s.gw.notify(&message("$many", &devices)).await.status, StatusCode::OK);
    assert_eq!(s.gw.notify(&message("$many2", &devices)).await.status, StatusCode::OK);
    assert_eq!(s.fake.jwts_seen().len(), 1);
    assert_eq!(s.fake.server().connections_accepted(), 1, "one multiplexed HTTP/2 connection");
}

#[tokio::test]
async fn goaway_and_connection_reset_reconnect() {
    let s = setup().await;
    let (a, ha) = token(71);
    s.fake.respond(&ha, vec![Reply::Goaway]);
    assert_eq!(s.gw.notify(&message("$g1", &[(APP, &a)])).await.status, StatusCode::OK);
    let (b, hb) = token(72);
    s.fake.respond(&hb, vec![Reply::ResetConnection]);
    let r = s.gw.notify(&message("$g2", &[(APP, &b)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert!(s.fake.server().connections_accepted() >= 2);
}

#[tokio::test]
async fn malformed_base64_pushkey_is_rejected_without_a_request() {
    let s = setup().await;
    let r = s.gw.notify(&message("$b64", &[(APP, "not base64 at all!")])).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.rejected(), vec!["not base64 at all!".to_string()]);
    assert_eq!(s.fake.request_count(), 0);
}

#[tokio::test]
async fn twenty_devices_are_sent_concurrently() {
    // Each device takes 1s upstream and the request may take 4s: only concurrent sends fit.
    let s = setup_with(Settings {
        upstream_timeout: "3s",
        request_deadline: "4s",
        attempts: 1,
        ..Settings::default()
    })
    .await;
    let keys: Vec<_> = (100..120).map(token).collect();
    for (_, hex) in &keys {
        s.fake.respond(hex, vec![Reply::Delay(Duration::from_secs(1))]);
    }
    let devices: Vec<(&str, &str)> = keys.iter().map(|(k, _)| (APP, k.as_str())).collect();
    let r = s.gw.notify(&message("$twenty", &devices)).await;
    assert_eq!(r.status, StatusCode::OK, "sequential sends would need 20s: {:?}", r.json);
    assert_eq!(s.fake.request_count(), 20);
}

#[tokio::test]
async fn certificate_auth_presents_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let fake = FakeApns::start_cert_auth(&ca).await;
    let (cert, key) = ca.issue_client_cert("herald-test");
    let pem = write_file(dir.path(), "apns.pem", format!("{cert}{key}"));
    let ca_file = write_file(dir.path(), "ca.pem", ca.cert_pem());
    let apps = format!(
        "  {APP}:\n    type: apns\n    cert_file: {}\n    topic: {APP}\n    endpoint: {}\n    ca_file: {}\n",
        pem.display(),
        fake.url(),
        ca_file.display()
    );
    let gw = TestGateway::start(&Settings { apps, ..Settings::default() }).await;
    let (k, _) = token(80);
    let r = gw.notify(&message("$cert", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].jwt.is_none(), "certificate auth sends no provider token");
}

#[tokio::test]
async fn untrusted_server_certificate_is_a_failure_not_a_rejection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (fake, p8) = FakeApns::start_token_auth(&ca, APNS_TEAM_ID, APNS_KEY_ID).await;
    let other_ca = TestCa::new();
    let apps = apns_app(APP, dir.path(), &fake, &other_ca, &p8, "");
    let gw = TestGateway::start(&Settings { apps, attempts: 1, ..Settings::default() }).await;
    let (k, _) = token(81);
    let r = gw.notify(&message("$tls", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.rejected().is_empty());
    assert_eq!(fake.request_count(), 0);
}

#[tokio::test]
async fn metrics_record_upstream_statuses() {
    let s = setup().await;
    let (k, hex) = token(90);
    s.fake.respond(&hex, vec![Reply::internal_server_error()]);
    s.gw.notify(&message("$metrics", &[(APP, &k)])).await;
    let text = s.gw.metrics().await;
    assert!(
        text.contains(&format!(
            r#"herald_upstream_responses_total{{app="{APP}",provider="apns",status="500"}} 1"#
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            r#"herald_upstream_responses_total{{app="{APP}",provider="apns",status="200"}} 1"#
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            r#"herald_upstream_duration_seconds_count{{app="{APP}",provider="apns"}} 2"#
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            r#"herald_upstream_retries_total{{app="{APP}",provider="apns"}} 1"#
        )),
        "{text}"
    );
}

#[tokio::test]
async fn upstream_connections_go_through_the_configured_connect_proxy() {
    use crate::support::proxy::ConnectProxy;
    // "user:pass" in base64.
    let proxy = ConnectProxy::start(Some("Basic dXNlcjpwYXNz")).await;
    let s =
        setup_with(Settings { proxy: Some(proxy.url("user:pass@")), ..Settings::default() }).await;
    let (gw, fake) = (&s.gw, &s.fake);
    let (k, _) = token(82);
    let r = gw.notify(&message("$proxied", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(fake.request_count(), 1);
    assert_eq!(
        proxy.tunnels(),
        vec![fake.addr().to_string()],
        "TLS to APNs was tunnelled through the proxy"
    );
}

#[tokio::test]
async fn a_proxy_refusing_credentials_is_a_failure() {
    use crate::support::proxy::ConnectProxy;
    let proxy = ConnectProxy::start(Some("Basic c29tZW9uZTplbHNl")).await;
    let s = setup_with(Settings {
        proxy: Some(proxy.url("user:pass@")),
        attempts: 1,
        ..Settings::default()
    })
    .await;
    let (gw, fake) = (&s.gw, &s.fake);
    let (k, _) = token(83);
    let r = gw.notify(&message("$refused", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(fake.request_count(), 0);
}

#[tokio::test]
async fn http_endpoint_speaks_h2c_with_prior_knowledge() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, p8) = FakeApns::start_token_auth_h2c(APNS_TEAM_ID, APNS_KEY_ID).await;
    let key = write_file(dir.path(), "key.p8", &p8);
    let apps = format!(
        "  {APP}:\n    type: apns\n    key_file: {}\n    key_id: {APNS_KEY_ID}\n    team_id: {APNS_TEAM_ID}\n    topic: {APP}\n    endpoint: {}\n",
        key.display(),
        fake.url()
    );
    assert!(fake.url().starts_with("http://"));
    let gw = TestGateway::start(&Settings { apps, ..Settings::default() }).await;
    let (k, _) = token(84);
    let r = gw.notify(&message("$h2c", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(fake.requests()[0].version, http::Version::HTTP_2);
}

#[tokio::test]
async fn an_absurd_retry_after_is_a_clean_502() {
    let s = setup().await;
    let (k, hex) = token(85);
    s.fake.respond(&hex, vec![Reply::status_retry_after(503, "ServiceUnavailable", u64::MAX)]);
    let r = s.gw.notify(&message("$forever", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.json);
    assert_eq!(r.errcode(), "M_UNKNOWN");
    assert_eq!(s.fake.request_count(), 1);
}
