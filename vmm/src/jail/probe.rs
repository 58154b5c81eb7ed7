//! A test-only way for a guest to make its VMM call a system call no seccomp filter allows, to
//! check end to end that the filter kills the VMM (and that whoever runs it says why). Present
//! only when the VMM starts with `LIGHTBYTE_TEST_SECCOMP_PROBE=1` in its environment: a write
//! to I/O port [`PROBE_PORT`] then calls getppid(2) from the vCPU thread.

use crate::devices::bus::BusDevice;

/// The port the guest writes to.
pub const PROBE_PORT: u16 = 0x5eb;
/// The environment variable that adds the device.
pub const PROBE_ENV: &str = "LIGHTBYTE_TEST_SECCOMP_PROBE";

/// Whether this VMM was started with the probe.
pub fn enabled() -> bool {
    std::env::var_os(PROBE_ENV).is_some_and(|v| v == "1")
}

/// The probe device.
pub struct SeccompProbe;

impl BusDevice for SeccompProbe {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        tracing::warn!("seccomp probe: the guest asks for a forbidden system call (getppid)");
        // SAFETY: getppid takes no arguments and has no effect; under a jail's filter it never
        // runs (the filter traps it).
        let parent = unsafe { libc::syscall(libc::SYS_getppid) };
        tracing::warn!("seccomp probe: getppid returned {parent}: no seccomp filter stopped it");
    }
}
