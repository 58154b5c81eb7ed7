//! The agent's loop: registration, the watch on VMs, and the passes that start, stop, watch and
//! report the VMs placed on this worker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use vmm_api::client::Client;

use super::launch::launch;
use super::local::{write_status, Ctx, LocalVm};
use super::netdev;
use super::process::{log_tail, Liveness};
use super::record::{Layout, Record};
use super::{api, guest, mac_address, probe, tap_name, WorkerConfig, WorkerError};
use crate::model::{Vm, VmSpec, VmState, VmStatus, VolumeSpec, WorkerSpec};
use crate::registration::Registration;
use crate::store::{keys, Store, StoreError, Watch};
use crate::task::Backoff;

/// How often processes are checked and guests probed.
const TICK: Duration = Duration::from_millis(500);
/// Ticks a guest that is up is asked for its agent before it is taken to have none.
const AGENT_PINGS: u32 = 120;
/// Window in which `max_restarts` counts.
const RESTART_WINDOW: Duration = Duration::from_secs(600);

/// Runs the agent until `shutdown` is cancelled. The VMs keep running after it returns; the
/// next agent on this state directory re-adopts them.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let layout = Layout::new(&cfg.state_dir);
    layout
        .create_dirs()
        .map_err(|e| WorkerError::Setup(format!("{}: {e}", cfg.state_dir.display())))?;
    netdev::ensure_bridge(&cfg.bridge, cfg.subnet.gateway(), cfg.subnet.prefix()).await?;
    let store = connect(&cfg, &shutdown).await?;
    let Some(store) = store else { return Ok(()) };
    let endpoint = match cfg.listen {
        Some(addr) => {
            let (listener, bound) = api::bind(addr)
                .await
                .map_err(|e| WorkerError::Setup(format!("listening on {addr}: {e}")))?;
            tracing::info!(%bound, "serving requests for guest agents");
            tokio::spawn(api::serve(listener, layout.clone(), shutdown.clone()));
            Some(bound.to_string())
        }
        None => None,
    };
    let spec = WorkerSpec {
        capacity: cfg.capacity,
        labels: cfg.labels.clone(),
        drain: false,
        endpoint,
    };
    let registration = loop {
        match Registration::register(&store, &cfg.name, spec.clone(), cfg.lease_ttl).await {
            Ok(r) => break r,
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "etcd unavailable; retrying registration");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(worker = %cfg.name, bridge = %cfg.bridge, subnet = %cfg.subnet, "registered");
    let mut agent = Agent::new(cfg, layout, store)?;
    agent.run(shutdown).await;
    // The heartbeat stops with the registration: without a restart the control plane marks
    // this worker NotReady after one TTL. The VMs keep running for the next agent.
    drop(registration);
    Ok(())
}

async fn connect(
    cfg: &WorkerConfig,
    shutdown: &CancellationToken,
) -> Result<Option<Store>, WorkerError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match Store::connect(&cfg.etcd, cfg.etcd_timeout).await {
            Ok(s) => return Ok(Some(s)),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "etcd unavailable; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = backoff.wait() => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

enum Slot {
    Idle(Box<LocalVm>),
    /// A start or stop is under way; the task hands the VM back, or None when it is gone.
    Busy {
        rec: Record,
        task: JoinHandle<Option<Box<LocalVm>>>,
    },
}

impl Slot {
    fn rec(&self) -> &Record {
        match self {
            Slot::Idle(vm) => &vm.rec,
            Slot::Busy { rec, .. } => rec,
        }
    }
}

struct Agent {
    ctx: Arc<Ctx>,
    slots: BTreeMap<String, Slot>,
    /// The VMs etcd places here, by name, as last listed (and as our own writes returned them).
    placed: BTreeMap<String, Vm>,
    /// Whether `placed` comes from a successful list: nothing is stopped before that, so an
    /// agent that starts while etcd is down does not take "no answer" for "no VMs".
    listed: bool,
}

impl Agent {
    fn new(cfg: WorkerConfig, layout: Layout, store: Store) -> Result<Agent, WorkerError> {
        let (records, broken) = layout
            .load_all()
            .map_err(|e| WorkerError::Setup(format!("reading VM records: {e}")))?;
        for (dir, why) in broken {
            tracing::warn!(dir = %dir.display(), error = %why, "unreadable VM record; leaving the directory alone");
        }
        let mut slots = BTreeMap::new();
        for rec in records {
            let vm = LocalVm::from_record(rec);
            match &vm.process {
                Some(p) => tracing::info!(vm = %vm.rec.name, pid = p.pid, "re-adopted running vmm"),
                None if vm.ended.is_none() => {
                    tracing::info!(vm = %vm.rec.name, "vmm is not running; it will be restarted if still placed here")
                }
                None => {}
            }
            slots.insert(vm.rec.name.clone(), Slot::Idle(Box::new(vm)));
        }
        Ok(Agent {
            ctx: Arc::new(Ctx { cfg, layout, store }),
            slots,
            placed: BTreeMap::new(),
            listed: false,
        })
    }

    fn me(&self) -> &str {
        &self.ctx.cfg.name
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch: Option<Watch> = None;
        let mut dirty = true;
        let mut last_list = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut retry_at = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                change = next_change(&mut watch) => match change {
                    Ok(()) => dirty = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "VM watch failed; listing again");
                        watch = None;
                        dirty = true;
                    }
                },
                _ = tick.tick() => {}
            }
            let due = dirty || last_list.elapsed() >= self.ctx.cfg.resync;
            if due && Instant::now() >= retry_at {
                match self.refresh().await {
                    Ok(revision) => {
                        dirty = false;
                        last_list = Instant::now();
                        backoff.reset();
                        if watch.is_none() {
                            let prefix = keys::kind_prefix("vm");
                            match self.ctx.store.watch(&prefix, revision + 1).await {
                                Ok(w) => watch = Some(w),
                                Err(e) => tracing::warn!(error = %e, "cannot watch VMs"),
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list VMs; keeping what runs");
                        // Retries back off while etcd is down; the local checks below go on
                        // every tick meanwhile (processes, probes).
                        retry_at = Instant::now() + backoff.delay();
                    }
                }
            }
            self.collect_finished().await;
            self.converge();
            self.monitor().await;
            self.report().await;
        }
    }

    /// Lists the VMs and keeps those placed here. Returns the revision of the list.
    async fn refresh(&mut self) -> Result<i64, StoreError> {
        let (vms, revision) = self.ctx.store.list::<VmSpec>().await?;
        let me = self.me().to_string();
        self.placed = vms
            .into_iter()
            .filter(|vm| vm.status.placement.as_deref() == Some(me.as_str()))
            .map(|vm| (vm.metadata.name.clone(), vm))
            .collect();
        self.listed = true;
        self.remove_deleted_volumes().await?;
        Ok(revision)
    }

    /// Deletes the files of named volumes whose Volume object is gone. The API refuses to delete
    /// a volume a VM names, so no VM here uses such a file; the check against the VMs placed
    /// here is a second guard.
    async fn remove_deleted_volumes(&self) -> Result<(), StoreError> {
        let Ok(entries) = std::fs::read_dir(self.ctx.layout.volumes_dir()) else {
            return Ok(());
        };
        let files: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".qcow2").map(str::to_string))
            .collect();
        if files.is_empty() {
            return Ok(());
        }
        let (volumes, _) = self.ctx.store.list::<VolumeSpec>().await?;
        let keep: BTreeSet<&str> = volumes
            .iter()
            .map(|v| v.name())
            .chain(
                self.placed
                    .values()
                    .flat_map(|vm| vm.spec.volumes.iter().map(String::as_str)),
            )
            .collect();
        for name in files.iter().filter(|n| !keep.contains(n.as_str())) {
            let path = self.ctx.layout.volume(name);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(volume = %name, "volume deleted; removed its file"),
                Err(e) => tracing::warn!(volume = %name, error = %e, "cannot remove volume file"),
            }
        }
        Ok(())
    }

    /// Takes back the VMs whose start or stop finished.
    async fn collect_finished(&mut self) {
        let done: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Busy { task, .. } if task.is_finished()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in done {
            let Some(Slot::Busy { rec, task }) = self.slots.remove(&name) else {
                continue;
            };
            match task.await {
                Ok(Some(vm)) => {
                    self.slots.insert(name, Slot::Idle(vm));
                }
                Ok(None) => {}
                Err(e) => {
                    // A panicked task: keep the record so the next pass cleans up or restarts.
                    tracing::error!(vm = %name, error = %e, "VM task failed");
                    let vm = LocalVm::from_record(rec);
                    self.slots.insert(name, Slot::Idle(Box::new(vm)));
                }
            }
        }
    }

    /// Starts what is placed here and does not run, stops what runs and is no longer placed
    /// here.
    fn converge(&mut self) {
        if !self.listed {
            return;
        }
        // Stop first: a VM deleted and created again under its name must free the name.
        let stale: Vec<String> = self
            .slots
            .iter()
            .filter(|(name, slot)| {
                matches!(slot, Slot::Idle(_))
                    && self
                        .placed
                        .get(*name)
                        .is_none_or(|vm| vm.metadata.uid != slot.rec().uid)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some(Slot::Idle(vm)) = self.slots.remove(&name) {
                tracing::info!(vm = %name, "no longer placed here; stopping");
                let rec = vm.rec.clone();
                let task = tokio::spawn(stop(self.ctx.clone(), vm));
                self.slots.insert(name, Slot::Busy { rec, task });
            }
        }
        let to_start: Vec<Vm> = self
            .placed
            .values()
            .filter(|vm| !self.slots.contains_key(vm.name()) && should_start(vm))
            .cloned()
            .collect();
        for vm in to_start {
            self.start_new(vm);
        }
    }

    fn start_new(&mut self, vm: Vm) {
        let taken: BTreeSet<_> = self.slots.values().map(|s| s.rec().ip).collect();
        let Some(ip) = self.ctx.cfg.subnet.allocate(&taken) else {
            let why = format!(
                "worker {} has no free address in {}",
                self.me(),
                self.ctx.cfg.subnet
            );
            self.fail_later(&vm, why);
            return;
        };
        let uid = vm.metadata.uid.clone();
        let rec = Record {
            name: vm.name().to_string(),
            tap: tap_name(&uid),
            mac: mac_address(&uid),
            uid,
            ip,
            pid: None,
            pid_start: None,
            boot_time: None,
            restarts: 0,
            stopped: false,
            failed: None,
        };
        // The record comes first: whatever the start leaves behind, the record names it.
        if let Err(e) = self.ctx.layout.save(&rec) {
            tracing::error!(vm = %rec.name, error = %e, "cannot write the VM record");
            return;
        }
        tracing::info!(vm = %rec.name, ip = %rec.ip, tap = %rec.tap, "starting");
        let local = Box::new(LocalVm::from_record(rec.clone()));
        let task = tokio::spawn(start(self.ctx.clone(), local, vm));
        self.slots
            .insert(rec.name.clone(), Slot::Busy { rec, task });
    }

    /// Marks a VM Failed without having started anything for it.
    fn fail_later(&self, vm: &Vm, why: String) {
        let ctx = self.ctx.clone();
        let (name, uid) = (vm.name().to_string(), vm.metadata.uid.clone());
        tokio::spawn(async move {
            let r = write_status(&ctx, &name, &uid, |s| {
                s.state = VmState::Failed;
                s.message = Some(why.clone());
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(vm = %name, error = %e, "cannot report failure");
            }
        });
    }

    /// Watches the processes: a dead `vmm` is restarted (crash) or reported (guest powered
    /// off, too many crashes); guests not yet up are probed.
    async fn monitor(&mut self) {
        let mut restarts = Vec::new();
        let mut probes = JoinSet::new();
        for (name, slot) in &mut self.slots {
            let Slot::Idle(vm) = slot else { continue };
            if vm.ended.is_some() {
                continue;
            }
            let liveness = match &mut vm.process {
                Some(p) => p.liveness(),
                None => Liveness::Exited(None),
            };
            match liveness {
                Liveness::Alive => {
                    if vm.up && vm.agent.is_none() && vm.agent_misses < AGENT_PINGS {
                        // Up by the TCP probe: its agent may still be starting.
                        vm.agent_misses += 1;
                        let socket = self.ctx.layout.vsock(name);
                        let name = name.clone();
                        probes.spawn(async move {
                            let agent = guest::ping(socket, Duration::from_secs(1)).await;
                            (name, agent.is_some(), agent)
                        });
                    } else if !vm.up {
                        let (ip, port) = (vm.rec.ip, self.ctx.cfg.probe_port);
                        let socket = self.ctx.layout.vsock(name);
                        let name = name.clone();
                        probes.spawn(async move {
                            // The guest agent first; a TCP probe of the address for images
                            // without one.
                            let agent = guest::ping(socket, Duration::from_secs(1)).await;
                            let up = agent.is_some()
                                || probe::guest_answers(ip, port, Duration::from_millis(300)).await;
                            (name, up, agent)
                        });
                    }
                }
                Liveness::Exited(_) if vm.down => {
                    // Counted already; waiting to be restarted (once placed here is known).
                    restarts.push(name.clone());
                }
                Liveness::Exited(status) => {
                    vm.down = true;
                    vm.process = None;
                    vm.up = false;
                    vm.agent = None;
                    vm.agent_misses = 0;
                    vm.rec.pid = None;
                    vm.rec.pid_start = None;
                    if status.is_some_and(|s| s.success()) {
                        // vmm exits 0 when the guest powers off: the user's guest chose to stop.
                        tracing::info!(vm = %name, "guest powered off");
                        vm.rec.stopped = true;
                        vm.ended = Some((VmState::Stopped, "the guest powered off".into()));
                    } else {
                        let now = Instant::now();
                        vm.crashes
                            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                        vm.crashes.push(now);
                        let how = match (vm.last_error.take(), status) {
                            (Some(why), _) => format!("restart failed: {why}"),
                            (None, Some(s)) => format!("vmm exited ({s})"),
                            (None, None) => "vmm is gone".to_string(),
                        };
                        let tail = log_tail(&self.ctx.layout.vmm_log(name), 300);
                        if vm.crashes.len() > self.ctx.cfg.max_restarts as usize {
                            tracing::warn!(vm = %name, "{how}; too many restarts");
                            let why = format!(
                                "{how}, {} times in {} minutes; not restarting. vmm log: {tail}",
                                vm.crashes.len(),
                                RESTART_WINDOW.as_secs() / 60
                            );
                            vm.rec.stopped = true;
                            vm.rec.failed = Some(why.clone());
                            vm.ended = Some((VmState::Failed, why));
                        } else {
                            tracing::warn!(vm = %name, "{how}; restarting");
                            restarts.push(name.clone());
                        }
                    }
                    if let Err(e) = self.ctx.layout.save(&vm.rec) {
                        tracing::warn!(vm = %name, error = %e, "cannot update the VM record");
                    }
                }
            }
        }
        while let Some(r) = probes.join_next().await {
            if let Ok((name, true, agent)) = r {
                if let Some(Slot::Idle(vm)) = self.slots.get_mut(&name) {
                    if !vm.up {
                        tracing::info!(vm = %name, ip = %vm.rec.ip, agent = ?agent, "guest is up");
                    } else if agent.is_some() {
                        tracing::info!(vm = %name, agent = ?agent, "guest agent answers");
                    }
                    vm.up = true;
                    vm.agent = agent.or(vm.agent.take());
                }
            }
        }
        for name in restarts {
            // Only what is still placed here comes back; the rest is stopped by converge. Until
            // a list says where it is placed (etcd down), it waits, its crash counted once.
            let Some(vm) = self.placed.get(&name).cloned() else {
                continue;
            };
            if let Some(Slot::Idle(mut local)) = self.slots.remove(&name) {
                local.rec.restarts += 1;
                let rec = local.rec.clone();
                let task = tokio::spawn(start(self.ctx.clone(), local, vm));
                self.slots.insert(name, Slot::Busy { rec, task });
            }
        }
    }

    /// Writes what is observed into the status of each VM placed here, when it differs.
    async fn report(&mut self) {
        if !self.listed {
            return;
        }
        let mut writes = Vec::new();
        for (name, slot) in &self.slots {
            let Slot::Idle(vm) = slot else { continue };
            let Some(obj) = self.placed.get(name) else {
                continue;
            };
            if obj.metadata.uid != vm.rec.uid {
                continue;
            }
            let want = observed(vm);
            let have = &obj.status;
            if have.state != want.state
                || have.ip != want.ip
                || have.boot_time != want.boot_time
                || have.message != want.message
                || have.agent != want.agent
            {
                writes.push((name.clone(), vm.rec.uid.clone(), want));
            }
        }
        for (name, uid, want) in writes {
            let r = write_status(&self.ctx, &name, &uid, |s| {
                s.state = want.state;
                s.ip = want.ip.clone();
                s.boot_time = want.boot_time.clone();
                s.message = want.message.clone();
                s.agent = want.agent.clone();
            })
            .await;
            match r {
                Ok(Some(obj)) => {
                    if obj.status.state
                        != self
                            .placed
                            .get(&name)
                            .map_or(VmState::Pending, |o| o.status.state)
                    {
                        tracing::info!(vm = %name, state = %obj.status.state, "status");
                    }
                    self.placed.insert(name, obj);
                }
                Ok(None) => {
                    self.placed.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "cannot write VM status");
                    return;
                }
            }
        }
    }
}

/// Waits for the next change under the watch, or forever without one.
async fn next_change(watch: &mut Option<Watch>) -> Result<(), StoreError> {
    match watch {
        Some(w) => w.next().await.map(drop),
        None => std::future::pending().await,
    }
}

/// Whether a VM placed here and not running here should be started. Lost VMs belong to the
/// scheduler until it places them again; Stopped and Failed ones stay as they are.
fn should_start(vm: &Vm) -> bool {
    matches!(
        vm.status.state,
        VmState::Scheduled | VmState::Starting | VmState::Running
    )
}

/// The status this worker observes for one of its VMs.
fn observed(vm: &LocalVm) -> VmStatus {
    let mut s = VmStatus::default();
    if let Some((state, why)) = &vm.ended {
        s.state = *state;
        s.message = Some(why.clone());
        return s;
    }
    s.state = if vm.up {
        VmState::Running
    } else {
        VmState::Starting
    };
    s.ip = vm.up.then(|| vm.rec.ip.to_string());
    s.agent = vm.agent.clone().filter(|_| vm.up);
    s.boot_time = vm.rec.boot_time.clone();
    if vm.rec.restarts > 0 {
        s.message = Some(format!(
            "restarted {} times after its vmm died",
            vm.rec.restarts
        ));
    }
    s
}

/// Starts (or restarts) a VM: disks, TAP, `vmm` process, create and boot through its API. When
/// a first start fails, everything made is removed and the VM is marked Failed. A failed restart
/// counts as one more crash: the VM keeps its record and disks and is restarted again until the
/// restart budget runs out.
async fn start(ctx: Arc<Ctx>, mut vm: Box<LocalVm>, obj: Vm) -> Option<Box<LocalVm>> {
    let restart = vm.rec.restarts > 0;
    let name = vm.rec.name.clone();
    let uid = vm.rec.uid.clone();
    match launch(&ctx, &mut vm, &obj).await {
        Ok(()) => {
            tracing::info!(vm = %name, pid = vm.process.as_ref().map_or(0, |p| p.pid), "booted");
            vm.down = false;
            Some(vm)
        }
        Err(err) => {
            tracing::warn!(vm = %name, error = %err, "start failed");
            if let Some(p) = &mut vm.process {
                p.kill();
                p.wait_exit(Duration::from_secs(5)).await;
            }
            if let Err(e) = netdev::delete_tap(&vm.rec.tap).await {
                tracing::warn!(vm = %name, error = %e, "cannot remove TAP");
            }
            if err.is_transient() {
                // Nothing is wrong with the VM: a later pass tries again. A first start drops
                // its record and directory (the disks are remade in milliseconds); a restart
                // keeps everything and stays counted as the one crash it was.
                tracing::info!(vm = %name, error = %err, "will retry the start");
                if !restart {
                    let _ = ctx.layout.remove_vm(&name);
                    return None;
                }
                vm.process = None;
                vm.rec.pid = None;
                vm.rec.pid_start = None;
                vm.rec.restarts -= 1;
                let _ = ctx.layout.save(&vm.rec);
                return Some(vm);
            }
            let why = err.to_string();
            if restart {
                vm.process = None;
                vm.rec.pid = None;
                vm.rec.pid_start = None;
                vm.last_error = Some(why);
                // The failure counts as the next crash when the agent looks again.
                vm.down = false;
                let _ = ctx.layout.save(&vm.rec);
                return Some(vm);
            }
            if let Err(e) = ctx.layout.remove_vm(&name) {
                tracing::warn!(vm = %name, error = %e, "cannot remove VM directory");
            }
            let r = write_status(&ctx, &name, &uid, |s| {
                s.state = VmState::Failed;
                s.message = Some(why.clone());
                s.ip = None;
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(vm = %name, error = %e, "cannot report failure");
            }
            None
        }
    }
}

/// Stops a VM that is no longer placed here and removes everything it had: power button, then
/// kill after the stop timeout; TAP; directory (root volume, logs, record — last).
async fn stop(ctx: Arc<Ctx>, mut vm: Box<LocalVm>) -> Option<Box<LocalVm>> {
    let name = vm.rec.name.clone();
    if let Some(p) = &mut vm.process {
        if p.liveness() == Liveness::Alive {
            let timeout = ctx.cfg.stop_timeout;
            let client = Client::new(ctx.layout.socket(&name)).with_timeout(Duration::from_secs(5));
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            if let Err(e) = client.shutdown(Some(ms)).await {
                tracing::warn!(vm = %name, error = %e, "graceful shutdown refused; killing");
            }
            if !p.wait_exit(timeout + Duration::from_secs(2)).await {
                tracing::warn!(vm = %name, "still running after {timeout:?}; killing");
                p.kill();
                p.wait_exit(Duration::from_secs(5)).await;
            }
        }
    }
    if let Err(e) = netdev::delete_tap(&vm.rec.tap).await {
        tracing::warn!(vm = %name, error = %e, "cannot remove TAP; will retry");
        return Some(vm);
    }
    if let Err(e) = ctx.layout.remove_vm(&name) {
        tracing::warn!(vm = %name, error = %e, "cannot remove the VM directory; will retry");
        return Some(vm);
    }
    tracing::info!(vm = %name, "stopped and removed");
    None
}
