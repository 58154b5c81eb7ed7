#!/usr/bin/env bash
# VMM API figures in one test host run: ping/info latency, create→boot through the API,
# snapshot size and time of a 512 MiB guest, restore→running next to a cold boot.
# Usage: benches/api-compare.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/apibench --rounds "${1:-3}"
