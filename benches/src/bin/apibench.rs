//! `apibench`: the VMM API measured in one test host run — ping and info latency over the
//! Unix socket, create→boot→guest marker through the API (a cold boot), snapshot time and size
//! of a 512 MiB guest, and restore→guest running again, next to the cold boot.
//!
//! The outer process sends a script to the test host that runs this same binary there
//! (`apibench inner ...`), since the socket and KVM live inside the test host.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lightbyte_tests::artifacts;
use lightbyte_tests::guest::{sh_quote, Boot};
use lightbyte_tests::paths::binary;
use lightbyte_tests::testhost;
use vmm_api::client::blocking::Client;
use vmm_api::config::{SerialConfig, VmConfig};

/// VMM API benchmark (latency, API boot, snapshot, restore), one test host run.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Requests per latency figure.
    #[arg(long, default_value_t = 200)]
    requests: u32,
    /// Cold boots and restores each.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    #[command(subcommand)]
    inner: Option<Inner>,
}

#[derive(Subcommand)]
enum Inner {
    /// Runs the measurements (inside the test host).
    Inner {
        #[arg(long)]
        vmm: PathBuf,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initramfs: PathBuf,
        #[arg(long)]
        cmdline: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        requests: u32,
        #[arg(long)]
        rounds: u32,
    },
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Vmm {
    child: Child,
    client: Client,
}

fn spawn(vmm: &Path, sock: &Path) -> Result<Vmm> {
    let _ = fs::remove_file(sock);
    let child = Command::new(vmm)
        .arg("--api-socket")
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting vmm")?;
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("no API socket");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Vmm {
        child,
        client: Client::new(sock).with_timeout(Duration::from_secs(120)),
    })
}

/// Waits until `file` holds `count` lines containing `marker`.
fn wait_marker(file: &Path, marker: &str, count: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        let n = fs::read_to_string(file)
            .map(|s| s.matches(marker).count())
            .unwrap_or(0);
        if n >= count {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("no {marker} in {}", file.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stop(mut v: Vmm) -> Result<()> {
    v.client.shutdown(Some(0)).context("shutdown")?;
    v.child.wait()?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn inner(
    vmm: &Path,
    kernel: &Path,
    initramfs: &Path,
    cmdline: &str,
    dir: &Path,
    requests: u32,
    rounds: u32,
) -> Result<()> {
    let sock = std::env::temp_dir().join(format!("apibench-{}.sock", std::process::id()));
    let serial = dir.join("serial.log");
    let config = VmConfig {
        kernel: kernel.into(),
        firmware: None,
        initramfs: Some(initramfs.into()),
        cmdline: cmdline.into(),
        cpus: 1,
        memory: 512 << 20,
        serial: SerialConfig::File(serial.clone()),
        disks: Vec::new(),
        nets: Vec::new(),
        vsock: None,
    };
    // Latency of an idle VMM, then with a running guest.
    let v = spawn(vmm, &sock)?;
    let lat = |f: &dyn Fn() -> Result<()>| -> Result<Vec<f64>> {
        (0..requests)
            .map(|_| {
                let t = Instant::now();
                f()?;
                Ok(ms(t.elapsed()))
            })
            .collect()
    };
    let ping = lat(&|| v.client.ping().map(|_| ()).map_err(Into::into))?;
    let info = lat(&|| v.client.info().map(|_| ()).map_err(Into::into))?;
    println!(
        "LATENCY ping median {:.3} ms p99 {:.3} ms; info median {:.3} ms p99 {:.3} ms ({requests} requests each)",
        median(ping.clone()),
        pct(ping, 0.99),
        median(info.clone()),
        pct(info, 0.99)
    );
    stop_idle(v)?;
    let mut cold = Vec::new();
    let mut restore_call = Vec::new();
    let mut restore_running = Vec::new();
    let mut snap_ms = Vec::new();
    for round in 0..rounds {
        let _ = fs::remove_file(&serial);
        let v = spawn(vmm, &sock)?;
        let t = Instant::now();
        v.client.create(&config)?;
        v.client.boot()?;
        wait_marker(&serial, "TICK", 3)?;
        let boot_ms = ms(t.elapsed());
        cold.push(boot_ms);
        v.client.pause()?;
        let snap = dir.join(format!("snap-{round}"));
        let _ = fs::remove_dir_all(&snap);
        let t = Instant::now();
        v.client.snapshot(&snap)?;
        snap_ms.push(ms(t.elapsed()));
        let mem = snap.join("memory");
        let apparent = fs::metadata(&mem)?.len();
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(&mem)?.blocks() * 512
        };
        let state = fs::metadata(snap.join("state.json"))?.len();
        println!(
            "SNAPSHOT round {round}: memory {} MiB apparent, {:.1} MiB on disk, state {} KiB",
            apparent >> 20,
            allocated as f64 / 1048576.0,
            state >> 10
        );
        stop(v)?;
        let before = fs::read_to_string(&serial)?.matches("TICK").count();
        let v = spawn(vmm, &sock)?;
        let t = Instant::now();
        v.client.restore(&snap, true)?;
        let call = ms(t.elapsed());
        wait_marker(&serial, "TICK", before + 1)?;
        restore_call.push(call);
        restore_running.push(ms(t.elapsed()));
        stop(v)?;
        fs::remove_dir_all(&snap)?;
    }
    println!(
        "BOOT cold create→boot→3rd tick median {:.0} ms; restore call median {:.0} ms; restore→next tick median {:.0} ms; snapshot median {:.0} ms ({rounds} rounds)",
        median(cold),
        median(restore_call),
        median(restore_running),
        median(snap_ms)
    );
    Ok(())
}

fn stop_idle(mut v: Vmm) -> Result<()> {
    v.child.kill()?;
    v.child.wait()?;
    Ok(())
}

fn outer(cli: &Cli) -> Result<()> {
    let host = testhost::shared()?;
    let a = artifacts::get()?;
    let dir = host.work_dir().join("apibench");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    // The guest ticks every 200 ms, so "running again" is seen quickly.
    let boot = Boot::new(&a.minimal_vmlinux)?
        .run("i=0; while :; do echo TICK $i; i=$((i+1)); sleep 0.2; done");
    let me = std::env::current_exe()?;
    let script = format!(
        "{me} inner --vmm {vmm} --kernel {k} --initramfs {i} --cmdline {c} --dir {d} --requests {r} --rounds {n}\n",
        me = sh_quote(&me.display().to_string()),
        vmm = sh_quote(&binary("vmm")?.display().to_string()),
        k = sh_quote(&a.minimal_vmlinux.display().to_string()),
        i = sh_quote(&a.initramfs.display().to_string()),
        c = sh_quote(&boot.full_cmdline()),
        d = sh_quote(&dir.display().to_string()),
        r = cli.requests,
        n = cli.rounds,
    );
    let out = host.run("apibench", &script, Duration::from_secs(1800))?;
    if out.status != 0 {
        bail!("apibench failed:\n{}", out.output);
    }
    for l in out
        .output
        .lines()
        .filter(|l| l.starts_with("LATENCY") || l.starts_with("SNAPSHOT") || l.starts_with("BOOT"))
    {
        println!("{l}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.inner {
        Some(Inner::Inner {
            vmm,
            kernel,
            initramfs,
            cmdline,
            dir,
            requests,
            rounds,
        }) => inner(vmm, kernel, initramfs, cmdline, dir, *requests, *rounds),
        None => outer(&cli),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apibench: {e:#}");
            ExitCode::from(1)
        }
    }
}
