use super::*;
use crate::pci::config::{ConfigSpace, IntxPin, PciHeader};
use std::sync::Mutex;

const ECAM_BASE: u64 = 0xB000_0000;
const IO_WINDOW: (u64, u64) = (0xC000, 0x1000);
const MEM32_WINDOW: (u64, u64) = (0xE000_0000, 0x1000_0000);
const MEM64_WINDOW: (u64, u64) = (0x1_0000_0000, 0x1_0000_0000);
const MEM64: BarKind = BarKind::Memory64 {
    prefetchable: false,
};

/// A recorded BAR access: kind, BAR index, offset, data.
type Access = (&'static str, u8, u64, Vec<u8>);

/// A function with an I/O BAR 0 (32 bytes) and a 64-bit BAR 2 (16 KiB)
/// that records BAR accesses.
#[derive(Debug)]
struct TestDev {
    config: Mutex<ConfigSpace>,
    accesses: Mutex<Vec<Access>>,
}

impl TestDev {
    fn new(device_id: u16) -> Arc<Self> {
        let mut config = ConfigSpace::new(&PciHeader {
            vendor_id: 0x1234,
            device_id,
            revision: 0,
            class_code: (0xFF, 0, 0),
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            interrupt_pin: Some(IntxPin::A),
        });
        config.add_bar(0, BarKind::Io, 32).unwrap();
        config.add_bar(2, MEM64, 0x4000).unwrap();
        Arc::new(Self {
            config: Mutex::new(config),
            accesses: Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> Vec<Access> {
        std::mem::take(&mut *self.accesses.lock().unwrap())
    }
}

impl PciDevice for TestDev {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.config.lock().unwrap().read(offset, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        self.config.lock().unwrap().write(offset, data);
    }
    fn bars(&self) -> Vec<Bar> {
        self.config.lock().unwrap().bars()
    }
    fn command(&self) -> u16 {
        self.config.lock().unwrap().command()
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0xA0 | bar);
        self.accesses
            .lock()
            .unwrap()
            .push(("read", bar, offset, data.to_vec()));
        Ok(())
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        self.accesses
            .lock()
            .unwrap()
            .push(("write", bar, offset, data.to_vec()));
        Ok(IoAction::Continue)
    }
}

/// Reads back the offset's low byte; for checking what decodes where.
struct Probe;

impl BusDevice for Probe {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(offset as u8);
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> Result<IoAction, DeviceError> {
        Ok(IoAction::Continue)
    }
}

fn windows() -> PciWindows {
    PciWindows {
        io: IO_WINDOW,
        mem32: MEM32_WINDOW,
        mem64: MEM64_WINDOW,
    }
}

fn setup_with(windows: PciWindows) -> (Arc<IoBus>, Arc<PciRoot>) {
    let io = Arc::new(IoBus::new());
    let root = PciRoot::new(&io, windows).unwrap();
    io.pio
        .insert(
            u64::from(CONFIG_ADDRESS_PORT),
            CONFIG_IO_LEN,
            root.config_io_device(),
        )
        .unwrap();
    io.mmio
        .insert(ECAM_BASE, ECAM_BUS_SIZE, root.ecam_device())
        .unwrap();
    (io, root)
}

fn setup() -> (Arc<IoBus>, Arc<PciRoot>) {
    setup_with(windows())
}

fn addr(device: u8) -> PciAddress {
    PciAddress {
        bus: 0,
        device,
        function: 0,
    }
}

fn cf8_select(io: &IoBus, a: PciAddress, register: u8) {
    io.pio_write(0xCF8, &a.config_address(register).to_le_bytes());
}

fn cf8_read32(io: &IoBus, a: PciAddress, register: u8) -> u32 {
    cf8_select(io, a, register);
    let mut b = [0u8; 4];
    io.pio_read(0xCFC, &mut b);
    u32::from_le_bytes(b)
}

fn cf8_write32(io: &IoBus, a: PciAddress, register: u8, value: u32) {
    cf8_select(io, a, register);
    io.pio_write(0xCFC, &value.to_le_bytes());
}

fn ecam_read32(io: &IoBus, a: PciAddress, register: u16) -> u32 {
    let mut b = [0u8; 4];
    io.mmio_read(ECAM_BASE + a.ecam_offset(register), &mut b);
    u32::from_le_bytes(b)
}

fn ecam_write32(io: &IoBus, a: PciAddress, register: u16, value: u32) {
    io.mmio_write(ECAM_BASE + a.ecam_offset(register), &value.to_le_bytes());
}

fn mmio_hits(io: &IoBus, addr: u64) -> bool {
    let before = io.stats().mmio_read_misses;
    let mut b = [0u8; 4];
    io.mmio_read(addr, &mut b);
    io.stats().mmio_read_misses == before
}

fn pio_hits(io: &IoBus, port: u16) -> bool {
    let before = io.stats().pio_read_misses;
    let mut b = [0u8; 1];
    io.pio_read(port, &mut b);
    io.stats().pio_read_misses == before
}

#[test]
fn enumerate_through_cf8() {
    let (io, root) = setup();
    let dev = TestDev::new(0x5678);
    let a = root.add_device(dev).unwrap();
    assert_eq!(a, addr(1));
    assert_eq!(root.devices(), vec![addr(0), addr(1)]);
    assert_eq!(cf8_read32(&io, addr(0), 0), 0x0008_1b36);
    assert_eq!(cf8_read32(&io, addr(0), 8) >> 8, 0x06_00_00);
    assert_eq!(cf8_read32(&io, a, 0), 0x5678_1234);
    for device in 2..32 {
        assert_eq!(cf8_read32(&io, addr(device), 0), 0xFFFF_FFFF);
    }
    for function in 1..8 {
        let f = PciAddress {
            bus: 0,
            device: 1,
            function,
        };
        assert_eq!(cf8_read32(&io, f, 0), 0xFFFF_FFFF);
    }
    let other_bus = PciAddress {
        bus: 1,
        device: 0,
        function: 0,
    };
    assert_eq!(cf8_read32(&io, other_bus, 0), 0xFFFF_FFFF);
    // CONFIG_ADDRESS reads back what was latched (low bits zero).
    io.pio_write(0xCF8, &0x8000_083Fu32.to_le_bytes());
    let mut b = [0u8; 4];
    io.pio_read(0xCF8, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_083C);
}

#[test]
fn cf8_data_access_sizes() {
    let (io, root) = setup();
    let a = root.add_device(TestDev::new(0x5678)).unwrap();
    cf8_select(&io, a, 0);
    let expect = 0x5678_1234u32.to_le_bytes();
    for i in 0..4u16 {
        let mut b = [0u8; 1];
        io.pio_read(0xCFC + i, &mut b);
        assert_eq!(b[0], expect[usize::from(i)]);
    }
    for i in 0..3u16 {
        let mut w = [0u8; 2];
        io.pio_read(0xCFC + i, &mut w);
        let i = usize::from(i);
        assert_eq!(w, [expect[i], expect[i + 1]]);
    }
    // Byte and word writes land at register + (port - 0xCFC).
    cf8_select(&io, a, 0x3C);
    io.pio_write(0xCFC, &[0x0B]);
    io.pio_write(0xCFD, &[0x09]);
    assert_eq!(cf8_read32(&io, a, 0x3C) & 0xFFFF, 0x010B);
    cf8_select(&io, a, 0x0C);
    io.pio_write(0xCFC, &[0x10]);
    io.pio_write(0xCFE, &[0xFF, 0xFF]);
    assert_eq!(cf8_read32(&io, a, 0x0C), 0x10);
    // Accesses crossing the end of the dword (and of the range) miss.
    let mut w = [0u8; 2];
    io.pio_read(0xCFF, &mut w);
    assert_eq!(w, [0xFF; 2]);
    let mut d = [0u8; 4];
    io.pio_read(0xCFE, &mut d);
    assert_eq!(d, [0xFF; 4]);
    // The handler itself refuses them too, as well as odd sizes.
    let cfg = root.config_io_device();
    cf8_select(&io, a, 0);
    cfg.read(7, &mut w).unwrap();
    assert_eq!(w, [0xFF; 2]);
    cfg.read(5, &mut d).unwrap();
    assert_eq!(d, [0xFF; 4]);
    let mut three = [0u8; 3];
    cfg.read(4, &mut three).unwrap();
    assert_eq!(three, [0xFF; 3]);
    let mut empty = [0u8; 0];
    cfg.read(4, &mut empty).unwrap();
    cfg.read(100, &mut d).unwrap();
    assert_eq!(d, [0xFF; 4]);
    cf8_select(&io, a, 0x3C);
    cfg.write(7, &[0x55, 0x55]).unwrap();
    cfg.write(4, &[0x55; 3]).unwrap();
    assert_eq!(cf8_read32(&io, a, 0x3C) & 0xFF, 0x0B);
}

#[test]
fn cf8_address_register_quirks() {
    let (io, _root) = setup();
    cf8_select(&io, addr(0), 0);
    // Only a 4-byte access at 0xCF8 reaches CONFIG_ADDRESS (Linux probes
    // with a byte write to 0xCFB).
    io.pio_write(0xCFB, &[0x01]);
    io.pio_write(0xCF8, &[0x00, 0x00]);
    let mut b = [0u8; 4];
    io.pio_read(0xCF8, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
    let mut w = [0u8; 2];
    io.pio_read(0xCF8, &mut w);
    assert_eq!(w, [0xFF; 2]);
    let mut byte = [0u8; 1];
    io.pio_read(0xCFA, &mut byte);
    assert_eq!(byte, [0xFF]);
    // Enable bit clear: reads all-ones, writes dropped.
    io.pio_write(0xCF8, &0x0000_003Cu32.to_le_bytes());
    io.pio_read(0xCFC, &mut b);
    assert_eq!(b, [0xFF; 4]);
    io.pio_write(0xCFC, &[0x42]);
    assert_eq!(cf8_read32(&io, addr(0), 0x3C) & 0xFF, 0);
    assert_eq!(io.stats().device_errors, 0);
}

#[test]
fn cf9_reset_control() {
    let (io, _root) = setup();
    assert_eq!(io.pio_write(0xCF9, &[0x02]), IoAction::Continue);
    let mut b = [0u8; 1];
    io.pio_read(0xCF9, &mut b);
    assert_eq!(b[0], 0x02);
    assert_eq!(
        io.pio_write(0xCF9, &[0x06]),
        IoAction::Stop(StopRequest::Reset)
    );
    io.pio_read(0xCF9, &mut b);
    assert_eq!(b[0], 0x06);
    assert_eq!(
        io.pio_write(0xCF9, &[0xFF]),
        IoAction::Stop(StopRequest::Reset)
    );
    io.pio_read(0xCF9, &mut b);
    assert_eq!(b[0], 0x0E);
    // Wider accesses at 0xCF9 are not the reset register.
    assert_eq!(io.pio_write(0xCF9, &[0x04, 0x00]), IoAction::Continue);
    let mut w = [0u8; 2];
    io.pio_read(0xCF9, &mut w);
    assert_eq!(w, [0xFF; 2]);
}

#[test]
fn ecam_access() {
    let (io, root) = setup();
    let a = root.add_device(TestDev::new(0x5678)).unwrap();
    assert_eq!(ecam_read32(&io, addr(0), 0), 0x0008_1b36);
    assert_eq!(ecam_read32(&io, a, 0), 0x5678_1234);
    assert_eq!(ecam_read32(&io, addr(7), 0), 0xFFFF_FFFF);
    let f3 = PciAddress {
        bus: 0,
        device: 1,
        function: 3,
    };
    assert_eq!(ecam_read32(&io, f3, 0), 0xFFFF_FFFF);
    // Extended configuration space is reachable and reads zero.
    assert_eq!(ecam_read32(&io, a, 0x100), 0);
    assert_eq!(ecam_read32(&io, a, 0xFFC), 0);
    let base = ECAM_BASE + a.ecam_offset(0);
    let mut b = [0u8; 1];
    io.mmio_read(base + 3, &mut b);
    assert_eq!(b, [0x56]);
    let mut w = [0u8; 2];
    io.mmio_read(base + 2, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x5678);
    // Misaligned and odd-sized accesses: all-ones, writes dropped.
    io.mmio_read(base + 1, &mut w);
    assert_eq!(w, [0xFF; 2]);
    let mut d = [0u8; 4];
    io.mmio_read(base + 2, &mut d);
    assert_eq!(d, [0xFF; 4]);
    let mut q = [0u8; 8];
    io.mmio_read(base, &mut q);
    assert_eq!(q, [0xFF; 8]);
    io.mmio_write(base + 0x3D, &[0x0B, 0x0B]);
    io.mmio_write(base + 0x3C, &[0x0B; 8]);
    assert_eq!(ecam_read32(&io, a, 0x3C) & 0xFF, 0);
    io.mmio_write(base + 0x3C, &[0x0B]);
    assert_eq!(ecam_read32(&io, a, 0x3C) & 0xFF, 0x0B);
    io.mmio_write(base + 0x3C, &[0x0C, 0x00]);
    assert_eq!(ecam_read32(&io, a, 0x3C) & 0xFF, 0x0C);
    // Past bus 0 on the handler itself.
    let ecam = root.ecam_device();
    ecam.read(ECAM_BUS_SIZE, &mut d).unwrap();
    assert_eq!(d, [0xFF; 4]);
    ecam.write(u64::MAX - 3, &d).unwrap();
    assert_eq!(io.stats().device_errors, 0);
}

#[test]
fn bars_are_assigned_programmed_and_mapped() {
    let (io, root) = setup();
    let dev = TestDev::new(0x5678);
    let a = root.add_device(dev.clone()).unwrap();
    let bars = dev.bars();
    assert_eq!(bars[0].address, IO_WINDOW.0);
    assert_eq!(bars[1].address, MEM64_WINDOW.0);
    assert_eq!(cf8_read32(&io, a, 0x10), 0xC001);
    assert_eq!(cf8_read32(&io, a, 0x18), 0x0000_0004);
    assert_eq!(cf8_read32(&io, a, 0x1C), 0x1);
    assert_eq!(dev.command() & 0x3, 0x3);
    assert_eq!(
        root.mapped_bars(a),
        vec![
            (0, BusRange::new(0xC000, 32).unwrap()),
            (2, BusRange::new(0x1_0000_0000, 0x4000).unwrap()),
        ]
    );
    let mut b = [0u8; 2];
    io.pio_read(0xC004, &mut b);
    assert_eq!(b, [0xA0; 2]);
    io.mmio_write(0x1_0000_0010, &[1, 2, 3, 4]);
    let mut q = [0u8; 8];
    io.mmio_read(0x1_0000_3FF8, &mut q);
    assert_eq!(q, [0xA2; 8]);
    assert_eq!(
        dev.take(),
        vec![
            ("read", 0, 4, vec![0xA0; 2]),
            ("write", 2, 0x10, vec![1, 2, 3, 4]),
            ("read", 2, 0x3FF8, vec![0xA2; 8]),
        ]
    );
    // A second device gets the next ranges.
    let dev2 = TestDev::new(0x9abc);
    let a2 = root.add_device(dev2.clone()).unwrap();
    assert_eq!(a2, addr(2));
    assert_eq!(dev2.bars()[0].address, 0xC020);
    assert_eq!(dev2.bars()[1].address, 0x1_0000_4000);
    assert!(pio_hits(&io, 0xC020));
    assert!(root.device(a2).is_some());
    assert!(root.device(addr(9)).is_none());
    assert!(root.mapped_bars(addr(9)).is_empty());
    assert_eq!(root.stats().refused_bar_mappings, 0);
    assert!(format!("{root:?}").contains("PciRoot"));
}

#[test]
fn guest_moves_a_bar() {
    let (io, root) = setup();
    let dev = TestDev::new(0x5678);
    let a = root.add_device(dev.clone()).unwrap();
    let old = 0x1_0000_0000;
    let new = 0x1_2345_0000;
    assert!(mmio_hits(&io, old));
    // Decoding off: both BARs unmapped.
    ecam_write32(&io, a, 0x04, 0);
    assert!(!mmio_hits(&io, old));
    assert!(!pio_hits(&io, 0xC000));
    assert!(root.mapped_bars(a).is_empty());
    // Reprogram with decoding off, then enable memory decoding only.
    ecam_write32(&io, a, 0x18, new as u32);
    ecam_write32(&io, a, 0x1C, (new >> 32) as u32);
    assert!(!mmio_hits(&io, new));
    cf8_write32(&io, a, 0x04, 0x2);
    assert!(mmio_hits(&io, new));
    assert!(mmio_hits(&io, new + 0x3FFC));
    assert!(!mmio_hits(&io, old));
    assert!(!pio_hits(&io, 0xC000));
    dev.take();
    io.mmio_read(new + 8, &mut [0u8; 4]);
    assert_eq!(dev.take(), vec![("read", 2, 8, vec![0xA2; 4])]);
    // I/O decoding back on.
    cf8_write32(&io, a, 0x04, 0x3);
    assert!(pio_hits(&io, 0xC01F));
    // Moving with decoding on, into the 32-bit window (allowed for 64-bit
    // BARs).
    ecam_write32(&io, a, 0x1C, 0);
    assert!(
        !mmio_hits(&io, 0x2345_0000),
        "outside every window: refused"
    );
    assert!(mmio_hits(&io, new));
    ecam_write32(&io, a, 0x18, 0xE000_0000);
    assert!(mmio_hits(&io, 0xE000_0000));
    assert!(!mmio_hits(&io, 0x2345_0000));
    assert!(!mmio_hits(&io, new));
    // Only the refusal of 0x2345_0000 (outside every window) was counted.
    assert_eq!(root.stats().refused_bar_mappings, 1);
    assert!(root.stats().bar_mapping_changes >= 5);
}

#[test]
fn refused_moves_keep_the_old_mapping() {
    let (io, root) = setup();
    let dev = TestDev::new(0x5678);
    let a = root.add_device(dev.clone()).unwrap();
    let dev2 = TestDev::new(0x9abc);
    let a2 = root.add_device(dev2).unwrap();
    let probe_at = 0xE800_0000;
    io.mmio.insert(probe_at, 0x1000, Arc::new(Probe)).unwrap();
    let mapped = root.mapped_bars(a);

    // Outside the window.
    ecam_write32(&io, a, 0x1C, 0x10);
    assert_eq!(root.stats().refused_bar_mappings, 1);
    assert_eq!(root.mapped_bars(a), mapped);
    // The same refused request is reported once, however many writes
    // follow.
    ecam_write32(&io, a, 0x3C, 0x5);
    assert_eq!(root.stats().refused_bar_mappings, 1);
    ecam_write32(&io, a, 0x1C, 0x1);
    assert_eq!(root.mapped_bars(a), mapped);

    // Onto the other device's BAR.
    ecam_write32(&io, a, 0x18, 0x4000);
    assert_eq!(root.stats().refused_bar_mappings, 2);
    assert_eq!(root.mapped_bars(a), mapped);
    assert_eq!(root.mapped_bars(a2)[1].1.base, 0x1_0000_4000);
    // Onto a non-PCI device (the probe), via the 32-bit window. Dword by
    // dword with decoding on, the intermediate 0x4000 is refused too.
    ecam_write32(&io, a, 0x1C, 0);
    ecam_write32(&io, a, 0x18, probe_at as u32);
    assert_eq!(root.stats().refused_bar_mappings, 4);
    assert_eq!(root.mapped_bars(a), mapped);
    let mut b = [0u8; 1];
    io.mmio_read(probe_at + 5, &mut b);
    assert_eq!(b, [5], "the probe still decodes its range");
    // An I/O BAR onto the other device's I/O BAR, or outside the window.
    cf8_write32(&io, a, 0x10, 0xC020);
    cf8_write32(&io, a, 0x10, 0x1000);
    assert_eq!(root.stats().refused_bar_mappings, 6);
    assert_eq!(root.mapped_bars(a)[0].1.base, 0xC000);
    // Onto the ECAM region (outside the windows).
    ecam_write32(&io, a, 0x18, ECAM_BASE as u32);
    assert_eq!(root.stats().refused_bar_mappings, 7);
    assert_eq!(ecam_read32(&io, a, 0), 0x5678_1234);
    // Back to the original place: the intermediate address 0 is refused,
    // the final one matches the mapping, so nothing moves.
    ecam_write32(&io, a, 0x18, 0);
    ecam_write32(&io, a, 0x1C, 1);
    cf8_write32(&io, a, 0x10, 0xC000);
    assert_eq!(root.mapped_bars(a), mapped);
    assert_eq!(root.stats().refused_bar_mappings, 8);
}

#[test]
fn sizing_with_decode_enabled_keeps_the_mapping() {
    let (io, root) = setup();
    let dev = TestDev::new(0x5678);
    let a = root.add_device(dev).unwrap();
    let mapped = root.mapped_bars(a);
    for register in [0x10u8, 0x18, 0x1C] {
        let original = cf8_read32(&io, a, register);
        cf8_write32(&io, a, register, 0xFFFF_FFFF);
        let size_mask = cf8_read32(&io, a, register);
        cf8_write32(&io, a, register, original);
        assert_eq!(root.mapped_bars(a), mapped, "after sizing {register:#x}");
        match register {
            0x10 => assert_eq!(size_mask, 0xFFFF_FFE1),
            0x18 => assert_eq!(size_mask, 0xFFFF_C004),
            _ => assert_eq!(size_mask, 0xFFFF_FFFF),
        }
    }
    assert!(pio_hits(&io, 0xC000));
    assert!(mmio_hits(&io, 0x1_0000_0000));
}

#[test]
fn add_device_at_and_slot_rules() {
    let (_io, root) = setup();
    let f2 = PciAddress {
        bus: 0,
        device: 1,
        function: 2,
    };
    assert_eq!(root.add_device_at(f2, TestDev::new(1)).unwrap(), f2);
    assert!(matches!(
        root.add_device_at(f2, TestDev::new(1)),
        Err(PciError::SlotTaken(a)) if a == f2
    ));
    assert!(matches!(
        root.add_device_at(addr(0), Arc::new(HostBridge::new())),
        Err(PciError::SlotTaken(_))
    ));
    let bus1 = PciAddress {
        bus: 1,
        device: 0,
        function: 0,
    };
    let err = root.add_device_at(bus1, TestDev::new(1)).unwrap_err();
    assert!(err.to_string().contains("bus 0"), "{err}");
    let bad = PciAddress {
        bus: 0,
        device: 3,
        function: 8,
    };
    assert!(matches!(
        root.add_device_at(bad, TestDev::new(1)),
        Err(PciError::InvalidAddress { .. })
    ));
    // Device 1 is in use (function 2), so the next free number is 2.
    assert_eq!(
        root.add_device(Arc::new(HostBridge::new())).unwrap(),
        addr(2)
    );
    for device in 3..32 {
        assert_eq!(
            root.add_device(Arc::new(HostBridge::new())).unwrap(),
            addr(device)
        );
    }
    assert!(matches!(
        root.add_device(Arc::new(HostBridge::new())),
        Err(PciError::BusFull)
    ));
}

#[test]
fn allocation_failures_roll_back() {
    let (io, root) = setup_with(PciWindows {
        io: (0xC000, 0x20),
        mem32: MEM32_WINDOW,
        mem64: (0, 0),
    });
    let dev = TestDev::new(1);
    let a = root.add_device(dev.clone()).unwrap();
    // With no 64-bit window, the 64-bit BAR comes from the 32-bit one.
    assert_eq!(dev.bars()[1].address, MEM32_WINDOW.0);
    assert!(mmio_hits(&io, MEM32_WINDOW.0));
    // The I/O window is full now.
    let err = root.add_device(TestDev::new(2)).unwrap_err();
    assert!(
        matches!(
            err,
            PciError::NoSpace {
                index: 0,
                window: "I/O",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(root.devices(), vec![addr(0), a]);
    // A mapping the bus refuses (a foreign device sits where the allocator
    // would put the BAR) rolls back too, leaving nothing behind.
    let (io, root) = setup();
    io.mmio
        .insert(MEM64_WINDOW.0, 0x10, Arc::new(Probe))
        .unwrap();
    let err = root.add_device(TestDev::new(3)).unwrap_err();
    assert!(matches!(err, PciError::Bus { index: 2, .. }), "{err}");
    assert!(!pio_hits(&io, 0xC000), "the I/O BAR was unmapped again");
    assert_eq!(root.devices(), vec![addr(0)]);
    // Its allocations were freed: after removing the obstacle the same
    // ranges are handed out again.
    io.mmio.remove(MEM64_WINDOW.0).unwrap();
    let dev = TestDev::new(4);
    root.add_device(dev.clone()).unwrap();
    assert_eq!(dev.bars()[0].address, 0xC000);
    assert_eq!(dev.bars()[1].address, MEM64_WINDOW.0);
}

#[test]
fn window_validation_and_dropped_bus() {
    let io = Arc::new(IoBus::new());
    let bad_io = PciWindows {
        io: (0xF000, 0x2000),
        ..windows()
    };
    assert!(matches!(
        PciRoot::new(&io, bad_io),
        Err(PciError::InvalidWindow { window: "I/O", .. })
    ));
    let bad_mem32 = PciWindows {
        mem32: (0xF000_0000, 0x2000_0000),
        ..windows()
    };
    assert!(PciRoot::new(&io, bad_mem32).is_err());
    let bad_mem64 = PciWindows {
        mem64: (u64::MAX, 2),
        ..windows()
    };
    assert!(PciRoot::new(&io, bad_mem64).is_err());
    let root = PciRoot::new(&io, windows()).unwrap();
    assert_eq!(root.windows(), windows());
    drop(io);
    assert!(matches!(
        root.add_device(TestDev::new(1)),
        Err(PciError::BusGone)
    ));
    // Devices without BARs need no bus; config writes still work.
    let hb = root.add_device(Arc::new(HostBridge::new())).unwrap();
    root.config_write(hb, 0x04, &[0x06, 0]);
    let mut b = [0u8; 2];
    root.config_read(hb, 0x04, &mut b);
    assert_eq!(b, [0x06, 0]);
    root.config_write(addr(30), 0x04, &[0x06, 0]);
    root.config_read(addr(30), 0x04, &mut b);
    assert_eq!(b, [0xFF; 2]);
}

#[test]
fn concurrent_config_writes_and_bar_accesses() {
    let (io, root) = setup();
    let dev = TestDev::new(0x5678);
    let a = root.add_device(dev).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let io = &io;
            s.spawn(move || {
                for i in 0..200u64 {
                    if t == 0 {
                        let base = 0x1_0000_0000 + (i % 4) * 0x10_0000;
                        ecam_write32(io, a, 0x18, base as u32);
                    } else {
                        let mut b = [0u8; 4];
                        io.mmio_read(0x1_0000_0000 + (i % 4) * 0x10_0000, &mut b);
                    }
                }
            });
        }
    });
    let mapped = root.mapped_bars(a);
    assert_eq!(mapped[1].1.base, 0x1_0030_0000);
    assert_eq!(io.mmio.ranges().len(), 2, "ECAM and one BAR");
}
