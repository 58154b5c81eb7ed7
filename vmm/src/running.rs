//! A VM that runs: its vCPU threads, devices and the handles the VMM needs to drive it (pause,
//! power button, counters, state capture for snapshots, teardown). Built by
//! [`crate::builder::build_for_boot`] or [`crate::snapshot::restore`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::console;
use crate::control::{DiskCounters, NetCounters};
use crate::devices::ged::{self, PowerButton};
use crate::devices::pci::persist::{PciSlotState, PciStateError};
use crate::devices::pci::PciRoot;
use crate::devices::serial::{SerialDevice, UartState, UartStateError};
use crate::devices::virtio::block::request::Counters;
use crate::devices::virtio::block::SharedDisk;
use crate::devices::virtio::net::NetHandle;
use crate::devices::virtio::vsock::VsockHandle;
use crate::devices::{PauseError, VmEvent};
use crate::persist::Persist;
use crate::vstate::control::{self, VcpuControl};
use crate::vstate::kvm_state::{self, StateError, VcpuState, VmState};
use crate::vstate::vm::Vm;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (we end the VM rather than restart it).
    Reset(&'static str),
    /// The guest kernel panicked.
    Panic,
    /// The VM failed.
    Error(String),
}

impl From<VmEvent> for VmExit {
    fn from(e: VmEvent) -> Self {
        match e {
            VmEvent::PowerOff => VmExit::PowerOff,
            VmEvent::Reset(why) => VmExit::Reset(why),
            VmEvent::Panic => VmExit::Panic,
            VmEvent::Error(msg) => VmExit::Error(msg),
            // The VMM pauses on a stall rather than ending the VM; only a caller that does not
            // know stalls (none today) would end it.
            VmEvent::Stall(msg) => VmExit::Error(msg),
        }
    }
}

/// Why a VM could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseVmError {
    /// A vCPU did not park.
    #[error(transparent)]
    Vcpus(#[from] control::Error),
    /// A device did not come to rest.
    #[error("PCI slot {slot}: {source}")]
    Device {
        /// Its slot.
        slot: u8,
        /// What was still going on.
        source: PauseError,
    },
}

/// Why the state of a paused VM could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The vCPUs could not run the save job (not paused).
    #[error(transparent)]
    Vcpus(#[from] control::Error),
    /// KVM refused to report VM-wide or MSR state.
    #[error(transparent)]
    Kvm(#[from] StateError),
    /// A vCPU's state could not be read.
    #[error("vCPU {index}: {source}")]
    Vcpu {
        /// Which vCPU.
        index: usize,
        /// Why.
        source: StateError,
    },
    /// A vCPU thread did not report.
    #[error("vCPU {0} did not report its state")]
    VcpuMissing(usize),
    /// The UART's state could not be read.
    #[error(transparent)]
    Serial(#[from] UartStateError),
    /// The PCI bus's state could not be read.
    #[error(transparent)]
    Pci(#[from] PciStateError),
}

/// Everything of a paused VM a snapshot keeps, but its memory and configuration.
pub struct Captured {
    /// Interrupt controllers, PIT and clock.
    pub vm: VmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The UART.
    pub serial: UartState,
    /// Every PCI function.
    pub pci: Vec<PciSlotState>,
}

/// The parts of a started VM, as the builder assembled them.
pub struct Parts {
    /// Why the VM stops, reported by devices and vCPUs.
    pub events: Receiver<VmEvent>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The KVM VM and guest memory.
    pub vm: Arc<Vm>,
    /// Raw mode of the controlling terminal, while the console is interactive.
    pub terminal: Option<console::RawTerminal>,
    /// Each disk's backend and counters, in configuration order.
    pub disks: Vec<(SharedDisk, Arc<Counters>)>,
    /// Each network device, in configuration order.
    pub nets: Vec<NetHandle>,
    /// The vsock device.
    pub vsock: Option<VsockHandle>,
    /// vCPU run control.
    pub control: Arc<VcpuControl>,
    /// The ACPI power button.
    pub power_button: PowerButton,
    /// The PCI bus.
    pub pci: Arc<Mutex<PciRoot>>,
    /// Number of vCPUs.
    pub cpus: u8,
}

/// A started VM. Its vCPU threads run until the guest stops them or [`RunningVm::finish`].
pub struct RunningVm {
    events: Option<Receiver<VmEvent>>,
    serial: Arc<Mutex<SerialDevice>>,
    vm: Arc<Vm>,
    _terminal: Option<console::RawTerminal>,
    disks: Vec<(SharedDisk, Arc<Counters>)>,
    nets: Vec<NetHandle>,
    vsock: Option<VsockHandle>,
    control: Arc<VcpuControl>,
    power_button: PowerButton,
    pci: Arc<Mutex<PciRoot>>,
    cpus: u8,
    memory_loader: Option<crate::snapshot::Loader>,
}

fn get(a: &AtomicU64) -> u64 {
    // Counters are statistics: no ordering needed.
    a.load(Ordering::Relaxed)
}

impl RunningVm {
    /// The VM made of `parts`.
    pub fn new(parts: Parts) -> RunningVm {
        RunningVm {
            events: Some(parts.events),
            serial: parts.serial,
            vm: parts.vm,
            _terminal: parts.terminal,
            disks: parts.disks,
            nets: parts.nets,
            vsock: parts.vsock,
            control: parts.control,
            power_button: parts.power_button,
            pci: parts.pci,
            cpus: parts.cpus,
            memory_loader: None,
        }
    }

    /// Hands over the loader still bringing a restored VM's memory in.
    pub fn set_memory_loader(&mut self, loader: Option<crate::snapshot::Loader>) {
        self.memory_loader = loader;
    }

    /// Blocks until guest memory is all in (at once but for a VM restored moments ago).
    pub fn memory_loaded(&self) -> Result<(), String> {
        self.memory_loader
            .as_ref()
            .map_or(Ok(()), |l| l.wait().map(|_| ()))
    }

    /// Presses the ACPI power button once. A guest that handles it shuts down and powers off,
    /// which ends the VM as [`VmExit::PowerOff`]; one that ignores it keeps running, so the caller
    /// bounds the wait and stops the VM the hard way after it.
    pub fn power_button(&self) -> Result<(), ged::Error> {
        self.power_button.press()
    }

    /// The channel on which the VM reports why it stops (taken once).
    pub fn take_events(&mut self) -> Option<Receiver<VmEvent>> {
        self.events.take()
    }

    /// Blocks until the VM stops, stops it completely and says why.
    pub fn wait(mut self) -> VmExit {
        let exit = self
            .take_events()
            .and_then(|rx| rx.recv().ok())
            .map(VmExit::from)
            .unwrap_or_else(|| VmExit::Error("all vCPU threads ended".into()));
        self.finish();
        exit
    }

    /// Parks every vCPU, then lets every device finish the requests it took: afterwards guest
    /// memory and device state stand still.
    pub fn pause(&self) -> Result<(), PauseVmError> {
        self.control.pause()?;
        if let Err(e) = pause_devices(&self.pci) {
            self.control.resume();
            return Err(e);
        }
        Ok(())
    }

    /// Lets devices and vCPUs run again.
    pub fn resume(&self) {
        resume_devices(&self.pci);
        self.control.resume()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// The state of the paused VM: KVM's VM-wide and per-vCPU state (read on each vCPU's own
    /// parked thread) and every device's.
    pub fn capture(&self) -> Result<Captured, CaptureError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|source| StateError::Kvm {
            what: "open /dev/kvm",
            source,
        })?;
        let msrs = kvm_state::msr_indices(&kvm)?;
        type Slot = Option<Result<VcpuState, StateError>>;
        let collected: Arc<Mutex<Vec<Slot>>> =
            Arc::new(Mutex::new((0..self.cpus).map(|_| None).collect()));
        let sink = collected.clone();
        self.control.on_each_vcpu(Box::new(move |index, fd| {
            let r = VcpuState::save(&msrs, fd);
            if let Some(slot) = sink
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(usize::from(index))
            {
                *slot = Some(r);
            }
        }))?;
        let vcpus = std::mem::take(&mut *collected.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .enumerate()
            .map(|(index, s)| match s {
                Some(r) => r.map_err(|source| CaptureError::Vcpu { index, source }),
                None => Err(CaptureError::VcpuMissing(index)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Captured {
            vm: self.vm.save()?,
            vcpus,
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save()?,
            pci: self.pci.lock().unwrap_or_else(|e| e.into_inner()).save()?,
        })
    }

    /// Request counters of each disk, in configuration order.
    pub fn disk_counters(&self) -> Vec<DiskCounters> {
        self.disks
            .iter()
            .map(|(_, c)| DiskCounters {
                read_ops: get(&c.read_ops),
                read_bytes: get(&c.read_bytes),
                write_ops: get(&c.write_ops),
                write_bytes: get(&c.write_bytes),
                flush_ops: get(&c.flush_ops),
                errors: get(&c.errors),
                ..DiskCounters::default()
            })
            .collect()
    }

    /// Frame counters of each network device, in configuration order.
    pub fn net_counters(&self) -> Vec<NetCounters> {
        self.nets
            .iter()
            .map(|n| {
                let c = n.counters();
                NetCounters {
                    rx_packets: get(&c.rx_packets),
                    rx_bytes: get(&c.rx_bytes),
                    rx_dropped: get(&c.rx_dropped),
                    tx_packets: get(&c.tx_packets),
                    tx_bytes: get(&c.tx_bytes),
                    tx_dropped: get(&c.tx_dropped),
                    ..NetCounters::default()
                }
            })
            .collect()
    }

    /// Stops the vCPUs, flushes the console and leaves every image consistent for other tools
    /// (the process may exit right after this without dropping devices), and lets go of every
    /// TAP and the vsock socket (a reboot attaches to them again).
    pub fn finish(&self) {
        self.control.stop();
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
        for (disk, _) in &self.disks {
            if let Err(e) = disk.lock().unwrap_or_else(|e| e.into_inner()).close() {
                tracing::warn!("closing disk: {e}");
            }
        }
        for net in &self.nets {
            net.close();
        }
        if let Some(v) = &self.vsock {
            v.close();
        }
    }
}

/// Pauses every PCI device, undoing the pauses done so far when one fails.
pub fn pause_devices(pci: &Mutex<PciRoot>) -> Result<(), PauseVmError> {
    let devices = pci.lock().unwrap_or_else(|e| e.into_inner()).devices();
    for (i, (slot, dev)) in devices.iter().enumerate() {
        if let Err(source) = dev.lock().unwrap_or_else(|e| e.into_inner()).pause() {
            for (_, d) in &devices[..i] {
                d.lock().unwrap_or_else(|e| e.into_inner()).resume();
            }
            return Err(PauseVmError::Device {
                slot: *slot,
                source,
            });
        }
    }
    Ok(())
}

fn resume_devices(pci: &Mutex<PciRoot>) {
    let devices = pci.lock().unwrap_or_else(|e| e.into_inner()).devices();
    for (_, dev) in devices {
        dev.lock().unwrap_or_else(|e| e.into_inner()).resume();
    }
}
