//! x86_64 specifics: memory layout, CPU state, firmware tables.

pub mod acpi;
pub mod bios;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod msr;
pub mod regs;
