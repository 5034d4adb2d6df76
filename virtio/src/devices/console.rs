//! virtio-console (virtio 1.2, 5.3): port 0 only (no `MULTIPORT`), with
//! `receiveq0` (input to the guest) and `transmitq0` (output from it),
//! over a [`ConsoleBackend`].
//!
//! Output: each transmit chain's bytes are written to the backend in
//! order. A backend that takes part of them or says `WouldBlock` keeps the
//! chain in flight; the device continues where it stopped once the
//! backend's [`ConsoleBackend::poll_fd`] polls ready, so no byte is lost or
//! repeated and nothing spins. At most [`TX_BUDGET`] bytes are written per
//! wake-up.
//!
//! Input: bytes read from the backend wait in a bounded buffer
//! ([`ConsoleOptions::input_buffer`], 64 KiB by default) until the guest
//! has receive buffers. When it is full, the **newest** bytes are dropped
//! and counted ([`ConsoleStats::input_dropped`]), so what the guest gets is
//! always an unbroken prefix of the input.
//!
//! Terminal modes (raw mode and the like) are the VMM's business: the
//! device never touches termios.
//!
//! Snapshots: [`VirtioDevice::pause`] stops the worker at a quiescent
//! point. A transmit chain the backend took only part of is put back at
//! the head of the transmit ring (it was the last chain popped), and the
//! number of its bytes already written is kept, so that the first chain
//! popped after the device is activated again continues after them: no
//! output byte is lost or written twice. Buffered input bytes are kept as
//! well. Both are carried in [`ConsoleState`] (the device state the
//! transport saves) and handed to the next activation; a reset discards
//! them. Bytes still inside the backend (unread input, output a terminal
//! has not drawn) belong to the host, not to the snapshot.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice};
use crate::device_type;
use crate::devices::net::give_back;
use crate::queue::{DescChain, Queue, QueueError};
use crate::worker::{drain_eventfd, Worker, WorkerHandler, WorkerSource};
use vmkit_devices::state::{StateReader, StateWriter};
use vmkit_devices::StateError;

/// `VIRTIO_CONSOLE_F_SIZE`: `cols` and `rows` are valid.
pub const F_SIZE: u32 = 0;
/// Index of `receiveq0`.
pub const RX_QUEUE: u16 = 0;
/// Index of `transmitq0`.
pub const TX_QUEUE: u16 = 1;
/// Output bytes written per wake-up at most.
pub const TX_BUDGET: usize = 1 << 20;
/// Config space: cols, rows, max_nr_ports, emerg_wr.
const CONFIG_LEN: usize = 12;
/// Reads from the backend per wake-up at most.
const INPUT_READS: usize = 64;
const CHUNK: usize = 4096;

/// Where console output goes and input comes from.
pub trait ConsoleBackend: Send + std::fmt::Debug {
    /// A descriptor polled level-triggered for readability: ready when
    /// input may be waiting, a connection may be accepted, or output that
    /// blocked may continue. `None` when there is nothing to wait for (no
    /// input, and output never blocks). It must not stay ready once
    /// [`ConsoleBackend::read_input`] returned 0 and no output is blocked.
    fn poll_fd(&self) -> Option<RawFd>;

    /// Does any pending housekeeping (accepting a connection, noticing a
    /// closed one) and reads available input into `buf`. Returns 0 when no
    /// input is available now.
    fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes output; returns how many bytes were taken (possibly fewer
    /// than `buf.len()`). `WouldBlock` or 0 means "not now": the device
    /// retries when `poll_fd` polls ready.
    fn write_output(&mut self, buf: &[u8]) -> io::Result<usize>;
}

/// A level-triggered inner epoll set, so that a backend whose descriptors
/// change (a socket reconnecting) shows the worker one stable descriptor.
#[derive(Debug)]
struct Poller {
    epoll: Epoll,
}

const IN_TOKEN: u64 = 1;
const OUT_TOKEN: u64 = 2;

impl Poller {
    fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
        })
    }

    fn add(&self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    fn remove(&self, fd: RawFd) {
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            log::debug!("virtio-console: removing a descriptor from the poller: {e}");
        }
    }

    /// Tokens ready right now.
    fn ready(&self) -> io::Result<(bool, bool)> {
        let mut events = [EpollEvent::default(); 4];
        let n = loop {
            match self.epoll.wait(0, &mut events) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        let mut input = false;
        let mut output = false;
        for ev in events.iter().take(n) {
            match ev.data() {
                IN_TOKEN => input = true,
                OUT_TOKEN => output = true,
                _ => {}
            }
        }
        Ok((input, output))
    }
}

/// A console backend over plain descriptors: standard input/output, a
/// file, or pipes.
#[derive(Debug)]
pub struct FdConsole {
    input: Option<File>,
    output: File,
    poller: Poller,
    /// Whether the output descriptor is in the poller (after `WouldBlock`).
    out_armed: bool,
    /// The output descriptor (polled for writability after `WouldBlock`).
    output_fd: RawFd,
}

impl FdConsole {
    /// Input from `input` (if any), output to `output`. Input is only read
    /// when it polls readable, so a blocking descriptor works too; output
    /// on a non-blocking descriptor may block the device (partial writes
    /// and `WouldBlock` are handled), on a blocking one writes wait.
    pub fn new(input: Option<OwnedFd>, output: OwnedFd) -> io::Result<Self> {
        let poller = Poller::new()?;
        let input = input.map(File::from);
        if let Some(i) = &input {
            poller.add(i.as_raw_fd(), EventSet::IN, IN_TOKEN)?;
        }
        let output = File::from(output);
        Ok(Self {
            output_fd: output.as_raw_fd(),
            input,
            output,
            poller,
            out_armed: false,
        })
    }

    /// The process's standard input and output (duplicated; their modes
    /// are left alone).
    pub fn stdio() -> io::Result<Self> {
        let input = io::stdin().as_fd_owned()?;
        let output = io::stdout().as_fd_owned()?;
        Self::new(Some(input), output)
    }

    /// Output appended to the file at `path` (created if missing); no
    /// input.
    pub fn file(path: &Path) -> io::Result<Self> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Self::new(None, OwnedFd::from(f))
    }
}

/// Duplicating the standard streams' descriptors.
trait AsFdOwned {
    fn as_fd_owned(&self) -> io::Result<OwnedFd>;
}

impl<T: std::os::fd::AsFd> AsFdOwned for T {
    fn as_fd_owned(&self) -> io::Result<OwnedFd> {
        self.as_fd().try_clone_to_owned()
    }
}

impl ConsoleBackend for FdConsole {
    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.poller.epoll.as_raw_fd())
    }

    fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(input) = &mut self.input else {
            return Ok(0);
        };
        if !self.poller.ready()?.0 {
            return Ok(0);
        }
        match input.read(buf) {
            Ok(0) => {
                // End of input: stop polling it.
                self.poller.remove(input.as_raw_fd());
                self.input = None;
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => {
                if let Some(i) = self.input.take() {
                    self.poller.remove(i.as_raw_fd());
                }
                Err(e)
            }
        }
    }

    fn write_output(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.output.write(buf) {
            Ok(n) => {
                if self.out_armed {
                    self.poller.remove(self.output_fd);
                    self.out_armed = false;
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !self.out_armed {
                    self.poller.add(self.output_fd, EventSet::OUT, OUT_TOKEN)?;
                    self.out_armed = true;
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

/// How a [`SocketConsole`] finds its peer.
#[derive(Debug)]
enum Endpoint {
    /// Accept one connection at a time; after it closes, accept again.
    Listen(UnixListener),
    /// Connect to this path; after the peer goes away, connect again when
    /// the guest next writes output.
    Connect(PathBuf),
}

/// A console on a Unix stream socket: input and output go through the
/// connection.
///
/// Output written while no peer is connected is discarded (and counted in
/// [`SocketConsole::discarded`]); a connecting console tries to reconnect
/// once per output write while disconnected.
#[derive(Debug)]
pub struct SocketConsole {
    endpoint: Endpoint,
    conn: Option<UnixStream>,
    poller: Poller,
    out_armed: bool,
    discarded: Arc<AtomicU64>,
}

impl SocketConsole {
    /// Listens on `path` (which must not exist) and serves one connection
    /// at a time.
    pub fn listen(path: &Path) -> io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let poller = Poller::new()?;
        poller.add(listener.as_raw_fd(), EventSet::IN, IN_TOKEN)?;
        Ok(Self {
            endpoint: Endpoint::Listen(listener),
            conn: None,
            poller,
            out_armed: false,
            discarded: Arc::default(),
        })
    }

    /// Connects to the socket at `path` (now, failing if it cannot, and
    /// again later whenever the peer went away).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let mut s = Self {
            endpoint: Endpoint::Connect(path.to_owned()),
            conn: None,
            poller: Poller::new()?,
            out_armed: false,
            discarded: Arc::default(),
        };
        s.reconnect()?;
        Ok(s)
    }

    /// Output bytes discarded because no peer was connected (shared, so it
    /// can be read after the backend moved into a device).
    pub fn discarded(&self) -> Arc<AtomicU64> {
        self.discarded.clone()
    }

    fn attach(&mut self, conn: UnixStream) -> io::Result<()> {
        conn.set_nonblocking(true)?;
        self.poller.add(conn.as_raw_fd(), EventSet::IN, IN_TOKEN)?;
        if let Endpoint::Listen(l) = &self.endpoint {
            // One peer at a time: stop accepting while connected.
            self.poller.remove(l.as_raw_fd());
        }
        self.out_armed = false;
        self.conn = Some(conn);
        Ok(())
    }

    fn reconnect(&mut self) -> io::Result<()> {
        let Endpoint::Connect(path) = &self.endpoint else {
            return Ok(());
        };
        let conn = UnixStream::connect(path)?;
        self.attach(conn)
    }

    fn disconnect(&mut self) {
        if let Some(c) = self.conn.take() {
            self.poller.remove(c.as_raw_fd());
            self.out_armed = false;
            if let Endpoint::Listen(l) = &self.endpoint {
                if let Err(e) = self.poller.add(l.as_raw_fd(), EventSet::IN, IN_TOKEN) {
                    log::error!("virtio-console: cannot listen again: {e}");
                }
            }
        }
    }

    fn accept(&mut self) -> io::Result<()> {
        let Endpoint::Listen(l) = &self.endpoint else {
            return Ok(());
        };
        match l.accept() {
            Ok((conn, _)) => self.attach(conn),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl ConsoleBackend for SocketConsole {
    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.poller.epoll.as_raw_fd())
    }

    fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.conn.is_none() {
            self.accept()?;
        }
        let Some(conn) = &mut self.conn else {
            return Ok(0);
        };
        match conn.read(buf) {
            Ok(0) => {
                self.disconnect();
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Ok(0)
            }
            Err(e) => {
                log::debug!("virtio-console: socket read failed: {e}; dropping the peer");
                self.disconnect();
                Ok(0)
            }
        }
    }

    fn write_output(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A failed write drops the peer; one more attempt goes to a new
        // one (accepted or reconnected) if there is one.
        for _ in 0..2 {
            if self.conn.is_none() {
                if let Err(e) = self.accept().and_then(|()| self.reconnect()) {
                    log::debug!("virtio-console: no peer: {e}");
                }
            }
            let Some(conn) = &mut self.conn else {
                break;
            };
            let fd = conn.as_raw_fd();
            match conn.write(buf) {
                Ok(n) => {
                    if self.out_armed {
                        self.poller.modify(fd, EventSet::IN, IN_TOKEN)?;
                        self.out_armed = false;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.out_armed {
                        self.poller
                            .modify(fd, EventSet::IN | EventSet::OUT, IN_TOKEN)?;
                        self.out_armed = true;
                    }
                    return Err(e);
                }
                Err(e) => {
                    log::debug!("virtio-console: socket write failed: {e}; dropping the peer");
                    self.disconnect();
                }
            }
        }
        self.discarded
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
}

/// How a console device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// Terminal size `(cols, rows)` offered with `VIRTIO_CONSOLE_F_SIZE`.
    pub size: Option<(u16, u16)>,
    /// Queue size of both queues (a power of two).
    pub queue_size: u16,
    /// Input bytes kept while the guest has no receive buffers.
    pub input_buffer: usize,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            size: None,
            queue_size: 256,
            input_buffer: 64 * 1024,
        }
    }
}

/// Errors creating a console device.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// An option is out of range.
    #[error("invalid console option: {0}")]
    Option(String),
}

/// Console counters, readable while the device runs.
#[derive(Debug, Default)]
pub struct ConsoleCounters {
    input_bytes: AtomicU64,
    input_dropped: AtomicU64,
    output_bytes: AtomicU64,
    errors: AtomicU64,
    wakeups: AtomicU64,
}

/// A snapshot of [`ConsoleCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Input bytes delivered to the guest.
    pub input_bytes: u64,
    /// Input bytes dropped because the input buffer was full (the newest).
    pub input_dropped: u64,
    /// Output bytes written to the backend.
    pub output_bytes: u64,
    /// Chains the guest got wrong (wrong direction, memory outside the
    /// guest), returned with length 0, and backend errors.
    pub errors: u64,
    /// Times the worker woke up.
    pub wakeups: u64,
}

impl ConsoleCounters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> ConsoleStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsoleStats {
            input_bytes: r(&self.input_bytes),
            input_dropped: r(&self.input_dropped),
            output_bytes: r(&self.output_bytes),
            errors: r(&self.errors),
            wakeups: r(&self.wakeups),
        }
    }
}

type SharedBackend = Arc<Mutex<Box<dyn ConsoleBackend>>>;

/// The device-specific snapshot state of a [`Console`]: what a paused
/// worker held (see the [module documentation](self)).
///
/// Encoding (tag `VCON`, version 1; see [`vmkit_devices::state`]):
/// `broken` (bool), `tx_done` (u64), `input` (byte string of at most
/// [`MAX_STATE_INPUT`] bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleState {
    /// The rings were found broken (DEVICE_NEEDS_RESET was raised): the
    /// device does not touch them until a reset.
    pub broken: bool,
    /// Bytes of the chain at the head of the transmit ring already
    /// written to the backend; the device skips them when it pops it.
    pub tx_done: u64,
    /// Input bytes waiting for receive buffers, oldest first.
    pub input: Vec<u8>,
}

const CONSOLE_TAG: [u8; 4] = *b"VCON";
const CONSOLE_VERSION: u8 = 1;
/// Most buffered input bytes a [`ConsoleState`] carries. A device whose
/// [`ConsoleOptions::input_buffer`] is larger keeps only this many of the
/// oldest bytes in a snapshot (the rest are dropped and counted in
/// [`ConsoleStats::input_dropped`]).
pub const MAX_STATE_INPUT: usize = 512 * 1024;

impl ConsoleState {
    /// Encodes the state (tag `VCON`, version 1).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(CONSOLE_TAG, CONSOLE_VERSION);
        w.bool(self.broken).u64(self.tx_done).bytes(&self.input);
        w.finish()
    }

    /// Decodes a state written by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("virtio-console", bytes, CONSOLE_TAG, CONSOLE_VERSION)?;
        let broken = r.bool("broken")?;
        let tx_done = r.u64()?;
        let input = r.bytes("input", MAX_STATE_INPUT)?;
        r.finish()?;
        Ok(Self {
            broken,
            tx_done,
            input,
        })
    }
}

/// A virtio console device (port 0).
#[derive(Debug)]
pub struct Console {
    backend: SharedBackend,
    options: ConsoleOptions,
    config: [u8; CONFIG_LEN],
    sizes: [u16; 2],
    counters: Arc<ConsoleCounters>,
    worker: Option<Worker>,
    /// What a pause (or a restore) left for the next activation.
    carried: ConsoleState,
}

impl Console {
    /// A console over `backend`.
    pub fn new(
        backend: Box<dyn ConsoleBackend>,
        options: ConsoleOptions,
    ) -> Result<Self, ConsoleError> {
        let q = options.queue_size;
        if q < 2 || !q.is_power_of_two() {
            return Err(ConsoleError::Option(format!("queue size {q}")));
        }
        if options.input_buffer == 0 {
            return Err(ConsoleError::Option("input buffer of 0 bytes".into()));
        }
        let mut config = [0u8; CONFIG_LEN];
        if let Some((cols, rows)) = options.size {
            config[0..2].copy_from_slice(&cols.to_le_bytes());
            config[2..4].copy_from_slice(&rows.to_le_bytes());
        }
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        Ok(Self {
            backend: Arc::new(Mutex::new(backend)),
            config,
            sizes: [q, q],
            options,
            counters: Arc::default(),
            worker: None,
            carried: ConsoleState::default(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> ConsoleStats {
        self.counters.snapshot()
    }

    /// The live counters (to read them after the device moved into a
    /// transport).
    pub fn counters(&self) -> Arc<ConsoleCounters> {
        self.counters.clone()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        if self.options.size.is_some() {
            1 << F_SIZE
        } else {
            0
        }
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
        let mut sources = vec![
            WorkerSource {
                fd: rx.notify.as_raw_fd(),
                token: RX_TOKEN,
                events: EventSet::IN,
            },
            WorkerSource {
                fd: tx.notify.as_raw_fd(),
                token: TX_TOKEN,
                events: EventSet::IN,
            },
        ];
        let poll = self
            .backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .poll_fd();
        if let Some(fd) = poll {
            sources.push(WorkerSource {
                fd,
                token: BACKEND_TOKEN,
                events: EventSet::IN,
            });
        }
        let carried = std::mem::take(&mut self.carried);
        let mut engine = ConsoleEngine::new(self.options.input_buffer);
        engine.input = carried.input.into();
        engine.resume_offset = usize::try_from(carried.tx_done).unwrap_or(usize::MAX);
        engine.broken = carried.broken;
        let worker = ConsoleWorker {
            mem: activation.mem,
            interrupt: activation.interrupt,
            backend: self.backend.clone(),
            counters: self.counters.clone(),
            engine,
            rx: rx.queue,
            rx_notify: rx.notify,
            tx: tx.queue,
            tx_notify: tx.notify,
        };
        self.worker = Some(
            Worker::spawn("virtio-console", &sources, worker).map_err(ActivateError::Backend)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.carried = ConsoleState::default();
    }

    fn pause(&mut self) -> Option<Vec<Option<Queue>>> {
        let mut w = self.worker.take()?.stop_and_take::<ConsoleWorker>()?;
        let mut carried = ConsoleState {
            broken: w.engine.broken,
            ..ConsoleState::default()
        };
        if let Some((chain, done)) = w.engine.current.take() {
            // The worker pops a transmit chain only when none is in
            // flight, so this one is the last popped: it goes back to the
            // head of the ring, and the next activation skips its first
            // `done` bytes.
            w.tx.undo_pop(chain.token());
            carried.tx_done = done as u64;
        } else {
            carried.tx_done = w.engine.resume_offset as u64;
        }
        let input = std::mem::take(&mut w.engine.input);
        let keep = input.len().min(MAX_STATE_INPUT);
        if keep < input.len() {
            ConsoleCounters::add(&self.counters.input_dropped, (input.len() - keep) as u64);
        }
        carried.input = input.into_iter().take(keep).collect();
        self.carried = carried;
        Some(vec![Some(w.rx), Some(w.tx)])
    }

    fn save_device_state(&self) -> Vec<u8> {
        self.carried.to_bytes()
    }

    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if state.is_empty() {
            return Ok(());
        }
        let state = ConsoleState::from_bytes(state)?;
        if state.input.len() > self.options.input_buffer {
            return Err(StateError::Mismatch {
                what: "virtio-console",
                reason: format!(
                    "{} buffered input bytes, this device keeps at most {}",
                    state.input.len(),
                    self.options.input_buffer
                ),
            });
        }
        if self.worker.is_some() {
            return Err(StateError::Mismatch {
                what: "virtio-console",
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

struct ConsoleWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    backend: SharedBackend,
    counters: Arc<ConsoleCounters>,
    engine: ConsoleEngine,
    rx: Queue,
    rx_notify: Arc<EventFd>,
    tx: Queue,
    tx_notify: Arc<EventFd>,
}

impl ConsoleWorker {
    fn fail(&mut self, e: &QueueError) {
        log::warn!("virtio-console: {e}; device needs reset");
        self.engine.broken = true;
        self.interrupt.needs_reset();
    }

    fn deliver(&mut self) {
        match self.engine.deliver(&mut self.rx, &self.mem, &self.counters) {
            Ok(0) => {}
            Ok(_) => match self.rx.needs_notification(&self.mem) {
                Ok(true) => self.interrupt.signal_queue(RX_QUEUE),
                Ok(false) => {}
                Err(e) => self.fail(&e),
            },
            Err(e) => self.fail(&e),
        }
    }

    fn transmit(&mut self, backend: &mut dyn ConsoleBackend) {
        match self
            .engine
            .transmit(&mut self.tx, &self.mem, backend, &self.counters)
        {
            Ok(report) => {
                if report.budget_hit {
                    if let Err(e) = self.tx_notify.write(1) {
                        log::error!("virtio-console: cannot re-arm the transmit queue: {e}");
                    }
                }
                if report.used > 0 {
                    match self.tx.needs_notification(&self.mem) {
                        Ok(true) => self.interrupt.signal_queue(TX_QUEUE),
                        Ok(false) => {}
                        Err(e) => self.fail(&e),
                    }
                }
            }
            Err(e) => self.fail(&e),
        }
    }
}

impl WorkerHandler for ConsoleWorker {
    fn handle(&mut self, token: u64, _events: EventSet) -> ControlFlow<()> {
        ConsoleCounters::add(&self.counters.wakeups, 1);
        let backend = self.backend.clone();
        let mut guard = backend.lock().unwrap_or_else(PoisonError::into_inner);
        let backend: &mut dyn ConsoleBackend = &mut **guard;
        match token {
            RX_TOKEN => {
                drain_eventfd(&self.rx_notify);
                self.deliver();
            }
            TX_TOKEN => {
                drain_eventfd(&self.tx_notify);
                self.transmit(backend);
            }
            BACKEND_TOKEN => {
                self.engine.pump_input(backend, &self.counters);
                self.deliver();
                if self.engine.output_blocked {
                    self.transmit(backend);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// What one [`ConsoleEngine::transmit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxReport {
    /// Chains returned to the guest.
    pub used: usize,
    /// The byte budget ran out with output possibly still queued.
    pub budget_hit: bool,
}

/// The console's queue work, apart from its thread (the worker's steps;
/// public for fuzzing and tests): the bounded input buffer and the output
/// chain in flight.
#[derive(Debug)]
pub struct ConsoleEngine {
    input: VecDeque<u8>,
    capacity: usize,
    /// The transmit chain being written and how many of its bytes are out.
    current: Option<(DescChain, usize)>,
    /// Bytes of the next transmit chain popped that were written before a
    /// snapshot (see the [module documentation](self)).
    resume_offset: usize,
    output_blocked: bool,
    broken: bool,
}

impl ConsoleEngine {
    /// An engine keeping at most `input_buffer` input bytes.
    pub fn new(input_buffer: usize) -> Self {
        Self {
            input: VecDeque::new(),
            capacity: input_buffer,
            current: None,
            resume_offset: 0,
            output_blocked: false,
            broken: false,
        }
    }

    /// Input bytes waiting for receive buffers.
    pub fn pending_input(&self) -> usize {
        self.input.len()
    }

    /// Adds input bytes; those beyond the buffer's room are dropped and
    /// counted. Returns how many were kept.
    pub fn push_input(&mut self, data: &[u8], counters: &ConsoleCounters) -> usize {
        let room = self.capacity.saturating_sub(self.input.len());
        let keep = data.len().min(room);
        self.input.extend(data.iter().take(keep));
        let dropped = data.len() - keep;
        if dropped > 0 {
            ConsoleCounters::add(&counters.input_dropped, dropped as u64);
        }
        keep
    }

    /// Reads what the backend has (a bounded number of reads).
    pub fn pump_input(&mut self, backend: &mut dyn ConsoleBackend, counters: &ConsoleCounters) {
        let mut buf = [0u8; CHUNK];
        for _ in 0..INPUT_READS {
            match backend.read_input(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.push_input(buf.get(..n).unwrap_or(&[]), counters);
                }
                Err(e) => {
                    log::warn!("virtio-console: input failed: {e}");
                    ConsoleCounters::add(&counters.errors, 1);
                    break;
                }
            }
        }
    }

    /// Moves buffered input into receive chains. Returns the chains used.
    pub fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        counters: &ConsoleCounters,
    ) -> Result<usize, QueueError> {
        if self.broken {
            return Ok(0);
        }
        let mut used = 0;
        let budget = usize::from(queue.size()) * 2;
        let mut rechecked = false;
        while !self.input.is_empty() && used < budget {
            let Some(chain) = queue.pop(mem)? else {
                if rechecked || !queue.enable_notification(mem)? {
                    break;
                }
                rechecked = true;
                continue;
            };
            used += 1;
            if !chain.readable().is_empty() {
                ConsoleCounters::add(&counters.errors, 1);
                give_back(queue, mem, &chain, 0)?;
                continue;
            }
            let mut w = chain.writer(mem);
            let n = w.available().min(self.input.len());
            let (a, b) = self.input.as_slices();
            let first = n.min(a.len());
            let ok = w.write_all(a.get(..first).unwrap_or(&[])).is_ok()
                && w.write_all(b.get(..n - first).unwrap_or(&[])).is_ok();
            if !ok {
                // A buffer outside guest memory: keep the input for the
                // next chain.
                ConsoleCounters::add(&counters.errors, 1);
                give_back(queue, mem, &chain, 0)?;
                continue;
            }
            self.input.drain(..n);
            ConsoleCounters::add(&counters.input_bytes, n as u64);
            // n ≤ the chain's length, which fits in u32.
            give_back(queue, mem, &chain, n as u32)?;
        }
        Ok(used)
    }

    /// Writes transmit chains to the backend, continuing a chain a
    /// previous call left partly written.
    pub fn transmit(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        backend: &mut dyn ConsoleBackend,
        counters: &ConsoleCounters,
    ) -> Result<TxReport, QueueError> {
        let mut report = TxReport {
            used: 0,
            budget_hit: false,
        };
        if self.broken {
            return Ok(report);
        }
        let mut bytes = 0usize;
        let mut chains = 0usize;
        let max_chains = usize::from(queue.size()) * 2;
        let mut rechecked = false;
        self.output_blocked = false;
        loop {
            if bytes >= TX_BUDGET || chains >= max_chains {
                report.budget_hit = true;
                break;
            }
            let (chain, mut done) = match self.current.take() {
                Some(c) => c,
                None => match queue.pop(mem)? {
                    Some(c) => (c, std::mem::take(&mut self.resume_offset)),
                    None => {
                        if rechecked || !queue.enable_notification(mem)? {
                            break;
                        }
                        rechecked = true;
                        continue;
                    }
                },
            };
            chains += 1;
            if !chain.writable().is_empty() {
                ConsoleCounters::add(&counters.errors, 1);
                give_back(queue, mem, &chain, 0)?;
                report.used += 1;
                continue;
            }
            match write_chain(mem, &chain, &mut done, backend, counters, TX_BUDGET - bytes) {
                (w, Written::All) => {
                    bytes += w;
                    give_back(queue, mem, &chain, 0)?;
                    report.used += 1;
                }
                (w, Written::Budget) => {
                    bytes += w;
                    self.current = Some((chain, done));
                }
                (_, Written::Blocked) => {
                    self.current = Some((chain, done));
                    self.output_blocked = true;
                    break;
                }
                (_, Written::Failed) => {
                    ConsoleCounters::add(&counters.errors, 1);
                    give_back(queue, mem, &chain, 0)?;
                    report.used += 1;
                }
            }
        }
        Ok(report)
    }
}

enum Written {
    All,
    Budget,
    Blocked,
    Failed,
}

/// Writes a chain's readable bytes from `*done` on, at most `budget` of
/// them; returns the bytes written now.
fn write_chain(
    mem: &GuestMemoryMmap,
    chain: &DescChain,
    done: &mut usize,
    backend: &mut dyn ConsoleBackend,
    counters: &ConsoleCounters,
    budget: usize,
) -> (usize, Written) {
    let mut reader = chain.reader(mem);
    if reader.skip(*done).is_err() {
        return (0, Written::Failed);
    }
    let mut buf = [0u8; CHUNK];
    let mut now = 0usize;
    while reader.available() > 0 {
        if now >= budget {
            return (now, Written::Budget);
        }
        let n = reader.available().min(CHUNK);
        let Some(chunk) = buf.get_mut(..n) else {
            return (now, Written::Failed);
        };
        if reader.read_exact(chunk).is_err() {
            return (now, Written::Failed);
        }
        let mut off = 0;
        while off < n {
            match backend.write_output(chunk.get(off..).unwrap_or(&[])) {
                Ok(0) => return (now, Written::Blocked),
                Ok(w) => {
                    let w = w.min(n - off);
                    off += w;
                    *done += w;
                    now += w;
                    ConsoleCounters::add(&counters.output_bytes, w as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (now, Written::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("virtio-console: output failed: {e}");
                    return (now, Written::Failed);
                }
            }
        }
    }
    (now, Written::All)
}
