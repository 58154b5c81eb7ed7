//! The one worker thread shape every virtio device uses (after Cloud Hypervisor's
//! `epoll_helper`): an epoll loop over the device's queue kicks and its own descriptors (a TAP,
//! an engine's completion eventfd, sockets), a stop eventfd, and the pause protocol the VMM
//! relies on for snapshots.
//!
//! Wake-ups: a worker's thread normally preempts whatever runs when its descriptor fires. A
//! worker made with [`DeviceWorker::batched`] runs under `SCHED_BATCH` while the guest keeps
//! more than one request outstanding (the rule: [`super::wakeups`]): same share of the CPU, but
//! a wake-up does not preempt the running thread. Where the worker shares a CPU with its busy
//! vCPU, the vCPU then keeps queueing requests until it halts or its slice ends, and the worker
//! takes them, and answers what completed, together: one interrupt for many answers instead of
//! one each, each of which costs the guest an exit and a handler. With one request at a time the
//! worker is under the default policy, so the request preempts the vCPU that queued it and is
//! under way at once: the guest waits on it. A worker on a CPU of its own, or beside a halted
//! vCPU, runs at once either way. The block device's worker is made so (random 4 KiB reads at
//! queue depth 32 went from 630–658 to 3283–3338 IOPS in the test host, where the guest and the
//! worker share one CPU; see the README). Handlers report the requests they take with
//! [`Ctx::hold`].
//!
//! Pause: the VMM sets the device paused and waits until no event is being served and nothing
//! the device took is still in flight ([`Ctx::hold`]); from then on the worker consumes queue
//! kicks without serving them, and only serves descriptors registered as [`Watch::Always`]
//! (completions of work taken before the pause). Resume signals every queue kick again, so work
//! the driver queued meanwhile is found.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::wakeups::Wakeups;
use crate::devices::PauseError;

/// Token of the stop eventfd; devices use any other.
const STOP_TOKEN: u64 = u64::MAX;
/// How long a pause waits for the worker to leave guest memory alone.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the device may take work, and how much it has in hand.
#[derive(Debug, Default)]
struct RunState {
    paused: AtomicBool,
    /// Events being served, plus work taken from the guest and not yet answered.
    busy: AtomicUsize,
    /// Work taken since the worker last looked (see [`super::wakeups`]).
    taken: AtomicUsize,
    /// Resumes so far: a handler holding work back until the VM was paused and resumed (a
    /// stalled disk) compares counts.
    resumes: AtomicU64,
}

/// What a handler can do besides serving: (de)register its own descriptors, and account for
/// work that outlives the event that took it.
pub struct Ctx<'a> {
    epoll: &'a Epoll,
    run: &'a RunState,
}

impl Ctx<'_> {
    /// The worker's epoll set, for descriptors the handler watches itself (with its own
    /// tokens; [`EventHandler::prepare`] is the place to change what it waits for).
    pub fn epoll(&self) -> &Epoll {
        self.epoll
    }

    /// True while the device is paused: take no new work from the guest.
    pub fn paused(&self) -> bool {
        self.run.paused.load(Ordering::SeqCst)
    }

    /// How many times the device was resumed after a pause.
    pub fn resumes(&self) -> u64 {
        self.run.resumes.load(Ordering::SeqCst)
    }

    /// `n` pieces of work were taken and will be answered later (asynchronous transfers): a
    /// pause waits for them.
    pub fn hold(&self, n: usize) {
        self.run.busy.fetch_add(n, Ordering::SeqCst);
        self.run.taken.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` pieces of work held with [`Ctx::hold`] were answered.
    pub fn release(&self, n: usize) {
        self.run.busy.fetch_sub(n, Ordering::SeqCst);
    }
}

/// What a device's worker does with its events.
pub trait EventHandler: Send + 'static {
    /// Serves the event of the descriptor registered under `token`. Queue kicks arrive here
    /// already read, and only while the device runs.
    fn handle(&mut self, token: u64, events: EventSet, ctx: &Ctx<'_>);
    /// Called before every wait: the place to change which of its own descriptors the handler
    /// waits on (a TAP while the guest has buffers, nothing while paused).
    fn prepare(&mut self, _ctx: &Ctx<'_>) {}
    /// The worker is stopping (device reset, VM end): afterwards nothing the handler started may
    /// touch guest memory.
    fn stop(&mut self) {}
}

/// A descriptor the worker watches for the handler.
pub enum Watch {
    /// A queue's kick: read by the worker, served only while the device runs, signalled again
    /// on resume.
    Kick(EventFd),
    /// A descriptor served even while the device is paused (completions of work taken
    /// before). The handler reads or drains it.
    Always(RawFd),
}

struct Active {
    stop: EventFd,
    thread: JoinHandle<()>,
    /// Clones of the queue kicks, signalled on resume.
    kicks: Vec<EventFd>,
}

/// The worker of one device: at most one thread at a time (one per activation), and the pause
/// state, which outlives activations.
pub struct DeviceWorker {
    name: &'static str,
    batched: bool,
    run: Arc<RunState>,
    active: Mutex<Option<Active>>,
}

impl DeviceWorker {
    /// A worker for the device `name` (its thread's name too), not started.
    pub fn new(name: &'static str) -> DeviceWorker {
        DeviceWorker::made(name, false)
    }

    /// As [`DeviceWorker::new`], its thread's wake-ups batched while the guest keeps more than
    /// one request outstanding (`SCHED_BATCH`: see the module's notes).
    pub fn batched(name: &'static str) -> DeviceWorker {
        DeviceWorker::made(name, true)
    }

    fn made(name: &'static str, batched: bool) -> DeviceWorker {
        DeviceWorker {
            name,
            batched,
            run: Arc::default(),
            active: Mutex::new(None),
        }
    }

    fn active(&self) -> MutexGuard<'_, Option<Active>> {
        // Plain data every holder leaves consistent.
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a thread serving `watches` (each with its token) through `handler`, stopping the
    /// previous one first.
    pub fn start<H: EventHandler>(
        &self,
        watches: Vec<(Watch, u64)>,
        mut handler: H,
    ) -> io::Result<()> {
        self.stop();
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let mut kicks = Vec::new();
        let mut kick_tokens = Vec::new();
        for (watch, token) in &watches {
            let fd = match watch {
                Watch::Kick(k) => {
                    kicks.push(k.try_clone()?);
                    kick_tokens.push(*token);
                    k.as_raw_fd()
                }
                Watch::Always(fd) => *fd,
            };
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, *token),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let run = self.run.clone();
        let (name, batched) = (self.name, self.batched);
        let thread = crate::threads::builder(name)
            .spawn(move || serve(name, batched, &epoll, &run, &watches, &mut handler))?;
        *self.active() = Some(Active {
            stop,
            thread,
            kicks,
        });
        Ok(())
    }

    /// True while a thread serves the device.
    pub fn is_running(&self) -> bool {
        self.active().is_some()
    }

    /// Stops the thread, if any, and waits for it: afterwards the device touches nothing.
    pub fn stop(&self) {
        let active = self.active().take();
        if let Some(a) = active {
            let _ = a.stop.write(1);
            if a.thread.join().is_err() {
                tracing::error!("{} worker panicked", self.name);
            }
        }
    }

    /// Takes no new work and waits until everything taken is answered in guest memory.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.run.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        loop {
            let busy = self.run.busy.load(Ordering::SeqCst);
            if busy == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.run.paused.store(false, Ordering::SeqCst);
                return Err(PauseError {
                    device: self.name,
                    busy,
                    waited: QUIESCE_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Serves again after [`DeviceWorker::pause`]; kicks that arrived meanwhile were consumed
    /// without serving, so every queue is looked at again.
    pub fn resume(&self) {
        self.run.resumes.fetch_add(1, Ordering::SeqCst);
        self.run.paused.store(false, Ordering::SeqCst);
        if let Some(a) = self.active().as_ref() {
            for k in &a.kicks {
                let _ = k.write(1);
            }
        }
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Puts the calling thread under `SCHED_BATCH` (`on`) or the default policy; false when the
/// kernel refused. The jail's filters allow exactly these two on the calling thread.
fn batch_wakeups(name: &str, on: bool) -> bool {
    let policy = if on {
        libc::SCHED_BATCH
    } else {
        libc::SCHED_OTHER
    };
    if let Err(e) = crate::threads::set_policy(policy) {
        tracing::debug!(error = %e, "{name}: wake-ups not batched");
        return false;
    }
    true
}

/// The worker thread; `batched`: see the module's notes.
fn serve<H: EventHandler>(
    name: &str,
    batched: bool,
    epoll: &Epoll,
    run: &RunState,
    watches: &[(Watch, u64)],
    handler: &mut H,
) {
    crate::jail::seccomp::enter_thread(crate::jail::seccomp::Kind::Device);
    let ctx = Ctx { epoll, run };
    let mut events = vec![EpollEvent::default(); watches.len() + 8];
    let mut wakeups = batched.then(Wakeups::default);
    let mut batching = false;
    loop {
        handler.prepare(&ctx);
        if let Some(rule) = wakeups.as_mut() {
            // Between events `busy` counts only the work in flight.
            let took = run.taken.swap(0, Ordering::Relaxed);
            let want = rule.after(took, run.busy.load(Ordering::SeqCst));
            if want != batching {
                if batch_wakeups(name, want) {
                    batching = want;
                } else {
                    // A refusal once is a refusal for good (a policy of the host): stop asking.
                    wakeups = None;
                }
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("{name}: epoll: {e}");
                handler.stop();
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                handler.stop();
                return;
            }
            let always = match watches.iter().find(|(_, t)| *t == token) {
                Some((Watch::Kick(kick), _)) => {
                    let _ = kick.read();
                    false
                }
                Some((Watch::Always(_), _)) => true,
                None => false,
            };
            // Counted before the paused flag is read, so that a pause either sees this event
            // in progress or is seen by it.
            run.busy.fetch_add(1, Ordering::SeqCst);
            if always || !run.paused.load(Ordering::SeqCst) {
                handler.handle(token, ev.event_set(), &ctx);
            }
            run.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Sender};

    /// Reports each served token; token 7 holds one piece of work, answered when the
    /// completion eventfd (token 8) fires.
    struct Recorder(Sender<u64>, Option<EventFd>);

    impl EventHandler for Recorder {
        fn handle(&mut self, token: u64, _: EventSet, ctx: &Ctx<'_>) {
            match token {
                7 => ctx.hold(1),
                8 => {
                    if let Some(Ok(n)) = self.1.as_ref().map(EventFd::read) {
                        ctx.release(n as usize);
                    }
                }
                _ => {}
            }
            let _ = self.0.send(token);
        }
    }

    #[test]
    fn kicks_are_served_and_held_back_while_paused_then_found_on_resume() {
        let worker = DeviceWorker::new("test-dev");
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = channel();
        worker
            .start(
                vec![(Watch::Kick(kick.try_clone().unwrap()), 3)],
                Recorder(tx, None),
            )
            .unwrap();
        kick.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(3));

        worker.pause().unwrap();
        kick.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        worker.resume();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(3));
        worker.stop();
        assert!(!worker.is_running());
    }

    /// Holds one piece of work on token 1 and answers all it holds on token 2; sends the
    /// scheduling policy its thread runs under at each event.
    struct Policy(Sender<i32>, usize);

    impl EventHandler for Policy {
        fn handle(&mut self, token: u64, _: EventSet, ctx: &Ctx<'_>) {
            // SAFETY: reads the calling thread's policy; no memory is passed.
            let _ = self.0.send(unsafe { libc::sched_getscheduler(0) });
            match token {
                1 => {
                    ctx.hold(1);
                    self.1 += 1;
                }
                2 => ctx.release(std::mem::take(&mut self.1)),
                _ => {}
            }
        }
    }

    /// The policies a worker's thread serves the events of `tokens` under (0: nothing, 1: a
    /// request taken, 2: all answered).
    fn policies_of(worker: &DeviceWorker, tokens: &[usize]) -> Vec<i32> {
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let watches = (0..3)
            .map(|t| (Watch::Kick(kicks[t].try_clone().unwrap()), t as u64))
            .collect();
        let (tx, rx) = channel();
        worker.start(watches, Policy(tx, 0)).unwrap();
        let policies = tokens
            .iter()
            .map(|&t| {
                kicks[t].write(1).unwrap();
                rx.recv_timeout(Duration::from_secs(5)).unwrap()
            })
            .collect();
        worker.stop();
        policies
    }

    #[test]
    fn a_batched_worker_batches_wakeups_only_while_the_guest_is_deep() {
        use super::super::wakeups::SHALLOW_ROUNDS;
        let (o, b) = (libc::SCHED_OTHER, libc::SCHED_BATCH);
        // Idle, one request, a second one while the first is in flight (depth), idle, both
        // answered, idle; then one request at a time until the worker preempts again.
        let mut tokens = vec![0, 1, 1, 0, 2, 0];
        let mut want = vec![o, o, o, b, b, b];
        for round in 1..=SHALLOW_ROUNDS {
            tokens.extend([1, 2]);
            want.extend([b, if round < SHALLOW_ROUNDS { b } else { o }]);
        }
        tokens.push(0);
        want.push(o);
        assert_eq!(
            policies_of(&DeviceWorker::batched("test-dev"), &tokens),
            want
        );
        assert_eq!(
            policies_of(&DeviceWorker::new("test-dev"), &tokens),
            vec![o; tokens.len()]
        );
    }

    #[test]
    fn a_worker_started_while_paused_serves_nothing_until_resumed() {
        // A restored device is paused before the replay of its registers activates it.
        let worker = DeviceWorker::new("test-dev");
        worker.pause().unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = channel();
        worker
            .start(
                vec![(Watch::Kick(kick.try_clone().unwrap()), 3)],
                Recorder(tx, None),
            )
            .unwrap();
        kick.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        worker.resume();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(3));
    }

    #[test]
    fn a_pause_waits_for_held_work_and_always_watches_are_served_meanwhile() {
        let worker = Arc::new(DeviceWorker::new("test-dev"));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let done = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = channel();
        worker
            .start(
                vec![
                    (Watch::Kick(kick.try_clone().unwrap()), 7),
                    (Watch::Always(done.as_raw_fd()), 8),
                ],
                Recorder(tx, Some(done.try_clone().unwrap())),
            )
            .unwrap();
        kick.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(7));
        let w = worker.clone();
        let pausing = std::thread::spawn(move || w.pause());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pausing.is_finished(), "the pause waits for held work");
        done.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(8));
        pausing.join().unwrap().unwrap();
        worker.stop();
    }
}
