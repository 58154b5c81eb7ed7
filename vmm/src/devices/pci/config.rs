//! A PCI function's type-0 configuration space: identity, command/status, BARs and a capability
//! list, with per-bit write masks so that BAR sizing and read-only fields behave as on hardware.

/// Bytes of configuration space we implement (the legacy 256; ECAM reads beyond return 0).
pub const CONFIG_SPACE_SIZE: usize = 256;
const REGS: usize = CONFIG_SPACE_SIZE / 4;

const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAPABILITY_POINTER_OFFSET: usize = 0x34;
const FIRST_CAPABILITY_OFFSET: usize = 0x40;
const STATUS_CAPABILITY_LIST: u32 = 1 << (16 + 4);
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_WRITABLE: u32 = 0x0000_0507; // I/O, memory, bus master, SERR, INTx disable

/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;

/// Error building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A BAR index past 5, or a 64-bit BAR at index 5.
    #[error("invalid BAR index {0}")]
    BarIndex(usize),
    /// The BAR slot (or its upper half) is already used.
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// BAR sizes are powers of two of at least 16 bytes.
    #[error("BAR size {0:#x} is not a power of two of at least 16")]
    BarSize(u64),
    /// The address is not aligned to the BAR's size.
    #[error("BAR address {addr:#x} is not aligned to its size {size:#x}")]
    BarAlignment {
        /// Address.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// No room left for a capability.
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// A memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Size in bytes.
    pub size: u64,
    /// 64-bit BAR (occupies two registers).
    pub is_64bit: bool,
}

/// Identity of a PCI function.
#[derive(Clone, Copy, Debug)]
pub struct PciId {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code, subclass and programming interface.
    pub class: (u8, u8, u8),
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// The configuration space of one function.
#[derive(Clone, Debug)]
pub struct PciConfig {
    regs: [u32; REGS],
    writable: [u32; REGS],
    bars: [Option<Bar>; NUM_BARS],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl PciConfig {
    /// A type-0 header for `id`, with memory decoding and bus mastering enabled (as firmware
    /// leaves devices it has assigned resources to).
    pub fn new(id: PciId) -> Self {
        let mut regs = [0u32; REGS];
        regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        regs[COMMAND_REG] = u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER);
        regs[2] = u32::from(id.revision)
            | (u32::from(id.class.2) << 8)
            | (u32::from(id.class.1) << 16)
            | (u32::from(id.class.0) << 24);
        regs[11] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        let mut writable = [0u32; REGS];
        writable[COMMAND_REG] = COMMAND_WRITABLE;
        // Cache line size and latency timer are plain read/write bytes.
        writable[3] = 0x0000_ffff;
        // Interrupt line is scratch space for the OS.
        writable[15] = 0x0000_00ff;
        Self {
            regs,
            writable,
            bars: [None; NUM_BARS],
            next_capability: FIRST_CAPABILITY_OFFSET,
            last_capability: None,
        }
    }

    /// Declares memory BAR `index` of `size` bytes at `addr`.
    pub fn add_bar(&mut self, index: usize, addr: u64, bar: Bar) -> Result<(), Error> {
        let regs_needed = if bar.is_64bit { 2 } else { 1 };
        if index + regs_needed > NUM_BARS {
            return Err(Error::BarIndex(index));
        }
        if !bar.size.is_power_of_two() || bar.size < 16 || (!bar.is_64bit && bar.size > 1 << 31) {
            return Err(Error::BarSize(bar.size));
        }
        if addr % bar.size != 0 {
            return Err(Error::BarAlignment {
                addr,
                size: bar.size,
            });
        }
        if self.bars[index].is_some() || (bar.is_64bit && self.bars[index + 1].is_some()) {
            return Err(Error::BarInUse(index));
        }
        if index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64bit) {
            return Err(Error::BarInUse(index));
        }
        let reg = BAR0_REG + index;
        let mask = !(bar.size - 1);
        let type_bits: u32 = if bar.is_64bit { 0b100 } else { 0 };
        self.regs[reg] = (addr as u32 & 0xffff_fff0) | type_bits;
        self.writable[reg] = mask as u32 & 0xffff_fff0;
        if bar.is_64bit {
            self.regs[reg + 1] = (addr >> 32) as u32;
            self.writable[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    /// The address BAR `index` currently holds (None when the index has no BAR).
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index)?.as_ref()?;
        let reg = BAR0_REG + index;
        let low = u64::from(self.regs[reg] & 0xffff_fff0);
        let high = if bar.is_64bit {
            u64::from(self.regs[reg + 1]) << 32
        } else {
            0
        };
        Some(high | low)
    }

    /// BAR `index`'s description.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// True when the OS has memory decoding enabled.
    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] as u16 & COMMAND_MEMORY != 0
    }

    /// Appends a capability with `id` and `body` (the bytes after the ID and next pointer).
    /// Returns its offset in configuration space. Body bytes are read-only until made writable
    /// with [`PciConfig::set_writable`].
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, Error> {
        let len = (2 + body.len()).next_multiple_of(4);
        let offset = self.next_capability;
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(Error::CapabilitySpace(len));
        }
        let mut bytes = vec![0u8; len];
        bytes[0] = id;
        bytes[2..2 + body.len()].copy_from_slice(body);
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(offset + i, *b);
        }
        match self.last_capability {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => self.set_byte(CAPABILITY_POINTER_OFFSET, offset as u8),
        }
        self.regs[COMMAND_REG] |= STATUS_CAPABILITY_LIST;
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        Ok(offset)
    }

    /// Makes the bits of `mask` in the dword at `offset` (a multiple of 4) guest-writable.
    pub fn set_writable(&mut self, offset: usize, mask: u32) {
        self.writable[offset / 4] |= mask;
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// Reads the dword register `reg` (offset / 4). Registers past the implemented space read 0.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Stores `value` into dword register `reg` bypassing the write masks (device-side updates).
    pub fn store_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = value;
        }
    }

    /// Guest write of `data` (1, 2 or 4 bytes) at byte `offset`; only writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if !matches!(data.len(), 1 | 2 | 4) || offset % data.len() != 0 {
            return;
        }
        let reg = offset / 4;
        if reg >= REGS {
            return;
        }
        let shift = (offset % 4) * 8;
        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (8 * i);
        }
        let width_mask = if data.len() == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * data.len())) - 1) << shift
        };
        let mask = self.writable[reg] & width_mask;
        self.regs[reg] = (self.regs[reg] & !mask) | ((value << shift) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciId {
        PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: (0x01, 0x00, 0x00),
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn write32(c: &mut PciConfig, offset: usize, v: u32) {
        c.write(offset, &v.to_le_bytes());
    }

    #[test]
    fn identity_registers() {
        let c = PciConfig::new(id());
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2) >> 24, 0x01);
        assert_eq!(c.read_reg(11), 0x0040_1af4);
        assert!(c.memory_enabled());
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = PciConfig::new(id());
        write32(&mut c, 0, 0xdead_beef);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        write32(&mut c, 8, 0);
        assert_eq!(c.read_reg(2) >> 24, 0x01);
        c.write(0x3c, &[11]);
        assert_eq!(c.read_reg(15) & 0xff, 11);
    }

    #[test]
    fn bar_sizing_and_relocation_32bit() {
        let mut c = PciConfig::new(id());
        c.add_bar(
            0,
            0xc000_0000,
            Bar {
                size: 0x8000,
                is_64bit: false,
            },
        )
        .unwrap();
        assert_eq!(c.bar_addr(0), Some(0xc000_0000));
        write32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(c.read_reg(4), 0xffff_8000, "size mask");
        write32(&mut c, 0x10, 0xd000_0000);
        assert_eq!(c.bar_addr(0), Some(0xd000_0000));
        write32(&mut c, 0x10, 0xd000_1234);
        assert_eq!(
            c.bar_addr(0),
            Some(0xd000_0000),
            "low bits are not address bits"
        );
    }

    #[test]
    fn bar_sizing_64bit() {
        let mut c = PciConfig::new(id());
        c.add_bar(
            2,
            0x1_0000_0000,
            Bar {
                size: 0x4000,
                is_64bit: true,
            },
        )
        .unwrap();
        assert_eq!(c.read_reg(6) & 0b110, 0b100, "64-bit type");
        write32(&mut c, 0x18, 0xffff_ffff);
        write32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(c.read_reg(6), 0xffff_c004);
        assert_eq!(c.read_reg(7), 0xffff_ffff);
        write32(&mut c, 0x18, 0xe000_0000);
        write32(&mut c, 0x1c, 0x2);
        assert_eq!(c.bar_addr(2), Some(0x2_e000_0000));
    }

    #[test]
    fn bad_bars_are_rejected() {
        let mut c = PciConfig::new(id());
        let b = |size| Bar {
            size,
            is_64bit: false,
        };
        assert_eq!(c.add_bar(6, 0, b(16)), Err(Error::BarIndex(6)));
        assert_eq!(
            c.add_bar(
                5,
                0,
                Bar {
                    size: 16,
                    is_64bit: true
                }
            ),
            Err(Error::BarIndex(5))
        );
        assert_eq!(c.add_bar(0, 0, b(24)), Err(Error::BarSize(24)));
        assert!(matches!(
            c.add_bar(0, 0x10, b(0x100)),
            Err(Error::BarAlignment { .. })
        ));
        c.add_bar(
            0,
            0,
            Bar {
                size: 0x100,
                is_64bit: true,
            },
        )
        .unwrap();
        assert_eq!(c.add_bar(1, 0, b(16)), Err(Error::BarInUse(1)));
        assert_eq!(c.add_bar(0, 0, b(16)), Err(Error::BarInUse(0)));
        assert_eq!(c.bar_addr(3), None);
    }

    #[test]
    fn capability_list_is_linked() {
        let mut c = PciConfig::new(id());
        let a = c
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            .unwrap();
        let b = c.add_capability(0x09, &[0xaa; 14]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c);
        assert_ne!(c.read_reg(1) & STATUS_CAPABILITY_LIST, 0);
        assert_eq!(c.read_reg(0x34 / 4) & 0xff, 0x40);
        assert_eq!(c.read_reg(a / 4) & 0xffff, 0x4c11, "id 0x11, next 0x4c");
        assert_eq!(c.read_reg(b / 4) & 0xffff, 0x0009, "last: next 0");
        assert!(c.add_capability(0x09, &[0; 200]).is_err());
        // Capability bytes are read-only unless made writable.
        c.write(a + 2, &[0xff, 0xff]);
        assert_eq!(c.read_reg(a / 4) >> 16, 0x0201);
        c.set_writable(a, 0xc000_0000);
        c.write(a + 2, &[0xff, 0xff]);
        assert_eq!(c.read_reg(a / 4) >> 16, 0xc201);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let mut c = PciConfig::new(id());
        c.write(1, &[0xff, 0xff]);
        c.write(0x3c, &[1, 2, 3]);
        c.write(0x400, &[1]);
        assert_eq!(c.read_reg(0x400 / 4), 0);
        assert_eq!(c.read_reg(15) & 0xff, 0);
    }
}
