//! Address-range buses for port I/O and MMIO.
//!
//! A [`Bus`] maps non-overlapping address ranges to [`BusDevice`]s. Lookups
//! are `O(log n)`. The bus never holds its internal lock while calling into a
//! device, so a device may itself insert or remove devices on the same bus
//! from inside an access (for example when a guest moves a PCI BAR).
//!
//! [`IoBus`] bundles the PIO and MMIO buses a vCPU dispatches to and gives
//! misses and device errors the behaviour of real hardware: reads return
//! all-ones and writes are dropped. Those events are counted in
//! [`IoBusStats`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// What a device asks of the run loop after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Keep running the guest.
    Continue,
    /// Stop the run loop for the given reason.
    Stop(StopRequest),
}

/// Why a device asks the run loop to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// The guest asked to end the run with this exit code.
    Exit(u32),
    /// The guest asked for a reset of the machine.
    Reset,
    /// The guest asked for the machine to be powered off.
    PowerOff,
}

/// Errors a device reports for a single access.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The access has an offset or width the device does not decode.
    #[error("invalid access at offset {offset:#x} with width {len}")]
    InvalidAccess {
        /// Offset relative to the start of the device's range.
        offset: u64,
        /// Width of the access in bytes.
        len: usize,
    },
    /// The device's host-side backend failed.
    #[error("device backend I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Any other device-specific failure.
    #[error("device failure: {0}")]
    Other(String),
}

/// A device on a bus. Devices use their own interior locking; every method
/// takes `&self`.
///
/// Both methods are called with guest-controlled `offset` and data length:
/// implementations must reject what they do not decode with an error rather
/// than panic.
pub trait BusDevice: Send + Sync {
    /// Reads `data.len()` bytes at `offset`.
    ///
    /// `offset` is relative to the start of the range the device was
    /// registered on.
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes `data` at `offset` and tells the run loop how to continue.
    ///
    /// `offset` is relative to the start of the range the device was
    /// registered on.
    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError>;
}

/// A non-empty range of bus addresses, `base..=last()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Number of addresses in the range.
    pub len: u64,
}

impl BusRange {
    /// Creates a range, or `None` if `len` is zero or the range would extend
    /// past `u64::MAX`.
    pub fn new(base: u64, len: u64) -> Option<Self> {
        let last_offset = len.checked_sub(1)?;
        base.checked_add(last_offset)?;
        Some(Self { base, len })
    }

    /// The last address in the range (inclusive end).
    ///
    /// Using an inclusive end lets a range reach the very top of the 64-bit
    /// address space. For an empty range (which [`Bus`] never stores) this
    /// returns `base`; for a range that would overflow it saturates at
    /// `u64::MAX`.
    pub fn last(&self) -> u64 {
        self.base.saturating_add(self.len.saturating_sub(1))
    }

    /// Whether `addr` lies within the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }

    /// Whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.len != 0 && other.len != 0 && self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}..={:#x}]", self.base, self.last())
    }
}

/// The address space a [`Bus`] decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSpace {
    /// x86 port I/O: addresses `0..=0xFFFF`.
    Pio,
    /// Memory-mapped I/O: the full 64-bit address space.
    Mmio,
}

impl AddressSpace {
    /// The highest address in this space.
    pub fn max_addr(self) -> u64 {
        match self {
            AddressSpace::Pio => 0xFFFF,
            AddressSpace::Mmio => u64::MAX,
        }
    }
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressSpace::Pio => f.write_str("PIO"),
            AddressSpace::Mmio => f.write_str("MMIO"),
        }
    }
}

/// Errors from [`Bus`] operations.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A device range of length zero was requested.
    #[error("cannot insert a zero-length range at {base:#x} on the {space} bus")]
    ZeroLength {
        /// Requested base address.
        base: u64,
        /// The bus's address space.
        space: AddressSpace,
    },
    /// The requested range overflows or leaves the bus's address space.
    #[error(
        "range at {base:#x} with length {len:#x} does not fit in the {space} address space \
         (highest address {max:#x})"
    )]
    OutOfAddressSpace {
        /// Requested base address.
        base: u64,
        /// Requested length.
        len: u64,
        /// The bus's address space.
        space: AddressSpace,
        /// Highest address of that space.
        max: u64,
    },
    /// The requested range overlaps a registered one.
    #[error("range {new} overlaps the already registered range {existing} on the {space} bus")]
    Overlap {
        /// The range that was refused.
        new: BusRange,
        /// The registered range it collides with.
        existing: BusRange,
        /// The bus's address space.
        space: AddressSpace,
    },
    /// No device is registered at exactly this base address.
    #[error("no device registered with base {base:#x} on the {space} bus")]
    NotRegistered {
        /// Base address given to [`Bus::remove`].
        base: u64,
        /// The bus's address space.
        space: AddressSpace,
    },
    /// An access hit no device.
    #[error("no device at {addr:#x} on the {space} bus ({len}-byte access)")]
    NoDevice {
        /// Address of the access.
        addr: u64,
        /// Width of the access.
        len: usize,
        /// The bus's address space.
        space: AddressSpace,
    },
    /// An access of zero bytes.
    #[error("zero-length access at {addr:#x} on the {space} bus")]
    EmptyAccess {
        /// Address of the access.
        addr: u64,
        /// The bus's address space.
        space: AddressSpace,
    },
    /// An access starts inside a device's range but its last byte does not.
    #[error(
        "{len}-byte access at {addr:#x} extends past the end of device range {range} \
         on the {space} bus"
    )]
    AccessOutOfRange {
        /// Address of the access.
        addr: u64,
        /// Width of the access.
        len: usize,
        /// The device range the access starts in.
        range: BusRange,
        /// The bus's address space.
        space: AddressSpace,
    },
    /// The device refused or failed the access.
    #[error(
        "device at {range} on the {space} bus failed a {len}-byte {kind} at {addr:#x}: {source}"
    )]
    Device {
        /// Address of the access.
        addr: u64,
        /// Width of the access.
        len: usize,
        /// `"read"` or `"write"`.
        kind: &'static str,
        /// The device's range.
        range: BusRange,
        /// The bus's address space.
        space: AddressSpace,
        /// The device's error.
        #[source]
        source: DeviceError,
    },
}

type DeviceMap = BTreeMap<u64, (BusRange, Arc<dyn BusDevice>)>;

/// A bus mapping non-overlapping address ranges to devices.
///
/// All methods take `&self`; the bus is safe to share between vCPU threads.
pub struct Bus {
    space: AddressSpace,
    devices: RwLock<DeviceMap>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("space", &self.space)
            .field("ranges", &self.ranges())
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus decoding the given address space.
    pub fn new(space: AddressSpace) -> Self {
        Self {
            space,
            devices: RwLock::new(BTreeMap::new()),
        }
    }

    /// The address space this bus decodes.
    pub fn space(&self) -> AddressSpace {
        self.space
    }

    // Lock poisoning is recovered from: the map is only mutated by single,
    // non-panicking BTreeMap operations, so it is consistent even if some
    // thread panicked while holding the lock.
    fn read_map(&self) -> RwLockReadGuard<'_, DeviceMap> {
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_map(&self) -> RwLockWriteGuard<'_, DeviceMap> {
        self.devices.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `device` on `base..base + len`.
    ///
    /// Refuses a zero length, a range that overflows or leaves the bus's
    /// address space (PIO: `0..=0xFFFF`, MMIO: all of `u64`; a range ending
    /// exactly at the top of the space is accepted), and any overlap with a
    /// registered range.
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let space = self.space;
        if len == 0 {
            return Err(BusError::ZeroLength { base, space });
        }
        let max = space.max_addr();
        let out_of_space = BusError::OutOfAddressSpace {
            base,
            len,
            space,
            max,
        };
        let range = BusRange::new(base, len).ok_or(out_of_space)?;
        if range.last() > max {
            return Err(BusError::OutOfAddressSpace {
                base,
                len,
                space,
                max,
            });
        }

        let mut map = self.write_map();
        // Ranges are disjoint and keyed by base, so the only candidate for an
        // overlap is the registered range with the highest base <= our last
        // address.
        if let Some((_, (existing, _))) = map.range(..=range.last()).next_back() {
            if existing.overlaps(&range) {
                return Err(BusError::Overlap {
                    new: range,
                    existing: *existing,
                    space,
                });
            }
        }
        map.insert(base, (range, device));
        Ok(())
    }

    /// Unregisters the device whose range starts exactly at `base` and
    /// returns it.
    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        self.write_map()
            .remove(&base)
            .map(|(_, device)| device)
            .ok_or(BusError::NotRegistered {
                base,
                space: self.space,
            })
    }

    /// Atomically moves the device registered at exactly `old_base` to
    /// `new_base..new_base + new_len`.
    ///
    /// The new range is checked like [`insert`](Self::insert), except that
    /// it may overlap the device's own old range. On error nothing changes:
    /// the device stays at its old range. No access ever sees the device in
    /// neither range (as a remove followed by an insert would allow).
    pub fn relocate(&self, old_base: u64, new_base: u64, new_len: u64) -> Result<(), BusError> {
        let space = self.space;
        if new_len == 0 {
            return Err(BusError::ZeroLength {
                base: new_base,
                space,
            });
        }
        let max = space.max_addr();
        let range = BusRange::new(new_base, new_len)
            .filter(|r| r.last() <= max)
            .ok_or(BusError::OutOfAddressSpace {
                base: new_base,
                len: new_len,
                space,
                max,
            })?;

        let mut map = self.write_map();
        if !map.contains_key(&old_base) {
            return Err(BusError::NotRegistered {
                base: old_base,
                space,
            });
        }
        // As in `insert`, the only candidate for an overlap is the highest
        // other range starting at or below our last address.
        if let Some((_, (existing, _))) = map
            .range(..=range.last())
            .rev()
            .find(|(base, _)| **base != old_base)
        {
            if existing.overlaps(&range) {
                return Err(BusError::Overlap {
                    new: range,
                    existing: *existing,
                    space,
                });
            }
        }
        if let Some((_, device)) = map.remove(&old_base) {
            map.insert(new_base, (range, device));
        }
        Ok(())
    }

    /// Finds the device whose range contains `addr`.
    ///
    /// `O(log n)`; the internal lock is released before this returns.
    pub fn lookup(&self, addr: u64) -> Option<(BusRange, Arc<dyn BusDevice>)> {
        let map = self.read_map();
        let (_, (range, device)) = map.range(..=addr).next_back()?;
        range.contains(addr).then(|| (*range, Arc::clone(device)))
    }

    /// Resolves an access to its device and the offset within the device's
    /// range, checking that the whole access lies within that range.
    fn resolve(
        &self,
        addr: u64,
        len: usize,
    ) -> Result<(BusRange, u64, Arc<dyn BusDevice>), BusError> {
        let space = self.space;
        if len == 0 {
            return Err(BusError::EmptyAccess { addr, space });
        }
        let (range, device) = self
            .lookup(addr)
            .ok_or(BusError::NoDevice { addr, len, space })?;
        let offset = addr - range.base;
        // `lookup` guarantees offset < range.len, so this cannot underflow.
        let room = range.len - offset;
        if !u64::try_from(len).is_ok_and(|len| len <= room) {
            return Err(BusError::AccessOutOfRange {
                addr,
                len,
                range,
                space,
            });
        }
        Ok((range, offset, device))
    }

    /// Reads `data.len()` bytes at `addr` from the device there.
    ///
    /// The bus lock is not held while the device runs.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let len = data.len();
        let (range, offset, device) = self.resolve(addr, len)?;
        device
            .read(offset, data)
            .map_err(|source| BusError::Device {
                addr,
                len,
                kind: "read",
                range,
                space: self.space,
                source,
            })
    }

    /// Writes `data` at `addr` to the device there.
    ///
    /// The bus lock is not held while the device runs, so the device may
    /// insert or remove devices on this bus.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<IoAction, BusError> {
        let len = data.len();
        let (range, offset, device) = self.resolve(addr, len)?;
        device
            .write(offset, data)
            .map_err(|source| BusError::Device {
                addr,
                len,
                kind: "write",
                range,
                space: self.space,
                source,
            })
    }

    /// The registered ranges, in ascending address order.
    pub fn ranges(&self) -> Vec<BusRange> {
        self.read_map().values().map(|(range, _)| *range).collect()
    }
}

/// Counters of accesses [`IoBus`] could not complete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoBusStats {
    /// PIO reads that hit no device or straddled the end of a device range.
    pub pio_read_misses: u64,
    /// PIO writes that hit no device or straddled the end of a device range.
    pub pio_write_misses: u64,
    /// MMIO reads that hit no device or straddled the end of a device range.
    pub mmio_read_misses: u64,
    /// MMIO writes that hit no device or straddled the end of a device range.
    pub mmio_write_misses: u64,
    /// Accesses (of any kind) that a device refused or failed.
    pub device_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    pio_read_misses: AtomicU64,
    pio_write_misses: AtomicU64,
    mmio_read_misses: AtomicU64,
    mmio_write_misses: AtomicU64,
    device_errors: AtomicU64,
}

/// The pair of buses a vCPU dispatches to, with the defined result for
/// misses.
///
/// A read that hits no device, straddles the end of a device range or fails
/// in the device returns all-ones (`0xFF` in every byte), as an undecoded
/// access does on real hardware. A write in those cases is dropped and the
/// guest continues. Each such event is counted (see [`IoBus::stats`]);
/// device errors are also logged with `log::warn!`.
///
/// The four access methods neither allocate nor take a write lock.
#[derive(Debug)]
pub struct IoBus {
    /// The port I/O bus (`0..=0xFFFF`).
    pub pio: Bus,
    /// The MMIO bus.
    pub mmio: Bus,
    counters: Counters,
}

impl Default for IoBus {
    fn default() -> Self {
        Self::new()
    }
}

impl IoBus {
    /// Creates empty PIO and MMIO buses.
    pub fn new() -> Self {
        Self {
            pio: Bus::new(AddressSpace::Pio),
            mmio: Bus::new(AddressSpace::Mmio),
            counters: Counters::default(),
        }
    }

    /// Counts a failed access: device errors in `device_errors` (and
    /// logged), everything else in `miss`.
    fn record_failure(&self, err: &BusError, miss: &AtomicU64) {
        if let BusError::Device { .. } = err {
            self.counters.device_errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("{err}");
        } else {
            miss.fetch_add(1, Ordering::Relaxed);
            log::debug!("{err}");
        }
    }

    fn do_read(&self, bus: &Bus, addr: u64, data: &mut [u8], miss: &AtomicU64) {
        if let Err(err) = bus.read(addr, data) {
            data.fill(0xFF);
            self.record_failure(&err, miss);
        }
    }

    fn do_write(&self, bus: &Bus, addr: u64, data: &[u8], miss: &AtomicU64) -> IoAction {
        bus.write(addr, data).unwrap_or_else(|err| {
            self.record_failure(&err, miss);
            IoAction::Continue
        })
    }

    /// Guest `in` from `port`. On a miss or device error `data` is filled
    /// with `0xFF`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.do_read(
            &self.pio,
            u64::from(port),
            data,
            &self.counters.pio_read_misses,
        );
    }

    /// Guest `out` to `port`. On a miss or device error the write is dropped
    /// and [`IoAction::Continue`] returned.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> IoAction {
        self.do_write(
            &self.pio,
            u64::from(port),
            data,
            &self.counters.pio_write_misses,
        )
    }

    /// Guest MMIO read at `addr`. On a miss or device error `data` is filled
    /// with `0xFF`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.do_read(&self.mmio, addr, data, &self.counters.mmio_read_misses);
    }

    /// Guest MMIO write at `addr`. On a miss or device error the write is
    /// dropped and [`IoAction::Continue`] returned.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> IoAction {
        self.do_write(&self.mmio, addr, data, &self.counters.mmio_write_misses)
    }

    /// A snapshot of the failure counters.
    pub fn stats(&self) -> IoBusStats {
        let c = &self.counters;
        IoBusStats {
            pio_read_misses: c.pio_read_misses.load(Ordering::Relaxed),
            pio_write_misses: c.pio_write_misses.load(Ordering::Relaxed),
            mmio_read_misses: c.mmio_read_misses.load(Ordering::Relaxed),
            mmio_write_misses: c.mmio_write_misses.load(Ordering::Relaxed),
            device_errors: c.device_errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
