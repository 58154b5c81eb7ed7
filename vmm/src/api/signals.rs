//! Removing the socket file when the `vmm` is told to terminate. Without this a SIGTERM (how
//! supervisors stop processes) would leave the file behind; the next `vmm` would replace it as
//! stale, but anything probing the path meanwhile would find a dead socket.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokio::signal::unix::{signal, SignalKind};

use crate::unix_socket::{self as socket, FileId};

/// Spawns a task (on the current runtime) that, on SIGTERM, SIGINT or SIGHUP, removes the
/// socket file (once `id` is set: the server watches before it binds) and then lets the signal
/// end the process as it would have without a handler.
pub(crate) fn remove_socket_on_exit_signals(path: PathBuf, id: Arc<OnceLock<FileId>>) {
    let kinds = [
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::hangup(), libc::SIGHUP),
    ];
    for (kind, signum) in kinds {
        let mut stream = match signal(kind) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch signal {signum}: {e}");
                continue;
            }
        };
        let (path, id) = (path.clone(), Arc::clone(&id));
        tokio::spawn(async move {
            if stream.recv().await.is_some() {
                if let Some(&id) = id.get() {
                    socket::remove(&path, id);
                }
                die_of(signum);
            }
        });
    }
}

/// Ends the process by `signum` with its default action, so the exit status still says which
/// signal ended it.
fn die_of(signum: libc::c_int) {
    // SAFETY: restoring a signal's default disposition has no memory-safety preconditions;
    // `signum` is a valid signal number.
    unsafe { libc::signal(signum, libc::SIG_DFL) };
    // SAFETY: raise only delivers `signum` to this thread; its default action ends the process.
    unsafe { libc::raise(signum) };
    // Reached only if the signal is blocked in this thread.
    std::process::exit(128 + signum);
}
