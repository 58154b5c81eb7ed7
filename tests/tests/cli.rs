//! `vmm` command-line errors: each bad input gets a one-line message naming the problem and exit
//! status 2, before any VM is created (so these run on any machine, KVM or not).

use std::process::Command;

use lightbyte_tests::paths::binary;

fn vmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(binary("vmm").unwrap())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_bad_input(args: &[&str], needle: &str) {
    let (code, stderr) = vmm(args);
    assert_eq!(code, 2, "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected {needle:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

#[test]
fn bad_inputs_exit_2_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("not-a-kernel");
    std::fs::write(&text, "hello\n").unwrap();
    let elf_stub = dir.join("truncated-elf");
    std::fs::write(&elf_stub, b"\x7fELF\x02\x01\x01\x00").unwrap();
    let t = text.to_str().unwrap();

    assert_bad_input(
        &["--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux: no such file",
    );
    // UEFI firmware: it must exist, be a PVH ELF, and come without a kernel or initramfs.
    assert_bad_input(
        &["--firmware", "/nonexistent/fw"],
        "firmware /nonexistent/fw: no such file",
    );
    assert_bad_input(&["--firmware", t], "not a PVH ELF");
    assert_bad_input(&["--firmware", elf_stub.to_str().unwrap()], "truncated-elf");
    assert_bad_input(&["--firmware", t, "--kernel", t], "cannot be used with");
    assert_bad_input(&["--firmware", t, "--initramfs", t], "cannot be used with");
    assert_bad_input(&["--kernel", t], "not a Linux kernel");
    assert_bad_input(&["--kernel", "/"], "kernel /: no such file");
    assert_bad_input(&["--kernel", t, "--memory", "1M"], "too small");
    assert_bad_input(&["--kernel", t, "--memory", "lots"], "invalid size");
    assert_bad_input(&["--kernel", t, "--cpus", "0"], "cpus 0 is out of range");
    assert_bad_input(
        &["--kernel", t, "--cpus", "255"],
        "cpus 255 is out of range",
    );
    assert_bad_input(&["--kernel", t, "--cpus", "many"], "invalid value");
    assert_bad_input(&["--kernel", t, "--serial", "tcp:1"], "invalid serial");
    assert_bad_input(
        &["--kernel", t, "--initramfs", "/nonexistent/initrd"],
        "initramfs",
    );
    assert_bad_input(&["--kernel", t, "--bogus"], "unexpected argument '--bogus'");
    assert_bad_input(
        &["--kernel", t, "--disk", "readonly=on"],
        "path=FILE is required",
    );
    assert_bad_input(
        &["--kernel", t, "--disk", "path=x,cache=none"],
        "unknown key",
    );
    assert_bad_input(
        &["--kernel", t, "--disk", "path=/nonexistent/disk.raw"],
        "disk /nonexistent/disk.raw: no such file",
    );
    assert_bad_input(
        &["--kernel", t, "--disk", "path=x,format=vmdk"],
        "format=vmdk: expected raw or qcow2",
    );
    assert_bad_input(&["--kernel", t, "--net", "tap="], "empty tap name");
    assert_bad_input(
        &["--kernel", t, "--net", "mac=52:54:00:12:34:56"],
        "tap=NAME is required",
    );
    assert_bad_input(
        &["--kernel", t, "--net", "tap=tap0,speed=1"],
        "unknown key \"speed\" (tap, mac)",
    );
    assert_bad_input(
        &["--kernel", t, "--net", "tap=tap0,mac=52:54:00:12:34"],
        "mac=52:54:00:12:34: expected six hex octets",
    );
    assert_bad_input(
        &["--kernel", t, "--net", "tap=tap0,mac=zz:54:00:12:34:56"],
        "expected six hex octets",
    );
    assert_bad_input(
        &["--kernel", t, "--net", "tap=tap0,mac=01:00:5e:00:00:01"],
        "a multicast address",
    );
    assert_bad_input(
        &["--kernel", t, "--net", "tap=0123456789abcdef"],
        "longer than 15 bytes",
    );
    assert_bad_input(
        &["--kernel", t, "--net", "tap=lb-no-such-if"],
        "net lb-no-such-if: no such network interface (create it first",
    );
    assert_bad_input(
        &["--kernel", t, "--net", "tap=lo", "--net", "tap=lo"],
        "the same tap is given twice",
    );
    assert_bad_input(&[], "--kernel <PATH>");
    // A kernel file that claims to be ELF but is cut short fails when loaded; with KVM absent it
    // still fails cleanly (status 1 or 2), never with a panic.
    let (code, stderr) = vmm(&["--kernel", elf_stub.to_str().unwrap()]);
    assert!(code == 1 || code == 2, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file that passes the kernel check (a bzImage header signature) so that the disks are
/// opened; they are checked before KVM is touched, so these cases run without KVM.
fn fake_bzimage(path: &std::path::Path) {
    let mut head = vec![0u8; 0x206];
    head[0x202..].copy_from_slice(b"HdrS");
    std::fs::write(path, head).unwrap();
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

#[test]
fn bad_disk_images_exit_2_naming_the_disk() {
    let dir = std::env::temp_dir().join(format!("lb-cli-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let kernel = dir.join("bzImage");
    fake_bzimage(&kernel);
    let k = kernel.to_str().unwrap();

    // A qcow2 header with a cluster size of 2^40 bytes.
    qemu_img(&["create", "-f", "qcow2", &p("corrupt.qcow2"), "64M"]);
    let mut bytes = std::fs::read(p("corrupt.qcow2")).unwrap();
    bytes[20..24].copy_from_slice(&40u32.to_be_bytes());
    std::fs::write(p("corrupt.qcow2"), &bytes).unwrap();
    let disk = format!("path={}", p("corrupt.qcow2"));
    assert_bad_input(
        &["--kernel", k, "--disk", &disk],
        &format!("disk {}", p("corrupt.qcow2")),
    );
    // Asked for explicitly, a non-qcow2 file is refused as qcow2.
    std::fs::write(p("plain.raw"), vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={},format=qcow2", p("plain.raw"));
    assert_bad_input(
        &["--kernel", k, "--disk", &disk],
        &format!("disk {}", p("plain.raw")),
    );

    // A backing file that is gone.
    qemu_img(&["create", "-f", "raw", &p("base.raw"), "64M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &p("orphan.qcow2"),
    ]);
    std::fs::remove_file(p("base.raw")).unwrap();
    let disk = format!("path={},readonly=on", p("orphan.qcow2"));
    assert_bad_input(&["--kernel", k, "--disk", &disk], "base.raw");

    // Two images backing each other.
    qemu_img(&["create", "-f", "qcow2", &p("a.qcow2"), "64M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        &p("b.qcow2"),
    ]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        &p("a.qcow2"),
    ]);
    let disk = format!("path={}", p("b.qcow2"));
    assert_bad_input(
        &["--kernel", k, "--disk", &disk],
        &format!("disk {}", p("b.qcow2")),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An interface that is not a TAP is refused before KVM is touched: by TUNSETIFF as root, by
/// /dev/net/tun's permissions otherwise; either way the user's input, naming the interface.
#[test]
fn a_tap_that_cannot_be_attached_exits_2_naming_it() {
    let dir = std::env::temp_dir().join(format!("lb-cli-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("bzImage");
    fake_bzimage(&kernel);
    let (code, stderr) = vmm(&["--kernel", kernel.to_str().unwrap(), "--net", "tap=lo"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.starts_with("vmm: net lo: "), "{stderr}");
    assert!(
        stderr.contains("lo is not a single-queue TAP interface")
            || stderr.contains("permission denied"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_explains_and_exits_0() {
    let out = Command::new(binary("vmm").unwrap())
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--firmware",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--disk",
        "format=raw|qcow2",
        "--net",
        "tap=NAME[,mac=MAC]",
        "img",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    assert!(help.contains("PVH"), "{help}");
}

#[test]
fn bad_jails_exit_2_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("lb-cli-jail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("kernel-0600");
    std::fs::write(&secret, "not for the jail\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let k = secret.to_str().unwrap();

    assert_bad_input(
        &["--kernel", k, "--jail", "uid=0,gid=5"],
        "uid=0: the jail runs the VMM as an unprivileged user",
    );
    assert_bad_input(&["--kernel", k, "--jail", "uid=5"], "gid= is required");
    assert_bad_input(
        &["--kernel", k, "--jail", "uid=5,gid=5,chroot=/"],
        "unknown jail option `chroot`",
    );
    assert_bad_input(&["--kernel", k, "--jail-rw", "/tmp"], "--jail");
    assert_bad_input(
        &["--kernel", "/nonexistent/vmlinux", "--jail", "uid=5,gid=5"],
        "must exist before the jail closes",
    );
    // Read-only paths are checked up front (tests run as root; uid 5 cannot read a 0600 file
    // of root's).
    assert_bad_input(
        &["--kernel", k, "--jail", "uid=5,gid=5"],
        "not readable by uid 5 gid 5 (mode 600, owner 0:0)",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
