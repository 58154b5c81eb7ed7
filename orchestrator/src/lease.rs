//! A lease kept alive in the background, which tells its owner when it may have expired.

use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::store::{Store, StoreError};
use crate::task::AbortOnDrop;

/// An etcd lease and the task renewing it. Dropping it stops the renewals, so the lease expires
/// one TTL later, as if the process had crashed; [`KeptLease::revoke`] ends it at once.
///
/// Two holders want different answers to "is it lost?" (see [`Until`]): a leader must stop
/// acting before the lease could have expired, a heartbeat should not give up a lease the
/// server still has.
pub struct KeptLease {
    id: i64,
    ttl: Duration,
    lost: CancellationToken,
    _keeper: AbortOnDrop,
}

/// When a [`KeptLease`] reports itself lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// As soon as it *may* have expired: no renewal landed and none could land before the local
    /// bound on the server's expiry (less a margin). What a leader needs: it must stop acting
    /// before a successor can be elected.
    MayHaveExpired,
    /// Only when etcd says the lease is gone (or it was revoked). Past the local bound the
    /// holder keeps trying to renew: the server restarted the TTL when it *received* the last
    /// renewal, later than the bound assumes, and a stalled host or etcd often comes back with
    /// the lease still there. What a heartbeat needs: giving the lease up early and granting
    /// another makes its key vanish for good when the old lease then expires before the new
    /// key lands, and the worker goes NotReady (its VMs Lost) for a stall it had survived.
    Gone,
}

impl KeptLease {
    /// Grants a lease of `ttl` (etcd may round it up to its minimum, 2 s by default) and starts
    /// renewing it every third of its TTL (see [`keep_alive`]), reporting it lost as `until`
    /// says.
    pub async fn grant(
        store: &Store,
        ttl: Duration,
        until: Until,
    ) -> Result<KeptLease, StoreError> {
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
        let renewal = EtcdRenewal {
            store: store.clone(),
            id: resp.id(),
            stream: None,
        };
        let span = tracing::info_span!("lease", id = resp.id());
        let keeper = tokio::spawn(
            keep_alive(renewal, ttl, sent + ttl, until, lost.clone()).instrument(span),
        );
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

/// How long before the local bound on a lease's expiry its holder is told it is lost: time for
/// the holder to stop acting, and for the two clocks' rates to differ.
fn margin(ttl: Duration) -> Duration {
    ttl / 10
}

/// How soon a renewal that failed is tried again (on a fresh stream).
const RETRY: Duration = Duration::from_millis(500);

/// One way to renew a lease: returns the TTL the server reports left, 0 once the lease is gone.
trait Renew {
    fn renew(&mut self) -> impl std::future::Future<Output = Result<i64, StoreError>> + Send;
    /// Forgets a stream that failed or stalled, so the next renewal opens another.
    fn reset(&mut self);
}

/// Renews every third of `ttl`. `expires` is a local bound on the server-side expiry: the time
/// a renewal was *sent* plus the TTL (the server restarts the TTL when it receives it, later).
/// A renewal that fails or gets no answer within a third of the TTL is tried again on a fresh
/// stream, for as long as an answer could still land before that bound (less a margin): a
/// stalled etcd or a starved process costs the lease only when the stall outlasts what is left
/// of the TTL, not when one renewal is late. Past the bound, [`Until::MayHaveExpired`] gives
/// the lease up; [`Until::Gone`] goes on trying until etcd answers.
async fn keep_alive(
    mut renewer: impl Renew,
    ttl: Duration,
    mut expires: Instant,
    until: Until,
    lost: CancellationToken,
) {
    let interval = ttl / 3;
    let mut failing = false;
    let mut past_bound = false;
    loop {
        let deadline = expires.checked_sub(margin(ttl)).unwrap_or(expires);
        let pause = match (failing, past_bound) {
            (true, false) => RETRY.min(interval),
            // Past the bound (heartbeats only), etcd has been out of reach for most of a TTL:
            // a renewal per third of it, as when all is well, until it answers.
            _ => interval,
        };
        let wake = Instant::now() + pause;
        tokio::time::sleep_until(match until {
            Until::MayHaveExpired => wake.min(deadline),
            Until::Gone => wake,
        })
        .await;
        let sent = Instant::now();
        if sent >= deadline {
            match until {
                Until::MayHaveExpired => {
                    tracing::warn!(
                        "lease may expire before another renewal could land; giving it up"
                    );
                    lost.cancel();
                    return;
                }
                Until::Gone if !past_bound => {
                    past_bound = true;
                    tracing::warn!(
                        "lease may have expired; renewing it until etcd answers whether it did"
                    );
                }
                Until::Gone => {}
            }
        }
        // Past the bound (heartbeats only), a renewal gets a third of the TTL like any other.
        let wait = if sent >= deadline {
            interval
        } else {
            interval.min(deadline - sent)
        };
        match tokio::time::timeout(wait, renewer.renew()).await {
            Ok(Ok(remaining)) if remaining > 0 => {
                if failing {
                    tracing::info!("lease renewed again");
                }
                expires = sent + ttl;
                failing = false;
                past_bound = false;
            }
            Ok(Ok(_)) => {
                tracing::warn!("lease expired");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lease renewal failed; trying again");
                renewer.reset();
                failing = true;
            }
            Err(_) => {
                tracing::warn!(waited = ?wait, "lease renewal got no answer; trying again");
                renewer.reset();
                failing = true;
            }
        }
    }
}

/// Renewals over etcd's keep-alive stream, (re)opened when needed.
struct EtcdRenewal {
    store: Store,
    id: i64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Renew for EtcdRenewal {
    async fn renew(&mut self) -> Result<i64, StoreError> {
        let (keeper, responses) = match &mut self.stream {
            Some(open) => open,
            None => {
                let mut client = self.store.client().lease_client();
                self.stream.insert(client.keep_alive(self.id).await?)
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

    fn reset(&mut self) {
        self.stream = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    const TTL: Duration = Duration::from_secs(9);

    /// An etcd that answers at once, except while frozen (a stalled or starved server answers
    /// when it comes back) and with an error while `failing`. It expires the lease a TTL after
    /// the last renewal it answered (the grant at the start counts as one).
    struct Fake {
        start: Instant,
        frozen: (Duration, Duration),
        failing: (Duration, Duration),
        landed: Duration,
        gone: bool,
        renewed: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                start: Instant::now(),
                frozen: (Duration::ZERO, Duration::ZERO),
                failing: (Duration::ZERO, Duration::ZERO),
                landed: Duration::ZERO,
                gone: false,
                renewed: Arc::default(),
                resets: Arc::default(),
            }
        }
    }

    impl Renew for Fake {
        async fn renew(&mut self) -> Result<i64, StoreError> {
            let at = self.start.elapsed();
            if at >= self.failing.0 && at < self.failing.1 {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            if at >= self.frozen.0 && at < self.frozen.1 {
                tokio::time::sleep_until(self.start + self.frozen.1).await;
            }
            let at = self.start.elapsed();
            self.gone |= at - self.landed > TTL;
            if self.gone {
                return Ok(0);
            }
            self.landed = at;
            self.renewed.fetch_add(1, Ordering::SeqCst);
            Ok(TTL.as_secs() as i64)
        }

        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Runs a leader's keeper for `run`; when it reported the lease lost, if it did.
    async fn lost_after(fake: Fake, run: Duration) -> Option<Duration> {
        lost_until(fake, run, Until::MayHaveExpired).await
    }

    async fn lost_until(fake: Fake, run: Duration, until: Until) -> Option<Duration> {
        let start = fake.start;
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(fake, TTL, start + TTL, until, lost.clone()));
        let r = tokio::time::timeout(run, lost.cancelled()).await;
        keeper.abort();
        r.ok().map(|_| start.elapsed())
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_longer_than_one_renewal_but_within_the_ttl_keeps_the_lease() {
        // Renewed at 3 s (the lease then lasts to 12 s at least); etcd stalls from 4 s to
        // 10.5 s, so the renewal sent at 6 s gets no answer within its 3 s. Giving up then
        // would be early: a renewal answered at 10.5 s lands in time.
        let mut fake = Fake::new();
        fake.frozen = (secs(4.0), secs(10.5));
        let (renewed, resets) = (fake.renewed.clone(), fake.resets.clone());
        assert_eq!(lost_after(fake, secs(30.0)).await, None);
        assert!(
            resets.load(Ordering::SeqCst) >= 1,
            "the stalled stream was dropped"
        );
        assert!(
            renewed.load(Ordering::SeqCst) >= 8,
            "renewals went on after the stall"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_past_the_ttl_reports_the_lease_lost_before_it_expires() {
        let mut fake = Fake::new();
        fake.frozen = (secs(4.0), secs(1000.0));
        let lost = lost_after(fake, secs(30.0)).await.expect("reported lost");
        // The last renewal that landed was sent at 3 s: the server keeps the lease to 12 s at
        // least; the holder hears of it a margin earlier, and not after one late renewal.
        assert!(lost <= secs(12.0) - margin(TTL), "lost at {lost:?}");
        assert!(lost > secs(10.0), "lost at {lost:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_renewals_are_retried_until_one_lands() {
        let mut fake = Fake::new();
        fake.failing = (secs(4.0), secs(10.0));
        let resets = fake.resets.clone();
        assert_eq!(lost_after(fake, secs(30.0)).await, None);
        assert!(
            resets.load(Ordering::SeqCst) >= 3,
            "retried on fresh streams"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_the_server_no_longer_has_is_lost_at_once() {
        struct Gone;
        impl Renew for Gone {
            async fn renew(&mut self) -> Result<i64, StoreError> {
                Ok(0)
            }
            fn reset(&mut self) {}
        }
        let start = Instant::now();
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(
            Gone,
            TTL,
            start + TTL,
            Until::MayHaveExpired,
            lost.clone(),
        ));
        lost.cancelled().await;
        keeper.abort();
        assert_eq!(start.elapsed(), TTL / 3, "at the first renewal");
    }

    fn stalled_past_the_bound() -> Fake {
        // Renewed at 3 s, so the server keeps the lease to 12 s; the local bound (less the
        // margin) is 11.1 s. etcd is back at 11.5 s: a renewal then still finds the lease.
        let mut fake = Fake::new();
        fake.frozen = (secs(4.0), secs(11.5));
        fake
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_keeps_a_lease_the_server_still_has_past_the_local_bound() {
        let fake = stalled_past_the_bound();
        let renewed = fake.renewed.clone();
        assert_eq!(lost_until(fake, secs(30.0), Until::Gone).await, None);
        assert!(
            renewed.load(Ordering::SeqCst) >= 7,
            "renewed after the stall"
        );
        // A leader in the same stall must stop acting at the bound.
        let lost = lost_after(stalled_past_the_bound(), secs(30.0)).await;
        assert!(lost.is_some_and(|t| t <= secs(11.1)), "lost at {lost:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_reports_the_lease_lost_once_etcd_says_it_is_gone() {
        let mut fake = Fake::new();
        fake.frozen = (secs(4.0), secs(20.0));
        let lost = lost_until(fake, secs(60.0), Until::Gone)
            .await
            .expect("reported lost");
        // etcd answers at 20 s that the lease expired (at 12 s): the holder hears of it then,
        // at the first renewal after the stall, and not at the bound.
        assert!(lost >= secs(20.0), "lost at {lost:?}");
        assert!(lost <= secs(20.0) + TTL / 3, "lost at {lost:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_outlasts_an_unreachable_etcd_and_hears_the_verdict() {
        // Refused from 4 s to 40 s: the lease expired on the server meanwhile, which the
        // holder learns from the first renewal that is answered.
        let mut fake = Fake::new();
        fake.failing = (secs(4.0), secs(40.0));
        let resets = fake.resets.clone();
        let lost = lost_until(fake, secs(60.0), Until::Gone)
            .await
            .expect("reported lost");
        assert!(
            lost >= secs(40.0) && lost <= secs(40.0) + TTL / 3,
            "lost at {lost:?}"
        );
        // Past the bound it tries once per third of the TTL, not every half second.
        let tries = resets.load(Ordering::SeqCst);
        assert!((10..=30).contains(&tries), "{tries} failed renewals");
    }
}
