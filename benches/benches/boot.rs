//! Criterion benchmark of boot time: process start → the guest's marker line, and process
//! start → exit after the guest powers off, for vmm, QEMU and the peers the environment names
//! (`FIRECRACKER=`, `CLOUD_HYPERVISOR=`), one group per VMM. Each iteration is a real boot of the
//! minimal kernel (PVH) with the test initramfs, 256 MiB, inside the test host on machines
//! without VMX/SVM.

use std::fs;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use lightbyte_benches::peers::contenders;
use lightbyte_benches::timing::{parse, timed_line};
use lightbyte_tests::artifacts;
use lightbyte_tests::testhost;

#[derive(Clone, Copy)]
enum Until {
    Marker,
    Exit,
}

fn boots(label: &str, cmd: &[String], iters: u64, until: Until) -> Duration {
    let host = testhost::shared().expect("test host");
    let dir = host.work_dir().join(format!("criterion-boot-{label}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("work dir");
    let results = dir.join("results.txt");
    let mut script = String::new();
    for _ in 0..iters {
        script.push_str(&timed_line(label, cmd, &results, 120).expect("timed line"));
    }
    let out = host
        .run(
            "criterion-boot",
            &script,
            Duration::from_secs(60 + 150 * iters),
        )
        .expect("scenario");
    assert_eq!(out.status, 0, "{}", out.output);
    let text = fs::read_to_string(&results).expect("results");
    let timings = parse(&text, label).expect("parse");
    assert_eq!(timings.len() as u64, iters);
    let ms: f64 = timings
        .iter()
        .map(|t| {
            assert!(t.ok(), "boot failed: {t:?}");
            match until {
                Until::Marker => t.marker_ms.expect("marker"),
                Until::Exit => t.exit_ms,
            }
        })
        .sum();
    Duration::from_secs_f64(ms / 1000.0)
}

fn boot_time(c: &mut Criterion) {
    let a = artifacts::get().expect("guest artifacts");
    let dir = testhost::shared()
        .expect("test host")
        .work_dir()
        .join("criterion-boot-configs");
    for vmm in contenders(a, &dir, 256, "").expect("VMM commands") {
        let mut g = c.benchmark_group(format!("boot_minimal_pvh/{}", vmm.label));
        g.sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_millis(1));
        g.bench_function("start_to_marker", |b| {
            b.iter_custom(|iters| boots(vmm.label, &vmm.timed, iters, Until::Marker))
        });
        g.bench_function("start_to_exit", |b| {
            b.iter_custom(|iters| boots(vmm.label, &vmm.timed, iters, Until::Exit))
        });
        g.finish();
    }
}

criterion_group!(benches, boot_time);
criterion_main!(benches);
