//! `bootbench trace`: one traced boot per VMM in one test-host run, then the tables.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use anyhow::{bail, Result};
use lightbyte_tests::artifacts;
use lightbyte_tests::testhost::{self, Mode};

use super::{
    counts_by, exec_to_first_entry, exit_reason_name, hist_buckets, kernel_lines, longest_gaps,
    milestones, parse_number, trace_lines, MILESTONES, VERBOSE,
};
use crate::peers::contenders;

/// What one traced boot left behind.
struct Traced {
    name: &'static str,
    /// Milliseconds from the VMM's exec to the guest's first instruction, and the program.
    exec_to_entry: Option<(f64, String)>,
    lines: Vec<(f64, String)>,
    /// When each of [`MILESTONES`] was printed.
    steps: Vec<Option<f64>>,
    uptime_ms: Option<f64>,
    exits: Vec<(String, u64)>,
    ports: Vec<(String, u64)>,
    mmio_pages: Vec<(String, u64)>,
}

/// Boots every VMM once with [`VERBOSE`] and `extra` kernel parameters and prints the tables.
pub fn run(memory_mib: u64, extra: &str) -> Result<bool> {
    let a = artifacts::get()?;
    let host = testhost::shared()?;
    let dir = host.work_dir().join("bootbench-trace");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let params = format!("{VERBOSE} {extra}");
    let all = contenders(a, &dir, memory_mib, params.trim())?;
    let mut script = String::new();
    for c in &all {
        script.push_str(&format!("echo 'bootbench-trace: {}' >&2\n", c.label));
        script.push_str(&trace_lines(c.label, &c.timed, &dir, 180));
    }
    let out = host.run(
        "bootbench-trace",
        &script,
        Duration::from_secs(120 + 200 * all.len() as u64),
    )?;
    if out.status != 0 {
        bail!("bootbench-trace scenario failed:\n{}", out.output);
    }
    let svm = matches!(host.mode(), Mode::Qemu)
        || fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" svm"));
    let read = |label: &str, suffix: &str| {
        fs::read_to_string(dir.join(format!("{label}.{suffix}"))).unwrap_or_default()
    };
    let traced: Vec<Traced> = all
        .iter()
        .map(|c| {
            let console = read(c.label, "console");
            let exits = counts_by(&hist_buckets(&read(c.label, "kvm_exit")), "exit_reason")
                .into_iter()
                .map(|(k, n)| match parse_number(&k) {
                    Some(code) => (exit_reason_name(code, svm), n),
                    None => (k, n),
                })
                .collect();
            let ports = counts_by(&hist_buckets(&read(c.label, "kvm_pio")), "port")
                .into_iter()
                .map(|(k, n)| (parse_number(&k).map_or(k, |p| format!("{p:#x}")), n))
                .collect();
            let mut pages = hist_buckets(&read(c.label, "kvm_mmio"));
            for (fields, _) in pages.iter_mut() {
                if let Some(gpa) = fields.get("gpa").and_then(|g| parse_number(g)) {
                    fields.insert("page".into(), format!("{:#x}", gpa & !0xfff));
                }
            }
            let lines = kernel_lines(&console);
            Traced {
                name: c.name,
                exec_to_entry: exec_to_first_entry(&read(c.label, "ftrace")),
                uptime_ms: uptime_ms(&console),
                steps: milestones(&lines),
                lines,
                exits,
                ports,
                mmio_pages: counts_by(&pages, "page"),
            }
        })
        .collect();
    print_tables(&traced, memory_mib, &params);
    Ok(traced.iter().all(|t| t.uptime_ms.is_some()))
}

/// The guest's uptime on its marker line (`... uptime=0.85`), in milliseconds.
fn uptime_ms(console: &str) -> Option<f64> {
    console
        .lines()
        .filter(|l| l.contains(lightbyte_tests::guest::MARKER))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("uptime=")))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|s| s * 1000.0)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.0}"))
}

fn print_tables(traced: &[Traced], memory_mib: u64, params: &str) {
    let header: Vec<&str> = traced.iter().map(|t| t.name).collect();
    println!(
        "Traced boots, minimal 6.1 kernel + test initramfs, 1 vCPU, {memory_mib} MiB, `{params}` \
         (kernel messages on the serial console cost exits of their own)\n"
    );
    println!("| boot step (guest clock, ms) | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(traced.len()));
    let cells: Vec<String> = traced
        .iter()
        .map(|t| {
            t.exec_to_entry
                .as_ref()
                .map_or("–".into(), |(ms, prog)| format!("{ms:.1} ({prog})"))
        })
        .collect();
    println!(
        "| host: VMM exec → first guest entry (ms, not on the guest clock) | {} |",
        cells.join(" | ")
    );
    for (i, (name, needle)) in MILESTONES.iter().enumerate() {
        let cells: Vec<String> = traced.iter().map(|t| ms(t.steps[i])).collect();
        let label = if needle.is_empty() {
            name.to_string()
        } else {
            format!("{name} (`{needle}`)")
        };
        println!("| {label} | {} |", cells.join(" | "));
    }
    let cells: Vec<String> = traced.iter().map(|t| ms(t.uptime_ms)).collect();
    println!("| marker (init's uptime) | {} |", cells.join(" | "));
    println!("| kernel messages | {} |\n", {
        let n: Vec<String> = traced.iter().map(|t| t.lines.len().to_string()).collect();
        n.join(" | ")
    });

    let reasons: BTreeSet<&str> = traced
        .iter()
        .flat_map(|t| t.exits.iter().map(|(k, _)| k.as_str()))
        .collect();
    println!("| KVM exits by reason | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(traced.len()));
    for r in &reasons {
        let cells: Vec<String> = traced
            .iter()
            .map(|t| {
                t.exits
                    .iter()
                    .find(|(k, _)| k == r)
                    .map_or("0".into(), |(_, n)| n.to_string())
            })
            .collect();
        println!("| {r} | {} |", cells.join(" | "));
    }
    let totals: Vec<String> = traced
        .iter()
        .map(|t| t.exits.iter().map(|(_, n)| n).sum::<u64>().to_string())
        .collect();
    println!("| **all** | {} |\n", totals.join(" | "));

    for t in traced {
        println!("{}:", t.name);
        println!("  busiest I/O ports: {}", top(&t.ports, 8));
        println!("  busiest MMIO pages: {}", top(&t.mmio_pages, 8));
        println!("  longest silences between kernel messages:");
        for (gap, before, after) in longest_gaps(&t.lines, 6) {
            println!("    {gap:7.1} ms  after \"{before}\"\n               before \"{after}\"");
        }
    }
}

fn top(counts: &[(String, u64)], n: usize) -> String {
    if counts.is_empty() {
        return "none counted".into();
    }
    counts
        .iter()
        .take(n)
        .map(|(k, c)| format!("{k}×{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}
