//! How long each step of building a VM took, in one log line at the end: where a boot's or a
//! restore's time goes before the guest runs (the benchmarks compare exec → first guest entry
//! with the peers').

use std::time::Instant;

/// Times consecutive steps.
pub struct StepTimer {
    what: &'static str,
    started: Instant,
    last: Instant,
    steps: Vec<(&'static str, u128)>,
}

impl StepTimer {
    /// Starts timing `what` (a boot, a restore).
    pub fn new(what: &'static str) -> Self {
        let now = Instant::now();
        StepTimer {
            what,
            started: now,
            last: now,
            steps: Vec::new(),
        }
    }

    /// Ends the step called `name`, begun when the previous one ended.
    pub fn step(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps
            .push((name, now.duration_since(self.last).as_micros()));
        self.last = now;
    }

    /// Logs every step and the total, in microseconds.
    pub fn done(self) {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(n, us)| format!("{n}={us}"))
            .collect();
        tracing::info!(
            total_us = self.started.elapsed().as_micros() as u64,
            steps = %steps.join(" "),
            "{} built",
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_kept_in_order() {
        let mut t = StepTimer::new("test");
        t.step("a");
        t.step("b");
        assert_eq!(
            t.steps.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        t.done();
    }
}
