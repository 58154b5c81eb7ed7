#!/usr/bin/env bash
# Block throughput and IOPS side by side: fio on the host (the image file), in a guest under vmm,
# and in the same guest under QEMU and, when FIRECRACKER= / CLOUD_HYPERVISOR= name their
# binaries (benches/build-peers.sh prints the lines), Firecracker and Cloud Hypervisor, in one
# test host. Usage: [FIRECRACKER=..] [CLOUD_HYPERVISOR=..] benches/blk-compare.sh [SECONDS_PER_JOB]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/blkbench --runtime "${1:-5}"
