//! Shell commands that run a fio job file in a guest under vmm, QEMU, Firecracker or Cloud
//! Hypervisor, against one benchmark disk, with identical guests (same kernel, fio root
//! filesystem, memory, vCPUs).

use base64::Engine;
use lightbyte_tests::guest::sh_quote;

/// What both VMMs boot.
pub struct GuestFio {
    /// vmm binary.
    pub vmm: String,
    /// Guest kernel (ELF vmlinux).
    pub vmlinux: String,
    /// The fio root filesystem image (raw, ext4).
    pub rootfs: String,
    /// Seconds before a run is killed.
    pub timeout: u32,
}

impl GuestFio {
    fn cmdline(job: &str) -> String {
        let enc = base64::engine::general_purpose::STANDARD.encode(job);
        format!(
            "console=ttyS0 quiet reboot=k panic=1 nmi_watchdog=0 root=/dev/vda ro init=/init lbfio64={enc}"
        )
    }

    /// Runs `job` (fio job file for /dev/vdb) under vmm with `disk` (shell-quoted path or
    /// variable) of `format`, opened with O_DIRECT, console to `log`.
    pub fn vmm(&self, job: &str, disk: &str, format: &str, log: &str) -> String {
        self.vmm_with(job, &format!("{disk},format={format},direct=on"), log)
    }

    /// The same through the host's page cache (no O_DIRECT), as Firecracker always runs.
    pub fn vmm_cached(&self, job: &str, disk: &str, log: &str) -> String {
        self.vmm_with(job, &format!("{disk},format=raw"), log)
    }

    fn vmm_with(&self, job: &str, disk: &str, log: &str) -> String {
        format!(
            "timeout {t} {vmm} --kernel {k} --memory 512M --cmdline {c} \
             --disk path={root},readonly=on,format=raw --disk path={disk} > {log} 2>&1\n",
            t = self.timeout,
            vmm = sh_quote(&self.vmm),
            k = sh_quote(&self.vmlinux),
            c = sh_quote(&Self::cmdline(job)),
            root = self.rootfs,
        )
    }

    /// The same under Firecracker (`fc`), raw `disk` only: its configuration is written to
    /// `config` by the script (a here-document, so `disk` may be a shell variable). Firecracker
    /// has no O_DIRECT: its disk goes through the host's page cache, on its io_uring engine.
    /// It has no ACPI power-off, so the guest ends with a reset (`lbend=reboot`).
    pub fn firecracker(&self, fc: &str, job: &str, disk: &str, config: &str, log: &str) -> String {
        let drive = |id: &str, path: &str, read_only: bool| {
            serde_json::json!({
                "drive_id": id, "path_on_host": path, "is_root_device": false,
                "is_read_only": read_only, "io_engine": "Async",
            })
        };
        let cfg = serde_json::json!({
            "boot-source": {
                "kernel_image_path": self.vmlinux,
                "boot_args": format!("{} lbend=reboot", Self::cmdline(job)),
            },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 512 },
            "drives": [drive("root", &self.rootfs, true), drive("bench", disk, false)],
        });
        format!(
            "cat > {config} <<FCCONFIG\n{cfg:#}\nFCCONFIG\n\
             timeout {t} {fc} --no-api --config-file {config} --level Error > {log} 2>&1\n",
            t = self.timeout,
            fc = sh_quote(fc),
        )
    }

    /// The same under Cloud Hypervisor (`ch`; virtio-blk-pci, `direct=on`), raw `disk` only.
    /// Its own log lines go to `LOG.err`: they would land inside fio's JSON. The image type is
    /// given: an autodetected raw image refuses writes to sector 0.
    pub fn cloud_hypervisor(&self, ch: &str, job: &str, disk: &str, log: &str) -> String {
        format!(
            "timeout {t} {ch} --kernel {k} --cmdline {c} --cpus boot=1 --memory size=512M \
             --disk path={root},readonly=on,image_type=raw path={disk},direct=on,image_type=raw \
             --serial tty --console off > {log} 2> {log}.err\n",
            t = self.timeout,
            ch = sh_quote(ch),
            k = sh_quote(&self.vmlinux),
            c = sh_quote(&Self::cmdline(job)),
            root = self.rootfs,
        )
    }

    /// The same under QEMU (q35, virtio-blk-pci, cache=none, aio=io_uring).
    pub fn qemu(&self, job: &str, disk: &str, format: &str, log: &str) -> String {
        format!(
            "timeout {t} qemu-system-x86_64 -M q35 -accel kvm -cpu host \
             -smp 1 -m 512M -nodefaults -no-user-config -no-reboot -display none -serial stdio \
             -kernel {k} -append {c} \
             -drive if=none,id=root,file={root},format=raw,readonly=on \
             -device virtio-blk-pci,drive=root \
             -drive if=none,id=bench,file={disk},format={format},cache=none,aio=io_uring \
             -device virtio-blk-pci,drive=bench > {log} 2>&1\n",
            t = self.timeout,
            k = sh_quote(&self.vmlinux),
            c = sh_quote(&Self::cmdline(job)),
            root = self.rootfs,
        )
    }
}
