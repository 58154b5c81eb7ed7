#!/usr/bin/env bash
# Runs a fuzz target for a while (cargo fuzz, nightly toolchain). Installs cargo-fuzz when missing.
# Usage: scripts/fuzz.sh [TARGET] [SECONDS]   (default: virtio_blk_request, 60 s)
set -euo pipefail
cd "$(dirname "$0")/../vmm"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
exec cargo +nightly fuzz run "${1:-virtio_blk_request}" -- -max_total_time="${2:-60}"
