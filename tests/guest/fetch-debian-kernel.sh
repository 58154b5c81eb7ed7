#!/usr/bin/env bash
# Fetches a Debian kernel package (vmlinuz + modules) with `apt-get download` and unpacks it into
# the cache; nothing is installed into the system. Usage: fetch-debian-kernel.sh FLAVOUR
# (cloud-amd64 for the stock guest kernel, amd64 for the test host). Prints the unpacked directory;
# `$dir/vmlinuz` is the kernel and `$dir/lib/modules/$(cat $dir/release)` its modules.
set -euo pipefail
flavour=${1:?usage: fetch-debian-kernel.sh cloud-amd64|amd64}
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
meta=linux-image-$flavour
# The metapackage depends on exactly one versioned image package.
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "fetch-debian-kernel: cannot resolve $meta (run apt-get update)" >&2; exit 1; }
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
out="$cache/debian-$pkg-$ver"
if [ -f "$out/vmlinuz" ] && [ -f "$out/release" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/debkernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "fetch-debian-kernel: downloading $pkg $ver" >&2
(cd "$work" && apt-get download -q "$pkg=$ver" >&2)
dpkg-deb -x "$work"/*.deb "$work/root"
release=${pkg#linux-image-}
mkdir -p "$out.tmp/lib"
cp "$work/root/boot/vmlinuz-$release" "$out.tmp/vmlinuz"
cp "$work/root/boot/config-$release" "$out.tmp/config"
mv "$work/root/lib/modules" "$out.tmp/lib/modules"
echo "$release" > "$out.tmp/release"
# The package leaves modules.dep to its postinst; we need it to resolve module dependencies.
depmod -b "$out.tmp" "$release"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"
