//! One test per SDM paging rule, each asserting the exact outcome (the #PF
//! error code where there is one). Section numbers refer to the Intel SDM
//! Vol. 3A, chapter 4 (and §3.3.7.1 for canonical addresses).
#![allow(clippy::unwrap_used)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    Access, ControlRegs, CpuFeatures, PageSize, PagingContext, PagingError, PfErrorCode, Privilege,
    Translation, Vendor, WalkError, WalkMode,
};

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// pml4 0, pdpt 1, pd 1, pt 3.
const GVA: u64 = 0x4020_3abc;
const PML5: u64 = 0x6000;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const PAGE: u64 = 0x5000;
const PML5E_AT: u64 = PML5;
const PML4E_AT: u64 = PML4;
const PDPTE_AT: u64 = PDPT + 8;
const PDE_AT: u64 = PD + 8;
const PTE_AT: u64 = PT + 3 * 8;

const R: Privilege = Privilege::Supervisor;
const U: Privilege = Privilege::User;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn put(mem: &GuestMemoryMmap, at: u64, value: u64) {
    mem.write_obj(value, GuestAddress(at)).unwrap();
}

fn get(mem: &GuestMemoryMmap, at: u64) -> u64 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

/// A 4-level path for `GVA` with every entry P|RW|US; the leaf is a PTE.
fn tables4() -> GuestMemoryMmap {
    let mem = memory();
    put(&mem, PML5E_AT, PML4 | P | RW | US);
    put(&mem, PML4E_AT, PDPT | P | RW | US);
    put(&mem, PDPTE_AT, PD | P | RW | US);
    put(&mem, PDE_AT, PT | P | RW | US);
    put(&mem, PTE_AT, PAGE | P | RW | US);
    mem
}

fn regs4() -> ControlRegs {
    ControlRegs {
        cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG | ControlRegs::CR0_WP,
        cr3: PML4,
        cr4: ControlRegs::CR4_PAE,
        efer: ControlRegs::EFER_LME | ControlRegs::EFER_LMA | ControlRegs::EFER_NXE,
        ..ControlRegs::default()
    }
}

fn features() -> CpuFeatures {
    CpuFeatures {
        maxphyaddr: 40,
        gbpages: true,
        pse36: true,
        vendor: Vendor::Intel,
    }
}

fn run(
    regs: &ControlRegs,
    f: &CpuFeatures,
    mem: &GuestMemoryMmap,
    gva: u64,
    access: Access,
) -> Result<Translation, WalkError> {
    PagingContext::new(regs, f)
        .unwrap()
        .walk(mem, gva, access, WalkMode::Update)
}

/// The #PF error code of a walk that must fault, checking CR2 too.
fn pf(regs: &ControlRegs, f: &CpuFeatures, mem: &GuestMemoryMmap, gva: u64, access: Access) -> u32 {
    match run(regs, f, mem, gva, access) {
        Err(WalkError::PageFault {
            error_code,
            address,
        }) => {
            assert_eq!(address, gva, "faulting address");
            error_code.bits()
        }
        other => panic!("expected #PF, got {other:?}"),
    }
}

fn pf4(mem: &GuestMemoryMmap, access: Access) -> u32 {
    pf(&regs4(), &features(), mem, GVA, access)
}

fn ok4(mem: &GuestMemoryMmap, access: Access) -> Translation {
    run(&regs4(), &features(), mem, GVA, access).unwrap()
}

// §3.3.7.1 / §4.5: IA-32e linear addresses must be canonical at 48 bits
// (4-level) or 57 bits (5-level); otherwise #GP/#SS, not #PF.
#[test]
fn non_canonical_is_not_a_page_fault() {
    let mem = tables4();
    let err = run(
        &regs4(),
        &features(),
        &mem,
        0x0000_8000_0000_0000,
        Access::read(R),
    );
    assert!(matches!(
        err,
        Err(WalkError::NonCanonical {
            address: 0x0000_8000_0000_0000
        })
    ));
    // Canonical at 57 bits: fine for 5-level (walks, and faults with P=0).
    let mut regs = regs4();
    regs.cr4 |= ControlRegs::CR4_LA57;
    regs.cr3 = PML5;
    assert_eq!(
        pf(
            &regs,
            &features(),
            &mem,
            0x0000_8000_0000_0000,
            Access::read(R)
        ),
        0
    );
    let err = run(
        &regs,
        &features(),
        &mem,
        0x0100_0000_0000_0000,
        Access::read(R),
    );
    assert!(matches!(err, Err(WalkError::NonCanonical { .. })));
    // The upper half is canonical.
    assert_eq!(
        pf(
            &regs4(),
            &features(),
            &mem,
            0xffff_8000_0000_0000,
            Access::read(R)
        ),
        0
    );
}

// §4.5 with 5-level paging: the PML5E is walked too.
#[test]
fn five_level_walk() {
    let mem = tables4();
    let mut regs = regs4();
    regs.cr4 |= ControlRegs::CR4_LA57;
    regs.cr3 = PML5;
    let t = run(&regs, &features(), &mem, GVA, Access::read(R)).unwrap();
    assert_eq!(t.gpa, PAGE | 0xabc);
    assert_eq!(t.entries.len(), 5);
    assert_eq!(t.entries[0].level, 5);
    // §4.5.4, Table 4-13 (PML5E): PS is reserved.
    put(&mem, PML5E_AT, PML4 | P | RW | US | PS);
    assert_eq!(pf(&regs, &features(), &mem, GVA, Access::read(R)), 0b1001);
}

// §4.7: P = 0 when the fault is a not-present page, with W/R and U/S from
// the access.
#[test]
fn not_present_error_codes() {
    let mem = tables4();
    put(&mem, PTE_AT, PAGE);
    assert_eq!(pf4(&mem, Access::read(R)), 0b000);
    assert_eq!(pf4(&mem, Access::write(U)), 0b110);
    // Implicit supervisor accesses report U/S = 0.
    assert_eq!(
        pf4(&mem, Access::write(Privilege::SupervisorImplicit)),
        0b010
    );
    // A not-present entry's other bits do not matter (no RSVD).
    put(&mem, PDE_AT, 0xffff_ffff_ffff_fffe);
    assert_eq!(pf4(&mem, Access::read(R)), 0b000);
}

// §4.5.4 (Tables 4-15 to 4-20): bits 51:MAXPHYADDR are reserved.
#[test]
fn reserved_above_maxphyaddr() {
    let mem = tables4();
    put(&mem, PTE_AT, PAGE | P | RW | US | 1 << 40);
    assert_eq!(pf4(&mem, Access::read(U)), 0b1101);
    let mut f = features();
    f.maxphyaddr = 41;
    assert_eq!(
        run(&regs4(), &f, &mem, GVA, Access::read(R)).unwrap().gpa,
        1 << 40 | PAGE | 0xabc
    );
    // Also in a non-leaf entry.
    put(&mem, PTE_AT, PAGE | P);
    put(&mem, PML4E_AT, PDPT | P | RW | US | 1 << 51);
    assert_eq!(pf4(&mem, Access::write(R)), 0b1011);
}

// §4.5.4: bit 63 (XD) is reserved unless IA32_EFER.NXE = 1.
#[test]
fn xd_reserved_without_nxe() {
    let mem = tables4();
    put(&mem, PDE_AT, PT | P | RW | US | XD);
    let mut regs = regs4();
    regs.efer &= !ControlRegs::EFER_NXE;
    // I/D is not reported without NXE or SMEP (§4.7).
    assert_eq!(pf(&regs, &features(), &mem, GVA, Access::fetch(R)), 0b01001);
    // With NXE it is an execute-disable protection fault with I/D.
    assert_eq!(pf4(&mem, Access::fetch(R)), 0b10001);
}

// §4.5.4, Tables 4-14/4-15: PS is reserved in PML4Es (and PML5Es).
#[test]
fn ps_reserved_in_pml4e() {
    let mem = tables4();
    put(&mem, PML4E_AT, PDPT | P | RW | US | PS);
    assert_eq!(pf4(&mem, Access::read(R)), 0b1001);
}

// §4.5.4, Table 4-16: a 1-GByte page needs CPUID.80000001H:EDX.Page1GB,
// else PS is reserved in the PDPTE; bits 29:13 of the leaf are reserved.
#[test]
fn one_gib_pages() {
    let mem = tables4();
    put(&mem, PDPTE_AT, 0x4000_0000 | 1 << 12 | P | RW | US | PS);
    let t = ok4(&mem, Access::read(R));
    assert_eq!(t.page_size, PageSize::Size1G);
    assert_eq!(t.gpa, 0x4000_0000 | (GVA & 0x3fff_ffff));
    let mut f = features();
    f.gbpages = false;
    assert_eq!(pf(&regs4(), &f, &mem, GVA, Access::read(R)), 0b1001);
    put(&mem, PDPTE_AT, 0x4000_0000 | 1 << 13 | P | RW | US | PS);
    assert_eq!(pf4(&mem, Access::read(R)), 0b1001);
    put(&mem, PDPTE_AT, 0x4000_0000 | 1 << 29 | P | RW | US | PS);
    assert_eq!(pf4(&mem, Access::read(R)), 0b1001);
}

// §4.5.4, Table 4-18: bits 20:13 of a 2-MByte leaf are reserved (bit 12
// is PAT).
#[test]
fn two_mib_pages() {
    let mem = tables4();
    put(&mem, PDE_AT, 0x60_0000 | 1 << 12 | P | RW | US | PS);
    let t = ok4(&mem, Access::write(U));
    assert_eq!(
        (t.page_size, t.gpa),
        (PageSize::Size2M, 0x60_0000 | (GVA & 0x1f_ffff))
    );
    put(&mem, PDE_AT, 0x60_0000 | 1 << 20 | P | RW | US | PS);
    assert_eq!(pf4(&mem, Access::write(U)), 0b1111);
}

// AMD APM Vol. 2 §5.3.3 (and KVM): bit 8 of PML4Es is reserved on AMD.
#[test]
fn amd_reserves_bit8_in_pml4e() {
    let mem = tables4();
    put(&mem, PML4E_AT, PDPT | P | RW | US | 1 << 8);
    assert!(ok4(&mem, Access::read(R)).gpa != 0);
    let mut f = features();
    f.vendor = Vendor::Amd;
    assert_eq!(pf(&regs4(), &f, &mem, GVA, Access::read(R)), 0b1001);
}

// §4.6.1: R/W is ANDed over all levels; U/S too.
#[test]
fn rights_and_across_levels() {
    let mem = tables4();
    put(&mem, PDPTE_AT, PD | P | US);
    assert_eq!(pf4(&mem, Access::write(U)), 0b111);
    assert!(!ok4(&mem, Access::read(U)).writable);
    put(&mem, PDPTE_AT, PD | P | RW);
    assert_eq!(pf4(&mem, Access::read(U)), 0b101);
    assert!(!ok4(&mem, Access::read(R)).user);
}

// §4.6.1: XD is ORed over all levels (with NXE).
#[test]
fn xd_ors_across_levels() {
    let mem = tables4();
    put(&mem, PML4E_AT, PDPT | P | RW | US | XD);
    assert_eq!(pf4(&mem, Access::fetch(U)), 0b10101);
    assert!(!ok4(&mem, Access::read(U)).executable);
}

// §4.6.1: with CR0.WP = 0 supervisor writes ignore R/W; user writes do not.
#[test]
fn cr0_wp() {
    let mem = tables4();
    put(&mem, PTE_AT, PAGE | P | US);
    assert_eq!(pf4(&mem, Access::write(R)), 0b011);
    let mut regs = regs4();
    regs.cr0 &= !ControlRegs::CR0_WP;
    let t = run(&regs, &features(), &mem, GVA, Access::write(R)).unwrap();
    // The dirty bit is set even though the page is read-only (§4.8).
    assert_eq!(t.entries.leaf().unwrap().value & D, D);
    assert_eq!(pf(&regs, &features(), &mem, GVA, Access::write(U)), 0b111);
}

// §4.6.1: SMEP forbids supervisor fetches from user-mode pages, and makes
// I/D reported even without NXE (§4.7).
#[test]
fn smep() {
    let mem = tables4();
    let mut regs = regs4();
    regs.cr4 |= ControlRegs::CR4_SMEP;
    regs.efer &= !ControlRegs::EFER_NXE;
    assert_eq!(pf(&regs, &features(), &mem, GVA, Access::fetch(R)), 0b10001);
    // Supervisor pages and user fetches are unaffected.
    assert!(run(&regs, &features(), &mem, GVA, Access::fetch(U)).is_ok());
    put(&mem, PTE_AT, PAGE | P | RW);
    assert!(run(&regs, &features(), &mem, GVA, Access::fetch(R)).is_ok());
}

// §4.6.1: SMAP forbids supervisor data accesses to user-mode pages unless
// EFLAGS.AC = 1 on an explicit access; implicit accesses are always blocked.
#[test]
fn smap() {
    let mem = tables4();
    let mut regs = regs4();
    regs.cr4 |= ControlRegs::CR4_SMAP;
    let f = features();
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::read(R)), 0b001);
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::write(R)), 0b011);
    assert!(run(&regs, &f, &mem, GVA, Access::read(R).with_ac(true)).is_ok());
    let implicit = Access::read(Privilege::SupervisorImplicit).with_ac(true);
    assert_eq!(pf(&regs, &f, &mem, GVA, implicit), 0b001);
    // AC does not lift CR0.WP on read-only user pages.
    put(&mem, PTE_AT, PAGE | P | US);
    assert_eq!(
        pf(&regs, &f, &mem, GVA, Access::write(R).with_ac(true)),
        0b011
    );
    // Fetches are SMEP's business, not SMAP's.
    assert!(run(&regs, &f, &mem, GVA, Access::fetch(R)).is_ok());
}

// §4.6.2: PKRU governs user-mode pages with CR4.PKE: AD blocks data
// accesses, WD blocks user writes and supervisor writes with CR0.WP = 1;
// fetches are exempt; PK is reported (§4.7).
#[test]
fn protection_keys_user() {
    let mem = tables4();
    put(&mem, PTE_AT, PAGE | P | RW | US | 5 << 59);
    let mut regs = regs4();
    regs.cr4 |= ControlRegs::CR4_PKE;
    let f = features();
    regs.pkru = 1 << 10; // AD5
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::read(U)), 0b100101);
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::read(R)), 0b100001);
    assert_eq!(
        run(&regs, &f, &mem, GVA, Access::fetch(U)).unwrap().pkey,
        Some(5)
    );
    regs.pkru = 1 << 11; // WD5
    assert!(run(&regs, &f, &mem, GVA, Access::read(U)).is_ok());
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::write(U)), 0b100111);
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::write(R)), 0b100011);
    regs.cr0 &= !ControlRegs::CR0_WP;
    assert!(run(&regs, &f, &mem, GVA, Access::write(R)).is_ok());
    // PKRS does not apply to user pages; PKE off means no keys.
    regs.cr4 &= !ControlRegs::CR4_PKE;
    regs.cr4 |= ControlRegs::CR4_PKS;
    regs.pkrs = u32::MAX;
    assert_eq!(
        run(&regs, &f, &mem, GVA, Access::write(U)).unwrap().pkey,
        None
    );
}

// §4.6.2: IA32_PKRS governs supervisor-mode pages with CR4.PKS.
#[test]
fn protection_keys_supervisor() {
    let mem = tables4();
    put(&mem, PTE_AT, PAGE | P | RW | 3 << 59);
    let mut regs = regs4();
    regs.cr4 |= ControlRegs::CR4_PKS;
    regs.pkrs = 1 << 6; // AD3
    let f = features();
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::read(R)), 0b100001);
    assert!(run(&regs, &f, &mem, GVA, Access::fetch(R)).is_ok());
    regs.pkrs = 1 << 7; // WD3
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::write(R)), 0b100011);
    // A user access faults on the U/S rule; PK is still reported because
    // AD/WD deny it too (§4.7 lists the PK conditions independently).
    assert_eq!(pf(&regs, &f, &mem, GVA, Access::write(U)), 0b100111);
}

// §4.6.2: protection keys exist only in IA-32e paging.
#[test]
fn no_protection_keys_in_pae() {
    let mem = memory();
    put(&mem, 0x1000, PD | P);
    put(&mem, PD + 8, PT | P | RW | US);
    put(&mem, PTE_AT, PAGE | P | RW | US);
    let regs = ControlRegs {
        cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG | ControlRegs::CR0_WP,
        cr3: 0x1000,
        cr4: ControlRegs::CR4_PAE | ControlRegs::CR4_PKE,
        pkru: u32::MAX,
        pdptrs: PagingContext::load_pdptrs(&mem, 0x1000).unwrap(),
        ..ControlRegs::default()
    };
    let t = run(
        &regs,
        &features(),
        &mem,
        GVA & 0x3fff_ffff,
        Access::write(U),
    )
    .unwrap();
    assert_eq!((t.gpa, t.pkey), (PAGE | 0xabc, None));
}

// §4.4.1: PDPTEs come from the PDPTE registers; a present PDPTE with
// reserved bits makes the CR3 load fail; PDE/PTE bits 62:M are reserved.
#[test]
fn pae_rules() {
    let mem = memory();
    let regs = |pdptrs| ControlRegs {
        cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG | ControlRegs::CR0_WP,
        cr3: 0x1020,
        cr4: ControlRegs::CR4_PAE,
        efer: ControlRegs::EFER_NXE,
        pdptrs,
        ..ControlRegs::default()
    };
    let f = features();
    for bad in [RW, US, 1 << 5, 1 << 8, 1 << 40, XD] {
        let err = PagingContext::new(&regs([0, PD | P | bad, 0, 0]), &f).unwrap_err();
        assert!(
            matches!(err, PagingError::PdpteReserved { index: 1, .. }),
            "{bad:#x}"
        );
    }
    // A not-present PDPTE may hold anything.
    assert!(PagingContext::new(&regs([u64::MAX - 1, 0, 0, 0]), &f).is_ok());
    let r = regs([0, PD | P, 0, 0]);
    let gva = 0x4020_3abc;
    put(&mem, PDE_AT, PT | P | RW | US);
    put(&mem, PTE_AT, PAGE | P | RW | US);
    let t = run(&r, &f, &mem, gva, Access::write(U)).unwrap();
    assert_eq!(t.gpa, PAGE | 0xabc);
    // The PDPTE gets no accessed bit: it is a register.
    assert_eq!(t.entries[0].value, PD | P);
    assert_eq!(pf(&r, &f, &mem, 0x0020_3abc, Access::read(U)), 0b100);
    // Bits 62:M are reserved in PAE entries (unlike 4-level's 51:M).
    put(&mem, PTE_AT, PAGE | P | RW | US | 1 << 55);
    assert_eq!(pf(&r, &f, &mem, gva, Access::read(U)), 0b1101);
    // 2 MiB leaves: bits 20:13 reserved.
    put(&mem, PDE_AT, 0x20_0000 | 1 << 13 | P | RW | US | PS);
    assert_eq!(pf(&r, &f, &mem, gva, Access::read(U)), 0b1101);
    // I/D is reported with PAE and NXE (§4.7).
    put(&mem, PDE_AT, 0x20_0000 | P | RW | US | PS | XD);
    assert_eq!(pf(&r, &f, &mem, gva, Access::fetch(U)), 0b10101);
}

// §4.3, Table 4-4: 32-bit paging 4-MByte pages with PSE; PSE-36 puts
// physical-address bits (M-1):32 in bits (M-20):13, M = min(MAXPHYADDR, 40);
// bits 21:(M-19) are reserved. Without CR4.PSE, PS is ignored.
#[test]
fn bits32_pse_and_pse36() {
    let mem = memory();
    let gva: u64 = 0x0080_3abc; // PDE 2, PTE 3
    let pde_at = 0x1000 + 2 * 4;
    let put32 = |at: u64, v: u32| mem.write_obj(v, GuestAddress(at)).unwrap();
    let mut regs = ControlRegs {
        cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG | ControlRegs::CR0_WP,
        cr3: 0x1000,
        cr4: ControlRegs::CR4_PSE,
        efer: ControlRegs::EFER_NXE,
        ..ControlRegs::default()
    };
    let mut f = features();
    f.maxphyaddr = 36;
    // 4 MiB page at 0x3_0040_0000 (bits 35:32 = 3 in PDE bits 16:13).
    put32(pde_at, 0x0040_0000 | 3 << 13 | (P | RW | US | PS) as u32);
    let t = run(&regs, &f, &mem, gva, Access::read(U)).unwrap();
    assert_eq!(
        (t.page_size, t.gpa),
        (PageSize::Size4M, 0x3_0040_0000 | (gva & 0x3f_ffff))
    );
    // Bit 17 is reserved with MAXPHYADDR 36 (but not with 40).
    put32(pde_at, 0x0040_0000 | 1 << 17 | (P | RW | US | PS) as u32);
    // No I/D without SMEP in 32-bit paging, even with NXE (§4.7).
    assert_eq!(pf(&regs, &f, &mem, gva, Access::fetch(U)), 0b1101);
    f.maxphyaddr = 40;
    assert_eq!(
        run(&regs, &f, &mem, gva, Access::read(U)).unwrap().gpa >> 32,
        0x10
    );
    // Bit 21 is always reserved; without PSE-36, all of 21:13 are.
    put32(pde_at, 0x0040_0000 | 1 << 21 | (P | RW | US | PS) as u32);
    assert_eq!(pf(&regs, &f, &mem, gva, Access::read(R)), 0b1001);
    put32(pde_at, 0x0040_0000 | 1 << 13 | (P | RW | US | PS) as u32);
    f.pse36 = false;
    assert_eq!(pf(&regs, &f, &mem, gva, Access::read(R)), 0b1001);
    // Without CR4.PSE the PDE references a page table.
    regs.cr4 = 0;
    put32(pde_at, 0x2000 | (P | RW | US | PS) as u32);
    put32(0x2000 + 3 * 4, 0x5000 | (P | RW | US) as u32);
    let t = run(&regs, &f, &mem, gva, Access::read(U)).unwrap();
    assert_eq!((t.page_size, t.gpa), (PageSize::Size4K, 0x5abc));
    // The 32-bit entries get A (and D) as 32-bit values.
    let t = run(&regs, &f, &mem, gva, Access::write(U)).unwrap();
    assert_eq!(t.entries[1].value, 0x5000 | P | RW | US | A | D);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x2000 + 3 * 4)).unwrap(),
        0x5067
    );
}

// §4.8: A is set in every entry used, D only in the leaf and only on a
// write; a faulting access writes nothing; a probe writes nothing.
#[test]
fn accessed_and_dirty() {
    let mem = tables4();
    let probe = PagingContext::new(&regs4(), &features())
        .unwrap()
        .walk(&mem, GVA, Access::write(U), WalkMode::Probe)
        .unwrap();
    assert_eq!(probe.entries.leaf().unwrap().value & (A | D), 0);
    assert_eq!(get(&mem, PTE_AT) & (A | D), 0);

    let t = ok4(&mem, Access::read(U));
    for at in [PML4E_AT, PDPTE_AT, PDE_AT, PTE_AT] {
        assert_eq!(get(&mem, at) & (A | D), A, "entry at {at:#x}");
    }
    assert_eq!(t.entries.len(), 4);
    assert_eq!(t.entries[3].value, get(&mem, PTE_AT));

    ok4(&mem, Access::write(U));
    assert_eq!(get(&mem, PTE_AT) & D, D);
    assert_eq!(get(&mem, PDE_AT) & D, 0);

    // 2 MiB leaf: D lands in the PDE.
    put(&mem, PDE_AT, 0x20_0000 | P | RW | US | PS);
    ok4(&mem, Access::write(U));
    assert_eq!(get(&mem, PDE_AT) & (A | D), A | D);

    // A fault leaves the tables untouched.
    let mem = tables4();
    put(&mem, PTE_AT, PAGE | P | US);
    assert_eq!(pf4(&mem, Access::write(U)), 0b111);
    assert_eq!(get(&mem, PML4E_AT) & A, 0);
    assert_eq!(get(&mem, PTE_AT) & A, 0);
}

// Paging structures outside guest memory are a typed error, not a panic.
#[test]
fn entry_outside_memory() {
    let mem = tables4();
    put(&mem, PDE_AT, (1 << 30) | P | RW | US);
    let err = run(&regs4(), &features(), &mem, GVA, Access::read(R)).unwrap_err();
    assert!(matches!(err, WalkError::Memory { level: 1, gpa, .. } if gpa == (1 << 30) + 3 * 8));
}

// §4.1.1 / §2.5: invalid register combinations are refused.
#[test]
fn invalid_contexts() {
    let f = features();
    let mut regs = regs4();
    regs.cr4 = 0;
    assert!(matches!(
        PagingContext::new(&regs, &f),
        Err(PagingError::LongModeWithoutPae { .. })
    ));
    let mut regs = regs4();
    regs.cr0 &= !ControlRegs::CR0_PE;
    assert!(matches!(
        PagingContext::new(&regs, &f),
        Err(PagingError::PagingWithoutProtection { .. })
    ));
    let mut regs = regs4();
    regs.cr3 |= 1 << 45;
    assert!(matches!(
        PagingContext::new(&regs, &f),
        Err(PagingError::Cr3Reserved { .. })
    ));
    let mut f2 = f;
    f2.maxphyaddr = 53;
    assert!(matches!(
        PagingContext::new(&regs4(), &f2),
        Err(PagingError::InvalidMaxPhyAddr(53))
    ));
}

// Paging off: linear = physical (32 bits), no faults.
#[test]
fn paging_disabled() {
    let mem = memory();
    let regs = ControlRegs::default();
    let t = run(&regs, &features(), &mem, 0x1_2345_6789, Access::fetch(U)).unwrap();
    assert_eq!(t.gpa, 0x2345_6789);
}

#[test]
fn error_code_accessors() {
    let code = PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::PK;
    assert!(code.present() && code.write() && code.protection_key());
    assert!(!code.user() && !code.reserved() && !code.fetch());
    assert_eq!(code.bits(), 0x23);
    assert_eq!(code.to_string(), "0x23 [P W PK]");
    assert_eq!(PfErrorCode::from_bits(0x23), code);
}

// A self-referencing PML4 (recursive mapping): one entry serves all four
// levels; the A/D updates must not lose races against themselves (§4.8).
#[test]
fn self_referencing_tables() {
    let mem = memory();
    put(&mem, PML4, PML4 | P | RW | US);
    let t = ok4_at(&mem, 0x123, Access::write(U));
    assert_eq!(t.gpa, PML4 | 0x123);
    assert_eq!(t.entries.len(), 4);
    assert!(t.entries.iter().all(|e| e.gpa == PML4));
    assert_eq!(get(&mem, PML4), PML4 | P | RW | US | A | D);
}

fn ok4_at(mem: &GuestMemoryMmap, gva: u64, access: Access) -> Translation {
    run(&regs4(), &features(), mem, gva, access).unwrap()
}
