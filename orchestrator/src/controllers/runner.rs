//! Running a controller: campaign, reconcile while leading, step down when the lease is lost
//! or a write finds the leadership gone, back off while etcd is down.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Controller, ControllerConfig};
use crate::election::Elector;
use crate::store::{keys, Store, StoreError};
use crate::task::Backoff;

/// Passes made and time spent in them, per controller, in this process: what simulations and
/// benchmarks divide etcd traffic by.
pub fn passes() -> BTreeMap<&'static str, (u64, Duration)> {
    PASSES.lock().map(|p| p.clone()).unwrap_or_default()
}

static PASSES: Mutex<BTreeMap<&'static str, (u64, Duration)>> = Mutex::new(BTreeMap::new());

fn count_pass(name: &'static str, took: Duration) {
    if let Ok(mut p) = PASSES.lock() {
        let e = p.entry(name).or_default();
        e.0 += 1;
        e.1 += took;
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs `controller` until `shutdown` is cancelled; on shutdown a held leadership is resigned
/// so a peer takes over at once.
pub async fn run<C: Controller>(
    controller: C,
    store: Store,
    config: ControllerConfig,
    shutdown: CancellationToken,
) {
    let store = store.unfenced();
    let elector = Elector::new(store.clone(), C::NAME, &config.holder, config.lease_ttl);
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let leadership = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = elector.campaign() => match result {
                Ok(leadership) => leadership,
                Err(e) => {
                    tracing::warn!(controller = C::NAME, error = %e, "campaign failed; retrying");
                    backoff.wait().await;
                    continue;
                }
            },
        };
        backoff.reset();
        let fenced = store.fenced(leadership.fence().clone());
        let lost = leadership.lost();
        tokio::select! {
            _ = shutdown.cancelled() => {
                if let Err(e) = leadership.resign(&store).await {
                    tracing::warn!(controller = C::NAME, error = %e, "resign failed");
                }
                return;
            }
            _ = lost.cancelled() => {
                tracing::warn!(controller = C::NAME, "leadership lost (lease not renewed)");
            }
            e = lead(&controller, &fenced, &config) => {
                tracing::warn!(controller = C::NAME, error = %e, "stepping down");
            }
        }
        drop(leadership);
        backoff.wait().await;
    }
}

/// Reconciles until a write finds the leadership gone.
async fn lead<C: Controller>(
    controller: &C,
    store: &Store,
    config: &ControllerConfig,
) -> StoreError {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let prefixes = controller.watches();
    loop {
        // Changes after this revision trigger the next pass, including ones made while this
        // pass runs (at worst one pass too many, never one too few).
        let revision = match store.revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(controller = C::NAME, error = %e, "etcd unreachable; backing off");
                backoff.wait().await;
                continue;
            }
        };
        let started = Instant::now();
        let result = controller.reconcile(store).await;
        count_pass(C::NAME, started.elapsed());
        match result {
            Ok(()) => backoff.reset(),
            Err(e @ StoreError::Deposed { .. }) => return e,
            Err(e) => {
                tracing::warn!(controller = C::NAME, error = %e, "reconcile failed; backing off");
                backoff.wait().await;
                continue;
            }
        }
        let resync = controller
            .wake_after()
            .map_or(config.resync, |w| w.min(config.resync));
        wait_for_change(store, &prefixes, revision + 1, resync).await;
    }
}

/// Returns at the first change under one of `prefixes` from revision `from`, or after `resync`.
async fn wait_for_change(store: &Store, prefixes: &[String], from: i64, resync: Duration) {
    let wait = async {
        match store.watch(keys::ROOT, from).await {
            Ok(mut watch) => loop {
                match watch.next().await {
                    Ok(change) if prefixes.iter().any(|p| change.key.starts_with(p)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "watch ended");
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!(error = %e, "watch failed"),
        }
        // Without a watch, poll: the next pass finds etcd down or up by itself.
        tokio::time::sleep(BACKOFF_MAX.min(resync)).await;
    };
    let _ = tokio::time::timeout(resync, wait).await;
}
