//! The load-balancing proxy of host-placed load balancers: one `lightbyte-proxy` process beside
//! the worker agent, started on the first push, configured over its control socket.
//!
//! Like a `vmm`, the proxy outlives an agent restart (a restarted agent finds it by its socket),
//! and it keeps the last configuration applied in a file it reloads if it restarts itself, so
//! clients keep being served whatever happens to the agent.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lb_config::control::{self, Request, Response};
use lb_config::{ProxyConfig, ProxyStatus};
use tokio::sync::Mutex;

/// How long the proxy has to answer on its control socket.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a starting proxy has to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct HostProxy {
    bin: PathBuf,
    dir: PathBuf,
    /// One push or start at a time.
    lock: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot start {bin}: {message}")]
    Start { bin: String, message: String },
    #[error("proxy control socket: {0}")]
    Control(std::io::Error),
    /// The proxy refused the push (stale, invalid, a port in use).
    #[error("{message}")]
    Refused {
        kind: control::ErrorKind,
        message: String,
    },
}

impl HostProxy {
    pub fn new(bin: PathBuf, dir: PathBuf) -> HostProxy {
        HostProxy {
            bin,
            dir,
            lock: Mutex::new(()),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("proxy.sock")
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("proxy.json")
    }

    async fn call(&self, request: Request) -> std::io::Result<Response> {
        let socket = self.socket();
        tokio::task::spawn_blocking(move || control::call(&socket, &request, CALL_TIMEOUT))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The proxy's status; revision 0 and no balancers when none runs.
    pub async fn status(&self) -> Result<ProxyStatus, ProxyError> {
        if !self.socket().exists() {
            return Ok(ProxyStatus::default());
        }
        match self.call(Request::Status).await {
            Ok(Response::Status { status }) => Ok(status),
            Ok(other) => Err(ProxyError::Control(std::io::Error::other(format!(
                "unexpected answer {other:?}"
            )))),
            // A socket nobody serves: the proxy is gone.
            Err(_) => Ok(ProxyStatus::default()),
        }
    }

    /// Applies `config`, starting the proxy first if none answers.
    pub async fn apply(&self, config: ProxyConfig) -> Result<u64, ProxyError> {
        let _one = self.lock.lock().await;
        if self.call(Request::Status).await.is_err() {
            self.start().await?;
        }
        let text = serde_json::to_string(&config).expect("a proxy configuration serializes");
        match self.call(Request::Apply { config }).await {
            Ok(Response::Applied { revision }) => {
                // Kept for a proxy that restarts on its own: it starts from the last good one.
                if let Err(e) = write_atomically(&self.config_file(), text.as_bytes()) {
                    tracing::warn!(error = %e, "cannot keep the proxy configuration");
                }
                Ok(revision)
            }
            Ok(Response::Error { kind, message, .. }) => Err(ProxyError::Refused { kind, message }),
            Ok(other) => Err(ProxyError::Control(std::io::Error::other(format!(
                "unexpected answer {other:?}"
            )))),
            Err(e) => Err(ProxyError::Control(e)),
        }
    }

    async fn start(&self) -> Result<(), ProxyError> {
        let start_err = |message: String| ProxyError::Start {
            bin: self.bin.display().to_string(),
            message,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| start_err(e.to_string()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("proxy.log"))
            .map_err(|e| start_err(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("run")
            .arg("--control")
            .arg(self.socket())
            .arg("--config")
            .arg(self.config_file())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| start_err(e.to_string()))?)
            .stderr(log)
            // Its own session: a signal to the agent's process group does not reach it.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| start_err(e.to_string()))?;
        tracing::info!(pid = child.id(), "host proxy started");
        // Reaped in the background: it lives on its own.
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::info!(?status, "host proxy exited");
        });
        let t = Instant::now();
        while t.elapsed() < START_TIMEOUT {
            if self.call(Request::Status).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(start_err(format!(
            "its control socket did not answer within {START_TIMEOUT:?} (see {})",
            self.dir.join("proxy.log").display()
        )))
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    super::durable::rename(&tmp, path)
}
