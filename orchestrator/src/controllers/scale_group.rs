//! The scale-group controller: keeps each group's members (VMs it owns) at `replicas`, made from
//! the current template, spread by the scheduler. Failed members are replaced; Lost members
//! without volumes are replaced after the group's grace period; a template change or a draining
//! worker rolls members over surge first (a member is removed only once enough others are
//! Running). Members and member volumes of deleted groups are deleted.
//!
//! A member let go (scale-down, rolling replacement) of a group behind load balancers retires
//! first: it is marked (`status.retiring_since`), load balancers stop sending it requests, and
//! it is deleted once the longest drain grace of those load balancers has passed.
//!
//! Every pass recounts from etcd, so a pass cut short (a leader killed between two creates)
//! leaves nothing for the successor to undo: it counts what exists and makes up the difference.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::Controller;
use crate::model::{
    member_volumes, Condition, LoadBalancerSpec, Metadata, Object, OwnerRef, ScaleGroup,
    ScaleGroupSpec, ScaleGroupStatus, Vm, VmSpec, VmState, Volume, VolumeSpec, VolumeStatus,
    WorkerSpec, SUFFIX_LEN,
};
use crate::store::{keys, Store, StoreError};

#[derive(Default)]
pub struct ScaleGroups {
    /// The soonest a retiring member is due for deletion, as of the last pass.
    next_due: Mutex<Option<SystemTime>>,
}

impl Controller for ScaleGroups {
    const NAME: &'static str = "scale-groups";

    fn watches(&self) -> Vec<String> {
        vec![
            keys::kind_prefix("scalegroup"),
            keys::kind_prefix("vm"),
            keys::kind_prefix("worker"),
            keys::kind_prefix("loadbalancer"),
        ]
    }

    fn wake_after(&self) -> Option<Duration> {
        let due = (*self.next_due.lock().ok()?)?;
        Some(
            due.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(100)),
        )
    }

    async fn reconcile(&self, store: &Store) -> Result<(), StoreError> {
        let (groups, _) = store.list::<ScaleGroupSpec>().await?;
        // Volumes before VMs: a member volume no VM in the later list names is an orphan (its
        // member was deleted, or never created by a pass that died).
        let (volumes, _) = store.list::<VolumeSpec>().await?;
        let (vms, _) = store.list::<VmSpec>().await?;
        collect_volumes(store, &volumes, &vms).await?;
        let (workers, _) = store.list::<WorkerSpec>().await?;
        let leaving: BTreeSet<&str> = workers
            .iter()
            .filter(|w| w.spec.drain || w.spec.forgotten)
            .map(|w| w.name())
            .collect();
        let mut members: BTreeMap<&str, Vec<&Vm>> = BTreeMap::new();
        let mut orphans = Vec::new();
        for vm in &vms {
            let Some(owner) = vm
                .metadata
                .owner
                .as_ref()
                .filter(|o| o.kind == "scalegroup")
            else {
                continue;
            };
            match groups.iter().find(|g| g.metadata.uid == owner.uid) {
                Some(g) => members.entry(g.name()).or_default().push(vm),
                None => orphans.push(vm),
            }
        }
        // A group's members retire for as long as the slowest load balancer in front of it
        // drains.
        let (lbs, _) = store.list::<LoadBalancerSpec>().await?;
        let mut graces: BTreeMap<&str, Duration> = BTreeMap::new();
        for lb in &lbs {
            if let Some(g) = lb.spec.target.group.as_deref() {
                let e = graces.entry(g).or_default();
                *e = (*e).max(lb.spec.drain_grace.duration());
            }
        }
        let now = SystemTime::now();
        let mut next_due = None;
        for group in &groups {
            let mine = members.remove(group.name()).unwrap_or_default();
            let pass = GroupPass {
                store,
                group,
                leaving: &leaving,
                now,
                grace: graces.get(group.name()).copied().unwrap_or_default(),
            };
            if let Some(due) = pass.run(mine).await? {
                next_due = Some(next_due.map_or(due, |d: SystemTime| d.min(due)));
            }
        }
        if let Ok(mut d) = self.next_due.lock() {
            *d = next_due;
        }
        for vm in orphans {
            tracing::info!(vm = vm.name(), "its scale group is gone; deleting");
            delete_member(store, vm).await?;
        }
        Ok(())
    }
}

struct GroupPass<'a> {
    store: &'a Store,
    group: &'a ScaleGroup,
    leaving: &'a BTreeSet<&'a str>,
    now: SystemTime,
    /// How long a member let go retires before it is deleted.
    grace: Duration,
}

impl GroupPass<'_> {
    fn name(&self) -> &str {
        self.group.name()
    }

    fn spec(&self) -> &ScaleGroupSpec {
        &self.group.spec
    }

    /// A member that should be replaced: not made from the current template, or on a worker
    /// that is being vacated.
    fn outdated(&self, vm: &Vm) -> bool {
        vm.spec != self.spec().template.member_spec(self.name(), vm.name())
            || vm
                .status
                .placement
                .as_deref()
                .is_some_and(|w| self.leaving.contains(w))
    }

    /// Lost long enough to be replaced: only members without volumes (a volume's data is on
    /// the lost worker), after the grace period, or at once when the worker was forgotten.
    fn replaceable_lost(&self, vm: &Vm) -> bool {
        if vm.status.state != VmState::Lost || !vm.spec.volumes.is_empty() {
            return false;
        }
        if vm.status.placement.is_none() {
            return true;
        }
        let since = vm
            .status
            .lost_since
            .as_deref()
            .and_then(|s| humantime::parse_rfc3339(s).ok())
            .unwrap_or(self.now);
        self.now.duration_since(since).unwrap_or(Duration::ZERO)
            >= self.spec().replace_lost_after.duration()
    }

    /// When a retiring member is due for deletion: it retires for the group's grace.
    fn retirement_due(&self, vm: &Vm) -> Option<SystemTime> {
        let since = vm.status.retiring_since.as_deref()?;
        let since = humantime::parse_rfc3339(since).unwrap_or(self.now);
        Some(since + self.grace)
    }

    /// Lets a member go: deleted at once when no load balancer needs to drain it, otherwise
    /// marked retiring. Whether it is gone from the group's count.
    async fn retire(&self, vm: &Vm) -> Result<bool, StoreError> {
        if self.grace.is_zero() {
            return delete_member(self.store, vm).await;
        }
        let uid = vm.metadata.uid.clone();
        let since = humantime::format_rfc3339_seconds(self.now).to_string();
        let r = self
            .store
            .update_from::<VmSpec, _>(vm, |o| {
                if o.metadata.uid == uid && o.status.retiring_since.is_none() {
                    o.status.retiring_since = Some(since.clone());
                }
                Ok(())
            })
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reconciles the group's members. The soonest a retiring member is due, if any.
    async fn run(&self, members: Vec<&Vm>) -> Result<Option<SystemTime>, StoreError> {
        let replicas = self.spec().replicas as usize;
        let surge = self.spec().update.max_surge as usize;
        let unavailable = self.spec().update.max_unavailable as usize;
        let mut kept = Vec::new();
        let mut next_due: Option<SystemTime> = None;
        let mut retired = 0usize;
        for vm in members {
            // Retiring members no longer count: their replacements are made meanwhile.
            if let Some(due) = self.retirement_due(vm) {
                if due <= self.now || vm.status.state != VmState::Running {
                    tracing::info!(group = self.name(), vm = vm.name(), "retired; deleting");
                    retired += usize::from(delete_member(self.store, vm).await?);
                } else {
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                }
                continue;
            }
            let why = match vm.status.state {
                VmState::Failed => Some("failed"),
                _ if self.replaceable_lost(vm) => Some("lost past the grace period"),
                _ => None,
            };
            match why {
                Some(why) => {
                    tracing::info!(
                        group = self.name(),
                        vm = vm.name(),
                        "replacing member: {why}"
                    );
                    delete_member(self.store, vm).await?;
                }
                None => kept.push(vm),
            }
        }
        let (outdated, mut current): (Vec<&Vm>, Vec<&Vm>) =
            kept.into_iter().partition(|vm| self.outdated(vm));
        let mut deleted = 0usize;

        // 1. Outdated members that are not ready serve no one: remove them first.
        let (mut outdated_ready, outdated_unready): (Vec<&Vm>, Vec<&Vm>) =
            outdated.into_iter().partition(|vm| ready(vm));
        for vm in outdated_unready {
            tracing::info!(
                group = self.name(),
                vm = vm.name(),
                "removing outdated member that is not ready"
            );
            deleted += usize::from(delete_member(self.store, vm).await?);
        }

        // 2. Scale down: unready members first, then those on the most crowded worker (counted
        //    again after each pick, so the group stays spread).
        if current.len() > replicas {
            let mut crowd: BTreeMap<String, usize> = BTreeMap::new();
            for vm in current.iter().chain(&outdated_ready) {
                if let Some(w) = vm.status.placement.as_deref() {
                    *crowd.entry(w.to_string()).or_default() += 1;
                }
            }
            for _ in replicas..current.len() {
                let crowd_of = |vm: &Vm| {
                    vm.status
                        .placement
                        .as_deref()
                        .map_or(0, |w| crowd.get(w).copied().unwrap_or(0))
                };
                let pick = current
                    .iter()
                    .enumerate()
                    .min_by(|(_, a), (_, b)| {
                        ready(a)
                            .cmp(&ready(b))
                            .then(crowd_of(b).cmp(&crowd_of(a)))
                            .then(
                                b.metadata
                                    .creation_timestamp
                                    .cmp(&a.metadata.creation_timestamp),
                            )
                            .then(b.name().cmp(a.name()))
                    })
                    .map(|(i, _)| i);
                let Some(i) = pick else { break };
                let vm = current.remove(i);
                if let Some(c) = vm
                    .status
                    .placement
                    .as_deref()
                    .and_then(|w| crowd.get_mut(w))
                {
                    *c -= 1;
                }
                tracing::info!(group = self.name(), vm = vm.name(), "scaling down");
                deleted += usize::from(self.retire(vm).await?);
            }
        }

        // 3. Make up for missing current members, within the surge.
        let total = current.len() + outdated_ready.len();
        if current.len() < replicas {
            let room = (replicas + surge).saturating_sub(total);
            let n = (replicas - current.len()).min(room);
            for _ in 0..n {
                self.create_member().await?;
            }
        }

        // 4. Retire outdated ready members while enough others are ready: those on leaving
        //    workers first, then the oldest.
        let mut ready_count = current.iter().filter(|vm| ready(vm)).count() + outdated_ready.len();
        let floor = replicas.saturating_sub(unavailable);
        outdated_ready.sort_by(|a, b| {
            let leaving = |vm: &Vm| {
                vm.status
                    .placement
                    .as_deref()
                    .is_some_and(|w| self.leaving.contains(w))
            };
            leaving(b)
                .cmp(&leaving(a))
                .then(
                    a.metadata
                        .creation_timestamp
                        .cmp(&b.metadata.creation_timestamp),
                )
                .then(a.name().cmp(b.name()))
        });
        let mut left = Vec::new();
        for vm in outdated_ready {
            if ready_count <= floor {
                left.push(vm);
                continue;
            }
            tracing::info!(
                group = self.name(),
                vm = vm.name(),
                "replacing outdated member"
            );
            if self.retire(vm).await? {
                deleted += 1;
                ready_count -= 1;
            } else {
                left.push(vm);
            }
        }
        if deleted + retired > 0 {
            // The counts below would be stale: the next pass (triggered by these writes)
            // writes the status.
            return Ok(next_due);
        }
        self.write_status(&current, &left).await?;
        Ok(next_due)
    }

    async fn create_member(&self) -> Result<(), StoreError> {
        let group = self.group;
        loop {
            let suffix: String = uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .chars()
                .take(SUFFIX_LEN)
                .collect();
            let name = format!("{}-{suffix}", group.name());
            let owner = Some(OwnerRef::of(group));
            // Volumes first, so the member never runs without them; a pass that dies in between
            // leaves volumes no VM names, which are collected.
            for (vname, spec) in member_volumes(&group.spec.template, &name) {
                let vol = Object {
                    metadata: Metadata {
                        name: vname,
                        owner: owner.clone(),
                        ..Metadata::default()
                    },
                    spec,
                    status: VolumeStatus::default(),
                };
                match self.store.create(vol).await {
                    Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            let vm = Object {
                metadata: Metadata {
                    name: name.clone(),
                    owner,
                    ..Metadata::default()
                },
                spec: group.spec.template.member_spec(group.name(), &name),
                status: Default::default(),
            };
            match self.store.create(vm).await {
                Ok(_) => {
                    tracing::info!(group = group.name(), vm = %name, "member created");
                    return Ok(());
                }
                // A suffix taken by chance (or by a standalone VM): draw another.
                Err(StoreError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn write_status(&self, current: &[&Vm], outdated: &[&Vm]) -> Result<(), StoreError> {
        let want = self.status(current, outdated);
        if want == self.group.status {
            return Ok(());
        }
        let uid = self.group.metadata.uid.clone();
        let r = self
            .store
            .update_from::<ScaleGroupSpec, _>(self.group, |o| {
                if o.metadata.uid == uid && o.metadata.generation == want.observed_generation {
                    o.status = want.clone();
                }
                Ok(())
            })
            .await;
        match r {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The status when the members are `current` (from the current template) and `outdated`.
    fn status(&self, current: &[&Vm], outdated: &[&Vm]) -> ScaleGroupStatus {
        let desired = self.spec().replicas;
        let all = || current.iter().chain(outdated);
        let ready_n = all().filter(|vm| ready(vm)).count() as u32;
        let members = (current.len() + outdated.len()) as u32;
        let updated = current.len() as u32;
        let mut conditions = vec![Condition {
            kind: "Available".into(),
            status: ready_n >= desired,
            message: format!("{ready_n} of {desired} ready"),
        }];
        if members != desired || ready_n < desired || updated < members {
            conditions.push(Condition {
                kind: "Progressing".into(),
                status: true,
                message: format!(
                    "{members} members for {desired} replicas: {ready_n} ready, {updated} from the current template"
                ),
            });
        }
        let problems: Vec<String> = all()
            .filter_map(|vm| match vm.status.state {
                VmState::Lost => Some(format!(
                    "{} is Lost: {}",
                    vm.name(),
                    vm.status.message.as_deref().unwrap_or("its worker is gone")
                )),
                VmState::Pending => vm
                    .status
                    .message
                    .as_deref()
                    .map(|m| format!("{} cannot be placed: {m}", vm.name())),
                _ => None,
            })
            .collect();
        if !problems.is_empty() {
            conditions.push(Condition {
                kind: "Degraded".into(),
                status: true,
                message: problems.join("; "),
            });
        }
        ScaleGroupStatus {
            observed_generation: self.group.metadata.generation,
            desired,
            members,
            ready: ready_n,
            updated,
            conditions,
        }
    }
}

fn ready(vm: &Vm) -> bool {
    vm.status.state == VmState::Running
}

/// Deletes a member (if it has not changed since it was read) and then its volumes. Whether it
/// was deleted: a member that changed meanwhile is left for the next pass.
async fn delete_member(store: &Store, vm: &Vm) -> Result<bool, StoreError> {
    match store
        .delete::<VmSpec>(vm.name(), Some(vm.metadata.resource_version))
        .await
    {
        Ok(_) => {}
        Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => return Ok(false),
        Err(e) => return Err(e),
    }
    for v in &vm.spec.volumes {
        delete_owned_volume(store, v).await?;
    }
    Ok(true)
}

async fn delete_owned_volume(store: &Store, name: &str) -> Result<(), StoreError> {
    match store.get::<VolumeSpec>(name).await {
        Ok(v)
            if v.metadata
                .owner
                .as_ref()
                .is_some_and(|o| o.kind == "scalegroup") => {}
        Ok(_) | Err(StoreError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    }
    match store.delete::<VolumeSpec>(name, None).await {
        Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes member volumes that no VM names (their member is gone, or was never created).
async fn collect_volumes(store: &Store, volumes: &[Volume], vms: &[Vm]) -> Result<(), StoreError> {
    let named: BTreeSet<&str> = vms
        .iter()
        .flat_map(|vm| vm.spec.volumes.iter().map(String::as_str))
        .collect();
    for vol in volumes {
        let owned = vol
            .metadata
            .owner
            .as_ref()
            .is_some_and(|o| o.kind == "scalegroup");
        if owned && !named.contains(vol.name()) {
            tracing::info!(volume = vol.name(), "member volume no VM names; deleting");
            match store
                .delete::<VolumeSpec>(vol.name(), Some(vol.metadata.resource_version))
                .await
            {
                Ok(_) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
