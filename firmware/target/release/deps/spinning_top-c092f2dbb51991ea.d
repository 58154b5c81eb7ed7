/work/main/firmware/target/release/deps/spinning_top-c092f2dbb51991ea.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/spinlock.rs

/work/main/firmware/target/release/deps/libspinning_top-c092f2dbb51991ea.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/spinlock.rs

/work/main/firmware/target/release/deps/libspinning_top-c092f2dbb51991ea.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/spinlock.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/spinlock.rs:
