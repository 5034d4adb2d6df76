//! The transport-independent device model.
//!
//! A [`VirtioDevice`] describes itself (type, queues, features, config
//! space) and is activated with the negotiated features, its [`Queue`]s and
//! an [`Interrupt`] when the driver sets DRIVER_OK. It never learns which
//! transport carries it: virtio-mmio and virtio-pci both drive it through
//! this trait.

use std::sync::Arc;

use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::queue::Queue;
use vmkit_devices::StateError;

/// Feature bits every vmkit transport offers on top of the device's own:
/// `VIRTIO_F_VERSION_1` (modern interface only), indirect descriptors and
/// event-index suppression, which both ring formats implement.
pub const TRANSPORT_FEATURES: u64 = (1 << crate::features::VERSION_1)
    | (1 << crate::features::RING_INDIRECT_DESC)
    | (1 << crate::features::RING_EVENT_IDX);

/// Errors a device reports from [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer or more queues than the device needs.
    #[error("device needs {expected} queues, driver enabled {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The backend could not be prepared (file, tap, thread, epoll).
    #[error("backend: {0}")]
    Backend(#[source] std::io::Error),
    /// The device is already active.
    #[error("device already active")]
    AlreadyActive,
}

/// How a device tells the driver that something happened. Implemented by
/// each transport; cheap to call from worker threads.
pub trait Interrupt: Send + Sync {
    /// Buffers were used on queue `queue` (call after
    /// [`Queue::needs_notification`] said so).
    fn signal_queue(&self, queue: u16);
    /// The device's configuration space changed: the transport bumps the
    /// configuration generation and sends a configuration interrupt.
    fn signal_config(&self);
    /// The device hit an error it cannot recover from without a reset
    /// (a broken ring): the transport sets DEVICE_NEEDS_RESET and sends a
    /// configuration interrupt (virtio 1.2, 2.1.2).
    fn needs_reset(&self);
}

/// One queue handed to a device at activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The ring.
    pub queue: Queue,
    /// Signalled when the driver notifies the queue: written by the
    /// transport on a notify-register access, or directly by KVM when the
    /// VMM registered it as an ioeventfd.
    pub notify: Arc<EventFd>,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The negotiated features.
    pub features: u64,
    /// The queues the driver enabled, by index (a queue the driver left
    /// disabled is `None`).
    pub queues: Vec<Option<ActiveQueue>>,
    /// The transport's interrupt path.
    pub interrupt: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// A virtio device, as a transport drives it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 net, 2 block, 3 console, 4 rng, ...).
    fn device_type(&self) -> u32;

    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device-specific feature bits offered to the driver. Transports add
    /// [`TRANSPORT_FEATURES`] and, where enabled, `VIRTIO_F_RING_PACKED`.
    fn features(&self) -> u64;

    /// Reads the device configuration space at `offset`. Bytes past the
    /// end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space. The default ignores writes
    /// (most config fields are read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// Starts the device with the negotiated features and its queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// Stops all work (workers are stopped and joined before this returns)
    /// and forgets the queues; the device can be activated again.
    fn reset(&mut self);

    /// For a snapshot: stops all work (workers joined, every popped chain
    /// either used or put back) and hands back the queues it was activated
    /// with, by index, with their progress. The device is then inactive
    /// but keeps its backend; the transport activates it again with the
    /// same queues (or, on restore, a fresh device with restored ones).
    ///
    /// Whatever the device held between events and cannot put back in a
    /// ring (buffered console input, a received frame waiting for buffers)
    /// goes into its [`save_device_state`](Self::save_device_state) and is
    /// handed to the next activation. Block, rng, console and net
    /// implement it.
    ///
    /// The default returns `None`: the device cannot be snapshotted while
    /// active, and the transport refuses to save its state.
    fn pause(&mut self) -> Option<Vec<Option<Queue>>> {
        None
    }

    /// Device-specific state a snapshot must carry beyond what the
    /// transport saves (configuration fields the driver or the device
    /// changed, port state). The default has none.
    fn save_device_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restores [`save_device_state`](Self::save_device_state) into a
    /// freshly created device, before it is activated. The default accepts
    /// only the empty state.
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(StateError::Mismatch {
                what: "virtio device",
                reason: format!(
                    "{} bytes of device state for a device type {} that keeps none",
                    state.len(),
                    self.device_type()
                ),
            })
        }
    }
}

/// Reads `data.len()` bytes of a config space image at `offset`, zero past
/// its end (the common `read_config` body).
pub fn read_config_bytes(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| image.get(o))
            .copied()
            .unwrap_or(0);
    }
}
