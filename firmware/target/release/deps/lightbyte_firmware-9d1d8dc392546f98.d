/work/main/firmware/target/release/deps/lightbyte_firmware-9d1d8dc392546f98.d: src/main.rs src/acpi.rs src/boot.rs src/efi/mod.rs src/efi/boot_services.rs src/efi/console.rs src/efi/device_path.rs src/efi/disk.rs src/efi/events.rs src/efi/fs.rs src/efi/handles.rs src/efi/image.rs src/efi/pages.rs src/efi/runtime.rs src/efi/util.rs src/heap.rs src/io.rs src/pci.rs src/platform.rs src/pvh.rs src/racy.rs src/serial.rs src/timer.rs src/virtio_blk.rs

/work/main/firmware/target/release/deps/lightbyte_firmware-9d1d8dc392546f98: src/main.rs src/acpi.rs src/boot.rs src/efi/mod.rs src/efi/boot_services.rs src/efi/console.rs src/efi/device_path.rs src/efi/disk.rs src/efi/events.rs src/efi/fs.rs src/efi/handles.rs src/efi/image.rs src/efi/pages.rs src/efi/runtime.rs src/efi/util.rs src/heap.rs src/io.rs src/pci.rs src/platform.rs src/pvh.rs src/racy.rs src/serial.rs src/timer.rs src/virtio_blk.rs

src/main.rs:
src/acpi.rs:
src/boot.rs:
src/efi/mod.rs:
src/efi/boot_services.rs:
src/efi/console.rs:
src/efi/device_path.rs:
src/efi/disk.rs:
src/efi/events.rs:
src/efi/fs.rs:
src/efi/handles.rs:
src/efi/image.rs:
src/efi/pages.rs:
src/efi/runtime.rs:
src/efi/util.rs:
src/heap.rs:
src/io.rs:
src/pci.rs:
src/platform.rs:
src/pvh.rs:
src/racy.rs:
src/serial.rs:
src/timer.rs:
src/virtio_blk.rs:
