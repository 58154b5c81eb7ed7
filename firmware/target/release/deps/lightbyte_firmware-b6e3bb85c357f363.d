/work/main/firmware/target/release/deps/lightbyte_firmware-b6e3bb85c357f363.d: src/lib.rs src/block.rs src/crc32.rs src/fat.rs src/gpt.rs src/memmap.rs src/pe.rs

/work/main/firmware/target/release/deps/lightbyte_firmware-b6e3bb85c357f363: src/lib.rs src/block.rs src/crc32.rs src/fat.rs src/gpt.rs src/memmap.rs src/pe.rs

src/lib.rs:
src/block.rs:
src/crc32.rs:
src/fat.rs:
src/gpt.rs:
src/memmap.rs:
src/pe.rs:
