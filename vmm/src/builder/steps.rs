//! The steps a VM is built from, shared by a cold boot ([`super::build_for_boot`]) and a
//! snapshot restore ([`crate::snapshot::restore`]): what differs between the two is only what
//! fills guest memory and the initial state of each piece, never how the pieces are made.

use std::io;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use block::{open_disk, DiskBackend};
use kvm_ioctls::Kvm;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::Error;
use crate::arch::cpuid::CpuidPolicy;
use crate::arch::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_END, PCI_MMIO32_START};
use crate::arch::regs::BootMode;
use crate::config::{DiskConfig, DiskFormat, NetConfig, SerialConfig, VmConfig, VsockConfig};
use crate::console;
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::bus::Bus;
use crate::devices::cmos::{self, Cmos};
use crate::devices::ged::PowerButton;
use crate::devices::i8042::{self, I8042};
use crate::devices::pci::root::{CONFIG_IO_PORT, CONFIG_IO_PORTS};
use crate::devices::pci::{PciConfigIo, PciEcam, PciRoot};
use crate::devices::pvpanic::{PvPanic, PVPANIC_PORT};
use crate::devices::serial::{self, SerialDevice, SerialOut};
use crate::devices::serial_log::SerialLog;
use crate::devices::virtio::block::request::Counters;
use crate::devices::virtio::block::{Block, BlockOptions, SharedDisk};
use crate::devices::virtio::net::tap::Tap;
use crate::devices::virtio::net::{Net, NetHandle};
use crate::devices::virtio::pci::{self as virtio_pci, VirtioPciDevice};
use crate::devices::virtio::vsock::{Vsock, VsockHandle};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{ExitHandle, VmEvent};
use crate::running::{Parts, RunningVm};
use crate::vstate::control::VcpuControl;
use crate::vstate::vcpu::{self, Buses, Vcpu};
use crate::vstate::vm::Vm;

fn host(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Host { what, source }
}

/// What the host provides a VM before KVM is touched: its disks opened, its TAPs attached,
/// /dev/kvm open. With [`crate::config::validate`] before it, everything the user can get
/// wrong is found here.
pub struct HostResources {
    /// /dev/kvm.
    pub kvm: Kvm,
    disks: Vec<Box<dyn DiskBackend>>,
    taps: Vec<Tap>,
    vsock: Option<Vsock>,
}

impl HostResources {
    /// Opens what `cfg` names (validated already).
    pub fn open(cfg: &VmConfig) -> Result<HostResources, Error> {
        let disks = cfg
            .disks
            .iter()
            .map(open_backend)
            .collect::<Result<_, _>>()?;
        let taps = cfg.nets.iter().map(open_tap).collect::<Result<_, _>>()?;
        let vsock = cfg.vsock.as_ref().map(open_vsock).transpose()?;
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        cfg.check_cpus(kvm.get_max_vcpus() as u32)?;
        Ok(HostResources {
            kvm,
            disks,
            taps,
            vsock,
        })
    }
}

/// The block layer's name for a configured format.
fn format_of(f: DiskFormat) -> block::Format {
    match f {
        DiskFormat::Raw => block::Format::Raw,
        DiskFormat::Qcow2 => block::Format::Qcow2,
    }
}

/// Opens the image of `disk` (with its backing chain) in the format given or probed.
fn open_backend(disk: &DiskConfig) -> Result<Box<dyn DiskBackend>, Error> {
    open_disk(
        &disk.path,
        disk.format.map(format_of),
        disk.read_only,
        disk.direct,
    )
    .map_err(|source| Error::Disk {
        path: disk.path.clone(),
        source,
    })
}

/// Attaches to the TAP of `net`.
fn open_tap(net: &NetConfig) -> Result<Tap, Error> {
    Tap::open(&net.tap).map_err(|source| Error::Net {
        tap: net.tap.clone(),
        source,
    })
}

/// Binds the host side of the vsock device of `v`.
fn open_vsock(v: &VsockConfig) -> Result<Vsock, Error> {
    Vsock::new(v.cid, &v.socket).map_err(|source| Error::Vsock {
        path: v.socket.clone(),
        source,
    })
}

/// The KVM VM over `memory`, with its interrupt controllers and PIT.
pub fn create_vm(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Vm, Error> {
    Ok(Vm::new(kvm, memory)?)
}

/// The channel on which devices and vCPUs report why the VM stops.
pub fn exit_channel() -> (ExitHandle, Receiver<VmEvent>) {
    let (tx, rx) = channel();
    (ExitHandle::new(tx), rx)
}

fn serial_out(cfg: &SerialConfig) -> Result<SerialOut, Error> {
    Ok(match cfg {
        SerialConfig::Stdout => Box::new(io::stdout()),
        SerialConfig::Off => Box::new(io::sink()),
        SerialConfig::File(path) => Box::new(
            SerialLog::open(path).map_err(host(format!("serial file {}", path.display())))?,
        ),
    })
}

/// The legacy devices every VM has, on a port I/O bus: COM1 (interrupting through an irqfd on
/// `vm`), the i8042 reset line, the ACPI PM registers, the CMOS clock and pvpanic.
pub fn legacy_devices(
    vm: &Vm,
    exit: &ExitHandle,
    serial_out: SerialOut,
) -> Result<(Bus, Arc<Mutex<SerialDevice>>), Error> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host("serial eventfd"))?;
    vm.fd()
        .register_irqfd(&serial_irq, serial::COM1_IRQ)
        .map_err(|e| host("serial irqfd")(io::Error::from_raw_os_error(e.errno())))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
    let pio = Bus::new();
    pio.insert(serial.clone(), serial::COM1_PORT.into(), serial::PORT_COUNT)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        i8042::DATA_PORT.into(),
        i8042::PORT_COUNT,
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        acpi_pm::SLEEP_CONTROL_PORT.into(),
        acpi_pm::PORT_COUNT,
    )?;
    pio.insert(
        Arc::new(Mutex::new(Cmos::default())),
        cmos::CMOS_PORT.into(),
        cmos::PORT_COUNT,
    )?;
    pio.insert(
        Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
        PVPANIC_PORT.into(),
        1,
    )?;
    if crate::jail::probe::enabled() {
        pio.insert(
            Arc::new(Mutex::new(crate::jail::probe::SeccompProbe)),
            crate::jail::probe::PROBE_PORT.into(),
            1,
        )?;
    }
    Ok((pio, serial))
}

/// Every device of a VM, attached: the buses the vCPUs dispatch exits to, and handles on the
/// devices the VMM drives.
pub struct Devices {
    /// Port I/O and MMIO buses.
    pub buses: Buses,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The PCI bus.
    pub pci: Arc<Mutex<PciRoot>>,
    /// The ACPI power button.
    pub power_button: PowerButton,
    /// Each disk's backend and counters, in configuration order.
    pub disks: Vec<(SharedDisk, Arc<Counters>)>,
    /// Each network device, in configuration order.
    pub nets: Vec<NetHandle>,
    /// The vsock device.
    pub vsock: Option<VsockHandle>,
}

/// Attaches every device `cfg` describes: legacy devices, the power button, the PCI root
/// complex, then virtio-blk for each disk, virtio-net for each TAP and virtio-vsock, in PCI
/// slot order.
pub fn attach_devices(
    vm: &Vm,
    cfg: &VmConfig,
    host: HostResources,
    exit: &ExitHandle,
) -> Result<(Kvm, Devices), Error> {
    let (pio, serial) = legacy_devices(vm, exit, serial_out(&cfg.serial)?)?;
    let power_button = PowerButton::new(vm.fd())?;
    let mmio = Arc::new(Bus::new());
    let pci = Arc::new(Mutex::new(PciRoot::new(
        mmio.clone(),
        PCI_MMIO32_START,
        PCI_MMIO32_END,
    )));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(&pci))),
        CONFIG_IO_PORT.into(),
        CONFIG_IO_PORTS,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(PciEcam::new(&pci))),
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
    )?;
    let mut root = pci.lock().unwrap_or_else(|e| e.into_inner());
    let disks = cfg
        .disks
        .iter()
        .zip(host.disks)
        .enumerate()
        .map(|(i, (disk, backend))| attach_disk(vm, &mut root, (i, disk), backend, cfg.cpus, exit))
        .collect::<Result<Vec<_>, _>>()?;
    let mut nets = CloseOnError(Vec::with_capacity(cfg.nets.len()));
    for (net, tap) in cfg.nets.iter().zip(host.taps) {
        nets.0.push(attach_net(vm, &mut root, net, tap)?);
    }
    let vsock = match host.vsock {
        Some(device) => {
            let handle = device.handle();
            // Closed (its socket removed) if what follows fails, like the TAPs.
            let mut guard = CloseVsockOnError(Some(handle.clone()));
            let slot = attach_virtio(vm, &mut root, Box::new(device))?;
            tracing::info!(slot, "virtio-vsock attached");
            guard.0 = None;
            Some(handle)
        }
        None => None,
    };
    drop(root);
    let devices = Devices {
        buses: Buses {
            pio: Arc::new(pio),
            mmio,
        },
        serial,
        pci,
        power_button,
        disks,
        nets: std::mem::take(&mut nets.0),
        vsock,
    };
    Ok((host.kvm, devices))
}

/// Puts `device` on the PCI bus behind the virtio-pci transport, with one MSI-X vector per
/// queue plus one for configuration changes. Returns its slot.
fn attach_virtio(vm: &Vm, pci: &mut PciRoot, device: Box<dyn VirtioDevice>) -> Result<u8, Error> {
    let vectors = device.queue_max_sizes().len() as u16 + 1;
    let sink = vm.irq_router().msi_sink(vectors)?;
    let bar = pci.allocate_bar(virtio_pci::BAR_SIZE)?;
    let dev = VirtioPciDevice::new(
        device,
        vm.memory().clone(),
        bar,
        Box::new(sink),
        Some(vm.fd().clone()),
    )?;
    Ok(pci.add_device(Arc::new(Mutex::new(dev)))?)
}

/// Adds a virtio-blk device serving `backend` as `disk`, with one request queue per vCPU.
fn attach_disk(
    vm: &Vm,
    pci: &mut PciRoot,
    (index, disk): (usize, &DiskConfig),
    backend: Box<dyn DiskBackend>,
    cpus: u8,
    exit: &ExitHandle,
) -> Result<(SharedDisk, Arc<Counters>), Error> {
    let opts = BlockOptions {
        read_only: disk.read_only,
        serial: disk.serial.clone().unwrap_or_default(),
        num_queues: u16::from(cpus),
        on_error: disk.on_error,
        name: format!("disk {index} ({})", disk.path.display()),
        stall: exit.clone(),
    };
    let block = Block::new(backend, &opts);
    let shared = (block.backend(), block.counters());
    let slot = attach_virtio(vm, pci, Box::new(block))?;
    tracing::info!(disk = %disk.path.display(), slot, "virtio-blk attached");
    Ok(shared)
}

/// Adds a virtio-net device on `tap` for `net`.
fn attach_net(vm: &Vm, pci: &mut PciRoot, net: &NetConfig, tap: Tap) -> Result<NetHandle, Error> {
    let device = Net::new(Arc::new(tap), net.mac.0);
    let handle = device.handle();
    let slot = attach_virtio(vm, pci, Box::new(device))?;
    tracing::info!(tap = %net.tap, mac = %net.mac, slot, "virtio-net attached");
    Ok(handle)
}

/// Closes the TAPs of devices attached to a VM whose build failed (the PCI root, which holds the
/// devices, is never dropped), so that booting again can attach to them.
struct CloseOnError(Vec<NetHandle>);

impl Drop for CloseOnError {
    fn drop(&mut self) {
        for net in &self.0 {
            net.close();
        }
    }
}

/// The same for the vsock device's socket.
struct CloseVsockOnError(Option<VsockHandle>);

impl Drop for CloseVsockOnError {
    fn drop(&mut self) {
        if let Some(v) = &self.0 {
            v.close();
        }
    }
}

/// Creates and configures every vCPU (CPUID, MSRs, LAPIC; the boot vCPU's registers for
/// `boot` when booting), all before any runs, so a failure leaves nothing half-started.
pub fn create_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    cpus: u8,
    boot: Option<BootMode>,
    devices: &Devices,
    exit: &ExitHandle,
) -> Result<Vec<Vcpu>, Error> {
    let supported = vcpu::supported_cpuid(kvm).map_err(Error::Kvm)?;
    let policy = CpuidPolicy::default();
    (0..cpus)
        .map(|index| {
            let boot = boot.filter(|_| index == 0).map(|mode| (mode, vm.memory()));
            Ok(Vcpu::new(
                vm.fd(),
                kvm,
                &supported,
                &policy,
                index,
                cpus,
                boot,
                devices.buses.clone(),
                exit.clone(),
            )?)
        })
        .collect()
}

/// Starts a thread per vCPU under `control`, the interactive console when the serial port is
/// the terminal, and hands back the running VM.
pub fn start(
    cfg: &VmConfig,
    vm: Arc<Vm>,
    devices: Devices,
    vcpus: Vec<Vcpu>,
    control: VcpuControl,
    exit: ExitHandle,
    events: Receiver<VmEvent>,
) -> Result<RunningVm, Error> {
    let control = Arc::new(control);
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        // Each vCPU thread keeps the VM (and so guest memory) alive while it may still run.
        let vm = vm.clone();
        let ctl = control.clone();
        control
            .spawn(format!("vcpu{index}"), move || {
                crate::jail::seccomp::enter_thread(crate::jail::seccomp::Kind::Vcpu);
                vcpu.run(&ctl);
                drop(vm);
            })
            .map_err(host("spawning vCPU thread"))?;
    }
    let terminal = if cfg.serial == SerialConfig::Stdout {
        let raw = console::RawTerminal::enable();
        if raw.is_some() {
            console::spawn(devices.serial.clone(), exit).map_err(host("console thread"))?;
        }
        raw
    } else {
        None
    };
    let _ = io::Write::flush(&mut io::stdout());
    Ok(RunningVm::new(Parts {
        events,
        serial: devices.serial,
        vm,
        terminal,
        disks: devices.disks,
        nets: devices.nets,
        vsock: devices.vsock,
        control,
        power_button: devices.power_button,
        pci: devices.pci,
        cpus: cfg.cpus,
    }))
}

/// vCPU run control: running from the start, or parked before the first instruction.
pub fn vcpu_control(paused: bool) -> Result<VcpuControl, Error> {
    if paused {
        VcpuControl::paused()
    } else {
        VcpuControl::new()
    }
    .map_err(host("vCPU signals"))
}
