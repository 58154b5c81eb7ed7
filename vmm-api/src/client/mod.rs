//! A typed client of the API, for tests and for the orchestrator's worker.
//!
//! [`Client`] is async (tokio; each request spawns its connection's task, so it must run inside
//! a tokio runtime). [`blocking::Client`] wraps it for plain threads.

pub mod blocking;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::config::VmConfig;
use crate::routes::Action;
use crate::types::{
    ErrorBody, Ping, RestoreBody, ShutdownBody, SnapshotBody, SnapshotType, VmInfo,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error status.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The `error` member of the response.
        message: String,
    },
    /// No server at the socket.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange failed (connection closed mid-response, malformed response).
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// A response the client does not understand.
    #[error("unexpected response: {0}")]
    Decode(String),
    /// No complete response within the client's timeout.
    #[error("no response within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The blocking client could not create its runtime.
    #[error("creating the client runtime: {0}")]
    Runtime(#[source] io::Error),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one `vmm`'s API socket. Each call uses a connection of its own, so a client can
/// be shared by concurrent tasks.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the API at `socket_path`; connects on each call.
    pub fn new(socket_path: impl Into<PathBuf>) -> Client {
        Client {
            path: socket_path.into(),
            timeout: None,
        }
    }

    /// The same client, failing calls that take longer than `timeout` (none by default:
    /// boot and shutdown can legitimately take long).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET /api/v1/vmm/ping`.
    pub async fn ping(&self) -> Result<Ping, ClientError> {
        self.call_json(Action::Ping, None).await
    }

    /// `PUT /api/v1/vm/create`.
    pub async fn create(&self, config: &VmConfig) -> Result<(), ClientError> {
        self.call_empty(Action::Create, Some(to_json(config)?))
            .await
    }

    /// `PUT /api/v1/vm/boot`.
    pub async fn boot(&self) -> Result<(), ClientError> {
        self.call_empty(Action::Boot, None).await
    }

    /// `PUT /api/v1/vm/shutdown`; `timeout_ms` None means the server's default.
    pub async fn shutdown(&self, timeout_ms: Option<u64>) -> Result<(), ClientError> {
        let body = match timeout_ms {
            Some(timeout_ms) => Some(to_json(&ShutdownBody { timeout_ms })?),
            None => None,
        };
        self.call_empty(Action::Shutdown, body).await
    }

    /// `PUT /api/v1/vm/reboot`.
    pub async fn reboot(&self) -> Result<(), ClientError> {
        self.call_empty(Action::Reboot, None).await
    }

    /// `PUT /api/v1/vm/pause`.
    pub async fn pause(&self) -> Result<(), ClientError> {
        self.call_empty(Action::Pause, None).await
    }

    /// `PUT /api/v1/vm/resume`.
    pub async fn resume(&self) -> Result<(), ClientError> {
        self.call_empty(Action::Resume, None).await
    }

    /// `GET /api/v1/vm/info`.
    pub async fn info(&self) -> Result<VmInfo, ClientError> {
        self.call_json(Action::Info, None).await
    }

    /// `PUT /api/v1/vm/snapshot`.
    pub async fn snapshot(&self, destination_dir: impl Into<PathBuf>) -> Result<(), ClientError> {
        self.snapshot_of(destination_dir, SnapshotType::Full).await
    }

    /// `PUT /api/v1/vm/snapshot` of a given type (a diff holds only what changed since the VM's
    /// last snapshot or restore).
    pub async fn snapshot_of(
        &self,
        destination_dir: impl Into<PathBuf>,
        snapshot_type: SnapshotType,
    ) -> Result<(), ClientError> {
        let body = SnapshotBody {
            destination_dir: destination_dir.into(),
            snapshot_type,
        };
        self.call_empty(Action::Snapshot, Some(to_json(&body)?))
            .await
    }

    /// `PUT /api/v1/vm/restore`.
    pub async fn restore(
        &self,
        source_dir: impl Into<PathBuf>,
        resume: bool,
    ) -> Result<(), ClientError> {
        let body = RestoreBody {
            source_dir: source_dir.into(),
            resume,
        };
        self.call_empty(Action::Restore, Some(to_json(&body)?))
            .await
    }

    async fn call_empty(&self, action: Action, body: Option<Vec<u8>>) -> Result<(), ClientError> {
        self.call(action, body).await.map(drop)
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        action: Action,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let bytes = self.call(action, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// One request on a fresh connection; an error status becomes [`ClientError::Api`].
    async fn call(&self, action: Action, body: Option<Vec<u8>>) -> Result<Bytes, ClientError> {
        match self.timeout {
            Some(t) => tokio::time::timeout(t, self.exchange(action, body))
                .await
                .map_err(|_| ClientError::Timeout(t))?,
            None => self.exchange(action, body).await,
        }
    }

    async fn exchange(&self, action: Action, body: Option<Vec<u8>>) -> Result<Bytes, ClientError> {
        let route = action.route();
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Its errors reach the request below as well.
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(route.method.clone())
            .uri(route.path)
            .header(HOST, "localhost");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Decode(format!("building the request: {e}")))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => e.error,
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        Err(ClientError::Api { status, message })
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(value).map_err(|e| ClientError::Decode(format!("encoding the request: {e}")))
}
