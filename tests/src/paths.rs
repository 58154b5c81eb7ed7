//! Where the repository, the built binaries and the harness's scratch space are.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cargo profile directory holding the binaries (`target/debug` or `target/release`),
/// found from the running executable: test binaries live in its `deps/` subdirectory.
pub fn profile_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LIGHTBYTE_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    Ok(if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().context("deps/ has no parent")?.to_path_buf()
    } else {
        dir.to_path_buf()
    })
}

/// A workspace binary built in the same profile as the running executable.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = profile_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the workspace binaries first (cargo build --bins, with the same \
             profile as the tests)",
            path.display()
        );
    }
    Ok(path)
}
