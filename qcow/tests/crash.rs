//! Power loss at every instant of a randomized workload on the real qcow2 engine: allocating
//! and in-place writes, discards, zeroing with and without unmap, flushes and growth, on plain
//! images and overlays, small clusters (many tables and refcount blocks, clusters freed and
//! reused) and common ones. Every write, length change and fdatasync is recorded under the
//! image file ([`power::Recorder`]); each rebuilt crash state must
//! - be consistent for our `check` and, for a sample, for `qemu-img check` (leaks allowed,
//!   corruption never);
//! - read back, sector by sector, what the guest had when its last completed flush was issued,
//!   except sectors that later operations touched, which may hold any value they held since.

mod common;
mod power;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use power::model::{create, perform, workload, Config, Expect, History, Op};
use power::{Event, Recorder};
use qcow::hook::Hook;
use qcow::{Compat, Format, Image, OpenOptions};

/// Runs `ops` on the image at `path` with a recorder under it; returns the recorder and the
/// file as it was when recording started.
fn record(path: &Path, ops: &[Op]) -> (Vec<power::Event>, Vec<u8>) {
    let rec = Arc::new(Recorder::default());
    let initial = std::fs::read(path).unwrap();
    let img = Image::open(
        path,
        &OpenOptions {
            writable: true,
            format: Some(Format::Qcow2),
            hook: Some(Hook(rec.clone())),
            ..Default::default()
        },
    )
    .unwrap();
    for (i, &op) in ops.iter().enumerate() {
        rec.mark(Event::Begin(i));
        perform(&img, op).unwrap_or_else(|e| panic!("op {i} {op:?}: {e}"));
        if let Op::Flush = op {
            rec.mark(Event::Flushed(i));
        }
    }
    img.close().unwrap();
    (rec.events(), initial)
}

/// Records `cfg`'s workload and checks every crash state; returns (states, by qemu-img).
fn run(cfg: &Config, seed: u64) -> (usize, usize) {
    let dir = common::tmp();
    let (path, start) = create(dir.path(), cfg, seed);
    let ops = workload(cfg, seed);
    let (events, initial) = record(&path, &ops);
    let history = History::new(start, &ops);
    let states = power::states(&initial, &events, 6, seed);
    let crash = dir.path().join("crash.qcow2");
    let mut by_qemu = 0;
    let mut expected: HashMap<(usize, usize), Expect> = HashMap::new();
    for (k, st) in states.iter().enumerate() {
        std::fs::write(&crash, &st.bytes).unwrap();
        let ctx = || format!("{} (seed {seed}), state {k}, {}", cfg.name, st.what);
        let report = qcow::check(&crash, false).unwrap_or_else(|e| panic!("{}: check: {e}", ctx()));
        if report.corruptions > 0 {
            let keep = dir.path().join("corrupt.qcow2");
            std::fs::copy(&crash, &keep).unwrap();
            let keep = dir.keep().join("corrupt.qcow2");
            panic!(
                "{}: {} corruptions: {:?} (image kept at {})",
                ctx(),
                report.corruptions,
                report.messages,
                keep.display()
            );
        }
        if k % 10 == 0 || k == states.len() - 1 {
            let (out, _) = common::qemu_check(&crash);
            assert!(
                out.code == 0 || out.code == 3,
                "{}: qemu-img check finds corruption:\n{}",
                ctx(),
                out.describe()
            );
            by_qemu += 1;
        }
        let img = Image::open(
            &crash,
            &OpenOptions {
                format: Some(Format::Qcow2),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{}: open: {e}", ctx()));
        let mut got = vec![0u8; img.size() as usize];
        img.read_at(0, &mut got)
            .unwrap_or_else(|e| panic!("{}: read: {e}", ctx()));
        let want = expected
            .entry((st.acked, st.begun))
            .or_insert_with(|| history.expect(st.acked, st.begun));
        if let Err(why) = want.verify(&got) {
            panic!("{}: {why}", ctx());
        }
    }
    (states.len(), by_qemu)
}

/// Runs `cfg` over `CRASH_SEEDS` seeds (2 unless set).
fn run_seeds(cfg: Config) {
    let seeds: u64 = std::env::var("CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut total = 0;
    for seed in 1..=seeds {
        let (n, q) = run(&cfg, seed);
        println!(
            "{} (seed {seed}): {n} crash states, {q} also by qemu-img",
            cfg.name
        );
        total += n;
    }
    assert!(
        total > 200 * seeds as usize,
        "too few crash states ({total}) to mean much"
    );
}

#[test]
fn crash_states_with_512_byte_clusters() {
    run_seeds(Config {
        name: "512 B clusters, no backing file",
        cluster: 512,
        size: 1 << 20,
        compat: Compat::V3,
        backing: None,
        ops: 300,
    });
}

#[test]
fn crash_states_of_a_v2_overlay() {
    run_seeds(Config {
        name: "512 B clusters, v2, raw backing file",
        cluster: 512,
        size: 1 << 20,
        compat: Compat::V2,
        backing: Some(768 << 10),
        ops: 300,
    });
}

#[test]
fn crash_states_of_an_overlay_with_4k_clusters() {
    run_seeds(Config {
        name: "4 KiB clusters, raw backing file",
        cluster: 4096,
        size: 2 << 20,
        compat: Compat::V3,
        backing: Some(3 << 19),
        ops: 300,
    });
}

#[test]
fn crash_states_of_an_overlay_with_64k_clusters() {
    run_seeds(Config {
        name: "64 KiB clusters, raw backing file",
        cluster: 65536,
        size: 4 << 20,
        compat: Compat::V3,
        backing: Some(3 << 20),
        ops: 150,
    });
}

#[test]
fn states_cover_sync_points_and_partial_epochs() {
    use qcow::hook::FileOp;
    let events = vec![
        Event::Op(FileOp::Write {
            offset: 0,
            data: vec![1; 8192],
        }),
        Event::Op(FileOp::Sync),
        Event::Op(FileOp::Write {
            offset: 4096,
            data: vec![2; 4096],
        }),
        Event::Op(FileOp::SetLen(16384)),
        Event::Op(FileOp::Sync),
    ];
    let st = power::states(&[0u8; 4096], &events, 3, 7);
    let syncs: Vec<&power::State> = st.iter().filter(|s| s.what.starts_with("sync")).collect();
    assert_eq!(syncs.len(), 2);
    assert_eq!(syncs[0].bytes, [vec![1u8; 8192]].concat());
    let mut want = vec![1u8; 4096];
    want.extend(vec![2u8; 4096]);
    want.extend(vec![0u8; 8192]);
    assert_eq!(syncs[1].bytes, want);
    // Partial states of the second epoch all start from the first sync point.
    for p in st.iter().filter(|s| s.what.starts_with("epoch 1")) {
        assert_eq!(&p.bytes[..4096], &[1u8; 4096][..]);
    }
}
