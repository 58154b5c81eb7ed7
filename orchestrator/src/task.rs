//! Small task helpers.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio::task::JoinHandle;

/// A spawned task that ends with its owner: dropping the handle aborts the task.
pub(crate) struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Exponential backoff with jitter, for retrying etcd while it is down: many controllers and
/// workers retrying in lockstep would hit a recovering etcd all at once.
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// Sleeps for the current delay (±25 %) and doubles it, up to the maximum.
    pub async fn wait(&mut self) {
        let d = self.delay();
        tokio::time::sleep(d).await;
    }

    /// The current delay (±25 %), doubling it for next time: for loops that must keep doing
    /// other work while they wait to retry.
    pub fn delay(&mut self) -> Duration {
        let d = jitter(self.next);
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

fn jitter(d: Duration) -> Duration {
    // RandomState is seeded randomly per instance: enough randomness for spreading retries.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let factor = 0.75 + (r % 1000) as f64 / 2000.0;
    d.mul_f64(factor)
}
