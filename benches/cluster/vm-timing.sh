#!/usr/bin/env bash
# Time from `lightbyte vm create` to Running (the guest answers on its IP; waited for with
# `lightbyte vm wait`, one process polling every 100 ms) for 1 VM (median of ROUNDS) and for 10
# VMs created one after another on a 2-worker local cluster, next to the same guest started
# directly with `vmm` on a TAP and timed to its first ping reply (the limit the orchestrator sits
# on). Runs where guests can run (benches/cluster-compare.sh starts it in the
# test host). Prints a Markdown table.
# Environment: LIGHTBYTE_BIN, KERNEL, INITRAMFS; ROUNDS (default 3), MANY (default 10).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
: "${LIGHTBYTE_BIN:?}" "${KERNEL:?}" "${INITRAMFS:?}"
rounds=${ROUNDS:-3}
many=${MANY:-10}
export LIGHTBYTE_BIN LIGHTBYTE_SERVER=http://127.0.0.1:7070
export LIGHTBYTE_DEV_DIR
LIGHTBYTE_DEV_DIR=$(mktemp -d /tmp/lbbench.XXXXXX)/dev
cluster() { bash "$here/scripts/dev-cluster.sh" "$@"; }
lb() { "$LIGHTBYTE_BIN/lightbyte" "$@"; }
work=$(mktemp -d /tmp/lbbench-work.XXXXXX)
trap 'cluster down >/dev/null 2>&1; ip netns del lbbench-direct 2>/dev/null; rm -rf "$work"' EXIT
cmdline="console=ttyS0 reboot=k panic=1 lbacpid=1"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }


cluster up --workers 2 --kernel "$KERNEL" --initramfs "$INITRAMFS" --worker-cpus 16 \
  --worker-memory 900M >&2
truncate -s 64M "$work/base.raw"
lb image add base --path "$work/base.raw" --format raw --cmdline "$cmdline" >&2

# The direct boots run while the cluster idles, so both sides share the same background load
# (etcd, control plane, agents) on the test host's CPU.
echo "== direct: vmm on a TAP in a namespace, launch to first ping reply" >&2
ip netns add lbbench-direct
ip -n lbbench-direct link set lo up
ip -n lbbench-direct link add br0 type bridge
ip -n lbbench-direct addr add 10.125.0.1/24 dev br0
ip -n lbbench-direct link set br0 up
ip -n lbbench-direct tuntap add dev tap0 mode tap
ip -n lbbench-direct link set tap0 master br0 up
direct=()
for r in $(seq "$rounds"); do
  t0=$(now_ms)
  ip netns exec lbbench-direct "$LIGHTBYTE_BIN/vmm" --kernel "$KERNEL" --initramfs "$INITRAMFS" \
    --cpus 1 --memory 128M --serial "file:$work/direct-$r.log" --net tap=tap0,mac=02:00:00:00:00:02 \
    --cmdline "$cmdline ip=10.125.0.2::10.125.0.1:255.255.255.0:direct:eth0:off" &
  pid=$!
  until ip netns exec lbbench-direct ping -c 1 -W 1 10.125.0.2 >/dev/null 2>&1; do sleep 0.05; done
  direct+=($(( $(now_ms) - t0 )))
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true
done
direct_med=$(printf '%s\n' "${direct[@]}" | median)

echo "== direct: $many vmm at once (64 MiB each, as below)" >&2
for i in $(seq "$many"); do
  ip -n lbbench-direct tuntap add dev "tapm$i" mode tap
  ip -n lbbench-direct link set "tapm$i" master br0 up
done
t0=$(now_ms)
pids=()
for i in $(seq "$many"); do
  ip netns exec lbbench-direct "$LIGHTBYTE_BIN/vmm" --kernel "$KERNEL" --initramfs "$INITRAMFS" \
    --cpus 1 --memory 64M --serial "file:$work/many-$i.log" \
    --net "tap=tapm$i,mac=02:00:00:00:01:$(printf %02x "$i")" \
    --cmdline "$cmdline ip=10.125.0.$((100 + i))::10.125.0.1:255.255.255.0:m$i:eth0:off" &
  pids+=($!)
done
for i in $(seq "$many"); do
  until ip netns exec lbbench-direct ping -c 1 -W 1 "10.125.0.$((100 + i))" >/dev/null 2>&1; do sleep 0.2; done
done
direct_many=$(( $(now_ms) - t0 ))
kill -9 "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true

echo "== one VM, $rounds rounds" >&2
one=()
for r in $(seq "$rounds"); do
  t0=$(now_ms)
  lb vm create "one-$r" --image base --memory 128M >&2
  lb vm wait "one-$r" --timeout 600s >/dev/null
  one+=($(( $(now_ms) - t0 )))
  lb vm delete "one-$r" >&2
  until ! pgrep -f -- "--api-socket $LIGHTBYTE_DEV_DIR/.*/one-$r/" >/dev/null; do sleep 0.2; done
done
one_med=$(printf '%s\n' "${one[@]}" | median)

echo "== $many VMs at once" >&2
t0=$(now_ms)
names=()
for i in $(seq "$many"); do lb vm create "many-$i" --image base --memory 64M >/dev/null; names+=("many-$i"); done
t_created=$(( $(now_ms) - t0 ))
lb vm wait "${names[@]}" --timeout 1200s >/dev/null
all=$(( $(now_ms) - t0 ))
spread=$(lb vm list | awk 'NR>1 {print $3}' | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}')

echo "| measurement | ms | / direct vmm |"
echo "|---|---|---|"
echo "| direct vmm: launch → first ping reply (median of $rounds) | $direct_med | 1.00 |"
echo "| 1 VM: vm create → Running (median of $rounds; rounds: ${one[*]}) | $one_med | $(awk "BEGIN {printf \"%.2f\", $one_med / $direct_med}") |"
echo "| $many VMs: all created (CLI calls) | $t_created | |"
echo "| direct vmm: $many at once, launch → all answer pings | $direct_many | 1.00 |"
echo "| $many VMs: all Running ($spread) | $all | $(awk "BEGIN {printf \"%.2f\", $all / $direct_many}") |"
