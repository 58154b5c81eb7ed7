//! Controllers: level-triggered reconcile loops. Each reads the whole desired and observed
//! state, writes what differs, and is safe to stop at any line: a write is one transaction and
//! the next reconcile (by this instance or its successor) starts from what etcd holds.

mod health;
mod lb_proxies;
mod load_balancer;
mod mover;
mod placement;
mod runner;
mod scale_group;
mod scheduler;

use std::future::Future;
use std::time::Duration;

pub use health::WorkerHealth;
pub use load_balancer::{LoadBalancers, PROXY_LABEL};
pub use mover::{Mover, RETRY_FAILED_AFTER};
pub use placement::Placement;
pub use runner::{passes, run};
pub use scale_group::ScaleGroups;
pub use scheduler::Scheduler;

use crate::store::{Store, StoreError};

pub trait Controller: Send + Sync + 'static {
    /// Names the leader key and the action log.
    const NAME: &'static str;

    /// Key prefixes whose changes call for a reconcile.
    fn watches(&self) -> Vec<String>;

    /// Makes one pass. `store` is fenced by the current leadership: a write after the
    /// leadership ended fails with `StoreError::Deposed`.
    fn reconcile(&self, store: &Store) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// After a pass: how soon the next one is due even if nothing changes (a deadline the pass
    /// saw coming, a remote state to poll); the configured resync otherwise.
    fn wake_after(&self) -> Option<Duration> {
        None
    }
}

/// How every controller of one control-plane instance runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This instance's identity in leader keys and action records.
    pub holder: String,
    /// Leader lease TTL: a crashed leader is replaced this long after its last renewal.
    pub lease_ttl: Duration,
    /// Reconcile at least this often even without changes, in case a watch missed something.
    pub resync: Duration,
}

impl Default for ControllerConfig {
    fn default() -> ControllerConfig {
        ControllerConfig {
            holder: format!("lightbyte-{}", uuid::Uuid::new_v4().simple()),
            lease_ttl: Duration::from_secs(5),
            resync: Duration::from_secs(30),
        }
    }
}
