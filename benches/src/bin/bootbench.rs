//! `bootbench`: boot-time comparison and boot-reliability loop, run in the test host (or
//! directly on a host with VMX/SVM). Only ratios measured side by side in one run count in the
//! test host; absolute times there are TCG times, not hardware times.

use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use lightbyte_benches::peers::{contenders, vmm_cmd, Contender};
use lightbyte_benches::timing::{median, memory_line, parse, parse_memory, timed_line, BootTiming};
use lightbyte_tests::artifacts;
use lightbyte_tests::testhost;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boots the same kernel and initramfs under vmm (without and with --jail), QEMU (-M microvm,
    /// KVM) and, when FIRECRACKER= and CLOUD_HYPERVISOR= in the environment name their binaries,
    /// Firecracker and Cloud Hypervisor, interleaved; prints medians of start→marker, the guest's
    /// own uptime at its marker and start→exit, then each VMM's memory outside guest RAM (the
    /// guest idle after its marker), and ratios to Firecracker (or QEMU without it).
    Compare {
        /// Boots per VMM.
        #[arg(long, default_value_t = 7)]
        runs: u32,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Memory measurements per VMM (medians are reported).
        #[arg(long, default_value_t = 3)]
        memory_runs: u32,
        /// Starts every timed boot with address-space randomization off (`setarch -R`, whose
        /// exec is then in every row). The test host's emulator (QEMU 7.2 TCG) translates a
        /// process's code again wherever it is mapped anew; with fixed addresses it keeps the
        /// translation from one boot to the next, and start → marker holds each VMM's own work.
        #[arg(long)]
        fixed_addresses: bool,
    },
    /// One verbose boot per VMM of the comparison (kernel messages with timestamps) with the
    /// host's KVM exits counted around it: prints when each boot step happened, exits by
    /// reason, the busiest I/O ports and MMIO pages, and each guest's longest silences.
    Trace {
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Further kernel parameters for every VMM (after the verbose ones).
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// UEFI boot: the same kernel (bzImage) and initramfs booted directly by vmm, by vmm
    /// --firmware through systemd-boot on a GPT disk, and by QEMU (-M pc, KVM) through Debian's
    /// OVMF from the same disk, interleaved; the same columns as `compare`, ratios of the UEFI
    /// boot to the direct one and to OVMF, and the firmware sizes.
    Uefi {
        /// Boots per row.
        #[arg(long, default_value_t = 7)]
        runs: u32,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Memory measurements per row (medians are reported).
        #[arg(long, default_value_t = 3)]
        memory_runs: u32,
    },
    /// Boots vmm repeatedly and fails unless every boot reached the marker and exited 0.
    Loop {
        /// Number of boots.
        #[arg(long, default_value_t = 20)]
        runs: u32,
    },
}

/// Runs `lines(round)` for `runs` rounds in the test host and returns the results file.
fn run_rounds(
    name: &str,
    runs: u32,
    per_round: usize,
    lines: impl Fn(&Path) -> Result<String>,
) -> Result<String> {
    let host = testhost::shared()?;
    let dir = host.work_dir().join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let results = dir.join("results.txt");
    let mut script = String::new();
    for i in 0..runs {
        script.push_str(&format!("echo '{name}: round {}/{runs}' >&2\n", i + 1));
        script.push_str(&lines(&results)?);
    }
    let timeout = Duration::from_secs(60 + 150 * u64::from(runs) * per_round as u64);
    let out = host.run(name, &script, timeout)?;
    if out.status != 0 {
        bail!("{name} scenario failed:\n{}", out.output);
    }
    Ok(fs::read_to_string(&results)?)
}

/// Runs the given labelled commands `runs` times each, interleaved, and returns the results file.
fn run_timed(name: &str, cmds: &[(&str, Vec<String>)], runs: u32) -> Result<String> {
    run_rounds(name, runs, cmds.len(), |results| {
        cmds.iter()
            .map(|(label, cmd)| timed_line(label, cmd, results, 120))
            .collect()
    })
}

struct Summary {
    ok: usize,
    total: usize,
    marker_ms: f64,
    uptime_ms: f64,
    exit_ms: f64,
    memory_mib: f64,
}

fn median_or_nan(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        median(&mut v)
    }
}

fn summarize(v: &[BootTiming], memory_kib: Vec<f64>) -> Summary {
    let good: Vec<&BootTiming> = v.iter().filter(|t| t.ok()).collect();
    Summary {
        ok: good.len(),
        total: v.len(),
        marker_ms: median_or_nan(good.iter().filter_map(|t| t.marker_ms).collect()),
        uptime_ms: median_or_nan(good.iter().filter_map(|t| t.uptime_ms).collect()),
        exit_ms: median_or_nan(good.iter().map(|t| t.exit_ms).collect()),
        memory_mib: median_or_nan(memory_kib) / 1024.0,
    }
}

/// Boots every contender `runs` times (interleaved) and measures its memory with the guest
/// idle; one summary per contender, in order.
fn measure<'a>(
    name: &str,
    all: &'a [Contender],
    runs: u32,
    memory_mib: u64,
    memory_runs: u32,
) -> Result<Vec<(&'a Contender, Summary)>> {
    let timed: Vec<(&str, Vec<String>)> = all.iter().map(|c| (c.label, c.timed.clone())).collect();
    let text = run_timed(name, &timed, runs)?;
    let memory = run_rounds(
        &format!("{name}-memory"),
        memory_runs,
        all.len(),
        |results| {
            all.iter()
                .map(|c| memory_line(c.label, &c.idle, results, memory_mib))
                .collect()
        },
    )?;
    all.iter()
        .map(|c| {
            Ok((
                c,
                summarize(&parse(&text, c.label)?, parse_memory(&memory, c.label)),
            ))
        })
        .collect()
}

fn print_table(rows: &[(&Contender, Summary)]) {
    println!(
        "| VMM | boots OK | start → marker (median ms) | guest uptime at marker (ms) | \
         start → exit after power-off (ms) | memory outside guest RAM (MiB, guest idle) |"
    );
    println!("|---|---|---|---|---|---|");
    for (c, s) in rows {
        println!(
            "| {} | {}/{} | {:.0} | {:.0} | {:.0} | {:.1} |",
            c.name, s.ok, s.total, s.marker_ms, s.uptime_ms, s.exit_ms, s.memory_mib
        );
    }
}

fn print_ratio(ours: &(&Contender, Summary), base: &(&Contender, Summary)) {
    let (c, s) = ours;
    println!(
        "| **{} / {}** | | **{:.2}** | **{:.2}** | **{:.2}** | **{:.2}** |",
        c.name,
        base.0.name,
        s.marker_ms / base.1.marker_ms,
        s.uptime_ms / base.1.uptime_ms,
        s.exit_ms / base.1.exit_ms,
        s.memory_mib / base.1.memory_mib
    );
}

fn row<'a, 'b>(rows: &'b [(&'a Contender, Summary)], label: &str) -> &'b (&'a Contender, Summary) {
    rows.iter()
        .find(|(c, _)| c.label == label)
        .expect("every row is measured")
}

fn compare(runs: u32, memory_mib: u64, memory_runs: u32, fixed_addresses: bool) -> Result<bool> {
    let a = artifacts::get()?;
    let dir = testhost::shared()?.work_dir().join("bootbench-configs");
    let mut all = contenders(a, &dir, memory_mib, "")?;
    if fixed_addresses {
        for c in &mut all {
            let fixed = ["setarch", std::env::consts::ARCH, "-R"].map(String::from);
            c.timed = fixed.into_iter().chain(c.timed.drain(..)).collect();
        }
    }
    let rows = measure("bootbench-compare", &all, runs, memory_mib, memory_runs)?;
    println!(
        "Boot, minimal 6.1 kernel (PVH) + test initramfs, 1 vCPU, {memory_mib} MiB, `quiet`, \
         {runs} boots each, interleaved, one test host run{}",
        if fixed_addresses {
            ", address randomization off"
        } else {
            ""
        }
    );
    print_table(&rows);
    let base = rows
        .iter()
        .find(|(c, _)| c.label == "firecracker")
        .unwrap_or_else(|| row(&rows, "qemu"));
    let ours: Vec<_> = rows
        .iter()
        .filter(|(c, _)| c.label.starts_with("vmm"))
        .collect();
    for r in &ours {
        print_ratio(r, base);
    }
    if let Some(baseline) = rows.iter().find(|(c, _)| c.label == "vmm-baseline") {
        print_ratio(row(&rows, "vmm"), baseline);
    }
    Ok(ours.iter().all(|(_, s)| s.ok == s.total))
}

/// Measures one contender a boot per test-host scenario, so that a test host that dies under
/// it (QEMU 7.2's TCG aborts now and then under nested OVMF) costs that boot only: it counts as
/// failed and the next boot gets a new test host.
fn measure_fragile(c: &Contender, runs: u32, memory_mib: u64) -> Summary {
    let mut timings = Vec::new();
    for i in 0..runs {
        let one = run_timed("bootbench-fragile", &[(c.label, c.timed.clone())], 1)
            .and_then(|text| parse(&text, c.label));
        match one {
            Ok(t) => timings.extend(t),
            Err(e) => {
                eprintln!("bootbench: {} boot {}: {e:#}", c.label, i + 1);
                timings.push(BootTiming {
                    marker_ms: None,
                    uptime_ms: None,
                    exit_ms: f64::NAN,
                    status: -1,
                });
            }
        }
    }
    let memory = run_rounds("bootbench-fragile-memory", 1, 1, |results| {
        memory_line(c.label, &c.idle, results, memory_mib)
    })
    .map(|text| parse_memory(&text, c.label))
    .unwrap_or_else(|e| {
        eprintln!("bootbench: {} memory: {e:#}", c.label);
        Vec::new()
    });
    summarize(&timings, memory)
}

fn uefi(runs: u32, memory_mib: u64, memory_runs: u32) -> Result<bool> {
    let a = artifacts::get()?;
    let dir = testhost::shared()?.work_dir().join("bootbench-uefi-disks");
    let all = lightbyte_benches::uefi::contenders(a, &dir, memory_mib)?;
    let (ours, peers): (Vec<Contender>, Vec<Contender>) =
        all.into_iter().partition(|c| c.label.starts_with("vmm"));
    let mut rows = measure("bootbench-uefi", &ours, runs, memory_mib, memory_runs)?;
    for c in &peers {
        rows.push((c, measure_fragile(c, runs, memory_mib)));
    }
    println!(
        "UEFI boot, minimal 6.1 kernel (bzImage, EFI stub) + test initramfs, 1 vCPU, \
         {memory_mib} MiB, `quiet`, {runs} boots each (lightbyte's rows interleaved; OVMF's \
         after them, one test-host scenario per boot)"
    );
    print_table(&rows);
    let (direct, uefi, ovmf) = (
        row(&rows, "vmm-direct"),
        row(&rows, "vmm-uefi"),
        row(&rows, "qemu-ovmf"),
    );
    print_ratio(uefi, direct);
    print_ratio(uefi, ovmf);
    let size = |p: &Path| fs::metadata(p).map(|m| m.len() / 1024).unwrap_or(0);
    println!(
        "firmware size: lightbyte-firmware {} KiB (ELF), OVMF {} KiB (OVMF_CODE.fd)",
        size(&a.firmware),
        size(Path::new(lightbyte_benches::uefi::OVMF_CODE))
    );
    // Our rows must all boot; a peer's failures are its own and shown in its row.
    Ok(rows
        .iter()
        .filter(|(c, _)| c.label.starts_with("vmm"))
        .all(|(_, s)| s.ok == s.total))
}

fn boot_loop(runs: u32) -> Result<bool> {
    let a = artifacts::get()?;
    let text = run_timed(
        "bootbench-loop",
        &[("vmm", vmm_cmd(a, 512, false, true, "")?)],
        runs,
    )?;
    let timings = parse(&text, "vmm")?;
    let s = summarize(&timings, Vec::new());
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
        Cmd::Compare {
            runs,
            memory_mib,
            memory_runs,
            fixed_addresses,
        } => compare(runs, memory_mib, memory_runs, fixed_addresses),
        Cmd::Trace {
            memory_mib,
            cmdline,
        } => lightbyte_benches::boottrace::report::run(memory_mib, &cmdline),
        Cmd::Uefi {
            runs,
            memory_mib,
            memory_runs,
        } => uefi(runs, memory_mib, memory_runs),
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
