//! CRC-32/IEEE (reflected, polynomial 0xEDB88320), the checksum of GPT headers and of UEFI's
//! `CalculateCrc32`.

const POLY: u32 = 0xEDB8_8320;

// Built at compile time so firmware pays neither the startup cost nor a lazily-initialised
// global.
static TABLE: [u32; 256] = make_table();

const fn make_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// Continues a CRC over more data: `update(crc32(a), b) == crc32(a ++ b)`, and
/// `update(0, data) == crc32(data)`.
pub fn update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

pub fn crc32(data: &[u8]) -> u32 {
    update(0, data)
}
