#!/usr/bin/env bash
# Builds the UEFI firmware (firmware/) with the flags a freestanding PVH executable needs, caches
# it outside the clone keyed by its sources and the toolchain, and leaves it at
# target/release/lightbyte-firmware. Prints that path on stdout. The workspace build never sees
# these flags: the firmware is its own Cargo workspace.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
key=$( (cd "$here" && find Cargo.toml Cargo.lock build.sh build.rs layout.ld src -type f | sort | xargs cat; rustc -V) | sha256sum | cut -c1-16)
out="$cache/firmware-$key"
dest="$root/target/release/lightbyte-firmware"
mkdir -p "$root/target/release"
if [ ! -f "$out/lightbyte-firmware" ]; then
  echo "firmware/build.sh: building the firmware" >&2
  target_dir="$root/target/firmware"
  # --target keeps RUSTFLAGS away from build scripts; static relocation model and our own linker
  # script give a non-PIE ELF at the address the script names.
  # (build.rs adds the linker script when LIGHTBYTE_FIRMWARE_LINK is set.)
  LIGHTBYTE_FIRMWARE_LINK=1 RUSTFLAGS="-C relocation-model=static" \
    cargo build --release --locked --features image --manifest-path "$here/Cargo.toml" \
      --target x86_64-unknown-linux-gnu --target-dir "$target_dir" >&2
  mkdir -p "$out.tmp"
  cp "$target_dir/x86_64-unknown-linux-gnu/release/lightbyte-firmware" "$out.tmp/"
  rm -rf "$out" && mv "$out.tmp" "$out"
fi
cp "$out/lightbyte-firmware" "$dest.tmp" && mv "$dest.tmp" "$dest"
echo "$dest"
