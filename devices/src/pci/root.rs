//! The root complex: bus 0, configuration access and BAR mappings.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use super::allocator::AddressAllocator;
use super::config::{Bar, BarKind, COMMAND, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, NUM_BARS};
use super::device::{HostBridge, PciDevice};
use super::{PciAddress, PciError, DEVICES_PER_BUS};
use crate::bus::{
    AddressSpace, Bus, BusDevice, BusError, BusRange, DeviceError, IoAction, IoBus, StopRequest,
};
use crate::state::{StateError, StateReader, StateWriter};

/// The port of `CONFIG_ADDRESS`; insert [`PciRoot::config_io_device`] here.
pub const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// Number of ports [`PciRoot::config_io_device`] decodes (`0xCF8..=0xCFF`).
pub const CONFIG_IO_LEN: u64 = 8;
/// Size of the ECAM region of one bus (32 devices x 8 functions x 4 KiB);
/// insert [`PciRoot::ecam_device`] with this length.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Offsets within the `0xCF8` range.
const CONFIG_DATA_OFFSET: u64 = 4;
const RESET_CONTROL_OFFSET: u64 = 1;
/// Reset control register (`0xCF9`): bit 2 starts the reset; bits 1..=3
/// read back.
const RESET_CPU: u8 = 1 << 2;
const RESET_CONTROL_BITS: u8 = 0x0E;

/// The address windows BARs are allocated from and may be moved within,
/// each as `(base, size)`. A size of 0 means no window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciWindows {
    /// I/O port window, within `0..=0xFFFF`.
    pub io: (u64, u64),
    /// 32-bit memory window, below 4 GiB.
    pub mem32: (u64, u64),
    /// 64-bit memory window; when empty, 64-bit BARs come from `mem32`.
    pub mem64: (u64, u64),
}

/// Counters of [`PciRoot`] events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciRootStats {
    /// BAR mappings the guest asked for and the root refused (outside the
    /// window, overflowing or overlapping another device); the old mapping
    /// was kept.
    pub refused_bar_mappings: u64,
    /// BAR mappings added, moved or removed after guest configuration
    /// writes.
    pub bar_mapping_changes: u64,
}

/// Where a BAR is mapped on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    space: AddressSpace,
    range: BusRange,
}

/// One function on bus 0.
struct Slot {
    device: Arc<dyn PciDevice>,
    /// Current bus mapping of each BAR index.
    mapped: [Option<Mapping>; NUM_BARS as usize],
    /// The last refused request of each BAR index (the BAR and the command
    /// register), so that it is reported once.
    rejected: [Option<(Option<Bar>, u16)>; NUM_BARS as usize],
}

/// The allocators of the three windows.
#[derive(Debug)]
struct Allocators {
    io: AddressAllocator,
    mem32: AddressAllocator,
    mem64: AddressAllocator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Io,
    Mem32,
    Mem64,
}

impl Window {
    fn name(self) -> &'static str {
        match self {
            Window::Io => "I/O",
            Window::Mem32 => "32-bit memory",
            Window::Mem64 => "64-bit memory",
        }
    }
}

struct State {
    slots: BTreeMap<PciAddress, Slot>,
    allocators: Allocators,
}

/// Forwards bus accesses of one BAR to its device.
struct BarHandler {
    device: Arc<dyn PciDevice>,
    index: u8,
}

impl BusDevice for BarHandler {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.device.bar_read(self.index, offset, data)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        self.device.bar_write(self.index, offset, data)
    }
}

/// The PCI Express root complex of bus 0.
///
/// It owns the functions on bus 0 (the [`HostBridge`] at `00:00.0` is
/// created with it), gives them configuration access through ports
/// `0xCF8`/`0xCFC` ([`config_io_device`](Self::config_io_device)) and ECAM
/// ([`ecam_device`](Self::ecam_device)), assigns their BARs from the
/// [`PciWindows`] and maps them on an [`IoBus`].
///
/// After every configuration write to a function it re-reads the
/// function's BARs and command register and updates the bus: a BAR whose
/// decoding is turned off is unmapped, a reprogrammed BAR moves, and a BAR
/// whose decoding is turned on is mapped. A range outside the BAR's window,
/// one that overflows, or one that overlaps another device on the bus is
/// refused: the old mapping stays, a warning is logged and
/// [`PciRootStats::refused_bar_mappings`] counts it. Writing all-ones to
/// size a BAR while decoding is on is therefore harmless.
///
/// The root holds only a [`Weak`] reference to the bus, since the bus holds
/// the root's configuration handlers.
pub struct PciRoot {
    bus: Weak<IoBus>,
    windows: PciWindows,
    state: Mutex<State>,
    config_address: AtomicU32,
    reset_control: AtomicU8,
    refused: AtomicU64,
    changes: AtomicU64,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("windows", &self.windows)
            .field("devices", &self.devices())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn check_window(
    name: &'static str,
    (base, size): (u64, u64),
    max: u64,
) -> Result<AddressAllocator, PciError> {
    let bad = |reason| PciError::InvalidWindow {
        window: name,
        base,
        size,
        reason,
    };
    if size > 0 {
        let last = base
            .checked_add(size - 1)
            .ok_or(bad("extends past the top of the address space"))?;
        if last > max {
            return Err(bad("does not fit in its address space"));
        }
    }
    AddressAllocator::new(base, size)
}

impl PciRoot {
    /// A root complex mapping BARs on `bus` within `windows`, with the host
    /// bridge at `00:00.0`.
    ///
    /// Refuses an I/O window beyond port `0xFFFF`, a 32-bit window beyond
    /// 4 GiB and a window past the top of the address space.
    pub fn new(bus: &Arc<IoBus>, windows: PciWindows) -> Result<Arc<Self>, PciError> {
        let allocators = Allocators {
            io: check_window(Window::Io.name(), windows.io, 0xFFFF)?,
            mem32: check_window(Window::Mem32.name(), windows.mem32, u64::from(u32::MAX))?,
            mem64: check_window(Window::Mem64.name(), windows.mem64, u64::MAX)?,
        };
        let root = Arc::new(Self {
            bus: Arc::downgrade(bus),
            windows,
            state: Mutex::new(State {
                slots: BTreeMap::new(),
                allocators,
            }),
            config_address: AtomicU32::new(0),
            reset_control: AtomicU8::new(0),
            refused: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        });
        root.add_device_at(PciAddress::default(), Arc::new(HostBridge::new()))?;
        Ok(root)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Slot and allocator updates are single, non-panicking map
        // operations, so the state is consistent after a panic elsewhere.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The windows BARs are allocated from.
    pub fn windows(&self) -> PciWindows {
        self.windows
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PciRootStats {
        PciRootStats {
            refused_bar_mappings: self.refused.load(Ordering::Relaxed),
            bar_mapping_changes: self.changes.load(Ordering::Relaxed),
        }
    }

    /// The addresses of all functions, in order.
    pub fn devices(&self) -> Vec<PciAddress> {
        self.state().slots.keys().copied().collect()
    }

    /// The function at `address`.
    pub fn device(&self, address: PciAddress) -> Option<Arc<dyn PciDevice>> {
        self.state()
            .slots
            .get(&address)
            .map(|slot| Arc::clone(&slot.device))
    }

    /// Where each BAR of the function at `address` is mapped now, as
    /// `(BAR index, range)`.
    pub fn mapped_bars(&self, address: PciAddress) -> Vec<(u8, BusRange)> {
        let state = self.state();
        let Some(slot) = state.slots.get(&address) else {
            return Vec::new();
        };
        (0..NUM_BARS)
            .zip(slot.mapped.iter())
            .filter_map(|(i, m)| m.map(|m| (i, m.range)))
            .collect()
    }

    /// Adds `device` as function 0 of the lowest free device number on bus
    /// 0 (a device number is free when none of its functions is present),
    /// assigns and maps its BARs, and returns its address.
    pub fn add_device(&self, device: Arc<dyn PciDevice>) -> Result<PciAddress, PciError> {
        let mut state = self.state();
        let address = (0..DEVICES_PER_BUS)
            .map(|device| PciAddress {
                bus: 0,
                device,
                function: 0,
            })
            .find(|a| {
                !state
                    .slots
                    .keys()
                    .any(|taken| taken.bus == a.bus && taken.device == a.device)
            })
            .ok_or(PciError::BusFull)?;
        self.add_locked(&mut state, address, device)?;
        Ok(address)
    }

    /// Adds `device` at `address` (bus 0 only), assigns and maps its BARs.
    pub fn add_device_at(
        &self,
        address: PciAddress,
        device: Arc<dyn PciDevice>,
    ) -> Result<PciAddress, PciError> {
        address.validate()?;
        if address.bus != 0 {
            return Err(PciError::InvalidAddress {
                bus: address.bus,
                device: address.device,
                function: address.function,
                reason: "the root complex implements bus 0 only",
            });
        }
        let mut state = self.state();
        if state.slots.contains_key(&address) {
            return Err(PciError::SlotTaken(address));
        }
        self.add_locked(&mut state, address, device)?;
        Ok(address)
    }

    fn add_locked(
        &self,
        state: &mut State,
        address: PciAddress,
        device: Arc<dyn PciDevice>,
    ) -> Result<(), PciError> {
        let bars = device.bars();
        let bus = if bars.is_empty() {
            None
        } else {
            Some(self.bus.upgrade().ok_or(PciError::BusGone)?)
        };

        // Allocate every BAR first, so that a failure leaves nothing behind.
        let mut assigned: Vec<(Bar, Window, u64)> = Vec::with_capacity(bars.len());
        for bar in bars.iter().filter(|b| b.index < NUM_BARS) {
            match Self::allocate(&mut state.allocators, bar) {
                Ok((window, base)) => assigned.push((*bar, window, base)),
                Err(window) => {
                    Self::free_all(&mut state.allocators, &assigned);
                    return Err(PciError::NoSpace {
                        address,
                        index: bar.index,
                        kind: bar.kind,
                        size: bar.size,
                        window: window.name(),
                    });
                }
            }
        }

        // Program the BARs as firmware does: decoding off, addresses, then
        // decoding on for the kinds of BAR the function has.
        let command = device.command();
        let decode_bits = COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE;
        let off = command & !decode_bits;
        let command_offset = COMMAND as u16;
        device.config_write(command_offset, &off.to_le_bytes());
        let mut enable = 0;
        for (bar, _, base) in &assigned {
            let register = 0x10 + 4 * u16::from(bar.index);
            device.config_write(register, &(*base as u32).to_le_bytes());
            if let BarKind::Memory64 { .. } = bar.kind {
                device.config_write(register + 4, &((*base >> 32) as u32).to_le_bytes());
            }
            enable |= if bar.kind.is_memory() {
                COMMAND_MEMORY_SPACE
            } else {
                COMMAND_IO_SPACE
            };
        }
        device.config_write(command_offset, &(off | enable).to_le_bytes());

        let mut slot = Slot {
            device,
            mapped: [None; NUM_BARS as usize],
            rejected: [None; NUM_BARS as usize],
        };
        if let Some(bus) = bus {
            let errors = self.sync(&bus, address, &mut slot);
            if let Some(first) = errors.into_iter().next() {
                for mapping in slot.mapped.iter().flatten() {
                    let _ = bus_of(&bus, mapping.space).remove(mapping.range.base);
                }
                Self::free_all(&mut state.allocators, &assigned);
                return Err(first);
            }
        }
        state.slots.insert(address, slot);
        Ok(())
    }

    fn allocate(allocators: &mut Allocators, bar: &Bar) -> Result<(Window, u64), Window> {
        let mut try_window = |window: Window| {
            let allocator = match window {
                Window::Io => &mut allocators.io,
                Window::Mem32 => &mut allocators.mem32,
                Window::Mem64 => &mut allocators.mem64,
            };
            allocator
                .allocate(bar.size, bar.size)
                .map(|at| (window, at))
        };
        match bar.kind {
            BarKind::Io => try_window(Window::Io).ok_or(Window::Io),
            BarKind::Memory32 { .. } => try_window(Window::Mem32).ok_or(Window::Mem32),
            BarKind::Memory64 { .. } => try_window(Window::Mem64)
                .or_else(|| try_window(Window::Mem32))
                .ok_or(Window::Mem64),
        }
    }

    fn free_all(allocators: &mut Allocators, assigned: &[(Bar, Window, u64)]) {
        for (_, window, base) in assigned {
            match window {
                Window::Io => allocators.io.free(*base),
                Window::Mem32 => allocators.mem32.free(*base),
                Window::Mem64 => allocators.mem64.free(*base),
            };
        }
    }

    /// Whether `base..base + size` lies within `window`.
    fn in_window((wbase, wsize): (u64, u64), base: u64, size: u64) -> bool {
        let (Some(wlast), Some(last)) = (
            wsize.checked_sub(1).and_then(|s| wbase.checked_add(s)),
            size.checked_sub(1).and_then(|s| base.checked_add(s)),
        ) else {
            return false;
        };
        base >= wbase && last <= wlast
    }

    /// The mapping `bar` should have, or an explanation why it cannot.
    fn desired(&self, bar: &Bar, command: u16) -> Result<Option<Mapping>, String> {
        let (space, decodes, fits) = match bar.kind {
            BarKind::Io => (
                AddressSpace::Pio,
                command & COMMAND_IO_SPACE != 0,
                Self::in_window(self.windows.io, bar.address, bar.size),
            ),
            BarKind::Memory32 { .. } => (
                AddressSpace::Mmio,
                command & COMMAND_MEMORY_SPACE != 0,
                Self::in_window(self.windows.mem32, bar.address, bar.size),
            ),
            BarKind::Memory64 { .. } => (
                AddressSpace::Mmio,
                command & COMMAND_MEMORY_SPACE != 0,
                Self::in_window(self.windows.mem64, bar.address, bar.size)
                    || Self::in_window(self.windows.mem32, bar.address, bar.size),
            ),
        };
        if !decodes {
            return Ok(None);
        }
        let range = BusRange::new(bar.address, bar.size)
            .ok_or_else(|| "the range is empty or overflows".to_string())?;
        if !fits {
            return Err(format!("outside the PCI window for {} BARs", bar.kind));
        }
        Ok(Some(Mapping { space, range }))
    }

    /// Moves the bus mappings of `slot` to match its BARs and command
    /// register. Returns the refused changes (the old mapping is kept for
    /// each).
    fn sync(&self, bus: &IoBus, address: PciAddress, slot: &mut Slot) -> Vec<PciError> {
        let command = slot.device.command();
        let bars = slot.device.bars();
        let mut errors = Vec::new();
        for index in 0..NUM_BARS {
            let current = slot.mapped[usize::from(index)];
            let bar = bars.iter().find(|b| b.index == index);
            let wanted = match bar.map(|b| self.desired(b, command)) {
                None => Ok(None),
                Some(w) => w,
            };
            let refuse = |reason: String| PciError::BarMapping {
                address,
                index,
                base: bar.map_or(0, |b| b.address),
                size: bar.map_or(0, |b| b.size),
                reason,
            };
            let result = match wanted {
                Ok(wanted) if wanted == current => Ok(()),
                Ok(wanted) => self
                    .remap(bus, slot, index, current, wanted)
                    .map_err(|source| PciError::Bus {
                        address,
                        index,
                        source,
                    }),
                Err(reason) => Err(refuse(reason)),
            };
            let rejected = &mut slot.rejected[usize::from(index)];
            match result {
                Ok(()) => *rejected = None,
                // Report a refused request once, not on every later
                // configuration write that leaves it in place.
                Err(_) if *rejected == Some((bar.copied(), command)) => {}
                Err(err) => {
                    *rejected = Some((bar.copied(), command));
                    errors.push(err);
                }
            }
        }
        errors
    }

    /// Changes the bus mapping of BAR `index` from `current` to `wanted`;
    /// on error the current mapping stays.
    fn remap(
        &self,
        bus: &IoBus,
        slot: &mut Slot,
        index: u8,
        current: Option<Mapping>,
        wanted: Option<Mapping>,
    ) -> Result<(), BusError> {
        match (current, wanted) {
            (Some(old), None) => {
                bus_of(bus, old.space).remove(old.range.base)?;
            }
            (Some(old), Some(new)) if old.space == new.space => {
                bus_of(bus, new.space).relocate(old.range.base, new.range.base, new.range.len)?;
            }
            (old, Some(new)) => {
                let handler = Arc::new(BarHandler {
                    device: Arc::clone(&slot.device),
                    index,
                });
                bus_of(bus, new.space).insert(new.range.base, new.range.len, handler)?;
                if let Some(old) = old {
                    // The new mapping is in place; a stale old one would
                    // only keep decoding, so report it and carry on.
                    if let Err(err) = bus_of(bus, old.space).remove(old.range.base) {
                        log::warn!("PCI: could not unmap a moved BAR: {err}");
                    }
                }
            }
            (None, None) => {}
        }
        slot.mapped[usize::from(index)] = wanted;
        self.changes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads configuration space of the function at `address`; an absent
    /// function reads as all-ones.
    pub fn config_read(&self, address: PciAddress, offset: u16, data: &mut [u8]) {
        match self.device(address) {
            Some(device) => device.config_read(offset, data),
            None => data.fill(0xFF),
        }
    }

    /// Writes configuration space of the function at `address` (dropped if
    /// absent) and updates its BAR mappings.
    pub fn config_write(&self, address: PciAddress, offset: u16, data: &[u8]) {
        let mut state = self.state();
        let Some(slot) = state.slots.get_mut(&address) else {
            return;
        };
        slot.device.config_write(offset, data);
        let Some(bus) = self.bus.upgrade() else {
            return;
        };
        for err in self.sync(&bus, address, slot) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            log::warn!("PCI: refused guest BAR mapping: {err}");
        }
    }

    /// The handler for ports `0xCF8..=0xCFF`: insert it on the PIO bus at
    /// [`CONFIG_ADDRESS_PORT`] with length [`CONFIG_IO_LEN`].
    pub fn config_io_device(self: &Arc<Self>) -> Arc<dyn BusDevice> {
        Arc::new(ConfigIo {
            root: Arc::clone(self),
        })
    }

    /// The ECAM handler for bus 0: insert it on the MMIO bus at the ECAM
    /// base with length [`ECAM_BUS_SIZE`].
    pub fn ecam_device(self: &Arc<Self>) -> Arc<dyn BusDevice> {
        Arc::new(Ecam {
            root: Arc::clone(self),
        })
    }
}

/// The root complex's own registers, for snapshots (each function's
/// configuration space is saved by the function itself).
///
/// Encoding (tag `PCIR`, version 1; see [`crate::state`]):
/// `config_address` (u32, the latch at port `0xCF8`), `reset_control`
/// (u8, port `0xCF9`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciRootState {
    /// The `CONFIG_ADDRESS` latch (bits 1:0 clear).
    pub config_address: u32,
    /// The reset control register (bits 1-3 only).
    pub reset_control: u8,
}

const ROOT_TAG: [u8; 4] = *b"PCIR";
const ROOT_VERSION: u8 = 1;

impl PciRootState {
    /// Encodes the state.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(ROOT_TAG, ROOT_VERSION);
        w.u32(self.config_address).u8(self.reset_control);
        w.finish()
    }

    /// Decodes and checks a state.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("PCI root", bytes, ROOT_TAG, ROOT_VERSION)?;
        let config_address = r.u32()?;
        if config_address & 0x3 != 0 {
            return Err(r.invalid(
                "config_address",
                format!("{config_address:#x} has bits 1:0 set"),
            ));
        }
        let reset_control = r.u8()?;
        if reset_control & !RESET_CONTROL_BITS != 0 {
            return Err(r.invalid("reset_control", format!("{reset_control:#x}")));
        }
        r.finish()?;
        Ok(Self {
            config_address,
            reset_control,
        })
    }
}

impl PciRoot {
    /// The root complex's registers, for a snapshot.
    pub fn save_state(&self) -> PciRootState {
        PciRootState {
            config_address: self.config_address.load(Ordering::SeqCst),
            reset_control: self.reset_control.load(Ordering::SeqCst),
        }
    }

    /// Restores the registers from [`save_state`](Self::save_state) (a
    /// state with bits the guest cannot set is refused), then maps every
    /// function's BARs as its (already restored) configuration space
    /// says: restore the functions first, then the root.
    pub fn restore_state(&self, state: &PciRootState) -> Result<(), StateError> {
        PciRootState::from_bytes(&state.to_bytes())?;
        self.config_address
            .store(state.config_address, Ordering::SeqCst);
        self.reset_control
            .store(state.reset_control, Ordering::SeqCst);
        self.resync();
        Ok(())
    }

    /// Brings the BAR mappings of every function in line with its
    /// configuration space (after a function's state was restored behind
    /// the root's back). Refused mappings are counted and logged as for a
    /// guest write.
    pub fn resync(&self) {
        let Some(bus) = self.bus.upgrade() else {
            return;
        };
        let mut state = self.state();
        for (address, slot) in state.slots.iter_mut() {
            for err in self.sync(&bus, *address, slot) {
                self.refused.fetch_add(1, Ordering::Relaxed);
                log::warn!("PCI: refused restored BAR mapping: {err}");
            }
        }
    }
}

fn bus_of(bus: &IoBus, space: AddressSpace) -> &Bus {
    match space {
        AddressSpace::Pio => &bus.pio,
        AddressSpace::Mmio => &bus.mmio,
    }
}

/// Ports `0xCF8..=0xCFF`: `CONFIG_ADDRESS`, the reset control register and
/// `CONFIG_DATA`.
struct ConfigIo {
    root: Arc<PciRoot>,
}

impl ConfigIo {
    /// The function and register a `CONFIG_DATA` access at `offset` (within
    /// the 8 ports) of `len` bytes reaches, if it is a valid access.
    fn target(&self, offset: u64, len: usize) -> Option<(PciAddress, u16)> {
        let within = offset.checked_sub(CONFIG_DATA_OFFSET)?;
        let len = u64::try_from(len).ok()?;
        if !matches!(len, 1 | 2 | 4) || within.checked_add(len)? > 4 {
            return None;
        }
        let value = self.root.config_address.load(Ordering::SeqCst);
        let (address, register) = PciAddress::from_config_address(value)?;
        // `within` < 4, so this is lossless.
        Some((address, u16::from(register) + within as u16))
    }
}

impl BusDevice for ConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match (offset, data.len()) {
            (0, 4) => {
                let value = self.root.config_address.load(Ordering::SeqCst);
                data.copy_from_slice(&value.to_le_bytes());
            }
            (RESET_CONTROL_OFFSET, 1) => data[0] = self.root.reset_control.load(Ordering::SeqCst),
            (offset, len) => match self.target(offset, len) {
                Some((address, register)) => self.root.config_read(address, register, data),
                None => data.fill(0xFF),
            },
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        match (offset, data) {
            (0, &[a, b, c, d]) => {
                let value = u32::from_le_bytes([a, b, c, d]) & !0x3;
                self.root.config_address.store(value, Ordering::SeqCst);
            }
            (RESET_CONTROL_OFFSET, &[value]) => {
                self.root
                    .reset_control
                    .store(value & RESET_CONTROL_BITS, Ordering::SeqCst);
                if value & RESET_CPU != 0 {
                    return Ok(IoAction::Stop(StopRequest::Reset));
                }
            }
            (offset, data) => {
                if let Some((address, register)) = self.target(offset, data.len()) {
                    self.root.config_write(address, register, data);
                }
            }
        }
        Ok(IoAction::Continue)
    }
}

/// The ECAM region of bus 0.
struct Ecam {
    root: Arc<PciRoot>,
}

impl Ecam {
    fn target(offset: u64, len: usize) -> Option<(PciAddress, u16)> {
        let len = u64::try_from(len).ok()?;
        if !matches!(len, 1 | 2 | 4) || offset % len != 0 || offset >= ECAM_BUS_SIZE {
            return None;
        }
        PciAddress::from_ecam_offset(offset)
    }
}

impl BusDevice for Ecam {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match Self::target(offset, data.len()) {
            Some((address, register)) => self.root.config_read(address, register, data),
            None => data.fill(0xFF),
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        if let Some((address, register)) = Self::target(offset, data.len()) {
            self.root.config_write(address, register, data);
        }
        Ok(IoAction::Continue)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
