//! Duplicate suppression: a retried notify never alerts a phone twice.
//!
//! Keyed by `(event_id, app_id, pushkey)`, hashed to 128 bits so an entry costs the same whatever
//! the homeserver sends. Only final outcomes (delivered, rejected) are remembered, for
//! `dedup.ttl` and at most `dedup.max_entries`; a failure is never cached, so the homeserver's
//! retry sends again. Concurrent duplicates share one upstream send: the first caller sends,
//! the others wait for its outcome (and send themselves if it was cancelled). Notifications
//! without an `event_id` (badge updates) never come here.
//!
//! The store is a set-associative table of 24-byte entries (key, expiry and outcome), at most
//! `max_entries` of them, so 200,000 remembered pushes cost 4.8 MB and nothing else: a full set
//! replaces its entry that expires first. Sets are chosen by a hash seeded per process, so no
//! one can aim keys at one set to push others' entries out. The lock is held only for a table
//! lookup or insert, never across a send.
//!
//! With `dedup.backend: redis` the table stays in front (a hit costs no round trip) and the
//! coalescing of concurrent duplicates stays in this process; [`redis`] adds the claim that
//! stops two replicas from sending the same push, and keeps final outcomes for every replica.

pub mod redis;

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use crate::config::DedupConfig;
use crate::metrics::Metrics;
use redis::{Claim, SharedStore};

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
    /// Another replica was still sending it when the deadline came; nothing was sent here.
    Busy,
}

/// Entries per set: a full set replaces the entry that expires first.
const WAYS: usize = 8;

/// One remembered outcome: the key's two halves, then a stamp that is 0 for an empty slot,
/// else the expiry (ms since the table's epoch, shifted left one bit) with the outcome in the
/// low bit. A plain array, so a table of empty slots is one zeroed allocation (calloc): its
/// pages count in RSS only once entries land in them.
type Slot = [u64; 3];

fn key_words(key: &DedupKey) -> [u64; 2] {
    let (lo, hi) = key.0.split_at(8);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    [word(lo), word(hi)]
}

fn holds(slot: &Slot, key: [u64; 2]) -> bool {
    slot[2] != 0 && slot[0] == key[0] && slot[1] == key[1]
}

fn expires_ms(slot: &Slot) -> u64 {
    slot[2] >> 1
}

fn outcome(slot: &Slot) -> Final {
    if slot[2] & 1 == 1 { Final::Rejected } else { Final::Delivered }
}

/// What concurrent duplicates wait on: the first caller's outcome, its error type erased.
type Shared = Result<Final, Arc<dyn Any + Send + Sync>>;

struct State {
    slots: Vec<Slot>,
    inflight: HashMap<DedupKey, watch::Receiver<Option<Shared>>>,
}

#[derive(Clone)]
pub struct Dedup {
    state: Arc<Mutex<State>>,
    sets: usize,
    ttl_ms: u64,
    epoch: Instant,
    /// Picks a key's set; seeded per process.
    hasher: RandomState,
    /// `backend: redis`: the store shared with the other replicas.
    shared: Option<SharedStore>,
}

impl Dedup {
    /// The table for this process alone (`backend: memory`).
    pub fn new(config: &DedupConfig) -> Dedup {
        let sets = usize::try_from(config.max_entries).unwrap_or(usize::MAX).div_ceil(WAYS).max(1);
        Dedup {
            // `vec!` of zeroes is one calloc: pages are touched (and counted in RSS) only as
            // entries arrive.
            state: Arc::new(Mutex::new(State {
                slots: vec![[0u64; 3]; sets * WAYS],
                inflight: HashMap::new(),
            })),
            sets,
            ttl_ms: u64::try_from(config.ttl.as_millis()).unwrap_or(u64::MAX >> 2).max(1),
            epoch: Instant::now(),
            hasher: RandomState::new(),
            shared: None,
        }
    }

    /// The table plus, with `backend: redis`, the shared store (created without connecting;
    /// must run inside a tokio runtime). `claim_ttl` bounds how long the claim of a replica
    /// that died mid-send holds the others back: the longest a send may take.
    pub fn with_backend(
        config: &DedupConfig,
        claim_ttl: std::time::Duration,
        metrics: &Metrics,
    ) -> Result<Dedup, String> {
        let mut dedup = Dedup::new(config);
        if let Some(redis) = &config.redis {
            dedup.shared = Some(SharedStore::new(redis, config.ttl, claim_ttl, metrics)?);
        }
        Ok(dedup)
    }

    /// The shared store, when there is one.
    pub fn shared(&self) -> Option<&SharedStore> {
        self.shared.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the table consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX >> 2)
    }

    fn set_of(&self, key: &DedupKey) -> std::ops::Range<usize> {
        let set = (self.hasher.hash_one(key) % self.sets as u64) as usize;
        set * WAYS..(set + 1) * WAYS
    }

    /// The remembered outcome of `key`, if it has not expired.
    fn lookup(&self, state: &State, key: &DedupKey, now: u64) -> Option<Final> {
        let words = key_words(key);
        state.slots[self.set_of(key)]
            .iter()
            .find(|s| holds(s, words))
            .filter(|s| expires_ms(s) > now)
            .map(outcome)
    }

    fn remember(&self, state: &mut State, key: &DedupKey, outcome: Final, now: u64) {
        let words = key_words(key);
        let set = &mut state.slots[self.set_of(key)];
        // The same key, else an empty or expired slot, else the one that expires first.
        let slot = match set.iter().position(|s| holds(s, words)) {
            Some(i) => i,
            None => set
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| if s[2] == 0 || expires_ms(s) <= now { 0 } else { s[2] })
                .map_or(0, |(i, _)| i),
        };
        let expires = now.saturating_add(self.ttl_ms).min(u64::MAX >> 2);
        set[slot] = [words[0], words[1], (expires << 1) | u64::from(outcome == Final::Rejected)];
    }

    /// Runs `send` unless `key` already has a final outcome or is being sent right now (here,
    /// or by another replica: then this waits for its outcome until `deadline`).
    pub async fn run<F, E>(
        &self,
        key: DedupKey,
        deadline: tokio::time::Instant,
        send: F,
    ) -> Deduped<E>
    where
        F: Future<Output = Result<Final, E>>,
        E: Clone + Send + Sync + 'static,
    {
        let tx = loop {
            let waiting = {
                let mut state = self.lock();
                if let Some(known) = self.lookup(&state, &key, self.now_ms()) {
                    return Deduped::Known(known);
                }
                match state.inflight.get(&key) {
                    Some(rx) => rx.clone(),
                    None => {
                        // Nobody is sending this key: this caller does.
                        let (tx, rx) = watch::channel(None);
                        state.inflight.insert(key, rx);
                        break tx;
                    }
                }
            };
            match wait(waiting).await {
                Some(Ok(known)) => return Deduped::Known(known),
                Some(Err(shared)) => {
                    if let Some(e) = shared.downcast_ref::<E>() {
                        return Deduped::Failed(e.clone());
                    }
                    // Another caller's error type: it failed, so this one sends itself.
                }
                // The sender was cancelled before it finished: try again (maybe as the sender).
                None => {}
            }
        };
        self.lead(key, deadline, tx, send).await
    }

    /// Sends as the one caller for `key`, then tells the waiting duplicates.
    async fn lead<F, E>(
        &self,
        key: DedupKey,
        deadline: tokio::time::Instant,
        tx: watch::Sender<Option<Shared>>,
        send: F,
    ) -> Deduped<E>
    where
        F: Future<Output = Result<Final, E>>,
        E: Clone + Send + Sync + 'static,
    {
        // Dropped without finishing (the request was cancelled): clear the in-flight mark so a
        // duplicate can send; the closed channel wakes the waiters.
        let mut guard = InflightGuard { dedup: self, key, armed: true, claim: None };
        match &self.shared {
            None => {}
            Some(shared) => match shared.claim(&key, deadline).await {
                Claim::Owned(token) => guard.claim = Some(token),
                Claim::Unavailable => {}
                Claim::Known(outcome) => {
                    self.conclude::<E>(&mut guard, &tx, Ok(outcome));
                    return Deduped::Known(outcome);
                }
                // The waiters here see the closed channel and try for themselves.
                Claim::Busy => return Deduped::Busy,
            },
        }
        let result = send.await;
        if let (Some(shared), Some(token)) = (&self.shared, guard.claim.take()) {
            match &result {
                Ok(outcome) => shared.finish(&key, *outcome).await,
                Err(_) => shared.release(&key, token).await,
            }
        }
        self.conclude(&mut guard, &tx, result.clone());
        match result {
            Ok(outcome) => Deduped::Sent(outcome),
            Err(e) => Deduped::Failed(e),
        }
    }

    /// Ends this caller's lead on `guard.key`: a final outcome is remembered, the in-flight mark
    /// cleared, and the waiting duplicates told.
    fn conclude<E>(
        &self,
        guard: &mut InflightGuard<'_>,
        tx: &watch::Sender<Option<Shared>>,
        result: Result<Final, E>,
    ) where
        E: Send + Sync + 'static,
    {
        let mut state = self.lock();
        state.inflight.remove(&guard.key);
        guard.armed = false;
        if let Ok(outcome) = &result {
            let now = self.now_ms();
            self.remember(&mut state, &guard.key, *outcome, now);
        }
        drop(state);
        tx.send_replace(Some(result.map_err(|e| Arc::new(e) as Arc<dyn Any + Send + Sync>)));
    }
}

/// The first caller's outcome, or `None` when it was cancelled first.
async fn wait(mut rx: watch::Receiver<Option<Shared>>) -> Option<Shared> {
    loop {
        if let Some(outcome) = rx.borrow_and_update().clone() {
            return Some(outcome);
        }
        rx.changed().await.ok()?;
    }
}

struct InflightGuard<'a> {
    dedup: &'a Dedup,
    key: DedupKey,
    armed: bool,
    /// This send's claim in the shared store, until it is finished or released.
    claim: Option<redis::Token>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.dedup.lock().inflight.remove(&self.key);
        }
        // Cancelled mid-send: give the claim back now rather than making the other replicas
        // wait for it to expire.
        if let (Some(shared), Some(token)) = (&self.dedup.shared, self.claim.take())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (shared, key) = (shared.clone(), self.key);
            runtime.spawn(async move { shared.release(&key, token).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(60)
    }

    fn dedup() -> Dedup {
        Dedup::new(&DedupConfig { ttl: Duration::from_secs(60), max_entries: 100, redis: None })
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
        let r: Deduped<String> = d.run(k, far(), async { Err("down".to_owned()) }).await;
        assert_eq!(r, Deduped::Failed("down".into()));
        let r: Deduped<String> = d.run(k, far(), async { Ok(Final::Delivered) }).await;
        assert_eq!(r, Deduped::Sent(Final::Delivered));
        let r: Deduped<String> = d.run(k, far(), async { panic!("must not send twice") }).await;
        assert_eq!(r, Deduped::Known(Final::Delivered));
    }

    #[tokio::test]
    async fn concurrent_duplicates_share_one_send() {
        let d = dedup();
        let sends = AtomicUsize::new(0);
        let k = DedupKey::new("$e", "app", "key");
        let one = || async {
            d.run::<_, String>(k, far(), async {
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

    #[tokio::test]
    async fn outcomes_expire_after_the_ttl() {
        let d = Dedup::new(&DedupConfig {
            ttl: Duration::from_millis(30),
            max_entries: 100,
            redis: None,
        });
        let k = DedupKey::new("$e", "app", "key");
        let r: Deduped<String> = d.run(k, far(), async { Ok(Final::Delivered) }).await;
        assert_eq!(r, Deduped::Sent(Final::Delivered));
        let r: Deduped<String> = d.run(k, far(), async { Ok(Final::Rejected) }).await;
        assert_eq!(r, Deduped::Known(Final::Delivered), "still remembered");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let r: Deduped<String> = d.run(k, far(), async { Ok(Final::Rejected) }).await;
        assert_eq!(r, Deduped::Sent(Final::Rejected), "expired, so sent again");
    }

    #[tokio::test]
    async fn the_table_holds_at_most_max_entries() {
        let d =
            Dedup::new(&DedupConfig { ttl: Duration::from_secs(60), max_entries: 64, redis: None });
        let key = |i: usize| DedupKey::new(&format!("$e{i}"), "app", "key");
        for i in 0..1000 {
            let r: Deduped<String> = d.run(key(i), far(), async { Ok(Final::Delivered) }).await;
            assert_eq!(r, Deduped::Sent(Final::Delivered));
        }
        let remembered = d.lock().slots.iter().filter(|s| s[2] != 0).count();
        assert_eq!(remembered, 64, "every slot used, none beyond");
        assert!(d.lock().inflight.is_empty());
        // The newest key is always remembered: a full set replaces its oldest entry.
        let r: Deduped<String> = d.run(key(999), far(), async { Ok(Final::Rejected) }).await;
        assert_eq!(r, Deduped::Known(Final::Delivered));
    }

    #[tokio::test]
    async fn a_cancelled_sender_lets_a_waiting_duplicate_send() {
        let d = dedup();
        let k = DedupKey::new("$e", "app", "key");
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let d = d.clone();
            tokio::spawn(async move {
                let _: Deduped<String> = d
                    .run(k, far(), async {
                        let _ = started_tx.send(());
                        std::future::pending::<()>().await;
                        Ok(Final::Delivered)
                    })
                    .await;
            })
        };
        started_rx.await.unwrap();
        let second = {
            let d = d.clone();
            tokio::spawn(async move {
                d.run::<_, String>(k, far(), async { Ok(Final::Rejected) }).await
            })
        };
        tokio::task::yield_now().await;
        first.abort();
        let r = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap();
        assert_eq!(r, Deduped::Sent(Final::Rejected), "the duplicate sent once the first was gone");
    }

    #[tokio::test]
    async fn a_failure_reaches_concurrent_duplicates_and_is_not_remembered() {
        let d = dedup();
        let k = DedupKey::new("$e", "app", "key");
        let one = || async {
            d.run::<_, String>(k, far(), async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Err("down".to_owned())
            })
            .await
        };
        let (a, b) = tokio::join!(one(), one());
        assert_eq!(a, Deduped::Failed("down".into()));
        assert_eq!(b, Deduped::Failed("down".into()));
        let r: Deduped<String> = d.run(k, far(), async { Ok(Final::Delivered) }).await;
        assert_eq!(r, Deduped::Sent(Final::Delivered));
    }
}
