//! virtio-net (virtio 1.2, 5.1): one receive/transmit queue pair over a
//! [`NetBackend`] (a [`Tap`] device, or a [`NetPair`] end for tests).
//!
//! Every frame between guest and backend carries the 12-byte
//! `virtio_net_hdr_v1` in front of the Ethernet frame, unchanged: the
//! backend (a tap opened with `IFF_VNET_HDR` and a 12-byte header size)
//! does the checksum and segmentation work the header asks for. Offloads
//! the guest accepted (`GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_ECN`) are
//! handed to the backend at activation from the *negotiated* features.
//!
//! Receive: without `VIRTIO_NET_F_MRG_RXBUF` each frame goes into one
//! chain; a frame larger than the chain is dropped and counted (the chain
//! stays available for the next frame). With it, a frame spans as many
//! chains as it needs and `num_buffers` in the first header says how many.
//! A frame is received straight into the first chain; when the chain is
//! smaller than [`MAX_FRAME_LEN`] the device's bounce buffer follows it in
//! the same system call and catches the rest of a frame that does not fit
//! (copied on into further chains, or dropped without mergeable buffers),
//! so a frame is never truncated and one that fits is never copied. When the guest has no receive buffers the device stops
//! reading the backend (frames wait in the backend's queue) until the
//! driver adds buffers and notifies.
//!
//! Transmit: each chain is one frame, written to the backend straight from
//! guest memory. A chain with device-writable buffers, a header shorter
//! than 12 bytes, a frame over [`MAX_FRAME_LEN`] or an offload the driver
//! did not negotiate is returned unsent (used length 0) and counted in
//! `tx_errors`; a frame the backend refuses is counted in `tx_dropped`.
//!
//! Work per wake-up is bounded on both queues; counters ([`NetStats`]) are
//! readable at any time through [`Net::stats`].
//!
//! Snapshots: the worker handles one event at a time and ends each with no
//! chain popped and unused, so [`VirtioDevice::pause`] always stops it at a
//! frame boundary: every frame is either wholly in the receive ring (its
//! chains used) or not in it at all, and every transmit chain is either
//! sent and used or still available. The one frame the device can hold
//! between events (received from the backend, waiting for enough mergeable
//! buffers) is carried in [`NetState`] and delivered once after the next
//! activation, so it is neither lost nor delivered twice. What a snapshot
//! does *not* hold is what the backend holds: frames queued in the tap (or
//! socket) and not yet read. Resuming in the same process keeps them;
//! restoring with a new backend loses them, as a NIC drops frames when its
//! link goes down; the guest's protocols retransmit.

mod bufs;
mod pair;
mod tap;

use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice};
use crate::device_type;
use crate::queue::{ChainReader, DescChain, Queue, QueueError};
use crate::worker::{
    drain_eventfd, Batched, Completion, ServedQueue, Worker, WorkerHandler, WorkerOptions,
    WorkerSource, DEFAULT_POLL_US, MAX_POLL_US,
};
use vmkit_devices::state::{StateReader, StateWriter};
use vmkit_devices::StateError;

pub use bufs::{FrameBufs, MAX_BATCH_IOVECS, MAX_IOVECS};
pub use pair::{NetPair, PairBackend};
pub use tap::{Tap, TapError};

/// Length of `virtio_net_hdr_v1` (with `VIRTIO_F_VERSION_1`).
pub const HDR_LEN: usize = 12;
/// Largest frame, header included: 64 KiB of TSO payload plus Ethernet and
/// virtio-net headers (virtio 1.2, 5.1.6.3.1).
pub const MAX_FRAME_LEN: usize = 65562;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Length of the configuration space: mac, status, max_virtqueue_pairs,
/// mtu.
const CONFIG_LEN: usize = 12;
/// Frames received per wake-up at most, per queue-size unit (as
/// `drain_queue` does for transmit).
const RX_LAPS: usize = 2;

/// `TUNSETOFFLOAD` flags (linux/if_tun.h): what the backend may hand to the
/// device with offloads still pending.
pub mod offload {
    /// Partial checksums (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub const CSUM: u32 = 0x01;
    /// TCPv4 segmentation.
    pub const TSO4: u32 = 0x02;
    /// TCPv6 segmentation.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = 0x08;
}

/// A network backend: where transmitted frames go and received frames come
/// from. Every frame starts with the 12-byte virtio-net header.
pub trait NetBackend: Send + std::fmt::Debug {
    /// A descriptor that polls readable when a frame can be received and
    /// writable when one can be sent (registered edge-triggered).
    fn raw_fd(&self) -> RawFd;

    /// Receives one frame into `bufs`. Returns the frame's length, which
    /// is larger than `bufs.len()` if the frame was truncated (a backend
    /// that cannot tell is always given [`MAX_FRAME_LEN`] bytes). Fails
    /// with `WouldBlock` when no frame is waiting.
    fn recv(&mut self, bufs: &mut FrameBufs<'_>) -> io::Result<usize>;

    /// Sends the frame in `bufs` whole. Fails with `WouldBlock` when the
    /// backend cannot take it now (the device retries when `raw_fd`
    /// becomes writable).
    fn send(&mut self, bufs: &mut FrameBufs<'_>) -> io::Result<()>;

    /// Sends the frames in `frames`, in order, each whole, and returns
    /// how many were sent (a prefix of `frames`). Fails only when the
    /// first frame cannot be sent, with the error [`NetBackend::send`]
    /// would give; the device then retries or drops that frame and calls
    /// again with the rest. The default sends one frame per
    /// [`NetBackend::send`]; a backend with a batch system call
    /// (`sendmmsg`) overrides it.
    fn send_batch(&mut self, frames: &mut [FrameBufs<'_>]) -> io::Result<usize> {
        for (i, f) in frames.iter_mut().enumerate() {
            if let Err(e) = self.send(f) {
                return if i == 0 { Err(e) } else { Ok(i) };
            }
        }
        Ok(frames.len())
    }

    /// The [`offload`] flags the backend can accept.
    fn supported_offloads(&self) -> u32;

    /// Tells the backend which [`offload`] flags the guest accepted (a
    /// subset of [`NetBackend::supported_offloads`]).
    fn set_offloads(&mut self, flags: u32) -> io::Result<()>;
}

/// Frame counters, readable while the device runs.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_errors: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    tx_errors: AtomicU64,
    wakeups: AtomicU64,
}

/// A snapshot of [`NetCounters`]. Byte counts exclude the virtio-net
/// header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames received from the backend and dropped: larger than the
    /// guest's buffer (without mergeable buffers), shorter than a header,
    /// truncated, or asking for an offload the guest did not accept.
    pub rx_dropped: u64,
    /// Receive chains the guest got wrong (device-readable buffers, no room
    /// for a header, memory outside the guest), returned with length 0;
    /// and backend read errors.
    pub rx_errors: u64,
    /// Frames handed to the backend.
    pub tx_frames: u64,
    /// Bytes handed to the backend.
    pub tx_bytes: u64,
    /// Frames the backend refused (an error other than `WouldBlock`).
    pub tx_dropped: u64,
    /// Transmit chains the guest got wrong, returned unsent.
    pub tx_errors: u64,
    /// Times the device worker woke up (for tests that check it does not
    /// spin).
    pub wakeups: u64,
}

impl NetCounters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> NetStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_frames: r(&self.rx_frames),
            rx_bytes: r(&self.rx_bytes),
            rx_dropped: r(&self.rx_dropped),
            rx_errors: r(&self.rx_errors),
            tx_frames: r(&self.tx_frames),
            tx_bytes: r(&self.tx_bytes),
            tx_dropped: r(&self.tx_dropped),
            tx_errors: r(&self.tx_errors),
            wakeups: r(&self.wakeups),
        }
    }
}

/// How a net device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// The MAC address offered (`VIRTIO_NET_F_MAC`); `None` lets the
    /// driver pick one.
    pub mac: Option<[u8; 6]>,
    /// The MTU advised (`VIRTIO_NET_F_MTU`).
    pub mtu: Option<u16>,
    /// Offer mergeable receive buffers.
    pub mrg_rxbuf: bool,
    /// Queue size of both queues (a power of two).
    pub queue_size: u16,
    /// Longest time in microseconds the worker polls the transmit queue
    /// for new frames before it blocks (0: never poll; at most
    /// [`MAX_POLL_US`]); adaptive, see [`crate::worker`].
    pub poll_us: u32,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            mac: None,
            mtu: None,
            mrg_rxbuf: true,
            queue_size: 256,
            poll_us: DEFAULT_POLL_US,
        }
    }
}

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An option is out of range.
    #[error("invalid net option: {0}")]
    Option(String),
}

type SharedBackend = Arc<Mutex<Box<dyn NetBackend>>>;

/// The device-specific snapshot state of a [`Net`]: what a paused worker
/// held (see the [module documentation](self)).
///
/// Encoding (tag `VNET`, version 1; see [`vmkit_devices::state`]):
/// `rx_broken`, `tx_broken` (bool each), then `has_rx_frame` (bool) and,
/// if set, `rx_frame` (byte string of [`HDR_LEN`] to [`MAX_FRAME_LEN`]
/// bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    /// The receive ring was found broken (DEVICE_NEEDS_RESET raised).
    pub rx_broken: bool,
    /// The transmit ring was found broken.
    pub tx_broken: bool,
    /// A received frame (header included) waiting for receive buffers.
    pub rx_frame: Option<Vec<u8>>,
}

const NET_TAG: [u8; 4] = *b"VNET";
const NET_VERSION: u8 = 1;

impl NetState {
    /// Encodes the state (tag `VNET`, version 1).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(NET_TAG, NET_VERSION);
        w.bool(self.rx_broken)
            .bool(self.tx_broken)
            .bool(self.rx_frame.is_some());
        if let Some(f) = &self.rx_frame {
            w.bytes(f);
        }
        w.finish()
    }

    /// Decodes and checks a state written by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("virtio-net", bytes, NET_TAG, NET_VERSION)?;
        let rx_broken = r.bool("rx_broken")?;
        let tx_broken = r.bool("tx_broken")?;
        let rx_frame = if r.bool("has_rx_frame")? {
            let f = r.bytes("rx_frame", MAX_FRAME_LEN)?;
            if f.len() < HDR_LEN {
                return Err(r.invalid(
                    "rx_frame",
                    format!("{} bytes, shorter than the header", f.len()),
                ));
            }
            Some(f)
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            rx_broken,
            tx_broken,
            rx_frame,
        })
    }
}

/// A virtio network device.
#[derive(Debug)]
pub struct Net {
    backend: SharedBackend,
    options: NetOptions,
    config: [u8; CONFIG_LEN],
    sizes: [u16; 2],
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
    /// What a pause (or a restore) left for the next activation.
    carried: NetState,
}

impl Net {
    /// A device over `backend`.
    pub fn new(backend: Box<dyn NetBackend>, options: NetOptions) -> Result<Self, NetError> {
        let q = options.queue_size;
        if q < 2 || !q.is_power_of_two() {
            return Err(NetError::Option(format!("queue size {q}")));
        }
        if options.poll_us > MAX_POLL_US {
            return Err(NetError::Option(format!(
                "poll_us {} above {MAX_POLL_US}",
                options.poll_us
            )));
        }
        if let Some(mtu) = options.mtu {
            if mtu < 68 {
                return Err(NetError::Option(format!("mtu {mtu} below 68")));
            }
        }
        let mut config = [0u8; CONFIG_LEN];
        if let Some(mac) = options.mac {
            config[0..6].copy_from_slice(&mac);
        }
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&options.mtu.unwrap_or(0).to_le_bytes());
        Ok(Self {
            backend: Arc::new(Mutex::new(backend)),
            sizes: [q, q],
            options,
            config,
            counters: Arc::new(NetCounters::default()),
            worker: None,
            carried: NetState::default(),
        })
    }

    /// The frame counters.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    /// The live counters (to read them after the device moved into a
    /// transport).
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }
}

/// Feature bit `b` as a mask.
const fn bit(b: u32) -> u64 {
    1 << b
}

/// The [`offload`] flags the guest accepted with `features`.
pub fn offloads_from_features(features: u64) -> u32 {
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    let mut f = offload::CSUM;
    if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        f |= offload::TSO4;
    }
    if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        f |= offload::TSO6;
    }
    if features & bit(VIRTIO_NET_F_GUEST_ECN) != 0 && f & (offload::TSO4 | offload::TSO6) != 0 {
        f |= offload::TSO_ECN;
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
            | bit(VIRTIO_NET_F_STATUS);
        if self.options.mrg_rxbuf {
            f |= bit(VIRTIO_NET_F_MRG_RXBUF);
        }
        if self.options.mac.is_some() {
            f |= bit(VIRTIO_NET_F_MAC);
        }
        if self.options.mtu.is_some() {
            f |= bit(VIRTIO_NET_F_MTU);
        }
        let supported = self
            .backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .supported_offloads();
        if supported & offload::CSUM != 0 {
            f |= bit(VIRTIO_NET_F_GUEST_CSUM);
            if supported & offload::TSO4 != 0 {
                f |= bit(VIRTIO_NET_F_GUEST_TSO4);
            }
            if supported & offload::TSO6 != 0 {
                f |= bit(VIRTIO_NET_F_GUEST_TSO6);
            }
            if supported & offload::TSO_ECN != 0 {
                f |= bit(VIRTIO_NET_F_GUEST_ECN);
            }
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = activation.queues.len();
        let mut queues = activation.queues.into_iter();
        let (Some(Some(rx)), Some(Some(tx))) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let fd = {
            let mut b = self.backend.lock().unwrap_or_else(PoisonError::into_inner);
            let wanted = offloads_from_features(activation.features) & b.supported_offloads();
            b.set_offloads(wanted).map_err(ActivateError::Backend)?;
            b.raw_fd()
        };
        let carried = std::mem::take(&mut self.carried);
        let mut rx_engine = RxEngine::new(activation.features);
        if let Some(frame) = carried.rx_frame {
            rx_engine.hold(&frame);
        }
        let mut tx = ServedQueue::new(tx);
        tx.broken = carried.tx_broken;
        let sources = [
            WorkerSource {
                fd: rx.notify.as_raw_fd(),
                token: RX_TOKEN,
                events: EventSet::IN,
            },
            tx.source(TX_TOKEN),
            WorkerSource {
                fd,
                token: BACKEND_TOKEN,
                events: EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            },
        ];
        let worker = NetWorker {
            mem: activation.mem,
            interrupt: activation.interrupt,
            backend: self.backend.clone(),
            counters: self.counters.clone(),
            rx: rx.queue,
            rx_notify: rx.notify,
            rx_broken: carried.rx_broken,
            rx_engine,
            tx,
            features: activation.features,
            tx_blocked: false,
        };
        let options = WorkerOptions {
            poll_us: self.options.poll_us,
        };
        self.worker = Some(
            Worker::spawn_with("virtio-net", &sources, worker, options)
                .map_err(ActivateError::Backend)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.carried = NetState::default();
    }

    fn pause(&mut self) -> Option<Vec<Option<Queue>>> {
        // Between events the worker holds no popped chain (module
        // documentation), so both queues are at a frame boundary.
        let w = self.worker.take()?.stop_and_take::<NetWorker>()?;
        self.carried = NetState {
            rx_broken: w.rx_broken,
            tx_broken: w.tx.broken,
            rx_frame: w.rx_engine.pending_frame().map(<[u8]>::to_vec),
        };
        Some(vec![Some(w.rx), Some(w.tx.queue)])
    }

    fn save_device_state(&self) -> Vec<u8> {
        self.carried.to_bytes()
    }

    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if state.is_empty() {
            return Ok(());
        }
        let state = NetState::from_bytes(state)?;
        if self.worker.is_some() {
            return Err(StateError::Mismatch {
                what: "virtio-net",
                reason: "the device is active".into(),
            });
        }
        self.carried = state;
        Ok(())
    }
}

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const BACKEND_TOKEN: u64 = 2;

struct NetWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    backend: SharedBackend,
    counters: Arc<NetCounters>,
    rx: Queue,
    rx_notify: Arc<EventFd>,
    rx_broken: bool,
    rx_engine: RxEngine,
    tx: ServedQueue,
    features: u64,
    tx_blocked: bool,
}

impl NetWorker {
    fn receive(&mut self, backend: &mut dyn NetBackend) {
        if self.rx_broken {
            return;
        }
        let budget = usize::from(self.rx.size()) * RX_LAPS;
        match self
            .rx_engine
            .run(&mut self.rx, &self.mem, backend, &self.counters, budget)
        {
            Ok(report) => {
                if report.outcome == RxOutcome::Budget {
                    // More frames may be waiting and the edge-triggered
                    // backend will not say so again: come back after the
                    // other sources had their turn.
                    if let Err(e) = self.rx_notify.write(1) {
                        log::error!("virtio-net: cannot re-arm the receive queue: {e}");
                    }
                }
                if report.used > 0 {
                    match self.rx.needs_notification(&self.mem) {
                        Ok(true) => self.interrupt.signal_queue(RX_QUEUE),
                        Ok(false) => {}
                        Err(e) => self.break_rx(&e),
                    }
                }
            }
            Err(e) => self.break_rx(&e),
        }
    }

    fn break_rx(&mut self, e: &QueueError) {
        log::warn!("virtio-net: {e}; device needs reset");
        self.rx_broken = true;
        self.interrupt.needs_reset();
    }

    /// Sends what the transmit queue holds: `notified` consumes the
    /// queue's notification first, `polled` serves only new chains
    /// (returns whether there were any), otherwise the ring is drained.
    fn transmit(&mut self, backend: &mut dyn NetBackend, how: Tx) -> bool {
        let mem = &self.mem;
        let features = self.features;
        let counters = &*self.counters;
        let mut blocked = false;
        let mut handler = Batched {
            max: TX_BATCH,
            f: |chains: &[DescChain], out: &mut Vec<Completion>| {
                blocked = transmit_batch(mem, chains, features, backend, counters, out);
            },
        };
        let interrupt = &*self.interrupt;
        let found = match how {
            Tx::Notified => {
                self.tx.serve_with(mem, interrupt, &mut handler);
                true
            }
            Tx::Ready => {
                self.tx.process_with(mem, interrupt, &mut handler);
                true
            }
            Tx::Poll => self.tx.poll_with(mem, interrupt, &mut handler),
            Tx::Park => self.tx.park_with(mem, interrupt, &mut handler),
        };
        if found {
            self.tx_blocked = blocked;
        }
        found
    }
}

/// Why [`NetWorker::transmit`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    /// The driver notified the queue.
    Notified,
    /// The backend can take frames again.
    Ready,
    /// The worker polls for chains added without a notification.
    Poll,
    /// The worker is about to block.
    Park,
}

/// Transmit chains handed to the backend per batch.
const TX_BATCH: usize = 32;

/// Sends the frames of `chains` (in order) with as few backend calls as
/// it can, pushing one completion per chain handled onto `out`; stops at
/// the first frame the backend cannot take now and returns `true` then.
fn transmit_batch(
    mem: &GuestMemoryMmap,
    chains: &[DescChain],
    features: u64,
    backend: &mut dyn NetBackend,
    counters: &NetCounters,
    out: &mut Vec<Completion>,
) -> bool {
    let mut frames: Vec<FrameBufs<'_>> = Vec::with_capacity(chains.len());
    let mut i = 0;
    while i < chains.len() {
        // The run of chains whose frames go straight from guest memory.
        frames.clear();
        while let Some(c) = chains.get(i) {
            match tx_frame(mem, c, features) {
                Ok(f) => frames.push(f),
                Err(_) => break,
            }
            i += 1;
        }
        let mut sent = 0;
        while sent < frames.len() {
            let rest = frames.get_mut(sent..).unwrap_or_default();
            match backend.send_batch(rest) {
                Ok(n) if n > 0 => {
                    for f in rest.iter().take(n) {
                        NetCounters::add(&counters.tx_frames, 1);
                        NetCounters::add(
                            &counters.tx_bytes,
                            f.len().saturating_sub(HDR_LEN) as u64,
                        );
                        out.push(Completion::Used(0));
                    }
                    sent += n;
                }
                Ok(_) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    log::debug!("virtio-net: backend refused a frame: {e}");
                    NetCounters::add(&counters.tx_dropped, 1);
                    out.push(Completion::Used(0));
                    sent += 1;
                }
            }
        }
        // A chain that is not a plain frame (refused, or staged): one at a
        // time.
        if let Some(c) = chains.get(i) {
            let done = transmit_chain(mem, c, features, backend, counters);
            out.push(done);
            if done == Completion::NotNow {
                return true;
            }
            i += 1;
        }
    }
    false
}

impl WorkerHandler for NetWorker {
    fn handle(&mut self, token: u64, events: EventSet) -> ControlFlow<()> {
        NetCounters::add(&self.counters.wakeups, 1);
        let backend = self.backend.clone();
        let mut guard = backend.lock().unwrap_or_else(PoisonError::into_inner);
        let backend: &mut dyn NetBackend = &mut **guard;
        match token {
            RX_TOKEN => {
                drain_eventfd(&self.rx_notify);
                self.receive(backend);
            }
            TX_TOKEN => {
                self.transmit(backend, Tx::Notified);
            }
            BACKEND_TOKEN => {
                if events.contains(EventSet::OUT) && self.tx_blocked {
                    self.transmit(backend, Tx::Ready);
                }
                if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.receive(backend);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn poll(&mut self) -> bool {
        if self.tx_blocked {
            // Frames wait for the backend, which says when it is ready.
            return false;
        }
        let backend = self.backend.clone();
        let mut guard = backend.lock().unwrap_or_else(PoisonError::into_inner);
        self.transmit(&mut **guard, Tx::Poll)
    }

    fn park(&mut self) -> bool {
        let backend = self.backend.clone();
        let mut guard = backend.lock().unwrap_or_else(PoisonError::into_inner);
        self.transmit(&mut **guard, Tx::Park)
    }
}

/// Reads the 12-byte header's offload fields: `(flags, gso_type)`.
fn hdr_offloads(hdr: &[u8; HDR_LEN]) -> (u8, u8) {
    (hdr[0], hdr[1])
}

/// Whether a header's offload requests are covered by `features`, using
/// the transmit (`host`) or receive (`guest`) feature bits.
fn offloads_allowed(hdr: &[u8; HDR_LEN], features: u64, guest: bool) -> bool {
    let (flags, gso) = hdr_offloads(hdr);
    let has = |b: u32| features & bit(b) != 0;
    let (csum, tso4, tso6, ecn) = if guest {
        (
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
        )
    } else {
        (
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
        )
    };
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && !has(csum) {
        return false;
    }
    if gso & VIRTIO_NET_HDR_GSO_ECN as u8 != 0 && !has(ecn) {
        return false;
    }
    match u32::from(gso & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(tso4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(tso6),
        _ => false,
    }
}

/// Why a transmit chain's frame cannot go straight from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxReject {
    /// The chain is wrong (counted in `tx_errors`, returned unsent).
    Invalid(&'static str),
    /// A good frame of this many bytes in more pieces than one system
    /// call takes: it has to be staged.
    TooMany(usize),
}

/// Checks a transmit chain and describes its frame for the backend.
fn tx_frame<'a>(
    mem: &'a GuestMemoryMmap,
    chain: &DescChain,
    features: u64,
) -> Result<FrameBufs<'a>, TxReject> {
    if !chain.writable().is_empty() {
        return Err(TxReject::Invalid(
            "device-writable buffer in a transmit chain",
        ));
    }
    let mut reader = chain.reader(mem);
    let len = reader.available();
    if len < HDR_LEN {
        return Err(TxReject::Invalid("shorter than the virtio-net header"));
    }
    if len > MAX_FRAME_LEN {
        return Err(TxReject::Invalid("frame too long"));
    }
    let mut hdr = [0u8; HDR_LEN];
    if reader.read_exact(&mut hdr).is_err() {
        return Err(TxReject::Invalid("header not in guest memory"));
    }
    if !offloads_allowed(&hdr, features, false) {
        return Err(TxReject::Invalid("offload not negotiated"));
    }
    match FrameBufs::from_guest(mem, chain.readable(), len) {
        Ok(b) => Ok(b),
        Err(bufs::BufsError::Memory) => Err(TxReject::Invalid("buffer outside guest memory")),
        Err(bufs::BufsError::TooMany) => Err(TxReject::TooMany(len)),
    }
}

/// Sends the frame of one transmit chain to `backend` (the worker's step
/// for each transmit chain; public for fuzzing and tests).
///
/// Returns `Used(0)` for every chain that is done with (sent, refused and
/// counted), or `NotNow` when the backend cannot take a frame now.
pub fn transmit_chain(
    mem: &GuestMemoryMmap,
    chain: &DescChain,
    features: u64,
    backend: &mut dyn NetBackend,
    counters: &NetCounters,
) -> Completion {
    let error = |why: &str| {
        log::debug!("virtio-net: transmit chain dropped: {why}");
        NetCounters::add(&counters.tx_errors, 1);
        Completion::Used(0)
    };
    let mut bounce;
    let mut bufs = match tx_frame(mem, chain, features) {
        Ok(b) => b,
        Err(TxReject::Invalid(why)) => return error(why),
        Err(TxReject::TooMany(len)) => {
            // Rare: more pieces than one system call takes. Stage the
            // frame (bounded by MAX_FRAME_LEN).
            bounce = vec![0u8; len];
            let mut r = chain.reader(mem);
            if r.read_exact(&mut bounce).is_err() {
                return error("buffer outside guest memory");
            }
            FrameBufs::from_slice(&mut bounce)
        }
    };
    let len = bufs.len();
    match backend.send(&mut bufs) {
        Ok(()) => {
            NetCounters::add(&counters.tx_frames, 1);
            NetCounters::add(&counters.tx_bytes, len.saturating_sub(HDR_LEN) as u64);
            Completion::Used(0)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Completion::NotNow,
        Err(e) => {
            log::debug!("virtio-net: backend refused a frame: {e}");
            NetCounters::add(&counters.tx_dropped, 1);
            Completion::Used(0)
        }
    }
}

/// Why [`RxEngine::run`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The backend has no more frames.
    Drained,
    /// The guest has no (more) receive buffers; notifications are enabled
    /// and a frame may be held until buffers come.
    NoBuffers,
    /// The per-call budget ran out with frames possibly still waiting.
    Budget,
    /// The backend failed with an error other than `WouldBlock`.
    BackendError,
}

/// What one [`RxEngine::run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxReport {
    /// Why it stopped.
    pub outcome: RxOutcome,
    /// Chains returned to the guest.
    pub used: usize,
}

/// The receive side of a net device: moves frames from a backend into a
/// receive queue (the worker's receive step; public for fuzzing and
/// tests). Holds the bounce buffer and at most one frame that waits for
/// mergeable buffers.
#[derive(Debug)]
pub struct RxEngine {
    features: u64,
    bounce: Vec<u8>,
    /// Length of the frame held in `bounce`, waiting for buffers.
    pending: Option<usize>,
    chains: Vec<DescChain>,
}

impl RxEngine {
    /// An engine for the negotiated `features`.
    pub fn new(features: u64) -> Self {
        Self {
            features,
            bounce: vec![0u8; MAX_FRAME_LEN],
            pending: None,
            chains: Vec::new(),
        }
    }

    /// Whether a frame is held, waiting for receive buffers.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The frame held for receive buffers (header included), if any.
    pub fn pending_frame(&self) -> Option<&[u8]> {
        self.pending.and_then(|len| self.bounce.get(..len))
    }

    /// Holds `frame` (header included) as if it had just been received and
    /// were waiting for buffers: the next [`run`](Self::run) delivers it
    /// before reading the backend. For a restored snapshot; a frame
    /// shorter than [`HDR_LEN`] or longer than [`MAX_FRAME_LEN`] is
    /// ignored.
    pub fn hold(&mut self, frame: &[u8]) {
        if !(HDR_LEN..=MAX_FRAME_LEN).contains(&frame.len()) {
            return;
        }
        if let Some(dst) = self.bounce.get_mut(..frame.len()) {
            dst.copy_from_slice(frame);
            self.pending = Some(frame.len());
        }
    }

    fn mergeable(&self) -> bool {
        self.features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Moves up to `budget` frames from `backend` into `queue`. A broken
    /// ring is returned as an error (the caller raises
    /// DEVICE_NEEDS_RESET).
    pub fn run(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        backend: &mut dyn NetBackend,
        counters: &NetCounters,
        budget: usize,
    ) -> Result<RxReport, QueueError> {
        let mut used = 0usize;
        let mut frames = 0usize;
        let outcome = loop {
            if frames >= budget {
                break RxOutcome::Budget;
            }
            let first =
                match self.pop_usable(queue, mem, counters, &mut used, &mut frames, budget)? {
                    Pop::Chain(c) => c,
                    Pop::Empty => break RxOutcome::NoBuffers,
                    Pop::Budget => break RxOutcome::Budget,
                };
            let capacity = writable_len(&first);
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.read_frame(mem, &first, capacity, backend) {
                    Ok(Frame::Direct(len)) => {
                        frames += 1;
                        self.finish_direct(queue, mem, first, len, counters, &mut used)?;
                        continue;
                    }
                    Ok(Frame::Bounced(len)) => len,
                    Ok(Frame::Dropped) => {
                        frames += 1;
                        NetCounters::add(&counters.rx_dropped, 1);
                        queue.undo_pop(first.token());
                        continue;
                    }
                    Err(e) => {
                        queue.undo_pop(first.token());
                        if e.kind() == io::ErrorKind::WouldBlock {
                            break RxOutcome::Drained;
                        }
                        log::warn!("virtio-net: backend receive failed: {e}");
                        NetCounters::add(&counters.rx_errors, 1);
                        break RxOutcome::BackendError;
                    }
                },
            };
            frames += 1;
            if !self.mergeable() {
                if len > capacity {
                    // Without mergeable buffers a frame must fit one chain;
                    // keep the chain for a frame that fits.
                    NetCounters::add(&counters.rx_dropped, 1);
                    queue.undo_pop(first.token());
                    continue;
                }
                let mut w = first.writer(mem);
                let Some(frame) = self.bounce.get_mut(..len) else {
                    queue.undo_pop(first.token());
                    continue;
                };
                set_num_buffers(frame, 1);
                if w.write_all(frame).is_err() {
                    NetCounters::add(&counters.rx_errors, 1);
                    give_back(queue, mem, &first, 0)?;
                    used += 1;
                    continue;
                }
                give_back(queue, mem, &first, len as u32)?;
                used += 1;
                count_rx(counters, len);
                continue;
            }
            // Mergeable buffers: gather chains until the frame fits.
            self.chains.clear();
            let mut room = capacity;
            self.chains.push(first);
            // Chains held at once are bounded by the queue size (the ring
            // cannot offer more until some are used); bad chains count as
            // work.
            let mut out_of_work = false;
            while room < len {
                match self.pop_usable(queue, mem, counters, &mut used, &mut frames, budget)? {
                    Pop::Chain(c) => {
                        room = room.saturating_add(writable_len(&c));
                        self.chains.push(c);
                    }
                    Pop::Empty => break,
                    Pop::Budget => {
                        out_of_work = true;
                        break;
                    }
                }
            }
            if room < len {
                // Wait for more buffers with the frame held.
                for c in self.chains.drain(..).rev() {
                    queue.undo_pop(c.token());
                }
                self.pending = Some(len);
                break if out_of_work {
                    RxOutcome::Budget
                } else {
                    RxOutcome::NoBuffers
                };
            }
            let Some(frame) = self.bounce.get_mut(..len) else {
                break RxOutcome::Drained;
            };
            // At most queue-size chains, which fits in u16.
            set_num_buffers(frame, self.chains.len() as u16);
            let mut off = 0usize;
            for c in self.chains.drain(..) {
                let mut w = c.writer(mem);
                let n = w.available().min(len - off);
                let piece = frame.get(off..off + n).unwrap_or(&[]);
                let written = if w.write_all(piece).is_ok() { n } else { 0 };
                off += n;
                // n ≤ the chain's length, which fits in u32.
                give_back(queue, mem, &c, written as u32)?;
                used += 1;
            }
            count_rx(counters, len);
        };
        Ok(RxReport { outcome, used })
    }

    /// Pops the next receive chain the device can use; chains with
    /// device-readable buffers or no room for a header are returned with
    /// length 0 and counted, each as one unit of `work`.
    fn pop_usable(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        counters: &NetCounters,
        used: &mut usize,
        work: &mut usize,
        budget: usize,
    ) -> Result<Pop, QueueError> {
        let mut rechecked = false;
        // Each pass returns, consumes one chain (counted as work, so a
        // driver refilling bad chains cannot hold the worker), or re-checks
        // the ring once after enabling notifications.
        loop {
            if *work >= budget {
                return Ok(Pop::Budget);
            }
            match queue.pop(mem)? {
                Some(c) => {
                    if !c.readable().is_empty() || writable_len(&c) < HDR_LEN {
                        log::debug!("virtio-net: unusable receive chain returned");
                        NetCounters::add(&counters.rx_errors, 1);
                        give_back(queue, mem, &c, 0)?;
                        *used += 1;
                        *work += 1;
                        continue;
                    }
                    return Ok(Pop::Chain(c));
                }
                None => {
                    if rechecked || !queue.enable_notification(mem)? {
                        return Ok(Pop::Empty);
                    }
                    rechecked = true;
                }
            }
        }
    }

    fn read_frame(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &DescChain,
        capacity: usize,
        backend: &mut dyn NetBackend,
    ) -> io::Result<Frame> {
        if capacity >= MAX_FRAME_LEN {
            if let Ok(mut bufs) = FrameBufs::from_guest(mem, chain.writable(), MAX_FRAME_LEN) {
                let n = backend.recv(&mut bufs)?;
                bufs.mark_written(n.min(bufs.len()));
                if n > bufs.len() || n < HDR_LEN {
                    return Ok(Frame::Dropped);
                }
                let mut hdr = [0u8; HDR_LEN];
                let mut r = ChainReader::new(mem, chain.writable());
                if r.read_exact(&mut hdr).is_err() || !offloads_allowed(&hdr, self.features, true) {
                    return Ok(Frame::Dropped);
                }
                return Ok(Frame::Direct(n));
            }
        }
        // A smaller chain: receive straight into it, with the bounce
        // buffer past `capacity` catching the rest of a larger frame, so
        // that a frame that fits costs no copy and one that does not is
        // still whole.
        if let Some(tail) = self.bounce.get_mut(capacity..) {
            if let Ok(mut bufs) =
                FrameBufs::from_guest_with_tail(mem, chain.writable(), capacity, tail)
            {
                let n = backend.recv(&mut bufs)?;
                bufs.mark_written(n.min(capacity));
                if !(HDR_LEN..=MAX_FRAME_LEN).contains(&n) {
                    return Ok(Frame::Dropped);
                }
                // pop_usable guarantees capacity ≥ HDR_LEN: the header is
                // in the chain.
                let mut hdr = [0u8; HDR_LEN];
                let mut r = ChainReader::new(mem, chain.writable());
                if r.read_exact(&mut hdr).is_err() || !offloads_allowed(&hdr, self.features, true) {
                    return Ok(Frame::Dropped);
                }
                if n <= capacity {
                    return Ok(Frame::Direct(n));
                }
                if !self.mergeable() {
                    // Too large for the chain; the caller drops it.
                    return Ok(Frame::Bounced(n));
                }
                // Gather the whole frame in the bounce buffer for the
                // mergeable path: its head is in the chain.
                let Some(head) = self.bounce.get_mut(..capacity) else {
                    return Ok(Frame::Dropped);
                };
                let mut r = ChainReader::new(mem, chain.writable());
                if r.read_exact(head).is_err() {
                    return Ok(Frame::Dropped);
                }
                return Ok(Frame::Bounced(n));
            }
        }
        let mut bufs = FrameBufs::from_slice(&mut self.bounce);
        let n = backend.recv(&mut bufs)?;
        if !(HDR_LEN..=MAX_FRAME_LEN).contains(&n) {
            return Ok(Frame::Dropped);
        }
        let mut hdr = [0u8; HDR_LEN];
        hdr.copy_from_slice(self.bounce.get(..HDR_LEN).unwrap_or(&[0; HDR_LEN]));
        if !offloads_allowed(&hdr, self.features, true) {
            return Ok(Frame::Dropped);
        }
        Ok(Frame::Bounced(n))
    }

    fn finish_direct(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        chain: DescChain,
        len: usize,
        counters: &NetCounters,
        used: &mut usize,
    ) -> Result<(), QueueError> {
        // num_buffers (bytes 10..12) is 1: the frame fits this chain.
        if write_at(mem, &chain, 10, &1u16.to_le_bytes()).is_err() {
            NetCounters::add(&counters.rx_errors, 1);
            give_back(queue, mem, &chain, 0)?;
        } else {
            // len ≤ MAX_FRAME_LEN.
            give_back(queue, mem, &chain, len as u32)?;
            count_rx(counters, len);
        }
        *used += 1;
        Ok(())
    }
}

enum Pop {
    Chain(DescChain),
    Empty,
    Budget,
}

enum Frame {
    /// Read straight into the first chain.
    Direct(usize),
    /// Read into the bounce buffer.
    Bounced(usize),
    /// Read and dropped (counted by the caller).
    Dropped,
}

fn writable_len(chain: &DescChain) -> usize {
    chain
        .writable()
        .iter()
        .map(|d| d.len as usize)
        .fold(0usize, usize::saturating_add)
}

fn set_num_buffers(frame: &mut [u8], n: u16) {
    if let Some(f) = frame.get_mut(10..12) {
        f.copy_from_slice(&n.to_le_bytes());
    }
}

fn count_rx(counters: &NetCounters, len: usize) {
    NetCounters::add(&counters.rx_frames, 1);
    NetCounters::add(&counters.rx_bytes, len.saturating_sub(HDR_LEN) as u64);
}

/// Writes `data` at byte `offset` of a chain's writable buffers.
fn write_at(
    mem: &GuestMemoryMmap,
    chain: &DescChain,
    offset: usize,
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut skip = offset;
    let mut done = 0;
    for d in chain.writable() {
        if done == data.len() {
            break;
        }
        let dlen = d.len as usize;
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = (dlen - skip).min(data.len() - done);
        let at = GuestAddress(d.addr.0.wrapping_add(skip as u64));
        mem.write_slice(&data[done..done + n], at)?;
        done += n;
        skip = 0;
    }
    if done < data.len() {
        return Err(vm_memory::GuestMemoryError::PartialBuffer {
            expected: data.len(),
            completed: done,
        });
    }
    Ok(())
}

/// Returns `chain` to the driver with `len` bytes written. `len` never
/// exceeds the chain's writable size (checked in debug builds, which the
/// fuzz targets use).
pub(crate) fn give_back(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    chain: &DescChain,
    len: u32,
) -> Result<(), QueueError> {
    debug_assert!(
        len as usize <= writable_len(chain),
        "used length past the chain"
    );
    queue.add_used(mem, chain.token(), len)
}
