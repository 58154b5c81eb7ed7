//! VM configuration: the plain types live in `vmm_api` (shared with the VMM's clients); this
//! module adds what only the host running the VM can check (files, interfaces, its KVM's vCPU
//! limit), before anything is allocated.

pub use vmm_api::config::{
    ConfigError, DiskConfig, DiskFormat, NetConfig, OnError, SerialConfig, VmConfig, VsockConfig,
    DEFAULT_CMDLINE,
};
pub use vmm_api::limits::{MAX_CPUS, MIN_MEMORY};

/// Checks `cfg` against fixed limits and `max_cpus` (what the host's KVM supports), that its
/// files exist and that its TAP interfaces are there.
pub fn validate(cfg: &VmConfig, max_cpus: u32) -> Result<(), ConfigError> {
    cfg.check_limits(max_cpus)?;
    let (image_kind, image) = cfg.boot_image();
    let image = image.to_path_buf();
    let files = std::iter::once((image_kind, &image))
        .chain(cfg.initramfs.iter().map(|p| ("initramfs", p)))
        .chain(cfg.disks.iter().map(|d| ("disk", &d.path)));
    for (what, path) in files {
        if !path.is_file() {
            return Err(ConfigError::MissingFile {
                what,
                path: path.clone(),
            });
        }
    }
    for net in &cfg.nets {
        if !vmm_api::ifname::exists(&net.tap) {
            return Err(ConfigError::NoSuchInterface(net.tap.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_api::MacAddr;

    fn config(dir: &std::path::Path) -> VmConfig {
        let kernel = dir.join("k");
        std::fs::write(&kernel, b"x").unwrap();
        VmConfig {
            memory: 128 << 20,
            ..VmConfig::with_kernel(kernel)
        }
    }

    #[test]
    fn nets_must_exist_and_be_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let net = |tap: &str| NetConfig {
            tap: tap.into(),
            mac: MacAddr::random(),
        };
        let c = VmConfig {
            nets: vec![net("lo")],
            ..config(dir.path())
        };
        assert_eq!(validate(&c, 8), Ok(()));
        let c = VmConfig {
            nets: vec![net("lb-no-such-if")],
            ..config(dir.path())
        };
        let e = validate(&c, 8).unwrap_err().to_string();
        assert!(
            e.contains("net lb-no-such-if: no such network interface"),
            "{e}"
        );
        let c = VmConfig {
            nets: vec![net("lo"), net("lo")],
            ..config(dir.path())
        };
        let e = validate(&c, 8).unwrap_err().to_string();
        assert!(e.contains("the same tap is given twice"), "{e}");
    }

    #[test]
    fn validation_names_the_bad_value() {
        let dir = tempfile::tempdir().unwrap();
        let good = config(dir.path());
        assert_eq!(validate(&good, 255), Ok(()));

        let c = VmConfig {
            cpus: 0,
            ..good.clone()
        };
        assert!(matches!(
            validate(&c, 255),
            Err(ConfigError::CpuCount { got: 0, .. })
        ));
        let c = VmConfig {
            cpus: 9,
            ..good.clone()
        };
        assert_eq!(
            validate(&c, 8).unwrap_err().to_string(),
            "cpus 9 is out of range: must be between 1 and 8"
        );
        let c = VmConfig {
            memory: 1 << 20,
            ..good.clone()
        };
        assert!(matches!(
            validate(&c, 8),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        let c = VmConfig {
            memory: (128 << 20) + 1,
            ..good.clone()
        };
        assert!(matches!(
            validate(&c, 8),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        let c = VmConfig {
            initramfs: Some(dir.path().join("nope")),
            ..good.clone()
        };
        let e = validate(&c, 8).unwrap_err().to_string();
        assert!(
            e.starts_with("initramfs ") && e.ends_with("nope: no such file"),
            "{e}"
        );
        let c = VmConfig {
            kernel: dir.path().to_path_buf(),
            ..good
        };
        assert!(matches!(
            validate(&c, 8),
            Err(ConfigError::MissingFile { what: "kernel", .. })
        ));
    }
}
