//! `apibench`: the VMM API measured in one test host run — ping and info latency over the
//! Unix socket, create→boot→guest marker through the API (a cold boot), full and diff snapshot
//! time and size of a 512 MiB guest, and restore→guest running again (the restore call and the
//! guest's next tick) from each; with `FIRECRACKER=` set, the same rounds under Firecracker.
//!
//! The outer process sends a script to the test host that runs this same binary there
//! (`apibench inner ...`), since the socket and KVM live inside the test host.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lightbyte_benches::fcapi::{self, Firecracker};
use lightbyte_benches::timing::median;
use lightbyte_tests::artifacts;
use lightbyte_tests::guest::{sh_quote, Boot};
use lightbyte_tests::paths::binary;
use lightbyte_tests::testhost;
use vmm_api::client::blocking::Client;
use vmm_api::config::{SerialConfig, VmConfig};
use vmm_api::types::SnapshotType;

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
    /// Runs every VMM (ours and the peer) with address-space randomization off (`setarch -R`).
    /// The test host's emulator (QEMU 7.2 TCG) translates a process's code again wherever it
    /// is mapped anew, so with randomization most of a short call (a restore) is that
    /// translation; with fixed addresses it is kept from one process to the next, and from the
    /// second round on the figures are each VMM's own work.
    #[arg(long)]
    fixed_addresses: bool,
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
        /// Where snapshots are written (the test host's own disk: its work directory is 9p).
        #[arg(long)]
        snapshots: PathBuf,
        #[arg(long)]
        requests: u32,
        #[arg(long)]
        rounds: u32,
        /// Firecracker's binary: its snapshot and restore are measured in the same rounds.
        #[arg(long)]
        firecracker: Option<PathBuf>,
    },
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

/// Starts a `vmm` with its API socket at `sock`; its log (with each build step's time) is
/// appended to `log`.
fn spawn(vmm: &Path, sock: &Path, log: &Path) -> Result<Vmm> {
    let _ = fs::remove_file(sock);
    let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(vmm)
        .arg("--api-socket")
        .arg(sock)
        .env("VMM_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
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
    snapshots: &Path,
    requests: u32,
    rounds: u32,
    firecracker: Option<&Path>,
) -> Result<()> {
    fs::create_dir_all(snapshots)?;
    let sock = std::env::temp_dir().join(format!("apibench-{}.sock", std::process::id()));
    let serial = dir.join("serial.log");
    let vmm_log = dir.join("vmm.log");
    let _ = fs::remove_file(&vmm_log);
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
    let v = spawn(vmm, &sock, &vmm_log)?;
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
        median(&mut ping.clone()),
        pct(ping, 0.99),
        median(&mut info.clone()),
        pct(info, 0.99)
    );
    stop_idle(v)?;
    let mut fig = Figures::default();
    for round in 0..rounds {
        let _ = fs::remove_file(&serial);
        let v = spawn(vmm, &sock, &vmm_log)?;
        let t = Instant::now();
        v.client.create(&config)?;
        v.client.boot()?;
        wait_marker(&serial, "TICK", 3)?;
        fig.add("vmm", "cold boot to 3rd tick", ms(t.elapsed()));
        // A full snapshot, two more ticks, then a diff on it.
        let full = snapshots.join(format!("snap-{round}"));
        let diff = snapshots.join(format!("diff-{round}"));
        for d in [&full, &diff] {
            let _ = fs::remove_dir_all(d);
        }
        v.client.pause()?;
        let t = Instant::now();
        v.client.snapshot(&full)?;
        fig.add("vmm", "full snapshot", ms(t.elapsed()));
        fig.add(
            "vmm",
            "full snapshot on disk (MiB)",
            on_disk(&full.join("memory"))?,
        );
        v.client.resume()?;
        let n = count(&serial);
        wait_marker(&serial, "TICK", n + 2)?;
        v.client.pause()?;
        let t = Instant::now();
        v.client.snapshot_of(&diff, SnapshotType::Diff)?;
        fig.add("vmm", "diff snapshot", ms(t.elapsed()));
        fig.add(
            "vmm",
            "diff snapshot on disk (MiB)",
            on_disk(&diff.join("memory"))?,
        );
        stop(v)?;
        for (label, snap) in [("full", &full), ("diff", &diff)] {
            let before = count(&serial);
            let v = spawn(vmm, &sock, &vmm_log)?;
            let t = Instant::now();
            v.client.restore(snap, true)?;
            fig.add("vmm", &format!("restore {label}: call"), ms(t.elapsed()));
            wait_marker(&serial, "TICK", before + 1)?;
            fig.add(
                "vmm",
                &format!("restore {label}: to next tick"),
                ms(t.elapsed()),
            );
            stop(v)?;
        }
        fs::remove_dir_all(&full)?;
        fs::remove_dir_all(&diff)?;
        if let Some(fc) = firecracker {
            firecracker_round(fc, &config, dir, snapshots, round, &mut fig)?;
        }
    }
    fig.print();
    // Where the time of each restore and snapshot went, from the VMMs' own logs.
    for l in fs::read_to_string(&vmm_log)?
        .lines()
        .filter(|l| l.contains("restore built") || l.contains("guest memory"))
    {
        println!("VMMLOG {}", l.split_once("INFO ").map_or(l, |(_, r)| r));
    }
    Ok(())
}

/// The same round under Firecracker: boot, full snapshot, two ticks, diff snapshot (its diff
/// needs dirty page tracking from boot), and a restore of the full snapshot in a new process.
/// Firecracker restores a diff only after it is merged into its base file by a separate tool,
/// so there is no diff restore row.
fn firecracker_round(
    fc: &Path,
    config: &VmConfig,
    dir: &Path,
    snapshots: &Path,
    round: u32,
    fig: &mut Figures,
) -> Result<()> {
    // Not in `dir`: sockets cannot live on the test host's 9p work directory.
    let sock = std::env::temp_dir().join(format!("apibench-fc-{}.sock", std::process::id()));
    let console = dir.join("fc-console.log");
    let cfg = dir.join("fc-config.json");
    let _ = fs::remove_file(&console);
    let cmdline = format!("{} lbend=reboot", config.cmdline);
    fcapi::write_config(
        &cfg,
        &config.kernel,
        config.initramfs.as_deref().context("an initramfs")?,
        &cmdline,
        config.memory >> 20,
    )?;
    let t = Instant::now();
    let vm = Firecracker::spawn(fc, &sock, Some(&cfg), &console)?;
    wait_marker(&console, "TICK", 3)?;
    fig.add("firecracker", "cold boot to 3rd tick", ms(t.elapsed()));
    let snap = snapshots.join(format!("fc-{round}"));
    let _ = fs::remove_dir_all(&snap);
    fs::create_dir_all(&snap)?;
    let (state, mem) = (snap.join("state"), snap.join("memory"));
    vm.pause()?;
    let t = Instant::now();
    vm.snapshot(false, &state, &mem)?;
    fig.add("firecracker", "full snapshot", ms(t.elapsed()));
    fig.add("firecracker", "full snapshot on disk (MiB)", on_disk(&mem)?);
    vm.resume()?;
    let n = count(&console);
    wait_marker(&console, "TICK", n + 2)?;
    vm.pause()?;
    let (dstate, dmem) = (snap.join("diff-state"), snap.join("diff-memory"));
    let t = Instant::now();
    vm.snapshot(true, &dstate, &dmem)?;
    fig.add("firecracker", "diff snapshot", ms(t.elapsed()));
    fig.add(
        "firecracker",
        "diff snapshot on disk (MiB)",
        on_disk(&dmem)?,
    );
    vm.kill()?;
    let before = count(&console);
    let vm = Firecracker::spawn(fc, &sock, None, &console)?;
    let t = Instant::now();
    vm.load(&state, &mem)?;
    fig.add("firecracker", "restore full: call", ms(t.elapsed()));
    wait_marker(&console, "TICK", before + 1)?;
    fig.add("firecracker", "restore full: to next tick", ms(t.elapsed()));
    vm.kill()?;
    fs::remove_dir_all(&snap)?;
    Ok(())
}

/// Medians per VMM and figure, printed as `FIGURE vmm | name | median` lines in order.
#[derive(Default)]
struct Figures(Vec<(String, String, Vec<f64>)>);

impl Figures {
    fn add(&mut self, who: &str, what: &str, v: f64) {
        match self.0.iter_mut().find(|(w, n, _)| w == who && n == what) {
            Some((_, _, vals)) => vals.push(v),
            None => self.0.push((who.into(), what.into(), vec![v])),
        }
    }

    fn print(&self) {
        for (who, what, vals) in &self.0 {
            println!(
                "FIGURE {who} | {what} | {:.1} (median of {})",
                median(&mut vals.clone()),
                vals.len()
            );
        }
    }
}

fn count(file: &Path) -> usize {
    fs::read_to_string(file)
        .map(|s| s.matches("TICK").count())
        .unwrap_or(0)
}

/// MiB a file takes on disk (holes excluded).
fn on_disk(path: &Path) -> Result<f64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path)?.blocks() as f64 * 512.0 / 1048576.0)
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
        "{scratch}{fixed}{me} inner --vmm {vmm} --kernel {k} --initramfs {i} --cmdline {c} --dir {d} \
         --snapshots $SCRATCH/apibench --requests {r} --rounds {n}\n",
        scratch = host.scratch_setup(),
        // Inherited by every process the inner run starts.
        fixed = if cli.fixed_addresses {
            "setarch \"$(uname -m)\" -R "
        } else {
            ""
        },
        me = sh_quote(&me.display().to_string()),
        vmm = sh_quote(&binary("vmm")?.display().to_string()),
        k = sh_quote(&a.minimal_vmlinux.display().to_string()),
        i = sh_quote(&a.initramfs.display().to_string()),
        c = sh_quote(&boot.full_cmdline()),
        d = sh_quote(&dir.display().to_string()),
        r = cli.requests,
        n = cli.rounds,
    );
    // The peer, when FIRECRACKER= names it (benches/build-peers.sh prints the line).
    let script = match std::env::var("FIRECRACKER").ok().filter(|f| !f.is_empty()) {
        Some(fc) => format!("{} --firecracker {}\n", script.trim_end(), sh_quote(&fc)),
        None => script,
    };
    let out = host.run("apibench", &script, Duration::from_secs(1800))?;
    if out.status != 0 {
        bail!("apibench failed:\n{}", out.output);
    }
    for l in out.output.lines().filter(|l| {
        ["LATENCY", "FIGURE", "VMMLOG"]
            .iter()
            .any(|p| l.starts_with(p))
    }) {
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
            snapshots,
            requests,
            rounds,
            firecracker,
        }) => inner(
            vmm,
            kernel,
            initramfs,
            cmdline,
            dir,
            snapshots,
            *requests,
            *rounds,
            firecracker.as_deref(),
        ),
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
