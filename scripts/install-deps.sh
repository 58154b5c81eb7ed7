#!/usr/bin/env bash
# Installs the Debian 12 packages lightbyte needs to build, boot guests and run its tests.
# Idempotent: does nothing when everything is already installed.
set -euo pipefail
packages=(
  # Test host (QEMU TCG with nested KVM) and guest userspace.
  qemu-system-x86 busybox-static
  # The Rust build: userfaultfd-sys (the snapshot memory loader) makes its bindings with
  # bindgen, which loads libclang.
  libclang-dev
  # Guest kernel build from Debian's source package.
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils kmod
  # Disk images and I/O benchmarks.
  e2fsprogs fio
  # API tests drive the VMM socket with curl.
  curl
  # virtio-net tests make network namespaces, bridges and TAPs with ip.
  iproute2
  # qcow2: qemu-img is the independent oracle of the qcow2 tests and the peer in benchmarks.
  qemu-utils
  # Orchestrator: its tests run a real etcd (etcd-server; etcdctl from etcd-client helps when
  # debugging a cluster), and the etcd-client crate compiles etcd's protobuf files with protoc,
  # which needs protobuf's well-known types (descriptor.proto, struct.proto) from libprotobuf-dev.
  etcd-server etcd-client protobuf-compiler libprotobuf-dev
  # Worker agents and the local cluster: bridges, TAPs, namespaces and veths (ip), pkill/setsid
  # (procps, util-linux), and ping to check that VMs answer on their addresses.
  iproute2 procps util-linux iputils-ping
  # The guests' firewall (anti-spoofing, no access to the worker's services, etcd, the API).
  nftables
  # The load-balancing proxy: Pingora builds zlib-ng with cmake. Its benchmark drives load with
  # wrk and compares with nginx as a reverse proxy.
  cmake wrk nginx-light
  # Image recipes: Debian roots with debootstrap; the nix/ files are checked with
  # nix-instantiate --parse (no Nix store or binary cache here to build them).
  debootstrap nix-bin
  # UEFI: the firmware's tests build GPT disks with FAT and ext4 file systems without root
  # (sgdisk, mkfs.vfat, mtools) holding real boot loaders (systemd-boot, GRUB); the boot
  # benchmark compares with QEMU booting the same disks through Debian's OVMF.
  gdisk dosfstools mtools systemd-boot-efi grub-efi-amd64-bin ovmf
)
missing_packages() {
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
}
# Two passes: installing one package can remove another that conflicts with it (a machine with a
# backported qemu-utils loses it to Debian 12's qemu-system-x86), and the second pass puts back
# the version that fits.
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
updated=
for pass in 1 2; do
  missing_packages
  [ ${#missing[@]} -gt 0 ] || break
  echo "install-deps: installing ${missing[*]} (pass $pass)" >&2
  [ -n "$updated" ] || { $SUDO apt-get update -q; updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
done
missing_packages
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: still missing after installing: ${missing[*]}" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found. lightbyte needs Rust 1.85 or newer (rustup.rs); Debian 12's" \
       "rustc package is too old." >&2
  exit 1
fi
