//! The UEFI rows of the boot benchmark: the same kernel (the minimal bzImage, whose EFI stub the
//! loaders start) and initramfs booted directly by `vmm`, by `vmm --firmware` through
//! systemd-boot on a GPT disk, and by QEMU (-M pc, KVM) through Debian's OVMF from the same disk.
//! The disks get a loader entry carrying exactly the direct boot's command line.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use lightbyte_tests::artifacts::Artifacts;
use lightbyte_tests::guest::Boot;
use lightbyte_tests::paths::binary;

use crate::peers::{Contender, IDLE};

/// Debian's OVMF (package `ovmf`): code and the variable store template.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A copy of the systemd-boot disk whose default entry boots the minimal kernel with `cmdline`.
fn disk_with_entry(a: &Artifacts, dir: &Path, name: &str, cmdline: &str) -> Result<PathBuf> {
    let disk = dir.join(format!("{name}.img"));
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(a.efi_disks.join("sdboot.img"))
        .arg(&disk))?;
    let entry = dir.join(format!("{name}.conf"));
    fs::write(
        &entry,
        format!("title bench\nlinux /minimal/vmlinuz\ninitrd /minimal/initrd\noptions {cmdline}\n"),
    )?;
    let loader = dir.join(format!("{name}-loader.conf"));
    fs::write(&loader, "timeout 0\ndefault bench.conf\n")?;
    let esp = format!("{}@@1M", disk.display());
    run(Command::new("mcopy")
        .args(["-o", "-i", &esp])
        .arg(&entry)
        .arg("::/loader/entries/bench.conf"))?;
    run(Command::new("mcopy")
        .args(["-o", "-i", &esp])
        .arg(&loader)
        .arg("::/loader/loader.conf"))?;
    Ok(disk)
}

fn vmm_uefi(a: &Artifacts, memory_mib: u64, disk: &Path) -> Result<Vec<String>> {
    Ok(vec![
        binary("vmm")?.display().to_string(),
        "--firmware".into(),
        a.firmware.display().to_string(),
        "--memory".into(),
        format!("{memory_mib}M"),
        "--disk".into(),
        format!("path={},readonly=on", disk.display()),
    ])
}

/// QEMU through OVMF. Each boot starts from a fresh copy of OVMF's variable store (`vars`,
/// overwritten in the same shell that execs QEMU: a copy of 128 KiB, in the timed span). The
/// machine is `pc` (i440fx): OVMF on q35 aborts the test host's own QEMU 7.2 (TCG asserts in
/// tcg_handle_interrupt) on the second nested boot, which i440fx never did in our runs.
fn qemu_ovmf(memory_mib: u64, disk: &Path, vars: &Path) -> Vec<String> {
    let qemu = format!(
        "qemu-system-x86_64 -M pc -enable-kvm -cpu host -smp 1 -nodefaults -no-user-config \
         -no-reboot -display none -serial stdio -m {memory_mib}M \
         -drive if=pflash,format=raw,readonly=on,file={OVMF_CODE} \
         -drive if=pflash,format=raw,file={vars} \
         -drive file={disk},format=raw,if=virtio,readonly=on",
        vars = vars.display(),
        disk = disk.display(),
    );
    vec![
        "sh".into(),
        "-c".into(),
        format!("cp {OVMF_VARS} {} && exec {qemu}", vars.display()),
    ]
}

/// vmm booting the bzImage directly (the kernel the UEFI rows boot).
fn vmm_direct(a: &Artifacts, memory_mib: u64, idle: bool) -> Result<Vec<String>> {
    let mut boot = Boot::new(&a.minimal_bzimage)?
        .memory(&format!("{memory_mib}M"))
        .unjailed();
    if idle {
        boot = boot.run(IDLE);
    }
    let mut cmd = vec![binary("vmm")?.display().to_string()];
    cmd.extend(boot.args());
    Ok(cmd)
}

/// The rows: vmm direct (bzImage), vmm --firmware, QEMU + OVMF; disks written to `dir`.
pub fn contenders(a: &Artifacts, dir: &Path, memory_mib: u64) -> Result<Vec<Contender>> {
    fs::create_dir_all(dir)?;
    let timed_cmdline = Boot::new(&a.minimal_bzimage)?.full_cmdline();
    let idle_cmdline = Boot::new(&a.minimal_bzimage)?.run(IDLE).full_cmdline();
    let timed = disk_with_entry(a, dir, "bench-timed", &timed_cmdline)?;
    let idle = disk_with_entry(a, dir, "bench-idle", &idle_cmdline)?;
    Ok(vec![
        Contender {
            label: "vmm-direct",
            name: "lightbyte vmm, direct (bzImage)",
            timed: vmm_direct(a, memory_mib, false)?,
            idle: vmm_direct(a, memory_mib, true)?,
        },
        Contender {
            label: "vmm-uefi",
            name: "lightbyte vmm --firmware (systemd-boot)",
            timed: vmm_uefi(a, memory_mib, &timed)?,
            idle: vmm_uefi(a, memory_mib, &idle)?,
        },
        Contender {
            label: "qemu-ovmf",
            name: "QEMU -M pc + OVMF (systemd-boot)",
            timed: qemu_ovmf(memory_mib, &timed, &dir.join("ovmf-vars-timed.fd")),
            idle: qemu_ovmf(memory_mib, &idle, &dir.join("ovmf-vars-idle.fd")),
        },
    ])
}
