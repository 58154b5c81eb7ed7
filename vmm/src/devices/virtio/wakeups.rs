//! When a batched device worker lets its wake-ups preempt the thread that runs (see
//! [`super::worker`]): the rule, kept apart from the thread that applies it so that it can be
//! driven round by round in tests.
//!
//! Batching pays only when the guest keeps more than one request outstanding: the vCPU then
//! queues requests while the worker waits its turn, and the worker takes them, and answers them,
//! together. With one request outstanding the guest waits on it, and a request that does not
//! preempt waits until the vCPU halts (random 4 KiB reads at depth 1 fell to 0.79–0.89 of
//! QEMU's in the test host when the worker batched throughout).
//!
//! Depth shows in what the worker has in hand after a round of events: two or more requests
//! (taken in that round or still in flight from earlier ones). A preempting worker may never see
//! it, though: where the disk answers at once (writes into the host's page cache, a fast
//! device), it takes each request the moment it is queued and answers it before the next, so a
//! guest 32 deep looks one deep. So after [`PROBE_EVERY`] shallow rounds the worker batches for
//! one round to look: a guest that was deep shows it then, and a shallow one pays that one
//! request's delay.

/// Shallow rounds in a row (one request in hand) after which a batching worker preempts again.
pub const SHALLOW_ROUNDS: u32 = 4;
/// Shallow rounds after which a preempting worker batches one round, to look for depth.
pub const PROBE_EVERY: u32 = 32;

/// The rule's state for one worker thread.
#[derive(Debug, Default)]
pub struct Wakeups {
    batching: bool,
    /// Shallow rounds in a row while batching.
    shallow: u32,
    /// Shallow rounds since the last probe while preempting.
    since_probe: u32,
}

impl Wakeups {
    /// After a round of events in which the worker took `took` requests and was left with
    /// `in_flight` (those included): whether it should batch its next wake-ups. Rounds that took
    /// nothing (completions only) change nothing.
    pub fn after(&mut self, took: usize, in_flight: usize) -> bool {
        if took == 0 {
            return self.batching;
        }
        if took.max(in_flight) >= 2 {
            self.batching = true;
            self.shallow = 0;
            self.since_probe = 0;
        } else if self.batching {
            self.shallow += 1;
            if self.shallow >= SHALLOW_ROUNDS {
                self.batching = false;
                self.shallow = 0;
            }
        } else {
            self.since_probe += 1;
            if self.since_probe >= PROBE_EVERY {
                // One round only: a probe that finds the guest shallow ends at its first round.
                self.batching = true;
                self.shallow = SHALLOW_ROUNDS - 1;
                self.since_probe = 0;
            }
        }
        self.batching
    }

    /// Whether the worker batches now.
    pub fn batching(&self) -> bool {
        self.batching
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rounds` requests one at a time, each answered before the next (its completion a round
    /// of its own): how many of the requests found the worker batching.
    fn batched_of_shallow(w: &mut Wakeups, rounds: u32) -> u32 {
        (0..rounds)
            .map(|_| {
                let found_batching = w.batching();
                w.after(1, 1);
                w.after(0, 0);
                u32::from(found_batching)
            })
            .sum()
    }

    #[test]
    fn one_request_at_a_time_preempts_but_for_one_probe_in_every_probe_every() {
        let mut w = Wakeups::default();
        assert_eq!(batched_of_shallow(&mut w, (PROBE_EVERY + 1) * 10), 10);
        // Each probe is one request long, after PROBE_EVERY that preempted.
        let mut w = Wakeups::default();
        let found: Vec<bool> = (0..2 * PROBE_EVERY + 2)
            .map(|_| {
                let b = w.batching();
                w.after(1, 1);
                b
            })
            .collect();
        let probes: Vec<usize> = (0..found.len()).filter(|&i| found[i]).collect();
        assert_eq!(
            probes,
            [PROBE_EVERY as usize, 2 * PROBE_EVERY as usize + 1],
            "{found:?}"
        );
    }

    #[test]
    fn depth_batches_at_once_and_until_the_guest_is_shallow_for_shallow_rounds() {
        let mut w = Wakeups::default();
        assert!(!w.after(1, 1), "one request in hand is no depth");
        // A second request taken while the first is in flight.
        assert!(w.after(1, 2));
        // Completions change nothing, however many.
        assert!(w.after(0, 0));
        // Many taken at once (answered in the same round: in flight no more).
        assert!(w.after(8, 0));
        for _ in 1..SHALLOW_ROUNDS {
            assert!(w.after(1, 1));
        }
        assert!(
            !w.after(1, 1),
            "preempting after {SHALLOW_ROUNDS} shallow rounds"
        );
        // A deep round in between starts the count again.
        assert!(w.after(2, 2));
        for _ in 1..SHALLOW_ROUNDS {
            assert!(w.after(1, 1));
        }
        assert!(w.after(3, 3));
        assert!(w.after(1, 1));
    }

    #[test]
    fn a_probe_that_finds_depth_keeps_batching() {
        let mut w = Wakeups::default();
        for _ in 1..PROBE_EVERY {
            assert!(!w.after(1, 1));
        }
        assert!(w.after(1, 1), "the probe");
        assert!(w.after(0, 0));
        // What queued while the worker did not preempt.
        assert!(w.after(12, 12));
        for _ in 0..3 * PROBE_EVERY {
            assert!(w.after(5, 5));
        }
    }
}
