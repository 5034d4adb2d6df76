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
use crate::queue::{Queue, QueueConfig, RingFormat};
use crate::transport::TransportError;
use crate::{features, status};

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
