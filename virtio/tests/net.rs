//! virtio-net over virtio-mmio, driven by the driver model: two devices
//! joined by a `NetPair`, mergeable and single receive buffers, hostile
//! chains, offload negotiation, and a tap device in a private network
//! namespace.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{rig, Rig, FORMATS, TIMEOUT};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vmkit_virtio::devices::net::{
    offload, NetCounters, NetStats, PairBackend, HDR_LEN, MAX_FRAME_LEN, RX_QUEUE, TX_QUEUE,
};
use vmkit_virtio::devices::{Net, NetOptions, NetPair};
use vmkit_virtio::driver::DriverError;
use vmkit_virtio::queue::RingFormat;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;

struct Side {
    rig: Rig,
    counters: Arc<NetCounters>,
}

impl Side {
    fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    /// Sends `frame` (header included) as one chain split in `pieces`.
    fn send(&mut self, frame: &[u8], pieces: usize) -> u32 {
        let d = &mut self.rig.driver;
        let mut bufs = Vec::new();
        let chunk = frame.len().div_ceil(pieces.max(1)).max(1);
        for part in frame.chunks(chunk) {
            let b = d.alloc(part.len() as u64);
            d.mem().write_slice(part, GuestAddress(b)).unwrap();
            bufs.push((b, part.len() as u32));
        }
        d.submit(TX_QUEUE, &bufs, &[]).unwrap();
        d.notify(TX_QUEUE).unwrap();
        d.wait_used(TX_QUEUE, TIMEOUT).unwrap().1
    }

    /// Posts one receive chain of the given buffer sizes; returns its
    /// buffers.
    fn post_rx(&mut self, sizes: &[u32]) -> Vec<(u64, u32)> {
        let d = &mut self.rig.driver;
        let bufs: Vec<(u64, u32)> = sizes.iter().map(|&s| (d.alloc(u64::from(s)), s)).collect();
        d.submit(RX_QUEUE, &[], &bufs).unwrap();
        d.notify(RX_QUEUE).unwrap();
        bufs
    }

    fn read(&self, bufs: &[(u64, u32)], len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(a, l) in bufs {
            let n = left.min(l as usize);
            let mut b = vec![0u8; n];
            self.rig
                .driver
                .mem()
                .read_slice(&mut b, GuestAddress(a))
                .unwrap();
            out.extend_from_slice(&b);
            left -= n;
        }
        out
    }
}

fn side(backend: PairBackend, format: RingFormat, wanted: u64, options: NetOptions) -> Side {
    let dev = Net::new(Box::new(backend), options).unwrap();
    let counters = dev.counters();
    Side {
        rig: rig(Box::new(dev), format, wanted),
        counters,
    }
}

fn pair(format: RingFormat, wanted: u64) -> (Side, Side) {
    let (a, b) = NetPair::new().unwrap();
    (
        side(a, format, wanted, NetOptions::default()),
        side(b, format, wanted, NetOptions::default()),
    )
}

/// A frame with a plain header (no offloads) and `len` payload bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

fn num_buffers(data: &[u8]) -> u16 {
    u16::from_le_bytes([data[10], data[11]])
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn config_space_has_mac_status_and_mtu() {
    let (a, _b) = NetPair::new().unwrap();
    let options = NetOptions {
        mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        mtu: Some(9000),
        ..Default::default()
    };
    let s = side(a, RingFormat::Split, F_MAC | F_STATUS | F_MTU, options);
    let f = s.rig.driver.features();
    assert_ne!(f & F_MAC, 0);
    assert_ne!(f & F_STATUS, 0);
    assert_ne!(f & F_MTU, 0);
    let mut cfg = [0u8; 12];
    s.rig.driver.read_config(0, &mut cfg).unwrap();
    assert_eq!(&cfg[0..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "LINK_UP");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
    // Without a MAC option the feature is not offered.
    let (c, _d) = NetPair::new().unwrap();
    let s = side(c, RingFormat::Split, F_MAC | F_MTU, NetOptions::default());
    assert_eq!(s.rig.driver.features() & (F_MAC | F_MTU), 0);
}

#[test]
fn offloads_follow_negotiated_features_only() {
    // Offered but not accepted: the backend gets no offloads.
    let (a, _b) = NetPair::new().unwrap();
    let probe = a.offloads_set();
    probe.store(0xff, Ordering::Relaxed);
    let s = side(a, RingFormat::Split, F_MRG_RXBUF, NetOptions::default());
    assert_eq!(s.rig.driver.features() & F_GUEST_CSUM, 0);
    assert_eq!(probe.load(Ordering::Relaxed), 0);

    // Accepted: exactly what was negotiated.
    let (a, _b) = NetPair::new().unwrap();
    let probe = a.offloads_set();
    let s = side(
        a,
        RingFormat::Split,
        F_GUEST_CSUM | F_GUEST_TSO4,
        NetOptions::default(),
    );
    assert_eq!(
        s.rig.driver.features() & (F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6),
        F_GUEST_CSUM | F_GUEST_TSO4
    );
    assert_eq!(probe.load(Ordering::Relaxed), offload::CSUM | offload::TSO4);

    // A backend without offloads: the guest offloads are not offered.
    let (a, _b) = NetPair::new().unwrap();
    let a = a.with_supported_offloads(0);
    let s = side(
        a,
        RingFormat::Split,
        F_GUEST_CSUM | F_GUEST_TSO4,
        NetOptions::default(),
    );
    assert_eq!(s.rig.driver.features() & (F_GUEST_CSUM | F_GUEST_TSO4), 0);
}

#[test]
fn two_devices_exchange_frames_both_ways_both_formats() {
    for format in FORMATS {
        for wanted in [0, F_MRG_RXBUF] {
            let (mut a, mut b) = pair(format, wanted);
            for round in 0..20u8 {
                let len = 60 + usize::from(round) * 70;
                let f = frame(len, round);
                let rx = b.post_rx(&[2048]);
                assert_eq!(a.send(&f, 1 + usize::from(round % 3)), 0);
                let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
                assert_eq!(used as usize, f.len(), "{format:?} {wanted:#x}");
                let got = b.read(&rx, used);
                assert_eq!(num_buffers(&got), 1);
                assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);

                // And back, the header split over two buffers.
                let rx = a.post_rx(&[HDR_LEN as u32, 2048]);
                b.send(&f, 2);
                let (_, used) = a.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
                assert_eq!(used as usize, f.len());
                let got = a.read(&rx, used);
                assert_eq!(num_buffers(&got), 1);
                assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
            }
            let (sa, sb) = (a.stats(), b.stats());
            assert_eq!(sa.tx_frames, 20);
            assert_eq!(sb.rx_frames, 20);
            assert_eq!(sb.tx_frames, 20);
            assert_eq!(sa.rx_frames, 20);
            assert_eq!(sa.tx_bytes, sb.rx_bytes);
            assert_eq!(
                sa.rx_dropped + sb.rx_dropped + sa.tx_errors + sb.tx_errors,
                0
            );
        }
    }
}

#[test]
fn large_buffers_are_filled_directly_with_a_64k_frame() {
    for format in FORMATS {
        let (mut a, mut b) = pair(format, F_MRG_RXBUF);
        let f = frame(MAX_FRAME_LEN - HDR_LEN, 9);
        // One chain of MAX_FRAME_LEN bytes in 17 pieces.
        let mut sizes = vec![4096u32; 16];
        sizes.push((MAX_FRAME_LEN - 16 * 4096) as u32);
        let rx = b.post_rx(&sizes);
        a.send(&f, 5);
        let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
        assert_eq!(used as usize, MAX_FRAME_LEN);
        let got = b.read(&rx, used);
        assert_eq!(num_buffers(&got), 1);
        assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
    }
}

#[test]
fn mergeable_buffers_carry_a_9000_byte_frame() {
    for format in FORMATS {
        for (size, expect) in [(1500u32, 7u16), (4096, 3)] {
            let (mut a, mut b) = pair(format, F_MRG_RXBUF);
            let bufs: Vec<_> = (0..8).map(|_| b.post_rx(&[size])).collect();
            let f = frame(9000, 3);
            a.send(&f, 3);
            let mut got = Vec::new();
            let mut lens = Vec::new();
            for rx in bufs.iter().take(usize::from(expect)) {
                let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
                lens.push(used);
                got.extend(b.read(rx, used));
            }
            assert_eq!(num_buffers(&got), expect, "{format:?} {size}");
            assert_eq!(got.len(), f.len());
            assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
            assert!(lens[..lens.len() - 1].iter().all(|&l| l == size));
            // No more buffers were used.
            std::thread::sleep(Duration::from_millis(20));
            assert!(b.rig.driver.used(RX_QUEUE).unwrap().is_none());
            assert_eq!(b.stats().rx_frames, 1);
        }
    }
}

#[test]
fn mergeable_frame_waits_for_enough_buffers() {
    let (mut a, mut b) = pair(RingFormat::Split, F_MRG_RXBUF);
    let first = b.post_rx(&[1024]);
    let f = frame(3000, 5);
    a.send(&f, 1);
    std::thread::sleep(Duration::from_millis(50));
    // 3012 bytes do not fit in 1024: nothing delivered yet, nothing lost.
    assert!(b.rig.driver.used(RX_QUEUE).unwrap().is_none());
    let more = [b.post_rx(&[1024]), b.post_rx(&[1024])];
    let mut got = Vec::new();
    for rx in [&first, &more[0], &more[1]] {
        let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
        got.extend(b.read(rx, used));
    }
    assert_eq!(num_buffers(&got), 3);
    assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
    assert_eq!(b.stats().rx_dropped, 0);
}

#[test]
fn without_mergeable_buffers_a_too_small_buffer_drops_the_frame() {
    for format in FORMATS {
        let (mut a, mut b) = pair(format, 0);
        let rx = b.post_rx(&[1000]);
        a.send(&frame(1500, 1), 1);
        wait_for("the drop", || b.stats().rx_dropped == 1);
        assert!(b.rig.driver.used(RX_QUEUE).unwrap().is_none());
        // The buffer was kept for the next frame, which fits.
        let f = frame(500, 2);
        a.send(&f, 1);
        let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
        assert_eq!(used as usize, f.len());
        assert_eq!(&b.read(&rx, used)[HDR_LEN..], &f[HDR_LEN..]);
        assert_eq!(b.stats().rx_frames, 1);
    }
}

#[test]
fn frames_wait_for_receive_buffers_without_spinning() {
    for format in FORMATS {
        let (mut a, mut b) = pair(format, F_MRG_RXBUF);
        let before = b.stats().wakeups;
        let frames: Vec<_> = (0..3).map(|i| frame(100 + i * 10, i as u8)).collect();
        for f in &frames {
            a.send(f, 1);
        }
        std::thread::sleep(Duration::from_millis(200));
        let idle = b.stats().wakeups - before;
        assert!(idle <= 6, "worker woke {idle} times with no buffers");
        for f in &frames {
            let rx = b.post_rx(&[2048]);
            let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
            assert_eq!(&b.read(&rx, used)[HDR_LEN..], &f[HDR_LEN..]);
        }
        std::thread::sleep(Duration::from_millis(100));
        let total = b.stats().wakeups - before;
        assert!(total <= 20, "worker woke {total} times for 3 frames");
    }
}

#[test]
fn hostile_transmit_chains_are_returned_and_counted() {
    for format in FORMATS {
        let (mut a, mut b) = pair(format, F_CSUM | F_GUEST_CSUM);
        // Header too short.
        assert_eq!(a.send(&[0u8; 8], 1), 0);
        assert_eq!(a.stats().tx_errors, 1);
        // A device-writable buffer in a transmit chain.
        let d = &mut a.rig.driver;
        let r = d.alloc(64);
        let w = d.alloc(64);
        d.submit(TX_QUEUE, &[(r, 64)], &[(w, 64)]).unwrap();
        d.notify(TX_QUEUE).unwrap();
        assert_eq!(d.wait_used(TX_QUEUE, TIMEOUT).unwrap().1, 0);
        assert_eq!(a.stats().tx_errors, 2);
        // Over the frame limit.
        a.send(&frame(MAX_FRAME_LEN, 0), 2);
        assert_eq!(a.stats().tx_errors, 3);
        // Segmentation that was not negotiated (HOST_TSO4 not accepted).
        let mut f = frame(200, 0);
        f[1] = 1;
        a.send(&f, 1);
        assert_eq!(a.stats().tx_errors, 4);
        // A buffer outside guest memory.
        let d = &mut a.rig.driver;
        d.submit(TX_QUEUE, &[(1 << 40, 64)], &[]).unwrap();
        d.notify(TX_QUEUE).unwrap();
        assert_eq!(d.wait_used(TX_QUEUE, TIMEOUT).unwrap().1, 0);
        assert_eq!(a.stats().tx_errors, 5);
        // Checksum offload was negotiated on both sides: that frame goes
        // through.
        let mut f = frame(200, 0);
        f[0] = 1;
        let rx = b.post_rx(&[2048]);
        a.send(&f, 1);
        let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
        assert_eq!(used as usize, f.len());
        assert_eq!(b.read(&rx, used)[0], 1, "NEEDS_CSUM passed through");
        let s = a.stats();
        assert_eq!((s.tx_frames, s.tx_errors), (1, 5));
    }
}

#[test]
fn received_offloads_the_guest_did_not_accept_are_dropped() {
    let (a, b) = NetPair::new().unwrap();
    let mut a = side(
        a,
        RingFormat::Split,
        F_CSUM | F_HOST_TSO4,
        NetOptions::default(),
    );
    let mut b = side(b, RingFormat::Split, F_MRG_RXBUF, NetOptions::default());
    let rx = b.post_rx(&[4096]);
    let mut f = frame(1000, 0);
    f[1] = 1; // GSO TCPv4
    a.send(&f, 1);
    wait_for("the drop", || b.stats().rx_dropped == 1);
    let g = frame(100, 4);
    a.send(&g, 1);
    let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
    assert_eq!(&b.read(&rx, used)[HDR_LEN..], &g[HDR_LEN..]);
}

#[test]
fn hostile_receive_chains_are_returned_and_counted() {
    for format in FORMATS {
        let (mut a, mut b) = pair(format, F_MRG_RXBUF);
        let d = &mut b.rig.driver;
        // Device-readable buffer in a receive chain.
        let r = d.alloc(64);
        let w = d.alloc(2048);
        d.submit(RX_QUEUE, &[(r, 64)], &[(w, 2048)]).unwrap();
        // No room for a header.
        let s = d.alloc(4);
        d.submit(RX_QUEUE, &[], &[(s, 4)]).unwrap();
        let good = b.post_rx(&[2048]);
        let f = frame(300, 7);
        a.send(&f, 1);
        let mut lens = Vec::new();
        for _ in 0..3 {
            lens.push(b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap().1);
        }
        assert_eq!(lens, vec![0, 0, f.len() as u32]);
        assert_eq!(&b.read(&good, lens[2])[HDR_LEN..], &f[HDR_LEN..]);
        assert_eq!(b.stats().rx_errors, 2);
    }
}

#[test]
fn broken_receive_ring_sets_needs_reset() {
    let (mut a, mut b) = pair(RingFormat::Split, 0);
    // A descriptor naming itself as next: a loop.
    let d = &mut b.rig.driver;
    let buf = d.alloc(2048);
    d.write_split_desc(RX_QUEUE, 0, vmkit_virtio::driver::raw(buf, 2048, 1 | 2, 0))
        .unwrap();
    d.publish_split(RX_QUEUE, 0).unwrap();
    d.notify(RX_QUEUE).unwrap();
    a.send(&frame(64, 0), 1);
    let r = b.rig.driver.wait_used(RX_QUEUE, Duration::from_secs(5));
    assert!(matches!(r, Err(DriverError::NeedsReset)), "{r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Random frame sizes and receive buffer layouts: every frame arrives
    /// whole or is counted as dropped, and what arrives is intact.
    #[test]
    fn random_frames_and_layouts_arrive_intact_or_counted(
        sizes in proptest::collection::vec(0usize..12_000, 1..12),
        layout in proptest::collection::vec(1u32..3000, 1..4),
        mergeable in any::<bool>(),
    ) {
        let mut layout = layout;
        // Room for the header in every chain, and not too many chains
        // per frame.
        layout[0] = layout[0].max(256);
        for format in FORMATS {
            check_contents(format, &sizes, &layout, mergeable);
        }
    }
}

/// Sends `sizes` and checks the bytes of every delivered frame, buffer by
/// buffer, against what was sent.
fn check_contents(format: RingFormat, sizes: &[usize], layout: &[u32], mergeable: bool) {
    let wanted = if mergeable { F_MRG_RXBUF } else { 0 };
    let (mut a, mut b) = pair(format, wanted);
    let cap: usize = layout.iter().map(|&l| l as usize).sum();
    let mut drops = 0;
    let mut delivered = 0;
    let mut bytes = 0;
    for (i, &len) in sizes.iter().enumerate() {
        let f = frame(len, i as u8);
        let chains: Vec<_> = (0..f.len().div_ceil(cap).max(1))
            .map(|_| b.post_rx(layout))
            .collect();
        a.send(&f, 1 + i % 3);
        let mut n = 0;
        if !mergeable && f.len() > cap {
            drops += 1;
            wait_for("the drop", || b.stats().rx_dropped == drops);
        } else {
            let mut got = Vec::new();
            for rx in &chains {
                let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
                got.extend(b.read(rx, used));
                n += 1;
                if got.len() >= f.len() {
                    break;
                }
            }
            assert_eq!(got.len(), f.len());
            assert_eq!(usize::from(num_buffers(&got)), n);
            assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..], "frame {i} corrupted");
            delivered += 1;
            bytes += len;
        }
        // Posted chains left over are used up by header-only frames.
        for _ in n..chains.len() {
            a.send(&frame(0, 0), 1);
            let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
            assert_eq!(used as usize, HDR_LEN);
            delivered += 1;
        }
    }
    let s = b.stats();
    assert_eq!(s.rx_dropped, drops);
    assert_eq!(s.rx_frames, delivered);
    assert_eq!(s.rx_bytes, bytes as u64);
    assert_eq!(s.rx_errors, 0);
    assert!(b.rig.driver.used(RX_QUEUE).unwrap().is_none());
}

// ---------------------------------------------------------------------
// Tap, in a private network namespace.

mod tap {
    use super::*;
    use vmkit_virtio::devices::net::NetBackend;
    use vmkit_virtio::devices::Tap;

    fn require() -> bool {
        std::env::var("VMKIT_REQUIRE_KVM").is_ok_and(|v| v == "1")
    }

    fn skip(why: &str) {
        assert!(!require(), "tap test cannot run: {why}");
        eprintln!("SKIPPED: tap test: {why}");
    }

    fn ifreq(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr
    }

    fn sockaddr_in(ip: [u8; 4]) -> libc::sockaddr {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    }

    /// Gives `name` the address `ip`/24 and brings it up (in the calling
    /// thread's network namespace).
    fn configure(name: &str, ip: [u8; 4]) -> std::io::Result<()> {
        // SAFETY: plain socket creation.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let mut ifr = ifreq(name);
        ifr.ifr_ifru.ifru_addr = sockaddr_in(ip);
        // SAFETY: the ioctls read/write one ifreq.
        let r = check(unsafe { libc::ioctl(s, libc::SIOCSIFADDR, &mut ifr) })
            .and_then(|()| {
                let mut ifr = ifreq(name);
                ifr.ifr_ifru.ifru_netmask = sockaddr_in([255, 255, 255, 0]);
                // SAFETY: as above.
                check(unsafe { libc::ioctl(s, libc::SIOCSIFNETMASK, &mut ifr) })
            })
            .and_then(|()| {
                let mut ifr = ifreq(name);
                ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
                // SAFETY: as above.
                check(unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &mut ifr) })
            });
        // SAFETY: `s` is ours.
        unsafe { libc::close(s) };
        r
    }

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
    const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
    const HOST_IP: [u8; 4] = [10, 77, 0, 1];

    fn arp_request() -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend([0xff; 6]);
        f.extend(GUEST_MAC);
        f.extend([0x08, 0x06]); // ARP
        f.extend([0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
        f.extend(GUEST_MAC);
        f.extend(GUEST_IP);
        f.extend([0; 6]);
        f.extend(HOST_IP);
        f.resize(HDR_LEN + 60, 0);
        f
    }

    #[test]
    fn tap_answers_arp_from_the_guest_in_a_private_netns() {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return skip("/dev/net/tun missing");
        }
        // Everything runs in one thread moved into a new network namespace
        // (unshare affects the calling thread only), so the host's
        // networking is untouched.
        let result = std::thread::spawn(|| -> Result<(), String> {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("SKIP unshare: {}", std::io::Error::last_os_error()));
            }
            let tap = Tap::open("vmkt%d").map_err(|e| format!("SKIP {e}"))?;
            let name = tap.name().to_string();
            assert!(name.starts_with("vmkt"), "{name}");
            assert_ne!(tap.supported_offloads() & offload::CSUM, 0);
            configure(&name, HOST_IP).map_err(|e| format!("configure {name}: {e}"))?;
            let options = NetOptions {
                mac: Some(GUEST_MAC),
                ..Default::default()
            };
            let dev = Net::new(Box::new(tap), options).unwrap();
            let counters = dev.counters();
            let mut s = Side {
                rig: rig(
                    Box::new(dev),
                    RingFormat::Split,
                    F_MRG_RXBUF | F_MAC | F_GUEST_CSUM | F_GUEST_TSO4 | F_CSUM,
                ),
                counters,
            };
            // Heads 0..16, one buffer each, in order.
            let rx: Vec<_> = (0..16).map(|_| s.post_rx(&[2048])).collect();
            let req = arp_request();
            // The kernel may send its own frames (IPv6 solicitations);
            // look for the ARP reply among the first few.
            for attempt in 0..5 {
                assert_eq!(s.send(&req, 2), 0);
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline {
                    let Some((id, used)) =
                        s.rig.driver.used(RX_QUEUE).map_err(|e| e.to_string())?
                    else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let b = rx.get(usize::from(id)).ok_or("unexpected head")?;
                    {
                        let got = s.read(b, used);
                        if got.len() >= HDR_LEN + 42
                            && got[HDR_LEN + 12..HDR_LEN + 14] == [0x08, 0x06]
                            && got[HDR_LEN + 20..HDR_LEN + 22] == [0, 2]
                            && got[HDR_LEN + 28..HDR_LEN + 32] == HOST_IP
                            && got[HDR_LEN..HDR_LEN + 6] == GUEST_MAC
                        {
                            assert_eq!(num_buffers(&got), 1);
                            assert_eq!(&got[HDR_LEN + 38..HDR_LEN + 42], &GUEST_IP);
                            let st = s.stats();
                            assert!(st.tx_frames >= 1 && st.rx_frames >= 1);
                            return Ok(());
                        }
                    }
                }
                eprintln!("no ARP reply yet (attempt {attempt})");
            }
            Err("no ARP reply from the kernel".into())
        })
        .join()
        .unwrap();
        match result {
            Ok(()) => {}
            Err(e) if e.starts_with("SKIP") => skip(&e),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn transmit_backpressure_loses_nothing() {
    for format in FORMATS {
        let (mut a, mut b) = pair(format, 0);
        // Far more than the socket pair queues: the sender sees WouldBlock
        // and must resume when the receiver drains.
        let frames: Vec<Vec<u8>> = (0..60).map(|i| frame(20_000 + i, i as u8)).collect();
        for f in &frames {
            let d = &mut a.rig.driver;
            let buf = d.alloc(f.len() as u64);
            d.mem().write_slice(f, GuestAddress(buf)).unwrap();
            d.submit(TX_QUEUE, &[(buf, f.len() as u32)], &[]).unwrap();
        }
        a.rig.driver.notify(TX_QUEUE).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let early = a.stats().tx_frames;
        assert!(early < frames.len() as u64, "nothing held back ({early})");
        for f in &frames {
            let rx = b.post_rx(&[20_100]);
            let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
            assert_eq!(used as usize, f.len());
            assert!(b.read(&rx, used)[HDR_LEN..] == f[HDR_LEN..]);
        }
        for _ in &frames {
            a.rig.driver.wait_used(TX_QUEUE, TIMEOUT).unwrap();
        }
        let s = a.stats();
        assert_eq!((s.tx_frames, s.tx_dropped, s.tx_errors), (60, 0, 0));
        assert!(s.wakeups < 500, "{} wake-ups", s.wakeups);
    }
}

#[test]
fn a_transmit_batch_with_bad_chains_between_keeps_order() {
    for format in FORMATS {
        let (mut a, mut b) = pair(format, 0);
        let n = 70usize;
        let mut good = Vec::new();
        for i in 0..n {
            let d = &mut a.rig.driver;
            if i % 7 == 3 {
                // A device-writable buffer: refused in the middle of a batch.
                let r = d.alloc(64);
                let w = d.alloc(64);
                d.submit(TX_QUEUE, &[(r, 64)], &[(w, 64)]).unwrap();
            } else {
                let f = frame(100 + i, i as u8);
                let buf = d.alloc(f.len() as u64);
                d.mem().write_slice(&f, GuestAddress(buf)).unwrap();
                d.submit(TX_QUEUE, &[(buf, f.len() as u32)], &[]).unwrap();
                good.push(f);
            }
        }
        let rx: Vec<_> = good.iter().map(|_| b.post_rx(&[2048])).collect();
        a.rig.driver.notify(TX_QUEUE).unwrap();
        for (k, (f, bufs)) in good.iter().zip(&rx).enumerate() {
            let (_, used) = b.rig.driver.wait_used(RX_QUEUE, TIMEOUT).unwrap();
            assert_eq!(used as usize, f.len(), "frame {k}");
            assert!(b.read(bufs, used)[HDR_LEN..] == f[HDR_LEN..], "frame {k}");
        }
        for _ in 0..n {
            a.rig.driver.wait_used(TX_QUEUE, TIMEOUT).unwrap();
        }
        let s = a.stats();
        assert_eq!(
            (s.tx_frames, s.tx_errors, s.tx_dropped),
            (good.len() as u64, 10, 0)
        );
    }
}

#[test]
fn pair_send_batch_delivers_frames_in_order() {
    use vmkit_virtio::devices::net::{FrameBufs, NetBackend};
    let (mut a, mut b) = NetPair::new().unwrap();
    let mut frames: Vec<Vec<u8>> = (0..5).map(|i| frame(60 + i * 100, i as u8)).collect();
    let mut bufs: Vec<FrameBufs<'_>> = frames
        .iter_mut()
        .map(|f| FrameBufs::from_slice(f))
        .collect();
    assert_eq!(a.send_batch(&mut bufs).unwrap(), 5);
    drop(bufs);
    for f in &frames {
        let mut got = vec![0u8; 2048];
        let n = b.recv(&mut FrameBufs::from_slice(&mut got)).unwrap();
        assert_eq!(&got[..n], &f[..]);
    }
    let mut got = vec![0u8; 64];
    let e = b.recv(&mut FrameBufs::from_slice(&mut got)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
}

/// A backend that takes `room` frames, then says WouldBlock.
#[derive(Debug)]
struct Limited {
    room: usize,
    sent: Vec<usize>,
}

impl vmkit_virtio::devices::net::NetBackend for Limited {
    fn raw_fd(&self) -> std::os::fd::RawFd {
        -1
    }
    fn recv(
        &mut self,
        _: &mut vmkit_virtio::devices::net::FrameBufs<'_>,
    ) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
    fn send(
        &mut self,
        bufs: &mut vmkit_virtio::devices::net::FrameBufs<'_>,
    ) -> std::io::Result<()> {
        if self.room == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.room -= 1;
        self.sent.push(bufs.len());
        Ok(())
    }
    fn supported_offloads(&self) -> u32 {
        0
    }
    fn set_offloads(&mut self, _: u32) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn default_send_batch_sends_a_prefix_and_fails_only_on_the_first() {
    use vmkit_virtio::devices::net::{FrameBufs, NetBackend};
    let mut store: Vec<Vec<u8>> = (0..4).map(|i| vec![0u8; 20 + i]).collect();
    let mut bufs: Vec<FrameBufs<'_>> = store.iter_mut().map(|f| FrameBufs::from_slice(f)).collect();
    let mut be = Limited {
        room: 2,
        sent: Vec::new(),
    };
    assert_eq!(be.send_batch(&mut bufs).unwrap(), 2);
    assert_eq!(be.sent, vec![20, 21]);
    let e = be.send_batch(&mut bufs[2..]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    be.room = 5;
    assert_eq!(be.send_batch(&mut bufs[2..]).unwrap(), 2);
    assert_eq!(be.sent, vec![20, 21, 22, 23]);
}
