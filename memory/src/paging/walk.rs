//! Guest-virtual to guest-physical translation following the Intel SDM
//! (Vol. 3A chapter 4): canonical check, reserved bits, access rights,
//! protection keys, #PF error codes and accessed/dirty updates.
//!
//! Entries are read with atomic loads through vm-memory and the
//! accessed/dirty bits are set with compare-and-exchange on guest memory, so
//! a walk never holds a Rust reference into guest memory across accesses and
//! races with other vCPUs are detected (and retried a bounded number of
//! times).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::volatile_memory::PtrGuard;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    Permissions, VolatileMemory,
};

use super::context::{PagingContext, PagingMode};

/// Present bit.
pub(crate) const P: u64 = 1 << 0;
/// Read/write bit.
pub(crate) const RW: u64 = 1 << 1;
/// User/supervisor bit.
pub(crate) const US: u64 = 1 << 2;
/// Accessed bit.
pub(crate) const A: u64 = 1 << 5;
/// Dirty bit.
pub(crate) const D: u64 = 1 << 6;
/// Page-size bit.
pub(crate) const PS: u64 = 1 << 7;
/// Execute-disable bit.
pub(crate) const XD: u64 = 1 << 63;

/// How many times a walk restarts after losing a compare-and-exchange race
/// on an accessed/dirty update before giving up with
/// [`WalkError::Contended`].
pub const MAX_AD_RETRIES: usize = 16;

/// The kind of a memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// Who makes an access (SDM Vol. 3A §4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// A user-mode access: an explicit access at CPL 3.
    User,
    /// An explicit supervisor-mode access (CPL < 3).
    Supervisor,
    /// An implicit supervisor-mode access (to the GDT, IDT, TSS, ... at any
    /// CPL); SMAP blocks these to user-mode pages regardless of EFLAGS.AC.
    SupervisorImplicit,
}

/// One memory access to translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// User, supervisor or implicit supervisor.
    pub privilege: Privilege,
    /// EFLAGS.AC (lets explicit supervisor data accesses reach user-mode
    /// pages under SMAP).
    pub ac: bool,
}

impl Access {
    /// Number of distinct accesses (for tables indexed by [`Access::index`]).
    pub const COUNT: usize = 18;

    /// An access with EFLAGS.AC clear.
    pub fn new(kind: AccessKind, privilege: Privilege) -> Access {
        Access {
            kind,
            privilege,
            ac: false,
        }
    }

    /// A data read.
    pub fn read(privilege: Privilege) -> Access {
        Access::new(AccessKind::Read, privilege)
    }

    /// A data write.
    pub fn write(privilege: Privilege) -> Access {
        Access::new(AccessKind::Write, privilege)
    }

    /// An instruction fetch.
    pub fn fetch(privilege: Privilege) -> Access {
        Access::new(AccessKind::Fetch, privilege)
    }

    /// The same access with EFLAGS.AC set to `ac`.
    pub fn with_ac(self, ac: bool) -> Access {
        Access { ac, ..self }
    }

    /// A dense index in `0..Access::COUNT`.
    #[inline]
    pub fn index(self) -> usize {
        let kind = match self.kind {
            AccessKind::Read => 0,
            AccessKind::Write => 1,
            AccessKind::Fetch => 2,
        };
        let privilege = match self.privilege {
            Privilege::User => 0,
            Privilege::Supervisor => 1,
            Privilege::SupervisorImplicit => 2,
        };
        kind * 6 + privilege * 2 + usize::from(self.ac)
    }

    /// The access with the given [`Access::index`] (taken modulo
    /// [`Access::COUNT`]).
    pub fn from_index(index: usize) -> Access {
        let index = index % Self::COUNT;
        let kind = match index / 6 {
            0 => AccessKind::Read,
            1 => AccessKind::Write,
            _ => AccessKind::Fetch,
        };
        let privilege = match (index / 2) % 3 {
            0 => Privilege::User,
            1 => Privilege::Supervisor,
            _ => Privilege::SupervisorImplicit,
        };
        Access {
            kind,
            privilege,
            ac: index % 2 == 1,
        }
    }
}

/// Whether a walk may write accessed/dirty bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalkMode {
    /// Behave like the processor: set accessed bits in every entry used and
    /// the dirty bit of the leaf on a write (only when the access succeeds).
    Update,
    /// Translate without writing guest memory (for debuggers and tracing).
    Probe,
}

/// A page-fault error code (SDM Vol. 3A §4.7, Figure 4-12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PfErrorCode(u32);

impl PfErrorCode {
    /// P: 0 for a non-present page, 1 for a protection or reserved-bit
    /// violation.
    pub const PRESENT: PfErrorCode = PfErrorCode(1 << 0);
    /// W/R: the access was a write.
    pub const WRITE: PfErrorCode = PfErrorCode(1 << 1);
    /// U/S: the access was a user-mode access.
    pub const USER: PfErrorCode = PfErrorCode(1 << 2);
    /// RSVD: a reserved bit was set in a paging-structure entry.
    pub const RSVD: PfErrorCode = PfErrorCode(1 << 3);
    /// I/D: the access was an instruction fetch (only reported with SMEP,
    /// or with PAE/IA-32e paging and EFER.NXE).
    pub const FETCH: PfErrorCode = PfErrorCode(1 << 4);
    /// PK: a protection-key violation.
    pub const PK: PfErrorCode = PfErrorCode(1 << 5);

    /// The empty error code.
    pub const fn empty() -> PfErrorCode {
        PfErrorCode(0)
    }

    /// The P bit.
    pub const fn present(self) -> bool {
        self.contains(Self::PRESENT)
    }

    /// The W/R bit.
    pub const fn write(self) -> bool {
        self.contains(Self::WRITE)
    }

    /// The U/S bit.
    pub const fn user(self) -> bool {
        self.contains(Self::USER)
    }

    /// The RSVD bit.
    pub const fn reserved(self) -> bool {
        self.contains(Self::RSVD)
    }

    /// The I/D bit.
    pub const fn fetch(self) -> bool {
        self.contains(Self::FETCH)
    }

    /// The PK bit.
    pub const fn protection_key(self) -> bool {
        self.contains(Self::PK)
    }
}

flag_word!(
    PfErrorCode,
    u32,
    "page-fault error code (as pushed on the stack)"
);

impl std::ops::BitOrAssign for PfErrorCode {
    fn bitor_assign(&mut self, rhs: PfErrorCode) {
        self.0 |= rhs.0;
    }
}

impl std::fmt::Display for PfErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x} [", self.0)?;
        let names = [
            (Self::PRESENT, "P"),
            (Self::WRITE, "W"),
            (Self::USER, "U"),
            (Self::RSVD, "RSVD"),
            (Self::FETCH, "I/D"),
            (Self::PK, "PK"),
        ];
        let mut first = true;
        for (flag, name) in names {
            if self.contains(flag) {
                if !first {
                    f.write_str(" ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str("]")
    }
}

/// The size of a translated page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB.
    Size4K,
    /// 2 MiB (PAE and IA-32e paging).
    Size2M,
    /// 4 MiB (32-bit paging with CR4.PSE).
    Size4M,
    /// 1 GiB (IA-32e paging with 1 GiB page support).
    Size1G,
}

impl PageSize {
    /// Bytes in the page.
    #[inline]
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size4M => 1 << 22,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// One paging-structure entry a walk used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WalkEntry {
    /// Level: 1 for a PTE, 2 for a PDE, 3 for a PDPTE, 4 for a PML4E, 5 for
    /// a PML5E.
    pub level: u8,
    /// Guest-physical address of the entry (for the PAE PDPTEs, where it was
    /// loaded from).
    pub gpa: u64,
    /// The entry's value after the walk (including accessed/dirty bits it
    /// set).
    pub value: u64,
}

/// The entries of a walk, top level first (at most five; no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WalkEntries {
    len: u8,
    items: [WalkEntry; 5],
}

impl WalkEntries {
    pub(crate) fn push(&mut self, entry: WalkEntry) {
        if let Some(slot) = self.items.get_mut(usize::from(self.len)) {
            *slot = entry;
            self.len += 1;
        }
    }

    /// Gives the entries from index `from` on that sit at `gpa` the value
    /// `value` (a self-referencing table uses one entry at several levels).
    pub(crate) fn update_from(&mut self, from: usize, gpa: u64, value: u64) {
        let len = usize::from(self.len);
        for entry in self.items.iter_mut().take(len).skip(from) {
            if entry.gpa == gpa {
                entry.value = value;
            }
        }
    }

    /// The entries as a slice.
    pub fn as_slice(&self) -> &[WalkEntry] {
        &self.items[..usize::from(self.len)]
    }

    /// The leaf entry, if any.
    pub fn leaf(&self) -> Option<&WalkEntry> {
        self.as_slice().last()
    }
}

impl std::ops::Deref for WalkEntries {
    type Target = [WalkEntry];
    fn deref(&self) -> &[WalkEntry] {
        self.as_slice()
    }
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// Size of the page that maps it.
    pub page_size: PageSize,
    /// R/W was 1 in every entry.
    pub writable: bool,
    /// U/S was 1 in every entry (a user-mode address).
    pub user: bool,
    /// No entry set XD (or EFER.NXE is off).
    pub executable: bool,
    /// The leaf's protection key, when protection keys govern the page
    /// (CR4.PKE for user-mode pages, CR4.PKS for supervisor-mode pages).
    pub pkey: Option<u8>,
    /// The entries used, top level first.
    pub entries: WalkEntries,
}

/// Why a walk did not produce a translation.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// The access raises a page fault (#PF) with this error code; CR2 would
    /// be `address`.
    #[error("page fault at {address:#x}, error code {error_code}")]
    PageFault {
        /// The error code.
        error_code: PfErrorCode,
        /// The faulting linear address.
        address: u64,
    },
    /// The address is not canonical for the paging mode (#GP, or #SS for a
    /// stack access); no page fault.
    #[error("linear address {address:#x} is not canonical")]
    NonCanonical {
        /// The linear address.
        address: u64,
    },
    /// A paging-structure entry lies outside guest memory.
    #[error("cannot access the level-{level} paging entry at {gpa:#x}: {source}")]
    Memory {
        /// Level of the entry.
        level: u8,
        /// Its guest-physical address.
        gpa: u64,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// Accessed/dirty updates kept losing races with another writer.
    #[error("accessed/dirty update for {address:#x} lost {MAX_AD_RETRIES} races in a row")]
    Contended {
        /// The linear address.
        address: u64,
    },
}

impl WalkError {
    /// The page-fault error code, if this is a page fault.
    pub fn pf_error_code(&self) -> Option<PfErrorCode> {
        match self {
            WalkError::PageFault { error_code, .. } => Some(*error_code),
            _ => None,
        }
    }
}

/// Whether `gva` is canonical for a linear-address width of `width` bits.
#[inline]
pub(crate) fn is_canonical(gva: u64, width: u32) -> bool {
    let shift = 64 - width;
    (((gva << shift) as i64) >> shift) as u64 == gva
}

/// How one attempt of a walk ended.
pub(crate) enum Step {
    /// The translation, without its entries (the caller's list holds them).
    Done(Outcome),
    /// An accessed/dirty update lost a race: walk again.
    Retry,
}

/// A translation without its entries, packed into two words so that it is
/// passed along in registers (the walk's result is built once, from it).
#[derive(Clone, Copy)]
pub(crate) struct Outcome {
    /// The guest-physical address.
    pub(crate) gpa: u64,
    /// Bits 1:0 page size (4K, 2M, 4M, 1G), bit 2 writable, bit 3 user,
    /// bit 4 executable, bit 5 a protection key is reported, bits 11:8 the
    /// key.
    bits: u32,
}

impl Outcome {
    fn new(
        gpa: u64,
        page_size: PageSize,
        writable: bool,
        user: bool,
        executable: bool,
        pkey: Option<u8>,
    ) -> Outcome {
        let size = match page_size {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size4M => 2,
            PageSize::Size1G => 3,
        };
        let key = pkey.map_or(0, |k| 1 << 5 | u32::from(k & 0xf) << 8);
        Outcome {
            gpa,
            bits: size
                | u32::from(writable) << 2
                | u32::from(user) << 3
                | u32::from(executable) << 4
                | key,
        }
    }

    pub(crate) fn page_size(self) -> PageSize {
        match self.bits & 3 {
            0 => PageSize::Size4K,
            1 => PageSize::Size2M,
            2 => PageSize::Size4M,
            _ => PageSize::Size1G,
        }
    }

    pub(crate) fn writable(self) -> bool {
        self.bits & 1 << 2 != 0
    }

    pub(crate) fn executable(self) -> bool {
        self.bits & 1 << 4 != 0
    }

    /// The full translation, with the entries the walk used.
    #[inline]
    pub(crate) fn translation(self, entries: WalkEntries) -> Translation {
        Translation {
            gpa: self.gpa,
            page_size: self.page_size(),
            writable: self.writable(),
            user: self.bits & 1 << 3 != 0,
            executable: self.executable(),
            pkey: (self.bits & 1 << 5 != 0).then_some((self.bits >> 8) as u8 & 0xf),
            entries,
        }
    }
}

/// Where a walk reads paging-structure entries from and writes their
/// accessed/dirty bits to.
///
/// The one-dimensional walk instantiates it with plain guest memory
/// ([`EntryReader`]); the two-dimensional walk of the `nested` module with a
/// view that first translates every entry address through stage 2. Being a
/// generic parameter (not a trait object), it costs the 1-D walk nothing.
pub(crate) trait TableMemory {
    /// What a failed access reports; page faults of the walk itself are
    /// converted from [`WalkError`].
    type Error: From<WalkError>;

    /// Reads the entry of `level` at `gpa` (8 bytes if `wide`, else 4).
    fn read(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, Self::Error>;

    /// Replaces `old` by `new` at `gpa` if it still holds `old`; returns
    /// whether it did.
    fn compare_exchange(
        &mut self,
        wide: bool,
        level: u8,
        gpa: u64,
        old: u64,
        new: u64,
    ) -> Result<bool, Self::Error>;
}

/// Translates `gva` for `access` in the paging context `ctx`, reading the
/// paging structures from `memory`.
///
/// Outside IA-32e mode only bits 31:0 of `gva` are used. With
/// [`WalkMode::Update`] the accessed/dirty bits are set as the processor
/// would (nothing is written when the access faults).
pub fn walk<M: GuestMemory + ?Sized>(
    ctx: &PagingContext,
    memory: &M,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> Result<Translation, WalkError> {
    walk_tables(ctx, &mut EntryReader::new(memory), gva, access, mode)
}

/// [`walk`] over any [`TableMemory`].
#[inline]
pub(crate) fn walk_tables<T: TableMemory>(
    ctx: &PagingContext,
    tables: &mut T,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> Result<Translation, T::Error> {
    let gva = match ctx.mode {
        PagingMode::None => {
            return Ok(Translation {
                gpa: gva & 0xffff_ffff,
                page_size: PageSize::Size4K,
                writable: true,
                user: true,
                executable: true,
                pkey: None,
                entries: WalkEntries::default(),
            })
        }
        PagingMode::Level4 | PagingMode::Level5 => {
            let width = if ctx.mode == PagingMode::Level5 {
                57
            } else {
                48
            };
            if !is_canonical(gva, width) {
                return Err(WalkError::NonCanonical { address: gva }.into());
            }
            gva
        }
        PagingMode::Bits32 | PagingMode::Pae => gva & 0xffff_ffff,
    };
    let mut entries = WalkEntries::default();
    for _ in 0..MAX_AD_RETRIES {
        if let Step::Done(t) = walk_once(ctx, tables, gva, access, mode, &mut entries)? {
            return Ok(t.translation(entries));
        }
    }
    Err(WalkError::Contended { address: gva }.into())
}

impl PagingContext {
    /// Same as [`walk`].
    pub fn walk<M: GuestMemory + ?Sized>(
        &self,
        memory: &M,
        gva: u64,
        access: Access,
        mode: WalkMode,
    ) -> Result<Translation, WalkError> {
        walk(self, memory, gva, access, mode)
    }
}

/// Reads paging-structure entries, remembering the guest memory region of
/// the previous entry so that a walk looks a region up once and then reads
/// entries straight from its mapping.
pub(crate) struct EntryReader<'a, M: GuestMemory + ?Sized> {
    memory: &'a M,
    /// The mapping of the last region used.
    window: Option<Window>,
}

/// The host mapping of one guest memory region, kept for one walk.
struct Window {
    /// Guest-physical address of the region's first byte.
    start: u64,
    /// Bytes in the region.
    len: u64,
    /// Keeps the region mapped (a no-op except for vm-memory's Xen
    /// backend) and holds the host address of its first byte.
    guard: PtrGuard,
}

impl<'a, M: GuestMemory + ?Sized> EntryReader<'a, M> {
    pub(crate) fn new(memory: &'a M) -> Self {
        EntryReader {
            memory,
            window: None,
        }
    }

    /// Reads the entry of `level` at `gpa` (8 bytes if `wide`, else 4) with
    /// an atomic load.
    #[inline]
    pub(crate) fn read(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, WalkError> {
        if let Some(value) = self.read_mapped(wide, gpa) {
            return Ok(value);
        }
        self.read_slow(wide, level, gpa)
    }

    /// Reads the entry from the remembered mapping, if it holds all of it.
    #[inline]
    fn read_mapped(&self, wide: bool, gpa: u64) -> Option<u64> {
        let w = self.window.as_ref()?;
        let size: u64 = if wide { 8 } else { 4 };
        let offset = gpa.wrapping_sub(w.start);
        if offset >= w.len || w.len - offset < size {
            return None;
        }
        // In bounds: `offset + size <= len`, and `len` fits in a usize
        // because it is the length of a mapping.
        let ptr = w.guard.as_ptr().wrapping_add(offset as usize).cast_mut();
        if ptr as usize % size as usize != 0 {
            return None;
        }
        Some(if wide {
            // SAFETY: `ptr` points at 8 bytes inside the region's mapping
            // (checked above), is 8-byte aligned (checked above) and stays
            // mapped while `w.guard` and the borrow of `memory` live, which
            // outlast the reference. vm-memory hands out the same
            // `&AtomicU64` for this memory (`VolatileSlice::get_atomic_ref`,
            // used by `Bytes::load`), so this makes no assumption about
            // concurrent guest accesses that vm-memory does not already
            // make; the entry is only loaded, never written.
            let atomic = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
            u64::from_le(atomic.load(Ordering::Acquire))
        } else {
            // SAFETY: as above, for 4 bytes with 4-byte alignment.
            let atomic = unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) };
            u64::from(u32::from_le(atomic.load(Ordering::Acquire)))
        })
    }

    /// Looks the region of `gpa` up and remembers its mapping, then reads
    /// the entry from it (or through vm-memory if that cannot be done).
    #[cold]
    #[inline(never)]
    fn read_slow(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, WalkError> {
        let err = |source| WalkError::Memory { level, gpa, source };
        if let Some(region) = self
            .memory
            .physical_memory()
            .and_then(|physical| physical.find_region(GuestAddress(gpa)))
        {
            let slice = region.as_volatile_slice().map_err(err)?;
            self.window = Some(Window {
                start: region.start_addr().0,
                len: slice.len() as u64,
                guard: slice.ptr_guard(),
            });
            if let Some(value) = self.read_mapped(wide, gpa) {
                return Ok(value);
            }
        }
        read_entry(self.memory, wide, level, gpa)
    }
}

impl<M: GuestMemory + ?Sized> TableMemory for EntryReader<'_, M> {
    type Error = WalkError;

    #[inline]
    fn read(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, WalkError> {
        EntryReader::read(self, wide, level, gpa)
    }

    #[inline]
    fn compare_exchange(
        &mut self,
        wide: bool,
        level: u8,
        gpa: u64,
        old: u64,
        new: u64,
    ) -> Result<bool, WalkError> {
        compare_exchange(self.memory, wide, level, gpa, old, new)
    }
}

fn read_entry<M: GuestMemory + ?Sized>(
    memory: &M,
    wide: bool,
    level: u8,
    gpa: u64,
) -> Result<u64, WalkError> {
    let value = if wide {
        memory
            .load::<u64>(GuestAddress(gpa), Ordering::Acquire)
            .map(u64::from_le)
    } else {
        memory
            .load::<u32>(GuestAddress(gpa), Ordering::Acquire)
            .map(|v| u64::from(u32::from_le(v)))
    };
    value.map_err(|source| WalkError::Memory { level, gpa, source })
}

/// Replaces `old` by `new` at `gpa` if it still holds `old`; returns whether
/// it did. Marks the entry dirty in vm-memory's bitmap.
pub(crate) fn compare_exchange<M: GuestMemory + ?Sized>(
    memory: &M,
    wide: bool,
    level: u8,
    gpa: u64,
    old: u64,
    new: u64,
) -> Result<bool, WalkError> {
    let len = if wide { 8 } else { 4 };
    let err = |source: GuestMemoryError| WalkError::Memory { level, gpa, source };
    let slice = memory
        .get_slices(GuestAddress(gpa), len, Permissions::Write)
        .map_err(err)?
        .next()
        .ok_or(err(GuestMemoryError::InvalidGuestAddress(GuestAddress(
            gpa,
        ))))?
        .map_err(err)?;
    let swapped = if wide {
        slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|e| err(e.into()))?
            .compare_exchange(
                old.to_le(),
                new.to_le(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    } else {
        // 32-bit entries: the values fit in 32 bits.
        slice
            .get_atomic_ref::<AtomicU32>(0)
            .map_err(|e| err(e.into()))?
            .compare_exchange(
                (old as u32).to_le(),
                (new as u32).to_le(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    };
    if swapped {
        slice.bitmap().mark_dirty(0, len);
    }
    Ok(swapped)
}

#[inline]
pub(crate) fn walk_once<T: TableMemory>(
    ctx: &PagingContext,
    tables: &mut T,
    gva: u64,
    access: Access,
    mode: WalkMode,
    entries: &mut WalkEntries,
) -> Result<Step, T::Error> {
    let wide = ctx.mode != PagingMode::Bits32;
    let write = access.kind == AccessKind::Write;
    let mut code = PfErrorCode::empty();
    if write {
        code |= PfErrorCode::WRITE;
    }
    if access.privilege == Privilege::User {
        code |= PfErrorCode::USER;
    }
    if access.kind == AccessKind::Fetch && ctx.report_fetch {
        code |= PfErrorCode::FETCH;
    }
    let fault = |error_code| WalkError::PageFault {
        error_code,
        address: gva,
    };

    *entries = WalkEntries::default();
    let mut level = ctx.mode.levels();
    let mut table = ctx.root;
    if ctx.mode == PagingMode::Pae {
        // The PDPTEs come from the PDPTE registers (§4.4.1); they have no
        // access rights and no accessed bit.
        let index = ((gva >> 30) & 3) as usize;
        let value = ctx.pdptrs[index];
        entries.push(WalkEntry {
            level: 3,
            gpa: table + 8 * index as u64,
            value,
        });
        if value & P == 0 {
            return Err(fault(code).into());
        }
        table = value & ctx.addr_mask;
        level = 2;
    }
    let (index_bits, entry_bytes) = if wide { (9, 8) } else { (10, 4) };
    let mut rights = RW | US;
    let mut xd = 0;
    let mut leaf;
    loop {
        let shift = 12 + index_bits * (u32::from(level) - 1);
        let index = (gva >> shift) & ((1 << index_bits) - 1);
        let gpa = table + index * entry_bytes;
        leaf = tables.read(wide, level, gpa)?;
        entries.push(WalkEntry {
            level,
            gpa,
            value: leaf,
        });
        if leaf & P == 0 {
            return Err(fault(code).into());
        }
        let slot = usize::from(level - 1);
        let large = level > 1 && leaf & PS != 0 && ctx.large[slot];
        if leaf & ctx.rsvd[slot][usize::from(large)] != 0 {
            return Err(fault(code | PfErrorCode::PRESENT | PfErrorCode::RSVD).into());
        }
        rights &= leaf;
        xd |= leaf;
        if level == 1 || large {
            break;
        }
        table = if wide {
            leaf & ctx.addr_mask
        } else {
            leaf & 0xffff_f000
        };
        level -= 1;
    }

    let user = rights & US != 0;
    let writable = rights & RW != 0;
    let executable = !(wide && ctx.nxe && xd & XD != 0);
    let index = (usize::from(user) << 2) | (usize::from(writable) << 1) | usize::from(executable);
    let mut denied = ctx.perm[access.index()] >> index & 1 != 0;
    // Protection keys (§4.6.2) apply to data accesses in IA-32e paging only.
    let key = (leaf >> 59) as u8 & 0xf;
    let keys = if user {
        ctx.pke.then_some(ctx.pkru)
    } else {
        ctx.pks.then_some(ctx.pkrs)
    };
    if let Some(keys) = keys {
        if access.kind != AccessKind::Fetch {
            let ad = keys >> (2 * key) & 1 != 0;
            let wd = keys >> (2 * key + 1) & 1 != 0;
            if ad || (wd && write && (access.privilege == Privilege::User || ctx.wp)) {
                code |= PfErrorCode::PK;
                denied = true;
            }
        }
    }
    if denied {
        return Err(fault(code | PfErrorCode::PRESENT).into());
    }

    let (page_size, base) = match (level, wide) {
        (1, true) => (PageSize::Size4K, leaf & ctx.addr_mask),
        (1, false) => (PageSize::Size4K, leaf & 0xffff_f000),
        (2, true) => (PageSize::Size2M, leaf & ctx.addr_mask & !0x1f_ffff),
        (2, false) => (
            PageSize::Size4M,
            (leaf & 0xffc0_0000) | ((leaf >> 13) & 0xff) << 32,
        ),
        _ => (PageSize::Size1G, leaf & ctx.addr_mask & !0x3fff_ffff),
    };

    if mode == WalkMode::Update {
        // §4.8: the accessed flag in every entry used (not the PAE PDPTE
        // registers), the dirty flag in the leaf on a write. Top level
        // first; losing a race to another writer restarts the walk.
        let first = usize::from(ctx.mode == PagingMode::Pae);
        let count = entries.len();
        for i in first..count {
            let entry = entries.items[i];
            let mut new = entry.value | A;
            if write && i + 1 == count {
                new |= D;
            }
            if new != entry.value {
                if !tables.compare_exchange(wide, entry.level, entry.gpa, entry.value, new)? {
                    return Ok(Step::Retry);
                }
                // Self-referencing tables can use one entry at several
                // levels: later uses see the value just written.
                for later in entries.items[i..count].iter_mut() {
                    if later.gpa == entry.gpa {
                        later.value = new;
                    }
                }
            }
        }
    }

    Ok(Step::Done(Outcome::new(
        base | (gva & (page_size.bytes() - 1)),
        page_size,
        writable,
        user,
        executable,
        keys.map(|_| key),
    )))
}
