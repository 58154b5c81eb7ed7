//! Helpers shared by the qcow integration tests: temp dirs, running `qemu-img`/`qemu-io` (the
//! independent oracle) with clear failure output, deterministic data, byte comparisons with
//! readable diffs, and small image builders.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow::{Format, Image, OpenOptions};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// A fresh temporary directory, removed when dropped.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qcow-test-")
        .tempdir()
        .expect("create temp dir")
}

/// `p` as `&str` (all test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The result of running an external program.
#[derive(Debug)]
pub struct Out {
    pub cmd: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `prog args...` and returns its exit code and output (never panics on a non-zero exit).
pub fn run(prog: &str, args: &[&str]) -> Out {
    let cmd = format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{cmd}`: {e} (is qemu-utils installed?)"));
    Out {
        cmd,
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `qemu-img args...`, panicking with the full output unless it exits 0. Returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = run("qemu-img", args);
    assert_eq!(out.code, 0, "qemu-img failed:\n{}", out.describe());
    out.stdout
}

/// `qemu-img create -q -f FMT [-o OPTS] PATH SIZE`.
pub fn qemu_create(path: &Path, fmt: &str, opts: &str, size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size.as_str()]);
    qemu_img(&args);
}

/// `qemu-img create` of a qcow2 overlay on `backing` (stored in the header exactly as given).
pub fn qemu_create_overlay(
    path: &Path,
    backing: &str,
    backing_fmt: &str,
    opts: &str,
    size: Option<u64>,
) {
    let size = size.map(|s| s.to_string());
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
    ];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(s(path));
    if let Some(size) = &size {
        args.push(size.as_str());
    }
    qemu_img(&args);
}

/// `qemu-img convert -f raw -O qcow2 [-c] -o OPTS raw out`.
pub fn qemu_convert_to_qcow2(raw: &Path, out: &Path, opts: &str, compress: bool) {
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    if compress {
        args.push("-c");
    }
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(raw), s(out)]);
    qemu_img(&args);
}

/// What qemu reads from `img` (format probed unless given), via `qemu-img convert -O raw`.
pub fn qemu_read_all(img: &Path, fmt: Option<&str>) -> Vec<u8> {
    let dir = tmp();
    let out = dir.path().join("oracle.raw");
    let mut args = vec!["convert", "-U"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.extend(["-O", "raw", s(img), s(&out)]);
    qemu_img(&args);
    std::fs::read(&out).expect("read oracle raw")
}

/// `qemu-img info --output json` (with `-U`, so it works while we hold the image open).
pub fn qemu_info(img: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "-U", "--output", "json", s(img)]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad json from qemu-img info: {e}\n{out}"))
}

/// `qemu-img check --output json` (exit code: 0 clean, 2 corruptions, 3 leaks only).
pub fn qemu_check(img: &Path) -> (Out, serde_json::Value) {
    let out = run("qemu-img", &["check", "--output", "json", s(img)]);
    let v = serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, v)
}

/// Asserts `qemu-img check` finds nothing wrong (no corruption, no leak).
pub fn assert_qemu_check_clean(img: &Path) {
    let out = run("qemu-img", &["check", s(img)]);
    assert_eq!(
        out.code,
        0,
        "qemu-img check is not clean on {}:\n{}",
        img.display(),
        out.describe()
    );
}

/// Number of compressed clusters in a qcow2 image, per `qemu-img check`.
pub fn qemu_compressed_clusters(img: &Path) -> u64 {
    let (out, v) = qemu_check(img);
    assert_eq!(out.code, 0, "{}", out.describe());
    v["compressed-clusters"].as_u64().unwrap_or(0)
}

/// Asserts `qemu-img compare` says `img` (format `fmt`) and the raw file `raw` are identical.
pub fn assert_qemu_identical(img: &Path, fmt: &str, raw: &Path) {
    let out = run(
        "qemu-img",
        &["compare", "-U", "-f", fmt, "-F", "raw", s(img), s(raw)],
    );
    assert_eq!(
        out.code,
        0,
        "qemu-img compare: {} differs from the model {}:\n{}",
        img.display(),
        raw.display(),
        out.describe()
    );
}

/// Runs one `qemu-io` invocation with the given commands; panics unless every command worked.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(img));
    let out = run("qemu-io", &args);
    let text = format!("{}{}", out.stdout, out.stderr).to_lowercase();
    assert!(
        out.code == 0 && !text.contains("failed") && !text.contains("error"),
        "qemu-io failed:\n{}",
        out.describe()
    );
}

/// Builds a `qemu-io` script while applying the same operations to a byte model.
pub struct QemuIo {
    dir: PathBuf,
    cmds: Vec<String>,
    n: usize,
}

impl QemuIo {
    /// `dir` holds the data files that `write -s` reads.
    pub fn new(dir: &Path) -> Self {
        QemuIo {
            dir: dir.to_path_buf(),
            cmds: Vec::new(),
            n: 0,
        }
    }

    /// Writes arbitrary bytes (`write -s file off len`).
    pub fn write(&mut self, model: &mut [u8], off: u64, data: &[u8]) {
        self.n += 1;
        let f = self
            .dir
            .join(format!("qemu-io-src-{}-{}", std::process::id(), self.n));
        std::fs::write(&f, data).expect("write qemu-io source file");
        self.cmds
            .push(format!("write -q -s {} {off} {}", f.display(), data.len()));
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    /// Writes `len` bytes of `byte` (`write -P`).
    pub fn pattern(&mut self, model: &mut [u8], off: u64, len: u64, byte: u8) {
        self.cmds.push(format!("write -q -P {byte} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(byte);
    }

    /// Writes zeroes (`write -z`, with `-u` to allow unmapping).
    pub fn zero(&mut self, model: &mut [u8], off: u64, len: u64, unmap: bool) {
        let u = if unmap { "-u " } else { "" };
        self.cmds.push(format!("write -q -z {u}{off} {len}"));
        model[off as usize..(off + len) as usize].fill(0);
    }

    /// Writes a compressed cluster (`write -c`; `off`/`data` must be one whole cluster).
    pub fn compressed(&mut self, model: &mut [u8], off: u64, data: &[u8]) {
        self.n += 1;
        let f = self
            .dir
            .join(format!("qemu-io-src-{}-{}", std::process::id(), self.n));
        std::fs::write(&f, data).expect("write qemu-io source file");
        self.cmds.push(format!(
            "write -q -c -s {} {off} {}",
            f.display(),
            data.len()
        ));
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    pub fn run(self, img: &Path, fmt: &str) {
        if !self.cmds.is_empty() {
            qemu_io(img, fmt, &self.cmds);
        }
    }
}

/// Deterministic xorshift64* generator.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d);
        if r.0 == 0 {
            r.0 = 1;
        }
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..hi` (hi > lo).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    /// True with probability `pct`%.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// A nonzero byte.
    pub fn byte_nz(&mut self) -> u8 {
        (self.below(255) + 1) as u8
    }
}

/// `len` pseudo-random (incompressible) bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// `len` bytes of text-like, highly compressible data (never all-zero over 16 bytes).
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let words: Vec<Vec<u8>> = (0..24)
        .map(|_| {
            let n = r.range(2, 10) as usize;
            (0..n).map(|_| b'a' + r.below(8) as u8).collect()
        })
        .collect();
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(&words[r.below(words.len() as u64) as usize]);
        v.push(b' ');
    }
    v.truncate(len);
    v
}

/// Panics with a readable description of where `got` differs from `expected`.
#[track_caller]
pub fn assert_bytes_eq(ctx: &str, expected: &[u8], got: &[u8]) {
    if expected == got {
        return;
    }
    let mut msg = format!(
        "{ctx}: data differs (expected {} bytes, got {} bytes)\n",
        expected.len(),
        got.len()
    );
    let n = expected.len().min(got.len());
    let mut diffs = 0usize;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < n {
        if expected[i] != got[i] {
            let start = i;
            while i < n && expected[i] != got[i] {
                diffs += 1;
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    let _ = writeln!(msg, "{diffs} differing bytes in {} runs", runs.len());
    for &(a, b) in runs.iter().take(8) {
        let show = (b - a).min(16);
        let _ = writeln!(
            msg,
            "  [{a:#x}..{b:#x}) ({} bytes): expected {:02x?} got {:02x?}",
            b - a,
            &expected[a..a + show],
            &got[a..a + show]
        );
    }
    panic!("{msg}");
}

/// Whether every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

// ---------------------------------------------------------------------------------------------
// Our crate.

pub fn opts(writable: bool, format: Option<Format>) -> OpenOptions {
    OpenOptions {
        writable,
        format,
        ..Default::default()
    }
}

#[track_caller]
pub fn open_ro(path: &Path) -> Image {
    Image::open(path, &opts(false, None))
        .unwrap_or_else(|e| panic!("Image::open({}) read-only: {e}", path.display()))
}

#[track_caller]
pub fn open_rw(path: &Path) -> Image {
    Image::open(path, &opts(true, None))
        .unwrap_or_else(|e| panic!("Image::open({}) writable: {e}", path.display()))
}

/// Reads `[off, off+len)` through `img`.
#[track_caller]
pub fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xee; len];
    img.read_at(off, &mut buf)
        .unwrap_or_else(|e| panic!("read_at({off:#x}, {len:#x}): {e}"));
    buf
}

/// Reads the whole virtual disk, 1 MiB (+ a little, so requests are unaligned) at a time.
#[track_caller]
pub fn read_all(img: &Image) -> Vec<u8> {
    let size = img.size();
    let mut out = Vec::with_capacity(size as usize);
    let chunk = MIB + 512 + 3;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        out.extend_from_slice(&read(img, off, n as usize));
        off += n;
    }
    out
}

/// Writes `model` as a raw file (holes where it is zero, in 4 KiB steps).
pub fn write_model_raw(path: &Path, model: &[u8]) {
    let f = File::create(path).expect("create model raw");
    f.set_len(model.len() as u64).unwrap();
    for (i, c) in model.chunks(4096).enumerate() {
        if !is_zero(c) {
            f.write_all_at(c, i as u64 * 4096).unwrap();
        }
    }
}

/// The closing checks after our crate wrote `img` (already closed): `qemu-img check` clean,
/// `qemu-img compare` identical to `model`, our own `check` clean, and a fresh open of ours
/// reads `model`.
#[track_caller]
pub fn verify_closed_image(img: &Path, model: &[u8]) {
    assert_qemu_check_clean(img);
    let dir = tmp();
    let raw = dir.path().join("model.raw");
    write_model_raw(&raw, model);
    assert_qemu_identical(img, "qcow2", &raw);
    let report = qcow::check(img, false).unwrap_or_else(|e| panic!("qcow::check: {e}"));
    assert!(report.is_clean(), "qcow::check not clean: {report:?}");
    let again = open_ro(img);
    assert_eq!(
        again.size(),
        model.len() as u64,
        "virtual size after reopen"
    );
    assert_bytes_eq("reopened image vs model", model, &read_all(&again));
    again.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Raw disk layouts for the read tests.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Incompressible bytes.
    Random,
    /// Compressible text-like bytes.
    Text,
    /// Zero bytes written out to the file.
    Zero,
    /// A hole in the sparse file.
    Hole,
}

/// A disk of `size` bytes made of runs of every kind (boundaries at arbitrary byte offsets,
/// runs up to `max_run` long), plus a hole of `big_hole` bytes at `size/4` (aligned to it) so
/// that even big clusters get whole zero clusters. Returns the data and the runs.
pub fn make_disk(
    seed: u64,
    size: u64,
    max_run: u64,
    big_hole: u64,
) -> (Vec<u8>, Vec<(u64, u64, Kind)>) {
    let mut r = Rng::new(seed);
    let mut data = vec![0u8; size as usize];
    let mut runs = Vec::new();
    let mut off = 0;
    while off < size {
        let len = r.range(1, max_run + 1).min(size - off);
        let kind = match r.below(10) {
            0..=3 => Kind::Random,
            4..=5 => Kind::Text,
            6..=7 => Kind::Zero,
            _ => Kind::Hole,
        };
        let range = off as usize..(off + len) as usize;
        match kind {
            Kind::Random => r.fill(&mut data[range]),
            Kind::Text => data[range].copy_from_slice(&compressible(r.next_u64(), len as usize)),
            Kind::Zero | Kind::Hole => {}
        }
        runs.push((off, len, kind));
        off += len;
    }
    if big_hole > 0 && big_hole * 2 <= size {
        let start = (size / 4) / big_hole * big_hole;
        data[start as usize..(start + big_hole) as usize].fill(0);
        runs.push((start, big_hole, Kind::Hole));
    }
    (data, runs)
}

/// Writes a disk made by [`make_disk`] as a sparse raw file: holes stay holes (including the
/// big hole, which is the last run when there is one), zero runs are written as zero bytes.
pub fn write_disk_raw(path: &Path, data: &[u8], runs: &[(u64, u64, Kind)]) {
    let f = FsOpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .expect("create raw");
    f.set_len(data.len() as u64).unwrap();
    let (hs, he) = match runs.last() {
        Some(&(off, len, Kind::Hole)) => (off, off + len),
        _ => (0, 0),
    };
    for &(off, len, kind) in runs {
        if kind == Kind::Hole {
            continue;
        }
        // Write the run minus its overlap with the big hole.
        for (a, b) in [(off, (off + len).min(hs)), (off.max(he), off + len)] {
            if a < b {
                f.write_all_at(&data[a as usize..b as usize], a).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw header surgery for the bad-input and check tests (qcow2 is big-endian).

pub fn get_be32(path: &Path, off: u64) -> u32 {
    let mut b = [0; 4];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u32::from_be_bytes(b)
}

pub fn get_be64(path: &Path, off: u64) -> u64 {
    let mut b = [0; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

pub fn put_bytes(path: &Path, off: u64, b: &[u8]) {
    FsOpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(b, off)
        .unwrap();
}

pub fn put_be16(path: &Path, off: u64, v: u16) {
    put_bytes(path, off, &v.to_be_bytes());
}

pub fn put_be32(path: &Path, off: u64, v: u32) {
    put_bytes(path, off, &v.to_be_bytes());
}

pub fn put_be64(path: &Path, off: u64, v: u64) {
    put_bytes(path, off, &v.to_be_bytes());
}

/// Header field offsets.
pub mod hdr {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_OFFSET: u64 = 8;
    pub const BACKING_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE: u64 = 72;
    pub const COMPATIBLE: u64 = 80;
    pub const AUTOCLEAR: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
}

/// The host offset of the data cluster backing guest offset `guest` (no extended L2, no
/// compression), or None when it is not allocated. Parses L1/L2 directly.
pub fn host_cluster_of(path: &Path, guest: u64) -> Option<u64> {
    let cluster_bits = get_be32(path, hdr::CLUSTER_BITS);
    let cs = 1u64 << cluster_bits;
    let l2_entries = cs / 8;
    let l1_off = get_be64(path, hdr::L1_OFFSET);
    let ci = guest / cs;
    let l1e = get_be64(path, l1_off + (ci / l2_entries) * 8);
    let l2 = l1e & 0x00ff_ffff_ffff_fe00;
    if l2 == 0 {
        return None;
    }
    let l2e = get_be64(path, l2 + (ci % l2_entries) * 8);
    let host = l2e & 0x00ff_ffff_ffff_fe00;
    (host != 0).then_some(host)
}

/// The file offset of the L2 entry for guest offset `guest` (its L2 table must exist).
pub fn l2_entry_offset(path: &Path, guest: u64) -> u64 {
    let cluster_bits = get_be32(path, hdr::CLUSTER_BITS);
    let cs = 1u64 << cluster_bits;
    let l2_entries = cs / 8;
    let l1_off = get_be64(path, hdr::L1_OFFSET);
    let ci = guest / cs;
    let l1e = get_be64(path, l1_off + (ci / l2_entries) * 8);
    let l2 = l1e & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "no L2 table for guest offset {guest:#x}");
    l2 + (ci % l2_entries) * 8
}

/// Sets the 16-bit refcount of host cluster `index` (refcount_bits must be 16 and its
/// refcount block must exist).
pub fn set_refcount16(path: &Path, index: u64, value: u16) {
    let cs = 1u64 << get_be32(path, hdr::CLUSTER_BITS);
    let per_block = cs / 2;
    let rt = get_be64(path, hdr::REFCOUNT_TABLE_OFFSET);
    let block = get_be64(path, rt + (index / per_block) * 8);
    assert_ne!(block, 0, "no refcount block for cluster {index}");
    put_be16(path, block + (index % per_block) * 2, value);
}

pub fn get_refcount16(path: &Path, index: u64) -> u16 {
    let cs = 1u64 << get_be32(path, hdr::CLUSTER_BITS);
    let per_block = cs / 2;
    let rt = get_be64(path, hdr::REFCOUNT_TABLE_OFFSET);
    let block = get_be64(path, rt + (index / per_block) * 8);
    let mut b = [0; 2];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, block + (index % per_block) * 2)
        .unwrap();
    u16::from_be_bytes(b)
}
