//! virtio-mmio, version 2 register layout (virtio 1.2, 4.2.2).
//!
//! [`MmioTransport`] is a `vmkit-devices` [`BusDevice`] of
//! [`MMIO_SIZE`] bytes. Registers below 0x100 are 32 bits wide and must be
//! accessed as aligned 32-bit words; other accesses read as zero and are
//! ignored on write. The device configuration space starts at 0x100 and
//! takes any width.
//!
//! Queue notifications: a write to QueueNotify (offset
//! [`NOTIFY_OFFSET`]) signals that queue's eventfd
//! ([`MmioTransport::notify_eventfds`]). A VMM on KVM registers the same
//! eventfds as ioeventfds at `base + NOTIFY_OFFSET` with the queue index as
//! datamatch, so that the guest's write never leaves the kernel; the
//! transport's own handling is then the fallback.
//!
//! Interrupts: the InterruptStatus bits (used buffer, configuration
//! change) drive one [`InterruptLine`]; it is asserted while any bit is set
//! and deasserted when the driver acknowledges the last one, so a level
//! irqfd line (with resample) gives exact level semantics and an edge line
//! gives one edge per new event.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio::*;
use vmkit_devices::{BusDevice, DeviceError, InterruptLine, IoAction};
use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Activation, ActiveQueue, Interrupt, VirtioDevice, TRANSPORT_FEATURES};
use crate::queue::{Queue, QueueConfig, RingFormat};
use crate::{features, status};

/// Size of the register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (for ioeventfd registration).
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
const CONFIG_BASE: u64 = VIRTIO_MMIO_CONFIG as u64;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An eventfd could not be created.
    #[error("cannot create queue notification eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The device reports no queues or a queue size of zero.
    #[error("device reports an invalid queue layout: {0}")]
    Queues(String),
}

/// Options of a virtio-mmio transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioOptions {
    /// Offer `VIRTIO_F_RING_PACKED` (the driver chooses).
    pub packed_ring: bool,
    /// The VendorID register.
    pub vendor_id: u32,
}

impl Default for MmioOptions {
    fn default() -> Self {
        Self {
            packed_ring: true,
            // "VMKT"
            vendor_id: 0x544b_4d56,
        }
    }
}

/// Interrupt state shared by the transport (register accesses on the vCPU
/// thread) and the device's workers.
struct Shared {
    /// InterruptStatus; the lock also orders line assert/deassert with it.
    isr: Mutex<u32>,
    line: Arc<dyn InterruptLine>,
    needs_reset: AtomicBool,
    generation: AtomicU32,
}

impl Shared {
    fn lock_isr(&self) -> MutexGuard<'_, u32> {
        // A poisoned lock only means another thread panicked while holding
        // a plain u32; its value is still meaningful.
        self.isr.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self, bit: u32) {
        let mut isr = self.lock_isr();
        *isr |= bit;
        if let Err(e) = self.line.assert() {
            log::error!("virtio-mmio: cannot raise interrupt: {e}");
        }
    }

    fn ack(&self, bits: u32) {
        let mut isr = self.lock_isr();
        *isr &= !bits;
        if *isr == 0 {
            if let Err(e) = self.line.deassert() {
                log::error!("virtio-mmio: cannot lower interrupt: {e}");
            }
        }
    }

    fn clear(&self) {
        self.ack(u32::MAX);
    }
}

impl Interrupt for Shared {
    fn signal_queue(&self, _queue: u16) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    fn signal_config(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn needs_reset(&self) {
        // Raise the configuration interrupt first: a driver that sees
        // DEVICE_NEEDS_RESET in the status register then also finds the
        // interrupt pending.
        self.raise(VIRTIO_MMIO_INT_CONFIG);
        self.needs_reset.store(true, Ordering::Release);
    }
}

struct State {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    offered: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    active: bool,
}

/// A virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    state: Mutex<State>,
    shared: Arc<Shared>,
    notify: Vec<Arc<EventFd>>,
    device_type: u32,
    vendor_id: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("queues", &self.notify.len())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts `device` behind a virtio-mmio register window. `line` is the
    /// device's interrupt line; `mem` the guest memory its rings live in.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        line: Arc<dyn InterruptLine>,
        options: MmioOptions,
    ) -> Result<Self, TransportError> {
        let sizes = device.queue_max_sizes().to_vec();
        if sizes.is_empty() || sizes.len() > usize::from(u16::MAX) {
            return Err(TransportError::Queues(format!("{} queues", sizes.len())));
        }
        if let Some(bad) = sizes
            .iter()
            .find(|&&s| s == 0 || s > crate::queue::MAX_QUEUE_SIZE)
        {
            return Err(TransportError::Queues(format!("queue size {bad}")));
        }
        let notify = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let mut offered = device.features() | TRANSPORT_FEATURES;
        if options.packed_ring {
            offered |= 1 << features::RING_PACKED;
        }
        let device_type = device.device_type();
        Ok(Self {
            state: Mutex::new(State {
                device,
                mem,
                offered,
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                queues: sizes.iter().map(|&s| QueueConfig::new(s)).collect(),
                active: false,
            }),
            shared: Arc::new(Shared {
                isr: Mutex::new(0),
                line,
                needs_reset: AtomicBool::new(false),
                generation: AtomicU32::new(0),
            }),
            notify,
            device_type,
            vendor_id: options.vendor_id,
        })
    }

    /// The notification eventfd of each queue, by index: register them as
    /// ioeventfds at `base + NOTIFY_OFFSET` with datamatch = index.
    pub fn notify_eventfds(&self) -> &[Arc<EventFd>] {
        &self.notify
    }

    /// The device status register as the driver last wrote it (plus
    /// DEVICE_NEEDS_RESET when the device asked for a reset).
    pub fn status(&self) -> u32 {
        let st = self.lock();
        st.status | self.needs_reset_bit()
    }

    /// The interrupt path devices use (for a VMM that wants to signal a
    /// configuration change from outside the device).
    pub fn interrupt(&self) -> Arc<dyn Interrupt> {
        self.shared.clone()
    }

    fn needs_reset_bit(&self) -> u32 {
        if self.shared.needs_reset.load(Ordering::Acquire) {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between register accesses; a panic in
        // another thread cannot leave it half-updated in a way that matters
        // more than refusing all further access would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_reg(&self, st: &State, offset: u32) -> u32 {
        let q = st.queues.get(st.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => self.vendor_id,
            VIRTIO_MMIO_DEVICE_FEATURES => match st.device_features_sel {
                0 => st.offered as u32,
                1 => (st.offered >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => *self.shared.lock_isr(),
            VIRTIO_MMIO_STATUS => st.status | self.needs_reset_bit(),
            VIRTIO_MMIO_CONFIG_GENERATION => self.shared.generation.load(Ordering::Acquire),
            _ => 0,
        }
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK,
    /// and only while the queue is not enabled (virtio 1.2, 4.2.3.2).
    fn queue_writable(st: &State) -> Option<usize> {
        let sel = st.queue_sel as usize;
        let q = st.queues.get(sel)?;
        let phase_ok = st.status & status::FEATURES_OK != 0 && st.status & status::DRIVER_OK == 0;
        (phase_ok && !q.ready).then_some(sel)
    }

    fn write_reg(&self, st: &mut State, offset: u32, v: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => st.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => st.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if st.status & status::DRIVER == 0 || st.status & status::FEATURES_OK != 0 {
                    log::warn!("virtio-mmio: driver features written outside negotiation");
                    return;
                }
                match st.driver_features_sel {
                    0 => st.driver_features = (st.driver_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        st.driver_features =
                            (st.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => st.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(i) = Self::queue_writable(st) {
                    // Checked against the maximum at DRIVER_OK.
                    st.queues[i].size = u16::try_from(v).unwrap_or(0);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                let sel = st.queue_sel as usize;
                let phase_ok =
                    st.status & status::FEATURES_OK != 0 && st.status & status::DRIVER_OK == 0;
                if let (true, Some(q)) = (phase_ok, st.queues.get_mut(sel)) {
                    q.ready = v == 1;
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue
                // index.
                if let Some(fd) = self.notify.get(v as usize) {
                    if let Err(e) = fd.write(1) {
                        log::error!("virtio-mmio: queue notify failed: {e}");
                    }
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.shared.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(st, v),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let Some(i) = Self::queue_writable(st) else {
                    return;
                };
                let q = &mut st.queues[i];
                let (field, high) = match offset {
                    VIRTIO_MMIO_QUEUE_DESC_LOW => (&mut q.desc, false),
                    VIRTIO_MMIO_QUEUE_DESC_HIGH => (&mut q.desc, true),
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => (&mut q.driver, false),
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (&mut q.driver, true),
                    VIRTIO_MMIO_QUEUE_USED_LOW => (&mut q.device, false),
                    _ => (&mut q.device, true),
                };
                *field = if high {
                    (*field & 0xffff_ffff) | (u64::from(v) << 32)
                } else {
                    (*field & !0xffff_ffff) | u64::from(v)
                };
            }
            _ => log::debug!("virtio-mmio: write of {v:#x} to register {offset:#x} ignored"),
        }
    }

    fn reset(&self, st: &mut State) {
        st.device.reset();
        st.active = false;
        st.status = 0;
        st.device_features_sel = 0;
        st.driver_features_sel = 0;
        st.driver_features = 0;
        st.queue_sel = 0;
        for q in &mut st.queues {
            q.reset();
        }
        for fd in &self.notify {
            crate::worker::drain_eventfd(fd);
        }
        self.shared.needs_reset.store(false, Ordering::Release);
        self.shared.clear();
    }

    fn write_status(&self, st: &mut State, v: u32) {
        if v == 0 {
            self.reset(st);
            return;
        }
        if v & st.status != st.status {
            log::warn!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {v:#x}); ignored",
                st.status
            );
            return;
        }
        let new = v & !st.status;
        let mut accepted = v;
        if new & status::FEATURES_OK != 0 {
            let unknown = st.driver_features & !st.offered;
            let modern = st.driver_features & (1 << features::VERSION_1) != 0;
            if unknown != 0 || !modern {
                log::warn!(
                    "virtio-mmio: features {:#x} refused (unknown {unknown:#x}, VERSION_1 {modern})",
                    st.driver_features
                );
                accepted &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 {
            if accepted & status::FEATURES_OK == 0 {
                log::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK; ignored");
                accepted &= !status::DRIVER_OK;
            } else {
                st.status = accepted;
                self.activate(st);
                return;
            }
        }
        st.status = accepted;
    }

    fn activate(&self, st: &mut State) {
        let format = if st.driver_features & (1 << features::RING_PACKED) != 0 {
            RingFormat::Packed
        } else {
            RingFormat::Split
        };
        let event_idx = st.driver_features & (1 << features::RING_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(st.queues.len());
        for (i, cfg) in st.queues.iter().enumerate() {
            if !cfg.ready {
                queues.push(None);
                continue;
            }
            // i < number of queues ≤ u16::MAX (checked in new).
            match Queue::new(i as u16, cfg, format, event_idx, &st.mem) {
                Ok(queue) => queues.push(Some(ActiveQueue {
                    queue,
                    notify: self.notify[i].clone(),
                })),
                Err(e) => {
                    log::warn!("virtio-mmio: {e}");
                    self.shared.needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            mem: st.mem.clone(),
            features: st.driver_features,
            queues,
            interrupt: self.shared.clone(),
        };
        match st.device.activate(activation) {
            Ok(()) => st.active = true,
            Err(e) => {
                log::error!("virtio-mmio: device activation failed: {e}");
                self.shared.needs_reset();
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let st = self.lock();
        if offset >= CONFIG_BASE {
            st.device.read_config(offset - CONFIG_BASE, data);
            return Ok(());
        }
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            return Ok(());
        }
        // offset < 0x100 here.
        let v = self.read_reg(&st, offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        let mut st = self.lock();
        if offset >= CONFIG_BASE {
            st.device.write_config(offset - CONFIG_BASE, data);
            return Ok(IoAction::Continue);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return Ok(IoAction::Continue);
        };
        if offset % 4 != 0 {
            return Ok(IoAction::Continue);
        }
        self.write_reg(&mut st, offset as u32, u32::from_le_bytes(bytes));
        Ok(IoAction::Continue)
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        // Stop the device's workers before the eventfds they wait on go.
        let mut st = self.lock();
        st.device.reset();
    }
}
