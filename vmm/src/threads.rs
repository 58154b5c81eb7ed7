//! The threads a VMM keeps for a VM's life (vCPUs, device workers, the API, the console, the
//! memory loader, the VM watcher) start through [`builder`], with a stack smaller than a huge
//! page.
//!
//! On hosts whose transparent huge pages are `always` (RHEL's default, and the test host's), a
//! default 2 MiB thread stack whose usable part happens to land 2 MiB-aligned is backed by one
//! huge page at its first touch: a thread that uses a few KiB of stack then holds 2 MiB for the
//! VM's life (smaps of idle guests in the test host showed one such stack in every `vmm` and
//! in every Firecracker process). A 1 MiB stack can never hold an aligned huge page, and none
//! of these threads recurses: an idle VM's thread stacks had 8 KiB resident each.

/// Stack size of the VMM's long-lived threads.
pub const STACK_SIZE: usize = 1 << 20;

/// A thread builder with `name` and [`STACK_SIZE`].
pub fn builder(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(STACK_SIZE)
}

/// Puts the calling thread under scheduling `policy` (`SCHED_OTHER`, `SCHED_BATCH` or
/// `SCHED_IDLE`, none of which has a priority). The jail's filters allow exactly the switches
/// the VMM's threads make.
pub fn set_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes the calling thread's (id 0) scheduling policy; reads `param` only.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
