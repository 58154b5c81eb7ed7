//! Fuzzes virtio-blk request handling: arbitrary descriptor chains (addresses inside, straddling
//! and outside guest memory; any lengths and directions) over arbitrary guest memory contents
//! (headers, sector numbers, discard segments). Nothing may panic, and the disk must never be
//! written outside its size.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use block::MemoryDisk;
use vmm::devices::virtio::block::request::{handle, Desc, DiskInfo};

const MEM: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let count = usize::from(data[0] % 9);
    let read_only = data[1] & 1 == 1;
    let (table, rest) = data[2..].split_at((count * 7).min(data.len() - 2));
    let descs: Vec<Desc> = table
        .chunks_exact(7)
        .map(|c| Desc {
            // Up to 128 KiB: half the addresses fall outside the 64 KiB of memory.
            addr: GuestAddress(u64::from(
                u32::from_le_bytes([c[0], c[1], c[2], 0]) & 0x1_ffff,
            )),
            len: u32::from(u16::from_le_bytes([c[3], c[4]])) | (u32::from(c[5] & 0x3) << 16),
            writable: c[6] & 1 == 1,
        })
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = rest.len().min(MEM);
    mem.write_slice(&rest[..n], GuestAddress(0)).unwrap();
    let mut disk = MemoryDisk::new(vec![0x5a; 32 << 10]);
    let info = DiskInfo {
        size: disk.data.len() as u64,
        read_only,
        serial: b"fuzz".to_vec(),
        ..DiskInfo::default()
    };
    let _ = handle(&mem, &mut disk, &info, &descs);
    assert_eq!(disk.data.len(), 32 << 10);
    if read_only {
        assert!(
            disk.data.iter().all(|b| *b == 0x5a),
            "read-only disk modified"
        );
    }
});
