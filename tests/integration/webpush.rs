//! WebPush end to end: herald ⇄ a fake RFC 8030 push service that checks each request's VAPID
//! JWT and decrypts its body with the subscription's private key. Every row of DESIGN §3's
//! WebPush table, the headers, and the endpoint vetting (no connection to internal addresses).

use std::net::IpAddr;
use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};

use crate::support::fake_webpush::{
    FakePushService, PushReply, Subscription, VAPID_SEC1_PEM, public_key_b64_of_sec1, vapid_key,
};
use crate::support::gateway::{Settings, TestGateway, assert_golden, badge, message};
use crate::support::tls::{TestCa, write_file};

const APP: &str = "im.example.web";
const SUBJECT: &str = "mailto:ops@example.org";
const WAIT: Duration = Duration::from_secs(10);

/// A gateway with one webpush app and the push service it sends to.
struct Web {
    gw: TestGateway,
    fake: FakePushService,
    _dir: tempfile::TempDir,
}

/// A `type: webpush` app signing with `key_pem`, plus `extra` YAML lines.
fn webpush_app(dir: &std::path::Path, key_pem: &str, ca: Option<&TestCa>, extra: &str) -> String {
    let key = write_file(dir, "vapid.pem", key_pem);
    let ca_file = ca
        .map(|ca| format!("    ca_file: {}\n", write_file(dir, "ca.pem", ca.cert_pem()).display()))
        .unwrap_or_default();
    format!(
        "  \"{APP}\":\n    type: webpush\n    vapid_private_key_file: {}\n    vapid_subject: \"{SUBJECT}\"\n    ttl: 90s\n{ca_file}{extra}",
        key.display()
    )
}

/// A gateway whose app allows loopback endpoints (the fakes live there), over plain HTTP.
async fn setup(extra: &str) -> Web {
    setup_with(Settings::default(), "    allow_internal_endpoints: true\n", extra).await
}

async fn setup_with(settings: Settings, policy: &str, extra: &str) -> Web {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = vapid_key();
    let fake = FakePushService::start(None, &public, SUBJECT).await;
    let apps = webpush_app(dir.path(), &pem, None, &format!("{policy}{extra}"));
    let gw = TestGateway::start(&Settings { apps, ..settings }).await;
    Web { gw, fake, _dir: dir }
}

/// The pusher data a browser client registers for `sub`.
fn device_data(sub: &Subscription) -> Value {
    json!({ "endpoint": sub.endpoint, "auth": sub.auth })
}

/// A message for the given subscriptions (each with its own `data`).
fn web_message(event_id: &str, subs: &[(&Subscription, Value)]) -> Value {
    let devices: Vec<(&str, &str)> = subs.iter().map(|(s, _)| (APP, s.p256dh.as_str())).collect();
    let mut body = message(event_id, &devices);
    for (i, (_, data)) in subs.iter().enumerate() {
        body["notification"]["devices"][i]["data"] = data.clone();
    }
    body
}

fn one(event_id: &str, sub: &Subscription) -> Value {
    web_message(event_id, &[(sub, device_data(sub))])
}

fn statuses(fake: &FakePushService) -> Vec<u16> {
    fake.requests().iter().map(|r| r.status).collect()
}

#[tokio::test]
async fn push_is_encrypted_for_the_browser_and_vapid_signed_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    // The openssl-made SEC1 key, as the README tells operators to create it.
    let fake =
        FakePushService::start(Some(&ca), &public_key_b64_of_sec1(VAPID_SEC1_PEM), SUBJECT).await;
    let apps =
        webpush_app(dir.path(), VAPID_SEC1_PEM, Some(&ca), "    allow_internal_endpoints: true\n");
    let gw = TestGateway::start(&Settings { apps, ..Settings::default() }).await;
    let sub = fake.subscribe();

    let r = gw.notify(&one("$web1", &sub)).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::OK, vec![]), "{:?}", r.json);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    let push = &reqs[0];
    // 201 means the fake verified the JWT (signature, k, aud, exp, sub) and decrypted the body.
    assert_eq!(push.status, 201);
    assert_eq!(push.alpn.as_deref(), Some(&b"h2"[..]), "HTTP/2 over TLS when offered");
    assert_eq!((push.ttl(), push.urgency(), push.topic()), (Some(90), Some("high"), None));
    assert_eq!(push.header("content-encoding"), Some("aes128gcm"));
    let claims = push.claims.as_ref().expect("verified claims");
    assert_eq!(
        (claims["aud"].as_str(), claims["sub"].as_str()),
        (Some(fake.url().as_str()), Some(SUBJECT))
    );
    assert!(push.body_len <= 4096);
    assert_golden("webpush_full.json", &push.json().expect("JSON plaintext"));

    let metrics = gw.metrics().await;
    let delivered = format!(
        r#"herald_device_outcomes_total{{app="{APP}",provider="webpush",outcome="delivered"}} 1"#
    );
    assert!(metrics.contains(&delivered), "{metrics}");
    assert!(
        metrics.contains(&format!(
            r#"herald_upstream_responses_total{{app="{APP}",provider="webpush",status="201"}} 1"#
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn one_vapid_jwt_serves_every_push_to_a_push_service() {
    let s = setup("").await;
    let (a, b) = (s.fake.subscribe(), s.fake.subscribe());
    let body = web_message("$jwt", &[(&a, device_data(&a)), (&b, device_data(&b))]);
    assert_eq!(s.gw.notify(&body).await.status, StatusCode::OK);
    assert_eq!(s.gw.notify(&one("$jwt2", &a)).await.status, StatusCode::OK);
    let auth: Vec<String> =
        s.fake.requests().iter().map(|r| r.header("authorization").unwrap().to_owned()).collect();
    assert_eq!(auth.len(), 3);
    assert!(auth.iter().all(|h| h == &auth[0]), "signed once, reused: {auth:?}");
}

#[tokio::test]
async fn prio_topic_default_payload_and_events_only_shape_the_push() {
    let s = setup("").await;
    let sub = s.fake.subscribe();
    let data = json!({
        "endpoint": sub.endpoint, "auth": sub.auth, "only_last_per_room": true, "events_only": true,
        "default_payload": {"cs": "client-state", "event_id": "overridden by the event"},
    });
    let mut low = web_message("$low", &[(&sub, data.clone())]);
    low["notification"]["prio"] = json!("low");
    assert_eq!(s.gw.notify(&low).await.status, StatusCode::OK);
    let mut other_room = web_message("$other", &[(&sub, data.clone())]);
    other_room["notification"]["room_id"] = json!("!other:example.org");
    assert_eq!(s.gw.notify(&other_room).await.status, StatusCode::OK);
    assert_eq!(
        s.gw.notify(&web_message("$same", &[(&sub, data.clone())])).await.status,
        StatusCode::OK
    );

    let reqs = s.fake.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].urgency(), Some("normal"));
    assert_eq!(reqs[2].urgency(), Some("high"));
    let topics: Vec<&str> = reqs.iter().map(|r| r.topic().expect("a Topic per room")).collect();
    assert!(topics.iter().all(|t| t.len() <= 32), "{topics:?}");
    assert_eq!(topics[0], topics[2], "same room, same topic");
    assert_ne!(topics[0], topics[1], "another room, another topic");
    let payload = reqs[0].json().unwrap();
    assert_eq!(
        (payload["cs"].as_str(), payload["event_id"].as_str()),
        (Some("client-state"), Some("$low"))
    );
    assert_eq!(payload["prio"], "low");

    // events_only: a badge-only update is answered without a push…
    let mut update = badge(0, &[(APP, &sub.p256dh)]);
    update["notification"]["devices"][0]["data"] = data;
    let r = s.gw.notify(&update).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::OK, vec![]));
    assert_eq!(s.fake.request_count(), 3);
    // …and without it, the badge update is pushed.
    let mut update = badge(4, &[(APP, &sub.p256dh)]);
    update["notification"]["devices"][0]["data"] = device_data(&sub);
    assert_eq!(s.gw.notify(&update).await.status, StatusCode::OK);
    let pushed = s.fake.requests()[3].json().unwrap();
    assert_eq!(pushed["counts"], json!({"unread": 4}));
    assert!(pushed.get("event_id").is_none());
}

#[tokio::test]
async fn gone_and_unknown_subscriptions_are_rejected() {
    let s = setup("").await;
    let (live, gone) = (s.fake.subscribe(), s.fake.subscribe());
    s.fake.unsubscribe(&gone.id);
    let unknown = Subscription {
        endpoint: format!("{}/push/never-issued", s.fake.url()),
        ..s.fake.subscribe()
    };
    let body = web_message(
        "$gone",
        &[
            (&live, device_data(&live)),
            (&gone, device_data(&gone)),
            (&unknown, device_data(&unknown)),
        ],
    );
    let r = s.gw.notify(&body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    let mut expected = vec![gone.p256dh.clone(), unknown.p256dh.clone()];
    expected.sort();
    assert_eq!(r.rejected(), expected);
    let mut seen = statuses(&s.fake);
    seen.sort();
    assert_eq!(seen, vec![201, 404, 410], "each answered once, none retried");
}

#[tokio::test]
async fn unusable_subscriptions_are_rejected_without_a_request() {
    let s = setup("").await;
    let sub = s.fake.subscribe();
    let cases = [
        ("missing auth", sub.p256dh.clone(), json!({ "endpoint": sub.endpoint })),
        ("short auth", sub.p256dh.clone(), json!({ "endpoint": sub.endpoint, "auth": "AAEC" })),
        ("no endpoint", sub.p256dh.clone(), json!({ "auth": sub.auth })),
        (
            "relative endpoint",
            sub.p256dh.clone(),
            json!({ "endpoint": "/push/x", "auth": sub.auth }),
        ),
        ("pushkey not a key", "bm90IGEga2V5".to_owned(), device_data(&sub)),
    ];
    for (what, pushkey, data) in cases {
        let mut body = message("$bad", &[(APP, &pushkey)]);
        body["notification"]["devices"][0]["data"] = data;
        let r = s.gw.notify(&body).await;
        assert_eq!(
            (r.status, r.rejected()),
            (StatusCode::OK, vec![pushkey]),
            "{what}: {:?}",
            r.json
        );
    }
    assert_eq!(s.fake.request_count(), 0);
    assert_eq!(s.fake.server().connections_accepted(), 0);
}

#[tokio::test]
async fn too_large_is_shortened_and_sent_once_more() {
    let s = setup("").await;
    let sub = s.fake.subscribe();
    let mut body = one("$big", &sub);
    body["notification"]["content"]["body"] = json!("🍕 ".repeat(1500));
    s.fake.set_max_body(2048);
    let r = s.gw.notify(&body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    let reqs = s.fake.requests();
    assert_eq!(reqs.iter().map(|r| r.status).collect::<Vec<_>>(), vec![413, 201]);
    assert!(reqs[0].body_len > 2048 && reqs[0].body_len <= 4096, "{}", reqs[0].body_len);
    let shortened = reqs[1].json().unwrap();
    assert!(reqs[1].plaintext.as_ref().unwrap().len() <= 1024);
    assert_eq!(shortened["event_id"], "$big");
    assert_eq!(shortened["counts"], json!({"unread": 2, "missed_calls": 1}));
    assert!(shortened["content"]["body"].as_str().unwrap().ends_with('…'));

    // A service that refuses even the short form: failed (502) after exactly one re-send.
    s.fake.clear_requests();
    s.fake.set_max_body(300);
    let r = s.gw.notify(&one("$huge", &sub)).await;
    assert_eq!((r.status, r.errcode()), (StatusCode::BAD_GATEWAY, "M_UNKNOWN"), "{:?}", r.json);
    assert_eq!(r.rejected(), Vec::<String>::new());
    assert_eq!(statuses(&s.fake), vec![413, 413]);
}

#[tokio::test]
async fn rate_limits_server_errors_timeouts_and_resets_are_retried() {
    let s = setup("").await;
    let sub = s.fake.subscribe();
    s.fake.respond(&sub.id, vec![PushReply::retry_after(429, 0), PushReply::status(503)]);
    let r = s.gw.notify(&one("$retry", &sub)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(statuses(&s.fake), vec![429, 503, 201]);

    s.fake.clear_requests();
    // Settings::default has a 1 s upstream timeout.
    s.fake.respond(&sub.id, vec![PushReply::Delay(Duration::from_secs(3)), PushReply::Reset]);
    let r = s.gw.notify(&one("$slow", &sub)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(s.fake.request_count(), 3, "timed out, reset, then delivered");

    // Three 500s use up the attempts: failed, not rejected, so the homeserver retries.
    s.fake.clear_requests();
    s.fake.respond(&sub.id, vec![PushReply::status(500); 3]);
    let r = s.gw.notify(&one("$down", &sub)).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::BAD_GATEWAY, vec![]), "{:?}", r.json);
    assert_eq!(statuses(&s.fake), vec![500, 500, 500]);
    // The homeserver's retry is not answered from dedup: it is sent again.
    assert_eq!(s.gw.notify(&one("$down", &sub)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn other_client_errors_fail_without_retry() {
    let s = setup("").await;
    let sub = s.fake.subscribe();
    s.fake.respond(&sub.id, vec![PushReply::status(400), PushReply::status(301)]);
    let r = s.gw.notify(&one("$400", &sub)).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::BAD_GATEWAY, vec![]), "{:?}", r.json);
    // A redirect is not followed (it could point anywhere): failed, not retried.
    let r = s.gw.notify(&one("$301", &sub)).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::BAD_GATEWAY, vec![]), "{:?}", r.json);
    assert_eq!(statuses(&s.fake), vec![400, 301]);
}

#[tokio::test]
async fn a_vapid_key_the_subscription_was_not_made_for_fails_without_rejecting() {
    let dir = tempfile::tempdir().unwrap();
    let (_, expected_public) = vapid_key();
    let (other_pem, _) = vapid_key();
    let fake = FakePushService::start(None, &expected_public, SUBJECT).await;
    let apps = webpush_app(dir.path(), &other_pem, None, "    allow_internal_endpoints: true\n");
    let gw = TestGateway::start(&Settings { apps, ..Settings::default() }).await;
    let sub = fake.subscribe();
    let r = gw.notify(&one("$key", &sub)).await;
    // A config problem, not a bad subscription: the pusher must not be deleted.
    assert_eq!((r.status, r.rejected()), (StatusCode::BAD_GATEWAY, vec![]), "{:?}", r.json);
    assert_eq!(statuses(&fake), vec![403]);
}

#[tokio::test]
async fn internal_endpoints_are_refused_without_any_connection() {
    // The default policy: no allow_internal_endpoints.
    let s = setup_with(Settings::default(), "", "").await;
    let sub = s.fake.subscribe();
    let port = s.fake.server().addr().port();
    let path = format!("/push/{}", sub.id);
    for endpoint in [
        format!("https://127.0.0.1:{port}{path}"),
        format!("https://localhost:{port}{path}"),
        format!("https://[::1]:{port}{path}"),
        format!("https://[::ffff:127.0.0.1]:{port}{path}"),
        format!("https://10.1.2.3{path}"),
        format!("https://169.254.169.254{path}"),
        format!("https://192.168.1.1{path}"),
        // Plain http is refused before any address is looked at.
        format!("http://127.0.0.1:{port}{path}"),
    ] {
        let data = json!({ "endpoint": endpoint, "auth": sub.auth });
        let r = s.gw.notify(&web_message("$ssrf", &[(&sub, data)])).await;
        assert_eq!(
            (r.status, r.rejected()),
            (StatusCode::BAD_GATEWAY, vec![]),
            "{endpoint}: {:?}",
            r.json
        );
    }
    assert_eq!(s.fake.server().connections_accepted(), 0, "no connection was made");
    let metrics = s.gw.metrics().await;
    assert!(
        metrics.contains(&format!(
            r#"herald_upstream_responses_total{{app="{APP}",provider="webpush",status="refused"}} 8"#
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn endpoints_must_match_allowed_endpoints() {
    let s = setup(
        r#"    allowed_endpoints: ["push.example.org", "*.push.services.mozilla.com"]
"#,
    )
    .await;
    let sub = s.fake.subscribe();
    let r = s.gw.notify(&one("$glob", &sub)).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::BAD_GATEWAY, vec![]), "{:?}", r.json);
    assert_eq!(s.fake.server().connections_accepted(), 0);

    let s = setup(
        r#"    allowed_endpoints: ["127.0.0.?"]
"#,
    )
    .await;
    let sub = s.fake.subscribe();
    assert_eq!(s.gw.notify(&one("$glob", &sub)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn one_slow_push_service_does_not_starve_another() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = vapid_key();
    let slow = FakePushService::start(None, &public, SUBJECT).await;
    let other_host: IpAddr = [127, 0, 0, 2].into();
    let fast = FakePushService::start_on(other_host, None, &public, SUBJECT).await;
    let apps = webpush_app(
        dir.path(),
        &pem,
        None,
        "    allow_internal_endpoints: true\n    max_concurrency: 3\n    max_concurrency_per_host: 2\n",
    );
    let settings =
        Settings { apps, request_deadline: "20s", upstream_timeout: "15s", ..Settings::default() };
    let gw = std::sync::Arc::new(TestGateway::start(&settings).await);

    slow.hold();
    let subs: Vec<Subscription> = (0..5).map(|_| slow.subscribe()).collect();
    let body = web_message("$slow", &subs.iter().map(|s| (s, device_data(s))).collect::<Vec<_>>());
    let stuck = tokio::spawn({
        let gw = gw.clone();
        async move { gw.notify(&body).await }
    });
    slow.wait_for_in_flight(2, WAIT).await;

    // The app has three slots; the slow host may hold two, so a push elsewhere still goes out.
    let sub = fast.subscribe();
    let r = gw.notify(&one("$fast", &sub)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(fast.request_count(), 1);
    assert_eq!(slow.in_flight(), 2, "the slow host's other pushes wait for its slots");

    slow.release();
    let r = stuck.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(slow.request_count(), 5);
    assert_eq!(slow.max_in_flight(), 2, "never more than max_concurrency_per_host at once");
}

#[tokio::test]
async fn herald_send_pushes_to_a_subscription_given_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = vapid_key();
    let fake = FakePushService::start(None, &public, SUBJECT).await;
    let apps = webpush_app(dir.path(), &pem, None, "    allow_internal_endpoints: true\n");
    let config =
        write_file(dir.path(), "gateway.yaml", Settings { apps, ..Settings::default() }.yaml());
    let sub = fake.subscribe();
    let run = |data: Option<String>| {
        let (config, pushkey) = (config.clone(), sub.p256dh.clone());
        tokio::task::spawn_blocking(move || {
            let mut args = vec![
                "send",
                "--config",
                config.to_str().unwrap(),
                "--app-id",
                APP,
                "--pushkey",
                &pushkey,
            ];
            if let Some(data) = &data {
                args.extend(["--data", data.as_str()]);
            }
            crate::cli::herald(&args)
        })
    };
    let out = run(Some(device_data(&sub).to_string())).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "delivered");
    assert_eq!(
        fake.requests()[0].json().unwrap()["content"]["body"],
        "Test notification from herald"
    );

    let out = run(None).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("data.auth is missing"));
    let out = run(Some("[1]".into())).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a JSON object"));
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn through_a_proxy_pushes_tunnel_and_internal_endpoints_are_still_refused() {
    let proxy = crate::support::proxy::ConnectProxy::start(None).await;
    // Loopback allowed (as for a private push service): the push goes through the tunnel.
    let settings = Settings { proxy: Some(proxy.url("")), ..Settings::default() };
    let s = setup_with(settings.clone(), "    allow_internal_endpoints: true\n", "").await;
    let sub = s.fake.subscribe();
    assert_eq!(s.gw.notify(&one("$proxied", &sub)).await.status, StatusCode::OK);
    let target = format!("127.0.0.1:{}", s.fake.server().addr().port());
    assert_eq!(proxy.tunnels(), [target]);

    // The default policy: an https endpoint on a loopback address (by number and by name) is
    // refused for its address before herald asks the proxy for a tunnel.
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (pem, public) = vapid_key();
    let fake = FakePushService::start(Some(&ca), &public, SUBJECT).await;
    let apps = webpush_app(dir.path(), &pem, Some(&ca), "");
    let gw = TestGateway::start(&Settings { apps, ..settings }).await;
    let sub = fake.subscribe();
    let by_name = sub.endpoint.replace("127.0.0.1", "localhost");
    for endpoint in [sub.endpoint.clone(), by_name] {
        let data = json!({ "endpoint": endpoint, "auth": sub.auth });
        let r = gw.notify(&web_message("$refused", &[(&sub, data)])).await;
        assert_eq!((r.status, r.rejected()), (StatusCode::BAD_GATEWAY, vec![]), "{:?}", r.json);
    }
    assert!(sub.endpoint.starts_with("https://"), "{}", sub.endpoint);
    assert_eq!(proxy.tunnels().len(), 1, "no tunnel was asked for");
    assert_eq!(fake.server().connections_accepted(), 0);
}
