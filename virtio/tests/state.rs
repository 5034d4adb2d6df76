//! Snapshot and restore of virtio transports and devices: a block device
//! driven mid-stream over both transports and both ring formats is saved
//! with requests still in the available ring, restored into a fresh device
//! over a copy of guest memory, and continues with every request completed
//! exactly once; corrupt state bytes are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{memory, TempImage, FORMATS, HEAP, TIMEOUT};
use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::pci::{PciAddress, PciRoot, PciWindows, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN};
use vmkit_devices::{
    InterruptLine, IoBus, MsiVectors, RecordingLine, RecordingMsiVectors, StateError,
};
use vmkit_memory::GuestMemoryMmap;
use vmkit_virtio::devices::{Block, BlockOptions, Rng};
use vmkit_virtio::driver::{Driver, DriverTransport, MmioDriver, PciConfigAccess, PciDriver};
use vmkit_virtio::queue::RingFormat;
use vmkit_virtio::transport::{
    MmioOptions, MmioState, MmioTransport, PciOptions, PciState, PciTransport,
};

const SECTORS: usize = 64;
/// Bytes of guest memory copied into the restored VM (rings and buffers
/// live above `HEAP`, well below this).
const COPY: usize = 8 << 20;
const MEM32: (u64, u64) = (0xC000_0000, 0x1000_0000);

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(7) ^ (i / 512)) as u8
}

fn block(image: &TempImage) -> Box<Block> {
    Box::new(Block::open(&image.path, BlockOptions::default()).unwrap())
}

/// A fresh VM's memory holding a copy of `mem`.
fn copy_memory(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    let mut buf = vec![0u8; COPY];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    let copy = memory();
    copy.write_slice(&buf, GuestAddress(0)).unwrap();
    copy
}

/// A read request in flight: where its data and status land.
#[derive(Debug, Clone, Copy)]
struct Pending {
    sector: u64,
    data: u64,
    status: u64,
}

/// Puts a one-sector read of `sector` in the available ring (no notify).
fn submit_read<T: DriverTransport>(
    d: &mut Driver<T>,
    sector: u64,
    inflight: &mut BTreeMap<u16, Pending>,
) {
    let hdr = d.alloc(16);
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem().write_slice(&h, GuestAddress(hdr)).unwrap();
    let data = d.alloc(512);
    let status = d.alloc(1);
    d.mem().write_slice(&[0xEE], GuestAddress(status)).unwrap();
    let head = d
        .submit(0, &[(hdr, 16)], &[(data, 512), (status, 1)])
        .unwrap();
    let old = inflight.insert(
        head,
        Pending {
            sector,
            data,
            status,
        },
    );
    assert!(old.is_none(), "head {head} reused while in flight");
}

/// Waits for `n` completions and checks each one's data; a completion of
/// a request not in flight (lost or repeated) fails.
fn complete<T: DriverTransport>(
    d: &mut Driver<T>,
    n: usize,
    inflight: &mut BTreeMap<u16, Pending>,
    done: &mut Vec<u64>,
) {
    for _ in 0..n {
        let (head, len) = d.wait_used(0, TIMEOUT).unwrap();
        let p = inflight
            .remove(&head)
            .unwrap_or_else(|| panic!("completion of head {head}, which is not in flight"));
        assert_eq!(len, 513);
        let mut st = [0u8];
        d.mem().read_slice(&mut st, GuestAddress(p.status)).unwrap();
        assert_eq!(st[0], 0, "status of sector {}", p.sector);
        let mut buf = vec![0u8; 512];
        d.mem().read_slice(&mut buf, GuestAddress(p.data)).unwrap();
        let base = p.sector as usize * 512;
        let want: Vec<u8> = (base..base + 512).map(pattern).collect();
        assert_eq!(buf, want, "data of sector {}", p.sector);
        done.push(p.sector);
    }
}

/// Phase 1 on the source: 3 requests completed; then 5 left in the
/// available ring without a notification.
fn drive_source<T: DriverTransport>(
    d: &mut Driver<T>,
    inflight: &mut BTreeMap<u16, Pending>,
    done: &mut Vec<u64>,
) {
    for s in 0..3 {
        submit_read(d, s, inflight);
    }
    d.notify(0).unwrap();
    complete(d, 3, inflight, done);
    for s in 3..8 {
        submit_read(d, s, inflight);
    }
}

/// Phase 2 on the restored device: the 5 pending requests complete
/// (the restore re-notifies the queue), then 4 more after a notify.
fn drive_restored<T: DriverTransport>(
    d: &mut Driver<T>,
    inflight: &mut BTreeMap<u16, Pending>,
    done: &mut Vec<u64>,
) {
    complete(d, 5, inflight, done);
    for s in 8..12 {
        submit_read(d, s, inflight);
    }
    d.notify(0).unwrap();
    complete(d, 4, inflight, done);
    assert!(inflight.is_empty());
    assert_eq!(d.used(0).unwrap(), None, "a request completed twice");
    let mut sorted = done.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..12).collect::<Vec<u64>>());
}

#[test]
fn block_over_mmio_continues_after_restore() {
    for format in FORMATS {
        let image = TempImage::new(SECTORS * 512, pattern);
        let mem = memory();
        let line = Arc::new(RecordingLine::new());
        let source = Arc::new(
            MmioTransport::new(
                block(&image),
                mem.clone(),
                line.clone() as Arc<dyn InterruptLine>,
                MmioOptions::default(),
            )
            .unwrap(),
        );
        let mut d = Driver::new(MmioDriver::new(source.clone()), mem.clone(), HEAP);
        d.negotiate(format, 0).unwrap();
        let (mut inflight, mut done) = (BTreeMap::new(), Vec::new());
        drive_source(&mut d, &mut inflight, &mut done);

        let state = source.save_state().unwrap();
        let bytes = state.to_bytes();
        let copy = copy_memory(&mem);
        // The paused source did not touch the pending requests.
        assert_eq!(d.used(0).unwrap(), None);
        assert_eq!(inflight.len(), 5);
        let progress = state.core.queues[0].progress.unwrap();
        match format {
            RingFormat::Split => assert_eq!((progress.next_avail, progress.next_used), (3, 3)),
            // Each 3-descriptor chain takes 3 ring slots.
            RingFormat::Packed => assert_eq!((progress.next_avail, progress.next_used), (9, 9)),
        }
        // save → decode → encode is the identity.
        assert_eq!(MmioState::from_bytes(&bytes).unwrap(), state);

        let target = Arc::new(
            MmioTransport::new(
                block(&image),
                copy.clone(),
                Arc::new(RecordingLine::new()) as Arc<dyn InterruptLine>,
                MmioOptions::default(),
            )
            .unwrap(),
        );
        target
            .restore_state(&MmioState::from_bytes(&bytes).unwrap())
            .unwrap();
        let mut d = d.rebind(MmioDriver::new(target.clone()), copy);
        drop(source);
        drive_restored(&mut d, &mut inflight, &mut done);
        // A second save of the restored device carries on from there.
        let again = target.save_state().unwrap();
        target.resume();
        assert_eq!(again.core.driver_features, state.core.driver_features);
        assert!(again.core.active);
        let p = again.core.queues[0].progress.unwrap();
        assert_eq!(p.next_avail, p.next_used);
        assert_ne!(p, progress);
    }
}

struct Platform {
    bus: Arc<IoBus>,
    root: Arc<PciRoot>,
    msi: Arc<RecordingMsiVectors>,
}

fn platform() -> Platform {
    let bus = Arc::new(IoBus::new());
    let root = PciRoot::new(
        &bus,
        PciWindows {
            io: (0xC000, 0x1000),
            mem32: MEM32,
            mem64: (1 << 36, 1 << 36),
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
    Platform {
        bus,
        root,
        msi: Arc::new(RecordingMsiVectors::new(4)),
    }
}

fn pci_transport(image: &TempImage, mem: &GuestMemoryMmap, p: &Platform) -> Arc<PciTransport> {
    Arc::new(
        PciTransport::new(
            block(image),
            mem.clone(),
            Arc::new(RecordingLine::new()) as Arc<dyn InterruptLine>,
            p.msi.clone() as Arc<dyn MsiVectors>,
            PciOptions::default(),
        )
        .unwrap(),
    )
}

#[test]
fn block_over_pci_continues_after_restore() {
    for format in FORMATS {
        let image = TempImage::new(SECTORS * 512, pattern);
        let mem = memory();
        let src = platform();
        let source = pci_transport(&image, &mem, &src);
        let address = src.root.add_device(source.clone()).unwrap();
        let pd = PciDriver::probe(src.bus.clone(), address, PciConfigAccess::Ports).unwrap();
        pd.assign_msix(1, &[0]);
        let mut d = Driver::new(pd, mem.clone(), HEAP);
        d.negotiate(format, 0).unwrap();
        for v in 0..2u16 {
            let msg = vmkit_devices::MsiMessage::new(0xFEE0_0000, 0x40 + u32::from(v));
            d.transport().set_msix_entry(v, msg, false);
        }
        d.transport().set_msix_enabled(true).unwrap();
        let (mut inflight, mut done) = (BTreeMap::new(), Vec::new());
        drive_source(&mut d, &mut inflight, &mut done);

        let state = source.save_state().unwrap();
        let bytes = state.to_bytes();
        let copy = copy_memory(&mem);
        assert_eq!(PciState::from_bytes(&bytes).unwrap(), state);
        assert_eq!(state.queue_vectors, vec![0]);
        assert_eq!(state.config_vector, 1);
        assert!(state.msix.enabled);
        assert_eq!(state.msix.entries[0][2], 0x40);
        let bar = src.root.mapped_bars(address);
        let root_state = src.root.save_state();

        // A fresh platform: the function is added, its state restored,
        // then the root maps the restored BAR where the guest had it.
        let dst = platform();
        let target = pci_transport(&image, &copy, &dst);
        let address2 = dst.root.add_device(target.clone()).unwrap();
        assert_eq!(address2, address);
        target
            .restore_state(&PciState::from_bytes(&bytes).unwrap())
            .unwrap();
        dst.root.restore_state(&root_state).unwrap();
        assert_eq!(dst.root.mapped_bars(address), bar);
        assert!(target.active());
        assert!(target.msix().enabled());

        let pd = PciDriver::probe(dst.bus.clone(), address, PciConfigAccess::Ports).unwrap();
        let mut d = d.rebind(pd, copy);
        drop(source);
        drive_restored(&mut d, &mut inflight, &mut done);
        // The restored MSI-X routing delivered the queue vector.
        assert!(dst
            .msi
            .take_events()
            .iter()
            .any(|e| matches!(e, vmkit_devices::MsiEvent::Fired(0, Some(_)))));
    }
}

#[test]
fn corrupt_state_is_refused() {
    let image = TempImage::new(SECTORS * 512, pattern);
    let mem = memory();
    let t = Arc::new(
        MmioTransport::new(
            block(&image),
            mem.clone(),
            Arc::new(RecordingLine::new()) as Arc<dyn InterruptLine>,
            MmioOptions::default(),
        )
        .unwrap(),
    );
    let mut d = Driver::new(MmioDriver::new(t.clone()), mem.clone(), HEAP);
    d.negotiate(RingFormat::Split, 0).unwrap();
    let state = t.save_state().unwrap();
    let bytes = state.to_bytes();
    // Every truncation is refused without a panic.
    for n in 0..bytes.len() {
        assert!(MmioState::from_bytes(&bytes[..n]).is_err(), "prefix {n}");
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        MmioState::from_bytes(&long),
        Err(StateError::Trailing { extra: 1, .. })
    ));
    let mut v2 = bytes.clone();
    v2[4] = 2;
    assert!(matches!(
        MmioState::from_bytes(&v2),
        Err(StateError::Version { found: 2, .. })
    ));
    // Progress that claims more chains in flight than the ring holds.
    let mut bad = state.clone();
    let size = bad.core.queues[0].size;
    if let Some(p) = bad.core.queues[0].progress.as_mut() {
        p.next_avail = p.next_used.wrapping_add(size + 1);
    }
    assert!(matches!(
        MmioState::from_bytes(&bad.to_bytes()),
        Err(StateError::Invalid { .. })
    ));
    // A split queue whose size is not a power of two is refused at
    // restore, leaving the fresh transport untouched.
    let mut bad = state.clone();
    bad.core.queues[0].size = 100;
    if let Some(p) = bad.core.queues[0].progress.as_mut() {
        p.next_avail = 0;
        p.next_used = 0;
    }
    let fresh = MmioTransport::new(
        block(&image),
        mem.clone(),
        Arc::new(RecordingLine::new()) as Arc<dyn InterruptLine>,
        MmioOptions::default(),
    )
    .unwrap();
    assert!(fresh.restore_state(&bad).is_err());
    assert_eq!(fresh.status(), 0);
    // A state of another device type (one queue vs. rng's one queue but
    // block-only features) is refused.
    let rng = MmioTransport::new(
        Box::new(Rng::new()),
        mem.clone(),
        Arc::new(RecordingLine::new()) as Arc<dyn InterruptLine>,
        MmioOptions::default(),
    )
    .unwrap();
    let mut foreign = state.clone();
    foreign.core.driver_features |= 1 << 5;
    assert!(matches!(
        rng.restore_state(&foreign),
        Err(StateError::Mismatch { .. })
    ));
    // Restoring into a transport that is already in use is refused.
    assert!(matches!(
        t.restore_state(&state),
        Err(StateError::Mismatch { .. })
    ));
    t.resume();

    // PCI: a queue vector beyond the MSI-X table.
    let p = platform();
    let t = pci_transport(&image, &mem, &p);
    assert_eq!(
        p.root.add_device(t.clone()).unwrap(),
        PciAddress::new(0, 1, 0).unwrap()
    );
    let mut s = t.save_state().unwrap();
    s.queue_vectors[0] = 7;
    assert!(matches!(
        PciState::from_bytes(&s.to_bytes()),
        Err(StateError::Invalid { .. })
    ));
    // A config space of another device (different device ID).
    let mut s = t.save_state().unwrap();
    s.config.bytes[2] ^= 1;
    assert!(matches!(
        t.restore_state(&s),
        Err(StateError::Mismatch { .. })
    ));
}
