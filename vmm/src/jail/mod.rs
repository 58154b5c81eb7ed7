//! The jail a `vmm` closes itself into before it serves anything (`--jail`), as Firecracker's
//! jailer does from outside: the process joins a cgroup (the caller's limits), gets a mount
//! namespace whose root is an empty tmpfs holding only the paths the VM needs (bound at the
//! same absolute paths, so every path in the configuration keeps working) and its own
//! `/dev/kvm` and `/dev/net/tun` nodes, drops to an unprivileged uid/gid with no capabilities
//! and `no_new_privs`, and installs seccomp filters ([`seccomp`]): one for the whole process
//! before any thread exists, narrower ones per thread kind.
//!
//! Everything happens in `main` before the first thread is spawned: a mount namespace is
//! per-thread until then, and the process-wide filter must cover every thread.

pub mod cgroup;
mod mounts;
pub mod probe;
pub mod seccomp;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use vmm_api::config::{SerialConfig, VmConfig};

/// `--jail uid=N,gid=N[,cgroup=DIR]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// The unprivileged user the VMM runs as (not 0).
    pub uid: u32,
    /// Its group (not 0).
    pub gid: u32,
    /// A cgroup v2 directory the VMM moves itself into first (its limits are the caller's).
    pub cgroup: Option<PathBuf>,
}

/// Parses `uid=N,gid=N[,cgroup=DIR]`.
pub fn parse_jail(s: &str) -> Result<JailConfig, String> {
    let (mut uid, mut gid, mut cgroup) = (None, None, None);
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected KEY=VALUE (uid=, gid=, cgroup=)"))?;
        let id = || -> Result<u32, String> {
            match value.parse::<u32>() {
                Ok(0) => Err(format!(
                    "{key}=0: the jail runs the VMM as an unprivileged user"
                )),
                Ok(n) if n == u32::MAX => Err(format!("{key}={value}: not a usable id")),
                Ok(n) => Ok(n),
                Err(_) => Err(format!("{key}={value}: not a number")),
            }
        };
        match key {
            "uid" => uid = Some(id()?),
            "gid" => gid = Some(id()?),
            "cgroup" if !value.is_empty() => cgroup = Some(PathBuf::from(value)),
            "cgroup" => return Err("cgroup=: empty path".into()),
            _ => return Err(format!("unknown jail option `{key}` (uid=, gid=, cgroup=)")),
        }
    }
    Ok(JailConfig {
        uid: uid.ok_or("uid= is required")?,
        gid: gid.ok_or("gid= is required")?,
        cgroup,
    })
}

/// How a path is visible inside the jail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Bound read-only.
    ReadOnly,
    /// Bound read-write.
    ReadWrite,
}

/// A host path bound into the jail at the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visible {
    /// The path, outside and inside.
    pub path: PathBuf,
    /// Read-only or read-write.
    pub access: Access,
}

impl Visible {
    /// `path`, read-only.
    pub fn ro(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            access: Access::ReadOnly,
        }
    }

    /// `path`, read-write.
    pub fn rw(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            access: Access::ReadWrite,
        }
    }
}

/// Why the jail could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Not started as root (the uid it was to drop to).
    #[error("--jail needs root (it makes a mount namespace and then drops to uid {0})")]
    NotRoot(u32),
    /// The cgroup could not be joined.
    #[error("cgroup {}: {source}", path.display())]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A path to make visible does not exist.
    #[error("{}: {source} (a path the VM needs must exist before the jail closes)", path.display())]
    Missing {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A mount step failed.
    #[error("private root: {what}: {source}")]
    Mount {
        /// The step.
        what: String,
        /// What failed.
        source: io::Error,
    },
    /// The ids could not be dropped.
    #[error("dropping to uid {uid} gid {gid}: {source}")]
    Ids {
        /// Target uid.
        uid: u32,
        /// Target gid.
        gid: u32,
        /// What failed.
        source: io::Error,
    },
    /// The filters could not be installed.
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// The paths a VM configured on the command line needs: kernel and initramfs read-only, each
/// disk (read-write unless read-only) with its backing chain read-only, and the directories of
/// the console file (and the file itself when it exists) and the vsock sockets.
pub fn paths_for(config: &VmConfig) -> Vec<Visible> {
    let mut out = vec![Visible::ro(config.boot_image().1)];
    out.extend(config.initramfs.iter().map(Visible::ro));
    for disk in &config.disks {
        out.push(if disk.read_only {
            Visible::ro(&disk.path)
        } else {
            Visible::rw(&disk.path)
        });
        out.extend(backing_chain(&disk.path).into_iter().map(Visible::ro));
    }
    if let SerialConfig::File(p) = &config.serial {
        out.push(Visible::rw(parent_dir(p)));
        // A console file from an earlier run is appended to.
        if p.exists() {
            out.push(Visible::rw(p));
        }
    }
    if let Some(v) = &config.vsock {
        out.push(Visible::rw(parent_dir(&v.socket)));
    }
    out
}

/// The directory holding `path` (the current directory for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The backing files under a qcow2 image, as the image will resolve them. A file that does not
/// open as an image yields none (the VM build reports a broken disk).
pub fn backing_chain(image: &Path) -> Vec<PathBuf> {
    let opts = qcow::OpenOptions {
        writable: false,
        format: None,
        direct: false,
        hook: None,
    };
    let Ok(img) = qcow::Image::open(image, &opts) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut info = img.info();
    while let Some(backing) = info.backing {
        if let Some(path) = &info.full_backing_filename {
            out.push(PathBuf::from(path));
        }
        info = *backing;
    }
    out
}

/// Closes the jail around this process: cgroup, private root with `visible`, unprivileged ids,
/// seccomp. Must run before any other thread exists.
pub fn enter(config: &JailConfig, visible: &[Visible]) -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot(config.uid));
    }
    if let Some(dir) = &config.cgroup {
        cgroup::join(dir).map_err(|source| JailError::Cgroup {
            path: dir.clone(),
            source,
        })?;
    }
    hand_over(visible, config.uid, config.gid)?;
    // Snapshots read the page map later; the private root has no /proc.
    if let Err(e) = crate::vstate::pagemap::get() {
        tracing::warn!(error = e, "snapshots will scan all of guest memory");
    }
    // Restores load memory in the background through a userfaultfd made while we may.
    crate::snapshot::preopen_memory_loader();
    mounts::private_root(visible, config.uid, config.gid)?;
    drop_ids(config.uid, config.gid).map_err(|source| JailError::Ids {
        uid: config.uid,
        gid: config.gid,
        source,
    })?;
    seccomp::install_process()?;
    tracing::info!(
        uid = config.uid,
        gid = config.gid,
        paths = visible.len(),
        "jail closed"
    );
    Ok(())
}

/// Gives the read-write paths to the jail's user (as libvirt's dynamic ownership does with a
/// VM's images; they stay its afterwards), and checks that it can read the read-only ones, so a
/// file it could not open is reported here by name rather than as EACCES in the middle of a
/// boot. A read-write directory is handed over itself (the VMM creates its sockets and console
/// there; a stale socket in it can then be replaced).
fn hand_over(visible: &[Visible], uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::MetadataExt;
    let missing = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JailError::Missing { path, source }
    };
    for v in visible {
        let meta = std::fs::metadata(&v.path).map_err(missing(&v.path))?;
        match v.access {
            Access::ReadWrite => {
                std::os::unix::fs::chown(&v.path, Some(uid), Some(gid))
                    .map_err(missing(&v.path))?;
            }
            Access::ReadOnly => {
                let mode = meta.mode();
                let readable = (meta.uid() == uid && mode & 0o400 != 0)
                    || (meta.gid() == gid && mode & 0o040 != 0)
                    || mode & 0o004 != 0;
                if !readable {
                    return Err(JailError::Missing {
                        path: v.path.clone(),
                        source: io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            format!(
                                "not readable by uid {uid} gid {gid} (mode {:o}, owner {}:{})",
                                mode & 0o7777,
                                meta.uid(),
                                meta.gid()
                            ),
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Becomes `uid`/`gid` with no supplementary groups; a root process that changes all its uids
/// to a non-zero one loses every capability.
fn drop_ids(uid: u32, gid: u32) -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: setgroups with a zero count reads no memory; setresgid/setresuid take plain ids.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    // SAFETY: getuid/geteuid/getgid have no preconditions.
    let (u, e, g) = unsafe { (libc::getuid(), libc::geteuid(), libc::getgid()) };
    if u != uid || e != uid || g != gid {
        return Err(io::Error::other(format!(
            "still uid {u} euid {e} gid {g} after the change"
        )));
    }
    Ok(())
}

impl fmt::Display for Visible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = match self.access {
            Access::ReadOnly => "ro",
            Access::ReadWrite => "rw",
        };
        write!(f, "{} ({access})", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_jail_options_and_refuses_root_and_junk() {
        let j = parse_jail("uid=1000,gid=1001,cgroup=/sys/fs/cgroup/x").unwrap();
        assert_eq!((j.uid, j.gid), (1000, 1001));
        assert_eq!(j.cgroup.as_deref(), Some(Path::new("/sys/fs/cgroup/x")));
        assert_eq!(parse_jail("gid=5,uid=7").unwrap().cgroup, None);
        for bad in [
            "uid=0,gid=5",
            "uid=5,gid=0",
            "uid=5",
            "gid=5",
            "uid=x,gid=5",
            "uid=5,gid=5,root=/",
            "uid=5,gid=5,cgroup=",
            "uid",
            "",
            "uid=4294967295,gid=5",
        ] {
            assert!(parse_jail(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_command_line_vm_sees_its_files_and_their_backing_chains() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 65536]).unwrap();
        let over = dir.path().join("over.qcow2");
        qcow::create(
            &over,
            &qcow::CreateOptions {
                backing_file: Some(base.display().to_string()),
                backing_format: Some(qcow::Format::Raw),
                ..qcow::CreateOptions::default()
            },
        )
        .unwrap();
        let config = VmConfig {
            kernel: "/k/vmlinux".into(),
            firmware: None,
            initramfs: Some("/k/initrd".into()),
            cmdline: String::new(),
            cpus: 1,
            memory: 1 << 28,
            serial: SerialConfig::File("/logs/console.log".into()),
            disks: vec![vmm_api::config::DiskConfig {
                path: over.clone(),
                format: None,
                read_only: false,
                serial: None,
                direct: false,
                on_error: Default::default(),
            }],
            nets: vec![],
            vsock: Some(vmm_api::config::VsockConfig {
                cid: 3,
                socket: "/run/vm/v.sock".into(),
            }),
        };
        assert_eq!(
            paths_for(&config),
            vec![
                Visible::ro("/k/vmlinux"),
                Visible::ro("/k/initrd"),
                Visible::rw(&over),
                Visible::ro(&base),
                Visible::rw("/logs"),
                Visible::rw("/run/vm"),
            ]
        );
    }
}
