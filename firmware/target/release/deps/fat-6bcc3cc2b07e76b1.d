/work/main/firmware/target/release/deps/fat-6bcc3cc2b07e76b1.d: tests/fat.rs tests/common/mod.rs

/work/main/firmware/target/release/deps/fat-6bcc3cc2b07e76b1: tests/fat.rs tests/common/mod.rs

tests/fat.rs:
tests/common/mod.rs:
