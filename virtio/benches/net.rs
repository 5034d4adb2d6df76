//! virtio-net frames per second through two devices joined by a `NetPair`
//! (driver model → virtio-mmio → transmit worker → socket pair → receive
//! worker → guest memory), against a baseline of the same frames through a
//! bare `SOCK_SEQPACKET` socket pair (a sender thread and a receiver) in
//! the same run, at 64-byte and 1500-byte frames.
//!
//! Each round submits `BATCH` transmit chains on one device and `BATCH`
//! receive buffers (2 KiB) on the other, notifies both and waits for all
//! of them. Rounds of both configurations are interleaved; medians are
//! compared.
//!
//! `VMKIT_BENCH_COMPARE_ONLY=1` prints only the `compare:` lines (CI);
//! `VMKIT_BENCH_ROUNDS` sets the number of rounds (default 30).
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use vmkit_devices::{InterruptLine, NullLine};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::MemoryLayout;
use vmkit_virtio::devices::net::{PairBackend, HDR_LEN, RX_QUEUE, TX_QUEUE};
use vmkit_virtio::devices::{Net, NetOptions, NetPair};
use vmkit_virtio::driver::{Driver, MmioDriver};
use vmkit_virtio::queue::RingFormat;
use vmkit_virtio::transport::{MmioOptions, MmioTransport};

const BATCH: usize = 64;
const RX_BUF: u32 = 2048;

struct End {
    driver: Driver<MmioDriver>,
    _transport: Arc<MmioTransport>,
}

fn end(backend: PairBackend) -> End {
    let mem = MemoryLayout::new(16 << 20)
        .unwrap()
        .create_memory(&Default::default())
        .unwrap();
    let dev = Net::new(Box::new(backend), NetOptions::default()).unwrap();
    let transport = Arc::new(
        MmioTransport::new(
            Box::new(dev),
            mem.clone(),
            Arc::new(NullLine) as Arc<dyn InterruptLine>,
            MmioOptions::default(),
        )
        .unwrap(),
    );
    let mut driver = Driver::new(MmioDriver::new(transport.clone()), mem, 0x10_0000);
    driver.negotiate(RingFormat::Split, 1 << 15).unwrap();
    End {
        driver,
        _transport: transport,
    }
}

struct Setup {
    tx: End,
    rx: End,
    frames: Vec<u64>,
    bufs: Vec<u64>,
    len: u32,
}

fn setup(payload: usize) -> Setup {
    let (a, b) = NetPair::new().unwrap();
    let mut tx = end(a);
    let mut rx = end(b);
    let len = (HDR_LEN + payload) as u32;
    let frame: Vec<u8> = (0..len).map(|i| if i < 12 { 0 } else { i as u8 }).collect();
    let frames = (0..BATCH)
        .map(|_| {
            let at = tx.driver.alloc(u64::from(len));
            tx.driver
                .mem()
                .write_slice(&frame, GuestAddress(at))
                .unwrap();
            at
        })
        .collect();
    let bufs = (0..BATCH)
        .map(|_| rx.driver.alloc(u64::from(RX_BUF)))
        .collect();
    Setup {
        tx,
        rx,
        frames,
        bufs,
        len,
    }
}

/// One batch through both devices; returns its duration.
fn device_round(s: &mut Setup) -> Duration {
    let start = Instant::now();
    for &b in &s.bufs {
        s.rx.driver.submit(RX_QUEUE, &[], &[(b, RX_BUF)]).unwrap();
    }
    s.rx.driver.notify(RX_QUEUE).unwrap();
    for &f in &s.frames {
        s.tx.driver.submit(TX_QUEUE, &[(f, s.len)], &[]).unwrap();
    }
    s.tx.driver.notify(TX_QUEUE).unwrap();
    for _ in 0..BATCH {
        let (_, used) =
            s.rx.driver
                .wait_used(RX_QUEUE, Duration::from_secs(10))
                .unwrap();
        assert_eq!(used, s.len);
    }
    for _ in 0..BATCH {
        s.tx.driver
            .wait_used(TX_QUEUE, Duration::from_secs(10))
            .unwrap();
    }
    start.elapsed()
}

/// A bare socket pair: a sender thread that sends `BATCH` frames of the
/// requested length per round, and the receiving end.
struct Baseline {
    go: mpsc::Sender<usize>,
    rx: OwnedFd,
}

fn baseline() -> Baseline {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: fresh descriptors owned by nobody else.
    let tx = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let rx = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    let (go, wait) = mpsc::channel::<usize>();
    std::thread::spawn(move || {
        let frame = vec![0x5au8; 65536];
        while let Ok(len) = wait.recv() {
            for _ in 0..BATCH {
                // SAFETY: `frame` is valid for reads of `len` ≤ 65536 bytes.
                let n = unsafe { libc::send(tx.as_raw_fd(), frame.as_ptr().cast(), len, 0) };
                assert_eq!(n, len as isize);
            }
        }
    });
    Baseline { go, rx }
}

fn baseline_round(b: &Baseline, len: usize) -> Duration {
    let mut buf = [0u8; RX_BUF as usize];
    let start = Instant::now();
    b.go.send(len).unwrap();
    for _ in 0..BATCH {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(b.rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert_eq!(n, len as isize);
    }
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(c: &mut Criterion) {
    for payload in [64usize, 1500] {
        let mut s = setup(payload);
        c.bench_function(&format!("virtio_net_pair_{payload}_batch{BATCH}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| device_round(&mut s)).sum())
        });
    }
}

criterion_group!(benches, bench);

fn compare() {
    let rounds: usize = std::env::var("VMKIT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let base = baseline();
    for payload in [64usize, 1500] {
        let mut s = setup(payload);
        let len = HDR_LEN + payload;
        device_round(&mut s);
        baseline_round(&base, len);
        let (mut d, mut b) = (vec![], vec![]);
        for _ in 0..rounds {
            d.push(device_round(&mut s));
            b.push(baseline_round(&base, len));
        }
        let pps = |t: Duration| BATCH as f64 / t.as_secs_f64();
        let (d, b) = (pps(median(d)), pps(median(b)));
        println!(
            "compare: net_pps_{payload} vmkit={d:.0} baseline(socketpair)={b:.0} ratio={:.3}",
            d / b
        );
    }
}

fn main() {
    let quick = std::env::var("VMKIT_BENCH_COMPARE_ONLY").as_deref() == Ok("1");
    if !quick {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    compare();
}
