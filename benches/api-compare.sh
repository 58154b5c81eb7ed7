#!/usr/bin/env bash
# VMM API figures in one test host run: ping/info latency, create→boot through the API, full
# and diff snapshot time and size of a 512 MiB guest, restore→next guest tick from each; with
# FIRECRACKER= (benches/build-peers.sh prints the line) Firecracker's in the same rounds.
# Usage: [FIRECRACKER=...] benches/api-compare.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/apibench --rounds "${1:-3}"
