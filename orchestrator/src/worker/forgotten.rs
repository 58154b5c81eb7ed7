//! A worker an operator forgot (`lightbyte worker forget`) gave its VMs up: they may run
//! elsewhere now, on fresh disks. When its agent comes back it must not run its old copies
//! (two copies of one VM) nor delete them (the operator may want the data): it kills them and
//! moves their directories and volume files to `archive/`, waits until the control plane has
//! taken every VM off this worker, and only then clears the flag and serves again.

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::local::LocalVm;
use super::netdev;
use super::record::Layout;
use crate::model::{VmSpec, WorkerSpec};
use crate::store::{Store, StoreError};

/// Archives everything local and clears the worker's `forgotten` flag, if it is set. Returns
/// false when `shutdown` came first.
pub async fn fence(
    store: &Store,
    layout: &Layout,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<bool, StoreError> {
    let worker = store.get::<WorkerSpec>(name).await?;
    if !worker.spec.forgotten {
        return Ok(true);
    }
    tracing::warn!(
        worker = name,
        "this worker was forgotten: archiving its old VMs instead of running them"
    );
    archive(layout).await;
    loop {
        let (vms, _) = store.list::<VmSpec>().await?;
        let ours = vms.iter().any(|vm| {
            vm.status.placement.as_deref() == Some(name)
                || vm
                    .status
                    .moving
                    .as_ref()
                    .is_some_and(|m| m.from == name || m.to == name)
        });
        if !ours {
            break;
        }
        tracing::info!("waiting for the control plane to take the VMs off this worker");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    store
        .update::<WorkerSpec, _>(name, |o| {
            o.spec.forgotten = false;
            Ok(())
        })
        .await?;
    tracing::info!(worker = name, "old VMs archived; serving again");
    Ok(true)
}

/// Kills every local VM and moves its files under `archive/`.
async fn archive(layout: &Layout) {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let dest = layout.archive_dir().join(stamp);
    if let Err(e) = std::fs::create_dir_all(dest.join("volumes")) {
        tracing::error!(dir = %dest.display(), error = %e, "cannot make the archive directory");
    }
    let (records, _) = layout.load_all().unwrap_or_default();
    for rec in records {
        let mut vm = LocalVm::from_record(rec);
        if let Some(p) = &mut vm.process {
            p.kill();
            p.wait_exit(Duration::from_secs(5)).await;
            tracing::warn!(vm = %vm.rec.name, pid = p.pid, "killed the copy of a forgotten VM");
        }
        if let Err(e) = netdev::delete_tap(&vm.rec.tap).await {
            tracing::warn!(vm = %vm.rec.name, error = %e, "cannot remove TAP");
        }
        let to = dest.join(format!("{}-{}", vm.rec.name, vm.rec.uid));
        move_to(&layout.vm_dir(&vm.rec.name), &to);
    }
    if let Ok(entries) = std::fs::read_dir(layout.volumes_dir()) {
        for e in entries.flatten() {
            move_to(&e.path(), &dest.join("volumes").join(e.file_name()));
        }
    }
    let _ = std::fs::remove_dir_all(layout.root_dir().join("incoming"));
    tracing::warn!(archive = %dest.display(), "old VMs and volumes archived");
}

fn move_to(from: &Path, to: &Path) {
    match super::durable::rename(from, to) {
        Ok(()) => tracing::info!(from = %from.display(), to = %to.display(), "archived"),
        Err(e) => tracing::error!(from = %from.display(), error = %e, "cannot archive"),
    }
}
