//! Whole-VM boot tests: `vmm` boots real kernels (in the test host on machines without VMX/SVM)
//! and we assert on what the guests printed and how `vmm` exited. One scenario boots every guest,
//! so the test host starts once.

use std::time::Duration;

use lightbyte_tests::artifacts;
use lightbyte_tests::guest::{Boot, Scenario};
use lightbyte_tests::testhost;

/// Value of `key:` in /proc/meminfo output, in kB.
fn meminfo_kb(output: &str, key: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not in output:\n{output}"))
}

#[test]
fn guests_boot_run_commands_and_exit_cleanly() {
    let host = testhost::shared().unwrap();
    let a = artifacts::get().unwrap();
    let mut s = Scenario::new(host, "boot").unwrap();
    let serial_file = s.dir().join("serial.txt");

    let meminfo =
        "grep -E '^(MemTotal|DirectMap)' /proc/meminfo; cat /sys/devices/system/cpu/online";
    s.boot(
        "pvh-2cpu-1g",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .cpus(2)
            .memory("1G")
            .run(meminfo),
    )
    .unwrap();
    s.boot(
        "pvh-5g-above-4g",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .memory("5G")
            .run(meminfo),
    )
    .unwrap();
    s.boot(
        "bzimage-minimal",
        &Boot::new(&a.minimal_bzimage).unwrap().run("uname -r"),
    )
    .unwrap();
    s.boot(
        "bzimage-debian-2cpu",
        &Boot::new(&a.debian_bzimage)
            .unwrap()
            .cpus(2)
            .run("uname -r; nproc; lsmod | grep -c '^virtio'; date +%Y; ls /sys/bus/pci/devices"),
    )
    .unwrap();
    s.boot(
        "reboot-kbd",
        &Boot::new(&a.minimal_vmlinux).unwrap().run("reboot -f"),
    )
    .unwrap();
    s.boot(
        "reboot-bios-fallback",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .param("reboot=b")
            .run("reboot -f"),
    )
    .unwrap();
    s.boot(
        "panic",
        &Boot::new(&a.minimal_vmlinux).unwrap().param("lbpanic=1"),
    )
    .unwrap();
    s.boot(
        "serial-to-file",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .arg("--serial")
            .arg(&format!("file:{}", serial_file.display()))
            .run("echo written-to-file"),
    )
    .unwrap();
    let r = s.run(host, Duration::from_secs(900)).unwrap();

    // PVH, 2 vCPUs, 1 GiB.
    let b = &r["pvh-2cpu-1g"];
    b.assert_clean("pvh-2cpu-1g");
    assert!(b.output.contains("cpus=2"), "{}", b.output);
    assert!(b.output.lines().any(|l| l.trim() == "0-1"), "{}", b.output);
    let total = meminfo_kb(&b.output, "MemTotal:");
    assert!(
        (900_000..=1_048_576).contains(&total),
        "MemTotal {total} kB for 1 GiB"
    );

    // 5 GiB: 3 GiB below the PCI hole, 2 GiB above 4 GiB, all usable.
    let b = &r["pvh-5g-above-4g"];
    b.assert_clean("pvh-5g-above-4g");
    let total = meminfo_kb(&b.output, "MemTotal:");
    assert!(
        (4_700_000..=5_242_880).contains(&total),
        "MemTotal {total} kB for 5 GiB"
    );

    let b = &r["bzimage-minimal"];
    b.assert_clean("bzimage-minimal");
    assert!(b.output.contains("-lightbyte"), "{}", b.output);

    // Debian's stock kernel: its virtio drivers are modules the initramfs loaded.
    let b = &r["bzimage-debian-2cpu"];
    b.assert_clean("bzimage-debian-2cpu");
    assert!(b.output.contains("cloud-amd64"), "{}", b.output);
    assert!(b.output.contains("cpus=2"), "{}", b.output);
    assert!(b.output.contains("0000:00:00.0"), "{}", b.output);
    let year: Option<u32> = b
        .output
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .find(|y| (2024..2100).contains(y));
    assert!(
        year.is_some(),
        "guest clock (CMOS RTC) not set from the host:\n{}",
        b.output
    );

    // Reboots end the VM with status 3 (a reboot asked for), through the i8042 and through the
    // reset-vector stub.
    for label in ["reboot-kbd", "reboot-bios-fallback"] {
        let b = &r[label];
        assert!(b.reached_marker(), "{label}:\n{}", b.output);
        assert_eq!(b.status, 3, "{label}:\n{}", b.output);
    }

    // A guest panic is reported through pvpanic and ends vmm with status 5.
    let b = &r["panic"];
    assert!(b.reached_marker(), "{}", b.output);
    assert_eq!(b.status, 5, "{}", b.output);
    assert!(b.output.contains("guest kernel panicked"), "{}", b.output);

    // --serial file: the console goes to the file, not to stdout.
    let b = &r["serial-to-file"];
    assert_eq!(b.status, 0, "{}", b.output);
    assert!(!b.output.contains("written-to-file"), "{}", b.output);
    let console = std::fs::read_to_string(&serial_file).unwrap();
    assert!(console.contains("LIGHTBYTE-GUEST-UP"), "{console}");
    assert!(console.contains("written-to-file"), "{console}");
}
