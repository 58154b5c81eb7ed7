//! The firmware's parts that are plain logic, kept in a library so that they are tested on the
//! host (`cargo test`): disk formats (GPT, FAT), the PE32+ loader and the memory map. The
//! binary (`main.rs`) adds what only runs in the guest.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod block;
pub mod crc32;
pub mod fat;
pub mod gpt;
pub mod memmap;
pub mod pe;
