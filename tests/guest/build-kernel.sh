#!/usr/bin/env bash
# Builds the minimal lightbyte guest kernel (vmlinux with a PVH entry, and bzImage) from Debian's
# linux-source-6.1 and tests/guest/kernel.config. The result is cached outside the clone, keyed by a
# hash of the recipe, so a second run returns at once. Prints the cache directory on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "build-kernel: $src_tar missing (run scripts/install-deps.sh)" >&2; exit 1; }
src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( (cat "$here/kernel.config" "$here/build-kernel.sh"; echo "$src_ver") | sha256sum | cut -c1-16)
out="$cache/kernel-$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/kernel-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build-kernel: unpacking linux-source $src_ver" >&2
tar -C "$work" -xf "$src_tar"
cd "$work"/linux-source-6.1
echo "build-kernel: configuring (tinyconfig + kernel.config)" >&2
make -s tinyconfig >&2
./scripts/kconfig/merge_config.sh -m .config "$here/kernel.config" >&2
make -s olddefconfig >&2
# Every line of the fragment must have survived olddefconfig; a silently dropped option would give
# a kernel that boots but lacks a device.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" .config || { echo "build-kernel: option not applied: $line" >&2; missing=1; } ;;
  esac
done < "$here/kernel.config"
[ "$missing" = 0 ] || exit 1
echo "build-kernel: compiling vmlinux and bzImage with $(nproc) jobs (about 9 minutes on 2 cores)" >&2
start=$(date +%s)
make -s -j"$(nproc)" vmlinux bzImage >&2
echo "build-kernel: compiled in $(( $(date +%s) - start )) s" >&2
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp .config "$out.tmp/config"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"
