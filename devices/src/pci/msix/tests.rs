use super::*;
use crate::interrupt::{InterruptError, MsiEvent, RecordingMsiVectors};
use crate::pci::config::PciHeader;
use proptest::prelude::*;

const LAYOUT: MsixLayout = MsixLayout {
    table_bar: 1,
    table_offset: 0,
    pba_bar: 1,
    pba_offset: 0x800,
};

fn setup(vectors: u16) -> (Arc<RecordingMsiVectors>, Msix) {
    let sink = Arc::new(RecordingMsiVectors::new(vectors));
    let msix = Msix::new(sink.clone(), vectors, LAYOUT).unwrap();
    (sink, msix)
}

fn write32(msix: &Msix, offset: u64, value: u32) {
    msix.table_write(offset, &value.to_le_bytes());
}

fn read32(msix: &Msix, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    msix.table_read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Programs vector `v` with address `0xFEE0_0000 | v << 12` and data
/// `0x30 + v`, leaving the mask bit as it is.
fn program(msix: &Msix, v: u16) -> MsiMessage {
    let base = u64::from(v) * 16;
    let msg = MsiMessage::new(0xFEE0_0000 | u64::from(v) << 12, 0x30 + u32::from(v));
    write32(msix, base, msg.address as u32);
    write32(msix, base + 4, 0);
    write32(msix, base + 8, msg.data);
    msg
}

fn set_mask(msix: &Msix, v: u16, masked: bool) {
    write32(msix, u64::from(v) * 16 + 12, u32::from(masked));
}

fn pba(msix: &Msix) -> u64 {
    let mut b = [0u8; 8];
    msix.pba_read(0, &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn capability_layout_and_control() {
    let (_sink, msix) = setup(20);
    let mut config = ConfigSpace::new(&PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        revision: 1,
        class_code: (2, 0, 0),
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        interrupt_pin: None,
    });
    let cap = msix.add_capability(&mut config).unwrap();
    assert_eq!(cap, 0x40);
    assert_eq!(config.read_u8(0x34), 0x40);
    assert_eq!(config.read_u16(cap), 0x0011);
    assert_eq!(config.read_u16(cap + 2), 19);
    assert_eq!(config.read_u32(cap + 4), 0x0000_0001);
    assert_eq!(config.read_u32(cap + 8), 0x0000_0801);
    // Only Enable and Function Mask are writable.
    config.write_u32(cap, 0xFFFF_FFFF);
    config.write_u32(cap + 4, 0xFFFF_FFFF);
    assert_eq!(config.read_u16(cap + 2), 0xC000 | 19);
    assert_eq!(config.read_u32(cap + 4), 1);
    msix.config_written(&config, cap);
    assert!(msix.enabled() && msix.function_masked());
    assert_eq!(msix.control(), 0xC000 | 19);
    config.write_u16(cap + 2, 0x8000);
    msix.config_written(&config, cap);
    assert!(msix.enabled() && !msix.function_masked());
    assert_eq!(msix.table_size(), 320);
    assert_eq!(msix.pba_size(), 8);
    assert_eq!(msix.vectors(), 20);
    assert_eq!(msix.layout(), LAYOUT);
    assert!(format!("{msix:?}").contains("Msix"));
}

#[test]
fn entries_start_masked() {
    let (sink, msix) = setup(4);
    for v in 0..4 {
        assert_eq!(read32(&msix, u64::from(v) * 16 + 12), 1);
        assert_eq!(msix.vector_masked(v), Some(true));
    }
    assert_eq!(msix.vector_masked(4), None);
    msix.set_control(MSIX_CONTROL_ENABLE);
    assert!(sink.take_events().is_empty());
    msix.notify(2).unwrap();
    assert!(sink.take_events().is_empty());
    assert!(msix.pending(2));
    assert_eq!(pba(&msix), 0b100);
}

#[test]
fn unmask_mask_and_pending_delivery() {
    let (sink, msix) = setup(4);
    let msg = program(&msix, 1);
    msix.set_control(MSIX_CONTROL_ENABLE);
    assert!(sink.take_events().is_empty(), "still masked");
    set_mask(&msix, 1, false);
    assert_eq!(sink.take_events(), vec![MsiEvent::Set(1, Some(msg))]);
    msix.notify(1).unwrap();
    assert_eq!(sink.take_events(), vec![MsiEvent::Fired(1, Some(msg))]);
    // Unmasking an unmasked vector again changes nothing.
    set_mask(&msix, 1, false);
    assert!(sink.take_events().is_empty());

    set_mask(&msix, 1, true);
    assert_eq!(sink.take_events(), vec![MsiEvent::Set(1, None)]);
    msix.notify(1).unwrap();
    msix.notify(1).unwrap();
    assert!(sink.take_events().is_empty());
    assert!(msix.pending(1));
    assert_eq!(pba(&msix), 0b10);
    set_mask(&msix, 1, false);
    assert_eq!(
        sink.take_events(),
        vec![MsiEvent::Set(1, Some(msg)), MsiEvent::Fired(1, Some(msg))]
    );
    assert!(!msix.pending(1));
    assert_eq!(pba(&msix), 0);
}

#[test]
fn function_mask_and_enable() {
    let (sink, msix) = setup(3);
    let m0 = program(&msix, 0);
    let m2 = program(&msix, 2);
    set_mask(&msix, 0, false);
    set_mask(&msix, 2, false);
    assert!(sink.take_events().is_empty(), "MSI-X disabled");
    msix.notify(0).unwrap();
    assert!(msix.pending(0), "not deliverable while disabled");
    msix.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    assert!(sink.take_events().is_empty(), "function masked");
    msix.set_control(MSIX_CONTROL_ENABLE);
    assert_eq!(
        sink.take_events(),
        vec![
            MsiEvent::Set(0, Some(m0)),
            MsiEvent::Fired(0, Some(m0)),
            MsiEvent::Set(2, Some(m2)),
        ]
    );
    // The same control word again: nothing to do.
    msix.set_control(MSIX_CONTROL_ENABLE | 19);
    assert!(sink.take_events().is_empty());
    msix.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    assert_eq!(
        sink.take_events(),
        vec![MsiEvent::Set(0, None), MsiEvent::Set(2, None)]
    );
    msix.notify(2).unwrap();
    assert!(msix.pending(2));
    msix.set_control(0);
    assert!(sink.take_events().is_empty(), "already withdrawn");
    msix.set_control(MSIX_CONTROL_ENABLE);
    assert_eq!(
        sink.take_events(),
        vec![
            MsiEvent::Set(0, Some(m0)),
            MsiEvent::Set(2, Some(m2)),
            MsiEvent::Fired(2, Some(m2)),
        ]
    );
}

#[test]
fn rewriting_a_deliverable_vector_reprograms_it() {
    let (sink, msix) = setup(2);
    let msg = program(&msix, 0);
    msix.set_control(MSIX_CONTROL_ENABLE);
    set_mask(&msix, 0, false);
    sink.take_events();
    write32(&msix, 8, 0x41);
    let new = MsiMessage::new(msg.address, 0x41);
    assert_eq!(sink.take_events(), vec![MsiEvent::Set(0, Some(new))]);
    write32(&msix, 8, 0x41);
    assert!(
        sink.take_events().is_empty(),
        "same value: no reprogramming"
    );
    // An 8-byte write of address low and high.
    msix.table_write(0, &0x0000_0001_FEE0_1000u64.to_le_bytes());
    let high = MsiMessage::new(0x1_FEE0_1000, 0x41);
    assert_eq!(sink.take_events(), vec![MsiEvent::Set(0, Some(high))]);
    let mut q = [0u8; 8];
    msix.table_read(0, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0x1_FEE0_1000);
    // An 8-byte write of data and vector control masks it.
    msix.table_write(8, &(1u64 << 32 | 0x42).to_le_bytes());
    assert_eq!(sink.take_events(), vec![MsiEvent::Set(0, None)]);
    assert_eq!(read32(&msix, 8), 0x42);
    // Address bits 1:0 and reserved vector control bits read as zero.
    write32(&msix, 16, 0xFEE0_0003);
    write32(&msix, 28, 0xFFFF_FFFE);
    assert_eq!(read32(&msix, 16), 0xFEE0_0000);
    assert_eq!(read32(&msix, 28), 0);
}

#[test]
fn bad_table_and_pba_accesses() {
    let (sink, msix) = setup(2);
    program(&msix, 0);
    let before: Vec<u32> = (0..8).map(|i| read32(&msix, i * 4)).collect();
    let mut w = [0u8; 2];
    let mut d = [0u8; 4];
    let mut q = [0u8; 8];
    let mut b = [0u8; 1];
    let mut big = [0u8; 16];
    msix.table_read(0, &mut w);
    msix.table_read(0, &mut b);
    msix.table_read(2, &mut d);
    msix.table_read(4, &mut q);
    msix.table_read(0, &mut big);
    msix.table_read(32, &mut d);
    msix.table_read(u64::MAX - 3, &mut d);
    for buf in [&w[..], &b, &d, &q, &big] {
        assert!(buf.iter().all(|&x| x == 0xFF));
    }
    msix.table_write(0, &[0; 2]);
    msix.table_write(12, &[0]);
    msix.table_write(2, &[0; 4]);
    msix.table_write(12, &[0; 8]);
    msix.table_write(32, &[0; 4]);
    msix.table_write(u64::MAX - 7, &[0; 8]);
    msix.table_write(0, &[]);
    let after: Vec<u32> = (0..8).map(|i| read32(&msix, i * 4)).collect();
    assert_eq!(before, after);
    assert!(sink.take_events().is_empty());
    // PBA: aligned 4/8-byte reads inside it only.
    msix.notify(1).unwrap();
    msix.pba_read(0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0b10);
    msix.pba_read(4, &mut d);
    assert_eq!(d, [0; 4]);
    for (offset, buf) in [(2u64, &mut d[..]), (0, &mut w[..]), (8, &mut q[..])] {
        msix.pba_read(offset, buf);
        assert!(buf.iter().all(|&x| x == 0xFF), "offset {offset}");
    }
    msix.pba_read(4, &mut q);
    assert_eq!(q, [0xFF; 8]);
}

#[test]
fn pba_beyond_64_vectors() {
    let sink = Arc::new(RecordingMsiVectors::new(MSIX_MAX_VECTORS));
    let layout = MsixLayout {
        pba_offset: 0x8000,
        ..LAYOUT
    };
    let msix = Msix::new(sink, MSIX_MAX_VECTORS, layout).unwrap();
    assert_eq!(msix.pba_size(), 256);
    msix.notify(2047).unwrap();
    msix.notify(64).unwrap();
    let mut d = [0u8; 4];
    msix.pba_read(252, &mut d);
    assert_eq!(u32::from_le_bytes(d), 1 << 31);
    let mut q = [0u8; 8];
    msix.pba_read(8, &mut q);
    assert_eq!(u64::from_le_bytes(q), 1);
    msix.pba_read(256, &mut d);
    assert_eq!(d, [0xFF; 4]);
    assert_eq!(read32(&msix, 2047 * 16 + 12), 1);
    msix.table_read(2048 * 16, &mut d);
    assert_eq!(d, [0xFF; 4]);
}

#[test]
fn vector_out_of_range_and_construction_errors() {
    let (_sink, msix) = setup(4);
    let err = msix.notify(4).unwrap_err();
    assert!(
        matches!(
            err,
            PciError::VectorOutOfRange {
                vector: 4,
                count: 4
            }
        ),
        "{err}"
    );
    assert!(msix.notify(u16::MAX).is_err());
    assert!(!msix.pending(u16::MAX));

    let sink = Arc::new(RecordingMsiVectors::new(4));
    let new = |n, layout| Msix::new(sink.clone(), n, layout);
    assert!(matches!(
        new(0, LAYOUT),
        Err(PciError::MsixVectorCount { .. })
    ));
    assert!(new(5, LAYOUT).is_err(), "more than the sink has");
    let big = Arc::new(RecordingMsiVectors::new(u16::MAX));
    assert!(Msix::new(big, 2049, LAYOUT).is_err());
    let bad_bar = MsixLayout {
        table_bar: 6,
        ..LAYOUT
    };
    assert!(matches!(
        new(4, bad_bar),
        Err(PciError::MsixLayout {
            structure: "table",
            ..
        })
    ));
    let misaligned = MsixLayout {
        pba_offset: 0x804,
        ..LAYOUT
    };
    assert!(new(4, misaligned).is_err());
    let overlap = MsixLayout {
        pba_offset: 0x38,
        ..LAYOUT
    };
    let err = new(4, overlap).unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
    let other_bar = MsixLayout {
        pba_bar: 2,
        pba_offset: 0,
        ..LAYOUT
    };
    assert!(new(4, other_bar).is_ok());
    assert!(new(4, LAYOUT).is_ok());
}

#[test]
fn sink_failures_are_reported_not_fatal() {
    struct Failing;
    impl MsiVectors for Failing {
        fn count(&self) -> u16 {
            1
        }
        fn set_message(&self, _: u16, _: Option<MsiMessage>) -> Result<(), InterruptError> {
            Err(InterruptError::Other("route table full".into()))
        }
        fn trigger(&self, _: u16) -> Result<(), InterruptError> {
            Err(InterruptError::Other("eventfd closed".into()))
        }
    }
    let msix = Msix::new(Arc::new(Failing), 1, LAYOUT).unwrap();
    msix.notify(0).unwrap();
    msix.set_control(MSIX_CONTROL_ENABLE);
    set_mask(&msix, 0, false);
    assert!(!msix.pending(0), "the pending message was attempted");
    let err = msix.notify(0).unwrap_err();
    assert!(err.to_string().contains("eventfd closed"), "{err}");
}

#[derive(Debug, Clone)]
enum Op {
    Control(bool, bool),
    Mask(u16, bool),
    Data(u16, u32),
    Notify(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<bool>(), any::<bool>()).prop_map(|(e, m)| Op::Control(e, m)),
        (0u16..5, any::<bool>()).prop_map(|(v, m)| Op::Mask(v, m)),
        (0u16..5, 0u32..4).prop_map(|(v, d)| Op::Data(v, d)),
        (0u16..6).prop_map(Op::Notify),
    ]
}

proptest! {
    /// The sink holds a message exactly for the deliverable vectors, a
    /// deliverable vector is never pending, and every notification is
    /// either fired or pending.
    #[test]
    fn sink_follows_deliverability(ops in proptest::collection::vec(op(), 1..80)) {
        let (sink, msix) = setup(5);
        let mut fired_or_pending = [false; 5];
        for op in ops {
            match op {
                Op::Control(e, m) => msix.set_control(
                    if e { MSIX_CONTROL_ENABLE } else { 0 }
                        | if m { MSIX_CONTROL_FUNCTION_MASK } else { 0 },
                ),
                Op::Mask(v, m) => set_mask(&msix, v, m),
                Op::Data(v, d) => write32(&msix, u64::from(v) * 16 + 8, d),
                Op::Notify(v) => {
                    let r = msix.notify(v);
                    prop_assert_eq!(r.is_ok(), v < 5);
                    if let Some(f) = fired_or_pending.get_mut(usize::from(v)) {
                        *f = true;
                    }
                }
            }
            let mut last_set: Vec<Option<MsiEvent>> = vec![None; 5];
            for event in sink.take_events() {
                match event {
                    MsiEvent::Set(i, _) => last_set[usize::from(i)] = Some(event),
                    MsiEvent::Fired(i, m) => {
                        prop_assert!(m.is_some(), "fired without a message");
                        fired_or_pending[usize::from(i)] = false;
                    }
                }
            }
            for v in 0..5u16 {
                let deliverable = msix.enabled()
                    && !msix.function_masked()
                    && msix.vector_masked(v) == Some(false);
                let mut entry = [0u8; 16];
                msix.table_read(u64::from(v) * 16, &mut entry[..8]);
                msix.table_read(u64::from(v) * 16 + 8, &mut entry[8..]);
                let data = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
                let expected = deliverable.then(|| MsiMessage::new(0, data));
                prop_assert_eq!(sink.message(v), expected);
                if deliverable {
                    prop_assert!(!msix.pending(v));
                }
                if fired_or_pending[usize::from(v)] {
                    prop_assert!(msix.pending(v));
                }
            }
        }
    }
}
