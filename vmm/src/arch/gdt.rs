//! Boot GDT entries and their translation into KVM segment registers.
//!
//! The kernel replaces this GDT within its first instructions; it only has to describe flat
//! segments for the mode we enter it in (64-bit for the Linux boot protocol, 32-bit for PVH).

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from its flags (bits 40..55 of the descriptor), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Flat 64-bit code segment (L=1, present, ring 0, execute/read).
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// Flat 32-bit code segment (D=1, G=1, present, ring 0, execute/read).
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Flat data segment (D=1, G=1, present, ring 0, read/write).
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// 32-bit busy TSS.
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// GDT index of the code segment.
pub const CODE_INDEX: u16 = 1;
/// GDT index of the data segment.
pub const DATA_INDEX: u16 = 2;
/// GDT index of the TSS.
pub const TSS_INDEX: u16 = 3;

/// The four-entry boot GDT with the given code segment.
pub fn boot_gdt(code: u64) -> [u64; 4] {
    [0, code, DATA, TSS]
}

/// The KVM segment register that loading `entry` from GDT slot `index` would produce.
pub fn segment_from_entry(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    // With G=1 the limit counts 4 KiB pages; KVM wants it in bytes.
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode_ring0() {
        let seg = segment_from_entry(CODE64, CODE_INDEX);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn code32_and_data_are_flat_4g() {
        let code = segment_from_entry(CODE32, CODE_INDEX);
        assert_eq!((code.l, code.db, code.g, code.base), (0, 1, 1, 0));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_entry(DATA, DATA_INDEX);
        assert_eq!((data.type_, data.s, data.selector), (0x3, 1, 0x10));
    }

    #[test]
    fn entry_roundtrips_base_and_byte_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = segment_from_entry(e, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
        assert_eq!(seg.selector, 40);
    }

    #[test]
    fn null_entry_is_unusable() {
        assert_eq!(segment_from_entry(0, 0).unusable, 1);
    }
}
