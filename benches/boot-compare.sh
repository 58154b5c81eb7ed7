#!/usr/bin/env bash
# Boot time side by side: vmm vs QEMU -M microvm (KVM), same kernel and initramfs, same test host,
# alternating boots; prints medians and the ratio. Usage: benches/boot-compare.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/bootbench compare --runs "${1:-10}"
