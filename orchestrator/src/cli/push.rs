//! `lightbyte image push`: checks the disk's stated format against its content, hashes the
//! disk and its boot files, uploads what the server does not have yet, and gives the Image spec
//! that names them by digest.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use orchestrator::images::upload::{digest_of, remote_size, upload};
use orchestrator::images::{format_mismatch, Digest};
use orchestrator::model::{ByteSize, DiskFormat, ImageSpec};

/// What to push.
pub struct Files {
    pub disk: PathBuf,
    pub format: DiskFormat,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub boot: orchestrator::model::ImageBoot,
}

/// Uploads the files to the server at `base`; the spec naming them.
pub async fn push(base: &str, files: &Files) -> Result<ImageSpec> {
    let size = disk_size(&files.disk, files.format)?;
    let disk = send(base, &files.disk).await?;
    let kernel = match &files.kernel {
        Some(k) => Some(send(base, k).await?.to_string()),
        None => None,
    };
    let initramfs = match &files.initramfs {
        Some(i) => Some(send(base, i).await?.to_string()),
        None => None,
    };
    Ok(ImageSpec {
        digest: Some(disk.to_string()),
        path: None,
        format: files.format,
        size: Some(ByteSize(size)),
        kernel,
        initramfs,
        cmdline: files.cmdline.clone(),
        boot: files.boot,
    })
}

/// The disk's virtual size, once its content matches `format` (checked, never guessed).
fn disk_size(path: &Path, format: DiskFormat) -> Result<u64> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let mut head = Vec::new();
    file.take(2 << 20).read_to_end(&mut head)?;
    if let Some(why) = format_mismatch(format, &head) {
        bail!("{} {why}", path.display());
    }
    Ok(match format {
        DiskFormat::Raw => len,
        DiskFormat::Qcow2 => {
            qcow::header::Header::parse(path, &head, len)
                .with_context(|| format!("{} is not a valid qcow2 image", path.display()))?
                .size
        }
    })
}

/// Uploads `path` unless the server has its blob already; its digest.
async fn send(base: &str, path: &Path) -> Result<Digest> {
    let d = digest_of(path)
        .await
        .with_context(|| format!("hashing {}", path.display()))?;
    match remote_size(base, &d).await? {
        Some(_) => eprintln!("{}: {d} is in the image store already", path.display()),
        None => {
            let n = upload(base, &d, path).await?;
            eprintln!("{}: {d} uploaded ({n} bytes)", path.display());
        }
    }
    Ok(d)
}
