//! `gateway.yaml`: the serde schema that mirrors the file, and the validated [`Config`] the rest
//! of herald runs on.
//!
//! Parsing happens in two steps, as `../shared/DESIGN.md` §2 asks: the YAML is read into `Raw*`
//! structs (`deny_unknown_fields`, so a typo is an error that names its YAML path), then
//! [`Config::from_yaml`] checks every value and loads every referenced file (keys, service
//! accounts, CA bundles) into a `Config` of durations, socket addresses and parsed keys. Nothing is
//! bound or connected here; `herald check-config` runs exactly this code.
//!
//! This module never logs, and its `Debug` output never contains key material.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// A configuration problem, phrased as `PATH: problem` where PATH is the YAML path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid { file: String, key: String, message: String },
}

/// Where an `http(s)` upstream lives and which extra roots it trusts.
#[derive(Clone)]
pub struct Upstream {
    /// Base URL, without a trailing slash (`https://api.push.apple.com`).
    pub base_url: String,
    /// Extra trusted roots (from `ca_file`), added to the embedded webpki roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base_url", &self.base_url)
            .field("extra_roots", &self.extra_roots.len())
            .finish()
    }
}

/// Checked settings for the whole daemon.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    /// `None` when the admin routes share the notify listener(s).
    pub admin_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    pub request_deadline: Duration,
    pub upstream_timeout: Duration,
    pub retry: RetryPolicy,
    pub max_inflight_requests: usize,
    pub shutdown_grace: Duration,
    pub log: LogConfig,
    pub dedup: DedupConfig,
    pub proxy: Option<ProxyConfig>,
    /// Apps in file order; lookup rules live in `dispatch`.
    pub apps: Vec<AppConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per device, the first included (>= 1).
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DedupConfig {
    pub ttl: Duration,
    pub max_entries: u64,
    /// `backend: redis`: the store shared by every replica. `None`: this process only.
    pub redis: Option<RedisConfig>,
}

/// Where the shared dedup store is and how long herald waits for it.
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS) as written; it may carry a password, so it is never
    /// logged or printed.
    pub url: String,
    /// From `redis_password_file`; replaces any password in the URL.
    pub password: Option<String>,
    /// PEM roots from `redis_ca_file`, trusted for `rediss://` instead of the webpki roots.
    pub ca_pem: Option<Vec<u8>>,
    /// One Redis operation; a slower answer counts as Redis being down.
    pub timeout: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"<redacted>")
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// An HTTP CONNECT proxy for every upstream connection.
#[derive(Clone)]
pub struct ProxyConfig {
    pub uri: http::Uri,
    /// Value of `Proxy-Authorization`, when the URL carried `user:pass@`.
    pub authorization: Option<http::HeaderValue>,
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("uri", &self.uri)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One entry of `apps:`.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The exact app id, or a glob with `*` and `?`.
    pub pattern: String,
    pub kind: AppKind,
}

impl AppConfig {
    /// A `webpush` app's VAPID public key (base64url): what its web clients subscribe with.
    pub fn vapid_public_key(&self) -> Option<String> {
        match &self.kind {
            AppKind::WebPush(web) => Some(web.vapid.public_b64()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum AppKind {
    Apns(ApnsConfig),
    Fcm(FcmConfig),
    WebPush(WebPushConfig),
    UnifiedPush(UnifiedPushConfig),
    Log,
}

#[derive(Debug, Clone)]
pub struct ApnsConfig {
    pub auth: ApnsAuth,
    pub topic: String,
    pub push_type: Option<String>,
    pub convert_device_token_to_hex: bool,
    pub send_badge_counts: bool,
    pub upstream: Upstream,
    pub max_concurrency: usize,
}

#[derive(Clone)]
pub enum ApnsAuth {
    /// ES256 provider tokens signed with the `.p8` key.
    Token { key_pkcs8: Vec<u8>, key_id: String, team_id: String },
    /// TLS client certificate.
    Certificate { chain: Vec<CertificateDer<'static>>, key: Arc<PrivateKeyDer<'static>> },
}

impl fmt::Debug for ApnsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApnsAuth::Token { key_id, team_id, .. } => f
                .debug_struct("Token")
                .field("key_id", key_id)
                .field("team_id", team_id)
                .field("key", &"<redacted>")
                .finish(),
            ApnsAuth::Certificate { chain, .. } => f
                .debug_struct("Certificate")
                .field("chain", &chain.len())
                .field("key", &"<redacted>")
                .finish(),
        }
    }
}

#[derive(Clone)]
pub struct FcmConfig {
    /// The service-account JSON, kept whole for `gcp_auth`.
    pub service_account_json: Arc<str>,
    pub project_id: String,
    pub upstream: Upstream,
    pub notification: bool,
    pub android: serde_json::Map<String, serde_json::Value>,
    pub send_badge_counts: bool,
    pub max_concurrency: usize,
}

impl fmt::Debug for FcmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmConfig")
            .field("service_account_json", &"<redacted>")
            .field("project_id", &self.project_id)
            .field("upstream", &self.upstream)
            .field("notification", &self.notification)
            .field("android", &self.android)
            .field("send_badge_counts", &self.send_badge_counts)
            .finish()
    }
}

/// A `webpush` app: RFC 8030 push services reached at each device's `data.endpoint`.
#[derive(Clone)]
pub struct WebPushConfig {
    pub vapid: VapidKey,
    /// `mailto:` or `https:` contact for push service operators (the JWT's `sub`).
    pub vapid_subject: String,
    pub endpoints: EndpointsConfig,
}

impl fmt::Debug for WebPushConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebPushConfig")
            .field("vapid_public_key", &self.vapid.public_b64())
            .field("vapid_subject", &self.vapid_subject)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// A `unifiedpush` app: the pushkey is the device's UnifiedPush endpoint URL.
#[derive(Debug, Clone)]
pub struct UnifiedPushConfig {
    pub endpoints: EndpointsConfig,
}

/// What `webpush` and `unifiedpush` apps share: endpoints come from devices, so they are vetted.
#[derive(Clone)]
pub struct EndpointsConfig {
    /// Host globs (`*`, `?`) an endpoint must match; empty = any public host.
    pub allowed_endpoints: Vec<String>,
    /// Lets endpoints be `http://` and resolve to loopback or private addresses (tests only).
    pub allow_internal_endpoints: bool,
    /// The `TTL` header: how long the push service keeps an undelivered message.
    pub ttl: Duration,
    /// Extra trusted roots (from `ca_file`) for push services with a private CA.
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub max_concurrency: usize,
    /// Pushes in flight to one endpoint host, so one slow push service cannot take every slot.
    pub max_concurrency_per_host: usize,
}

impl fmt::Debug for EndpointsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointsConfig")
            .field("allowed_endpoints", &self.allowed_endpoints)
            .field("allow_internal_endpoints", &self.allow_internal_endpoints)
            .field("ttl", &self.ttl)
            .field("extra_roots", &self.extra_roots.len())
            .field("max_concurrency", &self.max_concurrency)
            .field("max_concurrency_per_host", &self.max_concurrency_per_host)
            .finish()
    }
}

/// A VAPID (RFC 8292) P-256 key pair, read from `vapid_private_key_file`.
#[derive(Clone)]
pub struct VapidKey {
    /// The 32-byte private scalar.
    private: Arc<[u8]>,
    /// The 65-byte uncompressed public point: what browsers take as `applicationServerKey`.
    public: Arc<[u8]>,
}

impl VapidKey {
    /// Reads a PEM P-256 private key: SEC1 (`EC PRIVATE KEY`, what `openssl ecparam -genkey`
    /// writes) or PKCS#8 (`PRIVATE KEY`).
    pub fn from_pem(pem: &[u8]) -> Result<VapidKey, String> {
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        use p256::pkcs8::DecodePrivateKey as _;
        let secret = match rustls_pemfile::private_key(&mut &pem[..]) {
            Ok(Some(PrivateKeyDer::Sec1(der))) => p256::SecretKey::from_sec1_der(der.secret_sec1_der()),
            Ok(Some(PrivateKeyDer::Pkcs8(der))) => {
                p256::SecretKey::from_pkcs8_der(der.secret_pkcs8_der())
                    .map_err(|_| p256::elliptic_curve::Error)
            }
            _ => return Err("no EC PRIVATE KEY or PRIVATE KEY block found".into()),
        }
        .map_err(|_| "not a P-256 private key (generate one with `openssl ecparam -name prime256v1 -genkey -noout`)".to_owned())?;
        let public = secret.public_key().to_encoded_point(false);
        Ok(VapidKey {
            private: secret.to_bytes().to_vec().into(),
            public: public.as_bytes().to_vec().into(),
        })
    }

    pub fn private_scalar(&self) -> &[u8] {
        &self.private
    }

    pub fn public_point(&self) -> &[u8] {
        &self.public
    }

    /// The public key as browsers want it for `pushManager.subscribe`: base64url, no padding.
    pub fn public_b64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.public)
    }
}

// === raw schema: mirrors the YAML ===

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: OneOrMany,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default)]
    request_deadline: Option<String>,
    #[serde(default)]
    upstream_timeout: Option<String>,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default = "default_inflight")]
    max_inflight_requests: usize,
    #[serde(default)]
    shutdown_grace: Option<String>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    dedup: RawDedup,
    #[serde(default)]
    proxy: Option<String>,
    #[serde(default)]
    apps: BTreeMap<String, serde_json::Value>,
}

fn default_listen() -> OneOrMany {
    OneOrMany::One("127.0.0.1:5000".into())
}
fn default_max_body() -> usize {
    512 * 1024
}
fn default_inflight() -> usize {
    4096
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<u32>,
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDedup {
    ttl: Option<String>,
    max_entries: Option<u64>,
    backend: Option<String>,
    redis_url: Option<String>,
    redis_password_file: Option<PathBuf>,
    redis_ca_file: Option<PathBuf>,
    redis_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum RawApp {
    Apns(RawApns),
    Fcm(RawFcm),
    Log(RawLogApp),
    Webpush(RawEndpointApp),
    Unifiedpush(RawEndpointApp),
}

/// `type: webpush` and `type: unifiedpush`; the `vapid_*` keys are webpush's only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpointApp {
    #[serde(default)]
    vapid_private_key_file: Option<PathBuf>,
    #[serde(default)]
    vapid_subject: Option<String>,
    #[serde(default)]
    allowed_endpoints: Option<Vec<String>>,
    #[serde(default)]
    allow_internal_endpoints: bool,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default = "default_concurrency")]
    max_concurrency: usize,
    #[serde(default = "default_concurrency_per_host")]
    max_concurrency_per_host: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApns {
    key_file: Option<PathBuf>,
    key_id: Option<String>,
    team_id: Option<String>,
    cert_file: Option<PathBuf>,
    topic: String,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    push_type: Option<String>,
    #[serde(default = "yes")]
    convert_device_token_to_hex: bool,
    #[serde(default = "yes")]
    send_badge_counts: bool,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default = "default_concurrency")]
    max_concurrency: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFcm {
    service_account_file: PathBuf,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    notification: bool,
    #[serde(default)]
    android: serde_json::Map<String, serde_json::Value>,
    #[serde(default = "yes")]
    send_badge_counts: bool,
    #[serde(default = "default_concurrency")]
    max_concurrency: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogApp {}

fn yes() -> bool {
    true
}
fn default_concurrency() -> usize {
    512
}
fn default_concurrency_per_host() -> usize {
    64
}

/// Upper bounds. Larger values pass serde but overflow timers (`Instant + Duration` panics),
/// or pre-allocate absurd amounts, long after `check-config` said OK.
const MAX_INFLIGHT_REQUESTS: usize = 1_000_000;
const MAX_APP_CONCURRENCY: usize = 100_000;
const MAX_TIMEOUT: Duration = Duration::from_secs(60 * 60);
const MAX_DEDUP_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// The dedup table reserves 24 bytes per entry up front (touched only as entries arrive):
/// 50 million entries is 1.2 GB of address space at most.
const MAX_DEDUP_ENTRIES: u64 = 50_000_000;
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// The longest `TTL` push services keep a message (FCM and autopush cap at four weeks).
const MAX_PUSH_TTL: Duration = Duration::from_secs(28 * 24 * 60 * 60);

const APNS_PRODUCTION: &str = "https://api.push.apple.com";
const APNS_SANDBOX: &str = "https://api.sandbox.push.apple.com";
const FCM_DEFAULT: &str = "https://fcm.googleapis.com";

// === validation ===

/// Collects the file name and turns problems into `ConfigError`s that name the YAML path.
struct Checker<'a> {
    file: &'a str,
    /// Relative paths in the file are resolved against this directory.
    base_dir: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, key: impl Into<String>, message: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            key: key.into(),
            message: message.to_string(),
        }
    }

    /// Parses a duration (`default` when absent) and checks it is at most `max`.
    fn duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: &str,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let text = value.unwrap_or(default);
        let d = humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                key,
                format!("{text:?} is not a duration ({e}); use e.g. \"10s\" or \"200ms\""),
            )
        })?;
        if d > max {
            return Err(self.invalid(
                key,
                format!("{text:?} is too long (at most {})", humantime::format_duration(max)),
            ));
        }
        Ok(d)
    }

    /// Checks `min <= value <= max` for a count.
    fn count<T: PartialOrd + fmt::Display>(
        &self,
        key: &str,
        value: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError> {
        if value < min {
            return Err(self.invalid(key, format!("must be at least {min}")));
        }
        if value > max {
            return Err(self.invalid(key, format!("{value} is too large (at most {max})")));
        }
        Ok(value)
    }

    fn addr(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.parse().map_err(|_| self.invalid(key, format!("{text:?} is not an IP:port address")))
    }

    fn path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() { path.to_owned() } else { self.base_dir.join(path) }
    }

    fn read(&self, key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
        let full = self.path(path);
        std::fs::read(&full)
            .map_err(|e| self.invalid(key, format!("cannot read {}: {e}", full.display())))
    }

    fn endpoint(
        &self,
        key: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let url = value.unwrap_or_else(|| default.to_owned());
        let uri: http::Uri =
            url.parse().map_err(|e| self.invalid(key, format!("{url:?} is not a URL ({e})")))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.host().is_some() => {}
            _ => {
                return Err(
                    self.invalid(key, format!("{url:?} must be an http:// or https:// URL"))
                );
            }
        }
        Ok(url.trim_end_matches('/').to_owned())
    }

    fn redis(&self, raw: &RawDedup) -> Result<RedisConfig, ConfigError> {
        use redis::IntoConnectionInfo;
        let Some(url) = raw.redis_url.clone() else {
            return Err(self.invalid("dedup.redis_url", "required with backend: redis"));
        };
        // The URL may hold a password: errors describe it without quoting it.
        match url.split_once("://").map(|(scheme, _)| scheme) {
            Some("redis" | "rediss") => {}
            _ => {
                return Err(self.invalid(
                    "dedup.redis_url",
                    "must be a redis:// or rediss:// (TLS) URL, e.g. redis://redis:6379/0",
                ));
            }
        }
        if let Err(e) = url.as_str().into_connection_info() {
            return Err(
                self.invalid("dedup.redis_url", format!("not a usable Redis URL ({:?})", e.kind()))
            );
        }
        let password = match &raw.redis_password_file {
            None => None,
            Some(path) => {
                let bytes = self.read("dedup.redis_password_file", path)?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    self.invalid("dedup.redis_password_file", "the password is not UTF-8")
                })?;
                // Secret files usually end with a newline that is not part of the password.
                let password = text.trim_end_matches(['\r', '\n']).to_owned();
                if password.is_empty() {
                    return Err(self.invalid("dedup.redis_password_file", "the file is empty"));
                }
                Some(password)
            }
        };
        let ca_pem = match &raw.redis_ca_file {
            None => None,
            Some(path) => {
                if !url.starts_with("rediss://") {
                    return Err(
                        self.invalid("dedup.redis_ca_file", "only used with rediss:// URLs")
                    );
                }
                let pem = self.read("dedup.redis_ca_file", path)?;
                self.pem_certs("dedup.redis_ca_file", &pem)?;
                Some(pem)
            }
        };
        let timeout = self.duration(
            "dedup.redis_timeout",
            raw.redis_timeout.as_deref(),
            "250ms",
            Duration::from_secs(60),
        )?;
        Ok(RedisConfig { url, password, ca_pem, timeout })
    }

    fn ca_file(
        &self,
        key: &str,
        path: Option<&Path>,
    ) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let Some(path) = path else { return Ok(Vec::new()) };
        self.pem_certs(key, &self.read(key, path)?)
    }

    /// The certificates of a PEM file's contents; at least one.
    fn pem_certs(
        &self,
        key: &str,
        pem: &[u8],
    ) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let certs = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.invalid(key, format!("bad PEM: {e}")))?;
        if certs.is_empty() {
            return Err(self.invalid(key, "no CERTIFICATE blocks found"));
        }
        Ok(certs)
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_yaml(&text, &path.display().to_string(), base)
    }

    /// Parses and validates YAML text; `file` names it in errors and relative paths inside it are
    /// resolved against `base_dir`.
    pub fn from_yaml(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let check = Checker { file, base_dir };
        // No snippet: by default the error quotes the offending line, and a typo'd key
        // (`proxi: "http://user:pass@…"`) would print its value. Line and column remain.
        let options = serde_saphyr::options! { with_snippet: false };
        let Tracked(raw): Tracked<RawConfig> = serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: one_line(&e.to_string()),
        })?;

        let listen_texts = match raw.listen {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        if listen_texts.is_empty() {
            return Err(check.invalid("listen", "at least one address is required"));
        }
        let listen = listen_texts
            .iter()
            .enumerate()
            .map(|(i, s)| check.addr(&format!("listen[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let admin_listen =
            raw.admin_listen.as_deref().map(|s| check.addr("admin_listen", s)).transpose()?;
        let max_body_bytes =
            check.count("max_body_bytes", raw.max_body_bytes, 1024, MAX_BODY_BYTES)?;
        let max_inflight_requests = check.count(
            "max_inflight_requests",
            raw.max_inflight_requests,
            1,
            MAX_INFLIGHT_REQUESTS,
        )?;
        let request_deadline = check.duration(
            "request_deadline",
            raw.request_deadline.as_deref(),
            "10s",
            MAX_TIMEOUT,
        )?;
        if request_deadline.is_zero() {
            return Err(check.invalid("request_deadline", "must be greater than zero"));
        }
        let upstream_timeout = check.duration(
            "upstream_timeout",
            raw.upstream_timeout.as_deref(),
            "5s",
            MAX_TIMEOUT,
        )?;
        if upstream_timeout.is_zero() {
            return Err(check.invalid("upstream_timeout", "must be greater than zero"));
        }
        let shutdown_grace =
            check.duration("shutdown_grace", raw.shutdown_grace.as_deref(), "10s", MAX_TIMEOUT)?;
        let retry = RetryPolicy {
            attempts: raw.retry.attempts.unwrap_or(3),
            initial_backoff: check.duration(
                "retry.initial_backoff",
                raw.retry.initial_backoff.as_deref(),
                "200ms",
                MAX_TIMEOUT,
            )?,
            max_backoff: check.duration(
                "retry.max_backoff",
                raw.retry.max_backoff.as_deref(),
                "2s",
                MAX_TIMEOUT,
            )?,
        };
        if retry.attempts == 0 {
            return Err(check.invalid("retry.attempts", "must be at least 1 (1 = no retries)"));
        }
        let log = LogConfig {
            level: raw.log.level.unwrap_or_else(|| "info".into()),
            format: raw.log.format.unwrap_or(LogFormat::Text),
        };
        if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
            return Err(
                check.invalid("log.level", format!("{:?} is not a log level or filter", log.level))
            );
        }
        let redis = match raw.dedup.backend.as_deref() {
            None | Some("memory") => {
                let redis_keys = [
                    ("dedup.redis_url", raw.dedup.redis_url.is_some()),
                    ("dedup.redis_password_file", raw.dedup.redis_password_file.is_some()),
                    ("dedup.redis_ca_file", raw.dedup.redis_ca_file.is_some()),
                    ("dedup.redis_timeout", raw.dedup.redis_timeout.is_some()),
                ];
                if let Some((key, _)) = redis_keys.iter().find(|(_, set)| *set) {
                    return Err(check.invalid(*key, "only used with backend: redis"));
                }
                None
            }
            Some("redis") => Some(check.redis(&raw.dedup)?),
            Some(other) => {
                return Err(
                    check.invalid("dedup.backend", format!("{other:?} is not memory or redis"))
                );
            }
        };
        let dedup = DedupConfig {
            ttl: check.duration("dedup.ttl", raw.dedup.ttl.as_deref(), "1h", MAX_DEDUP_TTL)?,
            max_entries: check.count(
                "dedup.max_entries",
                raw.dedup.max_entries.unwrap_or(200_000),
                1,
                MAX_DEDUP_ENTRIES,
            )?,
            redis,
        };
        let proxy = raw.proxy.as_deref().map(|p| parse_proxy(&check, p)).transpose()?;

        let mut apps = Vec::with_capacity(raw.apps.len());
        for (pattern, value) in raw.apps {
            let key = format!("apps.{pattern}");
            if pattern.is_empty() {
                return Err(check.invalid("apps", "an app id must not be empty"));
            }
            let app: RawApp = serde_json::from_value(value).map_err(|e| check.invalid(&key, e))?;
            let kind = match app {
                RawApp::Apns(a) => AppKind::Apns(apns(&check, &key, a)?),
                RawApp::Fcm(f) => AppKind::Fcm(fcm(&check, &key, f)?),
                RawApp::Log(RawLogApp {}) => AppKind::Log,
                RawApp::Webpush(w) => AppKind::WebPush(webpush(&check, &key, w)?),
                RawApp::Unifiedpush(u) => {
                    for (field, set) in [
                        ("vapid_private_key_file", u.vapid_private_key_file.is_some()),
                        ("vapid_subject", u.vapid_subject.is_some()),
                    ] {
                        if set {
                            return Err(check.invalid(
                                format!("{key}.{field}"),
                                "only used with type: webpush (UnifiedPush endpoints take no VAPID)",
                            ));
                        }
                    }
                    AppKind::UnifiedPush(UnifiedPushConfig {
                        endpoints: endpoints(&check, &key, u)?,
                    })
                }
            };
            apps.push(AppConfig { pattern, kind });
        }

        let mut config = Config {
            listen: Vec::new(),
            admin_listen: None,
            max_body_bytes,
            request_deadline,
            upstream_timeout,
            retry,
            max_inflight_requests,
            shutdown_grace,
            log,
            dedup,
            proxy,
            apps,
        };
        config.set_listen(listen, admin_listen);
        Ok(config)
    }

    /// Sets the notify listen addresses and the admin address. An admin address equal to a
    /// listen address means "serve the admin routes on that listener" (`admin_listen` becomes
    /// `None`), except with port 0 ("any free port"), which always gets a socket of its own.
    ///
    /// The one place this rule lives: `from_yaml` and `herald serve --listen/--admin-listen`
    /// both go through it.
    pub fn set_listen(&mut self, listen: Vec<SocketAddr>, admin: Option<SocketAddr>) {
        self.admin_listen = admin.filter(|a| a.port() == 0 || !listen.contains(a));
        self.listen = listen;
    }
}

/// Deserializes `T` through `serde_path_to_error`, so an error names its YAML path
/// (`apps: invalid type: sequence, expected a map`) even without a snippet of the line.
struct Tracked<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Tracked<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_path_to_error::deserialize(d).map(Tracked).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path == "?" {
                inner
            } else {
                serde::de::Error::custom(format!("{path}: {inner}"))
            }
        })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_proxy(check: &Checker<'_>, text: &str) -> Result<ProxyConfig, ConfigError> {
    let uri: http::Uri =
        text.parse().map_err(|e| check.invalid("proxy", format!("not a URL ({e})")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(check.invalid("proxy", "must be an http://[user:pass@]host:port URL"));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let (authorization, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => {
            use base64::Engine as _;
            let encoded = base64::engine::general_purpose::STANDARD.encode(userinfo);
            let value = http::HeaderValue::try_from(format!("Basic {encoded}"))
                .map_err(|_| check.invalid("proxy", "credentials are not a valid header"))?;
            (Some(value), host_port)
        }
        None => (None, authority),
    };
    let uri = format!("http://{host_port}")
        .parse()
        .map_err(|e| check.invalid("proxy", format!("not a URL ({e})")))?;
    Ok(ProxyConfig { uri, authorization })
}

fn apns(check: &Checker<'_>, key: &str, raw: RawApns) -> Result<ApnsConfig, ConfigError> {
    let auth = match (&raw.key_file, &raw.cert_file) {
        (Some(_), Some(_)) => {
            return Err(check.invalid(
                key,
                "set key_file (token auth) or cert_file (certificate auth), not both",
            ));
        }
        (None, None) => {
            return Err(
                check.invalid(key, "needs key_file + key_id + team_id (token auth) or cert_file")
            );
        }
        (Some(path), None) => {
            let key_id = raw
                .key_id
                .clone()
                .ok_or_else(|| check.invalid(format!("{key}.key_id"), "required with key_file"))?;
            let team_id = raw
                .team_id
                .clone()
                .ok_or_else(|| check.invalid(format!("{key}.team_id"), "required with key_file"))?;
            let pem = check.read(&format!("{key}.key_file"), path)?;
            let der = match rustls_pemfile::private_key(&mut pem.as_slice()) {
                Ok(Some(PrivateKeyDer::Pkcs8(der))) => der.secret_pkcs8_der().to_vec(),
                _ => {
                    return Err(check.invalid(
                        format!("{key}.key_file"),
                        "expected a PKCS#8 EC private key (Apple's .p8 file)",
                    ));
                }
            };
            let rng = ring::rand::SystemRandom::new();
            ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &der,
                &rng,
            )
            .map_err(|_| {
                check.invalid(format!("{key}.key_file"), "not a P-256 (ES256) private key")
            })?;
            ApnsAuth::Token { key_pkcs8: der, key_id, team_id }
        }
        (None, Some(path)) => {
            if raw.key_id.is_some() || raw.team_id.is_some() {
                return Err(check.invalid(key, "key_id and team_id are only used with key_file"));
            }
            let field = format!("{key}.cert_file");
            let pem = check.read(&field, path)?;
            let chain = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| check.invalid(&field, format!("bad PEM: {e}")))?;
            if chain.is_empty() {
                return Err(check.invalid(&field, "no CERTIFICATE block found"));
            }
            let private = rustls_pemfile::private_key(&mut pem.as_slice())
                .ok()
                .flatten()
                .ok_or_else(|| {
                    check.invalid(
                        &field,
                        "no PRIVATE KEY block found (put the key in the same PEM file)",
                    )
                })?;
            ApnsAuth::Certificate { chain, key: Arc::new(private) }
        }
    };
    let default_base = match raw.platform.as_deref() {
        None | Some("production") => APNS_PRODUCTION,
        Some("sandbox") => APNS_SANDBOX,
        Some(other) => {
            return Err(check.invalid(
                format!("{key}.platform"),
                format!("{other:?} is not production or sandbox"),
            ));
        }
    };
    if raw.topic.is_empty() {
        return Err(check.invalid(format!("{key}.topic"), "must not be empty"));
    }
    check.count(&format!("{key}.max_concurrency"), raw.max_concurrency, 1, MAX_APP_CONCURRENCY)?;
    Ok(ApnsConfig {
        auth,
        topic: raw.topic,
        push_type: raw.push_type,
        convert_device_token_to_hex: raw.convert_device_token_to_hex,
        send_badge_counts: raw.send_badge_counts,
        upstream: Upstream {
            base_url: check.endpoint(&format!("{key}.endpoint"), raw.endpoint, default_base)?,
            extra_roots: check.ca_file(&format!("{key}.ca_file"), raw.ca_file.as_deref())?,
        },
        max_concurrency: raw.max_concurrency,
    })
}

fn fcm(check: &Checker<'_>, key: &str, raw: RawFcm) -> Result<FcmConfig, ConfigError> {
    let field = format!("{key}.service_account_file");
    let bytes = check.read(&field, &raw.service_account_file)?;
    let json = String::from_utf8(bytes).map_err(|_| check.invalid(&field, "not UTF-8 text"))?;
    let account = gcp_auth::CustomServiceAccount::from_json(&json)
        .map_err(|e| check.invalid(&field, format!("not a usable service-account key ({e})")))?;
    let project_id = match raw.project_id.or_else(|| account.project_id().map(str::to_owned)) {
        Some(p) if !p.is_empty() => p,
        _ => {
            return Err(check.invalid(
                format!("{key}.project_id"),
                "required: the service account file names none",
            ));
        }
    };
    check.count(&format!("{key}.max_concurrency"), raw.max_concurrency, 1, MAX_APP_CONCURRENCY)?;
    Ok(FcmConfig {
        service_account_json: json.into(),
        project_id,
        upstream: Upstream {
            base_url: check.endpoint(&format!("{key}.endpoint"), raw.endpoint, FCM_DEFAULT)?,
            extra_roots: check.ca_file(&format!("{key}.ca_file"), raw.ca_file.as_deref())?,
        },
        notification: raw.notification,
        android: raw.android,
        send_badge_counts: raw.send_badge_counts,
        max_concurrency: raw.max_concurrency,
    })
}

fn webpush(
    check: &Checker<'_>,
    key: &str,
    raw: RawEndpointApp,
) -> Result<WebPushConfig, ConfigError> {
    let field = format!("{key}.vapid_private_key_file");
    let Some(path) = &raw.vapid_private_key_file else {
        return Err(check
            .invalid(&field, "required with type: webpush (a P-256 key in PEM; see the README)"));
    };
    let vapid =
        VapidKey::from_pem(&check.read(&field, path)?).map_err(|e| check.invalid(&field, e))?;
    let subject = raw.vapid_subject.as_deref().unwrap_or_default().trim();
    let contact = subject.strip_prefix("mailto:").or_else(|| subject.strip_prefix("https://"));
    if contact.is_none_or(str::is_empty) {
        return Err(check.invalid(
            format!("{key}.vapid_subject"),
            "must be a mailto: or https:// contact, e.g. \"mailto:ops@example.com\"",
        ));
    }
    Ok(WebPushConfig {
        vapid,
        vapid_subject: subject.to_owned(),
        endpoints: endpoints(check, key, raw)?,
    })
}

fn endpoints(
    check: &Checker<'_>,
    key: &str,
    raw: RawEndpointApp,
) -> Result<EndpointsConfig, ConfigError> {
    let allowed_endpoints = match raw.allowed_endpoints {
        None => Vec::new(),
        Some(globs) if globs.is_empty() => {
            return Err(check.invalid(
                format!("{key}.allowed_endpoints"),
                "lists no host; leave it out to allow any public host",
            ));
        }
        Some(globs) => {
            for glob in &globs {
                let host_like = !glob.is_empty()
                    && glob.chars().all(|c| c.is_ascii_alphanumeric() || "-.*?:[]".contains(c));
                if !host_like {
                    return Err(check.invalid(
                        format!("{key}.allowed_endpoints"),
                        format!("{glob:?} is not a host glob (e.g. \"*.push.services.mozilla.com\"; no scheme, port or path)"),
                    ));
                }
            }
            globs
        }
    };
    let ttl = check.duration(&format!("{key}.ttl"), raw.ttl.as_deref(), "15m", MAX_PUSH_TTL)?;
    check.count(&format!("{key}.max_concurrency"), raw.max_concurrency, 1, MAX_APP_CONCURRENCY)?;
    check.count(
        &format!("{key}.max_concurrency_per_host"),
        raw.max_concurrency_per_host,
        1,
        MAX_APP_CONCURRENCY,
    )?;
    Ok(EndpointsConfig {
        allowed_endpoints,
        allow_internal_endpoints: raw.allow_internal_endpoints,
        ttl,
        extra_roots: check.ca_file(&format!("{key}.ca_file"), raw.ca_file.as_deref())?,
        max_concurrency: raw.max_concurrency,
        max_concurrency_per_host: raw.max_concurrency_per_host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, "gateway.yaml", Path::new("."))
    }

    #[test]
    fn defaults_fill_an_almost_empty_file() {
        let c = parse("apps:\n  a.b:\n    type: log\n").unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:5000".parse().unwrap()]);
        assert_eq!(c.request_deadline, Duration::from_secs(10));
        assert_eq!(c.retry.attempts, 3);
        assert_eq!(c.dedup.max_entries, 200_000);
        assert!(matches!(c.apps[0].kind, AppKind::Log));
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = parse("listn: 1.2.3.4:5\n").unwrap_err().to_string();
        assert!(e.contains("listn"), "{e}");
    }

    #[test]
    fn unknown_app_key_names_the_app() {
        let e = parse("apps:\n  a.b:\n    type: log\n    colour: red\n").unwrap_err().to_string();
        assert!(e.contains("apps.a.b") && e.contains("colour"), "{e}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let e = parse("retry: { max_backoff: soon }\n").unwrap_err().to_string();
        assert!(e.contains("retry.max_backoff") && e.contains("soon"), "{e}");
    }

    #[test]
    fn listen_accepts_a_list_and_admin_may_equal_listen() {
        let c = parse("listen: [\"127.0.0.1:1\", \"[::1]:2\"]\nadmin_listen: \"127.0.0.1:1\"\n")
            .unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.admin_listen, None);
    }

    #[test]
    fn values_that_would_overflow_later_are_refused_naming_the_key() {
        let cases = [
            ("max_inflight_requests: 1000001\n", "max_inflight_requests"),
            ("max_body_bytes: 67108865\n", "max_body_bytes"),
            ("request_deadline: \"1h 1s\"\n", "request_deadline"),
            ("upstream_timeout: \"100000000years\"\n", "upstream_timeout"),
            ("shutdown_grace: \"2h\"\n", "shutdown_grace"),
            ("retry: { initial_backoff: \"61m\" }\n", "retry.initial_backoff"),
            ("retry: { max_backoff: \"1day\" }\n", "retry.max_backoff"),
            ("dedup: { ttl: \"31days\" }\n", "dedup.ttl"),
            ("dedup: { max_entries: 0 }\n", "dedup.max_entries"),
            ("upstream_timeout: 0s\n", "upstream_timeout"),
        ];
        for (yaml, key) in cases {
            let e = parse(yaml).unwrap_err().to_string();
            assert!(e.contains(key), "error for {yaml:?} should name {key}: {e}");
        }
        // The bounds themselves are allowed.
        let c = parse(
            "max_inflight_requests: 1000000\nmax_body_bytes: 67108864\nrequest_deadline: 1h\n\
             shutdown_grace: 1h\ndedup: { ttl: 30days, max_entries: 1 }\n",
        )
        .unwrap();
        assert_eq!(c.max_inflight_requests, 1_000_000);
        assert_eq!(c.dedup.ttl, MAX_DEDUP_TTL);
    }

    #[test]
    fn the_redis_backend_needs_a_redis_url_and_keeps_its_password_out_of_errors() {
        let e = parse("dedup: { backend: redis }\n").unwrap_err().to_string();
        assert!(e.contains("dedup.redis_url") && e.contains("required"), "{e}");
        let e = parse("dedup: { backend: redis, redis_url: \"http://:hunter2@redis:6379\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dedup.redis_url") && !e.contains("hunter2"), "{e}");
        let e = parse("dedup: { redis_url: \"redis://redis:6379\" }\n").unwrap_err().to_string();
        assert!(e.contains("dedup.redis_url") && e.contains("backend: redis"), "{e}");
        let e = parse("dedup: { backend: memcached }\n").unwrap_err().to_string();
        assert!(e.contains("dedup.backend"), "{e}");
        let c =
            parse("dedup: { backend: redis, redis_url: \"rediss://:pw@redis:6380/2\" }\n").unwrap();
        let redis = c.dedup.redis.expect("redis backend");
        assert_eq!(redis.timeout, Duration::from_millis(250));
        assert!(!format!("{redis:?}").contains("pw@"), "Debug must not show the URL");
    }

    #[test]
    fn the_redis_password_file_is_read_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("password"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let yaml = |file: &str| {
            format!(
                "dedup: {{ backend: redis, redis_url: \"redis://redis:6379\", \
                 redis_password_file: {file}, redis_timeout: 1s }}\n"
            )
        };
        let c = Config::from_yaml(&yaml("password"), "g.yaml", dir.path()).unwrap();
        let redis = c.dedup.redis.unwrap();
        assert_eq!(redis.password.as_deref(), Some("s3cret"));
        assert_eq!(redis.timeout, Duration::from_secs(1));
        let e = Config::from_yaml(&yaml("empty"), "g.yaml", dir.path()).unwrap_err().to_string();
        assert!(e.contains("dedup.redis_password_file") && e.contains("empty"), "{e}");
        let e = Config::from_yaml(&yaml("missing"), "g.yaml", dir.path()).unwrap_err().to_string();
        assert!(e.contains("dedup.redis_password_file"), "{e}");
        // A CA file only makes sense for TLS.
        let e = parse(
            "dedup: { backend: redis, redis_url: \"redis://redis:6379\", redis_ca_file: ca.pem }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dedup.redis_ca_file") && e.contains("rediss://"), "{e}");
    }

    #[test]
    fn app_max_concurrency_is_bounded() {
        let dir = p8_dir("concurrency");
        let yaml = |n: usize| {
            format!(
                "apps:\n  x:\n    type: apns\n    topic: t\n    key_file: k.p8\n    key_id: K\n    team_id: T\n    max_concurrency: {n}\n"
            )
        };
        let e = Config::from_yaml(&yaml(100_001), "gateway.yaml", &dir).unwrap_err().to_string();
        assert!(e.contains("apps.x.max_concurrency") && e.contains("100000"), "{e}");
        Config::from_yaml(&yaml(100_000), "gateway.yaml", &dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn yaml_errors_name_the_key_but_never_quote_its_value() {
        let e = parse("listen: \"127.0.0.1:5000\"\nproxi: \"http://user:secret@proxy:3128\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxi"), "{e}");
        assert!(!e.contains("secret"), "the YAML line was quoted: {e}");
        assert!(e.contains("line 2"), "line information is kept: {e}");
    }

    #[test]
    fn set_listen_shares_an_equal_admin_address_except_port_0() {
        let mut c = parse("apps:\n  a.b:\n    type: log\n").unwrap();
        let a: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        c.set_listen(vec![a], Some(a));
        assert_eq!((c.listen.clone(), c.admin_listen), (vec![a], None));
        c.set_listen(vec![a], Some(b));
        assert_eq!(c.admin_listen, Some(b));
        c.set_listen(vec![any], Some(any));
        assert_eq!((c.listen.clone(), c.admin_listen), (vec![any], Some(any)));
        c.set_listen(vec![b], None);
        assert_eq!(c.admin_listen, None);
    }

    #[test]
    fn proxy_credentials_become_basic_auth_and_are_not_debug_printed() {
        let c = parse("proxy: \"http://user:secret@proxy.local:3128\"\n").unwrap();
        let p = c.proxy.unwrap();
        assert_eq!(p.uri.to_string(), "http://proxy.local:3128/");
        assert!(p.authorization.is_some());
        assert!(!format!("{p:?}").contains("secret"));
    }

    #[test]
    fn apns_without_auth_is_an_error() {
        let e = parse("apps:\n  x:\n    type: apns\n    topic: t\n").unwrap_err().to_string();
        assert!(e.contains("apps.x") && e.contains("key_file"), "{e}");
    }

    /// A fresh temp directory holding a P-256 `k.p8`.
    fn p8_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("herald-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pkcs8.as_ref())
        );
        std::fs::write(dir.join("k.p8"), pem).unwrap();
        dir
    }

    #[test]
    fn webpush_reads_sec1_and_pkcs8_vapid_keys_and_checks_its_settings() {
        let dir = p8_dir("webpush");
        let sec1 = include_str!("../tests/fixtures/vapid-sec1.pem");
        std::fs::write(dir.join("vapid.pem"), sec1).unwrap();
        let yaml = |key: &str, extra: &str| {
            format!(
                "apps:\n  web:\n    type: webpush\n    vapid_private_key_file: {key}\n    vapid_subject: \"mailto:ops@example.com\"\n{extra}"
            )
        };
        let load = |key: &str, extra: &str| Config::from_yaml(&yaml(key, extra), "g.yaml", &dir);
        let web = |c: Config| match c.apps.into_iter().next().unwrap().kind {
            AppKind::WebPush(w) => w,
            _ => unreachable!(),
        };
        let from_sec1 = web(load("vapid.pem", "").unwrap());
        // The key openssl wrote, whose public half `openssl ec -pubout` printed.
        assert_eq!(
            from_sec1.vapid.public_b64(),
            "BPzZ7CCq2uo2NqJB-ujuFdH3AnDziseX-laazbo-idv-4QXkSrKl4NWV1cNJ9SIlnwOVdCb-YdRJCEZvB5bZ7oU"
        );
        assert_eq!(from_sec1.endpoints.ttl, Duration::from_secs(15 * 60));
        assert!(from_sec1.endpoints.allowed_endpoints.is_empty());
        assert!(!from_sec1.endpoints.allow_internal_endpoints);
        assert!(!format!("{from_sec1:?}").contains("private"), "{from_sec1:?}");
        let from_pkcs8 =
            web(load("k.p8", "    ttl: 1h\n    allowed_endpoints: [\"*.example.org\"]\n").unwrap());
        assert_eq!(from_pkcs8.vapid.public_point().len(), 65);
        assert_eq!(from_pkcs8.endpoints.ttl, Duration::from_secs(3600));

        let err = |key: &str, extra: &str| load(key, extra).unwrap_err().to_string();
        let e = err("missing.pem", "");
        assert!(e.contains("apps.web.vapid_private_key_file") && e.contains("missing.pem"), "{e}");
        std::fs::write(dir.join("not-a-key.pem"), "hello").unwrap();
        let e = err("not-a-key.pem", "");
        assert!(e.contains("apps.web.vapid_private_key_file"), "{e}");
        let e = err("vapid.pem", "    allowed_endpoints: []\n");
        assert!(e.contains("apps.web.allowed_endpoints"), "{e}");
        let e = err("vapid.pem", "    allowed_endpoints: [\"https://push.example.org/\"]\n");
        assert!(e.contains("apps.web.allowed_endpoints") && e.contains("host glob"), "{e}");
        let e = err("vapid.pem", "    ttl: 60d\n");
        assert!(e.contains("apps.web.ttl"), "{e}");
        let e = err("vapid.pem", "    max_concurrency_per_host: 0\n");
        assert!(e.contains("apps.web.max_concurrency_per_host"), "{e}");
        let e = err("vapid.pem", "    allowed_endpoint: [\"x\"]\n");
        assert!(e.contains("allowed_endpoint"), "a typo is named: {e}");
        let bad_subject = "apps:\n  web:\n    type: webpush\n    vapid_private_key_file: vapid.pem\n    vapid_subject: ops@example.com\n";
        let e = Config::from_yaml(bad_subject, "g.yaml", &dir).unwrap_err().to_string();
        assert!(e.contains("apps.web.vapid_subject") && e.contains("mailto:"), "{e}");
        let no_key = "apps:\n  web:\n    type: webpush\n    vapid_subject: \"mailto:a@b\"\n";
        let e = Config::from_yaml(no_key, "g.yaml", &dir).unwrap_err().to_string();
        assert!(e.contains("apps.web.vapid_private_key_file") && e.contains("required"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unifiedpush_needs_no_keys_and_refuses_vapid_ones() {
        let c = parse(
            "apps:\n  \"*.up\":\n    type: unifiedpush\n    allow_internal_endpoints: true\n",
        )
        .unwrap();
        match &c.apps[0].kind {
            AppKind::UnifiedPush(u) => {
                assert!(u.endpoints.allow_internal_endpoints);
                assert_eq!(u.endpoints.max_concurrency_per_host, 64);
            }
            other => panic!("{other:?}"),
        }
        let e = parse("apps:\n  up:\n    type: unifiedpush\n    vapid_subject: \"mailto:a@b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("apps.up.vapid_subject") && e.contains("webpush"), "{e}");
    }

    #[test]
    fn apns_platform_picks_apples_host_unless_an_endpoint_is_set() {
        let dir = p8_dir("platform");
        let base = |extra: &str| {
            let yaml = format!(
                "apps:\n  x:\n    type: apns\n    topic: t\n    key_file: k.p8\n    key_id: K\n    team_id: T\n{extra}"
            );
            let c = Config::from_yaml(&yaml, "gateway.yaml", &dir).unwrap();
            match &c.apps[0].kind {
                AppKind::Apns(a) => a.upstream.base_url.clone(),
                _ => unreachable!(),
            }
        };
        assert_eq!(base(""), APNS_PRODUCTION);
        assert_eq!(base("    platform: sandbox\n"), APNS_SANDBOX);
        assert_eq!(base("    endpoint: \"http://127.0.0.1:9/\"\n"), "http://127.0.0.1:9");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_key_file_names_path() {
        let e = parse("apps:\n  x:\n    type: apns\n    topic: t\n    key_file: /nonexistent.p8\n    key_id: K\n    team_id: T\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("apps.x.key_file") && e.contains("/nonexistent.p8"), "{e}");
    }
}
