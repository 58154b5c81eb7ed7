//! The worker's side of jailed `vmm`s: a uid/gid of its own for each VM, the VM's files handed
//! to it, a cgroup v2 directory with limits from the VM's size, and the `--jail` arguments
//! naming what the VMM may see. Root's work (TAPs, bridge, nftables, cgroups) stays here.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::record::{Layout, Record};

/// Memory a `vmm` uses besides guest RAM, allowed on top of it in `memory.max`: its code and
/// heap, virtqueue and block buffers, qcow2 metadata caches, io_uring rings and thread stacks
/// (a few MiB measured at idle; the rest is headroom for I/O bursts).
pub const MEMORY_OVERHEAD: u64 = 128 << 20;
/// Tasks a `vmm` may have besides one per vCPU: API, device workers, block I/O threads.
pub const PIDS_BASE: u64 = 96;
/// The cgroup v2 filesystem's magic number (statfs f_type).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// Controllers each VM's cgroup needs.
const CONTROLLERS: &str = "+cpu +memory +pids";

/// How this worker jails its VMs.
#[derive(Debug, Clone)]
pub struct JailSettings {
    /// The first uid (and gid) handed to VMs; VM n gets `uid_base + n`.
    pub uid_base: u32,
    /// How many ids from `uid_base` VMs may take.
    pub uid_count: u32,
    /// Parent of the VMs' cgroups (`<dir>/lightbyte-<worker>-<vm>`); none when cgroup v2 is not
    /// mounted.
    pub cgroup_root: Option<PathBuf>,
}

/// Whether cgroup v2 is what is mounted at /sys/fs/cgroup (not the v1 hierarchy or the hybrid
/// layout, where v2 has no controllers).
pub fn cgroup2_mounted() -> bool {
    let Ok(path) = std::ffi::CString::new(CGROUP_MOUNT) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we own, given a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type == CGROUP2_SUPER_MAGIC
    }
}

/// The uid a VM gets: its record's, or the lowest one no other VM here holds.
pub fn pick_uid(settings: &JailSettings, rec: &Record, others: &[Record]) -> Option<u32> {
    if let Some(uid) = rec.jail_uid {
        return Some(uid);
    }
    let taken: BTreeSet<u32> = others
        .iter()
        .filter(|r| r.name != rec.name)
        .filter_map(|r| r.jail_uid)
        .collect();
    (0..settings.uid_count)
        .map(|i| settings.uid_base.saturating_add(i))
        .find(|u| !taken.contains(u))
}

/// Limits of a VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: u64,
    /// CPU time per 100 ms period, in µs.
    pub cpu_quota: u64,
    pub pids_max: u64,
    /// Its share of contended CPU (`cpu.weight`; 100 is one ordinary thread's): one per vCPU,
    /// as its vCPU threads weighed before they were grouped. VM cgroups sit side by side
    /// directly under the cgroup root (`lightbyte-WORKER-VM`): nested under a common parent, all
    /// VMs would weigh as one thread against the host's other processes (and a parent weighing
    /// the sum of its VMs would let one busy VM starve etcd and the agents).
    pub cpu_weight: u64,
}

/// The most `cpu.weight` takes.
const MAX_WEIGHT: u64 = 10_000;

/// The limits of a VM of `memory` bytes and `cpus` vCPUs: its RAM plus [`MEMORY_OVERHEAD`], its
/// vCPUs plus one CPU for device and I/O threads, [`PIDS_BASE`] tasks plus its vCPUs, a CPU
/// weight of one thread per vCPU.
pub fn limits(memory: u64, cpus: u32) -> Limits {
    Limits {
        memory_max: memory.saturating_add(MEMORY_OVERHEAD),
        cpu_quota: (u64::from(cpus) + 1) * 100_000,
        pids_max: PIDS_BASE + u64::from(cpus),
        cpu_weight: (u64::from(cpus) * 100).min(MAX_WEIGHT),
    }
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The cgroup directory of VM `vm` on worker `worker`.
pub fn cgroup_dir(root: &Path, worker: &str, vm: &str) -> PathBuf {
    root.join(format!("lightbyte-{worker}-{vm}"))
}

/// Makes the VM's cgroup with `limits`, enabling the controllers on every level above it.
pub fn prepare_cgroup(root: &Path, worker: &str, vm: &str, limits: Limits) -> io::Result<PathBuf> {
    let dir = cgroup_dir(root, worker, vm);
    let mount = Path::new(CGROUP_MOUNT);
    let mut level = mount.to_path_buf();
    let below = dir
        .parent()
        .and_then(|p| p.strip_prefix(mount).ok())
        .ok_or_else(|| {
            io::Error::other(format!("{} is not under {CGROUP_MOUNT}", dir.display()))
        })?;
    // Controllers are handed down level by level; a level's own processes would forbid it, and
    // these levels hold none.
    let mut levels = vec![level.clone()];
    for part in below.components() {
        level.push(part);
        levels.push(level.clone());
    }
    for l in &levels {
        match std::fs::create_dir(l) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io::Error::new(e.kind(), format!("{}: {e}", l.display())))
            }
            _ => {}
        }
        write_file(&l.join("cgroup.subtree_control"), CONTROLLERS)?;
    }
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
        }
        _ => {}
    }
    write_file(&dir.join("memory.max"), &limits.memory_max.to_string())?;
    write_file(
        &dir.join("cpu.max"),
        &format!("{} 100000", limits.cpu_quota),
    )?;
    write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
    write_file(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
    // Guest RAM swapped out by the host would make the limit meaningless and the guest slow.
    let swap = dir.join("memory.swap.max");
    if swap.exists() {
        write_file(&swap, "0")?;
    }
    Ok(dir)
}

/// How long a VM's cgroup may stay busy after its `vmm` was seen exiting: the process's
/// leader is a zombie before its other threads (and KVM's workers) have all left.
const CGROUP_BUSY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes a VM's cgroup (its `vmm` has exited); nothing to do when it is gone.
pub async fn remove_cgroup(settings: Option<&JailSettings>, worker: &str, vm: &str) {
    let Some(root) = settings.and_then(|s| s.cgroup_root.as_deref()) else {
        return;
    };
    let dir = cgroup_dir(root, worker, vm);
    let deadline = std::time::Instant::now() + CGROUP_BUSY_FOR;
    loop {
        match std::fs::remove_dir(&dir) {
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(vm, error = %e, "cannot remove cgroup {}", dir.display());
                return;
            }
            _ => return,
        }
    }
}

/// Hands `path` to the VM's uid: owner-only, as every VM file is.
pub fn give(path: &Path, uid: u32, mode: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The jail directory of a VM, made and handed to `uid`: what the VMM creates (sockets,
/// console) goes there; the record and the VMM's own log stay root's, one level up.
pub fn prepare_dir(layout: &Layout, name: &str, uid: u32) -> io::Result<PathBuf> {
    let dir = layout.jail_dir(name);
    super::record::create_private_dir(&dir)?;
    give(&dir, uid, 0o700)?;
    // A console log from an earlier run (or an unjailed one) must stay writable.
    let console = layout.console(name);
    if console.exists() {
        give(&console, uid, 0o600)?;
    }
    Ok(dir)
}

/// `vmm` arguments closing the jail: ids, cgroup, and the paths it may see (read-write: the
/// jail directory and the disks; read-only: kernel and initramfs; the VMM adds the disks'
/// backing chains itself).
pub fn vmm_args(
    uid: u32,
    cgroup: Option<&Path>,
    rw: &[PathBuf],
    ro: &[PathBuf],
) -> Vec<std::ffi::OsString> {
    let mut spec = format!("uid={uid},gid={uid}");
    if let Some(c) = cgroup {
        spec.push_str(&format!(",cgroup={}", c.display()));
    }
    let mut args: Vec<std::ffi::OsString> = vec!["--jail".into(), spec.into()];
    for p in rw {
        args.push("--jail-rw".into());
        args.push(p.into());
    }
    for p in ro {
        args.push("--jail-ro".into());
        args.push(p.into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn rec(name: &str, uid: Option<u32>) -> Record {
        Record {
            name: name.into(),
            uid: format!("u-{name}"),
            ip: Ipv4Addr::new(10, 0, 0, 2),
            tap: "t".into(),
            mac: "m".into(),
            pid: None,
            pid_start: None,
            boot_time: None,
            restarts: 0,
            stopped: false,
            failed: None,
            outgoing: None,
            jail_uid: uid,
        }
    }

    #[test]
    fn each_vm_gets_a_uid_of_its_own_and_keeps_it() {
        let s = JailSettings {
            uid_base: 1000,
            uid_count: 3,
            cgroup_root: None,
        };
        let others = vec![rec("a", Some(1000)), rec("b", Some(1002)), rec("c", None)];
        assert_eq!(pick_uid(&s, &rec("c", None), &others), Some(1001));
        assert_eq!(pick_uid(&s, &rec("b", Some(1002)), &others), Some(1002));
        let full = vec![
            rec("a", Some(1000)),
            rec("b", Some(1001)),
            rec("d", Some(1002)),
        ];
        assert_eq!(pick_uid(&s, &rec("c", None), &full), None);
    }

    #[test]
    fn limits_follow_the_vm_size() {
        let l = limits(512 << 20, 2);
        assert_eq!(l.memory_max, (512 << 20) + MEMORY_OVERHEAD);
        assert_eq!(l.cpu_quota, 300_000);
        assert_eq!(l.pids_max, PIDS_BASE + 2);
        assert_eq!(l.cpu_weight, 200);
        assert_eq!(limits(1 << 30, 254).cpu_weight, MAX_WEIGHT);
    }

    #[test]
    fn jail_arguments_name_ids_cgroup_and_paths() {
        let args = vmm_args(
            400_001,
            Some(Path::new("/sys/fs/cgroup/lightbyte-w1-vm")),
            &[PathBuf::from("/s/vms/vm/jail")],
            &[PathBuf::from("/k/vmlinux")],
        );
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--jail",
                "uid=400001,gid=400001,cgroup=/sys/fs/cgroup/lightbyte-w1-vm",
                "--jail-rw",
                "/s/vms/vm/jail",
                "--jail-ro",
                "/k/vmlinux"
            ]
        );
    }
}
