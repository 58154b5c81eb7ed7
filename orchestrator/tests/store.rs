//! The typed store against a real etcd: transactional read-modify-write, ordered watches,
//! create/update/delete semantics.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use common::Etcd;
use orchestrator::model::{FieldError, Metadata, Object, Spec};
use orchestrator::store::{Event, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CounterSpec {
    value: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
struct NoStatus {}

impl Spec for CounterSpec {
    type Status = NoStatus;
    const KIND: &'static str = "counter";
    const PLURAL: &'static str = "counters";

    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

fn counter(name: &str, value: u64) -> Object<CounterSpec> {
    Object {
        metadata: Metadata {
            name: name.into(),
            ..Metadata::default()
        },
        spec: CounterSpec { value },
        status: NoStatus {},
    }
}

const TASKS: usize = 8;
const INCREMENTS: u64 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_updates_never_lose_one() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    store.create(counter("c", 0)).await.unwrap();

    // Every task's first read happens before any task writes (the barrier), so the first round
    // conflicts for all but one task: the retry path is exercised, not just hoped for.
    let barrier = Arc::new(Barrier::new(TASKS));
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let (url, barrier, attempts) = (etcd.url(), barrier.clone(), attempts.clone());
        tasks.spawn(async move {
            // Each task on its own connection, like separate processes.
            let store = Store::connect(&[url], Duration::from_secs(5))
                .await
                .unwrap();
            let mut first = true;
            for _ in 0..INCREMENTS {
                store
                    .update::<CounterSpec, _>("c", |o| {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        if std::mem::take(&mut first) {
                            // block_in_place hands this worker's queued tasks (connection
                            // drivers among them) to another thread while it waits.
                            tokio::task::block_in_place(|| barrier.wait());
                        }
                        o.spec.value += 1;
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }

    let total = TASKS as u64 * INCREMENTS;
    let c = store.get::<CounterSpec>("c").await.unwrap();
    assert_eq!(c.spec.value, total, "updates were lost");
    assert_eq!(c.metadata.generation, 1 + total as i64);
    let attempts = attempts.load(Ordering::SeqCst);
    assert!(
        attempts >= total as usize + TASKS - 1,
        "only {attempts} attempts for {total} updates: the conflicts were not retried"
    );
    // The key was written exactly once per increment after its creation.
    let mut raw = etcd.client().await;
    let kv = raw.get("/lightbyte/counter/c", None).await.unwrap();
    assert_eq!(kv.kvs()[0].version(), 1 + total as i64);
}

#[tokio::test]
async fn watch_delivers_every_change_in_order() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let created = store.create(counter("w", 0)).await.unwrap();
    let from = created.metadata.resource_version;

    // One watch runs while the changes happen, one starts after they all happened.
    let mut live = store.watch_kind::<CounterSpec>(from).await.unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 1..=50 {
                store
                    .update::<CounterSpec, _>("w", |o| {
                        o.spec.value = i;
                        Ok(())
                    })
                    .await
                    .unwrap();
                // Unrelated keys in between must not disturb the sequence.
                store
                    .create(counter(&format!("other-{i}"), i))
                    .await
                    .unwrap();
            }
            store.delete::<CounterSpec>("w", None).await.unwrap();
        })
    };
    let live_events = collect(&mut live).await;
    writer.await.unwrap();
    let mut replay = store.watch_kind::<CounterSpec>(from).await.unwrap();
    let replay_events = collect(&mut replay).await;

    for events in [&live_events, &replay_events] {
        let values: Vec<u64> = events.iter().map(|(v, _)| *v).collect();
        assert_eq!(values, (0..=50).collect::<Vec<_>>());
        assert_eq!(events[0].1, from);
        assert!(
            events.windows(2).all(|w| w[0].1 < w[1].1),
            "revisions not increasing: {events:?}"
        );
    }
    assert_eq!(live_events, replay_events);
}

/// (value, revision) of every change to counter "w" until it is deleted.
async fn collect(watch: &mut orchestrator::store::TypedWatch<CounterSpec>) -> Vec<(u64, i64)> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("watch stalled")
            .unwrap();
        match event {
            Event::Put(o) if o.name() == "w" => {
                seen.push((o.spec.value, o.metadata.resource_version))
            }
            Event::Put(_) => {}
            Event::Delete { name, .. } if name == "w" => return seen,
            Event::Delete { .. } => {}
        }
    }
}

#[tokio::test]
async fn create_update_delete_semantics() {
    let etcd = Etcd::start();
    let store = etcd.store().await;

    let a = store.create(counter("a", 1)).await.unwrap();
    assert_eq!(a.metadata.generation, 1);
    assert!(!a.metadata.uid.is_empty());
    assert!(a.metadata.resource_version > 0);
    assert!(matches!(
        store.create(counter("a", 2)).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(store.get::<CounterSpec>("a").await.unwrap().spec.value, 1);

    // A change that changes nothing writes nothing.
    let same = store
        .update::<CounterSpec, _>("a", |o| {
            o.spec.value = 1;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(same.metadata.resource_version, a.metadata.resource_version);

    let b = store
        .update_at::<CounterSpec, _>("a", a.metadata.resource_version, |o| {
            o.spec.value = 2;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(b.metadata.generation, 2);
    assert_eq!(b.metadata.uid, a.metadata.uid);
    // Stale versions conflict and change nothing.
    let stale = store
        .update_at::<CounterSpec, _>("a", a.metadata.resource_version, |o| {
            o.spec.value = 99;
            Ok(())
        })
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    assert!(matches!(
        store
            .delete::<CounterSpec>("a", Some(a.metadata.resource_version))
            .await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(store.get::<CounterSpec>("a").await.unwrap(), b);

    let (all, _) = store.list::<CounterSpec>().await.unwrap();
    assert_eq!(all, vec![b.clone()]);

    let deleted = store
        .delete::<CounterSpec>("a", Some(b.metadata.resource_version))
        .await
        .unwrap();
    assert_eq!(deleted, b);
    assert!(matches!(
        store.get::<CounterSpec>("a").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.update::<CounterSpec, _>("a", |_| Ok(())).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete::<CounterSpec>("a", None).await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn etcd_down_is_unavailable_within_the_timeout() {
    let mut etcd = Etcd::start();
    let store = Store::connect(&[etcd.url()], Duration::from_secs(1))
        .await
        .unwrap();
    store.create(counter("x", 1)).await.unwrap();
    etcd.stop();
    let e = store.get::<CounterSpec>("x").await.unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
    etcd.restart();
    // The same store reconnects by itself.
    let x = common::eventually(
        "the store to reconnect",
        Duration::from_secs(30),
        || async { store.get::<CounterSpec>("x").await.ok() },
    )
    .await;
    assert_eq!(x.spec.value, 1);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BulkySpec {
    text: String,
}

impl Spec for BulkySpec {
    type Status = NoStatus;
    const KIND: &'static str = "bulky";
    const PLURAL: &'static str = "bulkies";

    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

/// One etcd answer is limited to 4 MiB (gRPC's default): a kind larger than that, read at
/// once, made every list of it fail. 1,100 objects of 5 KiB are 5.5 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kind_larger_than_one_etcd_answer_is_listed_whole() {
    let etcd = Etcd::start();
    let store = etcd.store().await;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (t..1100).step_by(8) {
                let obj = Object {
                    metadata: Metadata {
                        name: format!("b-{i:04}"),
                        ..Metadata::default()
                    },
                    spec: BulkySpec {
                        text: format!("{i:04}").repeat(1280),
                    },
                    status: NoStatus {},
                };
                store.create(obj).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let (all, revision) = store.list::<BulkySpec>().await.unwrap();
    assert_eq!(all.len(), 1100);
    assert!(revision > 0);
    for (i, o) in all.iter().enumerate() {
        assert_eq!(
            o.metadata.name,
            format!("b-{i:04}"),
            "sorted by name, none twice"
        );
        assert!(o.spec.text.starts_with(&format!("{i:04}")));
    }
}
