//! VM configuration: plain data produced by the command line and the API, validated before
//! anything is allocated.
//!
//! The JSON form of [`VmConfig`] is the body of `PUT /api/v1/vm/create` (see [`crate::api::body`]),
//! so what `GET /api/v1/vm/info` reports can be sent back to create the same VM.

use std::fmt;
use std::path::PathBuf;

pub use qcow::Format as DiskFormat;

use crate::arch::memory::MIN_MEMORY;

/// Largest vCPU count we describe: APIC IDs are 8 bits in our MADT and 0xff is broadcast.
pub const MAX_CPUS: u8 = 254;
/// Default kernel command line: serial console, reboot through the keyboard controller (which
/// ends the VM), and reboot one second after a panic (the pvpanic device reports it first).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Where the guest's serial console goes. In JSON, the same string as `--serial`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's standard output.
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// A virtio-blk disk. In JSON, an object with the keys of `--disk` (see [`crate::api::body`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "crate::api::body::Object<crate::api::body::DiskBody>")]
pub struct DiskConfig {
    /// Image file.
    pub path: PathBuf,
    /// Image format; None means "what the file's header says" (qcow2 or else raw).
    pub format: Option<DiskFormat>,
    /// The guest may not write.
    #[serde(rename = "readonly")]
    pub read_only: bool,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    pub serial: Option<String>,
    /// Open with O_DIRECT, bypassing the host page cache.
    pub direct: bool,
}

/// Longest disk serial virtio-blk can carry.
pub const MAX_SERIAL_LEN: usize = 20;

/// Everything needed to start a VM. Deserializing applies the command line's defaults and
/// rejects unknown fields, through [`crate::api::body::CreateBody`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "crate::api::body::Object<crate::api::body::CreateBody>")]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Serial console destination.
    pub serial: SerialConfig,
    /// virtio-blk disks, in PCI slot order (the first is /dev/vda).
    pub disks: Vec<DiskConfig>,
}

/// A configuration value that cannot work. Each message names the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string that does not parse.
    #[error("invalid size {0:?}: expected a byte count or a number with K, M, G or T (e.g. 512M)")]
    InvalidSize(String),
    /// Less memory than a guest can boot with.
    #[error("memory {got} bytes is too small: at least {min} bytes ({} MiB) are needed", min >> 20)]
    MemoryTooSmall {
        /// Requested.
        got: u64,
        /// Minimum.
        min: u64,
    },
    /// Memory not a multiple of the page size.
    #[error("memory {0} bytes is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    /// Zero or too many vCPUs.
    #[error("cpus {got} is out of range: must be between 1 and {max}")]
    CpuCount {
        /// Requested.
        got: u32,
        /// Maximum on this host.
        max: u32,
    },
    /// A file that must exist does not.
    #[error("{what} {path}: no such file")]
    MissingFile {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A `--disk` value that does not parse.
    #[error("invalid disk {value:?}: {reason}")]
    InvalidDisk {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A serial destination that does not parse.
    #[error("invalid serial {0:?}: expected stdout, off or file:PATH")]
    InvalidSerial(String),
}

/// Parses a size: a plain byte count, or a number with a K/M/G/T suffix (binary units, an
/// optional trailing "iB" or "B"), e.g. `512M`, `1G`, `2GiB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::InvalidSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(err()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

impl fmt::Display for SerialConfig {
    /// The `--serial` spelling, which [`parse_serial`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdout => f.write_str("stdout"),
            SerialConfig::Off => f.write_str("off"),
            SerialConfig::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl serde::Serialize for SerialConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SerialConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        parse_serial(&s).map_err(serde::de::Error::custom)
    }
}

/// Parses `stdout`, `off` or `file:PATH`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    match s {
        "stdout" => Ok(SerialConfig::Stdout),
        "off" | "none" => Ok(SerialConfig::Off),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(ConfigError::InvalidSerial(s.to_string())),
        },
    }
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

/// Checks a disk image path (`--disk path=` or the API's `path`): it may not be empty.
pub fn check_disk_path(value: &str) -> Result<&str, String> {
    if value.is_empty() {
        return Err("empty path".into());
    }
    Ok(value)
}

/// Parses a disk format (`--disk format=` or the API's `format`): `raw` or `qcow2`.
pub fn parse_disk_format(value: &str) -> Result<DiskFormat, String> {
    match value {
        "raw" => Ok(DiskFormat::Raw),
        "qcow2" => Ok(DiskFormat::Qcow2),
        _ => Err(format!("format={value}: expected raw or qcow2")),
    }
}

/// Checks a disk serial (`--disk serial=` or the API's `serial`) fits virtio-blk's GET_ID.
pub fn check_disk_serial(value: &str) -> Result<&str, String> {
    if value.len() > MAX_SERIAL_LEN {
        return Err(format!("serial is longer than {MAX_SERIAL_LEN} bytes"));
    }
    Ok(value)
}

/// Parses `path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,direct=on]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let err = |reason: String| ConfigError::InvalidDisk {
        value: s.to_string(),
        reason,
    };
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        format: None,
        read_only: false,
        serial: None,
        direct: false,
    };
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
        match key {
            "path" => disk.path = PathBuf::from(check_disk_path(value).map_err(err)?),
            "format" => disk.format = Some(parse_disk_format(value).map_err(err)?),
            "readonly" => disk.read_only = on_off(key, value).map_err(err)?,
            "direct" => disk.direct = on_off(key, value).map_err(err)?,
            "serial" => disk.serial = Some(check_disk_serial(value).map_err(err)?.to_string()),
            other => {
                return Err(err(format!(
                    "unknown key {other:?} (path, format, readonly, serial, direct)"
                )))
            }
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(err("path=FILE is required".into()));
    }
    Ok(disk)
}

impl VmConfig {
    /// Checks the vCPU count against `max_cpus` (what the host's KVM supports) and our own limit.
    pub fn check_cpus(&self, max_cpus: u32) -> Result<(), ConfigError> {
        let max = max_cpus.min(u32::from(MAX_CPUS));
        if self.cpus == 0 || u32::from(self.cpus) > max {
            return Err(ConfigError::CpuCount {
                got: u32::from(self.cpus),
                max,
            });
        }
        Ok(())
    }

    /// Checks the configuration against fixed limits and `max_cpus` (what the host's KVM
    /// supports), and that the files exist.
    pub fn validate(&self, max_cpus: u32) -> Result<(), ConfigError> {
        self.check_cpus(max_cpus)?;
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall {
                got: self.memory,
                min: MIN_MEMORY,
            });
        }
        if self.memory % 4096 != 0 {
            return Err(ConfigError::MemoryUnaligned(self.memory));
        }
        let files = std::iter::once(("kernel", &self.kernel))
            .chain(self.initramfs.iter().map(|p| ("initramfs", p)))
            .chain(self.disks.iter().map(|d| ("disk", &d.path)));
        for (what, path) in files {
            if !path.is_file() {
                return Err(ConfigError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size(" 1T "), Ok(1 << 40));
        for bad in [
            "",
            "M",
            "12X",
            "-1M",
            "1.5G",
            "G1",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn serial_destinations() {
        assert_eq!(parse_serial("stdout"), Ok(SerialConfig::Stdout));
        assert_eq!(parse_serial("off"), Ok(SerialConfig::Off));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/img/root.raw").unwrap();
        assert_eq!(d.path, PathBuf::from("/img/root.raw"));
        assert!(!d.read_only && !d.direct && d.serial.is_none() && d.format.is_none());
        let d = parse_disk("path=a.raw,readonly=on,serial=disk-1,direct=on").unwrap();
        assert!(d.read_only && d.direct);
        assert_eq!(d.serial.as_deref(), Some("disk-1"));
        let d = parse_disk("path=a.img,format=qcow2").unwrap();
        assert_eq!(d.format, Some(DiskFormat::Qcow2));
        let d = parse_disk("format=raw,path=a.img").unwrap();
        assert_eq!(d.format, Some(DiskFormat::Raw));
        for (bad, needle) in [
            ("readonly=on", "path=FILE is required"),
            ("path=", "empty path"),
            ("path=a,readonly=maybe", "expected on or off"),
            ("path=a,color=red", "unknown key"),
            ("path=a,format=vmdk", "format=vmdk: expected raw or qcow2"),
            ("path=a,format=", "format=: expected raw or qcow2"),
            ("path=a,serial=012345678901234567890", "longer than 20"),
            ("a.raw", "not key=value"),
        ] {
            let e = parse_disk(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    fn config(dir: &std::path::Path) -> VmConfig {
        let kernel = dir.join("k");
        std::fs::write(&kernel, b"x").unwrap();
        VmConfig {
            kernel,
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            memory: 128 << 20,
            serial: SerialConfig::Stdout,
            disks: Vec::new(),
        }
    }

    #[test]
    fn validation_names_the_bad_value() {
        let dir = tempfile::tempdir().unwrap();
        let good = config(dir.path());
        assert_eq!(good.validate(255), Ok(()));

        let c = VmConfig {
            cpus: 0,
            ..good.clone()
        };
        assert!(matches!(
            c.validate(255),
            Err(ConfigError::CpuCount { got: 0, .. })
        ));
        let c = VmConfig {
            cpus: 9,
            ..good.clone()
        };
        assert_eq!(
            c.validate(8).unwrap_err().to_string(),
            "cpus 9 is out of range: must be between 1 and 8"
        );
        let c = VmConfig {
            memory: 1 << 20,
            ..good.clone()
        };
        assert!(matches!(
            c.validate(8),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        let c = VmConfig {
            memory: (128 << 20) + 1,
            ..good.clone()
        };
        assert!(matches!(
            c.validate(8),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        let c = VmConfig {
            initramfs: Some(dir.path().join("nope")),
            ..good.clone()
        };
        let e = c.validate(8).unwrap_err().to_string();
        assert!(
            e.starts_with("initramfs ") && e.ends_with("nope: no such file"),
            "{e}"
        );
        let c = VmConfig {
            kernel: dir.path().to_path_buf(),
            ..good
        };
        assert!(matches!(
            c.validate(8),
            Err(ConfigError::MissingFile { what: "kernel", .. })
        ));
    }
}
