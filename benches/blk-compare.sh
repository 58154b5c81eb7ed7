#!/usr/bin/env bash
# Block throughput and IOPS side by side: fio on the host (the image file), in a guest under vmm,
# and in the same guest under QEMU, in one test host. Usage: benches/blk-compare.sh [SECONDS_PER_JOB]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/blkbench --runtime "${1:-5}"
