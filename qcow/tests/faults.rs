//! A failed write must leave the engine's memory, the file and the allocator agreeing. For
//! every operation the engine issues on the file during a workload (data and metadata writes,
//! length changes, fdatasyncs), a run fails exactly that one (EIO, or ENOSPC) and goes on:
//! - the guest operation that hit it fails; every other one succeeds;
//! - the disk reads back what the successful operations wrote, through the same open image
//!   and after reopening it; sectors of the failed operation hold their old or new contents;
//! - `check` and `qemu-img check` find no corruption (leaks are allowed).

mod common;
mod power;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use power::model::{create, perform, sector, workload, Config, Model, Op, SECTOR};
use qcow::hook::{FileHook, FileOp, Hook};
use qcow::{Compat, Format, Image, OpenOptions};

/// Fails the `n`-th operation on the file (counting from 0) with `errno`.
struct FailOnce {
    n: usize,
    errno: i32,
    seen: AtomicUsize,
}

impl FileHook for FailOnce {
    fn before(&self, _op: &FileOp) -> std::io::Result<()> {
        if self.seen.fetch_add(1, Ordering::SeqCst) == self.n {
            Err(std::io::Error::from_raw_os_error(self.errno))
        } else {
            Ok(())
        }
    }
}

/// The guest's view with uncertainty: sectors a failed operation touched hold either value.
struct View {
    model: Model,
    either: HashMap<u64, Vec<Vec<u8>>>,
}

impl View {
    fn done(&mut self, op: Op, ok: bool) {
        let mut after = self.model.clone();
        after.apply(op);
        if ok {
            for sct in self.model.overwritten(op) {
                self.either.remove(&sct);
            }
            self.model = after;
        } else {
            for sct in self.model.touched(op) {
                let old = sector(&self.model.bytes, sct);
                let e = self.either.entry(sct).or_insert_with(|| vec![old]);
                e.push(sector(&after.bytes, sct));
            }
        }
    }

    fn verify(&self, got: &[u8], ctx: &str) {
        assert_eq!(got.len(), self.model.bytes.len(), "{ctx}: disk size");
        for (k, g) in got.chunks(SECTOR as usize).enumerate() {
            let sct = k as u64;
            let ok = match self.either.get(&sct) {
                Some(vals) => vals.iter().any(|v| v[..] == *g),
                None => {
                    let a = k * SECTOR as usize;
                    self.model.bytes[a..a + g.len()] == *g
                }
            };
            assert!(
                ok,
                "{ctx}: sector {sct} (offset {:#x}) reads {:02x?}…, not what the guest wrote",
                sct * SECTOR,
                &g[..8]
            );
        }
    }
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut got = vec![0u8; img.size() as usize];
    img.read_at(0, &mut got).expect("read the disk");
    got
}

fn open(path: &std::path::Path, hook: Option<Hook>) -> Image {
    Image::open(
        path,
        &OpenOptions {
            writable: hook.is_some(),
            format: Some(Format::Qcow2),
            hook,
            ..Default::default()
        },
    )
    .expect("open")
}

/// Runs `cfg`'s workload once per file operation, failing that one with `errno`. Returns the
/// number of runs.
fn every_failure(cfg: &Config, seed: u64, errno: i32) -> usize {
    let dir = common::tmp();
    let (path, start) = create(dir.path(), cfg, seed);
    let pristine = std::fs::read(&path).unwrap();
    // Growth is left to the crash test: a failed resize leaves the size open.
    let ops: Vec<Op> = workload(cfg, seed)
        .into_iter()
        .filter(|op| match *op {
            Op::Grow { .. } => false,
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                off + len <= cfg.size
            }
            Op::Flush => true,
        })
        .collect();
    let counter = Arc::new(FailOnce {
        n: usize::MAX,
        errno,
        seen: AtomicUsize::new(0),
    });
    {
        let img = open(&path, Some(Hook(counter.clone())));
        for &op in &ops {
            perform(&img, op).unwrap();
        }
        img.close().unwrap();
    }
    let total = counter.seen.load(Ordering::SeqCst);
    for n in 0..total {
        let ctx = format!(
            "{} (seed {seed}), errno {errno} at file operation {n} of {total}",
            cfg.name
        );
        std::fs::write(&path, &pristine).unwrap();
        let hook = Arc::new(FailOnce {
            n,
            errno,
            seen: AtomicUsize::new(0),
        });
        let img = open(&path, Some(Hook(hook.clone())));
        let mut view = View {
            model: start.clone(),
            either: HashMap::new(),
        };
        let mut failed = 0;
        for (i, &op) in ops.iter().enumerate() {
            let r = perform(&img, op);
            if let Err(e) = &r {
                failed += 1;
                assert!(failed == 1, "{ctx}: op {i} {op:?} failed too: {e}");
            }
            view.done(op, r.is_ok());
        }
        if let Err(e) = img.flush() {
            // The failure hit this flush: a second one must succeed.
            assert!(failed == 0, "{ctx}: flush after the failure: {e}");
            img.flush()
                .unwrap_or_else(|e| panic!("{ctx}: flush after a failed flush: {e}"));
        }
        view.verify(&read_all(&img), &format!("{ctx}, through the open image"));
        // A close failing on the injected error (when it was the last operations) is fine;
        // dropping the image then closes it again.
        let _ = img.close();
        let report = qcow::check(&path, false).unwrap();
        assert_eq!(
            report.corruptions, 0,
            "{ctx}: check finds corruption: {:?}",
            report.messages
        );
        let (out, _) = common::qemu_check(&path);
        assert!(
            out.code == 0 || out.code == 3,
            "{ctx}: qemu-img check:\n{}",
            out.describe()
        );
        view.verify(
            &read_all(&open(&path, None)),
            &format!("{ctx}, after reopening"),
        );
    }
    total
}

fn config() -> Config {
    Config {
        name: "4 KiB clusters, raw backing file",
        cluster: 4096,
        size: 1 << 20,
        compat: Compat::V3,
        backing: Some(768 << 10),
        ops: 60,
    }
}

#[test]
fn every_failed_write_leaves_a_consistent_image_eio() {
    let n = every_failure(&config(), 3, libc::EIO);
    println!("{n} runs, one per file operation");
    assert!(n > 50, "the workload issued only {n} file operations");
}

#[test]
fn every_failed_write_leaves_a_consistent_image_enospc_small_clusters() {
    let cfg = Config {
        name: "512 B clusters, no backing file",
        cluster: 512,
        size: 256 << 10,
        backing: None,
        ..config()
    };
    let n = every_failure(&cfg, 4, libc::ENOSPC);
    println!("{n} runs, one per file operation");
    assert!(n > 50, "the workload issued only {n} file operations");
}
