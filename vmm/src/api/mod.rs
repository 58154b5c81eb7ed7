//! The VMM's HTTP API: JSON over HTTP/1.1 on a Unix socket (`vmm --api-socket PATH`), turning
//! requests into [`VmControl`](crate::control::VmControl) calls. `docs/api/openapi.yaml`
//! documents it; a test keeps that document and [`vmm_api::routes::ROUTES`] in step. The
//! request and response types and the typed client are in `vmm_api`.
//!
//! Statuses: 200 with JSON (ping, info), 204 (actions), and `{"error": "message"}` with 400
//! (bad body or value), 404, 405 (with `Allow`), 408 (body too slow), 409 (wrong VM state),
//! 413 (body over the limit), 415 (not JSON) or 500.

pub mod body;
mod error;
mod handler;
#[cfg(test)]
mod openapi;
mod server;
mod signals;

pub use server::{ApiServer, ServerError, ServerOptions};
