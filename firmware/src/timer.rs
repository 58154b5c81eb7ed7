//! Time: the TSC, calibrated once against the PIT (both the VMM's in-kernel PIT and QEMU's
//! have channel 2 gated through port 0x61), for Stall, timer events and loaders' timeouts.

use crate::io::{inb, outb, rdtsc};
use crate::racy::Racy;

static TSC_PER_US: Racy<u64> = Racy::new(1000);

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_US: u64 = 10_000;

/// Measures the TSC frequency over 10 ms of PIT channel 2.
pub fn calibrate() {
    let ticks = (PIT_HZ * CALIBRATION_US / 1_000_000) as u16;
    // Gate low, speaker off.
    let port61 = inb(0x61) & !0x03;
    outb(0x61, port61);
    // Channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count), binary.
    outb(0x43, 0xb0);
    outb(0x42, ticks as u8);
    outb(0x42, (ticks >> 8) as u8);
    outb(0x61, port61 | 0x01);
    let start = rdtsc();
    let mut end = start;
    // Bounded: a PIT that never counts must not hang the boot (a billion cycles is ~0.3 s and
    // more on real CPUs than 10 ms needs).
    for _ in 0..50_000_000u64 {
        end = rdtsc();
        if inb(0x61) & 0x20 != 0 {
            break;
        }
    }
    outb(0x61, port61);
    let per_us = (end - start) / CALIBRATION_US;
    TSC_PER_US.set(per_us.max(1));
}

/// TSC ticks per microsecond.
pub fn tsc_per_us() -> u64 {
    TSC_PER_US.get()
}

/// Microseconds since an arbitrary point.
pub fn now_us() -> u64 {
    rdtsc() / tsc_per_us()
}

/// Milliseconds since the vCPU started (KVM starts the guest's TSC at zero), for log lines
/// that show where boot time goes.
pub fn since_start_ms() -> u64 {
    now_us() / 1000
}

/// Busy-waits `us` microseconds.
pub fn stall(us: u64) {
    let end = rdtsc().saturating_add(us.saturating_mul(tsc_per_us()));
    while rdtsc() < end {
        crate::io::pause();
    }
}
