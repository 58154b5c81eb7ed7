//! The boot sequence, top to bottom: KVM → memory → VM → devices → ACPI → kernel → vCPUs → run.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::cpuid::CpuidPolicy;
use crate::arch::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_END, PCI_MMIO32_START};
use crate::arch::{acpi, bios};
use crate::boot::{self, BootPayload};
use crate::config::{ConfigError, DiskConfig, SerialConfig, VmConfig, MAX_CPUS};
use crate::console;
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::bus::{self, Bus};
use crate::devices::cmos::{self, Cmos};
use crate::devices::i8042::{self, I8042};
use crate::devices::pci::root::{CONFIG_IO_PORT, CONFIG_IO_PORTS};
use crate::devices::pci::{self, PciConfigIo, PciEcam, PciRoot};
use crate::devices::pvpanic::{PvPanic, PVPANIC_PORT};
use crate::devices::serial::{self, SerialDevice, SerialOut};
use crate::devices::virtio::block::backend::DiskBackend;
use crate::devices::virtio::block::open::{open_disk, OpenError};
use crate::devices::virtio::block::{Block, BlockOptions, SharedDisk};
use crate::devices::virtio::pci::{self as virtio_pci, VirtioPciDevice};
use crate::devices::{ExitHandle, VmEvent};
use crate::vstate::irq_routing;
use crate::vstate::vcpu::{self, Buses, Vcpu};
use crate::vstate::vm::{self, Vm};

/// Error starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The boot payload could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// /dev/kvm could not be opened.
    #[error("opening /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    /// VM creation failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// vCPU creation failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// A device could not be placed.
    #[error(transparent)]
    Bus(#[from] bus::Error),
    /// A PCI device could not be added.
    #[error(transparent)]
    Pci(#[from] pci::root::Error),
    /// A virtio device could not be set up.
    #[error(transparent)]
    VirtioPci(#[from] virtio_pci::Error),
    /// Interrupt routing failed.
    #[error(transparent)]
    Irq(#[from] irq_routing::Error),
    /// A disk image could not be opened.
    #[error("disk {}: {source}", path.display())]
    Disk {
        /// The image given with --disk.
        path: std::path::PathBuf,
        /// Why it could not be opened.
        source: OpenError,
    },
    /// Any other host-side failure (eventfds, threads, files).
    #[error("{what}: {source}")]
    Host {
        /// What we were doing.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// True when the user gave input that cannot work (as opposed to a host failure).
    pub fn is_bad_input(&self) -> bool {
        if let Error::Disk { source, .. } = self {
            return source.is_bad_input();
        }
        matches!(
            self,
            Error::Config(_)
                | Error::Boot(boot::Error::UnknownFormat(_))
                | Error::Boot(boot::Error::Load { .. })
                | Error::Boot(boot::Error::Io { .. })
                | Error::Boot(boot::Error::CmdlineTooLong { .. })
                | Error::Boot(boot::Error::CmdlineNul)
                | Error::Boot(boot::Error::InitramfsTooLarge { .. })
        )
    }
}

fn host(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Host { what, source }
}

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
        }
    }
}

/// A started VM. Its vCPU threads run until the guest stops them or the process exits.
pub struct RunningVm {
    events: Receiver<VmEvent>,
    serial: Arc<Mutex<SerialDevice>>,
    _vm: Arc<Vm>,
    _terminal: Option<console::RawTerminal>,
    disks: Vec<SharedDisk>,
}

impl RunningVm {
    /// Blocks until the VM stops and says why.
    pub fn wait(self) -> VmExit {
        let exit = self
            .events
            .recv()
            .map(VmExit::from)
            .unwrap_or_else(|_| VmExit::Error("all vCPU threads ended".into()));
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
        // The process exits right after this without dropping devices: images must be left
        // consistent now.
        for disk in &self.disks {
            if let Err(e) = disk.lock().unwrap_or_else(|e| e.into_inner()).close() {
                tracing::warn!("closing disk: {e}");
            }
        }
        exit
    }
}

fn serial_out(cfg: &SerialConfig) -> Result<SerialOut, Error> {
    Ok(match cfg {
        SerialConfig::Stdout => Box::new(io::stdout()),
        SerialConfig::Off => Box::new(io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(host(format!("serial file {}", path.display())))?,
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
    Ok((pio, serial))
}

/// Opens the image of `disk` (with its backing chain) in the format given or probed.
fn open_backend(disk: &DiskConfig) -> Result<Box<dyn DiskBackend>, Error> {
    open_disk(&disk.path, disk.format, disk.read_only, disk.direct).map_err(|source| Error::Disk {
        path: disk.path.clone(),
        source,
    })
}

/// Adds a virtio-blk PCI device serving `backend` as `disk`, with one request queue per vCPU.
fn attach_disk(
    vm: &Vm,
    pci: &mut PciRoot,
    disk: &DiskConfig,
    backend: Box<dyn DiskBackend>,
    cpus: u8,
) -> Result<SharedDisk, Error> {
    let opts = BlockOptions {
        read_only: disk.read_only,
        serial: disk.serial.clone().unwrap_or_default(),
        num_queues: u16::from(cpus),
    };
    let block = Block::new(backend, &opts);
    let shared = block.backend();
    let vectors = opts.num_queues + 1;
    let sink = vm.irq_router().msi_sink(vectors)?;
    let bar = pci.allocate_bar(virtio_pci::BAR_SIZE)?;
    let dev = VirtioPciDevice::new(
        Box::new(block),
        vm.memory().clone(),
        bar,
        Box::new(sink),
        Some(vm.fd().clone()),
    )?;
    let slot = pci.add_device(Arc::new(Mutex::new(dev)))?;
    tracing::info!(disk = %disk.path.display(), slot, "virtio-blk attached");
    Ok(shared)
}

/// Builds the VM described by `cfg` and starts its vCPUs.
pub fn start(cfg: &VmConfig) -> Result<RunningVm, Error> {
    // Everything the user can get wrong is checked before KVM is touched.
    cfg.validate(u32::from(MAX_CPUS))?;
    boot::check_kernel(&cfg.kernel)?;
    let backends = cfg
        .disks
        .iter()
        .map(open_backend)
        .collect::<Result<Vec<_>, _>>()?;
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    cfg.check_cpus(kvm.get_max_vcpus() as u32)?;

    let memory = vm::create_guest_memory(cfg.memory)?;
    let vm = Arc::new(Vm::new(&kvm, memory)?);
    let (tx, events) = channel();
    let exit = ExitHandle::new(tx);
    let (pio, serial) = legacy_devices(&vm, &exit, serial_out(&cfg.serial)?)?;
    let mmio = Arc::new(Bus::new());
    let pci = Arc::new(Mutex::new(PciRoot::new(
        mmio.clone(),
        PCI_MMIO32_START,
        PCI_MMIO32_END,
    )));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        CONFIG_IO_PORT.into(),
        CONFIG_IO_PORTS,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(PciEcam::new(pci.clone()))),
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
    )?;
    let mut disks = Vec::with_capacity(cfg.disks.len());
    for (disk, backend) in cfg.disks.iter().zip(backends) {
        disks.push(attach_disk(
            &vm,
            &mut pci.lock().unwrap_or_else(|e| e.into_inner()),
            disk,
            backend,
            cfg.cpus,
        )?);
    }
    let buses = Buses {
        pio: Arc::new(pio),
        mmio,
    };

    // Firmware tables and the kernel.
    let rsdp = acpi::write_tables(vm.memory(), cfg.cpus)?;
    bios::write_reset_stub(vm.memory()).map_err(acpi::Error::Write)?;
    let boot_mode = boot::load(
        vm.memory(),
        &BootPayload {
            kernel: &cfg.kernel,
            initramfs: cfg.initramfs.as_deref(),
            cmdline: &cfg.cmdline,
            mem_size: cfg.memory,
            rsdp,
        },
    )?;
    tracing::info!(?boot_mode, cpus = cfg.cpus, memory = cfg.memory, "booting");

    // vCPUs: all configured before any runs, so a failure leaves nothing half-started.
    let supported = vcpu::supported_cpuid(&kvm).map_err(Error::Kvm)?;
    let policy = CpuidPolicy::default();
    let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
    for index in 0..cfg.cpus {
        let boot = (index == 0).then_some((boot_mode, vm.memory()));
        vcpus.push(Vcpu::new(
            vm.fd(),
            &kvm,
            &supported,
            &policy,
            index,
            cfg.cpus,
            boot,
            buses.clone(),
            exit.clone(),
        )?);
    }
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        // Each vCPU thread keeps the VM (and so guest memory) alive while it may still run.
        let vm = vm.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                vcpu.run();
                drop(vm);
            })
            .map_err(host("spawning vCPU thread"))?;
    }

    let terminal = if cfg.serial == SerialConfig::Stdout {
        let raw = console::RawTerminal::enable();
        if raw.is_some() {
            console::spawn(serial.clone(), exit).map_err(host("console thread"))?;
        }
        raw
    } else {
        None
    };
    let _ = io::stdout().flush();
    Ok(RunningVm {
        events,
        serial,
        _vm: vm,
        _terminal: terminal,
        disks,
    })
}
