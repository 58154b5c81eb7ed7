/work/main/firmware/target/release/deps/fuzz-5d66a238d6f3babe.d: tests/fuzz.rs tests/common/mod.rs

/work/main/firmware/target/release/deps/fuzz-5d66a238d6f3babe: tests/fuzz.rs tests/common/mod.rs

tests/fuzz.rs:
tests/common/mod.rs:
