//! The one piece of "BIOS" a direct-boot VM needs: code at the x86 reset vector.
//!
//! Linux's last reboot fallback (`reboot=b`, and what it ends up trying when the others did not
//! reset the machine) jumps to F000:FFF0 in real mode. There is no firmware there, so we place a
//! stub that asks the keyboard controller for a CPU reset, which ends the VM like any reboot.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Physical address of the reset vector (F000:FFF0).
pub const RESET_VECTOR: u64 = 0xffff0;

/// `mov al, 0xfe; out 0x64, al; hlt; jmp short -3` (back to the hlt).
const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes the reset stub.
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_fits_below_1m_and_is_written() {
        assert!(RESET_VECTOR + RESET_STUB.len() as u64 <= 0x10_0000);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_reset_stub(&mem).unwrap();
        let mut back = [0u8; 7];
        mem.read_slice(&mut back, GuestAddress(RESET_VECTOR))
            .unwrap();
        assert_eq!(back, RESET_STUB);
    }
}
