//! Byte sizes as people write them ("256M", "2GiB", "1048576").

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes. Written as a string with the largest binary unit that divides it exactly
/// ("256M"), read from such a string or from a plain byte count, so documents stay readable and
/// the VMM's `--memory` syntax works unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A size string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {0:?}: expected a byte count or a number with a K/M/G/T suffix, e.g. 256M")]
pub struct SizeError(pub String);

impl ByteSize {
    pub const MIB: u64 = 1 << 20;

    pub fn bytes(self) -> u64 {
        self.0
    }

    pub fn mib(n: u64) -> ByteSize {
        ByteSize(n << 20)
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<ByteSize, SizeError> {
        // The VMM's own parser: sizes in specs mean exactly what `vmm --memory` accepts.
        vmm_api::parse::parse_size(s)
            .map(ByteSize)
            .map_err(|_| SizeError(s.to_string()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        for (shift, unit) in UNITS {
            let unit_bytes = 1u64 << shift;
            if self.0 != 0 && self.0 % unit_bytes == 0 {
                return write!(f, "{}{unit}", self.0 / unit_bytes);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256M\" or a byte count")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_vmm_syntax() {
        assert_eq!("256M".parse(), Ok(ByteSize(256 << 20)));
        assert_eq!("2GiB".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("4k".parse(), Ok(ByteSize(4096)));
        assert_eq!("1048576".parse(), Ok(ByteSize(1 << 20)));
        assert_eq!("512B".parse(), Ok(ByteSize(512)));
        for bad in ["", "M", "12Q", "-1M", "1.5G", "99999999999T"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn prints_the_largest_exact_unit() {
        assert_eq!(ByteSize(256 << 20).to_string(), "256M");
        assert_eq!(ByteSize(1 << 30).to_string(), "1G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(0).to_string(), "0");
    }

    #[test]
    fn json_round_trip_accepts_numbers_and_strings() {
        let s: ByteSize = serde_json::from_str("\"1G\"").unwrap();
        let n: ByteSize = serde_json::from_str("1073741824").unwrap();
        assert_eq!(s, n);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"1G\"");
        assert!(serde_json::from_str::<ByteSize>("-5").is_err());
        assert!(serde_json::from_str::<ByteSize>("\"lots\"").is_err());
    }
}
