#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest artifacts (cached outside the
# clone), builds the workspace and runs every test, including the guest boots (inside the QEMU-TCG
# test host on machines without VMX/SVM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# Build the guest artifacts up front so progress is visible (about 10 minutes the first time).
bash tests/guest/build-kernel.sh >/dev/null
bash tests/guest/build-initramfs.sh >/dev/null
bash tests/testhost/build.sh >/dev/null
cargo build --workspace --bins --all-targets
cargo test --workspace
