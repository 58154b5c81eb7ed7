//! Serde adapters that write KVM's state structures into a snapshot's `state.json` as base64
//! strings, one per structure (a list of entries as one string of them all).
//!
//! kvm-bindings writes each structure as an array of byte values: a vCPU's XSAVE area alone is
//! 4,096 numbers, and the ~10,000 numbers of a 1-vCPU snapshot made `state.json` 21 KB and took
//! 110–260 µs to parse on a development machine. As strings: 14 KB, 15–46 µs (a string is
//! scanned at once and decoded in a tight loop), and every vCPU adds less. Reading also takes
//! the arrays older snapshots hold, through kvm-bindings' own decoding (which pads a short
//! array with zeroes); a string must be exactly the structure's size.

use std::fmt;
use std::marker::PhantomData;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::de::value::BytesDeserializer;
use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};
use zerocopy::{Immutable, IntoBytes};

/// Writes `value`'s bytes as one base64 string.
pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&STANDARD.encode(value.as_bytes()))
}

/// Reads a structure written by [`serialize`], or by kvm-bindings (an array of bytes).
pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    struct One<T>(PhantomData<T>);

    impl<'de, T: DeserializeOwned> Visitor<'de> for One<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a base64 string of {} bytes", std::mem::size_of::<T>())
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
            let bytes = decode::<E>(s)?;
            if bytes.len() != std::mem::size_of::<T>() {
                return Err(E::invalid_length(bytes.len(), &self));
            }
            from_bytes(&bytes)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
            let mut bytes = Vec::with_capacity(std::mem::size_of::<T>());
            while let Some(b) = seq.next_element::<u8>()? {
                bytes.push(b);
            }
            from_bytes(&bytes)
        }
    }

    deserializer.deserialize_any(One(PhantomData))
}

/// The same for a list of structures (`#[serde(with = "blob::list")]`): one string of their
/// bytes, one after another.
pub mod list {
    use std::fmt;
    use std::marker::PhantomData;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::de::{DeserializeOwned, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use zerocopy::{Immutable, IntoBytes};

    use super::{decode, from_bytes};

    /// Writes `entries` as one base64 string of their bytes, one after another.
    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        entries: &[T],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(entries.as_bytes()))
    }

    /// Reads entries written by [`serialize`], or by kvm-bindings (an array of byte arrays).
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<T>, D::Error> {
        struct List<T>(PhantomData<T>);

        impl<'de, T: DeserializeOwned> Visitor<'de> for List<T> {
            type Value = Vec<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a base64 string of {}-byte entries",
                    std::mem::size_of::<T>()
                )
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<T>, E> {
                let bytes = decode::<E>(s)?;
                let size = std::mem::size_of::<T>();
                if bytes.len() % size != 0 {
                    return Err(E::invalid_length(bytes.len(), &self));
                }
                bytes.chunks_exact(size).map(from_bytes).collect()
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = seq.next_element::<T>()? {
                    out.push(entry);
                }
                Ok(out)
            }
        }

        deserializer.deserialize_any(List(PhantomData))
    }
}

fn decode<E: serde::de::Error>(s: &str) -> Result<Vec<u8>, E> {
    STANDARD
        .decode(s)
        .map_err(|e| E::custom(format_args!("not base64: {e}")))
}

/// The structure `bytes` hold, through the type's own decoding of bytes.
fn from_bytes<T: DeserializeOwned, E: serde::de::Error>(bytes: &[u8]) -> Result<T, E> {
    T::deserialize(BytesDeserializer::<E>::new(bytes))
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, kvm_xsave};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Sample {
        #[serde(with = "super")]
        lapic: kvm_lapic_state,
        #[serde(with = "super")]
        xsave: kvm_xsave,
        #[serde(with = "super::list")]
        msrs: Vec<kvm_msr_entry>,
    }

    fn sample() -> Sample {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        lapic.regs[1023] = -1;
        let mut xsave = kvm_xsave::default();
        xsave.region[0] = 0x037f;
        xsave.region[1023] = 0xdead_beef;
        let msrs = (0..3)
            .map(|i| kvm_msr_entry {
                index: 0x10 + i,
                data: u64::MAX - u64::from(i),
                ..Default::default()
            })
            .collect();
        Sample { lapic, xsave, msrs }
    }

    #[test]
    fn structures_round_trip_as_strings() {
        let json = serde_json::to_string(&sample()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["xsave"].is_string() && v["msrs"].is_string(), "{json}");
        let back: Sample = serde_json::from_str(&json).unwrap();
        assert_eq!(back.lapic.regs[0x20], 7);
        assert_eq!(back.lapic.regs[1023], -1);
        assert_eq!(back.xsave.region[..], sample().xsave.region[..]);
        let msrs: Vec<(u32, u64)> = back.msrs.iter().map(|m| (m.index, m.data)).collect();
        assert_eq!(
            msrs,
            [(0x10, u64::MAX), (0x11, u64::MAX - 1), (0x12, u64::MAX - 2)]
        );
    }

    #[test]
    fn the_arrays_of_older_snapshots_are_read_too() {
        // What kvm-bindings writes: an array of bytes per structure.
        let s = sample();
        let older = serde_json::json!({
            "lapic": s.lapic,
            "xsave": s.xsave,
            "msrs": s.msrs,
        });
        assert!(older["xsave"].is_array());
        let back: Sample = serde_json::from_value(older).unwrap();
        assert_eq!(back.lapic.regs[1023], -1);
        assert_eq!(back.xsave.region[1023], 0xdead_beef);
        assert_eq!(back.msrs.len(), 3);
        assert_eq!(back.msrs[2].data, u64::MAX - 2);
    }

    #[test]
    fn a_string_of_the_wrong_size_or_not_base64_is_refused() {
        let json = serde_json::to_string(&sample()).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["lapic"] = "AAAA".into();
        let e = serde_json::from_value::<Sample>(v.clone()).err().unwrap();
        assert!(e.to_string().contains("1024 bytes"), "{e}");
        v["lapic"] = "not base64!".into();
        let e = serde_json::from_value::<Sample>(v.clone()).err().unwrap();
        assert!(e.to_string().contains("not base64"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        // 17 bytes: not a whole number of 16-byte entries.
        v["msrs"] = "AAAAAAAAAAAAAAAAAAAAAAA=".into();
        let e = serde_json::from_value::<Sample>(v).err().unwrap();
        assert!(e.to_string().contains("16-byte entries"), "{e}");
    }
}
