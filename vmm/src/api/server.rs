//! The API server: HTTP/1.1 on a Unix socket, served by hyper on a current-thread tokio runtime
//! in a thread of its own, so the VMM's threads stay plain threads. Each connection is a task of
//! its own (a slow or idle client holds only its task); VMM calls go to the blocking pool (see
//! [`super::handler`]).
//!
//! hyper (with hyper-util and http-body-util) rather than a framework: a dozen fixed routes need
//! no router, and hyper gives the few things that matter here directly — header read timeouts,
//! bounded header buffers, and bodies that are streamed (so a size limit refuses a 100 MB body
//! without buffering it).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::UnixListener;
use tokio::sync::{oneshot, Semaphore};

use super::handler::{self, Shared};
use super::signals;
use crate::control::VmControl;
use crate::unix_socket::{self as socket, BindError, FileId};

/// Largest request head (request line and headers) a connection buffers; hyper answers 431
/// beyond it. Our requests have a handful of short headers.
const MAX_HEAD_BUF: usize = 64 << 10;
/// Pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long an idle thread of the blocking pool (where VMM calls run) stays: a VMM process
/// gets few calls, far apart, and tokio's default of 10 s would have each start a thread.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(24 * 3600);

/// Limits of one API server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Time a client has to send a request's headers, counted from when the server starts
    /// waiting for them (so it also bounds an idle connection); then the connection is closed.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body after its headers: then 408 and close.
    pub body_timeout: Duration,
    /// Largest request body: larger gets 413.
    pub max_body: usize,
    /// Connections served at once; further clients wait in the socket's backlog.
    pub max_connections: usize,
    /// On stop, how long requests in progress get to finish.
    pub drain_timeout: Duration,
    /// On SIGTERM, SIGINT or SIGHUP, remove the socket file and then die of the signal as
    /// the process would have without a handler. For the `vmm` binary, not for library users.
    pub exit_on_signal: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body: 1 << 20,
            max_connections: 64,
            drain_timeout: Duration::from_secs(2),
            exit_on_signal: false,
        }
    }
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A server answers on the socket.
    #[error("API socket {0}: another process is serving on it")]
    InUse(PathBuf),
    /// The path is taken by something that is not a socket; it is left alone.
    #[error("API socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// Creating or checking the socket failed.
    #[error("API socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The runtime or the thread could not be created.
    #[error("starting the API server: {0}")]
    Start(#[source] io::Error),
}

impl From<BindError> for ServerError {
    fn from(e: BindError) -> ServerError {
        match e {
            BindError::InUse(p) => ServerError::InUse(p),
            BindError::NotASocket(p) => ServerError::NotASocket(p),
            BindError::Io { path, source } => ServerError::Socket { path, source },
        }
    }
}

impl ServerError {
    /// True when the socket path given is at fault rather than the host.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ServerError::Start(_))
    }
}

/// A running API server; dropping it stops it and removes its socket file.
pub struct ApiServer {
    path: PathBuf,
    id: FileId,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` and serves `control` on it until stopped.
    ///
    /// The runtime and its thread start before the socket is bound, so that a client that
    /// connects as soon as the file exists is served at once: bound first, the socket stood
    /// 20–30 ms in the test host before the server reached its first `accept`, and a restore
    /// sent at once spent that time waiting.
    pub fn start(
        path: impl AsRef<Path>,
        control: Arc<dyn VmControl>,
        options: ServerOptions,
    ) -> Result<ApiServer, ServerError> {
        let path = path.as_ref().to_path_buf();
        let (bound_tx, bound_rx) = oneshot::channel();
        let bound_id = Arc::new(OnceLock::new());
        let (stop, thread) = Self::spawn(bound_rx, Arc::clone(&bound_id), control, options, &path)?;
        let bound = socket::bind(&path)
            .map_err(ServerError::from)
            .and_then(|(l, id)| {
                let _ = bound_id.set(id);
                match l.set_nonblocking(true) {
                    Ok(()) => Ok((l, id)),
                    Err(e) => {
                        socket::remove(&path, id);
                        Err(ServerError::Start(e))
                    }
                }
            });
        match bound {
            Ok((listener, id)) => {
                // The thread waits for it; the send fails only if the thread panicked, which
                // stopping the server reports.
                let _ = bound_tx.send(listener);
                Ok(ApiServer {
                    path,
                    id,
                    stop: Some(stop),
                    thread: Some(thread),
                })
            }
            Err(e) => {
                // Without a socket, the thread ends on its own.
                drop(bound_tx);
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// The server's thread, serving the socket it will be sent once bound (whose identity is
    /// in `bound_id` from then on).
    fn spawn(
        bound: oneshot::Receiver<std::os::unix::net::UnixListener>,
        bound_id: Arc<OnceLock<FileId>>,
        control: Arc<dyn VmControl>,
        options: ServerOptions,
        path: &Path,
    ) -> Result<(oneshot::Sender<()>, JoinHandle<()>), ServerError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_stack_size(crate::threads::STACK_SIZE)
            .thread_keep_alive(BLOCKING_KEEP_ALIVE)
            .build()
            .map_err(ServerError::Start)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            control,
            max_body: options.max_body,
            body_timeout: options.body_timeout,
        });
        let path = path.to_path_buf();
        let thread = crate::threads::builder("vmm-api")
            .spawn(move || {
                crate::jail::seccomp::enter_thread(crate::jail::seccomp::Kind::Api);
                runtime.block_on(async move {
                    if options.exit_on_signal {
                        signals::remove_socket_on_exit_signals(path, bound_id);
                    }
                    prepare_for_calls();
                    let Ok(listener) = bound.await else {
                        return;
                    };
                    match UnixListener::from_std(listener) {
                        Ok(l) => serve(l, shared, options, stop_rx).await,
                        Err(e) => tracing::error!("API server: {e}"),
                    }
                });
                // VMM calls still running on the blocking pool finish on their own; the
                // server does not wait for them.
                runtime.shutdown_background();
            })
            .map_err(ServerError::Start)?;
        Ok((stop_tx, thread))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, removes the socket file, lets requests in progress finish (up to
    /// [`ServerOptions::drain_timeout`]) and returns.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        socket::remove(&self.path, self.id);
        if let Some(stop) = self.stop.take() {
            // Err: the server thread already ended.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the API server thread panicked");
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Readies, while no request waits, what the first VMM call would otherwise set up on its
/// own time: a thread of the blocking pool (every call runs on one; starting it took 3.5 ms of
/// a restore request in the test host) and the page map (opening it probes soft-dirty
/// tracking, 9–14 ms in the test host, and a restore needs it to mark the restored memory
/// clean). A request that comes sooner gets a thread of its own, and at worst waits for the
/// probe already under way.
fn prepare_for_calls() {
    drop(tokio::task::spawn_blocking(|| {
        // Err: no page map on this host; the call that needs it reports that.
        let _ = crate::vstate::pagemap::get();
    }));
}

/// Accepts connections until `stop`, then drains them.
async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    options: ServerOptions,
    mut stop: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
            biased;
            _ = &mut stop => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("API accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        let service = service_fn(move |req| handler::handle(req, Arc::clone(&shared)));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_timeout)
            .max_buf_size(MAX_HEAD_BUF)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("API connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("API connections still open at stop: closing them");
    }
}
