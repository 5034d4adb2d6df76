//! virtio transports: how a driver reaches a [`crate::VirtioDevice`].

pub mod mmio;

pub use mmio::{MmioOptions, MmioTransport, TransportError, MMIO_SIZE, NOTIFY_OFFSET};
