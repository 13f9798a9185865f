//! `dedup.backend: redis` against a real `redis-server`: two herald instances (each its own
//! `App`, with its own dedup table, metrics and connections) behind one Redis send a push once,
//! whichever instance the homeserver's retry lands on; a Redis outage never stops a push, shows
//! in the metrics and `/ready`, and shared dedup resumes by itself when Redis is back.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;

use crate::support::fake_apns::{FakeApns, Reply};
use crate::support::gateway::{
    APNS_KEY_ID, APNS_TEAM_ID, Settings, TestGateway, apns_app, apns_token as token, message,
};
use crate::support::redis::RedisServer;
use crate::support::tls::{TestCa, write_file};

const APP: &str = "im.example.ios";

/// Two gateways sharing `redis` and one fake APNs.
struct Pair {
    a: TestGateway,
    b: TestGateway,
    fake: FakeApns,
    _dir: tempfile::TempDir,
}

async fn pair(redis_url: &str) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (fake, p8) = FakeApns::start_token_auth(&ca, APNS_TEAM_ID, APNS_KEY_ID).await;
    let settings = Settings {
        apps: apns_app(APP, dir.path(), &fake, &ca, &p8, ""),
        dedup: Some(format!(
            "{{ backend: redis, redis_url: \"{redis_url}\", redis_timeout: \"200ms\" }}"
        )),
        ..Settings::default()
    };
    let a = TestGateway::start(&settings).await;
    let b = TestGateway::start(&settings).await;
    Pair { a, b, fake, _dir: dir }
}

async fn ready(gw: &TestGateway) -> Value {
    let r = gw.request(Method::GET, &gw.admin_url("/ready"), Vec::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    r.json
}

async fn store_state(gw: &TestGateway) -> String {
    ready(gw).await["dedup"]["store"].as_str().unwrap_or_default().to_owned()
}

/// Waits (up to 10 s) until `gw` reports the store `state`.
async fn wait_for_store(gw: &TestGateway, state: &str) {
    let started = Instant::now();
    while store_state(gw).await != state {
        assert!(started.elapsed() < Duration::from_secs(10), "store never became {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn the_same_push_sent_to_two_instances_at_once_goes_upstream_once() {
    let Some(redis) = RedisServer::start() else { return };
    let p = pair(&redis.url()).await;
    assert_eq!(store_state(&p.a).await, "up");
    let (k, hex) = token(1);
    // The send takes a while, so the second instance arrives while the first is sending.
    p.fake.respond(&hex, vec![Reply::Delay(Duration::from_millis(400))]);
    let body = message("$concurrent", &[(APP, &k)]);
    let (ra, rb) = tokio::join!(p.a.notify(&body), p.b.notify(&body));
    assert_eq!(ra.status, StatusCode::OK, "{:?}", ra.json);
    assert_eq!(rb.status, StatusCode::OK, "{:?}", rb.json);
    assert_eq!(p.fake.request_count(), 1, "one upstream push for two instances");
    // And a later retry to either instance is answered without a send.
    assert_eq!(p.b.notify(&body).await.status, StatusCode::OK);
    assert_eq!(p.a.notify(&body).await.status, StatusCode::OK);
    assert_eq!(p.fake.request_count(), 1);
}

#[tokio::test]
async fn a_retry_landing_on_the_other_instance_is_not_sent_again() {
    let Some(redis) = RedisServer::start() else { return };
    let p = pair(&redis.url()).await;
    let (k, _) = token(2);
    let body = message("$sequential", &[(APP, &k)]);
    assert_eq!(p.a.notify(&body).await.status, StatusCode::OK);
    assert_eq!(p.fake.request_count(), 1);
    let again = p.b.notify(&body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.rejected().is_empty());
    assert_eq!(p.fake.request_count(), 1, "instance b knew it from Redis");
    assert!(p.b.metrics().await.contains("herald_dedup_hits_total 1"));
    // The outcome is stored with the dedup TTL (1 h by default), not the short claim expiry.
    assert_eq!(redis.command(&["DBSIZE"]), ":1\r\n");
}

#[tokio::test]
async fn a_rejection_is_answered_by_the_other_instance_too() {
    let Some(redis) = RedisServer::start() else { return };
    let p = pair(&redis.url()).await;
    let (k, hex) = token(3);
    p.fake.respond(&hex, vec![Reply::unregistered()]);
    let body = message("$gone", &[(APP, &k)]);
    assert_eq!(p.a.notify(&body).await.rejected(), vec![k.clone()]);
    assert_eq!(p.b.notify(&body).await.rejected(), vec![k.clone()]);
    assert_eq!(p.fake.request_count(), 1);
}

#[tokio::test]
async fn a_failed_push_is_not_remembered_so_the_other_instance_sends_it() {
    let Some(redis) = RedisServer::start() else { return };
    let p = pair(&redis.url()).await;
    let (k, hex) = token(4);
    // Every attempt of instance a fails (3 attempts), then APNs recovers.
    p.fake.respond(
        &hex,
        vec![
            Reply::status(500, "InternalServerError"),
            Reply::status(500, "InternalServerError"),
            Reply::status(500, "InternalServerError"),
        ],
    );
    let body = message("$flaky", &[(APP, &k)]);
    let first = p.a.notify(&body).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY, "{:?}", first.json);
    assert_eq!(p.fake.request_count(), 3);
    let retry = p.b.notify(&body).await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.json);
    assert_eq!(p.fake.request_count(), 4, "the claim was released, so b sent it");
}

#[tokio::test]
async fn a_redis_outage_never_stops_pushes_and_shared_dedup_resumes_when_it_returns() {
    let Some(mut redis) = RedisServer::start() else { return };
    let p = pair(&redis.url()).await;
    let (k, _) = token(5);

    redis.stop();
    // Pushes go on while Redis is gone: each instance still delivers, deduplicating locally.
    let during = message("$during-outage", &[(APP, &k)]);
    let r = p.a.notify(&during).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(p.fake.request_count(), 1);
    assert_eq!(p.a.notify(&during).await.status, StatusCode::OK);
    assert_eq!(p.fake.request_count(), 1, "the local table still deduplicates");
    assert_eq!(store_state(&p.a).await, "down");
    let metrics = p.a.metrics().await;
    assert_eq!(metric(&metrics, "herald_dedup_store_up"), 0.0, "{metrics}");
    assert!(metric(&metrics, "herald_dedup_store_fallbacks_total") >= 1.0, "{metrics}");

    redis.resume();
    wait_for_store(&p.a, "up").await;
    let metrics = p.a.metrics().await;
    assert_eq!(metric(&metrics, "herald_dedup_store_up"), 1.0, "{metrics}");
    // b noticed nothing yet (it made no call); its next call finds Redis answering anyway.
    let after = message("$after-outage", &[(APP, &k)]);
    assert_eq!(p.a.notify(&after).await.status, StatusCode::OK);
    assert_eq!(p.fake.request_count(), 2);
    let r = p.b.notify(&after).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(p.fake.request_count(), 2, "shared dedup works again");
}

#[tokio::test]
async fn herald_starts_and_delivers_when_redis_is_unreachable() {
    // A port with nothing listening on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let p = pair(&format!("redis://127.0.0.1:{port}/0")).await;
    assert_eq!(store_state(&p.a).await, "down");
    let (k, _) = token(6);
    let r = p.a.notify(&message("$no-redis", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(p.fake.request_count(), 1);
    let metrics = p.a.metrics().await;
    assert_eq!(metric(&metrics, "herald_dedup_store_up"), 0.0, "{metrics}");
    assert!(metric(&metrics, "herald_dedup_store_fallbacks_total") >= 1.0, "{metrics}");
}

#[tokio::test]
async fn rediss_with_a_private_ca_and_a_password_file_is_shared_too() {
    let ca = TestCa::new();
    let Some(redis) = RedisServer::start_tls(&ca, "s3cret-pass") else { return };
    let dir = tempfile::tempdir().unwrap();
    let redis_ca = write_file(dir.path(), "redis-ca.pem", ca.cert_pem());
    let password = write_file(dir.path(), "redis-password", "s3cret-pass\n");
    let url = format!("rediss://localhost:{}/0", redis.port);
    let (fake, p8) = FakeApns::start_token_auth(&ca, APNS_TEAM_ID, APNS_KEY_ID).await;
    let settings = |dedup: String| Settings {
        apps: apns_app(APP, dir.path(), &fake, &ca, &p8, ""),
        dedup: Some(dedup),
        ..Settings::default()
    };
    let trusted = format!(
        "{{ backend: redis, redis_url: \"{url}\", redis_ca_file: {}, redis_password_file: {} }}",
        redis_ca.display(),
        password.display()
    );
    let a = TestGateway::start(&settings(trusted.clone())).await;
    let b = TestGateway::start(&settings(trusted)).await;
    assert_eq!(store_state(&a).await, "up");
    let (k, _) = token(7);
    let body = message("$tls", &[(APP, &k)]);
    assert_eq!(a.notify(&body).await.status, StatusCode::OK);
    assert_eq!(b.notify(&body).await.status, StatusCode::OK);
    assert_eq!(fake.request_count(), 1, "shared over TLS");

    // Without the private CA the certificate is not trusted: Redis counts as down, and pushes
    // still go out.
    let untrusted = format!(
        "{{ backend: redis, redis_url: \"{url}\", redis_password_file: {} }}",
        password.display()
    );
    let c = TestGateway::start(&settings(untrusted)).await;
    assert_eq!(store_state(&c).await, "down");
    let r = c.notify(&message("$untrusted", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn a_redis_that_stops_answering_is_marked_down_and_pushes_go_on() {
    let Some(redis) = RedisServer::start() else { return };
    let p = pair(&redis.url()).await;
    let (k, _) = token(8);
    redis.freeze();
    // The claim gets no answer: after redis_timeout (200 ms, far inside the 5 s request
    // deadline) the push goes out with local dedup, so the answer is 200, not a timeout.
    let r = p.a.notify(&message("$frozen", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(p.fake.request_count(), 1);
    assert_eq!(store_state(&p.a).await, "down");
    let metrics = p.a.metrics().await;
    assert_eq!(metric(&metrics, "herald_dedup_store_fallbacks_total"), 1.0, "{metrics}");
    // Once the store is down, the next push falls back without asking it.
    let r = p.a.notify(&message("$frozen-2", &[(APP, &k)])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(p.fake.request_count(), 2);
    let metrics = p.a.metrics().await;
    assert_eq!(metric(&metrics, "herald_dedup_store_fallbacks_total"), 2.0, "{metrics}");
    redis.thaw();
    wait_for_store(&p.a, "up").await;
}
