//! A type-0 PCI configuration space with guest-write masks.

use std::fmt;

use super::PciError;
use crate::state::{StateError, StateReader, StateWriter};

/// Size of a PCI Express configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the legacy (conventional PCI) configuration space, where the
/// header and the capability list live.
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;

/// Number of BAR registers in a type-0 header.
pub(crate) const NUM_BARS: u8 = 6;

// Header register offsets (PCI Local Bus Specification 3.0, 6.1).
pub(crate) const VENDOR_ID: usize = 0x00;
pub(crate) const DEVICE_ID: usize = 0x02;
pub(crate) const COMMAND: usize = 0x04;
pub(crate) const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const CACHE_LINE_SIZE: usize = 0x0C;
pub(crate) const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
const SUBSYSTEM_ID: usize = 0x2E;
pub(crate) const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3C;
const INTERRUPT_PIN: usize = 0x3D;
/// First offset available to capabilities (the end of the type-0 header).
pub(crate) const CAPABILITIES_START: usize = 0x40;

/// Command register: I/O space decoding enable.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: memory space decoding enable.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx emulation disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command bits a guest may change.
const COMMAND_WRITABLE: u16 =
    COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;

/// Status register: the capabilities list exists.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status error bits, cleared by writing 1: master data parity error (8),
/// signaled target abort (11), received target abort (12), received master
/// abort (13), signaled system error (14), detected parity error (15).
const STATUS_W1C: u16 = 1 << 8 | 0x1F << 11;

/// The pin a function's legacy INTx interrupt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntxPin {
    /// INTA#.
    A,
    /// INTB#.
    B,
    /// INTC#.
    C,
    /// INTD#.
    D,
}

impl IntxPin {
    /// The value of the Interrupt Pin register (1 = INTA# .. 4 = INTD#).
    pub fn register_value(self) -> u8 {
        match self {
            IntxPin::A => 1,
            IntxPin::B => 2,
            IntxPin::C => 3,
            IntxPin::D => 4,
        }
    }
}

/// The read-only identity of a function, from which [`ConfigSpace::new`]
/// builds the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: (base class, subclass, programming interface).
    pub class_code: (u8, u8, u8),
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// The INTx pin, or `None` if the function uses no legacy interrupt.
    pub interrupt_pin: Option<IntxPin>,
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// I/O space (4 to 256 bytes).
    Io,
    /// 32-bit memory space.
    Memory32 {
        /// Whether reads have no side effects (bit 3).
        prefetchable: bool,
    },
    /// 64-bit memory space; takes this BAR register and the next one.
    Memory64 {
        /// Whether reads have no side effects (bit 3).
        prefetchable: bool,
    },
}

impl BarKind {
    /// Whether this BAR decodes memory (as opposed to I/O) space.
    pub fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }

    /// The read-only low bits of the BAR register.
    fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => 0x4 | u32::from(prefetchable) << 3,
        }
    }

    /// The address bits of the low BAR register.
    fn address_mask(self) -> u32 {
        match self {
            BarKind::Io => !0x3,
            _ => !0xF,
        }
    }
}

impl fmt::Display for BarKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefetch = |p: bool| if p { ", prefetchable" } else { "" };
        match self {
            BarKind::Io => f.write_str("I/O"),
            BarKind::Memory32 { prefetchable } => {
                write!(f, "32-bit memory{}", prefetch(*prefetchable))
            }
            BarKind::Memory64 { prefetchable } => {
                write!(f, "64-bit memory{}", prefetch(*prefetchable))
            }
        }
    }
}

/// An implemented BAR and the address currently programmed into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bar {
    /// The BAR index (`0..=5`; for a 64-bit BAR, the lower register).
    pub index: u8,
    /// What the BAR decodes.
    pub kind: BarKind,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// The programmed base address (the register's address bits).
    pub address: u64,
}

/// What occupies one BAR register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Bar {
        kind: BarKind,
        size: u64,
    },
    /// The upper half of the 64-bit BAR at the previous index.
    Upper,
}

/// A type-0 configuration space of 4096 bytes.
///
/// Every byte has a writable mask and a write-1-to-clear mask: a guest
/// write changes only the writable bits and clears the W1C bits it writes
/// as 1, so read-only fields (IDs, class code, header type, capability
/// pointer, BAR type bits, ...) never change. Device-side code uses
/// [`write_raw`](Self::write_raw), which ignores the masks.
///
/// Guest accesses ([`read`](Self::read), [`write`](Self::write)) of any
/// length at any offset behave as the composition of byte accesses; bytes
/// beyond the 4096-byte space read as `0xFF` and drop writes. Bytes at
/// offset 256 and above read as zero unless the device places something
/// there.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<u8>,
    w1c: Vec<u8>,
    bars: [BarSlot; NUM_BARS as usize],
    /// Offset of the last capability in the list.
    last_capability: Option<usize>,
    /// Where the next capability goes.
    next_capability: usize,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &format_args!("{:#06x}", self.read_u16(0)))
            .field("device_id", &format_args!("{:#06x}", self.read_u16(2)))
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("bars", &self.bars())
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// A configuration space with `header`'s identity, no BARs and no
    /// capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut space = Self {
            bytes: vec![0; CONFIG_SPACE_SIZE],
            writable: vec![0; CONFIG_SPACE_SIZE],
            w1c: vec![0; CONFIG_SPACE_SIZE],
            bars: [BarSlot::Unused; NUM_BARS as usize],
            last_capability: None,
            next_capability: CAPABILITIES_START,
        };
        let (base, sub, prog_if) = header.class_code;
        space.put(VENDOR_ID, &header.vendor_id.to_le_bytes());
        space.put(DEVICE_ID, &header.device_id.to_le_bytes());
        // Revision ID, then the class code at 0x09..=0x0B.
        space.put(REVISION_ID, &[header.revision, prog_if, sub, base]);
        space.put(
            SUBSYSTEM_VENDOR_ID,
            &header.subsystem_vendor_id.to_le_bytes(),
        );
        space.put(SUBSYSTEM_ID, &header.subsystem_id.to_le_bytes());
        space.bytes[INTERRUPT_PIN] = header.interrupt_pin.map_or(0, IntxPin::register_value);
        space.mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        space.w1c[STATUS..STATUS + 2].copy_from_slice(&STATUS_W1C.to_le_bytes());
        space.writable[CACHE_LINE_SIZE] = 0xFF;
        space.writable[INTERRUPT_LINE] = 0xFF;
        space
    }

    /// Sets bytes at a fixed, in-range offset (construction only).
    fn put(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// Sets writable masks at a fixed, in-range offset.
    fn mask(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self.writable.get_mut(offset..offset + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Guest read: `data.len()` bytes at `offset`, each byte read
    /// independently; bytes beyond the space read as `0xFF`.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let start = usize::from(offset);
        for (i, b) in data.iter_mut().enumerate() {
            *b = start
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xFF);
        }
    }

    /// Guest write: only writable bits change, W1C bits written as 1 are
    /// cleared; bytes beyond the space are dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        for (i, &value) in data.iter().enumerate() {
            let Some(o) = start.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                break;
            };
            let writable = self.writable[o];
            let mut byte = (self.bytes[o] & !writable) | (value & writable);
            byte &= !(value & self.w1c[o]);
            self.bytes[o] = byte;
        }
    }

    /// Device-side write that ignores the guest masks (for status bits,
    /// device-specific registers or extended capabilities).
    pub fn write_raw(&mut self, offset: u16, data: &[u8]) -> Result<(), PciError> {
        let range = Self::range(offset, data.len())?;
        self.bytes[range].copy_from_slice(data);
        Ok(())
    }

    /// Sets the guest-writable masks of `mask.len()` bytes at `offset` (for
    /// device-specific registers).
    pub fn set_writable(&mut self, offset: u16, mask: &[u8]) -> Result<(), PciError> {
        let range = Self::range(offset, mask.len())?;
        self.writable[range].copy_from_slice(mask);
        Ok(())
    }

    fn range(offset: u16, len: usize) -> Result<std::ops::Range<usize>, PciError> {
        let start = usize::from(offset);
        start
            .checked_add(len)
            .filter(|&end| end <= CONFIG_SPACE_SIZE)
            .map(|end| start..end)
            .ok_or(PciError::ConfigRange { offset, len })
    }

    /// Reads one byte (`0xFF` beyond the space).
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// Reads a little-endian word, byte by byte.
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a little-endian dword, byte by byte.
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Guest write of one byte.
    pub fn write_u8(&mut self, offset: u16, value: u8) {
        self.write(offset, &[value]);
    }

    /// Guest write of a little-endian word.
    pub fn write_u16(&mut self, offset: u16, value: u16) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Guest write of a little-endian dword.
    pub fn write_u32(&mut self, offset: u16, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND as u16)
    }

    /// Adds BAR `index`.
    ///
    /// The size must be a power of two: at least 4 and at most 256 bytes
    /// for I/O, at least 16 bytes for memory (at most 2 GiB for a 32-bit
    /// BAR). A 64-bit BAR also takes register `index + 1`, so `index` must
    /// be at most 4. The registers must be unused.
    pub fn add_bar(&mut self, index: u8, kind: BarKind, size: u64) -> Result<(), PciError> {
        if index >= NUM_BARS {
            return Err(PciError::BarIndex {
                index,
                reason: "a type-0 header has BARs 0 to 5",
            });
        }
        let bad_size = |reason| PciError::BarSize {
            index,
            size,
            kind,
            reason,
        };
        if !size.is_power_of_two() {
            return Err(bad_size("not a power of two"));
        }
        match kind {
            BarKind::Io if !(4..=256).contains(&size) => {
                return Err(bad_size("I/O BARs span 4 to 256 bytes"))
            }
            BarKind::Memory32 { .. } if !(16..=1 << 31).contains(&size) => {
                return Err(bad_size("32-bit memory BARs span 16 bytes to 2 GiB"))
            }
            BarKind::Memory64 { .. } if size < 16 => {
                return Err(bad_size("memory BARs span at least 16 bytes"))
            }
            BarKind::Memory64 { .. } if index + 1 >= NUM_BARS => {
                return Err(PciError::BarIndex {
                    index,
                    reason: "a 64-bit BAR needs the next register too, so it cannot be BAR 5",
                })
            }
            _ => {}
        }
        let registers = if matches!(kind, BarKind::Memory64 { .. }) {
            index..=index + 1
        } else {
            index..=index
        };
        for register in registers {
            let existing = match self.bars[usize::from(register)] {
                BarSlot::Unused => continue,
                BarSlot::Bar { .. } => register,
                BarSlot::Upper => register - 1,
            };
            return Err(PciError::BarInUse {
                index,
                register,
                existing,
            });
        }

        let offset = Self::bar_offset(index);
        // Sizing mask: the address bits at and above the size are writable.
        let size_mask = !(size - 1);
        let low_mask = (size_mask as u32) & kind.address_mask();
        self.put(offset, &kind.type_bits().to_le_bytes());
        self.mask(offset, &low_mask.to_le_bytes());
        self.bars[usize::from(index)] = BarSlot::Bar { kind, size };
        if let BarKind::Memory64 { .. } = kind {
            let high_mask = (size_mask >> 32) as u32;
            self.put(offset + 4, &[0; 4]);
            self.mask(offset + 4, &high_mask.to_le_bytes());
            self.bars[usize::from(index) + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    fn bar_offset(index: u8) -> usize {
        BAR0 + 4 * usize::from(index)
    }

    fn bar_slot(&self, index: u8) -> Result<(BarKind, u64), PciError> {
        match self.bars.get(usize::from(index)) {
            Some(BarSlot::Bar { kind, size }) => Ok((*kind, *size)),
            Some(BarSlot::Upper) => Err(PciError::BarIndex {
                index,
                reason: "the upper half of a 64-bit BAR",
            }),
            Some(BarSlot::Unused) => Err(PciError::BarIndex {
                index,
                reason: "not implemented",
            }),
            None => Err(PciError::BarIndex {
                index,
                reason: "a type-0 header has BARs 0 to 5",
            }),
        }
    }

    fn dword(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        if let Some(src) = self.bytes.get(offset..offset + 4) {
            b.copy_from_slice(src);
        }
        u32::from_le_bytes(b)
    }

    /// Programs BAR `index` with `address`, as firmware does (the type bits
    /// stay as they are).
    ///
    /// Refuses an unimplemented BAR, an address not aligned to the BAR's
    /// size, and for 32-bit BARs an address above 4 GiB.
    pub fn set_bar_address(&mut self, index: u8, address: u64) -> Result<(), PciError> {
        let (kind, size) = self.bar_slot(index)?;
        let bad = |reason| PciError::BarAddress {
            index,
            address,
            kind,
            size,
            reason,
        };
        if address & (size - 1) != 0 {
            return Err(bad("not aligned to the BAR size"));
        }
        let is_64 = matches!(kind, BarKind::Memory64 { .. });
        if !is_64 && address > u64::from(u32::MAX) {
            return Err(bad("a 32-bit BAR cannot hold an address above 4 GiB"));
        }
        let offset = Self::bar_offset(index);
        let low = (address as u32 & kind.address_mask()) | kind.type_bits();
        self.put(offset, &low.to_le_bytes());
        if is_64 {
            self.put(offset + 4, &((address >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    /// BAR `index` with its currently programmed address, or `None` if the
    /// BAR is not implemented (or is the upper half of a 64-bit BAR).
    pub fn bar(&self, index: u8) -> Option<Bar> {
        let (kind, size) = self.bar_slot(index).ok()?;
        let offset = Self::bar_offset(index);
        let mut address = u64::from(self.dword(offset) & kind.address_mask());
        if let BarKind::Memory64 { .. } = kind {
            address |= u64::from(self.dword(offset + 4)) << 32;
        }
        Some(Bar {
            index,
            kind,
            size,
            address,
        })
    }

    /// Every implemented BAR, in index order.
    pub fn bars(&self) -> Vec<Bar> {
        (0..NUM_BARS).filter_map(|i| self.bar(i)).collect()
    }

    /// Adds a capability with ID `id` and `body` (the bytes after the ID
    /// and next-pointer bytes) and returns its offset.
    ///
    /// Capabilities are placed dword-aligned from offset `0x40` and linked
    /// from the capabilities pointer (`0x34`); the ID and next-pointer bytes
    /// are read-only. `writable` gives the guest-writable bits of the first
    /// `writable.len()` body bytes; the rest are read-only. Refused when
    /// the capability does not fit below offset `0x100`.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u16, PciError> {
        if writable.len() > body.len() {
            return Err(PciError::CapabilityMask {
                id,
                mask_len: writable.len(),
                body_len: body.len(),
            });
        }
        let start = self.next_capability;
        let len = body.len().saturating_add(2);
        let available = LEGACY_CONFIG_SPACE_SIZE.saturating_sub(start);
        if len > available {
            return Err(PciError::CapabilitySpace { id, len, available });
        }
        // start < 256, so it fits in the 8-bit pointers.
        let pointer = start as u8;
        self.bytes[start] = id;
        self.bytes[start + 1] = 0;
        self.put(start + 2, body);
        self.mask(start + 2, writable);
        match self.last_capability {
            Some(previous) => self.bytes[previous + 1] = pointer,
            None => {
                self.bytes[CAPABILITIES_POINTER] = pointer;
                self.bytes[STATUS] |= STATUS_CAPABILITIES_LIST as u8;
            }
        }
        self.last_capability = Some(start);
        self.next_capability = (start + len + 3) & !3;
        Ok(u16::from(pointer))
    }
}

/// The contents of a [`ConfigSpace`], for snapshots: all 4096 bytes as
/// the guest and the device left them (command register, BAR addresses,
/// capability registers such as MSI-X Message Control, device-specific
/// registers).
///
/// Encoding (tag `PCFG`, version 1; see [`crate::state`]): `bytes` (byte
/// string of exactly 4096 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpaceState {
    /// The configuration space, offset 0 first.
    pub bytes: Vec<u8>,
}

const CONFIG_TAG: [u8; 4] = *b"PCFG";
const CONFIG_VERSION: u8 = 1;

impl ConfigSpaceState {
    /// Encodes the state.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(CONFIG_TAG, CONFIG_VERSION);
        w.bytes(&self.bytes);
        w.finish()
    }

    /// Decodes a state; refuses any length but 4096 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("PCI config", bytes, CONFIG_TAG, CONFIG_VERSION)?;
        let state = Self::read(&mut r)?;
        r.finish()?;
        Ok(state)
    }

    /// Reads the fields from a nested encoding.
    pub fn read(r: &mut StateReader<'_>) -> Result<Self, StateError> {
        let bytes = r.bytes("config space", CONFIG_SPACE_SIZE)?;
        if bytes.len() != CONFIG_SPACE_SIZE {
            return Err(r.invalid(
                "config space",
                format!("{} bytes, expected {CONFIG_SPACE_SIZE}", bytes.len()),
            ));
        }
        Ok(Self { bytes })
    }

    /// Writes the fields into a nested encoding.
    pub fn write(&self, w: &mut StateWriter) {
        w.bytes(&self.bytes);
    }
}

impl ConfigSpace {
    /// The configuration space contents, for a snapshot.
    pub fn save_state(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            bytes: self.bytes.clone(),
        }
    }

    /// Restores contents saved by [`save_state`](Self::save_state) into a
    /// space built the same way (same identity, BARs and capabilities).
    ///
    /// Every bit of the type-0 header that is read-only to the guest
    /// (except the status register, which devices update) must equal this
    /// space's: a state of another device, or one with BAR type or
    /// sub-size address bits a guest could not have written, is refused
    /// and the space is left unchanged. Bytes from `0x40` on are copied as
    /// they are.
    pub fn restore_state(&mut self, state: &ConfigSpaceState) -> Result<(), StateError> {
        if state.bytes.len() != CONFIG_SPACE_SIZE {
            return Err(StateError::Invalid {
                what: "PCI config",
                field: "config space",
                reason: format!("{} bytes, expected {CONFIG_SPACE_SIZE}", state.bytes.len()),
            });
        }
        for offset in 0..CAPABILITIES_START {
            if (STATUS..STATUS + 2).contains(&offset) {
                continue;
            }
            let fixed = !(self.writable[offset] | self.w1c[offset]);
            let (old, new) = (self.bytes[offset], state.bytes[offset]);
            if (old ^ new) & fixed != 0 {
                return Err(StateError::Mismatch {
                    what: "PCI config",
                    reason: format!(
                        "read-only bits of byte {offset:#04x} differ ({new:#04x}, this device has {old:#04x})"
                    ),
                });
            }
        }
        self.bytes.copy_from_slice(&state.bytes);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
