//! Nested paging rules, one test per rule with the exact outcome: EPT
//! violations (with their exit qualification) and misconfigurations (Intel
//! SDM Vol. 3C §29.3), AMD nested page faults (APM Vol. 2 §15.25), A/D
//! flags in both stages, which stage faulted in a two-dimensional walk, and
//! the memory references a 2-D walk makes.
#![allow(clippy::unwrap_used)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    walk, walk_2d, Access, AccessKind, CpuFeatures, EptBuilder, EptCapabilities, EptContext,
    EptFlags, EptMemoryType, EptMisconfigReason, EptQualification, NestedError, NestedStats,
    NestedWalkError, NpfErrorCode, NptBuilder, NptContext, NptFlags, NptHost, PageFlags, PageSize,
    PageTableBuilder, PagingContext, Privilege, Stage2Access, Stage2Context, Stage2Error,
    Stage2Fault, Stage2FaultKind, Stage2Phase, TableFormat, WalkMode,
};

const MEM: usize = 8 << 20;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

fn put(mem: &GuestMemoryMmap, at: u64, value: u64) {
    mem.write_obj(value, GuestAddress(at)).unwrap();
}

fn get(mem: &GuestMemoryMmap, at: u64) -> u64 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

// ---------------------------------------------------------------------------
// Stage 2 alone, on hand-written tables.
// ---------------------------------------------------------------------------

/// PML4 index 0, PDPT index 1, PD index 1, PT index 3.
const GPA: u64 = 0x4020_3abc;
const PML5: u64 = 0x6000;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const PAGE: u64 = 0x5000;
const PML4E_AT: u64 = PML4;
const PDPTE_AT: u64 = PDPT + 8;
const PDE_AT: u64 = PD + 8;
const PTE_AT: u64 = PT + 3 * 8;

const R: u64 = 1;
const W: u64 = 2;
const X: u64 = 4;
const RWX: u64 = 7;
const WB: u64 = 6 << 3;
const PS: u64 = 1 << 7;
const EA: u64 = 1 << 8;
const ED: u64 = 1 << 9;

/// EPT qualification bits.
const Q_READ: u64 = 1;
const Q_WRITE: u64 = 2;
const Q_FETCH: u64 = 4;
const Q_R: u64 = 1 << 3;
const Q_W: u64 = 1 << 4;
const Q_X: u64 = 1 << 5;
const Q_GLA: u64 = 1 << 7;
const Q_LINEAR: u64 = 1 << 8;

/// A 4-level EPT path for `GPA`, all entries RWX, a WB 4 KiB leaf.
fn ept_tables() -> GuestMemoryMmap {
    let mem = memory();
    put(&mem, PML5, PML4 | RWX);
    put(&mem, PML4E_AT, PDPT | RWX);
    put(&mem, PDPTE_AT, PD | RWX);
    put(&mem, PDE_AT, PT | RWX);
    put(&mem, PTE_AT, PAGE | RWX | WB);
    mem
}

fn caps() -> EptCapabilities {
    EptCapabilities {
        maxphyaddr: 40,
        ..EptCapabilities::default()
    }
}

/// EPTP for PML4 with WB, walk length 4 and A/D as asked.
fn eptp(ad: bool) -> u64 {
    PML4 | 3 << 3 | 6 | if ad { 1 << 6 } else { 0 }
}

fn ept_ctx(ad: bool, caps: &EptCapabilities) -> EptContext {
    EptContext::new(eptp(ad), caps).unwrap()
}

fn ept_run(
    mem: &GuestMemoryMmap,
    caps: &EptCapabilities,
    access: Stage2Access,
    gla: Option<u64>,
) -> Result<vmkit_memory::paging::Stage2Translation, Stage2Error> {
    ept_ctx(false, caps).translate(mem, GPA, access, gla, WalkMode::Update)
}

fn read() -> Stage2Access {
    Stage2Access::Data(AccessKind::Read)
}
fn write() -> Stage2Access {
    Stage2Access::Data(AccessKind::Write)
}
fn fetch() -> Stage2Access {
    Stage2Access::Data(AccessKind::Fetch)
}

/// The qualification of an expected EPT violation (checking the address).
fn violation(result: Result<vmkit_memory::paging::Stage2Translation, Stage2Error>) -> u64 {
    match result {
        Err(Stage2Error::Fault(Stage2Fault {
            gpa,
            kind: Stage2FaultKind::EptViolation { qualification },
            ..
        })) => {
            assert_eq!(gpa, GPA);
            qualification.bits()
        }
        other => panic!("expected an EPT violation, got {other:?}"),
    }
}

/// (level, reason) of an expected EPT misconfiguration.
fn misconfig(
    result: Result<vmkit_memory::paging::Stage2Translation, Stage2Error>,
) -> (u8, EptMisconfigReason) {
    match result {
        Err(Stage2Error::Fault(Stage2Fault {
            kind: Stage2FaultKind::EptMisconfig { level, reason, .. },
            ..
        })) => (level, reason),
        other => panic!("expected an EPT misconfiguration, got {other:?}"),
    }
}

// §29.3.2: a 4-level walk of a 4 KiB page.
#[test]
fn ept_translates_4k_page() {
    let mem = ept_tables();
    let t = ept_run(&mem, &caps(), read(), None).unwrap();
    assert_eq!(t.hpa, PAGE | 0xabc);
    assert_eq!(t.page_size, PageSize::Size4K);
    assert_eq!(t.memory_type, Some(EptMemoryType::WriteBack));
    assert!(t.readable && t.writable && t.executable && !t.ignore_pat);
    let at: Vec<(u8, u64)> = t.entries.iter().map(|e| (e.level, e.gpa)).collect();
    assert_eq!(at, [(4, PML4E_AT), (3, PDPTE_AT), (2, PDE_AT), (1, PTE_AT)]);
}

// §29.3.2: 2 MiB and 1 GiB leaves, with memory type and IPAT.
#[test]
fn ept_large_pages() {
    let mem = ept_tables();
    put(&mem, PDE_AT, 0x60_0000 | RWX | PS | 4 << 3 | 1 << 6);
    let t = ept_run(&mem, &caps(), read(), None).unwrap();
    assert_eq!(t.hpa, 0x60_0000 | (GPA & 0x1f_ffff));
    assert_eq!(t.page_size, PageSize::Size2M);
    assert_eq!(t.memory_type, Some(EptMemoryType::WriteThrough));
    assert!(t.ignore_pat);
    put(&mem, PDPTE_AT, 0xc000_0000 | RWX | PS | WB);
    let t = ept_run(&mem, &caps(), read(), None).unwrap();
    assert_eq!(t.hpa, 0xc000_0000 | (GPA & 0x3fff_ffff));
    assert_eq!(t.page_size, PageSize::Size1G);
    assert_eq!(t.entries.len(), 2);
}

// §29.3.3.2 and Table 29-7: a not-present entry; bits 3:5 are the AND of
// the entries used (0 with the not-present one); bits 7/8 from the GLA.
#[test]
fn ept_not_present_violation() {
    let mem = ept_tables();
    put(&mem, PTE_AT, 0);
    assert_eq!(violation(ept_run(&mem, &caps(), read(), None)), Q_READ);
    assert_eq!(
        violation(ept_run(&mem, &caps(), write(), Some(0x1234))),
        Q_WRITE | Q_GLA | Q_LINEAR
    );
    assert_eq!(
        violation(ept_run(&mem, &caps(), fetch(), Some(0x1234))),
        Q_FETCH | Q_GLA | Q_LINEAR
    );
    // A guest paging-structure access: GLA valid, bit 8 clear.
    assert_eq!(
        violation(ept_run(
            &mem,
            &caps(),
            Stage2Access::TableRead,
            Some(0x1234)
        )),
        Q_READ | Q_GLA
    );
    // Not present higher up: the walk stops there.
    put(&mem, PDPTE_AT, 0);
    match ept_run(&mem, &caps(), read(), None) {
        Err(e) => assert!(e.fault().is_some()),
        Ok(t) => panic!("translated: {t:?}"),
    }
}

// §29.3.3.2: rights are the AND over all levels; the qualification reports
// that AND.
#[test]
fn ept_permission_violations() {
    let mem = ept_tables();
    put(&mem, PTE_AT, PAGE | R | X | WB);
    assert_eq!(
        violation(ept_run(&mem, &caps(), write(), Some(0))),
        Q_WRITE | Q_R | Q_X | Q_GLA | Q_LINEAR
    );
    put(&mem, PTE_AT, PAGE | R | W | WB);
    assert_eq!(
        violation(ept_run(&mem, &caps(), fetch(), None)),
        Q_FETCH | Q_R | Q_W
    );
    assert!(ept_run(&mem, &caps(), write(), None).unwrap().writable);
    // A read-only non-leaf entry takes W away from a RWX leaf.
    put(&mem, PTE_AT, PAGE | RWX | WB);
    put(&mem, PDE_AT, PT | R);
    assert_eq!(
        violation(ept_run(&mem, &caps(), write(), None)),
        Q_WRITE | Q_R
    );
    let t = ept_run(&mem, &caps(), read(), None).unwrap();
    assert!(t.readable && !t.writable && !t.executable);
}

// §29.3.3.1: write without read (010b, 110b) is a misconfiguration at any
// level, reported in preference to a violation.
#[test]
fn ept_write_without_read_is_misconfiguration() {
    for bits in [W, W | X] {
        let mem = ept_tables();
        put(&mem, PTE_AT, PAGE | bits | WB);
        assert_eq!(
            misconfig(ept_run(&mem, &caps(), read(), None)),
            (1, EptMisconfigReason::WriteWithoutRead)
        );
        let mem = ept_tables();
        put(&mem, PDPTE_AT, PD | bits);
        assert_eq!(
            misconfig(ept_run(&mem, &caps(), fetch(), None)),
            (3, EptMisconfigReason::WriteWithoutRead)
        );
    }
}

// §29.3.2 / §29.3.3.1: execute-only needs IA32_VMX_EPT_VPID_CAP bit 0.
#[test]
fn ept_execute_only() {
    let mem = ept_tables();
    put(&mem, PTE_AT, PAGE | X | WB);
    let t = ept_run(&mem, &caps(), fetch(), None).unwrap();
    assert!(t.executable && !t.readable && !t.writable);
    assert_eq!(
        violation(ept_run(&mem, &caps(), read(), None)),
        Q_READ | Q_X
    );
    let no_xo = EptCapabilities {
        execute_only: false,
        ..caps()
    };
    assert_eq!(
        misconfig(ept_run(&mem, &no_xo, fetch(), None)),
        (1, EptMisconfigReason::ExecuteOnly)
    );
    // Also for a non-leaf entry.
    let mem = ept_tables();
    put(&mem, PML4E_AT, PDPT | X);
    assert_eq!(
        misconfig(ept_run(&mem, &no_xo, fetch(), None)),
        (4, EptMisconfigReason::ExecuteOnly)
    );
    assert!(ept_run(&mem, &caps(), fetch(), None).is_ok());
}

// §29.3.2 tables 29-1 to 29-6: reserved bits of each entry kind.
#[test]
fn ept_reserved_bits() {
    let cases: [(u64, u64, u8, u64); 7] = [
        // Non-leaf entries: bits 7:3.
        (PML4E_AT, PDPT | RWX | 1 << 3, 4, 1 << 3),
        (PML4E_AT, PDPT | RWX | PS, 4, PS),
        (PDPTE_AT, PD | RWX | 1 << 5, 3, 1 << 5),
        (PDE_AT, PT | RWX | 1 << 6, 2, 1 << 6),
        // Bits 51:N (N = 40 here).
        (PTE_AT, PAGE | RWX | WB | 1 << 40, 1, 1 << 40),
        // Large leaves: bits 20:12 (2 MiB) and 29:12 (1 GiB).
        (PDE_AT, 0x60_0000 | RWX | PS | WB | 1 << 12, 2, 1 << 12),
        (PDPTE_AT, 0xc000_0000 | RWX | PS | WB | 1 << 21, 3, 1 << 21),
    ];
    for (at, value, level, bits) in cases {
        let mem = ept_tables();
        put(&mem, at, value);
        assert_eq!(
            misconfig(ept_run(&mem, &caps(), read(), None)),
            (level, EptMisconfigReason::Reserved(bits)),
            "entry {value:#x}"
        );
    }
    // Bits 63:52 and 11:8 of a PTE are ignored (not reserved).
    let mem = ept_tables();
    put(&mem, PTE_AT, PAGE | RWX | WB | 0x7ff << 52 | 0xc00);
    assert!(ept_run(&mem, &caps(), read(), None).is_ok());
}

// §29.3.3.1: a large page where the processor has none.
#[test]
fn ept_unsupported_large_page() {
    let mem = ept_tables();
    put(&mem, PDE_AT, 0x60_0000 | RWX | PS | WB);
    let no_2m = EptCapabilities {
        pages_2m: false,
        ..caps()
    };
    assert_eq!(
        misconfig(ept_run(&mem, &no_2m, read(), None)),
        (2, EptMisconfigReason::LargePage)
    );
    let mem = ept_tables();
    put(&mem, PDPTE_AT, 0xc000_0000 | RWX | PS | WB);
    let no_1g = EptCapabilities {
        pages_1g: false,
        ..caps()
    };
    assert_eq!(
        misconfig(ept_run(&mem, &no_1g, read(), None)),
        (3, EptMisconfigReason::LargePage)
    );
}

// §29.3.3.1: memory types 2, 3 and 7 in a leaf; any type is fine elsewhere
// (in a non-leaf entry those bits are reserved anyway).
#[test]
fn ept_reserved_memory_type() {
    for mt in [2u8, 3, 7] {
        let mem = ept_tables();
        put(&mem, PTE_AT, PAGE | RWX | u64::from(mt) << 3);
        assert_eq!(
            misconfig(ept_run(&mem, &caps(), read(), None)),
            (1, EptMisconfigReason::MemoryType(mt))
        );
    }
    for (mt, want) in [
        (0, EptMemoryType::Uncacheable),
        (1, EptMemoryType::WriteCombining),
        (4, EptMemoryType::WriteThrough),
        (5, EptMemoryType::WriteProtected),
    ] {
        let mem = ept_tables();
        put(&mem, PTE_AT, PAGE | RWX | mt << 3);
        let t = ept_run(&mem, &caps(), read(), None).unwrap();
        assert_eq!(t.memory_type, Some(want));
    }
}

// §27.2.1.1: EPTP checks at VM entry.
#[test]
fn eptp_validation() {
    let c = caps();
    let bad = |eptp: u64, caps: &EptCapabilities| EptContext::new(eptp, caps).unwrap_err();
    assert!(matches!(
        bad(PML4 | 3 << 3 | 1, &c),
        NestedError::EptpMemoryType { memory_type: 1, .. }
    ));
    assert!(matches!(
        bad(PML4 | 2 << 3 | 6, &c),
        NestedError::EptpWalkLength { length: 3, .. }
    ));
    let four_only = EptCapabilities {
        five_level: false,
        ..c
    };
    assert!(matches!(
        bad(PML5 | 4 << 3 | 6, &four_only),
        NestedError::EptpWalkLength { length: 5, .. }
    ));
    let no_ad = EptCapabilities {
        accessed_dirty: false,
        ..c
    };
    assert!(matches!(
        bad(eptp(true), &no_ad),
        NestedError::EptpAccessedDirty { .. }
    ));
    assert!(matches!(
        bad(eptp(false) | 1 << 7, &c),
        NestedError::EptpReserved { reserved: 0x80, .. }
    ));
    assert!(matches!(
        bad(eptp(false) | 1 << 40, &c),
        NestedError::EptpReserved { .. }
    ));
    let ctx = EptContext::new(PML5 | 4 << 3 | 1 << 6, &c).unwrap();
    assert_eq!(ctx.levels(), 5);
    assert!(ctx.accessed_dirty());
    assert_eq!(ctx.walk_memory_type(), EptMemoryType::Uncacheable);
    assert_eq!(ctx.root(), PML5);
}

// §29.3.5: with EPTP[6] the accessed flag is set in every entry used, the
// dirty flag in the leaf on a write; without it nothing is written; a probe
// never writes.
#[test]
fn ept_accessed_dirty_flags() {
    let mem = ept_tables();
    let at = [PML4E_AT, PDPTE_AT, PDE_AT, PTE_AT];
    let before: Vec<u64> = at.iter().map(|&a| get(&mem, a)).collect();
    ept_ctx(false, &caps())
        .translate(&mem, GPA, write(), None, WalkMode::Update)
        .unwrap();
    let ad_off: Vec<u64> = at.iter().map(|&a| get(&mem, a)).collect();
    assert_eq!(ad_off, before, "no EPT A/D without EPTP[6]");
    let ctx = ept_ctx(true, &caps());
    ctx.translate(&mem, GPA, read(), None, WalkMode::Probe)
        .unwrap();
    let probed: Vec<u64> = at.iter().map(|&a| get(&mem, a)).collect();
    assert_eq!(probed, before, "a probe writes nothing");
    ctx.translate(&mem, GPA, read(), None, WalkMode::Update)
        .unwrap();
    for (&a, &old) in at.iter().zip(&before) {
        assert_eq!(get(&mem, a), old | EA, "entry at {a:#x} after a read");
    }
    ctx.translate(&mem, GPA, write(), None, WalkMode::Update)
        .unwrap();
    assert_eq!(get(&mem, PTE_AT), before[3] | EA | ED);
    assert_eq!(get(&mem, PDE_AT), before[2] | EA, "D only in the leaf");
    // A faulting access sets nothing.
    let mem = ept_tables();
    put(&mem, PTE_AT, PAGE | R | WB);
    assert!(ctx
        .translate(&mem, GPA, write(), None, WalkMode::Update)
        .is_err());
    assert_eq!(get(&mem, PML4E_AT), PDPT | RWX);
}

// §29.3.5 / Table 29-7 note 1: with EPTP[6], accesses to guest paging
// structures are writes (need W, set D, report bits 0 and 1); without it,
// entry reads are reads and A/D updates writes.
#[test]
fn ept_guest_table_accesses() {
    let mem = ept_tables();
    put(&mem, PTE_AT, PAGE | R | X | WB);
    let gla = Some(0x7000);
    for (ad, access, want) in [
        (false, Stage2Access::TableRead, None),
        (false, Stage2Access::TableUpdate, Some(Q_WRITE)),
        (true, Stage2Access::TableRead, Some(Q_READ | Q_WRITE)),
        (true, Stage2Access::TableUpdate, Some(Q_READ | Q_WRITE)),
    ] {
        let r = ept_ctx(ad, &caps()).translate(&mem, GPA, access, gla, WalkMode::Update);
        match want {
            None => assert!(r.is_ok(), "{ad} {access:?}: {r:?}"),
            Some(bits) => assert_eq!(violation(r), bits | Q_R | Q_X | Q_GLA, "{ad} {access:?}"),
        }
    }
    // A successful table read with EPT A/D sets the leaf's dirty flag.
    put(&mem, PTE_AT, PAGE | RWX | WB);
    ept_ctx(true, &caps())
        .translate(&mem, GPA, Stage2Access::TableRead, gla, WalkMode::Update)
        .unwrap();
    assert_eq!(get(&mem, PTE_AT), PAGE | RWX | WB | EA | ED);
}

// A guest-physical address beyond the tables' reach.
#[test]
fn ept_address_beyond_walk_length() {
    let mem = ept_tables();
    let r = ept_ctx(false, &caps()).translate(&mem, 1 << 48, read(), None, WalkMode::Probe);
    match r {
        Err(Stage2Error::Fault(f)) => {
            assert_eq!(f.gpa, 1 << 48);
            assert_eq!(
                f.kind,
                Stage2FaultKind::EptViolation {
                    qualification: EptQualification::READ
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

// 5-level EPT: a PML5E above the PML4.
#[test]
fn ept_five_level() {
    let mem = ept_tables();
    // GPA with bit 48 set uses PML5 index 1.
    put(&mem, PML5 + 8, PML4 | RWX);
    let ctx = EptContext::new(PML5 | 4 << 3 | 6, &caps()).unwrap();
    let t = ctx
        .translate(&mem, GPA | 1 << 48, read(), None, WalkMode::Probe)
        .unwrap();
    assert_eq!(t.hpa, PAGE | 0xabc);
    assert_eq!(t.entries.len(), 5);
    assert_eq!(t.entries[0].gpa, PML5 + 8);
    // PML5E reserved bits 7:3.
    put(&mem, PML5 + 8, PML4 | RWX | PS);
    assert_eq!(
        misconfig(ctx.translate(&mem, GPA | 1 << 48, read(), None, WalkMode::Probe)),
        (5, EptMisconfigReason::Reserved(PS))
    );
}

// --- NPT ---

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const NX: u64 = 1 << 63;

fn npt_tables() -> GuestMemoryMmap {
    let mem = memory();
    put(&mem, PML4E_AT, PDPT | P | RW | US);
    put(&mem, PDPTE_AT, PD | P | RW | US);
    put(&mem, PDE_AT, PT | P | RW | US);
    put(&mem, PTE_AT, PAGE | P | RW | US);
    mem
}

fn host() -> NptHost {
    NptHost {
        nxe: true,
        gbpages: true,
        maxphyaddr: 40,
        five_level: false,
    }
}

fn npt_run(
    mem: &GuestMemoryMmap,
    host: &NptHost,
    access: Stage2Access,
) -> Result<vmkit_memory::paging::Stage2Translation, Stage2Error> {
    NptContext::new(PML4, host)
        .unwrap()
        .translate(mem, GPA, access, Some(0x9000), WalkMode::Update)
}

fn npf(result: Result<vmkit_memory::paging::Stage2Translation, Stage2Error>) -> u64 {
    match result {
        Err(Stage2Error::Fault(Stage2Fault {
            gpa,
            kind: Stage2FaultKind::NestedPageFault { error_code },
            ..
        })) => {
            assert_eq!(gpa, GPA);
            error_code.bits()
        }
        other => panic!("expected #NPF, got {other:?}"),
    }
}

const FINAL: u64 = 1 << 32;
const TABLE: u64 = 1 << 33;

// APM §15.25.5: long-mode-format nested tables.
#[test]
fn npt_translates() {
    let mem = npt_tables();
    let t = npt_run(&mem, &host(), read()).unwrap();
    assert_eq!(t.hpa, PAGE | 0xabc);
    assert_eq!(t.memory_type, None);
    assert!(t.readable && t.writable && t.executable);
    assert_eq!(t.entries.len(), 4);
}

// APM §15.25.6: EXITINFO1 bits, with bit 32 for the final translation and
// bit 33 for guest page-table accesses; every nested access is a user
// access, and every guest page-table access (reads included) a user write
// (§15.25.5).
#[test]
fn npt_fault_codes() {
    let mem = npt_tables();
    put(&mem, PTE_AT, 0);
    assert_eq!(npf(npt_run(&mem, &host(), read())), US | FINAL);
    assert_eq!(npf(npt_run(&mem, &host(), write())), RW | US | FINAL);
    assert_eq!(npf(npt_run(&mem, &host(), fetch())), US | 16 | FINAL);
    assert_eq!(
        npf(npt_run(&mem, &host(), Stage2Access::TableRead)),
        RW | US | TABLE
    );
    assert_eq!(
        npf(npt_run(&mem, &host(), Stage2Access::TableUpdate)),
        RW | US | TABLE
    );
    // Supervisor pages are out of reach: nested accesses are user accesses.
    put(&mem, PTE_AT, PAGE | P | RW);
    assert_eq!(npf(npt_run(&mem, &host(), read())), P | US | FINAL);
    assert_eq!(
        npf(npt_run(&mem, &host(), Stage2Access::TableRead)),
        P | RW | US | TABLE
    );
    put(&mem, PDE_AT, PT | P | RW);
    put(&mem, PTE_AT, PAGE | P | RW | US);
    assert_eq!(npf(npt_run(&mem, &host(), read())), P | US | FINAL);
    // Read-only: data reads pass; guest table reads and A/D updates are
    // user writes and fault alike.
    put(&mem, PDE_AT, PT | P | US);
    assert!(npt_run(&mem, &host(), read()).is_ok());
    assert_eq!(
        npf(npt_run(&mem, &host(), Stage2Access::TableRead)),
        P | RW | US | TABLE
    );
    assert_eq!(
        npf(npt_run(&mem, &host(), Stage2Access::TableUpdate)),
        P | RW | US | TABLE
    );
    // NX with the host's EFER.NXE; reserved without it.
    put(&mem, PDE_AT, PT | P | RW | US);
    put(&mem, PTE_AT, PAGE | P | RW | US | NX);
    assert_eq!(npf(npt_run(&mem, &host(), fetch())), P | US | 16 | FINAL);
    assert!(npt_run(&mem, &host(), read()).is_ok());
    let no_nx = NptHost {
        nxe: false,
        ..host()
    };
    assert_eq!(npf(npt_run(&mem, &no_nx, read())), P | US | 8 | FINAL);
}

// APM §15.25.5: the host's 1 GiB page support and MAXPHYADDR govern the
// nested tables.
#[test]
fn npt_uses_host_features() {
    let mem = npt_tables();
    put(&mem, PDPTE_AT, 0xc000_0000 | P | RW | US | PS);
    let t = npt_run(&mem, &host(), read()).unwrap();
    assert_eq!(t.page_size, PageSize::Size1G);
    let no_gb = NptHost {
        gbpages: false,
        ..host()
    };
    assert_eq!(npf(npt_run(&mem, &no_gb, read())), P | US | 8 | FINAL);
    let mem = npt_tables();
    put(&mem, PTE_AT, PAGE | P | RW | US | 1 << 40);
    assert_eq!(npf(npt_run(&mem, &host(), read())), P | US | 8 | FINAL);
    let wide = NptHost {
        maxphyaddr: 48,
        ..host()
    };
    assert_eq!(
        npt_run(&mem, &wide, read()).unwrap().hpa,
        1 << 40 | PAGE | 0xabc
    );
    // Beyond the 4-level tables' reach.
    let r = NptContext::new(PML4, &host()).unwrap().translate(
        &mem,
        1 << 48,
        read(),
        None,
        WalkMode::Probe,
    );
    assert_eq!(
        r.unwrap_err().fault().unwrap().kind,
        Stage2FaultKind::NestedPageFault {
            error_code: NpfErrorCode::USER | NpfErrorCode::FINAL
        }
    );
}

// APM §15.25.5: nested A bits in every entry used, D in the leaf on writes;
// a guest table read is a write, so it dirties the leaf too.
#[test]
fn npt_accessed_dirty() {
    let mem = npt_tables();
    npt_run(&mem, &host(), read()).unwrap();
    assert_eq!(get(&mem, PML4E_AT), PDPT | P | RW | US | A);
    assert_eq!(get(&mem, PTE_AT), PAGE | P | RW | US | A);
    npt_run(&mem, &host(), Stage2Access::TableRead).unwrap();
    assert_eq!(get(&mem, PTE_AT), PAGE | P | RW | US | A | D);
    assert_eq!(get(&mem, PDE_AT), PT | P | RW | US | A);
    let mem = npt_tables();
    npt_run(&mem, &host(), Stage2Access::TableUpdate).unwrap();
    assert_eq!(get(&mem, PTE_AT), PAGE | P | RW | US | A | D);
    assert_eq!(get(&mem, PDE_AT), PT | P | RW | US | A);
}

// ---------------------------------------------------------------------------
// Two-dimensional walks, on tables made by the builders.
// ---------------------------------------------------------------------------

/// Guest tables: guest-physical (= host-physical) 0x10_0000..0x18_0000.
const G_TABLES: u64 = 0x10_0000;
const G_TABLES_LEN: u64 = 0x8_0000;
/// Stage-2 tables (host only).
const S2_TABLES: u64 = 0x20_0000;
const S2_TABLES_LEN: u64 = 0x10_0000;
/// Guest data: guest-physical 0x40_0000 (2 MiB) -> host 0x60_0000.
const G_DATA: u64 = 0x40_0000;
const H_DATA: u64 = 0x60_0000;
const GVA: u64 = 0x7f12_3456_7000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Ept { ad: bool, five: bool },
    Npt { five: bool },
}

struct Setup {
    mem: GuestMemoryMmap,
    guest: PagingContext,
    stage2: Stage2Context,
}

/// Guest tables of `format` mapping `GVA` -> `G_DATA` (or a 1 GiB page at
/// `0x4000_0000`) with `guest_size`; stage 2 of `kind` mapping the guest
/// table area identically and `G_DATA` -> `H_DATA`, with pages of
/// `s2_size`.
fn setup(format: TableFormat, guest_size: PageSize, kind: Kind, s2_size: PageSize) -> Setup {
    let flags = PageFlags {
        user: true,
        ..PageFlags::default()
    };
    setup_flags(format, guest_size, kind, s2_size, flags)
}

/// Guest tables of `format` mapping one page with `flags`, built in `mem`.
fn guest_tables(
    mem: &GuestMemoryMmap,
    format: TableFormat,
    size: PageSize,
    flags: PageFlags,
) -> PagingContext {
    let mut g = PageTableBuilder::new(mem, format, GuestAddress(G_TABLES), G_TABLES_LEN).unwrap();
    let gpa = if size == PageSize::Size1G {
        0x4000_0000
    } else {
        G_DATA
    };
    g.map(gva_for(format, size), gpa, size, flags).unwrap();
    PagingContext::new(&g.control_regs().unwrap(), &CpuFeatures::default()).unwrap()
}

/// [`setup`] with the guest page's flags.
fn setup_flags(
    format: TableFormat,
    guest_size: PageSize,
    kind: Kind,
    s2_size: PageSize,
    flags: PageFlags,
) -> Setup {
    let mem = memory();
    let guest = guest_tables(&mem, format, guest_size, flags);
    let stage2 = match kind {
        Kind::Ept { ad, five } => {
            let mut s =
                EptBuilder::new(&mem, five, GuestAddress(S2_TABLES), S2_TABLES_LEN).unwrap();
            stage2_maps(s2_size, |gpa, hpa, size| {
                s.map(gpa, hpa, size, EptFlags::default()).unwrap()
            });
            Stage2Context::Ept(EptContext::new(s.eptp(ad), &EptCapabilities::default()).unwrap())
        }
        Kind::Npt { five } => {
            let mut s =
                NptBuilder::new(&mem, five, GuestAddress(S2_TABLES), S2_TABLES_LEN).unwrap();
            stage2_maps(s2_size, |gpa, hpa, size| {
                s.map(gpa, hpa, size, NptFlags::default()).unwrap()
            });
            let host = NptHost {
                five_level: five,
                ..NptHost::default()
            };
            Stage2Context::Npt(NptContext::new(s.ncr3(), &host).unwrap())
        }
    };
    Setup { mem, guest, stage2 }
}

fn gva_for(format: TableFormat, size: PageSize) -> u64 {
    match (format, size) {
        (TableFormat::Bits32 | TableFormat::Pae, _) => 0xc040_0000,
        (_, PageSize::Size1G) => 0x7f12_4000_0000,
        (_, PageSize::Size2M) => 0x7f12_3440_0000,
        _ => GVA,
    }
}

/// Identity for the guest tables, `G_DATA` -> `H_DATA` (2 MiB), and
/// 0x4000_0000 -> 0x8000_0000 (1 GiB), in pages of `size` where possible.
fn stage2_maps(size: PageSize, mut map: impl FnMut(u64, u64, PageSize)) {
    match size {
        PageSize::Size4K => {
            for page in (G_TABLES..G_TABLES + G_TABLES_LEN).step_by(4096) {
                map(page, page, size);
            }
            for off in (0..0x20_0000).step_by(4096) {
                map(G_DATA + off, H_DATA + off, size);
            }
        }
        _ => {
            map(0, 0, PageSize::Size2M);
            map(G_DATA, H_DATA, PageSize::Size2M);
        }
    }
    if size == PageSize::Size1G {
        map(0x4000_0000, 0x8000_0000, PageSize::Size1G);
    } else {
        map(0x4000_0000, 0x8000_0000, PageSize::Size2M);
    }
}

fn walk2(
    s: &Setup,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> Result<vmkit_memory::paging::NestedTranslation, NestedWalkError> {
    walk_2d(&s.guest, &s.stage2, &s.mem, gva, access, mode)
}

const SUP: Privilege = Privilege::Supervisor;

// The final address goes through both stages.
#[test]
fn walk_2d_translates() {
    for kind in [
        Kind::Ept {
            ad: true,
            five: false,
        },
        Kind::Npt { five: false },
    ] {
        let s = setup(
            TableFormat::Level4,
            PageSize::Size4K,
            kind,
            PageSize::Size4K,
        );
        let t = walk2(&s, GVA | 0x123, Access::read(SUP), WalkMode::Update).unwrap();
        assert_eq!(t.stage1.gpa, G_DATA | 0x123);
        assert_eq!(t.hpa, H_DATA | 0x123);
        assert_eq!(t.page_bytes(), 4096);
        assert!(t.stage1.user);
    }
}

/// Memory references of a second walk (A bits already set), probe and
/// update alike.
fn refs(format: TableFormat, guest: PageSize, kind: Kind, s2: PageSize) -> NestedStats {
    let s = setup(format, guest, kind, s2);
    let gva = gva_for(format, guest);
    let access = Access::read(SUP);
    let probe = walk2(&s, gva, access, WalkMode::Probe).unwrap().stats;
    walk2(&s, gva, access, WalkMode::Update).unwrap();
    let again = walk2(&s, gva, access, WalkMode::Update).unwrap().stats;
    assert_eq!(probe, again, "{format:?} {guest:?} {kind:?} {s2:?}");
    again
}

// The worst case of 4-level over 4-level: each of the 4 guest entries
// needs a 4-entry stage-2 walk, and so does the final address: 20 + 4.
#[test]
fn walk_2d_makes_24_references_for_4k_over_4k() {
    for kind in [
        Kind::Ept {
            ad: false,
            five: false,
        },
        Kind::Ept {
            ad: true,
            five: false,
        },
        Kind::Npt { five: false },
    ] {
        let stats = refs(
            TableFormat::Level4,
            PageSize::Size4K,
            kind,
            PageSize::Size4K,
        );
        assert_eq!(
            stats,
            NestedStats {
                stage1_reads: 4,
                stage1_writes: 0,
                stage2_reads: 20,
                stage2_writes: 0
            },
            "{kind:?}"
        );
        assert_eq!(stats.references(), 24);
    }
}

// Fewer references with large pages: (guest levels + 1) stage-2 walks of
// the stage-2 depth, plus the guest entries.
#[test]
fn walk_2d_references_with_large_pages() {
    let ept = Kind::Ept {
        ad: false,
        five: false,
    };
    let npt = Kind::Npt { five: false };
    let cases = [
        // 2 MiB over 2 MiB: 3 guest entries, 3-entry stage-2 walks: 4*3 + 3.
        (
            TableFormat::Level4,
            PageSize::Size2M,
            ept,
            PageSize::Size2M,
            12,
            3,
        ),
        // 4 KiB over 2 MiB: 5*3 + 4.
        (
            TableFormat::Level4,
            PageSize::Size4K,
            npt,
            PageSize::Size2M,
            15,
            4,
        ),
        // 2 MiB over 4 KiB: 4*4 + 3.
        (
            TableFormat::Level4,
            PageSize::Size2M,
            ept,
            PageSize::Size4K,
            16,
            3,
        ),
        // 1 GiB over 1 GiB: guest tables in a 2 MiB stage-2 page (3 entries),
        // the final address in a 1 GiB one (2): 2*3 + 2.
        (
            TableFormat::Level4,
            PageSize::Size1G,
            npt,
            PageSize::Size1G,
            8,
            2,
        ),
        // PAE and 32-bit guests: two guest entries (PDPTEs are registers).
        (
            TableFormat::Pae,
            PageSize::Size4K,
            ept,
            PageSize::Size4K,
            12,
            2,
        ),
        (
            TableFormat::Bits32,
            PageSize::Size4K,
            npt,
            PageSize::Size4K,
            12,
            2,
        ),
        // 5-level combinations.
        (
            TableFormat::Level5,
            PageSize::Size4K,
            Kind::Ept {
                ad: true,
                five: true,
            },
            PageSize::Size4K,
            30,
            5,
        ),
        (
            TableFormat::Level4,
            PageSize::Size4K,
            Kind::Npt { five: true },
            PageSize::Size4K,
            25,
            4,
        ),
        (
            TableFormat::Level5,
            PageSize::Size4K,
            ept,
            PageSize::Size4K,
            24,
            5,
        ),
    ];
    for (format, guest, kind, s2, stage2_reads, stage1_reads) in cases {
        let stats = refs(format, guest, kind, s2);
        assert_eq!(
            (
                stats.stage2_reads,
                stats.stage1_reads,
                stats.stage1_writes,
                stats.stage2_writes
            ),
            (stage2_reads, stage1_reads, 0, 0),
            "{format:?} {guest:?} over {kind:?} {s2:?}"
        );
    }
}

// A first, updating walk also sets the guest's accessed bits, each a
// stage-2 write access needing its own stage-2 walk: 4 guest writes and 16
// more stage-2 reads (EPT A/D off, so stage 2 writes nothing).
#[test]
fn walk_2d_references_of_a_first_walk() {
    let s = setup(
        TableFormat::Level4,
        PageSize::Size4K,
        Kind::Ept {
            ad: false,
            five: false,
        },
        PageSize::Size4K,
    );
    let stats = walk2(&s, GVA, Access::read(SUP), WalkMode::Update)
        .unwrap()
        .stats;
    assert_eq!(
        stats,
        NestedStats {
            stage1_reads: 4,
            stage1_writes: 4,
            stage2_reads: 36,
            stage2_writes: 0
        }
    );
}

// With stage 2 the identity on the guest tables, stage-1 outcomes (and #PF
// error codes) are exactly those of the 1-D walker.
#[test]
fn walk_2d_stage1_faults_match_the_1d_walker() {
    // A read-only, non-executable user page; the same guest tables in a
    // plain memory for the 1-D walker.
    let flags = PageFlags {
        user: true,
        writable: false,
        executable: false,
        pkey: 0,
    };
    let s2 = setup_flags(
        TableFormat::Level4,
        PageSize::Size4K,
        Kind::Npt { five: false },
        PageSize::Size4K,
        flags,
    );
    let mem1 = memory();
    let ctx1 = guest_tables(&mem1, TableFormat::Level4, PageSize::Size4K, flags);
    assert_eq!(ctx1, s2.guest);
    let mut faults = 0;
    for gva in [GVA, GVA + 0x1000, 0x8000_0000_0000, 0] {
        for index in 0..Access::COUNT {
            let access = Access::from_index(index);
            let want = walk(&s2.guest, &mem1, gva, access, WalkMode::Probe);
            let got = walk2(&s2, gva, access, WalkMode::Probe);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(w.gpa, g.stage1.gpa),
                (Err(w), Err(g)) => {
                    faults += 1;
                    assert_eq!(w.pf_error_code(), g.pf_error_code(), "{gva:#x} {access:?}");
                    assert_eq!(format!("{w}"), format!("{g}").replace("stage-1 ", ""));
                }
                (w, g) => panic!("{gva:#x} {access:?}: 1-D {w:?}, 2-D {g:?}"),
            }
        }
    }
    assert!(faults > 30, "{faults}");
}

/// Guest-physical address of the guest PTE that maps `GVA`.
fn pt_page(s: &Setup) -> u64 {
    let t = walk2(s, GVA, Access::read(SUP), WalkMode::Probe).unwrap();
    t.stage1.entries.leaf().unwrap().gpa
}

// A stage-2 fault while reading a guest paging-structure entry vs one on
// the final access (EPT).
#[test]
fn walk_2d_ept_fault_phases() {
    let mem = memory();
    let mut g = PageTableBuilder::new(
        &mem,
        TableFormat::Level4,
        GuestAddress(G_TABLES),
        G_TABLES_LEN,
    )
    .unwrap();
    g.map(GVA, G_DATA, PageSize::Size4K, PageFlags::default())
        .unwrap();
    let guest = PagingContext::new(&g.control_regs().unwrap(), &CpuFeatures::default()).unwrap();
    let mut s = EptBuilder::new(&mem, false, GuestAddress(S2_TABLES), S2_TABLES_LEN).unwrap();
    stage2_maps(PageSize::Size4K, |gpa, hpa, size| {
        s.map(gpa, hpa, size, EptFlags::default()).unwrap()
    });
    let stage2 =
        Stage2Context::Ept(EptContext::new(s.eptp(false), &EptCapabilities::default()).unwrap());
    let run = |access: Access, mode| walk_2d(&guest, &stage2, &mem, GVA | 0x10, access, mode);
    let pte = run(Access::read(SUP), WalkMode::Probe)
        .unwrap()
        .stage1
        .entries
        .leaf()
        .unwrap()
        .gpa;

    // Final access: data page not mapped in stage 2.
    s.unmap(G_DATA, PageSize::Size4K).unwrap();
    let f = *run(Access::write(SUP), WalkMode::Probe)
        .unwrap_err()
        .stage2_fault()
        .unwrap();
    assert_eq!(f.phase, Stage2Phase::Final);
    assert_eq!((f.gpa, f.gla), (G_DATA | 0x10, Some(GVA | 0x10)));
    assert_eq!(
        f.kind,
        Stage2FaultKind::EptViolation {
            qualification: EptQualification::from_bits(Q_WRITE | Q_GLA | Q_LINEAR)
        }
    );
    s.map(G_DATA, H_DATA, PageSize::Size4K, EptFlags::default())
        .unwrap();

    // Guest page table not mapped: fault reading the PTE.
    let pt = pte & !0xfff;
    s.unmap(pt, PageSize::Size4K).unwrap();
    let f = *run(Access::write(SUP), WalkMode::Probe)
        .unwrap_err()
        .stage2_fault()
        .unwrap();
    assert_eq!(f.phase, Stage2Phase::GuestTable);
    assert_eq!((f.gpa, f.gla), (pte, Some(GVA | 0x10)));
    assert_eq!(
        f.kind,
        Stage2FaultKind::EptViolation {
            qualification: EptQualification::from_bits(Q_READ | Q_GLA)
        }
    );

    // Read-only guest page table, EPT A/D off: the walk reads it, but
    // setting the guest's accessed bit in the PTE faults (a write).
    let ro = EptFlags {
        write: false,
        ..EptFlags::default()
    };
    s.map(pt, pt, PageSize::Size4K, ro).unwrap();
    assert!(run(Access::read(SUP), WalkMode::Probe).is_ok());
    let f = *run(Access::read(SUP), WalkMode::Update)
        .unwrap_err()
        .stage2_fault()
        .unwrap();
    assert_eq!((f.phase, f.gpa), (Stage2Phase::GuestTable, pte));
    assert_eq!(
        f.kind,
        Stage2FaultKind::EptViolation {
            qualification: EptQualification::from_bits(Q_WRITE | Q_R | Q_X | Q_GLA)
        }
    );
    // The entries above the PTE got their accessed bits first.
    let pml4e = guest.root() + ((GVA >> 39) & 0x1ff) * 8;
    assert_ne!(get(&mem, pml4e) & A, 0);
    assert_eq!(get(&mem, pte) & A, 0);

    // With EPT A/D, merely reading the read-only page table is a write.
    let ad =
        Stage2Context::Ept(EptContext::new(s.eptp(true), &EptCapabilities::default()).unwrap());
    let f = *walk_2d(&guest, &ad, &mem, GVA, Access::read(SUP), WalkMode::Probe)
        .unwrap_err()
        .stage2_fault()
        .unwrap();
    assert_eq!((f.phase, f.gpa), (Stage2Phase::GuestTable, pte));
    assert_eq!(
        f.kind,
        Stage2FaultKind::EptViolation {
            qualification: EptQualification::from_bits(Q_READ | Q_WRITE | Q_R | Q_X | Q_GLA)
        }
    );
}

// NPT: guest table accesses are user accesses; phases in EXITINFO1.
#[test]
fn walk_2d_npt_fault_phases() {
    let s = setup(
        TableFormat::Level4,
        PageSize::Size4K,
        Kind::Npt { five: false },
        PageSize::Size4K,
    );
    let pte = pt_page(&s);
    let Stage2Context::Npt(npt) = &s.stage2 else {
        unreachable!()
    };
    // The nested PTE of the guest page-table page: clear its U/S bit.
    let nested_pte = npt
        .translate(&s.mem, pte, Stage2Access::TableRead, None, WalkMode::Probe)
        .unwrap()
        .entries
        .leaf()
        .unwrap()
        .gpa;
    let old = get(&s.mem, nested_pte);
    put(&s.mem, nested_pte, old & !US);
    // Even a supervisor guest read faults: the nested access is a user
    // write.
    let f = *walk2(&s, GVA, Access::read(SUP), WalkMode::Probe)
        .unwrap_err()
        .stage2_fault()
        .unwrap();
    assert_eq!(
        (f.phase, f.gpa, f.gla),
        (Stage2Phase::GuestTable, pte, Some(GVA))
    );
    assert_eq!(
        f.kind,
        Stage2FaultKind::NestedPageFault {
            error_code: NpfErrorCode::from_bits(P | RW | US | TABLE)
        }
    );
    // Read-only guest page table: reading it is already a write, probe or
    // not.
    put(&s.mem, nested_pte, (old | US) & !RW);
    for mode in [WalkMode::Probe, WalkMode::Update] {
        assert_eq!(
            npf_2d(&s, Access::read(SUP), mode),
            (Stage2Phase::GuestTable, pte, P | RW | US | TABLE)
        );
    }
    put(&s.mem, nested_pte, old);
    // Final access: the data page is not executable.
    let data = npt
        .translate(&s.mem, G_DATA, read(), None, WalkMode::Probe)
        .unwrap()
        .entries
        .leaf()
        .unwrap()
        .gpa;
    put(&s.mem, data, get(&s.mem, data) | NX);
    let f = *walk2(&s, GVA | 8, Access::fetch(SUP), WalkMode::Update)
        .unwrap_err()
        .stage2_fault()
        .unwrap();
    assert_eq!((f.phase, f.gpa), (Stage2Phase::Final, G_DATA | 8));
    assert_eq!(
        f.kind,
        Stage2FaultKind::NestedPageFault {
            error_code: NpfErrorCode::from_bits(P | US | 16 | FINAL)
        }
    );
}

// A/D in both stages: guest A/D are set through stage 2; with EPT A/D the
// stage-2 entries mapping guest page tables get dirty (table accesses are
// writes) and the data page's leaf dirty on a write; without EPTP[6]
// stage 2 is untouched.
#[test]
fn walk_2d_accessed_dirty_in_both_stages() {
    for ad in [false, true] {
        let s = setup(
            TableFormat::Level4,
            PageSize::Size4K,
            Kind::Ept { ad, five: false },
            PageSize::Size4K,
        );
        let Stage2Context::Ept(ept) = &s.stage2 else {
            unreachable!()
        };
        let t = walk2(&s, GVA, Access::write(SUP), WalkMode::Update).unwrap();
        let guest = t.stage1.entries;
        for (i, e) in guest.iter().enumerate() {
            let value = get(&s.mem, e.gpa);
            assert_ne!(value & A, 0, "guest entry {i}");
            assert_eq!(value & D != 0, i == 3, "guest entry {i}");
        }
        // Stage-2 leaves of the guest PT page and of the data page.
        let leaf_of = |gpa: u64| {
            let e = *ept
                .translate(&s.mem, gpa, read(), None, WalkMode::Probe)
                .unwrap()
                .entries
                .leaf()
                .unwrap();
            get(&s.mem, e.gpa)
        };
        let pt = leaf_of(guest[3].gpa);
        let data = leaf_of(G_DATA);
        if ad {
            assert_eq!(pt & (EA | ED), EA | ED, "{pt:#x}");
            assert_eq!(data & (EA | ED), EA | ED, "{data:#x}");
            let t2 = walk2(&s, GVA, Access::read(SUP), WalkMode::Update).unwrap();
            assert_eq!(t2.stats.stage2_writes, 0, "flags already set");
        } else {
            assert_eq!(pt & (EA | ED), 0);
            assert_eq!(data & (EA | ED), 0);
        }
    }
    // NPT: the nested entries of the guest page table get A and D (guest
    // page-table accesses are user writes), the data page's D only on a
    // write.
    let s = setup(
        TableFormat::Level4,
        PageSize::Size4K,
        Kind::Npt { five: false },
        PageSize::Size4K,
    );
    let Stage2Context::Npt(npt) = &s.stage2 else {
        unreachable!()
    };
    let t = walk2(&s, GVA, Access::read(SUP), WalkMode::Update).unwrap();
    let leaf_of = |gpa: u64| {
        let e = *npt
            .translate(&s.mem, gpa, read(), None, WalkMode::Probe)
            .unwrap()
            .entries
            .leaf()
            .unwrap();
        get(&s.mem, e.gpa)
    };
    assert_eq!(leaf_of(t.stage1.entries[3].gpa) & (A | D), A | D);
    assert_eq!(leaf_of(G_DATA) & (A | D), A);
    walk2(&s, GVA, Access::write(SUP), WalkMode::Update).unwrap();
    assert_eq!(leaf_of(G_DATA) & (A | D), A | D);
}

/// The guest entries used to translate `GVA` (guest-physical addresses,
/// PML4E first) and, for each, the address of the nested leaf mapping its
/// table page, for a 4-level guest over 4 KiB NPT pages.
fn npt_table_leaves(s: &Setup) -> Vec<(u64, u64)> {
    let t = walk2(s, GVA, Access::read(SUP), WalkMode::Probe).unwrap();
    t.stage1
        .entries
        .iter()
        .map(|e| (e.gpa, stage2_leaf(s, e.gpa)))
        .collect()
}

/// Address of the stage-2 leaf entry that maps `gpa`.
fn stage2_leaf(s: &Setup, gpa: u64) -> u64 {
    s.stage2
        .translate(&s.mem, gpa, read(), None, WalkMode::Probe)
        .unwrap()
        .entries
        .leaf()
        .unwrap()
        .gpa
}

fn npt_setup() -> Setup {
    setup(
        TableFormat::Level4,
        PageSize::Size4K,
        Kind::Npt { five: false },
        PageSize::Size4K,
    )
}

/// The #NPF a 2-D walk ends with: (phase, guest-physical address, EXITINFO1).
fn npf_2d(s: &Setup, access: Access, mode: WalkMode) -> (Stage2Phase, u64, u64) {
    let f = *walk2(s, GVA | 0x18, access, mode)
        .unwrap_err()
        .stage2_fault()
        .unwrap();
    let Stage2FaultKind::NestedPageFault { error_code } = f.kind else {
        panic!("expected #NPF, got {f:?}");
    };
    assert_eq!(f.gla, Some(GVA | 0x18));
    (f.phase, f.gpa, error_code.bits())
}

// APM §15.25.5: guest page-table accesses are user writes at the nested
// level. A guest table page mapped read-only in NPT (at any of the four
// guest levels) faults even a supervisor read with the guest's A bits
// already set and in a probe walk (so no A/D write is involved):
// EXITINFO1 = P | W | U | bit 33, at the entry's guest-physical address.
// The final access keeps its own kind: a read-only data page can be read,
// and a write to it reports P | W | U | bit 32.
#[test]
fn walk_2d_npt_read_only_guest_table_faults_as_user_write() {
    let s = npt_setup();
    // Set the guest A bits first.
    walk2(&s, GVA, Access::read(SUP), WalkMode::Update).unwrap();
    let leaves = npt_table_leaves(&s);
    assert_eq!(leaves.len(), 4);
    for &(entry, leaf) in &leaves {
        let old = get(&s.mem, leaf);
        put(&s.mem, leaf, old & !RW);
        for mode in [WalkMode::Probe, WalkMode::Update] {
            for access in [
                Access::read(SUP),
                Access::fetch(SUP),
                Access::read(Privilege::User),
            ] {
                assert_eq!(
                    npf_2d(&s, access, mode),
                    (Stage2Phase::GuestTable, entry, P | RW | US | TABLE),
                    "{entry:#x} {access:?} {mode:?}"
                );
            }
        }
        put(&s.mem, leaf, old);
    }
    let data = stage2_leaf(&s, G_DATA);
    put(&s.mem, data, get(&s.mem, data) & !RW);
    let t = walk2(&s, GVA | 0x18, Access::read(SUP), WalkMode::Update).unwrap();
    assert_eq!(t.hpa, H_DATA | 0x18);
    assert!(!t.stage2.writable);
    assert_eq!(
        npf_2d(&s, Access::write(SUP), WalkMode::Probe),
        (Stage2Phase::Final, G_DATA | 0x18, P | RW | US | FINAL)
    );
}

// APM §15.25.5: the nested access for a guest table is a user access, so a
// guest table page whose nested mapping is supervisor-only (U/S clear in
// the nested leaf, or in a nested entry above it) faults with P | W | U |
// bit 33, whatever the guest's privilege.
#[test]
fn walk_2d_npt_supervisor_guest_table_faults() {
    let s = npt_setup();
    let leaves = npt_table_leaves(&s);
    for &(entry, leaf) in &leaves {
        let old = get(&s.mem, leaf);
        put(&s.mem, leaf, old & !US);
        for access in [Access::read(SUP), Access::write(Privilege::User)] {
            assert_eq!(
                npf_2d(&s, access, WalkMode::Probe),
                (Stage2Phase::GuestTable, entry, P | RW | US | TABLE),
                "{entry:#x} {access:?}"
            );
        }
        put(&s.mem, leaf, old);
    }
    // U/S clear in the nested PDE above the guest table pages' PTEs (the
    // guest tables share a nested page table): the first guest entry
    // (PML4E) faults.
    let (pml4e, _) = leaves[0];
    let nested = s
        .stage2
        .translate(&s.mem, pml4e, read(), None, WalkMode::Probe)
        .unwrap()
        .entries;
    let pde = nested[2];
    assert_eq!(pde.level, 2);
    put(&s.mem, pde.gpa, pde.value & !US);
    assert_eq!(
        npf_2d(&s, Access::read(SUP), WalkMode::Probe),
        (Stage2Phase::GuestTable, pml4e, P | RW | US | TABLE)
    );
    put(&s.mem, pde.gpa, pde.value);
    assert!(walk2(&s, GVA, Access::read(SUP), WalkMode::Probe).is_ok());
}

// APM §15.25.5: a successful updating walk sets A and D in the nested leaf
// of every guest table page it reads, even when it writes no guest entry
// (guest A bits already set): reading a guest entry is a nested write. The
// data page's nested leaf gets A only on a read. A probe walk sets nothing.
#[test]
fn walk_2d_npt_sets_nested_dirty_of_guest_table_pages() {
    let s = npt_setup();
    walk2(&s, GVA, Access::read(SUP), WalkMode::Update).unwrap();
    let leaves = npt_table_leaves(&s);
    let data = stage2_leaf(&s, G_DATA);
    let clear = || {
        for &(_, leaf) in &leaves {
            put(&s.mem, leaf, get(&s.mem, leaf) & !(A | D));
        }
        put(&s.mem, data, get(&s.mem, data) & !(A | D));
    };
    clear();
    walk2(&s, GVA, Access::read(SUP), WalkMode::Probe).unwrap();
    for &(entry, leaf) in &leaves {
        assert_eq!(get(&s.mem, leaf) & (A | D), 0, "probe, {entry:#x}");
    }
    let t = walk2(&s, GVA, Access::read(SUP), WalkMode::Update).unwrap();
    assert_eq!(t.stats.stage1_writes, 0, "guest A bits were already set");
    // One nested A/D write per guest table page leaf, one A for the data.
    assert_eq!(t.stats.stage2_writes, 5);
    for &(entry, leaf) in &leaves {
        assert_eq!(get(&s.mem, leaf) & (A | D), A | D, "{entry:#x}");
    }
    assert_eq!(get(&s.mem, data) & (A | D), A);
    // The same through a 5-level guest over 5-level nested tables.
    let s5 = setup(
        TableFormat::Level5,
        PageSize::Size4K,
        Kind::Npt { five: true },
        PageSize::Size4K,
    );
    let gva = gva_for(TableFormat::Level5, PageSize::Size4K);
    let t = walk2(&s5, gva, Access::read(SUP), WalkMode::Update).unwrap();
    assert_eq!(t.stage1.entries.len(), 5);
    for e in t.stage1.entries.iter() {
        let leaf = get(&s5.mem, stage2_leaf(&s5, e.gpa));
        assert_eq!(leaf & (A | D), A | D, "{:#x}", e.gpa);
    }
}

// PAE guests under nested paging load their PDPTEs through stage 2, with
// no valid guest-linear address.
#[test]
fn pae_pdptes_load_through_stage2() {
    let s = setup(
        TableFormat::Pae,
        PageSize::Size4K,
        Kind::Ept {
            ad: false,
            five: false,
        },
        PageSize::Size4K,
    );
    let cr3 = s.guest.root();
    let loaded = s.stage2.load_pdptrs(&s.mem, cr3, WalkMode::Probe).unwrap();
    assert_eq!(loaded, PagingContext::load_pdptrs(&s.mem, cr3).unwrap());
    assert_ne!(loaded[3] & 1, 0);
    let Stage2Context::Ept(ept) = &s.stage2 else {
        unreachable!()
    };
    let mut b = EptBuilder::new(&s.mem, false, GuestAddress(0x30_0000), 0x4000).unwrap();
    let empty = Stage2Context::Ept(EptContext::new(b.eptp(false), ept.capabilities()).unwrap());
    b.map(
        0,
        0,
        PageSize::Size2M,
        EptFlags {
            read: false,
            write: false,
            execute: true,
            ..EptFlags::default()
        },
    )
    .unwrap();
    let f = *empty
        .load_pdptrs(&s.mem, cr3, WalkMode::Probe)
        .unwrap_err()
        .stage2_fault()
        .unwrap();
    assert_eq!(
        (f.gpa, f.gla, f.phase),
        (cr3, None, Stage2Phase::GuestTable)
    );
    assert_eq!(
        f.kind,
        Stage2FaultKind::EptViolation {
            qualification: EptQualification::from_bits(Q_READ | Q_X)
        }
    );
}

// Guest paging off: the linear address is the guest-physical address.
#[test]
fn walk_2d_guest_paging_off() {
    let s = setup(
        TableFormat::Level4,
        PageSize::Size4K,
        Kind::Ept {
            ad: false,
            five: false,
        },
        PageSize::Size4K,
    );
    let off = PagingContext::new(&Default::default(), &CpuFeatures::default()).unwrap();
    let t = walk_2d(
        &off,
        &s.stage2,
        &s.mem,
        G_DATA | 0x42,
        Access::read(SUP),
        WalkMode::Probe,
    )
    .unwrap();
    assert_eq!(t.hpa, H_DATA | 0x42);
    assert_eq!(t.stats.references(), 4);
}

// The builders refuse what stage 2 cannot express.
#[test]
fn stage2_builders_validate() {
    use vmkit_memory::paging::Stage2BuildError as E;
    let mem = memory();
    let mut e = EptBuilder::new(&mem, false, GuestAddress(S2_TABLES), 0x4000).unwrap();
    let f = EptFlags::default();
    assert!(matches!(
        e.map(0, 0, PageSize::Size4M, f),
        Err(E::UnsupportedPageSize(_))
    ));
    assert!(matches!(
        e.map(0x1000, 0, PageSize::Size2M, f),
        Err(E::Misaligned { .. })
    ));
    assert!(matches!(
        e.map(1 << 48, 0, PageSize::Size4K, f),
        Err(E::OutOfRange { .. })
    ));
    let w_only = EptFlags {
        read: false,
        execute: false,
        ..f
    };
    assert!(matches!(
        e.map(0, 0, PageSize::Size4K, w_only),
        Err(E::InvalidRights(_))
    ));
    let none = EptFlags {
        read: false,
        write: false,
        execute: false,
        ..f
    };
    assert!(matches!(
        e.map(0, 0, PageSize::Size4K, none),
        Err(E::InvalidRights(_))
    ));
    // A gpa with bit 47 set is fine (no canonical rule for physical addresses).
    e.map(1 << 47, 0x1000, PageSize::Size4K, f).unwrap();
    assert!(matches!(
        e.map(1 << 47, 0, PageSize::Size2M, f),
        Err(E::Build(_))
    ));
    e.protect(
        1 << 47,
        PageSize::Size4K,
        EptFlags {
            write: false,
            memory_type: EptMemoryType::Uncacheable,
            ..f
        },
    )
    .unwrap();
    let ctx = EptContext::new(e.eptp(false), &EptCapabilities::default()).unwrap();
    let t = ctx
        .translate(&mem, 1 << 47 | 5, read(), None, WalkMode::Probe)
        .unwrap();
    assert_eq!(
        (t.hpa, t.writable, t.memory_type),
        (0x1005, false, Some(EptMemoryType::Uncacheable))
    );
    e.unmap(1 << 47, PageSize::Size4K).unwrap();
    assert!(ctx
        .translate(&mem, 1 << 47, read(), None, WalkMode::Probe)
        .is_err());
    assert!(matches!(
        e.unmap(1 << 47, PageSize::Size4K),
        Err(E::Build(_))
    ));
    // NPT: tables of 4 pages run out.
    let mut n = NptBuilder::new(&mem, false, GuestAddress(S2_TABLES + 0x10_000), 0x4000).unwrap();
    n.map(0, 0, PageSize::Size4K, NptFlags::default()).unwrap();
    assert!(matches!(
        n.map(1 << 40, 0, PageSize::Size4K, NptFlags::default()),
        Err(E::Build(_))
    ));
    n.protect(
        0,
        PageSize::Size4K,
        NptFlags {
            writable: false,
            executable: false,
        },
    )
    .unwrap();
    let ctx = NptContext::new(n.ncr3(), &NptHost::default()).unwrap();
    let t = ctx
        .translate(&mem, 0x10, read(), None, WalkMode::Probe)
        .unwrap();
    assert!(!t.writable && !t.executable);
}

// ---------------------------------------------------------------------------
// The 2-D walk against a composition: the crate's 1-D walker over a memory
// view that translates every access through an independent stage-2 model.
// ---------------------------------------------------------------------------

/// A naive stage-2 model written from the SDM (Vol. 3C §29.3) and the APM
/// (Vol. 2 §15.25), sharing no code with `vmkit_memory::paging::nested`.
mod model {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[derive(Debug, Clone, Copy)]
    pub enum Format {
        Ept {
            ad: bool,
            execute_only: bool,
            pages_2m: bool,
            pages_1g: bool,
        },
        Npt {
            nxe: bool,
            pages_1g: bool,
        },
    }

    #[derive(Debug, Clone, Copy)]
    pub struct Stage2 {
        pub format: Format,
        pub root: u64,
        pub levels: u32,
        pub maxphyaddr: u32,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Use {
        Read,
        Write,
        Fetch,
        /// Reading a guest paging-structure entry.
        TableRead,
        /// Setting A/D in a guest paging-structure entry.
        TableUpdate,
        /// Building tables: no rights checked, nothing updated.
        Raw,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Outcome {
        Ok { hpa: u64 },
        Violation(u64),
        Misconfig(u32),
        Npf(u64),
        Unreadable,
    }

    fn bit(value: u64, n: u32) -> bool {
        (value >> n) & 1 == 1
    }

    fn any(value: u64, lo: u32, hi: u32) -> bool {
        (lo..=hi).any(|n| bit(value, n))
    }

    fn field(value: u64, lo: u32, hi: u32) -> u64 {
        let mut out = 0;
        for n in (lo..=hi).rev() {
            out = (out << 1) | u64::from(bit(value, n));
        }
        out
    }

    struct Used {
        address: u64,
        value: u64,
    }

    pub fn translate(
        s: &Stage2,
        memory: &GuestMemoryMmap,
        gpa: u64,
        what: Use,
        gla: Option<u64>,
        update: bool,
    ) -> Outcome {
        let m = s.maxphyaddr;
        let table_access = matches!(what, Use::TableRead | Use::TableUpdate);
        let beyond = gpa >> (12 + 9 * s.levels) != 0;
        let mut used: Vec<Used> = Vec::new();
        let mut table = s.root;
        match s.format {
            Format::Ept {
                ad,
                execute_only,
                pages_2m,
                pages_1g,
            } => {
                // Table 29-7 bits 0-2; with EPT A/D, guest paging-structure
                // accesses are writes and report both bit 0 and bit 1.
                let (mut q, need) = match what {
                    Use::Read => (1, 0),
                    Use::Write => (2, 1),
                    Use::Fetch => (4, 2),
                    Use::TableRead | Use::TableUpdate if ad => (3, 1),
                    Use::TableRead => (1, 0),
                    Use::TableUpdate => (2, 1),
                    Use::Raw => (0, 9),
                };
                if gla.is_some() {
                    q |= 1 << 7;
                    if !table_access {
                        q |= 1 << 8;
                    }
                }
                if beyond {
                    return Outcome::Violation(q);
                }
                let mut and = 7u64;
                let mut level = s.levels;
                let (base, bytes) = loop {
                    let shift = 12 + 9 * (level - 1);
                    let address = table + field(gpa, shift, shift + 8) * 8;
                    let Ok(e) = memory.read_obj::<u64>(GuestAddress(address)) else {
                        return Outcome::Unreadable;
                    };
                    used.push(Used { address, value: e });
                    and &= e & 7;
                    let rwx = e & 7;
                    if rwx == 0 {
                        return Outcome::Violation(q | and << 3);
                    }
                    // §29.3.3.1.
                    let bad = rwx == 2
                        || rwx == 6
                        || (rwx == 4 && !execute_only)
                        || (m < 52 && any(e, m, 51));
                    if bad {
                        return Outcome::Misconfig(level);
                    }
                    let large = (level == 2 || level == 3) && bit(e, 7);
                    if level >= 4 || !large && level > 1 {
                        if any(e, 3, 7) {
                            return Outcome::Misconfig(level);
                        }
                        table = field(e, 12, m - 1) << 12;
                        level -= 1;
                        continue;
                    }
                    if level == 3 && (!pages_1g || any(e, 12, 29)) {
                        return Outcome::Misconfig(level);
                    }
                    if level == 2 && (!pages_2m || any(e, 12, 20)) {
                        return Outcome::Misconfig(level);
                    }
                    let memory_type = field(e, 3, 5);
                    if memory_type == 2 || memory_type == 3 || memory_type == 7 {
                        return Outcome::Misconfig(level);
                    }
                    break (field(e, shift, m - 1) << shift, 1u64 << shift);
                };
                if need < 3 && !bit(and, need) {
                    return Outcome::Violation(q | and << 3);
                }
                if update && ad && what != Use::Raw {
                    let last = used.len() - 1;
                    for (i, u) in used.iter().enumerate() {
                        let mut v = u.value | 1 << 8;
                        if i == last && need == 1 {
                            v |= 1 << 9;
                        }
                        if v != u.value {
                            memory.write_obj(v, GuestAddress(u.address)).unwrap();
                        }
                    }
                }
                Outcome::Ok {
                    hpa: base + gpa % bytes,
                }
            }
            Format::Npt { nxe, pages_1g } => {
                // APM §15.25.6: #PF-style bits, always U/S; bit 32 final,
                // bit 33 guest page table. §15.25.5: every guest page-table
                // access (read or A/D update) is a user write.
                let write = matches!(what, Use::Write | Use::TableRead | Use::TableUpdate);
                let fetch = what == Use::Fetch;
                let mut code = 4u64;
                if write {
                    code |= 2;
                }
                if fetch && nxe {
                    code |= 16;
                }
                code |= if table_access { 1 << 33 } else { 1 << 32 };
                if beyond {
                    return Outcome::Npf(code);
                }
                let mut level = s.levels;
                let (base, bytes) = loop {
                    let shift = 12 + 9 * (level - 1);
                    let address = table + field(gpa, shift, shift + 8) * 8;
                    let Ok(e) = memory.read_obj::<u64>(GuestAddress(address)) else {
                        return Outcome::Unreadable;
                    };
                    used.push(Used { address, value: e });
                    if !bit(e, 0) {
                        return Outcome::Npf(code);
                    }
                    let mut reserved = (m < 52 && any(e, m, 51)) || (!nxe && bit(e, 63));
                    let large = (level == 2 || level == 3) && bit(e, 7);
                    if level >= 4 {
                        // PS reserved; AMD reserves bit 8 too.
                        reserved |= bit(e, 7) || bit(e, 8);
                    }
                    if level == 3 && large {
                        reserved |= !pages_1g || any(e, 13, 29);
                    }
                    if level == 2 && large {
                        reserved |= any(e, 13, 20);
                    }
                    if reserved {
                        return Outcome::Npf(code | 1 | 8);
                    }
                    if level == 1 || large {
                        break (field(e, shift, m - 1) << shift, 1u64 << shift);
                    }
                    table = field(e, 12, m - 1) << 12;
                    level -= 1;
                };
                if what != Use::Raw {
                    let user = used.iter().all(|u| bit(u.value, 2));
                    let writable = used.iter().all(|u| bit(u.value, 1));
                    let executable = !(nxe && used.iter().any(|u| bit(u.value, 63)));
                    let allowed = user && (!write || writable) && (!fetch || executable);
                    if !allowed {
                        return Outcome::Npf(code | 1);
                    }
                    if update {
                        let last = used.len() - 1;
                        for (i, u) in used.iter().enumerate() {
                            let mut v = u.value | 1 << 5;
                            if i == last && write {
                                v |= 1 << 6;
                            }
                            if v != u.value {
                                memory.write_obj(v, GuestAddress(u.address)).unwrap();
                            }
                        }
                    }
                }
                Outcome::Ok {
                    hpa: base + gpa % bytes,
                }
            }
        }
    }
}

/// Guest-physical memory seen through the stage-2 model: what the guest's
/// own walker (the 1-D `walk`) reads and writes.
struct View<'a> {
    memory: &'a GuestMemoryMmap,
    stage2: model::Stage2,
    gla: Option<u64>,
    update: bool,
    raw: bool,
    /// The first stage-2 fault: (guest-physical address, outcome).
    fault: std::cell::Cell<Option<(u64, model::Outcome)>>,
}

struct OneSlice<'a>(Option<vm_memory::GuestMemoryResult<vm_memory::VolatileSlice<'a, ()>>>);

impl<'a> Iterator for OneSlice<'a> {
    type Item = vm_memory::GuestMemoryResult<vm_memory::VolatileSlice<'a, ()>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.take()
    }
}

impl std::iter::FusedIterator for OneSlice<'_> {}

impl<'a> vm_memory::guest_memory::GuestMemorySliceIterator<'a, ()> for OneSlice<'a> {}

impl View<'_> {
    fn translate(
        &self,
        gpa: u64,
        count: usize,
        access: vm_memory::Permissions,
    ) -> vm_memory::GuestMemoryResult<u64> {
        let invalid = vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa));
        if (gpa & 0xfff) + count as u64 > 0x1000 {
            return Err(invalid);
        }
        let what = if self.raw {
            model::Use::Raw
        } else if access.has_write() {
            model::Use::TableUpdate
        } else {
            model::Use::TableRead
        };
        match model::translate(&self.stage2, self.memory, gpa, what, self.gla, self.update) {
            model::Outcome::Ok { hpa } => Ok(hpa),
            other => {
                if self.fault.get().is_none() {
                    self.fault.set(Some((gpa, other)));
                }
                Err(invalid)
            }
        }
    }
}

impl vm_memory::GuestMemory for View<'_> {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(
        &self,
        addr: GuestAddress,
        count: usize,
        access: vm_memory::Permissions,
    ) -> bool {
        self.translate(addr.0, count, access).is_ok()
    }

    fn get_slices<'b>(
        &'b self,
        addr: GuestAddress,
        count: usize,
        access: vm_memory::Permissions,
    ) -> vm_memory::GuestMemoryResult<
        impl vm_memory::guest_memory::GuestMemorySliceIterator<'b, vm_memory::bitmap::BS<'b, ()>>,
    > {
        use vm_memory::GuestMemoryBackend;
        let slice = self
            .translate(addr.0, count, access)
            .and_then(|hpa| self.memory.get_slice(GuestAddress(hpa), count));
        Ok(OneSlice(Some(slice)))
    }
}

mod composition {
    use super::*;
    use proptest::prelude::*;

    /// Host layout: guest-physical 0..2 MiB -> host 2..4 MiB in 4 KiB
    /// pages (guest tables at guest-physical 1 MiB), 4..6 MiB identity in a
    /// 2 MiB page, 1..2 GiB -> host 3 GiB in a 1 GiB page (never read).
    const SHIFT_A: u64 = 0x20_0000;
    const GT: u64 = 0x10_0000;
    const GT_LEN: u64 = 0x8_0000;
    const S2T: u64 = 0x70_0000;
    const S2T_LEN: u64 = 0x10_0000;

    #[derive(Debug, Clone)]
    pub struct Case {
        stage2: u8,
        flags: u16,
        format: u8,
        maps: Vec<(u64, u8, u16, u8)>,
        ops: Vec<(u16, u8)>,
        corrupt: Vec<(bool, u32, u8)>,
        accesses: Vec<(u64, u8, u8, bool, bool)>,
    }

    pub fn case() -> impl Strategy<Value = Case> {
        (
            (0u8..4, any::<u16>(), 0u8..4),
            prop::collection::vec((any::<u64>(), 0u8..3, any::<u16>(), any::<u8>()), 1..5),
            prop::collection::vec((any::<u16>(), 0u8..5), 0..5),
            prop::collection::vec((any::<bool>(), any::<u32>(), 0u8..64), 0..2),
            prop::collection::vec(
                (any::<u64>(), 0u8..3, 0u8..3, any::<bool>(), any::<bool>()),
                1..6,
            ),
        )
            .prop_map(
                |((stage2, flags, format), maps, ops, corrupt, accesses)| Case {
                    stage2,
                    flags,
                    format,
                    maps,
                    ops,
                    corrupt,
                    accesses,
                },
            )
    }

    fn format_of(n: u8) -> TableFormat {
        match n {
            0 => TableFormat::Bits32,
            1 => TableFormat::Pae,
            2 => TableFormat::Level4,
            _ => TableFormat::Level5,
        }
    }

    fn gva_of(format: TableFormat, slot: u64) -> u64 {
        let pick = |shift: u32, n: u64| (slot >> shift) % n;
        match format {
            TableFormat::Bits32 | TableFormat::Pae => {
                pick(0, 2) << 31 | pick(4, 2) << 30 | pick(8, 2) << 22 | pick(12, 4) << 12
            }
            _ => {
                let gva =
                    pick(0, 2) << 39 | pick(4, 2) << 30 | pick(8, 2) << 21 | pick(12, 4) << 12;
                if pick(16, 2) == 1 {
                    gva | 0xffff_8000_0000_0000
                } else {
                    gva
                }
            }
        }
    }

    /// Changes the stage-2 mapping of a guest-physical page (op: unmap,
    /// read-only, execute-only, no-execute, uncacheable).
    type Protect<'a> = Box<dyn Fn(u64, u8) + 'a>;

    pub struct Built {
        pub guest: Result<PagingContext, vmkit_memory::paging::PagingError>,
        pub stage2: Stage2Context,
        pub model: model::Stage2,
        pub gvas: Vec<u64>,
    }

    fn flag(case: &Case, n: u32) -> bool {
        (case.flags >> n) & 1 == 1
    }

    /// Builds the same tables in `mem` every time for the same case.
    pub fn build(case: &Case, mem: &GuestMemoryMmap) -> Built {
        let five_s2 = flag(case, 0) && flag(case, 1) && flag(case, 2);
        let levels = if five_s2 { 5 } else { 4 };
        let ept = case.stage2 < 3;
        let format = if ept {
            model::Format::Ept {
                ad: case.stage2 == 1,
                execute_only: !(flag(case, 3) && flag(case, 4)),
                pages_2m: !(flag(case, 5) && flag(case, 6) && flag(case, 7)),
                pages_1g: !(flag(case, 5) && flag(case, 6)),
            }
        } else {
            model::Format::Npt {
                nxe: !(flag(case, 3) && flag(case, 4)),
                pages_1g: !(flag(case, 5) && flag(case, 6)),
            }
        };
        let maxphyaddr: u8 = 46;
        // Stage 2.
        let (root, context, protect): (u64, Stage2Context, Protect<'_>) = match format {
            model::Format::Ept {
                ad,
                execute_only,
                pages_2m,
                pages_1g,
            } => {
                let mut b = EptBuilder::new(mem, five_s2, GuestAddress(S2T), S2T_LEN).unwrap();
                for page in (0..0x20_0000).step_by(4096) {
                    b.map(page, page + SHIFT_A, PageSize::Size4K, EptFlags::default())
                        .unwrap();
                }
                b.map(0x40_0000, 0x40_0000, PageSize::Size2M, EptFlags::default())
                    .unwrap();
                b.map(1 << 30, 3 << 30, PageSize::Size1G, EptFlags::default())
                    .unwrap();
                let caps = EptCapabilities {
                    execute_only,
                    pages_2m,
                    pages_1g,
                    accessed_dirty: true,
                    five_level: true,
                    maxphyaddr,
                };
                let ctx = EptContext::new(b.eptp(ad), &caps).unwrap();
                let root = b.root();
                let b = std::cell::RefCell::new(b);
                let protect = move |gpa: u64, op: u8| {
                    let mut b = b.borrow_mut();
                    let f = EptFlags::default();
                    let size = if gpa >= 0x40_0000 {
                        PageSize::Size2M
                    } else {
                        PageSize::Size4K
                    };
                    let flags = match op {
                        0 => {
                            // Already unmapped by an earlier op: nothing to do.
                            b.unmap(gpa, size).ok();
                            return;
                        }
                        1 => EptFlags { write: false, ..f },
                        2 => EptFlags {
                            read: false,
                            write: false,
                            ..f
                        },
                        3 => EptFlags {
                            execute: false,
                            ..f
                        },
                        _ => EptFlags {
                            memory_type: EptMemoryType::Uncacheable,
                            ..f
                        },
                    };
                    b.protect(gpa, size, flags).ok();
                };
                (root, ctx.into(), Box::new(protect))
            }
            model::Format::Npt { nxe, pages_1g } => {
                let mut b = NptBuilder::new(mem, five_s2, GuestAddress(S2T), S2T_LEN).unwrap();
                let f = NptFlags {
                    writable: true,
                    executable: !nxe || flag(case, 8) || !flag(case, 9),
                };
                for page in (0..0x20_0000).step_by(4096) {
                    b.map(page, page + SHIFT_A, PageSize::Size4K, f).unwrap();
                }
                b.map(0x40_0000, 0x40_0000, PageSize::Size2M, f).unwrap();
                b.map(1 << 30, 3 << 30, PageSize::Size1G, f).unwrap();
                let host = NptHost {
                    nxe,
                    gbpages: pages_1g,
                    maxphyaddr,
                    five_level: five_s2,
                };
                let ctx = NptContext::new(b.ncr3(), &host).unwrap();
                let root = b.ncr3();
                let b = std::cell::RefCell::new(b);
                let protect = move |gpa: u64, op: u8| {
                    let mut b = b.borrow_mut();
                    let size = if gpa >= 0x40_0000 {
                        PageSize::Size2M
                    } else {
                        PageSize::Size4K
                    };
                    let flags = match op {
                        0 => {
                            // Already unmapped by an earlier op: nothing to do.
                            b.unmap(gpa, size).ok();
                            return;
                        }
                        1 | 4 => NptFlags {
                            writable: false,
                            ..f
                        },
                        _ => NptFlags {
                            executable: false,
                            ..f
                        },
                    };
                    if flags.executable || nxe {
                        b.protect(gpa, size, flags).ok();
                    }
                };
                (root, ctx.into(), Box::new(protect))
            }
        };
        let model = model::Stage2 {
            format,
            root,
            levels,
            maxphyaddr: u32::from(maxphyaddr),
        };
        // Stage 1, written through the model's view of guest memory.
        let view = View {
            memory: mem,
            stage2: model,
            gla: None,
            update: false,
            raw: true,
            fault: std::cell::Cell::new(None),
        };
        let gformat = format_of(case.format);
        let mut g = PageTableBuilder::new(&view, gformat, GuestAddress(GT), GT_LEN).unwrap();
        let mut gvas = Vec::new();
        for &(slot, size, target, fl) in &case.maps {
            let gva_slot = gva_of(gformat, slot);
            let size = match (gformat, size) {
                (_, 0) => PageSize::Size4K,
                (TableFormat::Bits32, _) => PageSize::Size4M,
                (TableFormat::Pae, _) | (_, 1) => PageSize::Size2M,
                _ => PageSize::Size1G,
            };
            let gva = gva_slot & !(size.bytes() - 1);
            let gpa = match size {
                PageSize::Size4K if target % 4 == 0 => 0x40_0000 + u64::from(target >> 2) * 0x1000,
                PageSize::Size4K => GT + GT_LEN + u64::from(target % 0x80) * 0x1000,
                PageSize::Size1G => 1 << 30,
                PageSize::Size4M => 0x40_0000,
                PageSize::Size2M if target % 2 == 0 => 0x40_0000,
                PageSize::Size2M => 0,
            };
            let flags = PageFlags {
                writable: fl & 1 != 0,
                user: fl & 2 != 0,
                executable: fl & 4 != 0 || gformat == TableFormat::Bits32,
                pkey: 0,
            };
            if g.map(gva, gpa, size, flags).is_ok() {
                gvas.push(gva);
            }
        }
        let mut regs = g.control_regs();
        // Stage-2 changes: protect or unmap guest table pages and data pages.
        for &(sel, op) in &case.ops {
            let gpa = match sel % 4 {
                0 | 1 => GT + u64::from(sel >> 2) % 6 * 0x1000,
                2 => GT + GT_LEN + u64::from(sel >> 2) % 0x80 * 0x1000,
                _ => 0x40_0000,
            };
            protect(gpa, op);
        }
        // Flip single bits in table entries of either stage.
        for &(stage1, at, bitn) in &case.corrupt {
            let address = if stage1 {
                GT + SHIFT_A + u64::from(at) % 0x6000 / 8 * 8
            } else {
                S2T + u64::from(at) % 0x8000 / 8 * 8
            };
            let v: u64 = mem.read_obj(GuestAddress(address)).unwrap();
            mem.write_obj(v ^ 1 << bitn, GuestAddress(address)).unwrap();
        }
        if let Ok(r) = regs.as_mut() {
            if gformat == TableFormat::Pae {
                r.pdptrs = PagingContext::load_pdptrs(&view, r.cr3).unwrap_or([0; 4]);
            }
        }
        let features = CpuFeatures {
            maxphyaddr: 40,
            ..CpuFeatures::default()
        };
        let guest = match regs {
            Ok(regs) => PagingContext::new(&regs, &features),
            Err(e) => panic!("control registers: {e}"),
        };
        Built {
            guest,
            stage2: context,
            model,
            gvas,
        }
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Outcome {
        BadContext,
        Translated {
            gpa: u64,
            hpa: u64,
        },
        PageFault {
            code: u32,
            address: u64,
        },
        NonCanonical,
        Stage2 {
            table: bool,
            gpa: u64,
            gla: Option<u64>,
            fault: model::Outcome,
        },
        Unreadable,
    }

    fn use_of(kind: AccessKind) -> model::Use {
        match kind {
            AccessKind::Read => model::Use::Read,
            AccessKind::Write => model::Use::Write,
            AccessKind::Fetch => model::Use::Fetch,
        }
    }

    pub fn reference(
        b: &Built,
        mem: &GuestMemoryMmap,
        gva: u64,
        access: Access,
        update: bool,
    ) -> Outcome {
        let Ok(ctx) = &b.guest else {
            return Outcome::BadContext;
        };
        let gla = if ctx.mode().is_long() {
            gva
        } else {
            gva & 0xffff_ffff
        };
        let view = View {
            memory: mem,
            stage2: b.model,
            gla: Some(gla),
            update,
            raw: false,
            fault: std::cell::Cell::new(None),
        };
        let mode = if update {
            WalkMode::Update
        } else {
            WalkMode::Probe
        };
        match walk(ctx, &view, gva, access, mode) {
            Ok(t) => {
                match model::translate(&b.model, mem, t.gpa, use_of(access.kind), Some(gla), update)
                {
                    model::Outcome::Ok { hpa } => Outcome::Translated { gpa: t.gpa, hpa },
                    model::Outcome::Unreadable => Outcome::Unreadable,
                    fault => Outcome::Stage2 {
                        table: false,
                        gpa: t.gpa,
                        gla: Some(gla),
                        fault,
                    },
                }
            }
            Err(vmkit_memory::WalkError::PageFault {
                error_code,
                address,
            }) => Outcome::PageFault {
                code: error_code.bits(),
                address,
            },
            Err(vmkit_memory::WalkError::NonCanonical { .. }) => Outcome::NonCanonical,
            Err(vmkit_memory::WalkError::Memory { .. }) => match view.fault.get() {
                Some((_, model::Outcome::Unreadable)) | None => Outcome::Unreadable,
                Some((gpa, fault)) => Outcome::Stage2 {
                    table: true,
                    gpa,
                    gla: Some(gla),
                    fault,
                },
            },
            Err(e) => panic!("no races here: {e}"),
        }
    }

    pub fn real(
        b: &Built,
        mem: &GuestMemoryMmap,
        gva: u64,
        access: Access,
        update: bool,
    ) -> Outcome {
        let Ok(ctx) = &b.guest else {
            return Outcome::BadContext;
        };
        let mode = if update {
            WalkMode::Update
        } else {
            WalkMode::Probe
        };
        match walk_2d(ctx, &b.stage2, mem, gva, access, mode) {
            Ok(t) => Outcome::Translated {
                gpa: t.stage1.gpa,
                hpa: t.hpa,
            },
            Err(NestedWalkError::PageFault {
                error_code,
                address,
            }) => Outcome::PageFault {
                code: error_code.bits(),
                address,
            },
            Err(NestedWalkError::NonCanonical { .. }) => Outcome::NonCanonical,
            Err(NestedWalkError::Stage2(f)) => Outcome::Stage2 {
                table: f.phase == Stage2Phase::GuestTable,
                gpa: f.gpa,
                gla: f.gla,
                fault: match f.kind {
                    Stage2FaultKind::EptViolation { qualification } => {
                        model::Outcome::Violation(qualification.bits())
                    }
                    Stage2FaultKind::EptMisconfig { level, .. } => {
                        model::Outcome::Misconfig(u32::from(level))
                    }
                    Stage2FaultKind::NestedPageFault { error_code } => {
                        model::Outcome::Npf(error_code.bits())
                    }
                },
            },
            Err(NestedWalkError::Memory { .. }) => Outcome::Unreadable,
            Err(e) => panic!("no races here: {e}"),
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), super::MEM)]).unwrap()
    }

    thread_local! {
        static MEMORIES: (GuestMemoryMmap, GuestMemoryMmap) = (memory(), memory());
    }

    /// Host ranges cleared before each case: guest memory behind the
    /// 4 KiB stage-2 pages, and the stage-2 tables.
    const CLEARED: [(u64, usize); 2] = [(SHIFT_A, 0x20_0000), (S2T, S2T_LEN as usize)];
    /// Host ranges compared after each access: the guest tables and the
    /// stage-2 tables in use (A/D bits land there, unless a flipped bit
    /// moved a table, and then both memories still see the same writes).
    const WINDOWS: [(u64, usize); 2] = [(SHIFT_A + GT, 0x8000), (S2T, 0x8000)];

    fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut out = Vec::new();
        for (start, len) in WINDOWS {
            let mut bytes = vec![0u8; len];
            mem.read_slice(&mut bytes, GuestAddress(start)).unwrap();
            out.extend_from_slice(&bytes);
        }
        out
    }

    fn clear(mem: &GuestMemoryMmap) {
        for (start, len) in CLEARED {
            mem.write_slice(&vec![0u8; len], GuestAddress(start))
                .unwrap();
        }
    }

    /// Runs the case; returns the outcomes seen.
    pub fn check(case: &Case) -> Result<Vec<Outcome>, TestCaseError> {
        MEMORIES.with(|(real_mem, model_mem)| {
            clear(real_mem);
            clear(model_mem);
            let b = build(case, real_mem);
            let m = build(case, model_mem);
            prop_assert_eq!(b.gvas.clone(), m.gvas.clone());
            prop_assert!(snapshot(real_mem) == snapshot(model_mem));
            let mut seen = Vec::new();
            for &(sel, kind, who, probe, ac) in &case.accesses {
                let gva = if b.gvas.is_empty() || sel % 8 == 0 {
                    gva_of(format_of(case.format), sel >> 3) | (sel >> 40) & 0xfff
                } else {
                    b.gvas[(sel >> 3) as usize % b.gvas.len()] | ((sel >> 8) & 0x3f_fff8)
                };
                let access = Access {
                    kind: match kind {
                        0 => AccessKind::Read,
                        1 => AccessKind::Write,
                        _ => AccessKind::Fetch,
                    },
                    privilege: match who {
                        0 => Privilege::User,
                        1 => Privilege::Supervisor,
                        _ => Privilege::SupervisorImplicit,
                    },
                    ac,
                };
                let before = snapshot(real_mem);
                let got = real(&b, real_mem, gva, access, !probe);
                let want = reference(&m, model_mem, gva, access, !probe);
                prop_assert_eq!(&got, &want, "gva {:#x} {:?}", gva, access);
                let after = snapshot(real_mem);
                if probe {
                    prop_assert!(before == after, "a probe wrote memory");
                }
                prop_assert!(after == snapshot(model_mem), "A/D writes differ");
                seen.push(want);
            }
            Ok(seen)
        })
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1500))]

    /// Same outcome (translation, #PF code, stage-2 fault with phase,
    /// addresses and qualification / EXITINFO1) and the same A/D writes in
    /// both stages as the composition of the 1-D walker and the model.
    #[test]
    fn walk_2d_matches_composed_reference(case in composition::case()) {
        composition::check(&case)?;
    }
}

/// The generator reaches every kind of outcome.
#[test]
fn composition_covers_outcomes() {
    use composition::Outcome;
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(Config::default().rng_algorithm),
    );
    let strategy = composition::case();
    let mut counts = [0u32; 7];
    for _ in 0..600 {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        for o in composition::check(&case).unwrap() {
            let i = match o {
                Outcome::Translated { .. } => 0,
                Outcome::PageFault { .. } => 1,
                Outcome::Stage2 {
                    table: true,
                    fault: model::Outcome::Misconfig(_),
                    ..
                }
                | Outcome::Stage2 {
                    table: false,
                    fault: model::Outcome::Misconfig(_),
                    ..
                } => 2,
                Outcome::Stage2 {
                    table: true,
                    fault: model::Outcome::Violation(_),
                    ..
                } => 3,
                Outcome::Stage2 {
                    table: false,
                    fault: model::Outcome::Violation(_),
                    ..
                } => 4,
                Outcome::Stage2 { table: true, .. } => 5,
                Outcome::Stage2 { table: false, .. } => 6,
                _ => continue,
            };
            counts[i] += 1;
        }
    }
    eprintln!("translated, #PF, misconfig, EPT table/final, NPF table/final: {counts:?}");
    for (i, &n) in counts.iter().enumerate() {
        assert!(n >= 15, "too few outcomes of kind {i}: {counts:?}");
    }
}
