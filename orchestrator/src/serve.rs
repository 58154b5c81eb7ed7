//! The HTTP server loop both APIs (control plane and worker) run: a cap on open connections, a
//! deadline on request headers (which also closes idle keep-alive connections), and a Host
//! check against DNS rebinding (a web page whose name resolves to 127.0.0.1 must not reach the
//! API with the browser's help). `axum::serve` offers none of the first two, so this loop
//! accepts itself and hands each connection to hyper's HTTP/1 connection builder.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::ApiError;

/// Limits of one server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and an idle keep-alive connection to
    /// start its next request).
    pub header_timeout: Duration,
    /// Host names (besides IP addresses and `localhost`) clients may address the server by.
    pub allowed_hosts: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(15),
            allowed_hosts: Vec::new(),
        }
    }
}

/// Serves `app` on `listener` within `limits` (over TLS with `tls`, which asks clients for
/// their certificates) until `shutdown` is cancelled; connections in progress then finish
/// their request.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let hosts = Arc::new(limits.allowed_hosts.clone());
    let app = app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let hosts = hosts.clone();
            async move { check_host(&hosts, req, next).await }
        },
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // A slot first: past the cap, connections wait in the kernel's backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let service = TowerToHyperService::new(app.clone());
        let timeout = limits.header_timeout;
        let stop = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Some(tls) = tls else {
                return serve_connection(stream, service, timeout, stop, peer).await;
            };
            // The handshake shares the header deadline: a silent client holds no slot longer.
            match tokio::time::timeout(timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, service, timeout, stop, peer).await,
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "refused: TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// One connection's requests, until it closes or the server stops.
async fn serve_connection<I>(
    io: I,
    service: TowerToHyperService<Router>,
    timeout: Duration,
    stop: CancellationToken,
    peer: std::net::SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

/// 421 unless the request's Host is an IP address, `localhost` or one of `allowed`.
async fn check_host(allowed: &[String], req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if host_allowed(host, allowed) {
        return next.run(req).await;
    }
    tracing::warn!(
        host,
        path = %req.uri().path(),
        "refused: Host is not an address of this server or an allowed name"
    );
    ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "Host {host:?} is not an IP address, localhost or a name this server was started \
             with (--allowed-host)"
        ),
    )
    .into_response()
}

/// Whether `host` (a Host header: name or address, optional port) may address this server.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((addr, tail)) if tail.is_empty() || valid_port(tail) => {
                return addr.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(&format!(":{port}")) => name,
            Some(_) => return false,
            None => host,
        }
    };
    if name.is_empty() {
        return false;
    }
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

fn valid_port(tail: &str) -> bool {
    tail.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_by_address_localhost_or_allowed_name() {
        let allowed = vec!["cp.example".to_string()];
        for ok in [
            "127.0.0.1:7070",
            "10.0.0.1",
            "[::1]:7070",
            "[fe80::1]",
            "localhost:7070",
            "LOCALHOST",
            "cp.example:7070",
            "CP.example",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:7070",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "[::1",
            "[nonsense]:80",
            "127.0.0.1:port",
            "127.0.0.1:99999",
            ":7070",
            "cp.example.evil:7070",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }
}
