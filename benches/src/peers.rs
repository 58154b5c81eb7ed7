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
pub const IDLE: &str = "sleep 3600";

/// The guest's boot description: the test command line plus `extra` parameters (appended, so
/// they win over earlier ones such as `quiet`), staying up after its marker when `idle`.
fn boot(a: &Artifacts, idle: bool, extra: &str) -> Result<Boot> {
    let mut boot = Boot::new(&a.minimal_vmlinux)?;
    if !extra.is_empty() {
        boot = boot.param(extra);
    }
    Ok(if idle { boot.run(IDLE) } else { boot })
}

/// `vmm` booting the guest; `jailed` adds its jail (the worker's default), which the peers,
/// run without Firecracker's jailer, do not have.
pub fn vmm_cmd(
    a: &Artifacts,
    memory_mib: u64,
    idle: bool,
    jailed: bool,
    extra: &str,
) -> Result<Vec<String>> {
    let mut boot = boot(a, idle, extra)?.memory(&format!("{memory_mib}M"));
    if !jailed {
        boot = boot.unjailed();
    }
    let mut cmd = vec![binary("vmm")?.display().to_string()];
    cmd.extend(boot.args());
    Ok(cmd)
}

/// The kernel command line every peer gets: the one vmm gets.
fn cmdline(a: &Artifacts, idle: bool, extra: &str) -> Result<String> {
    Ok(boot(a, idle, extra)?.full_cmdline())
}

/// QEMU `-M microvm` with KVM booting the test kernel and initramfs; its console on stdout.
pub fn qemu_cmd(a: &Artifacts, memory_mib: u64, cmdline: String) -> Vec<String> {
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

/// Firecracker from its configuration file (written to `config`), no API socket; with `net`,
/// a virtio-net device on that TAP with that MAC. It has no ACPI power-off: the guest ends
/// with a keyboard-controller reset (`reboot=k`, `lbend=reboot`), on which Firecracker exits.
pub fn firecracker_cmd(
    fc: &str,
    a: &Artifacts,
    memory_mib: u64,
    cmdline: String,
    config: &Path,
    net: Option<(&str, &str)>,
) -> Result<Vec<String>> {
    let interfaces: Vec<serde_json::Value> = net
        .map(|(tap, mac)| {
            serde_json::json!({"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac})
        })
        .into_iter()
        .collect();
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": a.minimal_vmlinux,
            "initrd_path": a.initramfs,
            "boot_args": format!("{cmdline} lbend=reboot"),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": memory_mib },
        "drives": [],
        "network-interfaces": interfaces,
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

/// Cloud Hypervisor; it exits on the guest's ACPI power-off. Its console on stdout.
pub fn cloud_hypervisor_cmd(
    ch: &str,
    a: &Artifacts,
    memory_mib: u64,
    cmdline: String,
) -> Vec<String> {
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

/// The VMMs to compare: vmm (first, without and then with its jail) and QEMU always, the peers
/// whose binaries the environment names, and another `vmm` binary to measure a change against
/// (`VMM_BASELINE=`, run as the first row is); `extra` kernel parameters are appended for all.
pub fn contenders(
    a: &Artifacts,
    dir: &Path,
    memory_mib: u64,
    extra: &str,
) -> Result<Vec<Contender>> {
    let (timed, idle) = (cmdline(a, false, extra)?, cmdline(a, true, extra)?);
    let mut out = vec![
        Contender {
            label: "vmm",
            name: "lightbyte vmm",
            timed: vmm_cmd(a, memory_mib, false, false, extra)?,
            idle: vmm_cmd(a, memory_mib, true, false, extra)?,
        },
        Contender {
            label: "vmm-jailed",
            name: "lightbyte vmm --jail",
            timed: vmm_cmd(a, memory_mib, false, true, extra)?,
            idle: vmm_cmd(a, memory_mib, true, true, extra)?,
        },
        Contender {
            label: "qemu",
            name: "QEMU -M microvm (KVM)",
            timed: qemu_cmd(a, memory_mib, timed.clone()),
            idle: qemu_cmd(a, memory_mib, idle.clone()),
        },
    ];
    if let Some(baseline) = std::env::var("VMM_BASELINE").ok().filter(|v| !v.is_empty()) {
        let with_baseline = |mut cmd: Vec<String>| {
            cmd[0] = baseline.clone();
            cmd
        };
        out.push(Contender {
            label: "vmm-baseline",
            name: "lightbyte vmm (VMM_BASELINE)",
            timed: with_baseline(vmm_cmd(a, memory_mib, false, false, extra)?),
            idle: with_baseline(vmm_cmd(a, memory_mib, true, false, extra)?),
        });
    }
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
                None,
            )?,
            idle: firecracker_cmd(
                &fc,
                a,
                memory_mib,
                idle.clone(),
                &dir.join("fc-idle.json"),
                None,
            )?,
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
