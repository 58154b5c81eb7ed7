//! `vmm img create`: a new raw or qcow2 image, empty or on top of a backing file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::ValueEnum;
use qcow::{Compat, CreateOptions, Format};
use vmm_api::parse::parse_size;

use super::{bad, open_image, probe_backing, refuse_existing, size_both, FormatArg};

/// A qcow2 version on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompatArg {
    /// qcow2 version 2, for readers older than QEMU 1.1 (no zero clusters, no lazy refcounts).
    #[value(name = "0.10", alias = "v2")]
    V2,
    /// qcow2 version 3.
    #[value(name = "1.1", alias = "v3")]
    V3,
}

impl From<CompatArg> for Compat {
    fn from(c: CompatArg) -> Compat {
        match c {
            CompatArg::V2 => Compat::V2,
            CompatArg::V3 => Compat::V3,
        }
    }
}

/// Arguments of `vmm img create`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Format of the new image.
    #[arg(short = 'f', long = "format", value_name = "FMT", value_enum, default_value_t = FormatArg::Qcow2)]
    format: FormatArg,
    /// qcow2 cluster size: a power of two from 512 bytes to 2M (K and M suffixes allowed).
    /// Larger clusters mean less metadata and faster sequential I/O; smaller ones, less space
    /// used by sparse writes. Default 64K.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cluster_size: Option<u64>,
    /// qcow2 refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (16 by default; version 2 images
    /// only support 16).
    #[arg(long, value_name = "BITS")]
    refcount_bits: Option<u32>,
    /// qcow2 version: 1.1 (version 3, the default) or 0.10 (version 2, for old readers).
    #[arg(long, value_name = "VERSION", value_enum)]
    compat: Option<CompatArg>,
    /// Backing file: the new image reads as this file until written. A relative path is stored
    /// as given and resolved from the new image's directory.
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (default: probed from its header, and recorded in the image).
    #[arg(
        short = 'F',
        long = "backing-format",
        value_name = "FMT",
        value_enum,
        requires = "backing"
    )]
    backing_format: Option<FormatArg>,
    /// The image to create; it must not exist.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Virtual size: bytes, or a number with a K, M, G or T suffix (binary units). Defaults to
    /// the backing file's size.
    #[arg(value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
}

/// What a new image looks like, whoever asked for it (`create`, `overlay`, `convert`).
pub struct NewImage<'a> {
    /// Where.
    pub path: &'a Path,
    /// Its format.
    pub format: Format,
    /// Virtual size; None takes the backing file's.
    pub size: Option<u64>,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2 refcount width.
    pub refcount_bits: Option<u32>,
    /// qcow2 version.
    pub compat: Option<Compat>,
    /// Backing file name, as stored in the image.
    pub backing: Option<&'a str>,
    /// Backing file format; None probes it.
    pub backing_format: Option<Format>,
}

impl NewImage<'_> {
    /// Creates the image; returns the backing format recorded, if any.
    pub fn create(&self) -> Result<Option<Format>> {
        if self.format == Format::Raw {
            let qcow2_only = [
                (self.cluster_size.is_some(), "--cluster-size"),
                (self.refcount_bits.is_some(), "--refcount-bits"),
                (self.compat.is_some(), "--compat"),
                (self.backing.is_some(), "a backing file"),
            ];
            if let Some((_, what)) = qcow2_only.iter().find(|(set, _)| *set) {
                return Err(bad(format!("{what} needs a qcow2 image, not raw")));
            }
        }
        if self.size.is_none() && self.backing.is_none() {
            return Err(bad(
                "a size is needed (e.g. 10G) when there is no backing file to take it from",
            ));
        }
        refuse_existing(self.path)?;
        let backing_format = match (self.backing, self.backing_format) {
            (Some(b), None) => Some(probe_backing(self.path, b)?),
            (_, f) => f,
        };
        let defaults = CreateOptions::default();
        let cluster_size = match self.cluster_size {
            None => defaults.cluster_size,
            Some(c) => u32::try_from(c)
                .map_err(|_| bad(format!("cluster size {c} is too large (at most 2M)")))?,
        };
        let opts = CreateOptions {
            format: self.format,
            size: self.size,
            cluster_size,
            refcount_bits: self.refcount_bits.unwrap_or(defaults.refcount_bits),
            compat: self.compat.unwrap_or(defaults.compat),
            backing_file: self.backing.map(str::to_string),
            backing_format,
        };
        qcow::create(self.path, &opts)
            .with_context(|| format!("creating {}", self.path.display()))?;
        Ok(backing_format)
    }
}

/// Runs `vmm img create`.
pub fn run(args: Args) -> Result<()> {
    NewImage {
        path: &args.file,
        format: args.format.into(),
        size: args.size,
        cluster_size: args.cluster_size,
        refcount_bits: args.refcount_bits,
        compat: args.compat.map(Compat::from),
        backing: args.backing.as_deref(),
        backing_format: args.backing_format.map(Format::from),
    }
    .create()?;
    // Describe the image as written, read back from it.
    let image = open_image(&args.file, Some(args.format.into()), false)?;
    let info = image.info();
    let mut line = format!(
        "Created {}: {}, virtual size {}",
        args.file.display(),
        info.format,
        size_both(info.virtual_size)
    );
    if let Some(c) = info.cluster_size {
        line += &format!(", cluster size {c}");
    }
    if let Some(q) = &info.qcow2 {
        line += &format!(", compat {}, refcount bits {}", q.compat, q.refcount_bits);
    }
    if let Some(b) = &info.backing_file {
        line += &format!(", backing file {b}");
        if let Some(f) = info.backing_format {
            line += &format!(" ({f})");
        }
    }
    println!("{line}");
    Ok(())
}
