//! What a proxy reports: the revision it runs and the health of each backend.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyStatus {
    /// The applied configuration's revision (0: none yet).
    pub revision: u64,
    pub balancers: Vec<BalancerStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerStatus {
    pub name: String,
    pub listen: SocketAddr,
    pub backends: Vec<BackendHealth>,
    /// Requests started since the balancer started.
    pub requests: u64,
    /// Requests being served now.
    pub in_flight: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendHealth {
    pub address: SocketAddr,
    pub healthy: bool,
    /// Times the health checks marked it unhealthy since its balancer started: a backend that
    /// failed and came back between two reads of `healthy` shows here.
    #[serde(default)]
    pub marked_down: u64,
}
