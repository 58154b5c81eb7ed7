//! lightbyte's control plane: resources in etcd, leader-elected controllers that place VMs and
//! watch workers, the HTTP API over them, and the client the CLI uses.

pub mod api;
pub mod auth;
pub mod client;
pub mod controllers;
pub mod election;
pub mod http;
pub mod images;
pub mod lease;
pub mod model;
pub mod pki;
pub mod registration;
pub mod serve;
pub mod server;
pub mod sim;
pub mod store;
mod task;
pub mod tls;
pub mod worker;

pub use task::Backoff;
