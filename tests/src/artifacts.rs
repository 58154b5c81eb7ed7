//! Guest kernels and initramfs, produced by the repository's own scripts (cached outside the clone
//! keyed by their recipe, so only the first run on a machine builds anything).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::paths::repo_root;

/// Paths of everything a guest boot needs.
#[derive(Clone, Debug)]
pub struct Artifacts {
    /// Minimal kernel, ELF with a PVH entry point.
    pub minimal_vmlinux: PathBuf,
    /// The same minimal kernel as a bzImage.
    pub minimal_bzimage: PathBuf,
    /// Debian's stock cloud kernel (bzImage; virtio drivers are modules in the initramfs).
    pub debian_bzimage: PathBuf,
    /// The test initramfs (busybox init that runs `lbcmd`).
    pub initramfs: PathBuf,
    /// Test host kernel.
    pub testhost_kernel: PathBuf,
    /// Test host initramfs.
    pub testhost_initramfs: PathBuf,
    /// lightbyte's UEFI firmware (firmware/build.sh).
    pub firmware: PathBuf,
    /// GPT disks with EFI boot loaders (tests/guest/build-efi-disks.sh): sdboot.img,
    /// sdboot-debian.img, stub.img, grub.img, noesp.img, corrupt.img, blank.img.
    pub efi_disks: PathBuf,
}

/// Runs one of the repository's build scripts and returns the lines it printed.
pub fn run_script(relative: &str, args: &[&str]) -> Result<Vec<String>> {
    let script = repo_root().join(relative);
    eprintln!("lightbyte-tests: running {relative} (cached after the first run)");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed with {}", script.display(), out.status);
    }
    Ok(String::from_utf8(out.stdout)
        .context("script output is not UTF-8")?
        .lines()
        .map(str::to_string)
        .collect())
}

fn one_path(lines: &[String], what: &str) -> Result<PathBuf> {
    let line = lines
        .last()
        .with_context(|| format!("{what}: build script printed nothing"))?;
    let p = PathBuf::from(line);
    if !p.exists() {
        bail!("{what}: {} does not exist", p.display());
    }
    Ok(p)
}

fn build() -> Result<Artifacts> {
    let kernel_dir = one_path(&run_script("tests/guest/build-kernel.sh", &[])?, "kernel")?;
    let debian = one_path(
        &run_script("tests/guest/fetch-debian-kernel.sh", &["cloud-amd64"])?,
        "debian kernel",
    )?;
    let initramfs = one_path(
        &run_script("tests/guest/build-initramfs.sh", &[])?,
        "initramfs",
    )?;
    let host = run_script("tests/testhost/build.sh", &[])?;
    let [kernel, initrd] = host.as_slice() else {
        bail!("tests/testhost/build.sh printed {host:?}, expected two paths");
    };
    let firmware = one_path(&run_script("firmware/build.sh", &[])?, "firmware")?;
    let bzimage = kernel_dir.join("bzImage");
    let debian_bzimage = debian.join("vmlinuz");
    let efi_disks = one_path(
        &run_script(
            "tests/guest/build-efi-disks.sh",
            &[
                &bzimage.display().to_string(),
                &initramfs.display().to_string(),
                &debian_bzimage.display().to_string(),
            ],
        )?,
        "EFI disks",
    )?;
    Ok(Artifacts {
        firmware,
        efi_disks,
        minimal_vmlinux: kernel_dir.join("vmlinux"),
        minimal_bzimage: bzimage,
        debian_bzimage,
        initramfs,
        testhost_kernel: PathBuf::from(kernel),
        testhost_initramfs: PathBuf::from(initrd),
    })
}

/// The artifacts, built (or found in the cache) once per process.
pub fn get() -> Result<&'static Artifacts> {
    static CELL: OnceLock<Result<Artifacts, String>> = OnceLock::new();
    CELL.get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("building guest artifacts: {e}"))
}
