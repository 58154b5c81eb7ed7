//! What the worker should do with a VM etcd associates with it: a pure function of the VM's
//! spec and status, so the agent's decisions can be tested without processes.

use crate::model::{MovePhase, Power, Vm, VmState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Placed here and wanted on: keep it running (start it, restart it after a crash).
    Run,
    /// Placed here and wanted off (`vm stop`): powered off, disks kept.
    Off,
    /// Placed here, Stopped or Failed as this worker reported: leave it until `vm start`
    /// (which sets the state back to Scheduled).
    Rest,
    /// Moving away (phase Stopping): power it off and offer its disks to the target.
    Surrender,
    /// Moving away and off: keep its files untouched until the move ends.
    Hold,
    /// Moving here (phase Copying): fetch its disks from the source.
    Fetch,
    /// Associated with this worker in no way that needs anything here.
    Ignore,
}

/// Whether etcd associates the VM with worker `me` at all (placed here, or moving from or to here).
pub fn concerns(vm: &Vm, me: &str) -> bool {
    vm.status.placement.as_deref() == Some(me)
        || vm
            .status
            .moving
            .as_ref()
            .is_some_and(|m| m.from == me || m.to == me)
}

pub fn want(vm: &Vm, me: &str) -> Want {
    let here = vm.status.placement.as_deref() == Some(me);
    if let Some(m) = &vm.status.moving {
        if m.from == me && m.phase != MovePhase::Failed {
            return if here && m.phase == MovePhase::Stopping {
                Want::Surrender
            } else {
                Want::Hold
            };
        }
        if m.to == me && !here {
            return if m.phase == MovePhase::Copying {
                Want::Fetch
            } else {
                Want::Ignore
            };
        }
    }
    if !here {
        return Want::Ignore;
    }
    if vm.spec.power == Power::Stopped {
        return Want::Off;
    }
    match vm.status.state {
        VmState::Stopped | VmState::Failed => Want::Rest,
        _ => Want::Run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ByteSize, Metadata, Move, Object, VmSpec, VmStatus};

    fn vm(placement: Option<&str>, state: VmState) -> Vm {
        Object {
            metadata: Metadata {
                name: "v".into(),
                ..Metadata::default()
            },
            spec: VmSpec {
                cpus: 1,
                memory: ByteSize::mib(64),
                image: "base".into(),
                volumes: vec![],
                network: "default".into(),
                group: None,
                labels: Default::default(),
                cmdline: None,
                power: Power::Running,
            },
            status: VmStatus {
                placement: placement.map(String::from),
                state,
                ..VmStatus::default()
            },
        }
    }

    fn moving(mut v: Vm, phase: MovePhase) -> Vm {
        v.status.moving = Some(Move {
            from: "a".into(),
            to: "b".into(),
            phase,
            since: String::new(),
            disks: vec![],
            message: None,
        });
        v
    }

    #[test]
    fn placed_vms() {
        assert_eq!(want(&vm(Some("a"), VmState::Scheduled), "a"), Want::Run);
        // Lost while this worker was away: it is back, so it runs it again.
        assert_eq!(want(&vm(Some("a"), VmState::Lost), "a"), Want::Run);
        assert_eq!(want(&vm(Some("a"), VmState::Failed), "a"), Want::Rest);
        assert_eq!(want(&vm(Some("a"), VmState::Stopped), "a"), Want::Rest);
        let mut off = vm(Some("a"), VmState::Running);
        off.spec.power = Power::Stopped;
        assert_eq!(want(&off, "a"), Want::Off);
        assert_eq!(want(&vm(Some("a"), VmState::Running), "b"), Want::Ignore);
        assert!(!concerns(&vm(Some("a"), VmState::Running), "b"));
    }

    #[test]
    fn moves_from_both_ends() {
        let v = moving(vm(Some("a"), VmState::Running), MovePhase::Stopping);
        assert_eq!(want(&v, "a"), Want::Surrender);
        assert_eq!(want(&v, "b"), Want::Ignore);
        assert!(concerns(&v, "b"));
        let v = moving(vm(Some("a"), VmState::Stopped), MovePhase::Copying);
        assert_eq!(want(&v, "a"), Want::Hold);
        assert_eq!(want(&v, "b"), Want::Fetch);
        let v = moving(vm(Some("b"), VmState::Scheduled), MovePhase::Starting);
        assert_eq!(want(&v, "a"), Want::Hold);
        assert_eq!(want(&v, "b"), Want::Run);
        // A failed move: the source runs it again.
        let v = moving(vm(Some("a"), VmState::Scheduled), MovePhase::Failed);
        assert_eq!(want(&v, "a"), Want::Run);
        assert_eq!(want(&v, "b"), Want::Ignore);
    }
}
