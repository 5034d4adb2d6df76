//! The shadow MMU: one test per invalidation rule and per A/D rule over
//! hand-built tables, and a property over random operation sequences: after
//! every operation each cached entry equals a fresh walk, and the shadow
//! tables never map more than a fresh walk allows.
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::collections::BTreeSet;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    walk, Access, AccessKind, ControlRegs, CpuFeatures, FaultOutcome, HostMap, PageFlags, PageSize,
    PageTableBuilder, PagingContext, Privilege, ShadowConfig, ShadowMmu, TableFormat, WalkError,
    WalkMode,
};

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const XD: u64 = 1 << 63;

// Space A: PML4 → PDPT → PD → PT / PT2; space B has its own PML4 sharing
// A's PDPT (like a shared kernel half).
const PML4_A: u64 = 0x1000;
const PML4_B: u64 = 0x7000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const PT2: u64 = 0x5000;
/// pml4 0, pdpt 1, pd 1, pt 3: a non-global 4 KiB page.
const GVA_N: u64 = 0x4020_3000;
/// The next page, global.
const GVA_G: u64 = GVA_N + 0x1000;
/// pd 2 (through PT2), pt 3.
const GVA_Q: u64 = GVA_N + 0x20_0000;
/// pd 3: a 2 MiB page.
const GVA_L: u64 = 0x4060_0000;
const PTE_N: u64 = PT + 3 * 8;
const PTE_G: u64 = PT + 4 * 8;
const PTE_Q: u64 = PT2 + 3 * 8;
const PDE_L: u64 = PD + 3 * 8;
const DATA_N: u64 = 0x10_0000;
const DATA_G: u64 = 0x10_1000;
const DATA_Q: u64 = 0x10_2000;
const DATA_L: u64 = 0x60_0000;
const SHADOW: u64 = 0x80_0000;
const MMIO: u64 = 0xf0_0000;

const R: Privilege = Privilege::Supervisor;
const U: Privilege = Privilege::User;

/// Guest-physical pages at or above `MMIO` are not RAM; the others move
/// to `gpa + salt << 32` (so that host addresses differ from guest ones).
struct TestMap {
    generation: Cell<u64>,
    salt: Cell<u64>,
}

impl TestMap {
    fn new() -> Self {
        TestMap {
            generation: Cell::new(0),
            salt: Cell::new(1),
        }
    }

    fn remap(&self, salt: u64) {
        self.salt.set(salt);
        self.generation.set(self.generation.get() + 1);
    }
}

impl HostMap for TestMap {
    fn generation(&self) -> u64 {
        self.generation.get()
    }

    fn host_page(&self, gpa_page: u64) -> Option<u64> {
        let salt = self.salt.get();
        let hole = salt == 3 && (gpa_page >> 12) % 5 == 0;
        (gpa_page < MMIO && !hole).then(|| gpa_page + (salt << 32))
    }
}

fn put(mem: &GuestMemoryMmap, at: u64, value: u64) {
    mem.write_obj(value, GuestAddress(at)).unwrap();
}

fn get(mem: &GuestMemoryMmap, at: u64) -> u64 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

fn tables() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let table = P | RW | US;
    put(&mem, PML4_A, PDPT | table);
    put(&mem, PML4_B, PDPT | table);
    put(&mem, PDPT + 8, PD | table);
    put(&mem, PD + 8, PT | table);
    put(&mem, PD + 16, PT2 | table);
    put(&mem, PTE_N, DATA_N | P | RW | US);
    put(&mem, PTE_G, DATA_G | P | RW | US | G);
    put(&mem, PTE_Q, DATA_Q | P | RW | US);
    put(&mem, PDE_L, DATA_L | P | RW | US | PS);
    mem
}

fn regs(cr3: u64, cr4: u64) -> ControlRegs {
    ControlRegs {
        cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG | ControlRegs::CR0_WP,
        cr3,
        cr4: ControlRegs::CR4_PAE | cr4,
        efer: ControlRegs::EFER_LME | ControlRegs::EFER_LMA | ControlRegs::EFER_NXE,
        ..ControlRegs::default()
    }
}

type Mmu<'m> = ShadowMmu<'m, GuestMemoryMmap>;

fn mmu_with(mem: &GuestMemoryMmap, cr4: u64, config: ShadowConfig) -> Mmu<'_> {
    ShadowMmu::new(mem, &regs(PML4_A, cr4), &CpuFeatures::default(), &config).unwrap()
}

fn mmu(mem: &GuestMemoryMmap, cr4: u64) -> Mmu<'_> {
    let config = ShadowConfig {
        shadow_area: Some((GuestAddress(SHADOW), 64 * 4096)),
        ..ShadowConfig::default()
    };
    mmu_with(mem, cr4, config)
}

fn read(mmu: &mut Mmu<'_>, map: &TestMap, gva: u64) -> u64 {
    mmu.translate(map, gva, Access::read(U)).unwrap().gpa
}

/// The pcid-tagged, page-aligned addresses cached in any space.
fn cached(mmu: &Mmu<'_>) -> BTreeSet<(u16, u64)> {
    mmu.entries().map(|e| (e.pcid, e.gva)).collect()
}

/// Walks the shadow tables of the current space for `access`.
fn shadow_walk(
    mmu: &Mmu<'_>,
    mem: &GuestMemoryMmap,
    gva: u64,
    access: Access,
) -> Result<vmkit_memory::paging::Translation, WalkError> {
    let root = mmu.shadow_root().unwrap();
    let ctx = PagingContext::new(&regs(root, 0), &CpuFeatures::default()).unwrap();
    walk(&ctx, mem, gva, access, WalkMode::Probe)
}

#[test]
fn miss_walks_sets_accessed_then_hits() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    let t = mmu.translate(&map, GVA_N + 0x123, Access::read(U)).unwrap();
    assert!(!t.hit);
    assert_eq!(t.gpa, DATA_N + 0x123);
    assert_eq!(t.host, Some(DATA_N + 0x123 + (1 << 32)));
    assert!(!t.dirty, "a read leaves the leaf clean");
    // The filling walk set A in every entry it used, and not D.
    for at in [PML4_A, PDPT + 8, PD + 8, PTE_N] {
        assert_ne!(get(&mem, at) & A, 0, "A at {at:#x}");
    }
    assert_eq!(get(&mem, PTE_N) & D, 0);
    let t = mmu.translate(&map, GVA_N + 0x456, Access::read(U)).unwrap();
    assert!(t.hit);
    assert_eq!(t.gpa, DATA_N + 0x456);
    assert_eq!((mmu.stats().hits, mmu.stats().walks), (1, 1));
}

#[test]
fn write_to_clean_leaf_walks_again_and_sets_dirty() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    read(&mut mmu, &map, GVA_N);
    let t = mmu.translate(&map, GVA_N, Access::write(U)).unwrap();
    assert!(!t.hit, "a write through a clean entry must walk");
    assert!(t.dirty);
    assert_ne!(get(&mem, PTE_N) & D, 0, "the walk set D");
    assert!(mmu.translate(&map, GVA_N, Access::write(U)).unwrap().hit);
    // A dirty entry also serves reads.
    assert!(mmu.translate(&map, GVA_N, Access::read(U)).unwrap().hit);
}

#[test]
fn faults_are_not_cached() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    put(&mem, PTE_N, 0);
    let err = mmu.translate(&map, GVA_N, Access::read(U)).unwrap_err();
    assert_eq!(err.pf_error_code().unwrap().bits(), 0b100);
    assert!(mmu.is_empty());
    put(&mem, PTE_N, DATA_N | P | RW | US);
    mmu.observe_write(PTE_N, 8);
    assert_eq!(read(&mut mmu, &map, GVA_N), DATA_N);
    // A protection fault on a cached page walks (and faults) every time.
    put(&mem, PTE_G, DATA_G | P | RW | G);
    mmu.observe_write(PTE_G, 8);
    mmu.translate(&map, GVA_G, Access::read(R)).unwrap();
    for _ in 0..2 {
        let err = mmu.translate(&map, GVA_G, Access::read(U)).unwrap_err();
        assert_eq!(err.pf_error_code().unwrap().bits(), 0b101);
    }
    assert_eq!(mmu.stats().hits, 0);
}

#[test]
fn rights_are_checked_against_the_current_context() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    // A read-only, already dirty supervisor page.
    put(&mem, PTE_N, DATA_N | P | US | A | D);
    let mut r = regs(PML4_A, 0);
    r.cr0 &= !ControlRegs::CR0_WP;
    mmu.set_control_regs(&r, &CpuFeatures::default()).unwrap();
    mmu.translate(&map, GVA_N, Access::write(R)).unwrap();
    assert!(mmu.translate(&map, GVA_N, Access::write(R)).unwrap().hit);
    // CR0.WP = 1: no flush, but the cached entry no longer allows the write.
    mmu.set_control_regs(&regs(PML4_A, 0), &CpuFeatures::default())
        .unwrap();
    assert!(mmu.peek(GVA_N).is_some());
    let err = mmu.translate(&map, GVA_N, Access::write(R)).unwrap_err();
    assert_eq!(err.pf_error_code().unwrap().bits(), 0b011);
    // SMAP: supervisor reads of the user page fault, with EFLAGS.AC they pass.
    let r = regs(PML4_A, ControlRegs::CR4_SMAP);
    mmu.set_control_regs(&r, &CpuFeatures::default()).unwrap();
    assert!(mmu.translate(&map, GVA_N, Access::read(R)).is_err());
    assert!(
        mmu.translate(&map, GVA_N, Access::read(R).with_ac(true))
            .unwrap()
            .hit
    );
}

#[test]
fn invlpg_drops_only_that_page() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    read(&mut mmu, &map, GVA_N);
    read(&mut mmu, &map, GVA_Q);
    // The guest remaps N without the write being observed, then INVLPGs.
    put(&mem, PTE_N, 0x20_0000 | P | RW | US);
    assert_eq!(read(&mut mmu, &map, GVA_N), DATA_N, "stale until INVLPG");
    mmu.invlpg(GVA_N + 0x800);
    assert!(mmu.peek(GVA_N).is_none());
    assert!(mmu.peek(GVA_Q).is_some(), "other pages stay");
    assert_eq!(read(&mut mmu, &map, GVA_N), 0x20_0000);
}

#[test]
fn invlpg_drops_every_piece_of_a_large_page() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    assert_eq!(read(&mut mmu, &map, GVA_L + 0x1000), DATA_L + 0x1000);
    assert_eq!(read(&mut mmu, &map, GVA_L + 0x1f_f000), DATA_L + 0x1f_f000);
    let t = mmu.peek(GVA_L + 0x1000).unwrap();
    assert_eq!(t.page_size, PageSize::Size2M);
    assert_eq!(mmu.len(), 2);
    mmu.invlpg(GVA_L + 0x10_0000);
    assert!(mmu.is_empty());
}

#[test]
fn cr3_load_keeps_globals_only_with_pge() {
    let mem = tables();
    let map = TestMap::new();
    let pge = ShadowMmu::<GuestMemoryMmap>::CR4_PGE;
    let mut mmu = mmu(&mem, pge);
    read(&mut mmu, &map, GVA_N);
    read(&mut mmu, &map, GVA_G);
    assert!(mmu.peek(GVA_G).unwrap().global);
    mmu.load_cr3(PML4_B).unwrap();
    assert_eq!(cached(&mmu), BTreeSet::from([(0, GVA_G)]));
    mmu.load_cr3(PML4_A).unwrap();
    assert!(mmu.peek(GVA_N).is_none());
    assert!(mmu.peek(GVA_G).unwrap().global);
    // Reloading the same CR3 flushes non-global entries too.
    read(&mut mmu, &map, GVA_N);
    mmu.load_cr3(PML4_A).unwrap();
    assert!(mmu.peek(GVA_N).is_none());

    // Without CR4.PGE the G bit means nothing.
    let mut mmu = self::mmu(&mem, 0);
    read(&mut mmu, &map, GVA_G);
    assert!(!mmu.peek(GVA_G).unwrap().global);
    mmu.load_cr3(PML4_A).unwrap();
    assert!(mmu.is_empty());
}

#[test]
fn pge_toggle_and_mode_changes_flush_everything() {
    let mem = tables();
    let map = TestMap::new();
    let pge = ShadowMmu::<GuestMemoryMmap>::CR4_PGE;
    let mut mmu = mmu(&mem, pge);
    read(&mut mmu, &map, GVA_G);
    read(&mut mmu, &map, GVA_N);
    mmu.set_control_regs(&regs(PML4_A, 0), &CpuFeatures::default())
        .unwrap();
    assert!(mmu.is_empty(), "CR4.PGE 1 -> 0 drops globals");
    read(&mut mmu, &map, GVA_N);
    let mut r = regs(PML4_A, 0);
    r.efer &= !ControlRegs::EFER_NXE;
    mmu.set_control_regs(&r, &CpuFeatures::default()).unwrap();
    assert!(mmu.is_empty(), "EFER.NXE changes the reserved bits");
    read(&mut mmu, &map, GVA_N);
    mmu.flush_all();
    assert!(mmu.is_empty());
    // A failed change leaves everything as it was.
    read(&mut mmu, &map, GVA_N);
    let mut bad = regs(PML4_A, 0);
    bad.cr4 &= !ControlRegs::CR4_PAE;
    assert!(mmu.set_control_regs(&bad, &CpuFeatures::default()).is_err());
    assert!(mmu.peek(GVA_N).is_some());
}

#[test]
fn pcid_no_flush_keeps_entries_and_invlpg_reaches_globals() {
    let mem = tables();
    let map = TestMap::new();
    let pcide = ShadowMmu::<GuestMemoryMmap>::CR4_PCIDE | ShadowMmu::<GuestMemoryMmap>::CR4_PGE;
    let no_flush = ShadowMmu::<GuestMemoryMmap>::CR3_NO_FLUSH;
    let mut mmu = mmu_with(&mem, 0, ShadowConfig::default());
    mmu.set_control_regs(&regs(PML4_A | 1, pcide), &CpuFeatures::default())
        .unwrap();
    assert_eq!(mmu.pcid(), 1);
    read(&mut mmu, &map, GVA_N);
    read(&mut mmu, &map, GVA_Q);
    read(&mut mmu, &map, GVA_G);
    // Switch to PCID 2 and back, both without flushing.
    mmu.load_cr3(PML4_B | 2 | no_flush).unwrap();
    read(&mut mmu, &map, GVA_N);
    mmu.load_cr3(PML4_A | 1 | no_flush).unwrap();
    assert!(mmu.translate(&map, GVA_N, Access::read(U)).unwrap().hit);
    assert_eq!(mmu.len(), 4);
    // INVLPG in PCID 1: N of PCID 1 goes, N of PCID 2 stays.
    mmu.invlpg(GVA_N);
    assert_eq!(
        cached(&mmu),
        BTreeSet::from([(1, GVA_Q), (1, GVA_G), (2, GVA_N)])
    );
    // INVLPG of a global page from PCID 2 reaches PCID 1's global entry.
    mmu.load_cr3(PML4_B | 2 | no_flush).unwrap();
    mmu.invlpg(GVA_G);
    assert_eq!(cached(&mmu), BTreeSet::from([(1, GVA_Q), (2, GVA_N)]));
    // A flushing load of PCID 1 drops PCID 1's entries only.
    mmu.load_cr3(PML4_A | 1).unwrap();
    assert_eq!(cached(&mmu), BTreeSet::from([(2, GVA_N)]));
    // Clearing CR4.PCIDE flushes everything.
    mmu.set_control_regs(&regs(PML4_A, 0), &CpuFeatures::default())
        .unwrap();
    assert!(mmu.is_empty());
}

#[test]
fn table_write_drops_exactly_the_dependents() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    for gva in [GVA_N, GVA_G, GVA_Q, GVA_L] {
        read(&mut mmu, &map, gva);
    }
    mmu.observe_write(0x30_0000, 4096);
    mmu.observe_write(DATA_N, 4096);
    assert_eq!(mmu.len(), 4, "writes to data pages change nothing");
    mmu.observe_write(PT2 + 0xff8, 8);
    assert_eq!(
        cached(&mmu),
        BTreeSet::from([(0, GVA_N), (0, GVA_G), (0, GVA_L)])
    );
    mmu.observe_write(PT + 0x10, 16);
    assert_eq!(cached(&mmu), BTreeSet::from([(0, GVA_L)]));
    // A write spanning several pages, one of them the PD.
    read(&mut mmu, &map, GVA_N);
    mmu.observe_write(PD - 8, 4096 + 16);
    assert!(mmu.is_empty());
    // A huge write range is cheap and still exact.
    read(&mut mmu, &map, GVA_Q);
    mmu.observe_write(0, u64::MAX);
    assert!(mmu.is_empty());
}

#[test]
fn memory_map_change_rereads_host_addresses() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    assert!(matches!(
        mmu.fault(&map, GVA_N, Access::read(U)).unwrap(),
        FaultOutcome::Mapped { .. }
    ));
    assert_eq!(
        shadow_walk(&mmu, &mem, GVA_N, Access::read(U)).unwrap().gpa,
        DATA_N + (1 << 32)
    );
    map.remap(5);
    let t = mmu.translate(&map, GVA_N + 8, Access::read(U)).unwrap();
    assert!(t.hit, "the guest translation survives");
    assert_eq!(t.host, Some(DATA_N + 8 + (5 << 32)));
    assert!(
        shadow_walk(&mmu, &mem, GVA_N, Access::read(U)).is_err(),
        "shadow leaves with old host addresses are gone"
    );
    mmu.fault(&map, GVA_N, Access::read(U)).unwrap();
    assert_eq!(
        shadow_walk(&mmu, &mem, GVA_N, Access::read(U)).unwrap().gpa,
        DATA_N + (5 << 32)
    );
}

#[test]
fn shadow_tables_follow_the_guest() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    assert!(shadow_walk_root_missing(&mmu));
    let out = mmu.fault(&map, GVA_N + 0x10, Access::read(U)).unwrap();
    let FaultOutcome::Mapped { shadow_root, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(Some(shadow_root), mmu.shadow_root());
    assert!((SHADOW..SHADOW + 64 * 4096).contains(&shadow_root));
    let s = shadow_walk(&mmu, &mem, GVA_N + 0x10, Access::read(U)).unwrap();
    assert_eq!(s.gpa, DATA_N + 0x10 + (1 << 32));
    assert!(s.user && s.executable);
    assert!(!s.writable, "clean leaf: mapped read-only");
    let err = shadow_walk(&mmu, &mem, GVA_N, Access::write(U)).unwrap_err();
    assert_eq!(err.pf_error_code().unwrap().bits(), 0b111);
    // The write fault sets the guest's D and makes the shadow writable.
    mmu.fault(&map, GVA_N, Access::write(U)).unwrap();
    assert_ne!(get(&mem, PTE_N) & D, 0);
    assert!(
        shadow_walk(&mmu, &mem, GVA_N, Access::write(U))
            .unwrap()
            .writable
    );
    // XD and supervisor-only pages keep their rights in the shadow.
    put(&mem, PTE_Q, DATA_Q | P | RW | XD);
    mmu.observe_write(PTE_Q, 8);
    mmu.fault(&map, GVA_Q, Access::read(R)).unwrap();
    let s = shadow_walk(&mmu, &mem, GVA_Q, Access::read(R)).unwrap();
    assert!(!s.user && !s.executable);
    // A page-table write clears the dependent shadow leaves.
    put(&mem, PTE_N, 0);
    mmu.observe_write(PTE_N, 8);
    let err = shadow_walk(&mmu, &mem, GVA_N, Access::read(U)).unwrap_err();
    assert_eq!(err.pf_error_code().unwrap().bits(), 0b100);
    assert!(shadow_walk(&mmu, &mem, GVA_Q, Access::read(R)).is_ok());
    // The guest's own fault is reported for injection.
    assert_eq!(
        mmu.fault(&map, GVA_N, Access::read(U)).unwrap(),
        FaultOutcome::GuestFault {
            error_code: vmkit_memory::paging::PfErrorCode::USER,
            address: GVA_N
        }
    );
    // INVLPG clears the leaf too.
    mmu.invlpg(GVA_Q);
    assert!(shadow_walk(&mmu, &mem, GVA_Q, Access::read(R)).is_err());
}

fn shadow_walk_root_missing(mmu: &Mmu<'_>) -> bool {
    mmu.shadow_root().is_none()
}

#[test]
fn mmio_and_wp0_writes_are_left_to_the_caller() {
    let mem = tables();
    let map = TestMap::new();
    let mut mmu = mmu(&mem, 0);
    put(&mem, PTE_N, MMIO | P | RW | US);
    assert_eq!(
        mmu.fault(&map, GVA_N + 4, Access::read(U)).unwrap(),
        FaultOutcome::Mmio { gpa: MMIO + 4 }
    );
    let mut r = regs(PML4_A, 0);
    r.cr0 &= !ControlRegs::CR0_WP;
    mmu.set_control_regs(&r, &CpuFeatures::default()).unwrap();
    put(&mem, PTE_Q, DATA_Q | P | US);
    let out = mmu.fault(&map, GVA_Q, Access::write(R)).unwrap();
    assert!(matches!(out, FaultOutcome::Emulate { translation } if translation.gpa == DATA_Q));
    assert_ne!(
        get(&mem, PTE_Q) & D,
        0,
        "the walk set D for the emulated write"
    );
}

#[test]
fn shadow_area_is_recycled_when_full() {
    let mem = tables();
    let map = TestMap::new();
    let config = ShadowConfig {
        capacity: 64,
        max_spaces: 2,
        shadow_area: Some((GuestAddress(SHADOW), 5 * 4096)),
    };
    let mut mmu = mmu_with(&mem, 0, config);
    // 5 pages hold one path plus one spare table: pages under different
    // PDPTEs need a reset each time.
    let mut gvas = Vec::new();
    for i in 0..4u64 {
        let pdpt = PD + 0x1000 * (i + 10);
        put(&mem, PDPT + 8 * (i + 4), pdpt | P | RW | US);
        put(&mem, pdpt, (PT2 + 0x1000 * (i + 1)) | P | RW | US);
        put(
            &mem,
            PT2 + 0x1000 * (i + 1),
            (DATA_Q + 0x1000 * i) | P | RW | US,
        );
        gvas.push((i + 4) << 30);
    }
    for &gva in &gvas {
        assert!(matches!(
            mmu.fault(&map, gva, Access::read(U)).unwrap(),
            FaultOutcome::Mapped { .. }
        ));
        assert!(shadow_walk(&mmu, &mem, gva, Access::read(U)).is_ok());
    }
    assert!(mmu.stats().shadow_resets >= 2);
    let filled: usize = mmu.entries().filter(|e| e.shadow_pte.is_some()).count();
    assert_eq!(filled, 1, "only the last leaf survives the resets");
}

#[test]
fn capacity_and_spaces_are_bounded() {
    let mem = tables();
    let map = TestMap::new();
    let config = ShadowConfig {
        capacity: 8,
        max_spaces: 2,
        shadow_area: None,
    };
    let mut mmu = mmu_with(&mem, 0, config);
    assert_eq!(mmu.capacity(), 8);
    for i in 0..512u64 {
        mmu.translate(&map, GVA_L + i * 4096, Access::read(U))
            .unwrap();
        assert!(mmu.len() <= 8);
    }
    assert!(mmu.stats().evictions >= 504);
    // Three address spaces through two slots (PCIDs keep them apart).
    let pcide = ShadowMmu::<GuestMemoryMmap>::CR4_PCIDE;
    let no_flush = ShadowMmu::<GuestMemoryMmap>::CR3_NO_FLUSH;
    mmu.set_control_regs(&regs(PML4_A | 1, pcide), &CpuFeatures::default())
        .unwrap();
    for pcid in 1..=3u64 {
        mmu.load_cr3(PML4_A | pcid | no_flush).unwrap();
        read(&mut mmu, &map, GVA_N);
    }
    assert_eq!(mmu.spaces().count(), 2);
    assert_eq!(
        cached(&mmu),
        BTreeSet::from([(2, GVA_N), (3, GVA_N)]),
        "the least recently used space was evicted with its entries"
    );
    assert!(matches!(
        mmu.fault(&map, GVA_N, Access::read(U)),
        Err(vmkit_memory::paging::ShadowError::NoShadowTables)
    ));
}

#[test]
fn invalid_configurations_are_refused() {
    let mem = tables();
    let r = regs(PML4_A, 0);
    let f = CpuFeatures::default();
    for config in [
        ShadowConfig {
            capacity: 0,
            ..ShadowConfig::default()
        },
        ShadowConfig {
            max_spaces: 0,
            ..ShadowConfig::default()
        },
        ShadowConfig {
            shadow_area: Some((GuestAddress(SHADOW + 8), 8 * 4096)),
            ..ShadowConfig::default()
        },
        ShadowConfig {
            shadow_area: Some((GuestAddress(SHADOW), 4 * 4096)),
            ..ShadowConfig::default()
        },
        ShadowConfig {
            shadow_area: Some((GuestAddress(15 << 20), 2 << 20)),
            ..ShadowConfig::default()
        },
    ] {
        assert!(ShadowMmu::new(&mem, &r, &f, &config).is_err(), "{config:?}");
    }
}

// ---------------------------------------------------------------------
// The property.

const AREA_A: u64 = 0x10_0000;
const AREA_B: u64 = 0x14_0000;
const AREA_LEN: u64 = 0x4_0000;
/// Guest-virtual pages used: two 2 MiB regions, in the low and high half.
const WINDOW: [u64; 2] = [0x7f_0000_0000, 0xffff_8000_0020_0000];
const TARGET: u64 = 0x40_0000;

#[derive(Debug, Clone)]
enum Op {
    Map {
        space: usize,
        page: u16,
        large: bool,
        target: u16,
        flags: u8,
    },
    Unmap {
        space: usize,
        page: u16,
        large: bool,
    },
    Protect {
        space: usize,
        page: u16,
        large: bool,
        flags: u8,
    },
    Invlpg(u16),
    SwitchCr3 {
        space: usize,
        no_flush: bool,
    },
    Remap(u8),
    Lookup {
        page: u16,
        offset: u16,
        access: u8,
    },
    Fault {
        page: u16,
        access: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Mostly a few pages at the start of each region, so that operations
    // meet the same pages again.
    let page = prop_oneof![4 => 0u16..6, 4 => 512u16..518, 1 => 0u16..1024];
    prop_oneof![
        4 => (0usize..2, page.clone(), prop::bool::weighted(0.2), 0u16..1024, any::<u8>())
            .prop_map(|(space, page, large, target, flags)| Op::Map { space, page, large, target, flags }),
        1 => (0usize..2, page.clone(), prop::bool::weighted(0.2))
            .prop_map(|(space, page, large)| Op::Unmap { space, page, large }),
        2 => (0usize..2, page.clone(), prop::bool::weighted(0.2), any::<u8>())
            .prop_map(|(space, page, large, flags)| Op::Protect { space, page, large, flags }),
        1 => page.clone().prop_map(Op::Invlpg),
        1 => (0usize..2, any::<bool>()).prop_map(|(space, no_flush)| Op::SwitchCr3 { space, no_flush }),
        1 => any::<u8>().prop_map(Op::Remap),
        6 => (page.clone(), 0u16..4096, 0u8..18).prop_map(|(page, offset, access)| Op::Lookup { page, offset, access }),
        4 => (page, 0u8..18).prop_map(|(page, access)| Op::Fault { page, access }),
    ]
}

fn gva_of(page: u16, large: bool) -> u64 {
    let page = u64::from(page);
    let base = WINDOW[(page >> 9) as usize & 1];
    if large {
        base
    } else {
        base + (page & 511) * 4096
    }
}

fn flags_of(bits: u8) -> PageFlags {
    PageFlags {
        writable: bits & 1 != 0,
        user: bits & 2 != 0,
        executable: bits & 4 != 0,
        pkey: (bits >> 3) & 3,
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0u8; 2 * AREA_LEN as usize];
    mem.read_slice(&mut bytes, GuestAddress(AREA_A)).unwrap();
    bytes
}

/// Reports every table page the builder changed.
fn report_writes(mmu: &mut Mmu<'_>, before: &[u8], after: &[u8]) {
    for (i, (old, new)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
        if old != new {
            mmu.observe_write(AREA_A + 4096 * i as u64, 4096);
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    pcid: bool,
    pge: bool,
    cr4_extra: u8,
    capacity: usize,
    shadow_pages: u64,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        any::<bool>(),
        0u8..8,
        prop::sample::select(vec![4usize, 16, 512]),
        prop::sample::select(vec![5u64, 12, 64]),
        prop::collection::vec(op(), 1..48),
    )
        .prop_map(|(pcid, pge, cr4_extra, capacity, shadow_pages, ops)| Case {
            pcid,
            pge,
            cr4_extra,
            capacity,
            shadow_pages,
            ops,
        })
}

struct Machine {
    regs: [ControlRegs; 2],
}

/// The context a VMM would run the guest in on the shadow tables at `root`:
/// the guest's SMEP, SMAP, PKE and PKRU, always CR0.WP and EFER.NXE.
fn shadow_ctx(root: u64, base: &ControlRegs) -> PagingContext {
    let mut r = regs(
        root,
        base.cr4 & (ControlRegs::CR4_SMEP | ControlRegs::CR4_SMAP | ControlRegs::CR4_PKE),
    );
    r.pkru = base.pkru;
    PagingContext::new(&r, &CpuFeatures::default()).unwrap()
}

/// The invariant: every cached entry equals a fresh walk of its space, and
/// the shadow tables of every space map no more than a fresh walk.
fn check(
    mmu: &Mmu<'_>,
    mem: &GuestMemoryMmap,
    map: &TestMap,
    touched: &BTreeSet<u64>,
) -> Result<(), TestCaseError> {
    // Rights are compared in contexts without SMEP/SMAP/PKE, where a
    // supervisor read faults only on absent pages and reserved bits.
    let probe = Access::read(Privilege::Supervisor);
    let neutral = |root: u64| PagingContext::new(&regs(root, 0), &CpuFeatures::default()).unwrap();
    let pke = mmu.control_regs().cr4 & ControlRegs::CR4_PKE != 0;
    for e in mmu.entries() {
        let fresh = walk(
            &neutral(e.context.root()),
            mem,
            e.gva,
            probe,
            WalkMode::Probe,
        );
        let Ok(fresh) = fresh else {
            return Err(TestCaseError::fail(format!(
                "cached {:#x} (pcid {}) but a fresh walk gives {fresh:?}",
                e.gva, e.pcid
            )));
        };
        let t = e.translation;
        prop_assert_eq!(
            (t.gpa, t.page_size, t.writable, t.user, t.executable),
            (
                fresh.gpa,
                fresh.page_size,
                fresh.writable,
                fresh.user,
                fresh.executable
            ),
            "entry {:#x}",
            e.gva
        );
        let leaf = fresh.entries.leaf().unwrap().value;
        let key = (pke && t.user).then_some(((leaf >> 59) & 0xf) as u8);
        prop_assert_eq!(t.pkey, key);
        prop_assert!(!t.dirty || leaf & D != 0, "cached dirty, leaf clean");
        for entry in fresh.entries.iter() {
            prop_assert!(entry.value & A != 0, "entry without A: {:?}", entry);
        }
        if let Some(host) = t.host {
            prop_assert_eq!(Some(host), map.host_page(fresh.gpa));
        }
    }
    for space in mmu.spaces() {
        let Some(root) = space.shadow_root else {
            continue;
        };
        let sctx = neutral(root);
        for &gva in touched {
            let Ok(s) = walk(&sctx, mem, gva, probe, WalkMode::Probe) else {
                continue;
            };
            let fresh = walk(
                &neutral(space.context.root()),
                mem,
                gva,
                probe,
                WalkMode::Probe,
            );
            let Ok(fresh) = fresh else {
                return Err(TestCaseError::fail(format!(
                    "shadow maps {gva:#x} (pcid {}) but a fresh walk gives {fresh:?}",
                    space.pcid
                )));
            };
            let dirty = fresh.entries.leaf().unwrap().value & D != 0;
            prop_assert_eq!(
                Some(s.gpa),
                map.host_page(fresh.gpa & !0xfff).map(|h| h | (gva & 0xfff))
            );
            prop_assert!(!s.writable || (fresh.writable && dirty), "shadow writable");
            prop_assert_eq!(s.user, fresh.user);
            prop_assert!(!s.executable || fresh.executable, "shadow executable");
            let leaf = fresh.entries.leaf().unwrap().value;
            let key = s.entries.leaf().unwrap().value >> 59 & 0xf;
            prop_assert!(
                !pke || !fresh.user || key == leaf >> 59 & 0xf,
                "shadow pkey"
            );
        }
    }
    Ok(())
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let map = TestMap::new();
    let mut builders = [
        PageTableBuilder::new(&mem, TableFormat::Level4, GuestAddress(AREA_A), AREA_LEN).unwrap(),
        PageTableBuilder::new(&mem, TableFormat::Level4, GuestAddress(AREA_B), AREA_LEN).unwrap(),
    ];
    let mut cr4 = 0;
    if case.pcid {
        cr4 |= ShadowMmu::<GuestMemoryMmap>::CR4_PCIDE;
    }
    if case.pge {
        cr4 |= ShadowMmu::<GuestMemoryMmap>::CR4_PGE;
    }
    if case.cr4_extra & 1 != 0 {
        cr4 |= ControlRegs::CR4_SMEP;
    }
    if case.cr4_extra & 2 != 0 {
        cr4 |= ControlRegs::CR4_SMAP;
    }
    if case.cr4_extra & 4 != 0 {
        cr4 |= ControlRegs::CR4_PKE;
    }
    let machine = Machine {
        regs: [0, 1].map(|i| {
            let mut r = builders[i].control_regs().unwrap();
            r.cr4 |= cr4;
            if case.pcid {
                r.cr3 |= i as u64 + 1;
            }
            r.pkru = 0b0110_0100;
            r
        }),
    };
    let config = ShadowConfig {
        capacity: case.capacity,
        max_spaces: 4,
        shadow_area: Some((GuestAddress(SHADOW), case.shadow_pages * 4096)),
    };
    let features = CpuFeatures::default();
    let mut mmu = ShadowMmu::new(&mem, &machine.regs[0], &features, &config).unwrap();
    let mut current = 0usize;
    let mut touched = BTreeSet::new();
    for op in &case.ops {
        match *op {
            Op::Map {
                space,
                page,
                large,
                target,
                flags,
            } => {
                let size = if large {
                    PageSize::Size2M
                } else {
                    PageSize::Size4K
                };
                let gpa = if large {
                    TARGET + (u64::from(target) & 1) * (2 << 20)
                } else {
                    TARGET + u64::from(target) * 4096
                };
                let before = snapshot(&mem);
                let _ = builders[space].map(gva_of(page, large), gpa, size, flags_of(flags));
                report_writes(&mut mmu, &before, &snapshot(&mem));
            }
            Op::Unmap { space, page, large } => {
                let size = if large {
                    PageSize::Size2M
                } else {
                    PageSize::Size4K
                };
                let before = snapshot(&mem);
                let _ = builders[space].unmap(gva_of(page, large), size);
                report_writes(&mut mmu, &before, &snapshot(&mem));
            }
            Op::Protect {
                space,
                page,
                large,
                flags,
            } => {
                let size = if large {
                    PageSize::Size2M
                } else {
                    PageSize::Size4K
                };
                let before = snapshot(&mem);
                let _ = builders[space].protect(gva_of(page, large), size, flags_of(flags));
                report_writes(&mut mmu, &before, &snapshot(&mem));
            }
            Op::Invlpg(page) => mmu.invlpg(gva_of(page, false)),
            Op::SwitchCr3 { space, no_flush } => {
                let mut cr3 = machine.regs[space].cr3;
                if no_flush && case.pcid {
                    cr3 |= ShadowMmu::<GuestMemoryMmap>::CR3_NO_FLUSH;
                }
                mmu.load_cr3(cr3).unwrap();
                current = space;
            }
            Op::Remap(salt) => {
                map.remap(u64::from(salt % 4));
                // The VMM reports the change before the guest runs again
                // (lookups would also notice the new generation).
                mmu.memory_map_changed();
            }
            Op::Lookup {
                page,
                offset,
                access,
            } => {
                let gva = gva_of(page, false) + u64::from(offset);
                touched.insert(gva & !0xfff);
                let access = Access::from_index(usize::from(access));
                let ctx = PagingContext::new(&machine.regs[current], &features).unwrap();
                let fresh = walk(&ctx, &mem, gva, access, WalkMode::Probe);
                let got = mmu.translate(&map, gva, access);
                match (&got, &fresh) {
                    (Ok(t), Ok(f)) => {
                        prop_assert_eq!(
                            (t.gpa, t.page_size, t.writable, t.user, t.executable, t.pkey),
                            (f.gpa, f.page_size, f.writable, f.user, f.executable, f.pkey)
                        );
                        prop_assert_eq!(
                            t.host,
                            map.host_page(f.gpa & !0xfff).map(|h| h | (gva & 0xfff))
                        );
                        // A write through the cache leaves the leaf dirty.
                        let after = walk(&ctx, &mem, gva, access, WalkMode::Probe).unwrap();
                        let leaf = after.entries.leaf().unwrap().value;
                        prop_assert!(
                            access.kind != AccessKind::Write || leaf & D != 0,
                            "write left D clear"
                        );
                    }
                    (Err(e), Err(f)) => prop_assert_eq!(e.pf_error_code(), f.pf_error_code()),
                    _ => {
                        return Err(TestCaseError::fail(format!(
                            "{gva:#x} {access:?}: cache {got:?}, walk {fresh:?}"
                        )))
                    }
                }
            }
            Op::Fault { page, access } => {
                let gva = gva_of(page, false) + ((8 * u64::from(page)) & 0xfff);
                touched.insert(gva & !0xfff);
                let access = Access::from_index(usize::from(access));
                let ctx = PagingContext::new(&machine.regs[current], &features).unwrap();
                let fresh = walk(&ctx, &mem, gva, access, WalkMode::Probe);
                let out = mmu.fault(&map, gva, access).unwrap();
                match (out, &fresh) {
                    (
                        FaultOutcome::GuestFault {
                            error_code,
                            address,
                        },
                        Err(f),
                    ) => {
                        prop_assert_eq!(Some(error_code), f.pf_error_code());
                        prop_assert_eq!(address, gva);
                    }
                    (
                        FaultOutcome::Mapped {
                            shadow_root,
                            translation,
                        },
                        Ok(f),
                    ) => {
                        prop_assert_eq!(translation.gpa, f.gpa);
                        // The shadow now lets the same access through.
                        let sctx = shadow_ctx(shadow_root, &machine.regs[current]);
                        let s = walk(&sctx, &mem, gva, access, WalkMode::Probe);
                        prop_assert!(s.is_ok(), "mapped but the shadow refuses: {:?}", s);
                    }
                    (FaultOutcome::Mmio { gpa }, Ok(f)) => {
                        prop_assert_eq!(gpa, f.gpa);
                        prop_assert_eq!(map.host_page(gpa & !0xfff), None);
                    }
                    (FaultOutcome::Emulate { translation }, Ok(f)) => {
                        prop_assert_eq!(translation.gpa, f.gpa)
                    }
                    (out, fresh) => {
                        return Err(TestCaseError::fail(format!(
                            "{gva:#x} {access:?}: {out:?} vs {fresh:?}"
                        )))
                    }
                }
            }
        }
        check(&mmu, &mem, &map, &touched)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn cache_and_shadow_agree_with_fresh_walks(case in case()) {
        run_case(&case)?;
    }
}
