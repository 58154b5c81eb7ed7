//! In-process stand-ins for worker agents, for tests and simulations of the control plane at
//! scale (`benches`' cluster simulation): each registers like an agent, watches the VMs and
//! reports every VM placed on it Running at once (no process, no disk), follows `vm stop`, and
//! plays both ends of moves without copying anything. Its heartbeat can be stopped while its
//! "VMs" keep running (an agent crash), and it honours `worker forget` like the real agent:
//! back after being forgotten, it drops its old VMs before it serves again.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::model::{Capacity, MovePhase, Power, Vm, VmSpec, VmState, WorkerSpec};
use crate::registration::Registration;
use crate::store::{Cache, Store, StoreError};
use crate::worker::want::{concerns, want, Want};

/// A fake worker; dropping it is a crash of the whole host (its VMs are gone with it).
pub struct FakeWorker {
    name: String,
    store: Store,
    capacity: Capacity,
    ttl: Duration,
    serving: Option<String>,
    running: Arc<Mutex<BTreeSet<String>>>,
    agent: Option<(CancellationToken, JoinHandle<()>)>,
}

impl FakeWorker {
    /// Registers `name` and starts serving.
    pub async fn start(
        store: &Store,
        name: &str,
        capacity: Capacity,
        ttl: Duration,
    ) -> Result<FakeWorker, StoreError> {
        FakeWorker::start_serving(store, name, capacity, ttl, None).await
    }

    /// Like [`FakeWorker::start`], registering `endpoint` as where its worker API is served
    /// (a test serves it) and giving VMs loopback addresses (127.x.y.z), on which a test can
    /// serve as them.
    pub async fn start_serving(
        store: &Store,
        name: &str,
        capacity: Capacity,
        ttl: Duration,
        endpoint: Option<String>,
    ) -> Result<FakeWorker, StoreError> {
        let mut w = FakeWorker {
            name: name.to_string(),
            store: store.unfenced(),
            capacity,
            ttl,
            serving: endpoint,
            running: Arc::new(Mutex::new(BTreeSet::new())),
            agent: None,
        };
        w.resume().await?;
        Ok(w)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VMs it runs now.
    pub fn running(&self) -> BTreeSet<String> {
        self.running.lock().unwrap().clone()
    }

    /// The agent dies: no heartbeat, no reports; its VMs keep running.
    pub async fn stop_agent(&mut self) {
        if let Some((stop, task)) = self.agent.take() {
            stop.cancel();
            let _ = task.await;
        }
    }

    /// The agent comes back (registering again) and carries on with the VMs it has.
    pub async fn resume(&mut self) -> Result<(), StoreError> {
        self.stop_agent().await;
        let spec = WorkerSpec {
            capacity: self.capacity,
            labels: Default::default(),
            drain: false,
            forgotten: false,
            // Unless a test serves one, nothing listens there: the fakes play moves without
            // copying anything.
            endpoint: Some(
                self.serving
                    .clone()
                    .unwrap_or_else(|| format!("{}.fake.invalid:7071", self.name)),
            ),
        };
        let registration = Registration::register(&self.store, &self.name, spec, self.ttl).await?;
        let stop = CancellationToken::new();
        let agent = Agent {
            name: self.name.clone(),
            store: self.store.clone(),
            running: self.running.clone(),
            loopback: self.serving.is_some(),
        };
        let token = stop.clone();
        let task = tokio::spawn(async move {
            agent.run(token).await;
            drop(registration);
        });
        self.agent = Some((stop, task));
        Ok(())
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.agent.take() {
            stop.cancel();
            task.abort();
        }
    }
}

struct Agent {
    name: String,
    store: Store,
    running: Arc<Mutex<BTreeSet<String>>>,
    /// VMs get 127.x.y.z addresses (a test serves on them).
    loopback: bool,
}

impl Agent {
    async fn run(self, stop: CancellationToken) {
        loop {
            let r = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.serve(&stop) => r,
            };
            if let Err(e) = r {
                tracing::debug!(worker = %self.name, error = %e, "fake worker: retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }

    async fn serve(&self, stop: &CancellationToken) -> Result<(), StoreError> {
        self.fence().await?;
        let mut vms: Cache<VmSpec> = Cache::new();
        loop {
            vms.ensure(&self.store).await?;
            let mine: Vec<Vm> = vms
                .objects()
                .values()
                .filter(|vm| concerns(vm, &self.name))
                .cloned()
                .collect();
            let keep: BTreeSet<&str> = mine.iter().map(|vm| vm.name()).collect();
            self.running
                .lock()
                .unwrap()
                .retain(|n| keep.contains(n.as_str()));
            for vm in &mine {
                if let Some(obj) = self.act(vm).await? {
                    vms.note(obj);
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = vms.changed() => r?,
            }
        }
    }

    /// Back after `worker forget`: its old VMs are dropped, and it serves again only once the
    /// control plane took every VM off it.
    async fn fence(&self) -> Result<(), StoreError> {
        if !self
            .store
            .get::<WorkerSpec>(&self.name)
            .await?
            .spec
            .forgotten
        {
            return Ok(());
        }
        self.running.lock().unwrap().clear();
        loop {
            let (vms, _) = self.store.list::<VmSpec>().await?;
            if !vms.iter().any(|vm| concerns(vm, &self.name)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.store
            .update::<WorkerSpec, _>(&self.name, |o| {
                o.spec.forgotten = false;
                Ok(())
            })
            .await
            .map(drop)
    }

    /// Does what the VM needs from this worker; the object as written, if it wrote.
    async fn act(&self, vm: &Vm) -> Result<Option<Vm>, StoreError> {
        let me = self.name.as_str();
        let name = vm.name();
        let uid = vm.metadata.uid.clone();
        let w = want(vm, me);
        match w {
            Want::Run => {
                self.running.lock().unwrap().insert(name.to_string());
            }
            Want::Off | Want::Surrender | Want::Hold => {
                self.running.lock().unwrap().remove(name);
            }
            Want::Rest | Want::Fetch | Want::Ignore => {}
        }
        let mut ip = fake_ip(me, name);
        if self.loopback {
            let o = ip.octets();
            ip = Ipv4Addr::new(127, o[1], o[2], o[3]);
        }
        let needed = match w {
            Want::Run => {
                vm.status.state != VmState::Running
                    || vm.status.ip.is_none()
                    || vm.status.lost_since.is_some()
            }
            Want::Off => vm.status.state != VmState::Stopped,
            Want::Surrender | Want::Fetch => true,
            Want::Rest | Want::Hold | Want::Ignore => false,
        };
        if !needed {
            return Ok(None);
        }
        let r = self
            .store
            .update::<VmSpec, _>(name, |o| {
                if o.metadata.uid != uid || want(o, me) != w {
                    return Ok(());
                }
                match w {
                    Want::Run => {
                        o.status.state = VmState::Running;
                        o.status.ip = Some(ip.to_string());
                        o.status.message = None;
                        o.status.lost_since = None;
                        if o.status.boot_time.is_none() {
                            o.status.boot_time = Some(crate::worker::moves::now_rfc3339());
                        }
                    }
                    Want::Off => {
                        o.status.state = VmState::Stopped;
                        o.status.ip = None;
                        o.status.lost_since = None;
                    }
                    Want::Surrender => {
                        o.status.state = VmState::Stopped;
                        o.status.ip = None;
                        if let Some(m) = &mut o.status.moving {
                            m.phase = MovePhase::Copying;
                            m.since = crate::worker::moves::now_rfc3339();
                        }
                    }
                    Want::Fetch => {
                        o.status.placement = Some(me.to_string());
                        o.status.state = match o.spec.power {
                            Power::Running => VmState::Scheduled,
                            Power::Stopped => VmState::Stopped,
                        };
                        if let Some(m) = &mut o.status.moving {
                            m.phase = MovePhase::Starting;
                            m.since = crate::worker::moves::now_rfc3339();
                        }
                    }
                    Want::Rest | Want::Hold | Want::Ignore => {}
                }
                Ok(())
            })
            .await;
        match r {
            Ok(o) if o.metadata.resource_version != vm.metadata.resource_version => Ok(Some(o)),
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A stable address per worker and VM (nothing routes to it).
fn fake_ip(worker: &str, vm: &str) -> Ipv4Addr {
    let h = format!("{worker}/{vm}")
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    Ipv4Addr::new(10, 250, (h >> 8) as u8, (h as u8).max(2))
}
