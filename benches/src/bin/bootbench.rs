//! `bootbench`: boot-time comparison and boot-reliability loop, run in the test host (or
//! directly on a host with VMX/SVM). Only ratios measured side by side in one run count in the
//! test host; absolute times there are TCG times, not hardware times.

use std::fs;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use lightbyte_benches::timing::{median, parse, timed_line, BootTiming};
use lightbyte_tests::artifacts::{self, Artifacts};
use lightbyte_tests::guest::{Boot, GUEST_CMDLINE};
use lightbyte_tests::paths::binary;
use lightbyte_tests::testhost;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boots the same kernel and initramfs under vmm and under QEMU (-M microvm, KVM), alternating,
    /// and prints medians and the vmm/QEMU ratio.
    Compare {
        /// Boots per VMM.
        #[arg(long, default_value_t = 10)]
        runs: u32,
    },
    /// Boots vmm repeatedly and fails unless every boot reached the marker and exited 0.
    Loop {
        /// Number of boots.
        #[arg(long, default_value_t = 20)]
        runs: u32,
    },
}

fn vmm_cmd(a: &Artifacts) -> Result<Vec<String>> {
    let mut cmd = vec![binary("vmm")?.display().to_string()];
    cmd.extend(Boot::new(&a.minimal_vmlinux)?.args());
    Ok(cmd)
}

fn qemu_cmd(a: &Artifacts) -> Vec<String> {
    [
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        "512M",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        a.minimal_vmlinux.display().to_string(),
        "-initrd".into(),
        a.initramfs.display().to_string(),
        "-append".into(),
        GUEST_CMDLINE.into(),
    ])
    .collect()
}

/// Runs the given labelled commands `runs` times each, interleaved, and returns the results file.
fn run_timed(name: &str, cmds: &[(&str, Vec<String>)], runs: u32) -> Result<String> {
    let host = testhost::shared()?;
    let dir = host.work_dir().join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let results = dir.join("results.txt");
    let mut script = String::new();
    for i in 0..runs {
        script.push_str(&format!("echo 'round {}/{runs}' >&2\n", i + 1));
        for (label, cmd) in cmds {
            script.push_str(&timed_line(label, cmd, &results, 120)?);
        }
    }
    let timeout = Duration::from_secs(60 + 150 * u64::from(runs) * cmds.len() as u64);
    let out = host.run(name, &script, timeout)?;
    if out.status != 0 {
        bail!("{name} scenario failed:\n{}", out.output);
    }
    Ok(fs::read_to_string(&results)?)
}

struct Summary {
    ok: usize,
    total: usize,
    marker_ms: f64,
    exit_ms: f64,
}

fn summarize(v: &[BootTiming]) -> Summary {
    let good: Vec<&BootTiming> = v.iter().filter(|t| t.ok()).collect();
    let mut marker: Vec<f64> = good.iter().filter_map(|t| t.marker_ms).collect();
    let mut exit: Vec<f64> = good.iter().map(|t| t.exit_ms).collect();
    Summary {
        ok: good.len(),
        total: v.len(),
        marker_ms: if marker.is_empty() {
            f64::NAN
        } else {
            median(&mut marker)
        },
        exit_ms: if exit.is_empty() {
            f64::NAN
        } else {
            median(&mut exit)
        },
    }
}

fn compare(runs: u32) -> Result<bool> {
    let a = artifacts::get()?;
    let text = run_timed(
        "bootbench-compare",
        &[("vmm", vmm_cmd(a)?), ("qemu", qemu_cmd(a))],
        runs,
    )?;
    let vmm = summarize(&parse(&text, "vmm")?);
    let qemu = summarize(&parse(&text, "qemu")?);
    println!("Boot time, minimal 6.1 kernel (PVH) + test initramfs, 1 vCPU, 512 MiB, {runs} boots each, alternating, one test host");
    println!(
        "| VMM | boots OK | median start→marker (ms) | median start→exit after poweroff (ms) |"
    );
    println!("|---|---|---|---|");
    for (name, s) in [("lightbyte vmm", &vmm), ("QEMU -M microvm (KVM)", &qemu)] {
        println!(
            "| {name} | {}/{} | {:.0} | {:.0} |",
            s.ok, s.total, s.marker_ms, s.exit_ms
        );
    }
    println!(
        "| **ratio vmm/QEMU** | | **{:.2}** | **{:.2}** |",
        vmm.marker_ms / qemu.marker_ms,
        vmm.exit_ms / qemu.exit_ms
    );
    Ok(vmm.ok == vmm.total)
}

fn boot_loop(runs: u32) -> Result<bool> {
    let a = artifacts::get()?;
    let text = run_timed("bootbench-loop", &[("vmm", vmm_cmd(a)?)], runs)?;
    let timings = parse(&text, "vmm")?;
    let s = summarize(&timings);
    println!(
        "{}/{} boots reached the marker and exited 0 (median start→marker {:.0} ms, start→exit {:.0} ms)",
        s.ok, runs, s.marker_ms, s.exit_ms
    );
    for (i, t) in timings.iter().enumerate().filter(|(_, t)| !t.ok()) {
        println!("boot {}: failed: {t:?}", i + 1);
    }
    Ok(s.ok == runs as usize && timings.len() == runs as usize)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Compare { runs } => compare(runs),
        Cmd::Loop { runs } => boot_loop(runs),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bootbench: {e:#}");
            ExitCode::from(2)
        }
    }
}
