//! Load shedding and graceful shutdown of the real `App`.

use std::time::Duration;

use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::fake_apns::{FakeApns, Reply};
use crate::support::gateway::{Settings, TestGateway, WithApns, apns_token as token, message};

const APP: &str = "im.example.ios";

async fn setup(settings: Settings) -> (TestGateway, FakeApns, tempfile::TempDir) {
    let WithApns { gw, fake, dir } = WithApns::start(APP, settings).await;
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

/// Reads until the server closes the connection (EOF or reset); panics if it does not within
/// `bound`, or if it answers anything.
async fn expect_closed_without_answer(mut stream: TcpStream, bound: Duration) {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(bound, stream.read(&mut buf))
        .await
        .expect("the server closes a connection that does not finish its request head");
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("unexpected answer: {}", String::from_utf8_lossy(&buf[..n])),
    }
}

#[tokio::test]
async fn slow_or_silent_clients_are_disconnected() {
    let gw = TestGateway::start(&Settings::default()).await;
    // Half a request head, then nothing (slow loris).
    let mut partial = TcpStream::connect(gw.addr).await.unwrap();
    partial.write_all(b"POST /_matrix/push/v1/notify HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Connected, but not a single byte: hyper cannot even tell HTTP/1 from HTTP/2 yet.
    let silent = TcpStream::connect(gw.addr).await.unwrap();
    // The bound is generous: this checks that the connections are closed, not exact timing.
    let bound = herald::app::HEADER_READ_TIMEOUT + Duration::from_secs(5);
    tokio::join!(
        expect_closed_without_answer(partial, bound),
        expect_closed_without_answer(silent, bound),
    );
    // The gateway still serves everyone else.
    let r = gw.request(Method::GET, &gw.url("/health"), Vec::new()).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn an_idle_connection_still_drains_on_shutdown() {
    // A kept-alive connection with no request in flight must not hold up the drain.
    let mut gw =
        TestGateway::start(&Settings { shutdown_grace: "30s", ..Settings::default() }).await;
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    tokio::time::timeout(Duration::from_secs(5), gw.begin_shutdown())
        .await
        .expect("run returns without waiting for the idle connection")
        .unwrap()
        .unwrap();
    expect_closed_without_answer(idle, Duration::from_secs(5)).await;
}
