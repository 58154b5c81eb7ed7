//! Firecracker driven through its API socket, for the snapshot comparison: start a guest from a
//! configuration file, pause, snapshot (full or diff), and load a snapshot in a new process.
//! Firecracker's API is plain HTTP/1.1 over a Unix socket; a request and its short answer are
//! all the benchmark needs, so a few lines here beat pulling an HTTP client into the bench.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// One Firecracker process with its API socket; its serial console goes to `console`.
pub struct Firecracker {
    child: Child,
    sock: PathBuf,
}

impl Firecracker {
    /// Starts `bin` with an API socket at `sock`; with `config`, the VM it describes boots at
    /// once (without, a snapshot can be loaded).
    pub fn spawn(bin: &Path, sock: &Path, config: Option<&Path>, console: &Path) -> Result<Self> {
        let _ = fs::remove_file(sock);
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(console)
            .with_context(|| console.display().to_string())?;
        let mut cmd = Command::new(bin);
        cmd.arg("--api-sock").arg(sock).args(["--level", "Error"]);
        if let Some(c) = config {
            cmd.arg("--config-file").arg(c);
        }
        let err = out.try_clone()?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting firecracker")?;
        let t = Instant::now();
        while !sock.exists() {
            let exited = child.try_wait()?;
            if exited.is_some() || t.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let log = fs::read_to_string(console).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!(
                    "firecracker made no API socket ({}):\n{}",
                    exited.map_or("still running".into(), |s| s.to_string()),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Firecracker {
            child,
            sock: sock.to_path_buf(),
        })
    }

    /// Sends one request; fails on any status but 2xx, with Firecracker's message.
    pub fn call(&self, method: &str, path: &str, body: &Value) -> Result<()> {
        let body = body.to_string();
        // The socket file appears at bind(), a moment before Firecracker listens on it.
        let t = Instant::now();
        let mut s = loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && t.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e).context("firecracker API socket"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let reply = read_reply(&mut s)?;
        let status: u16 = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("firecracker answered {reply:?}"))?;
        if !(200..300).contains(&status) {
            bail!("firecracker {method} {path}: {reply}");
        }
        Ok(())
    }

    /// Pauses the guest.
    pub fn pause(&self) -> Result<()> {
        self.call("PATCH", "/vm", &json!({"state": "Paused"}))
    }

    /// Resumes the guest.
    pub fn resume(&self) -> Result<()> {
        self.call("PATCH", "/vm", &json!({"state": "Resumed"}))
    }

    /// Writes a snapshot of the paused guest: its state to `state`, its memory to `mem`.
    pub fn snapshot(&self, diff: bool, state: &Path, mem: &Path) -> Result<()> {
        let kind = if diff { "Diff" } else { "Full" };
        self.call(
            "PUT",
            "/snapshot/create",
            &json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem}),
        )
    }

    /// Loads a full snapshot into this fresh process and resumes it.
    pub fn load(&self, state: &Path, mem: &Path) -> Result<()> {
        self.call(
            "PUT",
            "/snapshot/load",
            &json!({
                "snapshot_path": state,
                "mem_backend": {"backend_type": "File", "backend_path": mem},
                "resume_vm": true,
            }),
        )
    }

    /// Ends the process.
    pub fn kill(mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        let _ = fs::remove_file(&self.sock);
        Ok(())
    }
}

/// Reads a status line, headers and a `Content-Length` body; returns the status line and body.
fn read_reply(s: &mut UnixStream) -> Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).context("reading firecracker's answer")?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = text.lines().next().unwrap_or("").to_string();
                return Ok(format!("{status} {}", &text[end + 4..end + 4 + len]));
            }
        }
    }
    bail!("firecracker closed the connection mid-answer")
}

/// A configuration file for a 1-vCPU guest of `memory_mib` with dirty page tracking (which
/// diff snapshots need), written to `path`.
pub fn write_config(
    path: &Path,
    kernel: &Path,
    initramfs: &Path,
    cmdline: &str,
    memory_mib: u64,
) -> Result<()> {
    let cfg = json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initramfs,
            "boot_args": cmdline,
        },
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": memory_mib,
            "track_dirty_pages": true,
        },
        "drives": [],
    });
    fs::write(path, serde_json::to_vec_pretty(&cfg)?)?;
    Ok(())
}
