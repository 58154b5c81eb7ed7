#!/usr/bin/env bash
# Builds the test host: Debian's generic amd64 kernel (it has the 9p modules the cloud flavour
# lacks) and an initramfs with busybox, tests/testhost/init and the modules for KVM, 9p, TAP,
# bridges and veth. Cached by a hash of the recipe. Prints two lines: the kernel path and the
# initramfs path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
guest="$here/../guest"
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
kdir=$("$guest/fetch-debian-kernel.sh" amd64)
modules=(virtio_pci kvm_amd tun bridge veth 9pnet_virtio 9p overlay loop ext4 virtio_net virtio_blk
         vhost_vsock vhost_net sch_netem nf_tables nft_ct nft_meta_bridge)
key=$( (cat "$here/init" "$here/build.sh" "$guest/copy-modules.sh" /bin/busybox; echo "$kdir") \
       | sha256sum | cut -c1-16)
out="$cache/testhost-$key.cpio"
if [ ! -f "$out" ]; then
  work=$(mktemp -d "$cache/testhost-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  root="$work/root"
  mkdir -p "$root/bin" "$root/dev"
  cp /bin/busybox "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"
  cp "$here/init" "$root/init"
  chmod 755 "$root/init"
  "$guest/copy-modules.sh" "$kdir" "$root" "${modules[@]}"
  (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$out.tmp"
  mv "$out.tmp" "$out"
fi
echo "$kdir/vmlinuz"
echo "$out"
