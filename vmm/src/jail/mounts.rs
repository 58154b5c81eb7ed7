//! The jail's private root: a new mount namespace whose `/` is a small tmpfs holding the paths
//! the VM needs, bound at their own absolute paths (so configured paths, and qcow2 backing
//! names, resolve as outside), device nodes for KVM and TAP owned by the jail's user, and
//! nothing else. The old root is detached; the tmpfs is read-only once set up.
//!
//! Written on libc directly: the handful of mount calls here do not justify a crate, and each
//! call's failure is reported with what it was doing.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use super::{Access, JailError, Visible};

/// Where the new root is assembled: any directory will do, since the tmpfs mounted on it is
/// only seen in this process's namespace (it hides nothing from the host).
const STAGING: &str = "/tmp";

/// Device nodes the VMM opens after the jail closes: KVM (every VM and vCPU), TUN (TAPs), and
/// the two character devices libraries assume.
const DEVICES: &[(&str, u32)] = &[
    ("/dev/kvm", 0o600),
    ("/dev/net/tun", 0o600),
    ("/dev/null", 0o666),
    ("/dev/urandom", 0o444),
];

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Mount {
        what: format!("{}: path contains a NUL byte", p.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn failed(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Mount { what, source }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let what = format!(
        "mount {} on {}",
        source.map(|s| s.display().to_string()).unwrap_or_default(),
        target.display()
    );
    let src = source.map(cstr).transpose()?;
    let tgt = cstr(target)?;
    let fs = fstype.map(|f| CString::new(f).expect("static name"));
    let data = data.map(|d| CString::new(d).expect("static options"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string living across the call.
    let rc = unsafe { libc::mount(ptr(&src), tgt.as_ptr(), ptr(&fs), flags, ptr(&data).cast()) };
    check(rc).map_err(failed(what))
}

/// `path` made absolute against the current directory, without resolving symbolic links: the
/// jail recreates the path as written, which is how the VMM will open it.
fn absolute(path: &Path, cwd: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Builds the private root and enters it. `uid`/`gid` own the device nodes.
pub(super) fn private_root(visible: &[Visible], uid: u32, gid: u32) -> Result<(), JailError> {
    let cwd = std::env::current_dir().map_err(failed("reading the current directory"))?;
    // SAFETY: unshare only detaches this (still single-threaded) process's mount and IPC
    // namespaces.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC) })
        .map_err(failed("unshare(CLONE_NEWNS)"))?;
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    // Opened in the new namespace (binds come from its own mounts) before anything is mounted
    // over them: the binds below come from these handles, so a path under the staging
    // directory stays reachable.
    let mut sources = Vec::new();
    for v in visible {
        let path = absolute(&v.path, &cwd);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| JailError::Missing {
                path: path.clone(),
                source,
            })?;
        let is_dir = file
            .metadata()
            .map_err(|source| JailError::Missing {
                path: path.clone(),
                source,
            })?
            .is_dir();
        sources.push((path, file, is_dir, v.access));
    }
    // Parents before children, and a read-write bind wins over a read-only one of the same path.
    sources.sort_by(|a, b| {
        (a.0.components().count(), &a.0, a.3 == Access::ReadOnly).cmp(&(
            b.0.components().count(),
            &b.0,
            b.3 == Access::ReadOnly,
        ))
    });
    sources.dedup_by(|b, a| a.0 == b.0);
    let devices: Vec<(PathBuf, u64, u32)> = DEVICES
        .iter()
        .filter_map(|(p, mode)| {
            let m = fs::metadata(p).ok()?;
            Some((PathBuf::from(p), m.rdev(), *mode))
        })
        .collect();

    let root = Path::new(STAGING);
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));

    for (path, file, is_dir, access) in &sources {
        let target = inside(path);
        make_parents(&target)?;
        if *is_dir {
            match fs::DirBuilder::new().mode(0o755).create(&target) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(failed(format!("mkdir {}", target.display()))(e))
                }
                _ => {}
            }
        } else if !target.exists() {
            File::create(&target).map_err(failed(format!("creating {}", target.display())))?;
        }
        let handle = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        mount(Some(&handle), &target, None, libc::MS_BIND, None)?;
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
        flags |= libc::MS_NOEXEC;
        if *access == Access::ReadOnly {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &target, None, flags, None)?;
    }
    for (path, rdev, mode) in &devices {
        let target = inside(path);
        make_parents(&target)?;
        let c = cstr(&target)?;
        // SAFETY: mknod/chown on a NUL-terminated path inside our own tmpfs.
        unsafe {
            check(libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, *rdev))
                .map_err(failed(format!("mknod {}", target.display())))?;
            check(libc::chmod(c.as_ptr(), *mode))
                .map_err(failed(format!("chmod {}", target.display())))?;
            if *mode == 0o600 {
                check(libc::chown(c.as_ptr(), uid, gid))
                    .map_err(failed(format!("chown {}", target.display())))?;
            }
        }
    }
    // Relative paths keep resolving from the same directory (empty unless bound).
    let cwd_inside = inside(&cwd);
    make_parents(&cwd_inside)?;
    let _ = fs::DirBuilder::new().mode(0o755).create(&cwd_inside);
    drop(sources);

    enter_root(root)?;
    // The tmpfs itself becomes read-only: the VMM writes only into what was bound read-write.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )?;
    std::env::set_current_dir(&cwd).map_err(failed(format!("chdir {}", cwd.display())))?;
    Ok(())
}

fn make_parents(target: &Path) -> Result<(), JailError> {
    match target.parent() {
        Some(p) => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
            .map_err(failed(format!("mkdir {}", p.display()))),
        None => Ok(()),
    }
}

/// Makes `root` this process's `/` with the old root detached (pivot_root). Where pivot_root
/// is refused (the caller itself runs chrooted, as in the test host), falls back to chroot:
/// without CAP_SYS_CHROOT, which the jail drops, the process cannot climb out of it either.
fn enter_root(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(failed(format!("chdir {}", root.display())))?;
    let dot = CString::new(".").expect("static");
    // SAFETY: pivot_root(".", ".") stacks the old root on top of the new one, which the
    // umount2 below detaches; both take a NUL-terminated path.
    let pivoted = unsafe {
        libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0
            && libc::umount2(dot.as_ptr(), libc::MNT_DETACH) == 0
    };
    if !pivoted {
        let why = io::Error::last_os_error();
        tracing::info!("pivot_root refused ({why}); entering the jail with chroot");
        // SAFETY: chroot on a NUL-terminated path.
        check(unsafe { libc::chroot(dot.as_ptr()) }).map_err(failed("chroot"))?;
    }
    std::env::set_current_dir("/").map_err(failed("chdir /"))
}
