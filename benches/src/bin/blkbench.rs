//! `blkbench`: block throughput and IOPS with fio, side by side in one test host: fio on the test
//! host against the image file (the physical limit), fio in a guest under vmm (virtio-blk, raw,
//! O_DIRECT, io_uring), in the same guest under QEMU (virtio-blk-pci, cache=none, aio=io_uring)
//! and, when `CLOUD_HYPERVISOR=` names its binary, Cloud Hypervisor (`direct=on`). Firecracker
//! (`FIRECRACKER=`) cannot open a disk with O_DIRECT, so it is compared with a second vmm run
//! through the page cache as well (both on io_uring). Prints a table with the ratios.

use std::fs;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use lightbyte_benches::fio::{figure, job_file, report, Job, Metric};
use lightbyte_benches::guestfio::GuestFio;
use lightbyte_tests::artifacts::{self, run_script};
use lightbyte_tests::guest::sh_quote;
use lightbyte_tests::paths::binary;
use lightbyte_tests::testhost;

/// Block I/O benchmark: host vs vmm vs QEMU, same image, same test host, one run.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Seconds per fio job.
    #[arg(long, default_value_t = 5)]
    runtime: u32,
    /// Size of the benchmark image in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u32,
    /// Only these jobs (names as in the table, comma-separated); all when not given.
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
}

const JOBS: [Job; 6] = [
    Job::new("seq-read-1m", "read", "1M", 16, Metric::MibPerSec),
    Job::new("seq-write-1m", "write", "1M", 16, Metric::MibPerSec),
    Job::new("rand-read-4k-qd1", "randread", "4k", 1, Metric::Iops),
    Job::new("rand-read-4k-qd32", "randread", "4k", 32, Metric::Iops),
    Job::new("rand-write-4k-qd1", "randwrite", "4k", 1, Metric::Iops),
    Job::new("rand-write-4k-qd32", "randwrite", "4k", 32, Metric::Iops),
];

/// Index of vmm's own (O_DIRECT) run among the guests: the first.
const OURS: usize = 0;

/// One guest run of the comparison.
struct Guest {
    /// Its console log (fio's JSON) in the work directory.
    file: &'static str,
    /// Its column heading.
    name: &'static str,
    /// The run of ours it is compared with, for a peer.
    against: Option<usize>,
    /// The shell lines running it.
    run: String,
}

impl Guest {
    fn new(file: &'static str, name: &'static str, against: Option<usize>, run: String) -> Self {
        Guest {
            file,
            name,
            against,
            run,
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let jobs: Vec<Job> = JOBS
        .iter()
        .filter(|j| cli.jobs.is_empty() || cli.jobs.iter().any(|n| n == j.name))
        .cloned()
        .collect();
    if jobs.len() < cli.jobs.len().max(1) {
        let known: Vec<&str> = JOBS.iter().map(|j| j.name).collect();
        bail!(
            "unknown job in {:?}; the jobs are {}",
            cli.jobs,
            known.join(", ")
        );
    }
    let host = testhost::shared()?;
    let a = artifacts::get()?;
    let rootfs = run_script("benches/guest/build-fio-rootfs.sh", &[])?
        .last()
        .cloned()
        .context("fio rootfs")?;
    let dir = host.work_dir().join("blkbench");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let q = |p: &std::path::Path| sh_quote(&p.display().to_string());
    let g = GuestFio {
        vmm: binary("vmm")?.display().to_string(),
        vmlinux: a.minimal_vmlinux.display().to_string(),
        rootfs,
        timeout: 120 + 12 * cli.runtime,
    };
    let guest_job = job_file("/dev/vdb", cli.runtime, &jobs);
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let log = |file: &str| q(&dir.join(file));
    let mut guests = vec![
        Guest::new(
            "vmm.log",
            "vmm",
            None,
            g.vmm(&guest_job, "$BENCH", "raw", &log("vmm.log")),
        ),
        Guest::new(
            "qemu.log",
            "QEMU",
            Some(OURS),
            g.qemu(&guest_job, "$BENCH", "raw", &log("qemu.log")),
        ),
    ];
    if let Some(ch) = env("CLOUD_HYPERVISOR") {
        let run = g.cloud_hypervisor(&ch, &guest_job, "$BENCH", &log("ch.log"));
        guests.push(Guest::new("ch.log", "Cloud Hypervisor", Some(OURS), run));
    }
    if let Some(fc) = env("FIRECRACKER") {
        let cached = guests.len();
        let run = g.vmm_cached(&guest_job, "$BENCH", &log("vmm-cached.log"));
        guests.push(Guest::new("vmm-cached.log", "vmm, page cache", None, run));
        let run = g.firecracker(&fc, &guest_job, "$BENCH", &log("fc.json"), &log("fc.log"));
        guests.push(Guest::new(
            "fc.log",
            "Firecracker, page cache",
            Some(cached),
            run,
        ));
    }
    let mut script = host.scratch_setup();
    script.push_str(&format!(
        "BENCH=$SCRATCH/bench.raw\n\
         if [ ! -f $BENCH ] || [ $(stat -c %s $BENCH) -ne {bytes} ]; then \
           echo 'filling the benchmark image' >&2; \
           dd if=/dev/urandom of=$BENCH bs=1M count={mib} conv=fsync status=none; fi\n\
         cat > {hostjob} <<'JOB'\n{host_job}JOB\n\
         sed -i \"s|^filename=.*|filename=$BENCH|\" {hostjob}\n\
         echo '== host' >&2; fio --output-format=json {hostjob} > {hostout} 2>&1\n",
        bytes = u64::from(cli.size_mib) << 20,
        mib = cli.size_mib,
        hostjob = log("host.fio"),
        host_job = job_file("HOST", cli.runtime, &jobs),
        hostout = log("host.json"),
    ));
    for guest in &guests {
        script.push_str(&format!(
            "echo {} >&2\n{}",
            sh_quote(&format!("== {}", guest.name)),
            guest.run
        ));
    }
    let out = host.run(
        "blkbench",
        &script,
        Duration::from_secs(600 + 30 * guests.len() as u64 * u64::from(cli.runtime)),
    )?;
    if out.status != 0 {
        bail!("benchmark scenario failed:\n{}", out.output);
    }
    let read = |name: &str| -> Result<serde_json::Value> {
        let text = fs::read_to_string(dir.join(name))?;
        report(&text).with_context(|| format!("{name}:\n{text}"))
    };
    let h = read("host.json")?;
    let results = guests
        .iter()
        .map(|guest| read(guest.file))
        .collect::<Result<Vec<_>>>()?;
    // Ratios: vmm against the host, and each peer's pair (vmm, or vmm through the page cache
    // for Firecracker) against it.
    let pairs: Vec<(usize, usize)> = guests
        .iter()
        .enumerate()
        .filter_map(|(peer, guest)| guest.against.map(|ours| (ours, peer)))
        .collect();
    println!(
        "Block I/O, raw image on the test host's ext4 scratch disk, fio libaio O_DIRECT in the \
         guest, {}s per job, 1 vCPU guests, one test host, one run",
        cli.runtime
    );
    let mut head = String::from("| job | host |");
    let mut rule = String::from("|---|---|");
    for guest in &guests {
        head.push_str(&format!(" {} |", guest.name));
        rule.push_str("---|");
    }
    head.push_str(" vmm/host |");
    rule.push_str("---|");
    for &(ours, peer) in &pairs {
        head.push_str(&format!(" {} / {} |", guests[ours].name, guests[peer].name));
        rule.push_str("---|");
    }
    println!("{head}\n{rule}");
    for job in &jobs {
        let hf = figure(&h, job)?;
        let values = results
            .iter()
            .map(|r| figure(r, job))
            .collect::<Result<Vec<_>>>()?;
        let mut row = format!("| {} ({}) | {hf:.0} |", job.name, job.metric.unit());
        for v in &values {
            row.push_str(&format!(" {v:.0} |"));
        }
        row.push_str(&format!(" {:.2} |", values[OURS] / hf));
        for &(ours, peer) in &pairs {
            row.push_str(&format!(" {:.2} |", values[ours] / values[peer]));
        }
        println!("{row}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkbench: {e:#}");
            ExitCode::from(1)
        }
    }
}
