//! Leader election for controllers: one etcd key per controller, created in a transaction only
//! while absent and attached to the candidate's lease. The key's create revision is the fencing
//! token; the key vanishes when the leader resigns or its lease expires, and a waiting candidate
//! takes over as soon as it sees the deletion, so a crashed leader is replaced within one TTL.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use tokio_util::sync::CancellationToken;

use crate::lease::{KeptLease, Until};
use crate::store::{keys, ChangeKind, Fence, Store, StoreError};

/// Campaigns for one controller's leadership on behalf of one holder.
pub struct Elector {
    store: Store,
    controller: String,
    holder: String,
    ttl: Duration,
}

/// Being the leader. Dropping it stops renewing the lease (a successor takes over one TTL
/// later, as after a crash); [`Leadership::resign`] hands over at once.
pub struct Leadership {
    fence: Fence,
    lease: KeptLease,
}

impl Leadership {
    /// What writes made as this leader must carry.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Cancelled when the leadership may have ended; the leader must stop acting.
    pub fn lost(&self) -> CancellationToken {
        self.lease.lost()
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease.ttl()
    }

    /// Gives the leadership up now: revokes the lease, which deletes the leader key.
    pub async fn resign(self, store: &Store) -> Result<(), StoreError> {
        self.lease.revoke(store).await
    }
}

impl Elector {
    pub fn new(store: Store, controller: &str, holder: &str, ttl: Duration) -> Elector {
        Elector {
            store: store.unfenced(),
            controller: controller.to_string(),
            holder: holder.to_string(),
            ttl,
        }
    }

    /// Waits until this holder leads the controller. Fails when etcd cannot be reached (the
    /// caller backs off and campaigns again).
    pub async fn campaign(&self) -> Result<Leadership, StoreError> {
        let key = keys::leader(&self.controller);
        let lease = KeptLease::grant(&self.store, self.ttl, Until::MayHaveExpired).await?;
        loop {
            if lease.lost().is_cancelled() {
                return Err(StoreError::Unavailable(
                    "campaign lease lost while waiting".into(),
                ));
            }
            let put = TxnOp::put(
                key.as_str(),
                self.holder.as_str(),
                Some(PutOptions::new().with_lease(lease.id())),
            );
            let result = self
                .store
                .txn(
                    vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)],
                    vec![put],
                    vec![TxnOp::get(key.as_str(), None)],
                    String::new,
                )
                .await?;
            if result.succeeded {
                let fence = Fence {
                    controller: self.controller.clone(),
                    holder: self.holder.clone(),
                    token: result.revision,
                };
                tracing::info!(
                    controller = %self.controller,
                    holder = %self.holder,
                    token = fence.token,
                    "elected"
                );
                return Ok(Leadership { fence, lease });
            }
            let Some(current) = crate::store::got(&result.responses, 0) else {
                // Deleted between the compare and the read: try again at once.
                continue;
            };
            if current.value() == self.holder.as_bytes() {
                // Our own key from a leadership this process already gave up (its lease is no
                // longer renewed): delete it rather than wait for it to expire.
                let stale = current.create_revision();
                self.store
                    .txn(
                        vec![Compare::create_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            stale,
                        )],
                        vec![TxnOp::delete(key.as_str(), None)],
                        vec![],
                        String::new,
                    )
                    .await?;
                continue;
            }
            self.wait_for_vacancy(&key, result.revision + 1, &lease)
                .await;
        }
    }

    /// Returns when the leader key is deleted at or after revision `from`, when our lease is
    /// lost, or after a TTL at the latest (then the caller simply looks again, which also
    /// covers a watch that broke).
    async fn wait_for_vacancy(&self, key: &str, from: i64, lease: &KeptLease) {
        let lost = lease.lost();
        let wait = async {
            let Ok(mut watch) = self.store.watch(key, from).await else {
                // etcd is unreachable: the bounded sleep below paces the retries.
                std::future::pending::<()>().await;
                return;
            };
            while let Ok(change) = watch.next().await {
                if change.kind == ChangeKind::Delete && change.key == key {
                    return;
                }
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = wait => {}
            _ = lost.cancelled() => {}
            _ = tokio::time::sleep(self.ttl) => {}
        }
    }
}
