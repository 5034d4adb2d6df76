use super::*;
use proptest::prelude::*;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

/// Reads back `[id, offset as u8, offset as u8, ...]`; writes are recorded.
#[derive(Debug, Default)]
struct Probe {
    id: u8,
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Probe {
    fn new(id: u8) -> Arc<Self> {
        Arc::new(Self {
            id,
            writes: Mutex::new(Vec::new()),
        })
    }
}

impl BusDevice for Probe {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(offset as u8);
        data[0] = self.id;
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        self.writes.lock().unwrap().push((offset, data.to_vec()));
        Ok(IoAction::Continue)
    }
}

/// Fails every access.
struct Broken;

impl BusDevice for Broken {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        Err(DeviceError::InvalidAccess {
            offset,
            len: data.len(),
        })
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> Result<IoAction, DeviceError> {
        Err(std::io::Error::other("backend gone").into())
    }
}

fn id_at(bus: &Bus, addr: u64) -> Option<u8> {
    let mut b = [0u8; 1];
    bus.read(addr, &mut b).ok().map(|()| b[0])
}

#[test]
fn range_helpers() {
    let r = BusRange {
        base: 0x10,
        len: 0x10,
    };
    assert_eq!(r.last(), 0x1f);
    assert!(r.contains(0x10) && r.contains(0x1f));
    assert!(!r.contains(0xf) && !r.contains(0x20));
    let top = BusRange {
        base: u64::MAX,
        len: 1,
    };
    assert_eq!(top.last(), u64::MAX);
    assert!(top.contains(u64::MAX));
    // 1..=u64::MAX holds exactly u64::MAX addresses; one more overflows.
    assert_eq!(BusRange::new(1, u64::MAX).map(|r| r.last()), Some(u64::MAX));
    assert!(BusRange::new(2, u64::MAX).is_none());
    assert!(BusRange::new(u64::MAX, 2).is_none());
    assert!(BusRange::new(5, 0).is_none());
    assert!(r.overlaps(&BusRange { base: 0x1f, len: 1 }));
    assert!(!r.overlaps(&BusRange { base: 0x20, len: 1 }));
    assert!(!r.overlaps(&BusRange { base: 0x10, len: 0 }));
    assert_eq!(r.to_string(), "[0x10..=0x1f]");
}

#[test]
fn insert_lookup_remove() {
    let bus = Bus::new(AddressSpace::Mmio);
    bus.insert(0x1000, 0x100, Probe::new(1)).unwrap();
    bus.insert(0x2000, 0x10, Probe::new(2)).unwrap();
    assert_eq!(id_at(&bus, 0x1000), Some(1));
    assert_eq!(id_at(&bus, 0x10ff), Some(1));
    assert_eq!(id_at(&bus, 0x1100), None);
    assert_eq!(id_at(&bus, 0x200f), Some(2));
    let (range, _) = bus.lookup(0x1050).unwrap();
    assert_eq!(
        range,
        BusRange {
            base: 0x1000,
            len: 0x100
        }
    );
    assert!(bus.lookup(0xfff).is_none());
    assert_eq!(
        bus.ranges(),
        vec![
            BusRange {
                base: 0x1000,
                len: 0x100
            },
            BusRange {
                base: 0x2000,
                len: 0x10
            }
        ]
    );
    // remove is by exact base only
    assert!(matches!(
        bus.remove(0x1001),
        Err(BusError::NotRegistered { base: 0x1001, .. })
    ));
    bus.remove(0x1000).unwrap();
    assert!(bus.lookup(0x1000).is_none());
    assert!(bus.remove(0x1000).is_err());
    assert_eq!(bus.ranges().len(), 1);
}

#[test]
fn read_passes_relative_offset_and_write_reaches_device() {
    let bus = Bus::new(AddressSpace::Pio);
    let probe = Probe::new(7);
    bus.insert(0x3f8, 8, probe.clone()).unwrap();
    let mut buf = [0u8; 2];
    bus.read(0x3fb, &mut buf).unwrap();
    assert_eq!(buf, [7, 3]);
    assert_eq!(bus.write(0x3fd, &[0xaa]).unwrap(), IoAction::Continue);
    assert_eq!(*probe.writes.lock().unwrap(), vec![(5, vec![0xaa])]);
}

#[test]
fn overlapping_insert_refused_and_names_both_ranges() {
    let bus = Bus::new(AddressSpace::Mmio);
    bus.insert(0x100, 0x100, Probe::new(1)).unwrap();
    for (base, len) in [(0x80, 0x81), (0x1ff, 1), (0x150, 4), (0x0, 0x1000)] {
        let err = bus.insert(base, len, Probe::new(2)).unwrap_err();
        match &err {
            BusError::Overlap { new, existing, .. } => {
                assert_eq!(*new, BusRange { base, len });
                assert_eq!(
                    *existing,
                    BusRange {
                        base: 0x100,
                        len: 0x100
                    }
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("0x100..=0x1ff"), "{msg}");
        assert!(msg.contains(&format!("{base:#x}")), "{msg}");
    }
    // adjacent ranges on both sides are fine
    bus.insert(0xff, 1, Probe::new(3)).unwrap();
    bus.insert(0x200, 1, Probe::new(4)).unwrap();
    assert_eq!(id_at(&bus, 0xff), Some(3));
    assert_eq!(id_at(&bus, 0x200), Some(4));
    assert_eq!(bus.ranges().len(), 3);
}

#[test]
fn zero_length_refused() {
    let bus = Bus::new(AddressSpace::Mmio);
    assert!(matches!(
        bus.insert(0x10, 0, Probe::new(1)),
        Err(BusError::ZeroLength { base: 0x10, .. })
    ));
    assert!(bus.ranges().is_empty());
}

#[test]
fn mmio_range_at_top_of_address_space() {
    let bus = Bus::new(AddressSpace::Mmio);
    // base + len == 2^64 exactly
    bus.insert(u64::MAX - 0xfff, 0x1000, Probe::new(1)).unwrap();
    assert_eq!(id_at(&bus, u64::MAX), Some(1));
    let mut buf = [0u8; 8];
    bus.read(u64::MAX - 7, &mut buf).unwrap();
    // One byte past 2^64 is refused.
    assert!(matches!(
        bus.insert(u64::MAX - 0xfff, 0x1001, Probe::new(2)),
        Err(BusError::OutOfAddressSpace { .. })
    ));
    // An access running off the top of the space is out of range, not a panic.
    assert!(matches!(
        bus.read(u64::MAX - 3, &mut buf),
        Err(BusError::AccessOutOfRange { .. })
    ));
    // The whole space as one range.
    let whole = Bus::new(AddressSpace::Mmio);
    whole.insert(0, u64::MAX, Probe::new(3)).unwrap();
    assert!(whole.insert(u64::MAX, 1, Probe::new(4)).is_ok());
    assert!(whole.insert(5, 1, Probe::new(4)).is_err());
}

#[test]
fn pio_address_space_limit() {
    let bus = Bus::new(AddressSpace::Pio);
    bus.insert(0xfff0, 0x10, Probe::new(1)).unwrap();
    assert!(matches!(
        bus.insert(0xfff0, 0x11, Probe::new(1)),
        Err(BusError::OutOfAddressSpace { max: 0xffff, .. })
    ));
    assert!(matches!(
        bus.insert(0x10000, 1, Probe::new(1)),
        Err(BusError::OutOfAddressSpace { .. })
    ));
    assert!(matches!(
        bus.insert(0xffff, 2, Probe::new(1)),
        Err(BusError::OutOfAddressSpace { .. })
    ));
    assert_eq!(bus.ranges().len(), 1);
    // Addresses above the PIO space simply hit nothing.
    assert!(matches!(
        bus.read(0x10000, &mut [0u8; 1]),
        Err(BusError::NoDevice { .. })
    ));
}

#[test]
fn access_straddling_range_end_is_refused() {
    let bus = Bus::new(AddressSpace::Pio);
    let probe = Probe::new(1);
    bus.insert(0x60, 4, probe.clone()).unwrap();
    bus.insert(0x64, 4, Probe::new(2)).unwrap();
    let mut buf = [0u8; 4];
    bus.read(0x60, &mut buf).unwrap();
    let err = bus.read(0x61, &mut buf).unwrap_err();
    assert!(
        matches!(err, BusError::AccessOutOfRange { addr: 0x61, len: 4, range, .. }
            if range == BusRange { base: 0x60, len: 4 })
    );
    assert!(matches!(
        bus.write(0x63, &[1, 2]),
        Err(BusError::AccessOutOfRange { .. })
    ));
    assert!(probe.writes.lock().unwrap().is_empty());
    assert!(matches!(
        bus.read(0x60, &mut []),
        Err(BusError::EmptyAccess { addr: 0x60, .. })
    ));
}

#[test]
fn device_errors_are_wrapped_with_context() {
    let bus = Bus::new(AddressSpace::Mmio);
    bus.insert(0xd000_0000, 0x1000, Arc::new(Broken)).unwrap();
    let err = bus.read(0xd000_0010, &mut [0u8; 4]).unwrap_err();
    match &err {
        BusError::Device {
            addr,
            len,
            kind,
            range,
            source: DeviceError::InvalidAccess { offset, .. },
            ..
        } => {
            assert_eq!(
                (*addr, *len, *kind, *offset),
                (0xd000_0010, 4, "read", 0x10)
            );
            assert_eq!(range.base, 0xd000_0000);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = bus.write(0xd000_0000, &[1]).unwrap_err().to_string();
    assert!(
        msg.contains("write") && msg.contains("backend gone"),
        "{msg}"
    );
}

/// A device that, when written, registers a new device on its own bus (like
/// a PCI BAR move) and removes itself.
struct Mover {
    bus: std::sync::Weak<Bus>,
    base: u64,
}

impl BusDevice for Mover {
    fn read(&self, _offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }
    fn write(&self, _offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        let bus = self
            .bus
            .upgrade()
            .ok_or_else(|| DeviceError::Other("bus gone".into()))?;
        let new_base = u64::from(data[0]) << 8;
        bus.insert(new_base, 0x10, Probe::new(data[0]))
            .map_err(|e| DeviceError::Other(e.to_string()))?;
        // It must also be able to look itself up and remove itself.
        if bus.lookup(self.base).is_some() {
            bus.remove(self.base)
                .map_err(|e| DeviceError::Other(e.to_string()))?;
        }
        Ok(IoAction::Continue)
    }
}

#[test]
fn device_can_modify_its_bus_from_inside_write() {
    let bus = Arc::new(Bus::new(AddressSpace::Mmio));
    let mover = Arc::new(Mover {
        bus: Arc::downgrade(&bus),
        base: 0x100,
    });
    bus.insert(0x100, 0x10, mover).unwrap();
    let (tx, rx) = mpsc::channel();
    let bus2 = Arc::clone(&bus);
    std::thread::spawn(move || {
        let res = bus2.write(0x104, &[0x42]);
        let _ = tx.send(res.map_err(|e| e.to_string()));
    });
    let res = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("bus deadlocked when a device modified it from inside write");
    assert_eq!(res, Ok(IoAction::Continue));
    assert_eq!(id_at(&bus, 0x4200), Some(0x42));
    assert!(bus.lookup(0x100).is_none());
}

#[test]
fn poisoned_lock_is_recovered() {
    let bus = Arc::new(Bus::new(AddressSpace::Pio));
    bus.insert(0x10, 1, Probe::new(1)).unwrap();
    let b2 = Arc::clone(&bus);
    let joined = std::thread::spawn(move || {
        let _guard = b2.devices.write().unwrap();
        panic!("poison the bus lock");
    })
    .join();
    assert!(joined.is_err());
    assert!(bus.devices.is_poisoned());
    assert_eq!(id_at(&bus, 0x10), Some(1));
    bus.insert(0x20, 1, Probe::new(2)).unwrap();
    assert_eq!(id_at(&bus, 0x20), Some(2));
    bus.remove(0x10).unwrap();
    assert_eq!(bus.ranges(), vec![BusRange { base: 0x20, len: 1 }]);
    assert!(format!("{bus:?}").contains("0x20") || format!("{bus:?}").contains("32"));
}

#[test]
fn iobus_misses_read_all_ones_and_are_counted_per_kind() {
    let io = IoBus::default();
    let mut buf = [0u8; 4];
    io.pio_read(0x80, &mut buf);
    assert_eq!(buf, [0xff; 4]);
    assert_eq!(io.pio_write(0x80, &[1]), IoAction::Continue);
    assert_eq!(io.pio_write(0x81, &[1]), IoAction::Continue);
    let mut buf = [0u8; 8];
    io.mmio_read(0xfee0_0000, &mut buf);
    assert_eq!(buf, [0xff; 8]);
    io.mmio_read(0, &mut buf);
    io.mmio_read(u64::MAX, &mut buf);
    io.mmio_write(0x1000, &[0; 4]);
    assert_eq!(
        io.stats(),
        IoBusStats {
            pio_read_misses: 1,
            pio_write_misses: 2,
            mmio_read_misses: 3,
            mmio_write_misses: 1,
            device_errors: 0,
        }
    );
}

#[test]
fn iobus_hits_reach_devices_and_straddles_count_as_misses() {
    let io = IoBus::new();
    let probe = Probe::new(9);
    io.pio.insert(0x70, 2, probe.clone()).unwrap();
    io.mmio.insert(0x1000, 0x10, Probe::new(3)).unwrap();
    let mut b = [0u8; 2];
    io.pio_read(0x70, &mut b);
    assert_eq!(b, [9, 0]);
    io.pio_write(0x71, &[5]);
    assert_eq!(*probe.writes.lock().unwrap(), vec![(1, vec![5])]);
    let mut w = [0u8; 4];
    io.mmio_read(0x100c, &mut w);
    assert_eq!(w, [3, 0xc, 0xc, 0xc]);
    io.mmio_read(0x100d, &mut w);
    assert_eq!(w, [0xff; 4]);
    io.pio_write(0x71, &[1, 2]);
    let s = io.stats();
    assert_eq!(s.mmio_read_misses, 1);
    assert_eq!(s.pio_write_misses, 1);
    assert_eq!(s.device_errors, 0);
    assert_eq!(probe.writes.lock().unwrap().len(), 1);
}

#[test]
fn iobus_device_errors_are_counted_and_dropped() {
    let io = IoBus::new();
    io.pio.insert(0x500, 4, Arc::new(Broken)).unwrap();
    io.mmio.insert(0x9000, 4, Arc::new(Broken)).unwrap();
    let mut b = [0u8; 2];
    io.pio_read(0x500, &mut b);
    assert_eq!(b, [0xff, 0xff]);
    assert_eq!(io.pio_write(0x501, &[1]), IoAction::Continue);
    let mut b = [0u8; 4];
    io.mmio_read(0x9000, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert_eq!(io.mmio_write(0x9000, &[1]), IoAction::Continue);
    let s = io.stats();
    assert_eq!(s.device_errors, 4);
    assert_eq!(
        (
            s.pio_read_misses,
            s.pio_write_misses,
            s.mmio_read_misses,
            s.mmio_write_misses
        ),
        (0, 0, 0, 0)
    );
}

#[test]
fn iobus_write_returns_device_action() {
    struct Stopper;
    impl BusDevice for Stopper {
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<IoAction, DeviceError> {
            Ok(IoAction::Stop(StopRequest::Reset))
        }
    }
    let io = IoBus::new();
    io.mmio.insert(0x10, 1, Arc::new(Stopper)).unwrap();
    io.pio.insert(0xcf9, 1, Arc::new(Stopper)).unwrap();
    assert_eq!(
        io.mmio_write(0x10, &[1]),
        IoAction::Stop(StopRequest::Reset)
    );
    assert_eq!(
        io.pio_write(0xcf9, &[6]),
        IoAction::Stop(StopRequest::Reset)
    );
}

// ---------------------------------------------------------------------------
// Model-based test: the bus against a naive Vec-of-ranges model.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    ZeroLength,
    OutOfAddressSpace,
    Overlap(BusRange),
    NotRegistered,
    NoDevice,
    EmptyAccess,
    AccessOutOfRange(BusRange),
    Other,
}

fn outcome(err: &BusError) -> Outcome {
    match err {
        BusError::ZeroLength { .. } => Outcome::ZeroLength,
        BusError::OutOfAddressSpace { .. } => Outcome::OutOfAddressSpace,
        BusError::Overlap { existing, .. } => Outcome::Overlap(*existing),
        BusError::NotRegistered { .. } => Outcome::NotRegistered,
        BusError::NoDevice { .. } => Outcome::NoDevice,
        BusError::EmptyAccess { .. } => Outcome::EmptyAccess,
        BusError::AccessOutOfRange { range, .. } => Outcome::AccessOutOfRange(*range),
        BusError::Device { .. } => Outcome::Other,
    }
}

#[derive(Debug, Default)]
struct Model {
    entries: Vec<(u64, u64, u8)>, // base, len, id
}

impl Model {
    fn find(&self, addr: u64) -> Option<(u64, u64, u8)> {
        self.entries
            .iter()
            .copied()
            .find(|&(b, l, _)| addr >= b && u128::from(addr) < u128::from(b) + u128::from(l))
    }

    fn insert(&mut self, space: AddressSpace, base: u64, len: u64, id: u8) -> Outcome {
        if len == 0 {
            return Outcome::ZeroLength;
        }
        let last = u128::from(base) + u128::from(len) - 1;
        if last > u128::from(space.max_addr()) {
            return Outcome::OutOfAddressSpace;
        }
        // The bus reports the overlapping range with the highest base.
        let clash = self
            .entries
            .iter()
            .filter(|&&(b, l, _)| {
                u128::from(b) <= last && u128::from(base) < u128::from(b) + u128::from(l)
            })
            .max_by_key(|&&(b, _, _)| b);
        if let Some(&(b, l, _)) = clash {
            return Outcome::Overlap(BusRange { base: b, len: l });
        }
        self.entries.push((base, len, id));
        Outcome::Ok
    }

    fn remove(&mut self, base: u64) -> Outcome {
        match self.entries.iter().position(|&(b, _, _)| b == base) {
            Some(i) => {
                self.entries.remove(i);
                Outcome::Ok
            }
            None => Outcome::NotRegistered,
        }
    }

    fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, Outcome> {
        if len == 0 {
            return Err(Outcome::EmptyAccess);
        }
        let (b, l, id) = self.find(addr).ok_or(Outcome::NoDevice)?;
        let off = addr - b;
        if u128::from(off) + len as u128 > u128::from(l) {
            return Err(Outcome::AccessOutOfRange(BusRange { base: b, len: l }));
        }
        let mut v = vec![off as u8; len];
        v[0] = id;
        Ok(v)
    }

    fn ranges(&self) -> Vec<BusRange> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|&(base, len, _)| BusRange { base, len })
            .collect();
        v.sort_by_key(|r| r.base);
        v
    }
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u64, u64),
    Remove(u64),
    Lookup(u64),
    Read(u64, usize),
}

/// Addresses clustered at the bottom of the space, just below the PIO limit
/// and at the top of the 64-bit space, so that ops collide often.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..48, 0xffe0u64..0x10010, (u64::MAX - 40)..=u64::MAX,]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..12,
        1 => Just(u64::MAX),
        1 => 0x10u64..0x40,
        1 => Just(1u64 << 63),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (addr(), length()).prop_map(|(b, l)| Op::Insert(b, l)),
        1 => addr().prop_map(Op::Remove),
        2 => addr().prop_map(Op::Lookup),
        3 => (addr(), 0usize..10).prop_map(|(a, l)| Op::Read(a, l)),
    ]
}

fn run_model(space: AddressSpace, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let bus = Bus::new(space);
    let mut model = Model::default();
    let mut next_id = 0u8;
    for op in ops {
        match op {
            Op::Insert(base, len) => {
                next_id = next_id.wrapping_add(1);
                let got = bus
                    .insert(base, len, Probe::new(next_id))
                    .err()
                    .map_or(Outcome::Ok, |e| outcome(&e));
                let want = model.insert(space, base, len, next_id);
                prop_assert_eq!(got, want, "insert({:#x}, {:#x})", base, len);
            }
            Op::Remove(base) => {
                let got = bus.remove(base).err().map_or(Outcome::Ok, |e| outcome(&e));
                prop_assert_eq!(got, model.remove(base), "remove({:#x})", base);
            }
            Op::Lookup(a) => {
                let got = bus.lookup(a).map(|(r, _)| r);
                let want = model.find(a).map(|(base, len, _)| BusRange { base, len });
                prop_assert_eq!(got, want, "lookup({:#x})", a);
            }
            Op::Read(a, len) => {
                let mut buf = vec![0u8; len];
                let got = bus.read(a, &mut buf).map(|()| buf).map_err(|e| outcome(&e));
                prop_assert_eq!(got, model.read(a, len), "read({:#x}, {})", a, len);
            }
        }
        prop_assert_eq!(bus.ranges(), model.ranges());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn bus_matches_model_mmio(ops in proptest::collection::vec(op(), 1..60)) {
        run_model(AddressSpace::Mmio, ops)?;
    }

    #[test]
    fn bus_matches_model_pio(ops in proptest::collection::vec(op(), 1..60)) {
        run_model(AddressSpace::Pio, ops)?;
    }
}

#[test]
fn relocate_moves_atomically_and_checks_overlaps() {
    let bus = Bus::new(AddressSpace::Mmio);
    bus.insert(0x1000, 0x100, Probe::new(1)).unwrap();
    bus.insert(0x2000, 0x100, Probe::new(2)).unwrap();
    // Onto itself, partially overlapping its own old range: allowed.
    bus.relocate(0x1000, 0x1080, 0x100).unwrap();
    assert_eq!(id_at(&bus, 0x1080), Some(1));
    assert_eq!(id_at(&bus, 0x1000), None);
    // Onto the other device: refused, nothing changes.
    let err = bus.relocate(0x1080, 0x1f80, 0x100).unwrap_err();
    assert!(matches!(err, BusError::Overlap { .. }), "{err}");
    assert_eq!(id_at(&bus, 0x1080), Some(1));
    // Past the other device, and across it.
    bus.relocate(0x1080, 0x3000, 0x10).unwrap();
    assert_eq!(id_at(&bus, 0x3000), Some(1));
    assert_eq!(id_at(&bus, 0x3010), None);
    assert!(bus.relocate(0x3000, 0x0, 0x4000).is_err());
    assert!(matches!(
        bus.relocate(0x5000, 0x0, 0x10),
        Err(BusError::NotRegistered { base: 0x5000, .. })
    ));
    assert!(matches!(
        bus.relocate(0x3000, 0x0, 0),
        Err(BusError::ZeroLength { .. })
    ));
    assert!(matches!(
        bus.relocate(0x3000, u64::MAX, 2),
        Err(BusError::OutOfAddressSpace { .. })
    ));
    let pio = Bus::new(AddressSpace::Pio);
    pio.insert(0x10, 4, Probe::new(3)).unwrap();
    assert!(pio.relocate(0x10, 0xfffe, 4).is_err());
    pio.relocate(0x10, 0xfffc, 4).unwrap();
    assert_eq!(
        pio.ranges(),
        vec![BusRange {
            base: 0xfffc,
            len: 4
        }]
    );
}
