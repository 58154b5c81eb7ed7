//! Snapshot and restore: a paused VM written to a directory — `memory` (guest RAM, sparse) and
//! `state.json` (format version, configuration, KVM VM and vCPU state, device registers) — and
//! rebuilt from it in another process.
//!
//! Devices are restored by replaying the register writes that programmed them (PCI
//! configuration space, MSI-X table, virtio common configuration) through the same code paths a
//! driver uses, so a restored device is set up exactly as a live one; virtio queues resume at
//! the used index found in guest memory, which is where a quiesced device stands.

mod memory;
mod vcpu;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use self::vcpu::{VcpuState, VmState};
use crate::builder::{self, Restorer, RunningVm};
use crate::config::{DiskConfig, NetConfig, SerialConfig, VmConfig};
use crate::control::ControlError;
use crate::devices::pci::root::PciRoot;
use crate::devices::serial::SerialDevice;
use crate::vstate::vm::Vm;

/// Version of the snapshot format; restore refuses others.
pub const FORMAT_VERSION: u32 = 1;
const STATE_FILE: &str = "state.json";
const MEMORY_FILE: &str = "memory";

/// The configuration as a snapshot keeps it.
#[derive(Clone, Serialize, Deserialize)]
struct SavedConfig {
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: String,
    cpus: u8,
    memory: u64,
    serial: SavedSerial,
    disks: Vec<SavedDisk>,
    /// Absent in snapshots of VMs from before virtio-net.
    #[serde(default)]
    nets: Vec<SavedNet>,
}

#[derive(Clone, Serialize, Deserialize)]
enum SavedSerial {
    Stdout,
    Off,
    File(PathBuf),
}

#[derive(Clone, Serialize, Deserialize)]
struct SavedDisk {
    path: PathBuf,
    format: Option<String>,
    read_only: bool,
    serial: Option<String>,
    direct: bool,
}

#[derive(Clone, Serialize, Deserialize)]
struct SavedNet {
    tap: String,
    mac: String,
}

impl SavedConfig {
    fn of(c: &VmConfig) -> Self {
        SavedConfig {
            kernel: c.kernel.clone(),
            initramfs: c.initramfs.clone(),
            cmdline: c.cmdline.clone(),
            cpus: c.cpus,
            memory: c.memory,
            serial: match &c.serial {
                SerialConfig::Stdout => SavedSerial::Stdout,
                SerialConfig::Off => SavedSerial::Off,
                SerialConfig::File(p) => SavedSerial::File(p.clone()),
            },
            disks: c
                .disks
                .iter()
                .map(|d| SavedDisk {
                    path: d.path.clone(),
                    format: d.format.map(|f| f.to_string()),
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                    direct: d.direct,
                })
                .collect(),
            nets: c
                .nets
                .iter()
                .map(|n| SavedNet {
                    tap: n.tap.clone(),
                    mac: n.mac.to_string(),
                })
                .collect(),
        }
    }

    fn config(&self) -> Result<VmConfig, String> {
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory,
            serial: match &self.serial {
                SavedSerial::Stdout => SerialConfig::Stdout,
                SavedSerial::Off => SerialConfig::Off,
                SavedSerial::File(p) => SerialConfig::File(p.clone()),
            },
            disks: self
                .disks
                .iter()
                .map(|d| {
                    Ok(DiskConfig {
                        path: d.path.clone(),
                        format: d
                            .format
                            .as_deref()
                            .map(str::parse)
                            .transpose()
                            .map_err(|e: qcow::Error| e.to_string())?,
                        read_only: d.read_only,
                        serial: d.serial.clone(),
                        direct: d.direct,
                    })
                })
                .collect::<Result<_, String>>()?,
            nets: self
                .nets
                .iter()
                .map(|n| {
                    Ok(NetConfig {
                        tap: n.tap.clone(),
                        mac: n.mac.parse()?,
                    })
                })
                .collect::<Result<_, String>>()?,
        })
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct SavedSerialState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// One PCI function.
#[derive(Clone, Serialize, Deserialize)]
struct SavedPci {
    slot: u8,
    /// Configuration space, 64 dwords.
    config: Vec<u32>,
    /// BAR 0 register writes replaying the device's programming.
    registers: Vec<(u64, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct State {
    format_version: u32,
    vmm_version: String,
    config: SavedConfig,
    memory: Vec<memory::Region>,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    serial: SavedSerialState,
    pci: Vec<SavedPci>,
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(e.to_string())
}

/// Writes a snapshot of the paused `vm` (configured by `cfg`) into `dir` (created if needed,
/// must hold no snapshot yet).
pub fn save(vm: &RunningVm, cfg: &VmConfig, dir: &Path) -> Result<(), ControlError> {
    fs::create_dir_all(dir)
        .map_err(|e| ControlError::BadRequest(format!("{}: {e}", dir.display())))?;
    if dir.join(STATE_FILE).exists() || dir.join(MEMORY_FILE).exists() {
        return Err(ControlError::BadRequest(format!(
            "{} already holds a snapshot",
            dir.display()
        )));
    }
    let kvm = Kvm::new().map_err(internal)?;
    let msrs = vcpu::msr_indices(&kvm).map_err(internal)?;
    let collected = std::sync::Arc::new(Mutex::new(
        (0..cfg.cpus)
            .map(|_| None)
            .collect::<Vec<Option<Result<VcpuState, String>>>>(),
    ));
    let sink = collected.clone();
    // vCPU state is read on each vCPU's own (parked) thread.
    vm.vcpus()
        .on_each_vcpu(Box::new(move |index, fd| {
            let r = VcpuState::save(&msrs, fd);
            if let Some(slot) = sink
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(usize::from(index))
            {
                *slot = Some(r);
            }
        }))
        .map_err(internal)?;
    let vcpus = collected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .enumerate()
        .map(|(i, s)| s.unwrap_or_else(|| Err(format!("vCPU {i} did not report its state"))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(internal)?;
    let vm_state = VmState::save(vm.vm().fd()).map_err(internal)?;
    let serial = vm.serial_state();
    let mut pci = Vec::new();
    for (slot, dev) in vm.pci_devices() {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        let config = (0..64).map(|r| d.config().read_reg(r)).collect();
        let registers = d.save_registers();
        pci.push(SavedPci {
            slot,
            config,
            registers,
        });
    }
    let regions = memory::save(vm.vm().memory(), &dir.join(MEMORY_FILE)).map_err(internal)?;
    let state = State {
        format_version: FORMAT_VERSION,
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        config: SavedConfig::of(cfg),
        memory: regions,
        vm: vm_state,
        vcpus,
        serial: SavedSerialState {
            baud_divisor_low: serial.baud_divisor_low,
            baud_divisor_high: serial.baud_divisor_high,
            interrupt_enable: serial.interrupt_enable,
            interrupt_identification: serial.interrupt_identification,
            line_control: serial.line_control,
            line_status: serial.line_status,
            modem_control: serial.modem_control,
            modem_status: serial.modem_status,
            scratch: serial.scratch,
            in_buffer: serial.in_buffer,
        },
        pci,
    };
    let json = serde_json::to_vec(&state).map_err(internal)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    fs::write(&tmp, json)
        .and_then(|()| fs::rename(&tmp, dir.join(STATE_FILE)))
        .map_err(|e| internal(format!("{}: {e}", dir.display())))?;
    Ok(())
}

struct FromSnapshot<'a> {
    dir: &'a Path,
    state: State,
}

impl Restorer for FromSnapshot<'_> {
    fn memory(&mut self) -> Result<vm_memory::GuestMemoryMmap, String> {
        memory::restore(&self.dir.join(MEMORY_FILE), &self.state.memory)
    }

    fn vm(&self, vm: &Vm) -> Result<(), String> {
        self.state.vm.restore(vm.fd())
    }

    fn serial(&self, serial: &mut SerialDevice) -> Result<(), String> {
        let s = &self.state.serial;
        serial
            .set_state(&vm_superio::serial::SerialState {
                baud_divisor_low: s.baud_divisor_low,
                baud_divisor_high: s.baud_divisor_high,
                interrupt_enable: s.interrupt_enable,
                interrupt_identification: s.interrupt_identification,
                line_control: s.line_control,
                line_status: s.line_status,
                modem_control: s.modem_control,
                modem_status: s.modem_status,
                scratch: s.scratch,
                in_buffer: s.in_buffer.clone(),
            })
            .map_err(|e| e.to_string())
    }

    fn devices(&self, pci: &mut PciRoot) -> Result<(), String> {
        let devices = pci.devices();
        for saved in &self.state.pci {
            let Some((_, dev)) = devices.iter().find(|(s, _)| *s == saved.slot) else {
                return Err(format!("no device in PCI slot {}", saved.slot));
            };
            if saved.config.len() != 64 {
                return Err(format!("PCI slot {}: bad configuration space", saved.slot));
            }
            // BARs first (they decide where registers live), then the command register, then
            // capabilities (MSI-X enable).
            let order = (4..10).chain([1]).chain(16..64);
            for reg in order {
                let v = saved.config[reg];
                let bytes = if reg == 1 {
                    (v as u16).to_le_bytes().to_vec()
                } else {
                    v.to_le_bytes().to_vec()
                };
                pci.config_write(0, saved.slot, 0, reg * 4, &bytes);
            }
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_registers(&saved.registers);
        }
        Ok(())
    }

    fn vcpu(&self, index: u8, fd: &kvm_ioctls::VcpuFd) -> Result<(), String> {
        self.state
            .vcpus
            .get(usize::from(index))
            .ok_or_else(|| format!("no state for vCPU {index}"))?
            .restore(fd)
            .map_err(|e| format!("vCPU {index}: {e}"))
    }
}

/// Rebuilds the VM saved in `dir`; it is left paused.
pub fn restore(dir: &Path) -> Result<(VmConfig, RunningVm), ControlError> {
    let bad = |m: String| ControlError::BadRequest(m);
    let text = fs::read(dir.join(STATE_FILE))
        .map_err(|e| bad(format!("{}: {e}", dir.join(STATE_FILE).display())))?;
    let state: State = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("{}: not a snapshot: {e}", dir.display())))?;
    if state.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "snapshot format {} (vmm {}) is not supported: this vmm reads format {FORMAT_VERSION}",
            state.format_version, state.vmm_version
        )));
    }
    let config = state.config.config().map_err(bad)?;
    if state.vcpus.len() != usize::from(config.cpus) {
        return Err(bad(
            "snapshot vCPU count does not match its configuration".into()
        ));
    }
    let mut from = FromSnapshot { dir, state };
    let vm = builder::build(&config, Some(&mut from)).map_err(|e| {
        if e.is_bad_input() {
            ControlError::BadRequest(e.to_string())
        } else {
            ControlError::Internal(e.to_string())
        }
    })?;
    Ok((config, vm))
}
