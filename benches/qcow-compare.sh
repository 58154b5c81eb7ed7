#!/usr/bin/env bash
# qcow2 throughput next to raw, under vmm and QEMU, in one test host and one run.
# Usage: benches/qcow-compare.sh [SECONDS_PER_JOB]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/qcowbench --runtime "${1:-10}"
