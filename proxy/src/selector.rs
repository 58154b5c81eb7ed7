//! The two selection algorithms behind one type: Pingora's `LoadBalancer` is generic over the
//! algorithm, a balancer's algorithm comes from configuration. When no backend is healthy, any
//! is chosen (see [`Selector::select`]).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lb_config::{HealthCheck, HealthKind, Selection};
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};

use crate::discovery::Pushed;
use crate::health_log::HealthLog;

pub struct Selector {
    lb: Lb,
    /// Turns of the round robin over every backend, used when none is healthy.
    fallback_turn: AtomicUsize,
}

enum Lb {
    RoundRobin(LoadBalancer<RoundRobin>),
    Consistent(LoadBalancer<Consistent>),
}

/// How far a selection walks before it gives up finding a healthy backend not yet tried.
const MAX_ITERATIONS: usize = 256;

impl Selector {
    pub fn new(
        selection: Selection,
        discovery: Pushed,
        health: &HealthCheck,
        log: &HealthLog,
    ) -> Selector {
        let mut backends = Backends::new(Box::new(discovery));
        backends.set_health_check(health_check(health, log));
        let lb = match selection {
            Selection::RoundRobin => Lb::RoundRobin(LoadBalancer::from_backends(backends)),
            Selection::Consistent => Lb::Consistent(LoadBalancer::from_backends(backends)),
        };
        Selector {
            lb,
            fallback_turn: AtomicUsize::new(0),
        }
    }

    /// Re-reads the pushed set and rebuilds the selection.
    pub async fn update(&self) {
        // `Pushed::discover` cannot fail.
        let _ = match &self.lb {
            Lb::RoundRobin(lb) => lb.update().await,
            Lb::Consistent(lb) => lb.update().await,
        };
    }

    pub fn backends(&self) -> &Backends {
        match &self.lb {
            Lb::RoundRobin(lb) => lb.backends(),
            Lb::Consistent(lb) => lb.backends(),
        }
    }

    /// A healthy backend that `skip` does not refuse; when no such backend is left, any backend
    /// `skip` does not refuse. Checks that fail on every backend at once more likely say the
    /// checks are too strict for the moment (an overloaded host answering slower than the
    /// check's timeout) than that every backend is down, so requests still go out, as Envoy's
    /// panic routing does, rather than all being answered 503; a backend that is really down
    /// refuses the connect, which is retried on another.
    pub fn select(&self, key: &[u8], skip: impl Fn(&SocketAddr) -> bool) -> Option<Backend> {
        let untried = |b: &Backend| b.addr.as_inet().is_none_or(|a| !skip(a));
        let accept = |b: &Backend, healthy: bool| healthy && untried(b);
        let healthy = match &self.lb {
            Lb::RoundRobin(lb) => lb.select_with(key, MAX_ITERATIONS, accept),
            Lb::Consistent(lb) => lb.select_with(key, MAX_ITERATIONS, accept),
        };
        healthy.or_else(|| {
            // Not through `select_with`: its walk over backends it refuses advances the round
            // robin by a fixed count, which would send every such request to one backend.
            let left: Vec<Backend> = self
                .backends()
                .get_backend()
                .iter()
                .filter(|b| untried(b))
                .cloned()
                .collect();
            if left.is_empty() {
                return None;
            }
            let turn = match &self.lb {
                Lb::RoundRobin(_) => self.fallback_turn.fetch_add(1, Ordering::Relaxed),
                Lb::Consistent(_) => {
                    let mut h = std::hash::DefaultHasher::new();
                    key.hash(&mut h);
                    h.finish() as usize
                }
            };
            let b = left[turn % left.len()].clone();
            tracing::debug!(backend = ?b.addr, "no healthy backend left: sending to an unhealthy one");
            Some(b)
        })
    }

    /// Every backend with whether it is taken to be healthy now.
    pub fn health(&self) -> Vec<(SocketAddr, bool)> {
        let b = self.backends();
        b.get_backend()
            .iter()
            .filter_map(|x| x.addr.as_inet().map(|a| (*a, b.ready(x))))
            .collect()
    }
}

fn health_check(
    h: &HealthCheck,
    log: &HealthLog,
) -> Box<dyn pingora::lb::health_check::HealthCheck + Send + Sync> {
    let timeout = Some(Duration::from_millis(h.timeout_ms));
    match h.kind {
        HealthKind::Tcp => {
            let mut hc = TcpHealthCheck::new();
            hc.peer_template.options.connection_timeout = timeout;
            hc.health_changed_callback = Some(Box::new(log.clone()));
            hc
        }
        HealthKind::Http => {
            let mut hc = HttpHealthCheck::new("backend", false);
            hc.req.set_uri(
                h.path
                    .parse()
                    .unwrap_or_else(|_| http::Uri::from_static("/")),
            );
            hc.peer_template.options.connection_timeout = timeout;
            hc.peer_template.options.read_timeout = timeout;
            hc.health_changed_callback = Some(Box::new(log.clone()));
            Box::new(hc)
        }
    }
}
