//! Power loss, simulated: a [`Recorder`] hooked under an image file logs every write, length
//! change and fdatasync the engine issues, with marks for the workload's own steps; [`states`]
//! rebuilds the file as a power loss could have left it. Until an fdatasync returns, the page
//! cache may have written back any of the pages changed since the previous one, in any order:
//! every write is cut into 4 KiB pages and each page of an epoch (the operations between two
//! syncs) lands or not (CrashMonkey's and ALICE's model). The states are: each sync point
//! (everything before it, nothing after), and random subsets of each epoch's pages on top of
//! the preceding sync point.

#![allow(dead_code)]

pub mod model;

use std::sync::Mutex;

use qcow::hook::{FileHook, FileOp};

use crate::common::Rng;

/// The unit the page cache writes back.
pub const PAGE: u64 = 4096;

/// What the recorder saw, in order.
#[derive(Clone, Debug)]
pub enum Event {
    Op(FileOp),
    /// The workload starts guest operation `n` (0-based).
    Begin(usize),
    /// A guest flush returned, having been issued after guest operations `0..n`.
    Flushed(usize),
}

/// The log of one image file.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn mark(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}

impl FileHook for Recorder {
    fn after(&self, op: &FileOp) {
        self.mark(Event::Op(op.clone()));
    }
}

/// One piece of an operation that lands or not as a whole.
#[derive(Clone, Debug)]
enum Piece {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

fn pieces(op: &FileOp) -> Vec<Piece> {
    match op {
        FileOp::Write { offset, data } => {
            let mut out = Vec::new();
            let end = offset + data.len() as u64;
            let mut pos = *offset;
            while pos < end {
                let next = ((pos / PAGE) + 1) * PAGE;
                let stop = next.min(end);
                let d = data[(pos - offset) as usize..(stop - offset) as usize].to_vec();
                out.push(Piece::Write {
                    offset: pos,
                    data: d,
                });
                pos = stop;
            }
            out
        }
        FileOp::SetLen(n) => vec![Piece::SetLen(*n)],
        FileOp::Sync => Vec::new(),
    }
}

fn apply(file: &mut Vec<u8>, p: &Piece) {
    match p {
        Piece::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[*offset as usize..end].copy_from_slice(data);
        }
        Piece::SetLen(n) => file.resize(*n as usize, 0),
    }
}

/// A file as a power loss could have left it.
pub struct State {
    pub bytes: Vec<u8>,
    /// Guest operations `0..acked` were covered by a flush that returned before the crash.
    pub acked: usize,
    /// Guest operations `acked..begun` may have landed in part.
    pub begun: usize,
    /// How it was built, for failure messages.
    pub what: String,
}

/// The crash states of a recorded run over a file that held `initial` when recording started:
/// every sync point, plus `per_epoch` random subsets of each epoch's pages.
pub fn states(initial: &[u8], events: &[Event], per_epoch: usize, seed: u64) -> Vec<State> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut durable = initial.to_vec();
    let mut epoch: Vec<Piece> = Vec::new();
    let mut acked = 0;
    let mut begun = 0;
    let mut n_epoch = 0;
    for e in events {
        match e {
            Event::Begin(n) => begun = begun.max(n + 1),
            Event::Flushed(n) => {
                assert!(
                    epoch.is_empty(),
                    "a flush returned with writes after the last fdatasync"
                );
                acked = acked.max(*n);
            }
            Event::Op(FileOp::Sync) => {
                for k in 0..per_epoch {
                    if epoch.is_empty() {
                        break;
                    }
                    let mut bytes = durable.clone();
                    let mut kept = 0;
                    for p in &epoch {
                        // Bias some subsets towards few or many pages landing.
                        let pct = [50, 10, 90][k % 3];
                        if rng.chance(pct) {
                            apply(&mut bytes, p);
                            kept += 1;
                        }
                    }
                    out.push(State {
                        bytes,
                        acked,
                        begun,
                        what: format!(
                            "epoch {n_epoch}: {kept} of {} pages since the last sync",
                            epoch.len()
                        ),
                    });
                }
                for p in epoch.drain(..) {
                    apply(&mut durable, &p);
                }
                n_epoch += 1;
                out.push(State {
                    bytes: durable.clone(),
                    acked,
                    begun,
                    what: format!("sync point {n_epoch}"),
                });
            }
            Event::Op(op) => epoch.extend(pieces(op)),
        }
    }
    // A run that ended without a final sync: its last epoch lands in part.
    for k in 0..per_epoch {
        if epoch.is_empty() {
            break;
        }
        let mut bytes = durable.clone();
        for p in &epoch {
            if rng.chance([50, 10, 90][k % 3]) {
                apply(&mut bytes, p);
            }
        }
        out.push(State {
            bytes,
            acked,
            begun,
            what: format!("after the last sync, {} pages in flight", epoch.len()),
        });
    }
    out
}
