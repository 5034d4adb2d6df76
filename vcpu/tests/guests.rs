//! KVM integration tests: tiny guests in each CPU mode, their I/O
//! dispatched through the vmkit bus.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use iced_x86::code_asm::*;
use vmkit_devices::{NullLine, Serial};
use vmkit_vcpu::{StopReason, VmConfig};

const RECORD_PORT: u16 = 0x510;
const MMIO_DEV: u64 = 0xd000_0000;

fn expect_exit(stop: StopReason, code: u32) {
    match stop {
        StopReason::Exit(c) if c == code => {}
        other => panic!("expected Exit({code}), got {other:?}"),
    }
}

#[test]
fn real_mode_guest_runs_with_real_mode_segments() {
    require_kvm!();
    let code = assemble(16, |a| {
        a.mov(eax, cr0)?;
        a.mov(dx, RECORD_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(ax, cs)?;
        a.out(dx, ax)?;
        a.mov(al, 16u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(16, &code);
    let bus = bus();
    let rec = Recorder::returning(0);
    bus.pio
        .insert(u64::from(RECORD_PORT), 4, rec.clone())
        .unwrap();
    expect_exit(vcpu.run(&bus).unwrap(), 16);
    let w = rec.writes();
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(
        w[0].1 & 1,
        0,
        "CR0.PE must be clear in real mode: {:#x}",
        w[0].1
    );
    assert_eq!(w[0].2, 4);
    // The entry at 0x10000 is above 64 KiB: CS = 0x1000, IP = 0.
    assert_eq!((w[1].1, w[1].2), (0x1000, 2));
}

#[test]
fn protected_mode_guest_uses_flat_32_bit_segments() {
    require_kvm!();
    let code = assemble(32, |a| {
        a.mov(eax, cr0)?;
        a.mov(dx, RECORD_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(dword_ptr(0x10_0000), 0xdead_beefu32)?;
        a.mov(eax, dword_ptr(0x10_0000))?;
        a.out(dx, eax)?;
        a.mov(ax, cs)?;
        a.out(dx, ax)?;
        a.mov(al, 32u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(32, &code);
    let bus = bus();
    let rec = Recorder::returning(0);
    bus.pio
        .insert(u64::from(RECORD_PORT), 4, rec.clone())
        .unwrap();
    expect_exit(vcpu.run(&bus).unwrap(), 32);
    let w = rec.writes();
    assert_eq!(w.len(), 3, "{w:?}");
    assert_eq!(w[0].1 & 1, 1, "CR0.PE");
    assert_eq!(w[0].1 >> 31, 0, "CR0.PG");
    assert_eq!((w[1].1, w[1].2), (0xdead_beef, 4));
    assert_eq!(w[2].1, u64::from(vmkit_vcpu::vcpu::BOOT_CS));
}

#[test]
fn long_mode_guest_has_efer_lma_and_64_bit_registers() {
    require_kvm!();
    let code = assemble(64, |a| {
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.mov(dx, RECORD_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(rbx, MMIO_DEV)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(al, 64u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let bus = bus();
    let rec = Recorder::returning(0);
    let mmio = Recorder::returning(0);
    bus.pio
        .insert(u64::from(RECORD_PORT), 4, rec.clone())
        .unwrap();
    bus.mmio.insert(MMIO_DEV, 0x1000, mmio.clone()).unwrap();
    expect_exit(vcpu.run(&bus).unwrap(), 64);
    let efer = rec.writes()[0].1;
    assert_eq!(efer & 0x500, 0x500, "EFER.LME and LMA: {efer:#x}");
    assert_eq!(mmio.writes(), vec![(0, 0x1122_3344_5566_7788, 8)]);
}

#[test]
fn pio_reads_come_from_the_device_and_are_written_back() {
    require_kvm!();
    let code = assemble(64, |a| {
        a.mov(dx, 0x520u32)?;
        a.in_(eax, dx)?;
        a.mov(dx, RECORD_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0x522u32)?;
        a.in_(ax, dx)?;
        a.mov(dx, RECORD_PORT as u32)?;
        a.out(dx, ax)?;
        a.in_(al, 0x523u32 & 0xff)?; // port 0x23: nothing there
        a.out(dx, al)?;
        a.mov(al, 0u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let bus = bus();
    let rec = Recorder::returning(0);
    let src = Recorder::returning(0x5a5a_1234);
    bus.pio
        .insert(u64::from(RECORD_PORT), 4, rec.clone())
        .unwrap();
    bus.pio.insert(0x520, 4, src.clone()).unwrap();
    expect_exit(vcpu.run(&bus).unwrap(), 0);
    assert_eq!(
        rec.writes(),
        vec![(0, 0x5a5a_1234, 4), (0, 0x1234, 2), (0, 0xff, 1)]
    );
    assert_eq!(*src.reads.lock().unwrap(), vec![(0, 4), (2, 2)]);
    assert_eq!(bus.stats().pio_read_misses, 1);
}

#[test]
fn mmio_reads_come_from_the_device_and_are_written_back() {
    require_kvm!();
    let code = assemble(64, |a| {
        a.mov(rbx, MMIO_DEV)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.mov(qword_ptr(rbx + 8), rax)?;
        a.movzx(eax, word_ptr(rbx + 0x10))?;
        a.mov(dword_ptr(rbx + 0x20), eax)?;
        a.mov(al, byte_ptr(rbx + 0x30))?;
        a.mov(byte_ptr(rbx + 0x31), al)?;
        a.mov(al, 0u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let bus = bus();
    let dev = Recorder::returning(0x0123_4567_89ab_cdef);
    bus.mmio.insert(MMIO_DEV, 0x1000, dev.clone()).unwrap();
    expect_exit(vcpu.run(&bus).unwrap(), 0);
    assert_eq!(
        dev.writes(),
        vec![
            (8, 0x0123_4567_89ab_cdef, 8),
            (0x20, 0xcdef, 4),
            (0x31, 0xef, 1)
        ]
    );
    assert_eq!(
        *dev.reads.lock().unwrap(),
        vec![(0, 8), (0x10, 2), (0x30, 1)]
    );
}

#[test]
fn unbacked_memory_reaches_the_bus_miss_path() {
    require_kvm!();
    let code = assemble(64, |a| {
        a.mov(rbx, 0x3000_0000u64)?; // identity-mapped, beyond RAM, no device
        a.mov(eax, dword_ptr(rbx))?;
        a.mov(dx, RECORD_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(dword_ptr(rbx), eax)?;
        a.mov(al, 0u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let bus = bus();
    let rec = Recorder::returning(0);
    bus.pio
        .insert(u64::from(RECORD_PORT), 4, rec.clone())
        .unwrap();
    expect_exit(vcpu.run(&bus).unwrap(), 0);
    assert_eq!(rec.writes(), vec![(0, 0xffff_ffff, 4)]);
    let stats = bus.stats();
    assert_eq!((stats.mmio_read_misses, stats.mmio_write_misses), (1, 1));
}

#[test]
fn hlt_stops_the_run_loop() {
    require_kvm!();
    let code = assemble(64, |a| a.hlt());
    let (_vm, mut vcpu) = boot(64, &code);
    assert_eq!(vcpu.lapic_register(0x350), None, "no irqchip, no LAPIC");
    let stop = vcpu.run(&bus()).unwrap();
    assert!(matches!(stop, StopReason::Hlt), "{stop:?}");
    assert_eq!(vcpu.regs().unwrap().rip, common::CODE + 1);
}

#[test]
fn triple_fault_is_a_shutdown_with_a_register_dump() {
    require_kvm!();
    // No IDT: the #UD escalates to a triple fault.
    let code = assemble(64, |a| {
        a.mov(rax, 0x1234_5678u64)?;
        a.ud2()
    });
    let (_vm, mut vcpu) = boot(64, &code);
    match vcpu.run(&bus()).unwrap() {
        StopReason::Shutdown(dump) => {
            let regs = dump.regs.expect("registers");
            assert_eq!(regs.rax, 0x1234_5678);
            assert!(
                dump.to_string().contains("rax=0x0000000012345678"),
                "{dump}"
            );
        }
        other => panic!("expected Shutdown, got {other:?}"),
    }
}

#[test]
fn fetching_code_from_unbacked_memory_is_an_internal_error() {
    require_kvm!();
    // KVM cannot emulate an instruction fetched from outside RAM.
    let code = assemble(64, |a| {
        a.mov(rax, 0x3000_0000u64)?;
        a.jmp(rax)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    match vcpu.run(&bus()).unwrap() {
        StopReason::InternalError {
            suberror,
            registers,
            ..
        } => {
            // KVM_INTERNAL_ERROR_EMULATION
            assert_eq!(suberror, 1);
            assert_eq!(registers.regs.expect("registers").rip, 0x3000_0000);
        }
        other => panic!("expected InternalError, got {other:?}"),
    }
}

#[test]
fn in_kernel_irqchip_and_pit_can_be_created() {
    require_kvm!();
    let code = assemble(64, |a| {
        a.mov(al, 5u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let config = VmConfig {
        irqchip: true,
        pit: true,
        log_dirty_pages: false,
    };
    let (vm, mut vcpu) = boot_with(64, &code, config);
    assert_eq!(vm.config(), config);
    // LINT0 is ExtINT and LINT1 NMI, both unmasked.
    assert_eq!(vcpu.lapic_register(0x350).unwrap() & 0x1_0700, 0x700);
    assert_eq!(vcpu.lapic_register(0x360).unwrap() & 0x1_0700, 0x400);
    expect_exit(vcpu.run(&bus()).unwrap(), 5);
    // The IOAPIC exists: KVM_IRQ_LINE on a GSI succeeds only with an irqchip.
    vm.fd().set_irq_line(4, true).unwrap();
}

#[test]
fn a_pit_without_an_irqchip_is_refused() {
    require_kvm!();
    let memory = vmkit_memory::MemoryLayout::new(RAM)
        .unwrap()
        .create_memory(&Default::default())
        .unwrap();
    let config = VmConfig {
        irqchip: false,
        pit: true,
        log_dirty_pages: false,
    };
    let err = vmkit_vcpu::Vm::new(memory, config).unwrap_err();
    assert!(
        matches!(err, vmkit_vcpu::VmError::InvalidConfig(_)),
        "{err}"
    );
}

#[test]
fn kvm_dirty_log_records_guest_writes() {
    require_kvm!();
    let code = assemble(64, |a| {
        a.mov(dword_ptr(0x12_3450), 1u32)?;
        a.mov(dword_ptr(0x15_0000), 2u32)?;
        a.mov(al, 0u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let config = VmConfig {
        log_dirty_pages: true,
        ..Default::default()
    };
    let (vm, mut vcpu) = boot_with(64, &code, config);
    assert!(vm.slots()[0].flags.log_dirty_pages);
    // Forget what set-up wrote.
    vm.take_dirty_pages(0).unwrap();
    expect_exit(vcpu.run(&bus()).unwrap(), 0);
    let dirty = vm.take_dirty_pages(0).unwrap();
    assert!(dirty.contains(&0x12_3000), "{dirty:x?}");
    assert!(dirty.contains(&0x15_0000), "{dirty:x?}");
    assert!(!dirty.contains(&0x14_0000), "{dirty:x?}");
    // Reading the log cleared it.
    assert!(!vm.take_dirty_pages(0).unwrap().contains(&0x12_3000));
    assert!(matches!(
        vm.take_dirty_pages(7),
        Err(vmkit_vcpu::VmError::NoSuchSlot(7))
    ));
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn hello_guest_prints_through_the_uart() {
    require_kvm!();
    let msg = b"Hello from a vmkit guest\n\0";
    let code = assemble(64, |a| {
        let mut text = a.create_label();
        let mut next = a.create_label();
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.lea(rsi, ptr(text))?;
        a.set_label(&mut next)?;
        a.mov(bl, byte_ptr(rsi))?;
        a.test(bl, bl)?;
        a.jz(done)?;
        a.set_label(&mut wait)?;
        a.mov(dx, 0x3fdu32)?;
        a.in_(al, dx)?;
        a.test(al, 0x20u32)?; // LSR.THRE
        a.jz(wait)?;
        a.mov(dx, 0x3f8u32)?;
        a.mov(al, bl)?;
        a.out(dx, al)?;
        a.inc(rsi)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.mov(al, 0u32)?;
        a.out(EXIT_PORT as u32, al)?;
        a.set_label(&mut text)?;
        a.db(msg)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let bus = bus();
    let out = SharedBuf::default();
    let serial = Arc::new(Serial::new(Box::new(out.clone()), Arc::new(NullLine)));
    bus.pio.insert(0x3f8, 8, serial).unwrap();
    expect_exit(vcpu.run(&bus).unwrap(), 0);
    assert_eq!(&*out.0.lock().unwrap(), b"Hello from a vmkit guest\n");
}
