/work/main/firmware/target/release/deps/fat-1a2b071064874b1b.d: tests/fat.rs tests/common/mod.rs

/work/main/firmware/target/release/deps/fat-1a2b071064874b1b: tests/fat.rs tests/common/mod.rs

tests/fat.rs:
tests/common/mod.rs:
