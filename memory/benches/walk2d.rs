//! Cost of a two-dimensional (nested) walk against the 1-D walk it builds
//! on, in the same process: a 4-level guest over 4-level EPT, with 4 KiB
//! pages in both stages (24 memory references) and 2 MiB pages in both (15).
//!
//! Besides criterion's report, prints
//! `walk2d: 4k=<ns> ns 2m=<ns> ns 1d_4k=<ns> ns 1d_2m=<ns> ns` and one
//! comparison line `compare: walk2d_4k_ns vmkit=<ns> baseline(1-D walk)=<ns>
//! ratio=<2-D / 1-D>` (medians; accessed bits already set, so the walks only
//! read memory). Also the same 4 KiB walk through [`walk_2d_cached`] with a
//! warm [`Stage2Tlb`] (every stage-2 lookup hits: 4 references), printed as
//! `compare: walk2d_cached_4k_ns vmkit=<ns> baseline(walk_2d)=<ns>
//! ratio=<cached / uncached>`.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    walk, walk_2d, walk_2d_cached, Access, CpuFeatures, EptBuilder, EptCapabilities, EptContext,
    EptFlags, PageFlags, PageSize, PageTableBuilder, PagingContext, Privilege, Stage2Context,
    Stage2Tlb, TableFormat, WalkMode,
};

const GVA_4K: u64 = 0x7f12_3456_7000;
const GVA_2M: u64 = 0x7f12_3480_0000;
const MEM: u64 = 8 << 20;

struct Setup {
    memory: GuestMemoryMmap,
    guest: PagingContext,
    ept_4k: Stage2Context,
    ept_2m: Stage2Context,
}

fn setup() -> Setup {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut tables = PageTableBuilder::new(
        &memory,
        TableFormat::Level4,
        GuestAddress(0x10_0000),
        0x10_0000,
    )
    .unwrap();
    let flags = PageFlags::default();
    tables
        .map(GVA_4K, 0x40_0000, PageSize::Size4K, flags)
        .unwrap();
    tables
        .map(GVA_2M, 0x60_0000, PageSize::Size2M, flags)
        .unwrap();
    let guest =
        PagingContext::new(&tables.control_regs().unwrap(), &CpuFeatures::default()).unwrap();
    // Two identity stage-2 maps of all memory: 4 KiB pages and 2 MiB pages.
    let mut small = EptBuilder::new(&memory, false, GuestAddress(0x20_0000), 0x10_0000).unwrap();
    for page in (0..MEM).step_by(4096) {
        small
            .map(page, page, PageSize::Size4K, EptFlags::default())
            .unwrap();
    }
    let mut large = EptBuilder::new(&memory, false, GuestAddress(0x30_0000), 0x1_0000).unwrap();
    for page in (0..MEM).step_by(2 << 20) {
        large
            .map(page, page, PageSize::Size2M, EptFlags::default())
            .unwrap();
    }
    let caps = EptCapabilities::default();
    let ept_4k = Stage2Context::Ept(EptContext::new(small.eptp(false), &caps).unwrap());
    let ept_2m = Stage2Context::Ept(EptContext::new(large.eptp(false), &caps).unwrap());
    let access = Access::read(Privilege::Supervisor);
    // Set the guest's accessed bits once, as a running guest would have.
    for gva in [GVA_4K, GVA_2M] {
        walk_2d(&guest, &ept_4k, &memory, gva, access, WalkMode::Update).unwrap();
    }
    let refs = |ept: &Stage2Context, gva| {
        walk_2d(&guest, ept, &memory, gva, access, WalkMode::Update)
            .unwrap()
            .stats
            .references()
    };
    assert_eq!(refs(&ept_4k, GVA_4K), 24);
    assert_eq!(refs(&ept_2m, GVA_2M), 15);
    Setup {
        memory,
        guest,
        ept_4k,
        ept_2m,
    }
}

/// Median over batches of the time per call of `f`, in nanoseconds.
fn median_ns(mut f: impl FnMut()) -> f64 {
    const BATCH: u32 = 20_000;
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..BATCH {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(BATCH)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let access = Access::read(Privilege::Supervisor);
    let two_d = |ept: &Stage2Context, gva: u64| {
        black_box(
            walk_2d(
                &s.guest,
                ept,
                &s.memory,
                black_box(gva),
                access,
                WalkMode::Update,
            )
            .unwrap(),
        );
    };
    let one_d = |gva: u64| {
        black_box(
            walk(
                &s.guest,
                &s.memory,
                black_box(gva),
                access,
                WalkMode::Update,
            )
            .unwrap(),
        );
    };
    c.bench_function("walk2d_4k_over_4k", |b| b.iter(|| two_d(&s.ept_4k, GVA_4K)));
    c.bench_function("walk2d_2m_over_2m", |b| b.iter(|| two_d(&s.ept_2m, GVA_2M)));
    let mut tlb = Stage2Tlb::new();
    let mut cached = |gva: u64| {
        black_box(
            walk_2d_cached(
                &s.guest,
                &s.ept_4k,
                &s.memory,
                &mut tlb,
                black_box(gva),
                access,
                WalkMode::Update,
            )
            .unwrap(),
        );
    };
    cached(GVA_4K);
    c.bench_function("walk2d_cached_4k_over_4k", |b| b.iter(|| cached(GVA_4K)));
    c.bench_function("walk1d_4k", |b| b.iter(|| one_d(GVA_4K)));
    c.bench_function("walk1d_2m", |b| b.iter(|| one_d(GVA_2M)));

    let w4k = median_ns(|| two_d(&s.ept_4k, GVA_4K));
    let w2m = median_ns(|| two_d(&s.ept_2m, GVA_2M));
    let d4k = median_ns(|| one_d(GVA_4K));
    let d2m = median_ns(|| one_d(GVA_2M));
    let c4k = median_ns(|| cached(GVA_4K));
    let warm = walk_2d_cached(
        &s.guest,
        &s.ept_4k,
        &s.memory,
        &mut tlb,
        GVA_4K,
        access,
        WalkMode::Update,
    )
    .unwrap();
    let cold = walk_2d(
        &s.guest,
        &s.ept_4k,
        &s.memory,
        GVA_4K,
        access,
        WalkMode::Update,
    )
    .unwrap();
    assert_eq!((warm.hpa, warm.stage1), (cold.hpa, cold.stage1));
    assert_eq!(warm.stats.references(), 4);
    println!(
        "compare: walk2d_cached_4k_ns vmkit={c4k:.1} baseline(walk_2d)={w4k:.1} ratio={:.2}",
        c4k / w4k
    );
    println!("walk2d: 4k={w4k:.1} ns 2m={w2m:.1} ns 1d_4k={d4k:.1} ns 1d_2m={d2m:.1} ns");
    println!(
        "compare: walk2d_4k_ns vmkit={w4k:.1} baseline(1-D walk)={d4k:.1} ratio={:.2}",
        w4k / d4k
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
