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
wait_state() { # vm, Running|Stopped, seconds
  lb vm wait "$1" --for "${2,,}" --timeout "$3s" >/dev/null || { lb vm get "$1"; return 1; }
}
vmm_pid() { cat "$D/$1/vms/$2/vm.json" 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'; }
tap_of() { sed -n 's/.*"tap": *"\([^"]*\)".*/\1/p' "$D/$1/vms/$2/vm.json" 2>/dev/null; }

echo "== cluster up"
cluster up --workers 2 --kernel "$KERNEL" --initramfs "$INITRAMFS" \
  --worker-cpus 4 --worker-memory 768M --lease-ttl 15s || { fail cluster-up "see above"; exit 1; }

base=$WORK/base.raw
truncate -s 64M "$base"
lb image add base --path "$base" --format raw \
  --cmdline "console=ttyS0 reboot=k panic=1 lbacpid=1 lbagent=1"

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
# The running vmm holds the image's lock, so the header is read as bytes: it names the base.
check overlay-backing grep -qaF "$base" "$D/$w/vms/web-1/root.qcow2"
# The guest agent answered over vsock (the TCP probe is the fallback for images without one;
# the agent may come up a moment after the address answers).
agent_reported() { for _ in $(seq 60); do [ -n "$(field web-1 agent)" ] && return 0; sleep 1; done; return 1; }
check running-via-agent agent_reported
check agent-through-worker sh -c \
  "'$LIGHTBYTE_BIN/lightbyte' vm agent web-1 ping | grep '\"hostname\": \"web-1\"' >/dev/null"

# The agent comes back within the worker lease TTL (15 s; TCG is slow): longer, and the VM
# would be marked Lost meanwhile (it stays placed here: this worker may still run it).
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
refused() { # expected text, command...: fails, and says so
  local want=$1 out rc; shift
  out=$("$@" 2>&1); rc=$?
  echo "$out"
  [ "$rc" -ne 0 ] && grep -q "$want" <<<"$out"
}
check bad-cpus-rejected refused 422 lb vm create bad-1 --image base --cpus 0
check agent-unknown-vm refused 'not found' lb vm agent nope ping
check bad-image-rejected refused 'not found' lb vm create bad-2 --image missing
check bad-name-rejected refused 422 lb vm create Bad_Name --image base
nothing_written() { local l; l=$(lb vm list -o json) && ! grep -qi 'bad' <<<"$l"; }
check nothing-written nothing_written

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
check etcd-down-503 refused '503 Service Unavailable: etcd unavailable' lb vm list
s1=$(date +%s)
check etcd-down-fast test $((s1 - s0)) -le 10
check vms-survive-etcd-outage kill -0 "$pid"
sleep 6
cluster start etcd
api_back() { for _ in $(seq 100); do lb vm list >/dev/null 2>&1 && return 0; sleep 0.3; done; return 1; }
check api-recovers api_back
all_there() {
  local vms images
  vms=$(lb vm list) && images=$(lb image list) &&
    grep -q '^web-1 ' <<<"$vms" && grep -q '^app-2 ' <<<"$vms" && grep -q '^base ' <<<"$images"
}
check nothing-lost all_there
lb vm create web-2 --image base --memory 96M
check controllers-recover wait_state web-2 Running 240
check web-1-still-running test "$(field web-1 state)" = Running

echo "== delete: process, TAP and volume gone"
w2=$(field web-2 placement)
pid2=$(vmm_pid "$w2" web-2)
tap2=$(tap_of "$w2" web-2)
for v in web-1 web-2 app-1 app-2; do lb vm delete "$v"; done
processes_gone() {
  for _ in $(seq 150); do
    ! kill -0 "$pid" 2>/dev/null && ! kill -0 "$pid2" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
check delete-process-gone processes_gone
removed() { # waits for the VM directories to go: they are removed after the process and TAP
  for _ in $(seq 50); do
    [ ! -e "$D/$w/vms/web-1" ] && [ ! -e "$D/$w2/vms/web-2" ] && return 0
    sleep 0.2
  done
  return 1
}
check delete-volume-gone removed
taps_gone() { ! ip -n "lbdev-$w" link show "$tap" 2>/dev/null && ! ip -n "lbdev-$w2" link show "$tap2" 2>/dev/null; }
check delete-tap-gone taps_gone
graceful() { grep -q 'stopped and removed.*web-1' "$D/$w.log" && ! grep -q 'killing' "$D"/w*.log; }
check graceful-stop graceful

echo "== drain: a standalone VM moves with its disk, a scale group is replaced surge-first"
# The guest mounts its root disk (an ext4 image under its overlay): the first boot writes a
# file with a random token, later boots print it.
notes=$WORK/notes.raw
rm -f "$notes"; truncate -s 64M "$notes"; mkfs.ext4 -q -F "$notes"
lb image add notes --path "$notes" --format raw \
  --cmdline "console=ttyS0 reboot=k panic=1 lbacpid=1 lbagent=1"
note_sh='mkdir -p /mnt/n && mount -t ext4 /dev/vda /mnt/n && if [ -f /mnt/n/note ]; then echo "LIGHTBYTE-NOTE-READ $(cat /mnt/n/note)"; else echo "note-$(cat /proc/sys/kernel/random/uuid)" > /mnt/n/note; sync; echo "LIGHTBYTE-NOTE-WROTE $(cat /mnt/n/note)"; fi; umount /mnt/n'
lb vm create note --image notes --memory 128M --cmdline "lbcmd64=$(printf %s "$note_sh" | base64 -w0)"
check note-running wait_state note Running 300
src=$(field note placement)
note_wrote() { grep -ao 'LIGHTBYTE-NOTE-WROTE [a-z0-9-]*' "$D/$src/vms/note/console.log" | awk '{print $2}'; }
for _ in $(seq 60); do [ -n "$(note_wrote)" ] && break; sleep 1; done
token=$(note_wrote)
check note-wrote test -n "$token"
lb scale-group create grp --image base --memory 96M --replicas 2 --wait --timeout 10m
wstate() { lb worker get "$1" -o json | sed -n 's/.*"state": *"\([A-Za-z]*\)".*/\1/p' | head -1; }
ready_of() { lb scale-group get grp -o json | sed -n 's/.*"ready": *\([0-9]*\).*/\1/p' | head -1; }
check group-ready test "$(ready_of)" = 2
rm -f "$WORK/stop-sampling"
( while [ ! -e "$WORK/stop-sampling" ]; do ready_of; sleep 0.5; done >"$WORK/ready-samples" ) &
sampler=$!
t0=$(date +%s)
lb worker drain "$src" --wait --timeout 15m
echo "drain of $src took $(( $(date +%s) - t0 )) s"
touch "$WORK/stop-sampling"; wait "$sampler"
check drain-drained test "$(wstate "$src")" = Drained
dst=$(field note placement)
check note-moved test -n "$dst" -a "$dst" != "$src"
check note-running-after-move wait_state note Running 300
note_read() { grep -aq "LIGHTBYTE-NOTE-READ $token" "$D/$dst/vms/note/console.log"; }
read_back() { for _ in $(seq 60); do note_read && return 0; sleep 1; done; return 1; }
check note-same-file read_back
check note-source-gone test ! -e "$D/$src/vms/note"
drained_no_vmm() { ! pgrep -f -- "--api-socket $D/$src/" >/dev/null; }
check drained-no-vmm drained_no_vmm
min_ready=$(grep -E '^[0-9]+$' "$WORK/ready-samples" | sort -n | head -1)
echo "group ready members during the drain: min $min_ready over $(wc -l <"$WORK/ready-samples") samples"
check group-never-below test "${min_ready:-0}" -ge 2
group_off_src() { ! lb vm list -o json | grep -q "\"placement\": \"$src\""; }
check group-moved-off group_off_src
lb worker uncordon "$src"
check uncordoned test "$(wstate "$src")" = Ready
lb scale-group delete grp --wait --timeout 5m
lb vm delete note
vms_gone() { for _ in $(seq 150); do [ "$(lb vm list -o json)" = "[]" ] && return 0; sleep 0.2; done; return 1; }
check drain-cleanup vms_gone
no_vmm() { for _ in $(seq 150); do ! pgrep -f -- "--api-socket $D/" >/dev/null && return 0; sleep 0.2; done; return 1; }
check no-vmm-left no_vmm
lb vm list
echo "== done"
