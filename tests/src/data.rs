//! Test data: deterministic byte patterns and checksums.

use std::path::Path;
use std::process::Command;

/// Deterministic, position-dependent bytes: any misplaced or lost block shows up.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// sha256 of a file, hex, from `sha256sum`.
pub fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8(out.stdout).expect("hex")[..64].to_string()
}

/// Runs `qemu-img` (the independent oracle of the image tests); returns (exit code, output).
pub fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (apt-get install qemu-utils)");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs `qemu-io` commands on an image, panicking with its output on failure.
pub fn qemu_io(image: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(image).output().expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?} on {}: {text}{}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
