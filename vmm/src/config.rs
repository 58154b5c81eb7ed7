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

/// An Ethernet MAC address. In JSON and on the command line, six two-digit hex octets separated
/// by colons (`52:54:00:12:34:56`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random unicast address with the locally administered bit set, so it cannot collide with
    /// a vendor-assigned one.
    pub fn random() -> MacAddr {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most `b.len()` bytes into the buffer it is given.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if usize::try_from(n).ok() != Some(b.len()) {
            // No kernel entropy interface: the clock still tells VMs started apart.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let mixed = (t as u64) ^ (u64::from(std::process::id()) << 40);
            b.copy_from_slice(&mixed.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    /// Six colon-separated octets of two hex digits; a guest NIC needs a unicast address, and
    /// all zeroes means "none" to most drivers.
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad = || format!("mac={s}: expected six hex octets like 52:54:00:12:34:56");
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut b {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if b[0] & 1 != 0 {
            return Err(format!(
                "mac={s}: a multicast address (lowest bit of the first octet set) cannot be a NIC's"
            ));
        }
        if b == [0; 6] {
            return Err(format!("mac={s}: the all-zero address is not usable"));
        }
        Ok(MacAddr(b))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-net device on a host TAP interface. In JSON, an object with the keys of `--net`
/// (see [`crate::api::body`]); the MAC address is drawn when the configuration is made, so
/// `info` shows it and a VM created again from that configuration keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "crate::api::body::Object<crate::api::body::NetBody>")]
pub struct NetConfig {
    /// Host TAP interface (it must exist).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
}

/// Longest interface name Linux accepts (IFNAMSIZ minus the terminating NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

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
    /// virtio-net devices, in PCI slot order after the disks (the first is eth0).
    pub nets: Vec<NetConfig>,
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
    /// A `--net` value that does not parse or cannot work.
    #[error("invalid net {value:?}: {reason}")]
    InvalidNet {
        /// The value given (the TAP name in the API).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TAP interface that is not there.
    #[error("net {0}: no such network interface (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    NoSuchInterface(String),
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

/// Checks a TAP interface name (`--net tap=` or the API's `tap`) the way Linux does.
pub fn check_tap_name(value: &str) -> Result<&str, String> {
    if value.is_empty() {
        return Err("empty tap name".into());
    }
    if value.len() > MAX_IFNAME_LEN {
        return Err(format!("tap name is longer than {MAX_IFNAME_LEN} bytes"));
    }
    if value == "."
        || value == ".."
        || value
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err(format!("{value:?} is not a valid interface name"));
    }
    Ok(value)
}

/// Parses `tap=NAME[,mac=MAC]`; without `mac`, a random locally administered address.
pub fn parse_net(s: &str) -> Result<NetConfig, ConfigError> {
    let err = |reason: String| ConfigError::InvalidNet {
        value: s.to_string(),
        reason,
    };
    let mut tap = None;
    let mut mac = None;
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
        match key {
            "tap" => tap = Some(check_tap_name(value).map_err(err)?.to_string()),
            "mac" => mac = Some(value.parse::<MacAddr>().map_err(err)?),
            other => return Err(err(format!("unknown key {other:?} (tap, mac)"))),
        }
    }
    let tap = tap.ok_or_else(|| err("tap=NAME is required".into()))?;
    Ok(NetConfig {
        tap,
        mac: mac.unwrap_or_else(MacAddr::random),
    })
}

/// True when the network interface `name` exists in this network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
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
        for (i, net) in self.nets.iter().enumerate() {
            // A TAP without IFF_MULTI_QUEUE takes one reader: the second would fail at boot.
            if self.nets[..i].iter().any(|n| n.tap == net.tap) {
                return Err(ConfigError::InvalidNet {
                    value: net.tap.clone(),
                    reason: "the same tap is given twice".into(),
                });
            }
            if !interface_exists(&net.tap) {
                return Err(ConfigError::NoSuchInterface(net.tap.clone()));
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

    #[test]
    fn nets() {
        let n = parse_net("tap=tap0,mac=52:54:00:AB:cd:0e").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0x0e]));
        assert_eq!(n.mac.to_string(), "52:54:00:ab:cd:0e");
        let a = parse_net("tap=t").unwrap().mac;
        let b = parse_net("mac=02:00:00:00:00:01,tap=t").unwrap().mac;
        assert_eq!(b.to_string(), "02:00:00:00:00:01");
        assert_eq!(
            a.0[0] & 3,
            2,
            "random MACs are unicast and locally administered: {a}"
        );
        assert_ne!(
            a,
            parse_net("tap=t").unwrap().mac,
            "drawn per configuration"
        );
        for (bad, needle) in [
            ("tap=", "empty tap name"),
            ("mac=52:54:00:12:34:56", "tap=NAME is required"),
            ("tap=t,speed=1", "unknown key \"speed\""),
            ("tap=0123456789abcdef", "longer than 15 bytes"),
            ("tap=a/b", "not a valid interface name"),
            ("tap=..", "not a valid interface name"),
            ("tap=t,mac=52:54:00:12:34", "six hex octets"),
            ("tap=t,mac=52:54:00:12:34:56:78", "six hex octets"),
            ("tap=t,mac=52-54-00-12-34-56", "six hex octets"),
            ("tap=t,mac=5:54:00:12:34:56", "six hex octets"),
            ("tap=t,mac=zz:54:00:12:34:56", "six hex octets"),
            ("tap=t,mac=+5:54:00:12:34:56", "six hex octets"),
            ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t,mac=00:00:00:00:00:00", "all-zero"),
            ("tap0", "not key=value"),
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
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
        assert_eq!(c.validate(8), Ok(()));
        let c = VmConfig {
            nets: vec![net("lb-no-such-if")],
            ..config(dir.path())
        };
        let e = c.validate(8).unwrap_err().to_string();
        assert!(
            e.contains("net lb-no-such-if: no such network interface"),
            "{e}"
        );
        let c = VmConfig {
            nets: vec![net("lo"), net("lo")],
            ..config(dir.path())
        };
        let e = c.validate(8).unwrap_err().to_string();
        assert!(e.contains("the same tap is given twice"), "{e}");
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
            nets: Vec::new(),
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
