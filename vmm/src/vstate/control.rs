//! Pausing, resuming and stopping vCPU threads.
//!
//! A vCPU thread checks the wanted run state before every KVM_RUN. To get a thread out of
//! KVM_RUN we signal it: the handler sets `immediate_exit` in the thread's own `kvm_run`, so a
//! signal that lands just before KVM_RUN is entered still makes it return at once (KVM then
//! completes any pending port or MMIO access first, leaving the vCPU at an instruction
//! boundary). Parked threads also serve requests that must run on the vCPU's own thread, such
//! as saving its state.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// How long pause waits for every vCPU to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    /// The vCPU file descriptor of the current thread, for the kick signal handler.
    static THIS_VCPU: Cell<*mut VcpuFd> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = THIS_VCPU.with(|c| c.get());
    if !fd.is_null() {
        // SAFETY: the pointer was set by this very thread (thread-local) to its VcpuFd, which
        // lives until `TlsVcpu` is dropped and clears it; only the `kvm_run` page is written.
        unsafe { (*fd).set_kvm_immediate_exit(1) };
    }
}

/// Registers the kick signal handler (once per process).
fn register_kick() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Publishes a thread's vCPU fd to the signal handler for as long as it lives.
pub struct TlsVcpu;

impl TlsVcpu {
    /// Sets the current thread's vCPU.
    pub fn set(fd: &mut VcpuFd) -> TlsVcpu {
        THIS_VCPU.with(|c| c.set(fd as *mut VcpuFd));
        TlsVcpu
    }
}

impl Drop for TlsVcpu {
    fn drop(&mut self) {
        THIS_VCPU.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// What the vCPUs should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// Run the guest.
    Run,
    /// Park before the next KVM_RUN.
    Pause,
    /// Leave the run loop for good.
    Stop,
}

/// A job for a parked vCPU thread, run with its file descriptor.
pub type Job = Box<dyn Fn(u8, &VcpuFd) + Send + Sync>;

struct Ctl {
    wanted: Wanted,
    alive: usize,
    parked: usize,
    job: Option<(u64, std::sync::Arc<Job>)>,
    job_done: usize,
}

/// Run control of all vCPUs of a VM.
pub struct VcpuControl {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    job_gen: Mutex<u64>,
}

/// What a vCPU thread should do next.
pub enum Next {
    /// Enter KVM_RUN.
    Run,
    /// Return from the run loop.
    Stop,
}

/// Error controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Some vCPU did not park in time.
    #[error("{parked} of {alive} vCPUs paused within {PARK_TIMEOUT:?}")]
    Timeout {
        /// Parked.
        parked: usize,
        /// Running threads.
        alive: usize,
    },
    /// The request does not fit the state.
    #[error("vCPUs are not paused")]
    NotPaused,
    /// Host failure (signals, threads).
    #[error("vCPU control: {0}")]
    Host(#[from] std::io::Error),
}

impl VcpuControl {
    /// Control for vCPUs that will start running.
    pub fn new() -> std::io::Result<Self> {
        register_kick()?;
        Ok(Self::with_state(Wanted::Run))
    }

    /// Control whose vCPUs park before their first instruction (restored VMs).
    pub fn paused() -> std::io::Result<Self> {
        register_kick()?;
        Ok(Self::with_state(Wanted::Pause))
    }

    fn with_state(wanted: Wanted) -> Self {
        VcpuControl {
            ctl: Mutex::new(Ctl {
                wanted,
                alive: 0,
                parked: 0,
                job: None,
                job_done: 0,
            }),
            cv: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            job_gen: Mutex::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a vCPU thread running `body` (which calls [`VcpuControl::next`] before each
    /// KVM_RUN and [`VcpuControl::exited`] at the end).
    pub fn spawn(&self, name: String, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        self.lock().alive += 1;
        let handle = crate::threads::builder(name).spawn(body);
        match handle {
            Ok(h) => {
                self.threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(h);
                Ok(())
            }
            Err(e) => {
                self.lock().alive -= 1;
                Err(e)
            }
        }
    }

    /// Called by vCPU `index` before each KVM_RUN: parks while paused (serving jobs), and says
    /// whether to go on.
    pub fn next(&self, index: u8, fd: &VcpuFd) -> Next {
        let mut c = self.lock();
        if c.wanted == Wanted::Pause {
            c.parked += 1;
            self.cv.notify_all();
            let mut seen = c.job.as_ref().map(|(g, _)| *g);
            while c.wanted == Wanted::Pause {
                if let Some((g, job)) = c.job.clone() {
                    if seen != Some(g) {
                        seen = Some(g);
                        drop(c);
                        job(index, fd);
                        c = self.lock();
                        c.job_done += 1;
                        self.cv.notify_all();
                        continue;
                    }
                }
                c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            c.parked -= 1;
        }
        match c.wanted {
            Wanted::Stop => Next::Stop,
            _ => Next::Run,
        }
    }

    /// Called by a vCPU thread when its run loop ends.
    pub fn exited(&self) {
        let mut c = self.lock();
        c.alive -= 1;
        self.cv.notify_all();
    }

    fn kick_all(&self) {
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // A thread that already ended cannot be signalled; nothing to interrupt then.
            let _ = t.kill(SIGRTMIN());
        }
    }

    /// Parks every vCPU; returns once all are parked.
    pub fn pause(&self) -> Result<(), Error> {
        self.lock().wanted = Wanted::Pause;
        self.kick_all();
        let deadline = Instant::now() + PARK_TIMEOUT;
        let mut c = self.lock();
        while c.parked < c.alive {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (parked, alive) = (c.parked, c.alive);
                c.wanted = Wanted::Run;
                self.cv.notify_all();
                return Err(Error::Timeout { parked, alive });
            }
            c = self
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().wanted = Wanted::Run;
        self.cv.notify_all();
    }

    /// Whether the vCPUs are meant to be paused.
    pub fn is_paused(&self) -> bool {
        self.lock().wanted == Wanted::Pause
    }

    /// Runs `job` on every parked vCPU thread (with its fd) and waits for all of them.
    pub fn on_each_vcpu(&self, job: Job) -> Result<(), Error> {
        let gen = {
            let mut g = self.job_gen.lock().unwrap_or_else(|e| e.into_inner());
            *g += 1;
            *g
        };
        let mut c = self.lock();
        if c.wanted != Wanted::Pause || c.parked < c.alive {
            return Err(Error::NotPaused);
        }
        let want = c.alive;
        c.job = Some((gen, std::sync::Arc::new(job)));
        c.job_done = 0;
        self.cv.notify_all();
        while c.job_done < want {
            c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.job = None;
        Ok(())
    }

    /// Ends every vCPU thread and joins them. Idempotent.
    pub fn stop(&self) {
        self.lock().wanted = Wanted::Stop;
        self.cv.notify_all();
        self.kick_all();
        let threads: Vec<JoinHandle<()>> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        let me = std::thread::current().id();
        for t in threads {
            // A vCPU thread may itself end the VM; it cannot join itself.
            if t.thread().id() != me && t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }
}
