//! How often health checks marked each backend unhealthy. A backend that fails and comes back
//! between two status reads (a VM restarted by its worker) leaves its count behind, where a
//! reader of `healthy` alone would see nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::lb::health_check::HealthObserve;
use pingora::lb::Backend;

/// Shared by every selector a balancer uses in turn, so counts survive a change of settings.
#[derive(Clone, Default)]
pub struct HealthLog {
    downs: Arc<Mutex<HashMap<SocketAddr, u64>>>,
}

impl HealthLog {
    /// Times `address` was marked unhealthy since the balancer started.
    pub fn marked_down(&self, address: &SocketAddr) -> u64 {
        let downs = self.downs.lock().unwrap_or_else(|e| e.into_inner());
        downs.get(address).copied().unwrap_or(0)
    }
}

#[async_trait]
impl HealthObserve for HealthLog {
    async fn observe(&self, target: &Backend, healthy: bool) {
        if healthy {
            return;
        }
        if let Some(address) = target.addr.as_inet() {
            tracing::info!(backend = %address, "backend marked unhealthy");
            let mut downs = self.downs.lock().unwrap_or_else(|e| e.into_inner());
            *downs.entry(*address).or_default() += 1;
        }
    }
}
