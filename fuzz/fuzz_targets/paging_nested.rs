//! Two-dimensional (nested) walks over arbitrary memory, EPTP/nCR3,
//! stage-2 capabilities, guest control registers and addresses. Checks that
//! nothing panics; that the work is bounded (memory references per walk)
//! and no walk reports contention without a concurrent writer; that probe
//! walks write nothing and updating walks only set accessed/dirty bits; and
//! that a successful walk which changed no memory is reproduced exactly by
//! a probe re-walk and by a direct stage-2 probe of its guest-physical
//! address, and (NPT) that every guest entry it read is mapped for a
//! nested user write. Alongside, [`walk_2d_cached`] with one
//! [`Stage2Tlb`] kept across all walks runs on a copy of the memory: as no
//! stage-2 entry changes but for the walks' own accessed/dirty updates, it
//! must return what `walk_2d` returns (all but statistics and the stage-2
//! entry list) and leave the same memory.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_memory::paging::{
    walk_2d, walk_2d_cached, Access, AccessKind, ControlRegs, CpuFeatures, EptCapabilities,
    EptContext, NestedWalkError, NptContext, NptHost, PagingContext, PagingMode, Privilege,
    Stage2Access, Stage2Context, Stage2Tlb, Vendor, WalkMode, MAX_AD_RETRIES,
};
use vmkit_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;

#[derive(Arbitrary, Debug)]
struct Walk {
    gva: u64,
    kind: u8,
    privilege: u8,
    ac: bool,
    probe: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    npt: bool,
    /// EPTP or nCR3.
    root: u64,
    /// EPT capabilities / NPT host settings, one bit each.
    stage2_flags: u8,
    stage2_maxphyaddr: u8,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    pdptrs: [u64; 4],
    maxphyaddr: u8,
    guest_flags: u8,
    /// Start of a second RAM region (page-aligned, above the first).
    second_region: u32,
    walks: Vec<Walk>,
    memory: Vec<u8>,
}

fn snapshot(memory: &GuestMemoryMmap, base: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; MEM];
    memory.read_slice(&mut bytes, GuestAddress(base)).unwrap();
    bytes
}

/// Upper bound on the memory references of one 2-D walk: each stage-2
/// translation reads and writes at most 5 entries per attempt; each stage-1
/// attempt reads and writes at most 5 entries, each through one stage-2
/// translation; the final address needs one more.
const STAGE2_MAX: u32 = MAX_AD_RETRIES as u32 * 10;
const WALK_MAX: u32 = MAX_AD_RETRIES as u32 * 10 * (1 + STAGE2_MAX) + STAGE2_MAX;

fuzz_target!(|input: Input| {
    let second = (u64::from(input.second_region) << 12).max(MEM as u64);
    let memory =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM), (GuestAddress(second), MEM)])
            .unwrap();
    for (i, chunk) in input.memory.chunks(MEM).take(2).enumerate() {
        let base = if i == 0 { 0 } else { second };
        memory.write_slice(chunk, GuestAddress(base)).unwrap();
    }
    // The copy walked by walk_2d_cached, and its cache.
    let mirror =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM), (GuestAddress(second), MEM)])
            .unwrap();
    for base in [0, second] {
        mirror
            .write_slice(&snapshot(&memory, base), GuestAddress(base))
            .unwrap();
    }
    let mut tlb = Stage2Tlb::new();
    let flag = |n: u32| (input.stage2_flags >> n) & 1 == 1;
    let stage2 = if input.npt {
        let host = NptHost {
            nxe: flag(0),
            gbpages: flag(1),
            maxphyaddr: input.stage2_maxphyaddr,
            five_level: flag(2),
        };
        match NptContext::new(input.root, &host) {
            Ok(ctx) => Stage2Context::Npt(ctx),
            Err(_) => return,
        }
    } else {
        let caps = EptCapabilities {
            execute_only: flag(0),
            pages_2m: flag(1),
            pages_1g: flag(2),
            accessed_dirty: flag(3),
            five_level: flag(4),
            maxphyaddr: input.stage2_maxphyaddr,
        };
        match EptContext::new(input.root, &caps) {
            Ok(ctx) => Stage2Context::Ept(ctx),
            Err(_) => return,
        }
    };
    let g = |n: u32| (input.guest_flags >> n) & 1 == 1;
    let mut regs = ControlRegs {
        cr0: input.cr0,
        cr3: input.cr3,
        cr4: input.cr4,
        efer: input.efer,
        pkru: 0,
        pkrs: 0,
        pdptrs: input.pdptrs,
    };
    if g(4) {
        // PAE PDPTEs loaded through stage 2, as MOV CR3 would.
        match stage2.load_pdptrs(&memory, input.cr3, WalkMode::Probe) {
            Ok(pdptrs) => regs.pdptrs = pdptrs,
            Err(e) => assert!(!matches!(e, NestedWalkError::Contended { .. }), "{e}"),
        }
    }
    let features = CpuFeatures {
        maxphyaddr: input.maxphyaddr,
        gbpages: g(0),
        pse36: g(1),
        vendor: if g(2) { Vendor::Amd } else { Vendor::Intel },
    };
    let Ok(guest) = PagingContext::new(&regs, &features) else {
        return;
    };
    for w in input.walks.iter().take(32) {
        let kind = match w.kind % 3 {
            0 => AccessKind::Read,
            1 => AccessKind::Write,
            _ => AccessKind::Fetch,
        };
        let privilege = match w.privilege % 3 {
            0 => Privilege::User,
            1 => Privilege::Supervisor,
            _ => Privilege::SupervisorImplicit,
        };
        let access = Access {
            kind,
            privilege,
            ac: w.ac,
        };
        let mode = if w.probe {
            WalkMode::Probe
        } else {
            WalkMode::Update
        };
        let before = [snapshot(&memory, 0), snapshot(&memory, second)];
        let mut stats = Default::default();
        let result = vmkit_memory::paging::walk_2d_counted(
            &guest, &stage2, &memory, w.gva, access, mode, &mut stats,
        );
        assert!(stats.references() <= WALK_MAX, "{stats:?}");
        if let Err(e) = &result {
            assert!(
                !matches!(e, NestedWalkError::Contended { .. }),
                "contention without a concurrent writer: {e}"
            );
        }
        let after = [snapshot(&memory, 0), snapshot(&memory, second)];
        let cached = walk_2d_cached(&guest, &stage2, &mirror, &mut tlb, w.gva, access, mode);
        let essence = |r: &Result<vmkit_memory::paging::NestedTranslation, NestedWalkError>| match r
        {
            Ok(t) => {
                let mut s2 = t.stage2;
                s2.entries = Default::default();
                format!("{:#x} {:?} {:?}", t.hpa, t.stage1, s2)
            }
            Err(e) => format!("{e:?}"),
        };
        assert_eq!(
            essence(&cached),
            essence(&result),
            "cached and uncached walks differ"
        );
        assert!(
            after == [snapshot(&mirror, 0), snapshot(&mirror, second)],
            "cached and uncached walks wrote differently"
        );
        let mut changed = false;
        for (old, new) in before.iter().zip(&after) {
            for (i, (&o, &n)) in old.iter().zip(new).enumerate() {
                if o == n {
                    continue;
                }
                changed = true;
                assert!(!w.probe, "memory written by a probe walk: {result:?}");
                // Guest A/D (bits 5, 6), NPT A/D (same) or EPT A/D (bits 8,
                // 9): only ever set.
                let allowed = match i % 4 {
                    0 => 0x60,
                    1 if i % 8 == 1 => 0x03,
                    _ => 0,
                };
                assert!(
                    o & !n == 0 && (n & !o) & !allowed == 0,
                    "byte {i}: {o:#x} -> {n:#x}"
                );
            }
        }
        if let (Ok(t), false) = (&result, changed) {
            let again = walk_2d(&guest, &stage2, &memory, w.gva, access, WalkMode::Probe)
                .expect("a probe re-walk of a successful walk succeeds");
            assert_eq!(
                (again.hpa, again.stage1.gpa, again.stage2.page_size),
                (t.hpa, t.stage1.gpa, t.stage2.page_size)
            );
            let gla = if guest.mode().is_long() {
                w.gva
            } else {
                w.gva & 0xffff_ffff
            };
            let direct = stage2
                .translate(
                    &memory,
                    t.stage1.gpa,
                    Stage2Access::Data(kind),
                    Some(gla),
                    WalkMode::Probe,
                )
                .expect("stage 2 maps the final guest-physical address");
            assert_eq!(direct.hpa, t.hpa);
            assert_eq!(direct.entries, t.stage2.entries);
            // Under NPT every guest entry the walk read was a nested user
            // write (APM §15.25.5): probing it as a guest-table access
            // succeeds and finds the nested mapping writable. PAE PDPTEs
            // come from registers, not through stage 2.
            if matches!(stage2, Stage2Context::Npt(_)) {
                for e in t.stage1.entries.iter() {
                    if guest.mode() == PagingMode::Pae && e.level == 3 {
                        continue;
                    }
                    let table = stage2
                        .translate(
                            &memory,
                            e.gpa,
                            Stage2Access::TableRead,
                            Some(gla),
                            WalkMode::Probe,
                        )
                        .expect("stage 2 maps every guest entry the walk read");
                    assert!(table.writable, "guest entry at {:#x}", e.gpa);
                }
            }
        }
    }
});
