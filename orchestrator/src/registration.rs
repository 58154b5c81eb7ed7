//! A worker's registration: its `Worker` object and a heartbeat key on a lease its agent keeps
//! alive. The worker-health controller reads the heartbeat; when the agent dies, the lease
//! expires, the key goes and the worker becomes NotReady.

use std::time::Duration;

use etcd_client::PutOptions;
use tokio_util::sync::CancellationToken;

use crate::lease::{KeptLease, Until};
use crate::model::{Metadata, Object, WorkerSpec, WorkerStatus};
use crate::store::{keys, Store, StoreError};
use crate::task::{AbortOnDrop, Backoff};

/// A registered worker. Dropping it stops the heartbeat (the worker goes NotReady one TTL
/// later, as after a crash); [`Registration::deregister`] removes the heartbeat at once.
pub struct Registration {
    store: Store,
    name: String,
    stop: CancellationToken,
    _task: AbortOnDrop,
}

impl Registration {
    /// Creates or updates the worker `name` with `spec`'s capacity and labels (an operator's
    /// `drain` is kept) and keeps its heartbeat alive with a lease of `ttl`. The lease is
    /// renewed through stalls until etcd says it is gone ([`Until::Gone`]): then the
    /// registration is made again (etcd was out of reach longer than the TTL, say).
    pub async fn register(
        store: &Store,
        name: &str,
        spec: WorkerSpec,
        ttl: Duration,
    ) -> Result<Registration, StoreError> {
        let store = store.unfenced();
        upsert(&store, name, &spec).await?;
        let lease = heartbeat(&store, name, ttl).await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_registered(
            store.clone(),
            name.to_string(),
            ttl,
            lease,
            stop.clone(),
        ));
        Ok(Registration {
            store,
            name: name.to_string(),
            stop,
            _task: AbortOnDrop(task),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the heartbeat and deletes the key now, so the worker goes NotReady at once.
    pub async fn deregister(self) -> Result<(), StoreError> {
        self.stop.cancel();
        let mut kv = self.store.client().kv_client();
        self.store
            .call(kv.delete(keys::heartbeat(&self.name), None))
            .await
            .map(drop)
    }
}

async fn upsert(store: &Store, name: &str, spec: &WorkerSpec) -> Result<(), StoreError> {
    let obj = Object {
        metadata: Metadata {
            name: name.to_string(),
            ..Metadata::default()
        },
        spec: spec.clone(),
        status: WorkerStatus::default(),
    };
    match store.create(obj).await {
        Ok(_) => Ok(()),
        Err(StoreError::AlreadyExists { .. }) => store
            .update::<WorkerSpec, _>(name, |o| {
                o.spec.capacity = spec.capacity;
                o.spec.labels = spec.labels.clone();
                o.spec.endpoint = spec.endpoint.clone();
                Ok(())
            })
            .await
            .map(drop),
        Err(e) => Err(e),
    }
}

/// Grants a lease and puts the heartbeat key on it.
async fn heartbeat(store: &Store, name: &str, ttl: Duration) -> Result<KeptLease, StoreError> {
    let lease = KeptLease::grant(store, ttl, Until::Gone).await?;
    let mut kv = store.client().kv_client();
    let opts = PutOptions::new().with_lease(lease.id());
    store
        .call(kv.put(keys::heartbeat(name), name, Some(opts)))
        .await?;
    Ok(lease)
}

async fn keep_registered(
    store: Store,
    name: String,
    ttl: Duration,
    mut lease: KeptLease,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), ttl);
    loop {
        let lost = lease.lost();
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = lease.revoke(&store).await;
                return;
            }
            _ = lost.cancelled() => {}
        }
        tracing::warn!(worker = %name, "heartbeat lease lost; registering again");
        lease = loop {
            if stop.is_cancelled() {
                return;
            }
            match heartbeat(&store, &name, ttl).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(worker = %name, error = %e, "heartbeat failed; retrying");
                    backoff.wait().await;
                }
            }
        };
        backoff.reset();
    }
}
