#!/usr/bin/env bash
# Quick start: installs what is needed, builds lightbyte and the guest artifacts, and boots a VM
# that prints what it sees and powers off. On a machine whose CPU has VMX/SVM the VM runs directly
# on /dev/kvm; otherwise inside the QEMU-TCG test host (see tests/testhost).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
bash tests/guest/build-kernel.sh >/dev/null
exec target/release/testhost boot --cpus 2 --memory 512M \
  --cmd 'echo "hello from lightbyte: $(uname -sr), $(nproc) vCPUs, $(grep MemTotal /proc/meminfo)"'
