//! `on-error=pause`: a write (or flush, discard, write-zeroes) that fails on the host is not
//! answered. It waits here, the device takes no new requests, and the VM is asked to pause
//! ([`VmEvent::Stall`]); once the VM has been paused and resumed (the user freed space or
//! fixed the file system), the waiting requests are retried in the order they came, and the
//! guest never sees the error unless the retry fails under `on-error=report`.

use std::io;

use block::{DiskBackend, Io};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::request::{completion, Completion, DiskOp};
use crate::config::OnError;
use crate::devices::virtio::worker::Ctx;
use crate::devices::{ExitHandle, VmEvent};

/// What a request does on the disk.
#[derive(Debug)]
pub enum Work {
    Transfer(Io),
    Disk(DiskOp),
}

impl Work {
    /// Whether it changes the disk (what `on-error` covers; reads always report).
    fn writes(&self) -> bool {
        match self {
            Work::Transfer(io) => io.write,
            Work::Disk(_) => true,
        }
    }

    /// Carries it out synchronously.
    pub fn run(&self, mem: &GuestMemoryMmap, disk: &mut dyn DiskBackend) -> io::Result<()> {
        match self {
            Work::Transfer(io) => io.run_sync(mem, disk),
            Work::Disk(op) => op.run(disk),
        }
    }

    /// Its completion, given its outcome.
    pub fn completion(&self, status: GuestAddress, result: io::Result<()>) -> Completion {
        match self {
            Work::Transfer(io) => completion(io, status, result),
            Work::Disk(op) => op.completion(status, result),
        }
    }

    fn describe(&self) -> String {
        match self {
            Work::Transfer(io) => format!("write of {} bytes at {:#x}", io.len, io.offset),
            Work::Disk(DiskOp::Flush) => "flush".into(),
            Work::Disk(DiskOp::Discard { offset, len }) => {
                format!("discard of {len} bytes at {offset:#x}")
            }
            Work::Disk(DiskOp::WriteZeroes { offset, len, .. }) => {
                format!("write-zeroes of {len} bytes at {offset:#x}")
            }
        }
    }
}

/// A request waiting for the VM to be resumed.
#[derive(Debug)]
pub struct Parked {
    pub queue: usize,
    pub head: u16,
    pub status: GuestAddress,
    pub work: Work,
}

/// The failed writes of one device and what to do about them.
pub struct Stalls {
    policy: OnError,
    /// How the disk is named to the user ("disk 0 (/path)").
    name: String,
    report: ExitHandle,
    parked: Vec<Parked>,
    /// Resumes of the device when the first request was parked: retry after the next one.
    parked_at: u64,
}

impl Stalls {
    pub fn new(policy: OnError, name: String, report: ExitHandle) -> Self {
        Stalls {
            policy,
            name,
            report,
            parked: Vec::new(),
            parked_at: 0,
        }
    }

    /// Requests are waiting: serve no new ones.
    pub fn stalled(&self) -> bool {
        !self.parked.is_empty()
    }

    /// Requests are waiting and the VM was resumed since: retry them now.
    pub fn due(&self, ctx: &Ctx<'_>) -> bool {
        self.stalled() && ctx.resumes() > self.parked_at
    }

    /// The waiting requests, in the order they came, to retry.
    pub fn take(&mut self) -> Vec<Parked> {
        std::mem::take(&mut self.parked)
    }

    /// Keeps `p` waiting behind those parked already.
    pub fn keep(&mut self, p: Parked) {
        self.parked.push(p);
    }

    /// Keeps `p` back when it is a write that failed with `result` and the policy pauses;
    /// otherwise gives it back with its result, to be answered.
    pub fn settle(
        &mut self,
        ctx: &Ctx<'_>,
        p: Parked,
        result: io::Result<()>,
    ) -> Option<(Parked, io::Result<()>)> {
        let err = match result {
            Err(e) if self.policy == OnError::Pause && p.work.writes() => e,
            other => return Some((p, other)),
        };
        if self.parked.is_empty() {
            let reason = format!("{}: {} failed: {err}", self.name, p.work.describe());
            tracing::warn!("{reason}; the request waits for the VM to be resumed");
            self.parked_at = ctx.resumes();
            self.report.send(VmEvent::Stall(reason));
        }
        self.parked.push(p);
        None
    }
}
