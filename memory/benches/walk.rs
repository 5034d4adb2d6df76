//! Cost of a 4-level page walk with a 4 KiB and a 2 MiB leaf.
//!
//! Besides criterion's report, prints one line
//! `walk: 4k=<median ns> ns 2m=<median ns> ns` measured in this process
//! (the accessed bits are already set, so the walks only read memory).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    walk, Access, CpuFeatures, PageFlags, PageSize, PageTableBuilder, PagingContext, Privilege,
    TableFormat, WalkMode,
};

const GVA_4K: u64 = 0x7f12_3456_7000;
const GVA_2M: u64 = 0x7f12_3480_0000;

fn setup() -> (GuestMemoryMmap, PagingContext) {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
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
    let ctx = PagingContext::new(&tables.control_regs().unwrap(), &CpuFeatures::default()).unwrap();
    // Set the accessed bits once, as a running guest would have.
    for gva in [GVA_4K, GVA_2M] {
        walk(
            &ctx,
            &memory,
            gva,
            Access::read(Privilege::Supervisor),
            WalkMode::Update,
        )
        .unwrap();
    }
    (memory, ctx)
}

/// Median over batches of the time per walk, in nanoseconds.
fn median_ns(memory: &GuestMemoryMmap, ctx: &PagingContext, gva: u64) -> f64 {
    const BATCH: u32 = 20_000;
    let access = Access::read(Privilege::Supervisor);
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..BATCH {
                let t = walk(ctx, memory, black_box(gva), access, WalkMode::Update);
                black_box(t.unwrap());
            }
            start.elapsed().as_nanos() as f64 / f64::from(BATCH)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn bench(c: &mut Criterion) {
    let (memory, ctx) = setup();
    let access = Access::read(Privilege::Supervisor);
    for (name, gva) in [("walk_4level_4k", GVA_4K), ("walk_4level_2m", GVA_2M)] {
        c.bench_function(name, |b| {
            b.iter(|| walk(&ctx, &memory, black_box(gva), access, WalkMode::Update).unwrap())
        });
    }
    println!(
        "walk: 4k={:.1} ns 2m={:.1} ns",
        median_ns(&memory, &ctx, GVA_4K),
        median_ns(&memory, &ctx, GVA_2M)
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
