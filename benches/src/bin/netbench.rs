//! `netbench`: virtio-net measured side by side in one test host run. One guest per VMM — our
//! `vmm`, QEMU (`-M microvm`, `-netdev tap,vhost=off`) and, when `FIRECRACKER=` /
//! `CLOUD_HYPERVISOR=` name their binaries, Firecracker and Cloud Hypervisor — each with the
//! same kernel, initramfs and 1 vCPU on a TAP of its own, all bridged in a network namespace
//! made for the run, serving `vsockt bench-serve --tcp-only`. From the namespace, interleaved
//! round by round: TCP stream throughput each way, request/response round trips of one byte
//! (TCP_RR-style, no-delay) and connection setup rate. Prints a table with vmm/peer ratios.
//!
//! The outer process sends a script to the test host that starts the guests and runs this
//! same binary there (`netbench inner ...`) inside the namespace.

use std::net::TcpStream;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lightbyte_benches::peers::{cloud_hypervisor_cmd, firecracker_cmd, qemu_cmd};
use lightbyte_benches::streams::{self, Stream};
use lightbyte_benches::timing::median;
use lightbyte_tests::artifacts::{self, Artifacts};
use lightbyte_tests::guest::{sh_quote, Boot};
use lightbyte_tests::paths::binary;
use lightbyte_tests::testhost;

const PORT: u16 = 7000;
const NETNS: &str = "lbnetbench";
const SUBNET: &str = "10.97.0";
const MEMORY_MIB: u64 = 256;

/// Network benchmark: vmm vs QEMU vs Firecracker vs Cloud Hypervisor, one test host run.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// MiB per stream.
    #[arg(long, default_value_t = 128)]
    mib: u64,
    /// Rounds of each measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Round trips per round-trip figure.
    #[arg(long, default_value_t = 2000)]
    round_trips: u32,
    /// Connections per setup-rate figure.
    #[arg(long, default_value_t = 200)]
    connections: u32,
    #[command(subcommand)]
    inner: Option<Inner>,
}

#[derive(Subcommand)]
enum Inner {
    /// Runs the measurements (inside the test host, in the namespace).
    Inner {
        /// `NAME=IP` of each guest, in table order (the first is ours).
        #[arg(long = "guest", required = true)]
        guests: Vec<String>,
    },
}

/// One VMM of the comparison and its guest.
struct Guest {
    /// Short label (TAP and file names).
    label: &'static str,
    /// Name in the table.
    name: &'static str,
    /// The command starting it, console on stdout.
    cmd: Vec<String>,
    /// The guest's address.
    ip: String,
}

/// The TAP of a guest.
fn tap(label: &str) -> String {
    format!("tap-{label}")
}

/// The guests: vmm at .2, QEMU at .3, then the peers the environment names.
fn guests(a: &Artifacts, dir: &Path, mib: u64) -> Result<Vec<Guest>> {
    let boot = |n: u8| -> Result<Boot> {
        Ok(Boot::new(&a.minimal_vmlinux)?
            .memory(&format!("{MEMORY_MIB}M"))
            .param(&format!(
                "ip={SUBNET}.{n}::{SUBNET}.1:255.255.255.0::eth0:off"
            ))
            .run(&format!(
                "vsockt bench-serve {PORT} {} --tcp-only; sleep 100000",
                mib << 20
            ))
            .unjailed())
    };
    let mac = |n: u8| format!("52:54:00:97:00:{n:02x}");
    let mut out = Vec::new();
    let mut vmm = vec![binary("vmm")?.display().to_string()];
    vmm.extend(
        boot(2)?
            .arg("--net")
            .arg(&format!("tap={},mac={}", tap("vmm"), mac(2)))
            .args(),
    );
    out.push(Guest {
        label: "vmm",
        name: "lightbyte vmm",
        cmd: vmm,
        ip: format!("{SUBNET}.2"),
    });
    let mut qemu = qemu_cmd(a, MEMORY_MIB, boot(3)?.full_cmdline());
    qemu.extend([
        "-netdev".into(),
        format!(
            "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
            tap("qemu")
        ),
        "-device".into(),
        format!("virtio-net-device,netdev=n0,mac={}", mac(3)),
    ]);
    out.push(Guest {
        label: "qemu",
        name: "QEMU microvm (vhost=off)",
        cmd: qemu,
        ip: format!("{SUBNET}.3"),
    });
    if let Some(fc) = std::env::var("FIRECRACKER").ok().filter(|v| !v.is_empty()) {
        let t = tap("fc");
        out.push(Guest {
            label: "fc",
            name: "Firecracker",
            cmd: firecracker_cmd(
                &fc,
                a,
                MEMORY_MIB,
                boot(4)?.full_cmdline(),
                &dir.join("fc-net.json"),
                Some((&t, &mac(4))),
            )?,
            ip: format!("{SUBNET}.4"),
        });
    }
    if let Some(ch) = std::env::var("CLOUD_HYPERVISOR")
        .ok()
        .filter(|v| !v.is_empty())
    {
        let mut cmd = cloud_hypervisor_cmd(&ch, a, MEMORY_MIB, boot(5)?.full_cmdline());
        cmd.extend(["--net".into(), format!("tap={},mac={}", tap("ch"), mac(5))]);
        out.push(Guest {
            label: "ch",
            name: "Cloud Hypervisor",
            cmd,
            ip: format!("{SUBNET}.5"),
        });
    }
    Ok(out)
}

/// A connection to the guest at `ip`, service `offset` from [`PORT`].
fn connect(ip: &str, offset: u16) -> Result<Box<dyn Stream>> {
    let s = TcpStream::connect((ip, PORT + offset))
        .with_context(|| format!("connecting to {ip}:{}", PORT + offset))?;
    s.set_nodelay(true)?;
    Ok(Box::new(s))
}

/// One figure: a name and how it is measured against one guest.
type Figure = (
    &'static str,
    Box<dyn Fn(streams::Connect<'_>) -> Result<f64>>,
);

fn inner(cli: &Cli, guests: &[String]) -> Result<()> {
    let guests: Vec<(&str, &str)> = guests
        .iter()
        .map(|g| g.rsplit_once('=').context("--guest NAME=IP"))
        .collect::<Result<_>>()?;
    let bytes = cli.mib << 20;
    let (trips, conns) = (cli.round_trips, cli.connections);
    let figures: Vec<Figure> = vec![
        (
            "TCP stream host→guest (MiB/s)",
            Box::new(move |c| streams::to_guest(c, bytes)),
        ),
        (
            "TCP stream guest→host (MiB/s)",
            Box::new(move |c| streams::from_guest(c, bytes)),
        ),
        (
            "round trips, 1 byte (per s)",
            Box::new(move |c| streams::round_trips(c, trips)),
        ),
        (
            "connection setup (per s)",
            Box::new(move |c| streams::setup_rate(c, conns)),
        ),
    ];
    let mut header = String::from("| measurement |");
    let mut rule = String::from("|---|");
    for (name, _) in &guests {
        header.push_str(&format!(" {name} |"));
        rule.push_str("---|");
    }
    for (name, _) in &guests[1..] {
        header.push_str(&format!(" **vmm / {name}** |"));
        rule.push_str("---|");
    }
    println!("{header}\n{rule}");
    for (figure, measure) in &figures {
        let mut values = vec![Vec::new(); guests.len()];
        for _ in 0..cli.rounds {
            // Interleaved, so every guest sees the same machine.
            for (i, (name, ip)) in guests.iter().enumerate() {
                let c = |offset| connect(ip, offset);
                values[i].push(measure(&c).with_context(|| format!("{figure} on {name}"))?);
            }
        }
        let m: Vec<f64> = values.iter_mut().map(|v| median(v)).collect();
        let mut row = format!("| {figure} |");
        for v in &m {
            row.push_str(&format!(" {v:.0} |"));
        }
        for v in &m[1..] {
            row.push_str(&format!(" **{:.2}** |", m[0] / v));
        }
        println!("{row}");
    }
    Ok(())
}

fn outer(cli: &Cli) -> Result<()> {
    let host = testhost::shared()?;
    let a = artifacts::get()?;
    let me = std::env::current_exe()?;
    let dir = host.work_dir().join("netbench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let guests = guests(a, &dir, cli.mib)?;
    let d = sh_quote(&dir.display().to_string());
    let mut script = format!(
        r#"set -u
NS={NETNS}; D={d}
cleanup() {{ for p in $D/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null; done; sleep 1; ip netns del $NS 2>/dev/null; }}
trap cleanup EXIT
ip netns del $NS 2>/dev/null
ip netns add $NS && ip -n $NS link set lo up && ip -n $NS link add br0 type bridge &&
ip -n $NS addr add {SUBNET}.1/24 dev br0 && ip -n $NS link set br0 up || {{ echo SETUP-FAILED; exit 1; }}
"#
    );
    for g in &guests {
        let args: Vec<String> = g.cmd.iter().map(|a| sh_quote(a)).collect();
        script.push_str(&format!(
            r#"ip -n $NS tuntap add dev {tap} mode tap && ip -n $NS link set {tap} master br0 && ip -n $NS link set {tap} up || {{ echo SETUP-FAILED {tap}; exit 1; }}
ip netns exec $NS {cmd} < /dev/null > $D/{label}.console 2>&1 & echo $! > $D/{label}.pid
"#,
            tap = tap(g.label),
            cmd = args.join(" "),
            label = g.label,
        ));
    }
    for g in &guests {
        script.push_str(&format!(
            r#"for _ in $(seq 1 1500); do grep -q VSOCKT-BENCH-READY $D/{label}.console 2>/dev/null && break; sleep 0.2; done
grep -q VSOCKT-BENCH-READY $D/{label}.console || {{ echo "{label} never served:"; tail -30 $D/{label}.console; exit 1; }}
"#,
            label = g.label
        ));
    }
    let list: Vec<String> = guests
        .iter()
        .map(|g| sh_quote(&format!("--guest={}={}", g.name, g.ip)))
        .collect();
    script.push_str(&format!(
        "ip netns exec $NS {me} --mib {mib} --rounds {rounds} --round-trips {trips} --connections {conns} inner {list}\n",
        me = sh_quote(&me.display().to_string()),
        mib = cli.mib,
        rounds = cli.rounds,
        trips = cli.round_trips,
        conns = cli.connections,
        list = list.join(" "),
    ));
    lightbyte_benches::run_printed(host, "netbench", &script)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.inner {
        Some(Inner::Inner { guests }) => inner(&cli, guests),
        None => outer(&cli),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
