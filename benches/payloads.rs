//! Criterion benches for the per-device hot path: parsing a notify body, building APNs, FCM,
//! WebPush and UnifiedPush payloads (including the shortening of a 40 KB and a 60 KB body), the
//! RFC 8291 encryption of a WebPush message, the dedup key, and a dedup lookup that hits (a
//! retry) or misses (a new event) in a cache of 200,000 entries.
//!
//! `cargo bench --bench payloads`. Compare runs on one machine only; these machines are noisy.

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald::config::DedupConfig;
use herald::dedup::{Dedup, DedupKey, Deduped, Final};
use herald::notification::{self, Notification};
use herald::providers::{apns, fcm, unifiedpush, webpush};
use serde_json::json;

fn body(content_body: &str, devices: usize) -> Vec<u8> {
    let devices: Vec<_> = (0..devices)
        .map(|i| json!({"app_id": "im.example.ios", "pushkey": format!("pushkey-{i:04}"), "data": {}, "tweaks": {"sound": "bing"}}))
        .collect();
    serde_json::to_vec(&json!({"notification": {
        "event_id": "$3957tyerfgewrf384", "room_id": "!slw48wfj34rtnrf:example.com", "type": "m.room.message",
        "sender": "@exampleuser:matrix.org", "sender_display_name": "Major Tom", "room_name": "Mission Control",
        "room_alias": "#exampleroom:matrix.org", "prio": "high",
        "content": {"msgtype": "m.text", "body": content_body},
        "counts": {"unread": 2, "missed_calls": 1}, "devices": devices,
    }}))
    .unwrap()
}

fn parsed(content_body: &str) -> Notification {
    notification::parse(&body(content_body, 1)).unwrap()
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for devices in [1, 20] {
        let b = body("I'm floating in a most peculiar way.", devices);
        group.bench_with_input(BenchmarkId::new("notify_body", devices), &b, |bench, b| {
            bench.iter(|| notification::parse(black_box(b)).unwrap())
        });
    }
    let b = body(&"x".repeat(60_000), 1);
    group.bench_with_input(BenchmarkId::new("notify_body", "60KB"), &b, |bench, b| {
        bench.iter(|| notification::parse(black_box(b)).unwrap())
    });
    group.finish();

    let mut group = c.benchmark_group("payload");
    for (name, text) in [
        ("short", "I'm floating in a most peculiar way.".to_owned()),
        ("oversized", "ü".repeat(20_000)),
        ("60KB", "floating ".repeat(6_700)),
    ] {
        let n = parsed(&text);
        let d = &n.devices[0];
        group.bench_function(BenchmarkId::new("apns", name), |bench| {
            bench.iter(|| {
                let mut p = apns::build_payload(black_box(&n), d, true).unwrap();
                apns::fit(&mut p)
            })
        });
        group.bench_function(BenchmarkId::new("fcm", name), |bench| {
            bench.iter(|| fcm::build_message(black_box(&n), d, true, false, &Default::default()))
        });
        group.bench_function(BenchmarkId::new("webpush", name), |bench| {
            bench.iter(|| webpush::fitted_payload(black_box(&n), d))
        });
        group.bench_function(BenchmarkId::new("unifiedpush", name), |bench| {
            bench.iter(|| unifiedpush::fitted_body(black_box(&n), d))
        });
    }
    group.finish();

    // What each WebPush send adds: a fresh P-256 key pair, ECDH, HKDF and AES-128-GCM; herald's
    // (ring's curve) against the `web-push-native` crate's (pure-Rust p256), in one run.
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    let n = parsed("I'm floating in a most peculiar way.");
    let plaintext = webpush::fitted_payload(&n, &n.devices[0]);
    let browser = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng).public_key();
    let browser_bytes = browser.to_encoded_point(false).as_bytes().to_vec();
    let mut group = c.benchmark_group("webpush_encrypt");
    group.bench_function("herald", |bench| {
        bench.iter(|| webpush::encrypt(black_box(plaintext.clone()), &browser_bytes, &[7; 16]))
    });
    let auth = web_push_native::Auth::clone_from_slice(&[7; 16]);
    group.bench_function("web-push-native", |bench| {
        bench.iter(|| web_push_native::encrypt(black_box(plaintext.clone()), &browser, &auth))
    });
    group.finish();

    c.bench_function("dedup_key", |bench| {
        bench.iter(|| {
            DedupKey::new(
                black_box("$3957tyerfgewrf384"),
                "im.example.ios",
                "V2h5IG9uIGVhcnRoIGRpZCB5b3UgZGVjb2RlIHRoaXM/",
            )
        })
    });
}

fn dedup_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let dedup = Dedup::new(&DedupConfig {
        ttl: Duration::from_secs(3600),
        max_entries: 200_000,
        redis: None,
    });
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    // Fill the cache, as on a gateway that has run a while.
    let next = AtomicU64::new(0);
    let key = |n: u64| DedupKey::new(&format!("$event{n}"), "im.example.ios", "pushkey-0001");
    rt.block_on(async {
        for _ in 0..200_000 {
            let n = next.fetch_add(1, Ordering::Relaxed);
            let _: Deduped<()> = dedup.run(key(n), far, async { Ok(Final::Delivered) }).await;
        }
    });
    let mut group = c.benchmark_group("dedup");
    let known = key(199_999);
    group.bench_function("hit", |bench| {
        bench.to_async(&rt).iter(|| async {
            let r: Deduped<()> =
                dedup.run(black_box(known), far, async { Ok(Final::Delivered) }).await;
            assert!(matches!(r, Deduped::Known(_)));
        })
    });
    group.bench_function("miss", |bench| {
        bench.to_async(&rt).iter(|| async {
            let k = key(next.fetch_add(1, Ordering::Relaxed));
            let r: Deduped<()> = dedup.run(black_box(k), far, async { Ok(Final::Delivered) }).await;
            assert!(matches!(r, Deduped::Sent(_)));
        })
    });
    group.finish();
}

criterion_group!(payloads, benches, dedup_benches);
criterion_main!(payloads);
