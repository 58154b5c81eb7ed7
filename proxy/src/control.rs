//! The control socket: a Unix stream socket carrying one JSON request line and one JSON answer
//! line per connection. `apply` pushes a configuration, `status` reports, `handover` passes the
//! listening sockets and the configuration to a new binary, `stop` drains and ends the process.

use std::time::Duration;

pub use lb_config::control::{call, call_on, read_response, ErrorKind, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::proxy::{ApplyError, Proxy};

/// Longest request line (a configuration of many balancers with many backends).
const MAX_REQUEST: usize = 8 << 20;

/// Set once: a `stop` request or a signal asked the process to drain and end.
pub struct Shutdown(watch::Sender<bool>);

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown(watch::channel(false).0)
    }
}

impl Shutdown {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
        current_revision: None,
    }
}

/// Serves the control socket until a `stop` request (or the listener fails); `stop` is
/// notified then.
pub async fn serve(listener: UnixListener, proxy: Proxy, stop: std::sync::Arc<Shutdown>) {
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let proxy = proxy.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(conn, proxy, stop).await {
                            tracing::debug!(error = %e, "control connection");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn handle(
    conn: UnixStream,
    proxy: Proxy,
    stop: std::sync::Arc<Shutdown>,
) -> std::io::Result<()> {
    let mut reader = TokioBufReader::new(conn);
    let mut line = Vec::new();
    let n = (&mut reader)
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    let mut conn = reader.into_inner();
    let request = if n > MAX_REQUEST {
        Err(error(
            ErrorKind::BadRequest,
            format!("a request over {MAX_REQUEST} bytes"),
        ))
    } else {
        serde_json::from_slice::<Request>(&line)
            .map_err(|e| error(ErrorKind::BadRequest, format!("not a control request: {e}")))
    };
    let response = match request {
        Err(r) => r,
        Ok(Request::Apply { config }) => match proxy.apply(config).await {
            Ok(revision) => Response::Applied { revision },
            Err(ApplyError::Stale { current, .. }) => Response::Error {
                kind: ErrorKind::Stale,
                message: format!("revision not above the applied revision {current}"),
                current_revision: Some(current),
            },
            Err(e @ ApplyError::Invalid(_)) => error(ErrorKind::Invalid, e.to_string()),
            Err(e) => error(ErrorKind::Failed, e.to_string()),
        },
        Ok(Request::Status) => Response::Status {
            status: proxy.status().await,
        },
        Ok(Request::Handover) => {
            let snapshot = proxy.listeners().snapshot();
            let (keys, fds) = snapshot.serialize();
            let std = conn.into_std()?;
            std.set_nonblocking(false)?;
            let sent = tokio::task::spawn_blocking(move || {
                crate::handover::send(&std, &keys, &fds).map(|_| std)
            })
            .await
            .map_err(std::io::Error::other)??;
            tracing::info!("listening sockets handed over to a new binary");
            conn = UnixStream::from_std({
                sent.set_nonblocking(true)?;
                sent
            })?;
            Response::HandedOver {
                config: proxy.config().await,
            }
        }
        Ok(Request::Stop) => {
            stop.trigger();
            Response::Stopping
        }
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    conn.write_all(&out).await?;
    conn.shutdown().await
}
