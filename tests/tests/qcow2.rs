//! qcow2 end to end, with qemu-img as the independent oracle: a guest reads images qemu-img
//! made across the format's options (checksums must match `qemu-img convert -O raw`), writes
//! patterns into overlays and standalone images (afterwards `qemu-img check` is clean and
//! `qemu-img compare` matches a model of every write), survives 20 SIGKILLs during heavy
//! writes without corruption or loss of flushed data, and boots from an overlay of a 2 GiB base
//! grown to 20 GiB while the base stays untouched.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lightbyte_tests::artifacts;
use lightbyte_tests::data::{pattern, qemu_img, qemu_io, sha256_hex};
use lightbyte_tests::guest::{crash_writer_boot, sh_quote, Boot, Scenario};
use lightbyte_tests::paths;
use lightbyte_tests::testhost;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn qemu_img_ok(args: &[&str]) -> String {
    let (code, out) = qemu_img(args);
    assert_eq!(code, 0, "qemu-img {args:?}: {out}");
    out
}

/// sha256 of the raw contents of `image` as qemu-img reads them.
fn raw_sha(dir: &Path, image: &Path) -> String {
    let out = dir.join(format!(
        "{}.expected.raw",
        image.file_name().unwrap().to_string_lossy()
    ));
    qemu_img_ok(&["convert", "-O", "raw", p(image), p(&out)]);
    let sha = sha256_hex(&out);
    fs::remove_file(&out).unwrap();
    sha
}

/// A raw disk holding a tar archive of `files` (name, contents, executable), for handing
/// scripts and tools to a guest: `tar -xf /dev/vdX -C /tmp`.
fn payload_disk(dir: &Path, name: &str, files: &[(&str, Vec<u8>, bool)]) -> PathBuf {
    let src = dir.join(format!("{name}.d"));
    fs::create_dir_all(&src).unwrap();
    for (f, data, exec) in files {
        let path = src.join(f);
        fs::write(&path, data).unwrap();
        if *exec {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let tar = dir.join(format!("{name}.tar"));
    let st = Command::new("tar")
        .args(["-cf", p(&tar), "-C", p(&src), "."])
        .status()
        .unwrap();
    assert!(st.success());
    tar
}

/// The static WRITE_ZEROES helper (tests/guest/blkzero.c).
fn blkzero(dir: &Path) -> Vec<u8> {
    let out = dir.join("blkzero");
    let src = paths::repo_root().join("tests/guest/blkzero.c");
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-o", p(&out), p(&src)])
        .status()
        .expect("gcc (apt-get install build-essential)");
    assert!(st.success(), "building blkzero");
    fs::read(out).unwrap()
}

/// Images qemu-img makes across the format's options, from one raw source with data,
/// holes and compressible runs.
fn read_matrix_images(dir: &Path) -> Vec<(String, PathBuf)> {
    let src = dir.join("src.raw");
    let mut data = pattern(1, 4 * MIB as usize);
    data[MIB as usize..2 * MIB as usize].fill(0);
    for (i, b) in data[2 * MIB as usize..3 * MIB as usize]
        .iter_mut()
        .enumerate()
    {
        *b = (i / 4096) as u8;
    }
    fs::write(&src, &data).unwrap();
    let mut out = Vec::new();
    let mut convert = |name: &str, opts: &[&str]| {
        let img = dir.join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[p(&src), p(&img)]);
        qemu_img_ok(&args);
        out.push((name.to_string(), img));
    };
    convert("v2", &["-o", "compat=0.10"]);
    convert("c512-r1", &["-o", "cluster_size=512,refcount_bits=1"]);
    convert("c2m-r64", &["-o", "cluster_size=2M,refcount_bits=64"]);
    convert("zlib", &["-c", "-o", "cluster_size=4096"]);
    convert("zstd", &["-c", "-o", "compression_type=zstd"]);
    // Extended L2: partially allocated and zero subclusters over a backing file.
    let ext = dir.join("extl2.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        "src.raw",
        "-F",
        "raw",
        p(&ext),
    ]);
    qemu_io(
        &ext,
        "qcow2",
        &[
            "write -P 0xab 4k 4k",
            "write -z 100k 8k",
            "write -P 0x5c 1028k 2k",
        ],
    );
    out.push(("extl2".into(), ext));
    // Three deep: raw base <- mid (relative path) <- top (absolute path, larger than the base).
    let mid = dir.join("mid.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "src.raw",
        "-F",
        "raw",
        p(&mid),
    ]);
    qemu_io(
        &mid,
        "qcow2",
        &["write -P 0x11 64k 192k", "write -z 2m 64k"],
    );
    let top = dir.join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        p(&mid),
        "-F",
        "qcow2",
        p(&top),
        "6M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x22 128k 8k", "write -P 0x33 5m 4k"],
    );
    out.push(("chain3".into(), top));
    out
}

/// One guest write operation, applied identically to a model.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Copy `len` bytes from the source disk at `src` to `dst`.
    Copy { src: u64, dst: u64, len: u64 },
    /// DISCARD (cluster aligned here: a discard of partial clusters is only a hint).
    Discard { off: u64, len: u64 },
    /// WRITE_ZEROES; `punch` allows unmapping.
    Zero { off: u64, len: u64, punch: bool },
}

fn write_ops(disk: u64, src_len: u64) -> Vec<Op> {
    let mut ops = vec![
        // Sequential, whole clusters.
        Op::Copy {
            src: 0,
            dst: 0,
            len: MIB,
        },
        // Partial clusters.
        Op::Copy {
            src: MIB,
            dst: 3 * MIB + 1536,
            len: 1536,
        },
        // Across the end of an 8 MiB backing file.
        Op::Copy {
            src: 0,
            dst: 8 * MIB - 128 * KIB,
            len: 256 * KIB,
        },
    ];
    let mut x: u64 = 0x1234_5678;
    for _ in 0..40 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let len = ((x >> 40) % 128 + 1) * 512;
        let dst = ((x >> 8) % ((disk - len) / 512)) * 512;
        let src = ((x >> 24) % ((src_len - len) / 512)) * 512;
        ops.push(Op::Copy { src, dst, len });
    }
    ops.extend([
        Op::Discard {
            off: 2 * MIB,
            len: MIB,
        },
        Op::Zero {
            off: 5 * MIB,
            len: MIB,
            punch: false,
        },
        Op::Zero {
            off: 6 * MIB + 4 * KIB,
            len: 200 * KIB,
            punch: true,
        },
        Op::Copy {
            src: 2 * MIB,
            dst: 5 * MIB + 64 * KIB,
            len: 4 * KIB,
        },
    ]);
    ops
}

fn apply(model: &mut [u8], src: &[u8], ops: &[Op]) {
    for op in ops {
        match *op {
            Op::Copy { src: s, dst, len } => model[dst as usize..(dst + len) as usize]
                .copy_from_slice(&src[s as usize..(s + len) as usize]),
            Op::Discard { off, len } | Op::Zero { off, len, .. } => {
                model[off as usize..(off + len) as usize].fill(0)
            }
        }
    }
}

fn guest_script(ops: &[Op], dev: &str) -> String {
    let mut s = String::new();
    for op in ops {
        s.push_str(&match *op {
            Op::Copy { src, dst, len } => format!(
                "dd if=/dev/vdc of={dev} bs=512 skip={} seek={} count={} oflag=direct 2>/dev/null || echo OP-FAILED\n",
                src / 512,
                dst / 512,
                len / 512
            ),
            Op::Discard { off, len } => {
                format!("blkdiscard -o {off} -l {len} {dev} || echo OP-FAILED\n")
            }
            Op::Zero { off, len, punch } => format!(
                "/tmp/blkzero {} {dev} {off} {len} || echo OP-FAILED\n",
                if punch { "punch" } else { "zero" }
            ),
        });
    }
    s
}

#[test]
fn qcow2_end_to_end() {
    let host = testhost::shared().unwrap();
    let a = artifacts::get().unwrap();
    let mut s = Scenario::new(host, "qcow2").unwrap();
    let dir = s.dir().to_path_buf();
    let vmm = paths::binary("vmm").unwrap();

    // Read matrix: every image as a read-only disk of one guest, which checksums them all.
    let images = read_matrix_images(&dir);
    let mut read = Boot::new(&a.minimal_vmlinux).unwrap();
    for (i, (_, img)) in images.iter().enumerate() {
        // Half probed, half with the format given.
        let fmt = if i % 2 == 0 { "" } else { ",format=qcow2" };
        read = read
            .arg("--disk")
            .arg(&format!("path={},readonly=on{fmt}", img.display()));
    }
    let devs: Vec<String> = (0..images.len())
        .map(|i| format!("/dev/vd{}", (b'a' + i as u8) as char))
        .collect();
    read = read.run(&format!("sha256sum {}", devs.join(" ")));
    s.boot("read-matrix", &read).unwrap();

    // Write matrix: a v3 overlay over an 8 MiB raw base, and a standalone v2 image with 4 KiB
    // clusters, both written with the same operations.
    let disk = 16 * MIB;
    let base = dir.join("wbase.raw");
    let base_data = pattern(11, 8 * MIB as usize);
    fs::write(&base, &base_data).unwrap();
    let overlay = dir.join("woverlay.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "wbase.raw",
        "-F",
        "raw",
        p(&overlay),
        "16M",
    ]);
    let standalone = dir.join("wv2.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4k",
        p(&standalone),
        "16M",
    ]);
    let src_data = pattern(12, 4 * MIB as usize);
    let src = dir.join("wsrc.raw");
    fs::write(&src, &src_data).unwrap();
    let ops = write_ops(disk, src_data.len() as u64);
    let script = format!(
        "{}{}sync\necho WRITES-DONE\nsha256sum /dev/vda /dev/vdb\n",
        guest_script(&ops, "/dev/vda"),
        guest_script(&ops, "/dev/vdb")
    );
    let payload = payload_disk(
        &dir,
        "wpayload",
        &[
            ("run.sh", script.into_bytes(), true),
            ("blkzero", blkzero(&dir), true),
        ],
    );
    s.boot(
        "write-matrix",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .cpus(2)
            .arg("--disk")
            .arg(&format!("path={}", overlay.display()))
            .arg("--disk")
            .arg(&format!("path={},format=qcow2", standalone.display()))
            .arg("--disk")
            .arg(&format!("path={},readonly=on,format=raw", src.display()))
            .arg("--disk")
            .arg(&format!(
                "path={},readonly=on,format=raw",
                payload.display()
            ))
            .run("tar -xf /dev/vdd -C /tmp && sh /tmp/run.sh"),
    )
    .unwrap();

    // Crash consistency: SIGKILL during heavy writes, 20 times.
    let crash_src = dir.join("csrc.raw");
    let crash_data = pattern(13, 8 * MIB as usize);
    fs::write(&crash_src, &crash_data).unwrap();
    const CRASHES: usize = 20;
    for n in 0..CRASHES {
        let img = dir.join(format!("crash-{n}.qcow2"));
        qemu_img_ok(&["create", "-f", "qcow2", p(&img), "64M"]);
    }
    for n in 0..CRASHES {
        let img = dir.join(format!("crash-{n}.qcow2"));
        let log = dir.join(format!("crash-{n}.log"));
        let b = crash_writer_boot(&a.minimal_vmlinux, &img, &crash_src, 32).unwrap();
        let args: Vec<String> = b.args().iter().map(|x| sh_quote(x)).collect();
        s.shell(&format!(
            "{vmm} {args} > {log} 2>&1 & pid=$!\n\
             for i in $(seq 1 1200); do grep -q 'FLUSHED 2' {log} && break; sleep 0.1; done\n\
             sleep 0.$(shuf -i 0-9 -n 1)\n\
             kill -9 $pid; wait $pid; echo \"killed: $?\" >> {log}",
            vmm = sh_quote(p(&vmm)),
            args = args.join(" "),
            log = sh_quote(p(&log)),
        ));
    }

    // Provisioning: overlay a 2 GiB base, grown to 20 GiB, and boot from it.
    let big = dir.join("big-base.raw");
    {
        let f = fs::File::create(&big).unwrap();
        f.set_len(2 << 30).unwrap();
    }
    let head = pattern(21, 4 * MIB as usize);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.write_all_at(&head, 0).unwrap();
        f.write_all_at(&head, (2 << 30) - 4 * MIB).unwrap();
    }
    let big_sha = sha256_hex(&big);
    let ov = dir.join("vm-disk.qcow2");
    let t = Instant::now();
    let st = Command::new(&vmm)
        .args(["img", "overlay", p(&big), p(&ov), "20G"])
        .status()
        .unwrap();
    let overlay_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(st.success(), "vmm img overlay");
    println!("overlay of a 2 GiB base to 20 GiB: {overlay_ms:.1} ms (including process start)");
    s.boot(
        "overlay-20g",
        &Boot::new(&a.minimal_vmlinux)
            .unwrap()
            .arg("--disk")
            .arg(&format!("path={}", ov.display()))
            .arg("--disk")
            .arg(&format!(
                "path={},readonly=on,format=raw",
                crash_src.display()
            ))
            .run(
                "cat /sys/block/vda/size; head -c 4194304 /dev/vda | sha256sum; \
                  dd if=/dev/vda bs=1M skip=2044 count=4 2>/dev/null | sha256sum; \
                  dd if=/dev/vdb of=/dev/vda bs=1M seek=19456 count=1 conv=fsync 2>/dev/null; \
                  dd if=/dev/vda bs=1M skip=19456 count=1 2>/dev/null | sha256sum; \
                  head -c 1048576 /dev/vdb | sha256sum",
            ),
    )
    .unwrap();

    let r = s.run(host, Duration::from_secs(1500)).unwrap();

    // Read matrix.
    let b = &r["read-matrix"];
    b.assert_clean("read-matrix");
    for ((name, img), dev) in images.iter().zip(&devs) {
        let want = format!("{}  {dev}", raw_sha(&dir, img));
        assert!(
            b.output.contains(&want),
            "{name}: expected {want}\n{}",
            b.output
        );
    }

    // Write matrix.
    let b = &r["write-matrix"];
    b.assert_clean("write-matrix");
    assert!(b.output.contains("WRITES-DONE"), "{}", b.output);
    assert!(!b.output.contains("OP-FAILED"), "{}", b.output);
    let mut model_overlay = base_data.clone();
    model_overlay.resize(disk as usize, 0);
    apply(&mut model_overlay, &src_data, &ops);
    let mut model_v2 = vec![0u8; disk as usize];
    apply(&mut model_v2, &src_data, &ops);
    for (img, model, name) in [
        (&overlay, &model_overlay, "overlay"),
        (&standalone, &model_v2, "v2"),
    ] {
        let (code, out) = qemu_img(&["check", p(img)]);
        assert_eq!(code, 0, "{name}: qemu-img check: {out}");
        let expect = dir.join(format!("{name}.model.raw"));
        fs::write(&expect, model).unwrap();
        let (code, out) = qemu_img(&["compare", "-F", "raw", p(img), p(&expect)]);
        assert_eq!(code, 0, "{name}: qemu-img compare: {out}");
    }
    assert_eq!(
        sha256_hex(&base),
        sha256_hex(&{
            let b2 = dir.join("wbase.expect");
            fs::write(&b2, &base_data).unwrap();
            b2
        }),
        "backing file modified"
    );

    // Crashes: never corrupt, flushed data always there.
    let mut leaks = 0;
    for n in 0..CRASHES {
        let img = dir.join(format!("crash-{n}.qcow2"));
        let log = fs::read_to_string(dir.join(format!("crash-{n}.log"))).unwrap();
        assert!(log.contains("killed: 137"), "crash {n}: {log}");
        let flushed = log
            .lines()
            .filter_map(|l| l.strip_prefix("FLUSHED "))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .max()
            .unwrap_or_else(|| panic!("crash {n}: no flush reported\n{log}"));
        let (code, out) = qemu_img(&["check", p(&img)]);
        assert!(
            code == 0 || code == 3,
            "crash {n}: qemu-img check exit {code} (2 = corruption): {out}"
        );
        if code == 3 {
            leaks += 1;
        }
        let raw = dir.join(format!("crash-{n}.raw"));
        qemu_img_ok(&["convert", "-O", "raw", p(&img), p(&raw)]);
        let got = fs::read(&raw).unwrap();
        let n_bytes = ((flushed + 1) * 256 * KIB) as usize;
        assert!(
            got[..n_bytes] == crash_data[..n_bytes],
            "crash {n}: data flushed before the kill (chunks 0..={flushed}) is not all there"
        );
        fs::remove_file(&raw).unwrap();
    }
    println!("{CRASHES} SIGKILLs: no corruption, flushed data intact; {leaks} images with leaked clusters");

    // Overlay of the 2 GiB base.
    let b = &r["overlay-20g"];
    b.assert_clean("overlay-20g");
    let lines: Vec<&str> = b.output.lines().map(str::trim).collect();
    assert!(
        lines.contains(&"41943040"),
        "20 GiB in sectors:\n{}",
        b.output
    );
    let head_sha = {
        let f = dir.join("head.expect");
        fs::write(&f, &head).unwrap();
        sha256_hex(&f)
    };
    let n = b.output.matches(&head_sha).count();
    assert_eq!(
        n, 2,
        "base data through the overlay (start and end):\n{}",
        b.output
    );
    let shas: Vec<&str> = lines
        .iter()
        .filter(|l| l.ends_with(" -"))
        .map(|l| &l[..64])
        .collect();
    assert_eq!(shas.len(), 4, "{}", b.output);
    assert_eq!(shas[2], shas[3], "write at 19 GiB reads back");
    assert_eq!(sha256_hex(&big), big_sha, "base image modified");
    let info = qemu_img_ok(&["info", "--output", "json", p(&ov)]);
    assert!(info.contains("\"virtual-size\": 21474836480"), "{info}");
    let (code, out) = qemu_img(&["check", p(&ov)]);
    assert_eq!(code, 0, "overlay check: {out}");
}
