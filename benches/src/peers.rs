//! The VMMs a boot comparison runs, each with the same kernel, initramfs and command line:
//! lightbyte's `vmm`, QEMU (-M microvm, KVM) and, when the environment names their binaries
//! (`FIRECRACKER=`, `CLOUD_HYPERVISOR=`; `benches/build-peers.sh` builds them), Firecracker and
//! Cloud Hypervisor.

use std::fs;
use std::path::Path;

use anyhow::Result;
use lightbyte_tests::artifacts::Artifacts;
use lightbyte_tests::guest::Boot;
use lightbyte_tests::paths::binary;

/// One VMM of the comparison.
pub struct Contender {
    /// Label in the results files.
    pub label: &'static str,
    /// Name in the table.
    pub name: &'static str,
    /// Command booting the guest that powers off after its marker.
    pub timed: Vec<String>,
    /// Command booting the guest that stays up after its marker.
    pub idle: Vec<String>,
}

/// What the guest runs after its marker in memory runs: nothing, for longer than a run lasts.
const IDLE: &str = "sleep 3600";

pub fn vmm_cmd(a: &Artifacts, memory_mib: u64, idle: bool) -> Result<Vec<String>> {
    let mut boot = Boot::new(&a.minimal_vmlinux)?.memory(&format!("{memory_mib}M"));
    if idle {
        boot = boot.run(IDLE);
    }
    let mut cmd = vec![binary("vmm")?.display().to_string()];
    cmd.extend(boot.args());
    Ok(cmd)
}

/// The kernel command line every peer gets: the one vmm gets.
fn cmdline(a: &Artifacts, idle: bool) -> Result<String> {
    let boot = Boot::new(&a.minimal_vmlinux)?;
    Ok(if idle { boot.run(IDLE) } else { boot }.full_cmdline())
}

fn qemu_cmd(a: &Artifacts, memory_mib: u64, cmdline: String) -> Vec<String> {
    let mut cmd: Vec<String> = [
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cmd.extend([
        "-m".into(),
        format!("{memory_mib}M"),
        "-kernel".into(),
        a.minimal_vmlinux.display().to_string(),
        "-initrd".into(),
        a.initramfs.display().to_string(),
        "-append".into(),
        cmdline,
    ]);
    cmd
}

/// Firecracker from its configuration file (written to `dir`), no API socket. It has no ACPI
/// power-off: the guest ends with a keyboard-controller reset (`reboot=k`, `lbend=reboot`), on
/// which Firecracker exits.
fn firecracker_cmd(
    fc: &str,
    a: &Artifacts,
    memory_mib: u64,
    cmdline: String,
    config: &Path,
) -> Result<Vec<String>> {
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": a.minimal_vmlinux,
            "initrd_path": a.initramfs,
            "boot_args": format!("{cmdline} lbend=reboot"),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": memory_mib },
        "drives": [],
    });
    fs::write(config, serde_json::to_vec_pretty(&cfg)?)?;
    Ok(vec![
        fc.into(),
        "--no-api".into(),
        "--config-file".into(),
        config.display().to_string(),
        "--level".into(),
        "Error".into(),
    ])
}

/// Cloud Hypervisor; it exits on the guest's ACPI power-off.
fn cloud_hypervisor_cmd(ch: &str, a: &Artifacts, memory_mib: u64, cmdline: String) -> Vec<String> {
    vec![
        ch.into(),
        "--kernel".into(),
        a.minimal_vmlinux.display().to_string(),
        "--initramfs".into(),
        a.initramfs.display().to_string(),
        "--cmdline".into(),
        cmdline,
        "--cpus".into(),
        "boot=1".into(),
        "--memory".into(),
        format!("size={memory_mib}M"),
        "--serial".into(),
        "tty".into(),
        "--console".into(),
        "off".into(),
    ]
}

/// The VMMs to compare: vmm and QEMU always, the peers whose binaries the environment names.
pub fn contenders(a: &Artifacts, dir: &Path, memory_mib: u64) -> Result<Vec<Contender>> {
    let (timed, idle) = (cmdline(a, false)?, cmdline(a, true)?);
    let mut out = vec![
        Contender {
            label: "vmm",
            name: "lightbyte vmm",
            timed: vmm_cmd(a, memory_mib, false)?,
            idle: vmm_cmd(a, memory_mib, true)?,
        },
        Contender {
            label: "qemu",
            name: "QEMU -M microvm (KVM)",
            timed: qemu_cmd(a, memory_mib, timed.clone()),
            idle: qemu_cmd(a, memory_mib, idle.clone()),
        },
    ];
    if let Some(fc) = std::env::var("FIRECRACKER").ok().filter(|v| !v.is_empty()) {
        fs::create_dir_all(dir)?;
        out.push(Contender {
            label: "firecracker",
            name: "Firecracker",
            timed: firecracker_cmd(
                &fc,
                a,
                memory_mib,
                timed.clone(),
                &dir.join("fc-timed.json"),
            )?,
            idle: firecracker_cmd(&fc, a, memory_mib, idle.clone(), &dir.join("fc-idle.json"))?,
        });
    }
    if let Some(ch) = std::env::var("CLOUD_HYPERVISOR")
        .ok()
        .filter(|v| !v.is_empty())
    {
        out.push(Contender {
            label: "ch",
            name: "Cloud Hypervisor",
            timed: cloud_hypervisor_cmd(&ch, a, memory_mib, timed.clone()),
            idle: cloud_hypervisor_cmd(&ch, a, memory_mib, idle.clone()),
        });
    }
    Ok(out)
}
