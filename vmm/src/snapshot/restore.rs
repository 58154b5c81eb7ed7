//! Rebuilding a saved VM (after Firecracker's `build_microvm_from_snapshot`): the same steps as
//! a boot ([`crate::builder::steps`]), with guest memory read from the snapshot (and the diffs
//! on it) instead of filled by a kernel loader, and each piece given its saved state before
//! anything runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{lazy, load, mark_clean, memory_layers, Error};
use crate::builder::step_timer::StepTimer;
use crate::builder::steps::{
    attach_devices, create_vcpus, create_vm, exit_channel, start, vcpu_control, HostResources,
};
use crate::config::{self, VmConfig, MAX_CPUS};
use crate::persist::Persist;
use crate::running::{pause_devices, RunningVm};

/// Rebuilds the VM saved in `dir`; it is left paused. Also returns the base for the VM's next
/// diff snapshot: `dir` (absolute), or nothing when the host cannot mark pages clean. A restore
/// that fails once guest memory is made gives the memory back: the process may be asked for
/// another restore.
pub fn restore(dir: &Path) -> Result<(VmConfig, RunningVm, Option<PathBuf>), Error> {
    let mut timer = StepTimer::new("restore");
    let dir = fs::canonicalize(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut state = load(&dir)?;
    timer.step("state");
    let layers = memory_layers(&dir, std::mem::take(&mut state.memory), state.base.take())?;
    timer.step("layers");
    let cfg = &state.config;
    config::validate(cfg, u32::from(MAX_CPUS)).map_err(crate::builder::Error::from)?;
    let host = HostResources::open(cfg)?;
    timer.step("host");
    let (memory, reclaim, loader) = lazy::restore(&layers)?;
    timer.step("memory");
    let mut running = match rebuild(&state, host, memory, &mut timer) {
        Ok(running) => running,
        Err(e) => {
            // Everything `rebuild` made is gone with it; the loader is the last writer.
            if let Some(loader) = &loader {
                loader.cancel();
            }
            reclaim.release();
            return Err(e);
        }
    };
    running.set_memory_loader(loader);
    // Everything read into guest memory so far is the snapshot itself: a diff taken after this
    // restore holds only what changes from here.
    let base = mark_clean().then(|| dir.clone());
    timer.step("start");
    timer.done();
    Ok((state.config.clone(), running, base))
}

/// The VM of `state` on `memory`, each piece given its saved state, started paused.
fn rebuild(
    state: &super::State,
    host: HostResources,
    memory: vm_memory::GuestMemoryMmap,
    timer: &mut StepTimer,
) -> Result<RunningVm, Error> {
    let cfg = &state.config;
    let mut vm = create_vm(&host.kvm, memory)?;
    vm.restore(&state.vm)
        .map_err(|e| Error::restore("interrupt controllers and clock")(e.into()))?;
    timer.step("vm");
    let (exit, events) = exit_channel();
    let (kvm, devices) = attach_devices(&vm, cfg, host, &exit)?;
    timer.step("devices");
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
    timer.step("vcpus");
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
        .map_err(|e| Error::Unfit {
            what: "PCI devices",
            source: e.into(),
        })?;
    timer.step("device_state");
    Ok(start(
        cfg,
        Arc::new(vm),
        devices,
        vcpus,
        vcpu_control(true)?,
        exit,
        events,
    )?)
}
