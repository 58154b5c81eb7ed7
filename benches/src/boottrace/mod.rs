//! Where a boot's time goes, per VMM: one verbose boot each (kernel messages with timestamps),
//! with the host kernel's KVM trace events counted around it (histogram triggers on `kvm_exit`,
//! `kvm_pio` and `kvm_mmio`: counted in the kernel, so tracing costs the guest almost nothing).
//! These helpers compose the shell lines the test host runs and read what they leave behind;
//! `bootbench trace` prints the tables.

pub mod report;

use std::collections::BTreeMap;
use std::path::Path;

use lightbyte_tests::guest::sh_quote;

/// Kernel parameters of a traced boot: messages up to KERN_INFO on the console (the test command
/// line says `quiet`; a later `loglevel` wins) with timestamps.
pub const VERBOSE: &str = "loglevel=7 printk.time=1";

/// The host-side trace events and the histogram each gets.
const TRIGGERS: [(&str, &str); 3] = [
    ("kvm_exit", "hist:keys=exit_reason:vals=hitcount:size=256"),
    ("kvm_pio", "hist:keys=port,rw:vals=hitcount:size=1024"),
    ("kvm_mmio", "hist:keys=gpa,type:vals=hitcount:size=4096"),
];

/// Shell lines that boot `cmd` once with the histograms armed, leaving `LABEL.console` (its
/// output), `LABEL.EVENT` (each histogram) and `LABEL.ftrace` (program executions up to the
/// first guest entry, where a `traceoff` trigger stops the trace) in `dir`. Without tracefs or
/// histogram triggers the boot still runs and the counts are missing.
pub fn trace_lines(label: &str, cmd: &[String], dir: &Path, timeout_secs: u32) -> String {
    let t = "/sys/kernel/tracing";
    let events = format!("{t}/events");
    let file =
        |suffix: &str| sh_quote(&dir.join(format!("{label}.{suffix}")).display().to_string());
    let mut s = format!(
        "[ -d {events}/kvm ] || mount -t tracefs tracefs {t} 2>/dev/null || true
         echo 0 > {t}/tracing_on; echo > {t}/trace
         echo 1 > {events}/sched/sched_process_exec/enable
         echo traceoff:1 > {events}/kvm/kvm_entry/trigger
         echo 1 > {events}/kvm/kvm_entry/enable
         echo 1 > {t}/tracing_on
"
    );
    for (event, hist) in TRIGGERS {
        s.push_str(&format!(
            "echo {} > {events}/kvm/{event}/trigger 2>/dev/null || echo 'no histogram for {event}' >&2
",
            sh_quote(hist)
        ));
    }
    let quoted: Vec<String> = cmd.iter().map(|a| sh_quote(a)).collect();
    s.push_str(&format!(
        "timeout {timeout_secs} {} > {} 2>&1 < /dev/null || true
",
        quoted.join(" "),
        file("console")
    ));
    for (event, hist) in TRIGGERS {
        s.push_str(&format!(
            "cat {events}/kvm/{event}/hist > {} 2>/dev/null || true
",
            file(event)
        ));
        s.push_str(&format!(
            "echo {} > {events}/kvm/{event}/trigger 2>/dev/null || true
",
            sh_quote(&format!("!{hist}"))
        ));
    }
    s.push_str(&format!(
        "cat {t}/trace > {} 2>/dev/null || true
         echo 0 > {events}/kvm/kvm_entry/enable; echo '!traceoff' > {events}/kvm/kvm_entry/trigger
         echo 0 > {events}/sched/sched_process_exec/enable; echo 1 > {t}/tracing_on
",
        file("ftrace")
    ));
    s
}

/// From an ftrace capture of program executions and the first guest entry: milliseconds from
/// the last `exec` before that entry (the VMM's) to the entry, and the program's name.
pub fn exec_to_first_entry(ftrace: &str) -> Option<(f64, String)> {
    let stamp = |line: &str, event: &str| -> Option<f64> {
        let before = &line[..line.find(&format!(" {event}:"))?];
        before
            .split_whitespace()
            .last()?
            .trim_end_matches(':')
            .parse()
            .ok()
    };
    let mut exec: Option<(f64, String)> = None;
    for line in ftrace.lines().filter(|l| !l.starts_with('#')) {
        if let Some(t) = stamp(line, "sched_process_exec") {
            let name = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("filename="))
                .unwrap_or("?");
            let name = name.rsplit('/').next().unwrap_or(name).to_string();
            exec = Some((t, name));
        } else if let Some(t) = stamp(line, "kvm_entry") {
            let (t0, name) = exec?;
            return Some(((t - t0) * 1000.0, name));
        }
    }
    None
}

/// The kernel messages of a console capture: `(seconds since boot, text)` for every line with a
/// `[    1.234567]` timestamp, in order.
pub fn kernel_lines(console: &str) -> Vec<(f64, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix('[')?;
            let (stamp, text) = rest.split_once(']')?;
            Some((stamp.trim().parse().ok()?, text.trim().to_string()))
        })
        .collect()
}

/// Steps of a Linux boot, each found as the first message containing its text.
pub const MILESTONES: [(&str, &str); 12] = [
    ("ACPI tables read", "ACPI: RSDP"),
    ("TSC known", "tsc: Detected"),
    ("ACPI interpreter", "ACPI: Interpreter enabled"),
    ("CPUs up", "smp: Brought up"),
    ("PCI root bridge", "PCI Root Bridge"),
    ("PCI IRQ routing", "PCI: Using ACPI for IRQ routing"),
    (
        "clocksource switched",
        "clocksource: Switched to clocksource",
    ),
    ("initramfs unpacked", "Freeing initrd memory"),
    ("serial driver", "Serial: 8250/16550 driver"),
    ("kernel image freed", "Freeing unused kernel image"),
    ("run /init", "Run /init"),
    ("last kernel message", ""),
];

/// When each milestone's message was printed, in milliseconds (None: not printed).
pub fn milestones(lines: &[(f64, String)]) -> Vec<Option<f64>> {
    MILESTONES
        .iter()
        .map(|(_, needle)| {
            if needle.is_empty() {
                lines.last().map(|(t, _)| t * 1000.0)
            } else {
                lines
                    .iter()
                    .find(|(_, text)| text.contains(needle))
                    .map(|(t, _)| t * 1000.0)
            }
        })
        .collect()
}

/// The `n` longest silences between consecutive messages: `(milliseconds, message before,
/// message after)`, longest first.
pub fn longest_gaps(lines: &[(f64, String)], n: usize) -> Vec<(f64, String, String)> {
    let mut gaps: Vec<(f64, String, String)> = lines
        .windows(2)
        .map(|w| ((w[1].0 - w[0].0) * 1000.0, w[0].1.clone(), w[1].1.clone()))
        .collect();
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    gaps.truncate(n);
    gaps
}

/// The buckets of a histogram file (`{ key: value, key: value } hitcount: N` lines) as
/// `(fields, count)`.
pub fn hist_buckets(text: &str) -> Vec<(BTreeMap<String, String>, u64)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix('{')?;
            let (keys, rest) = l.split_once('}')?;
            let count = rest.trim().strip_prefix("hitcount:")?.trim().parse().ok()?;
            let fields = keys
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once(':')?;
                    Some((k.trim().to_string(), v.trim().to_string()))
                })
                .collect();
            Some((fields, count))
        })
        .collect()
}

/// Counts per value of `key` (buckets with the same value added up), largest first.
pub fn counts_by(buckets: &[(BTreeMap<String, String>, u64)], key: &str) -> Vec<(String, u64)> {
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for (fields, n) in buckets {
        if let Some(v) = fields.get(key) {
            *sums.entry(v.clone()).or_default() += n;
        }
    }
    let mut v: Vec<(String, u64)> = sums.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// A name for an exit reason as `kvm_exit` records it: SVM exit codes (the test host emulates an
/// AMD CPU) and the VMX basic reasons of real Intel hosts share the number space only by
/// accident, so `svm` says which table applies.
pub fn exit_reason_name(code: u64, svm: bool) -> String {
    let name = if svm {
        match code {
            0x40..=0x5f => "exception",
            0x60 => "INTR",
            0x61 => "NMI",
            0x64 => "VINTR",
            0x6e => "RDTSC",
            0x72 => "CPUID",
            0x78 => "HLT",
            0x7b => "IOIO",
            0x7c => "MSR",
            0x7f => "SHUTDOWN",
            0x81 => "VMMCALL",
            0x400 => "NPF",
            0x401 => "AVIC_INCOMPLETE_IPI",
            0x402 => "AVIC_NOACCEL",
            _ => "",
        }
    } else {
        match code {
            0 => "EXCEPTION_NMI",
            1 => "EXTERNAL_INTERRUPT",
            10 => "CPUID",
            12 => "HLT",
            30 => "IO_INSTRUCTION",
            31 => "MSR_READ",
            32 => "MSR_WRITE",
            48 => "EPT_VIOLATION",
            49 => "EPT_MISCONFIG",
            _ => "",
        }
    };
    if name.is_empty() {
        format!("{code:#x}")
    } else {
        format!("{name} ({code:#x})")
    }
}

/// Parses a histogram key printed in decimal or `0x` hexadecimal.
pub fn parse_number(v: &str) -> Option<u64> {
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lines_keep_only_timestamped_messages() {
        let console = "lightbyte vmm: booting\n\
                       [    0.000000] Linux version 6.1.0\n\
                       [    0.512345] PCI: Using ACPI for IRQ routing\n\
                       LIGHTBYTE-GUEST-UP kernel=6.1 cpus=1 uptime=0.80\n\
                       [    0.700000] Run /init as init process\n";
        let lines = kernel_lines(console);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].0, 0.512345);
        let m = milestones(&lines);
        let at = |name: &str| m[MILESTONES.iter().position(|(n, _)| *n == name).unwrap()];
        assert_eq!(at("PCI IRQ routing"), Some(512.345));
        assert_eq!(at("run /init"), Some(700.0));
        assert_eq!(at("last kernel message"), Some(700.0));
        assert_eq!(at("PCI root bridge"), None);
        let gaps = longest_gaps(&lines, 1);
        assert_eq!(gaps.len(), 1);
        assert!((gaps[0].0 - 512.345).abs() < 1e-6);
        assert!(gaps[0].2.starts_with("PCI: Using ACPI"));
    }

    #[test]
    fn histograms_add_up_by_key() {
        let hist = "# event histogram\n#\n\
                    { port:       1016, rw:          1 } hitcount:        900\n\
                    { port:       1016, rw:          0 } hitcount:        100\n\
                    { port:       3324, rw:          0 } hitcount:         40\n\
                    \nTotals:\n    Hits: 1040\n";
        let b = hist_buckets(hist);
        assert_eq!(b.len(), 3);
        assert_eq!(
            counts_by(&b, "port"),
            vec![("1016".to_string(), 1000), ("3324".to_string(), 40)]
        );
        assert!(hist_buckets("Totals:\n Hits: 0\n").is_empty());
    }

    #[test]
    fn exit_reasons_are_named_per_vendor() {
        assert_eq!(exit_reason_name(0x7b, true), "IOIO (0x7b)");
        assert_eq!(exit_reason_name(30, false), "IO_INSTRUCTION (0x1e)");
        assert_eq!(exit_reason_name(0x999, true), "0x999");
        assert_eq!(parse_number("0x3f8"), Some(0x3f8));
        assert_eq!(parse_number("1016"), Some(1016));
        assert_eq!(parse_number("x"), None);
    }

    #[test]
    fn trace_lines_arm_and_disarm_every_histogram() {
        let s = trace_lines("vmm", &["vmm".into(), "--x".into()], Path::new("/w"), 60);
        for (event, hist) in TRIGGERS {
            assert!(s.contains(&format!(
                "echo '{hist}' > /sys/kernel/tracing/events/kvm/{event}/trigger"
            )));
            assert!(s.contains(&format!("echo '!{hist}'")));
            assert!(s.contains(&format!("/w/vmm.{event}")));
        }
        assert!(s.contains("timeout 60 'vmm' '--x' > '/w/vmm.console'"));
        assert!(s.contains("echo traceoff:1 > /sys/kernel/tracing/events/kvm/kvm_entry/trigger"));
        assert!(s.contains("/w/vmm.ftrace"));
    }

    #[test]
    fn exec_to_entry_takes_the_last_exec_before_the_first_entry() {
        let ftrace = "# tracer: nop\n\
            #           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION\n\
                 timeout-900     [000] .....   100.000000: sched_process_exec: filename=/usr/bin/timeout pid=900 old_pid=900\n\
                     vmm-901     [000] .....   100.010000: sched_process_exec: filename=/x/target/release/vmm pid=901 old_pid=901\n\
                  vcpu0-905     [000] d....   100.135500: kvm_entry: vcpu 0, rip 0x1000000\n";
        let (ms, name) = exec_to_first_entry(ftrace).unwrap();
        assert!((ms - 125.5).abs() < 1e-6, "{ms}");
        assert_eq!(name, "vmm");
        assert_eq!(exec_to_first_entry("# nothing\n"), None);
    }
}
