//! Register state of the boot CPU for each boot mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt;
use super::layout::*;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

/// How the boot CPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI points at the zero page.
    LinuxLongMode {
        /// 64-bit entry point.
        entry: u64,
    },
    /// PVH: 32-bit protected mode, paging off, EBX points at `hvm_start_info`.
    Pvh {
        /// PVH entry point (from the XEN_ELFNOTE_PHYS32_ENTRY note).
        entry: u64,
    },
}

/// Error writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory does not cover the boot structures.
    #[error("writing boot {what} at {addr:#x}: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), Error> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| Error::Write { what, addr, source })
}

/// General-purpose registers at the kernel's entry.
pub fn boot_regs(mode: BootMode) -> kvm_regs {
    match mode {
        BootMode::LinuxLongMode { entry } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootMode::Pvh { entry } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Floating-point state every x86 CPU has after FNINIT (and Linux expects at entry).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the boot GDT (and, for long mode, identity-mapping page tables of the first 4 GiB) into
/// guest memory and fills `sregs` to match.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    mode: BootMode,
    sregs: &mut kvm_sregs,
) -> Result<(), Error> {
    let code = match mode {
        BootMode::LinuxLongMode { .. } => gdt::CODE64,
        BootMode::Pvh { .. } => gdt::CODE32,
    };
    let table = gdt::boot_gdt(code);
    for (i, entry) in table.iter().enumerate() {
        write(mem, "GDT", BOOT_GDT_START + 8 * i as u64, *entry)?;
    }
    write(mem, "IDT", BOOT_IDT_START, 0u64)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code_seg = gdt::segment_from_entry(table[gdt::CODE_INDEX as usize], gdt::CODE_INDEX);
    let data_seg = gdt::segment_from_entry(table[gdt::DATA_INDEX as usize], gdt::DATA_INDEX);
    let tss_seg = gdt::segment_from_entry(table[gdt::TSS_INDEX as usize], gdt::TSS_INDEX);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = tss_seg;

    match mode {
        BootMode::LinuxLongMode { .. } => {
            setup_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages: the 64-bit boot protocol wants the kernel, the
/// zero page and the command line mapped, wherever the kernel was placed.
fn setup_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write(mem, "PML4", PML4_START, PDPTE_START | PRESENT_RW)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        write(mem, "PDPTE", PDPTE_START + pd * 8, pd_addr | PRESENT_RW)?;
        for i in 0..512u64 {
            let page = ((pd << 9) | i) << 21;
            write(mem, "PDE", pd_addr + i * 8, page | PRESENT_RW | HUGE)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, BootMode::LinuxLongMode { entry: 0x1000200 }, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // The PDE for 3 GiB + 2 MiB maps exactly that address.
        let pd3: u64 = m.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        let pde: u64 = m.read_obj(GuestAddress((pd3 & !0xfff) + 8)).unwrap();
        assert_eq!(pde & !0xfff, (3 << 30) + (2 << 20));
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt::CODE64);
    }

    #[test]
    fn pvh_sregs_are_32bit_without_paging() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, BootMode::Pvh { entry: 0x1000 }, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(sregs.efer, 0);
        assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
        let regs = boot_regs(BootMode::Pvh { entry: 0x1000 });
        assert_eq!((regs.rip, regs.rbx), (0x1000, PVH_INFO_START));
    }

    #[test]
    fn writing_outside_memory_is_an_error() {
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut sregs = kvm_sregs::default();
        let err = setup_sregs(&tiny, BootMode::LinuxLongMode { entry: 0 }, &mut sregs);
        assert!(err.is_err());
    }
}
