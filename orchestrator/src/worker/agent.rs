//! The agent's loop: registration, the watch on VMs, and the passes that start, stop, watch and
//! report the VMs placed on this worker.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::local::{write_status, Ctx, LocalVm};
use super::moves::{self, MoveError};
use super::process::{log_tail, Liveness};
use super::record::{Layout, Record};
use super::want::{concerns, want, Want};
use super::{api, forgotten, guest, mac_address, netdev, probe, tap_name, tasks};
use super::{WorkerConfig, WorkerError};
use crate::images::cache::ImageCache;
use crate::model::{MovePhase, Power, Vm, VmSpec, VmState, VmStatus, VolumeSpec, WorkerSpec};
use crate::registration::Registration;
use crate::store::{Cache, Store, StoreError};
use crate::task::Backoff;
use vmm_api::client::Client;

/// `vmm`'s exit status when the guest asked for a reboot (0: powered off; 1: VMM error; 4:
/// triple fault; 5: guest panic — the last three are crashes).
const VMM_EXIT_REBOOT: i32 = 3;

/// How often processes are checked and guests probed.
const TICK: Duration = Duration::from_millis(500);
/// Ticks a guest that is up is asked for its agent before it is taken to have none.
const AGENT_PINGS: u32 = 120;
/// Window in which `max_restarts` counts.
const RESTART_WINDOW: Duration = Duration::from_secs(600);
/// Attempts at fetching a moving VM's disks before the move is given up.
const FETCH_ATTEMPTS: u32 = 5;
/// How often volume files are checked against the volumes that still live here.
const VOLUME_CHECK: Duration = Duration::from_secs(2);
/// How often unused cached images are looked for.
const IMAGE_GC: Duration = Duration::from_secs(30);
/// Wait before the next attempt (times the attempts made), and between hand-over attempts.
const FETCH_RETRY: Duration = Duration::from_secs(2);

/// A fetch of a moving VM's disks.
struct Fetch {
    task: Option<JoinHandle<Result<(), MoveError>>>,
    attempts: u32,
    next_try: Instant,
}

/// Runs the agent until `shutdown` is cancelled. The VMs keep running after it returns; the
/// next agent on this state directory re-adopts them.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let layout = Layout::new(&cfg.state_dir);
    layout
        .create_dirs()
        .map_err(|e| WorkerError::Setup(format!("{}: {e}", cfg.state_dir.display())))?;
    netdev::ensure_bridge(&cfg.bridge, cfg.subnet.gateway(), cfg.subnet.prefix()).await?;
    if let Some(guard) = &cfg.firewall {
        guard
            .install()
            .await
            .map_err(|e| WorkerError::Setup(format!("guest firewall: {e}")))?;
        // Installing starts from empty tables: the VMs still running get their rules again.
        for rec in layout.load_all().map(|(r, _)| r).unwrap_or_default() {
            if netdev::exists(&rec.tap) {
                super::firewall::allow_vm(&guard.bridge, &rec.tap, &rec.mac, rec.ip)
                    .await
                    .map_err(|e| {
                        WorkerError::Setup(format!("guest firewall of {}: {e}", rec.name))
                    })?;
            }
        }
        tracing::info!(bridge = %guard.bridge, deny = ?guard.deny, "guest firewall installed");
    }
    let store = connect(&cfg, &shutdown).await?;
    let Some(store) = store else { return Ok(()) };
    let endpoint = match cfg.listen {
        Some(addr) => {
            let (listener, bound) = api::bind(addr)
                .await
                .map_err(|e| WorkerError::Setup(format!("listening on {addr}: {e}")))?;
            tracing::info!(%bound, "serving requests for guest agents");
            let state = api::ApiState {
                layout: layout.clone(),
                proxy: std::sync::Arc::new(super::host_proxy::HostProxy::new(
                    cfg.proxy.clone(),
                    layout.root_dir().join("proxy"),
                )),
            };
            let tls = match &cfg.tls {
                Some(files) => Some(
                    files
                        .server_config()
                        .map_err(|e| WorkerError::Setup(e.to_string()))?,
                ),
                None => None,
            };
            tokio::spawn(api::serve(
                listener,
                state,
                cfg.auth.clone(),
                tls,
                shutdown.clone(),
            ));
            Some(bound.to_string())
        }
        None => None,
    };
    let spec = WorkerSpec {
        capacity: cfg.capacity,
        labels: cfg.labels.clone(),
        // Registration keeps what operators set (drain, forgotten) on a worker that exists.
        drain: false,
        forgotten: false,
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
    loop {
        match forgotten::fence(&store, &layout, &cfg.name, &shutdown).await {
            Ok(true) => break,
            Ok(false) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check whether this worker was forgotten; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
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
        rec: Box<Record>,
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
    /// Disk fetches for VMs moving here.
    fetches: BTreeMap<String, Fetch>,
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
        let images = ImageCache::open(&layout.images_dir(), cfg.server.clone())
            .map_err(|e| WorkerError::Setup(format!("image cache: {e}")))?;
        Ok(Agent {
            ctx: Arc::new(Ctx {
                cfg,
                layout,
                store,
                images,
                jail_uids: tokio::sync::Mutex::new(()),
            }),
            slots,
            placed: BTreeMap::new(),
            listed: false,
            fetches: BTreeMap::new(),
        })
    }

    fn me(&self) -> &str {
        &self.ctx.cfg.name
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut vms: Cache<VmSpec> = Cache::new();
        let mut dirty = true;
        let mut last_list = Instant::now();
        let mut last_volumes = Instant::now() - VOLUME_CHECK;
        let mut last_gc = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut retry_at = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                change = vms.changed() => {
                    dirty = true;
                    if let Err(e) = change {
                        tracing::warn!(error = %e, "VM watch failed; listing again");
                    }
                },
                _ = tick.tick() => {}
            }
            if last_list.elapsed() >= self.ctx.cfg.resync {
                // A safety net against a watch that silently missed something: list afresh.
                vms = Cache::new();
                last_list = Instant::now();
            }
            if Instant::now() >= retry_at {
                match vms.ensure(&self.ctx.store).await {
                    Ok(listed) => {
                        dirty |= listed;
                        backoff.reset();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list VMs; keeping what runs");
                        // Retries back off while etcd is down; the local checks below go on
                        // every tick meanwhile (processes, probes).
                        retry_at = Instant::now() + backoff.delay();
                    }
                }
            }
            if vms.loaded() && dirty {
                let me = self.me().to_string();
                self.placed = vms
                    .objects()
                    .values()
                    .filter(|vm| concerns(vm, &me))
                    .map(|vm| (vm.metadata.name.clone(), vm.clone()))
                    .collect();
                self.listed = true;
                dirty = false;
            }
            if self.listed && last_volumes.elapsed() >= VOLUME_CHECK {
                last_volumes = Instant::now();
                if let Err(e) = self.remove_deleted_volumes().await {
                    tracing::warn!(error = %e, "cannot check for deleted volumes");
                }
            }
            if last_gc.elapsed() >= IMAGE_GC {
                last_gc = Instant::now();
                self.collect_images().await;
            }
            self.collect_finished().await;
            self.converge();
            self.monitor().await;
            for obj in self.report().await {
                vms.note(obj);
            }
        }
    }

    /// Removes cached images that no disk here is an overlay of and that nothing asked for
    /// within the grace period. Disks being made or fetched keep theirs through the grace.
    async fn collect_images(&self) {
        let ctx = self.ctx.clone();
        let r = tokio::task::spawn_blocking(move || {
            let layout = &ctx.layout;
            let mut disks: Vec<std::path::PathBuf> = Vec::new();
            for dir in [layout.vms_dir(), layout.volumes_dir()] {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        disks.extend(
                            std::fs::read_dir(&p)
                                .into_iter()
                                .flatten()
                                .flatten()
                                .map(|f| f.path())
                                .filter(|f| f.extension().is_some_and(|x| x == "qcow2")),
                        );
                    } else if p.extension().is_some_and(|x| x == "qcow2") {
                        disks.push(p);
                    }
                }
            }
            let in_use = crate::images::cache::backing_files(disks)?;
            Ok::<_, std::io::Error>(ctx.images.collect(&in_use, ctx.cfg.image_gc_grace))
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "not collecting images: a disk's header is unreadable")
            }
            Err(e) => tracing::warn!(error = %e, "image collection failed"),
        }
    }

    /// Deletes the files of named volumes that no longer live here: deleted, or moved to
    /// another worker and no VM here (or moving from here) uses them any more.
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
        let me = self.me();
        let keep: BTreeSet<&str> = volumes
            .iter()
            .filter(|v| v.status.worker.as_deref().is_none_or(|w| w == me))
            .map(|v| v.name())
            .chain(
                self.placed
                    .values()
                    .filter(|vm| {
                        matches!(
                            want(vm, me),
                            Want::Run | Want::Off | Want::Rest | Want::Surrender | Want::Hold
                        )
                    })
                    .flat_map(|vm| vm.spec.volumes.iter().map(String::as_str)),
            )
            .collect();
        for name in files.iter().filter(|n| !keep.contains(n.as_str())) {
            let path = self.ctx.layout.volume(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(volume = %name, "volume deleted or moved away; removed its file")
                }
                Err(e) => tracing::warn!(volume = %name, error = %e, "cannot remove volume file"),
            }
        }
        Ok(())
    }

    /// Takes back the VMs whose task finished, and the results of disk fetches.
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
                    let vm = LocalVm::from_record(*rec);
                    self.slots.insert(name, Slot::Idle(Box::new(vm)));
                }
            }
        }
        let finished: Vec<String> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.task.as_ref().is_some_and(|t| t.is_finished()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in finished {
            let Some(f) = self.fetches.get_mut(&name) else {
                continue;
            };
            let Some(task) = f.task.take() else { continue };
            let result = task.await.unwrap_or_else(|e| {
                Err(MoveError::Io {
                    path: name.clone().into(),
                    source: std::io::Error::other(e),
                })
            });
            match result {
                Ok(()) => {
                    self.fetches.remove(&name);
                }
                Err(MoveError::Superseded) => {
                    self.fetches.remove(&name);
                }
                Err(e) => {
                    f.attempts += 1;
                    f.next_try = Instant::now() + FETCH_RETRY * f.attempts;
                    let give_up = f.attempts >= FETCH_ATTEMPTS;
                    tracing::warn!(vm = %name, error = %e, attempt = f.attempts, give_up, "disk fetch failed");
                    let uid = self.placed.get(&name).map(|vm| vm.metadata.uid.clone());
                    if let Some(uid) = uid {
                        tokio::spawn(report_fetch_failure(
                            self.ctx.clone(),
                            name.clone(),
                            uid,
                            e.to_string(),
                            give_up,
                        ));
                    }
                    if give_up {
                        self.fetches.remove(&name);
                    }
                }
            }
        }
    }

    /// Acts on the difference between what etcd wants of each VM concerning this worker and
    /// what this worker has.
    fn converge(&mut self) {
        if !self.listed {
            return;
        }
        let me = self.me().to_string();
        let names: BTreeSet<String> = self
            .slots
            .keys()
            .chain(self.placed.keys())
            .cloned()
            .collect();
        for name in names {
            if matches!(self.slots.get(&name), Some(Slot::Busy { .. })) {
                continue;
            }
            let obj = self.placed.get(&name).cloned();
            let stale = match (&obj, self.slots.get(&name)) {
                (None, Some(_)) => true,
                // Deleted and created again under its name: the old one goes first.
                (Some(o), Some(slot)) => o.metadata.uid != slot.rec().uid,
                _ => false,
            };
            if stale {
                tracing::info!(vm = %name, "no longer here; stopping");
                self.spawn_task(&name, |ctx, vm| tokio::spawn(tasks::stop(ctx, vm)));
                continue;
            }
            let Some(obj) = obj else { continue };
            let w = want(&obj, &me);
            if w != Want::Fetch {
                if let Some(f) = self.fetches.remove(&name) {
                    if let Some(t) = f.task {
                        t.abort();
                    }
                }
            }
            match w {
                Want::Run => self.ensure_running(obj),
                Want::Off | Want::Hold => self.ensure_off(obj, w == Want::Off),
                Want::Surrender => self.surrender(obj),
                Want::Fetch => self.fetch(obj),
                Want::Rest | Want::Ignore => {}
            }
        }
    }

    fn ensure_running(&mut self, obj: Vm) {
        let name = obj.name().to_string();
        let Some(Slot::Idle(vm)) = self.slots.get(&name) else {
            if !self.slots.contains_key(&name) {
                self.start_new(obj);
            }
            return;
        };
        // Stopped or Failed here, and `vm start` (or a failed move) asked for it again.
        if vm.ended.is_some() && obj.status.state == VmState::Scheduled {
            tracing::info!(vm = %name, "starting again");
            self.spawn_task(&name, move |ctx, mut vm| {
                vm.ended = None;
                vm.crashes.clear();
                vm.down = false;
                vm.rec.stopped = false;
                vm.rec.failed = None;
                vm.rec.outgoing = None;
                vm.rec.restarts = 0;
                let _ = ctx.layout.save(&vm.rec);
                tokio::spawn(tasks::start(ctx, vm, obj, false))
            });
        }
    }

    /// Powered off with its disks kept (`vm stop`, or its files held for a move away).
    fn ensure_off(&mut self, obj: Vm, make_record: bool) {
        let name = obj.name().to_string();
        match self.slots.get_mut(&name) {
            Some(Slot::Idle(vm)) => {
                if vm.process.is_some() {
                    tracing::info!(vm = %name, "powering off; disks kept");
                    self.spawn_task(&name, |ctx, vm| tokio::spawn(tasks::stop_keep(ctx, vm)));
                } else if vm.ended.is_none() {
                    vm.ended = Some((VmState::Stopped, "stopped".into()));
                    vm.rec.stopped = true;
                    let _ = self.ctx.layout.save(&vm.rec);
                }
            }
            Some(Slot::Busy { .. }) => {}
            None if make_record => self.adopt_off(&obj),
            None => {}
        }
    }

    fn surrender(&mut self, obj: Vm) {
        let name = obj.name().to_string();
        match self.slots.get(&name) {
            Some(Slot::Idle(vm)) => {
                if vm.next_try.is_some_and(|t| Instant::now() < t) {
                    return;
                }
                tracing::info!(vm = %name, "handing over to a move");
                self.spawn_task(&name, move |ctx, mut vm| {
                    vm.next_try = Some(Instant::now() + FETCH_RETRY);
                    tokio::spawn(tasks::surrender(ctx, vm, obj))
                });
            }
            Some(Slot::Busy { .. }) => {}
            // Never started here: a record first, so there is something to hand over.
            None => self.adopt_off(&obj),
        }
    }

    fn fetch(&mut self, obj: Vm) {
        let name = obj.name().to_string();
        let f = self.fetches.entry(name.clone()).or_insert_with(|| Fetch {
            task: None,
            attempts: 0,
            next_try: Instant::now(),
        });
        if f.task.is_some() || Instant::now() < f.next_try {
            return;
        }
        tracing::info!(vm = %name, "fetching disks for a move here");
        let ctx = self.ctx.clone();
        f.task = Some(tokio::spawn(async move { moves::fetch(&ctx, &obj).await }));
    }

    /// Runs `task` on the idle VM `name`, which is busy until the task hands it back.
    fn spawn_task(
        &mut self,
        name: &str,
        task: impl FnOnce(Arc<Ctx>, Box<LocalVm>) -> JoinHandle<Option<Box<LocalVm>>>,
    ) {
        if let Some(Slot::Idle(vm)) = self.slots.remove(name) {
            let rec = vm.rec.clone();
            let task = task(self.ctx.clone(), vm);
            self.slots.insert(
                name.to_string(),
                Slot::Busy {
                    rec: Box::new(rec),
                    task,
                },
            );
        }
    }

    /// A new record for a VM that starts here: an address, a TAP name and a MAC.
    fn new_record(&self, vm: &Vm) -> Option<Record> {
        let taken: BTreeSet<_> = self.slots.values().map(|s| s.rec().ip).collect();
        let Some(ip) = self.ctx.cfg.subnet.allocate(&taken) else {
            let why = format!(
                "worker {} has no free address in {}",
                self.me(),
                self.ctx.cfg.subnet
            );
            self.fail_later(vm, why);
            return None;
        };
        let uid = vm.metadata.uid.clone();
        Some(Record {
            name: vm.name().to_string(),
            tap: tap_name(&uid, self.me()),
            mac: mac_address(&uid),
            uid,
            ip,
            pid: None,
            pid_start: None,
            boot_time: None,
            restarts: 0,
            stopped: false,
            failed: None,
            outgoing: None,
            jail_uid: None,
        })
    }

    /// Saves a new record, with the disks of a move here put in place first.
    fn save_new(&self, rec: &Record) -> bool {
        match moves::install_incoming(&self.ctx.layout, &rec.name, &rec.uid) {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(vm = %rec.name, error = %e, "cannot put the moved disks in place");
                return false;
            }
        }
        // The record comes first: whatever the start leaves behind, the record names it.
        if let Err(e) = self.ctx.layout.save(rec) {
            tracing::error!(vm = %rec.name, error = %e, "cannot write the VM record");
            return false;
        }
        true
    }

    fn start_new(&mut self, vm: Vm) {
        let Some(rec) = self.new_record(&vm) else {
            return;
        };
        // Disks that came with a move are this VM's data: a failed start must not delete them.
        let moved = self.ctx.layout.incoming_dir(&rec.name).exists();
        if !self.save_new(&rec) {
            return;
        }
        tracing::info!(vm = %rec.name, ip = %rec.ip, tap = %rec.tap, moved, "starting");
        let local = Box::new(LocalVm::from_record(rec.clone()));
        let task = tokio::spawn(tasks::start(self.ctx.clone(), local, vm, !moved));
        self.slots.insert(
            rec.name.clone(),
            Slot::Busy {
                rec: Box::new(rec),
                task,
            },
        );
    }

    /// Records a VM that is here but off (stopped before it ever ran here, or arrived off).
    fn adopt_off(&mut self, vm: &Vm) {
        let Some(mut rec) = self.new_record(vm) else {
            return;
        };
        rec.stopped = true;
        if !self.save_new(&rec) {
            return;
        }
        let mut local = LocalVm::from_record(rec);
        local.ended = Some((VmState::Stopped, "stopped".into()));
        self.slots
            .insert(local.rec.name.clone(), Slot::Idle(Box::new(local)));
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
        let mut powered_off = Vec::new();
        let mut probes = JoinSet::new();
        let mut pauses = JoinSet::new();
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
                    // Whether its vmm paused it (a disk the host could not write).
                    let socket = self.ctx.layout.socket(name);
                    let name2 = name.clone();
                    pauses.spawn(async move {
                        let client = Client::new(socket).with_timeout(Duration::from_secs(1));
                        let paused = match client.info().await {
                            Ok(info) if info.state == vmm_api::types::VmState::Paused => {
                                info.pause_reason
                            }
                            _ => None,
                        };
                        (name2, paused)
                    });
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
                        powered_off.push((name.clone(), vm.rec.uid.clone()));
                    } else if status.and_then(|s| s.signal()) == Some(libc::SIGSYS) {
                        // The seccomp filter killed it: a VMM bug or a guest attacking it.
                        // Not restarted: it would only do the same again.
                        let tail = log_tail(&self.ctx.layout.vmm_log(name), 300);
                        let why = format!(
                            "vmm was killed by SIGSYS: it made a system call its seccomp \
                             filter forbids (a VMM bug, or a guest attacking its VMM); not \
                             restarting. vmm log: {tail}"
                        );
                        tracing::error!(vm = %name, "{why}");
                        vm.rec.stopped = true;
                        vm.rec.failed = Some(why.clone());
                        vm.ended = Some((VmState::Failed, why));
                    } else if status.and_then(|s| s.code()) == Some(VMM_EXIT_REBOOT) {
                        // The guest asked for a reboot: start it again, not a crash.
                        tracing::info!(vm = %name, "guest rebooted; starting it again");
                        restarts.push(name.clone());
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
        while let Some(r) = pauses.join_next().await {
            let Ok((name, paused)) = r else { continue };
            if let Some(Slot::Idle(vm)) = self.slots.get_mut(&name) {
                if paused != vm.paused {
                    match &paused {
                        Some(why) => tracing::warn!(vm = %name, "paused by its vmm: {why}"),
                        None => tracing::info!(vm = %name, "no longer paused"),
                    }
                    vm.paused = paused;
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
        for (name, uid) in powered_off {
            // What is wanted follows what the guest chose: it stays off until `vm start`.
            tokio::spawn(want_off(self.ctx.clone(), name, uid));
        }
        for name in restarts {
            // Only what is still wanted running here comes back; the rest is handled by
            // converge. Until a list says (etcd down), it waits, its crash counted once.
            let me = self.me().to_string();
            let Some(vm) = self
                .placed
                .get(&name)
                .filter(|vm| want(vm, &me) == Want::Run)
                .cloned()
            else {
                continue;
            };
            if let Some(Slot::Idle(mut local)) = self.slots.remove(&name) {
                local.rec.restarts += 1;
                let rec = local.rec.clone();
                let task = tokio::spawn(tasks::start(self.ctx.clone(), local, vm, false));
                self.slots.insert(
                    name,
                    Slot::Busy {
                        rec: Box::new(rec),
                        task,
                    },
                );
            }
        }
    }

    /// Writes what is observed into the status of each VM placed here, when it differs.
    /// Returns the objects as written, for the cache.
    async fn report(&mut self) -> Vec<Vm> {
        let mut written = Vec::new();
        if !self.listed {
            return written;
        }
        let mut writes = Vec::new();
        for (name, slot) in &self.slots {
            let Slot::Idle(vm) = slot else { continue };
            let Some(obj) = self.placed.get(name) else {
                continue;
            };
            if obj.metadata.uid != vm.rec.uid
                || obj.status.placement.as_deref() != Some(self.ctx.cfg.name.as_str())
            {
                continue;
            }
            let want = observed(vm);
            let have = &obj.status;
            if have.state != want.state
                || have.ip != want.ip
                || have.boot_time != want.boot_time
                || have.message != want.message
                || have.agent != want.agent
                || have.lost_since.is_some()
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
                // Back (or never gone): whatever made it Lost is over.
                s.lost_since = None;
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
                    written.push(obj.clone());
                    self.placed.insert(name, obj);
                }
                Ok(None) => {
                    self.placed.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "cannot write VM status");
                    return written;
                }
            }
        }
        written
    }
}

/// Sets a VM's wanted power to Stopped after its guest powered itself off.
async fn want_off(ctx: Arc<Ctx>, name: String, uid: String) {
    let me = ctx.cfg.name.clone();
    let r = ctx
        .store
        .update::<VmSpec, _>(&name, |o| {
            if o.metadata.uid == uid && o.status.placement.as_deref() == Some(me.as_str()) {
                o.spec.power = Power::Stopped;
            }
            Ok(())
        })
        .await;
    match r {
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(vm = %name, error = %e, "cannot record that the guest powered off")
        }
    }
}

/// Tells the control plane a fetch for a move here failed; after the last attempt the move is
/// marked Failed (the source runs the VM again, the mover retries later).
async fn report_fetch_failure(
    ctx: Arc<Ctx>,
    name: String,
    uid: String,
    why: String,
    give_up: bool,
) {
    let me = ctx.cfg.name.clone();
    let r = ctx
        .store
        .update::<VmSpec, _>(&name, |o| {
            if o.metadata.uid != uid {
                return Ok(());
            }
            let stopped = o.status.state == VmState::Stopped && o.spec.power == Power::Running;
            let Some(m) = o
                .status
                .moving
                .as_mut()
                .filter(|m| m.to == me && m.phase == MovePhase::Copying)
            else {
                return Ok(());
            };
            m.message = Some(why.clone());
            if give_up {
                m.phase = MovePhase::Failed;
                m.since = moves::now_rfc3339();
                o.status.message = Some(format!("move failed: {why}"));
                if stopped {
                    // The source runs it again.
                    o.status.state = VmState::Scheduled;
                }
            }
            Ok(())
        })
        .await;
    match r {
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(vm = %name, error = %e, "cannot report the failed fetch"),
    }
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
    if let Some(why) = &vm.paused {
        s.state = VmState::Paused;
        s.message = Some(format!("paused by its vmm: {why}"));
    }
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
