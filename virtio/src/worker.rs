//! Device worker threads driven by epoll, and the queue-draining loop the
//! devices share.
//!
//! A [`Worker`] owns one thread that waits on a set of file descriptors
//! (queue notification eventfds, backend fds) with vmm-sys-util's `Epoll`
//! and hands each ready one to a [`WorkerHandler`]. Dropping or stopping the
//! worker wakes the thread through a private eventfd and joins it, so a
//! device reset returns only once its worker is gone.

use std::any::Any;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

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
    thread: Option<JoinHandle<Box<dyn Any + Send>>>,
}

impl Worker {
    /// Starts a thread named `name` that waits on `sources` and calls
    /// `handler` for each ready one.
    pub fn spawn<H: WorkerHandler>(
        name: &str,
        sources: &[WorkerSource],
        mut handler: H,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
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
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); 16];
                // The loop runs in a closure so that the handler outlives
                // it and is handed back on join (`stop_and_take`).
                let mut run = || loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("virtio worker: epoll_wait failed: {e}");
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        if ev.data() == STOP_TOKEN {
                            return;
                        }
                        if handler.handle(ev.data(), ev.event_set()).is_break() {
                            return;
                        }
                    }
                };
                run();
                Box::new(handler) as Box<dyn Any + Send>
            })?;
        Ok(Self {
            stop,
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
    /// The ring is empty and notifications are re-enabled.
    Empty,
    /// The per-call budget ran out with chains still queued: call again.
    Budget,
    /// The handler returned [`Completion::NotNow`].
    Blocked,
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
    let budget = usize::from(queue.size()) * DRAIN_LAPS;
    let mut done = 0usize;
    let mut used_any = false;
    let outcome = loop {
        queue.disable_notification(mem)?;
        let mut blocked = false;
        while done < budget {
            let Some(chain) = queue.pop(mem)? else {
                break;
            };
            match f(&chain) {
                Completion::Used(len) => {
                    queue.add_used(mem, chain.token(), len)?;
                    used_any = true;
                    done += 1;
                }
                Completion::NotNow => {
                    queue.undo_pop(chain.token());
                    blocked = true;
                    break;
                }
            }
        }
        if blocked {
            queue.enable_notification(mem)?;
            break DrainOutcome::Blocked;
        }
        if done >= budget {
            break DrainOutcome::Budget;
        }
        if !queue.enable_notification(mem)? {
            break DrainOutcome::Empty;
        }
    };
    if used_any && queue.needs_notification(mem)? {
        interrupt.signal_queue(queue.index());
    }
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
}

impl ServedQueue {
    /// Wraps an activated queue.
    pub fn new(active: crate::device::ActiveQueue) -> Self {
        Self {
            queue: active.queue,
            notify: active.notify,
            broken: false,
        }
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
        f: F,
    ) -> DrainOutcome
    where
        F: FnMut(&DescChain) -> Completion,
    {
        drain_eventfd(&self.notify);
        self.process(mem, interrupt, f)
    }

    /// Drains the ring without consuming a notification (e.g. when a
    /// backend became ready).
    pub fn process<F>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        f: F,
    ) -> DrainOutcome
    where
        F: FnMut(&DescChain) -> Completion,
    {
        if self.broken {
            return DrainOutcome::Empty;
        }
        match drain_queue(&mut self.queue, mem, interrupt, f) {
            Ok(DrainOutcome::Budget) => {
                if let Err(e) = self.notify.write(1) {
                    log::error!("virtio: cannot re-arm queue {}: {e}", self.queue.index());
                }
                DrainOutcome::Budget
            }
            Ok(o) => o,
            Err(e) => {
                log::warn!("virtio: {e}; device needs reset");
                self.broken = true;
                interrupt.needs_reset();
                DrainOutcome::Empty
            }
        }
    }
}
