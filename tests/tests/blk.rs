//! virtio-blk end to end: guests (in the test host on machines without VMX/SVM) boot from an ext4
//! root disk, read what the host wrote, write what the host then reads back, respect read-only
//! disks, and never lose data they synced, even when vmm is killed with SIGKILL.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lightbyte_tests::artifacts;
use lightbyte_tests::data::{pattern, sha256_hex};
use lightbyte_tests::guest::{Boot, Scenario};
use lightbyte_tests::testhost;

const MIB: usize = 1 << 20;

/// An ext4 image whose /init prints a marker and powers off, built from a directory with
/// `mkfs.ext4 -d` (no loop devices or root needed).
fn ext4_root(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    for d in ["dev", "proc", "sys", "tmp"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let init = root.join("init");
    fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         echo \"ROOT-FROM-DISK $(/bin/busybox awk '$2 == \"/\" {print $1, $3}' /proc/mounts)\"\n\
         /bin/busybox poweroff -f\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.join("root.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("32M")
        .status()
        .expect("mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(st.success());
    img
}

fn disk_arg(path: &Path, extra: &str) -> String {
    format!("path={}{extra}", path.display())
}

#[test]
fn block_device_end_to_end() {
    let host = testhost::shared().unwrap();
    let a = artifacts::get().unwrap();
    let mut s = Scenario::new(host, "blk").unwrap();
    let dir = s.dir().to_path_buf();

    // Root filesystem on /dev/vda, no initramfs.
    let root = ext4_root(&dir);
    let mut boot = Boot::new(&a.minimal_vmlinux)
        .unwrap()
        .param("root=/dev/vda rw rootfstype=ext4 init=/init")
        .arg("--disk")
        .arg(&disk_arg(&root, ""));
    boot.initramfs = None;
    s.boot("ext4-root", &boot).unwrap();

    // Host → guest: the guest checksums a disk the host filled, on both kernels.
    let input = dir.join("input.raw");
    fs::write(&input, pattern(1, 8 * MIB)).unwrap();
    let input_sha = sha256_hex(&input);
    for (label, kernel) in [
        ("read-pvh", &a.minimal_vmlinux),
        ("read-debian", &a.debian_bzimage),
    ] {
        let b = Boot::new(kernel)
            .unwrap()
            .arg("--disk")
            .arg(&disk_arg(&input, ",readonly=on,serial=input-disk"))
            .run("cat /sys/block/vda/size; cat /sys/block/vda/serial; echo; sha256sum /dev/vda");
        s.boot(label, &b).unwrap();
    }

    // Guest → host: the guest writes a pattern with O_DIRECT and syncs; we compare the bytes.
    let out = dir.join("output.raw");
    fs::write(&out, vec![0u8; 8 * MIB]).unwrap();
    fs::write(dir.join("pattern2"), pattern(2, 4 * MIB)).unwrap();
    let p2 = dir.join("pattern2");
    // The pattern reaches the guest on a second, read-only disk.
    s.boot(
        "write-direct",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .arg("--disk")
            .arg(&disk_arg(&out, ""))
            .arg("--disk")
            .arg(&disk_arg(&p2, ",readonly=on"))
            .run("dd if=/dev/vdb of=/dev/vda bs=1M seek=2 oflag=direct conv=fsync 2>&1 | tail -1; sync"),
    )
    .unwrap();

    // 4 concurrent writers on 2 vCPUs (2 queues), each on its own 1 MiB region.
    let multi = dir.join("multi.raw");
    fs::write(&multi, vec![0u8; 8 * MIB]).unwrap();
    let src = dir.join("pattern3");
    fs::write(&src, pattern(3, 4 * MIB)).unwrap();
    s.boot(
        "write-4-writers",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .cpus(2)
            .arg("--disk")
            .arg(&disk_arg(&multi, ""))
            .arg("--disk")
            .arg(&disk_arg(&src, ",readonly=on"))
            .run(
                "for i in 0 1 2 3; do \
                   dd if=/dev/vdb of=/dev/vda bs=64k skip=$((i*16)) seek=$((i*16)) count=16 \
                      oflag=direct conv=fsync 2>/dev/null & \
                 done; wait; sync; ls /sys/block/vda/mq",
            ),
    )
    .unwrap();

    // Read-only: writes fail in the guest and the file is unchanged.
    let ro = dir.join("ro.raw");
    fs::write(&ro, pattern(4, MIB)).unwrap();
    let ro_sha = sha256_hex(&ro);
    s.boot(
        "read-only",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .arg("--disk")
            .arg(&disk_arg(&ro, ",readonly=on"))
            .run("cat /sys/block/vda/ro; if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null; then echo WRITE-SUCCEEDED; else echo WRITE-REFUSED; fi"),
    )
    .unwrap();

    // Flush: once the guest's fsync returned, SIGKILL of vmm loses nothing.
    let crash = dir.join("crash.raw");
    fs::write(&crash, vec![0u8; 4 * MIB]).unwrap();
    let p5 = dir.join("pattern5");
    fs::write(&p5, pattern(5, 2 * MIB)).unwrap();
    let crash_boot = Boot::new(&a.minimal_vmlinux)
        .unwrap()
        .arg("--disk")
        .arg(&disk_arg(&crash, ""))
        .arg("--disk")
        .arg(&disk_arg(&p5, ",readonly=on"))
        .run("dd if=/dev/vdb of=/dev/vda bs=1M conv=fsync 2>/dev/null && echo GUEST-SYNCED; sleep 600");
    let vmm = lightbyte_tests::paths::binary("vmm").unwrap();
    let log = dir.join("crash.log");
    let args: Vec<String> = crash_boot
        .args()
        .iter()
        .map(|x| lightbyte_tests::guest::sh_quote(x))
        .collect();
    s.shell(&format!(
        "{vmm} {args} > {log} 2>&1 & pid=$!\n\
         for i in $(seq 1 1200); do grep -q GUEST-SYNCED {log} && break; sleep 0.1; done\n\
         kill -9 $pid; wait $pid; echo \"killed: $?\" >> {log}",
        vmm = lightbyte_tests::guest::sh_quote(&vmm.display().to_string()),
        args = args.join(" "),
        log = lightbyte_tests::guest::sh_quote(&log.display().to_string()),
    ));

    let r = s.run(host, Duration::from_secs(900)).unwrap();

    let b = &r["ext4-root"];
    assert_eq!(b.status, 0, "{}", b.output);
    assert!(
        b.output.contains("ROOT-FROM-DISK /dev/root ext4"),
        "{}",
        b.output
    );

    for label in ["read-pvh", "read-debian"] {
        let b = &r[label];
        b.assert_clean(label);
        assert!(
            b.output.contains(&format!("{input_sha}  /dev/vda")),
            "{label}: {}",
            b.output
        );
        assert!(
            b.output.lines().any(|l| l.trim() == "16384"),
            "{label}: size in sectors\n{}",
            b.output
        );
        assert!(
            b.output.contains("input-disk"),
            "{label}: serial\n{}",
            b.output
        );
    }

    let b = &r["write-direct"];
    b.assert_clean("write-direct");
    let written = fs::read(&out).unwrap();
    assert!(
        written[..2 * MIB].iter().all(|x| *x == 0),
        "bytes before the write changed"
    );
    assert!(
        written[2 * MIB..6 * MIB] == pattern(2, 4 * MIB)[..],
        "written bytes differ"
    );
    assert!(
        written[6 * MIB..].iter().all(|x| *x == 0),
        "bytes after the write changed"
    );

    let b = &r["write-4-writers"];
    b.assert_clean("write-4-writers");
    assert!(
        b.output
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["0", "1"]),
        "2 queues:\n{}",
        b.output
    );
    let m = fs::read(&multi).unwrap();
    assert!(
        m[..4 * MIB] == pattern(3, 4 * MIB)[..],
        "concurrent writes differ"
    );
    assert!(m[4 * MIB..].iter().all(|x| *x == 0));

    let b = &r["read-only"];
    b.assert_clean("read-only");
    assert!(
        b.output.lines().any(|l| l.trim() == "1"),
        "ro flag:\n{}",
        b.output
    );
    assert!(b.output.contains("WRITE-REFUSED"), "{}", b.output);
    assert_eq!(sha256_hex(&ro), ro_sha, "read-only disk changed");

    let crash_log = fs::read_to_string(&log).unwrap();
    assert!(crash_log.contains("GUEST-SYNCED"), "{crash_log}");
    assert!(crash_log.contains("killed: 137"), "{crash_log}");
    let c = fs::read(&crash).unwrap();
    assert!(
        c[..2 * MIB] == pattern(5, 2 * MIB)[..],
        "synced data lost after SIGKILL"
    );
}
