//! virtio-rng (virtio 1.2, 5.4): fills the driver's buffers with bytes from
//! the host's `getrandom(2)`.

use std::io;
use std::ops::ControlFlow;
use std::sync::Arc;

use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use crate::device::{ActivateError, Activation, Interrupt, VirtioDevice};
use crate::device_type;
use crate::queue::DescChain;
use crate::worker::{Completion, ServedQueue, Worker, WorkerHandler};

/// Queue size offered.
const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most, so one chain cannot make the worker
/// produce gigabytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Fills `buf` from the host's entropy pool.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call; getrandom writes at most that many.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // n ≥ 0 and ≤ rest.len().
        done += n as usize;
    }
    Ok(())
}

/// Fills one request chain with random bytes (at most [`MAX_REQUEST`]),
/// as the worker does; public for fuzzing and tests that want no thread.
pub fn fill_chain(mem: &GuestMemoryMmap, chain: &DescChain) -> Completion {
    let mut w = chain.writer(mem);
    let len = w.available().min(MAX_REQUEST);
    if let Err(e) = w.fill_with(len, getrandom) {
        log::warn!("virtio-rng: request cut short: {e}");
    }
    // bytes_written ≤ MAX_REQUEST.
    Completion::Used(w.bytes_written() as u32)
}

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    worker: Option<Worker>,
}

impl Rng {
    /// A device not yet activated.
    pub fn new() -> Self {
        Self::default()
    }
}

struct RngWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queue: ServedQueue,
}

impl WorkerHandler for RngWorker {
    fn handle(&mut self, _token: u64, _events: EventSet) -> ControlFlow<()> {
        let mem = &self.mem;
        self.queue
            .serve(mem, &*self.interrupt, |chain| fill_chain(mem, chain));
        ControlFlow::Continue(())
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = activation.queues.len();
        let Some(Some(active)) = activation.queues.into_iter().next() else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        let queue = ServedQueue::new(active);
        let source = queue.source(0);
        let worker = RngWorker {
            mem: activation.mem,
            interrupt: activation.interrupt,
            queue,
        };
        self.worker =
            Some(Worker::spawn("virtio-rng", &[source], worker).map_err(ActivateError::Backend)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    fn pause(&mut self) -> Option<Vec<Option<crate::queue::Queue>>> {
        let worker = self.worker.take()?.stop_and_take::<RngWorker>()?;
        Some(vec![Some(worker.queue.queue)])
    }
}
