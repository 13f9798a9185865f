//! Starts and stops what `herald demo` runs, all on 127.0.0.1:0: the fake APNs and FCM, the real
//! gateway (an [`App`] built from YAML text, as `herald serve` builds it) and the real embedded
//! homeserver, plus the gateway's counters read back from its `/metrics`.
//!
//! Key files and the homeserver's SQLite file go in a fresh directory under the system temp
//! directory (mode 0700 on Unix), removed when the [`Stack`] is dropped. Nothing here prints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::fakes::{FakeApns, FakeFcm};
use super::{ANDROID_APP, IOS_APP, WAIT};
use crate::homeserver::{Homeserver, HomeserverConfig};
use crate::{App, Config};

const SERVER_NAME: &str = "demo.local";
const FCM_PROJECT: &str = "herald-demo";
const APNS_KEY_ID: &str = "DEMOKEY001";
const APNS_TEAM_ID: &str = "DEMOTEAM01";

/// The service account's RSA private key: a public test key (the same as
/// `tests/fixtures/fcm-test-key.pem`), published with herald and trusted by nothing but the
/// demo's fake token endpoint. Not a secret.
const FCM_TEST_KEY_PEM: &str = include_str!("demo-fcm-key.pem");

/// Everything running; [`Stack::stop`] shuts it down.
pub struct Stack {
    pub apns: FakeApns,
    pub fcm: FakeFcm,
    pub gateway_addr: SocketAddr,
    pub homeserver_addr: SocketAddr,
    gateway: Running,
    homeserver: Running,
    _hs: Homeserver,
    /// Declared last so the files outlive everything using them.
    _dir: TempDir,
}

/// A spawned server and the switch that stops it.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        // Nothing is in flight any more, so draining is quick; don't hang the demo if not.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

impl Stack {
    /// Starts the fakes, then the gateway aimed at them, then the homeserver. APNs answers
    /// 410 `Unregistered` for `dead_apns_token` (hex).
    pub async fn start(dead_apns_token: String) -> anyhow::Result<Stack> {
        let dir = TempDir::create().context("cannot create a temporary directory")?;
        let apns = FakeApns::start(dead_apns_token).await.context("cannot start the fake APNs")?;
        let fcm = FakeFcm::start().await.context("cannot start the fake FCM")?;

        let key_file = dir.write(&format!("AuthKey_{APNS_KEY_ID}.p8"), &apns_key_pem()?)?;
        let service_account =
            dir.write("firebase-service-account.json", &service_account_json(&fcm.token_uri())?)?;
        let yaml = gateway_yaml(&key_file, &apns.url(), &service_account, &fcm.url())?;
        let config = Config::from_yaml(&yaml, "demo gateway.yaml", dir.path())
            .context("the demo's gateway config is invalid")?;
        let app = App::build(config).await.context("cannot build the gateway")?;
        let gateway_addr = app.addrs()[0];
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = app
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        let gateway = Running { stop, task };

        let mut config = HomeserverConfig::new(SERVER_NAME, dir.path().join("homeserver.db"));
        config.allow_insecure_pushers = true;
        config.pusher_timeout = WAIT;
        let hs = Homeserver::open(config)?;
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let homeserver_addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = hs.clone();
        let task = tokio::spawn(async move {
            let _ = serving
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        let homeserver = Running { stop, task };

        Ok(Stack {
            apns,
            fcm,
            gateway_addr,
            homeserver_addr,
            gateway,
            homeserver,
            _hs: hs,
            _dir: dir,
        })
    }

    /// Stops the homeserver, then the gateway; the fakes and files go when `self` drops.
    pub async fn stop(self) {
        self.homeserver.stop().await;
        self.gateway.stop().await;
    }
}

/// The gateway's config: the APNs app over h2c to one fake, the FCM app to the other. Short
/// deadlines, since nothing here is slow.
fn gateway_yaml(
    key_file: &Path,
    apns_url: &str,
    service_account: &Path,
    fcm_url: &str,
) -> anyhow::Result<String> {
    // JSON strings are valid YAML double-quoted scalars.
    let quote = |s: &str| serde_json::to_string(s);
    Ok(format!(
        "listen: \"127.0.0.1:0\"\n\
         request_deadline: \"5s\"\n\
         upstream_timeout: \"2s\"\n\
         retry: {{ attempts: 2, initial_backoff: \"50ms\", max_backoff: \"200ms\" }}\n\
         shutdown_grace: \"1s\"\n\
         apps:\n  \
           {IOS_APP}:\n    \
             type: apns\n    \
             key_file: {}\n    \
             key_id: {APNS_KEY_ID}\n    \
             team_id: {APNS_TEAM_ID}\n    \
             topic: {IOS_APP}\n    \
             platform: sandbox\n    \
             endpoint: {}\n  \
           {ANDROID_APP}:\n    \
             type: fcm\n    \
             service_account_file: {}\n    \
             endpoint: {}\n",
        quote(&key_file.display().to_string())?,
        quote(apns_url)?,
        quote(&service_account.display().to_string())?,
        quote(fcm_url)?,
    ))
}

/// A Google service-account key file whose `token_uri` is the fake's token endpoint.
fn service_account_json(token_uri: &str) -> anyhow::Result<String> {
    let account = json!({
        "type": "service_account",
        "project_id": FCM_PROJECT,
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": FCM_TEST_KEY_PEM,
        "client_email": format!("herald-demo@{FCM_PROJECT}.iam.gserviceaccount.com"),
        "client_id": "100000000000000000001",
        "token_uri": token_uri,
    });
    Ok(serde_json::to_string_pretty(&account)?)
}

/// A fresh P-256 key as the PKCS#8 PEM of an APNs `.p8` file.
fn apns_key_pem() -> anyhow::Result<String> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("cannot generate a P-256 key"))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line)?);
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(pem)
}

/// A directory only this user can read, removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> std::io::Result<TempDir> {
        let name = format!("herald-demo-{}", hex::encode(rand::random::<[u8; 8]>()));
        let path = std::env::temp_dir().join(name);
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&path)?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The gateway's own counters, from its `/metrics`: notify requests and devices received,
/// requests answered (all, and with 200), and pushkeys rejected.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub notifications: u64,
    pub devices: u64,
    pub answered: u64,
    pub answered_ok: u64,
    pub rejected: u64,
}

/// Reads [`Counters`] from the gateway's `/metrics`.
pub struct GatewayMetrics {
    url: http::Uri,
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl GatewayMetrics {
    pub fn new(stack: &Stack) -> anyhow::Result<GatewayMetrics> {
        Ok(GatewayMetrics {
            url: format!("http://{}/metrics", stack.gateway_addr).parse()?,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn read(&self) -> anyhow::Result<Counters> {
        use crate::metrics::{
            DEVICE_OUTCOMES, DEVICES_RECEIVED, NOTIFICATIONS_RECEIVED, NOTIFY_DURATION,
        };
        let fetch = async {
            let response = self.http.get(self.url.clone()).await?;
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
        };
        let text = tokio::time::timeout(WAIT, fetch)
            .await
            .context("GET /metrics: no answer from the gateway in time")??;
        // The sum of every series of `name` whose labels contain `label`.
        let sum = |name: &str, label: &str| -> u64 {
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{']))
                        && l.contains(label)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        let answered = format!("{NOTIFY_DURATION}_count");
        Ok(Counters {
            notifications: sum(NOTIFICATIONS_RECEIVED, ""),
            devices: sum(DEVICES_RECEIVED, ""),
            answered: sum(&answered, ""),
            answered_ok: sum(&answered, "status=\"200\""),
            rejected: sum(DEVICE_OUTCOMES, "outcome=\"rejected\""),
        })
    }

    /// The counters once every notify request received so far has been answered (or after
    /// [`WAIT`], as they are then).
    pub async fn settled(&self) -> anyhow::Result<Counters> {
        let deadline = Instant::now() + WAIT;
        loop {
            let counters = self.read().await?;
            if counters.answered >= counters.notifications || Instant::now() > deadline {
                return Ok(counters);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
