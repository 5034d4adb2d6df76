//! The stage-2 translation cache of two-dimensional walks ([`Stage2Tlb`],
//! [`walk_2d_cached`]): hits and misses, the accessed/dirty rules,
//! contexts, invalidation, and a model test against the uncached
//! [`walk_2d`] on a second copy of memory.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    walk_2d, walk_2d_cached, Access, CpuFeatures, EptBuilder, EptCapabilities, EptContext,
    EptFlags, NestedTranslation, NestedWalkError, NptBuilder, NptContext, NptFlags, NptHost,
    PageFlags, PageSize, PageTableBuilder, PagingContext, Privilege, Stage2Access, Stage2Context,
    Stage2Tlb, TableFormat, WalkMode,
};

const MEM: usize = 16 << 20;
/// Guest tables (guest-physical = host-physical: stage 2 maps them 1:1).
const G_TABLES: u64 = 0x10_0000;
/// Stage-2 tables (host-physical).
const S2_TABLES: u64 = 0x20_0000;
/// Guest data pages (guest-physical), mapped by stage 2 to `H_DATA`.
const G_DATA: u64 = 0x40_0000;
const H_DATA: u64 = 0x60_0000;
/// A second host range for remapping.
const H_OTHER: u64 = 0x80_0000;
/// Guest-virtual pages: `PAGES` 4 KiB pages from `GVA`.
const GVA: u64 = 0x7f12_3456_0000;
const PAGES: u64 = 16;

const SUP: Privilege = Privilege::Supervisor;
const EPT_A: u64 = 1 << 8;
const EPT_D: u64 = 1 << 9;
const NPT_D: u64 = 1 << 6;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Ept { ad: bool },
    Npt,
}

const KINDS: [Kind; 3] = [Kind::Ept { ad: true }, Kind::Ept { ad: false }, Kind::Npt];

struct Setup {
    mem: GuestMemoryMmap,
    guest: PagingContext,
    stage2: Stage2Context,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

/// Guest pages `GVA + i * 4 KiB` -> `G_DATA + i * 4 KiB` (page 1 read-only,
/// page 2 supervisor-only, the rest user read-write); stage 2 maps the
/// guest tables and its own tables 1:1 and `G_DATA` -> `H_DATA` in 4 KiB pages, with `data`
/// rights for the data pages.
fn setup_with(kind: Kind, data: (EptFlags, NptFlags)) -> Setup {
    let mem = memory();
    let mut g = PageTableBuilder::new(&mem, TableFormat::Level4, GuestAddress(G_TABLES), 0x10_0000)
        .unwrap();
    for i in 0..PAGES {
        let flags = PageFlags {
            writable: i != 1,
            user: i != 2,
            ..PageFlags::default()
        };
        g.map(GVA + (i << 12), G_DATA + (i << 12), PageSize::Size4K, flags)
            .unwrap();
    }
    let guest = PagingContext::new(&g.control_regs().unwrap(), &CpuFeatures::default()).unwrap();
    let stage2 = match kind {
        Kind::Ept { ad } => {
            let mut s = EptBuilder::new(&mem, false, GuestAddress(S2_TABLES), 0x10_0000).unwrap();
            for page in (G_TABLES..S2_TABLES + 0x10_0000).step_by(4096) {
                s.map(page, page, PageSize::Size4K, EptFlags::default())
                    .unwrap();
            }
            for i in 0..PAGES {
                s.map(
                    G_DATA + (i << 12),
                    H_DATA + (i << 12),
                    PageSize::Size4K,
                    data.0,
                )
                .unwrap();
            }
            Stage2Context::Ept(EptContext::new(s.eptp(ad), &EptCapabilities::default()).unwrap())
        }
        Kind::Npt => {
            let mut s = NptBuilder::new(&mem, false, GuestAddress(S2_TABLES), 0x10_0000).unwrap();
            for page in (G_TABLES..S2_TABLES + 0x10_0000).step_by(4096) {
                s.map(page, page, PageSize::Size4K, NptFlags::default())
                    .unwrap();
            }
            for i in 0..PAGES {
                s.map(
                    G_DATA + (i << 12),
                    H_DATA + (i << 12),
                    PageSize::Size4K,
                    data.1,
                )
                .unwrap();
            }
            Stage2Context::Npt(NptContext::new(s.ncr3(), &NptHost::default()).unwrap())
        }
    };
    Setup { mem, guest, stage2 }
}

fn setup(kind: Kind) -> Setup {
    setup_with(kind, (EptFlags::default(), NptFlags::default()))
}

/// A byte-for-byte copy of `mem`.
fn copy(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    let other = memory();
    let mut buf = vec![0u8; MEM];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    other.write_slice(&buf, GuestAddress(0)).unwrap();
    other
}

fn same_memory(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
    let (mut x, mut y) = (vec![0u8; MEM], vec![0u8; MEM]);
    a.read_slice(&mut x, GuestAddress(0)).unwrap();
    b.read_slice(&mut y, GuestAddress(0)).unwrap();
    x == y
}

/// The tables of both stages and the data pages are the same.
fn same_tables(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
    let (mut x, mut y) = (vec![0u8; 0x20_0000], vec![0u8; 0x20_0000]);
    a.read_slice(&mut x, GuestAddress(G_TABLES)).unwrap();
    b.read_slice(&mut y, GuestAddress(G_TABLES)).unwrap();
    x == y && get(a, H_DATA) == get(b, H_DATA)
}

fn get(mem: &GuestMemoryMmap, at: u64) -> u64 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

fn put(mem: &GuestMemoryMmap, at: u64, value: u64) {
    mem.write_obj(value, GuestAddress(at)).unwrap();
}

/// What the issue compares: everything but the statistics and the
/// stage-2 entry list (see the module documentation of `nested_tlb`).
fn essence(r: &Result<NestedTranslation, NestedWalkError>) -> String {
    match r {
        Ok(t) => {
            let mut s2 = t.stage2;
            s2.entries = Default::default();
            format!("ok {:#x} {:?} {:?}", t.hpa, t.stage1, s2)
        }
        Err(e) => format!("err {e:?}"),
    }
}

fn cached(
    s: &Setup,
    tlb: &mut Stage2Tlb,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> Result<NestedTranslation, NestedWalkError> {
    walk_2d_cached(&s.guest, &s.stage2, &s.mem, tlb, gva, access, mode)
}

/// The stage-2 leaf entry (host address) mapping `gpa`.
fn stage2_leaf(s: &Setup, gpa: u64) -> u64 {
    s.stage2
        .translate(&s.mem, gpa, Stage2Access::TableRead, None, WalkMode::Probe)
        .unwrap()
        .entries
        .leaf()
        .unwrap()
        .gpa
}

// A warm walk reads the four guest entries and nothing of stage 2; the
// first walk misses all five stage-2 lookups; both agree with walk_2d.
#[test]
fn warm_walk_hits_every_stage2_lookup() {
    for kind in KINDS {
        for mode in [WalkMode::Update, WalkMode::Probe] {
            let s = setup(kind);
            let reference = copy(&s.mem);
            let r = Setup {
                mem: reference,
                guest: s.guest.clone(),
                stage2: s.stage2.clone(),
            };
            // A/D set first, so that probes may fill too.
            let read = Access::read(SUP);
            walk_2d(&s.guest, &s.stage2, &s.mem, GVA, read, WalkMode::Update).unwrap();
            walk_2d(&r.guest, &r.stage2, &r.mem, GVA, read, WalkMode::Update).unwrap();
            let mut tlb = Stage2Tlb::new();
            let first = cached(&s, &mut tlb, GVA + 8, read, mode);
            assert_eq!(tlb.stats().misses, 5, "{kind:?} {mode:?}");
            assert_eq!(tlb.stats().fills, 5, "{kind:?} {mode:?}");
            let warm = cached(&s, &mut tlb, GVA + 8, read, mode);
            assert_eq!(tlb.stats().hits, 5, "{kind:?} {mode:?}");
            let expected = walk_2d(&r.guest, &r.stage2, &r.mem, GVA + 8, read, mode);
            assert_eq!(essence(&first), essence(&expected));
            assert_eq!(essence(&warm), essence(&expected));
            let warm = warm.unwrap();
            assert_eq!(warm.hpa, H_DATA + 8);
            assert_eq!(warm.stats.stage1_reads, 4);
            assert_eq!(warm.stats.references(), 4, "{kind:?} {mode:?}");
            assert_eq!(expected.unwrap().stats.references(), 24);
            assert!(same_memory(&s.mem, &r.mem));
        }
    }
}

// A write through a data page cached clean (by a read) goes slow, sets the
// stage-2 dirty flag as walk_2d does, and then hits.
#[test]
fn write_through_clean_entry_goes_slow_and_sets_dirty() {
    for (kind, d) in [(Kind::Ept { ad: true }, EPT_D), (Kind::Npt, NPT_D)] {
        let s = setup(kind);
        let r = copy(&s.mem);
        let mut tlb = Stage2Tlb::new();
        let gva = GVA + (3 << 12);
        let leaf = stage2_leaf(&s, G_DATA + (3 << 12));
        cached(&s, &mut tlb, gva, Access::read(SUP), WalkMode::Update).unwrap();
        walk_2d(
            &s.guest,
            &s.stage2,
            &r,
            gva,
            Access::read(SUP),
            WalkMode::Update,
        )
        .unwrap();
        assert_eq!(get(&s.mem, leaf) & d, 0, "{kind:?}: a read sets no D");
        let misses = tlb.stats().misses;
        let w = cached(&s, &mut tlb, gva, Access::write(SUP), WalkMode::Update).unwrap();
        // The guest tables (four reads, the guest D update) hit, the final
        // address did not.
        assert_eq!(tlb.stats().misses, misses + 1, "{kind:?}");
        assert!(w.stats.stage2_writes >= 1, "{kind:?}");
        assert_ne!(get(&s.mem, leaf) & d, 0, "{kind:?}: the slow path set D");
        let expected = walk_2d(
            &s.guest,
            &s.stage2,
            &r,
            gva,
            Access::write(SUP),
            WalkMode::Update,
        )
        .unwrap();
        assert_eq!(essence(&Ok(w)), essence(&Ok(expected)));
        assert!(same_memory(&s.mem, &r), "{kind:?}");
        // Now cached dirty: a second write hits all five lookups.
        let again = cached(&s, &mut tlb, gva, Access::write(SUP), WalkMode::Update).unwrap();
        assert_eq!(again.stats.references(), 4, "{kind:?}");
    }
}

// A probe does not fill what has no accessed flag, nor allow an update
// write that would have to set D.
#[test]
fn probe_fills_only_what_has_accessed_flags() {
    for kind in [Kind::Ept { ad: true }, Kind::Npt] {
        let s = setup(kind);
        let mut tlb = Stage2Tlb::new();
        cached(&s, &mut tlb, GVA, Access::read(SUP), WalkMode::Probe).unwrap();
        assert_eq!(tlb.stats().fills, 0, "{kind:?}");
        assert_eq!(tlb.valid_entries(), 0);
        // EPT without A/D has no flags to wait for.
        let s = setup(Kind::Ept { ad: false });
        cached(&s, &mut tlb, GVA, Access::read(SUP), WalkMode::Probe).unwrap();
        assert_eq!(tlb.stats().fills, 5);
    }
}

// A different EPTP (other root, or A/D enabled) or nCR3 never hits.
#[test]
fn another_context_misses() {
    let s = setup(Kind::Ept { ad: false });
    // A second EPT over the same memory mapping the data elsewhere.
    let mut other = EptBuilder::new(&s.mem, false, GuestAddress(0xa0_0000), 0x10_0000).unwrap();
    for page in (G_TABLES..G_TABLES + 0x10_0000).step_by(4096) {
        other
            .map(page, page, PageSize::Size4K, EptFlags::default())
            .unwrap();
    }
    for i in 0..PAGES {
        other
            .map(
                G_DATA + (i << 12),
                H_OTHER + (i << 12),
                PageSize::Size4K,
                EptFlags::default(),
            )
            .unwrap();
    }
    let other = Stage2Context::Ept(
        EptContext::new(other.eptp(false), &EptCapabilities::default()).unwrap(),
    );
    let mut tlb = Stage2Tlb::new();
    // Probes: no guest A/D update that could hit in the cache.
    let read = Access::read(SUP);
    let probe = WalkMode::Probe;
    assert_eq!(cached(&s, &mut tlb, GVA, read, probe).unwrap().hpa, H_DATA);
    assert_eq!(tlb.stats().fills, 5);
    let t = walk_2d_cached(&s.guest, &other, &s.mem, &mut tlb, GVA, read, probe).unwrap();
    assert_eq!(t.hpa, H_OTHER);
    assert_eq!(tlb.stats().hits, 0);
    assert_eq!(tlb.stats().flushes, 1);
    assert_eq!(tlb.valid_entries(), 5);
    // Back: another flush, the first context's answer.
    let t = cached(&s, &mut tlb, GVA, read, probe).unwrap();
    assert_eq!(
        (t.hpa, tlb.stats().hits, tlb.stats().flushes),
        (H_DATA, 0, 2)
    );
    // Same root, A/D now enabled: another context too.
    let Stage2Context::Ept(ept) = &s.stage2 else {
        unreachable!()
    };
    let ad = Stage2Context::Ept(
        EptContext::new(
            ept.root() | 3 << 3 | 6 | EptContext::EPTP_AD,
            ept.capabilities(),
        )
        .unwrap(),
    );
    walk_2d_cached(&s.guest, &ad, &s.mem, &mut tlb, GVA, read, probe).unwrap();
    assert_eq!(tlb.stats().hits, 0);
    assert_eq!(tlb.stats().flushes, 3);
    // And an NPT context with the same root number.
    let npt = Stage2Context::Npt(NptContext::new(ept.root(), &NptHost::default()).unwrap());
    let _ = walk_2d_cached(&s.guest, &npt, &s.mem, &mut tlb, GVA, read, probe);
    assert_eq!(tlb.stats().hits, 0);
    assert_eq!(tlb.stats().flushes, 4);
}

// After a stage-2 edit without invalidation the cache may answer from the
// old entry (as a TLB would); after the invalidation it agrees with
// walk_2d. Both for a range invalidation and a flush.
#[test]
fn stale_until_invalidated() {
    for kind in KINDS {
        for by_range in [true, false] {
            let s = setup(kind);
            let mut tlb = Stage2Tlb::new();
            let read = Access::read(SUP);
            let gva = GVA + (5 << 12);
            let gpa = G_DATA + (5 << 12);
            cached(&s, &mut tlb, gva, read, WalkMode::Update).unwrap();
            // Remap the page to H_OTHER behind the cache's back.
            let leaf = stage2_leaf(&s, gpa);
            put(&s.mem, leaf, get(&s.mem, leaf) - H_DATA + H_OTHER);
            let fresh = walk_2d(&s.guest, &s.stage2, &s.mem, gva, read, WalkMode::Update).unwrap();
            assert_eq!(fresh.hpa, H_OTHER + (5 << 12));
            let stale = cached(&s, &mut tlb, gva, read, WalkMode::Update).unwrap();
            assert_eq!(
                stale.hpa,
                H_DATA + (5 << 12),
                "{kind:?}: stale, as documented"
            );
            if by_range {
                // A range elsewhere does not help; the page's range does.
                tlb.invalidate_gpa_range(gpa + 4096, 4096);
                let still = cached(&s, &mut tlb, gva, read, WalkMode::Update).unwrap();
                assert_eq!(still.hpa, H_DATA + (5 << 12));
                tlb.invalidate_gpa_range(gpa + 0xff0, 0x10);
            } else {
                tlb.flush();
            }
            let t = cached(&s, &mut tlb, gva, read, WalkMode::Update);
            assert_eq!(essence(&t), essence(&Ok(fresh)), "{kind:?}");
            // Taking write permission away: after invalidation, the write
            // faults like walk_2d's.
            let write = Access::write(SUP);
            cached(&s, &mut tlb, gva, write, WalkMode::Update).unwrap();
            let leaf_value = get(&s.mem, leaf);
            put(&s.mem, leaf, leaf_value & !2);
            tlb.invalidate_gpa_range(0, u64::MAX);
            let t = cached(&s, &mut tlb, gva, write, WalkMode::Update);
            let expected = walk_2d(&s.guest, &s.stage2, &s.mem, gva, write, WalkMode::Update);
            assert!(expected.as_ref().unwrap_err().stage2_fault().is_some());
            assert_eq!(essence(&t), essence(&expected), "{kind:?}");
        }
    }
}

// Faults are reported as walk_2d reports them: a stage-2 write-protected
// data page, an execute-only page (EPT), an NX page (NPT).
#[test]
fn faults_match_walk_2d() {
    let ro = (
        EptFlags {
            write: false,
            execute: false,
            ..EptFlags::default()
        },
        NptFlags {
            writable: false,
            executable: false,
        },
    );
    let xo = (
        EptFlags {
            read: false,
            write: false,
            ..EptFlags::default()
        },
        NptFlags::default(),
    );
    for kind in KINDS {
        for data in [ro, xo] {
            let s = setup_with(kind, data);
            let r = copy(&s.mem);
            let mut tlb = Stage2Tlb::new();
            for round in 0..3 {
                for index in 0..Access::COUNT {
                    let access = Access::from_index(index);
                    for page in 0..4 {
                        let gva = GVA + (page << 12);
                        for mode in [WalkMode::Update, WalkMode::Probe] {
                            let a = cached(&s, &mut tlb, gva, access, mode);
                            let b = walk_2d(&s.guest, &s.stage2, &r, gva, access, mode);
                            assert_eq!(essence(&a), essence(&b), "{kind:?} {round} {access:?}");
                        }
                    }
                }
            }
            assert!(same_memory(&s.mem, &r), "{kind:?}");
            assert!(tlb.stats().hits > 0);
        }
    }
}

// A guest A/D update into a frame holding stage-2 entries a cached
// translation used empties the cache (rule 6): here the guest's page table
// is the EPT's own page table page.
#[test]
fn guest_write_into_stage2_tables_flushes() {
    let s = setup(Kind::Ept { ad: false });
    let r = copy(&s.mem);
    let mut tlb = Stage2Tlb::new();
    let read = Access::read(SUP);
    cached(&s, &mut tlb, GVA, read, WalkMode::Update).unwrap();
    walk_2d(&s.guest, &s.stage2, &r, GVA, read, WalkMode::Update).unwrap();
    assert!(same_memory(&s.mem, &r));
    // Point the guest PDE of GVA at the EPT page table that maps G_DATA
    // (its entry 0 maps G_DATA with memory type WB: bits 5:3 = 110b).
    let ept_pt = stage2_leaf(&s, G_DATA) & !0xfff;
    let pde = walk_2d(&s.guest, &s.stage2, &s.mem, GVA, read, WalkMode::Probe)
        .unwrap()
        .stage1
        .entries[2];
    for m in [&s.mem, &r] {
        put(m, pde.gpa, (pde.value & !0x000f_ffff_ffff_f000) | ept_pt);
    }
    // GVA's PTE is now EPT entry 0x56 & 0x1ff; pick a gva whose PTE index
    // selects the EPT entry mapping G_DATA (index (G_DATA >> 12) & 0x1ff).
    let gva = (GVA & !0x1f_ffff) | ((G_DATA >> 12) & 0x1ff) << 12;
    let flushes = tlb.stats().flushes;
    for _ in 0..2 {
        for access in [Access::read(SUP), Access::write(SUP)] {
            let a = cached(&s, &mut tlb, gva, access, WalkMode::Update);
            let b = walk_2d(&s.guest, &s.stage2, &r, gva, access, WalkMode::Update);
            assert_eq!(essence(&a), essence(&b));
            // And the data page through the modified EPT entry.
            let a = cached(&s, &mut tlb, GVA, access, WalkMode::Update);
            let b = walk_2d(&s.guest, &s.stage2, &r, GVA, access, WalkMode::Update);
            assert_eq!(essence(&a), essence(&b));
        }
    }
    assert!(tlb.stats().flushes > flushes, "the guest A/D write flushed");
    assert!(same_memory(&s.mem, &r));
}

#[test]
fn invalidate_range_edges() {
    let s = setup(Kind::Ept { ad: false });
    let mut tlb = Stage2Tlb::new();
    cached(&s, &mut tlb, GVA, Access::read(SUP), WalkMode::Probe).unwrap();
    assert_eq!(tlb.valid_entries(), 5);
    tlb.invalidate_gpa_range(G_DATA, 0);
    assert_eq!(tlb.valid_entries(), 5);
    tlb.invalidate_gpa_range(u64::MAX - 10, u64::MAX);
    assert_eq!(tlb.valid_entries(), 5);
    tlb.invalidate_gpa_range(G_DATA, 1);
    assert_eq!(tlb.valid_entries(), 4);
    // Larger than the cache: a scan of the entries.
    tlb.invalidate_gpa_range(G_TABLES, 0x10_0000);
    assert_eq!(tlb.valid_entries(), 0);
}

// ---------------------------------------------------------------------------
// Model test: random stage-2 and guest edits, each followed by its
// invalidation, random accesses; walk_2d_cached on one copy of memory,
// walk_2d on another, same results and same memory.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Access page `page` (beyond `PAGES`: unmapped) at `offset`.
    Walk {
        page: u64,
        offset: u64,
        access: usize,
        probe: bool,
    },
    /// Flip `mask` in the stage-2 entry of `level` (1 = leaf) used for the
    /// guest-physical address of page `page` (or, if `table`, the guest
    /// table page of that level), then invalidate what it maps.
    Stage2Edit {
        page: u64,
        table: bool,
        level: usize,
        mask: u64,
        flush: bool,
    },
    /// Flip `mask` in the guest entry of `level` for page `page`.
    GuestEdit { page: u64, level: usize, mask: u64 },
}

/// Pages the model test uses (few, so that accesses repeat).
const MODEL_PAGES: u64 = 6;

fn op() -> impl Strategy<Value = Op> {
    let ept_bits = prop::sample::select(vec![
        1u64,
        2,
        4,
        1 << 3,
        1 << 5,
        1 << 6,
        1 << 7,
        EPT_A,
        EPT_D,
        1 << 12,
        1 << 21,
    ]);
    let guest_bits = prop::sample::select(vec![
        1u64,
        2,
        4,
        1 << 5,
        1 << 6,
        1 << 7,
        1 << 12,
        1 << 13,
        1 << 63,
    ]);
    prop_oneof![
        6 => (0..MODEL_PAGES + 1, 0..4096u64, 0..Access::COUNT, any::<bool>()).prop_map(
            |(page, offset, access, probe)| Op::Walk { page, offset, access, probe }
        ),
        1 => (0..MODEL_PAGES, any::<bool>(), 0..4usize, ept_bits, any::<bool>()).prop_map(
            |(page, table, level, mask, flush)| Op::Stage2Edit { page, table, level, mask, flush }
        ),
        1 => (0..MODEL_PAGES, 0..4usize, guest_bits).prop_map(|(page, level, mask)| Op::GuestEdit {
            page,
            level,
            mask
        }),
    ]
}

fn run_model(kind: Kind, ops: &[Op]) -> Result<(), TestCaseError> {
    let s = setup(kind);
    let r = copy(&s.mem);
    let mut tlb = Stage2Tlb::new();
    for op in ops {
        match *op {
            Op::Walk {
                page,
                offset,
                access,
                probe,
            } => {
                let gva = GVA + (page << 12) + offset;
                let access = Access::from_index(access);
                let mode = if probe {
                    WalkMode::Probe
                } else {
                    WalkMode::Update
                };
                let a = cached(&s, &mut tlb, gva, access, mode);
                let b = walk_2d(&s.guest, &s.stage2, &r, gva, access, mode);
                prop_assert_eq!(essence(&a), essence(&b), "{:?}", op);
            }
            Op::Stage2Edit {
                page,
                table,
                level,
                mask,
                flush,
            } => {
                // The guest-physical address: the page, or the guest table
                // page of that level used to reach it.
                let walk = walk_2d(
                    &s.guest,
                    &s.stage2,
                    &r,
                    GVA + (page << 12),
                    Access::read(SUP),
                    WalkMode::Probe,
                );
                let gpa = match (&walk, table) {
                    (Ok(t), true) => match t.stage1.entries.get(level) {
                        Some(e) => e.gpa,
                        None => continue,
                    },
                    _ => G_DATA + (page << 12),
                };
                let Ok(t2) =
                    s.stage2
                        .translate(&r, gpa, Stage2Access::TableRead, None, WalkMode::Probe)
                else {
                    continue;
                };
                let entries = t2.entries;
                let Some(entry) = entries
                    .len()
                    .checked_sub(1 + level)
                    .and_then(|i| entries.get(i))
                else {
                    continue;
                };
                let mask = match kind {
                    Kind::Npt if mask == EPT_A => 1 << 5,
                    Kind::Npt if mask == EPT_D => 1 << 6,
                    Kind::Npt if mask == 1 << 3 => 1 << 63,
                    _ => mask,
                };
                for m in [&s.mem, &r] {
                    put(m, entry.gpa, get(m, entry.gpa) ^ mask);
                }
                if flush {
                    tlb.flush();
                } else {
                    let span = 1u64 << (12 + 9 * (u32::from(entry.level) - 1));
                    tlb.invalidate_gpa_range(gpa & !(span - 1), span);
                }
            }
            Op::GuestEdit { page, level, mask } => {
                let walk = walk_2d(
                    &s.guest,
                    &s.stage2,
                    &r,
                    GVA + (page << 12),
                    Access::read(SUP),
                    WalkMode::Probe,
                );
                let Some(e) = walk.ok().and_then(|t| t.stage1.entries.get(level).copied()) else {
                    continue;
                };
                // Guest tables are mapped 1:1 by stage 2.
                if e.gpa + 8 > MEM as u64 {
                    continue;
                }
                for m in [&s.mem, &r] {
                    put(m, e.gpa, get(m, e.gpa) ^ mask);
                }
            }
        }
        prop_assert!(same_tables(&s.mem, &r), "memory differs after {:?}", op);
    }
    prop_assert!(same_memory(&s.mem, &r));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn cached_walks_match_walk_2d(
        kind in prop::sample::select(KINDS.to_vec()),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run_model(kind, &ops)?;
    }
}

// The memory is the guest's: make sure `copy` really copies.
#[test]
fn copies_are_independent() {
    let s = setup(Kind::Npt);
    let r = copy(&s.mem);
    assert!(same_memory(&s.mem, &r));
    put(&r, 0, 1);
    assert!(!same_memory(&s.mem, &r));
    assert_eq!(get(&s.mem, 0), get(&copy(&s.mem), 0));
}
