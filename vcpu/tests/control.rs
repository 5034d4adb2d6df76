//! KVM integration tests of vCPU control from other threads: kick, pause,
//! resume and stop, including a stress run of many cycles.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;
use vmkit_vcpu::handle::kick_signal;
use vmkit_vcpu::{set_kick_signal, HandleError, StopReason, VcpuState};

/// The port the spinning guest writes its counter to.
const TICK_PORT: u16 = 0x520;
/// The port the I/O guest reads from.
const DATA_PORT: u16 = 0x530;

/// A 64-bit guest that counts forever, writing each value to `TICK_PORT`.
fn spinner() -> Vec<u8> {
    assemble(64, |a| {
        let mut top = a.create_label();
        a.xor(eax, eax)?;
        a.mov(dx, u32::from(TICK_PORT))?;
        a.set_label(&mut top)?;
        a.inc(eax)?;
        a.out(dx, eax)?;
        a.jmp(top)
    })
}

/// A bus with the debug exit and a tick counter at `TICK_PORT`.
fn tick_bus() -> (vmkit_devices::IoBus, Arc<AtomicU64>) {
    let bus = bus();
    let ticks = Arc::new(AtomicU64::new(0));
    let t = ticks.clone();
    bus.pio
        .insert(
            u64::from(TICK_PORT),
            4,
            Hook::new(move |v| t.store(v, Ordering::SeqCst)),
        )
        .unwrap();
    (bus, ticks)
}

#[test]
fn a_kick_before_run_is_not_lost() {
    require_kvm!();
    // mov al, 9; out 0xf4, al
    let code = assemble(64, |a| {
        a.mov(al, 9u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let handle = vcpu.handle();
    assert_eq!(handle.state(), VcpuState::Idle);
    handle.kick().unwrap();
    handle.kick().unwrap(); // merges with the first
    let bus = bus();
    assert!(matches!(vcpu.run(&bus).unwrap(), StopReason::Kicked));
    // The guest had not run; now it does, and no stale kick remains.
    assert!(matches!(vcpu.run(&bus).unwrap(), StopReason::Exit(9)));
    assert_eq!(vcpu.regs().unwrap().rax & 0xff, 9);
}

#[test]
fn a_kick_interrupts_a_spinning_guest_from_another_thread() {
    require_kvm!();
    let _dog = watchdog("kick spinning guest", Duration::from_secs(30));
    let (_vm, mut vcpu) = boot(64, &spinner());
    let handle = vcpu.handle();
    let (bus, ticks) = tick_bus();
    let kicker = std::thread::spawn(move || {
        while ticks.load(Ordering::SeqCst) < 100 {
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.kick().unwrap();
        ticks
    });
    assert!(matches!(vcpu.run(&bus).unwrap(), StopReason::Kicked));
    let ticks = kicker.join().unwrap();
    // The guest resumes where it was.
    let before = ticks.load(Ordering::SeqCst);
    let h = vcpu.handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        h.stop().unwrap();
    });
    assert!(matches!(vcpu.run(&bus).unwrap(), StopReason::Stopped));
    stopper.join().unwrap();
    assert!(ticks.load(Ordering::SeqCst) > before);
}

#[test]
fn a_kick_during_an_io_exit_completes_the_access_first() {
    require_kvm!();
    // in al, DATA_PORT; then spin on the tick port.
    let code = assemble(64, |a| {
        let mut top = a.create_label();
        a.xor(eax, eax)?;
        a.mov(dx, u32::from(DATA_PORT))?;
        a.in_(al, dx)?;
        a.mov(dx, u32::from(TICK_PORT))?;
        a.set_label(&mut top)?;
        a.out(dx, eax)?;
        a.jmp(top)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let handle = vcpu.handle();
    let (bus, ticks) = tick_bus();

    struct Data(vmkit_vcpu::VcpuHandle);
    impl vmkit_devices::BusDevice for Data {
        fn read(&self, _: u64, data: &mut [u8]) -> Result<(), vmkit_devices::DeviceError> {
            // The request arrives while the IN is in flight, before KVM has
            // put the value into AL.
            self.0.kick().unwrap();
            data.fill(0x42);
            Ok(())
        }
        fn write(
            &self,
            _: u64,
            _: &[u8],
        ) -> Result<vmkit_devices::IoAction, vmkit_devices::DeviceError> {
            Ok(vmkit_devices::IoAction::Continue)
        }
    }
    bus.pio
        .insert(u64::from(DATA_PORT), 1, Arc::new(Data(handle)))
        .unwrap();
    assert!(matches!(vcpu.run(&bus).unwrap(), StopReason::Kicked));
    // KVM finished the IN before returning: AL holds the value and RIP is
    // past the instruction; no tick was written yet.
    let regs = vcpu.regs().unwrap();
    assert_eq!(regs.rax & 0xff, 0x42);
    assert_eq!(regs.rip, CODE + 2 + 4 + 1, "xor(2) mov dx(4) in(1)");
    assert_eq!(ticks.load(Ordering::SeqCst), 0);
}

#[test]
fn pause_parks_the_vcpu_and_resume_lets_it_run() {
    require_kvm!();
    let _dog = watchdog("pause/resume", Duration::from_secs(30));
    let (_vm, mut vcpu) = boot(64, &spinner());
    let handle = vcpu.handle();
    let (bus, ticks) = tick_bus();
    let runner = std::thread::spawn(move || {
        let stop = vcpu.run(&bus).unwrap();
        (vcpu, stop)
    });
    while ticks.load(Ordering::SeqCst) < 10 {
        std::thread::sleep(Duration::from_millis(1));
    }
    handle.pause().unwrap();
    assert_eq!(handle.state(), VcpuState::Paused);
    let parked_at = ticks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(ticks.load(Ordering::SeqCst), parked_at, "ran while paused");
    handle.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks.load(Ordering::SeqCst) == parked_at {
        assert!(Instant::now() < deadline, "no progress after resume");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(handle.state(), VcpuState::Running);
    // Stop from a pause.
    handle.pause().unwrap();
    handle.stop().unwrap();
    let (vcpu, stop) = runner.join().unwrap();
    assert!(matches!(stop, StopReason::Stopped), "{stop:?}");
    assert_eq!(handle.state(), VcpuState::Idle);
    drop(vcpu);
    assert!(matches!(handle.kick(), Err(HandleError::Gone)));
    assert!(matches!(handle.pause(), Err(HandleError::Gone)));
    assert!(matches!(handle.resume(), Err(HandleError::Gone)));
}

/// The stress test: many kick/pause/resume cycles against a guest
/// that spins doing port I/O. Every kick must come back as exactly one
/// `Kicked` (a lost kick times out and fails), every pause must park.
#[test]
fn stress_kick_pause_resume_cycles() {
    require_kvm!();
    let cycles: u64 = std::env::var("VMKIT_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let _dog = watchdog("kick/pause/resume stress", Duration::from_secs(600));
    let (_vm, mut vcpu) = boot(64, &spinner());
    let handle = vcpu.handle();
    let (bus, ticks) = tick_bus();
    let (kicked_tx, kicked_rx) = mpsc::channel();
    let runner = std::thread::spawn(move || loop {
        match vcpu.run(&bus).unwrap() {
            StopReason::Kicked => kicked_tx.send(()).unwrap(),
            StopReason::Stopped => return,
            other => panic!("unexpected stop: {other:?}"),
        }
    });
    let start = Instant::now();
    let mut parked_checks = 0;
    for i in 0..cycles {
        handle.kick().unwrap();
        kicked_rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("kick {i} was lost"));
        handle.pause().unwrap();
        // The runner may be between two `run` calls (pause then returns at
        // once): the next `run` parks.
        assert!(
            handle.wait_for(VcpuState::Paused, Duration::from_secs(10)),
            "cycle {i}: never parked"
        );
        if i % 10_000 == 0 {
            // While parked the guest makes no progress.
            let t = ticks.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(
                ticks.load(Ordering::SeqCst),
                t,
                "cycle {i}: ran while paused"
            );
            parked_checks += 1;
        }
        handle.resume().unwrap();
    }
    let elapsed = start.elapsed();
    handle.stop().unwrap();
    runner.join().unwrap();
    assert!(kicked_rx.try_recv().is_err(), "a kick came back twice");
    assert!(ticks.load(Ordering::SeqCst) > 0);
    eprintln!(
        "stress: {cycles} kick/pause/resume cycles in {:.2?} ({:.1} µs per cycle), {parked_checks} parked checks, guest ticks {}",
        elapsed,
        elapsed.as_secs_f64() * 1e6 / cycles as f64,
        ticks.load(Ordering::SeqCst)
    );
}

#[test]
fn the_kick_signal_is_chosen_once() {
    require_kvm!();
    let signal = kick_signal().unwrap();
    set_kick_signal(signal).unwrap();
    let other = if signal == libc::SIGUSR1 {
        libc::SIGUSR2
    } else {
        libc::SIGUSR1
    };
    assert!(matches!(
        set_kick_signal(other),
        Err(HandleError::SignalAlreadyChosen { current }) if current == signal
    ));
}
