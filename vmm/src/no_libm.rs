//! The one libm function the binary calls, so that no VMM process maps `libm.so`.
//!
//! Nothing in the VMM needs libm; the call comes from tokio's multi-thread
//! scheduler (its task poll-time average uses `f64::powf`), linked in because the workspace
//! builds tokio with that feature for the control plane although `vmm` only runs current-thread
//! runtimes. That single `pow` made the dynamic loader map glibc's libm and run its IFUNC
//! resolvers at every start: ~320 KiB resident per VMM (measured with smaps of an idle guest).
//! Defined here, the symbol resolves inside the binary and the linker (`--as-needed`) drops
//! libm. The body is the `libm` crate's port of musl's `pow` (maintained by the Rust project;
//! within 1 ulp), not a call to `f64::powf`, which would lower back to this very symbol.

/// C `pow(x, y)`.
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_c_library_on_ordinary_and_special_values() {
        assert_eq!(pow(2.0, 10.0), 1024.0);
        assert_eq!(pow(9.0, 0.5), 3.0);
        assert!((pow(0.9, 37.5) - 0.019_235_084_742_083_35).abs() < 1e-17);
        assert_eq!(pow(0.0, 0.0), 1.0);
        assert!(pow(-8.0, 1.0 / 3.0).is_nan());
        assert_eq!(pow(f64::INFINITY, -1.0), 0.0);
    }
}
