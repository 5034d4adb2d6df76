//! Device state for snapshots: save → restore → save is the identity for
//! the UART, the i8042, the RTC, PCI configuration space, MSI-X and the
//! root complex, the RTC keeps counting from the guest's time, restored
//! devices behave as the originals, and corrupt state bytes are refused.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;
use vmkit_devices::pci::{
    BarKind, ConfigSpace, ConfigSpaceState, IntxPin, Msix, MsixLayout, MsixState, PciHeader,
    PciRootState,
};
use vmkit_devices::{
    BusDevice, I8042State, InterruptLine, IoBus, MsiEvent, MsiMessage, MsiVectors, NullLine,
    PciRoot, PciWindows, RecordingLine, RecordingMsiVectors, Rtc, RtcState, Serial, SerialState,
    StateError, I8042,
};

fn serial() -> (Serial, Arc<RecordingLine>) {
    let line = Arc::new(RecordingLine::new());
    let s = Serial::new(
        Box::new(std::io::sink()),
        line.clone() as Arc<dyn InterruptLine>,
    );
    (s, line)
}

fn read(s: &Serial, offset: u64) -> u8 {
    let mut b = [0u8];
    s.read(offset, &mut b).unwrap();
    b[0]
}

#[test]
fn serial_fifo_and_interrupt_survive_restore() {
    let (s, _) = serial();
    s.write(2, &[0x01]).unwrap(); // FIFOs on, trigger level 1
    s.write(1, &[0x01]).unwrap(); // received-data interrupt
    s.write(7, &[0x5A]).unwrap();
    assert_eq!(s.push_input(b"hello"), 5);
    let state = s.save_state();
    let bytes = state.to_bytes();

    let (t, line) = serial();
    t.restore_state(&SerialState::from_bytes(&bytes).unwrap())
        .unwrap();
    assert_eq!(t.save_state(), state);
    // The pending received-data interrupt is on the line again.
    assert!(line.level());
    assert_eq!(read(&t, 7), 0x5A);
    let got: Vec<u8> = (0..5).map(|_| read(&t, 0)).collect();
    assert_eq!(got, b"hello");
    assert_eq!(read(&t, 5) & 0x01, 0, "FIFO empty after five reads");
    assert!(!line.level());
}

#[test]
fn serial_state_is_checked() {
    let (s, _) = serial();
    let bytes = s.save_state().to_bytes();
    for n in 0..bytes.len() {
        assert!(SerialState::from_bytes(&bytes[..n]).is_err());
    }
    let mut bad = bytes.clone();
    bad[5] = 0xF0; // IER bits 4-7
    assert!(matches!(
        SerialState::from_bytes(&bad),
        Err(StateError::Invalid { field: "ier", .. })
    ));
    // More bytes than the target's FIFO holds.
    let mut big = s.save_state();
    big.rx = vec![0; 65];
    let (t, _) = serial();
    assert!(matches!(
        t.restore_state(&big),
        Err(StateError::Mismatch { .. })
    ));
    assert_eq!(t.save_state(), s.save_state());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any register sequence: the restored UART saves the same state and
    /// answers the same reads.
    #[test]
    fn serial_round_trip(ops in proptest::collection::vec((0u64..8, any::<u8>(), any::<bool>()), 0..40),
                         input in proptest::collection::vec(any::<u8>(), 0..80)) {
        let (s, _) = serial();
        s.push_input(&input);
        for (offset, value, is_write) in ops {
            if is_write { s.write(offset, &[value]).unwrap(); } else { read(&s, offset); }
        }
        let state = s.save_state();
        let (t, _) = serial();
        t.restore_state(&SerialState::from_bytes(&state.to_bytes()).unwrap()).unwrap();
        prop_assert_eq!(t.save_state(), state);
        for offset in [0u64, 1, 2, 3, 4, 5, 6, 7] {
            prop_assert_eq!(read(&t, offset), read(&s, offset));
        }
    }
}

fn header() -> PciHeader {
    PciHeader {
        vendor_id: 0x1234,
        device_id: 0x5678,
        revision: 1,
        class_code: (0xFF, 0, 0),
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        interrupt_pin: Some(IntxPin::A),
    }
}

fn space() -> ConfigSpace {
    let mut c = ConfigSpace::new(&header());
    c.add_bar(
        0,
        BarKind::Memory64 {
            prefetchable: false,
        },
        0x4000,
    )
    .unwrap();
    c.add_bar(2, BarKind::Io, 0x20).unwrap();
    c
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Guest writes anywhere, then save → restore → save is the identity.
    #[test]
    fn config_space_round_trip(writes in proptest::collection::vec((0u16..0x100, any::<u32>()), 0..40)) {
        let mut c = space();
        for (offset, v) in writes { c.write_u32(offset & !3, v); }
        let state = c.save_state();
        let mut d = space();
        d.restore_state(&ConfigSpaceState::from_bytes(&state.to_bytes()).unwrap()).unwrap();
        prop_assert_eq!(d.save_state(), state);
        prop_assert_eq!(d.bars(), c.bars());
        prop_assert_eq!(d.command(), c.command());
    }
}

#[test]
fn config_space_of_another_device_is_refused() {
    let mut c = space();
    c.write_u32(0x10, 0xFFFF_FFFF);
    let mut other = ConfigSpace::new(&PciHeader {
        device_id: 0x9999,
        ..header()
    });
    assert!(matches!(
        other.restore_state(&c.save_state()),
        Err(StateError::Mismatch { .. })
    ));
    // BAR address bits below the BAR's size cannot be set by a guest.
    let mut s = c.save_state();
    s.bytes[0x10] |= 0x10;
    assert!(space().restore_state(&s).is_err());
    assert!(ConfigSpaceState::from_bytes(&s.to_bytes()[..100]).is_err());
}

const LAYOUT: MsixLayout = MsixLayout {
    table_bar: 0,
    table_offset: 0,
    pba_bar: 0,
    pba_offset: 0x800,
};

#[test]
fn msix_round_trip_reprograms_and_delivers_pending() {
    let sink = Arc::new(RecordingMsiVectors::new(4));
    let m = Msix::new(sink.clone() as Arc<dyn MsiVectors>, 4, LAYOUT).unwrap();
    m.table_write(16, &0xFEE0_1000u32.to_le_bytes());
    m.table_write(24, &0x41u32.to_le_bytes());
    m.table_write(28, &0u32.to_le_bytes()); // unmask vector 1
    m.set_control(0x8000 | 0x4000); // enabled, function masked
    m.notify(1).unwrap();
    assert!(m.pending(1));
    let state = m.save_state();
    let bytes = state.to_bytes();

    let sink2 = Arc::new(RecordingMsiVectors::new(4));
    let n = Msix::new(sink2.clone() as Arc<dyn MsiVectors>, 4, LAYOUT).unwrap();
    n.restore_state(&MsixState::from_bytes(&bytes).unwrap())
        .unwrap();
    assert_eq!(n.save_state(), state);
    assert!(n.pending(1));
    // Unmasking the function delivers the pending vector with its message.
    n.set_control(0x8000);
    let msg = MsiMessage::new(0xFEE0_1000, 0x41);
    assert!(sink2.take_events().contains(&MsiEvent::Fired(1, Some(msg))));
    assert!(!n.pending(1));

    // Another vector count, a pending bit beyond the table, a reserved
    // vector control bit: refused.
    let small = Msix::new(sink2 as Arc<dyn MsiVectors>, 2, LAYOUT).unwrap();
    assert!(matches!(
        small.restore_state(&state),
        Err(StateError::Mismatch { .. })
    ));
    let mut bad = state.clone();
    bad.pending[0] |= 1 << 9;
    assert!(MsixState::from_bytes(&bad.to_bytes()).is_err());
    let mut bad = state.clone();
    bad.entries[0][3] = 2;
    assert!(MsixState::from_bytes(&bad.to_bytes()).is_err());
    for n in 0..bytes.len() {
        assert!(MsixState::from_bytes(&bytes[..n]).is_err());
    }
}

#[test]
fn root_state_round_trip() {
    let io = Arc::new(IoBus::new());
    let windows = PciWindows {
        io: (0xC000, 0x1000),
        mem32: (0xC000_0000, 0x1000_0000),
        mem64: (1 << 36, 1 << 36),
    };
    let root = PciRoot::new(&io, windows).unwrap();
    let port = root.config_io_device();
    port.write(0, &0x8000_0810u32.to_le_bytes()).unwrap();
    let state = root.save_state();
    assert_eq!(state.config_address, 0x8000_0810);
    let io2 = Arc::new(IoBus::new());
    let root2 = PciRoot::new(&io2, windows).unwrap();
    root2
        .restore_state(&PciRootState::from_bytes(&state.to_bytes()).unwrap())
        .unwrap();
    assert_eq!(root2.save_state(), state);
    let mut bytes = state.to_bytes();
    bytes[5] |= 1; // CONFIG_ADDRESS bits 1:0
    assert!(PciRootState::from_bytes(&bytes).is_err());
}

fn kbc() -> I8042 {
    I8042::new(Arc::new(NullLine), Arc::new(NullLine))
}

fn kbc_read(k: &I8042, offset: u64) -> u8 {
    let mut b = [0u8];
    k.read(offset, &mut b).unwrap();
    b[0]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any command/data sequence and host keys: the restored controller
    /// saves the same state and answers the same status and data reads.
    #[test]
    fn i8042_round_trip(ops in proptest::collection::vec((any::<bool>(), any::<u8>(), 0u8..4), 0..40)) {
        let k = kbc();
        for (to_command, byte, kind) in ops {
            match kind {
                0 => { k.push_key(byte); }
                1 => { kbc_read(&k, 0); }
                _ if to_command => { k.write(4, &[byte]).unwrap(); }
                _ => { k.write(0, &[byte]).unwrap(); }
            }
        }
        let state = k.save_state();
        let t = kbc();
        t.restore_state(&I8042State::from_bytes(&state.to_bytes()).unwrap()).unwrap();
        prop_assert_eq!(t.save_state(), state.clone());
        prop_assert_eq!(t.command_byte(), k.command_byte());
        prop_assert_eq!(t.dropped_output(), k.dropped_output());
        for _ in 0..=state.output.len() {
            prop_assert_eq!(kbc_read(&t, 4), kbc_read(&k, 4));
            prop_assert_eq!(kbc_read(&t, 0), kbc_read(&k, 0));
        }
        // A pending parameter is still pending: the next data byte lands
        // in the same place on both.
        k.write(0, &[0x5A]).unwrap();
        t.write(0, &[0x5A]).unwrap();
        prop_assert_eq!(t.save_state(), k.save_state());
    }
}

#[test]
fn i8042_state_keeps_a20_output_buffer_and_pending_command() {
    let k = kbc();
    k.write(4, &[0xD1]).unwrap(); // write output port...
    k.write(0, &[0x01]).unwrap(); // ...A20 off, not in reset
    k.write(4, &[0xD3]).unwrap(); // aux loopback
    k.write(0, &[0x77]).unwrap();
    k.push_key(0x1E);
    k.write(4, &[0x60]).unwrap(); // command byte follows
    let state = k.save_state();
    assert_eq!(state.output_port, 0x01);
    assert_eq!(state.output, vec![(0x77, true), (0x1E, false)]);
    assert_eq!(state.controller_param, 1);
    let t = kbc();
    t.restore_state(&state).unwrap();
    assert_eq!(kbc_read(&t, 4) & 0x29, 0x29, "OBF, AUX OBF and A2");
    t.write(0, &[0x03]).unwrap();
    assert_eq!(t.command_byte(), 0x03);
    assert_eq!(kbc_read(&t, 0), 0x77);
    assert_eq!(kbc_read(&t, 0), 0x1E);
    t.write(4, &[0xD0]).unwrap();
    assert_eq!(kbc_read(&t, 0), 0x01, "A20 still off");
}

#[test]
fn i8042_corrupt_state_is_refused() {
    let k = kbc();
    k.push_key(0x10);
    let state = k.save_state();
    let bytes = state.to_bytes();
    for n in 0..bytes.len() {
        assert!(I8042State::from_bytes(&bytes[..n]).is_err(), "prefix {n}");
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        I8042State::from_bytes(&long),
        Err(StateError::Trailing { .. })
    ));
    let bad = |f: &dyn Fn(&mut I8042State), field: &str| {
        let mut s = state.clone();
        f(&mut s);
        match I8042State::from_bytes(&s.to_bytes()) {
            Err(StateError::Invalid { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
        // restore refuses it too and leaves the target alone.
        let t = kbc();
        let before = t.save_state();
        assert!(t.restore_state(&s).is_err());
        assert_eq!(t.save_state(), before);
    };
    bad(&|s| s.controller_param = 6, "controller_param");
    bad(&|s| s.keyboard_param = 4, "keyboard_param");
    bad(&|s| s.scancode_set = 0, "scancode_set");
    bad(&|s| s.leds = 8, "leds");
    bad(&|s| s.typematic = 0x80, "typematic");
    bad(&|s| s.output = vec![(0, false); 17], "output");
    // A source byte other than 0 or 1.
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] = 2;
    assert!(matches!(
        I8042State::from_bytes(&b),
        Err(StateError::Invalid { .. })
    ));
}

/// An RTC whose host clock is `secs` (shared, so the test moves it).
fn rtc(clock: &Arc<AtomicU64>) -> Rtc {
    let c = clock.clone();
    Rtc::with_clock(Box::new(move || {
        UNIX_EPOCH + Duration::from_millis(c.load(Ordering::Relaxed))
    }))
}

fn cmos(r: &Rtc, reg: u8) -> u8 {
    r.write(0, &[reg]).unwrap();
    let mut b = [0u8];
    r.read(1, &mut b).unwrap();
    b[0]
}

fn cmos_write(r: &Rtc, reg: u8, v: u8) {
    r.write(0, &[reg]).unwrap();
    r.write(1, &[v]).unwrap();
}

#[test]
fn rtc_keeps_counting_from_the_guest_time_after_restore() {
    // Host time 2024-01-01 00:00:00 UTC.
    let host = Arc::new(AtomicU64::new(1_704_067_200_000));
    let r = rtc(&host);
    cmos_write(&r, 0x0B, 0x06); // binary, 24 h
                                // The guest sets its clock to 1999-12-31 23:59:00.
    cmos_write(&r, 0x0B, 0x86);
    for (reg, v) in [
        (0x09, 99),
        (0x32, 19),
        (0x08, 12),
        (0x07, 31),
        (0x04, 23),
        (0x02, 59),
        (0x00, 0),
    ] {
        cmos_write(&r, reg, v);
    }
    cmos_write(&r, 0x0B, 0x06);
    cmos_write(&r, 0x01, 0xC0); // alarm: any second
    r.set_cmos_byte(0x34, 0xAB).unwrap();
    host.fetch_add(30_000, Ordering::Relaxed);
    assert_eq!(cmos(&r, 0x00), 30);
    let state = r.save_state();
    let bytes = state.to_bytes();

    // Restored 45 s of host time later, on a host whose clock agrees.
    let host2 = Arc::new(AtomicU64::new(host.load(Ordering::Relaxed) + 45_000));
    let t = rtc(&host2);
    t.restore_state(&RtcState::from_bytes(&bytes).unwrap())
        .unwrap();
    assert_eq!(cmos(&t, 0x00), 15, "23:59:30 + 45 s = 00:00:15");
    assert_eq!(cmos(&t, 0x02), 0);
    assert_eq!(cmos(&t, 0x04), 0);
    assert_eq!((cmos(&t, 0x07), cmos(&t, 0x08), cmos(&t, 0x09)), (1, 1, 0));
    assert_eq!(cmos(&t, 0x32), 20);
    assert_eq!(cmos(&t, 0x0B), 0x06);
    assert_eq!(cmos(&t, 0x01), 0xC0);
    assert_eq!(t.cmos_byte(0x34).unwrap(), 0xAB);
    // Register C: time passed since the last read (UF) is still seen.
    assert_eq!(cmos(&t, 0x0C) & 0x10, 0x10);
    assert_eq!(cmos(&t, 0x0C) & 0x10, 0, "read again at once: no update");
    host2.fetch_add(1_000, Ordering::Relaxed);
    assert_eq!(cmos(&t, 0x00), 16, "and it keeps counting");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any register traffic: with the host clock unchanged, the restored
    /// RTC saves the same state and reads the same registers.
    #[test]
    fn rtc_round_trip(ops in proptest::collection::vec((0u8..0x80, any::<u8>(), any::<bool>()), 0..40),
                      start in 0u64..4_000_000_000_000) {
        let host = Arc::new(AtomicU64::new(start));
        let r = rtc(&host);
        for (reg, v, write) in ops {
            if write { cmos_write(&r, reg, v); } else { cmos(&r, reg); }
        }
        let state = r.save_state();
        let t = rtc(&host);
        t.restore_state(&RtcState::from_bytes(&state.to_bytes()).unwrap()).unwrap();
        prop_assert_eq!(t.save_state(), state.clone());
        for reg in 0u8..0x80 {
            prop_assert_eq!(cmos(&t, reg), cmos(&r, reg), "register {:#x}", reg);
        }
        // The index register was read through above; restore the original
        // and compare once more.
        let mut again = state;
        again.index = 0x0C;
        r.restore_state(&again).unwrap();
        t.restore_state(&again).unwrap();
        prop_assert_eq!(t.save_state(), r.save_state());
    }
}

#[test]
fn rtc_corrupt_state_is_refused() {
    let host = Arc::new(AtomicU64::new(1_000_000));
    let r = rtc(&host);
    let state = r.save_state();
    let bytes = state.to_bytes();
    assert_eq!(bytes.len(), 4 + 1 + 1 + 1 + 128 + 32);
    for n in 0..bytes.len() {
        assert!(RtcState::from_bytes(&bytes[..n]).is_err(), "prefix {n}");
    }
    let bad = |f: &dyn Fn(&mut RtcState), field: &str| {
        let mut s = state.clone();
        f(&mut s);
        match RtcState::from_bytes(&s.to_bytes()) {
            Err(StateError::Invalid { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
        let t = rtc(&host);
        t.set_cmos_byte(0x40, 7).unwrap();
        assert!(t.restore_state(&s).is_err());
        assert_eq!(t.cmos_byte(0x40).unwrap(), 7, "left unchanged");
    };
    bad(&|s| s.index = 0x80, "index");
    bad(&|s| s.ram[0x0A] |= 0x80, "ram");
    bad(&|s| s.ram[0x0C] = 1, "ram");
    bad(&|s| s.ram[0x0D] = 0x80, "ram");
    bad(&|s| s.offset_nanos = i128::MAX, "offset_nanos");
    bad(&|s| s.since_c_read_nanos = i128::MIN, "since_c_read_nanos");
    let mut b = bytes.clone();
    b[6] = 2; // nmi_masked
    assert!(RtcState::from_bytes(&b).is_err());
    b = bytes.clone();
    b[4] = 9;
    assert!(matches!(
        RtcState::from_bytes(&b),
        Err(StateError::Version { found: 9, .. })
    ));
}
