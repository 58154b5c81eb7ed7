#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest artifacts (cached outside the
# clone), builds the workspace and runs every test, including the guest boots (inside the QEMU-TCG
# test host on machines without VMX/SVM). Ends with one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# Build the guest artifacts up front so progress is visible (about 10 minutes the first time).
kernel=$(bash tests/guest/build-kernel.sh | tail -1)
initramfs=$(bash tests/guest/build-initramfs.sh | tail -1)
bash tests/testhost/build.sh >/dev/null
debian=$(bash tests/guest/fetch-debian-kernel.sh cloud-amd64 | tail -1)
# The UEFI firmware is its own Cargo workspace (freestanding flags); cached like the kernel.
bash firmware/build.sh >/dev/null
# Built here too, not by the first test that needs them: two test processes run at once below,
# and each would otherwise build the same cache entry beside the other.
bash tests/guest/build-efi-disks.sh "$kernel/bzImage" "$initramfs" "$debian/vmlinuz" >/dev/null
bash scripts/build-image.sh images/recipes/debian-agent.recipe >/dev/null
cargo build --workspace --bins --all-targets
log=$(mktemp)
cluster_log=$(mktemp)
trap 'rm -f "$log" "$cluster_log"' EXIT
status=0
# Output goes through tee on a descriptor of its own, not a pipeline: a process that a failed
# test left running (a proxy, a server) holds the pipe open, and a pipeline would wait on it for
# ever. Once cargo is done, whatever still runs from this build's target directory is ended and
# tee gets a few seconds to write out what it has.
exec 3> >(tee "$log")
tee_pid=$!
# The cluster scenario (about 20 minutes) boots its VMs in a QEMU-TCG test host of its own,
# which keeps one core busy; every other test runs meanwhile on the other core, in a second
# test host where they boot guests. Only when the guests run in test hosts: on a machine with
# VMX or SVM they would run side by side on this host, sharing its network namespaces.
cluster_pid=
skip=()
in_test_hosts() { # as tests/src/testhost.rs decides
  case "${LIGHTBYTE_TESTHOST:-}" in
    qemu) return 0 ;;
    local) return 1 ;;
    *) ! grep -qwE 'vmx|svm' /proc/cpuinfo ;;
  esac
}
if in_test_hosts; then
  echo "test.sh: the cluster scenario runs beside the other tests (output at the end)"
  cargo test -p lightbyte-tests --test cluster --no-fail-fast >"$cluster_log" 2>&1 &
  cluster_pid=$!
  skip=(-- --skip cluster_runs_vms_end_to_end)
fi
cargo test --workspace --no-fail-fast "${skip[@]}" >&3 2>&1 || status=$?
if [ -n "$cluster_pid" ]; then
  wait "$cluster_pid" || status=$?
  cat "$cluster_log" >&3
fi
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
