//! The trait through which the run loop hands port I/O and MMIO exits to
//! devices.
//!
//! The vCPU crate does not know any device model: a VMM plugs its own bus in
//! by implementing [`IoHandler`]. With the default `devices` feature the
//! trait is implemented for [`vmkit_devices::IoBus`].

/// What the run loop does after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Re-enter the guest.
    Continue,
    /// Stop the run loop with [`StopReason::Exit`](crate::StopReason::Exit).
    Exit(u32),
    /// Stop the run loop with [`StopReason::Reset`](crate::StopReason::Reset).
    Reset,
    /// Stop the run loop with [`StopReason::PowerOff`](crate::StopReason::PowerOff).
    PowerOff,
}

/// Handles the I/O exits of one or more vCPUs.
///
/// Methods take `&self`: several vCPU threads may call them at once. They run
/// on the exit path, between two `KVM_RUN`s, so they should not block for
/// long or allocate. A read must fill all of `data`; what a read of nothing
/// returns is the handler's policy.
pub trait IoHandler {
    /// A guest `in` from `port`; `data` is 1, 2 or 4 bytes (per repetition of
    /// a string instruction).
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A guest `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]) -> IoAction;
    /// A guest read of `data.len()` bytes at guest-physical `addr` outside RAM.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A guest write at guest-physical `addr` outside RAM.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> IoAction;
}

/// Lets a VMM that shares its bus between vCPU threads pass the `Arc` itself.
impl<T: IoHandler + ?Sized> IoHandler for std::sync::Arc<T> {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        (**self).pio_read(port, data)
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> IoAction {
        (**self).pio_write(port, data)
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        (**self).mmio_read(addr, data)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) -> IoAction {
        (**self).mmio_write(addr, data)
    }
}

#[cfg(feature = "devices")]
mod devices_bus {
    use super::{IoAction, IoHandler};
    use vmkit_devices::{IoBus, StopRequest};

    fn action(a: vmkit_devices::IoAction) -> IoAction {
        match a {
            vmkit_devices::IoAction::Continue => IoAction::Continue,
            vmkit_devices::IoAction::Stop(StopRequest::Exit(code)) => IoAction::Exit(code),
            vmkit_devices::IoAction::Stop(StopRequest::Reset) => IoAction::Reset,
            vmkit_devices::IoAction::Stop(StopRequest::PowerOff) => IoAction::PowerOff,
        }
    }

    /// Misses and device errors follow [`IoBus`]'s policy: reads see all
    /// ones, writes are dropped, both are counted.
    impl IoHandler for IoBus {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            IoBus::pio_read(self, port, data)
        }
        fn pio_write(&self, port: u16, data: &[u8]) -> IoAction {
            action(IoBus::pio_write(self, port, data))
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            IoBus::mmio_read(self, addr, data)
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) -> IoAction {
            action(IoBus::mmio_write(self, addr, data))
        }
    }
}
