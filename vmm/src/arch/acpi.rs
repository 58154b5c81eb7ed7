//! ACPI tables: RSDP → XSDT → {FADT → DSDT, MADT}, built with the `acpi_tables` crate and written
//! into the legacy BIOS area.
//!
//! The platform is "hardware-reduced" ACPI: no PM1 blocks, SCI or legacy PIC; poweroff goes
//! through the sleep control register and reset through the reset register, both I/O ports served
//! by [`crate::devices::acpi_pm`]. Without a legacy PIC, Linux maps no ISA IRQs by itself, so every
//! legacy device that interrupts is declared in the DSDT with its GSI (COM1 on GSI 4, edge, active
//! high). The DSDT also declares the pvpanic device so a guest kernel can tell us it panicked, and
//! the power button: with no fixed-feature button on such a platform, it is a control-method
//! button (PNP0C0C) notified by a Generic Event Device (ACPI0013) whose interrupt the VMM raises
//! ([`crate::devices::ged`]).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ACPI_END, ACPI_START, IOAPIC_START, LAPIC_START, PCI_ECAM_START, PCI_MMIO32_END,
    PCI_MMIO32_START,
};
use crate::devices::acpi_pm::{RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::devices::ged::POWER_BUTTON_GSI;
use crate::devices::pci::root::{CONFIG_IO_PORT, CONFIG_IO_PORTS};
use crate::devices::pvpanic::PVPANIC_PORT;
use crate::devices::serial::{self, COM1_IRQ, COM1_PORT};

const OEM_ID: [u8; 6] = *b"LGHTBT";
const OEM_TABLE_ID: [u8; 8] = *b"LIGHTBYT";
const OEM_REVISION: u32 = 1;
/// ACPI sleep type value for S5 (soft off) that the DSDT's `_S5_` package announces.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Error writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables need {0} bytes, more than the {1} reserved for them")]
    TooLarge(usize, u64),
    /// Writing to guest memory failed.
    #[error("writing ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Notify value a control-method power button gets when pressed (ACPI spec, "Control Method
/// Power Button"); Linux's button driver turns it into KEY_POWER.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// The power button objects of `\_SB_`: `PWRB`, the control-method power button, and `GED0`, the
/// Generic Event Device whose `_EVT` runs when [`POWER_BUTTON_GSI`] fires and notifies `PWRB`.
/// Linux's evged calls `_EVT` with the GSI as Arg0; checking it keeps further GED interrupts from
/// being taken for button presses.
struct PowerButtonAml;

impl Aml for PowerButtonAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
        let uid = aml::Name::new("_UID".into(), &0u8);
        aml::Device::new("PWRB".into(), vec![&pwrb_hid, &uid]).to_aml_bytes(sink);

        let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
        // Edge-triggered, active high, exclusive: each irqfd write is one pulse, one press.
        let irq = aml::Interrupt::new(true, true, false, false, POWER_BUTTON_GSI);
        let ged_crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
        let pwrb = aml::Path::new("\\_SB_.PWRB");
        let notify = aml::Notify::new(&pwrb, &NOTIFY_BUTTON_PRESSED);
        let is_button = aml::Equal::new(&aml::Arg(0), &POWER_BUTTON_GSI);
        let on_button = aml::If::new(&is_button, vec![&notify]);
        let evt = aml::Method::new("_EVT".into(), 1, false, vec![&on_button]);
        aml::Device::new("GED0".into(), vec![&ged_hid, &uid, &ged_crs, &evt]).to_aml_bytes(sink);
    }
}

fn dsdt() -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    );
    s5.to_aml_bytes(&mut dsdt);
    let pvpanic_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvpanic_crs = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    let pvpanic_hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let pvpanic_sta = aml::Name::new("_STA".into(), &0xfu8);
    let pvpanic_crs_name = aml::Name::new("_CRS".into(), &pvpanic_crs);
    let pvpanic = aml::Device::new(
        "PEVT".into(),
        vec![&pvpanic_hid, &pvpanic_sta, &pvpanic_crs_name],
    );
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, serial::PORT_COUNT as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_hid, &com1_uid, &pvpanic_sta, &com1_crs_name],
    );
    // PCI root bridge: bus 0, the config ports, and the BAR window.
    let pci_bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let pci_cfg_io = aml::IO::new(CONFIG_IO_PORT, CONFIG_IO_PORT, 1, CONFIG_IO_PORTS as u8);
    let pci_mem = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_END - 1) as u32,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![&pci_bus, &pci_cfg_io, &pci_mem]);
    let pci_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let pci_cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let pci_adr = aml::Name::new("_ADR".into(), &0u8);
    let pci_seg = aml::Name::new("_SEG".into(), &0u8);
    let pci_uid = aml::Name::new("_UID".into(), &0u8);
    let pci_bbn = aml::Name::new("_BBN".into(), &0u8);
    let pci_crs_name = aml::Name::new("_CRS".into(), &pci_crs);
    let pci = aml::Device::new(
        "PCI0".into(),
        vec![
            &pci_hid,
            &pci_cid,
            &pci_adr,
            &pci_seg,
            &pci_uid,
            &pci_bbn,
            &pci_crs_name,
        ],
    );
    aml::Scope::new(
        "\\_SB_".into(),
        vec![&pvpanic, &com1, &pci, &PowerButtonAml],
    )
    .to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons (they need PM1 registers and an SCI): the power button is the
        // DSDT's PNP0C0C device, and there is no sleep button. Linux would otherwise add fixed
        // "Power Button"/"Sleep Button" devices that can never fire.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.reset_reg = io(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io(SLEEP_STATUS_PORT);
    bytes_of(&fadt.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    bytes_of(&madt)
}

fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    bytes_of(&mcfg)
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Writes all tables for a guest with `cpus` vCPUs and returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8) -> Result<GuestAddress, Error> {
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align8(next + len as u64);
        at
    };

    let dsdt = dsdt();
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(cpus);
    let madt_addr = place(madt.len());
    let mcfg = mcfg();
    let mcfg_addr = place(mcfg.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

    let end = place(0);
    if end > ACPI_END {
        return Err(Error::TooLarge(
            (end - ACPI_START) as usize,
            ACPI_END - ACPI_START,
        ));
    }
    for (addr, table) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(table, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp_at = write_tables(&mem, 3).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_at).unwrap();
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[0..20]));
        assert!(sums_to_zero(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = read_table(&mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(sums_to_zero(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 3);
        let mcfg = read_table(&mem, entries[2]);
        assert_eq!(&mcfg[0..4], b"MCFG");
        assert!(sums_to_zero(&mcfg));
        // One allocation: base address at 44, segment, start bus 0, end bus 0.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            PCI_ECAM_START
        );
        let fadt = read_table(&mem, entries[0]);
        assert_eq!(&fadt[0..4], b"FACP");
        assert!(sums_to_zero(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        // No fixed-feature power or sleep button: the power button is a DSDT device.
        assert_ne!(flags & Flags::PwrButton as u32, 0);
        assert_ne!(flags & Flags::SlpButton as u32, 0);
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(&mem, x_dsdt);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert!(sums_to_zero(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"QEMU0001"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
        // COM1's extended interrupt descriptor: consumer, edge, active high, GSI 4.
        assert!(dsdt
            .windows(9)
            .any(|w| w == [0x89, 6, 0, 0x3, 1, 4, 0, 0, 0]));
        let power_button = bytes_of(&PowerButtonAml);
        assert!(dsdt
            .windows(power_button.len())
            .any(|w| w == power_button.as_slice()));
        let madt = read_table(&mem, entries[1]);
        assert_eq!(&madt[0..4], b"APIC");
        assert!(sums_to_zero(&madt));
        // Three 8-byte local APIC entries and one 12-byte IOAPIC entry.
        assert_eq!(madt.len(), 44 + 3 * 8 + 12);
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn power_button_is_a_ged_notifying_a_pnp0c0c_device() {
        let aml = bytes_of(&PowerButtonAml);
        // Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) ... }: the EISA ID is a DWord.
        assert!(contains(&aml, b"PWRB\x08_HID\x0c\x41\xd0\x0c\x0c"));
        // Device (GED0) { Name (_HID, "ACPI0013") ... }
        assert!(contains(&aml, b"GED0\x08_HID\x0dACPI0013\0"));
        // _CRS: one extended interrupt descriptor (consumer, edge, active high, exclusive) on
        // GSI 10, then the end tag.
        assert_eq!(POWER_BUTTON_GSI, 10);
        assert!(contains(&aml, &[0x89, 6, 0, 0x3, 1, 10, 0, 0, 0, 0x79]));
        // Method (_EVT, 1) { If (LEqual (Arg0, 10)) { Notify (\_SB_.PWRB, 0x80) } }
        let evt: &[u8] = &[
            0x14, 0x19, b'_', b'E', b'V', b'T', 0x01, // Method, length, name, 1 arg
            0xa0, 0x12, 0x93, 0x68, 0x0a, 10, // If, length, LEqual (Arg0, 10)
            0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R',
            b'B', // Notify (\_SB_.PWRB,
            0x0a, 0x80, // 0x80)
        ];
        // _EVT is GED0's last object, and GED0 comes last.
        assert!(aml.ends_with(evt), "{aml:02x?}");
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(write_tables(&mem, 1).is_err());
    }
}
