//! Mutual TLS for every connection between components: each holds a certificate of the
//! cluster's CA (`lightbyte pki`) and trusts that CA only. A server asks every client for its
//! certificate and refuses those the CA did not sign; a client checks the server's name or
//! address against its certificate. The same files serve a process both ways (components are
//! servers and clients of each other) and for etcd.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A process's CA, certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// ring, which etcd's client (tonic) uses too; rustls deprecates it for lacking post-quantum
/// key exchange, whose provider (aws-lc-rs) would add a second crypto library to the build.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_err(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl TlsFiles {
    /// From the three paths given together (or none of them).
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles { ca, cert, key })),
            (None, None, None) => Ok(None),
            _ => Err(TlsError::Setup(
                "--ca, --cert and --key go together (lightbyte pki issue makes them)".into(),
            )),
        }
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).map_err(pem_err(&self.ca))? {
            roots
                .add(cert.map_err(pem_err(&self.ca))?)
                .map_err(|e| TlsError::File {
                    path: self.ca.clone(),
                    reason: e.to_string(),
                })?;
        }
        if roots.is_empty() {
            return Err(TlsError::File {
                path: self.ca.clone(),
                reason: "no certificate in it".into(),
            });
        }
        Ok(roots)
    }

    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .map_err(pem_err(&self.cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err(&self.cert))?;
        if certs.is_empty() {
            return Err(TlsError::File {
                path: self.cert.clone(),
                reason: "no certificate in it".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(pem_err(&self.key))?;
        Ok((certs, key))
    }

    /// A server that asks every client for a certificate of the CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                .build()
                .map_err(|e| TlsError::Setup(e.to_string()))?;
        let (certs, key) = self.identity()?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Setup(format!("{}: {e}", self.cert.display())))?;
        Ok(Arc::new(config))
    }

    /// A client that trusts the CA only and presents this certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let (certs, key) = self.identity()?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError::Setup(format!("{}: {e}", self.cert.display())))?;
        Ok(Arc::new(config))
    }

    /// The options etcd's client connects with.
    pub fn etcd_options(&self) -> Result<etcd_client::TlsOptions, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| TlsError::File {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })
        };
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?))
            .identity(etcd_client::Identity::from_pem(
                read(&self.cert)?,
                read(&self.key)?,
            )))
    }
}

static OWN: OnceLock<TlsFiles> = OnceLock::new();

/// Sets this process's TLS files (once, at start-up): its clients use them from then on.
pub fn set_own(files: TlsFiles) -> Result<(), TlsError> {
    // Fail now, not at the first request.
    files.client_config()?;
    let _ = OWN.set(files);
    Ok(())
}

pub fn own() -> Option<&'static TlsFiles> {
    OWN.get()
}

/// The scheme this process reaches other components with.
pub fn scheme() -> &'static str {
    if own().is_some() {
        "https"
    } else {
        "http"
    }
}

pub type Connector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// What clients of this process connect with: TLS with its files for https URLs (an https URL
/// without them fails: no CA is trusted), plain TCP for http ones.
pub fn connector(connect_timeout: std::time::Duration) -> Connector {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.enforce_http(false);
    let config = own()
        .and_then(|f| f.client_config().ok())
        .unwrap_or_else(|| {
            Arc::new(
                ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            )
        });
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*config).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}
