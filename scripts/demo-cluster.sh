#!/usr/bin/env bash
# The quick start's cluster demo: brings up a local cluster (etcd, a control plane, two workers
# in their own network namespaces; scripts/dev-cluster.sh), registers a base image, creates two
# VMs through the CLI, waits until they run with their IPs, pings them, runs a scale group of 2
# scaled to 3, drains a worker (members replaced elsewhere, the standalone VM moved with its
# disk) and lists everything.
# Runs where guests can run (scripts/quickstart.sh starts it inside the test host on machines
# without VMX/SVM). With --keep the cluster stays up; otherwise it is taken down at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
keep=0
[ "${1:-}" = --keep ] && keep=1
export LIGHTBYTE_BIN=${LIGHTBYTE_BIN:-$here/target/release}
export LIGHTBYTE_SERVER=http://127.0.0.1:7070
kernel=$(bash "$here/tests/guest/build-kernel.sh")/vmlinux
initramfs=$(bash "$here/tests/guest/build-initramfs.sh")
lb() { echo "\$ lightbyte $*"; "$LIGHTBYTE_BIN/lightbyte" "$@"; }
cluster() { bash "$here/scripts/dev-cluster.sh" "$@"; }
[ "$keep" = 1 ] || trap 'cluster down >/dev/null 2>&1 || true' EXIT

cluster up --workers 2 --kernel "$kernel" --initramfs "$initramfs" --worker-cpus 8 \
  --worker-memory 1G
base=$(mktemp -d /tmp/lightbyte-demo.XXXXXX)/base.raw
"$LIGHTBYTE_BIN/vmm" img create -f raw "$base" 256M >/dev/null
lb image add base --path "$base" --format raw --cmdline "console=ttyS0 reboot=k panic=1 lbacpid=1"
lb vm create web-1 --image base --cpus 1 --memory 128M
lb vm create web-2 --image base --cpus 1 --memory 128M
lb vm wait web-1 web-2 --timeout 10m
lb worker list
for ip in $("$LIGHTBYTE_BIN/lightbyte" vm list -o json | sed -n 's/.*"ip": *"\([^"]*\)".*/\1/p'); do
  ping -c 1 -W 5 "$ip" | grep -E 'bytes from|packet loss'
done
lb scale-group create app --image base --memory 96M --replicas 2 --wait --timeout 10m
lb scale-group scale app 3 --wait --timeout 10m
lb vm list
lb worker drain w1 --wait --timeout 15m
lb worker list
lb vm list
lb worker uncordon w1
lb scale-group list
if [ "$keep" = 1 ]; then
  echo "cluster left running: 'bash scripts/dev-cluster.sh down' takes it down"
fi
