//! `vmm img info`: what an image is, with its whole backing chain.

use std::path::PathBuf;

use anyhow::{Context, Result};
use qcow::ImageInfo;

use super::{human_size, open_image, size_both, FormatArg, Output};

/// Arguments of `vmm img info`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Format of the image (default: probed from its header; -f raw shows even a qcow2 file as
    /// raw bytes).
    #[arg(short = 'f', long = "format", value_name = "FMT", value_enum)]
    format: Option<FormatArg>,
    /// human: a table per image of the chain; json: the image's information as one object, the
    /// backing image's nested under "backing".
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t)]
    output: Output,
    /// The image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Runs `vmm img info`.
pub fn run(args: Args) -> Result<()> {
    let image = open_image(&args.file, args.format.map(Into::into), false)?;
    let info = image.info();
    match args.output {
        Output::Json => {
            let json = serde_json::to_string_pretty(&info).context("encoding JSON")?;
            println!("{json}");
        }
        Output::Human => {
            let mut next = Some(&info);
            let mut first = true;
            while let Some(i) = next {
                if !first {
                    println!();
                }
                print!("{}", human(i));
                first = false;
                next = i.backing.as_deref();
            }
        }
    }
    Ok(())
}

/// One image of the chain as a table, like `qemu-img info`.
fn human(info: &ImageInfo) -> String {
    let mut rows = vec![
        ("image", info.filename.clone()),
        ("file format", info.format.to_string()),
        ("virtual size", size_both(info.virtual_size)),
        ("disk size", human_size(info.actual_size)),
    ];
    if let Some(c) = info.cluster_size {
        rows.push(("cluster_size", c.to_string()));
    }
    if let Some(b) = &info.backing_file {
        let mut value = b.clone();
        if let Some(full) = info.full_backing_filename.as_ref().filter(|f| *f != b) {
            value += &format!(" (actual path: {full})");
        }
        rows.push(("backing file", value));
    }
    if let Some(f) = info.backing_format {
        rows.push(("backing file format", f.to_string()));
    }
    let mut out: String = rows.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
    if let Some(q) = &info.qcow2 {
        out += "Format specific information:\n";
        let on_off = |b: bool| if b { "true" } else { "false" };
        for (k, v) in [
            ("compat", q.compat.clone()),
            ("compression type", q.compression_type.clone()),
            ("lazy refcounts", on_off(q.lazy_refcounts).into()),
            ("refcount bits", q.refcount_bits.to_string()),
            ("extended l2", on_off(q.extended_l2).into()),
            ("dirty", on_off(q.dirty).into()),
            ("corrupt", on_off(q.corrupt).into()),
            ("snapshots", q.snapshots.to_string()),
        ] {
            out += &format!("    {k}: {v}\n");
        }
    }
    out
}
