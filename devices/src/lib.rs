//! Device buses, interrupt lines and legacy platform devices for vmkit VMMs.
//!
//! This crate provides the pieces a vCPU run loop dispatches guest I/O to:
//!
//! * [`bus`]: an address-range bus ([`Bus`]) for either port I/O or MMIO, and
//!   [`IoBus`], the pair of buses a vCPU dispatches to, with a defined result
//!   for accesses that hit no device.
//! * [`interrupt`]: the [`InterruptLine`] abstraction devices use to signal the
//!   guest, plus simple implementations for tests and non-KVM users.
//! * [`serial`]: a complete 16550A UART ([`Serial`]).
//! * [`boot_timer`]: a [`BootTimer`] that records how long the guest took to
//!   boot when its init writes a magic byte.
//! * [`debug_exit`]: a [`DebugExit`] device that lets a guest end the run with
//!   an exit code (the classic `isa-debug-exit` at port `0xF4`).
//! * [`i8042`]: the PS/2 controller ([`I8042`]) at ports `0x60`/`0x64`, with
//!   a keyboard, no mouse and the CPU reset line.
//! * [`rtc`]: an MC146818-compatible CMOS real-time clock ([`Rtc`]) at ports
//!   `0x70`/`0x71`, with 128 bytes of CMOS RAM.
//! * [`pci`]: a PCI Express root complex ([`PciRoot`]) for bus 0. Guests
//!   reach configuration space through ports `0xCF8`/`0xCFC` or ECAM; each
//!   function implements [`PciDevice`], usually on top of a [`ConfigSpace`]
//!   whose masks keep read-only fields read-only and implement BAR sizing.
//!   The root assigns BARs from the [`PciWindows`] with an
//!   [`AddressAllocator`], maps them on the [`IoBus`], and moves or unmaps
//!   them when the guest reprograms a BAR or the command register, refusing
//!   (and counting) ranges outside the windows or on top of other devices.
//!   [`Msix`] implements the MSI-X capability, table and pending bits in
//!   front of [`MsiVectors`]. The reset control register at `0xCF9` lets a
//!   guest reboot with `reboot=pci`.
//!
//! # Threat model
//!
//! The guest controls every access: its address, its width and the data
//! written, as well as the order and concurrency of accesses from several
//! vCPUs. Nothing in this crate panics on guest-controlled input; malformed
//! accesses are reported as errors ([`DeviceError`], [`BusError`]), and
//! [`IoBus`] turns those errors into the behaviour of real hardware (reads of
//! all-ones, dropped writes) while counting them in [`IoBusStats`]. Buffers
//! that a guest could grow (such as the UART receive FIFO) are bounded.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_devices::{DebugExit, IoAction, IoBus, NullLine, Serial, StopRequest};
//!
//! let io = IoBus::new();
//! let serial = Arc::new(Serial::new(Box::new(std::io::sink()), Arc::new(NullLine)));
//! io.pio.insert(0x3f8, 8, serial).unwrap();
//! io.pio.insert(0xf4, 4, Arc::new(DebugExit::new())).unwrap();
//!
//! // The guest prints a character...
//! assert_eq!(io.pio_write(0x3f8, b"A"), IoAction::Continue);
//! // ...reads the line status register (THR empty, transmitter empty)...
//! let mut lsr = [0u8; 1];
//! io.pio_read(0x3fd, &mut lsr);
//! assert_eq!(lsr[0] & 0x60, 0x60);
//! // ...and asks the VMM to stop with exit code 0x10.
//! assert_eq!(
//!     io.pio_write(0xf4, &[0x10]),
//!     IoAction::Stop(StopRequest::Exit(0x10))
//! );
//! // A port nobody decodes reads as all-ones and is counted.
//! let mut miss = [0u8; 2];
//! io.pio_read(0x1234, &mut miss);
//! assert_eq!(miss, [0xff, 0xff]);
//! assert_eq!(io.stats().pio_read_misses, 1);
//! ```

#![deny(missing_docs)]

pub mod boot_timer;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod interrupt;
pub mod pci;
pub mod rtc;
pub mod serial;
pub mod state;

pub use boot_timer::{BootTime, BootTimer};
pub use bus::{
    AddressSpace, Bus, BusDevice, BusError, BusRange, DeviceError, IoAction, IoBus, IoBusStats,
    StopRequest,
};
pub use debug_exit::DebugExit;
pub use i8042::{I8042State, I8042};
pub use interrupt::{
    CallbackLine, InterruptError, InterruptLine, MsiEvent, MsiMessage, MsiVectors, NullLine,
    RecordingLine, RecordingMsiVectors,
};
pub use pci::{
    AddressAllocator, Bar, BarKind, ConfigSpace, HostBridge, IntxPin, Msix, MsixLayout, PciAddress,
    PciDevice, PciError, PciHeader, PciRoot, PciRootStats, PciWindows, ECAM_BUS_SIZE,
};
pub use rtc::{Rtc, RtcError, RtcState};
pub use serial::{Serial, SerialState};
pub use state::StateError;
