//! What every transport shares: the device status state machine, feature
//! negotiation, queue configuration and activation (virtio 1.2, 2.1, 2.2,
//! 3.1).
//!
//! A transport keeps a [`Core`] behind its register lock and maps its own
//! register layout onto it; interrupts and DEVICE_NEEDS_RESET stay with the
//! transport, which hands its [`Interrupt`] to [`Core::write_status`].

use std::sync::Arc;

use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Activation, ActiveQueue, Interrupt, VirtioDevice, TRANSPORT_FEATURES};
use crate::queue::{Queue, QueueConfig, QueueState, RingFormat};
use crate::transport::TransportError;
use crate::{features, status};
use vmkit_devices::state::{StateError, StateReader, StateWriter};

/// One of the three ring addresses of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RingAddress {
    /// Descriptor table / ring.
    Desc,
    /// Available ring / driver event suppression.
    Driver,
    /// Used ring / device event suppression.
    Device,
}

/// Transport-independent device state, kept behind the transport's lock.
pub(crate) struct Core {
    /// Prefix of log messages ("virtio-mmio", "virtio-pci").
    pub name: &'static str,
    pub device: Box<dyn VirtioDevice>,
    pub mem: GuestMemoryMmap,
    /// Feature bits offered to the driver.
    pub offered: u64,
    /// The status as the driver wrote it (without DEVICE_NEEDS_RESET).
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueConfig>,
    /// The device was activated and not reset since.
    pub active: bool,
    /// The queues an active device handed back for a snapshot, until it
    /// is resumed (see [`Core::pause`]).
    pub paused: Option<Vec<Option<Queue>>>,
}

/// Checks a device's queue layout and creates one notification eventfd
/// per queue.
pub(crate) fn queue_eventfds(sizes: &[u16]) -> Result<Vec<Arc<EventFd>>, TransportError> {
    if sizes.is_empty() || sizes.len() > usize::from(u16::MAX) {
        return Err(TransportError::Queues(format!("{} queues", sizes.len())));
    }
    if let Some(bad) = sizes
        .iter()
        .find(|&&s| s == 0 || s > crate::queue::MAX_QUEUE_SIZE)
    {
        return Err(TransportError::Queues(format!("queue size {bad}")));
    }
    sizes
        .iter()
        .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(TransportError::EventFd)
}

impl Core {
    /// Wraps `device` (whose queue layout [`queue_eventfds`] accepted),
    /// offering its features, the transport features and, with
    /// `packed_ring`, `VIRTIO_F_RING_PACKED`.
    pub fn new(
        name: &'static str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        packed_ring: bool,
    ) -> Self {
        let mut offered = device.features() | TRANSPORT_FEATURES;
        if packed_ring {
            offered |= 1 << features::RING_PACKED;
        }
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&s| QueueConfig::new(s))
            .collect();
        Self {
            name,
            device,
            mem,
            offered,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            active: false,
            paused: None,
        }
    }

    /// The 32 offered feature bits the device feature select chooses.
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 driver feature bits the driver feature select chooses.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// A write of the driver features word: only between DRIVER and
    /// FEATURES_OK.
    pub fn write_driver_features(&mut self, v: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            log::warn!("{}: driver features written outside negotiation", self.name);
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// The selected queue, if it exists.
    pub fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Whether the driver is between FEATURES_OK and DRIVER_OK, the only
    /// phase in which queues may be set up (virtio 1.2, 3.1.1).
    pub fn queue_phase(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// The selected queue if its registers may change: in the set-up phase
    /// and while the queue is not enabled.
    pub fn queue_writable(&mut self) -> Option<&mut QueueConfig> {
        let phase = self.queue_phase();
        let sel = self.queue_sel as usize;
        self.queues.get_mut(sel).filter(|q| phase && !q.ready)
    }

    /// Writes the low or high half of a ring address of the selected queue
    /// (ignored when the queue is not writable).
    pub fn write_ring_address(&mut self, which: RingAddress, high: bool, v: u32) {
        let Some(q) = self.queue_writable() else {
            return;
        };
        let field = match which {
            RingAddress::Desc => &mut q.desc,
            RingAddress::Driver => &mut q.driver,
            RingAddress::Device => &mut q.device,
        };
        *field = if high {
            (*field & 0xffff_ffff) | (u64::from(v) << 32)
        } else {
            (*field & !0xffff_ffff) | u64::from(v)
        };
    }

    /// Resets the device (its workers are joined) and every register to its
    /// initial value, and drains the notification eventfds. The transport
    /// clears its interrupt state and DEVICE_NEEDS_RESET itself.
    pub fn reset(&mut self, notify: &[Arc<EventFd>]) {
        self.device.reset();
        self.active = false;
        self.paused = None;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        for fd in notify {
            crate::worker::drain_eventfd(fd);
        }
    }

    /// A write of a non-zero device status (0 is a reset, which the
    /// transport handles with [`Core::reset`]).
    ///
    /// Bits can only be added; FEATURES_OK is refused for features the
    /// device did not offer or without `VERSION_1`; DRIVER_OK needs
    /// FEATURES_OK and activates the device with the enabled queues. A
    /// queue or activation failure is reported through
    /// [`Interrupt::needs_reset`].
    pub fn write_status(&mut self, v: u32, notify: &[Arc<EventFd>], interrupt: Arc<dyn Interrupt>) {
        if v & self.status != self.status {
            log::warn!(
                "{}: driver cleared status bits ({:#x} -> {v:#x}); ignored",
                self.name,
                self.status
            );
            return;
        }
        let new = v & !self.status;
        let mut accepted = v;
        if new & status::FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered;
            let modern = self.driver_features & (1 << features::VERSION_1) != 0;
            if unknown != 0 || !modern {
                log::warn!(
                    "{}: features {:#x} refused (unknown {unknown:#x}, VERSION_1 {modern})",
                    self.name,
                    self.driver_features
                );
                accepted &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 {
            if accepted & status::FEATURES_OK == 0 {
                log::warn!("{}: DRIVER_OK without FEATURES_OK; ignored", self.name);
                accepted &= !status::DRIVER_OK;
            } else {
                self.status = accepted;
                self.activate(notify, interrupt);
                return;
            }
        }
        self.status = accepted;
    }

    fn activate(&mut self, notify: &[Arc<EventFd>], interrupt: Arc<dyn Interrupt>) {
        if self.active {
            // Unreachable through write_status (DRIVER_OK is only newly set
            // once per reset), kept as a guard for the device contract.
            log::warn!("{}: device already active", self.name);
            return;
        }
        let format = if self.driver_features & (1 << features::RING_PACKED) != 0 {
            RingFormat::Packed
        } else {
            RingFormat::Split
        };
        let event_idx = self.driver_features & (1 << features::RING_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, cfg) in self.queues.iter().enumerate() {
            if !cfg.ready {
                queues.push(None);
                continue;
            }
            let Some(fd) = notify.get(i) else {
                log::error!("{}: no notification eventfd for queue {i}", self.name);
                interrupt.needs_reset();
                return;
            };
            // i < number of queues ≤ u16::MAX (checked by queue_eventfds).
            match Queue::new(i as u16, cfg, format, event_idx, &self.mem) {
                Ok(queue) => queues.push(Some(ActiveQueue {
                    queue,
                    notify: fd.clone(),
                })),
                Err(e) => {
                    log::warn!("{}: {e}", self.name);
                    interrupt.needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues,
            interrupt: interrupt.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                log::error!("{}: device activation failed: {e}", self.name);
                interrupt.needs_reset();
            }
        }
    }
}

/// One queue's registers and, for an active device, the device's progress
/// in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedQueue {
    /// The size the driver chose.
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Descriptor area.
    pub desc: u64,
    /// Driver area.
    pub driver: u64,
    /// Device area.
    pub device: u64,
    /// The device's progress (present exactly when the device is active
    /// and the queue ready).
    pub progress: Option<QueueState>,
}

/// What both transports save: the device status, feature negotiation,
/// queue registers and progress, and the device's own state.
///
/// Encoding (nested in a transport state): `status`,
/// `device_features_sel`, `driver_features_sel` (u32 each),
/// `driver_features` (u64), `queue_sel` (u32), `active` (bool), `queues`
/// (count, then per queue `size` (u16), `ready` (bool), `desc`, `driver`,
/// `device` (u64 each), `has_progress` (bool) and, if set, a queue
/// progress as `QueueState` documents), `device_state` (byte string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreState {
    /// The device status as the driver wrote it.
    pub status: u32,
    /// Device feature select.
    pub device_features_sel: u32,
    /// Driver feature select.
    pub driver_features_sel: u32,
    /// The features the driver wrote (negotiated once FEATURES_OK is set).
    pub driver_features: u64,
    /// Queue select.
    pub queue_sel: u32,
    /// The device was activated (DRIVER_OK accepted, no reset since).
    pub active: bool,
    /// Every queue of the device, by index.
    pub queues: Vec<SavedQueue>,
    /// [`VirtioDevice::save_device_state`].
    pub device_state: Vec<u8>,
}

/// Most queues a state may list (the transports allow up to 65535).
const MAX_QUEUES: usize = u16::MAX as usize;
/// Most device-specific state bytes.
const MAX_DEVICE_STATE: usize = 1 << 20;

impl CoreState {
    /// Writes the fields into a nested encoding.
    pub fn write(&self, w: &mut StateWriter) {
        w.u32(self.status)
            .u32(self.device_features_sel)
            .u32(self.driver_features_sel)
            .u64(self.driver_features)
            .u32(self.queue_sel)
            .bool(self.active)
            .count(self.queues.len());
        for q in &self.queues {
            w.u16(q.size)
                .bool(q.ready)
                .u64(q.desc)
                .u64(q.driver)
                .u64(q.device)
                .bool(q.progress.is_some());
            if let Some(p) = &q.progress {
                p.write(w);
            }
        }
        w.bytes(&self.device_state);
    }

    /// Reads and checks the fields of a nested encoding: an active device
    /// has FEATURES_OK and DRIVER_OK, and progress exactly for its ready
    /// queues, checked against each queue's size and the negotiated ring
    /// format.
    pub fn read(r: &mut StateReader<'_>) -> Result<Self, StateError> {
        let status = r.u32()?;
        let device_features_sel = r.u32()?;
        let driver_features_sel = r.u32()?;
        let driver_features = r.u64()?;
        let queue_sel = r.u32()?;
        let active = r.bool("active")?;
        let n = r.count("queues", 28, MAX_QUEUES)?;
        if n == 0 {
            return Err(r.invalid("queues", "no queues".into()));
        }
        let format = ring_format(driver_features);
        let mut queues = Vec::with_capacity(n);
        for i in 0..n {
            let size = r.u16()?;
            let ready = r.bool("ready")?;
            let (desc, driver, device) = (r.u64()?, r.u64()?, r.u64()?);
            let progress = if r.bool("has_progress")? {
                let p = QueueState::read(r)?;
                // i < MAX_QUEUES.
                p.check(i as u16, size, format)?;
                Some(p)
            } else {
                None
            };
            if progress.is_some() != (active && ready) {
                return Err(r.invalid(
                    "queues",
                    format!("queue {i}: progress must be saved exactly for ready queues of an active device"),
                ));
            }
            queues.push(SavedQueue {
                size,
                ready,
                desc,
                driver,
                device,
                progress,
            });
        }
        let device_state = r.bytes("device_state", MAX_DEVICE_STATE)?;
        let live = status::FEATURES_OK | status::DRIVER_OK;
        if active && status & live != live {
            return Err(r.invalid(
                "status",
                format!("{status:#x}: an active device has FEATURES_OK and DRIVER_OK"),
            ));
        }
        Ok(Self {
            status,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            active,
            queues,
            device_state,
        })
    }
}

fn ring_format(driver_features: u64) -> RingFormat {
    if driver_features & (1 << features::RING_PACKED) != 0 {
        RingFormat::Packed
    } else {
        RingFormat::Split
    }
}

impl Core {
    /// Stops an active device's work and keeps its queues until
    /// [`resume_paused`](Self::resume_paused); nothing to do for an
    /// inactive or already paused device.
    pub fn pause(&mut self) -> Result<(), StateError> {
        if !self.active || self.paused.is_some() {
            return Ok(());
        }
        let queues = self.device.pause().ok_or_else(|| StateError::Unsupported {
            what: self.name,
            reason: format!(
                "device type {} cannot hand back its queues",
                self.device.device_type()
            ),
        })?;
        self.paused = Some(queues);
        Ok(())
    }

    /// Activates a paused device again with the queues it handed back.
    pub fn resume_paused(&mut self, notify: &[Arc<EventFd>], interrupt: Arc<dyn Interrupt>) {
        if let Some(queues) = self.paused.take() {
            self.active = false;
            self.resume(queues, notify, interrupt);
        }
    }

    /// Saves the core state. An active device is paused first (see
    /// [`pause`](Self::pause)) and stays paused.
    pub fn save(&mut self) -> Result<CoreState, StateError> {
        let mut progress: Vec<Option<QueueState>> = vec![None; self.queues.len()];
        self.pause()?;
        if let Some(queues) = &self.paused {
            for (slot, q) in progress.iter_mut().zip(queues) {
                *slot = q.as_ref().map(Queue::state);
            }
        }
        let queues = self
            .queues
            .iter()
            .zip(progress)
            .map(|(q, p)| SavedQueue {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
                progress: p.filter(|_| q.ready),
            })
            .collect();
        Ok(CoreState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            active: self.active,
            queues,
            device_state: self.device.save_device_state(),
        })
    }

    /// Activates the device with queues it handed back (or that were
    /// restored), and signals each queue's eventfd once so that chains the
    /// driver made available while the device was stopped are seen.
    fn resume(
        &mut self,
        queues: Vec<Option<Queue>>,
        notify: &[Arc<EventFd>],
        interrupt: Arc<dyn Interrupt>,
    ) {
        let mut active = Vec::with_capacity(queues.len());
        for (i, q) in queues.into_iter().enumerate() {
            match (q, notify.get(i)) {
                (Some(queue), Some(fd)) => {
                    if let Err(e) = fd.write(1) {
                        log::warn!("{}: cannot re-notify queue {i}: {e}", self.name);
                    }
                    active.push(Some(ActiveQueue {
                        queue,
                        notify: fd.clone(),
                    }));
                }
                _ => active.push(None),
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues: active,
            interrupt: interrupt.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                log::error!("{}: device re-activation failed: {e}", self.name);
                interrupt.needs_reset();
            }
        }
    }

    /// Restores a state from [`save`](Self::save) into a freshly created
    /// (or reset) transport: checks it against the device (queue count,
    /// sizes, offered features, ring configuration), restores the device's
    /// own state and the registers. Nothing changes when a check fails.
    ///
    /// For an active device it returns the queues at their saved
    /// progress; the transport restores its interrupt state and then
    /// passes them to [`start`](Self::start), which activates the device
    /// without renegotiation.
    pub fn restore(&mut self, state: &CoreState) -> Result<Option<Vec<Option<Queue>>>, StateError> {
        let mismatch = |reason: String| StateError::Mismatch {
            what: self.name,
            reason,
        };
        if self.active || self.status != 0 {
            return Err(mismatch(
                "restore needs a freshly created or reset transport".into(),
            ));
        }
        if state.queues.len() != self.queues.len() {
            return Err(mismatch(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        if state.status & status::FEATURES_OK != 0 && state.driver_features & !self.offered != 0 {
            return Err(mismatch(format!(
                "negotiated features {:#x} include bits this device does not offer ({:#x})",
                state.driver_features, self.offered
            )));
        }
        let format = ring_format(state.driver_features);
        let event_idx = state.driver_features & (1 << features::RING_EVENT_IDX) != 0;
        let mut configs = Vec::with_capacity(self.queues.len());
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            let config = QueueConfig {
                max_size: current.max_size,
                size: saved.size,
                ready: saved.ready,
                desc: saved.desc,
                driver: saved.driver,
                device: saved.device,
            };
            let queue = match (&saved.progress, state.active && saved.ready) {
                // i < number of queues ≤ u16::MAX.
                (Some(p), true) => Some(Queue::restore(
                    i as u16, &config, format, event_idx, &self.mem, p,
                )?),
                (None, false) => None,
                _ => {
                    return Err(mismatch(format!(
                        "queue {i}: progress does not match readiness"
                    )))
                }
            };
            configs.push(config);
            queues.push(queue);
        }
        self.device.restore_device_state(&state.device_state)?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = configs;
        Ok(state.active.then_some(queues))
    }

    /// Activates the device with the queues [`restore`](Self::restore)
    /// returned.
    pub fn start(
        &mut self,
        queues: Vec<Option<Queue>>,
        notify: &[Arc<EventFd>],
        interrupt: Arc<dyn Interrupt>,
    ) {
        self.resume(queues, notify, interrupt);
    }
}
