//! KVM integration tests of the legacy platform devices: guests reading the
//! CMOS RTC and resetting the machine through the i8042.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use iced_x86::code_asm::*;
use vmkit_devices::{NullLine, Rtc, I8042};
use vmkit_vcpu::StopReason;

const RECORD_PORT: u16 = 0x510;
/// 2026-11-21T09:54:37Z.
const T0: u64 = 1_795_254_877;

fn expect_exit(stop: StopReason, code: u32) {
    match stop {
        StopReason::Exit(c) if c == code => {}
        other => panic!("expected Exit({code}), got {other:?}"),
    }
}

/// Emits: wait until RTC register A has UIP clear, counting the reads in
/// `ecx`; then read seconds, minutes and hours and write each to
/// `RECORD_PORT`; then write `ecx` there and exit with code 0.
fn rtc_reader(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    a.xor(ecx, ecx)?;
    a.set_label(&mut wait)?;
    a.inc(ecx)?;
    a.mov(al, 0x0Au32)?;
    a.out(0x70u32, al)?;
    a.in_(al, 0x71u32)?;
    a.test(al, 0x80u32)?;
    a.jnz(wait)?;
    a.mov(dx, RECORD_PORT as u32)?;
    for reg in [0x00u32, 0x02, 0x04] {
        a.mov(al, reg)?;
        a.out(0x70u32, al)?;
        a.in_(al, 0x71u32)?;
        a.out(dx, al)?;
    }
    a.mov(eax, ecx)?;
    a.out(dx, eax)?;
    a.mov(al, 0u32)?;
    a.out(EXIT_PORT as u32, al)
}

fn run_rtc_guest(rtc: Rtc) -> Vec<(u64, u64, usize)> {
    let code = assemble(64, rtc_reader);
    let (_vm, mut vcpu) = boot(64, &code);
    let bus = bus();
    let rec = Recorder::returning(0);
    bus.pio
        .insert(u64::from(RECORD_PORT), 4, rec.clone())
        .unwrap();
    bus.pio.insert(0x70, 2, Arc::new(rtc)).unwrap();
    expect_exit(vcpu.run(&bus).unwrap(), 0);
    assert_eq!(bus.stats().device_errors, 0);
    rec.writes()
}

fn is_bcd(b: u64) -> bool {
    b <= 0xFF && b & 0x0F <= 9 && b >> 4 <= 9
}

#[test]
fn guest_reads_the_rtc_time_in_bcd() {
    require_kvm!();
    let fixed = UNIX_EPOCH + Duration::new(T0, 250_000_000);
    let w = run_rtc_guest(Rtc::with_clock(Box::new(move || fixed)));
    assert_eq!(w.len(), 4, "{w:?}");
    for (_, value, size) in &w[..3] {
        assert_eq!(*size, 1);
        assert!(is_bcd(*value), "not BCD: {value:#x}");
    }
    let hms: Vec<u64> = w[..3].iter().map(|(_, v, _)| *v).collect();
    assert_eq!(hms, vec![0x37, 0x54, 0x09]);
    assert_eq!((w[3].1, w[3].2), (1, 4), "UIP was clear at the first read");
}

#[test]
fn guest_waits_for_uip_to_clear_before_reading() {
    require_kvm!();
    // Starts 200 µs before a second boundary (inside the UIP window) and
    // advances 50 µs every time the RTC consults it.
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let clock = move || {
        let n = c.fetch_add(1, Ordering::SeqCst);
        UNIX_EPOCH + Duration::new(T0, 999_800_000) + Duration::from_micros(50 * n)
    };
    let w = run_rtc_guest(Rtc::with_clock(Box::new(clock)));
    assert_eq!(w.len(), 4, "{w:?}");
    let hms: Vec<u64> = w[..3].iter().map(|(_, v, _)| *v).collect();
    // Read after the boundary: one second later than T0.
    assert_eq!(hms, vec![0x38, 0x54, 0x09]);
    let reads_of_a = w[3].1;
    assert!(
        reads_of_a >= 2,
        "the guest must have seen UIP set at least once, read A {reads_of_a} times"
    );
    assert!(calls.load(Ordering::SeqCst) > reads_of_a);
}

#[test]
fn guest_reads_real_host_time_as_valid_bcd() {
    require_kvm!();
    let before = SystemTime::now();
    let w = run_rtc_guest(Rtc::new());
    assert_eq!(w.len(), 4, "{w:?}");
    for (_, value, _) in &w[..3] {
        assert!(is_bcd(*value), "not BCD: {value:#x}");
    }
    let secs = before.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let hour = (secs / 3600) % 24;
    let bcd_hour = w[2].1;
    let read_hour = (bcd_hour >> 4) * 10 + (bcd_hour & 0xF);
    // The hour may have rolled over during the run.
    assert!(
        read_hour == hour || read_hour == (hour + 1) % 24,
        "{read_hour} vs {hour}"
    );
}

fn i8042_bus() -> (vmkit_devices::IoBus, Arc<Recorder>) {
    let bus = bus();
    let rec = Recorder::returning(0);
    bus.pio
        .insert(u64::from(RECORD_PORT), 4, rec.clone())
        .unwrap();
    let kbc = I8042::new(Arc::new(NullLine), Arc::new(NullLine));
    bus.pio.insert(0x60, 5, Arc::new(kbc)).unwrap();
    (bus, rec)
}

#[test]
fn i8042_pulse_reset_command_resets_the_machine() {
    require_kvm!();
    let code = assemble(64, |a| {
        a.mov(dx, RECORD_PORT as u32)?;
        a.mov(al, 1u32)?;
        a.out(dx, al)?;
        a.mov(al, 0xFEu32)?;
        a.out(0x64u32, al)?;
        // Not reached when the reset is honoured.
        a.mov(al, 2u32)?;
        a.out(dx, al)?;
        a.mov(al, 0x77u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let (bus, rec) = i8042_bus();
    match vcpu.run(&bus).unwrap() {
        StopReason::Reset => {}
        other => panic!("expected Reset, got {other:?}"),
    }
    assert_eq!(rec.writes(), vec![(0, 1, 1)]);
}

#[test]
fn i8042_self_test_then_output_port_reset() {
    require_kvm!();
    let code = assemble(64, |a| {
        let mut wait = a.create_label();
        a.mov(dx, RECORD_PORT as u32)?;
        a.mov(al, 0xAAu32)?;
        a.out(0x64u32, al)?;
        a.set_label(&mut wait)?;
        a.in_(al, 0x64u32)?;
        a.test(al, 1u32)?; // OBF
        a.jz(wait)?;
        a.in_(al, 0x60u32)?;
        a.out(dx, al)?;
        a.mov(al, 0xD1u32)?;
        a.out(0x64u32, al)?;
        a.mov(al, 0xFEu32)?; // output port with bit 0 (reset) clear
        a.out(0x60u32, al)?;
        a.mov(al, 0x77u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let (bus, rec) = i8042_bus();
    match vcpu.run(&bus).unwrap() {
        StopReason::Reset => {}
        other => panic!("expected Reset, got {other:?}"),
    }
    assert_eq!(rec.writes(), vec![(0, 0x55, 1)]);
}

#[test]
fn guest_reports_its_boot_time_through_the_boot_timer() {
    require_kvm!();
    const BOOT_TIMER: u64 = 0xd000_0000;
    let code = assemble(64, |a| {
        a.mov(rbx, BOOT_TIMER)?;
        a.mov(byte_ptr(rbx), 122u32)?; // not the magic value: ignored
        a.mov(
            byte_ptr(rbx),
            u32::from(vmkit_devices::boot_timer::BOOT_MAGIC),
        )?;
        a.mov(al, 0u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let before_timer = std::time::Instant::now();
    let timer = Arc::new(vmkit_devices::BootTimer::new());
    let (_vm, mut vcpu) = boot(64, &code);
    let bus = bus();
    bus.mmio.insert(BOOT_TIMER, 0x1000, timer.clone()).unwrap();
    assert!(timer.boot_time().is_none());
    assert!(matches!(vcpu.run(&bus).unwrap(), StopReason::Exit(0)));
    let boot = timer.boot_time().expect("the guest reported");
    // Measured from the timer's creation to the guest's write: positive and
    // no longer than everything since just before the timer was made.
    assert!(boot.wall > Duration::ZERO, "{boot}");
    assert!(boot.wall <= before_timer.elapsed(), "{boot}");
}
