//! Exception handlers: a fault in the firmware or in a loader it runs prints the vector, error
//! code and registers on the console and stops the VM's boot CPU, instead of a silent triple
//! fault. Interrupts stay masked, so only exceptions arrive here.

use core::arch::{asm, global_asm};

global_asm!(
    ".macro ISR_NOERR n",
    "isr_\\n: push 0",
    "push \\n",
    "jmp isr_common",
    ".endm",
    ".macro ISR_ERR n",
    "isr_\\n: push \\n",
    "jmp isr_common",
    ".endm",
    ".pushsection .text",
    "ISR_NOERR 0", "ISR_NOERR 1", "ISR_NOERR 2", "ISR_NOERR 3", "ISR_NOERR 4", "ISR_NOERR 5",
    "ISR_NOERR 6", "ISR_NOERR 7", "ISR_ERR 8", "ISR_NOERR 9", "ISR_ERR 10", "ISR_ERR 11",
    "ISR_ERR 12", "ISR_ERR 13", "ISR_ERR 14", "ISR_NOERR 15", "ISR_NOERR 16", "ISR_ERR 17",
    "ISR_NOERR 18", "ISR_NOERR 19", "ISR_NOERR 20", "ISR_ERR 21",
    "isr_common:",
    "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {handler}",
    "ud2",
    ".popsection",
    ".pushsection .rodata",
    ".balign 8",
    "isr_table:",
    ".quad isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7, isr_8, isr_9, isr_10",
    ".quad isr_11, isr_12, isr_13, isr_14, isr_15, isr_16, isr_17, isr_18, isr_19, isr_20, isr_21",
    ".popsection",
    handler = sym exception,
);

const VECTORS: usize = 22;

extern "C" {
    static isr_table: [u64; VECTORS];
}

#[repr(C)]
struct Frame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
}

#[repr(C, align(16))]
struct Idt([u64; 2 * VECTORS]);

static mut IDT: Idt = Idt([0; 2 * VECTORS]);

extern "C" fn exception(frame: &Frame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    crate::log!(
        "CPU exception {} (error {:#x}) at rip {:#x}, rsp {:#x}, cr2 {:#x}",
        frame.vector,
        frame.error,
        frame.rip,
        frame.rsp,
        cr2
    );
    crate::log!(
        "rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp
    );
    crate::log!(
        "r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x} cs {:#x} rflags {:#x}",
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15,
        frame.cs, frame.rflags
    );
    crate::platform::fail("a CPU exception stopped the boot")
}

/// Installs the exception handlers.
pub fn init() {
    // SAFETY: runs once at start on the only CPU, before anything reads IDT; `isr_table` is the
    // table of handler addresses defined above.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        let table = &*core::ptr::addr_of!(isr_table);
        for (i, &handler) in table.iter().enumerate() {
            // 64-bit interrupt gate, present, DPL 0, selector 0x08.
            idt.0[2 * i] = (handler & 0xffff)
                | (0x08 << 16)
                | (0x8e00 << 32)
                | ((handler >> 16) & 0xffff) << 48;
            idt.0[2 * i + 1] = handler >> 32;
        }
        let ptr: [u16; 5] = {
            let base = idt.0.as_ptr() as u64;
            [
                (core::mem::size_of::<Idt>() - 1) as u16,
                base as u16,
                (base >> 16) as u16,
                (base >> 32) as u16,
                (base >> 48) as u16,
            ]
        };
        asm!("lidt [{}]", in(reg) ptr.as_ptr(), options(nostack, readonly));
    }
}
