//! Scale groups, draining, lost workers and forgetting, against a real etcd and control planes,
//! with in-process fake workers (`orchestrator::sim`) that report what is placed on them Running
//! at once. What needs real processes, TAPs and disks is in tests/drain.rs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{control_plane, eventually, http_async, Etcd, TTL};
use orchestrator::client::ApiClient;
use orchestrator::model::{
    ByteSize, Capacity, ImageSpec, Power, ScaleGroup, ScaleGroupSpec, Seconds, UpdateStrategy, Vm,
    VmSpec, VmState, VmTemplate, VolumeSpec, VolumeTemplate, WorkerSpec, WorkerState,
};
use orchestrator::sim::FakeWorker;
use orchestrator::store::Store;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);

fn capacity(cpus: u32, memory: &str) -> Capacity {
    Capacity {
        cpus,
        memory: memory.parse().unwrap(),
    }
}

async fn fakes(store: &Store, names: &[&str], cpus: u32) -> Vec<FakeWorker> {
    let mut out = Vec::new();
    for n in names {
        out.push(
            FakeWorker::start(store, n, capacity(cpus, "64G"), TTL)
                .await
                .unwrap(),
        );
    }
    for n in names {
        eventually(&format!("{n} Ready"), LIMIT, || async {
            let w = store.get::<WorkerSpec>(n).await.ok()?;
            (w.status.state == WorkerState::Ready).then_some(())
        })
        .await;
    }
    out
}

async fn api(addr: std::net::SocketAddr) -> ApiClient {
    let api = ApiClient::new(&format!("https://{addr}"), LIMIT).unwrap();
    let image = ImageSpec {
        digest: None,
        path: Some("/img/base.qcow2".into()),
        format: Default::default(),
        size: None,
        kernel: None,
        initramfs: None,
        cmdline: None,
        boot: Default::default(),
    };
    api.create("base", &image).await.unwrap();
    api
}

fn group(replicas: u32) -> ScaleGroupSpec {
    ScaleGroupSpec {
        replicas,
        template: VmTemplate {
            cpus: 1,
            memory: ByteSize::mib(128),
            image: "base".into(),
            volumes: vec![],
            network: "default".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            cmdline: None,
        },
        update: UpdateStrategy::default(),
        replace_lost_after: Seconds(60),
    }
}

async fn members(store: &Store, g: &str) -> Vec<Vm> {
    let (vms, _) = store.list::<VmSpec>().await.unwrap();
    vms.into_iter()
        .filter(|vm| vm.metadata.owner.as_ref().is_some_and(|o| o.name == g))
        .collect()
}

/// Waits until the group has exactly `n` members, all Running, and its status says so.
async fn settled(store: &Store, g: &str, n: usize) -> Vec<Vm> {
    eventually(&format!("{g} settled at {n}"), LIMIT, || async {
        let m = members(store, g).await;
        let group = store.get::<ScaleGroupSpec>(g).await.ok()?;
        let s = &group.status;
        let ok = m.len() == n
            && m.iter().all(|vm| vm.status.state == VmState::Running)
            && s.observed_generation == group.metadata.generation
            && (s.members, s.ready, s.updated) == (n as u32, n as u32, n as u32);
        ok.then_some(m)
    })
    .await
}

fn workers_of(vms: &[Vm]) -> BTreeMap<String, usize> {
    let mut on = BTreeMap::new();
    for vm in vms {
        *on.entry(vm.status.placement.clone().unwrap_or_default())
            .or_default() += 1;
    }
    on
}

/// Counts Running members of a group every 20 ms in the background; the minimum seen and the
/// most members seen at once.
struct Sampler {
    stop: Arc<AtomicBool>,
    min_ready: Arc<AtomicUsize>,
    max_members: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(store: Store, g: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let min_ready = Arc::new(AtomicUsize::new(usize::MAX));
        let max_members = Arc::new(AtomicUsize::new(0));
        let (s, lo, hi, g) = (
            stop.clone(),
            min_ready.clone(),
            max_members.clone(),
            g.to_string(),
        );
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let m = members(&store, &g).await;
                let ready = m
                    .iter()
                    .filter(|vm| vm.status.state == VmState::Running)
                    .count();
                lo.fetch_min(ready, Ordering::Relaxed);
                hi.fetch_max(m.len(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Sampler {
            stop,
            min_ready,
            max_members,
            task,
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.min_ready.load(Ordering::Relaxed),
            self.max_members.load(Ordering::Relaxed),
        )
    }
}

async fn scale(api: &ApiClient, g: &str, n: u32) -> ScaleGroup {
    api.action::<ScaleGroupSpec, _>(g, "scale", &json!({ "replicas": n }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_down_spread_replace_and_delete() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let workers = fakes(&store, &["w1", "w2", "w3"], 8).await;

    let mut spec = group(0);
    spec.template.volumes = vec![VolumeTemplate {
        name: "data".into(),
        size: ByteSize::mib(64),
        image: None,
    }];
    api.create("web", &spec).await.unwrap();
    settled(&store, "web", 0).await;
    scale(&api, "web", 3).await;
    let three = settled(&store, "web", 3).await;
    assert_eq!(
        workers_of(&three).len(),
        3,
        "spread: {:?}",
        workers_of(&three)
    );
    for vm in &three {
        assert!(vm.name().starts_with("web-") && vm.name().len() == "web-".len() + 5);
        assert_eq!(vm.spec.group.as_deref(), Some("web"));
        assert_eq!(vm.spec.labels["app"], "web");
        assert_eq!(vm.spec.volumes, [format!("{}-data", vm.name())]);
        let vol = store
            .get::<VolumeSpec>(&format!("{}-data", vm.name()))
            .await
            .unwrap();
        assert_eq!(vol.spec.size, ByteSize::mib(64));
    }
    scale(&api, "web", 5).await;
    let five = settled(&store, "web", 5).await;
    assert!(workers_of(&five).len() >= 2);
    let five_names: BTreeSet<String> = five.iter().map(|v| v.name().to_string()).collect();
    assert!(
        three.iter().all(|v| five_names.contains(v.name())),
        "scale-up keeps members"
    );

    scale(&api, "web", 2).await;
    let two = settled(&store, "web", 2).await;
    assert!(
        workers_of(&two).len() == 2,
        "still spread: {:?}",
        workers_of(&two)
    );
    let kept: BTreeSet<String> = two.iter().map(|v| v.name().to_string()).collect();
    eventually(
        "deleted members gone from the workers and their volumes",
        LIMIT,
        || async {
            let running: BTreeSet<String> = workers.iter().flat_map(|w| w.running()).collect();
            let (vols, _) = store.list::<VolumeSpec>().await.ok()?;
            let vols: BTreeSet<String> = vols.iter().map(|v| v.name().to_string()).collect();
            let want_vols: BTreeSet<String> = kept.iter().map(|n| format!("{n}-data")).collect();
            (running == kept && vols == want_vols).then_some(())
        },
    )
    .await;

    // A member that fails is replaced by a new one.
    let victim = two[0].clone();
    store
        .update::<VmSpec, _>(victim.name(), |o| {
            o.status.state = VmState::Failed;
            o.status.message = Some("test: vmm crashed too often".into());
            Ok(())
        })
        .await
        .unwrap();
    let after = eventually("the failed member replaced", LIMIT, || async {
        let m = members(&store, "web").await;
        let fine = m.len() == 2
            && m.iter().all(|v| v.status.state == VmState::Running)
            && !m.iter().any(|v| v.name() == victim.name());
        fine.then_some(m)
    })
    .await;
    assert!(after.iter().any(|v| v.name() == two[1].name()));

    // Deleting the group deletes its members and their volumes.
    api.delete::<ScaleGroupSpec>("web").await.unwrap();
    eventually(
        "members and volumes of the deleted group gone",
        LIMIT,
        || async {
            let (vms, _) = store.list::<VmSpec>().await.ok()?;
            let (vols, _) = store.list::<VolumeSpec>().await.ok()?;
            let running: usize = workers.iter().map(|w| w.running().len()).sum();
            (vms.is_empty() && vols.is_empty() && running == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_replaces_members_surge_first_and_moves_standalone_vms() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let workers = fakes(&store, &["w1", "w2", "w3"], 8).await;
    api.create("web", &group(4)).await.unwrap();
    let before = settled(&store, "web", 4).await;
    let victim = before[0].status.placement.clone().unwrap();
    // A standalone VM on the same worker: cold-moved (the fakes move no data).
    let mut solo = group(0).template.member_spec("solo", "solo");
    solo.group = None;
    api.create("solo", &solo).await.unwrap();
    let solo_on = eventually("solo running", LIMIT, || async {
        let v = store.get::<VmSpec>("solo").await.ok()?;
        (v.status.state == VmState::Running).then_some(v.status.placement?)
    })
    .await;
    // Bring solo to the victim worker if the scheduler put it elsewhere.
    let victim = if solo_on == victim { victim } else { solo_on };

    let sampler = Sampler::start(store.clone(), "web");
    api.action::<WorkerSpec, _>(&victim, "drain", &json!({}))
        .await
        .unwrap();
    eventually(&format!("{victim} Drained"), LIMIT, || async {
        let w = store.get::<WorkerSpec>(&victim).await.ok()?;
        (w.status.state == WorkerState::Drained).then_some(())
    })
    .await;
    let after = settled(&store, "web", 4).await;
    let (min_ready, max_members) = sampler.finish().await;
    assert!(
        min_ready >= 4,
        "ready members dipped to {min_ready} during the drain"
    );
    assert!(
        max_members <= 5,
        "more than one surge member at once: {max_members}"
    );
    assert!(after
        .iter()
        .all(|v| v.status.placement.as_deref() != Some(victim.as_str())));
    let w = workers.iter().find(|w| w.name() == victim).unwrap();
    eventually("nothing runs on the drained worker", LIMIT, || async {
        w.running().is_empty().then_some(())
    })
    .await;
    let solo = eventually("solo moved and running", LIMIT, || async {
        let v = store.get::<VmSpec>("solo").await.ok()?;
        (v.status.state == VmState::Running && v.status.moving.is_none()).then_some(v)
    })
    .await;
    assert_ne!(solo.status.placement.as_deref(), Some(victim.as_str()));

    // Nothing new goes to a drained worker; uncordoned, it takes VMs again.
    scale(&api, "web", 6).await;
    let six = settled(&store, "web", 6).await;
    assert!(six
        .iter()
        .all(|v| v.status.placement.as_deref() != Some(victim.as_str())));
    api.action::<WorkerSpec, _>(&victim, "uncordon", &json!({}))
        .await
        .unwrap();
    eventually(&format!("{victim} Ready"), LIMIT, || async {
        let w = store.get::<WorkerSpec>(&victim).await.ok()?;
        (w.status.state == WorkerState::Ready).then_some(())
    })
    .await;
    scale(&api, "web", 9).await;
    let nine = settled(&store, "web", 9).await;
    assert!(nine
        .iter()
        .any(|v| v.status.placement.as_deref() == Some(victim.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_replaces_one_at_a_time() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let _workers = fakes(&store, &["w1", "w2"], 8).await;
    api.create("web", &group(3)).await.unwrap();
    let old = settled(&store, "web", 3).await;

    let sampler = Sampler::start(store.clone(), "web");
    let mut g = api.get::<ScaleGroupSpec>("web").await.unwrap();
    g.spec.template.cmdline = Some("lbversion=2".into());
    api.replace(&g).await.unwrap();
    let new = eventually("every member replaced", LIMIT, || async {
        let m = settled(&store, "web", 3).await;
        m.iter()
            .all(|v| v.spec.cmdline.as_deref() == Some("lbversion=2"))
            .then_some(m)
    })
    .await;
    let (min_ready, max_members) = sampler.finish().await;
    assert!(min_ready >= 3, "ready members dipped to {min_ready}");
    assert!(
        max_members <= 4,
        "surge above 1: {max_members} members at once"
    );
    let old: BTreeSet<&str> = old.iter().map(|v| v.name()).collect();
    assert!(
        new.iter().all(|v| !old.contains(v.name())),
        "every member is new"
    );

    // With max_unavailable 1 and no surge, one member goes before its successor comes.
    let mut g = api.get::<ScaleGroupSpec>("web").await.unwrap();
    g.spec.update = UpdateStrategy {
        max_surge: 0,
        max_unavailable: 1,
    };
    g.spec.template.cmdline = Some("lbversion=3".into());
    let sampler = Sampler::start(store.clone(), "web");
    api.replace(&g).await.unwrap();
    eventually("every member replaced again", LIMIT, || async {
        let m = settled(&store, "web", 3).await;
        m.iter()
            .all(|v| v.spec.cmdline.as_deref() == Some("lbversion=3"))
            .then_some(())
    })
    .await;
    let (min_ready, max_members) = sampler.finish().await;
    assert!(
        min_ready >= 2,
        "more than one unavailable: {min_ready} ready"
    );
    assert!(max_members <= 3, "surged with max_surge 0: {max_members}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_members_are_replaced_after_the_grace_period_and_volumes_wait() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let mut workers = fakes(&store, &["w1", "w2"], 8).await;
    let mut web = group(2);
    web.replace_lost_after = Seconds(6);
    api.create("web", &web).await.unwrap();
    let mut db = group(2);
    db.replace_lost_after = Seconds(1);
    db.template.volumes = vec![VolumeTemplate {
        name: "data".into(),
        size: ByteSize::mib(64),
        image: None,
    }];
    api.create("db", &db).await.unwrap();
    let web_before = settled(&store, "web", 2).await;
    let db_before = settled(&store, "db", 2).await;
    let on_w1 = |vms: &[Vm]| {
        vms.iter()
            .filter(|v| v.status.placement.as_deref() == Some("w1"))
            .map(|v| v.name().to_string())
            .collect::<Vec<_>>()
    };
    let (web_lost, db_lost) = (on_w1(&web_before), on_w1(&db_before));
    assert_eq!(
        (web_lost.len(), db_lost.len()),
        (1, 1),
        "spread over both workers"
    );

    // w1's agent dies; its VMs run on.
    workers[0].stop_agent().await;
    eventually("w1's VMs Lost", LIMIT, || async {
        let v = store.get::<VmSpec>(&web_lost[0]).await.ok()?;
        (v.status.state == VmState::Lost).then_some(())
    })
    .await;
    // Within the grace period nothing of it starts elsewhere.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        members(&store, "web").await.len(),
        2,
        "no replacement within the grace"
    );
    // After it, the member without volumes is replaced on w2.
    let web_after = settled(&store, "web", 2).await;
    assert!(web_after
        .iter()
        .all(|v| v.status.placement.as_deref() == Some("w2")));
    assert!(!web_after.iter().any(|v| v.name() == web_lost[0]));
    // The member with a volume stays Lost on w1, however long it has been.
    let db_now = members(&store, "db").await;
    assert_eq!(db_now.len(), 2);
    let lost = db_now.iter().find(|v| v.name() == db_lost[0]).unwrap();
    assert_eq!(lost.status.state, VmState::Lost);
    assert_eq!(lost.status.placement.as_deref(), Some("w1"));
    let g = store.get::<ScaleGroupSpec>("db").await.unwrap();
    assert!(
        g.status
            .conditions
            .iter()
            .any(|c| c.kind == "Degraded" && c.message.contains("Lost")),
        "{:?}",
        g.status.conditions
    );

    // The agent comes back: it re-adopts the member with its volume, drops the replaced one.
    workers[0].resume().await.unwrap();
    settled(&store, "db", 2).await;
    let back = store.get::<VmSpec>(&db_lost[0]).await.unwrap();
    assert_eq!(back.status.placement.as_deref(), Some("w1"));
    assert_eq!(back.status.lost_since, None);
    eventually("the replaced member stopped on w1", LIMIT, || async {
        (!workers[0].running().contains(&web_lost[0])).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_worker_gives_up_its_vms_and_fresh_disks_are_explicit() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let mut workers = fakes(&store, &["w1", "w2"], 8).await;
    api.create(
        "data",
        &VolumeSpec {
            image: "base".into(),
            size: ByteSize::mib(64),
        },
    )
    .await
    .unwrap();
    let mut db = group(0).template.member_spec("db", "db");
    db.group = None;
    db.volumes = vec!["data".into()];
    api.create("db", &db).await.unwrap();
    let db_on = eventually("db running", LIMIT, || async {
        let v = store.get::<VmSpec>("db").await.ok()?;
        (v.status.state == VmState::Running).then_some(v.status.placement?)
    })
    .await;
    // The fakes make no files, so they do not claim volumes: the test claims it for db's worker
    // as a real agent would.
    store
        .update::<VolumeSpec, _>("data", |o| {
            o.status.worker = Some(db_on.clone());
            Ok(())
        })
        .await
        .unwrap();
    let dead = db_on.clone();
    let other = if dead == "w1" { "w2" } else { "w1" };
    let idx = workers.iter().position(|w| w.name() == dead).unwrap();
    let mut gone = workers.remove(idx);
    gone.stop_agent().await;
    eventually("db Lost", LIMIT, || async {
        let v = store.get::<VmSpec>("db").await.ok()?;
        (v.status.state == VmState::Lost).then_some(())
    })
    .await;
    api.action::<WorkerSpec, _>(&dead, "forget", &json!({}))
        .await
        .unwrap();
    let lost = eventually("db given up", LIMIT, || async {
        let v = store.get::<VmSpec>("db").await.ok()?;
        v.status.placement.is_none().then_some(v)
    })
    .await;
    assert_eq!(lost.status.state, VmState::Lost);
    let why = lost.status.message.unwrap();
    assert!(
        why.contains(&format!("worker {dead}, which was forgotten")),
        "{why}"
    );
    let vol = store.get::<VolumeSpec>("data").await.unwrap();
    assert_eq!(vol.status.worker, None);
    assert!(vol.status.lost.is_some());

    // The old worker comes back: it runs none of its old VMs and serves again.
    gone.resume().await.unwrap();
    eventually(&format!("{dead} Ready again"), LIMIT, || async {
        let w = store.get::<WorkerSpec>(&dead).await.ok()?;
        (w.status.state == WorkerState::Ready && !w.spec.forgotten).then_some(())
    })
    .await;
    assert!(gone.running().is_empty(), "{:?}", gone.running());
    let still = store.get::<VmSpec>("db").await.unwrap();
    assert_eq!(
        still.status.placement, None,
        "not placed without the operator"
    );

    // The operator accepts the loss.
    let err = api
        .action::<VmSpec, _>("db", "start", &json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--fresh-disks"), "{err}");
    api.action::<VmSpec, _>("db", "start", &json!({"fresh_disks": true}))
        .await
        .unwrap();
    let started = eventually("db on fresh disks", LIMIT, || async {
        let v = store.get::<VmSpec>("db").await.ok()?;
        (v.status.state == VmState::Running).then_some(v)
    })
    .await;
    assert!(started.status.placement.is_some());
    let _ = other;
    assert_eq!(
        store.get::<VolumeSpec>("data").await.unwrap().status.lost,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_stop_and_start() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let workers = fakes(&store, &["w1"], 8).await;
    let spec = group(0).template.member_spec("solo", "solo");
    api.create(
        "solo",
        &VmSpec {
            group: None,
            ..spec
        },
    )
    .await
    .unwrap();
    let state = |want: VmState| {
        let store = store.clone();
        async move {
            eventually(&format!("solo {want}"), LIMIT, || async {
                let v = store.get::<VmSpec>("solo").await.ok()?;
                (v.status.state == want).then_some(v)
            })
            .await
        }
    };
    state(VmState::Running).await;
    let v = api
        .action::<VmSpec, _>("solo", "stop", &json!({}))
        .await
        .unwrap();
    assert_eq!(v.spec.power, Power::Stopped);
    state(VmState::Stopped).await;
    assert!(workers[0].running().is_empty());
    api.action::<VmSpec, _>("solo", "start", &json!({}))
        .await
        .unwrap();
    let v = state(VmState::Running).await;
    assert_eq!(v.status.placement.as_deref(), Some("w1"));
    assert!(workers[0].running().contains("solo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_in_the_middle_of_a_scale_up_leaves_an_exact_end_state() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let a = control_plane(&etcd, "cp-a").await;
    let api_a = api(a.addr()).await;
    let _workers = fakes(&store, &["w1", "w2", "w3", "w4"], 64).await;
    // cp-a leads the scale-group controller before cp-b starts and before the work arrives.
    eventually("cp-a leading scale-groups", LIMIT, || async {
        let e = store
            .get_raw(&orchestrator::store::keys::leader("scale-groups"))
            .await
            .ok()??;
        String::from_utf8_lossy(&e.value)
            .contains("cp-a")
            .then_some(())
    })
    .await;
    let b = control_plane(&etcd, "cp-b").await;
    const N: usize = 150;
    api_a.create("web", &group(N as u32)).await.unwrap();
    let at_crash = eventually("the scale-up under way", LIMIT, || async {
        let n = members(&store, "web").await.len();
        (n >= 5).then_some(n)
    })
    .await;
    // Crash cp-a mid-way: nothing resigned; cp-b takes over after the lease.
    drop(a);
    assert!(
        at_crash < N,
        "the scale-up was over before the crash ({at_crash} members)"
    );
    let done = settled(&store, "web", N).await;
    let names: BTreeSet<&str> = done.iter().map(|v| v.name()).collect();
    assert_eq!(names.len(), N);
    // And it stays exact: no late write from the dead leader, nothing more from the new one.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(members(&store, "web").await.len(), N);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_written() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let _api = api(plane.addr()).await;
    let addr = plane.addr();
    let body = |replicas: &str, image: &str| {
        format!(
            r#"{{"metadata":{{"name":"web"}},"spec":{{"replicas":{replicas},"template":{{"cpus":1,"memory":"128M","image":"{image}"}}}}}}"#
        )
    };
    let cases = [
        (
            "POST",
            "/api/v1/scalegroups",
            body("-1", "base"),
            400,
            "spec.replicas",
        ),
        (
            "POST",
            "/api/v1/scalegroups",
            body("10001", "base"),
            422,
            "spec.replicas",
        ),
        (
            "POST",
            "/api/v1/scalegroups",
            body("99999999999", "base"),
            400,
            "spec.replicas",
        ),
        (
            "POST",
            "/api/v1/scalegroups",
            body("3", "nope"),
            422,
            "image \"nope\" not found",
        ),
        (
            "POST",
            "/api/v1/workers/nope/drain",
            "{}".into(),
            404,
            "worker \"nope\" not found",
        ),
        (
            "POST",
            "/api/v1/workers/nope/forget",
            "{}".into(),
            404,
            "not found",
        ),
        (
            "POST",
            "/api/v1/scalegroups/nope/scale",
            r#"{"replicas":2}"#.into(),
            404,
            "not found",
        ),
        (
            "POST",
            "/api/v1/vms/nope/start",
            "{}".into(),
            404,
            "not found",
        ),
        (
            "POST",
            "/api/v1/vms/nope/start",
            r#"{"fresh":true}"#.into(),
            400,
            "unknown field",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let (got, json) = http_async(addr, method, path, Some(&body)).await;
        assert_eq!(got, status, "{method} {path} {body}: {json}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle),
            "{method} {path}: {json} lacks {needle}"
        );
    }
    let (groups, _) = store.list::<ScaleGroupSpec>().await.unwrap();
    let (workers, _) = store.list::<WorkerSpec>().await.unwrap();
    let (vms, _) = store.list::<VmSpec>().await.unwrap();
    assert!(groups.is_empty() && workers.is_empty() && vms.is_empty());

    // A scale beyond the limit leaves the group as it was.
    let (got, _) = http_async(
        addr,
        "POST",
        "/api/v1/scalegroups",
        Some(&body("2", "base")),
    )
    .await;
    assert_eq!(got, 201);
    let (got, json) = http_async(
        addr,
        "POST",
        "/api/v1/scalegroups/web/scale",
        Some(r#"{"replicas":20000}"#),
    )
    .await;
    assert_eq!(got, 422, "{json}");
    assert_eq!(
        store
            .get::<ScaleGroupSpec>("web")
            .await
            .unwrap()
            .spec
            .replicas,
        2
    );
}
