/work/main/firmware/target/release/deps/lightbyte_firmware-f09b51a0fbd1079f.d: src/lib.rs src/block.rs src/crc32.rs src/fat.rs src/gpt.rs src/memmap.rs src/pe.rs

/work/main/firmware/target/release/deps/liblightbyte_firmware-f09b51a0fbd1079f.rlib: src/lib.rs src/block.rs src/crc32.rs src/fat.rs src/gpt.rs src/memmap.rs src/pe.rs

/work/main/firmware/target/release/deps/liblightbyte_firmware-f09b51a0fbd1079f.rmeta: src/lib.rs src/block.rs src/crc32.rs src/fat.rs src/gpt.rs src/memmap.rs src/pe.rs

src/lib.rs:
src/block.rs:
src/crc32.rs:
src/fat.rs:
src/gpt.rs:
src/memmap.rs:
src/pe.rs:
