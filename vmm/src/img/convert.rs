//! `vmm img convert`: copies an image, through its backing chain, into a new raw or qcow2 image,
//! writing only what does not read as zeroes.

use std::path::PathBuf;

use anyhow::{Context, Result};
use qcow::{Format, Image};
use vmm_api::parse::parse_size;

use super::create::NewImage;
use super::progress::Progress;
use super::{open_image, refuse_existing, FormatArg};

/// Bytes copied per read: large enough for sequential speed, small enough to stay cache-friendly.
const CHUNK: u64 = 2 << 20;
/// Bytes asked of `Image::map` at once, so a huge sparse image never needs one huge extent list.
const MAP_WINDOW: u64 = 1 << 30;
/// Zero detection granularity for raw destinations (a host page: holes smaller than that save
/// nothing).
const RAW_BLOCK: u64 = 4096;

/// Arguments of `vmm img convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Format of SRC (default: probed from its header).
    #[arg(short = 'f', long = "format", value_name = "FMT", value_enum)]
    format: Option<FormatArg>,
    /// Format of DST.
    #[arg(short = 'O', long = "output-format", value_name = "FMT", value_enum)]
    output_format: FormatArg,
    /// Cluster size of a qcow2 DST (default 64K): a power of two from 512 bytes to 2M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cluster_size: Option<u64>,
    /// Show a progress bar on stderr.
    #[arg(short = 'p', long)]
    progress: bool,
    /// The image to copy (with its backing chain).
    #[arg(value_name = "SRC")]
    src: PathBuf,
    /// The new image; it must not exist.
    #[arg(value_name = "DST")]
    dst: PathBuf,
}

/// Runs `vmm img convert`.
pub fn run(args: Args) -> Result<()> {
    let src = open_image(&args.src, args.format.map(Into::into), false)?;
    refuse_existing(&args.dst)?;
    let format = Format::from(args.output_format);
    NewImage {
        path: &args.dst,
        format,
        size: Some(src.size()),
        cluster_size: args.cluster_size,
        refcount_bits: None,
        compat: None,
        backing: None,
        backing_format: None,
    }
    .create()?;
    // DST is ours from here on: a failed copy must not leave a plausible-looking image behind.
    let copied = open_image(&args.dst, Some(format), true).and_then(|dst| {
        copy(&src, &dst, args.progress)?;
        dst.close().context("finishing the new image")
    });
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&args.dst);
        return Err(e.context(format!("converting into {}", args.dst.display())));
    }
    Ok(())
}

/// Copies every range of `src` that does not read as zeroes into `dst`, which reads as zeroes.
fn copy(src: &Image, dst: &Image, progress: bool) -> Result<()> {
    let size = src.size();
    let block = dst
        .info()
        .cluster_size
        .unwrap_or(RAW_BLOCK)
        .clamp(RAW_BLOCK, CHUNK);
    let mut bar = Progress::new(progress, size);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let window = (size - pos).min(MAP_WINDOW);
        let extents = src.map(pos, window).context("mapping the source")?;
        for extent in extents.iter().filter(|e| !e.zero) {
            let end = extent.offset + extent.len;
            let mut off = extent.offset;
            while off < end {
                let n = (end - off).min(CHUNK);
                let data = &mut buf[..n as usize];
                src.read_at(off, data)
                    .with_context(|| format!("reading the source at {off}"))?;
                write_nonzero(dst, off, data, block)?;
                off += n;
                bar.update(off);
            }
        }
        pos += window;
        bar.update(pos);
    }
    bar.finish();
    Ok(())
}

/// Writes `data` (which belongs at `offset`) to `dst`, skipping `block`-aligned blocks of zeroes
/// and merging the rest into as few writes as possible.
fn write_nonzero(dst: &Image, offset: u64, data: &[u8], block: u64) -> Result<()> {
    let mut run_start: Option<usize> = None;
    let mut i = 0usize;
    while i < data.len() {
        // Block boundaries are aligned to the disk, not to this buffer.
        let at = offset + i as u64;
        let len = ((block - at % block) as usize).min(data.len() - i);
        let zero = data[i..i + len].iter().fold(0u8, |acc, b| acc | b) == 0;
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                write(dst, offset, data, s, i)?;
                run_start = None;
            }
            _ => {}
        }
        i += len;
    }
    if let Some(s) = run_start {
        write(dst, offset, data, s, data.len())?;
    }
    Ok(())
}

fn write(dst: &Image, offset: u64, data: &[u8], from: usize, to: usize) -> Result<()> {
    let at = offset + from as u64;
    dst.write_at(at, &data[from..to])
        .with_context(|| format!("writing the new image at {at}"))
}
