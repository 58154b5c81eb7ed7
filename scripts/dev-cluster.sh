#!/usr/bin/env bash
# A local lightbyte cluster on one machine: etcd on loopback, one control plane and N workers,
# each worker in its own network namespace with its own bridge and VM subnet, so they behave like
# separate hosts. Needs root (namespaces, bridges, TAP devices).
#
#   dev-cluster.sh up [--workers N] [--dir DIR] [--kernel PATH --initramfs PATH] [--firmware PATH]
#                     [--worker-cpus N] [--worker-memory SIZE] [--lease-ttl DURATION]
#   dev-cluster.sh down [--dir DIR]
#   dev-cluster.sh status [--dir DIR]
#   dev-cluster.sh stop|start etcd|server|wK [--dir DIR]   (failure drills: kill -9, start again)
#
# Layout (worker k = 1..N):
#   - a CA and certificates in DIR/pki (`lightbyte pki`): every connection is mutual TLS;
#   - etcd: https://127.0.0.1:$ETCD_PORT and https://10.123.0.1:$ETCD_PORT (the workers' side),
#     client certificates required, data in DIR/etcd;
#   - control plane: https://127.0.0.1:$API_PORT, log DIR/server.log;
#   - API tokens in DIR/tokens (0600): DIR/admin.token for the CLI, DIR/node.token that the
#     control plane and the workers present to each other; `. DIR/env` sets up the CLI;
#   - bridge lbdev0 (10.123.0.1/24) in this namespace, joined by one veth per worker;
#   - namespace lbdev-wk: eth0 10.123.0.(10+k), worker "wk" with bridge lbbr0 and VM subnet
#     10.124.k.0/24, state in DIR/wk, log DIR/wk.log; this namespace routes 10.124.k.0/24
#     through the worker, so VMs are reachable from here, and each worker's namespace routes
#     the other workers' subnets to them, so VMs on different workers reach each other.
# Processes are started with setsid and their pids kept in DIR/*.pid; `down` stops the VMs too.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

cmd=${1:-}
[ -n "$cmd" ] && shift
workers=2
dir=${LIGHTBYTE_DEV_DIR:-/tmp/lightbyte-dev}
kernel=""
initramfs=""
# UEFI images boot through this firmware (firmware/build.sh leaves it here).
firmware=$here/target/release/lightbyte-firmware
worker_cpus=""
worker_memory=""
lease_ttl=10s
ETCD_PORT=${LIGHTBYTE_DEV_ETCD_PORT:-23790}
PEER_PORT=$((ETCD_PORT + 10))
API_PORT=${LIGHTBYTE_DEV_API_PORT:-7070}
bin=${LIGHTBYTE_BIN:-$here/target/release}

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
target=""
case "$cmd" in stop|start) target=${1:-}; [ $# -gt 0 ] && shift ;; esac
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --kernel) kernel=$2; shift 2 ;;
    --initramfs) initramfs=$2; shift 2 ;;
    --firmware) firmware=$2; shift 2 ;;
    --worker-cpus) worker_cpus=$2; shift 2 ;;
    --worker-memory) worker_memory=$2; shift 2 ;;
    --lease-ttl) lease_ttl=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "dev-cluster.sh: unknown option $1" >&2; usage ;;
  esac
done
case "$workers" in ''|*[!0-9]*) echo "--workers must be a number" >&2; exit 2 ;; esac
if [ "$workers" -lt 1 ] || [ "$workers" -gt 200 ]; then echo "--workers must be 1..200" >&2; exit 2; fi

pki=$dir/pki
# The CLI as the cluster's admin (what DIR/env exports).
lb() {
  LIGHTBYTE_TOKEN_FILE="$dir/admin.token" LIGHTBYTE_CA="$pki/ca.crt" LIGHTBYTE_CERT="$pki/admin.crt" \
    LIGHTBYTE_KEY="$pki/admin.key" "$bin/lightbyte" --server "https://127.0.0.1:$API_PORT" "$@"
}
# curl with the admin's certificate (health checks).
tls_curl() { curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$@"; }

# Starts "$@" detached (own session, survives this script), output appended to $1.log, pid to
# $1.pid, the command kept in $1.cmd for `start`.
daemon() {
  local name=$1; shift
  printf '%q ' "$@" >"$dir/$name.cmd"
  setsid "$@" </dev/null >>"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

# Kills one component the hard way (a crash), or starts it again with its command.
drill() {
  case "$target" in etcd|server|w[0-9]*) ;; *) echo "stop|start: etcd, server or wK" >&2; exit 2 ;; esac
  [ -f "$dir/$target.cmd" ] || { echo "no $target in the cluster at $dir" >&2; exit 1; }
  if [ "$cmd" = stop ]; then
    kill -9 "$(cat "$dir/$target.pid")" 2>/dev/null || true
  else
    eval "daemon $target $(cat "$dir/$target.cmd")"
    echo "$target started (pid $(cat "$dir/$target.pid"))"
  fi
}

stop_pidfile() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  # Workers first (their VMs would be restarted otherwise), then every vmm and host proxy
  # under the state directories, then the control plane and etcd.
  for f in "$dir"/w*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
  pkill -9 -f -- "--api-socket $dir/" 2>/dev/null || true
  # Host proxies of host-placed load balancers (they outlive their worker agent, like vmms).
  pkill -9 -f -- "--control $dir/.*/proxy/proxy.sock" 2>/dev/null || true
  stop_pidfile "$dir/server.pid"
  stop_pidfile "$dir/etcd.pid"
  for ns in $(ip netns list 2>/dev/null | awk '/^lbdev-w[0-9]+/ {print $1}'); do
    k=${ns#lbdev-w}
    # The VMs' cgroups (empty once their vmms are gone; a worker removes them only for VMs it
    # stops itself).
    for cg in /sys/fs/cgroup/lightbyte-w$k-*; do
      [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true
    done
    ip route del "10.124.$k.0/24" 2>/dev/null || true
    ip link del "lbdev-w$k-h" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del lbdev0 2>/dev/null || true
  # Only ever delete a directory `up` made (it leaves a marker): --dir may be mistyped.
  if [ -f "$dir/.lightbyte-dev" ]; then
    rm -rf "$dir"
  elif [ -e "$dir" ]; then
    echo "dev-cluster.sh: $dir is not a dev cluster directory; not deleting it" >&2
  fi
}

wait_for() { # what, tries (0.2 s each), command...
  local what=$1 tries=$2; shift 2
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "dev-cluster.sh: timed out waiting for $what" >&2
  return 1
}

ready_workers() {
  lb worker list -o json 2>/dev/null | grep -o '"state": *"Ready"' | wc -l
}

all_ready() { [ "$(ready_workers)" -ge "$workers" ]; }

up() {
  [ "$(id -u)" = 0 ] || { echo "dev-cluster.sh up needs root (namespaces, bridges, TAPs)" >&2; exit 1; }
  for b in lightbyte vmm; do
    [ -x "$bin/$b" ] || { echo "no $bin/$b: build with 'cargo build --release' (or set LIGHTBYTE_BIN)" >&2; exit 1; }
  done
  command -v etcd >/dev/null || { echo "etcd is not installed (scripts/install-deps.sh installs it)" >&2; exit 1; }
  if [ -e "$dir" ]; then
    [ -f "$dir/.lightbyte-dev" ] || { echo "dev-cluster.sh: $dir exists and is not a dev cluster directory" >&2; exit 1; }
    echo "dev-cluster.sh: $dir exists; taking the old cluster down first" >&2
    down
  fi
  mkdir -p "$dir"
  touch "$dir/.lightbyte-dev"
  echo "== CA and certificates in $pki"
  "$bin/lightbyte" pki init --dir "$pki" >/dev/null
  issue() { "$bin/lightbyte" pki issue --dir "$pki" "$@" >/dev/null; }
  issue etcd --san 127.0.0.1 --san 10.123.0.1 --san localhost
  issue server --san 127.0.0.1 --san 10.123.0.1 --san localhost
  issue admin
  for k in $(seq "$workers"); do issue "w$k" --san "10.123.0.$((10 + k))"; done
  echo "== host bridge lbdev0 10.123.0.1/24"
  ip link add lbdev0 type bridge
  ip addr add 10.123.0.1/24 dev lbdev0
  ip link set lbdev0 up
  echo "== etcd on https://127.0.0.1:$ETCD_PORT and https://10.123.0.1:$ETCD_PORT"
  # etcd before the VMs it shares the machine with (as etcd's tuning guide advises): a worker
  # whose lease renewal waits behind guests and disk copies goes NotReady and its VMs Lost.
  prio=()
  if nice -n -10 true 2>/dev/null; then prio=(nice -n -10); fi
  daemon etcd "${prio[@]}" etcd --name lbdev --data-dir "$dir/etcd" \
    --listen-client-urls "https://127.0.0.1:$ETCD_PORT,https://10.123.0.1:$ETCD_PORT" \
    --advertise-client-urls "https://127.0.0.1:$ETCD_PORT" \
    --cert-file "$pki/etcd.crt" --key-file "$pki/etcd.key" --trusted-ca-file "$pki/ca.crt" \
    --client-cert-auth \
    --listen-peer-urls "http://127.0.0.1:$PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
    --initial-cluster "lbdev=http://127.0.0.1:$PEER_PORT"
  wait_for etcd 150 tls_curl "https://127.0.0.1:$ETCD_PORT/health"
  echo "== API tokens in $dir/tokens (the CLI's: $dir/admin.token)"
  (
    umask 077
    "$bin/lightbyte" token new --role admin --name admin --file "$dir/tokens" >"$dir/admin.token"
    "$bin/lightbyte" token new --role node --name cluster --file "$dir/tokens" >"$dir/node.token"
  )
  echo "== control plane on https://127.0.0.1:$API_PORT"
  # Also on the bridge: the workers pull pushed images from it.
  daemon server "$bin/lightbyte" server --etcd "https://127.0.0.1:$ETCD_PORT" \
    --ca "$pki/ca.crt" --cert "$pki/server.crt" --key "$pki/server.key" \
    --listen "127.0.0.1:$API_PORT" --listen "10.123.0.1:$API_PORT" --lease-ttl "$lease_ttl" \
    --image-dir "$dir/images" --tokens "$dir/tokens" --token-file "$dir/node.token"
  wait_for "the control plane" 150 tls_curl "https://127.0.0.1:$API_PORT/healthz"
  for k in $(seq "$workers"); do
    ns=lbdev-w$k
    echo "== worker w$k in namespace $ns (10.123.0.$((10 + k)), VMs on 10.124.$k.0/24)"
    ip netns add "$ns"
    ip link add "lbdev-w$k-h" type veth peer name eth0 netns "$ns"
    ip link set "lbdev-w$k-h" master lbdev0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "10.123.0.$((10 + k))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via 10.123.0.1
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    ip route add "10.124.$k.0/24" via "10.123.0.$((10 + k))"
    args=(--etcd "https://10.123.0.1:$ETCD_PORT" --name "w$k" --state-dir "$dir/w$k"
          --vmm "$bin/vmm" --bridge lbbr0 --subnet "10.124.$k.0/24" --lease-ttl "$lease_ttl"
          --listen "10.123.0.$((10 + k)):7071" --server "https://10.123.0.1:$API_PORT"
          --tokens "$dir/tokens" --token-file "$dir/node.token"
          --ca "$pki/ca.crt" --cert "$pki/w$k.crt" --key "$pki/w$k.key")
    # Guests reach no worker's API (etcd and the control plane are denied already).
    for j in $(seq "$workers"); do args+=(--guest-deny "10.123.0.$((10 + j)):7071"); done
    [ -n "$kernel" ] && args+=(--kernel "$kernel")
    [ -n "$initramfs" ] && args+=(--initramfs "$initramfs")
    [ -f "$firmware" ] && args+=(--firmware "$firmware")
    [ -n "$worker_cpus" ] && args+=(--cpus "$worker_cpus")
    [ -n "$worker_memory" ] && args+=(--memory "$worker_memory")
    # `ip netns exec` mounts a fresh sysfs, which hides the cgroup2 mount under it: a host
    # with cgroup v2 gets it back there, so the worker can give its VMs their limits.
    if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
      daemon "w$k" ip netns exec "$ns" sh -c \
        'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$0" "$@"' "$bin/lightbyte" worker "${args[@]}"
    else
      daemon "w$k" ip netns exec "$ns" "$bin/lightbyte" worker "${args[@]}"
    fi
  done
  # VMs of different workers reach each other (a load balancer's proxy VMs and its backends):
  # each namespace routes the other workers' subnets straight to them over lbdev0, which leaves
  # the host's own forwarding setting alone.
  for k in $(seq "$workers"); do
    for j in $(seq "$workers"); do
      [ "$j" = "$k" ] || ip -n "lbdev-w$k" route add "10.124.$j.0/24" via "10.123.0.$((10 + j))"
    done
  done
  wait_for "$workers Ready workers" 300 all_ready \
    || { tail -n 5 "$dir"/w*.log >&2; exit 1; }
  lb worker list
  cat >"$dir/env" <<EOF
export LIGHTBYTE_SERVER=https://127.0.0.1:$API_PORT
export LIGHTBYTE_TOKEN_FILE=$dir/admin.token
export LIGHTBYTE_CA=$pki/ca.crt LIGHTBYTE_CERT=$pki/admin.crt LIGHTBYTE_KEY=$pki/admin.key
EOF
  echo "cluster up: '. $dir/env' sets up the CLI; '$0 down' takes it down"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) lb worker list; lb vm list ;;
  stop|start) drill ;;
  *) usage ;;
esac
