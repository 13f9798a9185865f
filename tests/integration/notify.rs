//! `/notify` input handling, routes and app lookup, against the real `App` with log apps.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::gateway::{Settings, TestGateway, log_app, message};

async fn gateway() -> TestGateway {
    let apps =
        [log_app("im.example.debug"), log_app("*.glob"), log_app("a.*.twice"), log_app("a.b.*")]
            .concat();
    TestGateway::start(&Settings { apps, ..Settings::default() }).await
}

#[tokio::test]
async fn log_app_delivers_and_answers_empty_rejected() {
    let gw = gateway().await;
    let r = gw.notify(&message("$1", &[("im.example.debug", "key-1")])).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json, json!({"rejected": []}));
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn app_lookup_exact_then_single_glob_else_rejected() {
    let gw = gateway().await;
    let body = message(
        "$2",
        &[
            ("im.example.debug", "exact"),
            ("x.glob", "glob"),
            ("unknown.app", "nobody"),
            ("a.b.twice", "ambiguous"),
        ],
    );
    let r = gw.notify(&body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.rejected(), vec!["ambiguous".to_string(), "nobody".to_string()]);
}

#[tokio::test]
async fn not_json_is_m_not_json() {
    let gw = gateway().await;
    for body in ["{", "hello", r#"{"notification": NaN}"#, r#"{"notification": Infinity}"#, ""] {
        let r = gw
            .request(Method::POST, &gw.url("/_matrix/push/v1/notify"), body.as_bytes().to_vec())
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.errcode(), "M_NOT_JSON", "{body}");
    }
}

#[tokio::test]
async fn wrong_shapes_are_m_bad_json_naming_the_field() {
    let gw = gateway().await;
    let device = json!({"app_id": "im.example.debug", "pushkey": "k"});
    let cases = [
        (json!([]), "body"),
        (json!("text"), "body"),
        (json!({}), "notification"),
        (json!({"notification": 1}), "notification"),
        (json!({"notification": {}}), "devices"),
        (json!({"notification": {"devices": []}}), "notification.devices"),
        (json!({"notification": {"devices": "x"}}), "notification.devices"),
        (json!({"notification": {"devices": [{"pushkey": "k"}]}}), "app_id"),
        (json!({"notification": {"devices": [{"app_id": "a"}]}}), "pushkey"),
        (
            json!({"notification": {"devices": [{"app_id": "a", "pushkey": 7}]}}),
            "notification.devices[0].pushkey",
        ),
        (json!({"notification": {"devices": [device], "counts": []}}), "notification.counts"),
        (
            json!({"notification": {"devices": [device], "counts": {"unread": -1}}}),
            "notification.counts: unread",
        ),
        (json!({"notification": {"devices": [device], "prio": 1}}), "notification.prio"),
        (
            json!({"notification": {"devices": [{"app_id": "a", "pushkey": "k", "tweaks": "loud"}]}}),
            "tweaks",
        ),
        (
            json!({"notification": {"devices": [{"app_id": "a", "pushkey": "k", "data": []}]}}),
            "data",
        ),
    ];
    for (body, field) in cases {
        let r = gw.notify(&body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.errcode(), "M_BAD_JSON", "{body}");
        let error = r.json["error"].as_str().unwrap();
        assert!(error.contains(field), "error for {body} should name {field}: {error}");
    }
}

#[tokio::test]
async fn unknown_fields_and_lenient_ids_are_accepted() {
    let gw = gateway().await;
    let body = json!({"notification": {"event_id": "not an id", "room_id": 3.to_string(), "future_field": {"x": 1},
        "prio": "whatever", "devices": [{"app_id": "im.example.debug", "pushkey": "k", "new": true}]}, "extra": 1});
    let r = gw.notify(&body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
}

#[tokio::test]
async fn oversized_body_is_413_whether_declared_or_streamed() {
    let gw = gateway().await;
    let big = format!(
        r#"{{"notification":{{"devices":[{{"app_id":"im.example.debug","pushkey":"{}"}}]}}}}"#,
        "k".repeat(70_000)
    );
    let r = gw
        .request(Method::POST, &gw.url("/_matrix/push/v1/notify"), big.clone().into_bytes())
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.errcode(), "M_TOO_LARGE");

    // Chunked: no Content-Length, so the limit is enforced while reading.
    let stream = futures_util::stream::iter(
        big.into_bytes()
            .chunks(8192)
            .map(|c| {
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                    bytes::Bytes::copy_from_slice(c),
                ))
            })
            .collect::<Vec<_>>(),
    );
    let body = http_body_util::StreamBody::new(stream);
    let chunked = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = http::Request::post(gw.url("/_matrix/push/v1/notify")).body(body).unwrap();
    let resp = chunked.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn unknown_path_is_404_and_wrong_method_is_405_with_allow() {
    let gw = gateway().await;
    let r = gw.request(Method::GET, &gw.url("/_matrix/push/v1/nothing"), Vec::new()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.errcode(), "M_UNRECOGNIZED");
    let r = gw.request(Method::GET, &gw.url("/_matrix/push/v1/notify"), Vec::new()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.errcode(), "M_UNRECOGNIZED");
    assert_eq!(r.headers["allow"], "POST");
    let r = gw.request(Method::DELETE, &gw.url("/health"), Vec::new()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn health_ready_on_both_listeners_metrics_on_admin_only() {
    let gw = gateway().await;
    for url in [gw.url("/health"), gw.admin_url("/health")] {
        let r = gw.request(Method::GET, &url, Vec::new()).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json, json!({"status": "ok"}));
    }
    for url in [gw.url("/ready"), gw.admin_url("/ready")] {
        assert_eq!(gw.request(Method::GET, &url, Vec::new()).await.status, StatusCode::OK);
    }
    assert_eq!(
        gw.request(Method::GET, &gw.url("/metrics"), Vec::new()).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(gw.metrics().await.contains("herald_notifications_received_total"));
}

#[tokio::test]
async fn shared_listener_serves_metrics_too() {
    let gw = TestGateway::start(&Settings { separate_admin: false, ..Settings::default() }).await;
    let r = gw.request(Method::GET, &gw.url("/metrics"), Vec::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
}

#[tokio::test]
async fn metrics_count_notifications_devices_and_outcomes() {
    let gw = gateway().await;
    gw.notify(&message("$m", &[("im.example.debug", "a"), ("nobody.app", "b")])).await;
    let text = gw.metrics().await;
    assert!(text.contains("herald_notifications_received_total 1"), "{text}");
    assert!(text.contains("herald_devices_received_total 2"), "{text}");
    assert!(
        text.contains(r#"herald_device_outcomes_total{app="im.example.debug",provider="log",outcome="delivered"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"herald_notify_duration_seconds_count{status="200"} 1"#), "{text}");
}

#[tokio::test]
async fn metrics_text_matches_the_golden_file() {
    let gw = gateway().await;
    gw.notify(&message("$g1", &[("im.example.debug", "a"), ("x.glob", "b"), ("nobody", "c")]))
        .await;
    gw.notify(&message("$g1", &[("im.example.debug", "a")])).await;
    gw.request(Method::POST, &gw.url("/_matrix/push/v1/notify"), b"{".to_vec()).await;
    // Durations vary run to run: keep the HELP/TYPE lines, counters, gauges and histogram counts.
    let mut lines: Vec<String> = gw
        .metrics()
        .await
        .lines()
        .filter(|l| !l.is_empty() && !l.contains("_bucket{") && !l.contains("_sum"))
        .map(str::to_owned)
        .collect();
    lines.sort();
    let actual = lines.join("\n") + "\n";
    let path = crate::support::gateway::fixture("metrics.txt");
    if std::env::var_os("HERALD_BLESS").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    assert_eq!(
        actual,
        std::fs::read_to_string(&path).unwrap(),
        "/metrics differs from {}",
        path.display()
    );
}

#[tokio::test]
async fn a_body_that_stalls_is_answered_408_before_the_request_deadline() {
    // request_deadline is long; the body read still gets only BODY_READ_TIMEOUT (5s).
    let gw = TestGateway::start(&Settings { request_deadline: "60s", ..Settings::default() }).await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(
            b"POST /_matrix/push/v1/notify HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"notific",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let complete = |a: &[u8]| {
        let text = String::from_utf8_lossy(a);
        text.split_once("\r\n\r\n").is_some_and(|(_, body)| body.ends_with('}'))
    };
    while !complete(&answer) {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("an answer before the request deadline")
            .unwrap();
        assert!(n > 0, "closed without an answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    // Generous bound: between the 5s body bound and the 60s request deadline.
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["errcode"], "M_UNKNOWN");
    assert_eq!(json["error"], "timed out reading the request body");
}
