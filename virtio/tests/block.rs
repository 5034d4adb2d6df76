//! virtio-blk over virtio-mmio, driven by the driver model, in both ring
//! formats.
#![allow(clippy::unwrap_used)]

mod common;

use common::{request, rig, Rig, TempImage, FORMATS, TIMEOUT};
use vm_memory::{Bytes, GuestAddress};
use vmkit_virtio::devices::{Block, BlockOptions};
use vmkit_virtio::driver::{raw, DriverError};
use vmkit_virtio::queue::RingFormat;
use vmkit_virtio::status;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

fn pattern(i: usize) -> u8 {
    (i * 7 + i / 512) as u8
}

fn block_rig(image: &TempImage, options: BlockOptions, format: RingFormat) -> Rig {
    let dev = Block::open(&image.path, options).unwrap();
    rig(Box::new(dev), format, 0x00ff_ffff)
}

#[test]
fn config_space_reports_capacity_and_limits() {
    let img = TempImage::new(64 * 512 + 100, pattern);
    let r = block_rig(&img, BlockOptions::default(), RingFormat::Split);
    let mut cfg = [0u8; 60];
    r.driver.read_config(0, &mut cfg).unwrap();
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 64);
    assert_eq!(u32::from_le_bytes(cfg[8..12].try_into().unwrap()), 1 << 20);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 254);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    // Bytes past the end read as zero.
    let mut past = [0xffu8; 8];
    r.driver.read_config(60, &mut past).unwrap();
    assert_eq!(past, [0; 8]);
}

#[test]
fn read_write_flush_both_formats_direct_and_indirect() {
    for format in FORMATS {
        for indirect in [false, true] {
            let img = TempImage::new(256 * 512, pattern);
            let mut r = block_rig(&img, BlockOptions::default(), format);
            let rep = request(&mut r, T_IN, 3, &[], 2048, indirect);
            assert_eq!(rep.status, S_OK, "{format:?} indirect={indirect}");
            assert_eq!(rep.used_len, 2049);
            let want: Vec<u8> = (3 * 512..3 * 512 + 2048).map(pattern).collect();
            assert_eq!(rep.data, want);

            let new: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
            let rep = request(&mut r, T_OUT, 10, &new, 0, indirect);
            assert_eq!(rep.status, S_OK);
            assert_eq!(rep.used_len, 1);
            let rep = request(&mut r, T_FLUSH, 0, &[], 0, indirect);
            assert_eq!(rep.status, S_OK);
            let disk = img.read();
            assert_eq!(&disk[10 * 512..10 * 512 + 1024], &new[..]);
            assert_eq!(disk[10 * 512 - 1], pattern(10 * 512 - 1));
            assert_eq!(disk[10 * 512 + 1024], pattern(10 * 512 + 1024));
        }
    }
}

#[test]
fn direct_io_mode_reads_and_writes() {
    let img = TempImage::new(64 * 512, pattern);
    let options = BlockOptions {
        direct: true,
        ..Default::default()
    };
    // tmpfs has no O_DIRECT; skip loudly there rather than pass.
    let dev = match Block::open(&img.path, options) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIP direct_io_mode_reads_and_writes: {e}");
            return;
        }
    };
    let mut r = rig(Box::new(dev), RingFormat::Split, 0);
    let rep = request(&mut r, T_IN, 1, &[], 1024, false);
    assert_eq!(rep.status, S_OK);
    assert_eq!(rep.data, (512..1536).map(pattern).collect::<Vec<_>>());
    let rep = request(&mut r, T_OUT, 2, &[0x5a; 512], 0, false);
    assert_eq!(rep.status, S_OK);
    assert_eq!(&img.read()[1024..1536], &[0x5a; 512][..]);
}

#[test]
fn get_id_and_unsupported_type() {
    for format in FORMATS {
        let img = TempImage::new(8 * 512, pattern);
        let options = BlockOptions {
            id: "vmkit-disk-0123456789abcdef".into(),
            ..Default::default()
        };
        let mut r = block_rig(&img, options, format);
        let rep = request(&mut r, T_GET_ID, 0, &[], 20, false);
        assert_eq!(rep.status, S_OK);
        assert_eq!(&rep.data, b"vmkit-disk-012345678");
        let rep = request(&mut r, 99, 0, &[], 0, false);
        assert_eq!(rep.status, S_UNSUPP);
    }
}

#[test]
fn out_of_range_and_misaligned_requests_fail_with_ioerr() {
    for format in FORMATS {
        let img = TempImage::new(16 * 512, pattern);
        let mut r = block_rig(&img, BlockOptions::default(), format);
        // Last sector is fine, one past is not.
        assert_eq!(request(&mut r, T_IN, 15, &[], 512, false).status, S_OK);
        assert_eq!(request(&mut r, T_IN, 16, &[], 512, false).status, S_IOERR);
        assert_eq!(request(&mut r, T_IN, 15, &[], 1024, false).status, S_IOERR);
        assert_eq!(
            request(&mut r, T_IN, u64::MAX, &[], 512, false).status,
            S_IOERR
        );
        // Not a whole number of sectors.
        assert_eq!(
            request(&mut r, T_OUT, 0, &[1; 100], 0, false).status,
            S_IOERR
        );
        assert_eq!(img.read(), (0..16 * 512).map(pattern).collect::<Vec<_>>());
    }
}

#[test]
fn read_only_refuses_writes_and_offers_no_discard() {
    let img = TempImage::new(8 * 512, pattern);
    let options = BlockOptions {
        read_only: true,
        ..Default::default()
    };
    let mut r = block_rig(&img, options, RingFormat::Packed);
    assert_ne!(r.driver.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(
        request(&mut r, T_OUT, 0, &[0; 512], 0, false).status,
        S_IOERR
    );
    let range = range_bytes(0, 1, 0);
    // A read-only device does not offer discard or write-zeroes at all.
    assert_eq!(r.driver.features() & ((1 << 13) | (1 << 14)), 0);
    assert_eq!(
        request(&mut r, T_DISCARD, 0, &range, 0, false).status,
        S_UNSUPP
    );
    assert_eq!(
        request(&mut r, T_WRITE_ZEROES, 0, &range, 0, false).status,
        S_UNSUPP
    );
    assert_eq!(request(&mut r, T_IN, 0, &[], 512, false).status, S_OK);
    assert_eq!(img.read(), (0..8 * 512).map(pattern).collect::<Vec<_>>());
}

fn range_bytes(sector: u64, count: u32, flags: u32) -> Vec<u8> {
    let mut v = sector.to_le_bytes().to_vec();
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

#[test]
fn write_zeroes_and_discard() {
    for format in FORMATS {
        let img = TempImage::new(64 * 512, |_| 0xab);
        let mut r = block_rig(&img, BlockOptions::default(), format);
        let mut ranges = range_bytes(2, 3, 0);
        ranges.extend(range_bytes(20, 1, 1));
        assert_eq!(
            request(&mut r, T_WRITE_ZEROES, 0, &ranges, 0, false).status,
            S_OK
        );
        let disk = img.read();
        assert!(disk[2 * 512..5 * 512].iter().all(|&b| b == 0));
        assert!(disk[20 * 512..21 * 512].iter().all(|&b| b == 0));
        assert_eq!(disk[5 * 512], 0xab);
        assert_eq!(disk[2 * 512 - 1], 0xab);
        // Discard is advisory: only success is required, and the range
        // check.
        assert_eq!(
            request(&mut r, T_DISCARD, 0, &range_bytes(40, 8, 0), 0, false).status,
            S_OK
        );
        assert_eq!(
            request(&mut r, T_DISCARD, 0, &range_bytes(60, 8, 0), 0, false).status,
            S_IOERR
        );
        // Reserved flags, and a list that is not a whole number of ranges.
        // (Checked below the feature test: without negotiation the request
        // type itself is unsupported.)
        assert_eq!(
            request(&mut r, T_DISCARD, 0, &range_bytes(0, 1, 1), 0, false).status,
            S_IOERR
        );
        assert_eq!(
            request(&mut r, T_WRITE_ZEROES, 0, &[0; 10], 0, false).status,
            S_IOERR
        );
    }
}

#[test]
fn discard_and_write_zeroes_need_their_features() {
    let img = TempImage::new(8 * 512, |_| 0xab);
    let dev = Block::open(&img.path, BlockOptions::default()).unwrap();
    // The driver accepts no device feature.
    let mut r = rig(Box::new(dev), RingFormat::Split, 0);
    let range = range_bytes(0, 1, 0);
    assert_eq!(
        request(&mut r, T_DISCARD, 0, &range, 0, false).status,
        S_UNSUPP
    );
    assert_eq!(
        request(&mut r, T_WRITE_ZEROES, 0, &range, 0, false).status,
        S_UNSUPP
    );
    assert!(img.read().iter().all(|&b| b == 0xab));
}

#[test]
fn limits_are_enforced() {
    let img = TempImage::new(1024 * 512, pattern);
    let options = BlockOptions {
        seg_max: 4,
        size_max: 4096,
        max_write_zeroes_seg: 2,
        max_write_zeroes_sectors: 8,
        ..Default::default()
    };
    let mut r = block_rig(&img, options, RingFormat::Split);
    // A segment larger than size_max.
    assert_eq!(request(&mut r, T_IN, 0, &[], 8192, false).status, S_IOERR);
    // Five data segments with seg_max 4.
    let d = &mut r.driver;
    let hdr = d.alloc(16);
    d.mem().write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
    let bufs: Vec<(u64, u32)> = (0..5).map(|_| (d.alloc(512), 512)).collect();
    let st = d.alloc(1);
    let mut w = bufs.clone();
    w.push((st, 1));
    d.submit(0, &[(hdr, 16)], &w).unwrap();
    d.notify(0).unwrap();
    d.wait_used(0, TIMEOUT).unwrap();
    let mut s = [0u8];
    d.mem().read_slice(&mut s, GuestAddress(st)).unwrap();
    assert_eq!(s[0], S_IOERR);
    // Too many ranges, and a range too long.
    let mut three = range_bytes(0, 1, 0);
    three.extend(range_bytes(1, 1, 0));
    three.extend(range_bytes(2, 1, 0));
    assert_eq!(
        request(&mut r, T_WRITE_ZEROES, 0, &three, 0, false).status,
        S_IOERR
    );
    assert_eq!(
        request(&mut r, T_WRITE_ZEROES, 0, &range_bytes(0, 9, 0), 0, false).status,
        S_IOERR
    );
    assert_eq!(img.read(), (0..1024 * 512).map(pattern).collect::<Vec<_>>());
}

#[test]
fn buffer_outside_guest_memory_gives_ioerr() {
    for format in FORMATS {
        let img = TempImage::new(16 * 512, pattern);
        let mut r = block_rig(&img, BlockOptions::default(), format);
        let d = &mut r.driver;
        let hdr = d.alloc(16);
        d.mem().write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
        let st = d.alloc(1);
        // The data buffer is past the end of the 16 MiB of guest memory.
        d.submit(0, &[(hdr, 16)], &[(0x4000_0000, 512), (st, 1)])
            .unwrap();
        d.notify(0).unwrap();
        d.wait_used(0, TIMEOUT).unwrap();
        let mut s = [0u8];
        d.mem().read_slice(&mut s, GuestAddress(st)).unwrap();
        assert_eq!(s[0], S_IOERR, "{format:?}");
        // The device keeps working.
        assert_eq!(request(&mut r, T_IN, 0, &[], 512, false).status, S_OK);
    }
}

#[test]
fn request_without_status_byte_is_returned_empty() {
    let img = TempImage::new(16 * 512, pattern);
    let mut r = block_rig(&img, BlockOptions::default(), RingFormat::Split);
    let d = &mut r.driver;
    let hdr = d.alloc(16);
    d.mem().write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
    d.submit(0, &[(hdr, 16)], &[]).unwrap();
    d.notify(0).unwrap();
    let (_, len) = d.wait_used(0, TIMEOUT).unwrap();
    assert_eq!(len, 0);
    assert_eq!(request(&mut r, T_IN, 0, &[], 512, false).status, S_OK);
}

/// Hostile split chains: each breaks the ring protocol, so the device must
/// set DEVICE_NEEDS_RESET (and not hang or panic), and a reset brings it
/// back.
#[test]
fn broken_split_chains_set_needs_reset() {
    type Setup = fn(&mut vmkit_virtio::driver::Driver<vmkit_virtio::driver::MmioDriver>, u64);
    let cases: [(&str, Setup); 5] = [
        ("loop", |d, buf| {
            d.write_split_desc(0, 0, raw(buf, 16, 1, 1)).unwrap();
            d.write_split_desc(0, 1, raw(buf, 16, 1, 0)).unwrap();
        }),
        ("next out of range", |d, buf| {
            d.write_split_desc(0, 0, raw(buf, 16, 1, 999)).unwrap();
        }),
        ("nested indirect", |d, buf| {
            // Descriptor 0 -> indirect table at buf whose entry is itself
            // indirect.
            d.mem()
                .write_slice(
                    &[
                        buf.to_le_bytes().as_slice(),
                        &16u32.to_le_bytes(),
                        &4u16.to_le_bytes(),
                        &0u16.to_le_bytes(),
                    ]
                    .concat(),
                    GuestAddress(buf),
                )
                .unwrap();
            d.write_split_desc(0, 0, raw(buf, 16, 4, 0)).unwrap();
        }),
        ("readable after writable", |d, buf| {
            d.write_split_desc(0, 0, raw(buf, 16, 2 | 1, 1)).unwrap();
            d.write_split_desc(0, 1, raw(buf, 16, 0, 0)).unwrap();
        }),
        ("length overflow", |d, buf| {
            d.write_split_desc(0, 0, raw(buf, u32::MAX, 1, 1)).unwrap();
            d.write_split_desc(0, 1, raw(buf, u32::MAX, 2, 0)).unwrap();
        }),
    ];
    for (name, setup) in cases {
        let img = TempImage::new(16 * 512, pattern);
        let mut r = block_rig(&img, BlockOptions::default(), RingFormat::Split);
        let buf = r.driver.alloc(64);
        setup(&mut r.driver, buf);
        r.driver.publish_split(0, 0).unwrap();
        r.driver.notify(0).unwrap();
        match r.driver.wait_used(0, TIMEOUT) {
            Err(DriverError::NeedsReset) => {}
            other => panic!("{name}: expected NeedsReset, got {other:?}"),
        }
        assert_ne!(
            r.transport.status() & status::DEVICE_NEEDS_RESET,
            0,
            "{name}"
        );
        // A configuration interrupt was raised.
        assert!(r.line.level(), "{name}");
        // Reset and renegotiate: the device works again.
        r.driver.negotiate(RingFormat::Split, 0).unwrap();
        assert_eq!(
            request(&mut r, T_IN, 0, &[], 512, false).status,
            S_OK,
            "{name}"
        );
        assert_eq!(img.read(), (0..16 * 512).map(pattern).collect::<Vec<_>>());
    }
}

/// A head index past the queue size, and an available index that claims
/// more chains than the queue holds.
#[test]
fn bad_head_and_avail_index_set_needs_reset() {
    let img = TempImage::new(16 * 512, pattern);
    let mut r = block_rig(&img, BlockOptions::default(), RingFormat::Split);
    r.driver.publish_split(0, 4000).unwrap();
    r.driver.notify(0).unwrap();
    assert!(matches!(
        r.driver.wait_used(0, TIMEOUT),
        Err(DriverError::NeedsReset)
    ));

    r.driver.negotiate(RingFormat::Split, 0).unwrap();
    let (_, avail, _) = r.driver.ring_addresses(0).unwrap();
    r.driver
        .mem()
        .write_obj(1000u16.to_le(), GuestAddress(avail + 2))
        .unwrap();
    r.driver.notify(0).unwrap();
    assert!(matches!(
        r.driver.wait_used(0, TIMEOUT),
        Err(DriverError::NeedsReset)
    ));
}

/// Hostile packed chains.
#[test]
fn broken_packed_chains_set_needs_reset() {
    type Setup = fn(&mut vmkit_virtio::driver::Driver<vmkit_virtio::driver::MmioDriver>, u64);
    let cases: [(&str, Setup); 4] = [
        ("chain wraps the whole ring", |d, buf| {
            for i in 0..256 {
                d.write_packed_desc(0, i, raw(buf, 16, 1, 0), true).unwrap();
            }
        }),
        ("next descriptor not available", |d, buf| {
            d.write_packed_desc(0, 0, raw(buf, 16, 1, 0), true).unwrap();
            d.write_packed_desc(0, 1, raw(buf, 16, 0, 0), false)
                .unwrap();
        }),
        ("indirect with next", |d, buf| {
            d.write_packed_desc(0, 0, raw(buf, 16, 4 | 1, 0), true)
                .unwrap();
        }),
        ("indirect table length not a multiple of 16", |d, buf| {
            d.write_packed_desc(0, 0, raw(buf, 17, 4, 0), true).unwrap();
        }),
    ];
    for (name, setup) in cases {
        let img = TempImage::new(16 * 512, pattern);
        let mut r = block_rig(&img, BlockOptions::default(), RingFormat::Packed);
        let buf = r.driver.alloc(64);
        setup(&mut r.driver, buf);
        r.driver.notify(0).unwrap();
        match r.driver.wait_used(0, TIMEOUT) {
            Err(DriverError::NeedsReset) => {}
            other => panic!("{name}: expected NeedsReset, got {other:?}"),
        }
        r.driver.negotiate(RingFormat::Packed, 0).unwrap();
        assert_eq!(
            request(&mut r, T_IN, 0, &[], 512, false).status,
            S_OK,
            "{name}"
        );
    }
}

/// Many requests in flight at once, completed in a batch, through a ring
/// that wraps several times.
#[test]
fn ring_wraps_many_times() {
    for format in FORMATS {
        let img = TempImage::new(64 * 512, pattern);
        let dev = Block::open(&img.path, BlockOptions::default()).unwrap();
        let mut r = rig(Box::new(dev), format, 0);
        r.driver.negotiate_with(format, 0, Some(8)).unwrap();
        for round in 0..40u64 {
            let sector = round % 60;
            let rep = request(&mut r, T_IN, sector, &[], 512, round % 3 == 0);
            assert_eq!(rep.status, S_OK);
            let s = sector as usize * 512;
            assert_eq!(rep.data, (s..s + 512).map(pattern).collect::<Vec<_>>());
        }
    }
}

#[test]
fn mapped_reads_see_writes_zeroes_and_stay_in_range() {
    let mapped = || BlockOptions {
        map_reads: true,
        ..Default::default()
    };
    for format in FORMATS {
        for indirect in [false, true] {
            // A partial trailing sector is not mapped nor readable.
            let img = TempImage::new(64 * 512 + 100, pattern);
            let mut r = block_rig(&img, mapped(), format);
            let rep = request(&mut r, T_IN, 3, &[], 2048, indirect);
            assert_eq!(rep.status, S_OK, "{format:?} indirect={indirect}");
            assert_eq!(rep.used_len, 2049);
            let want: Vec<u8> = (3 * 512..3 * 512 + 2048).map(pattern).collect();
            assert_eq!(rep.data, want);
            // A write through the file is visible to the next mapped read.
            let new: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
            assert_eq!(request(&mut r, T_OUT, 10, &new, 0, indirect).status, S_OK);
            let rep = request(&mut r, T_IN, 10, &[], 1024, indirect);
            assert_eq!(rep.status, S_OK);
            assert_eq!(rep.data, new);
            // So is write-zeroes with unmap (a hole punched under the map).
            assert_eq!(
                request(&mut r, T_WRITE_ZEROES, 0, &range_bytes(10, 1, 1), 0, false).status,
                S_OK
            );
            let rep = request(&mut r, T_IN, 10, &[], 512, indirect);
            assert_eq!(rep.status, S_OK);
            assert!(rep.data.iter().all(|&b| b == 0));
            assert_eq!(request(&mut r, T_FLUSH, 0, &[], 0, indirect).status, S_OK);
            // The last whole sector reads; one past it fails, as without
            // the mapping.
            assert_eq!(request(&mut r, T_IN, 63, &[], 512, indirect).status, S_OK);
            assert_eq!(
                request(&mut r, T_IN, 63, &[], 1024, indirect).status,
                S_IOERR
            );
        }
    }
}

#[test]
fn mapped_reads_refuse_direct_and_accept_empty_images() {
    let img = TempImage::new(4096, pattern);
    let both = BlockOptions {
        map_reads: true,
        direct: true,
        ..Default::default()
    };
    assert!(Block::open(&img.path, both).is_err());
    let empty = TempImage::new(0, pattern);
    let dev = Block::open(
        &empty.path,
        BlockOptions {
            map_reads: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(dev.capacity(), 0);
}

#[test]
fn polling_worker_serves_requests_and_rearms_notifications() {
    const F_EVENT_IDX: u64 = 1 << 29;
    for format in FORMATS {
        for wanted in [0, F_EVENT_IDX] {
            let img = TempImage::new(64 * 512, pattern);
            let options = BlockOptions {
                poll_us: 200,
                ..Default::default()
            };
            let dev = Block::open(&img.path, options).unwrap();
            let mut r = rig(Box::new(dev), format, wanted);
            // Back-to-back requests: the worker's window grows and it
            // polls for the next one while the driver submits it.
            for i in 0..60u64 {
                let data = vec![i as u8; 512];
                let rep = request(&mut r, T_OUT, i % 64, &data, 0, false);
                assert_eq!(rep.status, S_OK);
                let rep = request(&mut r, T_IN, i % 64, &[], 512, false);
                assert_eq!(rep.status, S_OK);
                assert_eq!(rep.data, data, "request {i} ({format:?}, {wanted:#x})");
            }
            // Idle far past the window: the worker must have re-enabled
            // notifications before blocking, or the next kick is lost.
            std::thread::sleep(std::time::Duration::from_millis(20));
            if wanted == 0 {
                let (_, _, device) = r.driver.ring_addresses(0).unwrap();
                let mut f = [0u8; 4];
                r.driver
                    .mem()
                    .read_slice(&mut f, GuestAddress(device))
                    .unwrap();
                match format {
                    // Split: VRING_USED_F_NO_NOTIFY clear.
                    RingFormat::Split => assert_eq!(f[0] & 1, 0, "split ring left suppressed"),
                    // Packed: device event flags not "disable" (1).
                    RingFormat::Packed => {
                        assert_ne!(u16::from_le_bytes([f[2], f[3]]), 1, "packed left disabled")
                    }
                }
            }
            let rep = request(&mut r, T_IN, 3, &[], 512, false);
            assert_eq!(rep.status, S_OK);
            assert_eq!(rep.data, vec![3u8; 512]);
        }
    }
}

#[test]
fn polling_window_above_the_maximum_is_refused() {
    let img = TempImage::new(8 * 512, pattern);
    let options = BlockOptions {
        poll_us: vmkit_virtio::worker::MAX_POLL_US + 1,
        ..Default::default()
    };
    assert!(Block::open(&img.path, options).is_err());
}
