//! The mover: vacates draining workers of standalone VMs by cold moves (scale-group members are
//! replaced by their group instead). It starts a move by naming a target in the VM's status;
//! the two workers' agents do the work (see `worker::moves`), and the mover ends the move once
//! the VM runs on the target, cancels it when the drain is withdrawn, and marks it Failed when
//! the target goes away (the source then runs the VM again; a Failed move is retried later).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use super::placement::Placement;
use super::Controller;
use crate::model::{Move, MovePhase, Power, Vm, VmSpec, VmState, Worker, WorkerSpec, WorkerState};
use crate::store::{keys, Store, StoreError};

/// How long a Failed move waits before the VM is moved again.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);

pub struct Mover {
    /// Whether the last pass saw a move under way: one can outlive its drain (uncordon). True at
    /// first, so a new leader looks once.
    moves_seen: AtomicBool,
}

impl Default for Mover {
    fn default() -> Mover {
        Mover {
            moves_seen: AtomicBool::new(true),
        }
    }
}

impl Controller for Mover {
    const NAME: &'static str = "mover";

    fn watches(&self) -> Vec<String> {
        vec![keys::kind_prefix("vm"), keys::kind_prefix("worker")]
    }

    async fn reconcile(&self, store: &Store) -> Result<(), StoreError> {
        let (workers, _) = store.list::<WorkerSpec>().await?;
        let draining = workers.iter().any(|w| w.spec.drain);
        if !draining && !self.moves_seen.load(Ordering::Relaxed) {
            // Nothing to vacate and no move to follow: no need to read every VM.
            return Ok(());
        }
        let (vms, _) = store.list::<VmSpec>().await?;
        let moving = vms.iter().any(|vm| vm.status.moving.is_some());
        self.moves_seen.store(moving, Ordering::Relaxed);
        if !draining && !moving {
            return Ok(());
        }
        let worker = |name: &str| workers.iter().find(|w| w.name() == name);
        let mut placement = Placement::new(&workers, &vms);
        let now = SystemTime::now();
        for vm in &vms {
            let decision = match &vm.status.moving {
                Some(m) => follow(vm, m, worker(&m.from), worker(&m.to), now),
                None => match start(vm, &workers, &placement) {
                    Some(Decision::Start(m)) => {
                        placement.assign(vm, &m.to);
                        Some(Decision::Start(m))
                    }
                    other => other,
                },
            };
            if let Some(d) = decision {
                apply(store, vm, d).await?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Decision {
    Start(Move),
    /// The VM cannot leave its draining worker now; why.
    Blocked(String),
    /// The VM runs on the target: the move is over.
    Finish,
    /// Withdrawn before the target took the VM: the source runs it again.
    Cancel(String),
    Fail(String),
}

/// A move for a standalone VM on a draining worker, if it needs one and one can be made.
fn start(vm: &Vm, workers: &[Worker], placement: &Placement) -> Option<Decision> {
    let from = vm.status.placement.as_deref()?;
    let source = workers.iter().find(|w| w.name() == from)?;
    let member = vm
        .metadata
        .owner
        .as_ref()
        .is_some_and(|o| o.kind == "scalegroup");
    if !source.spec.drain || member || vm.status.state == VmState::Lost {
        return None;
    }
    if !matches!(
        source.status.state,
        WorkerState::Draining | WorkerState::Drained
    ) {
        return None;
    }
    if source.spec.endpoint.is_none() {
        return Some(Decision::Blocked(format!(
            "cannot move off draining worker {from}: it serves no disks (started without --listen)"
        )));
    }
    let target = placement.choose_among(vm, |t| t != from);
    match target {
        Some(to) => Some(Decision::Start(Move {
            from: from.to_string(),
            to: to.to_string(),
            phase: MovePhase::Stopping,
            since: now_rfc3339(),
            disks: Vec::new(),
            message: None,
        })),
        None => Some(Decision::Blocked(format!(
            "cannot move off draining worker {from}: no other Ready worker has {} CPUs and {} memory free",
            vm.spec.cpus, vm.spec.memory
        ))),
    }
}

/// What a move under way needs from the controller.
fn follow(
    vm: &Vm,
    m: &Move,
    source: Option<&Worker>,
    target: Option<&Worker>,
    now: SystemTime,
) -> Option<Decision> {
    let usable = |w: Option<&Worker>| {
        w.is_some_and(|w| {
            w.status.state == WorkerState::Ready && !w.spec.drain && !w.spec.forgotten
        })
    };
    match m.phase {
        MovePhase::Starting => {
            let arrived = vm.status.placement.as_deref() == Some(m.to.as_str())
                && match vm.spec.power {
                    Power::Running => vm.status.state == VmState::Running,
                    Power::Stopped => vm.status.state == VmState::Stopped,
                };
            arrived.then_some(Decision::Finish)
        }
        MovePhase::Stopping | MovePhase::Copying => {
            if !source.is_some_and(|w| w.spec.drain) {
                Some(Decision::Cancel(format!(
                    "move to {} cancelled: worker {} is no longer draining",
                    m.to, m.from
                )))
            } else if !usable(target) {
                Some(Decision::Fail(format!(
                    "worker {} can no longer take it (not Ready, draining or gone)",
                    m.to
                )))
            } else {
                None
            }
        }
        MovePhase::Failed => {
            let since = humantime::parse_rfc3339(&m.since).unwrap_or(now);
            let waited = now.duration_since(since).unwrap_or(Duration::ZERO);
            let withdrawn = !source.is_some_and(|w| w.spec.drain);
            (withdrawn || waited >= RETRY_FAILED_AFTER).then(|| {
                Decision::Cancel(format!(
                    "move to {} failed: {}",
                    m.to,
                    m.message.as_deref().unwrap_or("no reason given")
                ))
            })
        }
    }
}

async fn apply(store: &Store, vm: &Vm, decision: Decision) -> Result<(), StoreError> {
    let name = vm.name();
    let uid = vm.metadata.uid.clone();
    let before = vm.status.moving.clone();
    let r = store
        .update_from::<VmSpec, _>(vm, |o| {
            if o.metadata.uid != uid || o.status.moving != before {
                return Ok(());
            }
            match &decision {
                Decision::Start(m) => {
                    if o.status.placement.as_deref() == Some(m.from.as_str()) {
                        o.status.message =
                            Some(format!("moving to {}: worker {} is draining", m.to, m.from));
                        o.status.moving = Some(m.clone());
                    }
                }
                Decision::Blocked(why) => o.status.message = Some(why.clone()),
                Decision::Finish => {
                    o.status.moving = None;
                    o.status.message = None;
                }
                Decision::Cancel(why) => {
                    o.status.moving = None;
                    o.status.message = Some(why.clone());
                }
                Decision::Fail(why) => {
                    if let Some(m) = &mut o.status.moving {
                        m.phase = MovePhase::Failed;
                        m.since = now_rfc3339();
                        m.message = Some(why.clone());
                    }
                    o.status.message = Some(format!("move failed: {why}"));
                }
            }
            Ok(())
        })
        .await;
    match r {
        Ok(o) => {
            if o.status.moving != before {
                tracing::info!(vm = name, moving = ?o.status.moving, "move");
            }
            if o.status.moving.is_none() && before.is_some() {
                // The source hands out disks only against this token: it goes with the move.
                store.delete_key(&keys::move_token(name)).await?;
            }
            Ok(())
        }
        Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}
