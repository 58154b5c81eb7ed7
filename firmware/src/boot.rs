//! The boot manager: finds the disks, installs their protocols, and starts the first boot
//! loader it finds: `\EFI\BOOT\BOOTX64.EFI` on an EFI system partition, else the default Boot
//! Loader Specification entry (`\loader\entries\*.conf`) booted through the kernel's EFI stub.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ffi::c_void;
use r_efi::efi::Handle;
use r_efi::protocols::{block_io, device_path, disk_io, simple_file_system};

use crate::block::{BlockDevice, Slice};
use crate::efi::{self, device_path::Path, fs, handles, image};
use crate::fat::Fat;
use crate::gpt;
use crate::pci::{self, BarWindow};
use crate::racy::Racy;
use crate::virtio_blk::{self, VirtioBlk};

static DISKS: Racy<Vec<&'static VirtioBlk>> = Racy::new(Vec::new());

/// A FAT volume found on a partition.
struct Esp {
    path: Path,
    volume: &'static fs::Volume,
    label: String,
}

fn reset_disks() {
    // SAFETY: called at ExitBootServices; no other borrow alive.
    for d in unsafe { DISKS.borrow() }.iter() {
        d.reset();
    }
}

fn install(h: Handle, guid: r_efi::efi::Guid, iface: *mut c_void) -> Handle {
    match handles::install(h, guid, iface) {
        Ok(h) => h,
        Err(_) => crate::platform::fail("installing a protocol on a new handle failed"),
    }
}

/// Sets up every virtio-blk disk and its partitions; returns the FAT volumes on EFI system
/// partitions, and the problems seen (for the message if nothing boots).
fn discover() -> (Vec<Esp>, Vec<String>) {
    let mut window = BarWindow::new();
    let mut esps = Vec::new();
    let mut problems = Vec::new();
    let functions: Vec<pci::Function> =
        pci::functions().filter(virtio_blk::is_virtio_blk).collect();
    if functions.is_empty() {
        problems.push(String::from("no virtio-blk disk"));
    }
    for (n, f) in functions.into_iter().enumerate() {
        let name = format!("disk {n} (PCI {:02x}.{})", f.device, f.function);
        let disk: &'static VirtioBlk = match VirtioBlk::new(f, &mut window) {
            Ok(d) => alloc::boxed::Box::leak(alloc::boxed::Box::new(d)),
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        // SAFETY: start-up; no other borrow alive.
        unsafe { DISKS.borrow() }.push(disk);
        let media_id = n as u32;
        let disk_path = Path::pci(f.device, f.function);
        let (bio, dio) = efi::disk::build(disk, media_id, 0, disk.num_blocks(), false);
        let h = install(
            core::ptr::null_mut(),
            device_path::PROTOCOL_GUID,
            disk_path.clone().finish() as *mut c_void,
        );
        install(h, block_io::PROTOCOL_GUID, bio);
        install(h, disk_io::PROTOCOL_GUID, dio);
        let table = match gpt::read(disk) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut found_esp = false;
        for p in &table.partitions {
            let count = p.last_lba - p.first_lba + 1;
            let path = disk_path
                .clone()
                .hard_drive(p.number, p.first_lba, count, &p.unique_guid);
            let (bio, dio) = efi::disk::build(disk, media_id, p.first_lba, count, true);
            let h = install(
                core::ptr::null_mut(),
                device_path::PROTOCOL_GUID,
                path.clone().finish() as *mut c_void,
            );
            install(h, block_io::PROTOCOL_GUID, bio);
            install(h, disk_io::PROTOCOL_GUID, dio);
            let is_esp = p.type_guid == gpt::ESP_TYPE;
            let slice = Slice {
                dev: disk,
                first: p.first_lba,
                count,
            };
            match Fat::new(slice) {
                Ok(fat) => {
                    let label = fat.volume_label();
                    let volume: &'static fs::Volume =
                        alloc::boxed::Box::leak(alloc::boxed::Box::new(fs::Volume { fat }));
                    install(h, simple_file_system::PROTOCOL_GUID, fs::build(volume));
                    if is_esp {
                        found_esp = true;
                        esps.push(Esp {
                            path,
                            volume,
                            label,
                        });
                    }
                }
                Err(e) if is_esp => {
                    problems.push(format!("{name}: EFI system partition {}: {e}", p.number))
                }
                Err(_) => {}
            }
        }
        if !found_esp
            && !table
                .partitions
                .iter()
                .any(|p| p.type_guid == gpt::ESP_TYPE)
        {
            problems.push(format!("{name}: no EFI system partition in its GPT"));
        }
    }
    efi::on_exit_boot_services(reset_disks);
    (esps, problems)
}

/// A Boot Loader Specification entry.
#[derive(Default, Debug)]
struct Entry {
    name: String,
    linux: Option<String>,
    efi: Option<String>,
    initrds: Vec<String>,
    options: Vec<String>,
}

fn parse_entry(name: &str, text: &str) -> Entry {
    let mut e = Entry {
        name: String::from(name),
        ..Default::default()
    };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim()),
            None => continue,
        };
        match key {
            "linux" => e.linux = Some(String::from(value)),
            "efi" => e.efi = Some(String::from(value)),
            "initrd" => e.initrds.push(String::from(value)),
            "options" => e.options.push(String::from(value)),
            _ => {}
        }
    }
    e
}

fn backslashes(p: &str) -> String {
    let p = p.replace('/', "\\");
    if p.starts_with('\\') {
        p
    } else {
        format!("\\{p}")
    }
}

fn read_text(volume: &fs::Volume, path: &str) -> Option<String> {
    let node = fs::find_file(volume, path).ok()?;
    if node.size > 64 << 10 {
        return None;
    }
    let mut buf = alloc::vec![0u8; node.size as usize];
    fs::read_all(volume, &node, &mut buf).ok()?;
    String::from_utf8(buf).ok()
}

/// The entry to boot: loader.conf's `default` if it names one, else the highest-sorting name.
fn pick_entry(volume: &fs::Volume) -> Option<Entry> {
    let dir = volume
        .fat
        .lookup(&volume.fat.root(), "\\loader\\entries")
        .ok()?;
    let mut names = Vec::new();
    let mut cursor = 0;
    while let Ok(Some(n)) = volume.fat.next_entry(&dir, &mut cursor) {
        if !n.is_dir && n.name.to_ascii_lowercase().ends_with(".conf") {
            names.push(n.name);
        }
    }
    if names.is_empty() {
        return None;
    }
    names.sort();
    let default = read_text(volume, "\\loader\\loader.conf").and_then(|t| {
        t.lines()
            .filter_map(|l| l.trim().strip_prefix("default"))
            .map(|v| String::from(v.trim()))
            .next_back()
    });
    let chosen = default
        .and_then(|d| {
            names
                .iter()
                .find(|n| **n == d || n.strip_suffix(".conf") == Some(d.as_str()))
                .cloned()
        })
        .or_else(|| names.last().cloned())?;
    let text = read_text(volume, &format!("\\loader\\entries\\{chosen}"))?;
    Some(parse_entry(&chosen, &text))
}

fn set_load_options(h: Handle, options: &str) {
    if options.is_empty() {
        return;
    }
    if let Some(li) = image::loaded_image(h) {
        let ucs2 = efi::util::to_ucs2(options);
        let size = 2 * ucs2.len();
        let p = alloc::boxed::Box::leak(ucs2.into_boxed_slice());
        // SAFETY: the Loaded Image protocol we created for `h`.
        unsafe {
            (*li).load_options = p.as_mut_ptr() as *mut c_void;
            (*li).load_options_size = size as u32;
        }
    }
}

fn start(esp: &Esp, file: &str, options: &str, what: &str) -> Result<(), String> {
    let path = esp.path.clone().file(file).finish();
    let parent = crate::firmware_handle();
    let h = image::load_from_path(path, parent)
        .map_err(|s| format!("loading {file}: status {:#x}", s.as_usize()))?;
    set_load_options(h, options);
    crate::log!(
        "starting {what} ({file} on \"{}\") at {} ms",
        esp.label,
        crate::timer::since_start_ms()
    );
    let s = image::start(h);
    Err(format!("{file} returned status {:#x}", s.as_usize()))
}

/// Boots: never returns unless every option failed, and then with why.
pub fn boot(cmdline: &str) -> Vec<String> {
    let (esps, mut problems) = discover();
    for esp in &esps {
        if fs::find_file(esp.volume, "\\EFI\\BOOT\\BOOTX64.EFI").is_ok() {
            if let Err(e) = start(
                esp,
                "\\EFI\\BOOT\\BOOTX64.EFI",
                cmdline,
                "the default boot loader",
            ) {
                problems.push(e);
            }
            continue;
        }
        match pick_entry(esp.volume) {
            Some(entry) => {
                let file = match (&entry.efi, &entry.linux) {
                    (Some(efi), _) => backslashes(efi),
                    (None, Some(linux)) => backslashes(linux),
                    (None, None) => {
                        problems.push(format!("loader entry {}: no linux or efi line", entry.name));
                        continue;
                    }
                };
                let mut options = entry.options.join(" ");
                for initrd in &entry.initrds {
                    options.push_str(&format!(" initrd={}", backslashes(initrd)));
                }
                if let Err(e) = start(esp, &file, options.trim(), &format!("loader entry {}", entry.name)) {
                    problems.push(e);
                }
            }
            None => problems.push(format!(
                "EFI system partition \"{}\": no \\EFI\\BOOT\\BOOTX64.EFI and no \\loader\\entries\\*.conf",
                esp.label
            )),
        }
    }
    problems
}
