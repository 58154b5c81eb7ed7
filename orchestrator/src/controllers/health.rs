//! Worker health: a worker's state follows its agent's heartbeat key (attached to the agent's
//! lease). VMs on a worker that is gone are marked Lost but keep their placement: the worker may
//! still run them, and re-adopts them when it comes back. Only an operator's `worker forget`
//! gives them up: then they lose their placement (and volumes their data), and wait as Lost for
//! an operator to accept the loss.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::Controller;
use crate::model::{
    Vm, VmSpec, VmState, VolumeSpec, Worker, WorkerSpec, WorkerState, WorkerStatus,
};
use crate::store::{keys, Entry, Store, StoreError};

/// How often the VMs are checked even when every worker is Ready and none drains (a VM placed
/// on a worker whose object was deleted, say).
const FULL_CHECK: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct WorkerHealth {
    last_full: Mutex<Option<Instant>>,
}

impl Controller for WorkerHealth {
    const NAME: &'static str = "worker-health";

    fn watches(&self) -> Vec<String> {
        vec![
            keys::kind_prefix("worker"),
            keys::kind_prefix("vm"),
            keys::HEARTBEAT_PREFIX.to_string(),
        ]
    }

    async fn reconcile(&self, store: &Store) -> Result<(), StoreError> {
        let (workers, _) = store.list::<WorkerSpec>().await?;
        let (beats, _) = store.list_raw(keys::HEARTBEAT_PREFIX).await?;
        let beats: BTreeMap<&str, &Entry> = beats
            .iter()
            .filter_map(|e| Some((keys::name_of(&e.key, keys::HEARTBEAT_PREFIX)?, e)))
            .collect();
        // The VMs matter only when a worker is gone, forgotten or draining: most passes (a VM
        // changed, every worker fine) need not list them all.
        let due = {
            let mut last = self.last_full.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= FULL_CHECK);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        let needs_vms = due
            || workers.iter().any(|w| {
                w.spec.drain
                    || w.spec.forgotten
                    || !beats.contains_key(w.name())
                    || w.status.state != WorkerState::Ready
            });
        let vms = if needs_vms {
            store.list::<VmSpec>().await?.0
        } else {
            Vec::new()
        };
        let mut on: BTreeMap<&str, usize> = BTreeMap::new();
        for vm in &vms {
            // A moving VM keeps its source busy until the move is over (the source holds its
            // disks until then).
            let source = vm.status.moving.as_ref().map(|m| m.from.as_str());
            let held: BTreeSet<&str> = vm
                .status
                .placement
                .as_deref()
                .into_iter()
                .chain(source)
                .collect();
            for w in held {
                *on.entry(w).or_default() += 1;
            }
        }
        let mut alive = BTreeSet::new();
        let mut forgotten = BTreeSet::new();
        for worker in &workers {
            let name = worker.name();
            let placed = on.get(name).copied().unwrap_or(0);
            let status = desired_status(worker, beats.get(name).copied(), placed);
            match status.state {
                WorkerState::NotReady => {}
                WorkerState::Forgotten => {
                    forgotten.insert(name);
                }
                _ => {
                    alive.insert(name);
                }
            }
            if status != worker.status {
                let r = store
                    .update_from::<WorkerSpec, _>(worker, |o| {
                        o.status = desired_status(o, beats.get(name).copied(), placed);
                        Ok(())
                    })
                    .await;
                match r {
                    Ok(o) => tracing::info!(worker = name, state = %o.status.state, "worker state"),
                    Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Volumes first: whoever sees a VM given up with its forgotten worker then also sees
        // the volumes that were there marked lost (the CLI's `--fresh-disks` advice relies on
        // both).
        if !forgotten.is_empty() {
            forget_volumes(store, &forgotten).await?;
        }
        for vm in &vms {
            let Some(worker) = vm.status.placement.as_deref() else {
                continue;
            };
            if forgotten.contains(worker) {
                give_up(store, vm, worker, &alive).await?;
            } else if !alive.contains(worker) && vm.status.state != VmState::Lost {
                let why = if workers.iter().any(|w| w.name() == worker) {
                    format!("worker {worker} is NotReady: its lease expired")
                } else {
                    format!("worker {worker} does not exist")
                };
                mark_lost(store, vm, worker, why).await?;
            }
        }
        Ok(())
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

async fn mark_lost(store: &Store, vm: &Vm, worker: &str, why: String) -> Result<(), StoreError> {
    let r = store
        .update_from::<VmSpec, _>(vm, |o| {
            if o.status.placement.as_deref() == Some(worker) && o.status.state != VmState::Lost {
                o.status.state = VmState::Lost;
                o.status.message = Some(why.clone());
                o.status.lost_since = Some(now());
            }
            Ok(())
        })
        .await;
    match r {
        Ok(_) => {
            tracing::warn!(vm = vm.name(), worker, "lost");
            Ok(())
        }
        Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Gives up a VM placed on a forgotten worker. One that was moving there goes back to its
/// source, which still has its disks; any other loses its placement and waits as Lost.
async fn give_up(
    store: &Store,
    vm: &Vm,
    worker: &str,
    alive: &BTreeSet<&str>,
) -> Result<(), StoreError> {
    let r = store
        .update_from::<VmSpec, _>(vm, |o| {
            if o.status.placement.as_deref() != Some(worker) {
                return Ok(());
            }
            let back = o
                .status
                .moving
                .as_ref()
                .filter(|m| m.to == worker && alive.contains(m.from.as_str()))
                .map(|m| m.from.clone());
            o.status.moving = None;
            o.status.ip = None;
            o.status.agent = None;
            if let Some(source) = back {
                o.status.message = Some(format!(
                    "worker {worker} was forgotten during its move there: back on {source}, which kept its disks"
                ));
                o.status.placement = Some(source);
                o.status.state = VmState::Scheduled;
                o.status.lost_since = None;
                return Ok(());
            }
            o.status.placement = None;
            o.status.state = VmState::Lost;
            if o.status.lost_since.is_none() {
                o.status.lost_since = Some(now());
            }
            o.status.message = Some(format!(
                "its disks lived only on worker {worker}, which was forgotten: `lightbyte vm start {} --fresh-disks` starts it elsewhere on empty disks, or delete it",
                o.name()
            ));
            Ok(())
        })
        .await;
    match r {
        Ok(o) => {
            tracing::warn!(vm = vm.name(), worker, placement = ?o.status.placement, "given up with a forgotten worker");
            Ok(())
        }
        Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Volumes whose data was on a forgotten worker are marked lost.
async fn forget_volumes(store: &Store, forgotten: &BTreeSet<&str>) -> Result<(), StoreError> {
    let (volumes, _) = store.list::<VolumeSpec>().await?;
    for vol in volumes {
        let Some(w) = vol.status.worker.as_deref() else {
            continue;
        };
        if !forgotten.contains(w) {
            continue;
        }
        let w = w.to_string();
        let r = store
            .update_from::<VolumeSpec, _>(&vol, |o| {
                if o.status.worker.as_deref() == Some(w.as_str()) {
                    o.status.worker = None;
                    o.status.lost = Some(format!(
                        "its data lived only on worker {w}, which was forgotten"
                    ));
                }
                Ok(())
            })
            .await;
        match r {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A worker's status as its heartbeat and the VMs on it say it should be.
fn desired_status(worker: &Worker, heartbeat: Option<&Entry>, placed: usize) -> WorkerStatus {
    if worker.spec.forgotten {
        return WorkerStatus {
            state: WorkerState::Forgotten,
            lease_id: heartbeat.map(|b| b.lease),
            message: Some(if heartbeat.is_some() {
                "forgotten by an operator; its agent is back and archives its old VMs".into()
            } else {
                "forgotten by an operator: its VMs were given up".into()
            }),
        };
    }
    let Some(beat) = heartbeat else {
        return WorkerStatus {
            state: WorkerState::NotReady,
            lease_id: None,
            message: Some("no heartbeat: the agent's lease expired or it never registered".into()),
        };
    };
    let state = match (worker.spec.drain, placed) {
        (false, _) => WorkerState::Ready,
        (true, 0) => WorkerState::Drained,
        (true, _) => WorkerState::Draining,
    };
    WorkerStatus {
        state,
        lease_id: Some(beat.lease),
        message: None,
    }
}
