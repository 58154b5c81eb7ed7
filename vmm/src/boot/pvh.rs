//! The PVH boot protocol's `hvm_start_info`, memory map and module list.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{boot_info_err, BootPayload, Error, Initramfs};
use crate::arch::layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};
use crate::arch::memory::e820_map;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    payload: &BootPayload,
    initramfs: Option<Initramfs>,
) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(payload.mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    if memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::TooManyMemmapEntries(memmap.len()));
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: payload.rsdp.0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initramfs
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        })
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = PVH_MODLIST_START;
    }

    let mut boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    boot.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        boot.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(boot_info_err("PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vm_memory::Bytes;

    #[test]
    fn start_info_points_at_memmap_modules_and_cmdline() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let payload = BootPayload {
            kernel: Path::new("k"),
            initramfs: None,
            cmdline: "",
            mem_size: 64 << 20,
            rsdp: GuestAddress(0xe0000),
            firmware: false,
        };
        let initrd = Initramfs {
            addr: 0x300_0000,
            size: 77,
        };
        write_start_info(&mem, &payload, Some(initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 4);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 77));
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, 1));
    }
}
