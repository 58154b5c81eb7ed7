//! Refcount block entries of any width from 1 to 64 bits. Sub-byte entries are packed
//! least-significant-bits first, wider ones are big-endian, as the qcow2 specification says.

/// Reads entry `i` of a refcount block of `order` (width = 2^order bits).
pub fn get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            u64::from((block[i / per_byte] >> shift) & ((1u16 << bits) - 1) as u8)
        }
        _ => {
            let bytes = 1usize << (order - 3);
            let mut v = 0u64;
            for b in &block[i * bytes..(i + 1) * bytes] {
                v = (v << 8) | u64::from(*b);
            }
            v
        }
    }
}

/// Largest refcount an entry of `order` holds.
pub fn max(order: u32) -> u64 {
    if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

/// Writes entry `i`; returns the byte range of `block` that changed. `v` must fit the width.
pub fn set(block: &mut [u8], order: u32, i: usize, v: u64) -> std::ops::Range<usize> {
    debug_assert!(v <= max(order));
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut block[i / per_byte];
            *byte = (*byte & !mask) | (((v as u8) << shift) & mask);
            i / per_byte..i / per_byte + 1
        }
        _ => {
            let bytes = 1usize << (order - 3);
            let be = v.to_be_bytes();
            block[i * bytes..(i + 1) * bytes].copy_from_slice(&be[8 - bytes..]);
            i * bytes..(i + 1) * bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let entries = (64 * 8) >> order;
            for i in 0..entries {
                set(&mut block, order, i, (i as u64 * 7 + 1) & max(order));
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7 + 1) & max(order),
                    "order {order} i {i}"
                );
            }
        }
    }

    #[test]
    fn packing_matches_the_specification() {
        let mut b = [0u8; 2];
        set(&mut b, 0, 1, 1);
        assert_eq!(b[0], 0b10);
        set(&mut b, 2, 1, 0xa);
        assert_eq!(b[0], 0xa0 | 0b10);
        let mut w = [0u8; 4];
        set(&mut w, 4, 1, 0x0102);
        assert_eq!(w, [0, 0, 1, 2]);
    }
}
