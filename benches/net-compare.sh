#!/usr/bin/env bash
# virtio-net in one test host run: vmm vs QEMU (vhost off) and, when FIRECRACKER= and
# CLOUD_HYPERVISOR= name their binaries (benches/build-peers.sh prints the lines), Firecracker
# and Cloud Hypervisor: TCP streams each way, 1-byte round trips, connection setup.
# Usage: [FIRECRACKER=..] [CLOUD_HYPERVISOR=..] benches/net-compare.sh [MIB] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/netbench --mib "${1:-128}" --rounds "${2:-3}"
