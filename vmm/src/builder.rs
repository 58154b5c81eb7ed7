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
use crate::config::{ConfigError, DiskConfig, NetConfig, SerialConfig, VmConfig, MAX_CPUS};
use crate::console;
use crate::control::{DiskCounters, NetCounters};
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::bus::{self, Bus};
use crate::devices::cmos::{self, Cmos};
use crate::devices::ged::{self, PowerButton};
use crate::devices::i8042::{self, I8042};
use crate::devices::pci::root::{CONFIG_IO_PORT, CONFIG_IO_PORTS};
use crate::devices::pci::{self, PciConfigIo, PciEcam, PciRoot};
use crate::devices::pvpanic::{PvPanic, PVPANIC_PORT};
use crate::devices::serial::{self, SerialDevice, SerialOut};
use crate::devices::virtio::block::backend::DiskBackend;
use crate::devices::virtio::block::open::{open_disk, OpenError};
use crate::devices::virtio::block::request::Counters;
use crate::devices::virtio::block::{Block, BlockOptions, SharedDisk};
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::net::{Net, NetHandle};
use crate::devices::virtio::pci::{self as virtio_pci, VirtioPciDevice};
use crate::devices::{ExitHandle, VmEvent};
use crate::vstate::control::VcpuControl;
use crate::vstate::irq_routing;
use crate::vstate::vcpu::{self, Buses, Vcpu};
use crate::vstate::vm::{self, Vm};

/// Error starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Snapshot state could not be applied.
    #[error("restoring the snapshot: {0}")]
    Restore(String),
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
    /// The ACPI power button could not be wired.
    #[error(transparent)]
    PowerButton(#[from] ged::Error),
    /// A disk image could not be opened.
    #[error("disk {}: {source}", path.display())]
    Disk {
        /// The image given with --disk.
        path: std::path::PathBuf,
        /// Why it could not be opened.
        source: OpenError,
    },
    /// A TAP interface could not be opened.
    #[error("net {tap}: {source}")]
    Net {
        /// The interface given with --net.
        tap: String,
        /// Why it could not be opened.
        source: TapError,
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
        if let Error::Net { source, .. } = self {
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

/// A started VM. Its vCPU threads run until the guest stops them or [`RunningVm::finish`].
pub struct RunningVm {
    events: Option<Receiver<VmEvent>>,
    serial: Arc<Mutex<SerialDevice>>,
    vm: Arc<Vm>,
    _terminal: Option<console::RawTerminal>,
    disks: Vec<(SharedDisk, Arc<Counters>)>,
    nets: Vec<NetHandle>,
    control: Arc<VcpuControl>,
    power_button: PowerButton,
    pci: Arc<Mutex<PciRoot>>,
}

impl RunningVm {
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
    pub fn pause(&self) -> Result<(), String> {
        self.control.pause().map_err(|e| e.to_string())?;
        let devices = self.pci_devices();
        for (i, (slot, dev)) in devices.iter().enumerate() {
            if let Err(e) = dev.lock().unwrap_or_else(|e| e.into_inner()).pause() {
                for (_, d) in &devices[..i] {
                    d.lock().unwrap_or_else(|e| e.into_inner()).resume();
                }
                self.control.resume();
                return Err(format!("PCI slot {slot}: {e}"));
            }
        }
        Ok(())
    }

    /// Lets devices and vCPUs run again.
    pub fn resume(&self) {
        for (_, dev) in self.pci_devices() {
            dev.lock().unwrap_or_else(|e| e.into_inner()).resume();
        }
        self.control.resume()
    }

    /// The serial port's registers.
    pub fn serial_state(&self) -> vm_superio::serial::SerialState {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
    }

    /// PCI devices by slot.
    pub fn pci_devices(&self) -> Vec<(u8, crate::devices::pci::root::SharedPciDevice)> {
        self.pci.lock().unwrap_or_else(|e| e.into_inner()).devices()
    }

    /// The PCI root complex.
    pub fn pci(&self) -> &Arc<Mutex<PciRoot>> {
        &self.pci
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// vCPU run control (state save jobs).
    pub fn vcpus(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
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
    /// TAP (a reboot attaches to it again).
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

/// A device counter's current value (counters are statistics: no ordering needed).
fn get(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

/// Adds a virtio-blk PCI device serving `backend` as `disk`, with one request queue per vCPU.
fn attach_disk(
    vm: &Vm,
    pci: &mut PciRoot,
    disk: &DiskConfig,
    backend: Box<dyn DiskBackend>,
    cpus: u8,
) -> Result<(SharedDisk, Arc<Counters>), Error> {
    let opts = BlockOptions {
        read_only: disk.read_only,
        serial: disk.serial.clone().unwrap_or_default(),
        num_queues: u16::from(cpus),
    };
    let block = Block::new(backend, &opts);
    let shared = (block.backend(), block.counters());
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

/// Attaches to the TAP of `net`.
fn open_tap(net: &NetConfig) -> Result<Tap, Error> {
    Tap::open(&net.tap).map_err(|source| Error::Net {
        tap: net.tap.clone(),
        source,
    })
}

/// Adds a virtio-net PCI device on `tap` for `net`.
fn attach_net(vm: &Vm, pci: &mut PciRoot, net: &NetConfig, tap: Tap) -> Result<NetHandle, Error> {
    let device = Net::new(Arc::new(tap), net.mac.0);
    let handle = device.handle();
    let sink = vm.irq_router().msi_sink(3)?;
    let bar = pci.allocate_bar(virtio_pci::BAR_SIZE)?;
    let dev = VirtioPciDevice::new(
        Box::new(device),
        vm.memory().clone(),
        bar,
        Box::new(sink),
        Some(vm.fd().clone()),
    )?;
    let slot = pci.add_device(Arc::new(Mutex::new(dev)))?;
    tracing::info!(tap = %net.tap, mac = %net.mac, slot, "virtio-net attached");
    Ok(handle)
}

/// Builds the VM described by `cfg` and starts its vCPUs.
pub fn start(cfg: &VmConfig) -> Result<RunningVm, Error> {
    build(cfg, None)
}

/// What a restored VM gets instead of a boot: memory and device and vCPU state from a snapshot.
pub trait Restorer {
    /// Guest memory, with the snapshot's contents.
    fn memory(&mut self) -> Result<vm_memory::GuestMemoryMmap, String>;
    /// Interrupt controllers, PIT and clock.
    fn vm(&self, vm: &Vm) -> Result<(), String>;
    /// The serial port's registers.
    fn serial(&self, serial: &mut SerialDevice) -> Result<(), String>;
    /// PCI devices (configuration space, BAR registers, virtio queues).
    fn devices(&self, pci: &mut PciRoot) -> Result<(), String>;
    /// One vCPU's registers and LAPIC.
    fn vcpu(&self, index: u8, fd: &kvm_ioctls::VcpuFd) -> Result<(), String>;
}

/// Builds the VM of `cfg`: booted from its kernel, or from `restore` (left paused).
pub fn build(cfg: &VmConfig, mut restore: Option<&mut dyn Restorer>) -> Result<RunningVm, Error> {
    // Everything the user can get wrong is checked before KVM is touched.
    cfg.validate(u32::from(MAX_CPUS))?;
    if restore.is_none() {
        boot::check_kernel(&cfg.kernel)?;
    }
    let backends = cfg
        .disks
        .iter()
        .map(open_backend)
        .collect::<Result<Vec<_>, _>>()?;
    let taps = cfg
        .nets
        .iter()
        .map(open_tap)
        .collect::<Result<Vec<_>, _>>()?;
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    cfg.check_cpus(kvm.get_max_vcpus() as u32)?;

    let memory = match restore.as_deref_mut() {
        Some(r) => r.memory().map_err(Error::Restore)?,
        None => vm::create_guest_memory(cfg.memory)?,
    };
    let vm = Arc::new(Vm::new(&kvm, memory)?);
    if let Some(r) = restore.as_deref() {
        r.vm(&vm).map_err(Error::Restore)?;
    }
    let (tx, events) = channel();
    let exit = ExitHandle::new(tx);
    let (pio, serial) = legacy_devices(&vm, &exit, serial_out(&cfg.serial)?)?;
    if let Some(r) = restore.as_deref() {
        r.serial(&mut serial.lock().unwrap_or_else(|e| e.into_inner()))
            .map_err(Error::Restore)?;
    }
    let power_button = PowerButton::new(vm.fd())?;
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
    let mut nets = CloseOnError(Vec::with_capacity(cfg.nets.len()));
    for (net, tap) in cfg.nets.iter().zip(taps) {
        nets.0.push(attach_net(
            &vm,
            &mut pci.lock().unwrap_or_else(|e| e.into_inner()),
            net,
            tap,
        )?);
    }
    let buses = Buses {
        pio: Arc::new(pio),
        mmio,
    };
    if let Some(r) = restore.as_deref() {
        let mut root = pci.lock().unwrap_or_else(|e| e.into_inner());
        r.devices(&mut root).map_err(Error::Restore)?;
        // A restored VM starts paused as a whole: a device that does not wait for its driver
        // (a network device receiving) must not write guest memory until it is resumed.
        for (slot, dev) in root.devices() {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .pause()
                .map_err(|e| Error::Restore(format!("PCI slot {slot}: {e}")))?;
        }
    }

    // Firmware tables and the kernel (a restored VM has them in memory already).
    let boot_mode = if restore.is_none() {
        let rsdp = acpi::write_tables(vm.memory(), cfg.cpus)?;
        bios::write_reset_stub(vm.memory()).map_err(acpi::Error::Write)?;
        let mode = boot::load(
            vm.memory(),
            &BootPayload {
                kernel: &cfg.kernel,
                initramfs: cfg.initramfs.as_deref(),
                cmdline: &cfg.cmdline,
                mem_size: cfg.memory,
                rsdp,
            },
        )?;
        tracing::info!(boot_mode = ?mode, cpus = cfg.cpus, memory = cfg.memory, "booting");
        Some(mode)
    } else {
        None
    };

    // vCPUs: all configured before any runs, so a failure leaves nothing half-started.
    let supported = vcpu::supported_cpuid(&kvm).map_err(Error::Kvm)?;
    let policy = CpuidPolicy::default();
    let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
    for index in 0..cfg.cpus {
        let boot = boot_mode
            .filter(|_| index == 0)
            .map(|mode| (mode, vm.memory()));
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
    if let Some(r) = restore.as_deref() {
        for v in &vcpus {
            r.vcpu(v.index(), v.fd()).map_err(Error::Restore)?;
        }
    }
    let control = Arc::new(
        if restore.is_some() {
            VcpuControl::paused()
        } else {
            VcpuControl::new()
        }
        .map_err(host("vCPU signals"))?,
    );
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        // Each vCPU thread keeps the VM (and so guest memory) alive while it may still run.
        let vm = vm.clone();
        let ctl = control.clone();
        control
            .spawn(format!("vcpu{index}"), move || {
                vcpu.run(&ctl);
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
        events: Some(events),
        serial,
        vm,
        control,
        _terminal: terminal,
        power_button,
        pci,
        disks,
        nets: std::mem::take(&mut nets.0),
    })
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
