#!/usr/bin/env bash
# Builds the GPT test disks for UEFI boot with file tools only (no root, no loop devices, no
# mount): sgdisk, mkfs.vfat + mtools, mkfs.ext4 -d, dd, grub-mkstandalone.
# Usage: build-efi-disks.sh KERNEL_BZIMAGE INITRAMFS DEBIAN_VMLINUZ
#   KERNEL_BZIMAGE  the minimal guest kernel, built with the EFI stub (a PE image)
#   INITRAMFS       the test initramfs (build-initramfs.sh): prints "LIGHTBYTE-GUEST-UP ..." and
#                   powers off; it needs no kernel parameters
#   DEBIAN_VMLINUZ  Debian's stock cloud kernel (fetch-debian-kernel.sh cloud-amd64)
# Every loader entry boots with the fixed command line "console=ttyS0 panic=-1".
# The result is cached outside the clone, keyed by a hash of the recipe (this script, the inputs'
# sha256 and the versions of systemd-boot-efi and grub-efi-amd64-bin). Prints the output directory
# as the last line of stdout; progress goes to stderr. Outputs (GPT, 512-byte sectors, sparse):
#   sdboot.img         ESP (FAT32): systemd-boot as \EFI\BOOT\BOOTX64.EFI, loader.conf with
#                      "timeout 0" and "default minimal.conf"; entries minimal.conf
#                      (/minimal/vmlinuz) and debian.conf (/debian/vmlinuz), both with the initrd
#                      /minimal/initrd
#   sdboot-debian.img  the same, with "default debian.conf"
#   menu.img           the same, with "timeout 2": systemd-boot shows its menu and counts down
#                      (its timer and key events) before booting minimal.conf
#   upgrade.img        the same, with "default upgrade.conf": an entry booting the minimal kernel
#                      whose guest command (lbcmd64) upgrades its own kernel the way a distribution
#                      does: it mounts its ESP (vfat), installs a new kernel file
#                      (\new\vmlinuz-upgraded, Debian's), adds the entry upgraded.conf, makes it
#                      the default, prints LIGHTBYTE-KERNEL-INSTALLED and reboots (lbend=reboot)
#   stub.img           ESP (FAT32): the minimal kernel itself as \EFI\BOOT\BOOTX64.EFI (EFI stub)
#                      and \initrd. Nothing on the disk gives a command line: the test gives the
#                      VMM "console=ttyS0 panic=-1 initrd=\initrd", which the firmware passes to
#                      the stub as its LoadOptions
#   grub.img           partition 1 ESP (FAT16): a standalone GRUB as \EFI\BOOT\BOOTX64.EFI with an
#                      embedded grub.cfg; partition 2 ext4 (type 8300): /boot/vmlinuz (minimal
#                      kernel), /boot/initrd, /boot/lightbyte-grub-root (found by GRUB's search).
#                      /boot/grub/grubenv (GRUB's save_env writes lightbyte_saved into it, on a
#                      writable disk); GRUB prints "lightbyte: grub loading kernel" before loading it, or
#                      "LIGHTBYTE-GRUB-ERROR ..." and halts if something fails
#   noesp.img          a valid GPT with only an ext4 Linux partition (no ESP)
#   corrupt.img        sdboot.img with the primary (LBA 1) and backup (last LBA) GPT headers
#                      corrupted (the disk GUID bytes inverted, so the header CRC fails; the
#                      "EFI PART" signatures and the protective MBR are intact)
#   blank.img          8 MiB of zeros, no partition table
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# = 3 ] || { echo "usage: build-efi-disks.sh KERNEL_BZIMAGE INITRAMFS DEBIAN_VMLINUZ" >&2; exit 2; }
kernel=$(realpath "$1") initrd=$(realpath "$2") debian=$(realpath "$3")
for f in "$kernel" "$initrd" "$debian"; do
  [ -f "$f" ] || { echo "build-efi-disks: $f missing" >&2; exit 1; }
done
cache=${LIGHTBYTE_CACHE:-$HOME/.cache/lightbyte}
sdboot_efi=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
grub_dir=/usr/lib/grub/x86_64-efi
[ -f "$sdboot_efi" ] && [ -d "$grub_dir" ] ||
  { echo "build-efi-disks: systemd-boot-efi or grub-efi-amd64-bin missing (run scripts/install-deps.sh)" >&2; exit 1; }
key=$( (cat "$here/build-efi-disks.sh"; sha256sum < "$kernel"; sha256sum < "$initrd"; sha256sum < "$debian"
        dpkg-query -W -f='${Version}\n' systemd-boot-efi grub-efi-amd64-bin) | sha256sum | cut -c1-16)
out="$cache/efi-disks-$key"
images=(sdboot.img sdboot-debian.img menu.img upgrade.img stub.img grub.img noesp.img corrupt.img blank.img)
done_=1
for i in "${images[@]}"; do [ -f "$out/$i" ] || done_=0; done
if [ "$done_" = 1 ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/efi-disks-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
dst="$work/out"
mkdir -p "$dst"
export MTOOLS_SKIP_CHECK=1
cmdline="console=ttyS0 panic=-1"
log() { echo "build-efi-disks: $*" >&2; }
die() { echo "build-efi-disks: $*" >&2; exit 1; }

# Partitions start at 1 MiB and are whole MiB; 1 MiB at the end holds the backup GPT.
# new_disk IMG GUIDNUM SIZE_MIB:TYPE:NAME... creates the sparse disk and its GPT. Fixed GUIDs
# (…-0000000000GP, G = GUIDNUM, P = partition) keep the images reproducible.
new_disk() {
  local img=$1 g=$2 start=1 n=0 args=() size type name
  shift 2
  for spec in "$@"; do
    IFS=: read -r size type name <<< "$spec"
    n=$((n + 1))
    args+=(-n "$n:$((start * 2048)):$(((start + size) * 2048 - 1))" -t "$n:$type" -c "$n:$name"
           -u "$n:1ab17b7e-0000-4000-8000-0000000000$g$n")
    start=$((start + size))
  done
  rm -f "$img"
  truncate -s "$(((start + 1)))M" "$img"
  # No -q: sgdisk 1.0.9 -q on a disk without a partition table silently writes nothing.
  sgdisk -o -U "1ab17b7e-0000-4000-8000-0000000000${g}0" "${args[@]}" "$img" >/dev/null
}
# place IMG PART_IMG START_MIB writes a filesystem image into the disk, keeping holes.
place() { dd if="$2" of="$1" bs=1M seek="$3" conv=notrunc,sparse status=none; }
mib_of() { stat -c %s "$@" | awk '{ s += $1 } END { print int((s + 1048575) / 1048576) }'; }
# new_fat IMG SIZE_MIB FATBITS: a FAT file system for a partition at 1 MiB (hidden sectors),
# 512-byte clusters; --invariant fixes the volume ID (1234-ABCD) and the boot sector's fields.
new_fat() {
  rm -f "$1"
  truncate -s "$2M" "$1"
  mkfs.vfat -F "$3" -s 1 -h 2048 -n ESP --invariant "$1" >/dev/null
}
check_gpt() {
  local v
  v=$(sgdisk -v "$1" 2>&1) || die "sgdisk -v $1 failed: $v"
  grep -q '^No problems found' <<< "$v" || die "$1: bad GPT: $v"
}
check_parts() {  # IMG START:END:CODE...: the disk has exactly these partitions
  local want got
  want=$( (($# > 1)) && printf '%s\n' "${@:2}" || true)
  got=$(sgdisk -p "$1" 2>/dev/null | awk '/^Number/ {t = 1; next} t && NF {print $2 ":" $3 ":" $6}')
  [ "$got" = "$want" ] || die "$1: partitions $(echo $got), expected $(echo $want)"
}
check_esp() {  # IMG FILE...: the ESP (partition 1, at 1 MiB) holds each FILE
  local f
  for f in "${@:2}"; do
    mdir -b -i "$1@@1M" "::$f" >/dev/null 2>&1 || die "$1: ESP lacks $f"
  done
}

# The file systems are built as separate images first, then written into the disks.
# --- systemd-boot -----------------------------------------------------------------------------
log "sdboot ESP (systemd-boot, FAT32)"
# FAT32 needs at least 65525 clusters: 33 MiB with 512-byte clusters; 64 MiB leaves room.
# Room for a guest to install one more kernel (upgrade.img).
esp_mib=$(( $(mib_of "$kernel" "$debian" "$initrd" "$sdboot_efi") + 24 ))
[ "$esp_mib" -ge 64 ] || esp_mib=64
sdboot_esp_mib=$esp_mib
esp="$work/sdboot.fat"
new_fat "$esp" "$esp_mib" 32
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/minimal ::/debian
mcopy -i "$esp" "$sdboot_efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$kernel" ::/minimal/vmlinuz
mcopy -i "$esp" "$initrd" ::/minimal/initrd
mcopy -i "$esp" "$debian" ::/debian/vmlinuz
printf 'title lightbyte minimal kernel\nlinux /minimal/vmlinuz\ninitrd /minimal/initrd\noptions %s\n' \
  "$cmdline" > "$work/minimal.conf"
printf 'title Debian cloud kernel\nlinux /debian/vmlinuz\ninitrd /minimal/initrd\noptions %s\n' \
  "$cmdline" > "$work/debian.conf"
mcopy -i "$esp" "$work/minimal.conf" "$work/debian.conf" ::/loader/entries/
printf 'timeout 0\ndefault minimal.conf\n' > "$work/loader.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf

# --- the kernel's EFI stub as the boot loader -------------------------------------------------
log "stub ESP (EFI stub kernel as BOOTX64.EFI, FAT32)"
stub_esp_mib=$(( $(mib_of "$kernel" "$initrd") + 8 ))
[ "$stub_esp_mib" -ge 64 ] || stub_esp_mib=64
esp="$work/stub.fat"
new_fat "$esp" "$stub_esp_mib" 32
mmd -i "$esp" ::/EFI ::/EFI/BOOT
mcopy -i "$esp" "$kernel" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$initrd" ::/initrd

# --- GRUB on the ESP, kernel on ext4 ----------------------------------------------------------
log "grub ESP (standalone GRUB, FAT16) and ext4 /boot"
grub_modules="part_gpt ext2 linux normal search search_fs_file echo halt loadenv"
for m in $grub_modules; do [ -f "$grub_dir/$m.mod" ] || die "GRUB module $m missing in $grub_dir"; done
cat > "$work/grub.cfg" <<EOF
set timeout=0
if search --no-floppy --set=root --file /boot/lightbyte-grub-root; then
  # GRUB writes its environment block in place through the firmware's Block I/O.
  set lightbyte_saved=grub-wrote-this
  save_env --file (\$root)/boot/grub/grubenv lightbyte_saved
  echo "lightbyte: grub loading kernel"
  if linux /boot/vmlinuz $cmdline; then
    if initrd /boot/initrd; then
      boot
    fi
  fi
  echo "LIGHTBYTE-GRUB-ERROR cannot boot /boot/vmlinuz from (\$root)"
else
  echo "LIGHTBYTE-GRUB-ERROR no partition holds /boot/lightbyte-grub-root"
fi
halt
EOF
# --install-modules keeps the memdisk to these modules (and their dependencies): about 1 MiB
# instead of every module, font, theme and locale.
grub-mkstandalone -O x86_64-efi -d "$grub_dir" --modules="$grub_modules" \
  --install-modules="$grub_modules" --fonts= --themes= --locales= \
  -o "$work/grubx64.efi" "boot/grub/grub.cfg=$work/grub.cfg" >&2
grub_esp_mib=$(( $(mib_of "$work/grubx64.efi") + 4 ))
[ "$grub_esp_mib" -ge 8 ] || grub_esp_mib=8
esp="$work/grub.fat"
new_fat "$esp" "$grub_esp_mib" 16
mmd -i "$esp" ::/EFI ::/EFI/BOOT
mcopy -i "$esp" "$work/grubx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mkdir -p "$work/ext/boot"
cp "$kernel" "$work/ext/boot/vmlinuz"
cp "$initrd" "$work/ext/boot/initrd"
echo "lightbyte grub test root" > "$work/ext/boot/lightbyte-grub-root"
mkdir -p "$work/ext/boot/grub"
grub-editenv "$work/ext/boot/grub/grubenv" create
ext_mib=$(( $(mib_of "$kernel" "$initrd") + 8 ))
ext="$work/root.ext4"
mkfs.ext4 -q -F -L lbgrubroot -U 1ab17b7e-0000-4000-8000-00000000e404 \
  -E root_owner=0:0,hash_seed=1ab17b7e-0000-4000-8000-00000000e405 -d "$work/ext" "$ext" "${ext_mib}M" >/dev/null
listing=$(debugfs -R 'ls -l /boot' "$ext" 2>/dev/null)
for f in vmlinuz initrd lightbyte-grub-root; do
  grep -qw "$f" <<< "$listing" || die "ext4 image lacks /boot/$f: $listing"
done

# --- a Linux partition only ---------------------------------------------------------------------
mkdir -p "$work/plain"
echo "lightbyte: a Linux partition and no ESP" > "$work/plain/README"
mkfs.ext4 -q -F -L lbnoesp -U 1ab17b7e-0000-4000-8000-00000000e501 \
  -E root_owner=0:0,hash_seed=1ab17b7e-0000-4000-8000-00000000e502 -d "$work/plain" "$work/noesp.ext4" 8M >/dev/null

for f in sdboot stub grub; do
  fsck.fat -n "$work/$f.fat" >/dev/null || die "fsck.fat finds errors in the $f ESP"
done
for f in root noesp; do
  e2fsck -fn "$work/$f.ext4" >/dev/null 2>&1 || die "e2fsck finds errors in $f.ext4"
done

# --- the disks ----------------------------------------------------------------------------------
log "writing the disks"
# sgdisk syncs and sleeps a second after writing a table: run the four in parallel.
pids=()
new_disk "$dst/sdboot.img" 1 "$sdboot_esp_mib:ef00:EFI system partition" & pids+=($!)
new_disk "$dst/stub.img" 3 "$stub_esp_mib:ef00:EFI system partition" & pids+=($!)
new_disk "$dst/grub.img" 4 "$grub_esp_mib:ef00:EFI system partition" "$ext_mib:8300:lightbyte root" & pids+=($!)
new_disk "$dst/noesp.img" 5 "8:8300:lightbyte data" & pids+=($!)
for p in "${pids[@]}"; do wait "$p" || die "sgdisk failed"; done
place "$dst/sdboot.img" "$work/sdboot.fat" 1
place "$dst/stub.img" "$work/stub.fat" 1
place "$dst/grub.img" "$work/grub.fat" 1
place "$dst/grub.img" "$work/root.ext4" $((1 + grub_esp_mib))
place "$dst/noesp.img" "$work/noesp.ext4" 1

cp --sparse=always "$dst/sdboot.img" "$dst/sdboot-debian.img"
printf 'timeout 0\ndefault debian.conf\n' > "$work/loader.conf"
mcopy -o -i "$dst/sdboot-debian.img@@1M" "$work/loader.conf" ::/loader/loader.conf

cp --sparse=always "$dst/sdboot.img" "$dst/menu.img"
printf 'timeout 2\ndefault minimal.conf\n' > "$work/loader.conf"
mcopy -o -i "$dst/menu.img@@1M" "$work/loader.conf" ::/loader/loader.conf

cp --sparse=always "$dst/sdboot.img" "$dst/upgrade.img"
upgrade_cmd='mkdir -p /efi && mount -t vfat /dev/vda1 /efi && mkdir -p /efi/new && cp /efi/debian/vmlinuz /efi/new/vmlinuz-upgraded && printf "title upgraded\nlinux /new/vmlinuz-upgraded\ninitrd /minimal/initrd\noptions console=ttyS0 panic=-1\n" > /efi/loader/entries/upgraded.conf && printf "timeout 0\ndefault upgraded.conf\n" > /efi/loader/loader.conf && umount /efi && echo LIGHTBYTE-KERNEL-INSTALLED'
printf 'title upgrade\nlinux /minimal/vmlinuz\ninitrd /minimal/initrd\noptions %s reboot=k lbend=reboot lbcmd64=%s\n' \
  "$cmdline" "$(printf '%s' "$upgrade_cmd" | base64 -w0)" > "$work/upgrade.conf"
mcopy -i "$dst/upgrade.img@@1M" "$work/upgrade.conf" ::/loader/entries/upgrade.conf
printf 'timeout 0\ndefault upgrade.conf\n' > "$work/loader.conf"
mcopy -o -i "$dst/upgrade.img@@1M" "$work/loader.conf" ::/loader/loader.conf

cp --sparse=always "$dst/sdboot.img" "$dst/corrupt.img"
# invert BYTES bytes at OFFSET of FILE
invert() {
  local file=$1 off=$2 n=$3 b hex=""
  for b in $(od -An -v -tu1 -j "$off" -N "$n" "$file"); do hex+=$(printf '\\x%02x' $((b ^ 255))); done
  printf "$hex" | dd of="$file" bs=1 seek="$off" conv=notrunc status=none
}
last_lba=$(( $(stat -c %s "$dst/corrupt.img") / 512 - 1 ))
invert "$dst/corrupt.img" $((512 + 56)) 16           # primary header: DiskGUID
invert "$dst/corrupt.img" $((last_lba * 512 + 56)) 16  # backup header: DiskGUID

truncate -s 8M "$dst/blank.img"

# --- validation -------------------------------------------------------------------------------
log "validating"
for i in sdboot.img sdboot-debian.img menu.img upgrade.img stub.img grub.img noesp.img; do check_gpt "$dst/$i"; done
check_esp "$dst/sdboot.img" /EFI/BOOT/BOOTX64.EFI /loader/loader.conf /loader/entries/minimal.conf \
  /loader/entries/debian.conf /minimal/vmlinuz /minimal/initrd /debian/vmlinuz
check_esp "$dst/sdboot-debian.img" /EFI/BOOT/BOOTX64.EFI /loader/entries/debian.conf /debian/vmlinuz
check_esp "$dst/stub.img" /EFI/BOOT/BOOTX64.EFI /initrd
check_esp "$dst/grub.img" /EFI/BOOT/BOOTX64.EFI
grep -qx 'default minimal.conf' <(mtype -i "$dst/sdboot.img@@1M" ::/loader/loader.conf | tr -d '\r') ||
  die "sdboot.img: wrong loader.conf"
grep -qx 'default debian.conf' <(mtype -i "$dst/sdboot-debian.img@@1M" ::/loader/loader.conf | tr -d '\r') ||
  die "sdboot-debian.img: wrong loader.conf"
grep -qx 'timeout 2' <(mtype -i "$dst/menu.img@@1M" ::/loader/loader.conf | tr -d '\r') ||
  die "menu.img: wrong loader.conf"
grep -qx 'default upgrade.conf' <(mtype -i "$dst/upgrade.img@@1M" ::/loader/loader.conf | tr -d '\r') ||
  die "upgrade.img: wrong loader.conf"
check_esp "$dst/upgrade.img" /loader/entries/upgrade.conf
cmp -s "$kernel" <(mtype -i "$dst/stub.img@@1M" ::/EFI/BOOT/BOOTX64.EFI) || die "stub.img: BOOTX64.EFI differs"
for i in sdboot.img sdboot-debian.img menu.img upgrade.img; do
  check_parts "$dst/$i" "2048:$((sdboot_esp_mib * 2048 + 2047)):EF00"
done
check_parts "$dst/stub.img" "2048:$((stub_esp_mib * 2048 + 2047)):EF00"
check_parts "$dst/grub.img" "2048:$((grub_esp_mib * 2048 + 2047)):EF00" \
  "$((grub_esp_mib * 2048 + 2048)):$(((grub_esp_mib + ext_mib) * 2048 + 2047)):8300"
check_parts "$dst/noesp.img" "2048:18431:8300"
# The corruption must be detected: sgdisk, finding neither header valid, sees no partitions
# ("Creating new GPT entries in memory"). The signatures must still be there.
check_parts "$dst/corrupt.img"
[ "$(dd if="$dst/corrupt.img" bs=1 skip=512 count=8 status=none)" = "EFI PART" ] &&
  [ "$(dd if="$dst/corrupt.img" bs=1 skip=$((last_lba * 512)) count=8 status=none)" = "EFI PART" ] ||
  die "corrupt.img: a GPT signature is gone"
[ "$(od -An -tx1 -j 510 -N 2 "$dst/corrupt.img" | tr -d ' ')" = 55aa ] || die "corrupt.img: no MBR"

rm -rf "$out" && mv "$dst" "$out"
log "done: $(du -sh --apparent-size "$out" | cut -f1) apparent, $(du -sh "$out" | cut -f1) on disk"
echo "$out"
