//! Snapshot and restore of virtio transports and devices: a block device
//! driven mid-stream over both transports and both ring formats is saved
//! with requests still in the available ring, restored into a fresh device
//! over a copy of guest memory, and continues with every request completed
//! exactly once; a console saved with output half written and input
//! buffered, and a net device saved holding a frame for mergeable buffers
//! with transmit chains pending, continue with nothing lost or repeated;
//! corrupt state bytes are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{memory, TempImage, FORMATS, HEAP, TIMEOUT};
use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::pci::{PciAddress, PciRoot, PciWindows, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN};
use vmkit_devices::{
    InterruptLine, IoBus, MsiVectors, RecordingLine, RecordingMsiVectors, StateError,
};
use vmkit_memory::GuestMemoryMmap;
use vmkit_virtio::devices::console::ConsoleState;
use vmkit_virtio::devices::net::{FrameBufs, NetState, PairBackend};
use vmkit_virtio::devices::{
    Block, BlockOptions, Console, ConsoleBackend, ConsoleOptions, Net, NetBackend, NetOptions,
    NetPair, Rng,
};
use vmkit_virtio::driver::{Driver, DriverTransport, MmioDriver, PciConfigAccess, PciDriver};
use vmkit_virtio::queue::RingFormat;
use vmkit_virtio::transport::{
    MmioOptions, MmioState, MmioTransport, PciOptions, PciState, PciTransport,
};
use vmkit_virtio::VirtioDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

// ---------------------------------------------------------------------
// Console and net: saved while active with traffic in flight.
// ---------------------------------------------------------------------

/// A test that drives a device on the source, checks its saved device
/// state, and continues on a restored device.
trait Scenario {
    /// Features the driver asks for.
    fn wanted(&self) -> u64;
    /// The source and target devices.
    fn devices(&mut self) -> (Box<dyn VirtioDevice>, Box<dyn VirtioDevice>);
    /// Phase 1 on the source, leaving traffic in flight.
    fn before<T: DriverTransport>(&mut self, d: &mut Driver<T>);
    /// Whether the source reached the state to save (polled: the source is
    /// saved, checked, and resumed until this says yes).
    fn ready(&mut self, device_state: &[u8]) -> bool;
    /// Phase 2 on the restored target.
    fn after<T: DriverTransport>(&mut self, d: &mut Driver<T>);
}

/// Saves the source until the scenario is ready (resuming it between
/// tries); returns the state, left paused.
fn save_when_ready<S: Scenario, St>(
    s: &mut S,
    save: impl Fn() -> St,
    device_state: impl Fn(&St) -> Vec<u8>,
    resume: impl Fn(),
) -> St {
    let start = std::time::Instant::now();
    loop {
        let st = save();
        if s.ready(&device_state(&st)) {
            return st;
        }
        resume();
        assert!(
            start.elapsed() < TIMEOUT,
            "source never reached the state to save"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

fn run_over_mmio<S: Scenario>(s: &mut S, format: RingFormat) {
    let (src_dev, dst_dev) = s.devices();
    let mem = memory();
    let line = || Arc::new(RecordingLine::new()) as Arc<dyn InterruptLine>;
    let source =
        Arc::new(MmioTransport::new(src_dev, mem.clone(), line(), MmioOptions::default()).unwrap());
    let mut d = Driver::new(MmioDriver::new(source.clone()), mem.clone(), HEAP);
    d.negotiate(format, s.wanted()).unwrap();
    s.before(&mut d);
    let state = save_when_ready(
        s,
        || source.save_state().unwrap(),
        |st| st.core.device_state.clone(),
        || source.resume(),
    );
    let bytes = state.to_bytes();
    assert_eq!(MmioState::from_bytes(&bytes).unwrap(), state);
    let copy = copy_memory(&mem);
    drop(source);
    let target = Arc::new(
        MmioTransport::new(dst_dev, copy.clone(), line(), MmioOptions::default()).unwrap(),
    );
    target
        .restore_state(&MmioState::from_bytes(&bytes).unwrap())
        .unwrap();
    let mut d = d.rebind(MmioDriver::new(target), copy);
    s.after(&mut d);
}

fn run_over_pci<S: Scenario>(s: &mut S, format: RingFormat) {
    let (src_dev, dst_dev) = s.devices();
    let mem = memory();
    let make = |dev, mem: &GuestMemoryMmap, p: &Platform| {
        Arc::new(
            PciTransport::new(
                dev,
                mem.clone(),
                Arc::new(RecordingLine::new()) as Arc<dyn InterruptLine>,
                p.msi.clone() as Arc<dyn MsiVectors>,
                PciOptions::default(),
            )
            .unwrap(),
        )
    };
    let src = platform();
    let source = make(src_dev, &mem, &src);
    let address = src.root.add_device(source.clone()).unwrap();
    let pd = PciDriver::probe(src.bus.clone(), address, PciConfigAccess::Ports).unwrap();
    pd.assign_msix(2, &[0, 1]);
    let mut d = Driver::new(pd, mem.clone(), HEAP);
    d.negotiate(format, s.wanted()).unwrap();
    for v in 0..3u16 {
        let msg = vmkit_devices::MsiMessage::new(0xFEE0_0000, 0x40 + u32::from(v));
        d.transport().set_msix_entry(v, msg, false);
    }
    d.transport().set_msix_enabled(true).unwrap();
    s.before(&mut d);
    let state = save_when_ready(
        s,
        || source.save_state().unwrap(),
        |st| st.core.device_state.clone(),
        || source.resume(),
    );
    let bytes = state.to_bytes();
    assert_eq!(PciState::from_bytes(&bytes).unwrap(), state);
    let root_state = src.root.save_state();
    let copy = copy_memory(&mem);
    drop(source);

    let dst = platform();
    let target = make(dst_dev, &copy, &dst);
    assert_eq!(dst.root.add_device(target.clone()).unwrap(), address);
    target
        .restore_state(&PciState::from_bytes(&bytes).unwrap())
        .unwrap();
    dst.root.restore_state(&root_state).unwrap();
    let pd = PciDriver::probe(dst.bus.clone(), address, PciConfigAccess::Ports).unwrap();
    let mut d = d.rebind(pd, copy);
    s.after(&mut d);
}

/// A console backend under the test's control: output goes to a shared
/// buffer, at most `budget` bytes of it (then `WouldBlock`); input is
/// served from a shared queue, announced through an eventfd.
#[derive(Debug)]
struct TestConsole {
    out: Arc<Mutex<Vec<u8>>>,
    budget: Arc<AtomicUsize>,
    input: Arc<Mutex<VecDeque<u8>>>,
    ready: Arc<EventFd>,
}

impl TestConsole {
    fn new(budget: usize) -> Self {
        Self {
            out: Arc::default(),
            budget: Arc::new(AtomicUsize::new(budget)),
            input: Arc::default(),
            ready: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        }
    }

    fn handles(&self) -> Self {
        Self {
            out: self.out.clone(),
            budget: self.budget.clone(),
            input: self.input.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl ConsoleBackend for TestConsole {
    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.ready.as_raw_fd())
    }

    fn read_input(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let _ = self.ready.read();
        let mut q = self.input.lock().unwrap();
        let n = buf.len().min(q.len());
        for (b, v) in buf.iter_mut().zip(q.drain(..n)) {
            *b = v;
        }
        Ok(n)
    }

    fn write_output(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.budget.load(Ordering::SeqCst);
        if room == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = room.min(buf.len());
        self.budget.fetch_sub(n, Ordering::SeqCst);
        self.out.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Output: a 300-byte and a 200-byte chain; the source's backend takes
/// 100 bytes and blocks. Input: 11 bytes read from the backend while the
/// guest has no receive buffer.
struct ConsoleScenario {
    src: TestConsole,
    dst: TestConsole,
    output: Vec<u8>,
}

const CONSOLE_INPUT: &[u8] = b"hello world";

impl ConsoleScenario {
    fn new() -> Self {
        Self {
            src: TestConsole::new(100),
            dst: TestConsole::new(usize::MAX),
            output: (0..500u32).map(|i| (i * 13 % 251) as u8).collect(),
        }
    }
}

impl Scenario for ConsoleScenario {
    fn wanted(&self) -> u64 {
        0
    }

    fn devices(&mut self) -> (Box<dyn VirtioDevice>, Box<dyn VirtioDevice>) {
        let dev = |b: &TestConsole| {
            Box::new(Console::new(Box::new(b.handles()), ConsoleOptions::default()).unwrap())
                as Box<dyn VirtioDevice>
        };
        (dev(&self.src), dev(&self.dst))
    }

    fn before<T: DriverTransport>(&mut self, d: &mut Driver<T>) {
        self.src.input.lock().unwrap().extend(CONSOLE_INPUT);
        self.src.ready.write(1).unwrap();
        for part in [&self.output[..300], &self.output[300..]] {
            let b = d.alloc(part.len() as u64);
            d.mem().write_slice(part, GuestAddress(b)).unwrap();
            d.submit(CONSOLE_TX, &[(b, part.len() as u32)], &[])
                .unwrap();
        }
        d.notify(CONSOLE_TX).unwrap();
    }

    fn ready(&mut self, device_state: &[u8]) -> bool {
        let s = ConsoleState::from_bytes(device_state).unwrap();
        if s.tx_done != 100 || s.input.len() != CONSOLE_INPUT.len() {
            return false;
        }
        assert_eq!(s.input, CONSOLE_INPUT, "buffered input kept in order");
        assert_eq!(*self.src.out.lock().unwrap(), self.output[..100]);
        true
    }

    fn after<T: DriverTransport>(&mut self, d: &mut Driver<T>) {
        // The partly written chain and the next one complete, each once,
        // with the output continuing exactly where the source stopped.
        let mut heads = vec![
            d.wait_used(CONSOLE_TX, TIMEOUT).unwrap().0,
            d.wait_used(CONSOLE_TX, TIMEOUT).unwrap().0,
        ];
        heads.dedup();
        assert_eq!(heads.len(), 2);
        assert_eq!(d.used(CONSOLE_TX).unwrap(), None, "a chain used twice");
        let mut all = self.src.out.lock().unwrap().clone();
        all.extend_from_slice(&self.dst.out.lock().unwrap());
        assert_eq!(all, self.output, "no output byte lost or repeated");
        // The buffered input reaches the guest's first receive buffer.
        let b = d.alloc(64);
        d.submit(CONSOLE_RX, &[], &[(b, 64)]).unwrap();
        d.notify(CONSOLE_RX).unwrap();
        let (_, len) = d.wait_used(CONSOLE_RX, TIMEOUT).unwrap();
        let mut got = vec![0u8; len as usize];
        d.mem().read_slice(&mut got, GuestAddress(b)).unwrap();
        assert_eq!(got, CONSOLE_INPUT);
    }
}

const CONSOLE_RX: u16 = 0;
const CONSOLE_TX: u16 = 1;

#[test]
fn console_saved_mid_output_loses_and_repeats_nothing() {
    for format in FORMATS {
        run_over_mmio(&mut ConsoleScenario::new(), format);
        run_over_pci(&mut ConsoleScenario::new(), format);
    }
}

/// Receive: two frames delivered, then a 3000-byte frame waiting for
/// mergeable buffers (the guest posted one 1500-byte buffer). Transmit: one
/// frame sent, two left in the available ring.
struct NetScenario {
    src: Option<PairBackend>,
    src_peer: PairBackend,
    dst: Option<PairBackend>,
    dst_peer: PairBackend,
    rx_first: u64,
}

const NET_RX: u16 = 0;
const NET_TX: u16 = 1;
const MRG_RXBUF: u64 = 1 << 15;

fn net_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; vmkit_virtio::devices::net::HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

fn peer_send(p: &mut PairBackend, frame: &[u8]) {
    let mut f = frame.to_vec();
    p.send(&mut FrameBufs::from_slice(&mut f)).unwrap();
}

fn peer_recv(p: &mut PairBackend) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    match p.recv(&mut FrameBufs::from_slice(&mut buf)) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        // Nothing waiting, or (the source's peer after the source device
        // was dropped) nothing waiting and nobody left to send.
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            None
        }
        Err(e) => panic!("peer recv: {e}"),
    }
}

fn peer_wait(p: &mut PairBackend) -> Vec<u8> {
    let start = std::time::Instant::now();
    loop {
        if let Some(f) = peer_recv(p) {
            return f;
        }
        assert!(start.elapsed() < TIMEOUT, "no frame from the device");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

impl NetScenario {
    fn new() -> Self {
        let (a, b) = NetPair::new().unwrap();
        let (c, e) = NetPair::new().unwrap();
        Self {
            src: Some(a),
            src_peer: b,
            dst: Some(c),
            dst_peer: e,
            rx_first: 0,
        }
    }
}

fn read_used<T: DriverTransport>(d: &Driver<T>, addr: u64, len: u32) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    d.mem().read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

fn submit_frame<T: DriverTransport>(d: &mut Driver<T>, frame: &[u8]) {
    let b = d.alloc(frame.len() as u64);
    d.mem().write_slice(frame, GuestAddress(b)).unwrap();
    d.submit(NET_TX, &[(b, frame.len() as u32)], &[]).unwrap();
}

impl Scenario for NetScenario {
    fn wanted(&self) -> u64 {
        MRG_RXBUF
    }

    fn devices(&mut self) -> (Box<dyn VirtioDevice>, Box<dyn VirtioDevice>) {
        let dev = |b: PairBackend| {
            Box::new(Net::new(Box::new(b), NetOptions::default()).unwrap()) as Box<dyn VirtioDevice>
        };
        (dev(self.src.take().unwrap()), dev(self.dst.take().unwrap()))
    }

    fn before<T: DriverTransport>(&mut self, d: &mut Driver<T>) {
        assert_ne!(d.features() & MRG_RXBUF, 0);
        // Two small frames delivered into two large buffers.
        for seed in 0..2u8 {
            let b = d.alloc(2048);
            d.submit(NET_RX, &[], &[(b, 2048)]).unwrap();
            d.notify(NET_RX).unwrap();
            let f = net_frame(100, seed);
            peer_send(&mut self.src_peer, &f);
            let (_, len) = d.wait_used(NET_RX, TIMEOUT).unwrap();
            let mut got = read_used(d, b, len);
            got[10] = 0; // num_buffers
            got[11] = 0;
            assert_eq!(got, f);
        }
        // One 1500-byte buffer for a 3000-byte frame: the device holds it.
        self.rx_first = d.alloc(1500);
        d.submit(NET_RX, &[], &[(self.rx_first, 1500)]).unwrap();
        d.notify(NET_RX).unwrap();
        peer_send(&mut self.src_peer, &net_frame(2988, 7));
        // Transmit: one frame sent now, two left available un-notified.
        submit_frame(d, &net_frame(60, 20));
        d.notify(NET_TX).unwrap();
        d.wait_used(NET_TX, TIMEOUT).unwrap();
        assert_eq!(peer_wait(&mut self.src_peer), net_frame(60, 20));
        submit_frame(d, &net_frame(61, 21));
        submit_frame(d, &net_frame(62, 22));
    }

    fn ready(&mut self, device_state: &[u8]) -> bool {
        let s = NetState::from_bytes(device_state).unwrap();
        match s.rx_frame {
            Some(f) => {
                let mut want = net_frame(2988, 7);
                want[10] = f[10];
                want[11] = f[11];
                assert_eq!(f, want);
                true
            }
            None => false,
        }
    }

    fn after<T: DriverTransport>(&mut self, d: &mut Driver<T>) {
        // The two pending transmit chains go out once each, in order, on
        // the restored device's backend; the source's peer got nothing
        // more.
        assert_eq!(peer_wait(&mut self.dst_peer), net_frame(61, 21));
        assert_eq!(peer_wait(&mut self.dst_peer), net_frame(62, 22));
        d.wait_used(NET_TX, TIMEOUT).unwrap();
        d.wait_used(NET_TX, TIMEOUT).unwrap();
        assert_eq!(d.used(NET_TX).unwrap(), None);
        assert!(peer_recv(&mut self.src_peer).is_none());
        // The held frame is delivered once, across the old buffer and a
        // new one.
        let second = d.alloc(2048);
        d.submit(NET_RX, &[], &[(second, 2048)]).unwrap();
        d.notify(NET_RX).unwrap();
        let (_, l1) = d.wait_used(NET_RX, TIMEOUT).unwrap();
        let (_, l2) = d.wait_used(NET_RX, TIMEOUT).unwrap();
        assert_eq!(l1, 1500);
        let mut got = read_used(d, self.rx_first, l1);
        got.extend(read_used(d, second, l2));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2);
        let mut want = net_frame(2988, 7);
        want[10] = 2;
        assert_eq!(got, want);
        assert_eq!(
            d.used(NET_RX).unwrap(),
            None,
            "the frame was delivered twice"
        );
        // New traffic flows on the restored backend.
        let b = d.alloc(2048);
        d.submit(NET_RX, &[], &[(b, 2048)]).unwrap();
        d.notify(NET_RX).unwrap();
        peer_send(&mut self.dst_peer, &net_frame(80, 9));
        let (_, len) = d.wait_used(NET_RX, TIMEOUT).unwrap();
        assert_eq!(read_used(d, b, len)[12..], net_frame(80, 9)[12..]);
    }
}

#[test]
fn net_saved_with_a_held_frame_delivers_it_once() {
    for format in FORMATS {
        run_over_mmio(&mut NetScenario::new(), format);
        run_over_pci(&mut NetScenario::new(), format);
    }
}

#[test]
fn console_and_net_device_state_is_checked() {
    let s = ConsoleState {
        broken: false,
        tx_done: 5,
        input: b"abc".to_vec(),
    };
    let bytes = s.to_bytes();
    assert_eq!(ConsoleState::from_bytes(&bytes).unwrap(), s);
    for n in 0..bytes.len() {
        assert!(ConsoleState::from_bytes(&bytes[..n]).is_err());
    }
    // More buffered input than the target's buffer holds.
    let mut small = Console::new(
        Box::new(TestConsole::new(0)),
        ConsoleOptions {
            input_buffer: 2,
            ..ConsoleOptions::default()
        },
    )
    .unwrap();
    assert!(matches!(
        small.restore_device_state(&bytes),
        Err(StateError::Mismatch { .. })
    ));
    assert_eq!(
        small.save_device_state(),
        ConsoleState::default().to_bytes()
    );

    let n = NetState {
        rx_broken: true,
        tx_broken: false,
        rx_frame: Some(vec![0; 20]),
    };
    let bytes = n.to_bytes();
    assert_eq!(NetState::from_bytes(&bytes).unwrap(), n);
    for k in 0..bytes.len() {
        assert!(NetState::from_bytes(&bytes[..k]).is_err());
    }
    let short = NetState {
        rx_frame: Some(vec![0; 11]),
        ..n.clone()
    };
    assert!(matches!(
        NetState::from_bytes(&short.to_bytes()),
        Err(StateError::Invalid {
            field: "rx_frame",
            ..
        })
    ));
    let mut bad = bytes.clone();
    bad[5] = 2;
    assert!(NetState::from_bytes(&bad).is_err());
    // The console's tag is not the net device's.
    let (a, _b) = NetPair::new().unwrap();
    let mut net = Net::new(Box::new(a), NetOptions::default()).unwrap();
    assert!(matches!(
        net.restore_device_state(&s.to_bytes()),
        Err(StateError::Tag { .. })
    ));
}
