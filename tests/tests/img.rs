//! `vmm img` against qemu-img as the oracle: images `vmm img` creates, resizes, converts and
//! repairs must read back in qemu-img exactly as intended, and images qemu-img makes must be
//! understood. No guest is booted.

use std::path::{Path, PathBuf};
use std::process::Command;

use lightbyte_tests::paths::binary;
use serde_json::Value;

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-img-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Out {
    let out = cmd.output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `vmm img ARGS` in `dir`.
fn img_in(dir: &Path, args: &[&str]) -> Out {
    let out = run(Command::new(binary("vmm").unwrap())
        .arg("img")
        .args(args)
        .current_dir(dir));
    assert!(
        !out.stderr.contains("panicked"),
        "vmm img {args:?} panicked: {}",
        out.stderr
    );
    out
}

/// `vmm img ARGS`, which must succeed.
fn img_ok(dir: &Path, args: &[&str]) -> String {
    let out = img_in(dir, args);
    assert_eq!(
        out.code, 0,
        "vmm img {args:?}: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// `vmm img ARGS`, which must fail as bad input with `needle` in its message.
fn img_bad(dir: &Path, args: &[&str], needle: &str) {
    let out = img_in(dir, args);
    assert_eq!(
        out.code, 2,
        "vmm img {args:?}: {}{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stderr.contains(needle),
        "vmm img {args:?}: expected {needle:?} in {:?}",
        out.stderr
    );
}

fn qemu_img(args: &[&str]) -> Out {
    run(Command::new("qemu-img").args(args))
}

fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert_eq!(
        out.code, 0,
        "qemu-img {args:?}: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// Writes `pattern` at each `offset` (bytes, `len` each) through qemu-io.
fn qemu_write(path: &str, format: &str, writes: &[(u8, u64, u64)]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for (pattern, offset, len) in writes {
        cmd.arg("-c")
            .arg(format!("write -P {pattern} {offset} {len}"));
    }
    let out = run(cmd.arg(path));
    assert_eq!(out.code, 0, "qemu-io: {}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains("error"), "qemu-io: {}", out.stdout);
}

fn qemu_info(path: &str) -> Value {
    serde_json::from_str(&qemu_img_ok(&["info", "--output", "json", path])).unwrap()
}

/// CRC and length of a file (cksum: fast enough for gigabytes; this guards against accidents,
/// not adversaries).
fn checksum(path: &Path) -> String {
    let out = run(Command::new("cksum").arg(path));
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A qcow2 header field (big-endian) at byte `at`.
fn header_u64(path: &Path, at: usize) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Sets the 16-bit refcount of cluster `index` in a fresh image with 64 KiB clusters (one
/// refcount block covers the first 2 GiB of the file).
fn set_refcount(path: &Path, index: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    let table = header_u64(path, 48);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, table).unwrap();
    let block = u64::from_be_bytes(entry);
    assert_ne!(block, 0, "no first refcount block");
    file.write_all_at(&value.to_be_bytes(), block + 2 * index)
        .unwrap();
}

#[test]
fn create_makes_images_qemu_img_reads_as_asked() {
    let d = Scratch::new("create");
    let out = img_ok(&d.0, &["create", "a.qcow2", "1G"]);
    assert!(out.contains("1 GiB (1073741824 bytes)"), "{out}");
    let info = qemu_info(&d.s("a.qcow2"));
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 1u64 << 30);
    assert_eq!(info["cluster-size"], 65536);
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 16);
    qemu_img_ok(&["check", &d.s("a.qcow2")]);

    img_ok(
        &d.0,
        &[
            "create",
            "-f",
            "qcow2",
            "--cluster-size",
            "2M",
            "--refcount-bits",
            "64",
            "b.qcow2",
            "100G",
        ],
    );
    let info = qemu_info(&d.s("b.qcow2"));
    assert_eq!(info["virtual-size"], 100u64 << 30);
    assert_eq!(info["cluster-size"], 2 << 20);
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 64);
    qemu_img_ok(&["check", &d.s("b.qcow2")]);

    img_ok(
        &d.0,
        &[
            "create",
            "--compat",
            "0.10",
            "--cluster-size",
            "4k",
            "c.qcow2",
            "3M",
        ],
    );
    let info = qemu_info(&d.s("c.qcow2"));
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
    assert_eq!(info["cluster-size"], 4096);
    assert_eq!(info["virtual-size"], 3 << 20);
    qemu_img_ok(&["check", &d.s("c.qcow2")]);

    img_ok(&d.0, &["create", "-f", "raw", "d.raw", "64M"]);
    let info = qemu_info(&d.s("d.raw"));
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], 64 << 20);

    // With a backing file and no size: the backing file's size, its format recorded.
    img_ok(&d.0, &["create", "-b", "d.raw", "e.qcow2"]);
    let info = qemu_info(&d.s("e.qcow2"));
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["backing-filename"], "d.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    img_ok(
        &d.0,
        &["create", "-b", "e.qcow2", "-F", "qcow2", "f.qcow2", "1G"],
    );
    let info = qemu_info(&d.s("f.qcow2"));
    assert_eq!(info["virtual-size"], 1u64 << 30);
    assert_eq!(info["backing-filename-format"], "qcow2");
    qemu_img_ok(&["check", &d.s("f.qcow2")]);
}

#[test]
fn create_refuses_bad_input() {
    let d = Scratch::new("create-bad");
    img_bad(&d.0, &["create", "x.qcow2"], "a size is needed");
    img_bad(
        &d.0,
        &["create", "-f", "vmdk", "x.img", "1G"],
        "invalid value 'vmdk'",
    );
    img_bad(&d.0, &["create", "x.qcow2", "lots"], "invalid size");
    img_bad(
        &d.0,
        &["create", "--cluster-size", "3000", "x.qcow2", "1G"],
        "cluster",
    );
    img_bad(
        &d.0,
        &["create", "--cluster-size", "4M", "x.qcow2", "1G"],
        "cluster",
    );
    img_bad(
        &d.0,
        &["create", "--refcount-bits", "12", "x.qcow2", "1G"],
        "refcount",
    );
    img_bad(
        &d.0,
        &[
            "create",
            "-f",
            "raw",
            "--cluster-size",
            "64k",
            "x.raw",
            "1G",
        ],
        "--cluster-size needs a qcow2 image",
    );
    img_bad(
        &d.0,
        &["create", "-b", "nothere.raw", "x.qcow2", "1G"],
        "nothere.raw",
    );
    img_bad(&d.0, &["create", "-F", "raw", "x.qcow2", "1G"], "--backing");
    std::fs::write(d.path("exists.qcow2"), b"keep me").unwrap();
    img_bad(&d.0, &["create", "exists.qcow2", "1G"], "already exists");
    assert_eq!(std::fs::read(d.path("exists.qcow2")).unwrap(), b"keep me");
    for f in ["x.qcow2", "x.img", "x.raw"] {
        assert!(!d.path(f).exists(), "{f} was left behind");
    }
}

#[test]
fn info_reads_qemu_img_images_and_their_chains() {
    let d = Scratch::new("info");
    qemu_img_ok(&["create", "-f", "raw", &d.s("base.raw"), "2G"]);
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=131072",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &d.s("top.qcow2"),
        "20G",
    ]);
    qemu_write(&d.s("top.qcow2"), "qcow2", &[(0xab, 0, 1 << 20)]);

    let human = img_ok(&d.0, &["info", "top.qcow2"]);
    for needle in [
        "file format: qcow2",
        "virtual size: 20 GiB (21474836480 bytes)",
        "cluster_size: 131072",
        "backing file: base.raw",
        "backing file format: raw",
        "compat: 1.1",
        // The backing image follows.
        "file format: raw",
        "virtual size: 2 GiB (2147483648 bytes)",
    ] {
        assert!(human.contains(needle), "{needle:?} missing from:\n{human}");
    }

    let json: Value =
        serde_json::from_str(&img_ok(&d.0, &["info", "--output", "json", "top.qcow2"])).unwrap();
    let oracle = qemu_info(&d.s("top.qcow2"));
    assert_eq!(json["virtual_size"], oracle["virtual-size"]);
    assert_eq!(json["cluster_size"], oracle["cluster-size"]);
    assert_eq!(json["backing_file"], oracle["backing-filename"]);
    assert_eq!(json["actual_size"], oracle["actual-size"]);
    let format = json["format"].as_str().unwrap().to_ascii_lowercase();
    assert_eq!(format, "qcow2");
    assert_eq!(json["backing"]["virtual_size"], 2u64 << 30);
    assert_eq!(json["qcow2"]["refcount_bits"], 16);

    img_bad(
        &d.0,
        &["info", "missing.qcow2"],
        "missing.qcow2: no such file",
    );
    let mut bad = std::fs::read(d.path("top.qcow2")).unwrap();
    bad[20..24].copy_from_slice(&[0x40, 0, 0, 0]); // cluster_bits 64
    std::fs::write(d.path("bad.qcow2"), &bad).unwrap();
    img_bad(&d.0, &["info", "bad.qcow2"], "bad.qcow2");
}

#[test]
fn resize_grows_and_shrinks_only_when_asked() {
    let d = Scratch::new("resize");
    img_ok(&d.0, &["create", "a.qcow2", "1G"]);
    img_ok(&d.0, &["resize", "a.qcow2", "+1G"]);
    assert_eq!(qemu_info(&d.s("a.qcow2"))["virtual-size"], 2u64 << 30);
    img_ok(&d.0, &["resize", "a.qcow2", "3G"]);
    assert_eq!(qemu_info(&d.s("a.qcow2"))["virtual-size"], 3u64 << 30);
    qemu_img_ok(&["check", &d.s("a.qcow2")]);

    img_bad(&d.0, &["resize", "a.qcow2", "1G"], "--shrink");
    img_bad(&d.0, &["resize", "a.qcow2", "-1G"], "--shrink");
    assert_eq!(qemu_info(&d.s("a.qcow2"))["virtual-size"], 3u64 << 30);
    img_ok(&d.0, &["resize", "--shrink", "a.qcow2", "-1G"]);
    assert_eq!(qemu_info(&d.s("a.qcow2"))["virtual-size"], 2u64 << 30);
    qemu_img_ok(&["check", &d.s("a.qcow2")]);

    // Data past the new end: shrinking is refused and nothing changes.
    qemu_write(&d.s("a.qcow2"), "qcow2", &[(0x5a, (3 << 29) + 4096, 65536)]);
    let out = img_in(&d.0, &["resize", "--shrink", "a.qcow2", "1G"]);
    assert_ne!(out.code, 0, "shrank over data: {}", out.stdout);
    assert_eq!(qemu_info(&d.s("a.qcow2"))["virtual-size"], 2u64 << 30);
    qemu_img_ok(&["check", &d.s("a.qcow2")]);

    img_ok(&d.0, &["create", "-f", "raw", "r.raw", "1M"]);
    img_ok(&d.0, &["resize", "r.raw", "+1M"]);
    assert_eq!(std::fs::metadata(d.path("r.raw")).unwrap().len(), 2 << 20);

    img_bad(&d.0, &["resize", "a.qcow2", "-3G"], "cannot shrink by");
    img_bad(&d.0, &["resize", "a.qcow2", "big"], "invalid size");
    img_bad(&d.0, &["resize", "nothere.qcow2", "1G"], "no such file");
    img_bad(&d.0, &["resize", "a.qcow2"], "SIZE");
}

#[test]
fn overlay_of_a_2g_base_to_20g_leaves_the_base_alone() {
    let d = Scratch::new("overlay");
    let base = d.path("base.raw");
    {
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(2 << 30).unwrap();
    }
    qemu_write(
        &d.s("base.raw"),
        "raw",
        &[
            (0x11, 0, 65536),
            (0x22, 1 << 30, 4096),
            (0x33, (2 << 30) - 512, 512),
        ],
    );
    let before = checksum(&base);
    let out = img_ok(&d.0, &["overlay", "base.raw", "vm.qcow2", "20G"]);
    assert!(out.contains(" ms"), "the time it took: {out}");
    let info = qemu_info(&d.s("vm.qcow2"));
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 20u64 << 30);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    qemu_img_ok(&["check", &d.s("vm.qcow2")]);
    // The overlay reads as the base, then zeroes up to 20 GiB.
    qemu_img_ok(&["compare", &d.s("base.raw"), &d.s("vm.qcow2")]);
    // Guest writes land in the overlay only.
    qemu_write(
        &d.s("vm.qcow2"),
        "qcow2",
        &[(0x44, 0, 4096), (0x55, 10 << 30, 4096)],
    );
    assert_eq!(checksum(&base), before, "the base changed");
    qemu_img_ok(&["check", &d.s("vm.qcow2")]);

    // A relative BASE is resolved from the overlay's directory, as qemu-img does.
    std::fs::create_dir(d.path("vms")).unwrap();
    img_ok(&d.0, &["overlay", "../base.raw", "vms/vm2.qcow2"]);
    let info = qemu_info(&d.s("vms/vm2.qcow2"));
    assert_eq!(info["backing-filename"], "../base.raw");
    assert_eq!(info["virtual-size"], 2u64 << 30);
    qemu_img_ok(&["compare", &d.s("base.raw"), &d.s("vms/vm2.qcow2")]);
    img_bad(
        &d.0,
        &["overlay", "base.raw", "vms/vm3.qcow2"],
        "resolved from the directory of",
    );
    // An overlay of an overlay.
    img_ok(&d.0, &["overlay", "vm.qcow2", "vm-child.qcow2"]);
    let info = qemu_info(&d.s("vm-child.qcow2"));
    assert_eq!(info["backing-filename-format"], "qcow2");
    qemu_img_ok(&["compare", &d.s("vm.qcow2"), &d.s("vm-child.qcow2")]);

    img_bad(&d.0, &["overlay", "nothere.raw", "x.qcow2"], "nothere.raw");
    img_bad(&d.0, &["overlay", "base.raw", "vm.qcow2"], "already exists");
    assert!(!d.path("x.qcow2").exists());
    assert!(!d.path("vms/vm3.qcow2").exists());
}

#[test]
fn convert_copies_the_chain_and_keeps_holes() {
    let d = Scratch::new("convert");
    qemu_img_ok(&["create", "-f", "qcow2", &d.s("base.qcow2"), "256M"]);
    qemu_write(
        &d.s("base.qcow2"),
        "qcow2",
        &[
            (0x01, 0, 3 << 20),
            (0x02, 100 << 20, 65536),
            (0x03, (256 << 20) - 4096, 4096),
        ],
    );
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &d.s("top.qcow2"),
    ]);
    qemu_write(
        &d.s("top.qcow2"),
        "qcow2",
        &[
            (0x04, 1 << 20, 8192),
            (0x00, 100 << 20, 4096),
            (0x05, 200 << 20, 1 << 20),
        ],
    );

    img_ok(&d.0, &["convert", "-O", "raw", "top.qcow2", "out.raw"]);
    qemu_img_ok(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &d.s("top.qcow2"),
        &d.s("out.raw"),
    ]);
    let meta = std::fs::metadata(d.path("out.raw")).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "holes were written: {} bytes allocated",
        meta.blocks() * 512
    );

    let out = img_in(
        &d.0,
        &[
            "convert",
            "-p",
            "-O",
            "qcow2",
            "--cluster-size",
            "1M",
            "top.qcow2",
            "out.qcow2",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("100.0%"), "progress: {:?}", out.stderr);
    qemu_img_ok(&["compare", &d.s("top.qcow2"), &d.s("out.qcow2")]);
    qemu_img_ok(&["check", &d.s("out.qcow2")]);
    let info = qemu_info(&d.s("out.qcow2"));
    assert_eq!(info["cluster-size"], 1 << 20);
    assert!(info.get("backing-filename").is_none(), "DST stands alone");
    assert!(info["actual-size"].as_u64().unwrap() < 16 << 20);

    // raw → qcow2, with -f.
    img_ok(
        &d.0,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "out.raw",
            "back.qcow2",
        ],
    );
    qemu_img_ok(&["compare", &d.s("out.raw"), &d.s("back.qcow2")]);
    qemu_img_ok(&["check", &d.s("back.qcow2")]);

    img_bad(
        &d.0,
        &["convert", "-O", "vmdk", "top.qcow2", "x"],
        "invalid value 'vmdk'",
    );
    img_bad(
        &d.0,
        &["convert", "-O", "raw", "nothere", "x.raw"],
        "no such file",
    );
    img_bad(
        &d.0,
        &["convert", "-O", "raw", "top.qcow2", "out.raw"],
        "already exists",
    );
    img_bad(&d.0, &["convert", "top.qcow2", "x.raw"], "--output-format");
    assert!(!d.path("x.raw").exists());
}

#[test]
fn check_finds_leaks_and_corruptions_and_repairs_them() {
    let d = Scratch::new("check");
    qemu_img_ok(&["create", "-f", "qcow2", &d.s("a.qcow2"), "64M"]);
    qemu_write(&d.s("a.qcow2"), "qcow2", &[(0x61, 0, 1 << 20)]);
    let out = img_ok(&d.0, &["check", "a.qcow2"]);
    assert!(out.contains("No errors were found"), "{out}");

    // A leak: a refcount of 1 on a cluster past the end of everything.
    let len = std::fs::metadata(d.path("a.qcow2")).unwrap().len();
    let leaked = len.div_ceil(65536);
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("a.qcow2"))
        .unwrap()
        .set_len((leaked + 1) * 65536)
        .unwrap();
    set_refcount(&d.path("a.qcow2"), leaked, 1);
    assert_eq!(
        qemu_img(&["check", &d.s("a.qcow2")]).code,
        3,
        "oracle sees the leak"
    );
    let out = img_in(&d.0, &["check", "a.qcow2"]);
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("1 leaked clusters"), "{}", out.stdout);
    let out = img_in(&d.0, &["check", "--output", "json", "a.qcow2"]);
    assert_eq!(out.code, 3);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (json["leaks"].as_u64(), json["corruptions"].as_u64()),
        (Some(1), Some(0))
    );
    img_ok(&d.0, &["check", "-r", "a.qcow2"]);
    qemu_img_ok(&["check", &d.s("a.qcow2")]);

    // A corruption: the L1 table's cluster claims refcount 0 while the header references it.
    let l1 = header_u64(&d.path("a.qcow2"), 40);
    set_refcount(&d.path("a.qcow2"), l1 / 65536, 0);
    assert_eq!(
        qemu_img(&["check", &d.s("a.qcow2")]).code,
        2,
        "oracle sees the corruption"
    );
    let out = img_in(&d.0, &["check", "a.qcow2"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("errors were found"), "{}", out.stdout);
    let out = img_in(&d.0, &["check", "--repair", "--output", "json", "a.qcow2"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["corruptions"], 0);
    assert!(
        json["repair"]["corruptions"].as_u64().unwrap() > 0,
        "{json}"
    );
    qemu_img_ok(&["check", &d.s("a.qcow2")]);
    // The data survived the repair.
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x61 0 1M"])
        .arg(d.path("a.qcow2")));
    assert!(!out.stdout.contains("fail"), "{}", out.stdout);

    img_bad(&d.0, &["check", "nothere.qcow2"], "no such file");
    std::fs::write(
        d.path("junk.qcow2"),
        b"QFI\xfb\x00\x00\x00\x03 and then nonsense",
    )
    .unwrap();
    img_bad(&d.0, &["check", "junk.qcow2"], "junk.qcow2");
}

#[test]
fn help_explains_every_subcommand() {
    let d = Scratch::new("help");
    let top = img_ok(&d.0, &["--help"]);
    for cmd in ["create", "info", "resize", "overlay", "convert", "check"] {
        assert!(
            top.contains(cmd),
            "{cmd} missing from vmm img --help:\n{top}"
        );
        let help = img_ok(&d.0, &[cmd, "--help"]);
        assert!(
            help.len() > 200,
            "vmm img {cmd} --help says too little:\n{help}"
        );
    }
    let check = img_ok(&d.0, &["check", "--help"]);
    assert!(check.contains("Exit status"), "{check}");
    let create = img_ok(&d.0, &["create", "--help"]);
    for flag in ["--cluster-size", "--refcount-bits", "--compat", "--backing"] {
        assert!(create.contains(flag), "{flag} missing:\n{create}");
    }
    let out = img_in(&d.0, &[]);
    assert_eq!(out.code, 2, "vmm img without a subcommand");
    assert!(out.stderr.contains("Usage"), "{}", out.stderr);
}
