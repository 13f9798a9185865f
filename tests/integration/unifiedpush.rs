//! UnifiedPush end to end: herald as the Matrix gateway, forwarding each device's notification
//! to its endpoint at a fake distributor (like ntfy) that records the bodies. DESIGN §3's
//! UnifiedPush rows, the discovery GET, and the endpoint vetting.

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::fake_unifiedpush::FakeDistributor;
use crate::support::fake_webpush::PushReply;
use crate::support::gateway::{Settings, TestGateway, log_app, message};
use crate::support::tls::{TestCa, write_file};

const APP: &str = "org.example.chat.up";
const NOTIFY: &str = "/_matrix/push/v1/notify";

/// `type: unifiedpush` for every app id ending in `.up`, plus `extra` YAML lines.
fn unifiedpush_app(extra: &str) -> String {
    format!("  \"*.up\":\n    type: unifiedpush\n{extra}")
}

async fn setup(extra: &str) -> (TestGateway, FakeDistributor) {
    let fake = FakeDistributor::start(None).await;
    let apps = unifiedpush_app(&format!("    allow_internal_endpoints: true\n{extra}"));
    (TestGateway::start(&Settings { apps, ..Settings::default() }).await, fake)
}

fn statuses(fake: &FakeDistributor) -> Vec<u16> {
    fake.requests().iter().map(|r| r.status).collect()
}

#[tokio::test]
async fn each_device_gets_the_notification_reduced_to_itself_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let fake = FakeDistributor::start(Some(&ca)).await;
    let ca_file = write_file(dir.path(), "ca.pem", ca.cert_pem());
    let apps = unifiedpush_app(&format!(
        "    allow_internal_endpoints: true\n    ca_file: {}\n    ttl: 1h\n",
        ca_file.display()
    ));
    let gw = TestGateway::start(&Settings { apps, ..Settings::default() }).await;
    let (a, b) = (fake.endpoint("phone-a"), fake.endpoint("phone-b"));
    let mut body = message("$up1", &[(APP, &a), (APP, &b)]);
    body["notification"]["devices"][1]["data"] = json!({"format": "event_id_only"});

    let r = gw.notify(&body).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::OK, vec![]), "{:?}", r.json);
    let mut reqs = fake.requests();
    reqs.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(reqs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["phone-a", "phone-b"]);
    for (req, endpoint) in reqs.iter().zip([&a, &b]) {
        assert_eq!(req.status, 201);
        assert_eq!(req.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!((req.header("ttl"), req.header("urgency")), (Some("3600"), Some("high")));
        let n = &req.json().expect("a JSON body")["notification"];
        assert_eq!(n["event_id"], "$up1");
        assert_eq!(n["room_id"], "!lunch:example.org");
        assert_eq!(n["content"]["body"], "Pizza at noon?");
        assert_eq!(n["counts"], json!({"unread": 2, "missed_calls": 1}));
        let devices = n["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 1, "only this device: {n}");
        assert_eq!(devices[0]["pushkey"], endpoint.as_str());
        assert_eq!(devices[0]["app_id"], APP);
    }
    let n = &reqs[1].json().unwrap()["notification"];
    assert_eq!(n["devices"][0]["data"], json!({"format": "event_id_only"}));
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"herald_device_outcomes_total{app="*.up",provider="unifiedpush",outcome="delivered"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn discovery_get_answers_only_when_a_unifiedpush_app_is_configured() {
    let (gw, _fake) = setup("").await;
    let url = gw.url(NOTIFY);
    let r = gw.request(Method::GET, &url, Vec::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json, json!({"unifiedpush": {"gateway": "matrix"}}));
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(gw.request(Method::HEAD, &url, Vec::new()).await.status, StatusCode::OK);
    let r = gw.request(Method::PUT, &url, Vec::new()).await;
    assert_eq!((r.status, r.errcode()), (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"));
    assert_eq!(r.headers["allow"], "GET, HEAD, POST");

    let plain =
        TestGateway::start(&Settings { apps: log_app("im.example.debug"), ..Settings::default() })
            .await;
    let r = plain.request(Method::GET, &plain.url(NOTIFY), Vec::new()).await;
    assert_eq!((r.status, r.errcode()), (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"));
    assert_eq!(r.headers["allow"], "POST");
}

#[tokio::test]
async fn gone_endpoints_and_unusable_pushkeys_are_rejected() {
    let (gw, fake) = setup("").await;
    fake.unsubscribe("gone");
    let (live, gone) = (fake.endpoint("live"), fake.endpoint("gone"));
    let r = gw.notify(&message("$gone", &[(APP, &live), (APP, &gone), (APP, "not a url")])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    let mut expected = vec![gone.clone(), "not a url".to_owned()];
    expected.sort();
    assert_eq!(r.rejected(), expected);
    let mut seen = statuses(&fake);
    seen.sort();
    assert_eq!(seen, [201, 410], "the malformed pushkey made no request");

    // A topic the distributor never handed out (not made with `endpoint`): 404.
    fake.forget_unknown(true);
    let unknown = format!("{}/up/never-registered", fake.url());
    let r = gw.notify(&message("$unknown", &[(APP, &unknown)])).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::OK, vec![unknown]), "404 rejects too");
}

#[tokio::test]
async fn too_large_is_shortened_once_then_fails() {
    let (gw, fake) = setup("").await;
    let endpoint = fake.endpoint("big");
    let mut body = message("$big", &[(APP, &endpoint)]);
    body["notification"]["content"]["body"] = json!("x".repeat(3000));
    fake.set_max_body(2048);
    assert_eq!(gw.notify(&body).await.status, StatusCode::OK);
    let reqs = fake.requests();
    assert_eq!(reqs.iter().map(|r| r.status).collect::<Vec<_>>(), [413, 201]);
    assert!(reqs[0].body.len() <= 4096 && reqs[1].body.len() <= 1024, "{}", reqs[1].body.len());
    let n: Value = reqs[1].json().unwrap()["notification"].clone();
    assert_eq!(
        (n["event_id"].as_str(), n["devices"][0]["pushkey"].as_str()),
        (Some("$big"), Some(endpoint.as_str()))
    );

    fake.clear_requests();
    fake.set_max_body(200);
    let r = gw.notify(&message("$huge", &[(APP, &endpoint)])).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::BAD_GATEWAY, vec![]), "{:?}", r.json);
    assert_eq!(statuses(&fake), [413, 413]);
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_other_errors_are_not() {
    let (gw, fake) = setup("").await;
    let endpoint = fake.endpoint("flaky");
    fake.respond("flaky", vec![PushReply::retry_after(429, 0), PushReply::status(502)]);
    assert_eq!(gw.notify(&message("$flaky", &[(APP, &endpoint)])).await.status, StatusCode::OK);
    assert_eq!(statuses(&fake), [429, 502, 201]);

    fake.clear_requests();
    fake.respond("flaky", vec![PushReply::status(403)]);
    let r = gw.notify(&message("$403", &[(APP, &endpoint)])).await;
    assert_eq!((r.status, r.rejected()), (StatusCode::BAD_GATEWAY, vec![]), "{:?}", r.json);
    assert_eq!(statuses(&fake), [403]);
}

#[tokio::test]
async fn internal_endpoints_are_refused_without_any_connection() {
    let fake = FakeDistributor::start(None).await;
    let gw =
        TestGateway::start(&Settings { apps: unifiedpush_app(""), ..Settings::default() }).await;
    let port = fake.server().addr().port();
    for pushkey in [
        fake.endpoint("x"),
        format!("https://127.0.0.1:{port}/up/x"),
        format!("https://localhost:{port}/up/x"),
        format!("https://[::1]:{port}/up/x"),
        "https://10.0.0.7/up/x".to_owned(),
        "https://169.254.169.254/latest/meta-data".to_owned(),
    ] {
        let r = gw.notify(&message("$ssrf", &[(APP, &pushkey)])).await;
        assert_eq!(
            (r.status, r.rejected()),
            (StatusCode::BAD_GATEWAY, vec![]),
            "{pushkey}: {:?}",
            r.json
        );
    }
    assert_eq!(fake.server().connections_accepted(), 0, "no connection was made");
    // Refused by herald before any request, each of them (the first for its http:// scheme).
    let metrics = gw.metrics().await;
    let refused =
        r#"herald_upstream_responses_total{app="*.up",provider="unifiedpush",status="refused"} 6"#;
    assert!(metrics.contains(refused), "{metrics}");
}
