//! The PVH entry point: the VMM starts us in 32-bit protected mode with paging off and EBX
//! pointing at `hvm_start_info`. The stub zeroes .bss, identity-maps the first 4 GiB with 2 MiB
//! pages, enters long mode, enables SSE (the prebuilt `core` uses SSE registers) and calls
//! `rust_main` on our own stack. Interrupts stay off for the firmware's whole life, so the red
//! zone that the prebuilt `core` assumes is safe.

use core::arch::global_asm;

/// Stack for the firmware and every loader it starts (UEFI asks for at least 128 KiB).
pub const STACK_SIZE: usize = 1 << 20;

global_asm!(
    // The PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18) with the 32-bit entry address.
    ".pushsection .note.Xen, \"a\"",
    ".balign 4",
    ".long 4",
    ".long 4",
    ".long 18",
    ".asciz \"Xen\"",
    ".long pvh_entry",
    ".popsection",
    // Page tables and stack: boot-only memory.
    ".pushsection .boot_bss, \"aw\", @nobits",
    ".balign 4096",
    "boot_pml4: .skip 4096",
    "boot_pdpt: .skip 4096",
    "boot_pd: .skip 4096 * 4",
    "boot_stack: .skip {stack_size}",
    "boot_stack_top:",
    ".popsection",
    ".pushsection .rodata",
    ".balign 16",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff", // 0x08: 64-bit code
    ".quad 0x00cf92000000ffff", // 0x10: data
    ".quad 0x00cf9a000000ffff", // 0x18: 32-bit code
    "boot_gdt_end:",
    "boot_gdt_ptr:",
    ".word boot_gdt_end - boot_gdt - 1",
    ".quad boot_gdt",
    ".popsection",
    ".pushsection .text.entry, \"ax\"",
    ".code32",
    ".global pvh_entry",
    "pvh_entry:",
    "cli",
    "cld",
    "mov ebp, ebx",
    // PVH gives no stack: take ours before the far return below pushes to it.
    "mov esp, offset boot_stack_top",
    // Zero .bss and the boot area (the VMM may reuse memory on reset).
    "mov edi, offset __bss_start",
    "mov ecx, offset __image_end",
    "sub ecx, edi",
    "xor eax, eax",
    "rep stosb",
    // PML4[0] -> PDPT, PDPT[0..4] -> the four page directories.
    "mov eax, offset boot_pdpt",
    "or eax, 0x3",
    "mov [boot_pml4], eax",
    "mov edi, offset boot_pdpt",
    "mov eax, offset boot_pd",
    "or eax, 0x3",
    "mov ecx, 4",
    "2:",
    "mov [edi], eax",
    "add edi, 8",
    "add eax, 4096",
    "loop 2b",
    // 2048 2 MiB pages: the first 4 GiB, identity-mapped.
    "mov edi, offset boot_pd",
    "mov eax, 0x83",
    "xor edx, edx",
    "mov ecx, 2048",
    "3:",
    "mov [edi], eax",
    "mov [edi + 4], edx",
    "add edi, 8",
    "add eax, 0x200000",
    "jnc 4f",
    "inc edx",
    "4:",
    "loop 3b",
    // PAE, OSFXSR, OSXMMEXCPT.
    "mov eax, cr4",
    "or eax, 0x620",
    "mov cr4, eax",
    "mov eax, offset boot_pml4",
    "mov cr3, eax",
    // EFER.LME
    "mov ecx, 0xc0000080",
    "rdmsr",
    "or eax, 0x100",
    "wrmsr",
    // CR0: paging, protection, monitor coprocessor; no FPU emulation, no task-switched trap.
    "mov eax, cr0",
    "and eax, 0xfffffff3",
    "or eax, 0x80000003",
    "mov cr0, eax",
    "lgdt [boot_gdt_ptr]",
    "mov eax, offset long_mode_entry",
    "push 0x08",
    "push eax",
    "retf",
    ".code64",
    "long_mode_entry:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    "mov esp, offset boot_stack_top",
    "fninit",
    "mov edi, ebp",
    "call {main}",
    "6:",
    "hlt",
    "jmp 6b",
    ".popsection",
    stack_size = const STACK_SIZE,
    main = sym crate::rust_main,
);
