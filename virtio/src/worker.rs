//! Device worker threads driven by epoll, and the queue-draining loop the
//! devices share.
//!
//! A [`Worker`] owns one thread that waits on a set of file descriptors
//! (queue notification eventfds, backend fds) with vmm-sys-util's `Epoll`
//! and hands each ready one to a [`WorkerHandler`]. Dropping or stopping the
//! worker wakes the thread through a private eventfd and joins it, so a
//! device reset returns only once its worker is gone.
//!
//! # Polling
//!
//! A worker started with [`WorkerOptions::poll_us`] above zero does not go
//! back to sleep as soon as it has served an event: it first asks its
//! handler ([`WorkerHandler::poll`]) for work that arrived without a
//! notification, for up to a *window* of time, and only then lets the
//! handler re-enable notifications ([`WorkerHandler::park`]) and blocks.
//! A driver that submits while the worker polls is served without the cost
//! of a notification and a thread wake-up (several microseconds each on a
//! virtualised host).
//!
//! The window adapts, as QEMU's `poll-max-ns` does: it starts at zero,
//! doubles (from 4 µs, up to `poll_us`) when the worker found itself
//! idle for less than `poll_us` (polling a bit longer would have caught
//! the work), and halves when it was idle for longer (polling would only
//! have burnt CPU). An idle device therefore does not spin, and a busy one
//! spins at most `poll_us` past its last piece of work before it blocks.
//! Polling never outlasts a stop request, and while work keeps arriving
//! the worker still checks its other sources after each find.

use std::any::Any;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::Interrupt;
use crate::queue::{DescChain, Queue, QueueError};

/// Token reserved for the worker's stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

/// Handles the events of one worker thread.
pub trait WorkerHandler: Send + 'static {
    /// `token` became ready with `events`. Return `Break` to end the
    /// worker (after an unrecoverable error, which the handler reports).
    fn handle(&mut self, token: u64, events: EventSet) -> ControlFlow<()>;

    /// Serves work that arrived without an event (chains a driver added
    /// while notifications were suppressed) and returns whether there was
    /// any. Called repeatedly while a polling worker polls, so it must be
    /// cheap when there is nothing to do and bounded when there is. The
    /// default finds nothing.
    fn poll(&mut self) -> bool {
        false
    }

    /// The worker is about to block: re-enable every notification that
    /// [`WorkerHandler::handle`] or [`WorkerHandler::poll`] left
    /// suppressed, re-check for work that raced with that, serve it, and
    /// return whether there was any (the worker then polls again instead
    /// of blocking). Called before every blocking wait. The default does
    /// nothing and returns `false`.
    fn park(&mut self) -> bool {
        false
    }
}

/// The longest polling window a worker accepts, in microseconds (a longer
/// spin would only steal CPU from vCPUs).
pub const MAX_POLL_US: u32 = 1000;

/// The polling window devices use unless told otherwise: none.
///
/// Polling pays where a core is free for the worker. On the 2-vCPU
/// virtualised hosts this project runs on (block benchmark, 64-request
/// batches, a driver that kicks only when asked, so one thread wake-up per
/// batch without polling), a 50 µs window now gives 1.4–1.8x the requests
/// per second with `preadv` reads and 2.5–3.2x with mapped reads; before
/// completions were published once per batch it gained nothing (0.99–1.02x)
/// or cost 30%, because the worker's reads of the ring bounced the cache
/// line the driver writes. It stays off by default all the same: a
/// spinning worker takes CPU time that, on a host with fewer cores than
/// busy threads (the nested lab's L1 has one), belongs to the vCPUs, and
/// a library cannot know which host it is on. Turn it on with the
/// devices' `poll_us` where a core is free for each busy device (QEMU's
/// IOThreads poll up to 32 µs by default).
pub const DEFAULT_POLL_US: u32 = 0;

/// Stack size of a worker thread. Handlers keep their buffers on the heap
/// or in guest memory, so half a MiB is ample; and a stack smaller than a
/// 2 MiB huge page can never be backed by one (on hosts whose transparent
/// huge pages are set to `always`, a 2 MiB aligned default-sized stack
/// would make 2 MiB resident for a few KiB used).
pub const WORKER_STACK_BYTES: usize = 512 * 1024;

/// How a worker waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Longest polling window in microseconds (0: never poll; at most
    /// [`MAX_POLL_US`]). See the [module docs](self).
    pub poll_us: u32,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            poll_us: DEFAULT_POLL_US,
        }
    }
}

/// The adaptive polling window.
#[derive(Debug)]
struct PollWindow {
    max: Duration,
    current: Duration,
}

/// Where a growing window starts.
const POLL_START: Duration = Duration::from_micros(4);

impl PollWindow {
    fn new(poll_us: u32) -> Self {
        Self {
            max: Duration::from_micros(u64::from(poll_us.min(MAX_POLL_US))),
            current: Duration::ZERO,
        }
    }

    fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// Adjusts the window after the worker was idle (polling, then
    /// blocked) for `idle` before work came.
    fn observe(&mut self, idle: Duration) {
        if idle <= self.current {
            // Polling caught it, or nearly: keep the window.
        } else if idle > self.max {
            // Polling could not have caught it: poll less.
            self.current /= 2;
            if self.current < POLL_START {
                self.current = Duration::ZERO;
            }
        } else {
            // A longer window would have caught it.
            self.current = (self.current * 2).clamp(POLL_START, self.max);
        }
    }
}

/// One file descriptor a worker waits on.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSource {
    /// The descriptor (must stay open while the worker runs: keep its owner
    /// in the handler).
    pub fd: RawFd,
    /// Passed to [`WorkerHandler::handle`]; `u64::MAX` is reserved.
    pub token: u64,
    /// Events to wait for.
    pub events: EventSet,
}

/// A running device worker thread.
#[derive(Debug)]
pub struct Worker {
    stop: Arc<EventFd>,
    /// Set before `stop` is signalled, for the polling loop (which does
    /// not look at the eventfd).
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<Box<dyn Any + Send>>>,
}

impl Worker {
    /// Starts a thread named `name` that waits on `sources` and calls
    /// `handler` for each ready one, without polling.
    pub fn spawn<H: WorkerHandler>(
        name: &str,
        sources: &[WorkerSource],
        handler: H,
    ) -> io::Result<Self> {
        Self::spawn_with(name, sources, handler, WorkerOptions { poll_us: 0 })
    }

    /// As [`Worker::spawn`], polling as `options` say (see the
    /// [module docs](self)).
    pub fn spawn_with<H: WorkerHandler>(
        name: &str,
        sources: &[WorkerSource],
        mut handler: H,
        options: WorkerOptions,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop_flag = stopping.clone();
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for s in sources {
            if s.token == STOP_TOKEN {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "worker token u64::MAX is reserved",
                ));
            }
            epoll.ctl(
                ControlOperation::Add,
                s.fd,
                EpollEvent::new(s.events, s.token),
            )?;
        }
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); 16];
                let mut window = PollWindow::new(options.poll_us);
                // When the worker went idle (last found work), for the
                // adaptive window.
                let mut idle_since: Option<Instant> = None;
                // -1 blocks; 0 only collects what is ready (after work was
                // found by polling, so that other sources get their turn).
                let mut timeout = -1;
                // The loop runs in a closure so that the handler outlives
                // it and is handed back on join (`stop_and_take`).
                let mut run = || loop {
                    let n = match epoll.wait(timeout, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("virtio worker: epoll_wait failed: {e}");
                            return;
                        }
                    };
                    if let Some(t) = idle_since.take() {
                        window.observe(t.elapsed());
                    }
                    for ev in events.iter().take(n) {
                        if ev.data() == STOP_TOKEN {
                            return;
                        }
                        if handler.handle(ev.data(), ev.event_set()).is_break() {
                            return;
                        }
                    }
                    if window.enabled() {
                        match poll(&mut handler, window.current, &stop_flag) {
                            Polled::Stop => return,
                            Polled::Busy => {
                                timeout = 0;
                                continue;
                            }
                            Polled::Idle { since } => idle_since = Some(since),
                        }
                    }
                    timeout = if handler.park() {
                        idle_since = None;
                        0
                    } else {
                        -1
                    };
                };
                run();
                Box::new(handler) as Box<dyn Any + Send>
            })?;
        Ok(Self {
            stop,
            stopping,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stops the thread, waits for it and hands back its handler (for a
    /// device that returns its queues for a snapshot). `None` if the
    /// thread panicked, could not be told to stop (it is then left
    /// running and stopped on drop), or `H` is not the handler's type.
    pub fn stop_and_take<H: WorkerHandler>(mut self) -> Option<H> {
        let t = self.thread.take()?;
        self.stopping.store(true, Ordering::Release);
        if let Err(e) = self.stop.write(1) {
            log::error!("virtio worker: cannot signal stop: {e}");
            self.thread = Some(t);
            return None;
        }
        match t.join() {
            Ok(handler) => handler.downcast::<H>().ok().map(|h| *h),
            Err(_) => {
                log::error!("virtio worker panicked");
                None
            }
        }
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stopping.store(true, Ordering::Release);
            if let Err(e) = self.stop.write(1) {
                log::error!("virtio worker: cannot signal stop: {e}");
                return;
            }
            if t.join().is_err() {
                log::error!("virtio worker panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How a polling spell ended.
enum Polled {
    /// The handler kept finding work: look at the other sources, then
    /// poll again.
    Busy,
    /// Nothing (more) came within the window; `since` is when the worker
    /// last found work or started polling.
    Idle { since: Instant },
    /// The worker is being stopped.
    Stop,
}

/// Finds after which a polling worker looks at its other sources.
const POLL_FAIRNESS: u32 = 16;

/// Polls `handler` until nothing came for `window` (at least once).
/// Bounded: the spell ends after `window` without work, after
/// `POLL_FAIRNESS` finds, or at a stop request.
fn poll<H: WorkerHandler>(handler: &mut H, window: Duration, stop: &AtomicBool) -> Polled {
    let mut since = Instant::now();
    let mut finds = 0u32;
    loop {
        if stop.load(Ordering::Acquire) {
            return Polled::Stop;
        }
        if handler.poll() {
            finds += 1;
            if finds >= POLL_FAIRNESS {
                return Polled::Busy;
            }
            since = Instant::now();
            continue;
        }
        if since.elapsed() >= window {
            return Polled::Idle { since };
        }
        std::hint::spin_loop();
    }
}

/// Consumes a notification eventfd's counter (a non-blocking read; an
/// empty counter is not an error).
pub fn drain_eventfd(fd: &EventFd) {
    match fd.read() {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => log::warn!("virtio: reading a notification eventfd failed: {e}"),
    }
}

/// What processing a chain produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Return the chain with this many bytes written.
    Used(u32),
    /// The device cannot take the chain now (e.g. no backend data for a
    /// receive buffer): leave it queued and stop draining.
    NotNow,
}

/// The most chains one call of [`drain_queue`] processes per queue size,
/// so that a driver that keeps refilling cannot hold a worker forever.
const DRAIN_LAPS: usize = 2;

/// Why draining a queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// The ring is empty. Notifications are re-enabled, except on a queue
    /// served for a polling worker ([`ServedQueue::polled`]), where
    /// [`ServedQueue::park`] does that.
    Empty,
    /// The per-call budget ran out with chains still queued: call again.
    Budget,
    /// The handler returned [`Completion::NotNow`].
    Blocked,
}

/// Serves the chains a drain pops: one at a time (any
/// `FnMut(&DescChain) -> Completion` is one) or several at once
/// ([`Batched`]), e.g. to send several frames with one system call.
pub trait ChainHandler {
    /// Most chains handed over in one call (at least 1).
    fn batch(&self) -> usize {
        1
    }

    /// Handles `chains`, in ring order, pushing one [`Completion`] per
    /// chain onto `out` (empty on entry), in the same order. The chain of
    /// the first `NotNow`, and every chain after it, is put back on the
    /// ring, so the handler must not have completed any of them; chains
    /// without a completion count as `NotNow`.
    fn handle(&mut self, chains: &[DescChain], out: &mut Vec<Completion>);
}

impl<F: FnMut(&DescChain) -> Completion + ?Sized> ChainHandler for F {
    fn handle(&mut self, chains: &[DescChain], out: &mut Vec<Completion>) {
        for c in chains {
            let done = self(c);
            out.push(done);
            if done == Completion::NotNow {
                break;
            }
        }
    }
}

/// A [`ChainHandler`] that takes up to `max` chains per call of `f`
/// (arguments as [`ChainHandler::handle`]).
#[derive(Debug)]
pub struct Batched<F> {
    /// Most chains per call (0 counts as 1).
    pub max: usize,
    /// The handler.
    pub f: F,
}

impl<F: FnMut(&[DescChain], &mut Vec<Completion>)> ChainHandler for Batched<F> {
    fn batch(&self) -> usize {
        self.max.max(1)
    }

    fn handle(&mut self, chains: &[DescChain], out: &mut Vec<Completion>) {
        (self.f)(chains, out)
    }
}

/// What a drain does with the driver's notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Notify {
    /// Suppress them first.
    suppress: bool,
    /// Re-enable them (and re-check the ring) when it runs empty.
    rearm: bool,
}

/// Reusable buffers of a drain (kept by [`ServedQueue`] so that draining
/// allocates nothing once they have grown).
#[derive(Debug, Default)]
struct Scratch {
    chains: Vec<DescChain>,
    done: Vec<Completion>,
}

/// Pops chains from `queue`, hands each to `f`, returns them used, and
/// interrupts the driver as the ring's suppression rules say.
///
/// Work per call is bounded by `DRAIN_LAPS` × queue size chains. A broken
/// ring is returned as an error; the caller then calls
/// [`Interrupt::needs_reset`] and stops using the queue.
pub fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn Interrupt,
    mut f: F,
) -> Result<DrainOutcome, QueueError>
where
    F: FnMut(&DescChain) -> Completion,
{
    let notify = Notify {
        suppress: true,
        rearm: true,
    };
    drain(
        queue,
        mem,
        interrupt,
        &mut f,
        notify,
        &mut Scratch::default(),
    )
    .map(|(o, _)| o)
}

/// Most completions a drain leaves unpublished: the used index is stored
/// when the ring runs empty, when the drain ends, and at least once per
/// this many chains, so that a driver that keeps the ring full still sees
/// completions flow (Linux's vhost batches used entries by 64 too).
const PUBLISH_MAX: usize = 64;

/// [`drain_queue`] for any [`ChainHandler`], with a choice of what happens
/// to notifications; also returns how many chains were used.
///
/// Completions are written with [`Queue::push_used`] and published in
/// batches (see `PUBLISH_MAX`); the interrupt decision is made once, after
/// the last publication, for everything the drain used.
fn drain<H: ChainHandler + ?Sized>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn Interrupt,
    handler: &mut H,
    notify: Notify,
    scratch: &mut Scratch,
) -> Result<(DrainOutcome, usize), QueueError> {
    let mut done = 0usize;
    let result = drain_batches(queue, mem, handler, notify, scratch, &mut done);
    scratch.chains.clear();
    // Whatever happened, the chains already completed are published (an
    // error ends the queue's life, but the driver may still reap them).
    let published = queue.publish_used(mem);
    let outcome = result?;
    published?;
    if done > 0 && queue.needs_notification(mem)? {
        interrupt.signal_queue(queue.index());
    }
    Ok((outcome, done))
}

/// The loop of [`drain`]: pops, handles and completes chains until the
/// ring is empty, the budget is spent or the handler is blocked, counting
/// the chains used in `done`.
fn drain_batches<H: ChainHandler + ?Sized>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    handler: &mut H,
    notify: Notify,
    scratch: &mut Scratch,
    done: &mut usize,
) -> Result<DrainOutcome, QueueError> {
    let budget = usize::from(queue.size()) * DRAIN_LAPS;
    let batch = handler.batch().max(1);
    let mut unpublished = 0usize;
    let mut suppress = notify.suppress;
    let outcome = loop {
        if suppress {
            queue.disable_notification(mem)?;
        }
        let mut blocked = false;
        while *done < budget && !blocked {
            scratch.chains.clear();
            scratch.done.clear();
            let want = batch.min(budget - *done);
            while scratch.chains.len() < want {
                match queue.pop(mem)? {
                    Some(c) => scratch.chains.push(c),
                    None => break,
                }
            }
            if scratch.chains.is_empty() {
                // The ring looks empty: let the driver see what was done
                // before anything waits for more.
                queue.publish_used(mem)?;
                unpublished = 0;
                break;
            }
            handler.handle(&scratch.chains, &mut scratch.done);
            // Complete the prefix the handler finished; put the rest back,
            // last popped first.
            let finished = scratch
                .done
                .iter()
                .take_while(|c| matches!(c, Completion::Used(_)))
                .count()
                .min(scratch.chains.len());
            for (chain, c) in scratch.chains.iter().zip(&scratch.done).take(finished) {
                if let Completion::Used(len) = c {
                    queue.push_used(mem, chain.token(), *len)?;
                }
            }
            *done += finished;
            unpublished += finished;
            if unpublished >= PUBLISH_MAX {
                queue.publish_used(mem)?;
                unpublished = 0;
            }
            if let Some(rest) = scratch.chains.get(finished..) {
                for chain in rest.iter().rev() {
                    queue.undo_pop(chain.token());
                }
                blocked = !rest.is_empty();
            }
        }
        if blocked {
            queue.enable_notification(mem)?;
            break DrainOutcome::Blocked;
        }
        if *done >= budget {
            break DrainOutcome::Budget;
        }
        if !notify.rearm || !queue.enable_notification(mem)? {
            break DrainOutcome::Empty;
        }
        // Chains came while re-enabling: suppress again and go on.
        suppress = true;
    };
    Ok(outcome)
}

/// One queue as a worker serves it: the ring, its notification eventfd,
/// and whether the driver broke it.
#[derive(Debug)]
pub struct ServedQueue {
    /// The ring.
    pub queue: Queue,
    /// The queue's notification eventfd.
    pub notify: Arc<EventFd>,
    /// The ring was found broken and DEVICE_NEEDS_RESET was raised: the
    /// queue is not touched again until the device is reset.
    pub broken: bool,
    /// Served for a polling worker: notifications stay suppressed until
    /// [`ServedQueue::park`].
    polled: bool,
    /// Whether driver notifications are currently suppressed (polled
    /// queues only).
    suppressed: bool,
    scratch: Scratch,
}

impl ServedQueue {
    /// Wraps an activated queue.
    pub fn new(active: crate::device::ActiveQueue) -> Self {
        Self {
            queue: active.queue,
            notify: active.notify,
            broken: false,
            polled: false,
            suppressed: false,
            scratch: Scratch::default(),
        }
    }

    /// Serves the queue for a polling worker (see
    /// [`WorkerOptions::poll_us`]): [`ServedQueue::serve`] and
    /// [`ServedQueue::process`] leave the driver's notifications
    /// suppressed when the ring runs empty, [`ServedQueue::poll`] picks up
    /// what the driver adds meanwhile, and [`ServedQueue::park`] — which
    /// the handler must call from [`WorkerHandler::park`] — re-enables
    /// them before the worker blocks.
    pub fn polled(mut self) -> Self {
        self.polled = true;
        self
    }

    /// The source to register with a [`Worker`] under `token`.
    pub fn source(&self, token: u64) -> WorkerSource {
        WorkerSource {
            fd: self.notify.as_raw_fd(),
            token,
            events: EventSet::IN,
        }
    }

    /// Handles a notification: consumes the eventfd and drains the ring
    /// with `f` (see [`drain_queue`]). When the budget runs out the worker
    /// re-notifies itself so that other sources get their turn first; a
    /// broken ring raises DEVICE_NEEDS_RESET once.
    pub fn serve<F>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        mut f: F,
    ) -> DrainOutcome
    where
        F: FnMut(&DescChain) -> Completion,
    {
        self.serve_with(mem, interrupt, &mut f)
    }

    /// [`ServedQueue::serve`] with any [`ChainHandler`] (e.g. [`Batched`]).
    pub fn serve_with<H: ChainHandler + ?Sized>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        f: &mut H,
    ) -> DrainOutcome {
        drain_eventfd(&self.notify);
        self.process_with(mem, interrupt, f)
    }

    /// Drains the ring without consuming a notification (e.g. when a
    /// backend became ready).
    pub fn process<F>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        mut f: F,
    ) -> DrainOutcome
    where
        F: FnMut(&DescChain) -> Completion,
    {
        self.process_with(mem, interrupt, &mut f)
    }

    /// [`ServedQueue::process`] with any [`ChainHandler`] (e.g. [`Batched`]).
    pub fn process_with<H: ChainHandler + ?Sized>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        f: &mut H,
    ) -> DrainOutcome {
        if self.broken {
            return DrainOutcome::Empty;
        }
        let notify = Notify {
            suppress: !self.suppressed,
            rearm: !self.polled,
        };
        match self.drain(mem, interrupt, f, notify) {
            Some((DrainOutcome::Budget, _)) => {
                if let Err(e) = self.notify.write(1) {
                    log::error!("virtio: cannot re-arm queue {}: {e}", self.queue.index());
                }
                DrainOutcome::Budget
            }
            Some((o, _)) => o,
            None => DrainOutcome::Empty,
        }
    }

    /// For a polling worker ([`WorkerHandler::poll`]): serves the chains
    /// the driver added since the last drain, leaving notifications as
    /// they are, and returns whether there were any. Costs one read of the
    /// ring when there are none. Does nothing on a queue not
    /// [`ServedQueue::polled`].
    pub fn poll<F>(&mut self, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt, mut f: F) -> bool
    where
        F: FnMut(&DescChain) -> Completion,
    {
        self.poll_with(mem, interrupt, &mut f)
    }

    /// [`ServedQueue::poll`] with any [`ChainHandler`] (e.g. [`Batched`]).
    pub fn poll_with<H: ChainHandler + ?Sized>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        f: &mut H,
    ) -> bool {
        if self.broken || !self.polled {
            return false;
        }
        let notify = Notify {
            suppress: !self.suppressed,
            rearm: false,
        };
        matches!(self.drain(mem, interrupt, f, notify), Some((_, n)) if n > 0)
    }

    /// For a polling worker about to block ([`WorkerHandler::park`]):
    /// re-enables the driver's notifications and re-checks the ring (with
    /// `VIRTIO_F_EVENT_IDX` this publishes the event index), serving what
    /// raced in. Returns whether there was any such work; the worker then
    /// keeps polling. Does nothing on a queue not [`ServedQueue::polled`].
    pub fn park<F>(&mut self, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt, mut f: F) -> bool
    where
        F: FnMut(&DescChain) -> Completion,
    {
        self.park_with(mem, interrupt, &mut f)
    }

    /// [`ServedQueue::park`] with any [`ChainHandler`] (e.g. [`Batched`]).
    pub fn park_with<H: ChainHandler + ?Sized>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        f: &mut H,
    ) -> bool {
        if self.broken || !self.polled || !self.suppressed {
            return false;
        }
        let raced = match self.queue.enable_notification(mem) {
            Ok(r) => r,
            Err(e) => {
                self.fail(interrupt, &e);
                return false;
            }
        };
        self.suppressed = false;
        if !raced {
            return false;
        }
        self.process_with(mem, interrupt, f);
        true
    }

    /// Runs one drain, keeping `suppressed` up to date; `None` (after
    /// raising DEVICE_NEEDS_RESET) if the ring is broken.
    fn drain<H: ChainHandler + ?Sized>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        f: &mut H,
        notify: Notify,
    ) -> Option<(DrainOutcome, usize)> {
        match drain(
            &mut self.queue,
            mem,
            interrupt,
            f,
            notify,
            &mut self.scratch,
        ) {
            Ok((outcome, n)) => {
                // Drains end with notifications enabled when they re-arm or
                // were blocked, suppressed otherwise.
                self.suppressed = match outcome {
                    DrainOutcome::Blocked => false,
                    DrainOutcome::Empty => !notify.rearm,
                    DrainOutcome::Budget => true,
                };
                Some((outcome, n))
            }
            Err(e) => {
                self.fail(interrupt, &e);
                None
            }
        }
    }

    fn fail(&mut self, interrupt: &dyn Interrupt, e: &QueueError) {
        log::warn!("virtio: {e}; device needs reset");
        self.broken = true;
        interrupt.needs_reset();
    }
}
