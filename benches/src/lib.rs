//! Shared pieces of the benchmarks: timing a guest boot from process start.

pub mod timing;
