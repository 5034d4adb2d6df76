//! KVM integration test of several vCPUs: the bootstrap processor wakes
//! two application processors with INIT/SIPI through the in-kernel LAPIC,
//! each reports its APIC ID, and all three are paused and resumed together.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_vcpu::{
    pause_all, resume_all, BootConfig, CpuMode, CpuidConfig, StopReason, VcpuState, Vm, VmConfig,
};

const CPUS: u32 = 3;
const REPORT_PORT: u16 = 0x510;
/// vCPU n writes its 32-bit counter to `TICK_BASE + 4 * n`.
const TICK_BASE: u16 = 0x540;
/// The SIPI vector: APs start in real mode at 0x0A00:0000.
const SIPI_VECTOR: u32 = 0x0A;
const TRAMPOLINE: u64 = (SIPI_VECTOR as u64) << 12;
const LAPIC: u32 = 0xFEE0_0000;

fn bsp_code() -> Vec<u8> {
    assemble(64, |a| {
        let mut spin = a.create_label();
        a.mov(ebx, LAPIC)?;
        a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?;
        // INIT, then SIPI, to all but self (ICR shorthand 0b11).
        a.mov(dword_ptr(rbx + 0x310), 0u32)?;
        a.mov(dword_ptr(rbx + 0x300), 0x000C_4500u32)?;
        a.mov(dword_ptr(rbx + 0x300), 0x000C_4600u32 | SIPI_VECTOR)?;
        a.xor(eax, eax)?;
        a.mov(dx, u32::from(TICK_BASE))?;
        a.set_label(&mut spin)?;
        a.inc(eax)?;
        a.out(dx, eax)?;
        a.jmp(spin)
    })
}

/// Real-mode AP code: report the initial APIC ID from CPUID leaf 1, then
/// count on its own tick port.
fn ap_code() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    let mut spin = a.create_label();
    a.mov(eax, 1u32).unwrap();
    a.cpuid().unwrap();
    a.shr(ebx, 24u32).unwrap();
    a.mov(eax, ebx).unwrap();
    a.mov(dx, u32::from(REPORT_PORT)).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(dx, u32::from(TICK_BASE)).unwrap();
    a.shl(bx, 2u32).unwrap();
    a.add(dx, bx).unwrap();
    a.xor(eax, eax).unwrap();
    a.set_label(&mut spin).unwrap();
    a.inc(eax).unwrap();
    a.out(dx, eax).unwrap();
    a.jmp(spin).unwrap();
    // Relative jumps only: the base does not matter (IP starts at 0).
    a.assemble(0).unwrap()
}

fn wait_until(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn bsp_starts_aps_with_init_sipi_and_all_pause_and_resume_together() {
    require_kvm!();
    let _dog = watchdog("smp", Duration::from_secs(60));
    let (memory, page_root) = identity_mapped_memory(&bsp_code());
    memory
        .write_slice(&ap_code(), GuestAddress(TRAMPOLINE))
        .unwrap();
    let vm = Vm::new(
        memory,
        VmConfig {
            irqchip: true,
            ..Default::default()
        },
    )
    .unwrap();
    let cpuid = CpuidConfig {
        vcpu_count: CPUS,
        ..Default::default()
    };
    let mut vcpus = Vec::new();
    for id in 0..CPUS {
        let vcpu = vm.create_vcpu(id).unwrap();
        if id == 0 {
            let mode = CpuMode::Long {
                gdt: GDT,
                cr3: page_root,
            };
            vcpu.configure(&BootConfig {
                cpuid,
                ..BootConfig::new(mode, CODE, STACK)
            })
            .unwrap();
        } else {
            vcpu.configure_ap(&cpuid).unwrap();
        }
        vcpus.push(vcpu);
    }
    // An AP cannot be set up like a BSP and vice versa.
    assert!(vcpus[0].configure_ap(&cpuid).is_err());

    let bus = Arc::new(bus());
    let reports = Recorder::returning(0);
    bus.pio
        .insert(u64::from(REPORT_PORT), 4, reports.clone())
        .unwrap();
    let ticks: Arc<Vec<AtomicU64>> = Arc::new((0..CPUS).map(|_| AtomicU64::new(0)).collect());
    for id in 0..CPUS {
        let t = ticks.clone();
        bus.pio
            .insert(
                u64::from(TICK_BASE) + 4 * u64::from(id),
                4,
                Hook::new(move |v| t[id as usize].store(v, Ordering::SeqCst)),
            )
            .unwrap();
    }
    let handles: Vec<_> = vcpus.iter().map(|v| v.handle()).collect();
    let threads: Vec<_> = vcpus
        .into_iter()
        .map(|mut vcpu| {
            let bus = bus.clone();
            std::thread::spawn(move || match vcpu.run(&*bus).unwrap() {
                StopReason::Stopped => vcpu.id(),
                other => panic!("vCPU {} stopped with {other:?}", vcpu.id()),
            })
        })
        .collect();

    wait_until("both APs to report", Duration::from_secs(20), || {
        reports.writes().len() >= 2
    });
    let mut ids: Vec<u64> = reports.writes().iter().map(|w| w.1).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2], "APs report their APIC IDs once each");
    let all_ticking =
        |after: &[u64]| (0..CPUS as usize).all(|i| ticks[i].load(Ordering::SeqCst) > after[i]);
    wait_until("all vCPUs to run", Duration::from_secs(20), || {
        all_ticking(&[0, 0, 0])
    });

    pause_all(&handles).unwrap();
    assert!(handles.iter().all(|h| h.state() == VcpuState::Paused));
    let frozen: Vec<u64> = ticks.iter().map(|t| t.load(Ordering::SeqCst)).collect();
    std::thread::sleep(Duration::from_millis(30));
    let later: Vec<u64> = ticks.iter().map(|t| t.load(Ordering::SeqCst)).collect();
    assert_eq!(frozen, later, "a vCPU ran while all were paused");

    resume_all(&handles).unwrap();
    wait_until("all vCPUs to run again", Duration::from_secs(20), || {
        all_ticking(&frozen)
    });

    for h in &handles {
        h.stop().unwrap();
    }
    let mut stopped: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    stopped.sort_unstable();
    assert_eq!(stopped, vec![0, 1, 2]);
    assert_eq!(reports.writes().len(), 2);
}
