//! Link options for the `vmm` binary, chosen for the memory every running VMM costs.
//!
//! Relative relocations are packed (`DT_RELR`, binutils ≥ 2.38 with glibc ≥ 2.36): a
//! position-independent Rust binary carries about ten thousand of them (vtables, panic
//! locations, log call sites), and the dynamic loader reads the whole 24-byte-per-entry table at
//! every start, so the table stayed resident in every VMM process (~250 KiB of the binary's
//! first mapping). Packed, the table is a few KiB of bitmaps. The option is used when the linker
//! takes it, so an older toolchain still builds a working (larger) binary.

use std::env;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const PACK_RELOCS: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let linux_gnu = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if linux_gnu && linker_takes(PACK_RELOCS) {
        println!("cargo:rustc-link-arg-bins={PACK_RELOCS}");
    }
}

/// Whether the C compiler driver rustc links with accepts `flag` when linking a program.
fn linker_takes(flag: &str) -> bool {
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let probe = out_dir.join("relr-probe");
    let child = Command::new(cc)
        .args(["-x", "c", "-", "-o"])
        .arg(&probe)
        .arg(flag)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let wrote = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(b"int main(void) { return 0; }\n").is_ok())
        .unwrap_or(false);
    let ok = child.wait().map(|s| s.success()).unwrap_or(false);
    // A linker that ignores the flag silently gives no gain but no harm either; one that
    // rejects it fails the probe.
    wrote && ok
}
