//! `vmm img resize`: a new virtual size, absolute or relative.

use std::path::PathBuf;

use anyhow::{Context, Result};
use vmm_api::config::ConfigError;
use vmm_api::parse::parse_size;

use super::{bad, open_image, size_both, FormatArg};

/// A size on the resize command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewSize {
    /// This many bytes.
    Absolute(u64),
    /// The current size plus this.
    Grow(u64),
    /// The current size minus this.
    Shrink(u64),
}

impl NewSize {
    /// The size in bytes, given the current one.
    fn apply_to(self, current: u64) -> Result<u64> {
        match self {
            NewSize::Absolute(n) => Ok(n),
            NewSize::Grow(n) => current
                .checked_add(n)
                .ok_or_else(|| bad(format!("{current} + {n} bytes does not fit in 64 bits"))),
            NewSize::Shrink(n) => current.checked_sub(n).ok_or_else(|| {
                bad(format!(
                    "cannot shrink by {}: the image is only {}",
                    size_both(n),
                    size_both(current)
                ))
            }),
        }
    }
}

/// Parses `20G`, `+5G` or `-1G`.
fn parse_new_size(s: &str) -> Result<NewSize, ConfigError> {
    let t = s.trim();
    Ok(if let Some(n) = t.strip_prefix('+') {
        NewSize::Grow(parse_size(n)?)
    } else if let Some(n) = t.strip_prefix('-') {
        NewSize::Shrink(parse_size(n)?)
    } else {
        NewSize::Absolute(parse_size(t)?)
    })
}

/// Arguments of `vmm img resize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Allow a smaller size. Still refused while anything but zeroes lies past the new end.
    #[arg(long)]
    shrink: bool,
    /// Format of the image (default: probed from its header).
    #[arg(short = 'f', long = "format", value_name = "FMT", value_enum)]
    format: Option<FormatArg>,
    /// The image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// New virtual size: absolute (20G), or relative to the current one (+5G, -1G); bytes or a
    /// number with a K, M, G or T suffix.
    #[arg(value_name = "SIZE", allow_hyphen_values = true, value_parser = parse_new_size)]
    size: NewSize,
}

/// Runs `vmm img resize`.
pub fn run(args: Args) -> Result<()> {
    let image = open_image(&args.file, args.format.map(Into::into), true)?;
    let current = image.size();
    let new = args.size.apply_to(current)?;
    if new < current && !args.shrink {
        return Err(bad(format!(
            "{} would shrink from {} to {}: pass --shrink to allow it (after shrinking the \
             filesystems inside)",
            args.file.display(),
            size_both(current),
            size_both(new)
        )));
    }
    image
        .resize(new, args.shrink)
        .with_context(|| format!("resizing {} to {}", args.file.display(), size_both(new)))?;
    image
        .close()
        .with_context(|| format!("closing {}", args.file.display()))?;
    println!(
        "Resized {} from {} to {}",
        args.file.display(),
        size_both(current),
        size_both(new)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_absolute_and_relative() {
        assert_eq!(parse_new_size("20G"), Ok(NewSize::Absolute(20 << 30)));
        assert_eq!(parse_new_size("+512M"), Ok(NewSize::Grow(512 << 20)));
        assert_eq!(parse_new_size("-1G"), Ok(NewSize::Shrink(1 << 30)));
        assert!(parse_new_size("+").is_err());
        assert!(parse_new_size("--1G").is_err());
        assert!(parse_new_size("1.5G").is_err());
        assert_eq!(NewSize::Grow(1).apply_to(1).unwrap(), 2);
        assert_eq!(NewSize::Shrink(1 << 30).apply_to(3 << 30).unwrap(), 2 << 30);
        assert!(NewSize::Shrink(2).apply_to(1).is_err());
        assert!(NewSize::Grow(u64::MAX).apply_to(1).is_err());
    }
}
