//! Device state for snapshots: save → restore → save is the identity for
//! the UART, PCI configuration space, MSI-X and the root complex, restored
//! devices behave as the originals, and corrupt state bytes are refused.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use proptest::prelude::*;
use vmkit_devices::pci::{
    BarKind, ConfigSpace, ConfigSpaceState, IntxPin, Msix, MsixLayout, MsixState, PciHeader,
    PciRootState,
};
use vmkit_devices::{
    BusDevice, InterruptLine, IoBus, MsiEvent, MsiMessage, MsiVectors, PciRoot, PciWindows,
    RecordingLine, RecordingMsiVectors, Serial, SerialState, StateError,
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
