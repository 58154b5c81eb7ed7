//! Guest physical address map. One place for every fixed address, so that the loader, the ACPI
//! tables and the device layer cannot disagree.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (RAM)
//! 0x0000_0500  boot GDT
//! 0x0000_6000  PVH hvm_start_info, memory map and module list
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  boot page tables (PML4, PDPT, 4 PDs: identity map of the first 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 0x0010_0000: not RAM (ACPI tables live at 0xe_0000)
//! 0x0010_0000  kernel, then initramfs at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: PCI BAR window (512 MiB), then ECAM for bus 0 at 0xe000_0000,
//!              IOAPIC and LAPIC windows, up to 0x1_0000_0000
//! 0x1_0000_0000 RAM above 4 GiB
//! ```

/// Boot GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT location (an empty IDT; the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, one PDPT and four page directories.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (Linux x86's COMMAND_LINE_SIZE, NUL included).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, in the legacy BIOS area where an OS also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// End of the legacy BIOS area.
pub const ACPI_END: u64 = 0x100000;
/// Start of RAM the kernel may be loaded into.
pub const HIGH_RAM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = (1 << 32) - MMIO_HOLE_START;
/// RAM that does not fit below the hole continues here.
pub const RAM_ABOVE_4G_START: u64 = 1 << 32;
/// Start of the window PCI memory BARs are allocated in.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the PCI BAR window.
pub const PCI_MMIO32_END: u64 = 0xe000_0000;
/// PCIe ECAM (enhanced configuration access) for bus 0.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// ECAM size: 1 MiB covers the 32 devices x 8 functions x 4 KiB of bus 0.
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// IOAPIC register window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC register window.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// TSS address given to KVM (three pages just below the IOAPIC window region KVM expects free).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
