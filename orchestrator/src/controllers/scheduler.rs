//! The scheduler: places unplaced VMs on Ready workers, on the worker that holds their volumes'
//! data when they have any.

use std::collections::{BTreeMap, BTreeSet};

use super::placement::{needs_placement, Placement};
use super::Controller;
use crate::model::{Vm, VmSpec, VmState, Volume, VolumeSpec, WorkerSpec};
use crate::store::{keys, Store, StoreError};

pub struct Scheduler;

impl Controller for Scheduler {
    const NAME: &'static str = "scheduler";

    fn watches(&self) -> Vec<String> {
        vec![
            keys::kind_prefix("vm"),
            keys::kind_prefix("worker"),
            keys::kind_prefix("volume"),
        ]
    }

    async fn reconcile(&self, store: &Store) -> Result<(), StoreError> {
        let (vms, _) = store.list::<VmSpec>().await?;
        let mut waiting: Vec<_> = vms.iter().filter(|vm| needs_placement(vm)).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let (workers, _) = store.list::<WorkerSpec>().await?;
        let (volumes, _) = store.list::<VolumeSpec>().await?;
        let volumes: BTreeMap<&str, &Volume> = volumes.iter().map(|v| (v.name(), v)).collect();
        let mut placement = Placement::new(&workers, &vms);
        // Oldest first, so a stream of new VMs cannot starve an old one.
        waiting.sort_by(|a, b| {
            (&a.metadata.creation_timestamp, &a.metadata.name)
                .cmp(&(&b.metadata.creation_timestamp, &b.metadata.name))
        });
        for vm in waiting {
            let name = vm.name();
            let choice = match data_home(vm, &volumes) {
                Err(why) => Err(why),
                Ok(Some(home)) => placement
                    .choose_among(vm, |w| w == home)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        format!(
                            "its volumes live on worker {home}, which is not Ready or has no room for {} CPUs and {} memory",
                            vm.spec.cpus, vm.spec.memory
                        )
                    }),
                Ok(None) => placement.choose(vm).map(str::to_string).ok_or_else(|| {
                    format!(
                        "no Ready worker has {} CPUs and {} memory free",
                        vm.spec.cpus, vm.spec.memory
                    )
                }),
            };
            let result = match choice {
                Ok(worker) => {
                    let r = store
                        .update_from::<VmSpec, _>(vm, |o| {
                            // Place only what was decided on: the same needs, still unplaced.
                            if needs_placement(o) && o.spec == vm.spec {
                                o.status.placement = Some(worker.clone());
                                o.status.state = VmState::Scheduled;
                                o.status.message = None;
                                o.status.ip = None;
                                o.status.boot_time = None;
                                o.status.lost_since = None;
                            }
                            Ok(())
                        })
                        .await;
                    if let Ok(o) = &r {
                        if o.status.placement.as_deref() == Some(worker.as_str()) {
                            tracing::info!(vm = name, worker = %worker, "placed");
                            placement.assign(vm, &worker);
                        }
                    }
                    r
                }
                Err(why) => {
                    store
                        .update_from::<VmSpec, _>(vm, |o| {
                            if needs_placement(o) {
                                o.status.message = Some(why.clone());
                            }
                            Ok(())
                        })
                        .await
                }
            };
            match result {
                // Deleted since the list: nothing to place.
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The worker holding the data of the VM's volumes, if any has data yet; an error saying why it
/// cannot be placed when the data is lost or split across workers.
fn data_home<'a>(vm: &Vm, volumes: &BTreeMap<&str, &'a Volume>) -> Result<Option<&'a str>, String> {
    let mut homes = BTreeSet::new();
    for v in &vm.spec.volumes {
        let Some(vol) = volumes.get(v.as_str()) else {
            return Err(format!("volume {v} does not exist"));
        };
        if let Some(lost) = &vol.status.lost {
            return Err(format!(
                "volume {v}: {lost}; `lightbyte vm start {} --fresh-disks` starts it on an empty one",
                vm.name()
            ));
        }
        if let Some(w) = vol.status.worker.as_deref() {
            homes.insert(w);
        }
    }
    match homes.len() {
        0 => Ok(None),
        1 => Ok(homes.pop_first()),
        _ => Err(format!(
            "its volumes live on different workers ({}): no worker has all of them",
            homes.into_iter().collect::<Vec<_>>().join(", ")
        )),
    }
}
