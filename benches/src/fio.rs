//! fio job files and reports, shared by the block benchmarks.

use anyhow::{Context, Result};

/// What a job's figure measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Metric {
    /// Bandwidth.
    MibPerSec,
    /// Operations per second.
    Iops,
}

impl Metric {
    /// Unit label.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::MibPerSec => "MiB/s",
            Metric::Iops => "IOPS",
        }
    }
}

/// One fio job.
#[derive(Clone, Debug)]
pub struct Job {
    /// Job name (also its row label).
    pub name: &'static str,
    /// fio rw=.
    pub rw: &'static str,
    /// Block size.
    pub bs: &'static str,
    /// Queue depth.
    pub iodepth: u32,
    /// Figure reported.
    pub metric: Metric,
    /// Extra fio options for this job, one `key=value` per entry.
    pub extra: &'static [&'static str],
}

impl Job {
    /// A job with no extra options.
    pub const fn new(
        name: &'static str,
        rw: &'static str,
        bs: &'static str,
        iodepth: u32,
        metric: Metric,
    ) -> Job {
        Job {
            name,
            rw,
            bs,
            iodepth,
            metric,
            extra: &[],
        }
    }
}

/// A fio job file running `jobs` one after another on `filename`, each for `runtime` seconds
/// (jobs with `time_based=0` in their extras stop when their size or I/O count is done).
pub fn job_file(filename: &str, runtime: u32, jobs: &[Job]) -> String {
    let mut s = format!(
        "[global]\nioengine=libaio\ndirect=1\nthread=1\ntime_based=1\nruntime={runtime}\nramp_time=1\n\
         filename={filename}\ngroup_reporting=1\n"
    );
    for j in jobs {
        s.push_str(&format!(
            "[{}]\nstonewall\nrw={}\nbs={}\niodepth={}\n",
            j.name, j.rw, j.bs, j.iodepth
        ));
        for e in j.extra {
            s.push_str(e);
            s.push('\n');
        }
    }
    s
}

/// The figure of `job` in a fio JSON report.
pub fn figure(report: &serde_json::Value, job: &Job) -> Result<f64> {
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
pub fn report(text: &str) -> Result<serde_json::Value> {
    let body = match (text.find("FIO-JSON-BEGIN"), text.find("FIO-JSON-END")) {
        (Some(b), Some(e)) if b < e => &text[b + "FIO-JSON-BEGIN".len()..e],
        _ => text,
    };
    let start = body.find('{').context("no JSON in fio output")?;
    let end = body.rfind('}').context("no JSON in fio output")?;
    serde_json::from_str(&body[start..=end]).context("parsing fio JSON")
}
