//! Vetting of push endpoint URLs that come from devices (WebPush `data.endpoint`, UnifiedPush
//! pushkeys): untrusted input that herald would otherwise POST to.
//!
//! [`EndpointPolicy::check`] accepts an endpoint only if its scheme is `https` (or `http` when
//! internal endpoints are allowed, for tests), it has no userinfo, its host matches
//! `allowed_endpoints`, and every address it resolves to is public. [`GuardedResolver`] repeats
//! the address check at connect time, so a DNS answer that changes after `check` (rebinding)
//! still cannot reach an internal address.
//!
//! [`EndpointClient`] is the transport `webpush` and `unifiedpush` share: it vets each endpoint,
//! bounds the pushes in flight per endpoint host (so one slow push service cannot take every
//! slot of the app) and maps the push service's answer (DESIGN §3), re-sending a shortened
//! message once after a 413.
//!
//! This module must never let a refused endpoint be connected to: herald is no open proxy into
//! the operator's network. It never logs or returns the full URL (it is as secret as a pushkey):
//! a [`Refusal`] names the host at most.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use std::{fmt, io};

use bytes::Bytes;
use http::uri::Scheme;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::dns::Name;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wildmatch::WildMatch;

use super::http::{HttpClient, Protocol, describe_error};
use super::{AppLabels, Outcome, retry_after};
use crate::config::{EndpointsConfig, ProxyConfig};
use crate::metrics::Metrics;
use crate::notification::Prio;

/// How long a host's vetted addresses are trusted before it is resolved again.
const VERDICT_TTL: Duration = Duration::from_secs(60);
/// Hosts whose verdicts are remembered; past this the memory starts over.
const MAX_VERDICTS: usize = 4096;
/// Idle per-host limiters kept before the idle ones are dropped.
const MAX_IDLE_HOSTS: usize = 1024;

/// Which endpoints an app may push to: `allowed_endpoints` and `allow_internal_endpoints`.
#[derive(Debug)]
pub struct EndpointPolicy {
    /// Host globs (`*`, `?`), lower-cased; empty means any host.
    allowed: Vec<WildMatch>,
    /// `allow_internal_endpoints`; its address check is the one used at connect time too.
    guard: GuardedResolver,
    verdicts: Mutex<Verdicts>,
}

/// `(host, port)` → when it was resolved, and its addresses or why they were refused.
type Verdicts = HashMap<(String, u16), (Instant, Result<Vec<SocketAddr>, Refusal>)>;

/// Why an endpoint was refused. No variant holds more of the URL than its host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("endpoint is not an absolute URL")]
    NotAUrl,
    #[error("endpoint scheme not allowed (https only; http only with allow_internal_endpoints)")]
    Scheme,
    #[error("endpoint URL carries user credentials")]
    UserInfo,
    #[error("endpoint host {host} is not in allowed_endpoints")]
    HostNotAllowed { host: String },
    #[error("endpoint host {host} is or resolves to an internal address")]
    Internal { host: String },
    #[error("endpoint host {host} does not resolve")]
    Unresolvable { host: String },
}

/// An endpoint that passed [`EndpointPolicy::check`]. `Debug` shows the host, never the URL.
pub struct Checked {
    pub uri: Uri,
    /// Lower-cased, without the brackets of an IPv6 literal.
    pub host: String,
    /// The addresses the host resolved to, port included; all public unless internal is allowed.
    pub addrs: Vec<SocketAddr>,
}

impl fmt::Debug for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checked").field("host", &self.host).field("addrs", &self.addrs).finish()
    }
}

impl EndpointPolicy {
    pub fn new(allowed_endpoints: &[String], allow_internal: bool) -> EndpointPolicy {
        // Hosts are compared lower-cased and without the brackets of an IPv6 literal.
        let allowed = allowed_endpoints
            .iter()
            .map(|g| {
                WildMatch::new(&g.trim_start_matches('[').trim_end_matches(']').to_lowercase())
            })
            .collect();
        let guard = GuardedResolver::new(allow_internal);
        EndpointPolicy { allowed, guard, verdicts: Mutex::new(HashMap::new()) }
    }

    /// The resolver to build this app's `HttpConnector` with.
    pub fn resolver(&self) -> GuardedResolver {
        self.guard
    }

    /// Vets `url` before any connection is made; see the module doc for the rules.
    pub async fn check(&self, url: &str) -> Result<Checked, Refusal> {
        let uri: Uri = url.parse().map_err(|_| Refusal::NotAUrl)?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(Refusal::NotAUrl);
        };
        let https = *scheme == Scheme::HTTPS;
        let plain_http_allowed = self.guard.allows_any() && *scheme == Scheme::HTTP;
        if !(https || plain_http_allowed) {
            return Err(Refusal::Scheme);
        }
        if authority.as_str().contains('@') {
            return Err(Refusal::UserInfo);
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_lowercase();
        if host.is_empty() {
            return Err(Refusal::NotAUrl);
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|g| g.matches(&host)) {
            return Err(Refusal::HostNotAllowed { host });
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => self.guard.vet(&host, vec![SocketAddr::new(ip, port)])?,
            Err(_) => self.resolve_vetted(&host, port).await?,
        };
        Ok(Checked { uri, host, addrs })
    }

    /// Resolves and vets a host name, reusing a verdict younger than [`VERDICT_TTL`]. A name
    /// that does not resolve is asked again next time: that may pass.
    async fn resolve_vetted(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        let key = (host.to_owned(), port);
        if let Some((at, verdict)) = self.verdicts().get(&key)
            && at.elapsed() < VERDICT_TTL
        {
            return verdict.clone();
        }
        let verdict = self.guard.vet(host, resolve(host, port).await?);
        let mut verdicts = self.verdicts();
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        verdicts.insert(key, (Instant::now(), verdict.clone()));
        verdict
    }

    fn verdicts(&self) -> std::sync::MutexGuard<'_, Verdicts> {
        self.verdicts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Bounds the pushes in flight to each endpoint host.
struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HostLimits {
    /// Waits for a slot of `host`; `None` only if the limiter was closed (it never is).
    async fn acquire(&self, host: &str) -> Option<OwnedSemaphorePermit> {
        let limiter = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            if hosts.len() >= MAX_IDLE_HOSTS && !hosts.contains_key(host) {
                // A limiter nobody holds or waits on is only referenced by the map.
                hosts.retain(|_, limiter| Arc::strong_count(limiter) > 1);
            }
            hosts
                .entry(host.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
                .clone()
        };
        limiter.acquire_owned().await.ok()
    }
}

/// Which message a request builder should make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Full,
    /// The push service refused the full message as too large (413).
    Shortened,
}

/// The shared transport of `webpush` and `unifiedpush`; see the module doc.
pub struct EndpointClient {
    client: HttpClient,
    policy: EndpointPolicy,
    /// The `TTL` header every push carries.
    ttl: HeaderValue,
    hosts: HostLimits,
    app: Semaphore,
    labels: AppLabels,
    metrics: Arc<Metrics>,
}

/// One exchange's result: final, or a 413 the caller may answer with a shorter message.
enum Exchanged {
    Done(Outcome),
    TooLarge,
}

impl EndpointClient {
    pub fn new(
        config: &EndpointsConfig,
        proxy: Option<&ProxyConfig>,
        labels: AppLabels,
        metrics: Arc<Metrics>,
    ) -> Result<EndpointClient, String> {
        let policy =
            EndpointPolicy::new(&config.allowed_endpoints, config.allow_internal_endpoints);
        let client = super::http::client_with(
            &config.extra_roots,
            proxy,
            None,
            Protocol::Any,
            policy.resolver(),
        )?;
        Ok(EndpointClient {
            client,
            policy,
            ttl: HeaderValue::from(config.ttl.as_secs()),
            hosts: HostLimits {
                per_host: config.max_concurrency_per_host,
                hosts: Mutex::new(HashMap::new()),
            },
            app: Semaphore::new(config.max_concurrency),
            labels,
            metrics,
        })
    }

    /// One attempt: vets `endpoint` (a refusal makes no request), waits for a slot of its host
    /// and of the app, then sends what `build` makes of it with the `TTL` and `Urgency` (from
    /// `prio`) headers every push carries; after a 413, once more with [`Size::Shortened`].
    pub async fn post<F>(&self, endpoint: &str, prio: Prio, build: F) -> Outcome
    where
        F: Fn(&Checked, Size) -> Result<Request<Full<Bytes>>, String>,
    {
        let started = Instant::now();
        let checked = match self.policy.check(endpoint).await {
            Ok(checked) => checked,
            Err(refusal) => {
                self.metrics.upstream(&self.labels, "refused", started.elapsed());
                return match refusal {
                    Refusal::Unresolvable { .. } => {
                        Outcome::Retry { after: None, reason: refusal.to_string() }
                    }
                    _ => Outcome::Failed(refusal.to_string()),
                };
            }
        };
        let Some(_host) = self.hosts.acquire(&checked.host).await else {
            return Outcome::Failed("provider is shutting down".into());
        };
        let Ok(_app) = self.app.acquire().await else {
            return Outcome::Failed("provider is shutting down".into());
        };
        let build = |checked: &Checked, size: Size| {
            let mut request = build(checked, size)?;
            let headers = request.headers_mut();
            headers.insert("ttl", self.ttl.clone());
            headers.insert("urgency", HeaderValue::from_static(urgency(prio)));
            Ok(request)
        };
        match self.exchange(&checked, &build, Size::Full).await {
            Exchanged::Done(outcome) => outcome,
            Exchanged::TooLarge => match self.exchange(&checked, &build, Size::Shortened).await {
                Exchanged::Done(outcome) => outcome,
                Exchanged::TooLarge => {
                    Outcome::Failed("push service answered 413 to the shortened message too".into())
                }
            },
        }
    }

    async fn exchange<F>(&self, checked: &Checked, build: &F, size: Size) -> Exchanged
    where
        F: Fn(&Checked, Size) -> Result<Request<Full<Bytes>>, String>,
    {
        let request = match build(checked, size) {
            Ok(request) => request,
            Err(why) => return Exchanged::Done(Outcome::Failed(why)),
        };
        let started = Instant::now();
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(e) => {
                return Exchanged::Done(match refusal_in(&e) {
                    Some(refusal) => {
                        self.metrics.upstream(&self.labels, "refused", started.elapsed());
                        Outcome::Failed(refusal.to_string())
                    }
                    None => {
                        self.metrics.upstream(&self.labels, "error", started.elapsed());
                        Outcome::Retry { after: None, reason: describe_error(&e) }
                    }
                });
            }
        };
        // Only the status and headers matter: the body is not read, so a service that accepted
        // the message and then stalls or sends too much cannot turn it into a retry (and a
        // second alert).
        let status = response.status();
        self.metrics.upstream(&self.labels, status.as_str(), started.elapsed());
        match map_status(status, retry_after(response.headers())) {
            Some(outcome) => Exchanged::Done(outcome),
            None => Exchanged::TooLarge,
        }
    }
}

/// RFC 8030's `Urgency`: `high` for `prio: high`, `normal` for `low` (DESIGN §3).
fn urgency(prio: Prio) -> &'static str {
    if prio == Prio::Low { "normal" } else { "high" }
}

/// Whether a device-supplied endpoint is an absolute URL at all: one that is not can never be
/// delivered to, so its pushkey is rejected (what [`EndpointPolicy::check`] refuses beyond that
/// may depend on the config, so it fails instead).
pub fn is_absolute_url(url: &str) -> bool {
    url.parse::<Uri>().is_ok_and(|u| u.host().is_some())
}

/// Maps a push service's answer (DESIGN §3); `None` for 413, which the caller may answer with a
/// shorter message.
pub fn map_status(status: StatusCode, after: Option<Duration>) -> Option<Outcome> {
    let described = || format!("push service answered {}", status.as_u16());
    Some(match status.as_u16() {
        200..=299 => Outcome::Delivered,
        404 | 410 => Outcome::Rejected(described()),
        413 => return None,
        429 | 500..=599 => Outcome::Retry { after, reason: described() },
        _ => Outcome::Failed(described()),
    })
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
    let unresolvable = || Refusal::Unresolvable { host: host.to_owned() };
    let addrs: Vec<SocketAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|_| unresolvable())?.collect();
    if addrs.is_empty() { Err(unresolvable()) } else { Ok(addrs) }
}

/// True for any address a push endpoint must not reach: loopback, private, link-local, shared,
/// documentation, benchmarking, multicast, reserved and unspecified ranges, and IPv6 forms that
/// embed an IPv4 address (mapped, compatible, NAT64, 6to4) when the embedded address is one.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            a == 0 // 0.0.0.0/8 "this network"
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (a == 100 && (b & 0xc0) == 64) // 100.64.0.0/10 carrier-grade NAT
                || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24 IETF protocol assignments
                || (a == 192 && b == 88 && c == 99) // 192.88.99.0/24 6to4 relay anycast
                || v4.is_documentation()
                || (a == 198 && (b & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || v4.is_multicast()
                || a >= 240 // 240.0.0.0/4 reserved, and 255.255.255.255 broadcast
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                is_internal(IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 deprecated site-local
                || v6.is_multicast()
                || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // 100::/64 discard
                || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 1) // 64:ff9b:1::/48 local NAT64
                || (s[..6] == [0; 6] && embedded(s[6], s[7])) // ::a.b.c.d IPv4-compatible
                || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && embedded(s[6], s[7])) // NAT64
                || (s[0] == 0x2002 && embedded(s[1], s[2])) // 2002::/16 6to4
                || s[..6] == [0, 0, 0, 0, 0xffff, 0] // ::ffff:0:0:0/96 SIIT-translated IPv4
                || (s[0] == 0x2001 && s[1] == 0) // 2001::/32 Teredo tunnels
        }
    }
}

/// A DNS resolver for hyper-util's `HttpConnector` (`HttpConnector::new_with_resolver`) that
/// fails instead of returning an internal address, unless internal addresses are allowed.
///
/// `HttpConnector` connects to IP literals without asking its resolver, so literal hosts rely on
/// [`EndpointPolicy::check`]; their address cannot change between the check and the connect.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    allow_internal: bool,
}

impl GuardedResolver {
    pub fn new(allow_internal: bool) -> GuardedResolver {
        GuardedResolver { allow_internal }
    }

    /// True when it refuses nothing (operator-configured upstreams, or `allow_internal`).
    pub fn allows_any(&self) -> bool {
        self.allow_internal
    }

    /// `addrs` of `host`, unless one of them is internal and internal addresses are refused.
    fn vet(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refusal> {
        if !self.allow_internal && addrs.iter().any(|a| is_internal(a.ip())) {
            return Err(Refusal::Internal { host: host.to_owned() });
        }
        Ok(addrs)
    }
}

/// The [`Refusal`] behind a failed connection, when the connector refused an internal address
/// (a name that resolved differently at connect time than when it was checked).
pub fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(refusal) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<Refusal>())
        {
            return Some(refusal.clone());
        }
        source = e.source();
    }
    None
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = *self;
        Box::pin(async move {
            let host = name.as_str();
            // The connector sets the port itself.
            let addrs =
                resolve(host, 0).await.map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?;
            let addrs = guard
                .vet(host, addrs)
                .map_err(|refusal| io::Error::new(io::ErrorKind::PermissionDenied, refusal))?;
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    use crate::config::ProxyConfig;

    /// Asserts `is_internal` gives `expected` for each whitespace-separated address.
    fn assert_internal(addrs: &str, expected: bool) {
        for ip in addrs.split_whitespace() {
            assert_eq!(is_internal(ip.parse().unwrap()), expected, "{ip}");
        }
    }

    #[test]
    fn internal_ipv4_ranges_and_their_boundaries() {
        assert_internal(
            "0.0.0.0 0.255.255.255 127.0.0.1 127.255.255.254 10.0.0.0 10.255.255.255 172.16.0.0
             172.31.255.255 192.168.0.1 192.168.255.255 169.254.0.0 169.254.169.254 100.64.0.0
             100.127.255.255 192.0.0.0 192.0.0.255 192.0.2.1 198.51.100.7 203.0.113.9 198.18.0.0
             198.19.255.255 224.0.0.1 239.255.255.255 240.0.0.1 255.255.255.255 192.88.99.1",
            true,
        );
        assert_internal(
            "1.1.1.1 8.8.8.8 1.0.0.0 126.255.255.255 128.0.0.0 9.255.255.255 11.0.0.0
             172.15.255.255 172.32.0.0 192.167.255.255 192.169.0.0 169.253.255.255 169.255.0.0
             100.63.255.255 100.128.0.0 191.255.255.255 192.0.1.0 192.0.3.0 198.51.99.255
             203.0.114.0 198.17.255.255 198.20.0.0 223.255.255.255",
            false,
        );
    }

    #[test]
    fn internal_ipv6_ranges_and_embedded_ipv4() {
        assert_internal(
            ":: ::1 fc00::1 fdff:ffff::1 fe80::1 febf::1 fec0::1 ff02::1 2001:db8::1
             2001:db8:ffff::1 100::1 100::ffff:ffff:ffff:ffff ::ffff:127.0.0.1 ::ffff:10.0.0.1
             ::ffff:169.254.169.254 ::127.0.0.1 ::192.168.1.1 64:ff9b::a9fe:a9fe
             64:ff9b::127.0.0.1 64:ff9b:1::1 2002:7f00:1:: 2002:a00:1::1 ::ffff:0:7f00:1
             ::ffff:0:101:101 2001::1 2001:0:4136:e378:8000:63bf:3fff:fdd2",
            true,
        );
        assert_internal(
            "2606:4700::1111 2001:4860:4860::8888 fbff::1 fe7f::1 2001:db9::1 2001:db7::1
             100:0:0:1::1 ::ffff:1.1.1.1 ::1.1.1.1 64:ff9b::1.1.1.1 2002:101:101::1 2001:1::1
             2001:4860::1",
            false,
        );
    }

    fn policy(globs: &[&str], allow_internal: bool) -> EndpointPolicy {
        let globs: Vec<String> = globs.iter().map(|g| g.to_string()).collect();
        EndpointPolicy::new(&globs, allow_internal)
    }

    #[tokio::test]
    async fn check_refuses_internal_and_malformed_endpoints() {
        let any = policy(&[], false);
        for url in [
            "https://127.0.0.1/x",
            "https://10.1.2.3/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://localhost/",
        ] {
            assert!(matches!(any.check(url).await, Err(Refusal::Internal { .. })), "{url}");
        }
        // Numeric and dotted forms the system resolver reads as 127.0.0.1.
        for url in ["https://2130706433/", "https://0x7f.1/", "https://127.1/"] {
            assert!(matches!(any.check(url).await, Err(Refusal::Internal { .. })), "{url}");
        }
        // A trailing dot: internal, or not resolvable at all, depending on the resolver.
        assert!(any.check("https://localhost./").await.is_err());
        assert_eq!(any.check("http://push.example.org/").await.unwrap_err(), Refusal::Scheme);
        assert_eq!(any.check("https://user:pw@host/").await.unwrap_err(), Refusal::UserInfo);
        for garbage in ["not a url", "", "/relative/path", "https://", "push.example.org"] {
            assert!(any.check(garbage).await.is_err(), "{garbage:?}");
        }
        let only = policy(&["*.Push.Example.org", "ntfy.example.org"], false);
        let refused = only.check("https://evil.example.net/up").await.unwrap_err();
        assert_eq!(refused, Refusal::HostNotAllowed { host: "evil.example.net".into() });
        let bare = only.check("https://push.example.org/").await.unwrap_err();
        assert!(matches!(bare, Refusal::HostNotAllowed { .. }));
        // Matching the globs is not enough: the addresses are still checked.
        let local = policy(&["Local*"], false).check("https://LOCALHOST:8443/").await;
        assert_eq!(local.unwrap_err(), Refusal::Internal { host: "localhost".into() });
    }

    #[tokio::test]
    async fn check_allows_public_and_permitted_internal_endpoints() {
        let ok = policy(&[], false).check("https://1.1.1.1/push/abc").await.unwrap();
        assert_eq!(ok.addrs, vec!["1.1.1.1:443".parse().unwrap()]);
        let ok = policy(&["2606:4700::1111"], false).check("https://[2606:4700::1111]/").await;
        assert_eq!(ok.unwrap().host, "2606:4700::1111");

        let tests = policy(&["127.0.0.1", "localhost"], true);
        let ok = tests.check("https://127.0.0.1:8443/up").await.unwrap();
        assert_eq!(
            (ok.host.as_str(), ok.addrs[0]),
            ("127.0.0.1", "127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(ok.uri.path(), "/up");
        let ok = tests.check("http://localhost/up").await.unwrap();
        assert!(ok.addrs.contains(&"127.0.0.1:80".parse().unwrap()), "{ok:?}");
        assert!(!format!("{ok:?}").contains("/up"));
    }

    #[tokio::test]
    async fn refusals_never_show_the_path_or_query() {
        let only = policy(&["*.example.org"], false);
        for url in [
            "https://10.1.2.3/secret-path?token=s3cr3t",
            "http://push.example.org/secret-path?token=s3cr3t",
            "https://user:pw@push.example.org/secret-path?token=s3cr3t",
            "https://evil.test/secret-path?token=s3cr3t",
            "https://[::1/secret-path?token=s3cr3t",
        ] {
            let shown = only.check(url).await.unwrap_err().to_string();
            assert!(!shown.contains("secret") && !shown.contains("s3cr3t"), "{shown}");
        }
    }

    #[tokio::test]
    async fn guarded_resolver_refuses_internal_names_unless_allowed() {
        let name: Name = "localhost".parse().unwrap();
        let err = GuardedResolver::new(false).oneshot(name.clone()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("localhost"), "{err}");
        let addrs: Vec<SocketAddr> =
            GuardedResolver::new(true).oneshot(name).await.unwrap().collect();
        assert!(addrs.iter().any(|a| a.ip() == IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }

    #[tokio::test]
    async fn connector_with_the_resolver_never_connects_to_an_internal_name() {
        use hyper_util::client::legacy::connect::HttpConnector;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let uri: Uri = format!("http://localhost:{port}/").parse().unwrap();

        let connector = HttpConnector::new_with_resolver(GuardedResolver::new(false));
        let err = connector.oneshot(uri.clone()).await.unwrap_err();
        let cause = std::error::Error::source(&err).map(|c| c.to_string()).unwrap_or_default();
        assert!(cause.contains("internal address"), "{err}: {cause}");

        let connector = HttpConnector::new_with_resolver(GuardedResolver::new(true));
        let allowed = connector.oneshot(uri).await.unwrap();
        // The first connection the listener sees is the allowed one: the refused never came.
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, allowed.inner().local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_name_refused_at_connect_time_fails_without_retry_or_connection() {
        // Stands for a name whose DNS answer changed after the check (rebinding): the request
        // reaches the client as if the check had passed, directly or through a proxy.
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = EndpointsConfig {
            allowed_endpoints: vec![],
            allow_internal_endpoints: false,
            ttl: Duration::from_secs(60),
            extra_roots: vec![],
            max_concurrency: 4,
            max_concurrency_per_host: 4,
        };
        let through = ProxyConfig {
            uri: format!("http://{}", proxy.local_addr().unwrap()).parse().unwrap(),
            authorization: None,
        };
        let port = target.local_addr().unwrap().port();
        for via in [None, Some(&through)] {
            let metrics = Arc::new(Metrics::new());
            let labels = metrics.app_labels("up", "unifiedpush");
            let client = EndpointClient::new(&config, via, labels, metrics.clone()).unwrap();
            let checked = Checked {
                uri: format!("https://localhost:{port}/up").parse().unwrap(),
                host: "localhost".into(),
                addrs: vec![],
            };
            let build = |c: &Checked, _: Size| {
                Ok(Request::post(c.uri.clone()).body(Full::new(Bytes::new())).unwrap())
            };
            match client.exchange(&checked, &build, Size::Full).await {
                Exchanged::Done(Outcome::Failed(why)) => {
                    assert!(why.contains("internal address"), "{why}")
                }
                Exchanged::Done(other) => panic!("expected a refusal, got {other:?}"),
                Exchanged::TooLarge => panic!("expected a refusal, got 413"),
            }
            let shown = metrics.render();
            assert!(shown.contains(r#"status="refused"} 1"#), "{shown}");
        }
        // The first connection either listener sees is this one: the refused never came.
        for listener in [target, proxy] {
            let ours =
                tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(peer, ours.local_addr().unwrap());
        }
    }
}
