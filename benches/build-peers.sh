#!/usr/bin/env bash
# Builds the peers the benchmarks compare with, Firecracker and Cloud Hypervisor, from their
# public repositories at pinned commits, into a cache outside the clone (keyed by commit, so a
# second run is instant), and prints the FIRECRACKER= and CLOUD_HYPERVISOR= lines that
# benches/boot-compare.sh and the other compare scripts take.
#
# Usage: [JOBS=N] [ONLY=firecracker] benches/build-peers.sh [FIRECRACKER_SRC CLOUD_HYPERVISOR_SRC]
#   Without sources it clones github.com/firecracker-microvm/firecracker and
#   github.com/cloud-hypervisor/cloud-hypervisor. Given checkouts are built at whatever commit
#   they hold (the printed paths name it).
# Offline: LIGHTBYTE_GIT_MIRROR=DIR serves github.com/OWNER/NAME from DIR/OWNER+NAME/repo (bare
#   repositories), for the clones and for the micro_http git crate both peers use (and its
#   rust-vmm-ci submodule).
#
# Neither peer's pinned toolchain can be assumed installed: their rust-toolchain.toml is removed and
# the stable toolchain builds both unchanged. Firecracker is built for the gnu target, which has
# no default seccomp policy (it says so and runs without one).
set -euo pipefail
# A failed clone inside $(source_of ...) must stop the script, not build from nothing.
shopt -s inherit_errexit
FC_REV=81b38b9dad6056d7a48073e95ac5a9aed51cb2ab
CH_REV=ae44c2971c83dd2b1bd704fa81102ec0dec4e7d4
cache=${XDG_CACHE_HOME:-$HOME/.cache}/lightbyte/peers
mkdir -p "$cache/bin"

need=()
for p in libseccomp-dev clang libclang-dev cmake git; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "build-peers: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi

if [ -n "${LIGHTBYTE_GIT_MIRROR:-}" ]; then
  m=$LIGHTBYTE_GIT_MIRROR
  export CARGO_NET_GIT_FETCH_WITH_CLI=true GIT_CONFIG_COUNT=6
  export GIT_CONFIG_KEY_0="url.file://$m/firecracker-microvm+micro-http/repo.insteadOf"
  export GIT_CONFIG_VALUE_0="https://github.com/firecracker-microvm/micro-http"
  export GIT_CONFIG_KEY_1="url.file://$m/rust-vmm+rust-vmm-ci/repo.insteadOf"
  export GIT_CONFIG_VALUE_1="https://github.com/rust-vmm/rust-vmm-ci.git"
  export GIT_CONFIG_KEY_2="url.file://$m/firecracker-microvm+firecracker/repo.insteadOf"
  export GIT_CONFIG_VALUE_2="https://github.com/firecracker-microvm/firecracker"
  export GIT_CONFIG_KEY_3="url.file://$m/cloud-hypervisor+cloud-hypervisor/repo.insteadOf"
  export GIT_CONFIG_VALUE_3="https://github.com/cloud-hypervisor/cloud-hypervisor"
  export GIT_CONFIG_KEY_4=uploadpack.allowAnySHA1InWant GIT_CONFIG_VALUE_4=true
  export GIT_CONFIG_KEY_5=protocol.file.allow GIT_CONFIG_VALUE_5=always
fi

# source NAME URL REV [GIVEN]: a checkout of NAME at REV (or GIVEN as it is); prints its path.
source_of() {
  local name=$1 url=$2 rev=$3 given=${4:-}
  if [ -n "$given" ]; then
    (cd "$given" && pwd)
    return
  fi
  local dir=$cache/src/$name
  if [ ! -d "$dir/.git" ]; then
    mkdir -p "$cache/src"
    local from=$url
    # A mirror is cloned by path (hard links, no pack transfer): a partial mirror lacking a
    # blob the build never reads cannot be cloned over file://, whose transfer checks every object.
    if [ -n "${LIGHTBYTE_GIT_MIRROR:-}" ]; then
      from=$LIGHTBYTE_GIT_MIRROR/$(echo "${url#https://github.com/}" | tr / +)/repo
    fi
    git clone -q --no-checkout "$from" "$dir" >&2
  fi
  # A blob of Firecracker's test resources can be missing from partial mirrors; the build does
  # not need it.
  git -C "$dir" reset -q --soft "$rev" >&2
  git -C "$dir" checkout -q "$rev" -- . ':!src/vmm/src/test_utils/mock_resources/test_noisy_elf.bin' >&2
  echo "$dir"
}

# build NAME SRC BINARY CARGO_ARGS...: builds SRC once per commit, prints the cached binary.
build() {
  local name=$1 src=$2 built=$3; shift 3
  local rev out
  rev=$(git -C "$src" rev-parse --short=12 HEAD)
  out=$cache/bin/$name-$rev
  if [ ! -x "$out" ]; then
    echo "build-peers: building $name at $rev (minutes; cached afterwards)" >&2
    rm -f "$src/rust-toolchain.toml"
    (cd "$src" && CARGO_TARGET_DIR=$cache/target-$name cargo build --release -j"${JOBS:-$(nproc)}" "$@" >&2)
    cp "$cache/target-$name/$built" "$out.tmp"
    mv "$out.tmp" "$out"
  fi
  echo "$out"
}

fc_src=$(source_of firecracker https://github.com/firecracker-microvm/firecracker "$FC_REV" "${1:-}")
fc=$(build firecracker "$fc_src" x86_64-unknown-linux-gnu/release/firecracker \
  -p firecracker --target x86_64-unknown-linux-gnu)
echo "FIRECRACKER=$fc"
if [ "${ONLY:-}" = firecracker ]; then
  exit 0
fi
ch_src=$(source_of cloud-hypervisor https://github.com/cloud-hypervisor/cloud-hypervisor "$CH_REV" "${2:-}")
ch=$(build cloud-hypervisor "$ch_src" release/cloud-hypervisor --bin cloud-hypervisor)
echo "CLOUD_HYPERVISOR=$ch"
