//! One running balancer: a Pingora HTTP proxy service on its listener, its `LoadBalancer`, and
//! the health checks on their timer.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lb_config::{BackendHealth, BalancerConfig};
use pingora::server::configuration::ServerConf;
use pingora::services::Service as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::{App, Routing, Stats};
use crate::discovery::Pushed;
use crate::gate::Gate;
use crate::health_log::HealthLog;
use crate::listeners::Listeners;
use crate::selector::Selector;

/// How long a stopped balancer waits for connections it accepted to be read before it closes
/// idle ones and counts the requests in flight.
const ACCEPT_SETTLE: Duration = Duration::from_millis(500);

pub struct Balancer {
    pub config: BalancerConfig,
    discovery: Pushed,
    health_log: HealthLog,
    routing: Arc<RwLock<Arc<Routing>>>,
    pub stats: Arc<Stats>,
    stop: watch::Sender<bool>,
    gate: Gate,
    serving: JoinHandle<()>,
    health: JoinHandle<()>,
}

impl Balancer {
    /// Starts accepting on `config.listen` (a socket of `listeners`, bound now if needed).
    pub async fn start(config: BalancerConfig, listeners: &Listeners) -> io::Result<Balancer> {
        let table = listeners.table_for(config.listen)?;
        let discovery = Pushed::default();
        discovery.set(&config.backends);
        let health_log = HealthLog::default();
        let routing = routing_for(&config, &discovery, &health_log).await;
        let health = spawn_health(&routing.selector, &config);
        let routing = Arc::new(RwLock::new(routing));
        let stats = Arc::new(Stats::default());
        let app = App {
            routing: routing.clone(),
            stats: stats.clone(),
        };
        let conf = Arc::new(ServerConf::default());
        let gate = Gate::new(pingora::proxy::http_proxy(&conf, app));
        let mut service =
            pingora::services::listening::Service::new(config.name.clone(), gate.clone());
        service.add_tcp(&config.listen.to_string());
        let (stop, shutdown) = watch::channel(false);
        let serving = tokio::spawn(async move {
            service.start_service(Some(table), shutdown, 1).await;
        });
        tracing::info!(balancer = %config.name, listen = %config.listen, backends = config.backends.len(), "balancer started");
        Ok(Balancer {
            config,
            discovery,
            health_log,
            routing,
            stats,
            stop,
            gate,
            serving,
            health,
        })
    }

    /// Takes `config`, which listens where this balancer does, without stopping the service:
    /// new backends alone update the selection in place; new selection or health settings swap
    /// in a fresh selector (with its own health checks) that the next request uses.
    pub async fn reconfigure(&mut self, config: &BalancerConfig) {
        let mut same = self.config.clone();
        same.backends = config.backends.clone();
        same.drain_grace_secs = config.drain_grace_secs;
        self.discovery.set(&config.backends);
        if same == *config {
            self.selector().update().await;
        } else {
            let routing = routing_for(config, &self.discovery, &self.health_log).await;
            self.health.abort();
            self.health = spawn_health(&routing.selector, config);
            *self.routing.write().unwrap_or_else(|e| e.into_inner()) = routing;
            tracing::info!(balancer = %config.name, selection = ?config.selection, "selection and health settings replaced in place");
        }
        self.config = config.clone();
    }

    fn selector(&self) -> Arc<Selector> {
        self.routing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .selector
            .clone()
    }

    /// Whether `other` can be taken in place: it listens where this balancer does.
    pub fn same_listener(&self, other: &BalancerConfig) -> bool {
        self.config.listen == other.listen
    }

    /// Each backend's health now, and how often it was marked unhealthy.
    pub fn health(&self) -> Vec<BackendHealth> {
        self.selector()
            .health()
            .into_iter()
            .map(|(address, healthy)| BackendHealth {
                address,
                healthy,
                marked_down: self.health_log.marked_down(&address),
            })
            .collect()
    }

    /// Stops accepting at once; `closed` runs once this balancer's listener copy is gone (the
    /// caller frees the port then, when nothing else uses it), then in-flight requests get up to
    /// the drain grace to finish.
    pub async fn drain(self, closed: impl FnOnce()) {
        let name = self.config.name.clone();
        let _ = self.stop.send(true);
        let _ = self.serving.await;
        self.health.abort();
        closed();
        let grace = Duration::from_secs(self.config.drain_grace_secs);
        let start = Instant::now();
        // A connection accepted just before the service stopped may not be read yet (its
        // client sent the request already): give it a moment before idle connections are
        // closed (see `gate`) and before a zero in flight is trusted, since a request counts
        // once its headers are read.
        tokio::time::sleep(ACCEPT_SETTLE.min(grace)).await;
        self.gate.close_idle().await;
        while self.stats.in_flight.load(Ordering::Relaxed) > 0 && start.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.stats.in_flight.load(Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(balancer = %name, left, "drain grace over with requests in flight");
        } else {
            tracing::info!(balancer = %name, took = ?start.elapsed(), "balancer drained");
        }
    }
}

/// The selection `config` asks for over `discovery`'s backends, filled in.
async fn routing_for(config: &BalancerConfig, discovery: &Pushed, log: &HealthLog) -> Arc<Routing> {
    let selector = Arc::new(Selector::new(
        config.selection,
        discovery.clone(),
        &config.health,
        log,
    ));
    selector.update().await;
    Arc::new(Routing {
        selector,
        hash_key: config.selection == lb_config::Selection::Consistent,
    })
}

fn spawn_health(selector: &Arc<Selector>, config: &BalancerConfig) -> JoinHandle<()> {
    tokio::spawn(check_health(
        selector.clone(),
        Duration::from_millis(config.health.interval_ms),
    ))
}

/// Checks every backend now and then every `interval` (in parallel: one slow backend does not
/// delay the verdict on the others).
async fn check_health(selector: Arc<Selector>, interval: Duration) {
    loop {
        let started = Instant::now();
        selector.backends().run_health_check(true).await;
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}
