//! Dedup through the real HTTP path: a homeserver retry never alerts a phone twice, a failure is
//! never remembered, concurrent duplicates share one send.

use std::time::Duration;

use http::StatusCode;

use crate::support::fake_apns::{FakeApns, Reply};
use crate::support::gateway::{Settings, TestGateway, WithApns, apns_token as token, message};

const APP: &str = "im.example.ios";

async fn setup() -> (TestGateway, FakeApns) {
    let s = WithApns::start(APP, Settings::default()).await;
    (s.gw, s.fake)
}

#[tokio::test]
async fn a_retried_notification_is_sent_once() {
    let (gw, fake) = setup().await;
    let (k, _) = token(1);
    for _ in 0..3 {
        let r = gw.notify(&message("$once", &[(APP, &k)])).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(fake.request_count(), 1);
    assert!(gw.metrics().await.contains("herald_dedup_hits_total 2"));
    // Another event for the same device is a new push.
    assert_eq!(gw.notify(&message("$other", &[(APP, &k)])).await.status, StatusCode::OK);
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn a_known_rejection_is_answered_again_without_a_send() {
    let (gw, fake) = setup().await;
    let (k, hex) = token(2);
    fake.respond(&hex, vec![Reply::unregistered()]);
    let first = gw.notify(&message("$gone", &[(APP, &k)])).await;
    let second = gw.notify(&message("$gone", &[(APP, &k)])).await;
    assert_eq!(first.rejected(), vec![k.clone()]);
    assert_eq!(second.rejected(), vec![k.clone()]);
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn concurrent_duplicates_share_one_upstream_send() {
    let (gw, fake) = setup().await;
    let (k, hex) = token(3);
    fake.respond(&hex, vec![Reply::Delay(Duration::from_millis(500))]);
    let body = message("$concurrent", &[(APP, &k)]);
    let (a, b, c) = tokio::join!(gw.notify(&body), gw.notify(&body), gw.notify(&body));
    for r in [a, b, c] {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    }
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn after_a_partial_failure_the_retry_resends_only_what_was_not_delivered() {
    let (gw, fake) = setup().await;
    let (ok, ok_hex) = token(4);
    let (flaky, flaky_hex) = token(5);
    let (gone, _) = token(6);
    fake.respond(&flaky_hex, vec![Reply::service_unavailable(None); 3]);
    fake.respond(&token(6).1, vec![Reply::unregistered()]);
    let body = message("$partial", &[(APP, &ok), (APP, &flaky), (APP, &gone)]);
    let first = gw.notify(&body).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(first.rejected(), vec![gone.clone()]);
    fake.clear_requests();

    let retry = gw.notify(&body).await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.json);
    assert_eq!(retry.rejected(), vec![gone.clone()], "the known rejection is answered again");
    let resent: Vec<String> = fake.requests().into_iter().map(|r| r.token).collect();
    assert_eq!(resent, vec![flaky_hex], "only the undelivered device is sent again");
    assert!(!resent_contains(&fake, &ok_hex));
}

fn resent_contains(fake: &FakeApns, hex: &str) -> bool {
    fake.requests().iter().any(|r| r.token == hex)
}
