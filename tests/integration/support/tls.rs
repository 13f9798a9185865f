//! A throw-away certificate authority for the loopback fakes.
//!
//! [`TestCa`] is an ECDSA P-256 root built with `rcgen`. It issues one server
//! certificate (valid for `localhost` and the IP SAN `127.0.0.1`) used by every
//! TLS fake, and client certificates on demand (for APNs certificate auth).
//!
//! Every rustls config built here uses `rustls::crypto::ring::default_provider()`
//! explicitly, so nothing depends on a process-wide default crypto provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The crypto provider every test TLS config uses (ring; never aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test root CA plus the server certificate it issued for `localhost`/`127.0.0.1`.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
    server_cert: CertificateDer<'static>,
    server_key_der: Vec<u8>,
    /// The same server certificate and key, PEM encoded, for servers that read files.
    server_pem: (String, String),
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// Creates a fresh CA and a server certificate signed by it.
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = dn("herald test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign CA");

        let server_key = KeyPair::generate().expect("generate server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params.distinguished_name = dn("localhost");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params.signed_by(&server_key, &cert, &key).expect("sign server cert");

        TestCa {
            server_cert: server_cert.der().clone(),
            server_key_der: server_key.serialize_der(),
            server_pem: (server_cert.pem(), server_key.serialize_pem()),
            cert,
            key,
        }
    }

    /// The CA certificate, PEM encoded (what the gateway is told to trust).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The `localhost`/`127.0.0.1` server certificate and its key, PEM encoded.
    pub fn server_pem(&self) -> (&str, &str) {
        (&self.server_pem.0, &self.server_pem.1)
    }

    /// The CA certificate, DER encoded.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A root store holding only this CA.
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der()).expect("add test CA to root store");
        roots
    }

    /// Server config presenting the `localhost`/`127.0.0.1` certificate, no client auth.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], self.server_key())
            .expect("server cert/key");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Server config that *requires* a client certificate issued by this CA.
    pub fn server_config_requiring_client_cert(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.root_store()), provider())
                .build()
                .expect("client cert verifier");
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server_cert.clone()], self.server_key())
            .expect("server cert/key");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Issues a client certificate with common name `cn`.
    ///
    /// Returns `(cert_pem, key_pem)`; the key is PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub fn issue_client_cert(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().expect("generate client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name = dn(cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign client cert");
        (cert.pem(), key.serialize_pem())
    }

    /// A client config trusting only this CA, optionally presenting a client
    /// certificate given as `(cert_pem, key_pem)`. ALPN is left empty (hyper-rustls
    /// sets it from the protocols enabled on the connector).
    pub fn client_config(&self, client_cert: Option<(&str, &str)>) -> ClientConfig {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(self.root_store());
        match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("parse client cert PEM");
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .expect("parse client key PEM");
                builder.with_client_auth_cert(certs, key).expect("client cert/key")
            }
        }
    }

    fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()))
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Writes `contents` to `dir/name` and returns the full path.
pub fn write_file(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
