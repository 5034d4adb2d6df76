//! Guest-memory snapshot throughput: saving a VM's memory into a snapshot
//! file and restoring it, against a plain file write and read of the same
//! bytes.
//!
//! - vmkit write: [`save_memory_full`] (copy out of guest memory, dirty logs
//!   cleared) and [`Snapshot::write_to`] (sections with CRC-32) into a
//!   buffered file.
//! - baseline write: `write_all` of the same bytes, already in a buffer,
//!   into a file.
//! - vmkit restore: [`Snapshot::read_from`] (read, checksum, parse) and
//!   [`Snapshot::restore_memory`] into the guest memory.
//! - baseline read: `read_exact` of the same number of bytes into a
//!   preallocated buffer.
//!
//! Both sides use files in the same directory (`CARGO_TARGET_TMPDIR`), the
//! same page cache and the same fsync policy: none (the numbers are for
//! the copy and checksum work, not for the disk). Criterion measures each
//! operation; then interleaved rounds (alternating which side goes first)
//! give the medians of the `compare:` lines, scaled to one GiB.
//!
//! `VMKIT_BENCH_SNAPSHOT_MIB` sets the guest memory size (default 256),
//! `VMKIT_BENCH_ROUNDS` the interleaved rounds (default 5), and
//! `VMKIT_BENCH_COMPARE_ONLY=1` skips the criterion part.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::MemoryLayout;
use vmkit_vcpu::snapshot::{save_memory_full, Snapshot};
use vmkit_vcpu::{Vm, VmConfig};

mod common;
use common::{kvm_or_skip, median};

const GIB: f64 = (1u64 << 30) as f64;

struct Bench {
    vm: Vm,
    /// The guest memory's bytes, for the baseline.
    plain: Vec<u8>,
    snapshot_file: PathBuf,
    plain_file: PathBuf,
    /// Bytes of the snapshot file (for the report).
    snapshot_len: u64,
}

impl Bench {
    fn new(mib: u64) -> Self {
        let size = mib << 20;
        let memory = MemoryLayout::new(size)
            .unwrap()
            .create_memory(&Default::default())
            .unwrap();
        // Every page touched, with varied contents.
        let chunk: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for off in (0..size).step_by(chunk.len()) {
            memory.write_slice(&chunk, GuestAddress(off)).unwrap();
        }
        let mut plain = vec![0u8; size as usize];
        memory.read_slice(&mut plain, GuestAddress(0)).unwrap();
        let vm = Vm::new(memory, VmConfig::default()).unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let pid = std::process::id();
        Bench {
            vm,
            plain,
            snapshot_file: dir.join(format!("bench-snapshot-{pid}.snap")),
            plain_file: dir.join(format!("bench-plain-{pid}.bin")),
            snapshot_len: 0,
        }
    }

    fn bytes(&self) -> u64 {
        self.plain.len() as u64
    }

    fn vmkit_write(&mut self) -> Duration {
        let start = Instant::now();
        let mut snapshot = Snapshot::new();
        snapshot.memory = Some(save_memory_full(&self.vm).unwrap());
        let mut w = BufWriter::new(File::create(&self.snapshot_file).unwrap());
        snapshot.write_to(&mut w).unwrap();
        drop(w);
        let elapsed = start.elapsed();
        self.snapshot_len = std::fs::metadata(&self.snapshot_file).unwrap().len();
        elapsed
    }

    fn baseline_write(&self) -> Duration {
        let start = Instant::now();
        let mut f = File::create(&self.plain_file).unwrap();
        f.write_all(&self.plain).unwrap();
        drop(f);
        start.elapsed()
    }

    fn vmkit_restore(&self) -> Duration {
        let start = Instant::now();
        let snapshot = Snapshot::read_from(&mut File::open(&self.snapshot_file).unwrap()).unwrap();
        snapshot.restore_memory(self.vm.memory(), None).unwrap();
        start.elapsed()
    }

    fn baseline_read(&self, buf: &mut [u8]) -> Duration {
        let start = Instant::now();
        File::open(&self.plain_file)
            .unwrap()
            .read_exact(buf)
            .unwrap();
        start.elapsed()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for f in [&self.snapshot_file, &self.plain_file] {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .max(1)
}

fn bench(c: &mut Criterion) {
    let mib = env_usize("VMKIT_BENCH_SNAPSHOT_MIB", 256) as u64;
    let mut b = Bench::new(mib);
    let mut buf = vec![0u8; b.plain.len()];
    b.vmkit_write();
    b.baseline_write();
    let mut group = c.benchmark_group("snapshot_memory");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1));
    group.bench_function(format!("vmkit_write_{mib}MiB"), |x| {
        x.iter_custom(|iters| (0..iters).map(|_| b.vmkit_write()).sum())
    });
    group.bench_function(format!("plain_file_write_{mib}MiB"), |x| {
        x.iter_custom(|iters| (0..iters).map(|_| b.baseline_write()).sum())
    });
    group.bench_function(format!("vmkit_restore_{mib}MiB"), |x| {
        x.iter_custom(|iters| (0..iters).map(|_| b.vmkit_restore()).sum())
    });
    group.bench_function(format!("plain_file_read_{mib}MiB"), |x| {
        x.iter_custom(|iters| (0..iters).map(|_| b.baseline_read(&mut buf)).sum())
    });
    group.finish();
}

criterion_group!(benches, bench);

fn per_gib_ms(d: Duration, bytes: u64) -> f64 {
    d.as_secs_f64() * 1e3 * GIB / bytes as f64
}

fn compare() {
    let mib = env_usize("VMKIT_BENCH_SNAPSHOT_MIB", 256) as u64;
    let rounds = env_usize("VMKIT_BENCH_ROUNDS", 5);
    let mut b = Bench::new(mib);
    let bytes = b.bytes();
    let mut buf = vec![0u8; b.plain.len()];
    // Warm-up: both files exist and the page cache is in its steady state.
    b.vmkit_write();
    b.baseline_write();
    b.vmkit_restore();
    b.baseline_read(&mut buf);
    let (mut vw, mut bw, mut vr, mut br) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            vw.push(per_gib_ms(b.vmkit_write(), bytes));
            bw.push(per_gib_ms(b.baseline_write(), bytes));
            vr.push(per_gib_ms(b.vmkit_restore(), bytes));
            br.push(per_gib_ms(b.baseline_read(&mut buf), bytes));
        } else {
            bw.push(per_gib_ms(b.baseline_write(), bytes));
            vw.push(per_gib_ms(b.vmkit_write(), bytes));
            br.push(per_gib_ms(b.baseline_read(&mut buf), bytes));
            vr.push(per_gib_ms(b.vmkit_restore(), bytes));
        }
    }
    // The restore really put the bytes back.
    let mut check = vec![0u8; b.plain.len()];
    b.vm.memory()
        .read_slice(&mut check, GuestAddress(0))
        .unwrap();
    assert!(check == b.plain, "restored memory differs");
    eprintln!(
        "snapshot: {mib} MiB of guest memory, snapshot file {} bytes, {rounds} rounds, no fsync on either side, files in {}",
        b.snapshot_len,
        Path::new(env!("CARGO_TARGET_TMPDIR")).display()
    );
    let (a, z) = (median(vw), median(bw));
    println!(
        "compare: snapshot_write_per_gib vmkit={a:.1} baseline(plain file write)={z:.1} ratio={:.3}",
        a / z
    );
    let (a, z) = (median(vr), median(br));
    println!(
        "compare: snapshot_restore_per_gib vmkit={a:.1} baseline(plain file read)={z:.1} ratio={:.3}",
        a / z
    );
}

fn main() {
    if !kvm_or_skip("snapshot") {
        return;
    }
    let quick = std::env::var("VMKIT_BENCH_COMPARE_ONLY").as_deref() == Ok("1");
    if !quick {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    compare();
}
