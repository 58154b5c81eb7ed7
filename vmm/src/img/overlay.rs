//! `vmm img overlay`: provisioning a VM disk from a base image, as a qcow2 overlay on top of it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use qcow::Format;
use vmm_api::parse::parse_size;

use super::create::NewImage;
use super::{open_image, size_both, FormatArg};

/// Arguments of `vmm img overlay`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Format of BASE (default: probed from its header, and recorded in the overlay).
    #[arg(short = 'F', long = "base-format", value_name = "FMT", value_enum)]
    base_format: Option<FormatArg>,
    /// Cluster size of the overlay (default 64K): a power of two from 512 bytes to 2M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cluster_size: Option<u64>,
    /// The base image, never modified. A relative path is resolved from OVERLAY's directory.
    #[arg(value_name = "BASE")]
    base: String,
    /// The qcow2 overlay to create; it must not exist.
    #[arg(value_name = "OVERLAY")]
    overlay: PathBuf,
    /// Virtual size of the overlay (default: BASE's): bytes, or a number with a K, M, G or T
    /// suffix.
    #[arg(value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
}

/// Runs `vmm img overlay`.
pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    let base_format = NewImage {
        path: &args.overlay,
        format: Format::Qcow2,
        size: args.size,
        cluster_size: args.cluster_size,
        refcount_bits: None,
        compat: None,
        backing: Some(&args.base),
        backing_format: args.base_format.map(Format::from),
    }
    .create()?;
    let took = start.elapsed();
    let size = open_image(&args.overlay, Some(Format::Qcow2), false)?.size();
    let base_format = base_format.map_or_else(|| "probed".to_string(), |f| f.to_string());
    println!(
        "Created overlay {} of {} ({base_format}), virtual size {}, in {:.1} ms",
        args.overlay.display(),
        args.base,
        size_both(size),
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}
