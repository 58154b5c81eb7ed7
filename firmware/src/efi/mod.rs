//! The UEFI interfaces: system table, boot and runtime services, protocols.

pub mod boot_services;
pub mod console;
pub mod device_path;
pub mod disk;
pub mod events;
pub mod fs;
pub mod handles;
pub mod image;
pub mod pages;
pub mod runtime;
pub mod util;

use core::ffi::c_void;
use r_efi::efi::{self, Guid, Status};

use crate::memmap::{kind, Placement};
use crate::racy::Racy;

/// Where the system table and what the OS reads after ExitBootServices live (one page of
/// runtime services data).
static SYSTAB: Racy<u64> = Racy::new(0);
/// Hooks run at ExitBootServices (device resets).
static EXIT_HOOKS: Racy<alloc::vec::Vec<fn()>> = Racy::new(alloc::vec::Vec::new());

const RUNTIME_OFFSET: u64 = 256;
const CONFIG_OFFSET: u64 = 512;
const CONFIG_MAX: usize = 64;
const VENDOR_OFFSET: u64 = 2048;
const RT_PROPERTIES_OFFSET: u64 = 2176;

/// EFI_RT_PROPERTIES_TABLE_GUID.
const RT_PROPERTIES_GUID: Guid = Guid::from_fields(
    0xeb66918a,
    0x7eef,
    0x402a,
    0x84,
    0x2e,
    &[0x93, 0x1d, 0x21, 0xc3, 0x8a, 0xe9],
);

/// A table header with its CRC filled in later by [`seal`].
pub fn header(signature: u64, size: usize) -> efi::TableHeader {
    efi::TableHeader {
        signature,
        revision: efi::SYSTEM_TABLE_REVISION,
        header_size: size as u32,
        crc32: 0,
        reserved: 0,
    }
}

/// Recomputes a table's header CRC.
///
/// # Safety
/// `table` points at a table starting with a TableHeader of `header_size` bytes.
unsafe fn seal(table: *mut efi::TableHeader) {
    // SAFETY: per the caller.
    unsafe {
        (*table).crc32 = 0;
        let bytes = core::slice::from_raw_parts(table as *const u8, (*table).header_size as usize);
        (*table).crc32 = crate::crc32::crc32(bytes);
    }
}

/// The system table.
pub fn system_table() -> *mut efi::SystemTable {
    SYSTAB.get() as *mut efi::SystemTable
}

/// Registers something to do at ExitBootServices.
pub fn on_exit_boot_services(f: fn()) {
    // SAFETY: no other borrow alive; not held across foreign calls.
    unsafe { EXIT_HOOKS.borrow() }.push(f);
}

/// Builds the system table with its services and console; `rsdp` becomes the ACPI tables'
/// configuration table entries.
pub fn init(rsdp: Option<u64>) -> Result<(), Status> {
    // SAFETY: start-up; no other borrow alive.
    let page = unsafe { crate::MEMORY.borrow() }
        .allocate(Placement::Any, kind::RUNTIME_DATA, 1)
        .map_err(|_| Status::OUT_OF_RESOURCES)?;
    // SAFETY: our fresh page.
    unsafe { core::ptr::write_bytes(page as *mut u8, 0, 4096) };
    SYSTAB.set(page);

    let vendor = util::to_ucs2("lightbyte");
    // SAFETY: inside our page (the name is far shorter than the 128 bytes reserved).
    unsafe {
        core::ptr::copy_nonoverlapping(
            vendor.as_ptr(),
            (page + VENDOR_OFFSET) as *mut u16,
            vendor.len(),
        )
    };

    let rt = (page + RUNTIME_OFFSET) as *mut efi::RuntimeServices;
    // SAFETY: inside our page, room for the table.
    unsafe {
        rt.write(runtime::table());
        seal(rt as *mut efi::TableHeader);
    }
    let bs = util::leak(boot_services::table());
    // SAFETY: just leaked.
    unsafe { seal(bs as *mut efi::TableHeader) };

    let key_event = events::create(
        events::EVT_NOTIFY_WAIT,
        Some(noop_notify),
        core::ptr::null_mut(),
        None,
        events::Source::Key,
    )?;
    let con = console::build(key_event);
    let con_handle = handles::install(
        core::ptr::null_mut(),
        r_efi::protocols::simple_text_output::PROTOCOL_GUID,
        con.out as *mut c_void,
    )?;
    handles::install(
        con_handle,
        r_efi::protocols::simple_text_input::PROTOCOL_GUID,
        con.input as *mut c_void,
    )?;

    let st = page as *mut efi::SystemTable;
    // SAFETY: our page; the table is its first bytes.
    unsafe {
        st.write(efi::SystemTable {
            hdr: header(
                efi::SYSTEM_TABLE_SIGNATURE,
                core::mem::size_of::<efi::SystemTable>(),
            ),
            firmware_vendor: (page + VENDOR_OFFSET) as *mut u16,
            firmware_revision: 0x0001_0000,
            console_in_handle: con_handle,
            con_in: con.input,
            console_out_handle: con_handle,
            con_out: con.out,
            standard_error_handle: con_handle,
            std_err: con.out,
            runtime_services: rt,
            boot_services: bs,
            number_of_table_entries: 0,
            configuration_table: (page + CONFIG_OFFSET) as *mut efi::ConfigurationTable,
        });
    }
    let props = (page + RT_PROPERTIES_OFFSET) as *mut u8;
    // SAFETY: inside our page, 8 bytes at an 8-aligned offset.
    unsafe {
        (props as *mut u16).write(1); // version
        (props as *mut u16).add(1).write(8); // length
        (props.add(4) as *mut u32).write(runtime::RT_SUPPORTED);
    }
    set_config_table(RT_PROPERTIES_GUID, props as *mut c_void);
    if let Some(rsdp) = rsdp {
        set_config_table(efi::ACPI_20_TABLE_GUID, rsdp as *mut c_void);
        set_config_table(efi::ACPI_10_TABLE_GUID, rsdp as *mut c_void);
    }
    Ok(())
}

extern "efiapi" fn noop_notify(_e: efi::Event, _ctx: *mut c_void) {}

/// Adds, replaces or (with a null table) removes a configuration table.
pub fn set_config_table(g: Guid, table: *mut c_void) -> Status {
    let st = system_table();
    // SAFETY: our system table and its configuration array (CONFIG_MAX entries of room).
    unsafe {
        let n = (*st).number_of_table_entries;
        let arr = core::slice::from_raw_parts_mut((*st).configuration_table, CONFIG_MAX);
        let existing = arr[..n].iter().position(|e| e.vendor_guid == g);
        match (existing, table.is_null()) {
            (Some(i), false) => arr[i].vendor_table = table,
            (Some(i), true) => {
                arr.copy_within(i + 1..n, i);
                (*st).number_of_table_entries = n - 1;
            }
            (None, true) => return Status::NOT_FOUND,
            (None, false) => {
                if n == CONFIG_MAX {
                    return Status::OUT_OF_RESOURCES;
                }
                arr[n] = efi::ConfigurationTable {
                    vendor_guid: g,
                    vendor_table: table,
                };
                (*st).number_of_table_entries = n + 1;
            }
        }
        seal(st as *mut efi::TableHeader);
    }
    Status::SUCCESS
}

/// ExitBootServices: tell the loaders' event listeners, quiesce devices, and stop serving what
/// lives in boot services memory.
pub fn exit_boot_services() {
    let (requests, bytes, us) = crate::virtio_blk::stats();
    crate::log!(
        "ExitBootServices at {} ms ({requests} disk requests, {} KiB, {} ms waiting for them)",
        crate::timer::since_start_ms(),
        bytes >> 10,
        us / 1000
    );
    events::signal_group(&events::GROUP_EXIT_BOOT_SERVICES);
    // SAFETY: no other borrow alive; hooks are our own functions.
    let hooks: alloc::vec::Vec<fn()> = unsafe { EXIT_HOOKS.borrow() }.clone();
    for h in hooks {
        h();
    }
    runtime::boot_services_gone();
    let st = system_table();
    // SAFETY: our system table. The spec has these fields cleared once boot services end.
    unsafe {
        (*st).boot_services = core::ptr::null_mut();
        (*st).con_in = core::ptr::null_mut();
        (*st).console_in_handle = core::ptr::null_mut();
        seal(st as *mut efi::TableHeader);
    }
}
