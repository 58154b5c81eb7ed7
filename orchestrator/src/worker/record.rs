//! What a worker keeps on its own disk about each VM it runs: enough to find, re-adopt, stop and
//! clean up the VM after the agent restarts, without asking etcd (which may be down, or may no
//! longer have the VM).
//!
//! Layout under the state directory:
//! - `vms/<name>/vm.json`: the [`Record`];
//! - `vms/<name>/root.qcow2`: the root volume (an overlay of the image);
//! - `vms/<name>/vmm.log`: the VMM's own log (its stdout and stderr, opened by the worker);
//! - `vms/<name>/jail/api.sock`, `vsock.sock`, `console.log`: the `vmm` process's API socket,
//!   its vsock device's host socket and the guest's serial console, in the one directory a
//!   jailed `vmm` may write to (owned by the VM's uid; the record above it stays root's);
//! - `volumes/<name>.qcow2`: named volumes, which outlive the VMs that use them.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The Vm object's uid: a VM deleted and created again under the same name is another VM.
    pub uid: String,
    pub ip: Ipv4Addr,
    pub tap: String,
    pub mac: String,
    /// The `vmm` process, with its start time in clock ticks since boot (field 22 of
    /// `/proc/<pid>/stat`), so a recycled pid is not mistaken for it.
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// RFC 3339, UTC: when the current `vmm` booted the guest.
    #[serde(default)]
    pub boot_time: Option<String>,
    /// Times the VM was started again after its `vmm` died.
    #[serde(default)]
    pub restarts: u32,
    /// The guest powered itself off, or the VM failed; it is not restarted.
    #[serde(default)]
    pub stopped: bool,
    /// Why the VM failed, when `stopped` is a failure rather than a guest power-off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// A move away from here under way: its disks are handed out against this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<Outgoing>,
    /// The uid (and gid) its jailed `vmm` runs as, kept across restarts so its files stay its.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_uid: Option<u32>,
}

/// The disks of a VM being moved away, as checksummed once it was off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    pub to: String,
    pub token: String,
    pub disks: Vec<OutgoingDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingDisk {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// A VM directory whose record cannot be read, and why.
pub type Unreadable = (PathBuf, RecordError);

/// Paths under a worker's state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }

    pub fn record(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vm.json")
    }

    /// What the VM's `vmm` creates: sockets and the console.
    pub fn jail_dir(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("jail")
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.jail_dir(name).join("api.sock")
    }

    /// The host side of the VM's vsock device (its guest agent is reached through it).
    pub fn vsock(&self, name: &str) -> PathBuf {
        self.jail_dir(name).join("vsock.sock")
    }

    pub fn console(&self, name: &str) -> PathBuf {
        self.jail_dir(name).join("console.log")
    }

    pub fn vmm_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vmm.log")
    }

    pub fn root_disk(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("root.qcow2")
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    pub fn volume(&self, name: &str) -> PathBuf {
        self.volumes_dir().join(format!("{name}.qcow2"))
    }

    /// Disks fetched for a VM moving here, until it starts (`<name>/manifest.json` and the files).
    pub fn incoming_dir(&self, name: &str) -> PathBuf {
        self.root.join("incoming").join(name)
    }

    /// Images pulled from the control plane.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where the copies of a forgotten worker's VMs are kept (never deleted by the agent).
    pub fn archive_dir(&self) -> PathBuf {
        self.root.join("archive")
    }

    /// The state directories, 0700: the VMs' disks, logs, consoles and sockets are no one
    /// else's business on the host.
    pub fn create_dirs(&self) -> io::Result<()> {
        for d in [self.root.clone(), self.vms_dir(), self.volumes_dir()] {
            create_private_dir(&d)?;
        }
        Ok(())
    }

    /// Writes the record atomically (temporary file, fsync, rename): a crash leaves the old
    /// record or the new one, never half of one.
    pub fn save(&self, rec: &Record) -> io::Result<()> {
        use std::io::Write;
        let dir = self.vm_dir(&rec.name);
        create_private_dir(&dir)?;
        let tmp = dir.join("vm.json.tmp");
        let mut f = private_file(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(rec).map_err(io::Error::other)?)?;
        f.sync_all()?;
        super::durable::rename(&tmp, &self.record(&rec.name))?;
        // The VM's directory may be new: its entry in vms/ must be durable too.
        super::durable::sync_parent(&dir)
    }

    /// Every record on disk. Directories without a readable record are reported, not fatal:
    /// one damaged directory must not stop the worker from managing the others.
    pub fn load_all(&self) -> io::Result<(Vec<Record>, Vec<Unreadable>)> {
        let mut records = Vec::new();
        let mut broken = Vec::new();
        let entries = match std::fs::read_dir(self.vms_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((records, broken)),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let dir = entry?.path();
            match read_record(&dir.join("vm.json")) {
                Ok(r) => records.push(r),
                Err(why) => broken.push((dir, why)),
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((records, broken))
    }

    pub fn remove_vm(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.vm_dir(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// Why a VM's record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The file is not a record.
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn read_record(path: &Path) -> Result<Record, RecordError> {
    let bytes = std::fs::read(path).map_err(|source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| RecordError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates `dir` (and its parents) and makes it 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Creates (or truncates) `path` with mode 0600.
pub fn private_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_broken_ones_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create_dirs().unwrap();
        let rec = Record {
            name: "web-1".into(),
            uid: "u1".into(),
            ip: Ipv4Addr::new(10, 0, 0, 2),
            tap: "lbt-u1".into(),
            mac: "02:00:00:00:00:01".into(),
            pid: Some(42),
            pid_start: Some(7),
            boot_time: None,
            restarts: 0,
            stopped: false,
            failed: None,
            outgoing: None,
            jail_uid: None,
        };
        layout.save(&rec).unwrap();
        std::fs::create_dir_all(layout.vm_dir("junk")).unwrap();
        std::fs::write(layout.record("junk"), b"{not json").unwrap();
        let (records, broken) = layout.load_all().unwrap();
        assert_eq!(records, vec![rec]);
        assert_eq!(broken.len(), 1);
        assert!(broken[0].0.ends_with("junk"));
        layout.remove_vm("web-1").unwrap();
        layout.remove_vm("web-1").unwrap();
        assert!(!layout.vm_dir("web-1").exists());
    }
}
