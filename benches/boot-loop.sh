#!/usr/bin/env bash
# Boot reliability: boots vmm RUNS times in a row (default 20) and fails unless every boot
# reached the guest's marker and exited 0. Usage: benches/boot-loop.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/bootbench loop --runs "${1:-20}"
