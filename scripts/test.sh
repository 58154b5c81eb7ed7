#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest artifacts (cached outside the
# clone), builds the workspace and runs every test, including the guest boots (inside the QEMU-TCG
# test host on machines without VMX/SVM). Ends with one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# Build the guest artifacts up front so progress is visible (about 10 minutes the first time).
bash tests/guest/build-kernel.sh >/dev/null
bash tests/guest/build-initramfs.sh >/dev/null
bash tests/testhost/build.sh >/dev/null
bash tests/guest/fetch-debian-kernel.sh cloud-amd64 >/dev/null
# The UEFI firmware is its own Cargo workspace (freestanding flags); cached like the kernel.
bash firmware/build.sh >/dev/null
cargo build --workspace --bins --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Output goes through tee on a descriptor of its own, not a pipeline: a process that a failed
# test left running (a proxy, a server) holds the pipe open, and a pipeline would wait on it for
# ever. Once cargo is done, whatever still runs from this build's target directory is ended and
# tee gets a few seconds to write out what it has.
exec 3> >(tee "$log")
tee_pid=$!
cargo test --workspace --no-fail-fast >&3 2>&1 || status=$?
# The firmware's disk formats, PE loader and memory map, tested on the host.
cargo test --release --manifest-path firmware/Cargo.toml --no-fail-fast >&3 2>&1 || status=$?
exec 3>&-
if pkill -f "$PWD/target/" 2>/dev/null; then
  echo "test.sh: ended processes that tests left running"
fi
for _ in $(seq 1 50); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.2; done
kill "$tee_pid" 2>/dev/null || true
# Only cargo's own summaries count (a test's output may say "0x900000 failed").
results=$(grep -E '^test result: ' "$log" || true)
passed=$(grep -oE '[0-9]+ passed' <<<"$results" | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed' <<<"$results" | awk '{s+=$1} END {print s+0}')
echo "$passed passed, $failed failed"
exit "$status"
