//! The Linux x86 boot protocol's zero page (`boot_params`).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{boot_info_err, BootPayload, Error, Initramfs};
use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, ZERO_PAGE_START};
use crate::arch::memory::e820_map;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Fills and writes the zero page. `hdr` is the bzImage's own setup header; for an ELF vmlinux
/// booted through its 64-bit entry there is none and we make one up.
pub(super) fn write_zero_page(
    mem: &GuestMemoryMmap,
    payload: &BootPayload,
    hdr: Option<setup_header>,
    initramfs: Option<Initramfs>,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(h) = hdr {
        params.hdr = h;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = (payload.cmdline.len() + 1).min(CMDLINE_MAX_SIZE) as u32;
    if let Some(initrd) = initramfs {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = payload.rsdp.0;

    let map = e820_map(payload.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(Error::TooManyMemmapEntries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;

    let boot = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(boot_info_err("zero page"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vm_memory::Bytes;

    #[test]
    fn zero_page_has_cmdline_initrd_e820_and_rsdp() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let payload = BootPayload {
            firmware: false,
            kernel: Path::new("k"),
            initramfs: None,
            cmdline: "console=ttyS0",
            mem_size: 64 << 20,
            rsdp: GuestAddress(0xe0000),
        };
        let initrd = Initramfs {
            addr: 0x300_0000,
            size: 1234,
        };
        write_zero_page(&mem, &payload, None, Some(initrd)).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 14);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 4);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (0x10_0000, (64 << 20) - 0x10_0000)
        );
    }
}
