/work/main/firmware/target/release/deps/gpt-7c073273bc234462.d: tests/gpt.rs tests/common/mod.rs

/work/main/firmware/target/release/deps/gpt-7c073273bc234462: tests/gpt.rs tests/common/mod.rs

tests/gpt.rs:
tests/common/mod.rs:
