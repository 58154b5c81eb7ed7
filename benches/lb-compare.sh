#!/usr/bin/env bash
# The load-balancing proxy (host placement) next to nginx as a reverse proxy and next to a
# backend reached directly, one run, alternating: wrk from a client network namespace to a
# server namespace holding three backends (one nginx serving a short body on three ports),
# lightbyte-proxy (round robin, TCP health checks) and nginx (upstream round robin, keepalive),
# each proxy on one thread/worker. Prints requests/s and p50/p99 latency, and the ratios.
# Usage: benches/lb-compare.sh [SECONDS] [ROUNDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; rounds=${2:-3}; conns=${3:-32}
for t in wrk nginx ip; do
  command -v "$t" >/dev/null || { echo "lb-compare: $t is missing (scripts/install-deps.sh)" >&2; exit 1; }
done
cargo build --release -p lightbyte-proxy >&2
proxy=$PWD/target/release/lightbyte-proxy
work=$(mktemp -d /tmp/lbbench.XXXXXX)
srv=lbb-srv-$$; cli=lbb-cli-$$
cleanup() {
  for p in "$work"/*.pid; do [ -e "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  sleep 0.3
  ip netns pids "$srv" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$srv" 2>/dev/null || true
  ip netns del "$cli" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$srv"; ip netns add "$cli"
ip link add "v$$a" type veth peer name "v$$b"
ip link set "v$$a" netns "$srv"; ip link set "v$$b" netns "$cli"
ip -n "$srv" addr add 10.199.0.1/24 dev "v$$a"; ip -n "$srv" link set "v$$a" up
ip -n "$cli" addr add 10.199.0.2/24 dev "v$$b"; ip -n "$cli" link set "v$$b" up
ip -n "$srv" link set lo up; ip -n "$cli" link set lo up
S() { ip netns exec "$srv" "$@"; }

nginx_conf() { # name, server blocks
  cat > "$work/$1.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/$1.nginx.pid;
error_log $work/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/$1-tmp; proxy_temp_path $work/$1-tmp;
  fastcgi_temp_path $work/$1-tmp; uwsgi_temp_path $work/$1-tmp; scgi_temp_path $work/$1-tmp;
  $2
}
CONF
}
nginx_conf backends "
  server { listen 10.199.0.1:8001; location / { return 200 \"b1\n\"; } }
  server { listen 10.199.0.1:8002; location / { return 200 \"b2\n\"; } }
  server { listen 10.199.0.1:8003; location / { return 200 \"b3\n\"; } }"
nginx_conf proxy "
  upstream site { server 10.199.0.1:8001; server 10.199.0.1:8002; server 10.199.0.1:8003; keepalive 64; }
  server { listen 10.199.0.1:8090; location / { proxy_pass http://site; proxy_http_version 1.1;
           proxy_set_header Connection \"\"; } }"
S nginx -c "$work/backends.conf" & echo $! > "$work/backends.pid"
S nginx -c "$work/proxy.conf" & echo $! > "$work/nginxproxy.pid"
cat > "$work/lb.json" <<JSON
{"revision": 1, "balancers": [{"name": "site", "listen": "10.199.0.1:8080",
  "backends": ["10.199.0.1:8001", "10.199.0.1:8002", "10.199.0.1:8003"],
  "health": {"kind": "tcp", "interval_ms": 1000}}]}
JSON
RUST_LOG=warn S "$proxy" run --threads 1 --control "$work/proxy.sock" --config "$work/lb.json" \
  2>"$work/proxy.log" & echo $! > "$work/proxy.pid"
for port in 8001 8080 8090; do
  for _ in $(seq 100); do
    ip netns exec "$cli" curl -s -o /dev/null "http://10.199.0.1:$port/" && break; sleep 0.1
  done
done

# wrk's summary: requests/s, p50 and p99 in ms.
measure() {
  ip netns exec "$cli" wrk -t1 -c"$conns" -d"${secs}s" --latency "http://10.199.0.1:$1/" 2>&1 |
    awk '
      function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
      /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 }
      /Non-2xx|Socket errors/ { err = err $0 }
      END { printf "%s %.3f %.3f %s\n", rps, p50, p99, (err == "" ? "-" : "errors") }'
}
declare -A runs
names=(direct lightbyte nginx)
declare -A port=([direct]=8001 [lightbyte]=8080 [nginx]=8090)
for r in $(seq "$rounds"); do
  for n in "${names[@]}"; do
    line=$(measure "${port[$n]}")
    echo "round $r $n: $line" >&2
    runs[$n]+="$line"$'\n'
  done
done
median() { # column of the runs of $1
  printf '%s' "${runs[$1]}" | awk -v c="$2" '{print $c}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
printf '\n%s\n\n' "wrk -t1 -c$conns, ${secs} s x $rounds rounds (medians); proxies on one thread each"
echo "| target | requests/s | p50 (ms) | p99 (ms) | req/s vs direct |"
echo "|---|---|---|---|---|"
d=$(median direct 1)
for n in "${names[@]}"; do
  rps=$(median "$n" 1); p50=$(median "$n" 2); p99=$(median "$n" 3)
  printf '| %s | %.0f | %.3f | %.3f | %.2f |\n' "$n" "$rps" "$p50" "$p99" "$(echo "$rps / $d" | bc -l)"
done
l=$(median lightbyte 1); g=$(median nginx 1)
printf '\nlightbyte-proxy / nginx: requests/s %.2f, p50 %.2f, p99 %.2f\n' \
  "$(echo "$l / $g" | bc -l)" \
  "$(echo "$(median lightbyte 2) / $(median nginx 2)" | bc -l)" \
  "$(echo "$(median lightbyte 3) / $(median nginx 3)" | bc -l)"
grep -i "error\|panic" "$work/proxy.log" | head -5 >&2 || true
