//! The proxy's control protocol: one JSON request line and one JSON answer line per
//! connection on its Unix socket. The proxy serves it; the command line, worker agents and the
//! guest's service script speak it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ProxyConfig, ProxyStatus};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Apply { config: ProxyConfig },
    Status,
    Handover,
    Stop,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Response {
    Applied {
        revision: u64,
    },
    Status {
        status: ProxyStatus,
    },
    /// Sent after the listening sockets, which travel on the same connection (SCM_RIGHTS).
    HandedOver {
        config: ProxyConfig,
    },
    Stopping,
    Error {
        kind: ErrorKind,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current_revision: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    BadRequest,
    Invalid,
    Stale,
    Failed,
}

/// Sends one request and reads its answer (blocking: for the command line and for a new binary
/// before its runtime serves anything).
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> std::io::Result<Response> {
    let stream = UnixStream::connect(socket)?;
    call_on(&stream, request, timeout)
}

/// [`call`] on a connection already open (a handover reads the sockets from it first).
pub fn call_on(
    stream: &UnixStream,
    request: &Request,
    timeout: Duration,
) -> std::io::Result<Response> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut out = serde_json::to_vec(request)?;
    out.push(b'\n');
    (&*stream).write_all(&out)?;
    read_response(stream)
}

/// Reads one answer line.
pub fn read_response(stream: &UnixStream) -> std::io::Result<Response> {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a control answer ({e}): {line:?}"),
        )
    })
}
