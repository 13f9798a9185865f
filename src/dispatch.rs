//! Fan-out: every device of a notification goes to its app's provider concurrently, each with
//! bounded retries inside the request's deadline, and the outcomes fold into one answer.
//!
//! Rules (DESIGN §3): an app id matches exactly, else the single matching glob; no match or
//! several → the pushkey is rejected. Only a provider's definite "invalid token" (or a pushkey
//! malformed for its provider) becomes `Rejected`; anything else undelivered is `Failed`, so the
//! caller answers 5xx and the homeserver retries, where dedup absorbs the devices already done.
//! Never holds a lock across a send; never logs a full pushkey.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rand::Rng as _;
use tokio::time::Instant;
use tracing::{debug, warn};
use wildmatch::WildMatch;

use crate::config::{Config, RetryPolicy};
use crate::dedup::{Dedup, DedupKey, Deduped, Final};
use crate::metrics::Metrics;
use crate::notification::{Device, Notification};
use crate::providers::{AppLabels, BuildError, Outcome, Prepared, Provider, Skip, pushkey_hash};

/// A device's final result for this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceResult {
    Delivered,
    /// The pushkey is invalid; the reason is the provider's answer (or why herald refused it).
    Rejected(String),
    /// Not delivered this time; the reason is the last error.
    Failed(String),
}

impl DeviceResult {
    fn label(&self) -> &'static str {
        match self {
            DeviceResult::Delivered => "delivered",
            DeviceResult::Rejected(_) => "rejected",
            DeviceResult::Failed(_) => "failed",
        }
    }
}

/// Every device's result, in request order.
#[derive(Debug, Default)]
pub struct Summary {
    pub results: Vec<(String, DeviceResult)>,
}

impl Summary {
    /// Pushkeys to report as rejected (each once).
    pub fn rejected(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.results
            .iter()
            .filter(|(pushkey, r)| {
                matches!(r, DeviceResult::Rejected(_)) && seen.insert(pushkey.as_str())
            })
            .map(|(pushkey, _)| pushkey.clone())
            .collect()
    }

    pub fn failed(&self) -> usize {
        self.results.iter().filter(|(_, r)| matches!(r, DeviceResult::Failed(_))).count()
    }
}

struct App {
    provider: Provider,
    labels: AppLabels,
}

/// Routes devices to providers; built once from config.
pub struct Dispatcher {
    exact: HashMap<String, Arc<App>>,
    globs: Vec<(WildMatch, Arc<App>)>,
    dedup: Dedup,
    retry: RetryPolicy,
    upstream_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Labels for devices whose app id matches no app (or several globs).
    unmatched: AppLabels,
}

impl Dispatcher {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Dispatcher, BuildError> {
        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        for app in &config.apps {
            let provider = Provider::build(app, config.proxy.as_ref(), &metrics)?;
            let labels = metrics.app_labels(&app.pattern, provider.name());
            let entry = Arc::new(App { provider, labels });
            if app.pattern.contains(['*', '?']) {
                globs.push((WildMatch::new(&app.pattern), entry));
            } else {
                exact.insert(app.pattern.clone(), entry);
            }
        }
        let unmatched = metrics.app_labels("(unmatched)", "none");
        Ok(Dispatcher {
            exact,
            globs,
            dedup: Dedup::with_backend(&config.dedup, config.request_deadline, &metrics)
                .map_err(|message| BuildError { key: "dedup".into(), message })?,
            retry: config.retry,
            upstream_timeout: config.upstream_timeout,
            metrics,
            unmatched,
        })
    }

    /// The dedup table (and shared store, with `backend: redis`).
    pub fn dedup(&self) -> &Dedup {
        &self.dedup
    }

    fn lookup(&self, app_id: &str) -> Result<&Arc<App>, &'static str> {
        if let Some(app) = self.exact.get(app_id) {
            return Ok(app);
        }
        let mut matches = self.globs.iter().filter(|(glob, _)| glob.matches(app_id));
        match (matches.next(), matches.next()) {
            (Some((_, app)), None) => Ok(app),
            (None, _) => Err("no app configured for this app_id"),
            (Some(_), Some(_)) => Err("several app globs match this app_id"),
        }
    }

    /// Pushes to every device concurrently; returns when all are final or `deadline` passed.
    pub async fn dispatch(&self, n: &Notification, deadline: Instant) -> Summary {
        let results = join_all(n.devices.iter().map(|d| self.device(n, d, deadline))).await;
        Summary { results: n.devices.iter().map(|d| d.pushkey.clone()).zip(results).collect() }
    }

    async fn device(&self, n: &Notification, d: &Device, deadline: Instant) -> DeviceResult {
        let app = match self.lookup(&d.app_id) {
            Ok(app) => app,
            Err(why) => {
                warn!(app_id = %d.app_id, pushkey = %pushkey_hash(&d.pushkey), "rejecting pushkey: {why}");
                self.metrics.device_outcome(&self.unmatched, "rejected");
                return DeviceResult::Rejected(why.to_owned());
            }
        };
        let result = match app.provider.prepare(n, d) {
            Err(Skip::NothingToSend) => DeviceResult::Delivered,
            Err(Skip::BadPushkey(why)) => DeviceResult::Rejected(why),
            Ok(prepared) => match &n.event_id {
                None => self.send(app, &prepared, deadline).await,
                Some(event_id) => {
                    let key = DedupKey::new(event_id, &d.app_id, &d.pushkey);
                    // The cache remembers only `Final`; the provider's reason for a rejection
                    // reaches this caller through `rejected_why`.
                    let mut rejected_why = None;
                    let send = async {
                        match self.send(app, &prepared, deadline).await {
                            DeviceResult::Delivered => Ok(Final::Delivered),
                            DeviceResult::Rejected(why) => {
                                rejected_why = Some(why);
                                Ok(Final::Rejected)
                            }
                            DeviceResult::Failed(why) => Err(why),
                        }
                    };
                    match self.dedup.run(key, deadline, send).await {
                        Deduped::Sent(Final::Delivered) => DeviceResult::Delivered,
                        Deduped::Sent(Final::Rejected) => {
                            DeviceResult::Rejected(rejected_why.unwrap_or_default())
                        }
                        Deduped::Known(f) => {
                            self.metrics.dedup_hit();
                            debug!(app = %app.labels.app, pushkey = %pushkey_hash(&d.pushkey), "duplicate answered from dedup");
                            match f {
                                Final::Delivered => DeviceResult::Delivered,
                                Final::Rejected => {
                                    DeviceResult::Rejected("rejected earlier (dedup)".into())
                                }
                            }
                        }
                        Deduped::Failed(why) => DeviceResult::Failed(why),
                        Deduped::Busy => DeviceResult::Failed(
                            "another replica was still sending this push at the deadline".into(),
                        ),
                    }
                }
            },
        };
        match &result {
            DeviceResult::Failed(why) => {
                warn!(app = %app.labels.app, pushkey = %pushkey_hash(&d.pushkey), reason = %why, "push not delivered")
            }
            DeviceResult::Rejected(why) => {
                warn!(app = %app.labels.app, pushkey = %pushkey_hash(&d.pushkey), reason = %why, "pushkey rejected")
            }
            DeviceResult::Delivered => {}
        }
        self.metrics.device_outcome(&app.labels, result.label());
        result
    }

    /// Attempts one device until a final outcome, the attempt budget, or the deadline.
    ///
    /// An attempt starts only with at least [`Dispatcher::min_attempt`] left: one cut short
    /// locally may still have reached the phone, and then the homeserver's retry (after our
    /// 502) would alert it twice.
    async fn send(&self, app: &App, prepared: &Prepared, deadline: Instant) -> DeviceResult {
        let min_attempt = self.min_attempt();
        let mut last = String::from("not enough time left before the request deadline to try");
        for attempt in 1..=self.retry.attempts {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < min_attempt {
                break;
            }
            let budget = remaining.min(self.upstream_timeout);
            let outcome = match tokio::time::timeout(budget, app.provider.send(prepared)).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    self.metrics.upstream(&app.labels, "timeout", budget);
                    Outcome::Retry { after: None, reason: "upstream timed out".into() }
                }
            };
            let after = match outcome {
                Outcome::Delivered => return DeviceResult::Delivered,
                Outcome::Rejected(why) => return DeviceResult::Rejected(why),
                Outcome::Failed(why) => return DeviceResult::Failed(why),
                Outcome::Retry { after, reason } => {
                    last = reason;
                    after
                }
            };
            if attempt == self.retry.attempts {
                break;
            }
            let wait = after.unwrap_or_else(|| backoff(&self.retry, attempt));
            if wait.saturating_add(min_attempt) > deadline.saturating_duration_since(Instant::now())
            {
                last = format!("{last} (next retry would pass the request deadline)");
                break;
            }
            debug!(app = %app.labels.app, attempt, ?wait, reason = %last, "retrying");
            self.metrics.retry(&app.labels);
            tokio::time::sleep(wait).await;
        }
        DeviceResult::Failed(last)
    }

    /// The least time worth starting an attempt with: a second, or the whole upstream timeout
    /// when that is shorter.
    fn min_attempt(&self) -> Duration {
        self.upstream_timeout.min(Duration::from_secs(1))
    }
}

/// Exponential backoff with jitter: a random wait in [d/2, d], d = initial · 2^(attempt-1),
/// capped at `max_backoff`.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = policy.initial_backoff.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(policy.max_backoff);
    let half = capped / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
        };
        for _ in 0..50 {
            let first = backoff(&p, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let later = backoff(&p, 10);
            assert!(later >= Duration::from_millis(150) && later <= Duration::from_millis(300));
        }
    }
}
