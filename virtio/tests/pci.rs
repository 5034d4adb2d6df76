//! The modern virtio-pci transport on a PCI root complex, driven the way a
//! guest drives it: configuration space through ports 0xCF8/0xCFC or ECAM,
//! the BAR through the MMIO bus.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use common::{memory, TempImage, FORMATS, HEAP, TIMEOUT};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::pci::{PciAddress, PciDevice, PciRoot, PciWindows, CONFIG_ADDRESS_PORT};
use vmkit_devices::pci::{CONFIG_IO_LEN, ECAM_BUS_SIZE};
use vmkit_devices::{
    InterruptLine, IoBus, MsiEvent, MsiMessage, MsiVectors, RecordingLine, RecordingMsiVectors,
};
use vmkit_memory::GuestMemoryMmap;
use vmkit_virtio::devices::{Block, BlockOptions, Rng};
use vmkit_virtio::driver::{raw, Driver, DriverError, DriverTransport, PciConfigAccess, PciDriver};
use vmkit_virtio::queue::RingFormat;
use vmkit_virtio::transport::pci::{
    common_cfg as cc, BAR_INDEX, CAP_COMMON_CFG, CAP_DEVICE_CFG, CAP_ISR_CFG, CAP_NOTIFY_CFG,
    CAP_PCI_CFG, MSI_NO_VECTOR,
};
use vmkit_virtio::transport::{NotifyRegistrar, PciOptions, PciTransport};
use vmkit_virtio::{status, ActivateError, Activation, Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

const ECAM: u64 = 0xE000_0000;
const MEM32: (u64, u64) = (0xC000_0000, 0x1000_0000);
const MEM64: (u64, u64) = (1 << 36, 1 << 36);
const VECTORS: u16 = 8;
const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

/// A [`NotifyRegistrar`] that records what is registered.
#[derive(Default)]
struct Registry {
    live: Mutex<BTreeSet<u64>>,
    calls: AtomicU32,
}

impl Registry {
    fn live(&self) -> Vec<u64> {
        self.live.lock().unwrap().iter().copied().collect()
    }
}

impl NotifyRegistrar for Registry {
    fn register(&self, addr: u64, len: u32, _fd: &EventFd) -> io::Result<()> {
        assert_eq!(len, 4);
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert!(self.live.lock().unwrap().insert(addr), "{addr:#x} twice");
        Ok(())
    }
    fn unregister(&self, addr: u64, _len: u32, _fd: &EventFd) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert!(self.live.lock().unwrap().remove(&addr), "{addr:#x} unknown");
        Ok(())
    }
}

/// Where a [`Probe`] leaves its interrupt path at activation.
type IrqSlot = Arc<Mutex<Option<Arc<dyn Interrupt>>>>;

/// A device with three queues that hands its interrupt path to the test
/// and counts activations.
struct Probe {
    interrupt: IrqSlot,
    activations: Arc<AtomicU32>,
    active: bool,
}

impl Probe {
    fn new() -> (Self, IrqSlot, Arc<AtomicU32>) {
        let i = Arc::new(Mutex::new(None));
        let a = Arc::new(AtomicU32::new(0));
        (
            Self {
                interrupt: i.clone(),
                activations: a.clone(),
                active: false,
            },
            i,
            a,
        )
    }
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 64, 256]
    }
    fn features(&self) -> u64 {
        1 << 3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        vmkit_virtio::device::read_config_bytes(b"probe-config", offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without a reset");
        self.active = true;
        self.activations.fetch_add(1, Ordering::SeqCst);
        *self.interrupt.lock().unwrap() = Some(a.interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = false;
    }
}

struct Platform {
    bus: Arc<IoBus>,
    root: Arc<PciRoot>,
}

fn platform() -> Platform {
    let bus = Arc::new(IoBus::new());
    let root = PciRoot::new(
        &bus,
        PciWindows {
            io: (0xC000, 0x1000),
            mem32: MEM32,
            mem64: MEM64,
        },
    )
    .unwrap();
    bus.pio
        .insert(
            u64::from(CONFIG_ADDRESS_PORT),
            CONFIG_IO_LEN,
            root.config_io_device(),
        )
        .unwrap();
    bus.mmio
        .insert(ECAM, ECAM_BUS_SIZE, root.ecam_device())
        .unwrap();
    Platform { bus, root }
}

struct Rig {
    p: Platform,
    transport: Arc<PciTransport>,
    intx: Arc<RecordingLine>,
    msi: Arc<RecordingMsiVectors>,
    registry: Arc<Registry>,
    address: PciAddress,
    mem: GuestMemoryMmap,
}

fn rig_on(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, packed: bool) -> Rig {
    let p = platform();
    let intx = Arc::new(RecordingLine::new());
    let msi = Arc::new(RecordingMsiVectors::new(VECTORS));
    let registry = Arc::new(Registry::default());
    let transport = Arc::new(
        PciTransport::new(
            device,
            mem.clone(),
            intx.clone() as Arc<dyn InterruptLine>,
            msi.clone() as Arc<dyn MsiVectors>,
            PciOptions {
                packed_ring: packed,
                registrar: Some(registry.clone() as Arc<dyn NotifyRegistrar>),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let address = p.root.add_device(transport.clone()).unwrap();
    Rig {
        p,
        transport,
        intx,
        msi,
        registry,
        address,
        mem,
    }
}

fn rig(device: Box<dyn VirtioDevice>) -> Rig {
    rig_on(device, memory(), true)
}

impl Rig {
    fn driver(&self, access: PciConfigAccess) -> PciDriver {
        PciDriver::probe(self.p.bus.clone(), self.address, access).unwrap()
    }
    fn bar(&self) -> u64 {
        self.transport.bars()[0].address
    }
    fn common_read(&self, field: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        self.p.bus.mmio_read(self.bar() + field, &mut b[..width]);
        u64::from_le_bytes(b)
    }
    fn common_write(&self, field: u64, width: usize, v: u64) {
        self.p
            .bus
            .mmio_write(self.bar() + field, &v.to_le_bytes()[..width]);
    }
    fn status(&self) -> u32 {
        self.common_read(cc::DEVICE_STATUS, 1) as u32
    }
    fn set_status(&self, v: u32) {
        self.common_write(cc::DEVICE_STATUS, 1, u64::from(v));
    }
    /// ACKNOWLEDGE, DRIVER, VERSION_1 (plus `features`), FEATURES_OK.
    fn to_features_ok(&self, features: u64) {
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let f = (1u64 << vmkit_virtio::features::VERSION_1) | features;
        self.common_write(cc::DRIVER_FEATURE_SELECT, 4, 0);
        self.common_write(cc::DRIVER_FEATURE, 4, f & 0xFFFF_FFFF);
        self.common_write(cc::DRIVER_FEATURE_SELECT, 4, 1);
        self.common_write(cc::DRIVER_FEATURE, 4, f >> 32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(self.status() & status::FEATURES_OK, 0);
    }
    /// Sets up queue `q` with split rings at `base` (size `size`).
    fn queue(&self, q: u16, size: u16, base: u64) {
        self.common_write(cc::QUEUE_SELECT, 2, u64::from(q));
        self.common_write(cc::QUEUE_SIZE, 2, u64::from(size));
        self.common_write(cc::QUEUE_DESC, 4, base);
        self.common_write(cc::QUEUE_DRIVER, 4, base + 0x1000);
        self.common_write(cc::QUEUE_DEVICE, 4, base + 0x2000);
        self.common_write(cc::QUEUE_ENABLE, 2, 1);
    }
    /// A probe device brought up with every queue enabled.
    fn probe_live(&self) {
        self.to_features_ok(0);
        for q in 0..3 {
            self.queue(q, 16, 0x20000 + 0x4000 * u64::from(q));
        }
        self.set_status(ALL);
        assert_eq!(self.status(), ALL);
    }
}

fn take_interrupt_of(slot: &IrqSlot) -> Arc<dyn Interrupt> {
    slot.lock().unwrap().clone().unwrap()
}

#[test]
fn identification_and_capability_walk() {
    for (device, id, class) in [
        (
            Box::new(Rng::new()) as Box<dyn VirtioDevice>,
            0x1044u16,
            0xFF_0000u32,
        ),
        (Box::new(Probe::new().0), 0x1040 + 42, 0xFF_0000),
    ] {
        let r = rig(device);
        for access in [PciConfigAccess::Ports, PciConfigAccess::Ecam(ECAM)] {
            let d = r.driver(access);
            assert_eq!(d.config_read16(0), 0x1AF4);
            assert_eq!(d.config_read16(2), id);
            assert_eq!(d.config_read8(8), 1, "revision");
            assert_eq!(d.config_read32(8) >> 8, class);
            assert_eq!(d.config_read8(0x0E), 0, "header type 0");
            assert_eq!(d.config_read8(0x3D), 1, "INTA#");
            assert_eq!(d.config_read16(0x2C), 0x1AF4);
            // BAR 0: 64-bit, non-prefetchable memory.
            assert_eq!(d.config_read32(0x10) & 0xF, 0x4);
            let l = d.layout();
            let bar = r.bar();
            assert_eq!(l.common, bar);
            assert_eq!(l.isr, bar + 0x1000);
            assert_eq!(l.device, bar + 0x2000);
            assert_eq!(l.notify, bar + 0x3000);
            assert_eq!(l.notify_multiplier, 4);
            assert_ne!(l.pci_cfg_cap, 0);
            assert!(l.msix_vectors >= 2 && l.msix_vectors <= VECTORS);
            assert!(l.msix_table >= bar + 0x4000 && l.msix_pba > l.msix_table);
            // Walk the list by hand: every vendor capability is one of the
            // five types, with the right cap_len and BAR 0 (PCI_CFG aside).
            let mut seen = Vec::new();
            let mut ptr = d.config_read8(0x34);
            while ptr != 0 {
                let at = u16::from(ptr);
                if d.config_read8(at) == 0x09 {
                    let ty = d.config_read8(at + 3);
                    let len = d.config_read8(at + 2);
                    let want = if ty == CAP_NOTIFY_CFG || ty == CAP_PCI_CFG {
                        20
                    } else {
                        16
                    };
                    assert_eq!(len, want, "cap type {ty}");
                    if ty != CAP_PCI_CFG {
                        assert_eq!(d.config_read8(at + 4), BAR_INDEX);
                    }
                    seen.push(ty);
                } else {
                    seen.push(d.config_read8(at) | 0x80);
                }
                ptr = d.config_read8(at + 1);
            }
            seen.sort();
            assert_eq!(
                seen,
                vec![
                    CAP_COMMON_CFG,
                    CAP_NOTIFY_CFG,
                    CAP_ISR_CFG,
                    CAP_DEVICE_CFG,
                    CAP_PCI_CFG,
                    0x11 | 0x80
                ]
            );
            assert_eq!(d.num_queues().unwrap(), if id == 0x1044 { 1 } else { 3 });
        }
    }
    // Block: mass storage class.
    let img = TempImage::new(4096, |i| i as u8);
    let r = rig(Box::new(
        Block::open(&img.path, BlockOptions::default()).unwrap(),
    ));
    let d = r.driver(PciConfigAccess::Ports);
    assert_eq!(d.config_read16(2), 0x1042);
    assert_eq!(d.config_read32(8) >> 8, 0x01_8000);
}

#[test]
fn bar_sizing_and_relocation_move_the_notify_registrations() {
    let (probe, _, _) = Probe::new();
    let r = rig(Box::new(probe));
    let d = r.driver(PciConfigAccess::Ports);
    let bar = r.bar();
    let size = r.transport.layout().bar_size;
    assert!((MEM64.0..MEM64.0 + MEM64.1).contains(&bar), "{bar:#x}");
    let expect = |base: u64| (0..3).map(|q| base + 0x3000 + 4 * q).collect::<Vec<_>>();
    assert_eq!(r.registry.live(), expect(bar));
    assert_eq!(r.transport.notify_address(2), Some(bar + 0x3008));

    // Sizing as Linux does it: decoding off, all-ones, read, restore.
    let cmd = d.config_read16(4);
    d.config_write16(4, cmd & !2);
    assert!(r.registry.live().is_empty(), "decode off unregisters");
    assert_eq!(r.transport.notify_address(0), None);
    d.config_write32(0x10, u32::MAX);
    d.config_write32(0x14, u32::MAX);
    let lo = d.config_read32(0x10);
    let hi = d.config_read32(0x14);
    let mask = u64::from(hi) << 32 | u64::from(lo & !0xF);
    assert_eq!(!mask + 1, size, "size from the sizing protocol");
    assert_eq!(lo & 0xF, 0x4);
    assert!(
        r.registry.live().is_empty(),
        "no registration while decoding off"
    );

    // Relocate into the 32-bit window and turn decoding back on.
    let new = MEM32.0 + 0x10_0000;
    d.config_write32(0x10, new as u32);
    d.config_write32(0x14, 0);
    d.config_write16(4, cmd);
    assert_eq!(r.registry.live(), expect(new));
    assert_eq!(r.p.root.mapped_bars(r.address)[0].1.base, new);
    // The structures answer at the new address.
    let mut b = [0u8; 2];
    r.p.bus.mmio_read(new + cc::NUM_QUEUES, &mut b);
    assert_eq!(u16::from_le_bytes(b), 3);
    // Moving while decoding: registrations follow.
    let newer = MEM32.0 + 0x20_0000;
    d.config_write32(0x10, newer as u32);
    assert_eq!(r.registry.live(), expect(newer));
    // Dropping the transport (after the root) unregisters.
    let registry = r.registry.clone();
    drop(d);
    drop(r);
    assert!(registry.live().is_empty());
}

#[test]
fn rng_end_to_end_with_intx_both_formats_and_both_config_mechanisms() {
    for format in FORMATS {
        for access in [PciConfigAccess::Ports, PciConfigAccess::Ecam(ECAM)] {
            let r = rig(Box::new(Rng::new()));
            let mem = r.mem.clone();
            let mut drv = Driver::new(r.driver(access), mem, HEAP);
            drv.negotiate(format, 0).unwrap();
            let mut all = Vec::new();
            for round in 0..8u32 {
                let len = 16 + round * 61;
                let buf = drv.alloc(u64::from(len));
                drv.submit(0, &[], &[(buf, len)]).unwrap();
                drv.notify(0).unwrap();
                let (_, used) = drv.wait_used(0, TIMEOUT).unwrap();
                assert_eq!(used, len);
                let mut data = vec![0u8; len as usize];
                drv.mem().read_slice(&mut data, GuestAddress(buf)).unwrap();
                all.extend(data);
            }
            assert!(all.iter().filter(|&&b| b == 0).count() < all.len() / 16);
            // INTx (MSI-X is off): the line went up, the ISR says "queue",
            // reading it clears it and lowers the line.
            wait_for(|| r.intx.level());
            assert!(r.intx.asserts() > 0);
            // Interrupt Status in the PCI status register mirrors the ISR.
            assert_ne!(drv.transport().config_read16(6) & 8, 0);
            assert_eq!(drv.transport().take_interrupt().unwrap(), 1);
            assert!(!r.intx.level());
            assert_eq!(drv.transport().config_read16(6) & 8, 0);
            assert_eq!(drv.transport().take_interrupt().unwrap(), 0);
            assert!(r.msi.take_events().is_empty(), "no MSI while disabled");
        }
    }
}

fn wait_for(mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < TIMEOUT, "condition not reached");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn block_request(
    drv: &mut Driver<PciDriver>,
    kind: u32,
    sector: u64,
    out: &[u8],
    in_len: u32,
) -> (u8, Vec<u8>) {
    let hdr = drv.alloc(16);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    drv.mem().write_slice(&h, GuestAddress(hdr)).unwrap();
    let mut readable = vec![(hdr, 16)];
    if !out.is_empty() {
        let b = drv.alloc(out.len() as u64);
        drv.mem().write_slice(out, GuestAddress(b)).unwrap();
        readable.push((b, out.len() as u32));
    }
    let inbuf = drv.alloc(u64::from(in_len));
    let st = drv.alloc(1);
    drv.mem().write_slice(&[0xEE], GuestAddress(st)).unwrap();
    let mut writable = vec![];
    if in_len > 0 {
        writable.push((inbuf, in_len));
    }
    writable.push((st, 1));
    drv.submit(0, &readable, &writable).unwrap();
    drv.notify(0).unwrap();
    drv.wait_used(0, TIMEOUT).unwrap();
    let mut data = vec![0u8; in_len as usize];
    drv.mem()
        .read_slice(&mut data, GuestAddress(inbuf))
        .unwrap();
    let mut s = [0u8];
    drv.mem().read_slice(&mut s, GuestAddress(st)).unwrap();
    (s[0], data)
}

#[test]
fn block_end_to_end_with_msix_both_formats() {
    for format in FORMATS {
        let img = TempImage::new(64 * 512, |i| (i * 7 + i / 512) as u8);
        let r = rig(Box::new(
            Block::open(&img.path, BlockOptions::default()).unwrap(),
        ));
        let d = r.driver(PciConfigAccess::Ecam(ECAM));
        d.set_msix_enabled(true).unwrap();
        let m = |v: u32| MsiMessage::new(0xFEE0_0000, 0x40 + v);
        d.set_msix_entry(0, m(0), false);
        d.set_msix_entry(1, m(1), false);
        d.assign_msix(1, &[0]);
        let mut drv = Driver::new(d, r.mem.clone(), HEAP);
        drv.negotiate(format, 0).unwrap();
        // Capacity from the device configuration through the BAR.
        let mut cap = [0u8; 8];
        drv.read_config(0, &mut cap).unwrap();
        assert_eq!(u64::from_le_bytes(cap), 64);
        let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        let (s, _) = block_request(&mut drv, 1, 5, &data, 0);
        assert_eq!(s, 0);
        let (s, back) = block_request(&mut drv, 0, 5, &[], 1024);
        assert_eq!(s, 0);
        assert_eq!(back, data);
        let (s, first) = block_request(&mut drv, 0, 0, &[], 512);
        assert_eq!(s, 0);
        assert_eq!(first[1], 7);
        assert_eq!(&img.read()[5 * 512..7 * 512], &data[..]);
        // Used buffers fired vector 0 (queue 0), never INTx.
        wait_for(|| {
            r.msi
                .take_events()
                .contains(&MsiEvent::Fired(0, Some(m(0))))
        });
        assert_eq!(r.intx.asserts(), 0);
        assert_eq!(drv.transport().take_interrupt().unwrap() & 1, 0);
    }
}

#[test]
fn msix_per_queue_vectors_masking_no_vector_and_config_vector() {
    let (probe, slot, _) = Probe::new();
    let r = rig(Box::new(probe));
    let d = r.driver(PciConfigAccess::Ports);
    d.set_msix_enabled(true).unwrap();
    let m = |v: u16| MsiMessage::new(0xFEE0_1000, 0x50 + u32::from(v));
    for v in 0..4 {
        d.set_msix_entry(v, m(v), false);
    }
    r.probe_live();
    // Out-of-range vectors read back as NO_VECTOR.
    assert_eq!(d.set_config_vector(VECTORS), MSI_NO_VECTOR);
    assert_eq!(d.set_queue_vector(0, 0x7FFF), MSI_NO_VECTOR);
    assert_eq!(d.set_config_vector(3), 3);
    assert_eq!(d.set_queue_vector(0, 2), 2);
    assert_eq!(d.set_queue_vector(1, 1), 1);
    assert_eq!(d.set_queue_vector(2, MSI_NO_VECTOR), MSI_NO_VECTOR);
    r.msi.take_events();
    let irq = take_interrupt_of(&slot);

    irq.signal_queue(0);
    irq.signal_queue(1);
    irq.signal_queue(2); // NO_VECTOR: nothing
    assert_eq!(
        r.msi.take_events(),
        vec![
            MsiEvent::Fired(2, Some(m(2))),
            MsiEvent::Fired(1, Some(m(1)))
        ]
    );
    // Masked: pending bit, delivered on unmask.
    d.set_msix_masked(2, true);
    r.msi.take_events();
    irq.signal_queue(0);
    assert!(d.msix_pending(2));
    assert!(!r
        .msi
        .take_events()
        .iter()
        .any(|e| matches!(e, MsiEvent::Fired(..))));
    d.set_msix_masked(2, false);
    assert!(!d.msix_pending(2));
    assert!(r
        .msi
        .take_events()
        .contains(&MsiEvent::Fired(2, Some(m(2)))));
    // Config change: generation bumps, config vector fires, ISR has the
    // config bit, INTx stays low.
    let gen = d.config_generation().unwrap();
    irq.signal_config();
    assert_eq!(d.config_generation().unwrap(), (gen + 1) & 0xFF);
    assert_eq!(r.msi.take_events(), vec![MsiEvent::Fired(3, Some(m(3)))]);
    // needs_reset: config vector and DEVICE_NEEDS_RESET.
    irq.needs_reset();
    assert_eq!(r.msi.take_events(), vec![MsiEvent::Fired(3, Some(m(3)))]);
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.take_interrupt().unwrap(), 2);
    assert_eq!(r.intx.asserts(), 0);
    // Reset clears NEEDS_RESET and the vector assignments.
    r.set_status(0);
    assert_eq!(r.status(), 0);
    assert_eq!(
        r.common_read(cc::CONFIG_MSIX_VECTOR, 2) as u16,
        MSI_NO_VECTOR
    );
}

#[test]
fn rng_broken_ring_gives_needs_reset_and_the_config_vector() {
    for format in FORMATS {
        let r = rig(Box::new(Rng::new()));
        let d = r.driver(PciConfigAccess::Ports);
        d.set_msix_enabled(true).unwrap();
        let m = MsiMessage::new(0xFEE0_0000, 0x61);
        d.set_msix_entry(0, MsiMessage::new(0xFEE0_0000, 0x60), false);
        d.set_msix_entry(1, m, false);
        d.assign_msix(1, &[0]);
        let mut drv = Driver::new(d, r.mem.clone(), HEAP);
        drv.negotiate(format, 0).unwrap();
        r.msi.take_events();
        // A descriptor pointing outside guest memory... as a chain that
        // loops: descriptor 0 -> 0 with NEXT (split) / an indirect table
        // outside memory (packed).
        match format {
            RingFormat::Split => {
                drv.write_split_desc(0, 0, raw(0x1000, 16, 1 | 2, 0))
                    .unwrap();
                drv.publish_split(0, 0).unwrap();
            }
            RingFormat::Packed => {
                drv.write_packed_desc(0, 0, raw(u64::MAX - 0xFFF, 64, 4, 0), true)
                    .unwrap();
            }
        }
        drv.notify(0).unwrap();
        match drv.wait_used(0, TIMEOUT) {
            Err(DriverError::NeedsReset) => {}
            other => panic!("{format:?}: {other:?}"),
        }
        wait_for(|| r.msi.take_events().contains(&MsiEvent::Fired(1, Some(m))));
        drv.negotiate(format, 0).unwrap();
        assert_eq!(r.status(), ALL, "usable again after reset");
    }
}

#[test]
fn intx_isr_read_to_clear_and_intx_disable() {
    let (probe, slot, _) = Probe::new();
    let r = rig(Box::new(probe));
    let d = r.driver(PciConfigAccess::Ports);
    r.probe_live();
    let irq = take_interrupt_of(&slot);
    irq.signal_queue(1);
    assert!(r.intx.level());
    irq.signal_config();
    assert_eq!(d.take_interrupt().unwrap(), 3);
    assert!(!r.intx.level());
    // INTX_DISABLE: ISR still records, the line stays low; clearing the
    // bit raises it for the pending event.
    d.set_intx_disable(true);
    irq.signal_queue(0);
    assert!(!r.intx.level());
    assert_ne!(d.config_read16(6) & 8, 0, "Interrupt Status still set");
    d.set_intx_disable(false);
    assert!(r.intx.level());
    assert_eq!(d.take_interrupt().unwrap(), 1);
    assert!(!r.intx.level());
    // Enabling MSI-X takes the line down and keeps it down.
    irq.signal_queue(0);
    assert!(r.intx.level());
    d.set_msix_enabled(true).unwrap();
    assert!(!r.intx.level());
    irq.signal_queue(0);
    assert!(!r.intx.level());
}

#[test]
fn no_lost_intx_under_concurrency() {
    let (probe, slot, _) = Probe::new();
    let r = rig(Box::new(probe));
    let d = r.driver(PciConfigAccess::Ports);
    r.probe_live();
    let irq = take_interrupt_of(&slot);
    let t = std::thread::spawn(move || {
        for i in 0..20_000u32 {
            irq.signal_queue((i % 3) as u16);
        }
    });
    let mut seen = 0u32;
    while !t.is_finished() {
        if d.take_interrupt().unwrap() & 1 != 0 {
            seen += 1;
        }
    }
    t.join().unwrap();
    // The last raise either was taken by a read or left the line up with
    // the bit set: never a set bit with the line down.
    let level = r.intx.level();
    let isr = d.take_interrupt().unwrap();
    assert_eq!(level, isr != 0, "line {level}, ISR {isr}");
    assert!(seen > 0 || isr != 0);
    assert!(!r.intx.level());
}

#[test]
fn hostile_common_config() {
    let (probe, _, activations) = Probe::new();
    let r = rig(Box::new(probe));
    // queue_select beyond num_queues: zeros, writes dropped.
    r.to_features_ok(0);
    r.common_write(cc::QUEUE_SELECT, 2, 7);
    for (f, w) in [
        (cc::QUEUE_SIZE, 2),
        (cc::QUEUE_MSIX_VECTOR, 2),
        (cc::QUEUE_ENABLE, 2),
        (cc::QUEUE_NOTIFY_OFF, 2),
        (cc::QUEUE_DESC, 4),
        (cc::QUEUE_DEVICE + 4, 4),
    ] {
        r.common_write(f, w, 0x1234);
        assert_eq!(r.common_read(f, w), 0, "field {f:#x}");
    }
    assert_eq!(r.common_read(cc::QUEUE_SELECT, 2), 7);
    // Odd widths and offsets read zero and are dropped.
    r.common_write(cc::QUEUE_SELECT, 2, 1);
    assert_eq!(r.common_read(cc::QUEUE_SIZE, 2), 64);
    for (off, w) in [
        (cc::QUEUE_SIZE, 4),
        (cc::QUEUE_SIZE, 1),
        (cc::QUEUE_SIZE + 1, 1),
        (cc::DEVICE_STATUS, 2),
        (cc::DEVICE_FEATURE, 2),
        (cc::QUEUE_DESC + 2, 4),
        (0x38, 4),
        (0xFFF, 1),
    ] {
        r.common_write(off, w, 0x8);
        assert_eq!(r.common_read(off, w), 0, "{w} bytes at {off:#x}");
    }
    assert_eq!(r.common_read(cc::QUEUE_SIZE, 2), 64);
    assert_eq!(r.status(), 0xB);
    // Read-only fields ignore writes.
    r.common_write(cc::NUM_QUEUES, 2, 9);
    r.common_write(cc::CONFIG_GENERATION, 1, 9);
    r.common_write(cc::QUEUE_NOTIFY_OFF, 2, 9);
    assert_eq!(r.common_read(cc::NUM_QUEUES, 2), 3);
    assert_eq!(r.common_read(cc::QUEUE_NOTIFY_OFF, 2), 1);
    // queue_enable 0 is ignored; 1 sticks.
    r.common_write(cc::QUEUE_ENABLE, 2, 0);
    r.common_write(cc::QUEUE_ENABLE, 2, 1);
    r.common_write(cc::QUEUE_ENABLE, 2, 0);
    assert_eq!(r.common_read(cc::QUEUE_ENABLE, 2), 1);
    // An enabled queue's registers are frozen.
    r.common_write(cc::QUEUE_SIZE, 2, 8);
    assert_eq!(r.common_read(cc::QUEUE_SIZE, 2), 64);
    // 64-bit access to an address field works as two halves.
    r.common_write(cc::QUEUE_SELECT, 2, 2);
    r.common_write(cc::QUEUE_DESC, 8, 0x1_2345_6780);
    assert_eq!(r.common_read(cc::QUEUE_DESC, 4), 0x2345_6780);
    assert_eq!(r.common_read(cc::QUEUE_DESC + 4, 4), 1);
    assert_eq!(r.common_read(cc::QUEUE_DESC, 8), 0x1_2345_6780);

    // Bad queue set-ups: NEEDS_RESET at DRIVER_OK, never an activation.
    type Breaker = fn(&Rig);
    let cases: [(&str, Breaker); 6] = [
        ("size 0", |r| r.common_write(cc::QUEUE_SIZE, 2, 0)),
        ("size not a power of two", |r| {
            r.common_write(cc::QUEUE_SIZE, 2, 12)
        }),
        ("size above maximum", |r| {
            r.common_write(cc::QUEUE_SIZE, 2, 32)
        }),
        ("ring outside memory", |r| {
            r.common_write(cc::QUEUE_DESC + 4, 4, 0xFFFF)
        }),
        ("misaligned used ring", |r| {
            r.common_write(cc::QUEUE_DEVICE, 4, 0x20002)
        }),
        ("size u16::MAX", |r| {
            r.common_write(cc::QUEUE_SIZE, 2, 0xFFFF)
        }),
    ];
    for (name, break_it) in cases {
        r.to_features_ok(0);
        r.common_write(cc::QUEUE_SELECT, 2, 0);
        r.common_write(cc::QUEUE_SIZE, 2, 16);
        r.common_write(cc::QUEUE_DESC, 4, 0x20000);
        r.common_write(cc::QUEUE_DRIVER, 4, 0x21000);
        r.common_write(cc::QUEUE_DEVICE, 4, 0x22000);
        break_it(&r);
        r.common_write(cc::QUEUE_ENABLE, 2, 1);
        let before = activations.load(Ordering::SeqCst);
        r.set_status(ALL);
        assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0, "{name}");
        assert_eq!(activations.load(Ordering::SeqCst), before, "{name}");
        assert!(r.intx.level(), "{name}: configuration interrupt");
        r.set_status(0);
        assert_eq!(r.status(), 0, "{name}");
        assert!(!r.intx.level(), "{name}: reset clears the ISR");
    }

    // Features: refused without VERSION_1 or with unknown bits.
    for bad in [0u64, 1 << 50] {
        r.set_status(0);
        r.set_status(status::ACKNOWLEDGE | status::DRIVER);
        r.common_write(cc::DRIVER_FEATURE_SELECT, 4, 1);
        r.common_write(cc::DRIVER_FEATURE, 4, bad >> 32);
        r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(r.status() & status::FEATURES_OK, 0, "{bad:#x}");
        r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert_eq!(r.status() & status::DRIVER_OK, 0);
    }

    // After DRIVER_OK: features, queue fields and status bits are frozen.
    r.probe_live();
    let n = activations.load(Ordering::SeqCst);
    r.common_write(cc::DRIVER_FEATURE_SELECT, 4, 0);
    r.common_write(cc::DRIVER_FEATURE, 4, 0xFFFF_FFFF);
    assert_eq!(r.common_read(cc::DRIVER_FEATURE, 4), 0);
    r.common_write(cc::QUEUE_SELECT, 2, 0);
    r.common_write(cc::QUEUE_DESC, 4, 0x9000);
    r.common_write(cc::QUEUE_SIZE, 2, 2);
    assert_eq!(r.common_read(cc::QUEUE_DESC, 4), 0x20000);
    assert_eq!(r.common_read(cc::QUEUE_SIZE, 2), 16);
    r.set_status(status::ACKNOWLEDGE);
    r.set_status(ALL);
    assert_eq!(r.status(), ALL);
    assert_eq!(
        activations.load(Ordering::SeqCst),
        n,
        "no second activation"
    );
    // Writes to the ISR, the device config, beyond the notify slots and
    // outside the BAR's structures are harmless.
    let bar = r.bar();
    for (off, len) in [
        (0x1000u64, 1usize),
        (0x1001, 4),
        (0x2000, 8),
        (0x3000 + 4 * 3, 2),
        (0x3001, 2),
        (0x3000, 8),
        (r.transport.layout().msix_pba_offset, 8),
        (r.transport.layout().bar_size - 1, 1),
    ] {
        r.p.bus.mmio_write(bar + off, &vec![0xFF; len]);
        let mut b = vec![0u8; len];
        r.p.bus.mmio_read(bar + off, &mut b);
    }
    assert_eq!(r.status(), ALL);
    assert_eq!(r.p.bus.stats().device_errors, 0);
}

#[test]
fn pci_cfg_window() {
    let (probe, _, _) = Probe::new();
    let r = rig(Box::new(probe));
    let d = r.driver(PciConfigAccess::Ports);
    let cap = d.layout().pci_cfg_cap;
    let window = |bar: u8, offset: u32, len: u32| {
        d.config_write(cap + 4, &[bar]);
        d.config_write32(cap + 8, offset);
        d.config_write32(cap + 12, len);
    };
    // Decoding off: the window still reaches the structures.
    let cmd = d.config_read16(4);
    d.config_write16(4, cmd & !2);
    window(0, cc::NUM_QUEUES as u32, 2);
    assert_eq!(d.config_read32(cap + 16) & 0xFFFF, 3);
    // A write through the window: status ACKNOWLEDGE.
    window(0, cc::DEVICE_STATUS as u32, 1);
    d.config_write32(cap + 16, 1);
    assert_eq!(r.transport.status(), 1);
    // Reading back through a byte access of the data field.
    assert_eq!(d.config_read8(cap + 16), 1);
    // Device config through the window.
    window(0, 0x2000, 4);
    assert_eq!(&d.config_read32(cap + 16).to_le_bytes(), b"prob");
    // Bad windows do nothing: wrong BAR, bad lengths, misaligned or out of
    // the BAR.
    d.config_write32(cap + 16, 0xAAAA_AAAA);
    let size = r.transport.layout().bar_size as u32;
    for (bar, offset, len) in [
        (1u8, 0x14u32, 1u32),
        (6, 0x14, 1),
        (0xFF, 0x14, 1),
        (0, 0x14, 0),
        (0, 0x14, 3),
        (0, 0x14, 8),
        (0, 0x15, 2),
        (0, 0x16, 4),
        (0, size, 1),
        (0, size - 2, 4),
        (0, u32::MAX, 1),
    ] {
        window(bar, offset, len);
        d.config_write32(cap + 16, 0);
        assert_eq!(d.config_read32(cap + 16), 0, "{bar} {offset:#x} {len}");
        d.config_write32(cap + 16, 0xAAAA_AAAA);
        assert_eq!(d.config_read32(cap + 16), 0xAAAA_AAAA);
    }
    assert_eq!(r.transport.status(), 1);
    // The capability header itself is read-only.
    d.config_write32(cap, 0);
    assert_eq!(d.config_read8(cap), 0x09);
    assert_eq!(d.config_read8(cap + 3), CAP_PCI_CFG);
}

#[derive(Debug, Clone)]
enum Op {
    Common { field: u8, width: u8, value: u64 },
    Status(u8),
    Notify(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0u8..0x40,
            prop::sample::select(vec![1u8, 2, 4, 8]),
            any::<u64>()
        )
            .prop_map(|(field, width, value)| Op::Common {
                field,
                width,
                value
            }),
        prop::sample::select(vec![0u8, 1, 3, 0xB, 0xF, 0x4, 0x80, 0xFF, 0x7]).prop_map(Op::Status),
        (0u16..5).prop_map(Op::Notify),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the driver writes to common config, nothing panics, the
    /// status never shows DRIVER_OK without FEATURES_OK, and the device is
    /// never activated twice without a reset (the probe asserts it).
    #[test]
    fn random_common_config_writes_keep_the_invariants(ops in prop::collection::vec(op(), 1..80)) {
        let mem = memory();
        let (probe, _, activations) = Probe::new();
        let t = PciTransport::new(
            Box::new(probe),
            mem,
            Arc::new(RecordingLine::new()),
            Arc::new(RecordingMsiVectors::new(4)),
            PciOptions::default(),
        )
        .unwrap();
        let mut last_status = 0u32;
        for op in ops {
            match op {
                Op::Common { field, width, value } => {
                    let w = usize::from(width);
                    t.bar_write(0, u64::from(field), &value.to_le_bytes()[..w]).unwrap();
                    let mut b = vec![0u8; w];
                    t.bar_read(0, u64::from(field), &mut b).unwrap();
                }
                Op::Status(s) => {
                    t.bar_write(0, cc::DEVICE_STATUS, &[s]).unwrap();
                }
                Op::Notify(q) => {
                    t.bar_write(0, 0x3000 + 4 * u64::from(q), &q.to_le_bytes()).unwrap();
                }
            }
            let s = t.status();
            if s & status::DRIVER_OK != 0 {
                prop_assert_ne!(s & status::FEATURES_OK, 0);
            }
            // Bits only disappear through a reset to 0.
            let plain = s & !status::DEVICE_NEEDS_RESET;
            prop_assert!(plain == 0 || plain & last_status == last_status,
                "{last_status:#x} -> {plain:#x}");
            last_status = plain;
            // The probe panics on a second activation without a reset; an
            // active device was activated at least once, and only with
            // DRIVER_OK set.
            if t.active() {
                prop_assert!(activations.load(Ordering::SeqCst) > 0);
                prop_assert_ne!(s & status::DRIVER_OK, 0);
            }
        }
    }
}

// ---------------------------------------------------------------------
// KVM: a tiny 64-bit guest drives virtio-rng over virtio-pci.

#[path = "../../vcpu/tests/common/mod.rs"]
mod kvm_common;

mod kvm {
    use super::*;
    use iced_x86::code_asm::*;
    use kvm_common::*;
    use vmkit_devices::pci::Bar;
    use vmkit_devices::{DeviceError, IoAction};
    use vmkit_vcpu::kvm_ioctls::{IoEventAddress, NoDatamatch};
    use vmkit_vcpu::{StopReason, Vm, VmConfig};

    /// The KVM side of [`NotifyRegistrar`]: ioeventfds on MMIO without
    /// datamatch (KVM length 0: a write of any width at the address
    /// matches). This is all a VMM needs to keep notifications in the
    /// kernel while the guest moves the BAR.
    struct KvmRegistrar {
        vm: Arc<Vm>,
        live: Mutex<BTreeSet<u64>>,
    }

    impl NotifyRegistrar for KvmRegistrar {
        fn register(&self, addr: u64, _len: u32, fd: &EventFd) -> io::Result<()> {
            self.vm
                .fd()
                .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(io::Error::from)?;
            self.live.lock().unwrap().insert(addr);
            Ok(())
        }
        fn unregister(&self, addr: u64, _len: u32, fd: &EventFd) -> io::Result<()> {
            self.vm
                .fd()
                .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(io::Error::from)?;
            self.live.lock().unwrap().remove(&addr);
            Ok(())
        }
    }

    /// Forwards everything to the transport and counts the notify writes
    /// that reach it (none must, with the ioeventfd registered).
    struct Counting {
        inner: Arc<PciTransport>,
        notifies: AtomicU32,
    }

    impl PciDevice for Counting {
        fn config_read(&self, offset: u16, data: &mut [u8]) {
            self.inner.config_read(offset, data);
        }
        fn config_write(&self, offset: u16, data: &[u8]) {
            self.inner.config_write(offset, data);
        }
        fn bars(&self) -> Vec<Bar> {
            self.inner.bars()
        }
        fn command(&self) -> u16 {
            self.inner.command()
        }
        fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
            self.inner.bar_read(bar, offset, data)
        }
        fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
            if (0x3000..0x3004).contains(&offset) {
                self.notifies.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.bar_write(bar, offset, data)
        }
    }

    const VECTOR: u8 = 0x41;
    const IDT: u64 = 0x20000;
    const IDTR: u64 = 0x21000;
    const COUNT: u64 = 0x21100;
    const HANDLER: u64 = 0x11000;
    const DESC: u32 = 0x30000;
    const AVAIL: u32 = 0x31000;
    const USED: u32 = 0x32000;
    const BUF: u32 = 0x33000;
    const BUF_LEN: u32 = 32;
    const LAPIC: u32 = 0xFEE0_0000;
    /// Where the guest moves the BAR.
    const GUEST_BAR: u32 = 0xC020_0000;
    const OK: u32 = 1;
    const FEATURES_REFUSED: u32 = 0xE1;
    const BAD_USED: u32 = 0xE2;

    /// What the guest needs to know about the function: its
    /// CONFIG_ADDRESS base, MSI-X capability and table offsets.
    struct Function {
        config_address: u32,
        msix_cap: u8,
        table_offset: u32,
    }

    fn cfg_write32(a: &mut CodeAssembler, f: &Function, reg: u8, v: u32) -> Result<(), IcedError> {
        a.mov(eax, f.config_address | u32::from(reg))?;
        a.mov(dx, 0xCF8u32)?;
        a.out(dx, eax)?;
        a.mov(eax, v)?;
        a.mov(dx, 0xCFCu32)?;
        a.out(dx, eax)
    }

    fn guest(a: &mut CodeAssembler, f: &Function) -> Result<(), IcedError> {
        let mut refused = a.create_label();
        let mut bad = a.create_label();
        a.mov(al, 0xFFu32)?;
        a.out(0x21u32, al)?;
        a.out(0xA1u32, al)?;
        a.lidt(ptr(IDTR))?;
        a.mov(ebx, LAPIC)?;
        a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?;
        // Move BAR 0 with decoding off, then memory + bus master on.
        cfg_write32(a, f, 0x04, 0)?;
        cfg_write32(a, f, 0x10, GUEST_BAR)?;
        cfg_write32(a, f, 0x14, 0)?;
        cfg_write32(a, f, 0x04, 0x6)?;
        // MSI-X entry 0 -> VECTOR on APIC 0, unmasked; MSI-X on.
        a.mov(ebx, GUEST_BAR + f.table_offset)?;
        a.mov(dword_ptr(rbx), LAPIC)?;
        a.mov(dword_ptr(rbx + 4), 0u32)?;
        a.mov(dword_ptr(rbx + 8), u32::from(VECTOR))?;
        a.mov(dword_ptr(rbx + 12), 0u32)?;
        cfg_write32(a, f, f.msix_cap, 0x8000 << 16)?;
        // virtio 1.2, 3.1.1 through the common configuration.
        a.mov(ebx, GUEST_BAR)?;
        a.mov(byte_ptr(rbx + 0x14), 1u32)?;
        a.mov(byte_ptr(rbx + 0x14), 3u32)?;
        a.mov(dword_ptr(rbx + 0x08), 1u32)?;
        a.mov(dword_ptr(rbx + 0x0C), 1u32)?; // VERSION_1
        a.mov(dword_ptr(rbx + 0x08), 0u32)?;
        a.mov(dword_ptr(rbx + 0x0C), 0u32)?;
        a.mov(byte_ptr(rbx + 0x14), 0xBu32)?;
        a.movzx(eax, byte_ptr(rbx + 0x14))?;
        a.test(eax, 8u32)?;
        a.jz(refused)?;
        a.mov(word_ptr(rbx + 0x16), 0u32)?; // queue_select
        a.mov(word_ptr(rbx + 0x18), 8u32)?; // queue_size
        a.mov(word_ptr(rbx + 0x1A), 0u32)?; // queue_msix_vector
        a.mov(dword_ptr(rbx + 0x20), DESC)?;
        a.mov(dword_ptr(rbx + 0x24), 0u32)?;
        a.mov(dword_ptr(rbx + 0x28), AVAIL)?;
        a.mov(dword_ptr(rbx + 0x2C), 0u32)?;
        a.mov(dword_ptr(rbx + 0x30), USED)?;
        a.mov(dword_ptr(rbx + 0x34), 0u32)?;
        a.mov(word_ptr(rbx + 0x1C), 1u32)?; // queue_enable
        a.mov(byte_ptr(rbx + 0x14), 0xFu32)?; // DRIVER_OK
                                              // One writable buffer, then notify queue 0 (an ioeventfd).
        a.mov(dword_ptr(u64::from(DESC)), BUF)?;
        a.mov(dword_ptr(u64::from(DESC) + 4), 0u32)?;
        a.mov(dword_ptr(u64::from(DESC) + 8), BUF_LEN)?;
        a.mov(dword_ptr(u64::from(DESC) + 12), 2u32)?;
        a.mov(word_ptr(u64::from(AVAIL) + 4), 0u32)?;
        a.mov(word_ptr(u64::from(AVAIL) + 2), 1u32)?;
        a.mov(word_ptr(rbx + 0x3000), 0u32)?;
        hlt_until(a, COUNT, 1)?;
        a.movzx(eax, word_ptr(u64::from(USED) + 2))?;
        a.cmp(eax, 1u32)?;
        a.jne(bad)?;
        a.mov(eax, dword_ptr(u64::from(USED) + 8))?;
        a.cmp(eax, BUF_LEN)?;
        a.jne(bad)?;
        a.mov(eax, OK)?;
        a.out(EXIT_PORT as u32, al)?;
        a.set_label(&mut refused)?;
        a.mov(eax, FEATURES_REFUSED)?;
        a.out(EXIT_PORT as u32, al)?;
        a.set_label(&mut bad)?;
        a.mov(eax, BAD_USED)?;
        a.out(EXIT_PORT as u32, al)
    }

    /// The MSI handler: count, EOI.
    fn handler(a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.push(rbx)?;
        a.inc(dword_ptr(COUNT))?;
        a.mov(ebx, LAPIC)?;
        a.mov(dword_ptr(rbx + 0xB0), 0u32)?;
        a.pop(rbx)?;
        a.iretq()
    }

    #[test]
    fn guest_drives_virtio_rng_over_pci_with_ioeventfd_and_msix() {
        if !kvm_available(module_path!()) {
            return;
        }
        let _dog = watchdog("virtio-pci rng guest", std::time::Duration::from_secs(60));
        // The function's layout does not depend on the VM: learn it from
        // a throw-away transport, then assemble the guest.
        let probe_t = PciTransport::new(
            Box::new(Rng::new()),
            memory(),
            Arc::new(RecordingLine::new()),
            Arc::new(RecordingMsiVectors::new(2)),
            PciOptions::default(),
        )
        .unwrap();
        let mut msix_cap = 0u8;
        let mut b = [0u8; 2];
        probe_t.config_read(0x34, &mut b[..1]);
        let mut p = b[0];
        while p != 0 {
            probe_t.config_read(u16::from(p), &mut b);
            if b[0] == 0x11 {
                msix_cap = p;
            }
            p = b[1];
        }
        assert_ne!(msix_cap, 0);
        let address = PciAddress::new(0, 1, 0).unwrap();
        let f = Function {
            config_address: address.config_address(0),
            msix_cap,
            table_offset: probe_t.layout().msix_table_offset as u32,
        };
        drop(probe_t);

        let code = assemble(64, |a| guest(a, &f));
        let (vm, mut vcpu) = boot_with(
            64,
            &code,
            VmConfig {
                irqchip: true,
                ..Default::default()
            },
        );
        let vm = Arc::new(vm);
        let handler_code = assemble_at(64, HANDLER, handler);
        install_handler(vm.memory(), IDT, IDTR, VECTOR, HANDLER, &handler_code);

        let registrar = Arc::new(KvmRegistrar {
            vm: vm.clone(),
            live: Mutex::new(BTreeSet::new()),
        });
        let transport = Arc::new(
            PciTransport::new(
                Box::new(Rng::new()),
                vm.memory().clone(),
                Arc::new(vmkit_devices::NullLine),
                vm.msi_vectors(2).unwrap() as Arc<dyn MsiVectors>,
                PciOptions {
                    registrar: Some(registrar.clone() as Arc<dyn NotifyRegistrar>),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let counting = Arc::new(Counting {
            inner: transport.clone(),
            notifies: AtomicU32::new(0),
        });
        let bus = Arc::new(bus());
        let root = PciRoot::new(
            &bus,
            PciWindows {
                io: (0xC000, 0x1000),
                mem32: (0xC000_0000, 0x1000_0000),
                mem64: (0, 0),
            },
        )
        .unwrap();
        bus.pio
            .insert(
                u64::from(CONFIG_ADDRESS_PORT),
                CONFIG_IO_LEN,
                root.config_io_device(),
            )
            .unwrap();
        assert_eq!(
            root.add_device_at(address, counting.clone()).unwrap(),
            address
        );
        // Registered where the root put the BAR first.
        let first = transport.bars()[0].address;
        assert_eq!(
            registrar.live.lock().unwrap().first(),
            Some(&(first + 0x3000))
        );

        let stop = vcpu.run(&*bus).unwrap();
        assert!(matches!(stop, StopReason::Exit(OK)), "guest said {stop:?}");
        // The guest moved the BAR; the ioeventfd followed it and carried
        // the notification without an exit to the transport.
        assert_eq!(
            registrar
                .live
                .lock()
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            vec![u64::from(GUEST_BAR) + 0x3000]
        );
        assert_eq!(counting.notifies.load(Ordering::SeqCst), 0);
        let count: u32 = vm.memory().read_obj(GuestAddress(COUNT)).unwrap();
        assert!(count >= 1);
        let mut buf = [0u8; BUF_LEN as usize];
        vm.memory()
            .read_slice(&mut buf, GuestAddress(u64::from(BUF)))
            .unwrap();
        assert!(buf.iter().any(|&b| b != 0));
        assert_eq!(bus.stats().device_errors, 0);
        // Dropping the transport takes the ioeventfds out of KVM.
        drop(bus);
        drop(root);
        drop(counting);
        drop(transport);
        assert!(registrar.live.lock().unwrap().is_empty());
    }
}
