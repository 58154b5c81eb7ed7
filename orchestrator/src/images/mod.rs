//! Images by content. `lightbyte image push` uploads an image's disk (and boot files) into the
//! control plane's blob store ([`store`]), named by SHA-256; the Image object records the
//! digests; a worker pulls each blob once into its cache ([`cache`]), verified before use, and
//! backs its VMs' overlays with the cached file.

pub mod cache;
pub mod store;
pub mod transfer;
pub mod upload;

use std::fmt;
use std::str::FromStr;

/// A blob's name: `sha256:` and 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of hex SHA-256 `hex` (checked).
    pub fn sha256(hex: &str) -> Result<Digest, String> {
        format!("sha256:{hex}").parse()
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// Whether `s` looks like a digest rather than a path.
    pub fn looks_like(s: &str) -> bool {
        s.starts_with("sha256:")
    }
}

impl FromStr for Digest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{s:?} is not a digest (sha256:<64 hex digits>)"))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "{s:?} is not a digest (sha256: and 64 lowercase hex digits)"
            ));
        }
        Ok(Digest(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The qcow2 magic, "QFI\xfb".
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Whether the first bytes of a file are a qcow2 header: used only to refuse an image whose
/// stated format does not match its content, never to guess one.
pub fn has_qcow2_header(head: &[u8]) -> bool {
    head.len() >= 4 && head[..4] == QCOW2_MAGIC
}

/// Why content does not match a stated format, if it does not.
pub fn format_mismatch(format: crate::model::DiskFormat, head: &[u8]) -> Option<String> {
    use crate::model::DiskFormat;
    match (format, has_qcow2_header(head)) {
        (DiskFormat::Qcow2, false) => Some("is not a qcow2 image (no qcow2 header)".into()),
        (DiskFormat::Raw, true) => Some(
            "has a qcow2 header: as a raw disk its guest could forge a backing file; say qcow2"
                .into(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DiskFormat;

    #[test]
    fn digests_parse_strictly() {
        let d: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(d.hex(), "ab".repeat(32));
        assert!("sha256:AB".parse::<Digest>().is_err());
        assert!(format!("sha256:{}", "AB".repeat(32))
            .parse::<Digest>()
            .is_err());
        assert!(format!("md5:{}", "ab".repeat(32))
            .parse::<Digest>()
            .is_err());
        assert!(format!("sha256:{}/..", "ab".repeat(31))
            .parse::<Digest>()
            .is_err());
        assert!(Digest::looks_like("sha256:x") && !Digest::looks_like("/img/base.qcow2"));
    }

    #[test]
    fn formats_are_checked_never_guessed() {
        assert!(format_mismatch(DiskFormat::Qcow2, b"QFI\xfb\0\0\0\x03").is_none());
        assert!(format_mismatch(DiskFormat::Qcow2, b"\0\0\0\0").is_some());
        assert!(format_mismatch(DiskFormat::Raw, b"QFI\xfb").is_some());
        assert!(format_mismatch(DiskFormat::Raw, b"\x7fELF").is_none());
    }
}
