//! Where a VM should go: a pure function of the workers and the VMs already placed.

use std::collections::BTreeMap;

use crate::model::{scale_group, Vm, VmState, Worker, WorkerState};

/// What is left on each schedulable worker.
#[derive(Debug, Clone)]
pub struct Placement {
    workers: BTreeMap<String, Room>,
}

#[derive(Debug, Clone, Default)]
struct Room {
    free_cpus: i64,
    free_memory: i64,
    /// VMs per scale group already placed here.
    groups: BTreeMap<String, u32>,
}

/// Whether a VM holds resources on its worker: every placed VM does, Lost ones included (their
/// worker may still run them).
pub fn holds_resources(vm: &Vm) -> bool {
    vm.status.placement.is_some()
}

/// Whether the scheduler should place the VM. A Lost VM without a placement lost its disks with
/// a forgotten worker: it waits for an operator (`vm start --fresh-disks`), never placed silently.
pub fn needs_placement(vm: &Vm) -> bool {
    vm.status.placement.is_none() && vm.status.state != VmState::Lost
}

impl Placement {
    /// Ready workers that are not draining, minus what the VMs placed on them take.
    pub fn new(workers: &[Worker], vms: &[Vm]) -> Placement {
        let mut rooms: BTreeMap<String, Room> = workers
            .iter()
            .filter(|w| w.status.state == WorkerState::Ready && !w.spec.drain && !w.spec.forgotten)
            .map(|w| {
                let room = Room {
                    free_cpus: i64::from(w.spec.capacity.cpus),
                    free_memory: mem(w.spec.capacity.memory.bytes()),
                    groups: BTreeMap::new(),
                };
                (w.metadata.name.clone(), room)
            })
            .collect();
        for vm in vms.iter().filter(|vm| holds_resources(vm)) {
            if let Some(room) = vm.status.placement.as_ref().and_then(|w| rooms.get_mut(w)) {
                room.take(vm);
            }
        }
        Placement { workers: rooms }
    }

    /// The worker for `vm`: among those with room for it, the one with the fewest VMs of its
    /// scale group (spreading replicas), then the most free memory, then the most free CPUs,
    /// then the first by name (so the choice is deterministic).
    pub fn choose(&self, vm: &Vm) -> Option<&str> {
        self.choose_among(vm, |_| true)
    }

    /// Like [`Placement::choose`], among the workers `allowed` accepts.
    pub fn choose_among(&self, vm: &Vm, allowed: impl Fn(&str) -> bool) -> Option<&str> {
        let group = scale_group(&vm.metadata.name, &vm.spec);
        let cpus = i64::from(vm.spec.cpus);
        let memory = mem(vm.spec.memory.bytes());
        self.workers
            .iter()
            .filter(|(name, r)| r.free_cpus >= cpus && r.free_memory >= memory && allowed(name))
            .min_by(|(an, a), (bn, b)| {
                let ag = a.groups.get(group).copied().unwrap_or(0);
                let bg = b.groups.get(group).copied().unwrap_or(0);
                ag.cmp(&bg)
                    .then(b.free_memory.cmp(&a.free_memory))
                    .then(b.free_cpus.cmp(&a.free_cpus))
                    .then(an.cmp(bn))
            })
            .map(|(name, _)| name.as_str())
    }

    /// Records that `vm` now runs on `worker`.
    pub fn assign(&mut self, vm: &Vm, worker: &str) {
        if let Some(room) = self.workers.get_mut(worker) {
            room.take(vm);
        }
    }
}

impl Room {
    fn take(&mut self, vm: &Vm) {
        self.free_cpus -= i64::from(vm.spec.cpus);
        self.free_memory -= mem(vm.spec.memory.bytes());
        let group = scale_group(&vm.metadata.name, &vm.spec).to_string();
        *self.groups.entry(group).or_default() += 1;
    }
}

fn mem(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        ByteSize, Capacity, Metadata, Object, VmSpec, VmStatus, WorkerSpec, WorkerStatus,
    };

    fn worker(name: &str, cpus: u32, mem_mib: u64, state: WorkerState) -> Worker {
        Object {
            metadata: Metadata {
                name: name.into(),
                ..Metadata::default()
            },
            spec: WorkerSpec {
                capacity: Capacity {
                    cpus,
                    memory: ByteSize::mib(mem_mib),
                },
                labels: Default::default(),
                drain: false,
                forgotten: false,
                endpoint: None,
            },
            status: WorkerStatus {
                state,
                ..WorkerStatus::default()
            },
        }
    }

    fn vm(name: &str, cpus: u32, mem_mib: u64, on: Option<&str>) -> Vm {
        Object {
            metadata: Metadata {
                name: name.into(),
                ..Metadata::default()
            },
            spec: VmSpec {
                cpus,
                memory: ByteSize::mib(mem_mib),
                image: "base".into(),
                volumes: vec![],
                network: "default".into(),
                group: None,
                labels: Default::default(),
                cmdline: None,
                power: Default::default(),
            },
            status: VmStatus {
                placement: on.map(str::to_string),
                state: if on.is_some() {
                    VmState::Running
                } else {
                    VmState::Pending
                },
                ..VmStatus::default()
            },
        }
    }

    #[test]
    fn only_ready_workers_with_room() {
        let workers = [
            worker("a", 2, 1024, WorkerState::NotReady),
            worker("b", 2, 512, WorkerState::Ready),
            worker("c", 8, 8192, WorkerState::Ready),
        ];
        let placed = [vm("x", 6, 1024, Some("c"))];
        let p = Placement::new(&workers, &placed);
        // c has 2 CPUs and 7 GiB left, b 2 CPUs and 512 MiB: c has more memory.
        assert_eq!(p.choose(&vm("y", 2, 256, None)), Some("c"));
        assert_eq!(p.choose(&vm("y", 3, 256, None)), None);
        assert_eq!(p.choose(&vm("y", 1, 8192, None)), None);
    }

    #[test]
    fn lost_vms_keep_their_room_and_are_not_placed_again() {
        let workers = [worker("a", 2, 1024, WorkerState::Ready)];
        let mut lost = vm("x", 2, 1024, Some("a"));
        lost.status.state = VmState::Lost;
        assert!(!needs_placement(&lost));
        let p = Placement::new(&workers, &[lost.clone()]);
        // Its worker may come back with it still running: its room stays taken.
        assert_eq!(p.choose(&vm("y", 2, 1024, None)), None);
        // Unplaced after its worker was forgotten: it waits for an operator.
        lost.status.placement = None;
        assert!(!needs_placement(&lost));
        assert!(needs_placement(&vm("y", 1, 64, None)));
    }

    #[test]
    fn draining_workers_get_nothing() {
        let mut w = worker("a", 4, 4096, WorkerState::Ready);
        w.spec.drain = true;
        assert_eq!(
            Placement::new(&[w], &[]).choose(&vm("y", 1, 64, None)),
            None
        );
    }

    #[test]
    fn replicas_spread_before_packing() {
        let workers = [
            worker("a", 16, 16384, WorkerState::Ready),
            worker("b", 4, 2048, WorkerState::Ready),
        ];
        let mut p = Placement::new(&workers, &[]);
        let mut on = BTreeMap::<String, Vec<String>>::new();
        for i in 1..=4 {
            let v = vm(&format!("web-{i}"), 1, 256, None);
            let w = p.choose(&v).unwrap().to_string();
            p.assign(&v, &w);
            on.entry(w).or_default().push(v.metadata.name);
        }
        // Without spreading, all four would go to the bigger worker.
        assert_eq!(on["a"], ["web-1", "web-3"]);
        assert_eq!(on["b"], ["web-2", "web-4"]);
        // A VM of another group goes where memory is freest.
        assert_eq!(p.choose(&vm("db", 1, 256, None)), Some("a"));
    }
}
