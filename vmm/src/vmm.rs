//! The VMM: one VM's lifecycle as a state machine, driven by the command line and the API
//! ([`VmControl`]). A watcher thread per booted VM turns the guest's own exits (poweroff,
//! reset, panic, errors) into the `Shutdown` state.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::builder;
use crate::config::{self, VmConfig, MAX_CPUS};
use crate::control::{
    ControlError, DiskCounters, NetCounters, SnapshotType, VmControl, VmInfo, VmState,
};
use crate::devices::VmEvent;
use crate::running::{RunningVm, VmExit};

/// How long a new VM's watcher waits before it trims the heap ([`crate::heap`]): long enough
/// that the request which built the VM has been answered.
const TRIM_DELAY: Duration = Duration::from_millis(250);

struct Inner {
    state: VmState,
    config: Option<VmConfig>,
    vm: Option<RunningVm>,
    exit: Option<VmExit>,
    /// Why the VMM paused the VM itself (a device stalled), until it is resumed.
    pause_reason: Option<String>,
    /// Incremented per boot, so a watcher of an earlier boot (before a reboot) is ignored.
    generation: u64,
    /// The snapshot a diff snapshot of this VM goes on top of: its last snapshot or restore.
    snapshot_base: Option<PathBuf>,
}

/// The VMM of one process.
pub struct Vmm {
    inner: Mutex<Inner>,
    changed: Condvar,
    this: std::sync::Weak<Vmm>,
}

fn conflict(state: VmState, what: &str) -> ControlError {
    ControlError::Conflict(format!("cannot {what}: the VM is {}", state.describe()))
}

fn exit_text(e: &VmExit) -> String {
    match e {
        VmExit::PowerOff => "guest powered off".into(),
        VmExit::Reset(why) => format!("guest reset ({why})"),
        VmExit::Panic => "guest kernel panicked".into(),
        VmExit::Error(msg) => msg.clone(),
    }
}

impl Vmm {
    /// A VMM without a VM.
    pub fn new() -> Arc<Vmm> {
        Arc::new_cyclic(|this| Vmm {
            inner: Mutex::new(Inner {
                state: VmState::NotCreated,
                config: None,
                vm: None,
                exit: None,
                pause_reason: None,
                generation: 0,
                snapshot_base: None,
            }),
            changed: Condvar::new(),
            this: this.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates and boots the VM of the command line.
    pub fn boot_from_config(&self, config: VmConfig) -> Result<(), ControlError> {
        self.create(config)?;
        self.boot()
    }

    /// Blocks until the VM has ended and says how.
    pub fn wait_exit(&self) -> VmExit {
        let mut g = self.lock();
        while g.state != VmState::Shutdown {
            g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.exit
            .clone()
            .unwrap_or_else(|| VmExit::Error("VM ended".into()))
    }

    /// Starts the VM of the stored configuration (the caller checked the state).
    fn start(&self, g: &mut Inner) -> Result<(), ControlError> {
        let config = g
            .config
            .clone()
            .ok_or_else(|| ControlError::Conflict("no configuration".into()))?;
        let mut vm = builder::build_for_boot(&config).map_err(|e| {
            if e.is_bad_input() {
                ControlError::BadRequest(e.to_string())
            } else {
                ControlError::Internal(e.to_string())
            }
        })?;
        g.generation += 1;
        if let Some(rx) = vm.take_events() {
            self.watch(rx, g.generation);
        }
        g.vm = Some(vm);
        g.state = VmState::Running;
        g.pause_reason = None;
        // A new boot's memory has nothing to do with a snapshot taken before.
        g.snapshot_base = None;
        self.changed.notify_all();
        Ok(())
    }

    /// Pauses the VM of `generation` on stalls, and turns its first other event into its end.
    fn watch(&self, rx: Receiver<VmEvent>, generation: u64) {
        let this = self.this.clone();
        let spawned = crate::threads::builder("vm-watch").spawn(move || {
            // The VM was just built: the build's freed memory goes back to the kernel here, off
            // the path of the request that boots or restores it, and not at once: on a host
            // with one free CPU this new thread runs as soon as it exists, and a trim then
            // (3 ms in the test host) would still hold up that request's answer.
            let mut trimmed = false;
            loop {
                let received = if trimmed {
                    rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                } else {
                    rx.recv_timeout(TRIM_DELAY)
                };
                let event = match received {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => {
                        trimmed = true;
                        crate::heap::release_free();
                        continue;
                    }
                    // The VM was torn down by us (reboot, hard stop); nothing to report.
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                let Some(vmm) = this.upgrade() else { return };
                match event {
                    VmEvent::Stall(reason) => vmm.stalled(generation, reason),
                    event => return vmm.ended(generation, VmExit::from(event)),
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot watch the VM: {e}");
        }
    }

    /// Pauses the VM of `generation` because a device cannot go on (`reason`), until `resume`.
    fn stalled(&self, generation: u64, reason: String) {
        let mut g = self.lock();
        if g.generation != generation {
            return;
        }
        if g.state == VmState::Paused {
            // Paused already (by the user, or an earlier stall): the first reason stands.
            g.pause_reason.get_or_insert(reason);
            return;
        }
        let Some(vm) = g.vm.as_ref().filter(|_| g.state == VmState::Running) else {
            return;
        };
        tracing::warn!("pausing the VM: {reason}");
        match vm.pause() {
            Ok(()) => {
                g.state = VmState::Paused;
                g.pause_reason = Some(reason);
                self.changed.notify_all();
            }
            Err(e) => tracing::error!("cannot pause the VM after {reason}: {e}"),
        }
    }

    /// Records that the VM of `generation` ended with `exit`, stopping what is left of it.
    fn ended(&self, generation: u64, exit: VmExit) {
        let mut g = self.lock();
        if g.generation != generation || g.state == VmState::Shutdown {
            return;
        }
        if let Some(vm) = g.vm.take() {
            vm.finish();
        }
        tracing::info!("VM ended: {}", exit_text(&exit));
        g.exit = Some(exit);
        g.state = VmState::Shutdown;
        self.changed.notify_all();
    }

    /// Stops the VM now (hard), recording `exit`.
    fn stop_now(&self, g: &mut Inner, exit: VmExit) {
        if let Some(vm) = g.vm.take() {
            vm.finish();
        }
        g.exit = Some(exit);
        g.state = VmState::Shutdown;
        self.changed.notify_all();
    }
}

impl VmControl for Vmm {
    fn create(&self, config: VmConfig) -> Result<(), ControlError> {
        let mut g = self.lock();
        match g.state {
            VmState::NotCreated | VmState::Created => {}
            s => return Err(conflict(s, "create")),
        }
        config::validate(&config, u32::from(MAX_CPUS))
            .map_err(|e| ControlError::BadRequest(e.to_string()))?;
        g.config = Some(config);
        g.state = VmState::Created;
        Ok(())
    }

    fn boot(&self) -> Result<(), ControlError> {
        let mut g = self.lock();
        match g.state {
            VmState::Created => self.start(&mut g),
            s => Err(conflict(s, "boot")),
        }
    }

    fn shutdown(&self, timeout_ms: u64) -> Result<(), ControlError> {
        let mut g = self.lock();
        let vm = match (g.state, g.vm.as_ref()) {
            (VmState::Running | VmState::Paused, Some(vm)) => vm,
            (s, _) => return Err(conflict(s, "shut down")),
        };
        if vm.is_paused() {
            vm.resume();
        }
        let pressed = vm.power_button();
        if let Err(e) = &pressed {
            tracing::warn!("power button: {e}; stopping the VM");
        }
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        while pressed.is_ok() && g.state != VmState::Shutdown {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if g.state != VmState::Shutdown {
            tracing::info!("guest did not power off within {timeout_ms} ms: stopping it");
            self.stop_now(
                &mut g,
                VmExit::Error(format!(
                    "stopped by the API: the guest did not power off within {timeout_ms} ms"
                )),
            );
        }
        Ok(())
    }

    fn reboot(&self) -> Result<(), ControlError> {
        let mut g = self.lock();
        match g.state {
            VmState::Running | VmState::Paused => {}
            s => return Err(conflict(s, "reboot")),
        }
        if let Some(vm) = g.vm.take() {
            vm.finish();
            // Images must be closed (their locks released) before they are opened again.
            drop(vm);
        }
        self.start(&mut g)
    }

    fn pause(&self) -> Result<(), ControlError> {
        let mut g = self.lock();
        match (g.state, g.vm.as_ref()) {
            (VmState::Running, Some(vm)) => {
                vm.pause()
                    .map_err(|e| ControlError::Internal(e.to_string()))?;
                g.state = VmState::Paused;
                Ok(())
            }
            (s, _) => Err(conflict(s, "pause")),
        }
    }

    fn resume(&self) -> Result<(), ControlError> {
        let mut g = self.lock();
        match (g.state, g.vm.as_ref()) {
            (VmState::Paused, Some(vm)) => {
                vm.resume();
                if let Some(why) = g.pause_reason.take() {
                    tracing::info!("resumed after: {why}");
                }
                g.state = VmState::Running;
                Ok(())
            }
            (s, _) => Err(conflict(s, "resume")),
        }
    }

    fn info(&self) -> VmInfo {
        let g = self.lock();
        let disks = match (&g.vm, &g.config) {
            (Some(vm), Some(cfg)) => vm
                .disk_counters()
                .into_iter()
                .zip(&cfg.disks)
                .map(|(c, d)| DiskCounters {
                    path: d.path.clone(),
                    ..c
                })
                .collect(),
            _ => Vec::new(),
        };
        let nets = match (&g.vm, &g.config) {
            (Some(vm), Some(cfg)) => vm
                .net_counters()
                .into_iter()
                .zip(&cfg.nets)
                .map(|(c, n)| NetCounters {
                    tap: n.tap.clone(),
                    ..c
                })
                .collect(),
            _ => Vec::new(),
        };
        VmInfo {
            state: g.state,
            config: g.config.clone(),
            disks,
            nets,
            exit_reason: g.exit.as_ref().map(exit_text),
            pause_reason: g.pause_reason.clone(),
        }
    }

    fn snapshot(&self, dir: PathBuf, kind: SnapshotType) -> Result<(), ControlError> {
        let mut g = self.lock();
        match (g.state, g.vm.as_ref(), g.config.as_ref()) {
            // Requests waiting for the host would be lost: the snapshot has no place for them.
            (VmState::Paused, Some(_), Some(_)) if g.pause_reason.is_some() => {
                Err(ControlError::Conflict(format!(
                    "cannot snapshot while {} waits: resume the VM first",
                    g.pause_reason.as_deref().unwrap_or("a device")
                )))
            }
            (VmState::Paused, Some(vm), Some(cfg)) => {
                let base = match (kind, &g.snapshot_base) {
                    (SnapshotType::Full, _) => None,
                    (SnapshotType::Diff, Some(base)) => Some(base.as_path()),
                    (SnapshotType::Diff, None) => {
                        return Err(ControlError::Conflict(
                            "cannot take a diff snapshot: this VM has no base (it was not \
                             snapshotted or restored since it booted, or this host cannot track \
                             written pages): take a full snapshot first"
                                .into(),
                        ))
                    }
                };
                let next = crate::snapshot::save(vm, cfg, &dir, base)?;
                g.snapshot_base = next;
                Ok(())
            }
            (s, _, _) => Err(conflict(s, "snapshot (pause the VM first)")),
        }
    }

    fn restore(&self, dir: PathBuf, resume: bool) -> Result<(), ControlError> {
        let mut g = self.lock();
        match g.state {
            VmState::NotCreated => {}
            s => return Err(conflict(s, "restore into this process")),
        }
        let (config, mut vm, base) = crate::snapshot::restore(&dir)?;
        g.snapshot_base = base;
        g.generation += 1;
        if let Some(rx) = vm.take_events() {
            self.watch(rx, g.generation);
        }
        g.config = Some(config);
        g.state = VmState::Paused;
        if resume {
            vm.resume();
            g.state = VmState::Running;
        }
        g.vm = Some(vm);
        self.changed.notify_all();
        Ok(())
    }
}
