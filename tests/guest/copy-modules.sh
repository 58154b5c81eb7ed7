#!/usr/bin/env bash
# Copies kernel modules and everything they depend on from an unpacked Debian kernel into an
# initramfs tree, and writes lib/modules/RELEASE/load-order: the .ko files in an order insmod can
# load them. Usage: copy-modules.sh KERNEL_DIR DEST_ROOT MODULE...
set -euo pipefail
kdir=$1; dest=$2; shift 2
release=$(cat "$kdir/release")
mdir="lib/modules/$release"
mkdir -p "$dest/$mdir"
: > "$dest/$mdir/load-order.tmp"
for m in "$@"; do
  # --show-depends prints "insmod PATH" lines, dependencies first; builtin modules print
  # "builtin NAME" and need nothing.
  modprobe -d "$kdir" -S "$release" --show-depends "$m" | while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    rel=${path#"$kdir/"}
    mkdir -p "$dest/$(dirname "$rel")"
    cp -n "$path" "$dest/$rel"
    echo "${rel#"$mdir/"}" >> "$dest/$mdir/load-order.tmp"
  done
done
# Keep the first occurrence of each module: a module must load before anything listed after it.
awk '!seen[$0]++' "$dest/$mdir/load-order.tmp" > "$dest/$mdir/load-order"
rm "$dest/$mdir/load-order.tmp"
