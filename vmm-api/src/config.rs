//! A VM's configuration as plain data: what `vmm`'s command line produces, what the API's create
//! body becomes, what `GET /api/v1/vm/info` reports and what a snapshot keeps. Serializing and
//! deserializing are plain serde (unknown fields refused); the command line's spelling of each
//! value is in [`crate::parse`], and the API server's defaults are its own.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ifname::IfNameError;
use crate::limits::{MAX_CPUS, MAX_DISK_SERIAL_LEN, MEMORY_ALIGN, MIN_MEMORY};
use crate::mac::{MacAddr, MacError};

/// Default kernel command line: serial console, reboot through the keyboard controller (which
/// ends the VM), and reboot one second after a panic (the pvpanic device reports it first).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Default number of vCPUs.
pub const DEFAULT_CPUS: u8 = 1;
/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

fn is_empty_path(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

/// Everything needed to start a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux (PVH or 64-bit entry) or bzImage. Empty when `firmware` boots
    /// the VM instead, and then left out of the JSON (the API takes one or the other).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub kernel: PathBuf,
    /// UEFI firmware (an ELF with a PVH entry, such as lightbyte's own `lightbyte-firmware`)
    /// started instead of a kernel: it boots whatever loader the first disk's EFI system
    /// partition holds, and hands `cmdline` to it as load options.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
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
    /// virtio-net devices, in PCI slot order after the disks (the first is eth0).
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device, after the network devices in PCI slot order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

/// A virtio-vsock device whose host side is Unix sockets (the protocol Firecracker and Cloud
/// Hypervisor use): a host process connects to `socket` and writes `CONNECT <port>\n` to reach
/// the guest's listener on that port; a guest connecting to host port P is joined to the Unix
/// socket listening at `<socket>_P`. In JSON, an object with the keys of `--vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more; 0-2 and 2^32-1 are reserved).
    pub cid: u32,
    /// Host Unix socket the VMM listens on for host-initiated connections; guest-initiated ones
    /// go to `<socket>_<port>`.
    pub socket: PathBuf,
}

/// Smallest guest context ID: 0 is the hypervisor, 1 local loopback, 2 the host.
pub const MIN_GUEST_CID: u32 = 3;

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

/// A disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Guest bytes are file bytes.
    Raw,
    /// QEMU copy-on-write version 2 or 3.
    Qcow2,
}

/// What a disk does when a write (or flush, discard, write-zeroes) fails on the host, as QEMU's
/// `werror`: the host's disk filling up should not become the guest's I/O error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The VM pauses, the request waits, and `resume` retries it (after the host is fixed:
    /// space freed, the file system back).
    #[default]
    Pause,
    /// The guest gets an I/O error for the request.
    Report,
}

/// A virtio-blk disk. In JSON, an object with the keys of `--disk`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// What a failed write does (reads always report their errors).
    #[serde(default, rename = "on-error")]
    pub on_error: OnError,
}

/// A virtio-net device on a host TAP interface. In JSON, an object with the keys of `--net`.
/// The MAC address is drawn when the configuration is made, so `info` shows it and a VM created
/// again from that configuration keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Host TAP interface (it must exist).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
}

/// What is wrong with one option of a `--disk` or `--net` value (or of the API's disk or net
/// object).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A comma-separated part without `=`.
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    /// A key the option does not have.
    #[error("unknown key {key:?} ({known})")]
    UnknownKey {
        /// The key given.
        key: String,
        /// The keys there are, comma-separated.
        known: &'static str,
    },
    /// A required key is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// An empty path.
    #[error("empty path")]
    EmptyPath,
    /// A flag that is neither on nor off.
    #[error("{key}={value}: expected on or off")]
    OnOff {
        /// The key.
        key: String,
        /// The value given.
        value: String,
    },
    /// An unknown disk format.
    #[error("format={0}: expected raw or qcow2")]
    Format(String),
    /// An unknown error policy.
    #[error("on-error={0}: expected pause or report")]
    OnError(String),
    /// A disk serial longer than GET_ID carries.
    #[error("serial is longer than {MAX_DISK_SERIAL_LEN} bytes")]
    SerialTooLong,
    /// A TAP name Linux would refuse.
    #[error("{}", tap_name_message(.0))]
    TapName(IfNameError),
    /// A MAC address that does not parse or cannot be a NIC's.
    #[error(transparent)]
    Mac(#[from] MacError),
    /// Two devices on one TAP (without IFF_MULTI_QUEUE a TAP takes one reader).
    #[error("the same tap is given twice")]
    DuplicateTap,
    /// A reserved or malformed context ID.
    #[error("cid={0}: expected a number from 3 to 4294967294 (0-2 and 4294967295 are reserved)")]
    Cid(String),
}

fn tap_name_message(e: &IfNameError) -> String {
    match e {
        IfNameError::Empty => "empty tap name".into(),
        IfNameError::TooLong(_) => {
            format!(
                "tap name is longer than {} bytes",
                crate::limits::MAX_IFNAME_LEN
            )
        }
        IfNameError::Invalid(name) => format!("{name:?} is not a valid interface name"),
    }
}

/// A configuration value that cannot work. Each message names the value.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
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
    /// Boot options that exclude each other.
    #[error("cannot boot {0}")]
    BootConflict(&'static str),
    /// A file that must exist does not.
    #[error("{what} {path}: no such file")]
    MissingFile {
        /// "kernel", "initramfs" or "disk".
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A `--disk` value that does not parse.
    #[error("invalid disk {value:?}: {reason}")]
    InvalidDisk {
        /// The value given (the path in the API).
        value: String,
        /// What is wrong with it.
        reason: OptionError,
    },
    /// A serial destination that does not parse.
    #[error("invalid serial {0:?}: expected stdout, off or file:PATH")]
    InvalidSerial(String),
    /// A `--net` value that does not parse or cannot work.
    #[error("invalid net {value:?}: {reason}")]
    InvalidNet {
        /// The value given (the TAP name in the API).
        value: String,
        /// What is wrong with it.
        reason: OptionError,
    },
    /// A `--vsock` value that does not parse.
    #[error("invalid vsock {value:?}: {reason}")]
    InvalidVsock {
        /// The value given (the socket path in the API).
        value: String,
        /// What is wrong with it.
        reason: OptionError,
    },
    /// A TAP interface that is not there.
    #[error("net {0}: no such network interface (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    NoSuchInterface(String),
}

impl VmConfig {
    /// A configuration with the command line's defaults for everything but the kernel.
    pub fn with_kernel(kernel: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            firmware: None,
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            cpus: DEFAULT_CPUS,
            memory: DEFAULT_MEMORY,
            serial: SerialConfig::Stdout,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        }
    }

    /// Checks the vCPU count against `max_cpus` (what the host's KVM supports) and
    /// [`MAX_CPUS`].
    pub fn check_cpus(&self, max_cpus: u32) -> Result<(), ConfigError> {
        check_cpu_count(u32::from(self.cpus), max_cpus)
    }

    /// A configuration with the command line's defaults that boots through UEFI `firmware`.
    pub fn with_firmware(firmware: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            firmware: Some(firmware.into()),
            ..VmConfig::with_kernel(PathBuf::new())
        }
    }

    /// The image the VMM loads: the firmware if there is one, else the kernel.
    pub fn boot_image(&self) -> (&'static str, &std::path::Path) {
        match &self.firmware {
            Some(f) => ("firmware", f),
            None => ("kernel", &self.kernel),
        }
    }

    /// Checks that the boot options go together: a firmware excludes a kernel and an initramfs.
    pub fn check_boot(&self) -> Result<(), ConfigError> {
        if self.firmware.is_some() {
            if !self.kernel.as_os_str().is_empty() {
                return Err(ConfigError::BootConflict("a kernel and a firmware"));
            }
            if self.initramfs.is_some() {
                return Err(ConfigError::BootConflict(
                    "an initramfs with a firmware (the boot loader on the disk loads it)",
                ));
            }
        }
        Ok(())
    }

    /// Checks what needs no host: vCPU count (against `max_cpus` and [`MAX_CPUS`]), memory
    /// size and alignment, one device per TAP, boot options. Files and interfaces are the
    /// VMM's to check.
    pub fn check_limits(&self, max_cpus: u32) -> Result<(), ConfigError> {
        self.check_cpus(max_cpus)?;
        self.check_boot()?;
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall {
                got: self.memory,
                min: MIN_MEMORY,
            });
        }
        if self.memory % MEMORY_ALIGN != 0 {
            return Err(ConfigError::MemoryUnaligned(self.memory));
        }
        for (i, net) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|n| n.tap == net.tap) {
                return Err(ConfigError::InvalidNet {
                    value: net.tap.clone(),
                    reason: OptionError::DuplicateTap,
                });
            }
        }
        if let Some(v) = &self.vsock {
            crate::parse::check_vsock(v)?;
        }
        Ok(())
    }
}

/// Checks a vCPU count (wide, so that 300 from a client gets the range message) against
/// `max_cpus` and [`MAX_CPUS`].
pub fn check_cpu_count(cpus: u32, max_cpus: u32) -> Result<(), ConfigError> {
    let max = max_cpus.min(u32::from(MAX_CPUS));
    if cpus == 0 || cpus > max {
        return Err(ConfigError::CpuCount { got: cpus, max });
    }
    Ok(())
}

impl fmt::Display for SerialConfig {
    /// The `--serial` spelling, which [`crate::parse::parse_serial`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdout => f.write_str("stdout"),
            SerialConfig::Off => f.write_str("off"),
            SerialConfig::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl Serialize for SerialConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SerialConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        crate::parse::parse_serial(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            memory: 128 << 20,
            ..VmConfig::with_kernel("/k")
        }
    }

    #[test]
    fn limits_name_the_bad_value() {
        assert_eq!(config().check_limits(255), Ok(()));
        let c = VmConfig {
            cpus: 0,
            ..config()
        };
        assert!(matches!(
            c.check_limits(255),
            Err(ConfigError::CpuCount { got: 0, .. })
        ));
        let c = VmConfig {
            cpus: 9,
            ..config()
        };
        assert_eq!(
            c.check_limits(8).unwrap_err().to_string(),
            "cpus 9 is out of range: must be between 1 and 8"
        );
        let c = VmConfig {
            memory: 1 << 20,
            ..config()
        };
        assert!(matches!(
            c.check_limits(8),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        let c = VmConfig {
            memory: (128 << 20) + 1,
            ..config()
        };
        assert!(matches!(
            c.check_limits(8),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        let net = |tap: &str| NetConfig {
            tap: tap.into(),
            mac: MacAddr::random(),
        };
        let c = VmConfig {
            nets: vec![net("t0"), net("t0")],
            ..config()
        };
        let e = c.check_limits(8).unwrap_err().to_string();
        assert!(e.contains("the same tap is given twice"), "{e}");
        assert_eq!(
            check_cpu_count(300, 1000).unwrap_err().to_string(),
            "cpus 300 is out of range: must be between 1 and 254"
        );
    }

    #[test]
    fn json_is_plain_serde_and_round_trips() {
        let c = VmConfig {
            disks: vec![DiskConfig {
                path: "/d".into(),
                format: Some(DiskFormat::Qcow2),
                read_only: true,
                serial: Some("s".into()),
                direct: false,
                on_error: OnError::Report,
            }],
            nets: vec![NetConfig {
                tap: "tap0".into(),
                mac: "52:54:00:00:00:0a".parse().unwrap(),
            }],
            serial: SerialConfig::File("/tmp/c".into()),
            ..config()
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""serial":"file:/tmp/c""#), "{json}");
        assert!(
            json.contains(r#""format":"qcow2","readonly":true"#),
            "{json}"
        );
        assert!(
            json.contains(r#"{"tap":"tap0","mac":"52:54:00:00:00:0a"}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
        let unknown = json.replacen('{', r#"{"colour":1,"#, 1);
        assert!(serde_json::from_str::<VmConfig>(&unknown).is_err());
    }
}
