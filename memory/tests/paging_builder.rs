//! Page-table builders: random map/unmap/protect sequences against a simple
//! model, checked by walking the result; plus the typed errors.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    Access, BuildError, CpuFeatures, PageFlags, PageSize, PageTableBuilder, PagingContext,
    Privilege, TableFormat, WalkError, WalkMode,
};

const AREA: u64 = 0x10_0000;
const AREA_LEN: u64 = 0x40_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Map {
        slot: u64,
        size: u8,
        gpa: u64,
        flags: (bool, bool, bool, u8),
    },
    Unmap(usize),
    Protect(usize, (bool, bool, bool, u8)),
}

fn op() -> impl Strategy<Value = Op> {
    let flags = (any::<bool>(), any::<bool>(), any::<bool>(), 0u8..16);
    prop_oneof![
        6 => (any::<u64>(), 0u8..3, any::<u64>(), flags.clone())
            .prop_map(|(slot, size, gpa, flags)| Op::Map { slot, size, gpa, flags }),
        1 => any::<usize>().prop_map(Op::Unmap),
        1 => (any::<usize>(), flags).prop_map(|(i, f)| Op::Protect(i, f)),
    ]
}

fn format_of(n: u8) -> TableFormat {
    match n % 4 {
        0 => TableFormat::Bits32,
        1 => TableFormat::Pae,
        2 => TableFormat::Level4,
        _ => TableFormat::Level5,
    }
}

fn sizes(format: TableFormat) -> &'static [PageSize] {
    match format {
        TableFormat::Bits32 => &[PageSize::Size4K, PageSize::Size4M],
        TableFormat::Pae => &[PageSize::Size4K, PageSize::Size2M],
        _ => &[PageSize::Size4K, PageSize::Size2M, PageSize::Size1G],
    }
}

/// A virtual address from a small space, so that pages collide often.
fn gva_of(format: TableFormat, slot: u64) -> u64 {
    let pick = |shift: u32, n: u64| (slot >> shift) % n;
    match format {
        TableFormat::Bits32 => pick(0, 3) << 22 | pick(8, 6) << 12 | pick(16, 2) << 31,
        TableFormat::Pae => pick(0, 2) << 30 | pick(8, 3) << 21 | pick(16, 6) << 12,
        TableFormat::Level4 | TableFormat::Level5 => {
            let top = if format == TableFormat::Level5 {
                48
            } else {
                39
            };
            let gva = pick(0, 2) << top | pick(8, 3) << 30 | pick(16, 3) << 21 | pick(24, 6) << 12;
            // Half of them in the upper (negative) half.
            if pick(32, 2) == 1 {
                let width = if format == TableFormat::Level5 {
                    57
                } else {
                    48
                };
                gva | !0u64 << (width - 1)
            } else {
                gva
            }
        }
    }
}

fn flags_of(
    format: TableFormat,
    (writable, user, executable, pkey): (bool, bool, bool, u8),
) -> PageFlags {
    let long = matches!(format, TableFormat::Level4 | TableFormat::Level5);
    PageFlags {
        writable,
        user,
        executable: executable || format == TableFormat::Bits32,
        pkey: if long { pkey } else { 0 },
    }
}

#[derive(Debug, Clone, Copy)]
struct Mapped {
    gva: u64,
    gpa: u64,
    size: PageSize,
    flags: PageFlags,
}

fn overlaps(a: &Mapped, gva: u64, size: PageSize) -> bool {
    a.gva < gva.wrapping_add(size.bytes()) && gva < a.gva.wrapping_add(a.size.bytes())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Whatever map/unmap/protect did, a walk finds exactly the model's
    /// pages with their rights, and unmapped addresses fault with P = 0.
    #[test]
    fn builder_then_walk(format in any::<u8>().prop_map(format_of),
                         ops in prop::collection::vec(op(), 1..24),
                         probes in prop::collection::vec((any::<u64>(), any::<u32>()), 8)) {
        let mem = memory();
        let mut b = PageTableBuilder::new(&mem, format, GuestAddress(AREA), AREA_LEN).unwrap();
        let mut model: Vec<Mapped> = Vec::new();
        for op in ops {
            match op {
                Op::Map { slot, size, gpa, flags } => {
                    let all = sizes(format);
                    let size = all[size as usize % all.len()];
                    let gva = gva_of(format, slot) & !(size.bytes() - 1);
                    let limit: u64 = match (format, size) {
                        (TableFormat::Bits32, PageSize::Size4M) => 1 << 40,
                        (TableFormat::Bits32, _) => 1 << 32,
                        _ => 1 << 46,
                    };
                    let gpa = (gpa % limit) & !(size.bytes() - 1);
                    let flags = flags_of(format, flags);
                    let result = b.map(gva, gpa, size, flags);
                    if model.iter().any(|m| overlaps(m, gva, size)) {
                        prop_assert!(matches!(result, Err(BuildError::Overlap { .. })), "{:?}", result);
                    } else {
                        prop_assert!(result.is_ok(), "{:?}", result);
                        model.push(Mapped { gva, gpa, size, flags });
                    }
                }
                Op::Unmap(i) if !model.is_empty() => {
                    let m = model.remove(i % model.len());
                    b.unmap(m.gva, m.size).unwrap();
                    let again = b.unmap(m.gva, m.size);
                    prop_assert!(matches!(again, Err(BuildError::NotMapped { .. })), "{:?}", again);
                }
                Op::Protect(i, flags) if !model.is_empty() => {
                    let n = i % model.len();
                    let flags = flags_of(format, flags);
                    b.protect(model[n].gva, model[n].size, flags).unwrap();
                    model[n].flags = flags;
                }
                _ => {}
            }
        }
        let features = CpuFeatures::default();
        let ctx = PagingContext::new(&b.control_regs().unwrap(), &features).unwrap();
        let read = Access::read(Privilege::Supervisor);
        for m in &model {
            for offset in [0, m.size.bytes() / 2 + 8, m.size.bytes() - 1] {
                let t = ctx.walk(&mem, m.gva + offset, read, WalkMode::Probe).unwrap();
                prop_assert_eq!(t.gpa, m.gpa + offset);
                prop_assert_eq!(t.page_size, m.size);
                prop_assert_eq!(t.writable, m.flags.writable);
                prop_assert_eq!(t.user, m.flags.user);
                prop_assert_eq!(t.executable, m.flags.executable);
            }
        }
        for (slot, offset) in probes {
            let gva = gva_of(format, slot) + u64::from(offset) % 4096;
            if model.iter().any(|m| overlaps(m, gva & !0xfff, PageSize::Size4K)) {
                continue;
            }
            match ctx.walk(&mem, gva, read, WalkMode::Probe) {
                Err(WalkError::PageFault { error_code, address }) => {
                    prop_assert!(!error_code.present());
                    prop_assert_eq!(address, gva);
                }
                other => prop_assert!(false, "{:#x} should be unmapped: {:?}", gva, other),
            }
        }
    }
}

#[test]
fn typed_errors() {
    let mem = memory();
    let flags = PageFlags::default();
    assert!(matches!(
        PageTableBuilder::new(&mem, TableFormat::Level4, GuestAddress(0x1001), 0x4000),
        Err(BuildError::InvalidArea { .. })
    ));
    let mut b =
        PageTableBuilder::new(&mem, TableFormat::Level4, GuestAddress(AREA), 0x3000).unwrap();
    assert!(matches!(
        b.map(0x1000, 0x1800, PageSize::Size4K, flags),
        Err(BuildError::Misaligned { .. })
    ));
    assert!(matches!(
        b.map(0x20_1000, 0, PageSize::Size2M, flags),
        Err(BuildError::Misaligned { .. })
    ));
    assert!(matches!(
        b.map(0x0000_8000_0000_0000, 0, PageSize::Size4K, flags),
        Err(BuildError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.map(0, 0, PageSize::Size4M, flags),
        Err(BuildError::UnsupportedPageSize { .. })
    ));
    // Root + PDPT + PD fill the three pages; a PT no longer fits.
    b.map(0x4000_0000, 0x4000_0000, PageSize::Size2M, flags)
        .unwrap();
    assert!(matches!(
        b.map(0x1000, 0x1000, PageSize::Size4K, flags),
        Err(BuildError::OutOfTableSpace { .. })
    ));
    assert!(matches!(
        b.map(0x4000_0000, 0, PageSize::Size1G, flags),
        Err(BuildError::Overlap { .. })
    ));
    assert!(matches!(
        b.map(0x4010_0000, 0, PageSize::Size4K, flags),
        Err(BuildError::Overlap { .. })
    ));
    assert!(matches!(
        b.unmap(0x4000_0000, PageSize::Size4K),
        Err(BuildError::NotMapped { .. })
    ));
    assert_eq!(b.tables_size(), 0x3000);

    let mut b32 =
        PageTableBuilder::new(&mem, TableFormat::Bits32, GuestAddress(AREA), 0x4000).unwrap();
    let nx = PageFlags {
        executable: false,
        ..flags
    };
    assert!(matches!(
        b32.map(0, 0, PageSize::Size4K, nx),
        Err(BuildError::UnsupportedFlags { .. })
    ));
    assert!(matches!(
        b32.map(0x1_0000_0000, 0, PageSize::Size4K, flags),
        Err(BuildError::OutOfRange { .. })
    ));
    b32.map(0x40_0000, 0xff_0040_0000, PageSize::Size4M, flags)
        .unwrap();
}

#[test]
fn emptied_table_can_take_a_large_page() {
    let mem = memory();
    let flags = PageFlags::default();
    let mut b =
        PageTableBuilder::new(&mem, TableFormat::Pae, GuestAddress(AREA), AREA_LEN).unwrap();
    b.map(0x20_3000, 0x9000, PageSize::Size4K, flags).unwrap();
    b.unmap(0x20_3000, PageSize::Size4K).unwrap();
    b.map(0x20_0000, 0x40_0000, PageSize::Size2M, flags)
        .unwrap();
    let ctx = PagingContext::new(&b.control_regs().unwrap(), &CpuFeatures::default()).unwrap();
    let t = ctx
        .walk(
            &mem,
            0x20_3004,
            Access::write(Privilege::Supervisor),
            WalkMode::Update,
        )
        .unwrap();
    assert_eq!((t.gpa, t.page_size), (0x40_3004, PageSize::Size2M));
}
