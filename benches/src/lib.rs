//! Shared pieces of the benchmarks: timing a guest boot from process start, fio jobs and reports.

pub mod boottrace;
pub mod fcapi;
pub mod fio;
pub mod guestfio;
pub mod peers;
pub mod streams;
pub mod timing;
pub mod uefi;
