//! Network interface names, checked the way Linux checks them, and whether one exists.

use crate::limits::MAX_IFNAME_LEN;

/// Why a name cannot be a network interface's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IfNameError {
    /// The empty string.
    #[error("empty interface name")]
    Empty,
    /// Longer than IFNAMSIZ - 1 bytes.
    #[error("interface name {0:?} is longer than {MAX_IFNAME_LEN} bytes")]
    TooLong(String),
    /// `.`, `..`, or a name holding `/`, `:`, whitespace or NUL.
    #[error("{0:?} is not a valid interface name")]
    Invalid(String),
}

/// Checks `name` against the kernel's rules for interface names (`dev_valid_name`).
pub fn check(name: &str) -> Result<(), IfNameError> {
    if name.is_empty() {
        return Err(IfNameError::Empty);
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(IfNameError::TooLong(name.to_string()));
    }
    let bad_char = |c: char| c == '/' || c == ':' || c.is_whitespace() || c == '\0';
    if name == "." || name == ".." || name.chars().any(bad_char) {
        return Err(IfNameError::Invalid(name.to_string()));
    }
    Ok(())
}

/// True when the interface `name` exists in this process's network namespace. Asked of the
/// kernel directly: /sys/class/net shows the namespace sysfs was mounted in, which need not be
/// ours.
pub fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call; if_nametoindex only reads
    // it and returns an index.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernels_rules() {
        assert_eq!(check("tap0"), Ok(()));
        assert_eq!(check("lbt-0123456789"), Ok(()));
        assert_eq!(check(""), Err(IfNameError::Empty));
        assert!(matches!(
            check("0123456789abcdef"),
            Err(IfNameError::TooLong(_))
        ));
        for bad in [".", "..", "a/b", "a:b", "tap0; rm", "a\0b", "a\tb"] {
            assert!(
                matches!(check(bad), Err(IfNameError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn loopback_exists_and_nonsense_does_not() {
        assert!(exists("lo"));
        assert!(!exists("lb-no-such-if"));
        assert!(!exists("a\0b"));
    }
}
