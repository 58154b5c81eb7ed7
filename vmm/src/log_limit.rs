//! A per-callsite rate limit on the vmm's log: many warnings are triggered by the guest (a bad
//! descriptor chain, a malformed packet), and a guest must not be able to fill the host's disk
//! or drown the worker's log. Each callsite may log [`BURST`] events at info level or above per
//! [`WINDOW`]; the rest are dropped and counted, and the count is logged once the callsite's
//! next window opens. Debug and trace events, asked for on purpose, always pass.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Events per callsite per window.
pub const BURST: u32 = 20;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

struct Window {
    start: Instant,
    passed: u32,
    dropped: u64,
}

/// Says how many events of a callsite were dropped.
type Report = Box<dyn Fn(&Metadata<'_>, u64) + Send + Sync>;

/// The filter; see the module documentation.
pub struct RateLimit {
    burst: u32,
    window: Duration,
    callsites: Mutex<HashMap<Identifier, Window>>,
    report: Report,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(BURST, WINDOW)
    }
}

impl RateLimit {
    /// `burst` events per callsite per `window`; drop counts go to stderr, where the vmm logs.
    pub fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit::reporting(
            burst,
            window,
            Box::new(|meta, dropped| {
                // Written directly: an event emitted from inside a filter would disturb the
                // per-layer filter state of the event being filtered.
                eprintln!(
                    "WARN {}: {dropped} events from {}:{} dropped by the log rate limit",
                    meta.target(),
                    meta.file().unwrap_or("?"),
                    meta.line().unwrap_or(0)
                );
            }),
        )
    }

    /// As [`RateLimit::new`], with drop counts given to `report`.
    pub fn reporting(burst: u32, window: Duration, report: Report) -> RateLimit {
        RateLimit {
            burst,
            window,
            callsites: Mutex::new(HashMap::new()),
            report,
        }
    }

    fn limited(meta: &Metadata<'_>) -> bool {
        meta.is_event() && *meta.level() <= Level::INFO
    }

    /// Whether an event of `meta` may pass now; the number dropped before it when a new
    /// window opens.
    fn admit(&self, meta: &Metadata<'_>) -> (bool, u64) {
        let mut map = self.callsites.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let w = map.entry(meta.callsite()).or_insert(Window {
            start: now,
            passed: 0,
            dropped: 0,
        });
        let mut reported = 0;
        if now.duration_since(w.start) >= self.window {
            reported = w.dropped;
            *w = Window {
                start: now,
                passed: 0,
                dropped: 0,
            };
        }
        if w.passed < self.burst {
            w.passed += 1;
            (true, reported)
        } else {
            w.dropped += 1;
            (false, reported)
        }
    }
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        if !RateLimit::limited(meta) {
            return true;
        }
        let (pass, dropped) = self.admit(meta);
        if dropped > 0 {
            (self.report)(meta, dropped);
        }
        pass
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if RateLimit::limited(meta) {
            // Decided event by event.
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    /// Counts the events it sees, by message.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> Layer<S> for Seen {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct V(String);
            impl tracing::field::Visit for V {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0.push_str(&format!("{}={:?} ", f.name(), v));
                }
            }
            let mut v = V(String::new());
            event.record(&mut v);
            self.0.lock().unwrap().push(v.0);
        }
    }

    fn count(seen: &Seen, needle: &str) -> usize {
        seen.0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }

    #[test]
    fn a_repeated_warning_is_cut_to_the_burst_and_the_rest_counted() {
        let seen = Seen::default();
        let reports = Seen::default();
        let r = reports.clone();
        let limit = RateLimit::reporting(
            20,
            Duration::from_millis(300),
            Box::new(move |meta, n| {
                r.0.lock()
                    .unwrap()
                    .push(format!("dropped={n} line={:?}", meta.line()))
            }),
        );
        let subscriber = tracing_subscriber::registry().with(seen.clone().with_filter(limit));
        tracing::subscriber::with_default(subscriber, || {
            // One callsite, as a device's warning is.
            let odd = |i: u32| tracing::warn!(i, "guest did something odd");
            for i in 0..500 {
                odd(i);
            }
            // Another callsite has its own budget; debug always passes.
            tracing::warn!("another callsite");
            for _ in 0..50 {
                tracing::debug!("asked for");
            }
            assert_eq!(count(&seen, "guest did something odd"), 20);
            assert_eq!(count(&seen, "another callsite"), 1);
            assert_eq!(count(&seen, "asked for"), 50);
            // The next window: the callsite logs again, after the count of what was dropped.
            std::thread::sleep(Duration::from_millis(350));
            odd(500);
            assert_eq!(count(&seen, "guest did something odd"), 21);
            assert_eq!(
                count(&reports, "dropped=480"),
                1,
                "{:?}",
                reports.0.lock().unwrap()
            );
            assert_eq!(reports.0.lock().unwrap().len(), 1);
        });
    }
}
