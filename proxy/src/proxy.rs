//! The proxy's state: the applied configuration and the balancers running it. A push is
//! validated and its listeners bound before anything changes, so a refused push leaves the last
//! good configuration running untouched.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use lb_config::{BalancerStatus, ConfigError, ProxyConfig, ProxyStatus};
use thiserror::Error;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::balancer::Balancer;
use crate::listeners::Listeners;

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("revision {pushed} is not above the applied revision {current}")]
    Stale { pushed: u64, current: u64 },
    #[error("balancer {name}: cannot listen on {listen}: {source}")]
    Listen {
        name: String,
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone, Default)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    listeners: Arc<Listeners>,
    state: Mutex<State>,
    /// Balancers stopping (removed, replaced, or all at shutdown), until they drained.
    draining: Mutex<JoinSet<()>>,
}

#[derive(Default)]
struct State {
    config: ProxyConfig,
    balancers: BTreeMap<String, Balancer>,
}

impl Proxy {
    pub fn listeners(&self) -> &Listeners {
        &self.inner.listeners
    }

    /// Applies `config` if it is valid, newer than the applied one, and every new listener can
    /// be bound; otherwise changes nothing. Returns the applied revision.
    pub async fn apply(&self, config: ProxyConfig) -> Result<u64, ApplyError> {
        config.validate()?;
        let mut state = self.inner.state.lock().await;
        if config.revision <= state.config.revision {
            return Err(ApplyError::Stale {
                pushed: config.revision,
                current: state.config.revision,
            });
        }
        // Bind what is new first (`bind` keeps an open socket as it is): a port in use refuses
        // the whole push.
        for b in &config.balancers {
            if let Err(source) = self.inner.listeners.bind(b.listen) {
                self.inner.listeners.close_unused();
                return Err(ApplyError::Listen {
                    name: b.name.clone(),
                    listen: b.listen,
                    source,
                });
            }
        }
        let mut old = std::mem::take(&mut state.balancers);
        for b in &config.balancers {
            match old.remove(&b.name) {
                Some(mut running) if running.same_listener(b) => {
                    running.reconfigure(b).await;
                    state.balancers.insert(b.name.clone(), running);
                }
                replaced => {
                    // A new balancer, or one moved to another port: the new service accepts
                    // before the old one stops.
                    let started = Balancer::start(b.clone(), &self.inner.listeners).await;
                    match started {
                        Ok(new) => {
                            state.balancers.insert(b.name.clone(), new);
                        }
                        Err(e) => tracing::error!(balancer = %b.name, error = %e, "cannot start"),
                    }
                    if let Some(r) = replaced {
                        self.retire(r).await;
                    }
                }
            }
        }
        for (_, removed) in old {
            self.retire(removed).await;
        }
        state.config = config;
        // A socket bound for a balancer that did not start: nothing accepts there.
        self.inner.listeners.close_unused();
        tracing::info!(
            revision = state.config.revision,
            balancers = state.balancers.len(),
            "configuration applied"
        );
        Ok(state.config.revision)
    }

    /// Stops `b` accepting and drains it in the background; its port is closed once it no
    /// longer accepts, unless another balancer accepts there.
    async fn retire(&self, b: Balancer) {
        let listeners = self.inner.listeners.clone();
        let listen = b.config.listen;
        self.inner
            .draining
            .lock()
            .await
            .spawn(b.drain(move || listeners.release(listen)));
    }

    pub async fn config(&self) -> ProxyConfig {
        self.inner.state.lock().await.config.clone()
    }

    pub async fn status(&self) -> ProxyStatus {
        let state = self.inner.state.lock().await;
        ProxyStatus {
            revision: state.config.revision,
            balancers: state
                .balancers
                .values()
                .map(|b| BalancerStatus {
                    name: b.config.name.clone(),
                    listen: b.config.listen,
                    backends: b.health(),
                    requests: b.stats.requests.load(Ordering::Relaxed),
                    in_flight: b.stats.in_flight.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Stops every balancer accepting and waits until each drained (or its grace ran out).
    pub async fn shutdown(&self) {
        let all = std::mem::take(&mut self.inner.state.lock().await.balancers);
        for (_, b) in all {
            self.retire(b).await;
        }
        let mut draining = std::mem::take(&mut *self.inner.draining.lock().await);
        while draining.join_next().await.is_some() {}
    }
}
