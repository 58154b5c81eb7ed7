//! A jailed VMM's seccomp filters (the `seccompiler` crate compiles them to BPF).
//!
//! - The **process** list is installed on every thread (TSYNC) when the jail closes, before any
//!   other thread exists, so no thread ever runs unfiltered. It is what the VMM needs anywhere:
//!   the API thread and its blocking pool build VMs (KVM, files, sockets, threads), snapshot
//!   them and serve HTTP, so the API's list is this one.
//! - **vCPU** threads add their own at start: ioctls of KVM and TUN only, no listening sockets,
//!   no files made, removed or re-moded; but what activating a device from a vCPU exit takes
//!   (threads, epoll, eventfds, io_uring set-up) and, since the device threads it starts are
//!   bound by its filter too, what those need.
//! - **Device** threads (virtio workers, block I/O threads) add theirs: I/O on the fds they were
//!   given, epoll, Unix sockets for vsock; no new threads, no ioctl beyond TUN and block ones.
//!
//! Filters stack, so a thread spawned by a vCPU thread is bounded by both. A call outside the
//! lists traps: the SIGSYS handler writes which call and which thread kind to stderr (the VMM's
//! log), then the process dies of SIGSYS.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A list did not compile.
    #[error("building the {kind} filter: {source}")]
    Build {
        /// Which list.
        kind: &'static str,
        /// Why.
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter.
    #[error("installing the {kind} filter: {source}")]
    Install {
        /// Which list.
        kind: &'static str,
        /// Why.
        source: seccompiler::Error,
    },
    /// sigaction failed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The kinds of threads with a list of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The API server thread (its list is the process's).
    Api,
    /// A vCPU thread.
    Vcpu,
    /// A device worker or block I/O thread.
    Device,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Api => "api",
            Kind::Vcpu => "vcpu",
            Kind::Device => "device",
        }
    }
}

/// Calls every thread makes: memory, locks, signals and thread exit as std and glibc do them,
/// time, and opening files (glibc's allocator reads a /proc file on some threads; the jail's
/// root holds only the VM's own files anyway).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    libc::SYS_prctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_restart_syscall,
    // Adding a filter only ever restricts: threads add their own lists on top.
    libc::SYS_seccomp,
];

/// Block and file I/O on descriptors already open.
const FILE_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_io_uring_enter,
];

/// Event loops, timers (vsock's) and socket traffic (vsock's host side is Unix sockets).
const EVENTS: &[i64] = &[
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// Renaming files: the console log rotates on the vCPU thread that writes it.
const RENAME: &[i64] = &[libc::SYS_rename, libc::SYS_renameat, libc::SYS_renameat2];

/// Starting threads and device machinery (a vCPU activates devices).
const SPAWN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// Only the process list: building VMs, the API, snapshots, the console, signals.
const PROCESS_ONLY: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_flock,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // The memory loader's prefetcher lowers itself to idle priority (raising needs a
    // capability the jail does not keep).
    libc::SYS_sched_setscheduler,
    libc::SYS_epoll_pwait2,
    libc::SYS_pipe2,
    libc::SYS_prlimit64,
    libc::SYS_memfd_create,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sendfile,
    libc::SYS_copy_file_range,
    libc::SYS_fadvise64,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_sched_setaffinity,
];

/// ioctl request types (bits 8-15) a vCPU may use: KVM's, TUN's (a vCPU activating a
/// virtio-net device sets the TAP's offloads) and the device threads' it starts.
const VCPU_IOCTL_TYPES: &[u64] = &[0xae, b'T' as u64, 0x12];
/// ioctl request types a device thread may use: TUN's and block devices' (0x12).
const DEVICE_IOCTL_TYPES: &[u64] = &[b'T' as u64, 0x12];

struct Filters {
    vcpu: BpfProgram,
    device: BpfProgram,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    // What the SIGSYS handler names; a const-initialised Cell is a plain TLS read there.
    static KIND: Cell<&'static str> = const { Cell::new("main") };
}

fn allow(rules: &mut BTreeMap<i64, Vec<SeccompRule>>, calls: &[i64]) {
    for &c in calls {
        rules.insert(c, Vec::new());
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("argument index < 6")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("at least one condition")
}

/// socket(2) for Unix sockets only (vsock connects to host listeners).
fn unix_sockets() -> Vec<SeccompRule> {
    vec![rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])]
}

/// sched_setscheduler(2) on the calling thread, to the default policy or `SCHED_BATCH` only
/// (a block device's worker batches its wake-ups while the guest keeps several requests
/// outstanding).
fn own_batching() -> Vec<SeccompRule> {
    [libc::SCHED_OTHER, libc::SCHED_BATCH]
        .iter()
        .map(|&policy| {
            rule(vec![
                cond(0, SeccompCmpOp::Eq, 0),
                cond(1, SeccompCmpOp::Eq, policy as u64),
            ])
        })
        .collect()
}

/// A vCPU thread's lists: it starts device threads (activation happens on the vCPU exit that
/// writes DRIVER_OK), and a thread's filter binds every thread it starts, so it holds what
/// device threads need too.
const VCPU: &[&[i64]] = &[COMMON, FILE_IO, EVENTS, SPAWN, RENAME];
/// A device thread's lists.
const DEVICE: &[&[i64]] = &[COMMON, FILE_IO, EVENTS];
/// The process's lists.
const PROCESS: &[&[i64]] = &[COMMON, FILE_IO, EVENTS, SPAWN, RENAME, PROCESS_ONLY];

fn ioctl_types(types: &[u64]) -> Vec<SeccompRule> {
    types
        .iter()
        .map(|t| rule(vec![cond(1, SeccompCmpOp::MaskedEq(0xff00), t << 8)]))
        .collect()
}

fn build(
    kind: &'static str,
    parts: &[&[i64]],
    extra: impl FnOnce(&mut BTreeMap<i64, Vec<SeccompRule>>),
) -> Result<BpfProgram, SeccompError> {
    let mut rules = BTreeMap::new();
    for p in parts {
        allow(&mut rules, p);
    }
    // Signals only to this process's own threads (the VMM kicks its vCPUs; the SIGSYS handler
    // re-raises).
    let pid = std::process::id();
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, u64::from(pid))])],
    );
    extra(&mut rules);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { kind, source })?;
    filter
        .try_into()
        .map_err(|source| SeccompError::Build { kind, source })
}

/// A vCPU thread's filter.
fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    build("vcpu", VCPU, |r| {
        r.insert(libc::SYS_ioctl, ioctl_types(VCPU_IOCTL_TYPES));
        r.insert(libc::SYS_socket, unix_sockets());
        r.insert(libc::SYS_sched_setscheduler, own_batching());
    })
}

/// A device thread's filter.
fn device_filter() -> Result<BpfProgram, SeccompError> {
    build("device", DEVICE, |r| {
        r.insert(libc::SYS_ioctl, ioctl_types(DEVICE_IOCTL_TYPES));
        r.insert(libc::SYS_socket, unix_sockets());
        r.insert(libc::SYS_sched_setscheduler, own_batching());
    })
}

/// Installs the SIGSYS handler and the process list on every thread, and prepares the
/// per-thread lists. Called once, by [`super::enter`].
pub fn install_process() -> Result<(), SeccompError> {
    let process = build("process", PROCESS, |_| {})?;
    let (vcpu, device) = (vcpu_filter()?, device_filter()?);
    install_handler().map_err(SeccompError::Handler)?;
    seccompiler::apply_filter_all_threads(&process).map_err(|source| SeccompError::Install {
        kind: "process",
        source,
    })?;
    let _ = FILTERS.set(Filters { vcpu, device });
    Ok(())
}

/// Adds the list of `kind` to the calling thread (nothing when the VMM is not jailed). A
/// thread that cannot be filtered must not run: the process ends.
pub fn enter_thread(kind: Kind) {
    KIND.with(|k| k.set(kind.name()));
    let Some(filters) = FILTERS.get() else { return };
    let program = match kind {
        Kind::Api => return,
        Kind::Vcpu => &filters.vcpu,
        Kind::Device => &filters.device,
    };
    if let Err(e) = seccompiler::apply_filter(program) {
        eprintln!("vmm: seccomp: installing the {} filter: {e}", kind.name());
        // SAFETY: _exit ends the process at once; nothing of this thread runs unfiltered.
        unsafe { libc::_exit(1) };
    }
}

/// Whether the jail's filters are on in this process.
pub fn active() -> bool {
    FILTERS.get().is_some()
}

fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we fill in the handler, flags and an empty mask.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    // Reset to the default action on delivery: the re-raised SIGSYS then kills the process.
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: sigemptyset on our own struct; sigaction with valid pointers.
    let rc = unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes `n` in decimal at the start of `buf`, returning the digits written.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The system call number of a seccomp SIGSYS: `si_syscall`, after si_signo, si_errno,
/// si_code, padding and si_call_addr in x86_64's siginfo (the libc crate has no accessor).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; SIGSYS from seccomp
    // fills si_syscall at this offset.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let kind = KIND.with(|k| k.get());
    let mut digits = [0u8; 20];
    let parts: [&[u8]; 5] = [
        b"vmm: seccomp: forbidden system call ",
        decimal(nr.unsigned_abs().into(), &mut digits),
        b" on a ",
        kind.as_bytes(),
        b" thread; the VMM dies of SIGSYS\n",
    ];
    for p in parts {
        // SAFETY: write(2) of a valid buffer to stderr; async-signal-safe.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // SAFETY: getpid/gettid/tgkill are async-signal-safe. SIGSYS is blocked while this handler
    // runs and its action is the default again (SA_RESETHAND): on return it kills the process.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles() {
        // A filter installed in a test would bind the test runner's thread: only compile them.
        build("process", PROCESS, |_| {}).unwrap();
        vcpu_filter().unwrap();
        device_filter().unwrap();
        let mut d = [0u8; 20];
        assert_eq!(decimal(0, &mut d), b"0");
        assert_eq!(decimal(1234, &mut d), b"1234");
    }

    #[test]
    fn a_filtered_device_thread_may_switch_its_own_wakeups() {
        // A thread of its own: the filter binds it (and nothing else) for good. A call the
        // filter refused would end the test process (no SIGSYS handler here).
        let filter = device_filter().unwrap();
        let switched = std::thread::spawn(move || {
            seccompiler::apply_filter(&filter).unwrap();
            [libc::SCHED_BATCH, libc::SCHED_OTHER]
                .map(|policy| crate::threads::set_policy(policy).is_ok())
        })
        .join()
        .unwrap();
        assert_eq!(switched, [true, true]);
    }

    #[test]
    fn thread_lists_nest() {
        // A vCPU starts device threads: whatever a device thread may call, a vCPU may too.
        for list in DEVICE {
            for call in *list {
                assert!(VCPU.iter().any(|l| l.contains(call)), "{call}");
            }
        }
        for list in VCPU {
            for call in *list {
                assert!(PROCESS.iter().any(|l| l.contains(call)), "{call}");
            }
        }
        assert!(DEVICE_IOCTL_TYPES
            .iter()
            .all(|t| VCPU_IOCTL_TYPES.contains(t)));
        // What only the process may do: listening sockets, files made or removed, handlers.
        for call in [
            libc::SYS_bind,
            libc::SYS_unlink,
            libc::SYS_mkdir,
            libc::SYS_rt_sigaction,
        ] {
            assert!(!VCPU.iter().any(|l| l.contains(&call)), "{call}");
        }
    }

    #[test]
    fn the_probe_call_is_in_no_list() {
        for list in PROCESS {
            assert!(!list.contains(&libc::SYS_getppid));
            assert!(!list.contains(&libc::SYS_execve));
            assert!(!list.contains(&libc::SYS_ptrace));
            assert!(!list.contains(&libc::SYS_mount));
        }
    }
}
