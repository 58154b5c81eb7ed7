//! Backends come from configuration pushes, not from DNS or a static list: Pingora's
//! `LoadBalancer` asks its `ServiceDiscovery` for the set on every `update()`, and this one
//! answers with the set last pushed.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;

/// The pushed backend set, shared between the balancer (which writes it) and its
/// `LoadBalancer` (which reads it on update).
#[derive(Clone, Default)]
pub struct Pushed(Arc<Mutex<BTreeSet<Backend>>>);

impl Pushed {
    pub fn set(&self, addrs: &[SocketAddr]) {
        let set = addrs
            .iter()
            .map(|a| Backend {
                addr: pingora::protocols::l4::socket::SocketAddr::Inet(*a),
                weight: 1,
                ext: Default::default(),
            })
            .collect();
        *self.0.lock() = set;
    }
}

#[async_trait]
impl ServiceDiscovery for Pushed {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok((self.0.lock().clone(), HashMap::new()))
    }
}
