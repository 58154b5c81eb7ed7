#!/usr/bin/env bash
# The lost request of issue 15: boots the configuration that hung twice in 40 CI boots (two
# vCPUs and queues, a fresh qcow2 on the thread-pool engine, three writers) BOOTS times (default
# 200) in the test host and fails unless every boot got its flushed writes through.
# Usage: benches/lost-request-loop.sh [BOOTS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins
LOST_REQUEST_BOOTS="${1:-200}" exec cargo test -p lightbyte-tests --test disk_faults \
  -- --nocapture first_reads_of_a_fresh_qcow2_never_hang
