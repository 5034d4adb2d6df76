//! Kick latency: from `VcpuHandle::kick` on one thread to `Vcpu::run`
//! returning `Kicked` on the vCPU thread, against a raw kvm-ioctls loop
//! kicked with a bare `pthread_kill` (no immediate_exit, no request state;
//! the least a kick can cost, and racy in a way vmkit's is not).
//!
//! Both guests halt (`cli; hlt` in real mode, with the in-kernel irqchip
//! so that HLT blocks inside `KVM_RUN`): the kick has to wake a sleeping
//! vCPU thread, and no vCPU thread competes with the kicking thread for
//! this machine's two CPUs (spinning guests did, and made the numbers
//! scheduling noise). Samples alternate between the two sides, with a pause
//! after each so the vCPU is back in `KVM_RUN`; the medians give the
//! `compare:` line. `VMKIT_BENCH_SAMPLES` sets the samples per
//! side (default 300). There is no separate criterion run: a kick needs a
//! second thread, which criterion's iteration model does not fit.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmkit_devices::IoBus;
use vmkit_memory::GuestMemoryMmap;
use vmkit_vcpu::{BootConfig, CpuMode, StopReason, Vm, VmConfig};

mod common;
use common::{kvm_or_skip, median, raw_vm, ENTRY};

/// again: cli; hlt; jmp again
const GUEST: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfc];
/// Time for a vCPU to get back into the guest between samples.
const SETTLE: Duration = Duration::from_micros(300);

fn memory() -> GuestMemoryMmap {
    common::memory(&GUEST)
}

struct Side {
    kick: Box<dyn Fn()>,
    returned: mpsc::Receiver<Instant>,
    stop: Box<dyn Fn()>,
    thread: Option<JoinHandle<()>>,
}

impl Side {
    fn sample(&self) -> Option<f64> {
        std::thread::sleep(SETTLE);
        let start = Instant::now();
        (self.kick)();
        let back = self.returned.recv_timeout(Duration::from_secs(1)).ok()?;
        Some(back.duration_since(start).as_secs_f64() * 1e9)
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        (self.stop)();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn vmkit_side() -> Side {
    let vm = Vm::new(
        memory(),
        VmConfig {
            irqchip: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.configure(&BootConfig::new(CpuMode::Real, ENTRY, 0x8000))
        .unwrap();
    let handle = vcpu.handle();
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let bus = IoBus::new();
        let _vm = vm;
        loop {
            match vcpu.run(&bus).unwrap() {
                StopReason::Kicked => tx.send(Instant::now()).unwrap(),
                StopReason::Stopped => return,
                other => panic!("unexpected stop {other:?}"),
            }
        }
    });
    let stopper = handle.clone();
    Side {
        kick: Box::new(move || handle.kick().unwrap()),
        returned: rx,
        stop: Box::new(move || stopper.stop().unwrap()),
        thread: Some(thread),
    }
}

fn raw_side() -> Side {
    let signal = vmkit_vcpu::handle::kick_signal().unwrap();
    let memory = memory();
    // SAFETY: the vCPU thread owns `memory` and drops it only after the
    // vCPU and VM fds.
    let (vm, mut vcpu) = unsafe { raw_vm(&memory, true) };
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let d = done.clone();
    let thread = std::thread::spawn(move || {
        let _vm = vm;
        loop {
            match vcpu.run() {
                Err(e) if e.errno() == libc::EINTR => {
                    if d.load(Ordering::SeqCst) {
                        break;
                    }
                    tx.send(Instant::now()).unwrap();
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        drop(vcpu);
        drop(memory);
    });
    let tid = thread.as_pthread_t();
    // SAFETY (both closures): `tid` is the vCPU thread, which runs until
    // `stop` has set `done` and kicked it, and is joined only after that.
    let kick = move || {
        // SAFETY: see above; the signal has vmkit's no-op handler.
        unsafe { libc::pthread_kill(tid, signal) };
    };
    let stop = move || {
        done.store(true, Ordering::SeqCst);
        // SAFETY: see above.
        unsafe { libc::pthread_kill(tid, signal) };
    };
    Side {
        kick: Box::new(kick),
        returned: rx,
        stop: Box::new(stop),
        thread: Some(thread),
    }
}

fn main() {
    if !kvm_or_skip("kick_latency") {
        return;
    }
    let samples: usize = std::env::var("VMKIT_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
        .max(1);
    let vmkit = vmkit_side();
    let raw = raw_side();
    // Warm-up.
    for _ in 0..10 {
        vmkit.sample().expect("vmkit lost a kick");
        let _ = raw.sample();
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut raw_lost = 0;
    for i in 0..samples {
        let mut take = |side: &Side, out: &mut Vec<f64>, is_raw: bool| match side.sample() {
            Some(ns) => out.push(ns),
            None if is_raw => raw_lost += 1,
            None => panic!("vmkit lost a kick"),
        };
        if i % 2 == 0 {
            take(&vmkit, &mut a, false);
            take(&raw, &mut b, true);
        } else {
            take(&raw, &mut b, true);
            take(&vmkit, &mut a, false);
        }
    }
    drop(vmkit);
    drop(raw);
    let (va, vb) = (median(a), median(b));
    eprintln!("kick_latency: {samples} samples per side; raw loop lost {raw_lost} kicks");
    println!(
        "compare: kick_latency_ns vmkit={va:.0} baseline(raw kvm-ioctls + pthread_kill)={vb:.0} ratio={:.3}",
        va / vb
    );
}
