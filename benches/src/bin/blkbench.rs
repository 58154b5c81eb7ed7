//! `blkbench`: block throughput and IOPS with fio, side by side in one test host: fio on the test
//! host against the image file (the physical limit), fio in a guest under vmm (virtio-blk, raw,
//! O_DIRECT, io_uring), and fio in the same guest under QEMU (virtio-blk-pci, cache=none,
//! aio=io_uring). Prints a table with vmm/host and vmm/QEMU ratios.

use std::fs;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Parser;
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

#[derive(Clone, Copy, PartialEq)]
enum Metric {
    MibPerSec,
    Iops,
}

struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    metric: Metric,
}

const JOBS: [Job; 6] = [
    Job {
        name: "seq-read-1m",
        rw: "read",
        bs: "1M",
        iodepth: 16,
        metric: Metric::MibPerSec,
    },
    Job {
        name: "seq-write-1m",
        rw: "write",
        bs: "1M",
        iodepth: 16,
        metric: Metric::MibPerSec,
    },
    Job {
        name: "rand-read-4k-qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        metric: Metric::Iops,
    },
    Job {
        name: "rand-read-4k-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        metric: Metric::Iops,
    },
    Job {
        name: "rand-write-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        metric: Metric::Iops,
    },
    Job {
        name: "rand-write-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        metric: Metric::Iops,
    },
];

fn job_file(filename: &str, runtime: u32) -> String {
    let mut s = format!(
        "[global]\nioengine=libaio\ndirect=1\nthread=1\ntime_based=1\nruntime={runtime}\nramp_time=1\n\
         filename={filename}\ngroup_reporting=1\n"
    );
    for j in &JOBS {
        s.push_str(&format!(
            "[{}]\nstonewall\nrw={}\nbs={}\niodepth={}\n",
            j.name, j.rw, j.bs, j.iodepth
        ));
    }
    s
}

/// The figure of `job` in a fio JSON report.
fn figure(report: &serde_json::Value, job: &Job) -> Result<f64> {
    let entry = report["jobs"]
        .as_array()
        .context("no jobs in fio report")?
        .iter()
        .find(|j| j["jobname"] == job.name)
        .with_context(|| format!("{} missing from fio report", job.name))?;
    let side = if job.rw.contains("read") {
        "read"
    } else {
        "write"
    };
    let v = match job.metric {
        Metric::MibPerSec => entry[side]["bw"].as_f64().context("bw")? / 1024.0,
        Metric::Iops => entry[side]["iops"].as_f64().context("iops")?,
    };
    Ok(v)
}

/// fio's JSON from a console log (between the guest init's markers) or a plain fio output.
fn report(text: &str) -> Result<serde_json::Value> {
    let body = match (text.find("FIO-JSON-BEGIN"), text.find("FIO-JSON-END")) {
        (Some(b), Some(e)) if b < e => &text[b + "FIO-JSON-BEGIN".len()..e],
        _ => text,
    };
    let start = body.find('{').context("no JSON in fio output")?;
    let end = body.rfind('}').context("no JSON in fio output")?;
    serde_json::from_str(&body[start..=end]).context("parsing fio JSON")
}

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
    let enc = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let guest_job = enc(job_file("/dev/vdb", cli.runtime));
    let cmdline = format!(
        "console=ttyS0 quiet reboot=k panic=1 nmi_watchdog=0 root=/dev/vda ro init=/init lbfio64={guest_job}"
    );
    let vmlinux = a.minimal_vmlinux.display().to_string();
    let vmm = binary("vmm")?.display().to_string();
    let timeout = 120 + 12 * cli.runtime;
    let mut script = host.scratch_setup();
    script.push_str(&format!(
        "BENCH=$SCRATCH/bench.raw\n\
         if [ ! -f $BENCH ] || [ $(stat -c %s $BENCH) -ne {bytes} ]; then \
           echo 'filling the benchmark image' >&2; \
           dd if=/dev/urandom of=$BENCH bs=1M count={mib} conv=fsync status=none; fi\n\
         cat > {hostjob} <<'JOB'\n{host_job}JOB\n\
         sed -i \"s|^filename=.*|filename=$BENCH|\" {hostjob}\n\
         echo '== host' >&2; fio --output-format=json {hostjob} > {hostout} 2>&1\n\
         echo '== vmm' >&2; timeout {timeout} {vmm} --kernel {vmlinux} --memory 512M \
           --cmdline {cmdline} --disk path={rootfs},readonly=on --disk path=$BENCH,direct=on \
           > {vmmout} 2>&1\n\
         echo '== qemu' >&2; timeout {timeout} qemu-system-x86_64 -M q35 -accel kvm -cpu host \
           -smp 1 -m 512M -nodefaults -no-user-config -no-reboot -display none -serial stdio \
           -kernel {vmlinux} -append {cmdline} \
           -drive if=none,id=root,file={rootfs},format=raw,readonly=on \
           -device virtio-blk-pci,drive=root \
           -drive if=none,id=bench,file=$BENCH,format=raw,cache=none,aio=io_uring \
           -device virtio-blk-pci,drive=bench > {qemuout} 2>&1\n",
        bytes = u64::from(cli.size_mib) << 20,
        mib = cli.size_mib,
        hostjob = q(&dir.join("host.fio")),
        host_job = job_file("HOST", cli.runtime),
        hostout = q(&dir.join("host.json")),
        vmm = sh_quote(&vmm),
        vmlinux = sh_quote(&vmlinux),
        cmdline = sh_quote(&cmdline),
        rootfs = rootfs,
        vmmout = q(&dir.join("vmm.log")),
        qemuout = q(&dir.join("qemu.log")),
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
        let unit = match job.metric {
            Metric::MibPerSec => "MiB/s",
            Metric::Iops => "IOPS",
        };
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
