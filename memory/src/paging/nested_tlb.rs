//! A cache of stage-2 translations for two-dimensional walks: the software
//! counterpart of the guest-physical mappings a processor keeps in its TLBs
//! and paging-structure caches under nested paging.
//!
//! [`walk_2d`](super::walk_2d()) translates every guest paging-structure
//! address through stage 2 on every walk: 24 dependent memory references
//! for 4-level over 4-level tables. Processors do not: they cache
//! guest-physical translations (Intel SDM Vol. 3C §29.4.1 "Information That
//! May Be Cached", *guest-physical mappings* derived from the EPT
//! paging structures; AMD APM Vol. 2 §15.25 "Nested Paging", whose nested
//! translations live in the TLB tagged by ASID, §15.16 "TLB Control"), and
//! software must invalidate them after changing stage-2 entries (INVEPT,
//! SDM §29.4.3; the VMCB TLB_CONTROL flush on VMRUN, APM §15.16.1).
//! [`Stage2Tlb`] is such a cache, and [`walk_2d_cached`] a 2-D walk that
//! looks up every stage-2 translation in it (the guest table pages and the
//! final page) and walks stage 2 only on a miss.
//!
//! # What is cached
//! [`Stage2Tlb::ENTRIES`] entries in two-way sets, allocated when the cache
//! is made (never during a walk), indexed by the guest-physical 4 KiB frame
//! (a new entry takes the first way and moves the older one to the second,
//! evicting what was there). An entry holds the host address of the
//! frame, the stage-2 translation it came from (page size, EPT memory type
//! and "ignore PAT", the stage-2 entries) and, for each use, whether a hit
//! is allowed: a data read, write or fetch of the final address, a read of
//! a guest paging-structure entry, an accessed/dirty update of one — once
//! for [`WalkMode::Update`] and once for [`WalkMode::Probe`]. Only the
//! effective rights of a fresh, successful stage-2 walk go in: EPT R/W/X
//! ANDed over the levels (execute-only included), NPT U at every level
//! (any successful nested walk has it, all nested accesses being user
//! accesses), R/W at every level and NX (with host EFER.NXE).
//!
//! # Rules
//! 1. **Nothing is allowed that a fresh walk would refuse.** A use hits
//!    only if the rights recorded from the walk that filled the entry grant
//!    it, by the same rules as the walk: the stage-2 access of a guest
//!    paging-structure read is a data read under EPT without A/D, a write
//!    under EPT with EPTP bit 6 (SDM §29.3.5) and a user write under NPT
//!    (APM §15.25.5; see the [`nested`](super::nested) module doc); an A/D
//!    update of a guest entry is a write. Anything else misses and takes
//!    the full stage-2 walk, which reports the fault exactly as
//!    [`walk_2d`](super::walk_2d()) does.
//! 2. **Accessed and dirty flags.** An entry is filled only if every
//!    stage-2 entry of its walk has its accessed flag set (set by that walk,
//!    or found set by a [`WalkMode::Probe`] walk; EPT without EPTP bit 6 has
//!    no flags), so a probe never caches a translation whose flags are not
//!    in memory. In [`WalkMode::Update`] a write-type use (a data write; a
//!    guest-table read or update under NPT or EPT with A/D) hits only if the
//!    stage-2 leaf's dirty flag was set when the entry was filled; otherwise
//!    the walk goes slow, sets the flag as the processor would, and fills
//!    the entry again, now allowing writes. A hit is therefore a walk that
//!    would have written nothing: the side effects in memory are those of
//!    `walk_2d`. In [`WalkMode::Probe`] neither walk writes, and a hit needs
//!    the rights only.
//! 3. **Stage 1 is never cached.** The guest's entries are read, checked and
//!    their A/D flags updated (through the cached stage-2 translation of
//!    their page) on every walk, exactly as `walk_2d` does; so guest page
//!    faults and guest A/D side effects are those of `walk_2d`.
//! 4. **One context at a time.** The cache is tied to the stage-2 context of
//!    its last walk (EPT: root, walk length, EPTP bit 6, paging-structure
//!    memory type and capabilities; NPT: nCR3 and the host settings); a walk
//!    with another context empties it first, so another EPTP or nCR3 never
//!    hits. (Processors tag with EP4TA/VPID or ASID instead of flushing.)
//! 5. **Invalidation is the caller's job**, as on hardware. After changing a
//!    stage-2 entry (another address or rights, a cleared accessed or dirty
//!    flag, an unmapped page or table) call
//!    [`Stage2Tlb::invalidate_gpa_range`] with the guest-physical range the
//!    entry maps (for a non-leaf entry, the whole range below it), or
//!    [`Stage2Tlb::flush`] (INVEPT all-context, or an NPT TLB flush).
//!    Without it the cache may keep answering from the old entry — a stale
//!    host address or rights, as a processor's TLB would — until the entry
//!    is evicted. Setting accessed/dirty flags is not a change in this sense
//!    (flags are only ever set by walks, which makes a cached entry more
//!    conservative, never less).
//! 6. **A walk's own writes.** A guest A/D update that lands in a frame
//!    holding stage-2 entries used by a cached translation (a guest table
//!    sharing a page with stage-2 tables) would change those entries behind
//!    the cache's back (for EPT, bits 5 and 6 are memory type and
//!    "ignore PAT", or reserved bits of a non-leaf entry). The cache keeps a
//!    small filter of such frames and empties itself when a walk writes into
//!    one, the way `walk_2d` drops its in-walk memo on every write.
//!
//! With those rules, whenever no stage-2 entry changed since an entry was
//! filled or since the last matching invalidation, [`walk_2d_cached`]
//! returns what `walk_2d` returns for the same memory — guest-physical and
//! host address, both stages' rights, page sizes, memory type, fault kinds,
//! EPT qualifications and #NPF error codes — and leaves memory as `walk_2d`
//! would. Two fields differ by design:
//! - [`NestedTranslation::stats`] counts the memory references actually
//!   made: a hit reads no stage-2 entry (4 guest entries and no stage-2
//!   reference for a warm 4-level walk), while `walk_2d` keeps reporting
//!   the architectural count (24 for 4-level over 4-level).
//! - On a hit for the final address, [`Stage2Translation::entries`] lists
//!   the stage-2 entries as they were when the entry was filled: an
//!   accessed or dirty flag set since by another walk through a shared
//!   entry (another 4 KiB frame of the same 2 MiB stage-2 page) is not
//!   shown.
//!
//! Like `walk_2d`, the cache cannot tell a concurrent writer racing a walk
//! from one that wrote a moment later; other vCPUs editing stage 2 must
//! invalidate as above.
//!
//! # Example
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_memory::paging::{
//!     walk_2d_cached, Access, CpuFeatures, EptBuilder, EptCapabilities, EptContext, EptFlags,
//!     PageFlags, PageSize, PageTableBuilder, PagingContext, Privilege, Stage2Context, Stage2Tlb,
//!     TableFormat, WalkMode,
//! };
//!
//! let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)])?;
//! let mut guest =
//!     PageTableBuilder::new(&memory, TableFormat::Level4, GuestAddress(0x10_0000), 0x10_0000)?;
//! guest.map(0x7000_0000, 0x40_0000, PageSize::Size4K, PageFlags::default())?;
//! let guest = PagingContext::new(&guest.control_regs()?, &CpuFeatures::default())?;
//! let mut ept = EptBuilder::new(&memory, false, GuestAddress(0x20_0000), 0x1_0000)?;
//! ept.map(0, 0, PageSize::Size2M, EptFlags::default())?;
//! ept.map(0x40_0000, 0x60_0000, PageSize::Size2M, EptFlags::default())?;
//! let stage2 = Stage2Context::Ept(EptContext::new(ept.eptp(true), &EptCapabilities::default())?);
//!
//! let mut tlb = Stage2Tlb::new();
//! let read = Access::read(Privilege::Supervisor);
//! let first = walk_2d_cached(&guest, &stage2, &memory, &mut tlb, 0x7000_0123, read, WalkMode::Update)?;
//! assert_eq!(first.hpa, 0x60_0123);
//! // Warm: the four guest entries are read, every stage-2 lookup hits.
//! let warm = walk_2d_cached(&guest, &stage2, &memory, &mut tlb, 0x7000_0123, read, WalkMode::Update)?;
//! assert_eq!((warm.hpa, warm.stats.references()), (0x60_0123, 4));
//!
//! // After a stage-2 edit, invalidate what it maps.
//! ept.protect(0x40_0000, PageSize::Size2M, EptFlags { write: false, ..EptFlags::default() })?;
//! tlb.invalidate_gpa_range(0x40_0000, 0x20_0000);
//! let t = walk_2d_cached(&guest, &stage2, &memory, &mut tlb, 0x7000_0123, read, WalkMode::Update)?;
//! assert!(!t.stage2.writable);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use vm_memory::GuestMemory;

use super::context::PagingContext;
use super::nested::{
    stage1_memory, Counting, NestedStats, NestedTranslation, NestedWalkError, Slow as Miss,
    Stage2Access, Stage2Context, Stage2Error, Stage2Translation,
};
use super::walk::{
    compare_exchange, walk_tables, Access, AccessKind, EntryReader, PageSize, TableMemory,
    WalkEntries, WalkMode,
};

/// EPT accessed flag.
const EPT_A: u64 = 1 << 8;
/// EPT dirty flag.
const EPT_D: u64 = 1 << 9;
/// Accessed flag of an NPT (x86 format) entry.
const NPT_A: u64 = 1 << 5;
/// Dirty flag of an NPT entry.
const NPT_D: u64 = 1 << 6;

/// The uses of a stage-2 translation, each with its own "hit allowed" bit
/// (per walk mode: bit `use` for [`WalkMode::Update`], bit `use + USES` for
/// [`WalkMode::Probe`]).
const USES: u32 = 5;

/// The use of a stage-2 access (0 to 4).
#[inline(always)]
fn use_index(access: Stage2Access) -> u32 {
    match access {
        Stage2Access::Data(AccessKind::Read) => 0,
        Stage2Access::Data(AccessKind::Write) => 1,
        Stage2Access::Data(AccessKind::Fetch) => 2,
        Stage2Access::TableRead => 3,
        Stage2Access::TableUpdate => 4,
    }
}

/// The "hit allowed" bit of `access` in `mode`.
#[inline(always)]
fn class(access: Stage2Access, mode: WalkMode) -> u16 {
    let probe = if mode == WalkMode::Probe { USES } else { 0 };
    1 << (use_index(access) + probe)
}

/// The stage-2 context a cache is tied to: enough to tell apart any two
/// contexts that could translate differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContextKey {
    root: u64,
    config: u64,
}

impl ContextKey {
    fn of(stage2: &Stage2Context) -> ContextKey {
        match stage2 {
            Stage2Context::Ept(ept) => {
                let caps = ept.capabilities();
                let config = u64::from(ept.levels())
                    | u64::from(ept.accessed_dirty()) << 3
                    | u64::from(ept.walk_memory_type().bits()) << 4
                    | u64::from(caps.execute_only) << 8
                    | u64::from(caps.pages_2m) << 9
                    | u64::from(caps.pages_1g) << 10
                    | u64::from(caps.accessed_dirty) << 11
                    | u64::from(caps.five_level) << 12
                    | u64::from(caps.maxphyaddr) << 16;
                ContextKey {
                    root: ept.root(),
                    config,
                }
            }
            Stage2Context::Npt(npt) => {
                let host = npt.host();
                let config = 1 << 63
                    | u64::from(host.nxe)
                    | u64::from(host.gbpages) << 1
                    | u64::from(host.five_level) << 2
                    | u64::from(host.maxphyaddr) << 16;
                ContextKey {
                    root: npt.root(),
                    config,
                }
            }
        }
    }

    /// Accessed and dirty flag of the context's entries (0 when it has none)
    /// and whether reading a guest paging-structure entry is a stage-2
    /// write.
    fn flags(stage2: &Stage2Context) -> (u64, u64, bool) {
        match stage2 {
            Stage2Context::Ept(ept) if ept.accessed_dirty() => (EPT_A, EPT_D, true),
            Stage2Context::Ept(_) => (0, 0, false),
            Stage2Context::Npt(_) => (NPT_A, NPT_D, true),
        }
    }
}

/// The part of an entry a lookup reads (kept apart from the translation
/// details, so that lookups touch little memory).
#[derive(Debug, Clone, Copy, Default)]
struct Tag {
    /// Guest-physical frame number (address >> 12) plus one; 0 when the
    /// entry is empty (frame numbers have at most 52 bits).
    key: u64,
    /// Host address of the frame (bits 63:12) and the "hit allowed" bits
    /// (bits 9:0, see [`class`]).
    host_allow: u64,
}

impl Tag {
    #[inline(always)]
    fn key(frame: u64) -> u64 {
        frame.wrapping_add(1)
    }
}

/// Counters of a [`Stage2Tlb`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stage2TlbStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that walked stage 2.
    pub misses: u64,
    /// Entries written after a successful stage-2 walk.
    pub fills: u64,
    /// Times the cache was emptied ([`Stage2Tlb::flush`], a change of
    /// context, or a walk writing into a frame of stage-2 entries).
    pub flushes: u64,
}

/// A cache of stage-2 translations at 4 KiB granularity, tied to one
/// stage-2 context (see the [module documentation](self) for its rules).
pub struct Stage2Tlb {
    tags: Box<[Tag]>,
    details: Box<[Stage2Translation]>,
    context: Option<ContextKey>,
    /// Host frames holding stage-2 entries that cached translations used
    /// (the first `table_frame_count`; more than fit make every frame
    /// suspect, see `may_hold_stage2_entries`).
    table_frames: [u64; TABLE_FRAMES],
    table_frame_count: usize,
    stats: Stage2TlbStats,
}

impl fmt::Debug for Stage2Tlb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage2Tlb")
            .field("valid", &self.valid_entries())
            .field("context", &self.context)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Default for Stage2Tlb {
    fn default() -> Self {
        Stage2Tlb::new()
    }
}

/// An empty translation for unused entries.
fn empty() -> Stage2Translation {
    Stage2Translation {
        hpa: 0,
        page_size: PageSize::Size4K,
        readable: false,
        writable: false,
        executable: false,
        memory_type: None,
        ignore_pat: false,
        entries: WalkEntries::default(),
    }
}

impl Stage2Tlb {
    /// Number of entries (two-way sets indexed by guest-physical frame).
    pub const ENTRIES: usize = 256;

    /// An empty cache (its two arrays are allocated here, once).
    pub fn new() -> Stage2Tlb {
        Stage2Tlb {
            tags: vec![Tag::default(); Self::ENTRIES].into_boxed_slice(),
            details: vec![empty(); Self::ENTRIES].into_boxed_slice(),
            context: None,
            table_frames: [0; TABLE_FRAMES],
            table_frame_count: 0,
            stats: Stage2TlbStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Stage2TlbStats {
        self.stats
    }

    /// Number of valid entries.
    pub fn valid_entries(&self) -> usize {
        self.tags.iter().filter(|t| t.key != 0).count()
    }

    /// Empties the cache (INVEPT all-context or single-context; an NPT TLB
    /// flush). The context it is tied to stays.
    pub fn flush(&mut self) {
        self.stats.flushes = self.stats.flushes.saturating_add(1);
        self.table_frame_count = 0;
        self.tags.fill(Tag::default());
    }

    /// Drops the entries of the guest-physical frames overlapping
    /// `gpa..gpa + len` (after a stage-2 edit of the entry or entries that
    /// map that range). Bounded by [`Stage2Tlb::ENTRIES`] steps whatever
    /// the length.
    pub fn invalidate_gpa_range(&mut self, gpa: u64, len: u64) {
        let Some(last_byte) = len.checked_sub(1) else {
            return;
        };
        let first = gpa >> 12;
        let last = gpa.saturating_add(last_byte) >> 12;
        if last - first < Self::ENTRIES as u64 {
            for frame in first..=last {
                let base = set_of(frame) * WAYS;
                for tag in self.tags.iter_mut().skip(base).take(WAYS) {
                    if tag.key == Tag::key(frame) {
                        *tag = Tag::default();
                    }
                }
            }
        } else {
            for tag in self.tags.iter_mut() {
                if tag.key != 0 && (first..=last).contains(&(tag.key - 1)) {
                    *tag = Tag::default();
                }
            }
        }
    }

    /// Ties the cache to `stage2`, emptying it if it held another context.
    #[inline]
    fn bind(&mut self, stage2: &Stage2Context) {
        let key = ContextKey::of(stage2);
        if self.context != Some(key) {
            if self.context.is_some() {
                self.flush();
            }
            self.context = Some(key);
        }
    }

    /// The entry holding `frame`, if valid.
    #[inline(always)]
    fn find(&self, frame: u64) -> Option<(usize, &Tag)> {
        let base = set_of(frame) * WAYS;
        let key = Tag::key(frame);
        let valid = |t: &&Tag| t.key == key;
        if let Some(tag) = self.tags.get(base).filter(valid) {
            return Some((base, tag));
        }
        self.tags.get(base + 1).filter(valid).map(|t| (base + 1, t))
    }

    /// [`Stage2Tlb::hit`] without counting.
    #[inline(always)]
    fn peek(&self, gpa: u64, class: u16) -> Option<(usize, u64)> {
        match self.find(gpa >> 12) {
            Some((slot, tag)) if tag.host_allow & u64::from(class) != 0 => {
                Some((slot, (tag.host_allow & !0xfff) | (gpa & 0xfff)))
            }
            _ => None,
        }
    }

    /// The entry and host address of `gpa` if a hit of `class` is allowed.
    #[inline(always)]
    fn hit(&mut self, gpa: u64, class: u16) -> Option<(usize, u64)> {
        match self.find(gpa >> 12) {
            Some((slot, tag)) if tag.host_allow & u64::from(class) != 0 => {
                let host = (tag.host_allow & !0xfff) | (gpa & 0xfff);
                self.stats.hits = self.stats.hits.wrapping_add(1);
                Some((slot, host))
            }
            _ => {
                self.stats.misses = self.stats.misses.wrapping_add(1);
                None
            }
        }
    }

    /// Records the translation of `gpa` by a successful stage-2 walk of
    /// `stage2`, if its accessed flags are set (rule 2).
    fn fill(&mut self, stage2: &Stage2Context, gpa: u64, t: &Stage2Translation) {
        let (a, d, table_read_writes) = ContextKey::flags(stage2);
        if !t.entries.iter().all(|e| e.value & a == a) {
            return;
        }
        let dirty = t.entries.leaf().is_some_and(|e| e.value & d == d);
        let mut allow = 0u16;
        for (access, granted, write) in [
            (Stage2Access::Data(AccessKind::Read), t.readable, false),
            (Stage2Access::Data(AccessKind::Write), t.writable, true),
            (Stage2Access::Data(AccessKind::Fetch), t.executable, false),
            (
                Stage2Access::TableRead,
                if table_read_writes {
                    t.writable
                } else {
                    t.readable
                },
                table_read_writes,
            ),
            (Stage2Access::TableUpdate, t.writable, true),
        ] {
            if granted {
                allow |= class(access, WalkMode::Probe);
                if dirty || !write {
                    allow |= class(access, WalkMode::Update);
                }
            }
        }
        for entry in t.entries.iter() {
            self.note_table_frame(entry.gpa >> 12);
        }
        let frame = gpa >> 12;
        let slot = match self.find(frame) {
            Some((slot, _)) => slot,
            None => {
                // The newest entry goes first; the older one moves to the
                // second way, evicting what was there.
                let base = set_of(frame) * WAYS;
                if let (Some(&tag), Some(&detail)) = (self.tags.get(base), self.details.get(base)) {
                    if let Some(second) = self.tags.get_mut(base + 1) {
                        *second = tag;
                    }
                    if let Some(second) = self.details.get_mut(base + 1) {
                        *second = detail;
                    }
                }
                base
            }
        };
        if let (Some(tag), Some(detail)) = (self.tags.get_mut(slot), self.details.get_mut(slot)) {
            *tag = Tag {
                key: Tag::key(frame),
                host_allow: (t.hpa & !0xfff) | u64::from(allow),
            };
            *detail = *t;
            detail.hpa = t.hpa & !0xfff;
        }
        self.stats.fills = self.stats.fills.wrapping_add(1);
    }

    /// Whether the frame of host address `hpa` may hold stage-2 entries a
    /// cached translation used.
    #[inline]
    fn may_hold_stage2_entries(&self, hpa: u64) -> bool {
        match self.table_frames.get(..self.table_frame_count) {
            Some(known) => known.contains(&(hpa >> 12)),
            // Overflowed: any frame may.
            None => true,
        }
    }

    /// Remembers that host frame `frame` holds stage-2 entries a cached
    /// translation used.
    #[inline]
    fn note_table_frame(&mut self, frame: u64) {
        let count = self.table_frame_count;
        if let Some(known) = self.table_frames.get(..count) {
            if known.contains(&frame) {
                return;
            }
        }
        if let Some(slot) = self.table_frames.get_mut(count) {
            *slot = frame;
        }
        // Past TABLE_FRAMES the count stays above the array: overflowed.
        self.table_frame_count = count.saturating_add(1).min(TABLE_FRAMES + 1);
    }

    /// Translates `gpa` through `stage2` for `access` with the cache: a hit
    /// returns the cached translation (see the module documentation for
    /// its `entries`), a miss walks stage 2
    /// ([`Stage2Context::translate`]) and fills the cache on success. For
    /// guest-physical accesses outside a 2-D walk, such as DMA (`gla`
    /// `None`).
    pub fn translate<M: GuestMemory + ?Sized>(
        &mut self,
        stage2: &Stage2Context,
        memory: &M,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        mode: WalkMode,
    ) -> Result<Stage2Translation, Stage2Error> {
        self.bind(stage2);
        if let Some((slot, hpa)) = self.hit(gpa, class(access, mode)) {
            if let Some(detail) = self.details.get(slot) {
                return Ok(Stage2Translation { hpa, ..*detail });
            }
        }
        let t = stage2.translate(memory, gpa, access, gla, mode)?;
        self.fill(stage2, gpa, &t);
        Ok(t)
    }
}

/// How many frames of stage-2 entries the cache tracks exactly (rule 6).
const TABLE_FRAMES: usize = 32;

/// Entries per set.
const WAYS: usize = 2;

/// The set of guest-physical frame `frame`: its low bits (consecutive
/// frames, such as a guest's table pages, never share a set; frames that
/// do share one have two ways).
#[inline(always)]
fn set_of(frame: u64) -> usize {
    (frame as usize) & (Stage2Tlb::ENTRIES / WAYS - 1)
}

/// The guest's paging structures seen through a cached stage 2.
struct CachedTables<'a, M: GuestMemory + ?Sized> {
    stage2: &'a Stage2Context,
    memory: &'a M,
    reader: EntryReader<'a, M>,
    tlb: &'a mut Stage2Tlb,
    gla: u64,
    mode: WalkMode,
    stats: NestedStats,
}

impl<M: GuestMemory + ?Sized> CachedTables<'_, M> {
    /// The full stage-2 walk of a miss, counted, filling the cache on
    /// success.
    #[inline(never)]
    fn walk_stage2(
        &mut self,
        gpa: u64,
        access: Stage2Access,
    ) -> Result<Stage2Translation, NestedWalkError> {
        let mut counting = Counting {
            inner: &mut self.reader,
            reads: 0,
            writes: 0,
        };
        let result =
            self.stage2
                .translate_in(&mut counting, gpa, access, Some(self.gla), self.mode);
        self.stats.stage2_reads = self.stats.stage2_reads.saturating_add(counting.reads);
        self.stats.stage2_writes = self.stats.stage2_writes.saturating_add(counting.writes);
        let t = result.map_err(NestedWalkError::from_stage2)?;
        self.tlb.fill(self.stage2, gpa, &t);
        Ok(t)
    }

    /// The host address of the guest paging-structure entry at `gpa`.
    #[inline(always)]
    fn table(&mut self, gpa: u64, access: Stage2Access) -> Result<u64, NestedWalkError> {
        match self.tlb.hit(gpa, class(access, self.mode)) {
            Some((_, hpa)) => Ok(hpa),
            None => self.walk_stage2(gpa, access).map(|t| t.hpa),
        }
    }

    /// The stage-2 translation of the final guest-physical address.
    #[inline]
    fn data(&mut self, gpa: u64, kind: AccessKind) -> Result<Stage2Translation, NestedWalkError> {
        let access = Stage2Access::Data(kind);
        if let Some((slot, hpa)) = self.tlb.hit(gpa, class(access, self.mode)) {
            if let Some(detail) = self.tlb.details.get(slot) {
                return Ok(Stage2Translation { hpa, ..*detail });
            }
        }
        self.walk_stage2(gpa, access)
    }
}

impl<M: GuestMemory + ?Sized> TableMemory for CachedTables<'_, M> {
    type Error = NestedWalkError;

    #[inline(always)]
    fn read(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, NestedWalkError> {
        let hpa = self.table(gpa, Stage2Access::TableRead)?;
        self.stats.stage1_reads = self.stats.stage1_reads.saturating_add(1);
        self.reader
            .read(wide, level, hpa)
            .map_err(|e| stage1_memory(e, level, hpa))
    }

    fn compare_exchange(
        &mut self,
        wide: bool,
        level: u8,
        gpa: u64,
        old: u64,
        new: u64,
    ) -> Result<bool, NestedWalkError> {
        let hpa = self.table(gpa, Stage2Access::TableUpdate)?;
        self.stats.stage1_writes = self.stats.stage1_writes.saturating_add(1);
        let swapped = compare_exchange(self.memory, wide, level, hpa, old, new)
            .map_err(|e| stage1_memory(e, level, hpa))?;
        if swapped && self.tlb.may_hold_stage2_entries(hpa) {
            // Rule 6: a guest entry sharing a frame with stage-2 entries.
            self.tlb.flush();
        }
        Ok(swapped)
    }
}

/// The guest's paging structures for the fast path of [`walk_2d_cached`]:
/// every stage-2 lookup must hit and no guest accessed/dirty flag may need
/// setting; anything else gives up with [`Miss`] (having written nothing,
/// so the general path can start over). Its error carries nothing, so the
/// hot loop moves no large error values around.
struct HitTables<'a, M: GuestMemory + ?Sized> {
    tlb: &'a Stage2Tlb,
    reader: EntryReader<'a, M>,
    /// The "hit allowed" bit of a guest-table read.
    class: u16,
    reads: u32,
}

impl<M: GuestMemory + ?Sized> TableMemory for HitTables<'_, M> {
    type Error = Miss;

    #[inline(always)]
    fn read(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, Miss> {
        let (_, hpa) = self.tlb.peek(gpa, self.class).ok_or(Miss)?;
        self.reads = self.reads.saturating_add(1);
        self.reader.read(wide, level, hpa).map_err(|_| Miss)
    }

    #[inline]
    fn compare_exchange(&mut self, _: bool, _: u8, _: u64, _: u64, _: u64) -> Result<bool, Miss> {
        Err(Miss)
    }
}

/// [`walk_2d_cached`] when every stage-2 lookup hits and the walk writes
/// nothing: the same translation as the general path (same stage-1 walk,
/// same cached stage-2 answers), `None` otherwise.
#[inline(always)]
fn walk_hits<M: GuestMemory + ?Sized>(
    guest: &PagingContext,
    memory: &M,
    tlb: &mut Stage2Tlb,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> Option<NestedTranslation> {
    let mut tables = HitTables {
        tlb,
        reader: EntryReader::new(memory),
        class: class(Stage2Access::TableRead, mode),
        reads: 0,
    };
    let stage1 = walk_tables(guest, &mut tables, gva, access, mode).ok()?;
    let reads = tables.reads;
    let data = class(Stage2Access::Data(access.kind), mode);
    let (slot, hpa) = tlb.peek(stage1.gpa, data)?;
    let detail = tlb.details.get(slot)?;
    let stage2 = Stage2Translation { hpa, ..*detail };
    tlb.stats.hits = tlb.stats.hits.wrapping_add(u64::from(reads) + 1);
    Some(NestedTranslation {
        hpa,
        stage1,
        stage2,
        stats: NestedStats {
            stage1_reads: reads,
            ..NestedStats::default()
        },
    })
}

/// [`walk_2d`](super::walk_2d()) with the stage-2 translations of the guest
/// paging structures and of the final address taken from `tlb` when it
/// allows, and walked (then cached) otherwise. Same arguments and results
/// as `walk_2d` under the rules of the [module documentation](self); the
/// statistics count the references actually made.
#[inline]
pub fn walk_2d_cached<M: GuestMemory + ?Sized>(
    guest: &PagingContext,
    stage2: &Stage2Context,
    memory: &M,
    tlb: &mut Stage2Tlb,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> Result<NestedTranslation, NestedWalkError> {
    tlb.bind(stage2);
    if let Some(t) = walk_hits(guest, memory, tlb, gva, access, mode) {
        return Ok(t);
    }
    walk_general(guest, stage2, memory, tlb, gva, access, mode)
}

/// The general path of [`walk_2d_cached`]: any miss, any write, full fault
/// reports.
#[inline(never)]
fn walk_general<M: GuestMemory + ?Sized>(
    guest: &PagingContext,
    stage2: &Stage2Context,
    memory: &M,
    tlb: &mut Stage2Tlb,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> Result<NestedTranslation, NestedWalkError> {
    let gla = if guest.mode().is_long() {
        gva
    } else {
        gva & 0xffff_ffff
    };
    let mut tables = CachedTables {
        stage2,
        memory,
        reader: EntryReader::new(memory),
        tlb,
        gla,
        mode,
        stats: NestedStats::default(),
    };
    let stage1 = walk_tables(guest, &mut tables, gva, access, mode)?;
    let stage2_t = tables.data(stage1.gpa, access.kind)?;
    Ok(NestedTranslation {
        hpa: stage2_t.hpa,
        stage1,
        stage2: stage2_t,
        stats: tables.stats,
    })
}
