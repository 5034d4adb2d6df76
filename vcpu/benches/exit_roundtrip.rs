//! Exit round trip: the vmkit run loop and bus against a raw kvm-ioctls loop.
//!
//! Both run the same real-mode guest, `again: out 0x80, al; dec ecx; jnz
//! again; hlt`, with ECX preset to the number of exits wanted. vmkit's side
//! is `Vcpu::run` dispatching each `out` through `IoBus` to a device that
//! counts; the baseline is a bare `VcpuFd::run` loop that counts the same
//! exits itself. Criterion measures each; then an interleaved A/B run (so
//! both see the same machine noise) prints the `compare:` line.
//!
//! `VMKIT_BENCH_ROUNDS` sets the number of interleaved rounds (default 15).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmkit_devices::{BusDevice, DeviceError, IoAction, IoBus};
use vmkit_memory::GuestMemoryMmap;
use vmkit_vcpu::{BootConfig, CpuMode, StopReason, Vcpu, Vm, VmConfig};

mod common;
use common::{kvm_or_skip, median, raw_vm, ENTRY};

/// again: out 0x80, al; dec ecx (0x66 prefix: 32-bit in real mode); jnz again; hlt
const GUEST: [u8; 8] = [0xe6, 0x80, 0x66, 0x49, 0x75, 0xfa, 0xf4, 0x90];
const EXITS_PER_ROUND: u64 = 2000;

fn memory() -> GuestMemoryMmap {
    common::memory(&GUEST)
}

/// A device that only counts writes: the least a device can do.
#[derive(Default)]
struct Counter(AtomicU64);

impl BusDevice for Counter {
    fn read(&self, _offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> Result<IoAction, DeviceError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(IoAction::Continue)
    }
}

struct VmkitSide {
    _vm: Vm,
    vcpu: Vcpu,
    bus: IoBus,
    counter: Arc<Counter>,
}

impl VmkitSide {
    fn new() -> Self {
        let vm = Vm::new(memory(), VmConfig::default()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.configure(&BootConfig::new(CpuMode::Real, ENTRY, 0x8000))
            .unwrap();
        let bus = IoBus::new();
        let counter = Arc::new(Counter::default());
        bus.pio.insert(0x80, 1, counter.clone()).unwrap();
        VmkitSide {
            _vm: vm,
            vcpu,
            bus,
            counter,
        }
    }

    fn run(&mut self, exits: u64) -> Duration {
        let mut regs = self.vcpu.regs().unwrap();
        regs.rip = ENTRY;
        regs.rcx = exits;
        self.vcpu.set_regs(&regs).unwrap();
        let before = self.counter.0.load(Ordering::Relaxed);
        let start = Instant::now();
        let stop = self.vcpu.run(&self.bus).unwrap();
        let elapsed = start.elapsed();
        assert!(matches!(stop, StopReason::Hlt), "{stop:?}");
        assert_eq!(self.counter.0.load(Ordering::Relaxed) - before, exits);
        elapsed
    }
}

struct RawSide {
    // Fields drop in order: both fds close before `_memory` is unmapped.
    vcpu: VcpuFd,
    _vm: VmFd,
    _memory: GuestMemoryMmap,
}

impl RawSide {
    fn new() -> Self {
        let memory = memory();
        // SAFETY: RawSide keeps `memory` until after the VM and vCPU fds
        // are closed (field order).
        let (vm, vcpu) = unsafe { raw_vm(&memory, false) };
        RawSide {
            _memory: memory,
            vcpu,
            _vm: vm,
        }
    }

    fn run(&mut self, exits: u64) -> Duration {
        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rip = ENTRY;
        regs.rcx = exits;
        regs.rflags = 2;
        self.vcpu.set_regs(&regs).unwrap();
        let mut seen = 0u64;
        let start = Instant::now();
        loop {
            match self.vcpu.run().unwrap() {
                VcpuExit::IoOut(0x80, _) => seen += 1,
                VcpuExit::Hlt => break,
                other => panic!("unexpected exit {other:?}"),
            }
        }
        let elapsed = start.elapsed();
        assert_eq!(seen, exits);
        elapsed
    }
}

fn bench(c: &mut Criterion) {
    let mut vmkit = VmkitSide::new();
    let mut raw = RawSide::new();
    let mut group = c.benchmark_group("exit_roundtrip");
    group.bench_function("vmkit_run_loop_and_bus", |b| {
        b.iter_custom(|iters| vmkit.run(iters))
    });
    group.bench_function("raw_kvm_ioctls_loop", |b| {
        b.iter_custom(|iters| raw.run(iters))
    });
    group.finish();
}

criterion_group!(benches, bench);

fn compare() {
    let rounds: usize = std::env::var("VMKIT_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
        .max(1);
    let mut vmkit = VmkitSide::new();
    let mut raw = RawSide::new();
    // Warm up both paths.
    vmkit.run(EXITS_PER_ROUND);
    raw.run(EXITS_PER_ROUND);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which side goes first so drift hits both alike.
        let per_exit = |d: Duration| d.as_secs_f64() * 1e9 / EXITS_PER_ROUND as f64;
        if round % 2 == 0 {
            a.push(per_exit(vmkit.run(EXITS_PER_ROUND)));
            b.push(per_exit(raw.run(EXITS_PER_ROUND)));
        } else {
            b.push(per_exit(raw.run(EXITS_PER_ROUND)));
            a.push(per_exit(vmkit.run(EXITS_PER_ROUND)));
        }
    }
    let (va, vb) = (median(a), median(b));
    println!(
        "compare: exit_roundtrip_ns vmkit={va:.0} baseline(raw kvm-ioctls loop)={vb:.0} ratio={:.3}",
        va / vb
    );
}

fn main() {
    if !kvm_or_skip("exit_roundtrip") {
        return;
    }
    let quick = std::env::var("VMKIT_BENCH_COMPARE_ONLY").as_deref() == Ok("1");
    if !quick {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    compare();
}
