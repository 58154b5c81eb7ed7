#!/usr/bin/env bash
# Builds the test initramfs: busybox-static, tests/guest/init, the guest agent, the
# load-balancing proxy and the vsock test tool (static, from scripts/build-guest-tools.sh), and
# the virtio/vsock/pvpanic and ACPI power button (button, evdev) modules of Debian's cloud kernel (loaded only when that kernel boots; the
# minimal kernel has them built in). Cached by a hash of its recipe. Prints the path of the cpio
# archive.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
cloud=$("$here/fetch-debian-kernel.sh" cloud-amd64)
tools=$("$here/../../scripts/build-guest-tools.sh")
busybox=/bin/busybox
modules=(virtio_pci virtio_blk virtio_net virtio_console virtio_rng virtio_balloon
         vmw_vsock_virtio_transport pvpanic_mmio button evdev)
key=$( (cat "$here/init" "$here/build-initramfs.sh" "$here/copy-modules.sh" "$busybox"; echo "$cloud $tools") \
       | sha256sum | cut -c1-16)
out="$cache/initramfs-$key.cpio"
if [ -f "$out" ]; then echo "$out"; exit 0; fi
work=$(mktemp -d "$cache/initramfs-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root/bin" "$root/dev" "$root/usr/bin"
cp "$busybox" "$root/bin/busybox"
cp "$tools/lightbyte-guest-agent" "$tools/lightbyte-proxy" "$tools/vsockt" "$root/usr/bin/"
ln -s busybox "$root/bin/sh"
cp "$here/init" "$root/init"
chmod 755 "$root/init"
"$here/copy-modules.sh" "$cloud" "$root" "${modules[@]}"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
