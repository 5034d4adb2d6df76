//! A PCI Express root complex: configuration space, BAR allocation and
//! mapping, and MSI-X.
//!
//! * [`ConfigSpace`]: a type-0 configuration space with per-byte writable
//!   and write-1-to-clear masks, BARs with the standard sizing protocol and
//!   a linked capability list.
//! * [`PciDevice`]: what a device on the root complex implements; the
//!   [`HostBridge`] at `00:00.0` is the simplest example.
//! * [`PciRoot`]: bus 0 with its devices, the legacy configuration
//!   mechanism at ports `0xCF8..=0xCFF` (plus the reset control register
//!   at `0xCF9`), ECAM, and BAR mappings on an [`IoBus`](crate::IoBus) that
//!   follow what the guest programs.
//! * [`AddressAllocator`]: first-fit allocation of BAR addresses from the
//!   PCI windows.
//! * [`Msix`]: the MSI-X capability, table and pending-bit array in front of
//!   an [`MsiVectors`](crate::MsiVectors) sink.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_devices::pci::{PciRoot, PciWindows, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN};
//! use vmkit_devices::IoBus;
//!
//! let io = Arc::new(IoBus::new());
//! let windows = PciWindows {
//!     io: (0xC000, 0x1000),
//!     mem32: (0xC000_0000, 0x3000_0000),
//!     mem64: (1 << 36, 1 << 36),
//! };
//! let root = PciRoot::new(&io, windows).unwrap();
//! io.pio
//!     .insert(u64::from(CONFIG_ADDRESS_PORT), CONFIG_IO_LEN, root.config_io_device())
//!     .unwrap();
//!
//! // The guest selects 00:00.0, register 0, and reads the vendor and
//! // device IDs of the host bridge.
//! io.pio_write(0xCF8, &0x8000_0000u32.to_le_bytes());
//! let mut id = [0u8; 4];
//! io.pio_read(0xCFC, &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
//! ```
//!
//! References: PCI Local Bus Specification 3.0 (chapter 6, configuration
//! space), PCI Express Base Specification (7.2.2 ECAM, 7.7.2 MSI-X).

mod allocator;
mod config;
mod device;
pub mod msix;
mod root;

use std::fmt;

pub use allocator::AddressAllocator;
pub use config::{
    Bar, BarKind, ConfigSpace, ConfigSpaceState, IntxPin, PciHeader, COMMAND_BUS_MASTER,
    COMMAND_INTX_DISABLE, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, CONFIG_SPACE_SIZE,
    LEGACY_CONFIG_SPACE_SIZE, STATUS_CAPABILITIES_LIST,
};
pub use device::{HostBridge, PciDevice, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};
pub use msix::{Msix, MsixLayout, MsixState};
pub use root::{
    PciRoot, PciRootState, PciRootStats, PciWindows, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN,
    ECAM_BUS_SIZE,
};

use crate::bus::BusError;
use crate::interrupt::InterruptError;

/// Errors from the PCI module.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A BAR index outside `0..=5`, or the upper half of a 64-bit BAR where
    /// a BAR was expected.
    #[error("BAR index {index} is not a valid BAR here ({reason})")]
    BarIndex {
        /// The index asked for.
        index: u8,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A BAR size the PCI specification does not allow for its kind.
    #[error("BAR {index}: invalid size {size:#x} for a {kind} BAR ({reason})")]
    BarSize {
        /// The BAR index.
        index: u8,
        /// The requested size.
        size: u64,
        /// The requested kind.
        kind: BarKind,
        /// Which rule the size breaks.
        reason: &'static str,
    },
    /// The BAR (or, for a 64-bit BAR, one of its two registers) is already
    /// implemented.
    #[error("BAR {index}: register {register} is already used by BAR {existing}")]
    BarInUse {
        /// The BAR being added.
        index: u8,
        /// The register slot that is taken.
        register: u8,
        /// The BAR occupying it.
        existing: u8,
    },
    /// An address the BAR cannot hold.
    #[error("BAR {index}: cannot program address {address:#x} into a {kind} BAR of size {size:#x} ({reason})")]
    BarAddress {
        /// The BAR index.
        index: u8,
        /// The address asked for.
        address: u64,
        /// The BAR's kind.
        kind: BarKind,
        /// The BAR's size.
        size: u64,
        /// Which rule the address breaks.
        reason: &'static str,
    },
    /// The capability does not fit in the 256-byte legacy configuration
    /// space.
    #[error(
        "capability {id:#04x} of {len} bytes does not fit: only {available} bytes remain \
         below offset 0x100"
    )]
    CapabilitySpace {
        /// The capability ID.
        id: u8,
        /// Its length including the two header bytes.
        len: usize,
        /// Bytes left.
        available: usize,
    },
    /// The writable mask of a capability is longer than its body.
    #[error("capability {id:#04x}: writable mask of {mask_len} bytes is longer than its {body_len}-byte body")]
    CapabilityMask {
        /// The capability ID.
        id: u8,
        /// Length of the mask.
        mask_len: usize,
        /// Length of the body.
        body_len: usize,
    },
    /// A device-side access that does not fit in the configuration space.
    #[error("config space access of {len} bytes at {offset:#x} exceeds the 4096-byte space")]
    ConfigRange {
        /// Offset of the access.
        offset: u16,
        /// Its length.
        len: usize,
    },
    /// An address with a device number >= 32, a function >= 8 or a bus the
    /// root complex does not implement.
    #[error("invalid PCI address {bus:02x}:{device:02x}.{function} ({reason})")]
    InvalidAddress {
        /// Bus number.
        bus: u8,
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The slot already holds a function.
    #[error("PCI slot {0} is already occupied")]
    SlotTaken(PciAddress),
    /// All 32 device numbers of bus 0 are in use.
    #[error("no free device number left on PCI bus 0")]
    BusFull,
    /// The window of a BAR's kind has no room for it.
    #[error("{address}: no room in the {window} window for BAR {index} ({kind}, size {size:#x})")]
    NoSpace {
        /// The device.
        address: PciAddress,
        /// The BAR index.
        index: u8,
        /// The BAR kind.
        kind: BarKind,
        /// The BAR size.
        size: u64,
        /// Name of the window that was tried.
        window: &'static str,
    },
    /// A window that overflows or does not fit its address space.
    #[error("PCI {window} window at {base:#x} with size {size:#x} is invalid ({reason})")]
    InvalidWindow {
        /// Name of the window.
        window: &'static str,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A BAR range the root complex refused to map.
    #[error("{address}: BAR {index} at {base:#x} (size {size:#x}) not mapped: {reason}")]
    BarMapping {
        /// The device.
        address: PciAddress,
        /// The BAR index.
        index: u8,
        /// The requested base.
        base: u64,
        /// The BAR size.
        size: u64,
        /// Why it was refused.
        reason: String,
    },
    /// Mapping a BAR on the bus failed.
    #[error("{address}: bus refused BAR {index}: {source}")]
    Bus {
        /// The device.
        address: PciAddress,
        /// The BAR index.
        index: u8,
        /// The bus error.
        #[source]
        source: BusError,
    },
    /// The [`IoBus`](crate::IoBus) the root complex maps BARs on was dropped.
    #[error("the I/O bus of the PCI root complex no longer exists")]
    BusGone,
    /// An MSI-X vector count outside `1..=2048`, or more vectors than the
    /// sink has.
    #[error("invalid MSI-X vector count {count} ({reason})")]
    MsixVectorCount {
        /// The count asked for.
        count: u16,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An MSI-X table or PBA placement the capability cannot express.
    #[error("invalid MSI-X {structure} placement: BAR {bar}, offset {offset:#x} ({reason})")]
    MsixLayout {
        /// `"table"` or `"PBA"`.
        structure: &'static str,
        /// The BAR indicator.
        bar: u8,
        /// The offset.
        offset: u32,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An MSI-X vector beyond the device's vectors.
    #[error("MSI-X vector {vector} out of range (the device has {count})")]
    VectorOutOfRange {
        /// The vector asked for.
        vector: u16,
        /// How many vectors exist.
        count: u16,
    },
    /// Delivering or programming an interrupt failed.
    #[error("MSI-X vector {vector}: {source}")]
    Interrupt {
        /// The vector.
        vector: u16,
        /// The sink's error.
        #[source]
        source: InterruptError,
    },
}

/// The number of device numbers on a bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// The number of functions per device.
pub const FUNCTIONS_PER_DEVICE: u8 = 8;

/// Bit 31 of `CONFIG_ADDRESS`: enables the configuration cycle.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

/// The location of a PCI function: bus, device (`0..32`) and function
/// (`0..8`). Displays as `bb:dd.f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number, `0..32`.
    pub device: u8,
    /// Function number, `0..8`.
    pub function: u8,
}

impl PciAddress {
    /// An address, refusing a device number >= 32 or a function >= 8.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, PciError> {
        let address = Self {
            bus,
            device,
            function,
        };
        address.validate()?;
        Ok(address)
    }

    /// Checks that the device and function numbers are in range.
    pub fn validate(&self) -> Result<(), PciError> {
        let reason = if self.device >= DEVICES_PER_BUS {
            "device number must be below 32"
        } else if self.function >= FUNCTIONS_PER_DEVICE {
            "function number must be below 8"
        } else {
            return Ok(());
        };
        Err(PciError::InvalidAddress {
            bus: self.bus,
            device: self.device,
            function: self.function,
            reason,
        })
    }

    /// Decodes a `CONFIG_ADDRESS` (port `0xCF8`) value: bit 31 enable, bus
    /// in bits 23:16, device 15:11, function 10:8 and the dword-aligned
    /// register in 7:2.
    ///
    /// Returns the function and the register offset, or `None` when the
    /// enable bit is clear. Reserved bits 30:24 are ignored.
    pub fn from_config_address(value: u32) -> Option<(Self, u8)> {
        if value & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let [register, devfn, bus, _] = value.to_le_bytes();
        Some((
            Self {
                bus,
                device: devfn >> 3,
                function: devfn & 0x7,
            },
            register & 0xFC,
        ))
    }

    /// The `CONFIG_ADDRESS` value (enable bit set) that selects `register`
    /// (its low two bits are dropped) of this function.
    pub fn config_address(&self, register: u8) -> u32 {
        CONFIG_ADDRESS_ENABLE
            | u32::from(self.bus) << 16
            | u32::from(self.device & 0x1F) << 11
            | u32::from(self.function & 0x7) << 8
            | u32::from(register & 0xFC)
    }

    /// Decodes an offset into an ECAM region: bus in bits 27:20, device
    /// 19:15, function 14:12 and the register in 11:0.
    ///
    /// Returns `None` for offsets beyond the 256 MiB of a full ECAM region.
    pub fn from_ecam_offset(offset: u64) -> Option<(Self, u16)> {
        if offset >= 1 << 28 {
            return None;
        }
        // Every field is masked to its width, so the casts are lossless.
        Some((
            Self {
                bus: ((offset >> 20) & 0xFF) as u8,
                device: ((offset >> 15) & 0x1F) as u8,
                function: ((offset >> 12) & 0x7) as u8,
            },
            (offset & 0xFFF) as u16,
        ))
    }

    /// The ECAM offset of `register` (masked to 12 bits) of this function.
    pub fn ecam_offset(&self, register: u16) -> u64 {
        u64::from(self.bus) << 20
            | u64::from(self.device & 0x1F) << 15
            | u64::from(self.function & 0x7) << 12
            | u64::from(register & 0xFFF)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn display_and_validation() {
        let a = PciAddress::new(0, 3, 1).unwrap();
        assert_eq!(a.to_string(), "00:03.1");
        assert_eq!(
            PciAddress::new(0xab, 0x1f, 7).unwrap().to_string(),
            "ab:1f.7"
        );
        assert!(PciAddress::new(0, 32, 0).is_err());
        let err = PciAddress::new(0, 0, 8).unwrap_err();
        assert!(err.to_string().contains("function"), "{err}");
    }

    #[test]
    fn config_address_decode() {
        assert_eq!(PciAddress::from_config_address(0x0000_0800), None);
        let (a, reg) = PciAddress::from_config_address(0x8001_1A3F).unwrap();
        assert_eq!(
            a,
            PciAddress {
                bus: 1,
                device: 3,
                function: 2
            }
        );
        assert_eq!(reg, 0x3C);
        // Reserved bits 30:24 are ignored.
        assert_eq!(
            PciAddress::from_config_address(0xFF01_1A3C),
            Some((a, 0x3C))
        );
    }

    #[test]
    fn ecam_decode() {
        let (a, reg) = PciAddress::from_ecam_offset(0x0123_4ABC).unwrap();
        assert_eq!((a.bus, a.device, a.function, reg), (0x12, 6, 4, 0xABC));
        assert_eq!(PciAddress::from_ecam_offset(1 << 28), None);
        assert_eq!(PciAddress::from_ecam_offset(u64::MAX), None);
    }

    proptest! {
        #[test]
        fn config_address_round_trip(bus: u8, device in 0u8..32, function in 0u8..8, reg: u8) {
            let a = PciAddress::new(bus, device, function).unwrap();
            let value = a.config_address(reg);
            prop_assert_eq!(PciAddress::from_config_address(value), Some((a, reg & 0xFC)));
            prop_assert_eq!(PciAddress::from_config_address(value & !CONFIG_ADDRESS_ENABLE), None);
        }

        #[test]
        fn ecam_round_trip(bus: u8, device in 0u8..32, function in 0u8..8, reg in 0u16..4096) {
            let a = PciAddress::new(bus, device, function).unwrap();
            prop_assert_eq!(PciAddress::from_ecam_offset(a.ecam_offset(reg)), Some((a, reg)));
        }

        #[test]
        fn any_value_decodes_to_a_valid_address(value: u32, offset: u64) {
            if let Some((a, reg)) = PciAddress::from_config_address(value) {
                prop_assert!(a.validate().is_ok());
                prop_assert_eq!(reg % 4, 0);
                prop_assert_eq!(a.config_address(reg) & 0x80FF_FFFF, value & 0x80FF_FFFC);
            }
            if let Some((a, reg)) = PciAddress::from_ecam_offset(offset) {
                prop_assert!(a.validate().is_ok());
                prop_assert_eq!(a.ecam_offset(reg), offset);
            }
        }
    }
}
