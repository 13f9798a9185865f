//! The dedup store shared by several replicas (`dedup.backend: redis`).
//!
//! One Redis key per `(event_id, app_id, pushkey)`: `herald:dedup:v1:<hex of the 128-bit key>`.
//! Before a send, a replica *claims* the key with an atomic script (read it; if absent, set it
//! to this send's random token with a short expiry), so of two replicas racing on the same
//! push exactly one sends. Afterwards the key holds the final outcome (`d` or `r`) for
//! `dedup.ttl`; a failed send deletes its claim (only if still its own), so the homeserver's
//! retry sends again. A replica that finds another's claim polls until the outcome is known,
//! the claim is released or expires (then it claims itself), or its request deadline passes.
//!
//! Redis must never stop a push. Every operation is bounded by `redis_timeout`; an error or a
//! timeout marks the store down (logged once, `herald_dedup_store_up 0`), and while it is down
//! sends go ahead with local deduplication only (`herald_dedup_store_fallbacks_total`). A
//! background task pings Redis every second while it is down and marks it up again when it
//! answers; the connection manager reconnects by itself.
//!
//! Never logs the URL (it may carry a password), the password, or pushkeys.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use metrics::{Counter, Gauge};
use redis::aio::ConnectionManager;
use redis::{Client, IntoConnectionInfo, Script, TlsCertificates};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::{DedupKey, Final};
use crate::config::RedisConfig;
use crate::metrics::Metrics;

/// Keys are versioned so that a change of their meaning never reads old values.
const KEY_PREFIX: &str = "herald:dedup:v1:";
/// How often the store is pinged while it is down.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Polling for another replica's outcome: first and longest wait.
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(200);

/// Reads the key; when it is absent, sets it to this send's token (ARGV[1]) for ARGV[2] ms.
/// Returns the value found, or "" when the claim is this caller's.
const CLAIM: &str = r"
local found = redis.call('GET', KEYS[1])
if found then return found end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''
";

/// Deletes the key only while it still holds this caller's token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Whether the store has answered since it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not asked yet (the first ping is on its way).
    Unknown,
    Up,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "connecting",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// What a claim found.
pub enum Claim {
    /// This caller sends; `Token` proves the claim when it is finished or released.
    Owned(Token),
    /// A final outcome is stored: nothing to send.
    Known(Final),
    /// Another replica was still sending when this caller's deadline came.
    Busy,
    /// The store is down or did not answer in time: send with local dedup only.
    Unavailable,
}

/// This send's claim on a key.
pub struct Token(String);

/// The shared store. Cheap to clone; the probe task stops when the last clone is dropped.
#[derive(Clone)]
pub struct SharedStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    claim: Script,
    release: Script,
    timeout: Duration,
    ttl_ms: u64,
    claim_ms: u64,
    health: watch::Sender<Health>,
    /// Wakes the probe task when an operation fails.
    went_down: Arc<Notify>,
    up_gauge: Gauge,
    fallbacks: Counter,
    probe: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.probe.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

impl SharedStore {
    /// Creates the store without connecting; the probe task connects right away. Must run inside
    /// a tokio runtime. `claim_ttl` bounds how long a crashed replica's claim blocks others.
    pub fn new(
        config: &RedisConfig,
        ttl: Duration,
        claim_ttl: Duration,
        metrics: &Metrics,
    ) -> Result<SharedStore, String> {
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("dedup.redis_url: not a usable Redis URL ({:?})", e.kind()))?;
        if let Some(password) = &config.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match &config.ca_pem {
            None => Client::open(info),
            Some(pem) => Client::build_with_tls(
                info,
                TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
            ),
        }
        .map_err(|e| format!("dedup.redis_url: cannot use it ({:?})", e.kind()))?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| format!("dedup: cannot set up the Redis connection ({:?})", e.kind()))?;
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        let inner = Arc::new(Inner {
            conn,
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            timeout: config.timeout,
            ttl_ms: millis(ttl),
            claim_ms: millis(claim_ttl),
            health: watch::Sender::new(Health::Unknown),
            went_down: Arc::new(Notify::new()),
            up_gauge: metrics.dedup_store_up(),
            fallbacks: metrics.dedup_store_fallbacks(),
            probe: std::sync::Mutex::new(None),
        });
        inner.up_gauge.set(0.0);
        let task = tokio::spawn(probe(Arc::downgrade(&inner), inner.went_down.clone()));
        *inner.probe.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(SharedStore { inner })
    }

    pub fn health(&self) -> Health {
        *self.inner.health.borrow()
    }

    /// Waits until the first ping has been answered (or has failed): at most twice
    /// `redis_timeout` (connecting, then the answer).
    pub async fn settled(&self) {
        let mut rx = self.inner.health.subscribe();
        let limit = self.inner.timeout * 2;
        let _ = tokio::time::timeout(limit, rx.wait_for(|h| *h != Health::Unknown)).await;
    }

    /// Claims `key` for one send, waiting (until `deadline`) while another replica holds it.
    pub async fn claim(&self, key: &DedupKey, deadline: Instant) -> Claim {
        let token = Token(new_token());
        let redis_key = redis_key(key);
        let mut pause = POLL_FIRST;
        loop {
            if self.health() != Health::Up {
                self.inner.fallbacks.increment(1);
                return Claim::Unavailable;
            }
            let claim_ms = self.inner.claim_ms;
            let found: Option<String> = self
                .call(|mut conn| {
                    let mut invocation = self.inner.claim.key(&redis_key);
                    invocation.arg(&token.0).arg(claim_ms);
                    async move { invocation.invoke_async(&mut conn).await }
                })
                .await;
            let found = match found {
                Some(found) => found,
                None => {
                    self.inner.fallbacks.increment(1);
                    return Claim::Unavailable;
                }
            };
            match found.as_str() {
                "" => return Claim::Owned(token),
                "d" => return Claim::Known(Final::Delivered),
                "r" => return Claim::Known(Final::Rejected),
                // Another replica's claim: wait for its outcome.
                _ => {}
            }
            let now = Instant::now();
            if now + pause >= deadline {
                return Claim::Busy;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// Stores the final outcome of a claimed send, for `dedup.ttl`.
    pub async fn finish(&self, key: &DedupKey, outcome: Final) {
        let value = if outcome == Final::Rejected { "r" } else { "d" };
        let mut cmd = redis::cmd("SET");
        cmd.arg(redis_key(key)).arg(value).arg("PX").arg(self.inner.ttl_ms);
        let _: Option<()> = self
            .call(|mut conn| {
                let cmd = &cmd;
                async move { cmd.query_async(&mut conn).await }
            })
            .await;
    }

    /// Gives a claim back after a failed send, so the next attempt (here or elsewhere) sends.
    pub async fn release(&self, key: &DedupKey, token: Token) {
        let redis_key = redis_key(key);
        let _: Option<i64> = self
            .call(|mut conn| {
                let mut invocation = self.inner.release.key(&redis_key);
                invocation.arg(&token.0);
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await;
    }

    /// Runs one Redis operation within `redis_timeout`; a failure marks the store down. A
    /// connection found dead (Redis restarted since the last call, say) is retried once on the
    /// connection the manager opens in its place, within the same time budget.
    async fn call<T, F, Fut>(&self, op: F) -> Option<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let mut retried = false;
        loop {
            match tokio::time::timeout_at(deadline, op(self.inner.conn.clone())).await {
                Ok(Ok(value)) => return Some(value),
                Ok(Err(e)) if !retried && (e.is_connection_dropped() || e.is_io_error()) => {
                    retried = true;
                }
                Ok(Err(e)) => {
                    self.inner.mark_down(&e.to_string());
                    return None;
                }
                Err(_) => {
                    self.inner.mark_down("no answer within dedup.redis_timeout");
                    return None;
                }
            }
        }
    }
}

impl Inner {
    fn mark_down(&self, why: &str) {
        let previous = self.health.send_replace(Health::Down);
        self.up_gauge.set(0.0);
        if previous != Health::Down {
            warn!(
                reason = why,
                "dedup store (Redis) unavailable: deduplicating locally until it is back"
            );
            self.went_down.notify_one();
        }
    }

    fn mark_up(&self) {
        let previous = self.health.send_replace(Health::Up);
        self.up_gauge.set(1.0);
        match previous {
            Health::Up => {}
            Health::Down => {
                info!("dedup store (Redis) reachable again: deduplicating across replicas")
            }
            Health::Unknown => info!("dedup store (Redis) reachable"),
        }
    }
}

/// Pings right away, then every second while the store is down; sleeps while it is up. Holds
/// the store only while pinging, so dropping the store ends it (`Inner::drop` aborts it too).
async fn probe(inner: std::sync::Weak<Inner>, went_down: Arc<Notify>) {
    loop {
        let Some(store) = inner.upgrade() else { return };
        let mut conn = store.conn.clone();
        let ping = redis::cmd("PING");
        let answer = tokio::time::timeout(store.timeout, ping.query_async::<String>(&mut conn));
        match answer.await {
            Ok(Ok(_)) => {
                store.mark_up();
                drop(store);
                went_down.notified().await;
            }
            Ok(Err(e)) => {
                store.mark_down(&e.to_string());
                drop(store);
                tokio::time::sleep(PROBE_EVERY).await;
            }
            Err(_) => {
                store.mark_down("no answer within dedup.redis_timeout");
                drop(store);
                tokio::time::sleep(PROBE_EVERY).await;
            }
        }
    }
}

fn redis_key(key: &DedupKey) -> String {
    let mut text = String::with_capacity(KEY_PREFIX.len() + 32);
    text.push_str(KEY_PREFIX);
    for byte in key.0 {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// A random claim token ("p" + 16 hex digits); never "", "d" or "r".
fn new_token() -> String {
    format!("p{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_hex_of_the_dedup_key() {
        let key = DedupKey::new("$e", "app", "key");
        let text = redis_key(&key);
        assert!(text.starts_with(KEY_PREFIX));
        assert_eq!(text.len(), KEY_PREFIX.len() + 32);
        assert!(text[KEY_PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(text, redis_key(&DedupKey::new("$f", "app", "key")));
    }

    #[test]
    fn tokens_never_look_like_outcomes() {
        for _ in 0..100 {
            let t = new_token();
            assert!(t.starts_with('p') && t.len() == 17);
        }
    }
}
