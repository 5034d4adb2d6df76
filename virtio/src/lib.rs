//! virtio devices and transports for vmkit VMMs.
//!
//! - [`device`]: the transport-independent device model ([`VirtioDevice`],
//!   activated with its queues and an [`Interrupt`]).
//! - [`queue`]: split virtqueues (rust-vmm's `virtio-queue`) and packed
//!   virtqueues (implemented here) behind one [`Queue`] type, with
//!   indirect descriptors and event-index suppression in both formats.
//! - [`transport`]: virtio-mmio (version 2 register layout), as a
//!   `vmkit-devices` bus device, and modern virtio-pci (vendor
//!   capabilities, MSI-X per queue, INTx fallback, notify ioeventfds that
//!   follow the BAR), as a `vmkit-devices` PCI function.
//! - [`devices`]: block (raw file), net (tap or in-process pair), console
//!   (stdio, file, Unix socket) and rng (host `getrandom`).
//! - [`worker`]: epoll-driven device threads and the bounded queue-draining
//!   loop.
//! - [`driver`]: a driver-side model that sets up rings in guest memory and
//!   drives a transport through its registers, as a guest driver does; for
//!   tests of devices and transports.
//!
//! Everything the guest controls (registers, rings, descriptor chains,
//! request headers) is treated as hostile: a bad value gives the device's
//! defined error status or DEVICE_NEEDS_RESET, never a panic, and the work
//! done per notification is bounded.
//!
//! # Example
//! An rng device on virtio-mmio, driven by the driver model:
//! ```
//! use std::sync::Arc;
//! use vmkit_devices::{BusDevice, NullLine};
//! use vmkit_memory::MemoryLayout;
//! use vmkit_virtio::devices::Rng;
//! use vmkit_virtio::driver::{Driver, MmioDriver};
//! use vmkit_virtio::queue::RingFormat;
//! use vmkit_virtio::transport::MmioTransport;
//!
//! let mem = MemoryLayout::new(1 << 20)?.create_memory(&Default::default())?;
//! let transport = Arc::new(MmioTransport::new(
//!     Box::new(Rng::new()),
//!     mem.clone(),
//!     Arc::new(NullLine),
//!     Default::default(),
//! )?);
//! let mut driver = Driver::new(MmioDriver::new(transport.clone()), mem, 0x10000);
//! driver.negotiate(RingFormat::Split, 0)?;
//! let buf = driver.alloc(64);
//! driver.submit(0, &[], &[(buf, 64)])?;
//! driver.notify(0)?;
//! // The rng worker fills the buffer on its own thread.
//! let (_, len) = driver.wait_used(0, std::time::Duration::from_secs(5))?;
//! assert_eq!(len, 64);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod device;
pub mod devices;
pub mod driver;
pub mod queue;
pub mod transport;
pub mod worker;

pub use device::{ActivateError, Activation, ActiveQueue, Interrupt, VirtioDevice};
pub use queue::{DescChain, Queue, QueueConfig, QueueError, RingFormat};

/// virtio device IDs (virtio 1.2, 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
}

/// Reserved (transport and ring) feature bit numbers (virtio 1.2, 6).
pub mod features {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event` / `avail_event` suppression.
    pub const RING_EVENT_IDX: u32 = 29;
    /// The modern (1.x) interface.
    pub const VERSION_1: u32 = 32;
    /// Packed virtqueues.
    pub const RING_PACKED: u32 = 34;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and the device is live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}
