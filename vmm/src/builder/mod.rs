//! Building a VM, in two shapes over the same steps ([`steps`]): a cold boot, read top to
//! bottom in [`build_for_boot`] (after Firecracker's `build_microvm_for_boot`), and a snapshot
//! restore in [`crate::snapshot::restore`].
//!
//! Boot: check the configuration and open what it names (disks, TAPs, /dev/kvm) → guest memory
//! → the KVM VM → devices (legacy, PCI, virtio) → ACPI tables, reset stub and the kernel → vCPUs
//! → run.

pub mod step_timer;
pub mod steps;

use std::io;

use crate::arch::{acpi, bios};
use crate::boot::{self, BootPayload};
use crate::config::{self, ConfigError, VmConfig, MAX_CPUS};
use crate::devices::bus;
use crate::devices::ged;
use crate::devices::pci;
use crate::devices::virtio::net::tap::TapError;
use crate::devices::virtio::pci as virtio_pci;
use crate::running::RunningVm;
use crate::vstate::irq_routing;
use crate::vstate::vcpu;
use crate::vstate::vm;
use vm_memory::GuestMemoryMmap;

use self::steps::{
    attach_devices, create_vcpus, create_vm, exit_channel, start, vcpu_control, HostResources,
};

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
    /// The ACPI power button could not be wired.
    #[error(transparent)]
    PowerButton(#[from] ged::Error),
    /// A disk image could not be opened.
    #[error("disk {}: {source}", path.display())]
    Disk {
        /// The image given with --disk.
        path: std::path::PathBuf,
        /// Why it could not be opened.
        source: block::OpenError,
    },
    /// A TAP interface could not be opened.
    #[error("net {tap}: {source}")]
    Net {
        /// The interface given with --net.
        tap: String,
        /// Why it could not be opened.
        source: TapError,
    },
    /// The vsock device's socket could not be bound.
    #[error("vsock socket {source}")]
    Vsock {
        /// The socket given with --vsock.
        path: std::path::PathBuf,
        /// Why it could not be bound.
        source: crate::unix_socket::BindError,
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
        if let Error::Vsock { source, .. } = self {
            return match source {
                crate::unix_socket::BindError::Io { source, .. } => matches!(
                    source.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ),
                _ => true,
            };
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
                | Error::Boot(boot::Error::NotFirmware(_))
        )
    }
}

/// Builds the VM described by `cfg` and boots it: its vCPUs run when this returns.
pub fn build_for_boot(cfg: &VmConfig) -> Result<RunningVm, Error> {
    let mut timer = step_timer::StepTimer::new("boot");
    // Everything the user can get wrong is checked before KVM is touched.
    config::validate(cfg, u32::from(MAX_CPUS))?;
    match &cfg.firmware {
        Some(firmware) => boot::check_firmware(firmware)?,
        None => boot::check_kernel(&cfg.kernel)?,
    }
    let host = HostResources::open(cfg)?;
    timer.step("checks_and_files");
    let (memory, reclaim) = vm::create_guest_memory(cfg.memory)?;
    // A boot that fails from here gives the memory back: the process may be asked again.
    let running = boot_on(cfg, host, memory, &mut timer).inspect_err(|_| {
        reclaim.release();
    })?;
    timer.done();
    Ok(running)
}

/// The VM of `cfg` on `memory`, loaded and started.
fn boot_on(
    cfg: &VmConfig,
    host: HostResources,
    memory: GuestMemoryMmap,
    timer: &mut step_timer::StepTimer,
) -> Result<RunningVm, Error> {
    let vm = create_vm(&host.kvm, memory)?;
    timer.step("vm");
    let (exit, events) = exit_channel();
    let (kvm, devices) = attach_devices(&vm, cfg, host, &exit)?;
    timer.step("devices");

    // Firmware tables, the reset stub and the kernel.
    let rsdp = acpi::write_tables(vm.memory(), cfg.cpus)?;
    bios::write_reset_stub(vm.memory()).map_err(acpi::Error::Write)?;
    let mode = boot::load(
        vm.memory(),
        &BootPayload {
            kernel: cfg.boot_image().1,
            firmware: cfg.firmware.is_some(),
            initramfs: cfg.initramfs.as_deref(),
            cmdline: &cfg.cmdline,
            mem_size: cfg.memory,
            rsdp,
        },
    )?;
    tracing::info!(boot_mode = ?mode, cpus = cfg.cpus, memory = cfg.memory, "booting");
    timer.step("load");

    let vcpus = create_vcpus(&kvm, &vm, cfg.cpus, Some(mode), &devices, &exit)?;
    timer.step("vcpus");
    let running = start(
        cfg,
        std::sync::Arc::new(vm),
        devices,
        vcpus,
        vcpu_control(false)?,
        exit,
        events,
    )?;
    timer.step("start");
    Ok(running)
}
