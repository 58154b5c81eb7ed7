//! The scheduler: places unplaced (and Lost) VMs on Ready workers.

use super::placement::{needs_placement, Placement};
use super::Controller;
use crate::model::{VmSpec, VmState, WorkerSpec};
use crate::store::{keys, Store, StoreError};

pub struct Scheduler;

impl Controller for Scheduler {
    const NAME: &'static str = "scheduler";

    fn watches(&self) -> Vec<String> {
        vec![keys::kind_prefix("vm"), keys::kind_prefix("worker")]
    }

    async fn reconcile(&self, store: &Store) -> Result<(), StoreError> {
        let (workers, _) = store.list::<WorkerSpec>().await?;
        let (vms, _) = store.list::<VmSpec>().await?;
        let mut placement = Placement::new(&workers, &vms);
        let mut waiting: Vec<_> = vms.iter().filter(|vm| needs_placement(vm)).collect();
        // Oldest first, so a stream of new VMs cannot starve an old one.
        waiting.sort_by(|a, b| {
            (&a.metadata.creation_timestamp, &a.metadata.name)
                .cmp(&(&b.metadata.creation_timestamp, &b.metadata.name))
        });
        for vm in waiting {
            let name = vm.name();
            let result = match placement.choose(vm).map(str::to_string) {
                Some(worker) => {
                    let r = store
                        .update::<VmSpec, _>(name, |o| {
                            // Place only what was decided on: the same needs, still unplaced.
                            if needs_placement(o) && o.spec == vm.spec {
                                o.status.placement = Some(worker.clone());
                                o.status.state = VmState::Scheduled;
                                o.status.message = None;
                                o.status.ip = None;
                                o.status.boot_time = None;
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
                None => {
                    let why = format!(
                        "no Ready worker has {} CPUs and {} memory free",
                        vm.spec.cpus, vm.spec.memory
                    );
                    store
                        .update::<VmSpec, _>(name, |o| {
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
