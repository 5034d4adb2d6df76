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
use vmm_sys_util::eventfd::EventFd;

use super::common::{queue_eventfds, Core, CoreState, RingAddress};
use crate::device::{Interrupt, VirtioDevice};
use crate::status;
use vmkit_devices::state::{StateError, StateReader, StateWriter};

/// Size of the register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (for ioeventfd registration).
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
const CONFIG_BASE: u64 = VIRTIO_MMIO_CONFIG as u64;

pub use super::TransportError;

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

/// A virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    state: Mutex<Core>,
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
        let notify = queue_eventfds(device.queue_max_sizes())?;
        let device_type = device.device_type();
        Ok(Self {
            state: Mutex::new(Core::new("virtio-mmio", device, mem, options.packed_ring)),
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

    fn lock(&self) -> MutexGuard<'_, Core> {
        // The state stays consistent between register accesses; a panic in
        // another thread cannot leave it half-updated in a way that matters
        // more than refusing all further access would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_reg(&self, st: &Core, offset: u32) -> u32 {
        let q = st.selected();
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => self.vendor_id,
            VIRTIO_MMIO_DEVICE_FEATURES => st.device_features_word(),
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => *self.shared.lock_isr(),
            VIRTIO_MMIO_STATUS => st.status | self.needs_reset_bit(),
            VIRTIO_MMIO_CONFIG_GENERATION => self.shared.generation.load(Ordering::Acquire),
            _ => 0,
        }
    }

    fn write_reg(&self, st: &mut Core, offset: u32, v: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => st.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => st.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => st.write_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => st.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = st.queue_writable() {
                    // Checked against the maximum at DRIVER_OK.
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                let sel = st.queue_sel as usize;
                let phase_ok = st.queue_phase();
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
            VIRTIO_MMIO_QUEUE_DESC_LOW => st.write_ring_address(RingAddress::Desc, false, v),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => st.write_ring_address(RingAddress::Desc, true, v),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => st.write_ring_address(RingAddress::Driver, false, v),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => st.write_ring_address(RingAddress::Driver, true, v),
            VIRTIO_MMIO_QUEUE_USED_LOW => st.write_ring_address(RingAddress::Device, false, v),
            VIRTIO_MMIO_QUEUE_USED_HIGH => st.write_ring_address(RingAddress::Device, true, v),
            _ => log::debug!("virtio-mmio: write of {v:#x} to register {offset:#x} ignored"),
        }
    }

    fn reset(&self, st: &mut Core) {
        st.reset(&self.notify);
        self.shared.needs_reset.store(false, Ordering::Release);
        self.shared.clear();
    }

    fn write_status(&self, st: &mut Core, v: u32) {
        if v == 0 {
            self.reset(st);
        } else {
            st.write_status(v, &self.notify, self.shared.clone());
        }
    }
}

/// The state of a [`MmioTransport`] and its device, for snapshots.
///
/// Encoding (tag `VMMI`, version 1; see `vmkit_devices::state`): `core`
/// (as [`CoreState`] documents), `interrupt_status` (u32, bits 0-1),
/// `needs_reset` (bool), `config_generation` (u32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmioState {
    /// Status, features, queues and the device's own state.
    pub core: CoreState,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// DEVICE_NEEDS_RESET is raised.
    pub needs_reset: bool,
    /// ConfigGeneration.
    pub config_generation: u32,
}

const MMIO_TAG: [u8; 4] = *b"VMMI";
const MMIO_VERSION: u8 = 1;

impl MmioState {
    /// Encodes the state.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(MMIO_TAG, MMIO_VERSION);
        self.core.write(&mut w);
        w.u32(self.interrupt_status)
            .bool(self.needs_reset)
            .u32(self.config_generation);
        w.finish()
    }

    /// Decodes and checks a state.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("virtio-mmio", bytes, MMIO_TAG, MMIO_VERSION)?;
        let core = CoreState::read(&mut r)?;
        let interrupt_status = r.u32()?;
        let known = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        if interrupt_status & !known != 0 {
            return Err(r.invalid(
                "interrupt_status",
                format!("{interrupt_status:#x} has bits outside {known:#x}"),
            ));
        }
        let needs_reset = r.bool("needs_reset")?;
        let config_generation = r.u32()?;
        r.finish()?;
        Ok(Self {
            core,
            interrupt_status,
            needs_reset,
            config_generation,
        })
    }
}

impl MmioTransport {
    /// Saves the transport and device state. An active device is paused
    /// (its worker stopped, its queues held by the transport) and stays
    /// paused, so that guest memory can be copied consistently with the
    /// state: call it with the vCPUs paused, copy memory, then
    /// [`resume`](Self::resume). Fails with [`StateError::Unsupported`] for an active
    /// device that cannot hand back its queues.
    pub fn save_state(&self) -> Result<MmioState, StateError> {
        let mut st = self.lock();
        let core = st.save()?;
        Ok(MmioState {
            core,
            interrupt_status: *self.shared.lock_isr(),
            needs_reset: self.shared.needs_reset.load(Ordering::Acquire),
            config_generation: self.shared.generation.load(Ordering::Acquire),
        })
    }

    /// Stops an active device's work (as [`save_state`](Self::save_state)
    /// does) without saving anything. Fails with
    /// [`StateError::Unsupported`] for a device that cannot hand back its
    /// queues.
    pub fn pause(&self) -> Result<(), StateError> {
        self.lock().pause()
    }

    /// Lets a device paused by [`pause`](Self::pause) or
    /// [`save_state`](Self::save_state) run again, with the queues where
    /// it left them; each queue is notified once so that chains made
    /// available meanwhile are processed. Nothing to do if not paused.
    pub fn resume(&self) {
        self.lock().resume_paused(&self.notify, self.shared.clone());
    }

    /// Restores a state from [`save_state`](Self::save_state) into a newly
    /// created transport over the same kind of device (and guest memory
    /// holding the rings): registers, interrupt status (the line is
    /// raised if any bit is set) and, for an active device, activation
    /// with the negotiated features and the queues at their saved
    /// progress. Refused, with the transport unchanged, when the state
    /// does not fit the device.
    pub fn restore_state(&self, state: &MmioState) -> Result<(), StateError> {
        let bytes = state.to_bytes();
        MmioState::from_bytes(&bytes)?;
        let mut st = self.lock();
        let queues = st.restore(&state.core)?;
        self.shared
            .generation
            .store(state.config_generation, Ordering::Release);
        self.shared
            .needs_reset
            .store(state.needs_reset, Ordering::Release);
        if state.interrupt_status != 0 {
            self.shared.raise(state.interrupt_status);
        }
        if let Some(queues) = queues {
            st.start(queues, &self.notify, self.shared.clone());
        }
        Ok(())
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
