//! The two selection algorithms behind one type: Pingora's `LoadBalancer` is generic over the
//! algorithm, a balancer's algorithm comes from configuration.

use std::net::SocketAddr;
use std::time::Duration;

use lb_config::{HealthCheck, HealthKind, Selection};
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};

use crate::discovery::Pushed;
use crate::health_log::HealthLog;

pub enum Selector {
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
        match selection {
            Selection::RoundRobin => Selector::RoundRobin(LoadBalancer::from_backends(backends)),
            Selection::Consistent => Selector::Consistent(LoadBalancer::from_backends(backends)),
        }
    }

    /// Re-reads the pushed set and rebuilds the selection.
    pub async fn update(&self) {
        // `Pushed::discover` cannot fail.
        let _ = match self {
            Selector::RoundRobin(lb) => lb.update().await,
            Selector::Consistent(lb) => lb.update().await,
        };
    }

    pub fn backends(&self) -> &Backends {
        match self {
            Selector::RoundRobin(lb) => lb.backends(),
            Selector::Consistent(lb) => lb.backends(),
        }
    }

    /// A healthy backend that `skip` does not refuse.
    pub fn select(&self, key: &[u8], skip: impl Fn(&SocketAddr) -> bool) -> Option<Backend> {
        let accept =
            |b: &Backend, healthy: bool| healthy && b.addr.as_inet().is_none_or(|a| !skip(a));
        match self {
            Selector::RoundRobin(lb) => lb.select_with(key, MAX_ITERATIONS, accept),
            Selector::Consistent(lb) => lb.select_with(key, MAX_ITERATIONS, accept),
        }
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
