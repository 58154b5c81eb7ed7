#!/usr/bin/env bash
# Runs a fuzz target for a while (cargo fuzz, nightly toolchain). Installs cargo-fuzz when missing.
# Usage: scripts/fuzz.sh [TARGET] [SECONDS]   (default: virtio_blk_request, 60 s)
# Targets: virtio_blk_request (vmm/fuzz), qcow2_open (qcow/fuzz; seeded from qcow/fuzz/seeds),
#          api_create_body (vmm/fuzz; the API's request bodies, seeded and with a dictionary),
#          agent_frames (agent-proto/fuzz; the guest agent's frames and requests).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
target="${1:-virtio_blk_request}"
secs="${2:-60}"
case "$target" in
  qcow2_*)
    cd qcow
    # New inputs go to fuzz/corpus/TARGET (ignored by git); the committed seeds are read too.
    mkdir -p "fuzz/corpus/$target"
    exec cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30
    ;;
  agent_*)
    cd agent-proto
    exec cargo +nightly fuzz run "$target" -- -max_total_time="$secs"
    ;;
  api_*)
    cd vmm
    mkdir -p "fuzz/corpus/$target"
    exec cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$secs" -dict="fuzz/$target.dict" -timeout=10
    ;;
  *)
    cd vmm
    exec cargo +nightly fuzz run "$target" -- -max_total_time="$secs"
    ;;
esac
