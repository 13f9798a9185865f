//! The embedded homeserver side of the push flow, for tests and demos: a room event goes
//! through the user's push rules, then to their pushers, then to a push gateway.
//!
//! ```text
//! api/ (client-server routes) → rooms (store the event, evaluate push rules per member)
//!   → store (push_actions: unread counts, /notifications) → queue (one task per pusher)
//!     → pusher (POST /_matrix/push/v1/notify to the pusher's gateway)
//! ```
//!
//! [`Homeserver`] owns the SQLite connection, the compiled push rules of each user, the change
//! signal long-polling `/sync` waits on, and the pusher tasks. It is a single server (no
//! federation). Never on the gateway's hot path: nothing under `server/`, `dispatch` or
//! `providers/` uses it.

pub mod api;
pub mod pusher;
pub mod pushrules;
pub mod queue;
pub mod rooms;
pub mod store;
pub mod sync;
pub mod to_device;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rusqlite::Connection;
use tokio::sync::watch;

use self::api::error::{ApiResult, MatrixError};
use self::pushrules::{CompiledRuleset, Ruleset};

/// How the homeserver is run (`herald homeserver` flags).
#[derive(Clone, Debug)]
pub struct HomeserverConfig {
    /// The server part of every user and room id.
    pub server_name: String,
    /// The SQLite file (`:memory:` for a throwaway server).
    pub db: PathBuf,
    /// Accept `http://` pusher URLs on loopback hosts (tests and the demo).
    pub allow_insecure_pushers: bool,
    /// One POST to a pusher's gateway.
    pub pusher_timeout: Duration,
    /// Unacknowledged to-device messages one device may hold; a `sendToDevice` that would
    /// pass it is refused whole (429), so a device that never syncs cannot fill the disk.
    pub max_to_device_inbox: u64,
}

impl HomeserverConfig {
    pub fn new(server_name: impl Into<String>, db: impl Into<PathBuf>) -> Self {
        HomeserverConfig {
            server_name: server_name.into(),
            db: db.into(),
            allow_insecure_pushers: false,
            pusher_timeout: Duration::from_secs(10),
            max_to_device_inbox: 10_000,
        }
    }
}

/// The running homeserver's shared state; cheap to clone.
#[derive(Clone)]
pub struct Homeserver {
    inner: Arc<Inner>,
}

struct Inner {
    config: HomeserverConfig,
    conn: Mutex<Connection>,
    /// Compiled push rules per user, dropped when the user's rules change.
    rules: Mutex<HashMap<String, Arc<CompiledRuleset>>>,
    /// Bumped after every committed write that `/sync` or a pusher may care about.
    changes: watch::Sender<u64>,
    queues: queue::Queues,
}

impl Homeserver {
    /// Opens the database and starts a task for every stored pusher. Needs a tokio runtime.
    pub fn open(config: HomeserverConfig) -> anyhow::Result<Homeserver> {
        let conn = store::open(&config.db)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", config.db.display()))?;
        let queues = queue::Queues::new(config.pusher_timeout)?;
        let hs = Homeserver {
            inner: Arc::new(Inner {
                config,
                conn: Mutex::new(conn),
                rules: Mutex::default(),
                changes: watch::Sender::new(0),
                queues,
            }),
        };
        queue::start_all(&hs)?;
        Ok(hs)
    }

    pub fn config(&self) -> &HomeserverConfig {
        &self.inner.config
    }

    pub fn server_name(&self) -> &str {
        &self.inner.config.server_name
    }

    /// Runs `f` on the database connection on a blocking thread, then wakes `/sync` waiters.
    pub async fn db<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce(&Homeserver, &mut Connection) -> ApiResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let hs = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = hs.lock();
            f(&hs, &mut conn)
        })
        .await
        .map_err(|_| {
            MatrixError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "M_UNKNOWN",
                "internal error",
            )
        })?
    }

    /// The connection, for code already on a blocking thread.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is still usable.
        self.inner.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells `/sync` long-polls and pusher tasks that something was written.
    pub fn notify_change(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The user's compiled push rules (server defaults merged with theirs), cached.
    pub fn compiled_rules(
        &self,
        conn: &Connection,
        user_id: &str,
    ) -> ApiResult<Arc<CompiledRuleset>> {
        if let Some(rules) = self.inner.rules.lock().unwrap_or_else(|p| p.into_inner()).get(user_id)
        {
            return Ok(rules.clone());
        }
        let merged = self.merged_rules(conn, user_id)?;
        let compiled = Arc::new(CompiledRuleset::compile(&merged, user_id));
        self.inner
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user_id.to_owned(), compiled.clone());
        Ok(compiled)
    }

    /// The user's own stored rules (their rules plus changes to server defaults).
    pub fn user_rules(&self, conn: &Connection, user_id: &str) -> ApiResult<Ruleset> {
        Ok(store::account_data(conn, user_id, PUSH_RULES)?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default())
    }

    /// The rule set that applies to the user, as the push-rules API and `/sync` show it.
    pub fn merged_rules(&self, conn: &Connection, user_id: &str) -> ApiResult<Ruleset> {
        Ok(Ruleset::for_user(user_id, &self.user_rules(conn, user_id)?).0)
    }

    /// Stores the user's rules (bumping their `m.push_rules` account data) and drops the cache.
    pub fn save_user_rules(
        &self,
        conn: &mut Connection,
        user_id: &str,
        rules: &Ruleset,
    ) -> ApiResult<()> {
        let tx = conn.transaction()?;
        let value =
            serde_json::to_value(rules).map_err(|e| MatrixError::bad_json(e.to_string()))?;
        store::set_account_data(&tx, user_id, PUSH_RULES, &value)?;
        tx.commit()?;
        self.inner.rules.lock().unwrap_or_else(|p| p.into_inner()).remove(user_id);
        self.notify_change();
        Ok(())
    }

    /// The client-server API router.
    pub fn router(&self) -> axum::Router {
        api::router(self.clone())
    }

    /// Serves the client-server API on `listener` until `shutdown` resolves.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let served = axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await;
        self.stop_pushers();
        served
    }

    /// Stops every pusher task (they hold this homeserver alive); the database stays open
    /// for requests still running. Queued notifications stay queued for the next start.
    pub fn stop_pushers(&self) {
        self.inner.queues.stop_all();
    }

    pub(crate) fn queues(&self) -> &queue::Queues {
        &self.inner.queues
    }

    /// `@localpart:server_name`.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name())
    }

    /// Whether a user id belongs to this server.
    pub fn is_local(&self, user_id: &str) -> bool {
        user_id.starts_with('@')
            && user_id.split_once(':').is_some_and(|(_, server)| server == self.server_name())
    }
}

/// The account-data type that holds push rules.
pub const PUSH_RULES: &str = "m.push_rules";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A random, URL-safe identifier of `bytes` random bytes.
pub fn random_id(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}
