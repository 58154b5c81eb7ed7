#!/usr/bin/env bash
# Builds a bootable lightbyte image from a recipe (see images/recipes/debian-agent.recipe for
# the keys): a root file system (a debootstrap Debian, or busybox alone) with lightbyte's guest
# init, the guest agent and the recipe's files, as a qcow2 disk plus the kernel VMs of it boot
# directly (the guest kernel of tests/guest/build-kernel.sh) and their command line.
#
#   scripts/build-image.sh RECIPE                 prints the output directory
#   scripts/build-image.sh RECIPE --push NAME     also pushes it: lightbyte image push NAME ...
#
# Output directory: disk.qcow2, kernel (a path), cmdline. Cached by everything that goes in
# (the recipe and its files, this script, the init, the guest agent, busybox, the kernel), under
# $LIGHTBYTE_CACHE (default ~/.cache/lightbyte). debootstrap needs root and a Debian mirror
# ($DEBIAN_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
recipe=${1:?usage: $0 RECIPE [--push NAME]}
push=
if [ "${2:-}" = --push ]; then push=${3:?--push needs an image name}; fi
[ -f "$recipe" ] || { echo "build-image: no recipe $recipe" >&2; exit 2; }
rdir=$(cd "$(dirname "$recipe")" && pwd)

base=busybox suite=bookworm packages= size=512M agent=yes cmdline="console=ttyS0"
files=() services=()
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in ''|'#'*) continue ;; esac
  key=${line%%=*} value=${line#*=}
  case "$key" in
    base) base=$value ;;
    suite) suite=$value ;;
    packages) packages=$value ;;
    size) size=$value ;;
    agent) agent=$value ;;
    file) files+=("$value") ;;
    service) services+=("$value") ;;
    cmdline) cmdline=$value ;;
    *) echo "build-image: $recipe: unknown key '$key'" >&2; exit 2 ;;
  esac
done < "$recipe"
case "$base" in debian|busybox) ;; *) echo "build-image: base=$base: expected debian or busybox" >&2; exit 2 ;; esac

kernel=$(bash "$here/tests/guest/build-kernel.sh")/vmlinux
tools=$(bash "$here/scripts/build-guest-tools.sh")
init="$here/tests/guest/init"
inputs=("$recipe" "$0" "$init" "$tools/lightbyte-guest-agent" /bin/busybox "$kernel")
for f in "${files[@]}" "${services[@]}"; do inputs+=("$rdir/${f%% *}"); done
key=$( (cat "${inputs[@]}"; echo "$mirror") | sha256sum | cut -c1-16)
out="$cache/image-$(basename "$recipe" .recipe)-$key"
if [ ! -f "$out/disk.qcow2" ]; then
  command -v mkfs.ext4 qemu-img >/dev/null || { echo "build-image: needs e2fsprogs and qemu-utils" >&2; exit 1; }
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/image-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  root="$work/root"
  if [ "$base" = debian ]; then
    command -v debootstrap >/dev/null || { echo "build-image: needs debootstrap (scripts/install-deps.sh)" >&2; exit 1; }
    echo "build-image: debootstrap $suite from $mirror (a few minutes the first time)" >&2
    include=$(echo "$packages" | tr ' ' ',')
    debootstrap --variant=minbase ${include:+--include="$include"} "$suite" "$root" "$mirror" >&2
    # What a VM never needs: package caches, documentation, translations.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
      "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  else
    mkdir -p "$root"/{bin,etc,usr/bin,usr/sbin,sbin}
  fi
  mkdir -p "$root/usr/bin" "$root/etc/lightbyte/services"
  # The guest init (network from ip=, the agent, the power button) runs on busybox.
  cp /bin/busybox "$root/usr/bin/busybox"
  [ -e "$root/bin/busybox" ] || ln -s /usr/bin/busybox "$root/bin/busybox"
  install -m 755 "$init" "$root/init"
  if [ "$agent" = yes ]; then
    install -m 755 "$tools/lightbyte-guest-agent" "$root/usr/bin/lightbyte-guest-agent"
  fi
  for f in "${files[@]}"; do
    src=${f%% *} dest=${f#* }
    mkdir -p "$root/$(dirname "$dest")"
    cp -a "$rdir/$src" "$root/$dest"
  done
  for s in "${services[@]}"; do
    name=${s%% *} src=${s#* }
    install -m 755 "$rdir/$src" "$root/etc/lightbyte/services/$name"
  done
  echo "build-image: ext4 root of $size" >&2
  mkfs.ext4 -q -F -L root -d "$root" "$work/root.img" "$size"
  qemu-img convert -O qcow2 "$work/root.img" "$work/disk.qcow2"
  printf '%s\n' "$kernel" > "$work/kernel"
  printf '%s root=/dev/vda rw init=/init\n' "$cmdline" > "$work/cmdline"
  rm -rf "$out"
  mkdir -p "$out"
  mv "$work/disk.qcow2" "$work/kernel" "$work/cmdline" "$out/"
fi
if [ -n "$push" ]; then
  bin=${LIGHTBYTE_BIN:-$here/target/release}
  "$bin/lightbyte" image push "$push" "$out/disk.qcow2" --format qcow2 \
    --kernel "$(cat "$out/kernel")" --cmdline "$(cat "$out/cmdline")" >&2
fi
echo "$out"
