//! `vmm` processes: started in their own process group so that neither a Ctrl-C aimed at the
//! agent nor the agent's death reaches them (a worker restart re-adopts running VMs), and
//! identified by pid plus start time so a recycled pid is never taken for a VM.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmm_api::client::Client;

/// A `vmm` process this agent started (it can reap it and read its exit status) or adopted
/// from an earlier agent (it can only watch its pid).
#[derive(Debug)]
pub struct VmmProcess {
    pub pid: u32,
    pub start: u64,
    child: Option<Child>,
}

/// How a `vmm` process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Exited; the status is known when this agent started it.
    Exited(Option<ExitStatus>),
}

impl VmmProcess {
    /// Starts `vmm --api-socket SOCKET` with `extra` arguments (its jail), its output appended
    /// to `log`.
    pub fn spawn(
        vmm: &Path,
        socket: &Path,
        extra: &[std::ffi::OsString],
        log: &Path,
    ) -> io::Result<VmmProcess> {
        let out = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(log)?
        };
        let err = out.try_clone()?;
        let mut cmd = Command::new(vmm);
        // Its working directory is its own (a jailed vmm's root then holds nothing else).
        if let Some(dir) = socket.parent().filter(|d| d.is_dir()) {
            cmd.current_dir(dir);
        }
        let child = cmd
            .arg("--api-socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()?;
        let pid = child.id();
        // Read right away: the process cannot have been reaped (we hold it), so the pid is its.
        let start = start_time(pid).unwrap_or(0);
        Ok(VmmProcess {
            pid,
            start,
            child: Some(child),
        })
    }

    /// A process an earlier agent started, if it still runs.
    pub fn adopt(pid: u32, start: u64) -> Option<VmmProcess> {
        (start_time(pid) == Some(start)).then_some(VmmProcess {
            pid,
            start,
            child: None,
        })
    }

    pub fn liveness(&mut self) -> Liveness {
        if let Some(child) = &mut self.child {
            return match child.try_wait() {
                Ok(Some(status)) => Liveness::Exited(Some(status)),
                Ok(None) => Liveness::Alive,
                Err(_) => Liveness::Exited(None),
            };
        }
        match stat(self.pid) {
            Some((state, start)) if start == self.start && state != 'Z' && state != 'X' => {
                Liveness::Alive
            }
            _ => Liveness::Exited(None),
        }
    }

    pub fn kill(&mut self) {
        if self.liveness() == Liveness::Alive {
            let Ok(pid) = i32::try_from(self.pid) else {
                return;
            };
            // SAFETY: kill(2) with a pid we checked is still our vmm process (pid plus start
            // time) a moment ago; it only sends a signal.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Waits up to `limit` for the process to end.
    pub async fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Liveness::Exited(_) = self.liveness() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the API answers, failing early if the process exits.
    pub async fn wait_api(&mut self, client: &Client, limit: Duration) -> Result<(), ApiWaitError> {
        let deadline = Instant::now() + limit;
        loop {
            if client.ping().await.is_ok() {
                return Ok(());
            }
            if let Liveness::Exited(status) = self.liveness() {
                return Err(ApiWaitError::Exited(status));
            }
            if Instant::now() >= deadline {
                return Err(ApiWaitError::Timeout(limit));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Why a `vmm`'s API never answered.
#[derive(Debug, thiserror::Error)]
pub enum ApiWaitError {
    /// The process ended first (with this status, when it was our child).
    #[error("vmm exited before its API answered{}", .0.as_ref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Exited(Option<std::process::ExitStatus>),
    /// It kept running without answering.
    #[error("vmm's API did not answer within {0:?}")]
    Timeout(Duration),
}

/// State letter and start time (clock ticks after boot) of process `pid`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or ')': the fields
    // after it start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 22 (starttime) is the 20th after the command name.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let tail = &bytes[bytes.len().saturating_sub(max)..];
    String::from_utf8_lossy(tail).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_start_time_and_state() {
        let (state, start) = stat(std::process::id()).unwrap();
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(start > 0);
        assert!(VmmProcess::adopt(std::process::id(), start).is_some());
        assert!(VmmProcess::adopt(std::process::id(), start + 1).is_none());
    }

    #[tokio::test]
    async fn spawned_processes_are_watched_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // `sleep` stands in for vmm: it ignores the arguments' meaning but takes them.
        let script = dir.path().join("fake-vmm");
        std::fs::write(&script, "#!/bin/sh\necho started \"$@\"\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut p = VmmProcess::spawn(&script, Path::new("/tmp/x.sock"), &[], &log).unwrap();
        assert_eq!(p.liveness(), Liveness::Alive);
        let mut adopted = VmmProcess::adopt(p.pid, p.start).unwrap();
        assert_eq!(adopted.liveness(), Liveness::Alive);
        for _ in 0..100 {
            if !log_tail(&log, 100).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p.kill();
        assert!(p.wait_exit(Duration::from_secs(5)).await);
        assert!(matches!(p.liveness(), Liveness::Exited(Some(s)) if !s.success()));
        assert!(matches!(adopted.liveness(), Liveness::Exited(None)));
        assert!(log_tail(&log, 100).contains("started --api-socket /tmp/x.sock"));
    }
}
