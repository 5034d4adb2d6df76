//! Guest-virtual to guest-physical translation: vmkit's software MMU
//! against KVM's `KVM_TRANSLATE` ioctl, on the same page tables in the same
//! VM.
//!
//! - vmkit: [`PagingContext::walk`] with [`WalkMode::Probe`] as a
//!   supervisor read (what `KVM_TRANSLATE` checks), the context built once
//!   from the vCPU's control registers and CPUID; a [`ShadowMmu`] cache
//!   hit; [`walk_2d`], the guest tables behind an EPT stage 2 (4 KiB
//!   pages, identity over the VM's RAM, so it ends at the same address);
//!   and [`walk_2d_cached`], the same 2-D walk with a warm [`Stage2Tlb`]
//!   (the steady state of a guest walking its own tables: every stage-2
//!   lookup hits, only the four guest entries are read).
//! - baseline: `KVM_TRANSLATE` through kvm-ioctls' `VcpuFd::translate_gva`
//!   (a system call into KVM's own walker per address).
//!
//! The tables: 4-level, 2 MiB pages and 4 KiB pages spread over a few
//! PML4 slots. Two kinds of `compare:` lines, all from interleaved rounds
//! (vmkit and baseline alternate which goes first, so noise hits both
//! alike) and medians over the rounds:
//! - `translate_ns`: 4,096 addresses, three quarters mapped, the rest in
//!   unmapped holes next to them; both sides translate them in the same
//!   order and must agree (checked before timing).
//! - `translate_4k_ns`, `translate_2m_ns`, `shadow_hit_ns`, `walk2d_ns`,
//!   `walk2d_cached_4k_ns`: one address each (a 4 KiB page, a 2 MiB page,
//!   the 4 KiB page through the cache, the 4 KiB page through EPT, and
//!   through EPT with the stage-2 cache), each against `KVM_TRANSLATE`
//!   of that address, translated over and over. Every vmkit answer is
//!   checked against KVM's before timing.
//!
//! Criterion measures one pass over the 4,096 addresses and the
//! single-address operations; `VMKIT_BENCH_ROUNDS` sets the interleaved
//! rounds (default 11) and `VMKIT_BENCH_COMPARE_ONLY=1` skips the criterion
//! part.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use vmkit_memory::paging::{
    walk_2d, walk_2d_cached, Access, ControlRegs, CpuFeatures, EptBuilder, EptCapabilities,
    EptContext, EptFlags, IdentityMap, PageFlags, PageSize, PageTableBuilder, PagingContext,
    Privilege, ShadowConfig, ShadowMmu, Stage2Context, Stage2Tlb, TableFormat, Vendor, WalkMode,
};
use vmkit_memory::vm_memory::GuestAddress;
use vmkit_memory::{GuestMemoryMmap, MemoryLayout};
use vmkit_vcpu::{BootConfig, CpuMode, Vcpu, Vm, VmConfig};

mod common;
use common::{kvm_or_skip, median};

const RAM: u64 = 16 << 20;
const TABLES: u64 = 0x20_0000;
const TABLES_LEN: u64 = 0x40_0000;
/// The EPT tables of the 2-D walk (identity over `RAM` in 4 KiB pages).
const EPT: u64 = 0x60_0000;
const EPT_LEN: u64 = 0x2_0000;
const ADDRESSES: usize = 4096;
/// The single-address operations: a 4 KiB page and a 2 MiB page of their
/// own, in a PML4 slot of their own.
const GVA_4K: u64 = 0x0000_6f12_3456_7000 + 0x5a8;
const GPA_4K: u64 = 0x7f_f000;
const GVA_2M: u64 = 0x0000_6f12_3480_0000 + 0x1_2345;
const GPA_2M: u64 = 0xa0_0000;

struct Bench {
    vm: Vm,
    vcpu: Vcpu,
    ctx: PagingContext,
    regs: ControlRegs,
    features: CpuFeatures,
    ept: Stage2Context,
    addresses: Vec<u64>,
}

/// splitmix64, for a fixed set of addresses.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The canonical address of PML4 slot `l4`, PDPT slot `l3`, PD slot `l2`,
/// PT slot `l1`.
fn gva(l4: u64, l3: u64, l2: u64, l1: u64) -> u64 {
    let raw = l4 << 39 | l3 << 30 | l2 << 21 | l1 << 12;
    (((raw << 16) as i64) >> 16) as u64
}

/// The paging features of the vCPU, from the CPUID table vmkit set.
fn features(vcpu: &Vcpu) -> CpuFeatures {
    let cpuid = vcpu.cpuid().unwrap();
    let leaf = |function: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == 0)
            .copied()
            .unwrap_or_default()
    };
    let amd = matches!(leaf(0).ebx, 0x6874_7541 | 0x6f67_7948);
    CpuFeatures {
        maxphyaddr: (leaf(0x8000_0008).eax & 0xff) as u8,
        gbpages: leaf(0x8000_0001).edx & (1 << 26) != 0,
        pse36: leaf(1).edx & (1 << 17) != 0,
        vendor: if amd { Vendor::Amd } else { Vendor::Intel },
    }
}

impl Bench {
    fn new() -> Self {
        let memory = MemoryLayout::new(RAM)
            .unwrap()
            .create_memory(&Default::default())
            .unwrap();
        let mut tables = PageTableBuilder::new(
            &memory,
            TableFormat::Level4,
            GuestAddress(TABLES),
            TABLES_LEN,
        )
        .unwrap();
        let mut mapped = Vec::new();
        let mut rng = 0x7a_0b1e_u64;
        for (i, l4) in [1u64, 2, 256, 511].into_iter().enumerate() {
            for l2 in 0..8u64 {
                let base = gva(l4, i as u64, l2, 0);
                let flags = PageFlags {
                    writable: l2 % 2 == 0,
                    user: l2 % 3 == 0,
                    ..PageFlags::default()
                };
                if l2 < 4 {
                    // 2 MiB pages.
                    let gpa = (next(&mut rng) % 2048) << 21;
                    tables.map(base, gpa, PageSize::Size2M, flags).unwrap();
                    mapped.push((base, PageSize::Size2M));
                } else {
                    // 64 4 KiB pages in every other slot of the table.
                    for l1 in (0..128u64).step_by(2) {
                        let page = base + (l1 << 12);
                        let gpa = (next(&mut rng) % (1 << 24)) << 12;
                        tables.map(page, gpa, PageSize::Size4K, flags).unwrap();
                        mapped.push((page, PageSize::Size4K));
                    }
                }
            }
        }
        let plain = PageFlags::default();
        tables
            .map(GVA_4K & !0xfff, GPA_4K, PageSize::Size4K, plain)
            .unwrap();
        tables
            .map(GVA_2M & !0x1f_ffff, GPA_2M, PageSize::Size2M, plain)
            .unwrap();
        let cr3 = tables.root();
        let mut ept = EptBuilder::new(&memory, false, GuestAddress(EPT), EPT_LEN).unwrap();
        for page in (0..RAM).step_by(4096) {
            ept.map(page, page, PageSize::Size4K, EptFlags::default())
                .unwrap();
        }
        let ept = Stage2Context::Ept(
            EptContext::new(ept.eptp(false), &EptCapabilities::default()).unwrap(),
        );
        let addresses = (0..ADDRESSES)
            .map(|i| {
                let (base, size) = mapped[(next(&mut rng) % mapped.len() as u64) as usize];
                let offset = next(&mut rng) % size.bytes();
                // Every fourth address one page further: a hole after a
                // 4 KiB page, or the next page of a 2 MiB one.
                if i % 4 == 3 {
                    base + size.bytes() + (offset & 0xfff)
                } else {
                    base + offset
                }
            })
            .collect();
        let vm = Vm::new(memory, VmConfig::default()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.configure(&BootConfig::new(
            CpuMode::Long { gdt: 0x1000, cr3 },
            0x10000,
            0x8000,
        ))
        .unwrap();
        let sregs = vcpu.sregs().unwrap();
        let regs = ControlRegs {
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            ..ControlRegs::default()
        };
        let features = features(&vcpu);
        let ctx = PagingContext::new(&regs, &features).unwrap();
        Bench {
            vm,
            vcpu,
            ctx,
            regs,
            features,
            ept,
            addresses,
        }
    }

    /// One pass of vmkit's walk; returns the sum of the addresses found
    /// (so that nothing is optimised away) and the time.
    fn vmkit(&self) -> (u64, Duration) {
        let memory = self.vm.memory();
        let access = Access::read(Privilege::Supervisor);
        let start = Instant::now();
        let mut sum = 0u64;
        for &gva in &self.addresses {
            if let Ok(t) = self
                .ctx
                .walk(memory, black_box(gva), access, WalkMode::Probe)
            {
                sum = sum.wrapping_add(t.gpa);
            }
        }
        (black_box(sum), start.elapsed())
    }

    /// One pass of `KVM_TRANSLATE`.
    fn baseline(&self) -> (u64, Duration) {
        let start = Instant::now();
        let mut sum = 0u64;
        for &gva in &self.addresses {
            let t = self.vcpu.fd().translate_gva(black_box(gva)).unwrap();
            if t.valid != 0 {
                sum = sum.wrapping_add(t.physical_address);
            }
        }
        (black_box(sum), start.elapsed())
    }

    /// Both sides give the same answer for every address.
    fn check(&self) -> usize {
        let access = Access::read(Privilege::Supervisor);
        let mut valid = 0;
        for &gva in &self.addresses {
            let ours = self
                .ctx
                .walk(self.vm.memory(), gva, access, WalkMode::Probe)
                .ok()
                .map(|t| t.gpa);
            let t = self.vcpu.fd().translate_gva(gva).unwrap();
            let kvm = (t.valid != 0).then_some(t.physical_address);
            assert_eq!(ours, kvm, "translations of {gva:#x} differ");
            valid += usize::from(kvm.is_some());
        }
        valid
    }
}

/// A single-address operation of vmkit, timed against `KVM_TRANSLATE` of
/// the same address.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// 4-level walk ending in a 4 KiB page.
    Walk4k,
    /// 4-level walk ending in a 2 MiB page.
    Walk2m,
    /// `ShadowMmu::translate` of the 4 KiB page, served from the cache.
    ShadowHit,
    /// `walk_2d` of the 4 KiB page through the EPT (24 references).
    Walk2d,
    /// `walk_2d_cached` of the 4 KiB page, its stage-2 cache warm (4
    /// references).
    Walk2dCached,
}

impl Op {
    const ALL: [Op; 5] = [
        Op::Walk4k,
        Op::Walk2m,
        Op::ShadowHit,
        Op::Walk2d,
        Op::Walk2dCached,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Walk4k => "translate_4k_ns",
            Op::Walk2m => "translate_2m_ns",
            Op::ShadowHit => "shadow_hit_ns",
            Op::Walk2d => "walk2d_ns",
            Op::Walk2dCached => "walk2d_cached_4k_ns",
        }
    }

    fn gva(self) -> u64 {
        match self {
            Op::Walk2m => GVA_2M,
            _ => GVA_4K,
        }
    }
}

/// vmkit's calls per timed batch, and `KVM_TRANSLATE` calls per batch.
const VMKIT_BATCH: u32 = 20_000;
const KVM_BATCH: u32 = 400;

/// The state of the single-address operations: the shadow MMU (its cache
/// holds the 4 KiB page) over the VM's memory.
struct Single<'a> {
    b: &'a Bench,
    mmu: ShadowMmu<'a, GuestMemoryMmap>,
    host: IdentityMap<'a, GuestMemoryMmap>,
    /// The stage-2 cache of [`Op::Walk2dCached`].
    tlb: Stage2Tlb,
}

impl<'a> Single<'a> {
    fn new(b: &'a Bench) -> Self {
        let memory = b.vm.memory();
        let mut mmu =
            ShadowMmu::new(memory, &b.regs, &b.features, &ShadowConfig::default()).unwrap();
        let host = IdentityMap(memory);
        let fill = mmu
            .translate(&host, GVA_4K, Access::read(Privilege::Supervisor))
            .unwrap();
        assert!(!fill.hit, "the first lookup walks");
        // Warm the stage-2 cache with the walk it will answer.
        let mut tlb = Stage2Tlb::new();
        let read = Access::read(Privilege::Supervisor);
        walk_2d_cached(
            &b.ctx,
            &b.ept,
            memory,
            &mut tlb,
            GVA_4K,
            read,
            WalkMode::Probe,
        )
        .unwrap();
        assert_eq!(tlb.stats().fills, 5, "the cold walk fills five entries");
        Single { b, mmu, host, tlb }
    }

    /// vmkit's answer for `op` (the guest-physical address; for the 2-D
    /// walk the host-physical one, the same under the identity EPT).
    fn vmkit_once(&mut self, op: Op, gva: u64) -> Option<u64> {
        match op {
            Op::Walk4k | Op::Walk2m => self.walk(gva),
            Op::ShadowHit => self.shadow(gva),
            Op::Walk2d => self.walk2d(gva),
            Op::Walk2dCached => self.walk2d_cached(gva),
        }
    }

    /// The 1-D walk ([`Op::Walk4k`], [`Op::Walk2m`]).
    #[inline]
    fn walk(&mut self, gva: u64) -> Option<u64> {
        let access = Access::read(Privilege::Supervisor);
        self.b
            .ctx
            .walk(self.b.vm.memory(), gva, access, WalkMode::Probe)
            .ok()
            .map(|t| t.gpa)
    }

    /// The cache lookup ([`Op::ShadowHit`]).
    #[inline(always)]
    fn shadow(&mut self, gva: u64) -> Option<u64> {
        let access = Access::read(Privilege::Supervisor);
        self.mmu
            .translate(&self.host, gva, access)
            .ok()
            .map(|t| t.gpa)
    }

    /// The 2-D walk ([`Op::Walk2d`]).
    #[inline]
    fn walk2d(&mut self, gva: u64) -> Option<u64> {
        let access = Access::read(Privilege::Supervisor);
        walk_2d(
            &self.b.ctx,
            &self.b.ept,
            self.b.vm.memory(),
            gva,
            access,
            WalkMode::Probe,
        )
        .ok()
        .map(|t| t.hpa)
    }

    /// The 2-D walk with the warm stage-2 cache ([`Op::Walk2dCached`]).
    #[inline]
    fn walk2d_cached(&mut self, gva: u64) -> Option<u64> {
        let access = Access::read(Privilege::Supervisor);
        walk_2d_cached(
            &self.b.ctx,
            &self.b.ept,
            self.b.vm.memory(),
            &mut self.tlb,
            gva,
            access,
            WalkMode::Probe,
        )
        .ok()
        .map(|t| t.hpa)
    }

    /// Every operation agrees with `KVM_TRANSLATE` (and the caches hit; the
    /// cached 2-D walk gives `walk_2d`'s translation with only the guest's
    /// four entries read).
    fn check(&mut self) {
        let access = Access::read(Privilege::Supervisor);
        let memory = self.b.vm.memory();
        let cached = walk_2d_cached(
            &self.b.ctx,
            &self.b.ept,
            memory,
            &mut self.tlb,
            GVA_4K,
            access,
            WalkMode::Probe,
        )
        .unwrap();
        let uncached = walk_2d(
            &self.b.ctx,
            &self.b.ept,
            memory,
            GVA_4K,
            access,
            WalkMode::Probe,
        )
        .unwrap();
        assert_eq!(
            (cached.hpa, cached.stage1, cached.stage2.page_size),
            (uncached.hpa, uncached.stage1, uncached.stage2.page_size)
        );
        assert_eq!(cached.stats.references(), 4, "every stage-2 lookup hits");
        assert_eq!(uncached.stats.references(), 24);
        let hits = self.mmu.stats().hits;
        for op in Op::ALL {
            let ours = self.vmkit_once(op, op.gva());
            let t = self.b.vcpu.fd().translate_gva(op.gva()).unwrap();
            assert_eq!(t.valid, 1, "{op:?}: KVM finds no translation");
            assert_eq!(
                ours,
                Some(t.physical_address),
                "{op:?}: translations differ"
            );
        }
        assert_eq!(
            self.mmu.stats().hits,
            hits + 1,
            "the shadow lookup must hit"
        );
        assert_eq!(
            self.vmkit_once(Op::Walk4k, GVA_4K),
            Some(GPA_4K | (GVA_4K & 0xfff))
        );
        assert_eq!(
            self.vmkit_once(Op::Walk2m, GVA_2M),
            Some(GPA_2M | (GVA_2M & 0x1f_ffff))
        );
    }

    /// Nanoseconds per vmkit operation over one batch (a loop of its own
    /// per operation, so that no dispatch on `op` is timed).
    fn vmkit(&mut self, op: Op) -> f64 {
        match op {
            Op::Walk4k | Op::Walk2m => self.batch(op.gva(), Self::walk),
            Op::ShadowHit => self.batch(op.gva(), Self::shadow),
            Op::Walk2d => self.batch(op.gva(), Self::walk2d),
            Op::Walk2dCached => self.batch(op.gva(), Self::walk2d_cached),
        }
    }

    #[inline(always)]
    fn batch(&mut self, gva: u64, mut f: impl FnMut(&mut Self, u64) -> Option<u64>) -> f64 {
        let start = Instant::now();
        let mut sum = 0u64;
        for _ in 0..VMKIT_BATCH {
            sum = sum.wrapping_add(f(self, black_box(gva)).unwrap_or(0));
        }
        black_box(sum);
        start.elapsed().as_secs_f64() * 1e9 / f64::from(VMKIT_BATCH)
    }

    /// Nanoseconds per `KVM_TRANSLATE` of the operation's address.
    fn baseline(&self, op: Op) -> f64 {
        let gva = op.gva();
        let start = Instant::now();
        let mut sum = 0u64;
        for _ in 0..KVM_BATCH {
            let t = self.b.vcpu.fd().translate_gva(black_box(gva)).unwrap();
            sum = sum.wrapping_add(t.physical_address);
        }
        black_box(sum);
        start.elapsed().as_secs_f64() * 1e9 / f64::from(KVM_BATCH)
    }
}

fn bench(c: &mut Criterion) {
    let b = Bench::new();
    b.check();
    let mut group = c.benchmark_group("translate");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    group.bench_function(format!("vmkit_walk_probe_{ADDRESSES}"), |x| {
        x.iter_custom(|iters| (0..iters).map(|_| b.vmkit().1).sum())
    });
    group.bench_function(format!("kvm_translate_{ADDRESSES}"), |x| {
        x.iter_custom(|iters| (0..iters).map(|_| b.baseline().1).sum())
    });
    let mut single = Single::new(&b);
    single.check();
    for op in Op::ALL {
        let gva = op.gva();
        group.bench_function(
            format!("vmkit_{}", op.name().trim_end_matches("_ns")),
            |x| x.iter(|| single.vmkit_once(op, black_box(gva))),
        );
    }
    group.bench_function("kvm_translate_one", |x| {
        x.iter(|| b.vcpu.fd().translate_gva(black_box(GVA_4K)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .max(1)
}

fn per_address_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9 / ADDRESSES as f64
}

fn compare() {
    let rounds = env_usize("VMKIT_BENCH_ROUNDS", 11);
    let b = Bench::new();
    let valid = b.check();
    // Warm-up (KVM_TRANSLATE has set the accessed bits by now, so later
    // passes write nothing).
    b.vmkit();
    b.baseline();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            ours.push(per_address_ns(b.vmkit().1));
            theirs.push(per_address_ns(b.baseline().1));
        } else {
            theirs.push(per_address_ns(b.baseline().1));
            ours.push(per_address_ns(b.vmkit().1));
        }
    }
    eprintln!(
        "translate: {ADDRESSES} addresses ({valid} mapped), 4-level tables, {rounds} interleaved rounds, one vCPU thread"
    );
    let (a, z) = (median(ours), median(theirs));
    println!(
        "compare: translate_ns vmkit={a:.1} baseline(KVM_TRANSLATE)={z:.1} ratio={:.3}",
        a / z
    );

    // The single-address operations, each round visiting all of them.
    let mut single = Single::new(&b);
    single.check();
    let mut samples = [(); Op::ALL.len()].map(|_| (Vec::new(), Vec::new()));
    for op in Op::ALL {
        single.vmkit(op);
        single.baseline(op);
    }
    for round in 0..rounds {
        for (op, (ours, theirs)) in Op::ALL.into_iter().zip(samples.iter_mut()) {
            if round % 2 == 0 {
                ours.push(single.vmkit(op));
                theirs.push(single.baseline(op));
            } else {
                theirs.push(single.baseline(op));
                ours.push(single.vmkit(op));
            }
        }
    }
    eprintln!(
        "translate: single addresses, {rounds} interleaved rounds of {VMKIT_BATCH} vmkit calls and {KVM_BATCH} KVM_TRANSLATE calls each"
    );
    for (op, (ours, theirs)) in Op::ALL.into_iter().zip(samples) {
        let (a, z) = (median(ours), median(theirs));
        println!(
            "compare: {} vmkit={a:.1} baseline(KVM_TRANSLATE)={z:.1} ratio={:.4}",
            op.name(),
            a / z
        );
    }
}

fn main() {
    if !kvm_or_skip("translate") {
        return;
    }
    let quick = std::env::var("VMKIT_BENCH_COMPARE_ONLY").as_deref() == Ok("1");
    if !quick {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    compare();
}
