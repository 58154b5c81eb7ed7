/work/main/firmware/target/release/deps/lightbyte_firmware-755adb21269ff7fc.d: src/lib.rs src/block.rs src/crc32.rs src/fat.rs src/gpt.rs src/memmap.rs src/pe.rs

/work/main/firmware/target/release/deps/liblightbyte_firmware-755adb21269ff7fc.rlib: src/lib.rs src/block.rs src/crc32.rs src/fat.rs src/gpt.rs src/memmap.rs src/pe.rs

/work/main/firmware/target/release/deps/liblightbyte_firmware-755adb21269ff7fc.rmeta: src/lib.rs src/block.rs src/crc32.rs src/fat.rs src/gpt.rs src/memmap.rs src/pe.rs

src/lib.rs:
src/block.rs:
src/crc32.rs:
src/fat.rs:
src/gpt.rs:
src/memmap.rs:
src/pe.rs:
