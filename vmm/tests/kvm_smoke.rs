//! vCPU and memory setup checked on the machine's own /dev/kvm with a few hand-written guest
//! instructions (no guest OS): the boot CPU starts in the mode we set up, its port writes reach
//! the serial port, and a write to the ACPI sleep register ends the VM. Only a handful of
//! instructions run, so these do not depend on how fast the host runs ring-0 guest code.

use std::io::{self, Write};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::cpuid::CpuidPolicy;
use vmm::arch::regs::BootMode;
use vmm::builder::steps::legacy_devices;
use vmm::devices::bus::Bus;
use vmm::devices::{ExitHandle, VmEvent};
use vmm::vstate::control::VcpuControl;
use vmm::vstate::vcpu::{supported_cpuid, Buses, Vcpu};
use vmm::vstate::vm::{create_guest_memory, Vm};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `mov dx, 0x3f8; mov al, 'K'; out dx, al; mov al, 'V'; out dx, al;
///  mov dx, 0x600; mov al, 0x34 (S5 | SLP_EN); out dx, al; hlt`
/// The same bytes decode identically in 32-bit protected mode and in 64-bit mode.
const CODE: [u8; 19] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xb0, b'V', 0xee, 0x66, 0xba, 0x00, 0x06, 0xb0, 0x34,
    0xee, 0xf4, 0xf4,
];
const ENTRY: u64 = 0x100000;

fn run_code(mode: BootMode, cpus: u8) -> (VmEvent, String) {
    let kvm = Kvm::new().expect("open /dev/kvm (these tests need KVM and root)");
    let (memory, _) = create_guest_memory(64 << 20).unwrap();
    memory.write_slice(&CODE, GuestAddress(ENTRY)).unwrap();
    let vm = Arc::new(Vm::new(&kvm, memory).unwrap());
    let (tx, rx) = channel();
    let exit = ExitHandle::new(tx);
    let out = Captured::default();
    let (pio, _serial) = legacy_devices(&vm, &exit, Box::new(out.clone())).unwrap();
    let buses = Buses {
        pio: Arc::new(pio),
        mmio: Arc::new(Bus::new()),
    };
    let supported = supported_cpuid(&kvm).unwrap();
    let control = std::sync::Arc::new(VcpuControl::new().unwrap());
    for index in 0..cpus {
        let boot = (index == 0).then_some((mode, vm.memory()));
        let vcpu = Vcpu::new(
            vm.fd(),
            &kvm,
            &supported,
            &CpuidPolicy::default(),
            index,
            cpus,
            boot,
            buses.clone(),
            exit.clone(),
        )
        .unwrap();
        let keep = vm.clone();
        let ctl = control.clone();
        control
            .spawn(format!("vcpu{index}"), move || {
                vcpu.run(&ctl);
                drop(keep);
            })
            .unwrap();
    }
    let event = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(e) => e,
        Err(RecvTimeoutError::Timeout) => panic!("guest code did not reach the sleep register"),
        Err(e) => panic!("{e}"),
    };
    let printed = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    (event, printed)
}

#[test]
fn long_mode_entry_writes_serial_and_powers_off() {
    let (event, printed) = run_code(BootMode::LinuxLongMode { entry: ENTRY }, 1);
    assert_eq!(printed, "KV");
    assert_eq!(event, VmEvent::PowerOff);
}

#[test]
fn pvh_entry_in_protected_mode_runs_the_same_code() {
    let (event, printed) = run_code(BootMode::Pvh { entry: ENTRY }, 2);
    assert_eq!(printed, "KV");
    assert_eq!(event, VmEvent::PowerOff);
}

#[test]
fn msi_routes_and_irqfds_are_accepted_by_kvm() {
    use vmm::devices::pci::msix::{MsiMessage, MsiSink};
    use vmm::vstate::irq_routing::{IrqRouter, IOAPIC_PINS};

    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let router = Arc::new(IrqRouter::new(Arc::new(vm)));
    let sink = router.msi_sink(3).unwrap();
    assert_eq!(sink.gsi(0), Some(IOAPIC_PINS));
    assert_eq!(sink.gsi(2), Some(IOAPIC_PINS + 2));
    let message = MsiMessage {
        address: 0xfee0_0000,
        data: 0x4041,
    };
    router.set_route(IOAPIC_PINS, Some(message)).unwrap();
    router.set_route(IOAPIC_PINS + 1, Some(message)).unwrap();
    router.set_route(IOAPIC_PINS, None).unwrap();
    // Firing through the irqfd of a routed vector must not fail.
    sink.fire(1);
}
