//! The fake upstream the load test aims herald at: APNs (TLS, ALPN `h2` only) and FCM HTTP v1
//! plus its OAuth2 token endpoint (TLS, `h2` or `http/1.1`), each on its own loopback port.
//!
//! It shares a core with the load generator, so it must stay cheap: every send is answered 200
//! at once (or after `delay`), nothing is checked (no JWT verification) and nothing is stored
//! but per-route counters. The integration tests' fakes (`tests/integration/support/`) are the
//! strict ones.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const FCM_SEND_ANSWER: &str = r#"{"name":"projects/herald-bench/messages/0:1"}"#;
const TOKEN_ANSWER: &str =
    r#"{"access_token":"ya29.herald-bench","expires_in":3600,"token_type":"Bearer"}"#;
const APNS_ID: &str = "9f1c0a8e-0c5e-4c57-a1f0-1f0d4f8c3b21";

/// Requests served so far, by route.
#[derive(Debug, Default)]
pub struct Counts {
    apns_connections: AtomicU64,
    fcm_connections: AtomicU64,
    apns: AtomicU64,
    fcm: AtomicU64,
    token: AtomicU64,
    push: AtomicU64,
    other: AtomicU64,
}

/// A snapshot of [`Counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// TLS connections accepted.
    pub apns_connections: u64,
    pub fcm_connections: u64,
    pub apns: u64,
    pub fcm: u64,
    pub token: u64,
    /// WebPush and UnifiedPush deliveries.
    pub push: u64,
    pub other: u64,
}

impl Served {
    pub fn since(self, earlier: Served) -> Served {
        Served {
            apns_connections: self.apns_connections - earlier.apns_connections,
            fcm_connections: self.fcm_connections - earlier.fcm_connections,
            apns: self.apns - earlier.apns,
            fcm: self.fcm - earlier.fcm,
            token: self.token - earlier.token,
            push: self.push - earlier.push,
            other: self.other - earlier.other,
        }
    }

    pub fn sends(self) -> u64 {
        self.apns + self.fcm + self.push
    }
}

/// The running fake; its tasks live on the current runtime until it ends.
pub struct FakeUpstream {
    pub apns: SocketAddr,
    pub fcm: SocketAddr,
    /// The test CA herald must trust (`ca_file`).
    pub ca_pem: String,
    counts: Arc<Counts>,
}

impl FakeUpstream {
    /// Binds both listeners on 127.0.0.1 and starts serving.
    pub async fn start(delay: Duration) -> io::Result<FakeUpstream> {
        let (ca_pem, cert, key) = test_ca();
        let counts = Arc::new(Counts::default());
        let apns = listen(tls(&cert, &key, &[b"h2"]), Service::Apns, delay, counts.clone()).await?;
        let fcm_alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
        let fcm = listen(tls(&cert, &key, fcm_alpn), Service::Fcm, delay, counts.clone()).await?;
        Ok(FakeUpstream { apns, fcm, ca_pem, counts })
    }

    pub fn served(&self) -> Served {
        Served {
            apns_connections: self.counts.apns_connections.load(Ordering::Relaxed),
            fcm_connections: self.counts.fcm_connections.load(Ordering::Relaxed),
            apns: self.counts.apns.load(Ordering::Relaxed),
            fcm: self.counts.fcm.load(Ordering::Relaxed),
            token: self.counts.token.load(Ordering::Relaxed),
            push: self.counts.push.load(Ordering::Relaxed),
            other: self.counts.other.load(Ordering::Relaxed),
        }
    }
}

/// A throw-away root CA and a server certificate for `127.0.0.1`/`localhost` signed by it.
fn test_ca() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().expect("generate CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, "herald loadtest CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).expect("self-sign CA");

    let key = KeyPair::generate().expect("generate server key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("sign server cert");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (ca.pem(), cert.der().clone(), key)
}

fn tls(
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key.clone_key())
    .expect("server certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

/// Which listener: only for counting connections (any route is served on either).
#[derive(Clone, Copy)]
enum Service {
    Apns,
    Fcm,
}

async fn listen(
    tls: TlsAcceptor,
    service: Service,
    delay: Duration,
    counts: Arc<Counts>,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut builder = Builder::new(TokioExecutor::new());
    // Like APNs, allow many streams per connection, so herald's own limit is what counts.
    builder.http2().max_concurrent_streams(1000);
    let builder = Arc::new(builder);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let _ = tcp.set_nodelay(true);
            match service {
                Service::Apns => &counts.apns_connections,
                Service::Fcm => &counts.fcm_connections,
            }
            .fetch_add(1, Ordering::Relaxed);
            let (tls, builder, counts) = (tls.clone(), builder.clone(), counts.clone());
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else { return };
                let service = service_fn(move |req| answer(req, delay, counts.clone()));
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(addr)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Apns,
    FcmSend,
    Token,
    /// A WebPush or UnifiedPush endpoint: 201 Created.
    Push,
    Unknown,
}

impl Route {
    fn of(path: &str) -> Route {
        if path.starts_with("/3/device/") {
            Route::Apns
        } else if path.ends_with("/messages:send") {
            Route::FcmSend
        } else if path == "/token" {
            Route::Token
        } else if path.starts_with("/wp/") || path.starts_with("/up/") {
            Route::Push
        } else {
            Route::Unknown
        }
    }
}

async fn answer(
    req: Request<Incoming>,
    delay: Duration,
    counts: Arc<Counts>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let route = Route::of(req.uri().path());
    let (counter, status, body) = match route {
        Route::Apns => (&counts.apns, StatusCode::OK, ""),
        Route::FcmSend => (&counts.fcm, StatusCode::OK, FCM_SEND_ANSWER),
        Route::Token => (&counts.token, StatusCode::OK, TOKEN_ANSWER),
        Route::Push => (&counts.push, StatusCode::CREATED, ""),
        Route::Unknown => (&counts.other, StatusCode::NOT_FOUND, ""),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    // Read the whole body, as the real services do (and so h2 flow control moves on).
    let _ = req.into_body().collect().await;
    if !delay.is_zero() && route != Route::Token {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::builder().status(status);
    response = match route {
        Route::Apns => response.header("apns-id", APNS_ID),
        _ => response.header(header::CONTENT_TYPE, "application/json"),
    };
    Ok(response.body(Full::new(Bytes::from_static(body.as_bytes()))).expect("static response"))
}
