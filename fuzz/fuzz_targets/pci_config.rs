//! PCI configuration-space access sequences through ports 0xCF8-0xCFF and
//! ECAM, against a root complex with a device that has I/O, 32-bit and
//! 64-bit memory BARs and MSI-X, interleaved with BAR and MSI-X table
//! accesses and device notifications. Checks that nothing panics, that
//! read-only IDs never change, and that every BAR mapping stays inside its
//! PCI window.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_devices::pci::{
    Bar, BarKind, ConfigSpace, Msix, MsixLayout, PciDevice, PciHeader, PciRoot, PciWindows,
    CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, ECAM_BUS_SIZE,
};
use vmkit_devices::{DeviceError, IoAction, IoBus, RecordingMsiVectors};

const ECAM: u64 = 0xE000_0000;
const IO: (u64, u64) = (0xC000, 0x1000);
const MEM32: (u64, u64) = (0xC000_0000, 0x1000_0000);
const MEM64: (u64, u64) = (1 << 36, 1 << 30);

struct Dev {
    config: Mutex<ConfigSpace>,
    msix: Msix,
    cap: u16,
}

impl PciDevice for Dev {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.config.lock().unwrap().read(offset, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut c = self.config.lock().unwrap();
        c.write(offset, data);
        self.msix.config_written(&c, self.cap);
    }
    fn bars(&self) -> Vec<Bar> {
        self.config.lock().unwrap().bars()
    }
    fn command(&self) -> u16 {
        self.config.lock().unwrap().command()
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match bar {
            2 if offset < 0x800 => self.msix.table_read(offset, data),
            2 => self.msix.pba_read(offset - 0x800, data),
            _ => data.fill(0),
        }
        Ok(())
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        if bar == 2 && offset < 0x800 {
            self.msix.table_write(offset, data);
        }
        Ok(IoAction::Continue)
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    PioRead { port: u8, len: u8 },
    PioWrite { port: u8, value: u32, len: u8 },
    EcamRead { offset: u32, len: u8 },
    EcamWrite { offset: u32, value: u64, len: u8 },
    /// An access anywhere in the PCI windows (hits a BAR or nothing).
    MmioRead { window: bool, offset: u32, len: u8 },
    MmioWrite { window: bool, offset: u32, value: u64, len: u8 },
    Notify(u16),
}

fn clamp(len: u8) -> usize {
    usize::from(len % 9)
}

fuzz_target!(|ops: Vec<Op>| {
    let bus = Arc::new(IoBus::new());
    let windows = PciWindows { io: IO, mem32: MEM32, mem64: MEM64 };
    let root = PciRoot::new(&bus, windows).unwrap();
    bus.pio
        .insert(u64::from(CONFIG_ADDRESS_PORT), CONFIG_IO_LEN, root.config_io_device())
        .unwrap();
    bus.mmio.insert(ECAM, ECAM_BUS_SIZE, root.ecam_device()).unwrap();

    let mut config = ConfigSpace::new(&PciHeader {
        vendor_id: 0x1234,
        device_id: 0xF022,
        revision: 0,
        class_code: (0xFF, 0, 0),
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        interrupt_pin: None,
    });
    config.add_bar(0, BarKind::Io, 0x20).unwrap();
    config.add_bar(1, BarKind::Memory32 { prefetchable: false }, 0x1000).unwrap();
    config.add_bar(2, BarKind::Memory64 { prefetchable: true }, 0x1000).unwrap();
    let layout = MsixLayout { table_bar: 2, table_offset: 0, pba_bar: 2, pba_offset: 0x800 };
    let msix = Msix::new(Arc::new(RecordingMsiVectors::new(8)), 8, layout).unwrap();
    let cap = msix.add_capability(&mut config).unwrap();
    let dev = Arc::new(Dev { config: Mutex::new(config), msix, cap });
    let address = root.add_device(dev.clone()).unwrap();

    for op in ops.into_iter().take(2048) {
        match op {
            Op::PioRead { port, len } => {
                let mut b = vec![0u8; clamp(len)];
                bus.pio_read(0xCF8 + u16::from(port % 8), &mut b);
            }
            Op::PioWrite { port, value, len } => {
                let b = value.to_le_bytes();
                let _ = bus.pio_write(0xCF8 + u16::from(port % 8), &b[..clamp(len).min(4)]);
            }
            Op::EcamRead { offset, len } => {
                let mut b = vec![0u8; clamp(len)];
                bus.mmio_read(ECAM + u64::from(offset % ECAM_BUS_SIZE as u32), &mut b);
            }
            Op::EcamWrite { offset, value, len } => {
                let b = value.to_le_bytes();
                let at = ECAM + u64::from(offset % ECAM_BUS_SIZE as u32);
                let _ = bus.mmio_write(at, &b[..clamp(len)]);
            }
            Op::MmioRead { window, offset, len } => {
                let base = if window { MEM32.0 } else { MEM64.0 };
                let mut b = vec![0u8; clamp(len)];
                bus.mmio_read(base + u64::from(offset % 0x1000_0000), &mut b);
            }
            Op::MmioWrite { window, offset, value, len } => {
                let base = if window { MEM32.0 } else { MEM64.0 };
                let b = value.to_le_bytes();
                let _ = bus.mmio_write(base + u64::from(offset % 0x1000_0000), &b[..clamp(len)]);
            }
            Op::Notify(v) => {
                let _ = dev.msix.notify(v % 10);
            }
        }
        // Read-only identity stays put.
        let mut id = [0u8; 4];
        root.config_read(address, 0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0xF022_1234);
        // Every mapping lies inside the window of its kind.
        for (index, range) in root.mapped_bars(address) {
            let (base, size) = if index == 0 { IO } else if range.base >= MEM64.0 { MEM64 } else { MEM32 };
            assert!(range.base >= base && range.last() < base + size, "BAR {index}: {range:?}");
        }
    }
});
