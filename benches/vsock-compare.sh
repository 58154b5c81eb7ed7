#!/usr/bin/env bash
# vsock next to TCP over virtio-net in the same guest, one test host run: stream throughput
# host→guest and guest→host (one connection, 64 KiB writes) and connection setup rate.
# Usage: benches/vsock-compare.sh [MIB] [ROUNDS] [--compare-jail]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
bash scripts/build-guest-tools.sh >/dev/null
exec target/release/vsockbench --mib "${1:-256}" --rounds "${2:-3}" ${3:+"$3"}
