//! Asking a VM's guest agent, through the host socket of its vsock device, from async code
//! (the agent protocol's client is blocking: each call runs on tokio's blocking pool).

use std::path::PathBuf;
use std::time::Duration;

use agent_proto::client::ClientError;
use agent_proto::{Request, Response};

/// Sends `request` to the guest agent behind `socket`, waiting at most `timeout`.
pub async fn call(
    socket: PathBuf,
    request: Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let task = tokio::task::spawn_blocking(move || {
        agent_proto::client::connect(&socket, agent_proto::DEFAULT_PORT, timeout)?.call(request)
    });
    match task.await {
        Ok(r) => r,
        Err(e) => Err(ClientError::Send(std::io::Error::other(e.to_string()))),
    }
}

/// The agent's version if the guest agent behind `socket` answers `ping` within `timeout`.
pub async fn ping(socket: PathBuf, timeout: Duration) -> Option<String> {
    match call(socket, Request::Ping, timeout).await {
        Ok(Response::Pong { agent_version, .. }) => Some(agent_version),
        _ => None,
    }
}
