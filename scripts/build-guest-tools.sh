#!/usr/bin/env bash
# Builds the programs that run inside guests — the guest agent (lightbyte-guest-agent), the
# load-balancing proxy (lightbyte-proxy) and the vsock test tool (vsockt) — as static binaries (static glibc: -C target-feature=+crt-static on
# the gnu target, the only target installed), cached outside the clone by a hash of their
# sources and the toolchain. Prints the directory that holds them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
mkdir -p "$cache"
key=$( (cd "$root" && find agent-proto guest-agent lb-config proxy/src tests/guest-tools -type f \
          \( -name '*.rs' -o -name Cargo.toml \) | LC_ALL=C sort | xargs cat
        cat "$root/Cargo.lock" "$root/Cargo.toml" "$0"; rustc --version) | sha256sum | cut -c1-16)
out="$cache/guest-tools-$key"
progs=(lightbyte-guest-agent lightbyte-proxy vsockt)
have=1; for b in "${progs[@]}"; do [ -x "$out/$b" ] || have=0; done
if [ $have = 1 ]; then echo "$out"; exit 0; fi
echo "build-guest-tools: building the static guest programs (a few minutes the first time)" >&2
# A target directory of its own: other flags than the workspace's build, and no lock shared
# with a cargo run that may be going on (this runs from test harnesses too).
target="$cache/guest-tools-target"
CARGO_TARGET_DIR="$target" \
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --manifest-path "$root/Cargo.toml" \
    --target x86_64-unknown-linux-gnu -p lightbyte-guest-agent -p lightbyte-proxy \
    -p lightbyte-guest-tools --bins >&2
bin="$target/x86_64-unknown-linux-gnu/release"
for b in "${progs[@]}"; do
  if readelf -d "$bin/$b" | grep -q NEEDED; then
    echo "build-guest-tools: $b is not static" >&2; exit 1
  fi
done
rm -rf "$out.tmp"; mkdir -p "$out.tmp"
for b in "${progs[@]}"; do cp "$bin/$b" "$out.tmp/"; done
# Debug information stays in the build directory; guests unpack these on every boot.
(cd "$out.tmp" && strip --strip-all "${progs[@]}")
mv "$out.tmp" "$out"
echo "$out"
