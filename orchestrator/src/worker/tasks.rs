//! What the agent does to one VM in the background: start it, power it off keeping its disks,
//! hand it over to a move, stop and remove it. Each task owns the VM while it runs and hands it
//! back (or None when it is gone).

use std::sync::Arc;
use std::time::Duration;

use vmm_api::client::Client;

use super::launch::launch;
use super::local::{write_status, Ctx, LocalVm};
use super::moves::prepare_outgoing;
use super::process::Liveness;
use crate::model::{Vm, VmState};

/// Starts (or restarts) a VM: disks, TAP, `vmm` process, create and boot through its API. When
/// a first start (`fresh`: nothing of it existed here before) fails, everything made is removed
/// and the VM is marked Failed. A failed restart counts as one more crash: the VM keeps its
/// record and disks and is restarted again until the restart budget runs out.
pub(super) async fn start(
    ctx: Arc<Ctx>,
    mut vm: Box<LocalVm>,
    obj: Vm,
    fresh: bool,
) -> Option<Box<LocalVm>> {
    let name = vm.rec.name.clone();
    let uid = vm.rec.uid.clone();
    match launch(&ctx, &mut vm, &obj).await {
        Ok(()) => {
            tracing::info!(vm = %name, pid = vm.process.as_ref().map_or(0, |p| p.pid), "booted");
            vm.down = false;
            Some(vm)
        }
        Err(err) => {
            tracing::warn!(vm = %name, error = %err, "start failed");
            if let Some(p) = &mut vm.process {
                p.kill();
                p.wait_exit(Duration::from_secs(5)).await;
            }
            super::jail::remove_cgroup(ctx.cfg.jail.as_ref(), &ctx.cfg.name, &name).await;
            if let Err(e) = super::firewall::release(ctx.cfg.firewall.as_ref(), &vm.rec.tap).await {
                tracing::warn!(vm = %name, error = %e, "cannot remove TAP");
            }
            if err.is_transient() {
                // Nothing is wrong with the VM: a later pass tries again. A first start drops
                // its record and directory (the disks are remade in milliseconds); a restart
                // keeps everything and is not counted.
                tracing::info!(vm = %name, error = %err, "will retry the start");
                if fresh {
                    let _ = ctx.layout.remove_vm(&name);
                    return None;
                }
                vm.process = None;
                vm.rec.pid = None;
                vm.rec.pid_start = None;
                vm.rec.restarts = vm.rec.restarts.saturating_sub(1);
                let _ = ctx.layout.save(&vm.rec);
                return Some(vm);
            }
            let why = err.to_string();
            if !fresh {
                vm.process = None;
                vm.rec.pid = None;
                vm.rec.pid_start = None;
                vm.last_error = Some(why);
                // The failure counts as the next crash when the agent looks again.
                vm.down = false;
                let _ = ctx.layout.save(&vm.rec);
                return Some(vm);
            }
            if let Err(e) = ctx.layout.remove_vm(&name) {
                tracing::warn!(vm = %name, error = %e, "cannot remove VM directory");
            }
            let r = write_status(&ctx, &name, &uid, |s| {
                s.state = VmState::Failed;
                s.message = Some(why.clone());
                s.ip = None;
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(vm = %name, error = %e, "cannot report failure");
            }
            None
        }
    }
}

/// Powers the guest off: the ACPI power button, then a kill after the stop timeout.
async fn power_off(ctx: &Ctx, vm: &mut LocalVm) {
    let name = vm.rec.name.clone();
    if let Some(p) = &mut vm.process {
        if p.liveness() == Liveness::Alive {
            let timeout = ctx.cfg.stop_timeout;
            let client = Client::new(ctx.layout.socket(&name)).with_timeout(Duration::from_secs(5));
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            if let Err(e) = client.shutdown(Some(ms)).await {
                tracing::warn!(vm = %name, error = %e, "graceful shutdown refused; killing");
            }
            if !p.wait_exit(timeout + Duration::from_secs(2)).await {
                tracing::warn!(vm = %name, "still running after {timeout:?}; killing");
                p.kill();
                p.wait_exit(Duration::from_secs(5)).await;
            }
        }
    }
    vm.process = None;
    vm.up = false;
    vm.agent = None;
    vm.rec.pid = None;
    vm.rec.pid_start = None;
    super::jail::remove_cgroup(ctx.cfg.jail.as_ref(), &ctx.cfg.name, &name).await;
}

/// Powers a VM off and keeps everything, for `vm stop`: it is Stopped here until started again.
pub(super) async fn stop_keep(ctx: Arc<Ctx>, mut vm: Box<LocalVm>) -> Option<Box<LocalVm>> {
    power_off(&ctx, &mut vm).await;
    vm.rec.stopped = true;
    vm.ended = Some((VmState::Stopped, "stopped".into()));
    if let Err(e) = ctx.layout.save(&vm.rec) {
        tracing::warn!(vm = %vm.rec.name, error = %e, "cannot update the VM record");
    }
    tracing::info!(vm = %vm.rec.name, "powered off; disks kept");
    Some(vm)
}

/// Hands a VM over to a move away from here: off, disks checksummed and offered to the target.
/// When that fails the VM stays off and the next pass tries again.
pub(super) async fn surrender(
    ctx: Arc<Ctx>,
    mut vm: Box<LocalVm>,
    obj: Vm,
) -> Option<Box<LocalVm>> {
    power_off(&ctx, &mut vm).await;
    let to = obj.status.moving.as_ref().map_or("?", |m| m.to.as_str());
    vm.rec.stopped = true;
    vm.ended = Some((
        VmState::Stopped,
        format!("off for its move to {to}; disks ready"),
    ));
    // The TAP is not needed while the VM is away (and is made again if it comes back).
    if let Err(e) = super::firewall::release(ctx.cfg.firewall.as_ref(), &vm.rec.tap).await {
        tracing::warn!(vm = %vm.rec.name, error = %e, "cannot remove TAP");
    }
    if let Err(e) = prepare_outgoing(&ctx, &mut vm.rec, &obj).await {
        tracing::warn!(vm = %vm.rec.name, error = %e, "cannot offer the disks for the move yet");
        vm.rec.outgoing = None;
        let _ = ctx.layout.save(&vm.rec);
    }
    Some(vm)
}

/// Stops a VM that is no longer placed here and removes everything it had: power button, then
/// kill after the stop timeout; TAP; directory (root volume, logs, record — last).
pub(super) async fn stop(ctx: Arc<Ctx>, mut vm: Box<LocalVm>) -> Option<Box<LocalVm>> {
    let name = vm.rec.name.clone();
    power_off(&ctx, &mut vm).await;
    if let Err(e) = super::firewall::release(ctx.cfg.firewall.as_ref(), &vm.rec.tap).await {
        tracing::warn!(vm = %name, error = %e, "cannot remove TAP; will retry");
        return Some(vm);
    }
    if let Err(e) = ctx.layout.remove_vm(&name) {
        tracing::warn!(vm = %name, error = %e, "cannot remove the VM directory; will retry");
        return Some(vm);
    }
    tracing::info!(vm = %name, "stopped and removed");
    None
}
