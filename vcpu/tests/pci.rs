//! KVM integration tests of the PCI root complex: a guest enumerates
//! configuration space through ports 0xCF8/0xCFC and through ECAM, sizes a
//! BAR and reaches the device through it after moving it, and receives an
//! MSI-X interrupt (held pending while masked, delivered on unmask).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;
use vmkit_devices::pci::{
    Bar, BarKind, ConfigSpace, Msix, MsixLayout, PciDevice, PciHeader, PciRoot, PciWindows,
    CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, ECAM_BUS_SIZE,
};
use vmkit_devices::{DeviceError, IoAction, IoBus};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_vcpu::{StopReason, VmConfig};

const REPORT_PORT: u16 = 0x510;
const READY_PORT: u16 = 0x500;
const ECAM: u64 = 0xE000_0000;
const MEM32: (u64, u64) = (0xC000_0000, 0x1000_0000);
const TEST_VENDOR: u16 = 0x1234;
const TEST_DEVICE: u16 = 0x11E5;
/// What the test device's BAR 0 register at offset 0 reads.
const MAGIC: u32 = 0x5EC7_0BA2;
const MSIX_CAP_VECTOR: u8 = 0x45;

/// A PCI function with a 4 KiB register BAR (0) and an MSI-X BAR (1:
/// table at 0, PBA at 0x800).
struct TestDevice {
    config: Mutex<ConfigSpace>,
    msix: Option<(Msix, u16)>,
    writes: Mutex<Vec<(u8, u64, u64)>>,
}

impl TestDevice {
    fn new(msix: Option<Msix>) -> Arc<Self> {
        let mut config = ConfigSpace::new(&PciHeader {
            vendor_id: TEST_VENDOR,
            device_id: TEST_DEVICE,
            revision: 1,
            class_code: (0xFF, 0, 0),
            subsystem_vendor_id: TEST_VENDOR,
            subsystem_id: 1,
            interrupt_pin: None,
        });
        config
            .add_bar(
                0,
                BarKind::Memory32 {
                    prefetchable: false,
                },
                0x1000,
            )
            .unwrap();
        let msix = msix.map(|m| {
            config
                .add_bar(
                    1,
                    BarKind::Memory32 {
                        prefetchable: false,
                    },
                    0x1000,
                )
                .unwrap();
            let cap = m.add_capability(&mut config).unwrap();
            (m, cap)
        });
        Arc::new(TestDevice {
            config: Mutex::new(config),
            msix,
            writes: Mutex::new(Vec::new()),
        })
    }
}

impl PciDevice for TestDevice {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.config.lock().unwrap().read(offset, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut config = self.config.lock().unwrap();
        config.write(offset, data);
        if let Some((msix, cap)) = &self.msix {
            msix.config_written(&config, *cap);
        }
    }
    fn bars(&self) -> Vec<Bar> {
        self.config.lock().unwrap().bars()
    }
    fn command(&self) -> u16 {
        self.config.lock().unwrap().command()
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match (bar, &self.msix) {
            (0, _) => {
                let value = if offset == 0 { MAGIC } else { 0 };
                let bytes = value.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            (1, Some((msix, _))) if offset < 0x800 => msix.table_read(offset, data),
            (1, Some((msix, _))) => msix.pba_read(offset - 0x800, data),
            _ => data.fill(0xFF),
        }
        Ok(())
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        match (bar, &self.msix) {
            (1, Some((msix, _))) if offset < 0x800 => msix.table_write(offset, data),
            _ => {
                let mut v = [0u8; 8];
                let n = data.len().min(8);
                v[..n].copy_from_slice(&data[..n]);
                self.writes
                    .lock()
                    .unwrap()
                    .push((bar, offset, u64::from_le_bytes(v)));
            }
        }
        Ok(IoAction::Continue)
    }
}

/// A bus with the debug exit, a report recorder, the root complex on
/// 0xCF8 and ECAM at `ECAM`.
fn pci_platform() -> (Arc<IoBus>, Arc<PciRoot>, Arc<Recorder>) {
    let bus = Arc::new(bus());
    let root = PciRoot::new(
        &bus,
        PciWindows {
            io: (0xC000, 0x1000),
            mem32: MEM32,
            mem64: (0, 0),
        },
    )
    .unwrap();
    bus.pio
        .insert(
            u64::from(CONFIG_ADDRESS_PORT),
            CONFIG_IO_LEN,
            root.config_io_device(),
        )
        .unwrap();
    bus.mmio
        .insert(ECAM, ECAM_BUS_SIZE, root.ecam_device())
        .unwrap();
    let rec = Recorder::returning(0);
    bus.pio
        .insert(u64::from(REPORT_PORT), 4, rec.clone())
        .unwrap();
    (bus, root, rec)
}

fn reports(rec: &Recorder) -> Vec<u64> {
    rec.writes().into_iter().map(|(_, v, _)| v).collect()
}

/// Emits: select `device`'s `register` through CONFIG_ADDRESS.
fn select(a: &mut CodeAssembler, device: u32, register: u32) -> Result<(), IcedError> {
    a.mov(eax, 0x8000_0000 | (device << 11) | register)?;
    a.mov(dx, u32::from(CONFIG_ADDRESS_PORT))?;
    a.out(dx, eax)
}

/// Emits: report `eax`.
fn report(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, u32::from(REPORT_PORT))?;
    a.out(dx, eax)
}

fn exit_with(a: &mut CodeAssembler, code: u32) -> Result<(), IcedError> {
    a.mov(al, code)?;
    a.out(EXIT_PORT as u32, al)
}

fn expect_exit(stop: StopReason, code: u32) {
    match stop {
        StopReason::Exit(c) if c == code => {}
        other => panic!("expected Exit({code}), got {other:?}"),
    }
}

#[test]
fn guest_enumerates_through_ports_and_ecam() {
    require_kvm!();
    let (bus, root, rec) = pci_platform();
    let address = root.add_device(TestDevice::new(None)).unwrap();
    assert_eq!((address.bus, address.device, address.function), (0, 1, 0));
    let code = assemble(64, |a| {
        // Vendor/device IDs of devices 0..4 through 0xCF8/0xCFC.
        for dev in 0..4 {
            select(a, dev, 0)?;
            a.mov(dx, 0xCFCu32)?;
            a.in_(eax, dx)?;
            report(a)?;
        }
        // The device ID alone with a 2-byte read at 0xCFE.
        select(a, 1, 0)?;
        a.mov(dx, 0xCFEu32)?;
        a.in_(ax, dx)?;
        a.movzx(eax, ax)?;
        report(a)?;
        // The same through ECAM, plus the class code register.
        a.mov(rbx, ECAM)?;
        for (dev, reg) in [(0u32, 0u32), (1, 0), (2, 0), (1, 8)] {
            a.mov(eax, dword_ptr(rbx + ((dev << 15) | reg)))?;
            report(a)?;
        }
        exit_with(a, 0)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    expect_exit(vcpu.run(&*bus).unwrap(), 0);
    let ids = |v: u16, d: u16| u64::from(v) | (u64::from(d) << 16);
    let bridge = ids(0x1b36, 0x0008);
    let test = ids(TEST_VENDOR, TEST_DEVICE);
    assert_eq!(
        reports(&rec),
        vec![
            bridge,
            test,
            0xFFFF_FFFF,
            0xFFFF_FFFF,
            u64::from(TEST_DEVICE),
            bridge,
            test,
            0xFFFF_FFFF,
            0xFF00_0001, // class FF/00/00, revision 1
        ]
    );
}

#[test]
fn guest_sizes_a_bar_moves_it_and_reaches_the_device_there() {
    require_kvm!();
    let (bus, root, rec) = pci_platform();
    let device = TestDevice::new(None);
    root.add_device(device.clone()).unwrap();
    let old = device.bars()[0].address;
    assert!(old >= MEM32.0 && old < MEM32.0 + MEM32.1, "{old:#x}");
    let new = MEM32.0 + 0x0800_0000;
    let code = assemble(64, |a| {
        // The firmware-assigned address, and the register behind it.
        select(a, 1, 0x10)?;
        a.mov(dx, 0xCFCu32)?;
        a.in_(eax, dx)?;
        report(a)?;
        a.mov(rbx, old)?;
        a.mov(eax, dword_ptr(rbx))?;
        report(a)?;
        // Memory decoding off (a 2-byte write to the command register).
        select(a, 1, 0x04)?;
        a.mov(dx, 0xCFCu32)?;
        a.xor(eax, eax)?;
        a.out(dx, ax)?;
        // Size BAR 0.
        select(a, 1, 0x10)?;
        a.mov(dx, 0xCFCu32)?;
        a.mov(eax, 0xFFFF_FFFFu32)?;
        a.out(dx, eax)?;
        a.in_(eax, dx)?;
        report(a)?;
        // Move it and turn decoding back on.
        a.mov(dx, 0xCFCu32)?;
        a.mov(eax, new as u32)?;
        a.out(dx, eax)?;
        select(a, 1, 0x04)?;
        a.mov(dx, 0xCFCu32)?;
        a.mov(eax, 2u32)?;
        a.out(dx, ax)?;
        // The device answers at the new address, not at the old one, and
        // takes a write there.
        a.mov(rbx, new)?;
        a.mov(eax, dword_ptr(rbx))?;
        report(a)?;
        a.mov(dword_ptr(rbx + 8), 0x77u32)?;
        a.mov(rbx, old)?;
        a.mov(eax, dword_ptr(rbx))?;
        report(a)?;
        exit_with(a, 0)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    expect_exit(vcpu.run(&*bus).unwrap(), 0);
    assert_eq!(
        reports(&rec),
        vec![
            old,
            u64::from(MAGIC),
            0xFFFF_F000, // 4 KiB, 32-bit, non-prefetchable
            u64::from(MAGIC),
            0xFFFF_FFFF, // nothing decodes the old range
        ]
    );
    assert_eq!(*device.writes.lock().unwrap(), vec![(0, 8, 0x77)]);
    assert_eq!(root.stats().refused_bar_mappings, 0);
}

#[test]
fn msix_vector_is_held_pending_while_masked_and_delivered_on_unmask() {
    require_kvm!();
    let _dog = watchdog("msi-x", Duration::from_secs(20));
    let (bus, root, rec) = pci_platform();
    // A VM first: the MSI-X sink is the VM's irqfd/GSI routes.
    let handler_at = 0x11000u64;
    let idt = 0x20000u64;
    let idtr = 0x21000u64;
    let count = 0x21100u64;
    let memory_placeholder = [0xF4u8];
    let (vm, mut vcpu) = boot_with(
        64,
        &memory_placeholder,
        VmConfig {
            irqchip: true,
            ..Default::default()
        },
    );
    let vectors = vm.msi_vectors(4).unwrap();
    let msix = Msix::new(
        vectors,
        4,
        MsixLayout {
            table_bar: 1,
            table_offset: 0,
            pba_bar: 1,
            pba_offset: 0x800,
        },
    )
    .unwrap();
    let device = TestDevice::new(Some(msix));
    root.add_device(device.clone()).unwrap();
    let cap = device.msix.as_ref().unwrap().1;
    let table = device.bars()[1].address;
    let notified = Arc::new(AtomicU64::new(0));
    let (d, n) = (device.clone(), notified.clone());
    bus.pio
        .insert(
            u64::from(READY_PORT),
            1,
            Hook::new(move |_| {
                // The device signals vector 0 while the guest keeps it masked.
                d.msix.as_ref().unwrap().0.notify(0).unwrap();
                n.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();

    let code = assemble(64, |a| {
        a.lidt(ptr(idtr))?;
        a.mov(ebx, 0xFEE0_0000u32)?;
        a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?;
        // Table entry 0: address, data; it stays masked.
        a.mov(rbx, table)?;
        a.mov(dword_ptr(rbx), 0xFEE0_0000u32)?;
        a.mov(dword_ptr(rbx + 4), 0u32)?;
        a.mov(dword_ptr(rbx + 8), u32::from(MSIX_CAP_VECTOR))?;
        // MSI-X enable: Message Control (cap + 2), bit 15.
        select(a, 1, u32::from(cap))?;
        a.mov(dx, 0xCFEu32)?;
        a.mov(eax, 0x8000u32)?;
        a.out(dx, ax)?;
        // Host: notify vector 0 (masked, so pending).
        a.mov(dx, u32::from(READY_PORT))?;
        a.out(dx, al)?;
        // Report the PBA, then unmask entry 0 with interrupts enabled.
        a.mov(eax, dword_ptr(rbx + 0x800))?;
        report(a)?;
        a.sti()?;
        a.mov(dword_ptr(rbx + 12), 0u32)?;
        hlt_until(a, count, 1)?;
        // The PBA after delivery.
        a.mov(eax, dword_ptr(rbx + 0x800))?;
        report(a)?;
        a.mov(eax, dword_ptr(count))?;
        a.out(EXIT_PORT as u32, al)
    });
    let handler = assemble_at(64, handler_at, |a| {
        a.push(rax)?;
        a.push(rdx)?;
        a.inc(dword_ptr(count))?;
        a.mov(eax, u32::from(MSIX_CAP_VECTOR) | 0x100)?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        a.mov(eax, 0xFEE0_00B0u32)?;
        a.mov(dword_ptr(rax), 0u32)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.iretq()
    });
    vm.memory().write_slice(&code, GuestAddress(CODE)).unwrap();
    install_handler(
        vm.memory(),
        idt,
        idtr,
        MSIX_CAP_VECTOR,
        handler_at,
        &handler,
    );

    expect_exit(vcpu.run(&*bus).unwrap(), 1);
    assert_eq!(notified.load(Ordering::SeqCst), 1);
    assert_eq!(
        reports(&rec),
        vec![
            1, // pending while masked
            u64::from(MSIX_CAP_VECTOR) | 0x100,
            0, // cleared by the delivery
        ]
    );
    let msix = &device.msix.as_ref().unwrap().0;
    assert!(msix.enabled() && msix.vector_masked(0) == Some(false) && !msix.pending(0));
}
