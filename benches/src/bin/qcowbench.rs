//! `qcowbench`: qcow2 throughput next to raw, under vmm and QEMU, in one test host and one run.
//! Rows: raw (the baseline), fully allocated qcow2, an empty qcow2 overlay over the raw image
//! (every read falls through to the backing file), and allocating writes into a fresh qcow2.
//! Prints vmm/QEMU per row and vmm's qcow2/raw ratio per job.

use std::collections::BTreeMap;
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

/// qcow2 benchmark: vmm vs QEMU, qcow2 vs raw, same test host, one run.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Seconds per time-based fio job.
    #[arg(long, default_value_t = 10)]
    runtime: u32,
    /// Size of the benchmark image in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u32,
}

const SEQ_READ: Job = Job::new("seq-read-1m", "read", "1M", 16, Metric::MibPerSec);
const RAND_READ: Job = Job::new("rand-read-4k-qd32", "randread", "4k", 32, Metric::Iops);
const SEQ_WRITE: Job = Job::new("seq-write-1m", "write", "1M", 16, Metric::MibPerSec);
const RAND_WRITE: Job = Job::new("rand-write-4k-qd32", "randwrite", "4k", 32, Metric::Iops);
/// Allocating writes: one pass into never-written space of a fresh 4 GiB image.
const ALLOC_JOBS: [Job; 2] = [
    Job {
        name: "seq-write-1m",
        rw: "write",
        bs: "1M",
        iodepth: 16,
        metric: Metric::MibPerSec,
        extra: &["time_based=0", "size=1G", "offset=0"],
    },
    Job {
        name: "rand-write-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        metric: Metric::Iops,
        extra: &["time_based=0", "offset=1G", "size=3G", "number_ios=20000"],
    },
];

/// One row group: an image prepared before each run, and the jobs run on it.
struct Case {
    name: &'static str,
    /// Shell that (re)creates $IMG; runs before each VMM's run.
    prep: &'static str,
    format: &'static str,
    jobs: Vec<Job>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "raw",
            prep: "IMG=$SCRATCH/qb.raw; cp --sparse=always $SCRATCH/qbench.raw $IMG",
            format: "raw",
            jobs: vec![SEQ_READ, RAND_READ, SEQ_WRITE, RAND_WRITE],
        },
        Case {
            name: "qcow2 allocated",
            prep: "IMG=$SCRATCH/qb.qcow2; rm -f $IMG; qemu-img convert -O qcow2 $SCRATCH/qbench.raw $IMG",
            format: "qcow2",
            jobs: vec![SEQ_READ, RAND_READ, SEQ_WRITE, RAND_WRITE],
        },
        Case {
            name: "qcow2 overlay on raw (reads fall through)",
            prep: "IMG=$SCRATCH/qb-ov.qcow2; rm -f $IMG; qemu-img create -q -f qcow2 -b $SCRATCH/qbench.raw -F raw $IMG",
            format: "qcow2",
            jobs: vec![SEQ_READ, RAND_READ],
        },
        Case {
            name: "qcow2 allocating writes",
            prep: "IMG=$SCRATCH/qb-new.qcow2; rm -f $IMG; qemu-img create -q -f qcow2 $IMG 4G",
            format: "qcow2",
            jobs: ALLOC_JOBS.to_vec(),
        },
    ]
}

fn run(cli: Cli) -> Result<()> {
    let host = testhost::shared()?;
    let a = artifacts::get()?;
    let rootfs = run_script("benches/guest/build-fio-rootfs.sh", &[])?
        .last()
        .cloned()
        .context("fio rootfs")?;
    let dir = host.work_dir().join("qcowbench");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let g = GuestFio {
        vmm: binary("vmm")?.display().to_string(),
        vmlinux: a.minimal_vmlinux.display().to_string(),
        rootfs,
        timeout: 300 + 12 * cli.runtime,
    };
    let mut script = host.scratch_setup();
    script.push_str(&format!(
        "SRC=$SCRATCH/qbench.raw\n\
         if [ ! -f $SRC ] || [ $(stat -c %s $SRC) -ne {bytes} ]; then \
           echo 'filling the benchmark image' >&2; \
           dd if=/dev/urandom of=$SRC bs=1M count={mib} conv=fsync status=none; fi\n",
        bytes = u64::from(cli.size_mib) << 20,
        mib = cli.size_mib,
    ));
    let cases = cases();
    for (i, c) in cases.iter().enumerate() {
        let job = job_file("/dev/vdb", cli.runtime, &c.jobs);
        for who in ["vmm", "qemu"] {
            let log = sh_quote(&dir.join(format!("{i}-{who}.log")).display().to_string());
            script.push_str(&format!(
                "echo '== {} / {who}' >&2\n{}\nsync\n",
                c.name, c.prep
            ));
            script.push_str(&match who {
                "vmm" => g.vmm(&job, "$IMG", c.format, &log),
                _ => g.qemu(&job, "$IMG", c.format, &log),
            });
            script.push_str("rm -f $IMG\n");
        }
    }
    let out = host.run(
        "qcowbench",
        &script,
        Duration::from_secs(900 + 60 * u64::from(cli.runtime)),
    )?;
    if out.status != 0 {
        bail!("benchmark scenario failed:\n{}", out.output);
    }
    let mut vmm_raw: BTreeMap<&str, f64> = BTreeMap::new();
    println!(
        "qcow2 vs raw, image on the test host's ext4 scratch disk, O_DIRECT (vmm direct=on, QEMU \
         cache=none,aio=io_uring), fio libaio in a 1-vCPU guest, {}s per time-based job, one run",
        cli.runtime
    );
    println!("| image | job | vmm | QEMU | vmm/QEMU | vmm qcow2/raw |");
    println!("|---|---|---|---|---|---|");
    for (i, c) in cases.iter().enumerate() {
        let read = |who: &str| -> Result<serde_json::Value> {
            let text = fs::read_to_string(dir.join(format!("{i}-{who}.log")))?;
            report(&text).with_context(|| format!("{} / {who}:\n{text}", c.name))
        };
        let (v, q) = (read("vmm")?, read("qemu")?);
        for job in &c.jobs {
            let (vf, qf) = (figure(&v, job)?, figure(&q, job)?);
            let vs_raw = match vmm_raw.get(job.name) {
                Some(r) if c.format == "qcow2" => format!("{:.2}", vf / r),
                _ => "".into(),
            };
            if c.format == "raw" {
                vmm_raw.insert(job.name, vf);
            }
            println!(
                "| {} | {} ({}) | {vf:.0} | {qf:.0} | {:.2} | {vs_raw} |",
                c.name,
                job.name,
                job.metric.unit(),
                vf / qf
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qcowbench: {e:#}");
            ExitCode::from(1)
        }
    }
}
