//! `boot-timer`: runs a VMM command, watches its console output for a marker line, and prints one
//! line: `LABEL marker_ms=.. exit_ms=.. status=..`, times measured from just before the process
//! is spawned. The console output itself is discarded.

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
            if String::from_utf8_lossy(&line).contains(&marker) {
                let _ = tx.send(start.elapsed());
            }
        }
    });
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
    let marker_ms = rx
        .recv_timeout(Duration::from_secs(1))
        .ok()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "NA".into());
    println!(
        "{} marker_ms={marker_ms} exit_ms={:.1} status={status}",
        cli.label,
        exit.as_secs_f64() * 1000.0
    );
    Ok(())
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
