#!/usr/bin/env bash
# Boot time side by side: vmm vs QEMU -M microvm (KVM), and Firecracker and Cloud Hypervisor when
# FIRECRACKER= and CLOUD_HYPERVISOR= name their binaries; same kernel and initramfs, same test host,
# interleaved boots; prints medians, guest uptime at init, memory outside guest RAM and ratios.
# VMM_BASELINE= names another vmm binary (built before a change) to compare ours with.
# Usage: [FIRECRACKER=..] [CLOUD_HYPERVISOR=..] [VMM_BASELINE=..] benches/boot-compare.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/bootbench compare --runs "${1:-7}"
