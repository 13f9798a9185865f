//! Load shedding and graceful shutdown of the real `App`.

use std::time::Duration;

use base64::Engine as _;
use http::{Method, StatusCode};

use crate::support::fake_apns::{FakeApns, Reply};
use crate::support::gateway::{
    APNS_KEY_ID, APNS_TEAM_ID, Settings, TestGateway, apns_app, message,
};
use crate::support::tls::TestCa;

const APP: &str = "im.example.ios";

fn token(n: u8) -> (String, String) {
    let raw = [n; 32];
    (base64::engine::general_purpose::STANDARD.encode(raw), hex::encode(raw))
}

async fn setup(settings: Settings) -> (TestGateway, FakeApns, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (fake, p8) = FakeApns::start_token_auth(&ca, APNS_TEAM_ID, APNS_KEY_ID).await;
    let apps = apns_app(APP, dir.path(), &fake, &ca, &p8, "");
    let gw = TestGateway::start(&Settings { apps, ..settings }).await;
    (gw, fake, dir)
}

#[tokio::test]
async fn beyond_max_inflight_requests_answers_429_with_retry_after() {
    let (gw, fake, _dir) =
        setup(Settings { max_inflight_requests: 1, ..Settings::default() }).await;
    let (slow, hex) = token(1);
    fake.respond(&hex, vec![Reply::Delay(Duration::from_millis(800))]);
    let busy_body = message("$busy", &[(APP, &slow)]);
    let busy = gw.notify(&busy_body);
    let second = async {
        fake.wait_for_requests(1, Duration::from_secs(5)).await;
        gw.notify(&message("$second", &[(APP, &token(2).0)])).await
    };
    let (first, second) = tokio::join!(busy, second);
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.errcode(), "M_LIMIT_EXCEEDED");
    assert!(second.json["retry_after_ms"].as_u64().unwrap() > 0);
    assert!(second.headers.contains_key("retry-after"));
    // The permit is returned: the next request goes through.
    assert_eq!(gw.notify(&message("$third", &[(APP, &token(3).0)])).await.status, StatusCode::OK);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_stops_serving() {
    let (mut gw, fake, _dir) = setup(Settings::default()).await;
    let (k, hex) = token(4);
    fake.respond(&hex, vec![Reply::Delay(Duration::from_millis(700))]);
    let url = gw.url("/_matrix/push/v1/notify");
    let client = crate::support::gateway::client();
    let body = message("$inflight", &[(APP, &k)]).to_string().into_bytes();
    let in_flight = tokio::spawn(async move {
        crate::support::gateway::send(&client, Method::POST, &url, body).await
    });
    fake.wait_for_requests(1, Duration::from_secs(5)).await;

    let stopped = gw.begin_shutdown();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "the in-flight request completes during the drain");
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("run returns")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err(), "no longer accepting");
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let (mut gw, fake, _dir) = setup(Settings {
        shutdown_grace: "200ms",
        upstream_timeout: "10s",
        request_deadline: "20s",
        ..Settings::default()
    })
    .await;
    let (k, hex) = token(5);
    fake.respond(&hex, vec![Reply::Delay(Duration::from_secs(30))]);
    let url = gw.url("/_matrix/push/v1/notify");
    let client = crate::support::gateway::client();
    let body = message("$stuck", &[(APP, &k)]).to_string().into_bytes();
    let _stuck = tokio::spawn(async move {
        let req = http::Request::post(url)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        client.request(req).await
    });
    fake.wait_for_requests(1, Duration::from_secs(5)).await;
    let stopped = gw.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("run returns once the grace period is over")
        .unwrap()
        .unwrap();
}
