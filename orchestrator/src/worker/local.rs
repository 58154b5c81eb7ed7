//! What the agent's tasks share: the worker's context, the VMs that run here, and the guarded
//! status write every task uses.

use std::time::Instant;

use super::process::VmmProcess;
use super::record::{Layout, Record};
use super::WorkerConfig;
use crate::images::cache::ImageCache;
use crate::model::{Vm, VmSpec, VmState, VmStatus};
use crate::store::{Store, StoreError};

/// What the agent shares with the tasks that start and stop VMs.
pub(super) struct Ctx {
    pub cfg: WorkerConfig,
    pub layout: Layout,
    pub store: Store,
    /// Images pulled from the control plane.
    pub images: ImageCache,
    /// Held while a starting VM picks its jail uid.
    pub jail_uids: tokio::sync::Mutex<()>,
}

/// A VM that runs (or ran) here.
pub(super) struct LocalVm {
    pub rec: Record,
    pub process: Option<VmmProcess>,
    /// The guest answered on its address since this `vmm` booted it.
    pub up: bool,
    /// The guest agent's version, when it answered.
    pub agent: Option<String>,
    /// Pings of the guest agent since the guest came up without it answering: an image
    /// without an agent is asked for a while, then left alone.
    pub agent_misses: u32,
    /// When its `vmm` died, recently.
    pub crashes: Vec<Instant>,
    /// Why it is not running any more (guest powered off, or too many crashes): the state and
    /// message to report.
    pub ended: Option<(VmState, String)>,
    /// Why the last restart failed, for the message when the restarts run out.
    pub last_error: Option<String>,
    /// Its vmm died and the crash is counted: restart it when possible, count nothing more.
    pub down: bool,
    /// Not before this: the next attempt at handing it over to a move.
    pub next_try: Option<Instant>,
    /// Why its `vmm` paused it (a disk write the host could not take), while it is paused.
    pub paused: Option<String>,
}

impl LocalVm {
    /// The VM a record describes: its `vmm` adopted if that process still runs, ended if the
    /// guest had stopped. A new record (no pid yet) gives a VM about to be started.
    pub fn from_record(rec: Record) -> LocalVm {
        let process = rec
            .pid
            .zip(rec.pid_start)
            .and_then(|(pid, start)| VmmProcess::adopt(pid, start));
        let ended = match (&rec.failed, rec.stopped) {
            (Some(why), _) => Some((VmState::Failed, why.clone())),
            (None, true) => Some((
                VmState::Stopped,
                match &rec.outgoing {
                    Some(o) => format!("off for its move to {}; disks ready", o.to),
                    None => "stopped".to_string(),
                },
            )),
            (None, false) => None,
        };
        LocalVm {
            rec,
            process,
            // An adopted guest was up before; the first probe confirms it.
            up: false,
            agent: None,
            agent_misses: 0,
            crashes: Vec::new(),
            ended,
            last_error: None,
            down: false,
            next_try: None,
            paused: None,
        }
    }
}

/// Updates the VM's status if it is still this VM (same uid) and still placed on this worker:
/// a VM deleted or moved meanwhile is left alone. Returns the object, None when it is gone.
pub(super) async fn write_status(
    ctx: &Ctx,
    name: &str,
    uid: &str,
    mut change: impl FnMut(&mut VmStatus),
) -> Result<Option<Vm>, StoreError> {
    let me = ctx.cfg.name.as_str();
    let r = ctx
        .store
        .update::<VmSpec, _>(name, |o| {
            if o.metadata.uid == uid && o.status.placement.as_deref() == Some(me) {
                change(&mut o.status);
            }
            Ok(())
        })
        .await;
    match r {
        Ok(o) => Ok(Some(o)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
