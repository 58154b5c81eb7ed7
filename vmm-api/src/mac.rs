//! Ethernet MAC addresses: six two-digit hex octets separated by colons (`52:54:00:12:34:56`),
//! on the command line and in JSON alike.

use std::fmt;

/// Why a string is not a usable NIC address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six colon-separated octets of two hex digits.
    #[error("mac={0}: expected six hex octets like 52:54:00:12:34:56")]
    Syntax(String),
    /// The group bit is set.
    #[error("mac={0}: a multicast address (lowest bit of the first octet set) cannot be a NIC's")]
    Multicast(String),
    /// All zeroes, which most drivers take as "no address".
    #[error("mac={0}: the all-zero address is not usable")]
    Zero(String),
}

/// An Ethernet MAC address.
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
    type Err = MacError;

    /// Six colon-separated octets of two hex digits; a guest NIC needs a unicast address, and
    /// all zeroes means "none" to most drivers.
    fn from_str(s: &str) -> Result<MacAddr, MacError> {
        let bad = || MacError::Syntax(s.to_string());
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
            return Err(MacError::Multicast(s.to_string()));
        }
        if b == [0; 6] {
            return Err(MacError::Zero(s.to_string()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_refuses() {
        let m: MacAddr = "52:54:00:AB:cd:0e".parse().unwrap();
        assert_eq!(m, MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0x0e]));
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0e");
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacError::Multicast(_))
        ));
        assert!(matches!(
            "00:00:00:00:00:00".parse::<MacAddr>(),
            Err(MacError::Zero(_))
        ));
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "+5:54:00:12:34:56",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))),
                "{bad}"
            );
        }
        let r = MacAddr::random();
        assert_eq!(r.0[0] & 3, 2, "unicast, locally administered: {r}");
        assert_ne!(r, MacAddr::random());
    }
}
