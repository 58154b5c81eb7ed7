#!/usr/bin/env bash
# Quick start: installs what is needed, builds lightbyte and the guest artifacts, then brings up
# a local cluster (etcd, a control plane, two workers in their own network namespaces), boots two
# VMs through the `lightbyte` CLI, shows them running with their IPs and takes the cluster down
# (scripts/demo-cluster.sh). On a machine whose CPU has VMX/SVM this runs directly (as root, with
# --keep to leave the cluster up); otherwise inside the QEMU-TCG test host (see tests/testhost).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
bash firmware/build.sh >/dev/null
kernel=$(bash tests/guest/build-kernel.sh)/vmlinux
initramfs=$(bash tests/guest/build-initramfs.sh)
exec target/release/testhost run --timeout 1200 -- \
  env KERNEL="$kernel" INITRAMFS="$initramfs" bash "$PWD/scripts/demo-cluster.sh" "$@"
