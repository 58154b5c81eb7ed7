//! `vmm img check`: metadata consistency of a qcow2 image, and refcount repair.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use qcow::CheckReport;
use serde::Serialize;

use super::{require_file, Output};
use crate::EXIT_BAD_INPUT;

/// Exit status when the image leaks clusters but is otherwise consistent.
const EXIT_LEAKS: u8 = 3;
/// Exit status when the image is corrupt.
const EXIT_CORRUPT: u8 = EXIT_BAD_INPUT;

/// Arguments of `vmm img check`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rebuild the refcounts from the metadata that references clusters (fixes leaks and wrong
    /// refcounts), then check again. Do not repair an image a running VM is using.
    #[arg(short = 'r', long)]
    repair: bool,
    /// human: a summary with one line per problem; json: one object with the counts and
    /// messages (with --repair, what the check before the repair found is under "repair").
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t)]
    output: Output,
    /// The qcow2 image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// The JSON report: the final check, and with --repair what the check before the repair found.
#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    check: &'a CheckReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    repair: Option<&'a CheckReport>,
}

/// Runs `vmm img check`; the exit status says what it found.
pub fn run(args: Args) -> Result<ExitCode> {
    require_file(&args.file)?;
    let check = |repair: bool| {
        qcow::check(&args.file, repair).with_context(|| format!("checking {}", args.file.display()))
    };
    let first = check(false)?;
    // A repair reports the image as it is afterwards, so what it had to fix comes from the check
    // before it.
    let (report, repair) = if args.repair && !first.is_clean() {
        (check(true)?, Some(first))
    } else {
        (first, None)
    };
    match args.output {
        Output::Json => {
            let json = JsonReport {
                check: &report,
                repair: repair.as_ref(),
            };
            let text = serde_json::to_string_pretty(&json).context("encoding JSON")?;
            println!("{text}");
        }
        Output::Human => {
            if let Some(found) = &repair {
                print!("{}", repaired(found, report.repaired));
                println!("Double checking the fixed image now...");
            }
            print!("{}", human(&report));
        }
    }
    Ok(ExitCode::from(if report.corruptions > 0 {
        EXIT_CORRUPT
    } else if report.leaks > 0 {
        EXIT_LEAKS
    } else {
        0
    }))
}

/// What the check before a repair found, and whether the repair changed anything.
fn repaired(found: &CheckReport, rebuilt: bool) -> String {
    let mut out: String = found.messages.iter().map(|m| format!("{m}\n")).collect();
    out += &format!(
        "Found {} corruption(s) and {} leaked cluster(s); {}.\n",
        found.corruptions,
        found.leaks,
        if rebuilt {
            "rebuilt the refcounts"
        } else {
            "nothing a refcount rebuild can fix, so nothing was changed"
        }
    );
    out
}

/// A check report in the style of `qemu-img check`.
fn human(r: &CheckReport) -> String {
    let mut out: String = r.messages.iter().map(|m| format!("{m}\n")).collect();
    if r.is_clean() {
        out += "No errors were found on the image.\n";
    }
    if r.corruptions > 0 {
        out += &format!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes \
             to the image may corrupt it.\n",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        out += &format!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but \
             no harm to data.\n",
            r.leaks
        );
    }
    if r.total_clusters > 0 {
        out += &format!(
            "{}/{} = {:.2}% allocated\n",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64
        );
    }
    out += &format!("Image end offset: {}\n", r.image_end_offset);
    out
}
