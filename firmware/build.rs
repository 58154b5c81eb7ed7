//! Links the firmware with its own linker script when firmware/build.sh builds it (host unit
//! tests link normally), and relinks when the script changes.

fn main() {
    println!("cargo:rerun-if-changed=layout.ld");
    println!("cargo:rerun-if-env-changed=LIGHTBYTE_FIRMWARE_LINK");
    if std::env::var_os("LIGHTBYTE_FIRMWARE_LINK").is_some() {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        for arg in [
            "-nostartfiles",
            "-nostdlib",
            "-static",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
        ] {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/layout.ld");
    }
}
