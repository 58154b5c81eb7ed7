//! A KVM VM made ahead of time, while the process waits for what to run.
//!
//! Making a VM (`KVM_CREATE_VM`, the in-kernel interrupt controllers and PIT) took 17–27 ms of
//! a restore request in the test host, with nested SVM under TCG, and takes milliseconds on
//! hardware. None of it depends on the VM's configuration: memory slots and vCPUs, which do,
//! come later. A `vmm` started to serve its API is idle until the request arrives (its client
//! connects and writes, the server parses), so the VM is made then, on a thread of its own, and
//! the request takes it ([`take`]). A `vmm` that boots from its flags makes its VM as it
//! builds: it has no idle time to use. Firecracker and Cloud Hypervisor make theirs inside the
//! request.

use std::sync::Mutex;
use std::thread::JoinHandle;

use kvm_ioctls::{Kvm, VmFd};

use super::vm::{self, Error};

/// The thread making the VM, until a build takes it.
static MAKING: Mutex<Option<JoinHandle<Result<VmFd, Error>>>> = Mutex::new(None);

/// Starts making a VM on a thread of its own, unless one is made or being made already. Call
/// it once the process is as it will be when it builds (jailed), so the VM is made as a
/// build would make it.
pub fn start() {
    let mut making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if making.is_some() {
        return;
    }
    let spawned = crate::threads::builder("vm-prepare").spawn(|| {
        let kvm = Kvm::new().map_err(|source| Error::Kvm {
            what: "open /dev/kvm",
            source,
        })?;
        vm::create_fd(&kvm)
    });
    match spawned {
        Ok(handle) => *making = Some(handle),
        // The build makes its VM itself.
        Err(e) => tracing::debug!(error = %e, "no VM made ahead of time"),
    }
}

/// The VM made ahead of time, waiting for it if it is still being made; `None` when none was
/// started (or one was taken already).
pub fn take() -> Option<Result<VmFd, Error>> {
    let handle = MAKING.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    Some(handle.join().unwrap_or_else(|_| {
        Err(Error::Prepare(
            "the thread making the VM ahead of time panicked",
        ))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_vm_is_made_and_taken_once() {
        // Whether this host can make one or not, the outcome is there to take, once; no build
        // in this crate's tests takes it first (none runs here).
        start();
        start();
        assert!(take().is_some());
        assert!(take().is_none(), "taken already, and only one was started");
    }
}
