/work/main/firmware/target/release/deps/fuzz-cf7454628e0c7b51.d: tests/fuzz.rs tests/common/mod.rs

/work/main/firmware/target/release/deps/fuzz-cf7454628e0c7b51: tests/fuzz.rs tests/common/mod.rs

tests/fuzz.rs:
tests/common/mod.rs:
