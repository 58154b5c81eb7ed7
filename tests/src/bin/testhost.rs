//! `testhost`: runs shell scenarios or a guest boot where guests can run: inside the QEMU-TCG
//! test host on machines without VMX/SVM, directly otherwise.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lightbyte_tests::artifacts;
use lightbyte_tests::guest::{Boot, Scenario};
use lightbyte_tests::testhost::{self, Mode};

/// Runs lightbyte scenarios where guests can run: inside a QEMU-TCG test host with nested KVM
/// (these build machines' /dev/kvm cannot run Linux guests), or directly on a host with VMX/SVM.
/// Set LIGHTBYTE_TESTHOST=qemu|local to choose.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum KernelChoice {
    /// Minimal kernel, ELF booted through PVH.
    Minimal,
    /// Minimal kernel as a bzImage.
    MinimalBzimage,
    /// Debian's stock cloud kernel (bzImage).
    Debian,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a shell script (given as arguments, joined by spaces) and exits with its status.
    Run {
        /// Seconds before the script is killed.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The script.
        #[arg(required = true, trailing_var_arg = true)]
        script: Vec<String>,
    },
    /// Boots a guest with `vmm` and the test initramfs, prints its console, exits with vmm's
    /// status.
    Boot {
        /// Which kernel.
        #[arg(long, value_enum, default_value = "minimal")]
        kernel: KernelChoice,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u8,
        /// Memory.
        #[arg(long, default_value = "512M")]
        memory: String,
        /// Command the guest runs before powering off.
        #[arg(long)]
        cmd: Option<String>,
    },
}

fn run() -> Result<i32> {
    let cli = Cli::parse();
    let host = testhost::shared()?;
    match host.mode() {
        Mode::Qemu => eprintln!("testhost: running inside the QEMU-TCG test host"),
        Mode::Local => eprintln!("testhost: this CPU has VMX/SVM; running directly"),
    }
    match cli.command {
        Cmd::Run { timeout, script } => {
            let out = host.run("cli", &script.join(" "), Duration::from_secs(timeout))?;
            Ok(out.status)
        }
        Cmd::Boot {
            kernel,
            cpus,
            memory,
            cmd,
        } => {
            let a = artifacts::get()?;
            let path = match kernel {
                KernelChoice::Minimal => &a.minimal_vmlinux,
                KernelChoice::MinimalBzimage => &a.minimal_bzimage,
                KernelChoice::Debian => &a.debian_bzimage,
            };
            let mut boot = Boot::new(path)?.cpus(cpus).memory(&memory);
            if let Some(c) = cmd {
                boot = boot.run(&c);
            }
            let mut s = Scenario::new(host, "boot")?;
            s.boot("guest", &boot)?;
            let results = s.run(host, Duration::from_secs(600))?;
            let r = results.get("guest").context("no result")?;
            print!("{}", r.output);
            Ok(r.status)
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("testhost: {e:#}");
            ExitCode::from(1)
        }
    }
}
