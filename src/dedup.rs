//! Duplicate suppression: a retried notify never alerts a phone twice.
//!
//! Keyed by `(event_id, app_id, pushkey)`, hashed to 128 bits so an entry costs the same whatever
//! the homeserver sends. Only final outcomes (delivered, rejected) are remembered, for
//! `dedup.ttl` and at most `dedup.max_entries`; a failure is never cached, so the homeserver's
//! retry sends again. Concurrent duplicates share one upstream send (moka coalesces the
//! initialisers of one key). Notifications without an `event_id` (badge updates) never come here.

use std::future::Future;

use moka::future::Cache;

use crate::config::DedupConfig;

/// A device's final answer, as remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Final {
    Delivered,
    Rejected,
}

/// The cache key: 128 bits of SHA-256 over the length-prefixed parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DedupKey([u8; 16]);

impl DedupKey {
    pub fn new(event_id: &str, app_id: &str, pushkey: &str) -> DedupKey {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [event_id, app_id, pushkey] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part.as_bytes());
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&ctx.finish().as_ref()[..16]);
        DedupKey(key)
    }
}

/// How a deduplicated send went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deduped<E> {
    /// This call ran the send and it reached a final outcome.
    Sent(Final),
    /// The outcome came from the cache or from a concurrent identical request.
    Known(Final),
    /// The send failed (this call's or the concurrent one's); nothing was remembered.
    Failed(E),
}

#[derive(Clone)]
pub struct Dedup {
    cache: Cache<DedupKey, Final>,
}

impl Dedup {
    pub fn new(config: &DedupConfig) -> Dedup {
        let cache =
            Cache::builder().max_capacity(config.max_entries).time_to_live(config.ttl).build();
        Dedup { cache }
    }

    /// Runs `send` unless `key` already has a final outcome or is being sent right now.
    pub async fn run<F, E>(&self, key: DedupKey, send: F) -> Deduped<E>
    where
        F: Future<Output = Result<Final, E>>,
        E: Clone + Send + Sync + 'static,
    {
        match self.cache.entry(key).or_try_insert_with(send).await {
            Ok(entry) if entry.is_fresh() => Deduped::Sent(entry.into_value()),
            Ok(entry) => Deduped::Known(entry.into_value()),
            Err(e) => Deduped::Failed((*e).clone()),
        }
    }
}

impl Dedup {
    /// Runs the cache's pending maintenance (evictions), which otherwise happens a little at a
    /// time on later calls; benchmarks use it to start from a settled cache.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn dedup() -> Dedup {
        Dedup::new(&DedupConfig { ttl: Duration::from_secs(60), max_entries: 100 })
    }

    #[test]
    fn keys_do_not_collide_across_part_boundaries() {
        assert_ne!(DedupKey::new("ab", "c", "d"), DedupKey::new("a", "bc", "d"));
        assert_eq!(DedupKey::new("a", "b", "c"), DedupKey::new("a", "b", "c"));
    }

    #[tokio::test]
    async fn final_outcomes_are_remembered_failures_are_not() {
        let d = dedup();
        let k = DedupKey::new("$e", "app", "key");
        let r: Deduped<String> = d.run(k, async { Err("down".to_owned()) }).await;
        assert_eq!(r, Deduped::Failed("down".into()));
        let r: Deduped<String> = d.run(k, async { Ok(Final::Delivered) }).await;
        assert_eq!(r, Deduped::Sent(Final::Delivered));
        let r: Deduped<String> = d.run(k, async { panic!("must not send twice") }).await;
        assert_eq!(r, Deduped::Known(Final::Delivered));
    }

    #[tokio::test]
    async fn concurrent_duplicates_share_one_send() {
        let d = dedup();
        let sends = AtomicUsize::new(0);
        let k = DedupKey::new("$e", "app", "key");
        let one = || async {
            d.run::<_, String>(k, async {
                sends.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Final::Rejected)
            })
            .await
        };
        let (a, b, c) = tokio::join!(one(), one(), one());
        assert_eq!(sends.load(Ordering::SeqCst), 1);
        let sent = [&a, &b, &c].iter().filter(|r| matches!(r, Deduped::Sent(_))).count();
        assert_eq!(sent, 1);
        assert!([a, b, c].iter().all(|r| matches!(
            r,
            Deduped::Sent(Final::Rejected) | Deduped::Known(Final::Rejected)
        )));
    }
}
