//! Snapshot and restore: a paused VM written to a directory — `memory` (guest RAM, sparse) and
//! `state.json` (format version, the VM's configuration, KVM VM and vCPU state, each device's
//! state) — and rebuilt from it in another process ([`restore`]).
//!
//! A diff snapshot's `memory` holds only the pages written since the VM's last snapshot or
//! restore, its base, which `state.json` names (`base`), that differ from what the base's chain
//! restores there; restore reads the full snapshot at the bottom of the chain and each diff on
//! top of it in order.
//!
//! Every piece saves and restores its own state ([`crate::persist::Persist`]); this module only
//! gathers the pieces and stores them. Devices are restored by replaying the register writes
//! that programmed them through the code paths a driver uses (see
//! [`crate::devices::pci::persist`]), and virtio queues resume at the used index found in guest
//! memory, which is where a quiesced device stands.

mod lazy;
mod memory;
mod plan;
mod restore;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::lazy::{preopen as preopen_memory_loader, Loader};
pub use self::memory::MemoryError;
pub use self::restore::restore;
use crate::config::VmConfig;
use crate::control::ControlError;
use crate::devices::pci::persist::PciSlotState;
use crate::devices::serial::UartState;
use crate::running::{CaptureError, RunningVm};
use crate::vstate::kvm_state::{VcpuState, VmState};

/// Version of the snapshot format written. Version 2 stores the VM's configuration as
/// `vmm_api`'s plain `VmConfig` and each device's own state; version 3 adds diff snapshots
/// (`base`, and the pages of each memory region); version 4 writes KVM's structures as base64
/// strings ([`crate::vstate::blob`]). Restore reads all three.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format restore reads.
const OLDEST_FORMAT: u32 = 2;
/// How many diffs may sit on a full snapshot (a longer chain is more likely a loop).
const MAX_CHAIN: usize = 64;
const STATE_FILE: &str = "state.json";
const MEMORY_FILE: &str = "memory";

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The destination holds a snapshot already.
    #[error("{} already holds a snapshot", .0.display())]
    Exists(PathBuf),
    /// A file of the snapshot could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// `state.json` is not a snapshot's.
    #[error("{}: not a snapshot: {source}", path.display())]
    NotASnapshot {
        /// The directory.
        path: PathBuf,
        /// What does not parse.
        source: serde_json::Error,
    },
    /// A snapshot of another format version.
    #[error(
        "unsupported snapshot version: format {found} (vmm {vmm_version}) is not supported: \
         this vmm reads formats {OLDEST_FORMAT} to {FORMAT_VERSION}"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u32,
        /// The vmm that wrote it.
        vmm_version: String,
    },
    /// The saved state does not fit its own configuration.
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(&'static str),
    /// A diff snapshot's chain of bases is broken.
    #[error("{}: {reason}", path.display())]
    Chain {
        /// The snapshot whose base is missing or wrong.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The paused VM's state could not be read.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// Guest memory could not be saved or mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be rebuilt.
    #[error(transparent)]
    Build(#[from] crate::builder::Error),
    /// The saved state of a piece does not fit the VM rebuilt from the snapshot's own
    /// configuration (a damaged or edited snapshot).
    #[error("restoring {what}: the snapshot does not fit: {source}")]
    Unfit {
        /// Which piece.
        what: &'static str,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A piece of the rebuilt VM refused its saved state.
    #[error("restoring {what}: {source}")]
    Restore {
        /// Which piece.
        what: &'static str,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// True when the request was at fault (the snapshot or destination given), not the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Exists(_)
            | Error::NotASnapshot { .. }
            | Error::UnsupportedVersion { .. }
            | Error::Inconsistent(_)
            | Error::Chain { .. }
            | Error::Unfit { .. } => true,
            Error::Build(e) => e.is_bad_input(),
            Error::Memory(e) => e.is_bad_input(),
            _ => false,
        }
    }

    fn restore(
        what: &'static str,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        move |source| Error::Restore { what, source }
    }
}

impl From<Error> for ControlError {
    fn from(e: Error) -> ControlError {
        if e.is_bad_input() {
            ControlError::BadRequest(e.to_string())
        } else {
            ControlError::Internal(e.to_string())
        }
    }
}

/// What `state.json` holds.
#[derive(Serialize, Deserialize)]
struct State {
    format_version: u32,
    vmm_version: String,
    config: VmConfig,
    /// A diff's base: the snapshot directory its memory goes on top of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<PathBuf>,
    memory: Vec<memory::Region>,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    serial: UartState,
    pci: Vec<PciSlotState>,
}

/// The part of `state.json` read again when the whole does not parse, so that any older or
/// newer format is refused by its version rather than by whatever field it lacks.
#[derive(Deserialize)]
struct Header {
    format_version: u32,
    #[serde(default)]
    vmm_version: String,
}

/// Writes a snapshot of the paused `vm` (configured by `cfg`) into `dir` (created if needed,
/// must hold no snapshot yet): a full one, or with `base` a diff on top of that snapshot (the
/// VM's last snapshot or restore). Returns the base for the VM's next diff: `dir` itself (as
/// an absolute path), or nothing when the host cannot mark the pages clean.
pub fn save(
    vm: &RunningVm,
    cfg: &VmConfig,
    dir: &Path,
    base: Option<&Path>,
) -> Result<Option<PathBuf>, Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    // A new directory is the owner's alone (0700); the files in it are 0600 (guest memory and
    // device state hold the guest's secrets).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    if dir.join(STATE_FILE).exists() || dir.join(MEMORY_FILE).exists() {
        return Err(Error::Exists(dir.to_path_buf()));
    }
    let dir = fs::canonicalize(dir).map_err(io(dir))?;
    // A VM restored moments ago may still be loading its memory: the page map must see all of it.
    vm.memory_loaded()
        .map_err(|e| Error::Memory(MemoryError::Regions(e)))?;
    // A diff keeps only the pages that differ from what its base chain restores.
    let base_plan = match base {
        Some(b) => {
            let state = load(b).map_err(|e| Error::Chain {
                path: dir.clone(),
                reason: format!("its base {}: {e}", b.display()),
            })?;
            Some(plan::resolve(&memory_layers(b, state.memory, state.base)?)?)
        }
        None => None,
    };
    let captured = vm.capture()?;
    let kind = match &base_plan {
        Some(plan) => memory::Kind::Diff(plan),
        None => memory::Kind::Full,
    };
    let regions = memory::save(vm.memory(), &dir.join(MEMORY_FILE), kind)?;
    let state = State {
        format_version: FORMAT_VERSION,
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        config: cfg.clone(),
        base: base.map(Path::to_path_buf),
        memory: regions,
        vm: captured.vm,
        vcpus: captured.vcpus,
        serial: captured.serial,
        pci: captured.pci,
    };
    let json = serde_json::to_vec(&state).map_err(|e| io(&dir)(e.into()))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&json)?;
            // On disk before its name says the snapshot is whole.
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, dir.join(STATE_FILE)))
        // The names too (`state.json`, and `memory` created above): a snapshot the API called
        // done must survive a power loss.
        .and_then(|()| fs::File::open(&dir)?.sync_all())
        .map_err(io(&dir))?;
    Ok(mark_clean().then_some(dir))
}

/// Marks guest memory clean, so that the next diff holds only what is written from now on.
/// False when it cannot be (diffs then need a new full snapshot first).
fn mark_clean() -> bool {
    let result = crate::vstate::pagemap::get()
        .map_err(str::to_string)
        .and_then(|m| m.clear_soft_dirty().map_err(|e| e.to_string()));
    if let Err(e) = &result {
        tracing::debug!(error = %e, "guest memory not marked clean: no diff snapshots");
    }
    result.is_ok()
}

/// Refuses a format this vmm does not read, by its version.
fn check_version(format_version: u32, vmm_version: &str) -> Result<(), Error> {
    if (OLDEST_FORMAT..=FORMAT_VERSION).contains(&format_version) {
        return Ok(());
    }
    Err(Error::UnsupportedVersion {
        found: format_version,
        vmm_version: vmm_version.to_string(),
    })
}

/// Reads and checks `state.json` in `dir`.
fn load(dir: &Path) -> Result<State, Error> {
    let path = dir.join(STATE_FILE);
    let text = fs::read(&path).map_err(|source| Error::Io { path, source })?;
    let not_a_snapshot = |source| Error::NotASnapshot {
        path: dir.to_path_buf(),
        source,
    };
    // Parsed once: a first pass for the header alone took 2–8 ms of a restore request in the
    // test host (the whole document is scanned either way). The header only explains a
    // failure.
    let state: State = serde_json::from_slice(&text).map_err(|e| {
        match serde_json::from_slice::<Header>(&text) {
            Ok(h) => match check_version(h.format_version, &h.vmm_version) {
                Err(unsupported) => unsupported,
                Ok(()) => not_a_snapshot(e),
            },
            Err(_) => not_a_snapshot(e),
        }
    })?;
    check_version(state.format_version, &state.vmm_version)?;
    if state.vcpus.len() != usize::from(state.config.cpus) {
        return Err(Error::Inconsistent(
            "its vCPU count does not match its configuration",
        ));
    }
    Ok(state)
}

/// The memory of the snapshot in `dir` (`memory`, on `base` for a diff) as layers: the full
/// snapshot at the bottom of its chain first, then each diff on it in order.
fn memory_layers(
    dir: &Path,
    memory: Vec<memory::Region>,
    base: Option<PathBuf>,
) -> Result<Vec<memory::Layer>, Error> {
    let mut chain = vec![memory::Layer {
        path: dir.join(MEMORY_FILE),
        regions: memory,
    }];
    let mut next = base.map(|b| (dir.to_path_buf(), b));
    while let Some((child, base)) = next {
        if chain.len() > MAX_CHAIN {
            return Err(Error::Chain {
                path: child,
                reason: format!("more than {MAX_CHAIN} diff snapshots on one base (a loop?)"),
            });
        }
        let state = load(&base).map_err(|e| Error::Chain {
            path: child.clone(),
            reason: format!("its base {}: {e}", base.display()),
        })?;
        chain.push(memory::Layer {
            path: base.join(MEMORY_FILE),
            regions: state.memory,
        });
        next = state.base.map(|b| (base, b));
    }
    chain.reverse();
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_versions_are_refused_by_version() {
        let dir = tempfile::tempdir().unwrap();
        // A version 1 snapshot: its configuration had another shape, which must not matter.
        fs::write(
            dir.path().join(STATE_FILE),
            br#"{"format_version":1,"vmm_version":"0.1.0","config":{"serial":"Off"}}"#,
        )
        .unwrap();
        let e = load(dir.path()).err().expect("version 1 refused");
        assert!(
            matches!(e, Error::UnsupportedVersion { found: 1, .. }),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("unsupported snapshot version"),
            "{e}"
        );
        assert!(e.is_bad_input());

        fs::write(dir.path().join(STATE_FILE), b"{\"vm\":1}").unwrap();
        let e = load(dir.path()).err().expect("no version refused");
        assert!(matches!(e, Error::NotASnapshot { .. }), "{e}");

        let e = load(&dir.path().join("missing")).err().expect("no state");
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    /// A state that parses whole, with `format_version`.
    fn whole_state(format_version: u32) -> String {
        format!(
            r#"{{"format_version":{format_version},"vmm_version":"9.9.9",
            "config":{{"kernel":"/k","firmware":null,"initramfs":null,"cmdline":"x","cpus":1,
              "memory":268435456,"serial":"off","disks":[],"nets":[]}},
            "memory":[],
            "vm":{{"pic_master":[],"pic_slave":[],"ioapic":[],"pit":[],"clock":[]}},
            "vcpus":[{{"regs":[],"sregs":[],"xsave":[],"xcrs":[],"debugregs":[],"lapic":[],
              "msrs":[],"events":[],"mp_state":[]}}],
            "serial":{{"baud_divisor_low":12,"baud_divisor_high":0,"interrupt_enable":0,
              "interrupt_identification":1,"line_control":3,"line_status":96,
              "modem_control":8,"modem_status":176,"scratch":0,"in_buffer":[]}},
            "pci":[]}}"#
        )
    }

    #[test]
    fn a_newer_state_that_parses_is_still_refused_by_version() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(STATE_FILE);
        fs::write(&state, whole_state(FORMAT_VERSION)).unwrap();
        let loaded = load(dir.path()).expect("the current format loads");
        assert_eq!(loaded.vmm_version, "9.9.9");

        fs::write(&state, whole_state(FORMAT_VERSION + 1)).unwrap();
        let e = load(dir.path()).err().expect("a newer format refused");
        assert!(
            matches!(&e, Error::UnsupportedVersion { found, vmm_version }
                if *found == FORMAT_VERSION + 1 && vmm_version == "9.9.9"),
            "{e}"
        );
    }

    #[test]
    fn a_diff_whose_base_is_gone_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("base-moved-away");
        let e = memory_layers(dir.path(), Vec::new(), Some(gone.clone()))
            .expect_err("missing base refused");
        let msg = e.to_string();
        assert!(matches!(e, Error::Chain { .. }), "{msg}");
        assert!(msg.contains(&gone.display().to_string()), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(e.is_bad_input());
        // A full snapshot is one layer of its own.
        let layers = memory_layers(dir.path(), Vec::new(), None).unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].path, dir.path().join(MEMORY_FILE));
    }
}
