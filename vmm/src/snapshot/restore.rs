//! Rebuilding a saved VM (after Firecracker's `build_microvm_from_snapshot`): the same steps as
//! a boot ([`crate::builder::steps`]), with guest memory mapped from the snapshot instead of
//! filled by a kernel loader, and each piece given its saved state before anything runs.

use std::path::Path;
use std::sync::Arc;

use super::{load, memory, Error, MEMORY_FILE};
use crate::builder::steps::{
    attach_devices, create_vcpus, create_vm, exit_channel, start, vcpu_control, HostResources,
};
use crate::config::{self, VmConfig, MAX_CPUS};
use crate::persist::Persist;
use crate::running::{pause_devices, RunningVm};

/// Rebuilds the VM saved in `dir`; it is left paused.
pub fn restore(dir: &Path) -> Result<(VmConfig, RunningVm), Error> {
    let state = load(dir)?;
    let cfg = &state.config;
    config::validate(cfg, u32::from(MAX_CPUS)).map_err(crate::builder::Error::from)?;
    let host = HostResources::open(cfg)?;
    let memory = memory::restore(&dir.join(MEMORY_FILE), &state.memory)?;
    let mut vm = create_vm(&host.kvm, memory)?;
    vm.restore(&state.vm)
        .map_err(|e| Error::restore("interrupt controllers and clock")(e.into()))?;
    let (exit, events) = exit_channel();
    let (kvm, devices) = attach_devices(&vm, cfg, host, &exit)?;
    // A restored VM starts paused as a whole, its devices paused before their registers are
    // replayed: a device activated by the replay must not serve its queues yet (a network
    // device would receive), and above all must not raise an interrupt before the vCPUs' local
    // APICs are loaded, which would drop it for good.
    pause_devices(&devices.pci).map_err(|e| Error::restore("device quiescence")(e.into()))?;

    // The vCPUs' state before anything may interrupt them: the serial port re-raises an
    // interrupt that was pending when the snapshot was taken.
    let vcpus = create_vcpus(&kvm, &vm, cfg.cpus, None, &devices, &exit)?;
    for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
        saved
            .restore(vcpu.fd())
            .map_err(|e| Error::restore("vCPU registers")(e.into()))?;
    }
    devices
        .serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore(&state.serial)
        .map_err(|e| Error::restore("the serial port")(e.into()))?;
    devices
        .pci
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore(&state.pci)
        .map_err(|e| Error::restore("PCI devices")(e.into()))?;
    let running = start(
        cfg,
        Arc::new(vm),
        devices,
        vcpus,
        vcpu_control(true)?,
        exit,
        events,
    )?;
    Ok((state.config.clone(), running))
}
