/work/main/firmware/target/release/deps/lightbyte_firmware-8272e5af5754379a.d: src/main.rs src/arch_entry.rs src/acpi.rs src/boot.rs src/efi/mod.rs src/efi/boot_services.rs src/efi/console.rs src/efi/device_path.rs src/efi/disk.rs src/efi/events.rs src/efi/fs.rs src/efi/handles.rs src/efi/image.rs src/efi/pages.rs src/efi/runtime.rs src/efi/util.rs src/heap.rs src/idt.rs src/io.rs src/mem_ops.rs src/pci.rs src/platform.rs src/pvh.rs src/racy.rs src/serial.rs src/timer.rs src/virtio_blk.rs

/work/main/firmware/target/release/deps/lightbyte_firmware-8272e5af5754379a: src/main.rs src/arch_entry.rs src/acpi.rs src/boot.rs src/efi/mod.rs src/efi/boot_services.rs src/efi/console.rs src/efi/device_path.rs src/efi/disk.rs src/efi/events.rs src/efi/fs.rs src/efi/handles.rs src/efi/image.rs src/efi/pages.rs src/efi/runtime.rs src/efi/util.rs src/heap.rs src/idt.rs src/io.rs src/mem_ops.rs src/pci.rs src/platform.rs src/pvh.rs src/racy.rs src/serial.rs src/timer.rs src/virtio_blk.rs

src/main.rs:
src/arch_entry.rs:
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
src/idt.rs:
src/io.rs:
src/mem_ops.rs:
src/pci.rs:
src/platform.rs:
src/pvh.rs:
src/racy.rs:
src/serial.rs:
src/timer.rs:
src/virtio_blk.rs:
