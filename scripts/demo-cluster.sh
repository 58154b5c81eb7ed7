#!/usr/bin/env bash
# The quick start's cluster demo: brings up a local cluster (etcd, a control plane, two workers
# in their own network namespaces; scripts/dev-cluster.sh), registers a base image, creates two
# VMs through the CLI, waits until they run with their IPs, pings them, runs a scale group of 2
# scaled to 3, drains a worker (members replaced elsewhere, the standalone VM moved with its
# disk), puts a load balancer (a Pingora proxy in a VM of its own) in front of the group and
# sends requests through it with curl.
# Runs where guests can run (scripts/quickstart.sh starts it inside the test host on machines
# without VMX/SVM). With --keep the cluster stays up; otherwise it is taken down at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
keep=0
[ "${1:-}" = --keep ] && keep=1
export LIGHTBYTE_BIN=${LIGHTBYTE_BIN:-$here/target/release}
# What dev-cluster.sh's DIR/env sets: the CLI as the cluster's admin, over mutual TLS.
dev=${LIGHTBYTE_DEV_DIR:-/tmp/lightbyte-dev}
export LIGHTBYTE_SERVER=https://127.0.0.1:7070 LIGHTBYTE_TOKEN_FILE=$dev/admin.token
export LIGHTBYTE_CA=$dev/pki/ca.crt LIGHTBYTE_CERT=$dev/pki/admin.crt LIGHTBYTE_KEY=$dev/pki/admin.key
# Built (and cached) outside the test host, which has no Rust toolchain on its PATH:
# scripts/quickstart.sh passes them in.
kernel=${KERNEL:-$(bash "$here/tests/guest/build-kernel.sh")/vmlinux}
initramfs=${INITRAMFS:-$(bash "$here/tests/guest/build-initramfs.sh")}
lb() { echo "\$ lightbyte $*"; "$LIGHTBYTE_BIN/lightbyte" "$@"; }
cluster() { bash "$here/scripts/dev-cluster.sh" "$@"; }
[ "$keep" = 1 ] || trap 'cluster down >/dev/null 2>&1 || true' EXIT

cluster up --workers 2 --kernel "$kernel" --initramfs "$initramfs" --worker-cpus 8 \
  --worker-memory 1G
base=$(mktemp -d /tmp/lightbyte-demo.XXXXXX)/base.raw
"$LIGHTBYTE_BIN/vmm" img create -f raw "$base" 256M >/dev/null
# lbhttpd=1: the test initramfs serves its host name over HTTP on port 80 (the backends of the
# load balancer at the end); lbagent=1: the guest agent the load balancer's proxy VMs need.
lb image push base "$base" --format raw \
  --cmdline "console=ttyS0 reboot=k panic=1 random.trust_cpu=on lbacpid=1 lbagent=1 lbhttpd=1"
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
lb lb create front --port 8080 --group app --target-port 80 --image base --proxies 1 \
  --health http --wait --timeout 10m
lb lb get front
addr=$("$LIGHTBYTE_BIN/lightbyte" lb get front -o json | tr -d ' \n' |
  grep -o '"addresses":\[[^]]*\]' | grep -o '[0-9.]*:8080' | head -1)
for _ in 1 2 3 4 5 6; do
  echo "\$ curl http://$addr/"
  curl -s --max-time 10 "http://$addr/"
done
if [ "$keep" = 1 ]; then
  echo "cluster left running: 'bash scripts/dev-cluster.sh down' takes it down"
fi
