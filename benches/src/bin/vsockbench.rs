//! `vsockbench`: vsock next to TCP over virtio-net, in the same guest and the same test host
//! run: stream throughput host→guest and guest→host (one connection, 64 KiB writes) and
//! connection setup rate. The guest serves both transports with `vsockt bench-serve`; the host
//! side talks to the VM's vsock Unix socket as any host program does (`CONNECT <port>`), and to
//! the guest's address through a TAP in a network namespace.
//!
//! The outer process sends a script to the test host that boots the guest and runs this same
//! binary there (`vsockbench inner ...`) in the namespace.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lightbyte_benches::streams::{self, Stream};
use lightbyte_benches::timing::median;
use lightbyte_tests::artifacts;
use lightbyte_tests::guest::{sh_quote, Boot, JAIL_ID};
use lightbyte_tests::paths::binary;
use lightbyte_tests::testhost;

const PORT: u16 = 7000;
const NETNS: &str = "lbvsockbench";
const GUEST_IP: &str = "10.98.0.2";

/// vsock vs TCP throughput and connection setup, one test host run.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// MiB per stream.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Rounds of each measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Connections per setup-rate figure.
    #[arg(long, default_value_t = 200)]
    connections: u32,
    /// Also measure the VMM without its jail (seccomp filters, own uid, private root), booted
    /// after the jailed one in the same test host run: what the jail costs.
    #[arg(long)]
    compare_jail: bool,
    #[command(subcommand)]
    inner: Option<Inner>,
}

#[derive(Subcommand)]
enum Inner {
    /// Runs the measurements (inside the test host, in the namespace).
    Inner {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        mib: u64,
        #[arg(long)]
        rounds: u32,
        #[arg(long)]
        connections: u32,
    },
}

/// A stream to the guest service at `offset` from [`PORT`], over vsock (through the VMM's
/// socket) or TCP.
fn connect(socket: Option<&Path>, offset: u16) -> Result<Box<dyn Stream>> {
    let port = PORT + offset;
    Ok(match socket {
        Some(path) => {
            let mut s = UnixStream::connect(path).context("vsock socket")?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            let mut line = Vec::new();
            BufReader::with_capacity(1, &mut s).read_until(b'\n', &mut line)?;
            if !line.starts_with(b"OK ") {
                bail!("vsock port {port} refused");
            }
            Box::new(s)
        }
        None => Box::new(TcpStream::connect((GUEST_IP, port))?),
    })
}

/// One streaming measurement: bytes → MiB/s.
type Measure = fn(streams::Connect<'_>, u64) -> Result<f64>;

fn inner(socket: &Path, mib: u64, rounds: u32, connections: u32) -> Result<()> {
    let bytes = mib << 20;
    let rows: [(&str, Measure); 2] = [
        ("stream host→guest (MiB/s)", streams::to_guest),
        ("stream guest→host (MiB/s)", streams::from_guest),
    ];
    let vsock = |offset| connect(Some(socket), offset);
    let tcp = |offset| connect(None, offset);
    println!("| measurement | vsock | TCP over virtio-net | vsock/TCP |");
    println!("|---|---|---|---|");
    for (name, f) in rows {
        let (mut v, mut t) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            // Interleaved, so both see the same machine.
            v.push(f(&vsock, bytes)?);
            t.push(f(&tcp, bytes)?);
        }
        let (v, t) = (median(&mut v), median(&mut t));
        println!("| {name} | {v:.0} | {t:.0} | {:.2} |", v / t);
    }
    let (mut v, mut t) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        v.push(streams::setup_rate(&vsock, connections)?);
        t.push(streams::setup_rate(&tcp, connections)?);
    }
    let (v, t) = (median(&mut v), median(&mut t));
    println!(
        "| connection setup (connections/s) | {v:.0} | {t:.0} | {:.2} |",
        v / t
    );
    Ok(())
}

fn outer(cli: &Cli) -> Result<()> {
    let host = testhost::shared()?;
    let a = artifacts::get()?;
    let vmm = binary("vmm")?;
    let me = std::env::current_exe()?;
    let dir = host.work_dir().join("vsockbench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut script = String::from("set -u\n");
    let modes: &[bool] = if cli.compare_jail {
        &[true, false]
    } else {
        &[true]
    };
    for &jailed in modes {
        let label = if jailed { "jailed" } else { "unjailed" };
        let serial = dir.join(format!("serial-{label}.log"));
        let mut boot = Boot::new(&a.minimal_vmlinux)?
            .cpus(2)
            .memory("512M")
            .param(&format!("ip={GUEST_IP}::10.98.0.1:255.255.255.0::eth0:off"))
            .arg("--net")
            .arg("tap=tap0")
            .arg("--vsock")
            .arg("cid=3,socket=/tmp/lbvsockbench/v.sock")
            .arg("--serial")
            .arg(&format!("file:{}", serial.display()))
            .run(&format!(
                "vsockt bench-serve {PORT} {}; sleep 100000",
                cli.mib << 20
            ));
        if !jailed {
            boot = boot.unjailed();
        }
        let args: Vec<String> = boot.args().iter().map(|a| sh_quote(a)).collect();
        // The TAP is owned by the jail's uid, so the jailed VMM attaches without privileges.
        script.push_str(&format!(
            r#"echo "vmm {label}:"
NS={NETNS}; T=/tmp/lbvsockbench; rm -rf $T; mkdir -p $T
ip netns del $NS 2>/dev/null
ip netns add $NS && ip -n $NS link set lo up && ip -n $NS link add br0 type bridge &&
ip -n $NS addr add 10.98.0.1/24 dev br0 && ip -n $NS link set br0 up &&
ip -n $NS tuntap add dev tap0 mode tap user {JAIL_ID} group {JAIL_ID} && ip -n $NS link set tap0 master br0 &&
ip -n $NS link set tap0 up || {{ echo SETUP-FAILED; exit 1; }}
ip netns exec $NS {vmm} {args} > {dir}/vmm-{label}.log 2>&1 & P=$!
for _ in $(seq 1 1500); do grep -q VSOCKT-BENCH-READY {serial} 2>/dev/null && break; sleep 0.2; done
ip netns exec $NS {me} --mib {mib} --rounds {rounds} --connections {conns} inner --socket $T/v.sock --mib {mib} --rounds {rounds} --connections {conns}
rc=$?
kill $P; wait $P 2>/dev/null; ip netns del $NS; rm -rf $T
[ $rc = 0 ] || exit $rc
"#,
            vmm = sh_quote(&vmm.display().to_string()),
            args = args.join(" "),
            dir = sh_quote(&dir.display().to_string()),
            serial = sh_quote(&serial.display().to_string()),
            me = sh_quote(&me.display().to_string()),
            mib = cli.mib,
            rounds = cli.rounds,
            conns = cli.connections,
        ));
    }
    lightbyte_benches::run_printed(host, "vsockbench", &script)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.inner {
        Some(Inner::Inner {
            socket,
            mib,
            rounds,
            connections,
        }) => inner(socket, *mib, *rounds, *connections),
        None => outer(&cli),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsockbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
