//! `boot-timer`: runs a VMM command, watches its console output for a marker line, and prints one
//! line: `LABEL marker_ms=.. uptime_ms=.. exit_ms=.. status=..`, times measured from just before
//! the process is spawned (`uptime_ms` is the guest's own uptime, which the test initramfs prints
//! on its marker line as `uptime=SECONDS`). The console output itself is discarded.
//!
//! With `--memory-of MIB` it measures memory instead: once the marker appeared and the guest
//! had `--settle-ms` to go idle, the Rss of every mapping of the VMM process but guest RAM
//! (mappings of at least 90% of MIB: each VMM maps RAM below 3 GiB as one region), printed as
//! `LABEL rss_outside_kib=N`; then the VMM is killed.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

/// Times a VMM boot: process start to marker line, and to process exit.
#[derive(Parser)]
struct Cli {
    /// Label printed at the start of the result line.
    #[arg(long)]
    label: String,
    /// Text whose first appearance on stdout counts as "booted".
    #[arg(long)]
    marker: String,
    /// Seconds before the command is killed (status 124).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Measure the VMM's memory outside guest RAM of this many MiB instead of timing.
    #[arg(long, value_name = "MIB")]
    memory_of: Option<u64>,
    /// With --memory-of: milliseconds between the marker and the measurement.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true)]
    command: Vec<String>,
}

fn run(cli: Cli) -> Result<()> {
    let start = Instant::now();
    let mut child = Command::new(&cli.command[0])
        .args(&cli.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", cli.command[0]))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let marker = cli.marker.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            if line.contains(&marker) {
                let _ = tx.send((start.elapsed(), guest_uptime(&line)));
            }
        }
    });
    if let Some(mib) = cli.memory_of {
        let pid = child.id();
        let measured = rx
            .recv_timeout(Duration::from_secs(cli.timeout))
            .ok()
            .map(|_| {
                std::thread::sleep(Duration::from_millis(cli.settle_ms));
                std::fs::read_to_string(format!("/proc/{pid}/smaps"))
                    .map(|s| rss_outside(&s, mib << 10))
            });
        let _ = child.kill();
        let _ = child.wait();
        match measured {
            Some(Ok(kib)) => println!("{} rss_outside_kib={kib}", cli.label),
            Some(Err(e)) => anyhow::bail!("reading /proc/{pid}/smaps: {e}"),
            None => anyhow::bail!("no marker within {} s", cli.timeout),
        }
        return Ok(());
    }
    let deadline = start + Duration::from_secs(cli.timeout);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break 124;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let exit = start.elapsed();
    let seen = rx.recv_timeout(Duration::from_secs(1)).ok();
    let ms = |v: Option<f64>| v.map_or_else(|| "NA".into(), |v| format!("{v:.1}"));
    let marker_ms = ms(seen.map(|(d, _)| d.as_secs_f64() * 1000.0));
    let uptime_ms = ms(seen.and_then(|(_, u)| u).map(|u| u * 1000.0));
    println!(
        "{} marker_ms={marker_ms} uptime_ms={uptime_ms} exit_ms={:.1} status={status}",
        cli.label,
        exit.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// The guest's uptime in seconds from an `uptime=SECONDS` word of the marker line.
fn guest_uptime(line: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("uptime="))
        .and_then(|v| v.parse().ok())
}

/// KiB resident in the mappings of an smaps text that are smaller than `ram_kib * 0.9` (the
/// guest RAM mapping is left out).
fn rss_outside(smaps: &str, ram_kib: u64) -> u64 {
    let (mut total, mut size) = (0, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) if size * 10 < ram_kib * 9 => {
                total += v.parse::<u64>().unwrap_or(0)
            }
            _ => {}
        }
    }
    total
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot-timer: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_comes_from_the_marker_line() {
        assert_eq!(
            guest_uptime("LIGHTBYTE-GUEST-UP kernel=6.1 cpus=1 uptime=0.85"),
            Some(0.85)
        );
        assert_eq!(guest_uptime("LIGHTBYTE-GUEST-UP kernel=6.1"), None);
    }

    #[test]
    fn guest_ram_is_left_out_of_the_rss() {
        let smaps = "55d0-55d1 r-xp 0 08:01 1 /usr/bin/vmm\nSize: 2048 kB\nRss: 1500 kB\n\
                     7f00-7f10 rw-p 0 00:00 0\nSize: 262144 kB\nRss: 40000 kB\n\
                     7f20-7f21 rw-p 0 00:00 0\nSize: 132 kB\nRss: 12 kB\n";
        assert_eq!(rss_outside(smaps, 256 << 10), 1512);
    }
}
