//! The configuration of a load-balancing proxy (`lightbyte-proxy`): what the control plane
//! pushes, what the proxy validates before it touches anything, and what it reports back.
//!
//! A configuration is the whole desired state of one proxy (every balancer it runs), stamped
//! with a revision: a proxy refuses a revision not above the one it applied, so a push computed
//! from older state (a deposed controller, a retried request) never overwrites a newer one.

pub mod control;
mod status;
mod validate;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use status::{BackendHealth, BalancerStatus, ProxyStatus};
pub use validate::ConfigError;

/// Most balancers in one proxy.
pub const MAX_BALANCERS: usize = 200;
/// Most backends behind one balancer.
pub const MAX_BACKENDS: usize = 1024;

/// Everything one proxy should run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Monotonic: a push whose revision is not above the applied one is refused.
    pub revision: u64,
    #[serde(default)]
    pub balancers: Vec<BalancerConfig>,
}

/// One HTTP load balancer: a listener and the backends it spreads requests over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerConfig {
    /// Unique in the proxy (a DNS label).
    pub name: String,
    /// Where it accepts connections.
    pub listen: SocketAddr,
    /// Where requests go; a backend that leaves gets no new requests, its in-flight ones finish.
    #[serde(default)]
    pub backends: Vec<SocketAddr>,
    #[serde(default)]
    pub selection: Selection,
    #[serde(default)]
    pub health: HealthCheck,
    /// How long in-flight requests may run once the balancer stops accepting (it is removed,
    /// or the proxy is told to stop or hands over to a new binary).
    #[serde(default = "default_drain_grace")]
    pub drain_grace_secs: u64,
}

fn default_drain_grace() -> u64 {
    10
}

/// How a backend is picked for a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// Each healthy backend in turn.
    #[default]
    RoundRobin,
    /// By a consistent hash (Ketama) of the client's IP address: a client keeps its backend
    /// while the set changes elsewhere.
    Consistent,
}

/// How backends are checked; one that fails is taken out until it passes again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default)]
    pub kind: HealthKind,
    /// For `http`: the path asked for; any 2xx answer is healthy.
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// How long one check may take (connect, and for `http` the answer).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

impl Default for HealthCheck {
    fn default() -> HealthCheck {
        HealthCheck {
            kind: HealthKind::default(),
            path: default_path(),
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
        }
    }
}

fn default_path() -> String {
    "/".to_string()
}

fn default_interval() -> u64 {
    2000
}

fn default_timeout() -> u64 {
    1000
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthKind {
    /// A TCP connection is accepted.
    #[default]
    Tcp,
    /// `GET path` answers 2xx.
    Http,
}

impl ProxyConfig {
    /// Parses and validates a pushed document.
    pub fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
        let config: ProxyConfig = serde_json::from_str(text).map_err(ConfigError::Json)?;
        config.validate()?;
        Ok(config)
    }

    /// A balancer by name.
    pub fn balancer(&self, name: &str) -> Option<&BalancerConfig> {
        self.balancers.iter().find(|b| b.name == name)
    }
}

impl BalancerConfig {
    /// A balancer with the default selection, health check and grace.
    pub fn new(name: &str, listen: SocketAddr, backends: Vec<SocketAddr>) -> BalancerConfig {
        BalancerConfig {
            name: name.to_string(),
            listen,
            backends,
            selection: Selection::default(),
            health: HealthCheck::default(),
            drain_grace_secs: default_drain_grace(),
        }
    }
}
