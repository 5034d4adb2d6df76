//! Guest-virtual to guest-physical translation: vmkit's software walker
//! against KVM's `KVM_TRANSLATE` ioctl, on the same page tables in the same
//! VM.
//!
//! - vmkit: [`PagingContext::walk`] with [`WalkMode::Probe`] as a
//!   supervisor read (what `KVM_TRANSLATE` checks), the context built once
//!   from the vCPU's control registers and CPUID.
//! - baseline: `KVM_TRANSLATE` through kvm-ioctls' `VcpuFd::translate_gva`
//!   (a system call into KVM's own walker per address).
//!
//! The tables: 4-level, 2 MiB pages and 4 KiB pages spread over a few
//! PML4 slots; the addresses: 4,096, three quarters mapped, the rest in
//! unmapped holes next to them. Both sides translate the same addresses in
//! the same order and must agree (checked before timing). Criterion
//! measures one pass over the addresses; then interleaved rounds give the
//! medians of the `compare:` line, per address.
//!
//! `VMKIT_BENCH_ROUNDS` sets the interleaved rounds (default 11) and
//! `VMKIT_BENCH_COMPARE_ONLY=1` skips the criterion part.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use vmkit_memory::paging::{
    Access, ControlRegs, CpuFeatures, PageFlags, PageSize, PageTableBuilder, PagingContext,
    Privilege, TableFormat, Vendor, WalkMode,
};
use vmkit_memory::vm_memory::GuestAddress;
use vmkit_memory::MemoryLayout;
use vmkit_vcpu::{BootConfig, CpuMode, Vcpu, Vm, VmConfig};

mod common;
use common::{kvm_or_skip, median};

const TABLES: u64 = 0x20_0000;
const TABLES_LEN: u64 = 0x40_0000;
const ADDRESSES: usize = 4096;

struct Bench {
    vm: Vm,
    vcpu: Vcpu,
    ctx: PagingContext,
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
        let memory = MemoryLayout::new(16 << 20)
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
        let cr3 = tables.root();
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
        let ctx = PagingContext::new(&regs, &features(&vcpu)).unwrap();
        Bench {
            vm,
            vcpu,
            ctx,
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
