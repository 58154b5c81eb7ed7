//! Mutual TLS: only clients holding a certificate of the cluster's CA reach the API, clients
//! trust only servers of that CA, and etcd asks the control plane for its certificate too.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::{control_plane, http_async, Etcd};
use orchestrator::tls::TlsFiles;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A CA of its own with one certificate for 127.0.0.1: what an outsider could make.
fn foreign(dir: &std::path::Path) -> TlsFiles {
    orchestrator::pki::init(dir, "someone else's CA").unwrap();
    let (cert, key) = orchestrator::pki::issue(dir, "intruder", &["127.0.0.1".into()]).unwrap();
    TlsFiles {
        ca: dir.join("ca.crt"),
        cert,
        key,
    }
}

#[allow(deprecated)]
fn builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
}

fn roots(ca: &std::path::Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// `GET /healthz` over TLS with `config`: the status line, or why there is none.
fn healthz(addr: SocketAddr, config: rustls::ClientConfig) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    let read = s.read_to_string(&mut resp);
    match resp.lines().next() {
        Some(line) if !line.is_empty() => Ok(line.to_string()),
        _ => Err(format!("no answer: {read:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_of_the_ca_get_in_and_clients_trust_only_its_servers() {
    let etcd = Etcd::start();
    let plane = control_plane(&etcd, "cp").await;
    let addr = plane.addr();
    let ours = common::tls_files();
    let tmp = tempfile::tempdir().unwrap();
    let theirs = foreign(&tmp.path().join("pki"));
    let identity = |f: &TlsFiles| {
        let certs: Vec<_> = CertificateDer::pem_file_iter(&f.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        (certs, PrivateKeyDer::from_pem_file(&f.key).unwrap())
    };
    let cases = {
        let (ours, theirs) = (ours.clone(), theirs.clone());
        move || {
            let ok = ours.client_config().unwrap();
            let no_cert = builder()
                .with_root_certificates(roots(&ours.ca))
                .with_no_client_auth();
            let (c, k) = identity(&theirs);
            let foreign_cert = builder()
                .with_root_certificates(roots(&ours.ca))
                .with_client_auth_cert(c, k)
                .unwrap();
            let (c, k) = identity(&ours);
            let trusts_other = builder()
                .with_root_certificates(roots(&theirs.ca))
                .with_client_auth_cert(c, k)
                .unwrap();
            // Plain HTTP to the TLS port.
            let mut tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // The server may drop the connection on the first bytes that are not a TLS
            // record, before the write ends (EPIPE, ECONNRESET): that is a refusal too.
            let mut plain = Vec::new();
            if write!(tcp, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").is_ok() {
                let _ = tcp.read_to_end(&mut plain);
            }
            (
                healthz(addr, (*ok).clone()),
                healthz(addr, no_cert),
                healthz(addr, foreign_cert),
                healthz(addr, trusts_other),
                String::from_utf8_lossy(&plain).into_owned(),
            )
        }
    };
    let (ok, no_cert, foreign_cert, trusts_other, plain) =
        tokio::task::spawn_blocking(cases).await.unwrap();
    assert_eq!(ok.as_deref(), Ok("HTTP/1.1 200 OK"));
    assert!(no_cert.is_err(), "no client certificate: {no_cert:?}");
    assert!(
        foreign_cert.is_err(),
        "a certificate of another CA: {foreign_cert:?}"
    );
    let why = trusts_other.unwrap_err();
    assert!(
        why.contains("UnknownIssuer") || why.contains("certificate"),
        "{why}"
    );
    assert!(!plain.contains("200 OK"), "plain HTTP answered: {plain}");
    // The API client over TLS, as the CLI uses it.
    let (status, _) = http_async(addr, "GET", "/api/v1/images", None).await;
    assert_eq!(status, 200);
    plane.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_asks_for_a_client_certificate_and_the_control_plane_has_one() {
    let etcd = Etcd::start_tls();
    assert!(etcd.url().starts_with("https://"));
    let plane = control_plane(&etcd, "cp").await;
    let image = r#"{"metadata": {"name": "base"}, "spec": {"path": "/img/base.qcow2"}}"#;
    let (status, body) = http_async(plane.addr(), "POST", "/api/v1/images", Some(image)).await;
    assert_eq!(status, 201, "{body}");
    let mut raw = etcd.client().await;
    let got = raw.get("/lightbyte/image/base", None).await.unwrap();
    assert_eq!(got.kvs().len(), 1);
    // Without a certificate: TLS trusting the CA, but no identity.
    let ca = std::fs::read(&common::tls_files().ca).unwrap();
    let anonymous = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(3))
        .with_tls(
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca)),
        );
    let refused = async {
        let mut c = etcd_client::Client::connect([etcd.url()], Some(anonymous)).await?;
        c.get("/lightbyte/image/base", None).await
    }
    .await;
    assert!(
        refused.is_err(),
        "etcd answered a client without a certificate"
    );
    // Plain HTTP to etcd's TLS port.
    let plain = async {
        let url = etcd.url().replace("https://", "http://");
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(3));
        let mut c = etcd_client::Client::connect([url], Some(opts)).await?;
        c.get("/lightbyte/image/base", None).await
    }
    .await;
    assert!(plain.is_err(), "etcd answered plain HTTP");
    plane.shutdown(Duration::from_secs(2)).await;
}
