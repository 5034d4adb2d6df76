//! virtio-console over virtio-mmio, driven by the driver model: output
//! through partial writes, input held until buffers come, the bounded
//! input buffer, and the Unix socket backend reconnecting.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{rig, Rig, FORMATS, TIMEOUT};
use vm_memory::{Bytes, GuestAddress};
use vmkit_virtio::devices::console::{ConsoleCounters, RX_QUEUE, TX_QUEUE};
use vmkit_virtio::devices::{Console, ConsoleBackend, ConsoleOptions, FdConsole, SocketConsole};
use vmkit_virtio::queue::RingFormat;

/// A non-blocking pipe: (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    assert_eq!(r, 0);
    // SAFETY: a fresh descriptor owned by nobody else.
    let r = unsafe { File::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { File::from_raw_fd(fds[1]) };
    (r, w)
}

struct Con {
    rig: Rig,
    counters: Arc<ConsoleCounters>,
}

fn console(backend: Box<dyn ConsoleBackend>, options: ConsoleOptions, format: RingFormat) -> Con {
    let dev = Console::new(backend, options).unwrap();
    let counters = dev.counters();
    Con {
        rig: rig(Box::new(dev), format, 1),
        counters,
    }
}

impl Con {
    fn write(&mut self, data: &[u8], pieces: usize) {
        let d = &mut self.rig.driver;
        let mut bufs = Vec::new();
        for part in data.chunks(data.len().div_ceil(pieces).max(1)) {
            let b = d.alloc(part.len() as u64);
            d.mem().write_slice(part, GuestAddress(b)).unwrap();
            bufs.push((b, part.len() as u32));
        }
        d.submit(TX_QUEUE, &bufs, &[]).unwrap();
        d.notify(TX_QUEUE).unwrap();
    }

    fn wait_tx(&mut self) -> u32 {
        self.rig.driver.wait_used(TX_QUEUE, TIMEOUT).unwrap().1
    }

    /// Posts one receive buffer of `len` bytes.
    fn post(&mut self, len: u32) -> u64 {
        let d = &mut self.rig.driver;
        let b = d.alloc(u64::from(len));
        d.submit(RX_QUEUE, &[], &[(b, len)]).unwrap();
        d.notify(RX_QUEUE).unwrap();
        b
    }

    /// Waits for the next receive buffer and returns its bytes.
    fn recv(&mut self, buf: u64) -> Vec<u8> {
        let (_, len) = self.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
        let mut out = vec![0u8; len as usize];
        self.rig
            .driver
            .mem()
            .read_slice(&mut out, GuestAddress(buf))
            .unwrap();
        out
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Reads a non-blocking file until `len` bytes arrived, slowly.
fn read_all(mut f: File, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 3000];
    let start = Instant::now();
    while out.len() < len {
        assert!(start.elapsed() < TIMEOUT, "output stalled at {}", out.len());
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    out
}

#[test]
fn config_space_reports_size() {
    let (_r, w) = pipe();
    let options = ConsoleOptions {
        size: Some((132, 43)),
        ..Default::default()
    };
    let c = console(
        Box::new(FdConsole::new(None, OwnedFd::from(w)).unwrap()),
        options,
        RingFormat::Split,
    );
    assert_eq!(c.rig.driver.features() & 1, 1);
    let mut cfg = [0u8; 8];
    c.rig.driver.read_config(0, &mut cfg).unwrap();
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 132);
    assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]), 43);
    assert_eq!(u32::from_le_bytes([cfg[4], cfg[5], cfg[6], cfg[7]]), 1);
    // Without a size the feature is not offered.
    let (_r, w) = pipe();
    let c = console(
        Box::new(FdConsole::new(None, OwnedFd::from(w)).unwrap()),
        ConsoleOptions::default(),
        RingFormat::Split,
    );
    assert_eq!(c.rig.driver.features() & 1, 0);
}

#[test]
fn large_output_survives_partial_writes_both_formats() {
    for format in FORMATS {
        let (r, w) = pipe();
        let mut c = console(
            Box::new(FdConsole::new(None, OwnedFd::from(w)).unwrap()),
            ConsoleOptions::default(),
            format,
        );
        // 600 KiB through a 64 KiB pipe read slowly: the device sees
        // WouldBlock and partial writes many times.
        let chunks: Vec<Vec<u8>> = (0..30).map(|i| pattern(20_000 + i * 7, i as u8)).collect();
        let total: usize = chunks.iter().map(Vec::len).sum();
        let reader = std::thread::spawn(move || read_all(r, total));
        for (i, ch) in chunks.iter().enumerate() {
            c.write(ch, 1 + i % 4);
        }
        for _ in &chunks {
            assert_eq!(c.wait_tx(), 0);
        }
        let got = reader.join().unwrap();
        assert_eq!(got.len(), total);
        assert!(got == chunks.concat(), "{format:?}: output corrupted");
        let s = c.counters.snapshot();
        assert_eq!(s.output_bytes, total as u64);
        assert_eq!(s.errors, 0);
        // Not a busy loop: wake-ups are far fewer than bytes / 4 KiB * 10.
        assert!(s.wakeups < 2000, "{} wake-ups", s.wakeups);
    }
}

#[test]
fn input_before_buffers_is_delivered_in_order() {
    for format in FORMATS {
        let (r, mut w) = pipe();
        let (_out_r, out_w) = pipe();
        let mut c = console(
            Box::new(FdConsole::new(Some(OwnedFd::from(r)), OwnedFd::from(out_w)).unwrap()),
            ConsoleOptions::default(),
            format,
        );
        let input = pattern(10_000, 3);
        for part in input.chunks(1000) {
            w.write_all(part).unwrap();
        }
        // Let the device read it all while the guest has no buffers.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.counters.snapshot().input_bytes, 0);
        let mut got = Vec::new();
        while got.len() < input.len() {
            let b = c.post(777);
            got.extend(c.recv(b));
        }
        assert!(got == input, "{format:?}: input reordered or lost");
        let s = c.counters.snapshot();
        assert_eq!(s.input_bytes, input.len() as u64);
        assert_eq!(s.input_dropped, 0);
    }
}

#[test]
fn full_input_buffer_drops_the_newest_bytes_and_counts_them() {
    let (r, mut w) = pipe();
    let (_out_r, out_w) = pipe();
    let options = ConsoleOptions {
        input_buffer: 1024,
        ..Default::default()
    };
    let mut c = console(
        Box::new(FdConsole::new(Some(OwnedFd::from(r)), OwnedFd::from(out_w)).unwrap()),
        options,
        RingFormat::Split,
    );
    let input = pattern(3000, 9);
    w.write_all(&input).unwrap();
    wait_for("the drop", || {
        c.counters.snapshot().input_dropped == 3000 - 1024
    });
    let b = c.post(4096);
    assert_eq!(c.recv(b), input[..1024]);
    // Later input flows normally.
    w.write_all(b"after").unwrap();
    let b = c.post(64);
    assert_eq!(c.recv(b), b"after");
}

#[test]
fn hostile_chains_are_returned_and_counted() {
    let (_r, w) = pipe();
    let mut c = console(
        Box::new(FdConsole::new(None, OwnedFd::from(w)).unwrap()),
        ConsoleOptions::default(),
        RingFormat::Split,
    );
    let d = &mut c.rig.driver;
    let a = d.alloc(16);
    let b = d.alloc(16);
    d.submit(TX_QUEUE, &[(a, 16)], &[(b, 16)]).unwrap();
    d.notify(TX_QUEUE).unwrap();
    assert_eq!(d.wait_used(TX_QUEUE, TIMEOUT).unwrap().1, 0);
    d.submit(TX_QUEUE, &[(1 << 40, 16)], &[]).unwrap();
    d.notify(TX_QUEUE).unwrap();
    assert_eq!(d.wait_used(TX_QUEUE, TIMEOUT).unwrap().1, 0);
    assert_eq!(c.counters.snapshot().errors, 2);
}

fn socket_path(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "vmkit-console-{tag}-{}-{n}.sock",
        std::process::id()
    ))
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut out = vec![0u8; n];
    s.read_exact(&mut out).unwrap();
    out
}

#[test]
fn listening_socket_accepts_again_after_the_peer_leaves() {
    let path = socket_path("listen");
    let backend = SocketConsole::listen(&path).unwrap();
    let discarded = backend.discarded();
    let mut c = console(
        Box::new(backend),
        ConsoleOptions::default(),
        RingFormat::Packed,
    );
    for round in 0..3u8 {
        let mut peer = UnixStream::connect(&path).unwrap();
        // Input from the peer reaches the guest.
        let msg = [b'a' + round; 5];
        peer.write_all(&msg).unwrap();
        let b = c.post(64);
        assert_eq!(c.recv(b), msg);
        // Guest output reaches the peer.
        let out = pattern(100_000, round);
        c.write(&out, 3);
        let got = read_n(&mut peer, out.len());
        assert_eq!(c.wait_tx(), 0);
        assert!(got == out, "round {round}: output corrupted");
        drop(peer);
        // Wait until the device noticed the peer left.
        std::thread::sleep(Duration::from_millis(30));
    }
    std::fs::remove_file(&path).unwrap();
    assert_eq!(discarded.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn connecting_socket_reconnects_after_the_peer_leaves() {
    let path = socket_path("connect");
    let listener = UnixListener::bind(&path).unwrap();
    let backend = SocketConsole::connect(&path).unwrap();
    let mut c = console(
        Box::new(backend),
        ConsoleOptions::default(),
        RingFormat::Split,
    );
    for round in 0..3u8 {
        // Output first: after the peer left, that is what reconnects (the
        // listener queues the connection until accepted).
        let out = pattern(5000, round);
        c.write(&out, 2);
        let (mut peer, _) = listener.accept().unwrap();
        assert_eq!(c.wait_tx(), 0);
        assert!(read_n(&mut peer, out.len()) == out, "round {round}");
        let msg = [b'x' + round; 3];
        peer.write_all(&msg).unwrap();
        let b = c.post(16);
        assert_eq!(c.recv(b), msg);
        drop(peer);
        std::thread::sleep(Duration::from_millis(30));
    }
    std::fs::remove_file(&path).unwrap();
}
