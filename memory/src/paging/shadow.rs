//! A shadow MMU: a cache of composed translations (guest-virtual →
//! guest-physical → host address) kept coherent with the guest's page
//! tables, and materialized shadow page tables built from it.
//!
//! # The cache
//! [`ShadowMmu`] caches the result of [`walk`] per 4 KiB guest-virtual page
//! and per *address space*: the paging mode, the root and PAE PDPTRs, the
//! PCID, and everything that changes the reserved-bit checks of a walk
//! (EFER.NXE, the CPU features). Access rights are **not** part of the key:
//! a cached entry stores the page's effective U/S, R/W and XD and its
//! protection key, and every lookup re-checks them against the *current*
//! CR0.WP, CR4.SMEP/SMAP, PKRU and PKRS (with the same permission table the
//! walker uses), so changing those needs no flush.
//!
//! A large guest page is cached as one entry per 4 KiB piece that was
//! looked up, each remembering the large page it came from. That keeps the
//! lookup a single probe of a 4-way set-associative array, matches the
//! shadow tables (whose leaves are 4 KiB because the host backing of a large
//! guest page need not be contiguous), and INVLPG still drops every piece of
//! a large page through a reverse map from (space, large page) to entries.
//!
//! Only successful walks are cached; faults always walk again. A write is
//! served from the cache only if the leaf's dirty bit was set when the entry
//! was filled: a page first read is cached clean, and the first write walks
//! again so that the walker sets D (SDM Vol. 3A §4.8). The walk that fills
//! an entry runs in [`WalkMode::Update`], so it has set the accessed bits.
//!
//! # Invalidation (SDM Vol. 3A §4.10.4)
//! - [`ShadowMmu::invlpg`]: the page's entries (any page size) of the
//!   current PCID, and the page's global entries of every PCID.
//! - [`ShadowMmu::load_cr3`]: without CR4.PCIDE, every non-global entry;
//!   with CR4.PCIDE, the non-global entries of the new PCID unless bit 63
//!   (no-flush) is set. Global entries survive (CR4.PGE).
//! - [`ShadowMmu::set_control_regs`] flushes everything (globals included)
//!   when CR0.PG, CR4.PGE, CR4.PAE, CR4.PSE, CR4.LA57, EFER.LME/LMA or
//!   EFER.NXE change, when CR4.PCIDE goes from 1 to 0, or when the CPU
//!   features change; a changed CR3 is a CR3 load. CR0.WP, SMEP, SMAP,
//!   PKE/PKS, PKRU and PKRS need no flush (rights are checked per lookup).
//! - [`ShadowMmu::observe_write`]: a write to guest memory. Each entry
//!   records the guest-physical pages whose paging-structure entries its
//!   walk used; a reverse map from page to entries drops exactly the entries
//!   that depended on a written page.
//! - Memory-map changes: the caller's [`HostMap`] has a generation; when it
//!   changes, every cached host address is resolved again and the shadow
//!   tables are cleared ([`ShadowMmu::memory_map_changed`] forces it).
//!
//! # Shadow page tables
//! With a table area configured ([`ShadowConfig::shadow_area`]),
//! [`ShadowMmu::fault`] fills, for one faulting access, a 4 KiB leaf of
//! long-mode page tables (4-level, or 5-level for a 5-level guest) that map
//! the guest-virtual page straight to its host address with the guest's
//! effective rights: U/S as the guest, XD as the guest, and R/W only if the
//! guest allows writes *and* its leaf is dirty (so the first write faults
//! and [`ShadowMmu::fault`] sets D). Every invalidation above clears the
//! affected leaves; empty tables are reclaimed all at once when the area
//! runs out.
//!
//! A VMM without hardware nested paging runs the guest with CR3 =
//! [`ShadowMmu::shadow_root`] (read it again after every call, it changes
//! with the address space), CR0.WP = 1, EFER.NXE = 1 and the guest's
//! CR4.SMEP/SMAP/PKE and PKRU. On a #PF it calls [`ShadowMmu::fault`]:
//! [`FaultOutcome::Mapped`] resumes the guest, [`FaultOutcome::GuestFault`]
//! injects the guest's own #PF, [`FaultOutcome::Mmio`] emulates a device
//! access and [`FaultOutcome::Emulate`] emulates the one access (a
//! supervisor write the guest allows only because its CR0.WP = 0). It
//! write-protects the guest's page-table pages and reports writes to them
//! with [`ShadowMmu::observe_write`], forwards INVLPG/MOV CR3/MOV CR4, and
//! flushes its own TLB after any invalidation. The area must not be
//! writable by the guest.
//!
//! Everything is bounded: the cache has a fixed capacity (least recently
//! used within each set, timed by walks), every entry depends on at most five table pages and one large
//! page (so the reverse maps hold at most six references per entry), the
//! number of address spaces is capped, and no operation loops over a
//! guest-controlled count.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::context::{bits, ControlRegs, CpuFeatures, PagingContext, PagingError, PagingMode};
use super::walk::{
    is_canonical, walk, Access, AccessKind, PageSize, Privilege, Translation, WalkError, WalkMode,
    A, D, P, RW, US, XD,
};

const PAGE: u64 = 4096;
/// Global bit of a leaf entry.
const G: u64 = 1 << 8;
/// Ways per set of the cache.
const WAYS: usize = 4;
/// Physical-address bits of a shadow entry.
const ADDR: u64 = bits(12, 51);
/// Table pages one shadow path may need (5-level: root plus four).
const MIN_AREA_PAGES: u64 = 5;

/// Final addresses of guest-physical pages: stage 2 of the translation
/// (a VMM's memory map, or a nested-paging view).
pub trait HostMap {
    /// A number that changes whenever an answer of
    /// [`host_page`](HostMap::host_page) may have changed.
    fn generation(&self) -> u64;

    /// The final (host) address of the 4 KiB guest-physical page at
    /// `gpa_page` (4 KiB aligned), or `None` if it is not RAM (MMIO or
    /// nothing). Misaligned answers and answers at or above 2^52 are taken
    /// as `None`.
    fn host_page(&self, gpa_page: u64) -> Option<u64>;
}

/// The identity [`HostMap`] over guest RAM: a guest-physical page is its own
/// final address if all of it is in `memory`, and is not RAM otherwise.
/// Its generation never changes.
#[derive(Debug, Clone, Copy)]
pub struct IdentityMap<'a, M: ?Sized>(pub &'a M);

impl<M: GuestMemory + ?Sized> HostMap for IdentityMap<'_, M> {
    fn generation(&self) -> u64 {
        0
    }

    fn host_page(&self, gpa_page: u64) -> Option<u64> {
        self.0
            .check_range(GuestAddress(gpa_page), PAGE as usize, Permissions::Read)
            .then_some(gpa_page)
    }
}

/// Errors of the shadow MMU.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The cache capacity or the number of address spaces is out of range.
    #[error("invalid shadow MMU size: capacity {capacity} (1..={max_capacity}), spaces {spaces} (1..={max_spaces})")]
    InvalidSize {
        /// The capacity asked for.
        capacity: usize,
        /// The largest capacity.
        max_capacity: usize,
        /// The number of address spaces asked for.
        spaces: usize,
        /// The largest number of address spaces.
        max_spaces: usize,
    },
    /// The shadow table area is misaligned, too small or not writable
    /// memory.
    #[error("shadow table area {base:#x}+{len:#x} must be 4 KiB aligned, writable guest memory of at least {MIN_AREA_PAGES} pages")]
    InvalidArea {
        /// Start of the area.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The control registers do not form a valid paging context.
    #[error("cannot build the paging context: {0}")]
    Context(#[from] PagingError),
    /// The guest walk failed without a page fault (non-canonical address,
    /// unreadable paging structure, contended accessed/dirty update).
    #[error("guest page walk failed: {0}")]
    Walk(#[source] WalkError),
    /// [`ShadowMmu::fault`] was called without a shadow table area.
    #[error("no shadow table area is configured")]
    NoShadowTables,
    /// Even an emptied area cannot hold the tables for one address.
    #[error("shadow table area {base:#x}+{len:#x} cannot hold the tables for {gva:#x}")]
    OutOfShadowSpace {
        /// Start of the area.
        base: u64,
        /// Its length.
        len: u64,
        /// The guest-virtual address being mapped.
        gva: u64,
    },
    /// A write to the shadow table area failed (the memory behind it
    /// changed); the shadow tables are no longer trustworthy.
    #[error("writing shadow table memory at {gpa:#x} failed")]
    ShadowWrite {
        /// Guest-physical address of the failed write.
        gpa: u64,
    },
}

/// Sizing of a [`ShadowMmu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowConfig {
    /// Cached 4 KiB translations (rounded up to a power of two).
    pub capacity: usize,
    /// Address spaces kept at once (least recently used one evicted).
    pub max_spaces: usize,
    /// Guest-physical area (start, length) for the shadow page tables, or
    /// `None` for a translation cache only.
    pub shadow_area: Option<(GuestAddress, u64)>,
}

impl Default for ShadowConfig {
    /// 4096 entries, 8 address spaces, no shadow tables.
    fn default() -> Self {
        ShadowConfig {
            capacity: 4096,
            max_spaces: 8,
            shadow_area: None,
        }
    }
}

impl ShadowConfig {
    /// The largest [`ShadowConfig::capacity`].
    pub const MAX_CAPACITY: usize = 1 << 24;
    /// The largest [`ShadowConfig::max_spaces`].
    pub const MAX_SPACES: usize = 4096;
}

/// A translation served by the [`ShadowMmu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShadowTranslation {
    /// The guest-physical address.
    pub gpa: u64,
    /// The final address of the byte (through the [`HostMap`]), or `None`
    /// if the page is not RAM.
    pub host: Option<u64>,
    /// Size of the guest page that maps it.
    pub page_size: PageSize,
    /// R/W was 1 in every guest entry.
    pub writable: bool,
    /// U/S was 1 in every guest entry.
    pub user: bool,
    /// No guest entry set XD (or EFER.NXE is off).
    pub executable: bool,
    /// The protection key, when protection keys govern the page.
    pub pkey: Option<u8>,
    /// The guest leaf was global (G = 1 with CR4.PGE).
    pub global: bool,
    /// The guest leaf's dirty bit was set when the entry was filled.
    pub dirty: bool,
    /// Served from the cache without a walk.
    pub hit: bool,
}

/// What [`ShadowMmu::fault`] did about a faulting access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The shadow tables now map the page for this access: resume the
    /// guest with CR3 = `shadow_root`.
    Mapped {
        /// Root of the shadow tables of the current address space.
        shadow_root: u64,
        /// The translation now mapped.
        translation: ShadowTranslation,
    },
    /// The guest's own tables refuse the access: inject this #PF.
    GuestFault {
        /// The error code.
        error_code: super::walk::PfErrorCode,
        /// The faulting linear address (CR2).
        address: u64,
    },
    /// The page is not RAM: emulate the access as MMIO at `gpa`.
    Mmio {
        /// The guest-physical address.
        gpa: u64,
    },
    /// The guest allows the access but no shadow entry can express it (a
    /// supervisor write to a read-only page under CR0.WP = 0, or shadow
    /// tables that overlap the guest's tables): emulate this one access.
    /// For the write under CR0.WP = 0 the page is still mapped read-only,
    /// so the guest's other accesses to it do not fault again.
    Emulate {
        /// The translation (the walk has set accessed/dirty bits).
        translation: ShadowTranslation,
    },
}

/// Counters of a [`ShadowMmu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShadowStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that walked the guest tables.
    pub walks: u64,
    /// Entries evicted for capacity.
    pub evictions: u64,
    /// Entries dropped by an invalidation.
    pub invalidations: u64,
    /// Shadow leaves written.
    pub shadow_fills: u64,
    /// Times the shadow tables were emptied (area full, memory map change).
    pub shadow_resets: u64,
}

/// An address space of the cache.
#[derive(Debug)]
struct Space {
    ctx: PagingContext,
    pcid: u16,
    shadow_root: Option<u64>,
    last_use: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    valid: bool,
    space: u16,
    /// Guest-virtual page number (after truncation to 32 bits outside
    /// IA-32e mode).
    vpn: u64,
    last_use: u64,
    gpa_page: u64,
    page_size: PageSize,
    user: bool,
    writable: bool,
    executable: bool,
    /// `user << 2 | writable << 1 | executable`: the column of the
    /// permission table.
    rights: u8,
    dirty: bool,
    global: bool,
    /// Bits 62:59 of the leaf (IA-32e modes), else 0.
    key: u8,
    host: Option<u64>,
    host_epoch: u64,
    /// Table pages the walk used (deduplicated).
    deps: [u64; 5],
    ndeps: u8,
    /// Guest-physical address of the shadow leaf filled for this entry.
    shadow_pte: Option<u64>,
}

const EMPTY: Slot = Slot {
    valid: false,
    space: 0,
    vpn: 0,
    last_use: 0,
    gpa_page: 0,
    page_size: PageSize::Size4K,
    user: false,
    writable: false,
    executable: false,
    rights: 0,
    dirty: false,
    global: false,
    key: 0,
    host: None,
    host_epoch: 0,
    deps: [0; 5],
    ndeps: 0,
    shadow_pte: None,
};

#[derive(Debug)]
struct Area {
    base: u64,
    len: u64,
    free: Vec<u64>,
}

/// One cached entry, as listed by [`ShadowMmu::entries`].
#[derive(Debug, Clone, Copy)]
pub struct CachedEntry<'a> {
    /// The paging context of the entry's address space.
    pub context: &'a PagingContext,
    /// The PCID of the address space.
    pub pcid: u16,
    /// The guest-virtual page (4 KiB aligned).
    pub gva: u64,
    /// The cached translation of the page's first byte (host address
    /// `None` if it must be resolved again after a memory-map change).
    pub translation: ShadowTranslation,
    /// Guest-physical address of the shadow leaf filled for it, if any.
    pub shadow_pte: Option<u64>,
}

/// An address space, as listed by [`ShadowMmu::spaces`].
#[derive(Debug, Clone, Copy)]
pub struct SpaceInfo<'a> {
    /// Its paging context (the latest one used with it).
    pub context: &'a PagingContext,
    /// Its PCID (0 without CR4.PCIDE).
    pub pcid: u16,
    /// Root of its shadow tables, once allocated.
    pub shadow_root: Option<u64>,
    /// Whether it is the current address space.
    pub current: bool,
}

/// A translation cache and shadow page tables for one vCPU (see the
/// [module documentation](self)).
#[derive(Debug)]
pub struct ShadowMmu<'m, M: GuestMemory + ?Sized> {
    memory: &'m M,
    regs: ControlRegs,
    features: CpuFeatures,
    ctx: PagingContext,
    /// [`va_form`] of the current mode.
    va: (u64, u32),
    spaces: Vec<Space>,
    max_spaces: usize,
    cur: u16,
    slots: Vec<Slot>,
    /// Per slot, its (page, space + 1) if valid, else (0, 0): what a probe
    /// compares, kept apart so that a set's four tags share a cache line.
    tags: Vec<(u64, u32)>,
    set_mask: usize,
    tick: u64,
    /// Guest page-table page → entries whose walk used it.
    by_table: HashMap<u64, HashSet<u32>>,
    /// (space, large-page base | size code) → entries from that large page.
    by_region: HashMap<(u16, u64), HashSet<u32>>,
    host_generation: Option<u64>,
    map_epoch: u64,
    area: Option<Area>,
    /// Shadow pages written since the last [`ShadowMmu::settle`].
    pending: Vec<u64>,
    broken: Option<u64>,
    stats: ShadowStats,
}

fn size_code(size: PageSize) -> u64 {
    match size {
        PageSize::Size4K => 0,
        PageSize::Size2M => 1,
        PageSize::Size4M => 2,
        PageSize::Size1G => 3,
    }
}

/// `gva` as the walker of `mode` uses it, or `None` if not canonical.
#[inline]
fn normalize(mode: PagingMode, gva: u64) -> Option<u64> {
    match mode {
        PagingMode::Level4 => is_canonical(gva, 48).then_some(gva),
        PagingMode::Level5 => is_canonical(gva, 57).then_some(gva),
        PagingMode::None | PagingMode::Bits32 | PagingMode::Pae => Some(gva & 0xffff_ffff),
    }
}

/// How [`normalize`] treats addresses in `mode`, as (mask, shift): the
/// address is `gva & mask`, and canonical if sign-extending it from bit
/// `63 - shift` gives it back (shift 0: always).
fn va_form(mode: PagingMode) -> (u64, u32) {
    match mode {
        PagingMode::Level4 => (u64::MAX, 16),
        PagingMode::Level5 => (u64::MAX, 7),
        PagingMode::None | PagingMode::Bits32 | PagingMode::Pae => (0xffff_ffff, 0),
    }
}

/// [`normalize`] with the form of [`va_form`], without a branch on the mode.
#[inline(always)]
fn normalize_with((mask, shift): (u64, u32), gva: u64) -> Option<u64> {
    let g = gva & mask;
    ((((g << shift) as i64) >> shift) as u64 == g).then_some(g)
}

/// Whether two contexts give every walk the same translation (all but the
/// rights checks, which lookups redo).
fn same_shape(a: &PagingContext, b: &PagingContext) -> bool {
    a.mode == b.mode
        && a.root == b.root
        && a.pdptrs == b.pdptrs
        && a.rsvd == b.rsvd
        && a.large == b.large
        && a.addr_mask == b.addr_mask
        && a.nxe == b.nxe
        && a.features == b.features
}

/// The protection-key register governing a page, if any.
#[inline]
fn keys(ctx: &PagingContext, user: bool) -> Option<u32> {
    if user {
        ctx.pke.then_some(ctx.pkru)
    } else {
        ctx.pks.then_some(ctx.pkrs)
    }
}

/// Whether `ctx` lets `access` through the cached entry without a walk
/// (never more than [`walk`] allows; a write to a clean page walks).
#[inline(always)]
fn permits(ctx: &PagingContext, slot: &Slot, access: Access) -> bool {
    let write = access.kind == AccessKind::Write;
    if write && !slot.dirty {
        return false;
    }
    let Some(mask) = ctx.perm.get(access.index()) else {
        return false;
    };
    if mask >> slot.rights & 1 != 0 {
        return false;
    }
    if access.kind != AccessKind::Fetch {
        if let Some(keys) = keys(ctx, slot.user) {
            let key = u32::from(slot.key & 0xf);
            let ad = keys >> (2 * key) & 1 != 0;
            let wd = keys >> (2 * key + 1) & 1 != 0;
            if ad || (wd && write && (access.privilege == Privilege::User || ctx.wp)) {
                return false;
            }
        }
    }
    true
}

impl<'m, M: GuestMemory + ?Sized> ShadowMmu<'m, M> {
    /// CR4.PGE: global pages.
    pub const CR4_PGE: u64 = 1 << 7;
    /// CR4.PCIDE: process-context identifiers.
    pub const CR4_PCIDE: u64 = 1 << 17;
    /// Bit 63 of a `MOV CR3` source with CR4.PCIDE: keep the new PCID's
    /// entries.
    pub const CR3_NO_FLUSH: u64 = 1 << 63;

    /// A shadow MMU for a vCPU with `regs`, walking guest tables in
    /// `memory` (which also holds the shadow table area, if any).
    pub fn new(
        memory: &'m M,
        regs: &ControlRegs,
        features: &CpuFeatures,
        config: &ShadowConfig,
    ) -> Result<Self, ShadowError> {
        let size_err = || ShadowError::InvalidSize {
            capacity: config.capacity,
            max_capacity: ShadowConfig::MAX_CAPACITY,
            spaces: config.max_spaces,
            max_spaces: ShadowConfig::MAX_SPACES,
        };
        if !(1..=ShadowConfig::MAX_CAPACITY).contains(&config.capacity)
            || !(1..=ShadowConfig::MAX_SPACES).contains(&config.max_spaces)
        {
            return Err(size_err());
        }
        let sets = config.capacity.div_ceil(WAYS).next_power_of_two();
        let area = match config.shadow_area {
            None => None,
            Some((GuestAddress(base), len)) => {
                let ok = base % PAGE == 0
                    && len % PAGE == 0
                    && len >= MIN_AREA_PAGES * PAGE
                    && base.checked_add(len).is_some_and(|end| end <= 1 << 52)
                    && usize::try_from(len).is_ok_and(|n| {
                        memory.check_range(GuestAddress(base), n, Permissions::Write)
                    });
                if !ok {
                    return Err(ShadowError::InvalidArea { base, len });
                }
                Some(Area {
                    base,
                    len,
                    free: Vec::new(),
                })
            }
        };
        let mut regs = *regs;
        regs.cr3 &= !Self::CR3_NO_FLUSH;
        let ctx = PagingContext::new(&regs, features)?;
        let mut mmu = ShadowMmu {
            memory,
            regs,
            features: *features,
            va: va_form(ctx.mode),
            ctx,
            spaces: Vec::new(),
            max_spaces: config.max_spaces,
            cur: 0,
            slots: vec![EMPTY; sets * WAYS],
            tags: vec![(0, 0); sets * WAYS],
            set_mask: sets - 1,
            tick: 0,
            by_table: HashMap::new(),
            by_region: HashMap::new(),
            host_generation: None,
            map_epoch: 0,
            area,
            pending: Vec::new(),
            broken: None,
            stats: ShadowStats::default(),
        };
        mmu.reset_shadow();
        mmu.stats.shadow_resets = 0;
        mmu.select_space();
        mmu.settle();
        Ok(mmu)
    }

    /// The current paging context.
    pub fn context(&self) -> &PagingContext {
        &self.ctx
    }

    /// The current control registers.
    pub fn control_regs(&self) -> &ControlRegs {
        &self.regs
    }

    /// The current PCID (CR3 bits 11:0 with CR4.PCIDE, else 0).
    pub fn pcid(&self) -> u16 {
        if self.regs.cr4 & Self::CR4_PCIDE != 0 {
            (self.regs.cr3 & 0xfff) as u16
        } else {
            0
        }
    }

    /// Counters since creation.
    pub fn stats(&self) -> ShadowStats {
        self.stats
    }

    /// Number of cached entries (all address spaces).
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.valid).count()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of entries the cache can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Root of the shadow tables of the current address space (allocated by
    /// the first [`ShadowMmu::fault`] in it).
    pub fn shadow_root(&self) -> Option<u64> {
        self.spaces
            .get(usize::from(self.cur))
            .and_then(|s| s.shadow_root)
    }

    /// The address spaces held.
    pub fn spaces(&self) -> impl Iterator<Item = SpaceInfo<'_>> {
        self.spaces.iter().enumerate().map(|(i, s)| SpaceInfo {
            context: &s.ctx,
            pcid: s.pcid,
            shadow_root: s.shadow_root,
            current: i == usize::from(self.cur),
        })
    }

    /// Every cached entry, of every address space.
    pub fn entries(&self) -> impl Iterator<Item = CachedEntry<'_>> {
        self.slots.iter().filter(|s| s.valid).filter_map(|s| {
            let space = self.spaces.get(usize::from(s.space))?;
            let gva = s.vpn << 12;
            Some(CachedEntry {
                context: &space.ctx,
                pcid: space.pcid,
                gva,
                translation: self.view(&space.ctx, s, gva, false),
                shadow_pte: s.shadow_pte,
            })
        })
    }

    /// The cached translation of `gva` in the current address space, if
    /// any, without checking rights, walking or counting.
    pub fn peek(&self, gva: u64) -> Option<ShadowTranslation> {
        let gva = normalize(self.ctx.mode, gva)?;
        let i = self.find(self.cur, gva >> 12)?;
        let slot = self.slots.get(i)?;
        Some(self.view(&self.ctx, slot, gva, true))
    }

    /// Translates `gva` for `access`: from the cache when an entry allows
    /// the access, else by a walk ([`WalkMode::Update`]) whose success is
    /// cached. Page faults are returned as the walker reports them and are
    /// never cached.
    ///
    /// A hit is a handful of instructions (a set probe and a rights check),
    /// so this is inlined into the caller; a miss calls out of line.
    #[inline(always)]
    pub fn translate<H: HostMap + ?Sized>(
        &mut self,
        host: &H,
        gva: u64,
        access: Access,
    ) -> Result<ShadowTranslation, WalkError> {
        self.sync_host(host);
        if let Some((_, t)) = self.hit(host, gva, access) {
            return Ok(t);
        }
        self.miss(host, gva, access).map(|(_, t)| t)
    }

    fn lookup<H: HostMap + ?Sized>(
        &mut self,
        host: &H,
        gva: u64,
        access: Access,
    ) -> Result<(usize, ShadowTranslation), WalkError> {
        self.sync_host(host);
        if let Some(found) = self.hit(host, gva, access) {
            return Ok(found);
        }
        self.miss(host, gva, access)
    }

    /// The cached entry of `gva` in the current space, if it allows
    /// `access` (see [`permits`]); counts the hit and refreshes the LRU
    /// stamp. Kept small and inlined: it is the whole cost of a hit.
    #[inline(always)]
    fn hit<H: HostMap + ?Sized>(
        &mut self,
        host: &H,
        gva: u64,
        access: Access,
    ) -> Option<(usize, ShadowTranslation)> {
        let g = normalize_with(self.va, gva)?;
        let i = self.find(self.cur, g >> 12)?;
        let slot = self.slots.get_mut(i)?;
        if !permits(&self.ctx, slot, access) {
            return None;
        }
        // The clock advances per walk, not per hit: the stamp says in
        // which interval between walks (the only times an entry can be
        // evicted) the entry was last used, which is all the replacement
        // choice needs up to ties within one interval.
        slot.last_use = self.tick;
        if slot.host_epoch != self.map_epoch {
            refresh_host(host, slot, self.map_epoch);
        }
        self.stats.hits += 1;
        let slot = self.slots.get(i)?;
        Some((i, self.view(&self.ctx, slot, g, true)))
    }

    /// A lookup the cache cannot serve: walks ([`WalkMode::Update`]) and
    /// caches a success.
    #[inline(never)]
    fn miss<H: HostMap + ?Sized>(
        &mut self,
        host: &H,
        gva: u64,
        access: Access,
    ) -> Result<(usize, ShadowTranslation), WalkError> {
        self.tick += 1;
        self.stats.walks += 1;
        let t = walk(&self.ctx, self.memory, gva, access, WalkMode::Update)?;
        let g = normalize(self.ctx.mode, gva).unwrap_or(gva);
        let i = self.insert(host, g, &t);
        self.settle();
        let view = match self.slots.get(i) {
            Some(slot) => self.view(&self.ctx, slot, g, false),
            None => ShadowTranslation {
                gpa: t.gpa,
                host: resolve(host, t.gpa & !(PAGE - 1)).map(|h| h | (t.gpa & (PAGE - 1))),
                page_size: t.page_size,
                writable: t.writable,
                user: t.user,
                executable: t.executable,
                pkey: t.pkey,
                global: false,
                dirty: false,
                hit: false,
            },
        };
        Ok((i, view))
    }

    /// Handles a #PF taken on the shadow tables at `gva` for `access`:
    /// translates through the guest tables and fills the shadow leaf (see
    /// [`FaultOutcome`]).
    pub fn fault<H: HostMap + ?Sized>(
        &mut self,
        host: &H,
        gva: u64,
        access: Access,
    ) -> Result<FaultOutcome, ShadowError> {
        if let Some(gpa) = self.broken {
            return Err(ShadowError::ShadowWrite { gpa });
        }
        if self.area.is_none() {
            return Err(ShadowError::NoShadowTables);
        }
        let (i, t) = match self.lookup(host, gva, access) {
            Ok(found) => found,
            Err(WalkError::PageFault {
                error_code,
                address,
            }) => {
                return Ok(FaultOutcome::GuestFault {
                    error_code,
                    address,
                })
            }
            Err(e) => return Err(ShadowError::Walk(e)),
        };
        if t.host.is_none() {
            return Ok(FaultOutcome::Mmio { gpa: t.gpa });
        }
        if access.kind == AccessKind::Write && !t.writable {
            // The walk may have replaced the page's entry (clearing its
            // leaf): map the page again, read-only, so that only the write
            // is left to emulate and reads do not fault once more.
            self.fill_shadow(i)?;
            self.settle();
            if let Some(gpa) = self.broken {
                return Err(ShadowError::ShadowWrite { gpa });
            }
            return Ok(FaultOutcome::Emulate { translation: t });
        }
        let filled = self.fill_shadow(i)?;
        self.settle();
        if let Some(gpa) = self.broken {
            return Err(ShadowError::ShadowWrite { gpa });
        }
        let still = self
            .slots
            .get(i)
            .is_some_and(|s| s.valid && s.shadow_pte.is_some());
        match (filled, still, self.shadow_root()) {
            (true, true, Some(shadow_root)) => Ok(FaultOutcome::Mapped {
                shadow_root,
                translation: t,
            }),
            _ => Ok(FaultOutcome::Emulate { translation: t }),
        }
    }

    /// `MOV CR3`: loads `cr3` (bit 63 is the PCID no-flush bit), reading
    /// the PDPTEs in PAE paging, and invalidates as described in the
    /// [module documentation](self). On error nothing changes.
    pub fn load_cr3(&mut self, cr3: u64) -> Result<(), ShadowError> {
        let mut regs = self.regs;
        regs.cr3 = cr3;
        let pae = regs.cr0 & ControlRegs::CR0_PG != 0
            && regs.cr4 & ControlRegs::CR4_PAE != 0
            && regs.efer & (ControlRegs::EFER_LME | ControlRegs::EFER_LMA) == 0;
        if pae {
            regs.pdptrs = PagingContext::load_pdptrs(self.memory, cr3)?;
        }
        let features = self.features;
        self.apply(regs, &features, true)
    }

    /// Any other change of the control registers, PKRU/PKRS or CPU features
    /// (`MOV CR0/CR4`, `WRMSR EFER`, `WRPKRU`, ...). A changed CR3 counts as
    /// a CR3 load. On error nothing changes.
    pub fn set_control_regs(
        &mut self,
        regs: &ControlRegs,
        features: &CpuFeatures,
    ) -> Result<(), ShadowError> {
        self.apply(*regs, features, false)
    }

    fn apply(
        &mut self,
        mut regs: ControlRegs,
        features: &CpuFeatures,
        cr3_load: bool,
    ) -> Result<(), ShadowError> {
        let no_flush = regs.cr3 & Self::CR3_NO_FLUSH != 0 && regs.cr4 & Self::CR4_PCIDE != 0;
        regs.cr3 &= !Self::CR3_NO_FLUSH;
        let ctx = PagingContext::new(&regs, features)?;
        let old = self.regs;
        let cr4_all =
            Self::CR4_PGE | ControlRegs::CR4_PAE | ControlRegs::CR4_PSE | ControlRegs::CR4_LA57;
        let efer_all = ControlRegs::EFER_LME | ControlRegs::EFER_LMA | ControlRegs::EFER_NXE;
        let flush_all = *features != self.features
            || (old.cr0 ^ regs.cr0) & ControlRegs::CR0_PG != 0
            || (old.cr4 ^ regs.cr4) & cr4_all != 0
            || (old.cr4 & !regs.cr4) & Self::CR4_PCIDE != 0
            || (old.efer ^ regs.efer) & efer_all != 0;
        let cr3_load = cr3_load || old.cr3 != regs.cr3 || old.pdptrs != regs.pdptrs;
        self.regs = regs;
        self.features = *features;
        self.va = va_form(ctx.mode);
        self.ctx = ctx;
        if flush_all {
            self.flush_all();
        } else if cr3_load && !no_flush {
            self.flush_pcid(self.pcid());
        }
        self.select_space();
        self.settle();
        Ok(())
    }

    /// `INVLPG gva`: drops the page's entries (of any page size) for the
    /// current PCID and its global entries for every PCID.
    pub fn invlpg(&mut self, gva: u64) {
        let pcid = self.pcid();
        let mut victims = Vec::new();
        for (index, space) in self.spaces.iter().enumerate() {
            let Some(g) = normalize(space.ctx.mode, gva) else {
                continue;
            };
            let id = index as u16;
            let all = space.pcid == pcid;
            let mut found: Vec<usize> = self.find(id, g >> 12).into_iter().collect();
            for size in [PageSize::Size2M, PageSize::Size4M, PageSize::Size1G] {
                let key = (id, (g & !(size.bytes() - 1)) | size_code(size));
                if let Some(set) = self.by_region.get(&key) {
                    found.extend(set.iter().map(|&i| i as usize));
                }
            }
            victims.extend(
                found
                    .into_iter()
                    .filter(|&i| all || self.slots.get(i).is_some_and(|s| s.global)),
            );
        }
        for i in victims {
            self.drop_slot(i, true);
        }
        self.settle();
    }

    /// Drops the non-global entries of `pcid` (what a CR3 load does; also
    /// `INVPCID` single-context).
    pub fn flush_pcid(&mut self, pcid: u16) {
        for i in 0..self.slots.len() {
            let drop = self.slots.get(i).is_some_and(|s| {
                s.valid
                    && !s.global
                    && self
                        .spaces
                        .get(usize::from(s.space))
                        .is_none_or(|sp| sp.pcid == pcid)
            });
            if drop {
                self.drop_slot(i, true);
            }
        }
        self.settle();
    }

    /// Drops every entry, global or not, of every address space, and
    /// empties the shadow tables.
    pub fn flush_all(&mut self) {
        let live = self.slots.iter().filter(|s| s.valid).count() as u64;
        self.stats.invalidations += live;
        self.slots.fill(EMPTY);
        self.tags.fill((0, 0));
        self.by_table.clear();
        self.by_region.clear();
        self.reset_shadow();
        self.settle();
    }

    /// Reports a write of `len` bytes at `gpa` to guest memory: drops every
    /// entry whose walk used a paging-structure entry in a written page.
    pub fn observe_write(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> 12;
        let last = gpa.saturating_add(len - 1) >> 12;
        if last - first >= self.by_table.len() as u64 {
            let pages: Vec<u64> = self
                .by_table
                .keys()
                .copied()
                .filter(|&p| (first..=last).contains(&(p >> 12)))
                .collect();
            self.pending.extend(pages);
        } else {
            self.pending.extend((first..=last).map(|p| p << 12));
        }
        self.settle();
    }

    /// Forgets every host address and empties the shadow tables (the
    /// memory map changed); the guest translations stay cached. Lookups do
    /// it by themselves when [`HostMap::generation`] changes, but the shadow
    /// tables are only cleaned then: call this before the guest runs again
    /// on them.
    pub fn memory_map_changed(&mut self) {
        self.map_epoch += 1;
        self.reset_shadow();
        self.settle();
    }

    #[inline(always)]
    fn sync_host<H: HostMap + ?Sized>(&mut self, host: &H) {
        let generation = host.generation();
        if self.host_generation != Some(generation) {
            self.generation_changed(generation);
        }
    }

    #[cold]
    #[inline(never)]
    fn generation_changed(&mut self, generation: u64) {
        if self.host_generation.is_some() {
            self.memory_map_changed();
        }
        self.host_generation = Some(generation);
    }

    #[inline(always)]
    fn view(&self, ctx: &PagingContext, slot: &Slot, gva: u64, hit: bool) -> ShadowTranslation {
        let offset = gva & (PAGE - 1);
        let host = if slot.host_epoch == self.map_epoch {
            slot.host.map(|h| h | offset)
        } else {
            None
        };
        ShadowTranslation {
            gpa: slot.gpa_page | offset,
            host,
            page_size: slot.page_size,
            writable: slot.writable,
            user: slot.user,
            executable: slot.executable,
            pkey: keys(ctx, slot.user).map(|_| slot.key),
            global: slot.global,
            dirty: slot.dirty,
            hit,
        }
    }

    #[inline(always)]
    fn set_of(&self, space: u16, vpn: u64) -> usize {
        let h = (vpn ^ (u64::from(space) << 52)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((h >> 32) as usize & self.set_mask) * WAYS
    }

    #[inline(always)]
    fn find(&self, space: u16, vpn: u64) -> Option<usize> {
        let base = self.set_of(space, vpn);
        let want = (vpn, u32::from(space) + 1);
        let way = self
            .tags
            .get(base..base + WAYS)?
            .iter()
            .position(|&t| t == want)?;
        Some(base + way)
    }

    /// Caches the walk `t` of `gva` (normalized) in the current space,
    /// replacing an older entry for the page or the set's least recently
    /// used one.
    fn insert<H: HostMap + ?Sized>(&mut self, host: &H, gva: u64, t: &Translation) -> usize {
        let vpn = gva >> 12;
        let base = self.set_of(self.cur, vpn);
        let victim = match self.find(self.cur, vpn) {
            Some(i) => {
                self.drop_slot(i, false);
                i
            }
            None => {
                let slots = self.slots.get(base..base + WAYS).unwrap_or_default();
                let way = slots
                    .iter()
                    .position(|s| !s.valid)
                    .or_else(|| {
                        slots
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, s)| s.last_use)
                            .map(|(w, _)| w)
                    })
                    .unwrap_or(0);
                let i = base + way;
                if self.slots.get(i).is_some_and(|s| s.valid) {
                    self.stats.evictions += 1;
                    self.drop_slot(i, false);
                }
                i
            }
        };
        let leaf = t.entries.leaf().map_or(P | RW | US | A | D, |e| e.value);
        let long = self.ctx.mode.is_long();
        let mut slot = Slot {
            valid: true,
            space: self.cur,
            vpn,
            last_use: self.tick,
            gpa_page: t.gpa & !(PAGE - 1),
            page_size: t.page_size,
            user: t.user,
            writable: t.writable,
            executable: t.executable,
            rights: u8::from(t.user) << 2 | u8::from(t.writable) << 1 | u8::from(t.executable),
            dirty: leaf & D != 0,
            global: self.regs.cr4 & Self::CR4_PGE != 0 && leaf & G != 0,
            key: if long { ((leaf >> 59) & 0xf) as u8 } else { 0 },
            host: resolve(host, t.gpa & !(PAGE - 1)),
            host_epoch: self.map_epoch,
            deps: [0; 5],
            ndeps: 0,
            shadow_pte: None,
        };
        for entry in t.entries.iter() {
            let page = entry.gpa & !(PAGE - 1);
            let n = usize::from(slot.ndeps);
            if !slot.deps.iter().take(n).any(|&d| d == page) {
                if let Some(d) = slot.deps.get_mut(n) {
                    *d = page;
                    slot.ndeps += 1;
                }
            }
        }
        let id = victim as u32;
        for &page in slot.deps.iter().take(usize::from(slot.ndeps)) {
            self.by_table.entry(page).or_default().insert(id);
        }
        if t.page_size != PageSize::Size4K {
            let region = (gva & !(t.page_size.bytes() - 1)) | size_code(t.page_size);
            self.by_region
                .entry((self.cur, region))
                .or_default()
                .insert(id);
        }
        if let (Some(s), Some(tag)) = (self.slots.get_mut(victim), self.tags.get_mut(victim)) {
            *s = slot;
            *tag = (vpn, u32::from(self.cur) + 1);
        }
        victim
    }

    /// Removes entry `i` from the cache, the reverse maps and the shadow
    /// tables.
    fn drop_slot(&mut self, i: usize, invalidation: bool) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if !slot.valid {
            return;
        }
        slot.valid = false;
        let slot = *slot;
        if let Some(tag) = self.tags.get_mut(i) {
            *tag = (0, 0);
        }
        if invalidation {
            self.stats.invalidations += 1;
        }
        let id = i as u32;
        for &page in slot.deps.iter().take(usize::from(slot.ndeps)) {
            if let Some(set) = self.by_table.get_mut(&page) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_table.remove(&page);
                }
            }
        }
        if slot.page_size != PageSize::Size4K {
            let base = (slot.vpn << 12) & !(slot.page_size.bytes() - 1);
            let key = (slot.space, base | size_code(slot.page_size));
            if let Some(set) = self.by_region.get_mut(&key) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_region.remove(&key);
                }
            }
        }
        if let Some(pte) = slot.shadow_pte {
            self.shadow_store(pte, 0);
        }
    }

    /// Drops the entries that depend on the pages written, including pages
    /// the shadow code wrote itself (in case guest tables overlap the area).
    /// Ends: every round drops a valid entry or empties the list.
    fn settle(&mut self) {
        while let Some(page) = self.pending.pop() {
            if let Some(set) = self.by_table.remove(&page) {
                for i in set {
                    self.drop_slot(i as usize, true);
                }
            }
        }
    }

    /// Makes the current context's address space current, creating it (and
    /// evicting the least recently used one) if needed.
    fn select_space(&mut self) {
        self.tick += 1;
        let pcid = self.pcid();
        let found = self
            .spaces
            .iter()
            .position(|s| s.pcid == pcid && same_shape(&s.ctx, &self.ctx));
        let index = match found {
            Some(i) => i,
            None if self.spaces.len() < self.max_spaces => {
                self.spaces.push(Space {
                    ctx: self.ctx.clone(),
                    pcid,
                    shadow_root: None,
                    last_use: 0,
                });
                self.spaces.len() - 1
            }
            None => {
                let i = self
                    .spaces
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.last_use)
                    .map_or(0, |(i, _)| i);
                let id = i as u16;
                for j in 0..self.slots.len() {
                    if self.slots.get(j).is_some_and(|s| s.valid && s.space == id) {
                        self.drop_slot(j, true);
                    }
                }
                self.settle();
                let root = self.spaces.get_mut(i).and_then(|s| s.shadow_root.take());
                if let (Some(root), Some(area)) = (root, self.area.as_mut()) {
                    area.free.push(root);
                }
                if let Some(s) = self.spaces.get_mut(i) {
                    s.pcid = pcid;
                }
                i
            }
        };
        if let Some(space) = self.spaces.get_mut(index) {
            space.ctx = self.ctx.clone();
            space.last_use = self.tick;
        }
        self.cur = index as u16;
    }

    fn shadow_store(&mut self, gpa: u64, value: u64) {
        if self
            .memory
            .store(value.to_le(), GuestAddress(gpa), Ordering::Release)
            .is_err()
        {
            self.broken.get_or_insert(gpa);
        }
        self.pending.push(gpa & !(PAGE - 1));
    }

    fn alloc(&mut self) -> Option<u64> {
        let page = self.area.as_mut()?.free.pop()?;
        if self
            .memory
            .write_slice(&[0u8; PAGE as usize], GuestAddress(page))
            .is_err()
        {
            self.broken.get_or_insert(page);
        }
        self.pending.push(page);
        Some(page)
    }

    /// Empties the shadow tables: every leaf reference is forgotten, the
    /// roots are zeroed and every other page of the area is free again.
    fn reset_shadow(&mut self) {
        let Some(area) = self.area.as_mut() else {
            return;
        };
        self.stats.shadow_resets += 1;
        for slot in self.slots.iter_mut() {
            slot.shadow_pte = None;
        }
        let roots: HashSet<u64> = self.spaces.iter().filter_map(|s| s.shadow_root).collect();
        let pages = area.len / PAGE;
        let base = area.base;
        area.free.clear();
        area.free.extend(
            (0..pages)
                .rev()
                .map(|i| base + i * PAGE)
                .filter(|p| !roots.contains(p)),
        );
        for root in roots {
            if self
                .memory
                .write_slice(&[0u8; PAGE as usize], GuestAddress(root))
                .is_err()
            {
                self.broken.get_or_insert(root);
            }
            self.pending.push(root);
        }
    }

    /// Writes the shadow leaf of entry `i`; `false` if the entry
    /// cannot be expressed (no host page).
    fn fill_shadow(&mut self, i: usize) -> Result<bool, ShadowError> {
        let Some(slot) = self.slots.get(i).copied() else {
            return Ok(false);
        };
        let Some(host) = slot.host.filter(|_| slot.valid) else {
            return Ok(false);
        };
        let (base, len) = match &self.area {
            Some(a) => (a.base, a.len),
            None => return Err(ShadowError::NoShadowTables),
        };
        let space = usize::from(slot.space);
        let levels: u32 = match self.spaces.get(space).map(|s| s.ctx.mode) {
            Some(PagingMode::Level5) => 5,
            _ => 4,
        };
        let gva = slot.vpn << 12;
        let mut leaf = host | P | A | D;
        if slot.writable && slot.dirty {
            leaf |= RW;
        }
        if slot.user {
            leaf |= US;
        }
        if !slot.executable {
            leaf |= XD;
        }
        leaf |= u64::from(slot.key & 0xf) << 59;
        let in_area = |t: u64| t >= base && t - base < len;
        'attempt: for _ in 0..2 {
            let root = match self.spaces.get(space).and_then(|s| s.shadow_root) {
                Some(root) => root,
                None => {
                    let Some(root) = self.alloc() else {
                        self.reset_shadow();
                        continue;
                    };
                    if let Some(s) = self.spaces.get_mut(space) {
                        s.shadow_root = Some(root);
                    }
                    root
                }
            };
            let mut table = root;
            for level in (2..=levels).rev() {
                let at = table + ((gva >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
                let entry = self
                    .memory
                    .load::<u64>(GuestAddress(at), Ordering::Acquire)
                    .map(u64::from_le)
                    .unwrap_or(0);
                table = if entry & P != 0 {
                    let next = entry & ADDR;
                    if !in_area(next) {
                        // Not a table of ours (the area was written by
                        // someone else): start over from empty tables.
                        self.reset_shadow();
                        continue 'attempt;
                    }
                    next
                } else {
                    let Some(new) = self.alloc() else {
                        self.reset_shadow();
                        continue 'attempt;
                    };
                    self.shadow_store(at, new | P | RW | US | A);
                    new
                };
            }
            let pte = table + ((gva >> 12) & 0x1ff) * 8;
            self.shadow_store(pte, leaf);
            if let Some(s) = self.slots.get_mut(i) {
                s.shadow_pte = Some(pte);
            }
            self.stats.shadow_fills += 1;
            return Ok(true);
        }
        Err(ShadowError::OutOfShadowSpace { base, len, gva })
    }
}

/// Resolves the host address of `slot` again (the memory map changed since
/// it was filled).
#[cold]
#[inline(never)]
fn refresh_host<H: HostMap + ?Sized>(host: &H, slot: &mut Slot, epoch: u64) {
    slot.host = resolve(host, slot.gpa_page);
    slot.host_epoch = epoch;
}

/// The host page of `gpa_page`, with invalid answers taken as not RAM.
#[inline]
fn resolve<H: HostMap + ?Sized>(host: &H, gpa_page: u64) -> Option<u64> {
    host.host_page(gpa_page)
        .filter(|h| h % PAGE == 0 && *h < 1 << 52)
}
