//! Shell commands that run a fio job file in a guest under vmm or under QEMU, against one
//! benchmark disk, with identical guests (same kernel, fio root filesystem, memory, vCPUs).

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
    /// variable) of `format`, console to `log`.
    pub fn vmm(&self, job: &str, disk: &str, format: &str, log: &str) -> String {
        format!(
            "timeout {t} {vmm} --kernel {k} --memory 512M --cmdline {c} \
             --disk path={root},readonly=on,format=raw --disk path={disk},format={format},direct=on \
             > {log} 2>&1\n",
            t = self.timeout,
            vmm = sh_quote(&self.vmm),
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
