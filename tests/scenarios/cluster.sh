#!/usr/bin/env bash
# The orchestrator end to end, run where guests can run (inside the test host here): a local
# cluster of etcd, one control plane and two workers in their own network namespaces
# (scripts/dev-cluster.sh), driven through the `lightbyte` CLI. Prints "CHECK <name> ok" or
# "CHECK <name> FAILED: <why>" per check; tests/tests/cluster.rs asserts on those lines.
#
# Environment: LIGHTBYTE_BIN (lightbyte and vmm), KERNEL, INITRAMFS, WORK (a writable directory).
set -uo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
: "${LIGHTBYTE_BIN:?}" "${KERNEL:?}" "${INITRAMFS:?}" "${WORK:?}"
export LIGHTBYTE_BIN
# Sockets cannot live on the test host's 9p work directory: the cluster lives in /tmp.
export LIGHTBYTE_DEV_DIR
LIGHTBYTE_DEV_DIR=$(mktemp -d /tmp/lbcluster.XXXXXX)/dev
export LIGHTBYTE_SERVER=http://127.0.0.1:7070
cluster() { bash "$here/scripts/dev-cluster.sh" "$@"; }
lb() { "$LIGHTBYTE_BIN/lightbyte" "$@"; }
D=$LIGHTBYTE_DEV_DIR
trap 'cluster down >/dev/null 2>&1' EXIT

check() { # name, condition..., prints the result
  local name=$1; shift
  if "$@"; then echo "CHECK $name ok"; else echo "CHECK $name FAILED: $*"; fi
}
fail() { echo "CHECK $1 FAILED: $2"; }
# A field of `lightbyte vm get NAME -o json`'s status.
field() { lb vm get "$1" -o json 2>/dev/null | sed -n "s/.*\"$2\": *\"\\([^\"]*\\)\".*/\\1/p" | head -1; }
wait_state() { # vm, state, seconds
  for _ in $(seq $(($3 * 5))); do [ "$(field "$1" state)" = "$2" ] && return 0; sleep 0.2; done
  echo "vm $1 never reached $2:"; lb vm get "$1"; return 1
}
vmm_pid() { cat "$D/$1/vms/$2/vm.json" 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'; }
tap_of() { sed -n 's/.*"tap": *"\([^"]*\)".*/\1/p' "$D/$1/vms/$2/vm.json" 2>/dev/null; }

echo "== cluster up"
cluster up --workers 2 --kernel "$KERNEL" --initramfs "$INITRAMFS" \
  --worker-cpus 2 --worker-memory 768M --lease-ttl 4s || { fail cluster-up "see above"; exit 1; }

base=$WORK/base.raw
truncate -s 64M "$base"
lb image add base --path "$base" --format raw --cmdline "console=ttyS0 reboot=k panic=1 lbacpid=1"

echo "== lifecycle: create -> Running with the guest's IP"
t0=$(date +%s%N)
lb vm create web-1 --image base --cpus 1 --memory 128M
if wait_state web-1 Running 240; then
  echo "create-to-running $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  echo "CHECK running ok"
else
  fail running "not Running"; tail -20 "$D"/w*.log; exit 1
fi
lb vm list
ip=$(field web-1 ip)
w=$(field web-1 placement)
boot=$(field web-1 boot_time)
echo "web-1 on $w at $ip, booted $boot"
check console-net grep -q "LIGHTBYTE-NET eth0 $ip" "$D/$w/vms/web-1/console.log"
check ping-guest ping -c 2 -W 5 "$ip"
pid=$(vmm_pid "$w" web-1)
tap=$(tap_of "$w" web-1)
check vmm-process kill -0 "$pid"
check tap-present ip -n "lbdev-$w" link show "$tap"
check root-overlay test -f "$D/$w/vms/web-1/root.qcow2"
check overlay-backing sh -c "'$LIGHTBYTE_BIN/vmm' img info '$D/$w/vms/web-1/root.qcow2' | grep -q '$base'"

echo "== worker crash: kill -9 the agent of $w, restart it, it re-adopts the VM"
cluster stop "$w"
sleep 1
check vmm-survives-agent kill -0 "$pid"
cluster start "$w"
sleep 3
check readopt-running wait_state web-1 Running 60
check readopt-same-process test "$(vmm_pid "$w" web-1)" = "$pid"
check readopt-same-boot test "$(field web-1 boot_time)" = "$boot"
check readopt-no-reboot test "$(grep -c LIGHTBYTE-GUEST-UP "$D/$w/vms/web-1/console.log")" = 1
check readopt-logged grep -q "re-adopted running vmm" "$D/$w.log"
check ping-after-readopt ping -c 1 -W 5 "$ip"

echo "== bad input: rejected with 4xx, nothing written"
out=$(lb vm create bad-1 --image base --cpus 0 2>&1); rc=$?
echo "$out"
check bad-cpus-rejected sh -c "[ $rc -ne 0 ] && echo '$out' | grep -q '422'"
out=$(lb vm create bad-2 --image missing 2>&1); rc=$?
check bad-image-rejected sh -c "[ $rc -ne 0 ] && echo '$out' | grep -q 'not found'"
check nothing-written sh -c "! lb vm list -o json | grep -q bad-"
out=$(lb vm create Bad_Name --image base 2>&1); rc=$?
check bad-name-rejected sh -c "[ $rc -ne 0 ] && echo '$out' | grep -q '422'"

echo "== spreading: a group's replicas go to different workers"
lb vm create app-1 --image base --memory 96M
lb vm create app-2 --image base --memory 96M
check app-1-running wait_state app-1 Running 240
check app-2-running wait_state app-2 Running 240
check app-spread test "$(field app-1 placement)" != "$(field app-2 placement)"
check ping-app-2 ping -c 1 -W 5 "$(field app-2 ip)"

echo "== etcd down: 503 within seconds, nothing lost, recovery"
cluster stop etcd
s0=$(date +%s)
out=$(lb vm list 2>&1); rc=$?
s1=$(date +%s)
echo "$out"
check etcd-down-503 sh -c "[ $rc -ne 0 ] && echo '$out' | grep -q '503' && echo '$out' | grep -q 'etcd unavailable'"
check etcd-down-fast test $((s1 - s0)) -le 10
check vms-survive-etcd-outage kill -0 "$pid"
sleep 6
cluster start etcd
check api-recovers sh -c 'for i in $(seq 100); do lb vm list >/dev/null 2>&1 && exit 0; sleep 0.3; done; exit 1'
check nothing-lost sh -c "lb vm list | grep -q web-1 && lb vm list | grep -q app-2 && lb image list | grep -q base"
lb vm create web-2 --image base --memory 96M
check controllers-recover wait_state web-2 Running 240
check web-1-still-running test "$(field web-1 state)" = Running

echo "== delete: process, TAP and volume gone"
w2=$(field web-2 placement)
pid2=$(vmm_pid "$w2" web-2)
tap2=$(tap_of "$w2" web-2)
for v in web-1 web-2 app-1 app-2; do lb vm delete "$v"; done
check delete-process-gone sh -c "for i in \$(seq 150); do ! kill -0 $pid 2>/dev/null && ! kill -0 $pid2 2>/dev/null && exit 0; sleep 0.2; done; exit 1"
check delete-tap-gone sh -c "sleep 1; ! ip -n lbdev-$w link show $tap 2>/dev/null && ! ip -n lbdev-$w2 link show $tap2 2>/dev/null"
check delete-volume-gone sh -c "! test -e '$D/$w/vms/web-1' && ! test -e '$D/$w2/vms/web-2'"
check graceful-stop sh -c "grep -q 'stopped and removed.*web-1' '$D/$w.log' && ! grep -q 'killing' '$D'/w*.log"
check no-vmm-left sh -c "! pgrep -f -- '--api-socket $D/' >/dev/null"
lb vm list
echo "== done"
