//! `blkbench`: block throughput and IOPS with fio, side by side in one test host: fio on the test
//! host against the image file (the physical limit), fio in a guest under vmm (virtio-blk, raw,
//! O_DIRECT, io_uring), and fio in the same guest under QEMU (virtio-blk-pci, cache=none,
//! aio=io_uring). Prints a table with vmm/host and vmm/QEMU ratios.

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
}

const JOBS: [Job; 6] = [
    Job::new("seq-read-1m", "read", "1M", 16, Metric::MibPerSec),
    Job::new("seq-write-1m", "write", "1M", 16, Metric::MibPerSec),
    Job::new("rand-read-4k-qd1", "randread", "4k", 1, Metric::Iops),
    Job::new("rand-read-4k-qd32", "randread", "4k", 32, Metric::Iops),
    Job::new("rand-write-4k-qd1", "randwrite", "4k", 1, Metric::Iops),
    Job::new("rand-write-4k-qd32", "randwrite", "4k", 32, Metric::Iops),
];

fn run(cli: Cli) -> Result<()> {
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
    let guest_job = job_file("/dev/vdb", cli.runtime, &JOBS);
    let mut script = host.scratch_setup();
    script.push_str(&format!(
        "BENCH=$SCRATCH/bench.raw\n\
         if [ ! -f $BENCH ] || [ $(stat -c %s $BENCH) -ne {bytes} ]; then \
           echo 'filling the benchmark image' >&2; \
           dd if=/dev/urandom of=$BENCH bs=1M count={mib} conv=fsync status=none; fi\n\
         cat > {hostjob} <<'JOB'\n{host_job}JOB\n\
         sed -i \"s|^filename=.*|filename=$BENCH|\" {hostjob}\n\
         echo '== host' >&2; fio --output-format=json {hostjob} > {hostout} 2>&1\n\
         echo '== vmm' >&2\n{vmm}\
         echo '== qemu' >&2\n{qemu}",
        bytes = u64::from(cli.size_mib) << 20,
        mib = cli.size_mib,
        hostjob = q(&dir.join("host.fio")),
        host_job = job_file("HOST", cli.runtime, &JOBS),
        hostout = q(&dir.join("host.json")),
        vmm = g.vmm(&guest_job, "$BENCH", "raw", &q(&dir.join("vmm.log"))),
        qemu = g.qemu(&guest_job, "$BENCH", "raw", &q(&dir.join("qemu.log"))),
    ));
    let out = host.run(
        "blkbench",
        &script,
        Duration::from_secs(600 + 30 * u64::from(cli.runtime)),
    )?;
    if out.status != 0 {
        bail!("benchmark scenario failed:\n{}", out.output);
    }
    let read = |name: &str| -> Result<serde_json::Value> {
        let text = fs::read_to_string(dir.join(name))?;
        report(&text).with_context(|| format!("{name}:\n{text}"))
    };
    let (h, v, qm) = (read("host.json")?, read("vmm.log")?, read("qemu.log")?);
    println!(
        "Block I/O, raw image on the test host's ext4 scratch disk, O_DIRECT everywhere, fio libaio, \
         {}s per job, 1 vCPU guests, one test host, one run",
        cli.runtime
    );
    println!("| job | host | vmm | QEMU | vmm/host | vmm/QEMU |");
    println!("|---|---|---|---|---|---|");
    for job in &JOBS {
        let (hf, vf, qf) = (figure(&h, job)?, figure(&v, job)?, figure(&qm, job)?);
        let unit = job.metric.unit();
        println!(
            "| {} ({unit}) | {hf:.0} | {vf:.0} | {qf:.0} | {:.2} | {:.2} |",
            job.name,
            vf / hf,
            vf / qf
        );
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
