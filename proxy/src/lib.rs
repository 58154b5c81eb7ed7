//! `lightbyte-proxy`: HTTP load balancers on Cloudflare's Pingora, driven at run time.
//!
//! Pingora's own `Server` owns the process (`run_forever`: services fixed at start, signals,
//! daemonizing). A control plane needs the opposite: balancers created, changed and removed while
//! the process runs, each with its own listener and backends. So this crate drives Pingora's
//! pieces itself on its own tokio runtime: one `http_proxy_service` per balancer started with
//! `Service::start_service` and stopped through its own shutdown watch, one `LoadBalancer` per
//! balancer fed by [`discovery::Pushed`] instead of static lists, health checks on their own
//! timers, and the listening sockets kept in a table of our own ([`listeners`]) so that a new
//! binary can take them over ([`handover`]) without a refused connection.

pub mod app;
pub mod balancer;
pub mod control;
pub mod discovery;
pub mod gate;
pub mod handover;
pub mod health_log;
pub mod listeners;
pub mod proxy;
pub mod selector;

pub use lb_config as config;
pub use proxy::{ApplyError, Proxy};
