//! KVM integration tests of interrupt delivery through the in-kernel
//! irqchip: irqfd lines (edge, and level with resampling) and MSI vectors
//! reaching IDT handlers of a 64-bit guest. (Long mode, because this host's
//! KVM emulates CPL0 code and its emulator has no protected-mode IRET; a
//! same-privilege IRETQ works.)
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;
use vmkit_devices::{InterruptLine, MsiMessage, MsiVectors};
use vmkit_vcpu::{IrqError, MsiRoute, ResampleWorker, StopReason, Vm, VmConfig};

const IDT: u64 = 0x20000;
const IDTR: u64 = 0x21000;
const COUNT: u64 = 0x21100;
const HANDLERS: u64 = 0x11000;
/// The guest writes here once it is ready for interrupts.
const READY_PORT: u16 = 0x500;
/// Each handler writes its vector here.
const REPORT_PORT: u16 = 0x510;
const LAPIC: u32 = 0xFEE0_0000;
const IOAPIC: u32 = 0xFEC0_0000;

/// An IOAPIC pin the guest programs: pin, vector, level-triggered.
#[derive(Clone, Copy)]
struct Pin(u32, u8, bool);

/// A handler for `vector`: count in `COUNT`, report the vector, EOI, iret.
fn handler(vector: u8) -> impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError> {
    move |a| {
        a.push(rax)?;
        a.push(rdx)?;
        a.inc(dword_ptr(COUNT))?;
        a.mov(eax, u32::from(vector))?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        a.mov(eax, LAPIC + 0xB0)?;
        a.mov(dword_ptr(rax), 0u32)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.iretq()
    }
}

/// The main program: mask the PIC, load the IDT, enable the LAPIC, program
/// the IOAPIC `pins`, report ready, wait in HLT until `expected` interrupts
/// were handled, give any extra interrupt time to arrive, and exit with the
/// number handled.
fn main_program(
    pins: Vec<Pin>,
    expected: u32,
) -> impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError> {
    move |a| {
        let mut settle = a.create_label();
        a.mov(al, 0xFFu32)?;
        a.out(0x21u32, al)?;
        a.out(0xA1u32, al)?;
        a.lidt(ptr(IDTR))?;
        // Spurious vector 0xFF, APIC software-enabled. (Absolute addresses
        // above 2 GiB go through a register: a disp32 would sign-extend.)
        a.mov(ebx, LAPIC)?;
        a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?;
        a.mov(ebx, IOAPIC)?;
        for Pin(pin, vector, level) in pins {
            a.mov(dword_ptr(rbx), 0x10 + 2 * pin)?;
            a.mov(
                dword_ptr(rbx + 0x10),
                u32::from(vector) | (u32::from(level) << 15),
            )?;
            a.mov(dword_ptr(rbx), 0x11 + 2 * pin)?;
            a.mov(dword_ptr(rbx + 0x10), 0u32)?;
        }
        a.mov(dx, u32::from(READY_PORT))?;
        a.out(dx, al)?;
        hlt_until(a, COUNT, expected)?;
        a.sti()?;
        a.mov(ecx, 3000u32)?;
        a.set_label(&mut settle)?;
        a.dec(ecx)?;
        a.jnz(settle)?;
        a.cli()?;
        a.mov(eax, dword_ptr(COUNT))?;
        a.out(EXIT_PORT as u32, al)
    }
}

/// Boots the guest with the in-kernel irqchip and handlers for `vectors`.
fn interrupt_guest(pins: Vec<Pin>, vectors: &[u8], expected: u32) -> (Vm, vmkit_vcpu::Vcpu) {
    let code = assemble(64, main_program(pins, expected));
    let (vm, vcpu) = boot_with(
        64,
        &code,
        VmConfig {
            irqchip: true,
            ..Default::default()
        },
    );
    for (i, &v) in vectors.iter().enumerate() {
        let at = HANDLERS + 0x100 * i as u64;
        let code = assemble_at(64, at, handler(v));
        install_handler(vm.memory(), IDT, IDTR, v, at, &code);
    }
    (vm, vcpu)
}

fn exit_code(stop: StopReason) -> u32 {
    match stop {
        StopReason::Exit(c) => c,
        other => panic!("expected an exit through the debug port, got {other:?}"),
    }
}

#[test]
fn edge_irqfd_line_reaches_the_guest_handler_each_time() {
    require_kvm!();
    let _dog = watchdog("edge irqfd", Duration::from_secs(20));
    let (vm, mut vcpu) = interrupt_guest(vec![Pin(16, 0x30, false)], &[0x30], 2);
    let line = vm.edge_irq_line(16).unwrap();
    assert!(!line.is_level());
    let bus = bus();
    let l = line.clone();
    bus.pio
        .insert(
            u64::from(READY_PORT),
            1,
            Hook::new(move |_| l.trigger().unwrap()),
        )
        .unwrap();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let (r, l) = (reports.clone(), line.clone());
    bus.pio
        .insert(
            u64::from(REPORT_PORT),
            4,
            Hook::new(move |v| {
                let mut r = r.lock().unwrap();
                r.push(v);
                // A second, separate edge from inside the first handler.
                if r.len() == 1 {
                    l.trigger().unwrap();
                }
            }),
        )
        .unwrap();
    assert_eq!(exit_code(vcpu.run(&bus).unwrap()), 2);
    assert_eq!(*reports.lock().unwrap(), vec![0x30, 0x30]);
    assert_eq!(bus.stats().device_errors, 0);
}

#[test]
fn level_irqfd_line_is_raised_again_after_eoi_while_asserted() {
    require_kvm!();
    let _dog = watchdog("level irqfd", Duration::from_secs(20));
    const DELIVERIES: u64 = 4;
    let (vm, mut vcpu) = interrupt_guest(vec![Pin(17, 0x31, true)], &[0x31], DELIVERIES as u32);
    let line = vm.level_irq_line(17).unwrap();
    assert!(line.is_level() && line.resample_event().is_some());
    let _worker = ResampleWorker::spawn(vec![line.clone()]).unwrap();
    let bus = bus();
    let l = line.clone();
    // One assert; every later delivery comes from resampling after EOI.
    bus.pio
        .insert(
            u64::from(READY_PORT),
            1,
            Hook::new(move |_| l.assert().unwrap()),
        )
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let (h, l) = (handled.clone(), line.clone());
    bus.pio
        .insert(
            u64::from(REPORT_PORT),
            4,
            Hook::new(move |v| {
                assert_eq!(v, 0x31);
                // The device lowers its line during the last handler, before
                // that handler's EOI: no further delivery may follow.
                if h.fetch_add(1, Ordering::SeqCst) + 1 == DELIVERIES {
                    l.deassert().unwrap();
                }
            }),
        )
        .unwrap();
    // KVM signals the resample fd at the guest's EOI; this host's KVM
    // (kvm_pvm) signals it once more when it delivers a level interrupt, so
    // one re-raise can land a delivery ahead and the device's deassert can
    // come after the next delivery is already on its way. Hence N or N + 1;
    // an irqfd without resampling would stop at 1, and a line that is not
    // lowered would never let the guest finish.
    let count = exit_code(vcpu.run(&bus).unwrap());
    assert!(
        (DELIVERIES as u32..=DELIVERIES as u32 + 1).contains(&count),
        "{count} deliveries"
    );
    assert_eq!(handled.load(Ordering::SeqCst), u64::from(count));
    assert!(!line.is_asserted());
}

#[test]
fn msi_vectors_reach_their_handlers_and_withdrawn_ones_do_not() {
    require_kvm!();
    let _dog = watchdog("msi", Duration::from_secs(20));
    let (vm, mut vcpu) = interrupt_guest(vec![], &[0x32, 0x33, 0x34], 2);
    let vectors = vm.msi_vectors(3).unwrap();
    assert_eq!(vectors.count(), 3);
    let msg = |v: u32| Some(MsiMessage::new(0xFEE0_0000, v));
    vectors.set_message(0, msg(0x32)).unwrap();
    vectors.set_message(1, msg(0x33)).unwrap();
    // Vector 2 is programmed, then withdrawn: its trigger goes nowhere.
    vectors.set_message(2, msg(0x34)).unwrap();
    vectors.set_message(2, None).unwrap();
    let bus = bus();
    let v = vectors.clone();
    bus.pio
        .insert(
            u64::from(READY_PORT),
            1,
            Hook::new(move |_| {
                v.trigger(2).unwrap();
                v.trigger(1).unwrap();
                v.trigger(0).unwrap();
            }),
        )
        .unwrap();
    let reports = recording_port(&bus, REPORT_PORT);
    assert_eq!(exit_code(vcpu.run(&bus).unwrap()), 2);
    let mut seen = reports.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, vec![0x32, 0x33]);
}

#[test]
fn the_router_writes_kvm_only_on_change_and_reuses_gsis() {
    require_kvm!();
    let (vm, _vcpu) = boot_with(
        32,
        &[0xf4],
        VmConfig {
            irqchip: true,
            ..Default::default()
        },
    );
    let router = vm.irq_router().unwrap().clone();
    assert!(router.max_gsi() > 24);
    let a = router.allocate_msi_gsi().unwrap();
    let b = router.allocate_msi_gsi().unwrap();
    assert_eq!((a, b), (24, 25));
    let route = MsiRoute {
        address: 0xFEE0_0000,
        data: 0x40,
    };
    let before = router.commits();
    router.set_msi(a, Some(route)).unwrap();
    router.set_msi(a, Some(route)).unwrap();
    assert_eq!(
        router.commits(),
        before + 1,
        "an unchanged route costs no ioctl"
    );
    router.set_msi(a, None).unwrap();
    assert_eq!(router.commits(), before + 2);
    router.release_msi_gsi(a).unwrap();
    assert!(matches!(
        router.release_msi_gsi(a),
        Err(IrqError::NotAnMsiGsi(24))
    ));
    assert!(matches!(
        router.set_msi(a, Some(route)),
        Err(IrqError::NotAnMsiGsi(24))
    ));
    // The lowest free GSI is handed out again.
    assert_eq!(router.allocate_msi_gsi().unwrap(), 24);
    // Vectors take GSIs and give them back when dropped.
    let v = vm.msi_vectors(2).unwrap();
    assert_eq!((v.gsi(0).unwrap(), v.gsi(1).unwrap()), (26, 27));
    assert!(matches!(
        v.gsi(2),
        Err(IrqError::VectorOutOfRange { index: 2, count: 2 })
    ));
    assert!(v.trigger(5).is_err());
    drop(v);
    assert_eq!(router.allocate_msi_gsi().unwrap(), 26);
    // A line on a GSI KVM does not have is refused.
    assert!(matches!(
        vm.edge_irq_line(router.max_gsi()),
        Err(IrqError::GsiOutOfRange { .. })
    ));
}

#[test]
fn interrupt_lines_need_the_irqchip() {
    require_kvm!();
    let (vm, _vcpu) = boot_with(32, &[0xf4], VmConfig::default());
    assert!(matches!(vm.edge_irq_line(4), Err(IrqError::NoIrqchip)));
    assert!(matches!(vm.level_irq_line(4), Err(IrqError::NoIrqchip)));
    let err = vm.msi_vectors(1).unwrap_err();
    assert!(err.to_string().contains("in-kernel irqchip"), "{err}");
}

/// The 16550A raises its interrupt through an irqfd line on GSI 4: the
/// THR-empty interrupt when the guest enables it, then a received-data
/// interrupt when the host pushes input.
#[test]
fn the_uart_interrupts_the_guest_through_an_irqfd_line() {
    require_kvm!();
    let _dog = watchdog("uart irq", Duration::from_secs(20));
    const VECTOR: u8 = 0x24;
    let code = assemble(64, |a| {
        a.mov(al, 0xFFu32)?;
        a.out(0x21u32, al)?;
        a.out(0xA1u32, al)?;
        a.lidt(ptr(IDTR))?;
        a.mov(ebx, LAPIC)?;
        a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?;
        a.mov(ebx, IOAPIC)?;
        a.mov(dword_ptr(rbx), 0x10 + 2 * 4u32)?;
        a.mov(dword_ptr(rbx + 0x10), u32::from(VECTOR))?;
        a.mov(dword_ptr(rbx), 0x11 + 2 * 4u32)?;
        a.mov(dword_ptr(rbx + 0x10), 0u32)?;
        // IER: received data and THR empty.
        a.mov(dx, 0x3F9u32)?;
        a.mov(al, 0x03u32)?;
        a.out(dx, al)?;
        hlt_until(a, COUNT, 1)?;
        a.mov(dx, u32::from(READY_PORT))?;
        a.out(dx, al)?;
        hlt_until(a, COUNT, 2)?;
        a.mov(eax, dword_ptr(COUNT))?;
        a.out(EXIT_PORT as u32, al)
    });
    let (vm, mut vcpu) = boot_with(
        64,
        &code,
        VmConfig {
            irqchip: true,
            ..Default::default()
        },
    );
    // Handler: report IIR, and the received byte for a data interrupt.
    let at = HANDLERS;
    let handler = assemble_at(64, at, |a| {
        let mut skip = a.create_label();
        a.push(rax)?;
        a.push(rdx)?;
        a.inc(dword_ptr(COUNT))?;
        a.mov(dx, 0x3FAu32)?;
        a.in_(al, dx)?;
        a.movzx(eax, al)?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        a.and(al, 0x0Eu32)?;
        a.cmp(al, 0x04u32)?;
        a.jne(skip)?;
        a.mov(dx, 0x3F8u32)?;
        a.in_(al, dx)?;
        a.movzx(eax, al)?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        a.set_label(&mut skip)?;
        a.mov(eax, LAPIC + 0xB0)?;
        a.mov(dword_ptr(rax), 0u32)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.iretq()
    });
    install_handler(vm.memory(), IDT, IDTR, VECTOR, at, &handler);

    let line = vm.edge_irq_line(4).unwrap();
    let serial = Arc::new(vmkit_devices::Serial::new(Box::new(std::io::sink()), line));
    let bus = bus();
    bus.pio.insert(0x3F8, 8, serial.clone()).unwrap();
    let s = serial.clone();
    bus.pio
        .insert(
            u64::from(READY_PORT),
            1,
            Hook::new(move |_| assert_eq!(s.push_input(b"Z"), 1)),
        )
        .unwrap();
    let reports = recording_port(&bus, REPORT_PORT);
    assert_eq!(exit_code(vcpu.run(&bus).unwrap()), 2);
    // IIR 0x02: THR empty; IIR 0x04: received data, then the byte.
    assert_eq!(*reports.lock().unwrap(), vec![0x02, 0x04, u64::from(b'Z')]);
}
