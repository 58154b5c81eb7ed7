#!/usr/bin/env bash
# Builds the root filesystem the block benchmark boots: busybox, Debian's fio with every library
# it links against, and benches/guest/fio-init as /init, as an ext4 image made with
# `mkfs.ext4 -d` (no loop devices, no root needed). Cached by a hash of the recipe and the fio
# version. Prints the image path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
command -v fio >/dev/null || { echo "build-fio-rootfs: fio missing (scripts/install-deps.sh)" >&2; exit 1; }
fio_ver=$(dpkg-query -W -f='${Version}' fio)
key=$( (cat "$here/fio-init" "$here/build-fio-rootfs.sh" /bin/busybox; echo "$fio_ver") \
       | sha256sum | cut -c1-16)
out="$cache/fio-rootfs-$key.ext4"
if [ -f "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/fio-rootfs-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root/bin" "$root/usr/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp /usr/bin/fio "$root/usr/bin/fio"
# The dynamic loader and every library fio links, at the paths the loader looks in.
for lib in $(ldd /usr/bin/fio | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp "$here/fio-init" "$root/init"
chmod 755 "$root/init"
size_mb=$(( $(du -sm "$root" | cut -f1) + 64 ))
mkfs.ext4 -q -F -d "$root" "$out.tmp" "${size_mb}M"
mv "$out.tmp" "$out"
echo "$out"
