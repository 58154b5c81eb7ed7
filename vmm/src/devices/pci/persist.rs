//! Snapshot state of the PCI bus: each function's configuration space and the register writes
//! that programmed its BARs. Restore replays both through the paths a driver uses (config
//! writes through the root complex, which maps BARs as the guest placed them; BAR register
//! writes into the device), so a restored device is set up exactly as a live one.

use serde::{Deserialize, Serialize};

use super::root::PciRoot;
use crate::persist::Persist;

/// Dwords of a function's configuration space.
const CONFIG_DWORDS: usize = 64;

/// One PCI function.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PciSlotState {
    /// Slot on bus 0.
    pub slot: u8,
    /// Configuration space, 64 dwords.
    pub config: Vec<u32>,
    /// BAR 0 register writes replaying the device's programming.
    pub registers: Vec<(u64, Vec<u8>)>,
}

/// A saved bus that does not fit the bus it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum PciStateError {
    /// The snapshot has a device where this VM has none (the configurations differ).
    #[error("no device in PCI slot {0}")]
    NoDevice(u8),
    /// A configuration space of the wrong size.
    #[error("PCI slot {slot}: configuration space of {dwords} dwords (expected 64)")]
    ConfigSpace {
        /// The slot.
        slot: u8,
        /// Dwords found.
        dwords: usize,
    },
}

impl Persist for PciRoot {
    type State = Vec<PciSlotState>;
    type Error = PciStateError;

    fn save(&self) -> Result<Vec<PciSlotState>, PciStateError> {
        Ok(self
            .devices()
            .into_iter()
            .map(|(slot, dev)| {
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                PciSlotState {
                    slot,
                    config: (0..CONFIG_DWORDS).map(|r| d.config().read_reg(r)).collect(),
                    registers: d.save_registers(),
                }
            })
            .collect())
    }

    fn restore(&mut self, state: &Vec<PciSlotState>) -> Result<(), PciStateError> {
        let devices = self.devices();
        for saved in state {
            let Some((_, dev)) = devices.iter().find(|(s, _)| *s == saved.slot) else {
                return Err(PciStateError::NoDevice(saved.slot));
            };
            if saved.config.len() != CONFIG_DWORDS {
                return Err(PciStateError::ConfigSpace {
                    slot: saved.slot,
                    dwords: saved.config.len(),
                });
            }
            // BARs first (they decide where registers live), then the command register, then
            // capabilities (MSI-X enable).
            let order = (4..10).chain([1]).chain(16..CONFIG_DWORDS);
            for reg in order {
                let v = saved.config[reg];
                let bytes = if reg == 1 {
                    (v as u16).to_le_bytes().to_vec()
                } else {
                    v.to_le_bytes().to_vec()
                };
                self.config_write(0, saved.slot, 0, reg * 4, &bytes);
            }
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_registers(&saved.registers);
        }
        Ok(())
    }
}
