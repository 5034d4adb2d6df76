//! A cached shadow-MMU lookup against a fresh 4-level walk of the same
//! address, both measured in this process.
//!
//! Besides criterion's report, prints one line
//! `compare: shadow_lookup_ns vmkit=<cached> baseline(fresh 4-level walk)=<walk> ratio=<walk/cached>`
//! (medians over batches; the accessed bits are already set, so the walk
//! only reads memory, and every lookup hits the cache).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    walk, Access, CpuFeatures, IdentityMap, PageFlags, PageSize, PageTableBuilder, PagingContext,
    Privilege, ShadowConfig, ShadowMmu, TableFormat, WalkMode,
};

const GVA: u64 = 0x7f12_3456_7000;
/// Pages looked up in turn (so the cache is probed at different sets).
const PAGES: u64 = 64;

fn setup() -> (
    GuestMemoryMmap,
    PagingContext,
    vmkit_memory::paging::ControlRegs,
) {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut tables = PageTableBuilder::new(
        &memory,
        TableFormat::Level4,
        GuestAddress(0x10_0000),
        0x10_0000,
    )
    .unwrap();
    for i in 0..PAGES {
        tables
            .map(
                GVA + i * 4096,
                0x40_0000 + i * 4096,
                PageSize::Size4K,
                PageFlags::default(),
            )
            .unwrap();
    }
    let regs = tables.control_regs().unwrap();
    let ctx = PagingContext::new(&regs, &CpuFeatures::default()).unwrap();
    for i in 0..PAGES {
        let access = Access::read(Privilege::Supervisor);
        walk(&ctx, &memory, GVA + i * 4096, access, WalkMode::Update).unwrap();
    }
    (memory, ctx, regs)
}

/// Median over batches of `f` per call, in nanoseconds.
fn median_ns(mut f: impl FnMut(u64)) -> f64 {
    const BATCH: u32 = 20_000;
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for i in 0..BATCH {
                f(GVA + (u64::from(i) % PAGES) * 4096 + 0x18);
            }
            start.elapsed().as_nanos() as f64 / f64::from(BATCH)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn bench(c: &mut Criterion) {
    let (memory, ctx, regs) = setup();
    let host = IdentityMap(&memory);
    let mut mmu = ShadowMmu::new(
        &memory,
        &regs,
        &CpuFeatures::default(),
        &ShadowConfig::default(),
    )
    .unwrap();
    let access = Access::read(Privilege::Supervisor);
    for i in 0..PAGES {
        mmu.translate(&host, GVA + i * 4096, access).unwrap();
    }
    c.bench_function("shadow_lookup_hit", |b| {
        b.iter(|| mmu.translate(&host, black_box(GVA + 0x18), access).unwrap())
    });
    c.bench_function("fresh_walk_4level", |b| {
        b.iter(|| {
            walk(
                &ctx,
                &memory,
                black_box(GVA + 0x18),
                access,
                WalkMode::Update,
            )
            .unwrap()
        })
    });
    let walks_before = mmu.stats().walks;
    let cached = median_ns(|gva| {
        black_box(mmu.translate(&host, black_box(gva), access).unwrap());
    });
    assert_eq!(mmu.stats().walks, walks_before, "every lookup must hit");
    let fresh = median_ns(|gva| {
        black_box(walk(&ctx, &memory, black_box(gva), access, WalkMode::Update).unwrap());
    });
    println!(
        "compare: shadow_lookup_ns vmkit={cached:.1} baseline(fresh 4-level walk)={fresh:.1} ratio={:.2}",
        fresh / cached
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
