//! virtio transports: how a driver reaches a [`crate::VirtioDevice`].
//!
//! - [`mmio`]: virtio-mmio, version 2 register layout, as a bus device.
//! - [`pci`]: modern (non-transitional) virtio-pci, as a PCI function on a
//!   `vmkit-devices` root complex, with MSI-X.
//!
//! Both share the device status state machine, feature negotiation and
//! queue activation (a private `common` module), so a device behaves the
//! same behind either.

mod common;
pub mod mmio;
pub mod pci;

pub use common::{CoreState, SavedQueue};
pub use mmio::{MmioOptions, MmioState, MmioTransport, MMIO_SIZE, NOTIFY_OFFSET};
pub use pci::{NotifyRegistrar, PciOptions, PciState, PciTransport};

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An eventfd could not be created.
    #[error("cannot create queue notification eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The device reports no queues or a queue size of zero.
    #[error("device reports an invalid queue layout: {0}")]
    Queues(String),
    /// The device type has no virtio-pci device ID (0x1040 + type must fit
    /// in 16 bits).
    #[error("device type {0} cannot be expressed as a virtio-pci device ID")]
    DeviceType(u32),
    /// The PCI function could not be built (BAR, capability or MSI-X
    /// layout refused).
    #[error("virtio-pci function: {0}")]
    Pci(#[source] vmkit_devices::PciError),
}
