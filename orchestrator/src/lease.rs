//! A lease kept alive in the background, which tells its owner when it may have expired.

use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};
use crate::task::AbortOnDrop;

/// An etcd lease and the task renewing it. Dropping it stops the renewals, so the lease expires
/// one TTL later, as if the process had crashed; [`KeptLease::revoke`] ends it at once.
pub struct KeptLease {
    id: i64,
    ttl: Duration,
    lost: CancellationToken,
    _keeper: AbortOnDrop,
}

impl KeptLease {
    /// Grants a lease of `ttl` (etcd may round it up to its minimum, 2 s by default) and starts
    /// renewing it every third of its TTL.
    pub async fn grant(store: &Store, ttl: Duration) -> Result<KeptLease, StoreError> {
        let requested = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut client = store.client().lease_client();
        let sent = Instant::now();
        let resp = store.call(client.grant(requested, None)).await?;
        if resp.ttl() <= 0 {
            return Err(StoreError::Etcd(format!(
                "lease grant refused: {}",
                resp.error()
            )));
        }
        let ttl = Duration::from_secs(resp.ttl().unsigned_abs());
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(
            store.clone(),
            resp.id(),
            ttl,
            sent + ttl,
            lost.clone(),
        ));
        Ok(KeptLease {
            id: resp.id(),
            ttl,
            lost,
            _keeper: AbortOnDrop(keeper),
        })
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL etcd granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Cancelled when the lease has expired or may expire before the next renewal could land:
    /// whoever acts under this lease must stop then.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Ends the lease now (keys attached to it disappear), best effort.
    pub async fn revoke(self, store: &Store) -> Result<(), StoreError> {
        self.lost.cancel();
        let mut client = store.client().lease_client();
        store.call(client.revoke(self.id)).await.map(drop)
    }
}

/// Renews `id` every third of `ttl`. `expires` is a local bound on the server-side expiry: the
/// time a renewal was *sent* plus the TTL (the server restarts the TTL when it receives it,
/// later). Once two renewals in a row have failed, the next could only land after the lease
/// may have expired, so the lease is reported lost then, a third of a TTL early.
async fn keep_alive(
    store: Store,
    id: i64,
    ttl: Duration,
    mut expires: Instant,
    lost: CancellationToken,
) {
    let interval = ttl / 3;
    let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    loop {
        tokio::time::sleep(interval).await;
        let sent = Instant::now();
        let renewal = tokio::time::timeout(interval, renew(&store, id, &mut stream)).await;
        match renewal {
            Ok(Ok(remaining)) if remaining > 0 => expires = sent + ttl,
            Ok(Ok(_)) => {
                tracing::warn!(lease = id, "lease expired");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = id, error = %e, "lease renewal failed");
                stream = None;
            }
            Err(_) => {
                tracing::warn!(lease = id, "lease renewal got no answer");
                stream = None;
            }
        }
        if Instant::now() + interval >= expires {
            tracing::warn!(
                lease = id,
                "lease may expire before the next renewal; giving it up"
            );
            lost.cancel();
            return;
        }
    }
}

/// One renewal over the (re)opened keep-alive stream; returns the TTL etcd reports left, 0 when
/// the lease is gone.
async fn renew(
    store: &Store,
    id: i64,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<i64, StoreError> {
    let (keeper, responses) = match stream {
        Some(open) => open,
        None => {
            let mut client = store.client().lease_client();
            stream.insert(client.keep_alive(id).await?)
        }
    };
    keeper.keep_alive().await?;
    match responses.message().await? {
        Some(resp) => Ok(resp.ttl()),
        None => Err(StoreError::Unavailable(
            "lease keep-alive stream ended".into(),
        )),
    }
}
