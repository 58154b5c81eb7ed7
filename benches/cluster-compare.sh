#!/usr/bin/env bash
# Orchestrator figures: control-plane API throughput (GET/LIST on 1,000 objects, next to etcd
# read directly; no guest, runs here) and VM create → Running for 1 and 10 VMs on 2 workers next
# to a direct vmm launch (in the test host on machines without VMX/SVM).
# Usage: benches/cluster-compare.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
kernel=$(bash tests/guest/build-kernel.sh)/vmlinux
initramfs=$(bash tests/guest/build-initramfs.sh)
echo "## control-plane API"
target/release/cpbench
echo
echo "## VM create → Running"
exec target/release/testhost run --timeout 1800 -- \
  env LIGHTBYTE_BIN="$PWD/target/release" KERNEL="$kernel" INITRAMFS="$initramfs" ROUNDS="${1:-3}" \
  bash "$PWD/benches/cluster/vm-timing.sh"
