//! The outbound HTTP client every adapter uses: hyper-util's pooled client over rustls (ring),
//! trusting the embedded webpki roots plus an app's `ca_file`, optionally through an HTTP
//! CONNECT proxy.
//!
//! `https://` URLs negotiate the protocol by ALPN; `http://` URLs are plain TCP, which with
//! [`Protocol::Http2Only`] means HTTP/2 with prior knowledge (h2c) — how tests reach a fake APNs
//! without TLS. Clients are built once per app at startup, never per request.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tower::ServiceExt as _;

use super::endpoint::GuardedResolver;
use crate::config::{ProxyConfig, Upstream};

/// The client type shared by all adapters.
pub type HttpClient = Client<Connector, Full<Bytes>>;

/// Which HTTP versions a client may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// APNs: HTTP/2 only, one multiplexed connection per host.
    Http2Only,
    /// FCM and the rest: HTTP/2 when ALPN offers it, else HTTP/1.1.
    Any,
}

/// A TLS client certificate and its key.
pub struct ClientIdentity<'a> {
    pub chain: &'a [CertificateDer<'static>],
    pub key: &'a PrivateKeyDer<'static>,
}

/// Builds the TLS settings for one upstream: webpki roots plus `extra_roots`, ring provider.
pub fn tls_config(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<ClientIdentity<'_>>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|e| format!("ca_file: unusable certificate ({e})"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("tls: {e}"))?
    .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            builder.with_client_auth_cert(id.chain.to_vec(), id.key.clone_key()).map_err(|e| {
                format!("cert_file: certificate and key do not form a usable identity ({e})")
            })
        }
    }
}

/// Builds a pooled client for an operator-configured `upstream` (any address is fine).
pub fn client(
    upstream: &Upstream,
    proxy: Option<&ProxyConfig>,
    identity: Option<ClientIdentity<'_>>,
    protocol: Protocol,
) -> Result<HttpClient, String> {
    client_with(&upstream.extra_roots, proxy, identity, protocol, GuardedResolver::new(true))
}

/// Builds a pooled client whose connections resolve names through `resolver`; for endpoints
/// that come from devices, one that refuses internal addresses. Through a `proxy`, such a client
/// resolves the name itself and asks the proxy for a tunnel to the vetted address (`CONNECT
/// ip:port`), so the proxy cannot be steered to an internal one; TLS still verifies the name.
/// A client whose resolver allows any address (operator-configured upstreams) asks the proxy
/// for the name, as proxies' domain allow-lists expect.
pub fn client_with(
    extra_roots: &[CertificateDer<'static>],
    proxy: Option<&ProxyConfig>,
    identity: Option<ClientIdentity<'_>>,
    protocol: Protocol,
    resolver: GuardedResolver,
) -> Result<HttpClient, String> {
    let tls = tls_config(extra_roots, identity)?;
    let inner = match proxy {
        None => UpstreamConnector::Direct(tuned(HttpConnector::new_with_resolver(resolver))),
        Some(p) => {
            let mut tunnel = Tunnel::new(p.uri.clone(), tuned(HttpConnector::new()));
            if let Some(auth) = &p.authorization {
                tunnel = tunnel.with_auth(auth.clone());
            }
            UpstreamConnector::Tunnel { tunnel, vet: (!resolver.allows_any()).then_some(resolver) }
        }
    };
    let builder = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    let connector = Connector(match protocol {
        Protocol::Http2Only => builder.enable_http2().wrap_connector(inner),
        Protocol::Any => builder.enable_all_versions().wrap_connector(inner),
    });
    let mut client = Client::builder(TokioExecutor::new());
    client
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(300))
        .http2_keep_alive_interval(Some(Duration::from_secs(60)))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .http2_keep_alive_while_idle(true);
    if protocol == Protocol::Http2Only {
        client.http2_only(true);
    }
    Ok(client.build(connector))
}

fn tuned<R>(mut tcp: HttpConnector<R>) -> HttpConnector<R> {
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(Duration::from_secs(10)));
    tcp.set_keepalive(Some(Duration::from_secs(60)));
    tcp
}

/// TCP straight to the upstream, or through a CONNECT tunnel.
#[derive(Clone)]
pub enum UpstreamConnector {
    Direct(HttpConnector<GuardedResolver>),
    /// `vet`: resolve and vet the name here and tunnel to the address, not to the name.
    Tunnel {
        tunnel: Tunnel<HttpConnector>,
        vet: Option<GuardedResolver>,
    },
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl tower::Service<http::Uri> for UpstreamConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            UpstreamConnector::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            UpstreamConnector::Tunnel { tunnel, .. } => tunnel.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        match self {
            UpstreamConnector::Direct(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            UpstreamConnector::Tunnel { tunnel, vet: None } => {
                let f = tunnel.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            UpstreamConnector::Tunnel { tunnel, vet: Some(vet) } => {
                let (tunnel, vet) = (tunnel.clone(), *vet);
                Box::pin(async move {
                    let dst = vetted_address(dst, vet).await?;
                    tunnel.oneshot(dst).await.map_err(Into::into)
                })
            }
        }
    }
}

/// `dst` with its host replaced by the first address `vet` resolves it to (refusing internal
/// ones); an IP literal host is kept (the endpoint check vetted it).
async fn vetted_address(dst: http::Uri, vet: GuardedResolver) -> Result<http::Uri, BoxError> {
    use hyper_util::client::legacy::connect::dns::Name;
    use std::str::FromStr as _;
    let host = dst.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(dst);
    }
    let name = Name::from_str(host)?;
    let ip = vet.oneshot(name).await?.next().ok_or("the name has no address")?.ip();
    let port = dst.port_u16().unwrap_or(if dst.scheme_str() == Some("https") { 443 } else { 80 });
    let mut parts = dst.into_parts();
    parts.authority = Some(std::net::SocketAddr::new(ip, port).to_string().parse()?);
    Ok(http::Uri::from_parts(parts)?)
}

/// The connector of every [`HttpClient`]: TLS (or plain TCP) over [`UpstreamConnector`], each
/// connection wrapped in [`Coalesced`].
#[derive(Clone)]
pub struct Connector(HttpsConnector<UpstreamConnector>);

/// One upstream connection. It says it has no vectored writes, which is true of what matters:
/// over TLS every write is copied into a record anyway. The h2 crate chains a DATA payload of
/// more than 256 bytes to a vectored-write transport without copying, and then must flush
/// before it can queue the next frame, so every push would cost its own TLS record and
/// `writev`. Told otherwise, h2 copies payloads up to 1 KiB into its write buffer, and the
/// pushes that are ready together leave in one record (measured: one `writev` per request on
/// the upstream connection before, a fraction after).
pub struct Coalesced(MaybeHttpsStream<TokioIo<TcpStream>>);

impl tower::Service<http::Uri> for Connector {
    type Response = Coalesced;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Coalesced, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let connecting = self.0.call(dst);
        Box::pin(async move { connecting.await.map(Coalesced) })
    }
}

impl Connection for Coalesced {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}

impl hyper::rt::Read for Coalesced {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Coalesced {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// A transport-level failure (connect, TLS, reset, GOAWAY), described without URLs or secrets.
pub fn describe_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = String::from(if e.is_connect() { "connect error" } else { "connection error" });
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Upstream answers larger than this are cut off: APNs and FCM error bodies are a few hundred
/// bytes, and nothing herald reads from them is larger.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// One upstream answer, body read (bounded by [`MAX_RESPONSE_BYTES`]).
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Sends `request` and reads the answer. `Err` is a transport failure (connect, TLS, reset,
/// GOAWAY, a body over the limit), described without URLs or secrets.
pub async fn exchange(
    client: &HttpClient,
    request: http::Request<Full<Bytes>>,
) -> Result<Answer, String> {
    use http_body_util::{BodyExt, Limited};
    let response = client.request(request).await.map_err(|e| describe_error(&e))?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading response: {e}"))?
        .to_bytes();
    Ok(Answer { status: parts.status, headers: parts.headers, body })
}
