//! Worker health: a worker's state follows its agent's heartbeat key (attached to the agent's
//! lease); VMs on a worker that is gone are marked Lost, which the scheduler places again.

use std::collections::{BTreeMap, BTreeSet};

use super::placement::holds_resources;
use super::Controller;
use crate::model::{VmSpec, VmState, Worker, WorkerSpec, WorkerState, WorkerStatus};
use crate::store::{keys, Entry, Store, StoreError};

pub struct WorkerHealth;

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
        let (vms, _) = store.list::<VmSpec>().await?;
        let beats: BTreeMap<&str, &Entry> = beats
            .iter()
            .filter_map(|e| Some((keys::name_of(&e.key, keys::HEARTBEAT_PREFIX)?, e)))
            .collect();
        let mut alive = BTreeSet::new();
        for worker in &workers {
            let name = worker.name();
            let placed = vms
                .iter()
                .filter(|vm| holds_resources(vm) && vm.status.placement.as_deref() == Some(name))
                .count();
            let status = desired_status(worker, beats.get(name).copied(), placed);
            if status.state != WorkerState::NotReady {
                alive.insert(name);
            }
            if status != worker.status {
                let r = store
                    .update::<WorkerSpec, _>(name, |o| {
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
        for vm in vms.iter().filter(|vm| holds_resources(vm)) {
            let Some(worker) = vm.status.placement.as_deref() else {
                continue;
            };
            if alive.contains(worker) {
                continue;
            }
            let why = if workers.iter().any(|w| w.name() == worker) {
                format!("worker {worker} is NotReady: its lease expired")
            } else {
                format!("worker {worker} does not exist")
            };
            let r = store
                .update::<VmSpec, _>(vm.name(), |o| {
                    if o.status.placement.as_deref() == Some(worker)
                        && o.status.state != VmState::Lost
                    {
                        o.status.state = VmState::Lost;
                        o.status.message = Some(why.clone());
                    }
                    Ok(())
                })
                .await;
            match r {
                Ok(_) => tracing::warn!(vm = vm.name(), worker, "lost"),
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A worker's status as its heartbeat and the VMs on it say it should be.
fn desired_status(worker: &Worker, heartbeat: Option<&Entry>, placed: usize) -> WorkerStatus {
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
