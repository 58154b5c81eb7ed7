//! `lightbyte pki`: the cluster's own certificate authority and the certificates it issues
//! (rcgen), so that every component authenticates every other with mutual TLS.
//!
//! A directory holds `ca.crt` and `ca.key`; `issue` writes `NAME.crt` and `NAME.key` next to
//! them. Keys are ECDSA P-256, files 0600 (certificates 0644: they are public), the directory
//! 0700. Every issued certificate can serve and be a client (components are both); its SANs
//! are the names and addresses others reach it by.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Validity of the CA and of what it issues.
const CA_DAYS: i64 = 3650;
const CERT_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    // Causes are in the messages, not sources: printed as a chain they would repeat.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{what}: {error}")]
    Cert { what: String, error: rcgen::Error },
    #[error("{} exists: a CA is never overwritten (remove the directory to start over)", .0.display())]
    Exists(PathBuf),
    #[error("no CA in {}: run `lightbyte pki init --dir {}` first", .0.display(), .0.display())]
    NoCa(PathBuf),
    #[error("invalid certificate name {0:?}: letters, digits, '-', '_' and '.' only")]
    Name(String),
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |error| PkiError::Cert {
        what: what.to_string(),
        error,
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that differ between hosts.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Paths of the CA in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// Makes a new CA in `dir` (created 0700): `ca.crt`, `ca.key`. Refuses to overwrite one.
pub fn init(dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io {
            path,
            error: source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let (crt, key_path) = ca_paths(dir);
    if crt.exists() || key_path.exists() {
        return Err(PkiError::Exists(crt));
    }
    let key = KeyPair::generate().map_err(cert_err("CA key"))?;
    let mut params = CertificateParams::new(Vec::new()).map_err(cert_err("CA"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "lightbyte");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key).map_err(cert_err("CA"))?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&crt, cert.pem().as_bytes(), 0o644)?;
    Ok(crt)
}

/// Issues `NAME.crt`/`NAME.key` in `dir`, signed by its CA, for `sans` (DNS names or IP
/// addresses; the name itself is the subject). Replaces an earlier one of that name (that is
/// how a certificate is renewed).
pub fn issue(dir: &Path, name: &str, sans: &[String]) -> Result<(PathBuf, PathBuf), PkiError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        return Err(PkiError::Name(name.to_string()));
    }
    let (ca_crt, ca_key) = ca_paths(dir);
    if !ca_crt.exists() || !ca_key.exists() {
        return Err(PkiError::NoCa(dir.to_path_buf()));
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| PkiError::Io {
            path: p.to_path_buf(),
            error: source,
        })
    };
    let ca_key = KeyPair::from_pem(&read(&ca_key)?).map_err(cert_err("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_crt)?, ca_key).map_err(cert_err("CA"))?;
    let key = KeyPair::generate().map_err(cert_err("key"))?;
    let mut params = CertificateParams::new(sans.to_vec()).map_err(cert_err("names"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, CERT_DAYS);
    let cert = params.signed_by(&key, &issuer).map_err(cert_err(name))?;
    let crt = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&crt, cert.pem().as_bytes(), 0o644)?;
    Ok((crt, key_path))
}

/// Writes `bytes` to `path` through a temporary file created with `mode`, fsynced, renamed
/// durably.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let part = path.with_extension("part");
    let _ = std::fs::remove_file(&part);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&part)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    // The directory synced too: a CA key must not vanish with a power loss.
    crate::worker::durable::rename(&part, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_certificates_and_is_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        init(&dir, "test CA").unwrap();
        assert!(matches!(init(&dir, "again"), Err(PkiError::Exists(_))));
        let (crt, key) = issue(&dir, "server", &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert!(std::fs::read_to_string(&crt)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(matches!(
            issue(&dir, "../evil", &[]),
            Err(PkiError::Name(_))
        ));
        let other = tmp.path().join("none");
        assert!(matches!(issue(&other, "x", &[]), Err(PkiError::NoCa(_))));
    }
}
