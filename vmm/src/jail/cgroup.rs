//! Joining the cgroup v2 directory a jailed VMM was given. Whoever starts the VMM made the
//! directory and wrote its limits (the worker: memory, CPU and pids from the VM's size); the
//! VMM moves itself in while it is still root, before it allocates guest memory or spawns a
//! thread, so everything it ever uses is counted.

use std::io::{self, Write};
use std::path::Path;

/// Moves this process into the cgroup at `dir`.
pub fn join(dir: &Path) -> io::Result<()> {
    let procs = dir.join("cgroup.procs");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: {e} (a cgroup v2 directory?)", procs.display()),
            )
        })?;
    f.write_all(std::process::id().to_string().as_bytes())
}
