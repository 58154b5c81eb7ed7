//! Boot timing: a scenario runs guests under the `boot-timer` binary, which records when the
//! guest's marker appeared on the console and when the VMM process exited, both measured from
//! process start; these helpers compose those runs and parse the results.

use std::path::Path;

use anyhow::{bail, Context, Result};
use lightbyte_tests::guest::{sh_quote, MARKER};
use lightbyte_tests::paths::binary;

/// One timed boot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BootTiming {
    /// Process start to the marker line, in milliseconds.
    pub marker_ms: Option<f64>,
    /// The guest's own uptime when it printed the marker, in milliseconds.
    pub uptime_ms: Option<f64>,
    /// Process start to process exit, in milliseconds.
    pub exit_ms: f64,
    /// Exit status.
    pub status: i32,
}

impl BootTiming {
    /// A boot that printed the marker and exited 0.
    pub fn ok(&self) -> bool {
        self.marker_ms.is_some() && self.status == 0
    }
}

/// A shell line that runs `cmd` under `boot-timer`, appending its result to `results`
/// prefixed with `label`.
pub fn timed_line(
    label: &str,
    cmd: &[String],
    results: &Path,
    timeout_secs: u32,
) -> Result<String> {
    timer_line(label, cmd, results, &format!("--timeout {timeout_secs}"))
}

/// A shell line that boots `cmd` under `boot-timer --memory-of MIB` (the guest must stay up
/// after its marker), appending the VMM's memory outside guest RAM to `results`.
pub fn memory_line(label: &str, cmd: &[String], results: &Path, ram_mib: u64) -> Result<String> {
    timer_line(label, cmd, results, &format!("--memory-of {ram_mib}"))
}

fn timer_line(label: &str, cmd: &[String], results: &Path, options: &str) -> Result<String> {
    let timer = binary("boot-timer")?;
    let quoted: Vec<String> = cmd.iter().map(|a| sh_quote(a)).collect();
    Ok(format!(
        "{} --label {} --marker {} {options} -- {} >> {}\n",
        sh_quote(&timer.display().to_string()),
        sh_quote(label),
        sh_quote(MARKER),
        quoted.join(" "),
        sh_quote(&results.display().to_string()),
    ))
}

/// Parses the `boot-timer` lines for `label` out of a results file's contents.
pub fn parse(results: &str, label: &str) -> Result<Vec<BootTiming>> {
    let mut out = Vec::new();
    for line in results.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() != Some(label) {
            continue;
        }
        let mut marker_ms = None;
        let mut uptime_ms = None;
        let mut exit_ms = None;
        let mut status = None;
        for f in fields {
            match f.split_once('=') {
                Some(("marker_ms", "NA")) => {}
                Some(("marker_ms", v)) => marker_ms = Some(v.parse().context("marker_ms")?),
                Some(("uptime_ms", "NA")) => {}
                Some(("uptime_ms", v)) => uptime_ms = Some(v.parse().context("uptime_ms")?),
                Some(("exit_ms", v)) => exit_ms = Some(v.parse().context("exit_ms")?),
                Some(("status", v)) => status = Some(v.parse().context("status")?),
                _ => bail!("unexpected field {f:?} in {line:?}"),
            }
        }
        out.push(BootTiming {
            marker_ms,
            uptime_ms,
            exit_ms: exit_ms.context("exit_ms missing")?,
            status: status.context("status missing")?,
        });
    }
    Ok(out)
}

/// The `LABEL rss_outside_kib=N` values of `label` in a results file's contents (what
/// `boot-timer --memory-of` prints).
pub fn parse_memory(results: &str, label: &str) -> Vec<f64> {
    results
        .lines()
        .filter_map(|l| {
            l.strip_prefix(label)?
                .trim()
                .strip_prefix("rss_outside_kib=")
        })
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// The median of `v` (which must not be empty).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_its_label() {
        let text = "vmm marker_ms=812.5 uptime_ms=640.0 exit_ms=1100.0 status=0\n\
                    qemu marker_ms=NA exit_ms=30000.0 status=124\n\
                    vmm marker_ms=790.0 exit_ms=1000.0 status=0\n";
        let v = parse(text, "vmm").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].marker_ms, Some(812.5));
        assert_eq!(v[0].uptime_ms, Some(640.0));
        assert_eq!(v[1].uptime_ms, None);
        assert!(v.iter().all(BootTiming::ok));
        let q = parse(text, "qemu").unwrap();
        assert_eq!(q[0].marker_ms, None);
        assert!(!q[0].ok());
        assert!(parse("vmm bogus\n", "vmm").is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
