//! The little of ACPI the firmware reads itself: where the FADT's sleep control register is, for
//! ResetSystem(shutdown). The tables are the VMM's; the OS gets them as a configuration table.

use crate::racy::Racy;

static RSDP: Racy<u64> = Racy::new(0);
/// The power-off port and value, read from the FADT at start: after ExitBootServices the OS
/// maps only runtime memory for our code, not the ACPI tables.
static SLEEP_CONTROL: Racy<Option<(u16, u8)>> = Racy::new(None);

/// S5 sleep type of lightbyte's DSDT (`_S5_`); shared with the VMM's ACPI code by value.
const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;
const FADT_HW_REDUCED: u32 = 1 << 20;

/// Remembers the RSDP the VMM gave.
pub fn init(rsdp: u64) {
    RSDP.set(rsdp);
    SLEEP_CONTROL.set(find_sleep_control());
}

/// The RSDP's address, if any.
pub fn rsdp() -> Option<u64> {
    let r = RSDP.get();
    (r != 0).then_some(r)
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: ACPI tables live in identity-mapped RAM the VMM filled; callers only read inside
    // tables whose lengths they checked.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn find_table(sig: &[u8; 4]) -> Option<u64> {
    let rsdp = rsdp()?;
    if read::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return None;
    }
    let revision: u8 = read(rsdp + 15);
    let (root, entry_size) = if revision >= 2 {
        (read::<u64>(rsdp + 24), 8)
    } else {
        (u64::from(read::<u32>(rsdp + 16)), 4)
    };
    if root == 0 {
        return None;
    }
    let len = u64::from(read::<u32>(root + 4));
    let entries = len.saturating_sub(36) / entry_size;
    (0..entries.min(64)).find_map(|i| {
        let at = root + 36 + i * entry_size;
        let table = if entry_size == 8 {
            read::<u64>(at)
        } else {
            u64::from(read::<u32>(at))
        };
        (table != 0 && read::<[u8; 4]>(table) == *sig).then_some(table)
    })
}

/// The I/O port and value that power the machine off (hardware-reduced ACPI's sleep control
/// register), as found at start.
pub fn sleep_control() -> Option<(u16, u8)> {
    SLEEP_CONTROL.get()
}

fn find_sleep_control() -> Option<(u16, u8)> {
    let fadt = find_table(b"FACP")?;
    let len = read::<u32>(fadt + 4);
    if len < 256 || read::<u32>(fadt + 112) & FADT_HW_REDUCED == 0 {
        return None;
    }
    // X_SLEEP_CONTROL_REG, a generic address structure: space id 1 is I/O.
    let space: u8 = read(fadt + 244);
    let addr: u64 = read(fadt + 248);
    (space == 1 && addr != 0 && addr <= 0xffff)
        .then_some((addr as u16, (S5_SLEEP_TYPE << 2) | SLP_EN))
}
