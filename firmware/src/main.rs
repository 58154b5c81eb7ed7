//! lightbyte's UEFI firmware.
//!
//! Loaded by `vmm --firmware` like a PVH kernel, it finds the virtio-blk disks on PCI, reads
//! their GPT and the FAT file system of the EFI system partition, and starts the boot loader it
//! finds there (`\EFI\BOOT\BOOTX64.EFI`, or a Boot Loader Specification entry) with the Boot
//! and Runtime Services real loaders need. See `firmware/README.md`.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch_entry;
use lightbyte_firmware::{block, crc32, fat, gpt, memmap, pe};
mod boot;
mod efi;
mod heap;
mod idt;
mod io;
mod mem_ops;
mod pci;
mod platform;
mod pvh;
mod racy;
mod serial;
mod timer;
mod virtio_blk;

use memmap::{kind, MemoryMap};
use racy::Racy;

/// The memory map, shared by the boot services.
pub static MEMORY: Racy<MemoryMap> = Racy::new(MemoryMap::new());

/// The firmware's own image handle: the parent of the loaders it starts.
static FIRMWARE_HANDLE: Racy<usize> = Racy::new(0);

/// The firmware's image handle.
pub fn firmware_handle() -> r_efi::efi::Handle {
    FIRMWARE_HANDLE.get() as r_efi::efi::Handle
}

extern "C" {
    static __image_start: u8;
    static __runtime_end: u8;
    static __image_end: u8;
}

/// Called by the entry stub in long mode with the PVH start info's address.
pub extern "C" fn rust_main(start_info: u64) -> ! {
    serial::init();
    idt::init();
    // The linker script's symbols: only their addresses mean anything.
    let (image_start, runtime_end, image_end) = (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__runtime_end) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    );
    // The heap must exist before the start info is copied out; take it from RAM right above
    // the image: the VMM puts nothing there.
    let heap_start = (image_end + 0x1f_ffff) & !0x1f_ffff;
    // SAFETY: [heap_start, +16 MiB) above our image is unused RAM: lightbyte's VMM gives every
    // VM at least 32 MiB and puts nothing there. The memory map check below catches a smaller
    // VM of another VMM (a fault before it is reported by our exception handler).
    unsafe { heap::init(heap_start) };
    // SAFETY: EBX as the VMM left it.
    let Some(info) = (unsafe { pvh::read(start_info) }) else {
        platform::fail("not started through PVH (no hvm_start_info)")
    };
    let ram_below_heap_end = info.memmap.iter().any(|r| {
        r.kind == pvh::E820_RAM
            && r.start <= heap_start
            && r.start + r.size >= heap_start + heap::HEAP_SIZE
    });
    if !ram_below_heap_end {
        platform::fail("guest RAM is too small for the firmware (it needs 20 MiB for itself; loaders and kernels need more)");
    }
    {
        // SAFETY: first borrow, at start, before any foreign code runs.
        let map = unsafe { MEMORY.borrow() };
        for r in &info.memmap {
            let k = if r.kind == pvh::E820_RAM {
                kind::CONVENTIONAL
            } else {
                kind::RESERVED
            };
            map.set(r.start, r.size, k);
        }
        map.set(0, memmap::PAGE, kind::BOOT_DATA);
        map.set(image_start, runtime_end - image_start, kind::RUNTIME_CODE);
        map.set(runtime_end, image_end - runtime_end, kind::BOOT_DATA);
        map.set(heap_start, heap::HEAP_SIZE, kind::BOOT_DATA);
    }
    if let Some(rsdp) = info.rsdp {
        acpi::init(rsdp);
    }
    timer::calibrate();
    log!(
        "started at {} ms: {} MiB of RAM, TSC {} MHz, command line \"{}\"",
        timer::since_start_ms(),
        info.memmap
            .iter()
            .filter(|r| r.kind == pvh::E820_RAM)
            .map(|r| r.size)
            .sum::<u64>()
            >> 20,
        timer::tsc_per_us(),
        info.cmdline
    );
    if let Err(s) = efi::init(info.rsdp) {
        log!(
            "setting up the system table failed: status {:#x}",
            s.as_usize()
        );
        platform::fail("no memory for the system table");
    }
    let loaded = efi::util::leak(r_efi::protocols::loaded_image::Protocol {
        revision: r_efi::protocols::loaded_image::REVISION,
        parent_handle: core::ptr::null_mut(),
        system_table: efi::system_table(),
        device_handle: core::ptr::null_mut(),
        file_path: core::ptr::null_mut(),
        reserved: core::ptr::null_mut(),
        load_options_size: 0,
        load_options: core::ptr::null_mut(),
        image_base: image_start as *mut core::ffi::c_void,
        image_size: image_end - image_start,
        image_code_type: kind::RUNTIME_CODE,
        image_data_type: kind::RUNTIME_DATA,
        unload: None,
    });
    match efi::handles::install(
        core::ptr::null_mut(),
        r_efi::protocols::loaded_image::PROTOCOL_GUID,
        loaded as *mut core::ffi::c_void,
    ) {
        Ok(h) => FIRMWARE_HANDLE.set(h as usize),
        Err(_) => platform::fail("installing the firmware's image handle failed"),
    }
    let problems = boot::boot(&info.cmdline);
    for p in &problems {
        log!("{p}");
    }
    platform::fail("nothing to boot")
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    log!("panic: {info}");
    platform::fail("the firmware panicked")
}
