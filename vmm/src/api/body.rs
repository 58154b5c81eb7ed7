//! JSON request bodies as the server reads them, and how a create body becomes a [`VmConfig`].
//! Parsing is pure (no file system access), so the fuzz target can drive it;
//! [`crate::config::validate`] checks files afterwards.
//!
//! The create body mirrors the command line: the same defaults, and the same parsers
//! ([`parse_size`], [`vmm_api::parse::parse_serial`], the `--disk` and `--net` pieces) for the
//! same values. These rules are the API's: [`VmConfig`] itself is plain data.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::{self, DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use vmm_api::config::{check_cpu_count, DEFAULT_CPUS, DEFAULT_MEMORY};
use vmm_api::parse::{
    check_disk_path, check_disk_serial, check_tap_name, check_vsock, parse_disk_format,
    parse_on_error, parse_size,
};
use vmm_api::types::{RestoreBody, ShutdownBody, SnapshotBody, MAX_SHUTDOWN_TIMEOUT_MS};

use crate::config::{
    ConfigError, DiskConfig, NetConfig, OnError, SerialConfig, VmConfig, VsockConfig,
    DEFAULT_CMDLINE, MAX_CPUS,
};
use vmm_api::MacAddr;

/// Why a request body was refused (always a 400). Messages name the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON at all.
    #[error("malformed JSON: {0}")]
    Syntax(String),
    /// JSON of the wrong shape: unknown field, wrong type, missing field.
    #[error("{0}")]
    Shape(String),
    /// A body on an endpoint that needs one is missing.
    #[error("this endpoint needs a JSON request body")]
    Missing,
    /// A value the configuration rules refuse.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Any other invalid value, with the field named.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A `T` read only from a JSON object. serde's derived struct impls also accept an array of
/// the fields in order, which would let `["/img/vmlinux"]` through as a create body; every body
/// struct is read through this instead.
#[derive(Debug)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(Fields(PhantomData))
    }
}

/// `PUT /api/v1/vm/create`: the VM configuration, as on the command line. Every field but
/// `kernel` has the command line's default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// `--kernel`; exactly one of `kernel` and `firmware`.
    kernel: Option<PathBuf>,
    /// `--initramfs`.
    initramfs: Option<PathBuf>,
    /// `--cmdline` (default: the kernel's default, or none for a firmware).
    cmdline: Option<String>,
    /// `--cpus`. Wider than the configuration's u8 so that 300 gets the range message rather
    /// than a type error.
    #[serde(default = "default_cpus")]
    cpus: u64,
    /// `--memory`: bytes, or a size string.
    #[serde(default = "default_memory", deserialize_with = "memory_size")]
    memory: u64,
    /// `--serial`.
    #[serde(default = "default_serial")]
    serial: SerialConfig,
    /// `--disk`, in order.
    #[serde(default)]
    disks: Vec<ApiDisk>,
    /// `--firmware`: UEFI firmware booting the first disk's boot loader.
    firmware: Option<PathBuf>,
    /// `--net`, in order; `null` is taken as none.
    nets: Option<Vec<ApiNet>>,
    /// `--vsock`; `null` is taken as none.
    vsock: Option<ApiVsock>,
}

/// One element of `disks`: the keys of `--disk`, checked as the command line checks them while
/// the body is read (so errors carry the element's path, `disks[0]: ...`).
#[derive(Debug)]
struct ApiDisk(DiskConfig);

impl<'de> Deserialize<'de> for ApiDisk {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Object(b) = Object::<DiskBody>::deserialize(deserializer)?;
        b.into_config().map(ApiDisk).map_err(de::Error::custom)
    }
}

/// One element of `nets`: the keys of `--net`, checked like [`ApiDisk`].
#[derive(Debug)]
struct ApiNet(NetConfig);

impl<'de> Deserialize<'de> for ApiNet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Object(b) = Object::<NetBody>::deserialize(deserializer)?;
        b.into_config().map(ApiNet).map_err(de::Error::custom)
    }
}

/// The keys of `--disk`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskBody {
    path: String,
    format: Option<String>,
    #[serde(default)]
    readonly: bool,
    serial: Option<String>,
    #[serde(default)]
    direct: bool,
    #[serde(rename = "on-error")]
    on_error: Option<String>,
}

/// The keys of `--net`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetBody {
    /// Host TAP interface.
    tap: String,
    /// Guest MAC address; absent or null draws a random one.
    mac: Option<String>,
}

/// `vsock`: the keys of `--vsock`, checked like [`ApiDisk`].
#[derive(Debug)]
struct ApiVsock(VsockConfig);

impl<'de> Deserialize<'de> for ApiVsock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Object(v) = Object::<VsockConfig>::deserialize(deserializer)?;
        check_vsock(&v).map_err(de::Error::custom)?;
        Ok(ApiVsock(v))
    }
}

fn default_cpus() -> u64 {
    u64::from(DEFAULT_CPUS)
}

fn default_memory() -> u64 {
    DEFAULT_MEMORY
}

fn default_serial() -> SerialConfig {
    SerialConfig::Stdout
}

/// `memory`: a byte count (JSON number) or a size string read by [`parse_size`].
fn memory_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct Size;
    impl Visitor<'_> for Size {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte count or a size string such as \"512M\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }
    deserializer.deserialize_any(Size)
}

impl CreateBody {
    /// The configuration the body asks for.
    fn into_config(self) -> Result<VmConfig, BodyError> {
        let kernel = match (self.kernel, &self.firmware) {
            (Some(k), None) => k,
            (None, Some(_)) => PathBuf::new(),
            (Some(_), Some(_)) => {
                return Err(BodyError::Shape(
                    "give `kernel` or `firmware`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(BodyError::Shape(
                    "missing field `kernel` (or `firmware`)".into(),
                ))
            }
        };
        let wide = u32::try_from(self.cpus).unwrap_or(u32::MAX);
        check_cpu_count(wide, u32::from(MAX_CPUS))?;
        let cmdline = self.cmdline.unwrap_or_else(|| match &self.firmware {
            Some(_) => String::new(),
            None => DEFAULT_CMDLINE.to_string(),
        });
        let config = VmConfig {
            kernel,
            firmware: self.firmware,
            initramfs: self.initramfs,
            cmdline,
            // In range: checked just above.
            cpus: u8::try_from(self.cpus).unwrap_or(MAX_CPUS),
            memory: self.memory,
            serial: self.serial,
            disks: self.disks.into_iter().map(|d| d.0).collect(),
            nets: self
                .nets
                .unwrap_or_default()
                .into_iter()
                .map(|n| n.0)
                .collect(),
            vsock: self.vsock.map(|v| v.0),
        };
        config.check_boot()?;
        Ok(config)
    }
}

impl DiskBody {
    fn into_config(self) -> Result<DiskConfig, ConfigError> {
        let err = |reason| ConfigError::InvalidDisk {
            value: self.path.clone(),
            reason,
        };
        let path = PathBuf::from(check_disk_path(&self.path).map_err(err)?);
        let format = match &self.format {
            Some(f) => Some(parse_disk_format(f).map_err(err)?),
            None => None,
        };
        let serial = match &self.serial {
            Some(s) => Some(check_disk_serial(s).map_err(err)?.to_string()),
            None => None,
        };
        let on_error = match &self.on_error {
            Some(p) => parse_on_error(p).map_err(err)?,
            None => OnError::default(),
        };
        Ok(DiskConfig {
            path,
            format,
            read_only: self.readonly,
            serial,
            direct: self.direct,
            on_error,
        })
    }
}

impl NetBody {
    fn into_config(self) -> Result<NetConfig, ConfigError> {
        let err = |reason| ConfigError::InvalidNet {
            value: self.tap.clone(),
            reason,
        };
        let tap = check_tap_name(&self.tap).map_err(err)?.to_string();
        let mac = match &self.mac {
            Some(m) => m.parse::<MacAddr>().map_err(|e| err(e.into()))?,
            None => MacAddr::random(),
        };
        Ok(NetConfig { tap, mac })
    }
}

/// The body of endpoints that take none: absent, or an empty object.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// True when a body carries nothing (absent, or only whitespace).
fn is_empty(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

/// Parses one JSON value of type `T`, naming the field at fault in errors (e.g.
/// `disks[0]: unknown field ...`).
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let Object(value) = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let segments: Vec<_> = e.path().iter().cloned().collect();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return BodyError::Syntax(inner.to_string());
        }
        let msg = strip_position(&inner);
        // An unknown field's path ends with the field, which the message already names.
        let segments = match segments.split_last() {
            Some((_, parent)) if msg.starts_with("unknown field") => parent,
            _ => &segments[..],
        };
        match field_path(segments) {
            path if path.is_empty() => BodyError::Shape(msg),
            path => BodyError::Shape(format!("{path}: {msg}")),
        }
    })?;
    de.end()
        .map_err(|e| BodyError::Syntax(format!("trailing data after the JSON value: {e}")))?;
    Ok(value)
}

/// `disks[0].format`-style path of a value in the body.
fn field_path(segments: &[serde_path_to_error::Segment]) -> String {
    use serde_path_to_error::Segment;
    let mut path = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Segment::Unknown => path.push_str(if path.is_empty() { "?" } else { ".?" }),
        }
    }
    path
}

/// serde_json's message without " at line L column C": the field path says where, and the
/// position of a value inside a one-line body says nothing more.
fn strip_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match msg.strip_suffix(&suffix) {
        Some(m) => m.to_string(),
        None => msg,
    }
}

/// Parses a body that may be absent: then `T::default()`.
fn parse_optional<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, BodyError> {
    if is_empty(bytes) {
        return Ok(T::default());
    }
    parse_json(bytes)
}

/// Parses a body that must be present.
fn parse_required<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BodyError> {
    if is_empty(bytes) {
        return Err(BodyError::Missing);
    }
    parse_json(bytes)
}

/// `PUT /api/v1/vm/create`: the configuration, checked for shape and values but not for files.
pub fn parse_create(bytes: &[u8]) -> Result<VmConfig, BodyError> {
    parse_required::<CreateBody>(bytes)?.into_config()
}

/// `PUT /api/v1/vm/shutdown`.
pub fn parse_shutdown(bytes: &[u8]) -> Result<ShutdownBody, BodyError> {
    let body: ShutdownBody = parse_optional(bytes)?;
    if body.timeout_ms > MAX_SHUTDOWN_TIMEOUT_MS {
        return Err(BodyError::Invalid {
            field: "timeout_ms",
            reason: format!(
                "{} is longer than the maximum {MAX_SHUTDOWN_TIMEOUT_MS} ms",
                body.timeout_ms
            ),
        });
    }
    Ok(body)
}

/// `PUT /api/v1/vm/snapshot`.
pub fn parse_snapshot(bytes: &[u8]) -> Result<SnapshotBody, BodyError> {
    let body: SnapshotBody = parse_required(bytes)?;
    non_empty("destination_dir", &body.destination_dir)?;
    Ok(body)
}

/// `PUT /api/v1/vm/restore`.
pub fn parse_restore(bytes: &[u8]) -> Result<RestoreBody, BodyError> {
    let body: RestoreBody = parse_required(bytes)?;
    non_empty("source_dir", &body.source_dir)?;
    Ok(body)
}

/// Endpoints without a body: nothing, or `{}`.
pub fn parse_no_body(bytes: &[u8]) -> Result<(), BodyError> {
    parse_optional::<NoFields>(bytes).map(|_| ())
}

fn non_empty(field: &'static str, path: &std::path::Path) -> Result<(), BodyError> {
    if path.as_os_str().is_empty() {
        return Err(BodyError::Invalid {
            field,
            reason: "empty path".into(),
        });
    }
    Ok(())
}

/// Renders an error body; never fails (a message is always serializable).
pub fn error_json(message: &str) -> Vec<u8> {
    serde_json::to_vec(&vmm_api::types::ErrorBody {
        error: message.to_string(),
    })
    .unwrap_or_else(|_| b"{\"error\":\"internal error\"}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskFormat;

    fn create(json: &str) -> Result<VmConfig, String> {
        parse_create(json.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn create_defaults_match_the_command_line() {
        let c = create(r#"{"kernel": "/img/vmlinux"}"#).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/img/vmlinux"));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.memory, 512 << 20);
        assert_eq!(c.serial, SerialConfig::Stdout);
        assert!(c.disks.is_empty() && c.nets.is_empty() && c.initramfs.is_none());
    }

    #[test]
    fn firmware_replaces_the_kernel_and_has_no_default_options() {
        let c = create(r#"{"firmware": "/fw", "disks": [{"path": "/d"}]}"#).unwrap();
        assert_eq!(c.firmware, Some(PathBuf::from("/fw")));
        assert_eq!(c.boot_image(), ("firmware", std::path::Path::new("/fw")));
        assert!(c.kernel.as_os_str().is_empty());
        assert_eq!(c.cmdline, "");
        let c = create(r#"{"firmware": "/fw", "cmdline": "initrd=\\initrd"}"#).unwrap();
        assert_eq!(c.cmdline, "initrd=\\initrd");
    }

    #[test]
    fn create_full_body() {
        let c = create(
            r#"{"kernel":"/img/vmlinux","initramfs":"/img/initrd.cpio","cmdline":"console=ttyS0",
                "cpus":2,"memory":"1G","serial":"file:/tmp/console",
                "disks":[{"path":"/img/root.qcow2","format":"qcow2","readonly":true,
                          "serial":"x","direct":true,"on-error":"report"},{"path":"/img/data.raw"}],
                "nets":[]}"#,
        )
        .unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, 1 << 30);
        assert_eq!(c.serial, SerialConfig::File("/tmp/console".into()));
        assert_eq!(c.initramfs, Some(PathBuf::from("/img/initrd.cpio")));
        assert_eq!(
            c.disks[0],
            DiskConfig {
                path: "/img/root.qcow2".into(),
                format: Some(DiskFormat::Qcow2),
                read_only: true,
                serial: Some("x".into()),
                direct: true,
                on_error: OnError::Report,
            }
        );
        assert_eq!(c.disks[1].format, None);
        assert_eq!(c.disks[1].on_error, OnError::Pause);
        assert!(!c.disks[1].read_only);
        assert!(c.nets.is_empty());
        let c = create(
            r#"{"kernel":"k","nets":[{"tap":"tap0","mac":"52:54:00:12:34:56"},{"tap":"tap1"},
                {"tap":"tap2","mac":null}]}"#,
        )
        .unwrap();
        assert_eq!(c.nets[0].tap, "tap0");
        assert_eq!(c.nets[0].mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(c.nets[1].tap, "tap1");
        assert_eq!(c.nets[1].mac.0[0] & 3, 2, "drawn: {}", c.nets[1].mac);
        assert_ne!(c.nets[1].mac, c.nets[2].mac);
        assert!(create(r#"{"kernel":"k","nets":null}"#)
            .unwrap()
            .nets
            .is_empty());
        assert_eq!(
            create(r#"{"kernel":"k","memory":268435456}"#)
                .unwrap()
                .memory,
            256 << 20
        );
    }

    #[test]
    fn create_errors_name_the_field() {
        for (body, needle) in [
            ("", "needs a JSON request body"),
            ("{", "malformed JSON"),
            ("[1]", "invalid type: sequence, expected a JSON object"),
            (
                r#"["/k"]"#,
                "invalid type: sequence, expected a JSON object",
            ),
            (
                r#"{"kernel":"k","disks":[["/d"]]}"#,
                "disks[0]: invalid type: sequence",
            ),
            (
                r#"{"kernel":"k","vsock":[3,"/v"]}"#,
                "vsock: invalid type: sequence",
            ),
            (r#"{"kernel":"k"} x"#, "trailing data"),
            (r#"{"cpus":1}"#, "missing field `kernel`"),
            (r#"{"kernel":"k","colour":1}"#, "unknown field `colour`"),
            (
                r#"{"kernel":"k","disks":[{"path":"a","color":1}]}"#,
                "disks[0]: unknown field `color`",
            ),
            (r#"{"kernel":"k","cpus":"2"}"#, "cpus: invalid type: string"),
            (
                r#"{"kernel":"k","cpus":-1}"#,
                "cpus: invalid value: integer `-1`",
            ),
            (r#"{"kernel":"k","cpus":0}"#, "cpus 0 is out of range"),
            (r#"{"kernel":"k","cpus":300}"#, "cpus 300 is out of range"),
            (
                r#"{"kernel":"k","memory":"lots"}"#,
                "memory: invalid size \"lots\"",
            ),
            (
                r#"{"kernel":"k","memory":1.5}"#,
                "memory: invalid type: floating point",
            ),
            (
                r#"{"kernel":"k","memory":-4096}"#,
                "memory: invalid value: integer `-4096`",
            ),
            (
                r#"{"kernel":"k","serial":"tcp:1"}"#,
                "serial: invalid serial \"tcp:1\"",
            ),
            (
                r#"{"kernel":"k","serial":1}"#,
                "serial: invalid type: integer",
            ),
            (
                r#"{"kernel":"k","disks":[{"path":""}]}"#,
                "disks[0]: invalid disk \"\": empty path",
            ),
            (
                r#"{"kernel":"k","disks":[{"path":"a","format":"vmdk"}]}"#,
                "expected raw or qcow2",
            ),
            (
                r#"{"kernel":"k","disks":[{"path":"a","serial":"012345678901234567890"}]}"#,
                "longer than 20",
            ),
            (
                r#"{"kernel":"k","disks":[{"format":"raw"}]}"#,
                "disks[0]: missing field `path`",
            ),
            (r#"{"kernel":"k","disks":{}}"#, "disks: invalid type: map"),
            (
                r#"{"kernel":"k","firmware":"/fw"}"#,
                "give `kernel` or `firmware`, not both",
            ),
            (
                r#"{"firmware":"/fw","initramfs":"/i"}"#,
                "cannot boot an initramfs with a firmware",
            ),
            (
                r#"{"cmdline":"x"}"#,
                "missing field `kernel` (or `firmware`)",
            ),
            (
                r#"{"kernel":"k","nets":[{"mac":"52:54:00:12:34:56"}]}"#,
                "nets[0]: missing field `tap`",
            ),
            (
                r#"{"kernel":"k","nets":[{"tap":""}]}"#,
                "nets[0]: invalid net \"\": empty tap name",
            ),
            (
                r#"{"kernel":"k","nets":[{"tap":"t","mac":"52:54:00:12:34"}]}"#,
                "nets[0]: invalid net \"t\": mac=52:54:00:12:34: expected six hex octets",
            ),
            (
                r#"{"kernel":"k","nets":[{"tap":"t","mac":"ff:ff:ff:ff:ff:ff"}]}"#,
                "multicast",
            ),
            (
                r#"{"kernel":"k","nets":[{"tap":"t","mac":5}]}"#,
                "nets[0].mac: invalid type: integer",
            ),
            (r#"{"kernel":"k","nets":{}}"#, "nets: invalid type: map"),
            (
                r#"{"kernel":"k","vsock":{"cid":2,"socket":"/v"}}"#,
                "vsock: invalid vsock \"/v\": cid=2: expected a number from 3",
            ),
            (
                r#"{"kernel":"k","vsock":{"cid":3}}"#,
                "vsock: missing field `socket`",
            ),
            (
                r#"{"kernel":"k","vsock":{"cid":3,"socket":"/v","port":1}}"#,
                "vsock: unknown field `port`",
            ),
            (
                r#"{"kernel":"k","nets":[{"tap":"t","speed":1}]}"#,
                "nets[0]: unknown field `speed`",
            ),
        ] {
            let e = create(body).expect_err(body);
            assert!(e.contains(needle), "{body}: {e:?} lacks {needle:?}");
        }
    }

    #[test]
    fn config_json_round_trips_through_the_create_body() {
        let c = create(
            r#"{"kernel":"/k","cpus":3,"memory":"256M","serial":"off",
                "disks":[{"path":"/d","format":"raw","serial":"s"},{"path":"/e","readonly":true}],
                "nets":[{"tap":"tap0","mac":"52:54:00:00:00:0A"},{"tap":"tap1"}],
                "vsock":{"cid":7,"socket":"/run/v.sock"}}"#,
        )
        .unwrap();
        let json = serde_json::to_vec(&c).unwrap();
        // The drawn MAC is part of the configuration, so it survives the round trip.
        assert_eq!(parse_create(&json).unwrap(), c);
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains(r#""serial":"off""#), "{text}");
        assert!(text.contains(r#""readonly":true"#), "{text}");
        assert!(
            text.contains(r#"{"tap":"tap0","mac":"52:54:00:00:00:0a"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#""vsock":{"cid":7,"socket":"/run/v.sock"}"#),
            "{text}"
        );
        // A firmware boot's configuration, as the typed client sends it, is taken as such.
        let uefi = create(r#"{"firmware":"/fw","disks":[{"path":"/d"}]}"#).unwrap();
        let json = serde_json::to_string(&uefi).unwrap();
        assert!(!json.contains("kernel"), "{json}");
        assert_eq!(parse_create(json.as_bytes()).unwrap(), uefi);
        // Without a vsock device the key is left out, as before the device existed.
        let plain = create(r#"{"kernel":"/k","vsock":null}"#).unwrap();
        assert!(plain.vsock.is_none());
        assert!(!String::from_utf8(serde_json::to_vec(&plain).unwrap())
            .unwrap()
            .contains("vsock"));
    }

    #[test]
    fn action_bodies() {
        assert_eq!(parse_shutdown(b"").unwrap().timeout_ms, 10_000);
        assert_eq!(parse_shutdown(b"{}").unwrap().timeout_ms, 10_000);
        assert_eq!(
            parse_shutdown(br#"{"timeout_ms":5}"#).unwrap().timeout_ms,
            5
        );
        assert!(parse_shutdown(br#"{"timeout_ms":-5}"#).is_err());
        let e = parse_shutdown(br#"{"timeout_ms":3600001}"#).unwrap_err();
        assert!(e.to_string().starts_with("timeout_ms: "), "{e}");
        assert!(parse_shutdown(br#"{"timeout":5}"#)
            .unwrap_err()
            .to_string()
            .contains("unknown field `timeout`"));

        assert_eq!(
            parse_snapshot(br#"{"destination_dir":"/s"}"#)
                .unwrap()
                .destination_dir,
            PathBuf::from("/s")
        );
        assert_eq!(parse_snapshot(b" ").unwrap_err(), BodyError::Missing);
        assert!(parse_snapshot(br#"{"destination_dir":""}"#).is_err());
        assert!(parse_snapshot(br#"{}"#)
            .unwrap_err()
            .to_string()
            .contains("missing field `destination_dir`"));

        let r = parse_restore(br#"{"source_dir":"/s"}"#).unwrap();
        assert!(!r.resume);
        assert!(
            parse_restore(br#"{"source_dir":"/s","resume":true}"#)
                .unwrap()
                .resume
        );
        assert!(parse_restore(br#"{"source_dir":"/s","resume":"yes"}"#).is_err());

        assert!(parse_no_body(b"").is_ok());
        assert!(parse_no_body(b" {} \n").is_ok());
        assert!(parse_no_body(br#"{"force":true}"#)
            .unwrap_err()
            .to_string()
            .contains("unknown field `force`"));
        assert!(parse_no_body(b"null").is_err());
    }
}
