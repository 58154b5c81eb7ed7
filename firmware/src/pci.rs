//! PCI configuration space through ports 0xcf8/0xcfc (every x86 VMM has them; ECAM would need
//! the MCFG table) and enough BAR handling to reach a virtio device: memory BARs the VMM left
//! unassigned (QEMU without a BIOS) get addresses from a window below the I/O APIC.

use crate::io::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// A function on bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Device number (0-31).
    pub device: u8,
    /// Function number (0-7).
    pub function: u8,
}

impl Function {
    fn address(&self, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.device) << 11)
            | (u32::from(self.function) << 8)
            | u32::from(offset & 0xfc)
    }

    /// Reads a 32-bit register.
    pub fn read32(&self, offset: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inl(CONFIG_DATA)
    }

    /// Writes a 32-bit register.
    pub fn write32(&self, offset: u8, v: u32) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outl(CONFIG_DATA, v);
    }

    /// Reads a byte.
    pub fn read8(&self, offset: u8) -> u8 {
        (self.read32(offset) >> ((offset & 3) * 8)) as u8
    }

    /// Reads a 16-bit word.
    pub fn read16(&self, offset: u8) -> u16 {
        (self.read32(offset) >> ((offset & 2) * 8)) as u16
    }

    /// (vendor, device) IDs.
    pub fn ids(&self) -> (u16, u16) {
        let v = self.read32(0);
        (v as u16, (v >> 16) as u16)
    }

    /// The capability list: (id, offset) pairs, bounded against loops.
    pub fn capabilities(&self) -> impl Iterator<Item = (u8, u8)> + '_ {
        let has_list = self.read16(0x06) & 0x10 != 0;
        let mut next = if has_list { self.read8(0x34) & 0xfc } else { 0 };
        let mut budget = 48;
        core::iter::from_fn(move || {
            if next < 0x40 || budget == 0 {
                return None;
            }
            budget -= 1;
            let at = next;
            let id = self.read8(at);
            next = self.read8(at + 1) & 0xfc;
            Some((id, at))
        })
    }

    /// The address of memory BAR `index`, assigning one from `window` if the BAR is unset.
    /// `None` for I/O BARs or when the window is exhausted.
    pub fn memory_bar(&self, index: u8, window: &mut BarWindow) -> Option<u64> {
        let off = 0x10 + 4 * index;
        let low = self.read32(off);
        if low & 1 != 0 {
            return None;
        }
        let is64 = (low >> 1) & 3 == 2;
        let high = if is64 { self.read32(off + 4) } else { 0 };
        let addr = (u64::from(high) << 32) | u64::from(low & !0xf);
        if addr != 0 {
            return Some(addr);
        }
        // Size it: write all ones, read the mask back.
        self.write32(off, 0xffff_ffff);
        let mask_low = self.read32(off) & !0xf;
        let mask_high = if is64 {
            self.write32(off + 4, 0xffff_ffff);
            self.read32(off + 4)
        } else {
            0xffff_ffff
        };
        let mask = (u64::from(mask_high) << 32) | u64::from(mask_low);
        let size = (!mask).wrapping_add(1);
        if size == 0 || mask_low == 0 {
            return None;
        }
        let base = window.take(size)?;
        self.write32(off, base as u32);
        if is64 {
            self.write32(off + 4, (base >> 32) as u32);
        }
        Some(base)
    }

    /// Turns on memory decoding and bus mastering.
    pub fn enable(&self) {
        let cmd = self.read32(0x04);
        self.write32(0x04, (cmd & 0xffff) | 0x6);
    }
}

/// Addresses for BARs nobody assigned.
pub struct BarWindow {
    next: u64,
    end: u64,
}

impl BarWindow {
    /// lightbyte's 32-bit PCI window (0xc000_0000..0xe000_0000); on QEMU's q35 it lies above
    /// guest RAM too, as long as the VM has less than 3 GiB.
    pub const fn new() -> Self {
        Self {
            next: 0xd000_0000,
            end: 0xe000_0000,
        }
    }

    fn take(&mut self, size: u64) -> Option<u64> {
        let base = (self.next + size - 1) & !(size - 1);
        let end = base.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(base)
    }
}

/// Every present function on bus 0.
pub fn functions() -> impl Iterator<Item = Function> {
    (0..32u8)
        .flat_map(|device| {
            let multi = Function {
                device,
                function: 0,
            }
            .read8(0x0e)
                & 0x80
                != 0;
            let count = if multi { 8 } else { 1 };
            (0..count).map(move |function| Function { device, function })
        })
        .filter(|f| f.ids().0 != 0xffff)
}
