//! Field-level validation shared by every kind. Errors name the field as a JSON path
//! (`spec.cpus`) so an API client can point at what it sent wrong.

use std::fmt;

/// One invalid field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Longest name: a DNS label, so names can become host names and TAP-device suffixes.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a DNS-1123 label: 1–63 characters of `a-z`, `0-9` and `-`, starting and ending with a
/// letter or digit. Names are key segments in etcd, so this also keeps `/` out of keys.
pub fn dns_label(field: &str, value: &str) -> Result<(), FieldError> {
    let err = |why: &str| Err(FieldError::new(field, format!("{value:?} {why}")));
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return err(&format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return err("may only contain lowercase letters, digits and '-' (DNS-1123 label)");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return err("must start and end with a letter or digit (DNS-1123 label)");
    }
    Ok(())
}

/// Checks a worker label key or value: up to 63 characters of letters, digits, `-`, `_`, `.`
/// and (keys only) `/`, the Kubernetes label alphabet without its prefix rules.
pub fn label(field: &str, value: &str, is_key: bool) -> Result<(), FieldError> {
    if is_key && value.is_empty() {
        return Err(FieldError::new(field, "label key must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(FieldError::new(
            field,
            format!("{value:?} is longer than {MAX_NAME_LEN} characters"),
        ));
    }
    let ok = value.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') || (is_key && b == b'/')
    });
    if !ok {
        return Err(FieldError::new(
            field,
            format!("{value:?} may only contain letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

/// Checks a path on the workers: absolute, no NUL, no `..` (the path is handed to every worker
/// as is, and `..` would make the same name mean different files).
pub fn absolute_path(field: &str, value: &str) -> Result<(), FieldError> {
    if !value.starts_with('/') {
        return Err(FieldError::new(
            field,
            format!("{value:?} must be an absolute path"),
        ));
    }
    if value.contains('\0') {
        return Err(FieldError::new(field, "must not contain NUL bytes"));
    }
    if value.split('/').any(|c| c == "..") {
        return Err(FieldError::new(
            field,
            format!("{value:?} must not contain '..'"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for good in ["a", "web-1", "0abc", &"x".repeat(63)] {
            assert_eq!(dns_label("n", good), Ok(()), "{good}");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", "a/b", &"x".repeat(64)] {
            let e = dns_label("metadata.name", bad).unwrap_err();
            assert_eq!(e.field, "metadata.name", "{bad}");
        }
    }

    #[test]
    fn paths() {
        assert!(absolute_path("p", "/srv/img/base.qcow2").is_ok());
        assert!(absolute_path("p", "img/base.qcow2").is_err());
        assert!(absolute_path("p", "/srv/../etc/shadow").is_err());
        assert!(absolute_path("p", "/a\0b").is_err());
    }

    #[test]
    fn labels() {
        assert!(label("k", "zone", true).is_ok());
        assert!(label("k", "topology.io/zone", true).is_ok());
        assert!(label("k", "", true).is_err());
        assert!(label("v", "", false).is_ok());
        assert!(label("v", "a/b", false).is_err());
        assert!(label("v", "a b", false).is_err());
    }
}
