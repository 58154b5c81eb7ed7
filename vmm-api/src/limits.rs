//! Limits a VM configuration must respect, shared by the VMM (which enforces them) and its
//! clients (which check requests before sending them).

/// Largest vCPU count the VMM describes: APIC IDs are 8 bits in its MADT and 0xff is broadcast.
/// A host's KVM may allow fewer; the VMM checks that too when it opens /dev/kvm.
pub const MAX_CPUS: u8 = 254;

/// Smallest guest RAM the VMM agrees to start: below this a Linux guest cannot even unpack
/// itself.
pub const MIN_MEMORY: u64 = 32 << 20;

/// Guest RAM granularity: memory sizes are whole 4 KiB pages.
pub const MEMORY_ALIGN: u64 = 4096;

/// Longest disk serial number virtio-blk's GET_ID can carry.
pub const MAX_DISK_SERIAL_LEN: usize = 20;

/// Longest interface name Linux accepts (IFNAMSIZ minus the terminating NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;
