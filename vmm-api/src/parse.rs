//! The command line's spelling of configuration values (`--memory 512M`, `--serial file:PATH`,
//! `--disk path=FILE,readonly=on`, `--net tap=NAME,mac=MAC`). The API server reads the same
//! values in JSON through the same checks, so both refuse exactly the same things.

use std::path::PathBuf;

use crate::config::{
    ConfigError, DiskConfig, DiskFormat, NetConfig, OnError, OptionError, SerialConfig,
    VsockConfig, MIN_GUEST_CID,
};
use crate::limits::MAX_DISK_SERIAL_LEN;
use crate::mac::MacAddr;

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

fn on_off(key: &str, value: &str) -> Result<bool, OptionError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(OptionError::OnOff {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

/// Checks a disk image path (`--disk path=` or the API's `path`): it may not be empty.
pub fn check_disk_path(value: &str) -> Result<&str, OptionError> {
    if value.is_empty() {
        return Err(OptionError::EmptyPath);
    }
    Ok(value)
}

/// Parses a disk format (`--disk format=` or the API's `format`): `raw` or `qcow2`.
pub fn parse_disk_format(value: &str) -> Result<DiskFormat, OptionError> {
    match value {
        "raw" => Ok(DiskFormat::Raw),
        "qcow2" => Ok(DiskFormat::Qcow2),
        _ => Err(OptionError::Format(value.to_string())),
    }
}

/// Parses `on-error=pause|report`.
pub fn parse_on_error(value: &str) -> Result<OnError, OptionError> {
    match value {
        "pause" => Ok(OnError::Pause),
        "report" => Ok(OnError::Report),
        _ => Err(OptionError::OnError(value.to_string())),
    }
}

/// Checks a disk serial (`--disk serial=` or the API's `serial`) fits virtio-blk's GET_ID.
pub fn check_disk_serial(value: &str) -> Result<&str, OptionError> {
    if value.len() > MAX_DISK_SERIAL_LEN {
        return Err(OptionError::SerialTooLong);
    }
    Ok(value)
}

/// Checks a TAP interface name (`--net tap=` or the API's `tap`) the way Linux does.
pub fn check_tap_name(value: &str) -> Result<&str, OptionError> {
    crate::ifname::check(value).map_err(OptionError::TapName)?;
    Ok(value)
}

/// Splits `key=value,key=value` and hands each pair to `set`.
fn options(
    s: &str,
    mut set: impl FnMut(&str, &str) -> Result<(), OptionError>,
) -> Result<(), OptionError> {
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| OptionError::NotKeyValue(part.to_string()))?;
        set(key, value)?;
    }
    Ok(())
}

/// Parses `path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,direct=on]
/// [,on-error=pause|report]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        format: None,
        read_only: false,
        serial: None,
        direct: false,
        on_error: OnError::default(),
    };
    options(s, |key, value| {
        match key {
            "path" => disk.path = PathBuf::from(check_disk_path(value)?),
            "format" => disk.format = Some(parse_disk_format(value)?),
            "readonly" => disk.read_only = on_off(key, value)?,
            "direct" => disk.direct = on_off(key, value)?,
            "serial" => disk.serial = Some(check_disk_serial(value)?.to_string()),
            "on-error" => disk.on_error = parse_on_error(value)?,
            other => {
                return Err(OptionError::UnknownKey {
                    key: other.to_string(),
                    known: "path, format, readonly, serial, direct, on-error",
                })
            }
        }
        Ok(())
    })
    .and_then(|()| {
        if disk.path.as_os_str().is_empty() {
            return Err(OptionError::Missing("path=FILE"));
        }
        Ok(())
    })
    .map_err(|reason| ConfigError::InvalidDisk {
        value: s.to_string(),
        reason,
    })?;
    Ok(disk)
}

/// Parses `tap=NAME[,mac=MAC]`; without `mac`, a random locally administered address.
pub fn parse_net(s: &str) -> Result<NetConfig, ConfigError> {
    let mut tap = None;
    let mut mac = None;
    let parsed = options(s, |key, value| {
        match key {
            "tap" => tap = Some(check_tap_name(value)?.to_string()),
            "mac" => mac = Some(value.parse::<MacAddr>()?),
            other => {
                return Err(OptionError::UnknownKey {
                    key: other.to_string(),
                    known: "tap, mac",
                })
            }
        }
        Ok(())
    })
    .and_then(|()| tap.ok_or(OptionError::Missing("tap=NAME")));
    let tap = parsed.map_err(|reason| ConfigError::InvalidNet {
        value: s.to_string(),
        reason,
    })?;
    Ok(NetConfig {
        tap,
        mac: mac.unwrap_or_else(MacAddr::random),
    })
}

/// Parses a guest context ID (`--vsock cid=` or the API's `cid`): 3 to 2^32-2.
pub fn parse_cid(value: &str) -> Result<u32, OptionError> {
    let cid: u32 = value.parse().map_err(|_| OptionError::Cid(value.into()))?;
    check_cid(cid)
}

fn check_cid(cid: u32) -> Result<u32, OptionError> {
    if cid < MIN_GUEST_CID || cid == u32::MAX {
        return Err(OptionError::Cid(cid.to_string()));
    }
    Ok(cid)
}

/// Checks a vsock device's values (for configurations that did not come through
/// [`parse_vsock`]).
pub fn check_vsock(v: &VsockConfig) -> Result<(), ConfigError> {
    let err = |reason| ConfigError::InvalidVsock {
        value: v.socket.display().to_string(),
        reason,
    };
    check_cid(v.cid).map_err(err)?;
    check_disk_path(&v.socket.to_string_lossy()).map_err(err)?;
    Ok(())
}

/// Parses `cid=N,socket=PATH`.
pub fn parse_vsock(s: &str) -> Result<VsockConfig, ConfigError> {
    let mut cid = None;
    let mut socket = None;
    let parsed = options(s, |key, value| {
        match key {
            "cid" => cid = Some(parse_cid(value)?),
            "socket" => socket = Some(PathBuf::from(check_disk_path(value)?)),
            other => {
                return Err(OptionError::UnknownKey {
                    key: other.to_string(),
                    known: "cid, socket",
                })
            }
        }
        Ok(())
    })
    .and_then(|()| {
        Ok(VsockConfig {
            cid: cid.ok_or(OptionError::Missing("cid=N"))?,
            socket: socket.ok_or(OptionError::Missing("socket=PATH"))?,
        })
    });
    parsed.map_err(|reason| ConfigError::InvalidVsock {
        value: s.to_string(),
        reason,
    })
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
    fn vsocks() {
        let v = parse_vsock("cid=3,socket=/run/v.sock").unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/run/v.sock")));
        let v = parse_vsock("socket=v,cid=4294967294").unwrap();
        assert_eq!(v.cid, u32::MAX - 1);
        for (bad, needle) in [
            ("cid=2,socket=v", "cid=2: expected a number from 3"),
            ("cid=0,socket=v", "reserved"),
            ("cid=4294967295,socket=v", "reserved"),
            ("cid=-1,socket=v", "cid=-1"),
            ("cid=x,socket=v", "cid=x"),
            ("cid=3", "socket=PATH is required"),
            ("socket=v", "cid=N is required"),
            ("cid=3,socket=", "empty path"),
            ("cid=3,socket=v,port=1", "unknown key \"port\""),
            ("cid", "not key=value"),
        ] {
            let e = parse_vsock(bad).unwrap_err().to_string();
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
}
