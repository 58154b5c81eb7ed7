//! The scheduler and worker-health controllers against a real etcd, and their recovery after
//! etcd restarts.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{control_plane, eventually, register, Etcd, TTL};
use orchestrator::client::ApiClient;
use orchestrator::model::{ImageSpec, Vm, VmSpec, VmState, Worker, WorkerSpec, WorkerState};
use orchestrator::store::Store;

const LIMIT: Duration = Duration::from_secs(30);

fn vm(cpus: u32, memory: &str) -> VmSpec {
    VmSpec {
        cpus,
        memory: memory.parse().unwrap(),
        image: "base".into(),
        volumes: vec![],
        network: "default".into(),
        group: None,
        labels: Default::default(),
        cmdline: None,
        power: Default::default(),
    }
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

async fn worker_state(store: &Store, name: &str, state: WorkerState) -> Worker {
    eventually(&format!("{name} to be {state}"), LIMIT, || async {
        let w = store.get::<WorkerSpec>(name).await.ok()?;
        (w.status.state == state).then_some(w)
    })
    .await
}

async fn placed(store: &Store, name: &str) -> Vm {
    eventually(&format!("{name} to be placed"), LIMIT, || async {
        let vm = store.get::<VmSpec>(name).await.ok()?;
        (vm.status.state == VmState::Scheduled).then_some(vm)
    })
    .await
}

/// Workers' VMs, and a check that none holds more than its capacity.
fn by_worker(workers: &[Worker], vms: &[Vm]) -> BTreeMap<String, Vec<String>> {
    let mut on = BTreeMap::<String, Vec<String>>::new();
    for w in workers {
        let mine: Vec<&Vm> = vms
            .iter()
            .filter(|v| v.status.placement.as_deref() == Some(w.name()))
            .collect();
        let cpus: u32 = mine.iter().map(|v| v.spec.cpus).sum();
        let memory: u64 = mine.iter().map(|v| v.spec.memory.bytes()).sum();
        assert!(cpus <= w.spec.capacity.cpus, "{} over its CPUs", w.name());
        assert!(
            memory <= w.spec.capacity.memory.bytes(),
            "{} over its memory",
            w.name()
        );
        on.insert(
            w.name().to_string(),
            mine.iter().map(|v| v.name().to_string()).collect(),
        );
    }
    on
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_places_by_capacity_and_spreads_replicas() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let _big = register(&store, "big", 4, "4G").await;
    let _small = register(&store, "small", 2, "2G").await;
    // A worker object without an agent: never Ready, never given a VM.
    api.create("ghost", &common::worker_spec(64, "64G"))
        .await
        .unwrap();
    worker_state(&store, "big", WorkerState::Ready).await;
    worker_state(&store, "small", WorkerState::Ready).await;
    worker_state(&store, "ghost", WorkerState::NotReady).await;

    for i in 1..=4 {
        api.create(&format!("web-{i}"), &vm(1, "512M"))
            .await
            .unwrap();
    }
    for i in 1..=4 {
        placed(&store, &format!("web-{i}")).await;
    }
    let (workers, _) = store.list::<WorkerSpec>().await.unwrap();
    let (vms, _) = store.list::<VmSpec>().await.unwrap();
    let on = by_worker(&workers, &vms);
    // Spread: packing by free memory alone would put all four on "big".
    assert_eq!(on["big"].len(), 2, "{on:?}");
    assert_eq!(on["small"].len(), 2, "{on:?}");
    assert!(on["ghost"].is_empty());

    // big has 2 CPUs left, small none: 3 CPUs fit nowhere, 2 only on big.
    api.create("huge", &vm(3, "1G")).await.unwrap();
    api.create("db", &vm(2, "1G")).await.unwrap();
    assert_eq!(
        placed(&store, "db").await.status.placement.as_deref(),
        Some("big")
    );
    let huge = eventually("the scheduler to give up on huge", LIMIT, || async {
        let v = store.get::<VmSpec>("huge").await.ok()?;
        v.status.message.is_some().then_some(v)
    })
    .await;
    assert_eq!(huge.status.state, VmState::Pending);
    assert_eq!(huge.status.placement, None);
    assert!(
        huge.status
            .message
            .as_deref()
            .unwrap()
            .contains("no Ready worker has 3 CPUs"),
        "{huge:?}"
    );

    // Room appears: a new worker, and the waiting VM goes there (level-triggered).
    let _large = register(&store, "large", 8, "8G").await;
    let huge = placed(&store, "huge").await;
    assert_eq!(huge.status.placement.as_deref(), Some("large"));
    assert_eq!(huge.status.message, None);
    let (workers, _) = store.list::<WorkerSpec>().await.unwrap();
    let (vms, _) = store.list::<VmSpec>().await.unwrap();
    by_worker(&workers, &vms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_keeps_its_vms_until_forgotten_and_fresh_disks_are_explicit() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let w1 = register(&store, "w1", 2, "2G").await;
    let _w2 = register(&store, "w2", 2, "2G").await;
    let ready = worker_state(&store, "w1", WorkerState::Ready).await;
    assert!(ready.status.lease_id.is_some());
    worker_state(&store, "w2", WorkerState::Ready).await;
    api.create("app-1", &vm(1, "256M")).await.unwrap();
    api.create("app-2", &vm(1, "256M")).await.unwrap();
    let a1 = placed(&store, "app-1").await;
    let a2 = placed(&store, "app-2").await;
    let on_w1 = if a1.status.placement.as_deref() == Some("w1") {
        a1
    } else {
        a2
    };
    assert_eq!(
        on_w1.status.placement.as_deref(),
        Some("w1"),
        "spread over both"
    );

    // A live worker cannot be forgotten.
    let err = api
        .action::<WorkerSpec, _>("w1", "forget", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(hyper::StatusCode::CONFLICT), "{err}");

    // The agent on w1 dies: no resignation, its lease just runs out. The VM is Lost but stays
    // placed on w1: w1 may still run it.
    drop(w1);
    let gone = worker_state(&store, "w1", WorkerState::NotReady).await;
    assert_eq!(gone.status.lease_id, None);
    let lost = eventually("the VM on w1 to be Lost", LIMIT, || async {
        let v = store.get::<VmSpec>(on_w1.name()).await.ok()?;
        (v.status.state == VmState::Lost).then_some(v)
    })
    .await;
    assert_eq!(lost.status.placement.as_deref(), Some("w1"));
    assert!(lost.status.lost_since.is_some());
    assert!(lost.status.message.unwrap().contains("w1 is NotReady"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = store.get::<VmSpec>(on_w1.name()).await.unwrap();
    assert_eq!(
        still.status.placement.as_deref(),
        Some("w1"),
        "never placed elsewhere"
    );

    // Fresh disks are refused while its worker may come back.
    let err = api
        .action::<VmSpec, _>(
            on_w1.name(),
            "start",
            &serde_json::json!({"fresh_disks": true}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(hyper::StatusCode::CONFLICT), "{err}");

    // Forgotten: the VM loses its placement and waits, saying why.
    api.action::<WorkerSpec, _>("w1", "forget", &serde_json::json!({}))
        .await
        .unwrap();
    worker_state(&store, "w1", WorkerState::Forgotten).await;
    let waiting = eventually("the VM to be given up", LIMIT, || async {
        let v = store.get::<VmSpec>(on_w1.name()).await.ok()?;
        v.status.placement.is_none().then_some(v)
    })
    .await;
    assert_eq!(waiting.status.state, VmState::Lost);
    let why = waiting.status.message.unwrap();
    assert!(
        why.contains("disks lived only on worker w1") && why.contains("--fresh-disks"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = store.get::<VmSpec>(on_w1.name()).await.unwrap();
    assert_eq!(
        still.status.placement, None,
        "not placed without the operator"
    );
    let err = api
        .action::<VmSpec, _>(on_w1.name(), "start", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--fresh-disks"), "{err}");

    // The operator accepts the loss: placed again, on w2, the same VM.
    api.action::<VmSpec, _>(
        on_w1.name(),
        "start",
        &serde_json::json!({"fresh_disks": true}),
    )
    .await
    .unwrap();
    let moved = placed(&store, on_w1.name()).await;
    assert_eq!(moved.status.placement.as_deref(), Some("w2"));
    assert_eq!(moved.metadata.uid, on_w1.metadata.uid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_recover_after_etcd_restarts_and_nothing_is_lost() {
    let mut etcd = Etcd::start();
    let store = etcd.store().await;
    let plane = control_plane(&etcd, "cp").await;
    let api = api(plane.addr()).await;
    let _w1 = register(&store, "w1", 4, "4G").await;
    worker_state(&store, "w1", WorkerState::Ready).await;
    api.create("before", &vm(1, "256M")).await.unwrap();
    let before = placed(&store, "before").await;

    etcd.stop();
    let down = api.create("during", &vm(1, "256M")).await.unwrap_err();
    assert_eq!(down.status().map(|s| s.as_u16()), Some(503), "{down}");
    // Longer than the lease TTL: every leadership is given up locally; the worker's heartbeat
    // keeps renewing its lease until etcd answers (a restarted etcd extends its leases).
    tokio::time::sleep(TTL * 2).await;
    etcd.restart();

    // The API answers again once the store reconnects; the new VM gets placed, so the
    // scheduler is leading again.
    eventually("the API to accept writes", LIMIT, || async {
        match api.create("after", &vm(1, "256M")).await {
            Ok(_) => Some(()),
            Err(e) => {
                assert_eq!(e.status().map(|s| s.as_u16()), Some(503), "{e}");
                None
            }
        }
    })
    .await;
    let after = placed(&store, "after").await;
    assert_eq!(after.status.placement.as_deref(), Some("w1"));
    worker_state(&store, "w1", WorkerState::Ready).await;

    // Nothing lost: the VM from before is where it was, the refused one does not exist.
    let again = store.get::<VmSpec>("before").await.unwrap();
    assert_eq!(again.metadata.uid, before.metadata.uid);
    assert_eq!(again.status.placement.as_deref(), Some("w1"));
    assert!(!store.exists("vm", "during").await.unwrap());
    assert!(store.exists("image", "base").await.unwrap());
    let (vms, _) = store.list::<VmSpec>().await.unwrap();
    assert_eq!(vms.len(), 2);
}
