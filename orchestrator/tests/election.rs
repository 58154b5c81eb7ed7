//! Leader election and fencing against a real etcd, and two control planes failing over.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{control_plane, eventually, register, Etcd, TTL};
use orchestrator::client::ApiClient;
use orchestrator::election::Elector;
use orchestrator::model::{ByteSize, ImageSpec, Metadata, Object, VmSpec};
use orchestrator::store::{keys, ActionRecord, ChangeKind, Store, StoreError};

fn image(name: &str, path: &str) -> Object<ImageSpec> {
    Object {
        metadata: Metadata {
            name: name.into(),
            ..Metadata::default()
        },
        spec: ImageSpec {
            digest: None,
            path: Some(path.into()),
            format: Default::default(),
            size: None,
            kernel: None,
            initramfs: None,
            cmdline: None,
            boot: Default::default(),
        },
        status: Default::default(),
    }
}

#[tokio::test]
async fn a_deposed_leader_cannot_write() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let a = Elector::new(store.clone(), "test", "holder-a", TTL);
    let leader_a = a.campaign().await.unwrap();
    let as_a = store.fenced(leader_a.fence().clone());
    as_a.create(image("one", "/a")).await.unwrap();

    // What lease expiry does while A is paused (GC, stopped VM): its key goes away. A still
    // holds its Leadership and does not know.
    let mut raw = etcd.client().await;
    raw.delete(keys::leader("test"), None).await.unwrap();
    let b = Elector::new(store.clone(), "test", "holder-b", TTL);
    let leader_b = b.campaign().await.unwrap();
    assert!(leader_b.fence().token > leader_a.fence().token);

    let stale_update = as_a
        .update::<ImageSpec, _>("one", |o| {
            o.spec.path = Some("/stale".into());
            Ok(())
        })
        .await;
    assert!(
        matches!(stale_update, Err(StoreError::Deposed { .. })),
        "{stale_update:?}"
    );
    let stale_create = as_a.create(image("two", "/a")).await;
    assert!(
        matches!(stale_create, Err(StoreError::Deposed { .. })),
        "{stale_create:?}"
    );
    let stale_delete = as_a.delete::<ImageSpec>("one", None).await;
    assert!(
        matches!(stale_delete, Err(StoreError::Deposed { .. })),
        "{stale_delete:?}"
    );

    let as_b = store.fenced(leader_b.fence().clone());
    as_b.update::<ImageSpec, _>("one", |o| {
        o.spec.path = Some("/b".into());
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        store
            .get::<ImageSpec>("one")
            .await
            .unwrap()
            .spec
            .path
            .as_deref(),
        Some("/b")
    );
    assert!(!store.exists("image", "two").await.unwrap());
    let last = store.get_raw(&keys::action("test")).await.unwrap().unwrap();
    let last: ActionRecord = serde_json::from_slice(&last.value).unwrap();
    assert_eq!(last.holder, "holder-b");
    assert_eq!(last.token, leader_b.fence().token);
}

#[tokio::test]
async fn a_candidate_waits_for_the_leader_to_resign() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let leader = Elector::new(store.clone(), "test", "first", TTL)
        .campaign()
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let store = store.clone();
        async move {
            Elector::new(store, "test", "second", TTL)
                .campaign()
                .await
                .unwrap()
        }
    });
    // Long enough for the candidate to have tried and been refused (its campaign renews its
    // own lease meanwhile, so waiting past the TTL is part of the test).
    tokio::time::sleep(TTL * 2).await;
    assert!(!waiting.is_finished(), "a second leader was elected");
    let first_token = leader.fence().token;
    leader.resign(&store).await.unwrap();
    let second = waiting.await.unwrap();
    assert!(second.fence().token > first_token);
    assert_eq!(second.fence().holder, "second");
}

async fn leader_of(store: &Store, controller: &str) -> Option<String> {
    let e = store.get_raw(&keys::leader(controller)).await.ok()??;
    Some(String::from_utf8_lossy(&e.value).into_owned())
}

const CONTROLLERS: [&str; 2] = ["scheduler", "worker-health"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_control_plane_is_replaced_and_leaders_never_overlap() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let limit = Duration::from_secs(30);

    let a = control_plane(&etcd, "cp-a").await;
    for c in CONTROLLERS {
        eventually("cp-a to lead", limit, || async {
            (leader_of(&store, c).await.as_deref() == Some("cp-a")).then_some(())
        })
        .await;
    }
    let b = control_plane(&etcd, "cp-b").await;

    // Work for cp-a's controllers: two workers come up, two VMs need places.
    let w1 = register(&store, "w1", 4, "4G").await;
    let _w2 = register(&store, "w2", 4, "4G").await;
    let api_a = ApiClient::new(&a.url(), limit).unwrap();
    api_a
        .create("base", &image("base", "/img/base.qcow2").spec)
        .await
        .unwrap();
    for name in ["web-1", "web-2"] {
        api_a.create(name, &vm_spec()).await.unwrap();
    }
    wait_placed(&store, &["web-1", "web-2"]).await;

    // Crash cp-a: every task aborted, nothing resigned.
    let crashed = Instant::now();
    drop(a);
    for c in CONTROLLERS {
        eventually("cp-b to take over", limit, || async {
            (leader_of(&store, c).await.as_deref() == Some("cp-b")).then_some(())
        })
        .await;
    }
    let takeover = crashed.elapsed();
    eprintln!("cp-b leads every controller {takeover:?} after cp-a crashed (TTL {TTL:?})");
    // The lease runs out at most a TTL after the last renewal; etcd checks expiry every
    // 500 ms and the watch and transaction take a little more.
    assert!(
        takeover <= TTL + Duration::from_secs(3),
        "takeover took {takeover:?}, TTL is {TTL:?}"
    );

    // Work for cp-b's controllers: a new VM, and a worker whose agent dies.
    let api_b = ApiClient::new(&b.url(), limit).unwrap();
    api_b.create("web-3", &vm_spec()).await.unwrap();
    wait_placed(&store, &["web-3"]).await;
    drop(w1);
    eventually(
        "the VMs on w1 Lost (kept there: w1 may still run them)",
        limit,
        || async {
            let (vms, _) = store.list::<VmSpec>().await.ok()?;
            vms.iter()
                .all(|vm| {
                    vm.status.placement.as_deref() == Some("w2")
                        || (vm.status.placement.as_deref() == Some("w1")
                            && vm.status.state == orchestrator::model::VmState::Lost)
                })
                .then_some(())
        },
    )
    .await;

    // The record: every action happened while its writer held the leadership it claims.
    let acted = check_history(&etcd).await;
    for c in CONTROLLERS {
        for holder in ["cp-a", "cp-b"] {
            assert!(
                acted
                    .get(&(c.to_string(), holder.to_string()))
                    .copied()
                    .unwrap_or(0)
                    > 0,
                "{holder} never acted as {c}: {acted:?}"
            );
        }
    }
    drop(b);
}

fn vm_spec() -> VmSpec {
    VmSpec {
        cpus: 1,
        memory: ByteSize::mib(256),
        image: "base".into(),
        volumes: vec![],
        network: "default".into(),
        group: None,
        labels: Default::default(),
        cmdline: None,
        power: Default::default(),
    }
}

async fn wait_placed(store: &Store, names: &[&str]) {
    for name in names {
        eventually("a placement", Duration::from_secs(30), || async {
            store
                .get::<VmSpec>(name)
                .await
                .ok()?
                .status
                .placement
                .map(drop)
        })
        .await;
    }
}

/// Replays the history of the leader keys and action records from revision 1 and checks that
/// each action carries the token and holder of the leadership live at its revision. Returns
/// the number of actions per (controller, holder).
async fn check_history(etcd: &Etcd) -> BTreeMap<(String, String), usize> {
    let store = etcd.store().await;
    let end = format!("{}_end", keys::ROOT);
    let mut raw = etcd.client().await;
    raw.put(end.as_str(), "", None).await.unwrap();
    let mut watch = store.watch(&format!("{}_", keys::ROOT), 1).await.unwrap();
    let mut live: BTreeMap<String, Option<(i64, String)>> = BTreeMap::new();
    let mut acted = BTreeMap::new();
    loop {
        let change = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("history replay stalled")
            .unwrap();
        if change.key == end {
            return acted;
        }
        for c in CONTROLLERS {
            if change.key == keys::leader(c) {
                let now = match change.kind {
                    ChangeKind::Put => {
                        assert_eq!(
                            change.create_revision, change.revision,
                            "leader keys are only ever created"
                        );
                        let holder = String::from_utf8_lossy(&change.value).into_owned();
                        Some((change.create_revision, holder))
                    }
                    ChangeKind::Delete => None,
                };
                live.insert(c.to_string(), now);
            } else if change.key == keys::action(c) {
                let record: ActionRecord = serde_json::from_slice(&change.value).unwrap();
                let leader = live.get(c).cloned().flatten();
                assert_eq!(
                    leader,
                    Some((record.token, record.holder.clone())),
                    "{c} action {:?} at revision {} by {} (token {}) while the leadership was {leader:?}",
                    record.action,
                    change.revision,
                    record.holder,
                    record.token
                );
                *acted.entry((c.to_string(), record.holder)).or_insert(0) += 1;
            }
        }
    }
}
