//! `vmm img`: disk image tools on the `qcow` crate, in the spirit of `qemu-img` (same option
//! letters where they overlap). Each subcommand is a module; this one holds what they share: the
//! argument types, how errors become exit statuses, and the checks on file arguments.

mod check;
mod convert;
mod create;
mod info;
mod overlay;
mod progress;
mod resize;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use qcow::{Format, Image, OpenOptions};

use crate::EXIT_BAD_INPUT;

/// Exit status when the host failed (I/O errors).
pub const EXIT_FAILED: u8 = 1;

/// The image subcommands.
#[derive(Subcommand, Debug)]
pub enum ImgCommand {
    /// Create a new raw or qcow2 image (qcow2 unless -f raw), empty or on top of a backing file.
    ///
    /// The new image reads as zeroes, or as its backing file when -b is given: writes then go to
    /// the new image and the backing file is never modified. FILE must not exist.
    Create(create::Args),
    /// Show an image's format, sizes and qcow2 details, with its whole backing chain.
    ///
    /// "disk size" is what the file occupies on the host; "virtual size" is what a guest sees.
    /// Each backing image follows the image that names it.
    Info(info::Args),
    /// Change an image's virtual size.
    ///
    /// SIZE is absolute (20G) or relative to the current size (+5G, -1G). Making the image
    /// smaller needs --shrink, and is refused while anything but zeroes lies past the new end.
    /// The guest's partitions and filesystems are not touched: grow them inside the guest
    /// afterwards, and shrink them before shrinking the image.
    Resize(resize::Args),
    /// Create a qcow2 overlay of BASE: a new VM disk that reads as BASE and writes to itself.
    ///
    /// This is how a VM disk is provisioned from a golden image in constant time, whatever
    /// BASE's size: BASE is never modified and can serve any number of overlays. SIZE (default:
    /// BASE's size) may exceed BASE's; the space beyond reads as zeroes. A relative BASE path is
    /// stored as given and resolved from OVERLAY's directory (as qemu-img does), so the pair can
    /// be moved together. Prints how long creating the overlay took.
    Overlay(overlay::Args),
    /// Copy an image into a new one, possibly of another format.
    ///
    /// The copy reads through the whole backing chain of SRC, so DST stands alone. Ranges that
    /// read as zeroes are not written, so DST is as sparse as it can be. DST must not exist; it
    /// is removed again when the copy fails.
    Convert(convert::Args),
    /// Check a qcow2 image's metadata for corruptions and leaked clusters.
    ///
    /// A corruption is a cluster referenced more often than its refcount says, or metadata that
    /// points outside the file or is misaligned: writing to such an image can destroy data. A
    /// leak is a cluster with a refcount that nothing references: it only wastes space. --repair
    /// rebuilds the refcounts (fixing leaks and refcount errors) and checks again.
    ///
    /// Exit status: 0 when the image is clean, 3 when it only leaks clusters, 2 when it is
    /// corrupt (or is not an image that can be checked), 1 when the host failed. With --repair
    /// the status describes the image after the repair.
    Check(check::Args),
}

/// Runs one subcommand and turns its outcome into the exit status.
pub fn run(command: ImgCommand) -> ExitCode {
    let result = match command {
        ImgCommand::Create(a) => create::run(a).map(|()| ExitCode::SUCCESS),
        ImgCommand::Info(a) => info::run(a).map(|()| ExitCode::SUCCESS),
        ImgCommand::Resize(a) => resize::run(a).map(|()| ExitCode::SUCCESS),
        ImgCommand::Overlay(a) => overlay::run(a).map(|()| ExitCode::SUCCESS),
        ImgCommand::Convert(a) => convert::run(a).map(|()| ExitCode::SUCCESS),
        ImgCommand::Check(a) => check::run(a),
    };
    result.unwrap_or_else(|e| {
        eprintln!("vmm img: {e:#}");
        ExitCode::from(if is_bad_input(&e) {
            EXIT_BAD_INPUT
        } else {
            EXIT_FAILED
        })
    })
}

/// An argument or file the user got wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// An error for input that cannot work.
pub fn bad(message: impl Into<String>) -> anyhow::Error {
    BadInput(message.into()).into()
}

/// True when anything in the chain of `e` blames the input rather than the host.
fn is_bad_input(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<BadInput>()
            || c.downcast_ref::<qcow::Error>()
                .is_some_and(qcow::Error::is_bad_input)
            || c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

/// An image format on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// The disk's bytes, as they are.
    Raw,
    /// QEMU copy-on-write v2/v3: sparse, with backing files.
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

/// How reports are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Text for people.
    #[default]
    Human,
    /// One JSON object, for programs.
    Json,
}

/// Fails unless `path` is an existing file (not a directory).
pub fn require_file(path: &Path) -> Result<()> {
    if !path.exists() {
        return Err(bad(format!("{}: no such file", path.display())));
    }
    if path.is_dir() {
        return Err(bad(format!(
            "{} is a directory, not an image",
            path.display()
        )));
    }
    Ok(())
}

/// Fails when `path` exists: new images never replace files.
pub fn refuse_existing(path: &Path) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        return Err(bad(format!(
            "{} already exists: refusing to overwrite it (remove it first)",
            path.display()
        )));
    }
    Ok(())
}

/// Opens the image at `path` as `format` (probed from its header when None).
pub fn open_image(path: &Path, format: Option<Format>, writable: bool) -> Result<Image> {
    require_file(path)?;
    let opts = OpenOptions {
        writable,
        format,
        direct: false,
        hook: None,
    };
    Image::open(path, &opts).context("opening the image")
}

/// Where the image at `image` finds its backing file `backing`: an absolute path as it is, a
/// relative one from the image's directory (how qemu and the `qcow` crate resolve it).
pub fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let backing = Path::new(backing);
    if backing.is_absolute() {
        return backing.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(backing),
        None => backing.to_path_buf(),
    }
}

/// The format of the backing file `backing` named by the new image `image`, from its header;
/// fails with a hint when the file is not where the image will look for it.
pub fn probe_backing(image: &Path, backing: &str) -> Result<Format> {
    let resolved = resolve_backing(image, backing);
    if !resolved.exists() {
        let hint = if Path::new(backing).is_relative() && Path::new(backing).exists() {
            format!(
                " (a relative backing path is resolved from the directory of {}, not from the \
                 current directory: give an absolute path, or one relative to that directory)",
                image.display()
            )
        } else {
            String::new()
        };
        return Err(bad(format!(
            "backing file {backing}: {} does not exist{hint}",
            resolved.display()
        )));
    }
    qcow::probe(&resolved).context("probing the backing file's format")
}

/// `n` bytes for people: "20 GiB", "1.5 MiB", "512 B".
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut v = n as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    // Three significant digits, like qemu-img.
    let text = if v >= 100.0 || unit == 0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text} {}", UNITS[unit])
}

/// A size in bytes with its human form: "20 GiB (21474836480 bytes)".
pub fn size_both(n: u64) -> String {
    format!("{} ({n} bytes)", human_size(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(196 << 10), "196 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(20 << 30), "20 GiB");
        assert_eq!(human_size(1023 << 20), "1023 MiB");
        assert_eq!(human_size(u64::MAX), "16 EiB");
        assert_eq!(size_both(1 << 30), "1 GiB (1073741824 bytes)");
    }

    #[test]
    fn backing_paths_resolve_from_the_image_directory() {
        assert_eq!(
            resolve_backing(Path::new("/vms/a/disk.qcow2"), "base.raw"),
            PathBuf::from("/vms/a/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("/vms/a/disk.qcow2"), "../base.raw"),
            PathBuf::from("/vms/a/../base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("disk.qcow2"), "/img/base.raw"),
            PathBuf::from("/img/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("disk.qcow2"), "base.raw"),
            PathBuf::from("base.raw")
        );
    }

    #[test]
    fn errors_blame_input_or_host() {
        assert!(is_bad_input(&bad("x").context("doing y")));
        let nf = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(is_bad_input(&anyhow::Error::from(nf).context("z")));
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(!is_bad_input(&anyhow::Error::from(eio)));
    }
}
