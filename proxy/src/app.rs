//! The per-request logic Pingora calls: pick a healthy backend, retry a connect failure on
//! another one, count requests in flight (what a drain waits for).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};

use crate::selector::Selector;

/// Other backends tried after a failed connect, per request.
const CONNECT_RETRIES: usize = 2;
/// How long a connect to a backend may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters of one balancer.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
}

/// Lives as long as one request: counted in flight until it is dropped, however the request
/// ends.
pub struct InFlight(Arc<Stats>);

impl InFlight {
    fn new(stats: &Arc<Stats>) -> InFlight {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How requests are spread: swapped whole when the balancer's selection or health settings
/// change, so that a running service takes them without stopping (Pingora closes the
/// connections a stopping service accepted and has not read a request from).
pub struct Routing {
    pub selector: Arc<Selector>,
    /// Whether selection hashes the client's address (round robin needs no key).
    pub hash_key: bool,
}

pub struct App {
    pub routing: Arc<RwLock<Arc<Routing>>>,
    pub stats: Arc<Stats>,
}

impl App {
    fn routing(&self) -> Arc<Routing> {
        self.routing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct Ctx {
    _in_flight: InFlight,
    tried: Vec<SocketAddr>,
}

#[async_trait]
impl ProxyHttp for App {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _in_flight: InFlight::new(&self.stats),
            tried: Vec::new(),
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let routing = self.routing();
        // The client's IP is the key of consistent hashing (round robin ignores it).
        let key = match session.client_addr().and_then(|a| a.as_inet()) {
            Some(a) if routing.hash_key => a.ip().to_string(),
            _ => String::new(),
        };
        let tried = &ctx.tried;
        let backend = routing
            .selector
            .select(key.as_bytes(), |a| tried.contains(a))
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no backend that was not tried already",
                )
            })?;
        let Some(addr) = backend.addr.as_inet().copied() else {
            return Err(Error::explain(
                InternalError,
                "a backend without an IP address",
            ));
        };
        ctx.tried.push(addr);
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent: the request can go to another backend (one that just stopped, or
        // that the health check has not caught yet).
        if ctx.tried.len() <= CONNECT_RETRIES {
            tracing::debug!(%peer, "connect failed; trying another backend");
            e.set_retry(true);
        }
        e
    }
}
