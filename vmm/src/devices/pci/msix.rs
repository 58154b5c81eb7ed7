//! MSI-X: the capability in configuration space, the vector table and the pending-bit array a
//! device exposes in a BAR, and the masking rules that decide whether a vector fires now or is
//! left pending until the guest unmasks it.
//!
//! Delivery itself is behind [`MsiSink`]: the VM side routes each vector to a KVM GSI (an MSI
//! route plus an irqfd), so this module stays testable without KVM.

use super::config::PciConfig;

/// PCI capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASKED: u32 = 1;

/// Where an MSI message goes: the message address and data the guest programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Delivers MSI-X vectors for one device.
pub trait MsiSink: Send + Sync {
    /// The guest (re)programmed `vector`; `None` when it can no longer fire (masked or MSI-X
    /// disabled), so the route may be dropped.
    fn route(&self, vector: u16, message: Option<MsiMessage>);
    /// Raises `vector` (its route was set by [`MsiSink::route`]).
    fn fire(&self, vector: u16);
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    message: MsiMessage,
    control: u32,
}

/// MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    cap_offset: usize,
    enabled: bool,
    function_masked: bool,
    sink: Box<dyn MsiSink>,
}

impl Msix {
    /// Adds an MSI-X capability with `vectors` entries to `config`, with the table at
    /// `table_offset` and the PBA at `pba_offset` of BAR `bar`. Every vector starts masked.
    pub fn new(
        config: &mut PciConfig,
        vectors: u16,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
        sink: Box<dyn MsiSink>,
    ) -> Result<Self, super::config::Error> {
        assert!(
            (1..=2048).contains(&vectors),
            "MSI-X supports 1 to 2048 vectors"
        );
        let control = vectors - 1;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&control.to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let cap_offset = config.add_capability(MSIX_CAP_ID, &body)?;
        // Only the enable and function-mask bits of Message Control are writable.
        config.set_writable(
            cap_offset,
            u32::from(CONTROL_ENABLE | CONTROL_FUNCTION_MASK) << 16,
        );
        Ok(Self {
            entries: vec![
                Entry {
                    control: VECTOR_CONTROL_MASKED,
                    ..Default::default()
                };
                usize::from(vectors)
            ],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            cap_offset,
            enabled: false,
            function_masked: false,
            sink,
        })
    }

    /// Size in bytes of the vector table.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Size in bytes of the pending-bit array.
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// True when MSI-X is enabled (and so legacy INTx is off).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn masked(&self, vector: usize) -> bool {
        !self.enabled
            || self.function_masked
            || self.entries[vector].control & VECTOR_CONTROL_MASKED != 0
    }

    fn set_pending(&mut self, vector: usize, on: bool) {
        let (word, bit) = (vector / 64, vector % 64);
        if on {
            self.pending[word] |= 1 << bit;
        } else {
            self.pending[word] &= !(1 << bit);
        }
    }

    fn is_pending(&self, vector: usize) -> bool {
        self.pending[vector / 64] & (1 << (vector % 64)) != 0
    }

    /// Pushes the current routing of `vector` to the sink and delivers it if it was pending and
    /// can fire now.
    fn refresh(&mut self, vector: usize) {
        let masked = self.masked(vector);
        let message = (!masked).then_some(self.entries[vector].message);
        self.sink.route(vector as u16, message);
        if !masked && self.is_pending(vector) {
            self.set_pending(vector, false);
            self.sink.fire(vector as u16);
        }
    }

    /// Re-reads Message Control after the guest wrote configuration space.
    pub fn config_written(&mut self, config: &mut PciConfig) {
        let control = (config.read_reg(self.cap_offset / 4) >> 16) as u16;
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_masked) != (self.enabled, self.function_masked) {
            self.enabled = enabled;
            self.function_masked = function_masked;
            for v in 0..self.entries.len() {
                self.refresh(v);
            }
        }
    }

    /// Raises `vector`, or marks it pending while it is masked. Out-of-range vectors (a guest
    /// that configured a queue with a bogus vector number) are dropped.
    pub fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            return;
        }
        if self.masked(v) {
            self.set_pending(v, true);
        } else {
            self.sink.fire(vector);
        }
    }

    /// Guest read in the vector table at `offset`.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = (offset / ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(v) else { return };
        let words = [
            e.message.address as u32,
            (e.message.address >> 32) as u32,
            e.message.data,
            e.control,
        ];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        let start = (offset % ENTRY_SIZE) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    /// Guest write in the vector table at `offset` (4- or 8-byte accesses).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let v = (offset / ENTRY_SIZE) as usize;
        if v >= self.entries.len() || !matches!(data.len(), 4 | 8) {
            return;
        }
        let mut field = (offset % ENTRY_SIZE) as usize;
        for chunk in data.chunks(4) {
            let value = u32::from_le_bytes(chunk.try_into().expect("4-byte chunk"));
            let e = &mut self.entries[v];
            match field {
                0 => e.message.address = (e.message.address & !0xffff_ffff) | u64::from(value),
                4 => {
                    e.message.address = (e.message.address & 0xffff_ffff) | (u64::from(value) << 32)
                }
                8 => e.message.data = value,
                12 => e.control = value & VECTOR_CONTROL_MASKED,
                _ => {}
            }
            field += 4;
        }
        self.refresh(v);
    }

    /// Guest read in the pending-bit array at `offset`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let word = self
            .pending
            .get((offset / 8) as usize)
            .copied()
            .unwrap_or(0);
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(start + i).copied().unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::config::PciId;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl MsiSink for Recorder {
        fn route(&self, vector: u16, message: Option<MsiMessage>) {
            let m = message.map(|m| format!("{:#x}/{:#x}", m.address, m.data));
            self.0.lock().unwrap().push(format!("route {vector} {m:?}"));
        }
        fn fire(&self, vector: u16) {
            self.0.lock().unwrap().push(format!("fire {vector}"));
        }
    }

    fn setup(vectors: u16) -> (PciConfig, Msix, Recorder) {
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: (1, 0, 0),
            revision: 1,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let rec = Recorder::default();
        let msix = Msix::new(&mut cfg, vectors, 0, 0x4000, 0x5000, Box::new(rec.clone())).unwrap();
        (cfg, msix, rec)
    }

    fn enable(cfg: &mut PciConfig, msix: &mut Msix, control: u16) {
        cfg.write(msix.cap_offset + 2, &control.to_le_bytes());
        msix.config_written(cfg);
    }

    fn program(msix: &mut Msix, v: u64, addr: u64, data: u32, masked: bool) {
        msix.table_write(v * 16, &addr.to_le_bytes());
        msix.table_write(v * 16 + 8, &data.to_le_bytes());
        msix.table_write(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn capability_layout() {
        let (cfg, msix, _) = setup(3);
        let base = msix.cap_offset / 4;
        assert_eq!(cfg.read_reg(base) & 0xff, u32::from(MSIX_CAP_ID));
        assert_eq!(cfg.read_reg(base) >> 16, 2, "table size - 1");
        assert_eq!(cfg.read_reg(base + 1), 0x4000);
        assert_eq!(cfg.read_reg(base + 2), 0x5000);
        assert_eq!(msix.table_size(), 48);
        assert_eq!(msix.pba_size(), 8);
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let (mut cfg, mut msix, rec) = setup(2);
        msix.trigger(0);
        assert!(rec.0.lock().unwrap().iter().all(|e| !e.starts_with("fire")));
        let mut pba = [0u8; 8];
        msix.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1, "pending while MSI-X is disabled");
        enable(&mut cfg, &mut msix, CONTROL_ENABLE);
        program(&mut msix, 0, 0xfee0_0000, 0x41, false);
        let log = rec.0.lock().unwrap().clone();
        assert_eq!(log.last().unwrap(), "fire 0", "{log:?}");
        assert!(
            log.contains(&"route 0 Some(\"0xfee00000/0x41\")".to_string()),
            "{log:?}"
        );
        msix.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        msix.trigger(0);
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), "fire 0");
    }

    #[test]
    fn function_mask_and_vector_mask() {
        let (mut cfg, mut msix, rec) = setup(2);
        enable(&mut cfg, &mut msix, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut msix, 1, 0xfee0_1000, 0x42, false);
        msix.trigger(1);
        assert!(rec.0.lock().unwrap().iter().all(|e| e != "fire 1"));
        enable(&mut cfg, &mut msix, CONTROL_ENABLE);
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), "fire 1");
        msix.table_write(16 + 12, &1u32.to_le_bytes());
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), "route 1 None");
        msix.trigger(1);
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), "route 1 None");
    }

    #[test]
    fn table_reads_back_and_bad_accesses_are_ignored() {
        let (_cfg, mut msix, _) = setup(1);
        program(&mut msix, 0, 0x1_fee0_0000, 0x55, true);
        let mut d = [0u8; 16];
        msix.table_read(0, &mut d[..8]);
        assert_eq!(
            u64::from_le_bytes(d[..8].try_into().unwrap()),
            0x1_fee0_0000
        );
        let mut c = [0u8; 4];
        msix.table_read(12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 1);
        msix.table_write(16, &[1, 2, 3, 4]);
        msix.table_write(0, &[1, 2]);
        msix.trigger(7);
        let mut out = [0xaa; 4];
        msix.table_read(64, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
