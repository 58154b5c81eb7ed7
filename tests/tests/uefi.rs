//! UEFI boot: `vmm --firmware` starts lightbyte's own firmware, which boots real EFI boot
//! loaders nobody here wrote (systemd-boot, GRUB, the kernel's own EFI stub) from GPT disks
//! built by `tests/guest/build-efi-disks.sh`. One scenario in the test host runs every boot.

use std::time::Duration;

use lightbyte_tests::artifacts;
use lightbyte_tests::guest::{jail_args, BootResult, Scenario};
use lightbyte_tests::testhost;

const MINIMAL: &str = "kernel=6.1.192-lightbyte";
const DEBIAN: &str = "-cloud-amd64 cpus=2";

fn args(firmware: &str, disk: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = jail_args().into();
    a.extend(
        [
            "--firmware",
            firmware,
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--serial",
            "stdout",
            "--disk",
            disk,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn assert_booted(r: &BootResult, label: &str, kernel: &str, loader_says: &str) {
    let out = &r.output;
    assert!(
        out.contains("lightbyte-firmware: starting the default boot loader"),
        "{label}: the firmware did not start the loader:\n{out}"
    );
    assert!(
        out.contains(loader_says),
        "{label}: no {loader_says:?}:\n{out}"
    );
    let up = out
        .lines()
        .find(|l| l.contains("LIGHTBYTE-GUEST-UP"))
        .unwrap_or_else(|| panic!("{label}: the guest did not reach init:\n{out}"));
    assert!(up.contains(kernel), "{label}: wrong kernel: {up}");
    assert!(up.contains("cpus=2"), "{label}: not both vCPUs: {up}");
    // The guest powers off through the firmware's ResetSystem (Linux prefers it on
    // hardware-reduced ACPI): the VMM must see the power-off and exit 0.
    assert_eq!(r.status, 0, "{label}: vmm exit status:\n{out}");
}

fn assert_refused(r: &BootResult, label: &str, why: &str) {
    let out = &r.output;
    assert!(out.contains(why), "{label}: no {why:?}:\n{out}");
    assert!(
        out.contains("lightbyte-firmware: boot failed: nothing to boot"),
        "{label}: no failure line:\n{out}"
    );
    assert_ne!(r.status, 0, "{label}: vmm exited 0:\n{out}");
    assert_ne!(r.status, 124, "{label}: hung until the timeout:\n{out}");
}

#[test]
fn firmware_boots_systemd_boot_grub_and_the_efi_stub() {
    let host = testhost::shared().unwrap();
    let a = artifacts::get().unwrap();
    let fw = a.firmware.display().to_string();
    let disk = |name: &str| format!("path={}/{name}.img,readonly=on", a.efi_disks.display());
    let mut s = Scenario::new(host, "uefi").unwrap();
    let vmm = lightbyte_tests::paths::binary("vmm").unwrap();
    let overlay_of = |s: &mut Scenario, base: &str| {
        let overlay = s.dir().join(format!("{base}-overlay.qcow2"));
        s.shell(&format!(
            "{} img overlay {}/{base}.img {} >/dev/null",
            vmm.display(),
            a.efi_disks.display(),
            overlay.display()
        ));
        format!("path={}", overlay.display())
    };
    let overlay = overlay_of(&mut s, "sdboot");
    // GRUB gets a writable raw copy: it saves its environment block through our Block I/O.
    let grub_rw = s.dir().join("grub-rw.img");
    s.shell(&format!(
        "cp --sparse=always {}/grub.img {}",
        a.efi_disks.display(),
        grub_rw.display()
    ));
    let upgrade = overlay_of(&mut s, "upgrade");
    let t = 240;
    s.vmm("sdboot", &args(&fw, &disk("sdboot"), &[]), t)
        .unwrap()
        .vmm("sdboot-debian", &args(&fw, &disk("sdboot-debian"), &[]), t)
        .unwrap()
        .vmm(
            "stub",
            &args(
                &fw,
                &disk("stub"),
                &["--cmdline", "console=ttyS0 panic=-1 initrd=\\initrd"],
            ),
            t,
        )
        .unwrap()
        .vmm(
            "grub",
            &args(&fw, &format!("path={}", grub_rw.display()), &[]),
            t,
        )
        .unwrap()
        .vmm("menu-timeout", &args(&fw, &disk("menu"), &[]), t)
        .unwrap()
        .vmm("qcow2-overlay", &args(&fw, &overlay, &[]), t)
        .unwrap()
        // The guest installs a new kernel on its own disk and reboots; the next start of the
        // same disk boots the new kernel.
        .vmm("upgrade-before", &args(&fw, &upgrade, &[]), t)
        .unwrap()
        .vmm("upgrade-after", &args(&fw, &upgrade, &[]), t)
        .unwrap()
        .vmm("no-esp", &args(&fw, &disk("noesp"), &[]), 60)
        .unwrap()
        .vmm("corrupt-gpt", &args(&fw, &disk("corrupt"), &[]), 60)
        .unwrap()
        .vmm("blank", &args(&fw, &disk("blank"), &[]), 60)
        .unwrap();
    // What GRUB wrote: the environment file on the ext4 partition (partition 2) of its disk.
    let grubenv = s.dir().join("grubenv.txt");
    s.shell(&format!(
        "img={img}; first=$(sgdisk -i 2 $img | awk '/First sector/ {{print $3}}'); \
         dd if=$img of=$img.p2 bs=512 skip=$first status=none; \
         debugfs -R 'cat /boot/grub/grubenv' $img.p2 > {out} 2>/dev/null; rm -f $img.p2",
        img = grub_rw.display(),
        out = grubenv.display()
    ));
    let r = s.run(host, Duration::from_secs(1800)).unwrap();

    // systemd-boot picks loader.conf's default entry and hands the kernel its initrd through
    // the LoadFile2 device path it installs with our protocol services.
    let sd_initrd = "EFI stub: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path";
    assert_booted(&r["sdboot"], "sdboot", MINIMAL, sd_initrd);
    assert_booted(&r["sdboot-debian"], "sdboot-debian", DEBIAN, sd_initrd);
    // The EFI stub alone: our load options are its command line, and it reads initrd= from
    // the ESP through our Simple File System.
    assert_booted(
        &r["stub"],
        "stub",
        MINIMAL,
        "EFI stub: Loaded initrd from command line option",
    );
    // GRUB reads the GPT itself through Block I/O and loads the kernel from ext4.
    assert_booted(
        &r["grub"],
        "grub",
        MINIMAL,
        "lightbyte: grub loading kernel",
    );
    assert!(r["grub"].output.contains("Welcome to GRUB!"));
    let env = std::fs::read_to_string(&grubenv).unwrap();
    assert!(
        env.contains("lightbyte_saved=grub-wrote-this"),
        "GRUB's save_env did not reach the disk: {env:?}"
    );
    assert_booted(&r["qcow2-overlay"], "qcow2-overlay", MINIMAL, sd_initrd);
    // A menu with a timeout: systemd-boot counts down on our timer events (WaitForEvent on a
    // timer and the console's key event) and boots the default entry when it runs out.
    let menu = &r["menu-timeout"];
    assert_booted(menu, "menu-timeout", MINIMAL, sd_initrd);
    assert!(
        menu.output.contains("Boot in 2 s"),
        "no countdown:\n{}",
        menu.output
    );
    let at = |what: &str| -> u64 {
        menu.output
            .lines()
            .find_map(|l| {
                l.split(what)
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {what:?} line:\n{}", menu.output))
    };
    let waited = at("ExitBootServices at ") - at(") at ");
    assert!(
        waited >= 2000,
        "booted after {waited} ms, before its 2 s timeout"
    );

    let before = &r["upgrade-before"];
    assert!(
        before.output.contains("LIGHTBYTE-KERNEL-INSTALLED") && before.cmd_exit() == Some(0),
        "upgrade-before: the guest did not install its kernel:\n{}",
        before.output
    );
    assert!(before.output.contains(MINIMAL), "{}", before.output);
    // vmm's exit status for a guest reboot.
    assert_eq!(before.status, 3, "upgrade-before:\n{}", before.output);
    assert_booted(&r["upgrade-after"], "upgrade-after", DEBIAN, sd_initrd);

    assert_refused(
        &r["no-esp"],
        "no-esp",
        "disk 0 (PCI 01.0): no EFI system partition in its GPT",
    );
    assert_refused(
        &r["corrupt-gpt"],
        "corrupt-gpt",
        "disk 0 (PCI 01.0): GPT header CRC mismatch",
    );
    assert_refused(&r["blank"], "blank", "disk 0 (PCI 01.0): no GPT signature");
}
