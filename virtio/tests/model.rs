//! Model-based property tests: the device-side queue against the driver
//! model, and the block device against an in-memory model disk.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;

use common::{memory, rig, TempImage};
use proptest::prelude::*;
use vmkit_virtio::devices::{Block, BlockOptions};
use vmkit_virtio::driver::{Driver, DriverError, DriverTransport};
use vmkit_virtio::queue::{Queue, QueueConfig, RingFormat};

/// A transport that only records the queue the driver sets up, so that a
/// test can build the device side of that queue itself.
#[derive(Default)]
struct Capture {
    status: RefCell<u32>,
    queue: RefCell<Option<QueueConfig>>,
}

impl DriverTransport for Capture {
    fn status(&self) -> Result<u32, DriverError> {
        Ok(*self.status.borrow())
    }
    fn set_status(&self, v: u32) -> Result<(), DriverError> {
        *self.status.borrow_mut() = v;
        Ok(())
    }
    fn device_features(&self) -> Result<u64, DriverError> {
        Ok(u64::MAX)
    }
    fn set_driver_features(&self, _f: u64) -> Result<(), DriverError> {
        Ok(())
    }
    fn num_queues(&self) -> Result<u16, DriverError> {
        Ok(1)
    }
    fn queue_max(&self, _q: u16) -> Result<u16, DriverError> {
        Ok(16)
    }
    fn setup_queue(
        &self,
        _q: u16,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), DriverError> {
        *self.queue.borrow_mut() = Some(QueueConfig {
            max_size: 16,
            size,
            ready: true,
            desc,
            driver,
            device,
        });
        Ok(())
    }
    fn notify(&self, _q: u16) -> Result<(), DriverError> {
        Ok(())
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) -> Result<(), DriverError> {
        data.fill(0);
        Ok(())
    }
    fn take_interrupt(&self) -> Result<u32, DriverError> {
        Ok(0)
    }
    fn config_generation(&self) -> Result<u32, DriverError> {
        Ok(0)
    }
}

/// A buffer as submitted: address, length, device-writable.
type Buffer = (u64, u32, bool);

#[derive(Debug, Clone)]
enum Op {
    /// Submit a chain of (len, writable) buffers, through an indirect
    /// table or not.
    Submit {
        bufs: Vec<(u32, bool)>,
        indirect: bool,
    },
    /// The device pops one chain and uses it, writing `len` bytes.
    Use { len: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            prop::collection::vec((1u32..5000, any::<bool>()), 1..5),
            any::<bool>()
        )
            .prop_map(|(mut bufs, indirect)| {
                // Readable buffers first, as drivers must.
                bufs.sort_by_key(|&(_, w)| w);
                Op::Submit { bufs, indirect }
            }),
        (0u32..100).prop_map(|len| Op::Use { len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Whatever the driver submits, the device pops the same chains in the
    /// same order (descriptor for descriptor), and what the device uses
    /// comes back to the driver with the right ID and length, through many
    /// wraps of a 16-entry ring, in both formats.
    #[test]
    fn queue_agrees_with_the_driver_model(packed in any::<bool>(), ops in prop::collection::vec(op(), 1..120)) {
        let format = if packed { RingFormat::Packed } else { RingFormat::Split };
        let mem = memory();
        let mut driver = Driver::new(Capture::default(), mem.clone(), 0x10_0000);
        driver.negotiate(format, 0).unwrap();
        let config = driver.transport().queue.borrow().unwrap();
        let mut queue = Queue::new(0, &config, format, true, &mem).unwrap();
        // Submitted and not yet popped: (id, buffers); popped and not yet
        // used: (id, buffers).
        let mut pending: VecDeque<(u16, Vec<Buffer>)> = VecDeque::new();
        let mut in_use: VecDeque<u16> = VecDeque::new();
        let mut outstanding = 0usize;
        for op in ops {
            match op {
                Op::Submit { bufs, indirect } => {
                    let addrs: Vec<Buffer> = bufs
                        .iter()
                        .map(|&(len, w)| (driver.alloc(u64::from(len)), len, w))
                        .collect();
                    let readable: Vec<(u64, u32)> = addrs.iter().filter(|b| !b.2).map(|b| (b.0, b.1)).collect();
                    let writable: Vec<(u64, u32)> = addrs.iter().filter(|b| b.2).map(|b| (b.0, b.1)).collect();
                    let r = if indirect {
                        driver.submit_indirect(0, &readable, &writable)
                    } else {
                        driver.submit(0, &readable, &writable)
                    };
                    match r {
                        Ok(id) => {
                            pending.push_back((id, addrs));
                            outstanding += 1;
                        }
                        Err(DriverError::Full(_)) => prop_assert!(outstanding > 0),
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::Use { len } => {
                    let chain = queue.pop(&mem).unwrap();
                    match pending.pop_front() {
                        None => prop_assert!(chain.is_none()),
                        Some((id, bufs)) => {
                            let chain = chain.unwrap();
                            prop_assert_eq!(chain.token().id(), id);
                            let got: Vec<Buffer> = chain
                                .descriptors()
                                .iter()
                                .map(|d| (d.addr.0, d.len, d.writable))
                                .collect();
                            prop_assert_eq!(got, bufs);
                            queue.add_used(&mem, chain.token(), len).unwrap();
                            in_use.push_back(id);
                            let (uid, ulen) = driver.used(0).unwrap().unwrap();
                            prop_assert_eq!(uid, in_use.pop_front().unwrap());
                            prop_assert_eq!(ulen, len);
                            outstanding -= 1;
                        }
                    }
                }
            }
        }
        prop_assert!(driver.used(0).unwrap().is_none());
    }
}

#[derive(Debug, Clone)]
enum BlkOp {
    Read { sector: u64, sectors: u32 },
    Write { sector: u64, sectors: u32, seed: u8 },
    Zero { sector: u64, sectors: u32 },
    Flush,
}

const DISK_SECTORS: u64 = 64;

fn blk_op() -> impl Strategy<Value = BlkOp> {
    // Some requests reach past the end, to check they fail and change
    // nothing.
    let sector = 0..DISK_SECTORS + 4;
    prop_oneof![
        (sector.clone(), 1u32..9).prop_map(|(sector, sectors)| BlkOp::Read { sector, sectors }),
        (sector.clone(), 1u32..9, any::<u8>()).prop_map(|(sector, sectors, seed)| BlkOp::Write {
            sector,
            sectors,
            seed
        }),
        (sector, 1u32..9).prop_map(|(sector, sectors)| BlkOp::Zero { sector, sectors }),
        Just(BlkOp::Flush),
    ]
}

fn blk(r: &mut common::Rig, kind: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, Vec<u8>) {
    let reply = common::request(r, kind, sector, out, in_len, false);
    (reply.status, reply.data)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random request sequences against a model disk: every read returns
    /// the model's bytes, requests past the end fail and change nothing,
    /// and the file equals the model at the end.
    #[test]
    fn block_device_agrees_with_a_model_disk(packed in any::<bool>(), ops in prop::collection::vec(blk_op(), 1..40)) {
        let format = if packed { RingFormat::Packed } else { RingFormat::Split };
        let len = (DISK_SECTORS * 512) as usize;
        let img = TempImage::new(len, |i| (i / 512) as u8);
        let mut model: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
        let dev = Block::open(&img.path, BlockOptions::default()).unwrap();
        let mut r = rig(Box::new(dev), format, 0x00ff_ffff);
        for op in ops {
            match op {
                BlkOp::Read { sector, sectors } => {
                    let n = sectors * 512;
                    let (st, data) = blk(&mut r, 0, sector, &[], n);
                    if sector + u64::from(sectors) <= DISK_SECTORS {
                        prop_assert_eq!(st, 0);
                        let at = (sector * 512) as usize;
                        prop_assert_eq!(&data[..], &model[at..at + n as usize]);
                    } else {
                        prop_assert_eq!(st, 1);
                    }
                }
                BlkOp::Write { sector, sectors, seed } => {
                    let n = (sectors * 512) as usize;
                    let data: Vec<u8> = (0..n).map(|i| seed.wrapping_add(i as u8)).collect();
                    let (st, _) = blk(&mut r, 1, sector, &data, 0);
                    if sector + u64::from(sectors) <= DISK_SECTORS {
                        prop_assert_eq!(st, 0);
                        let at = (sector * 512) as usize;
                        model[at..at + n].copy_from_slice(&data);
                    } else {
                        prop_assert_eq!(st, 1);
                    }
                }
                BlkOp::Zero { sector, sectors } => {
                    let mut range = sector.to_le_bytes().to_vec();
                    range.extend_from_slice(&sectors.to_le_bytes());
                    range.extend_from_slice(&0u32.to_le_bytes());
                    let (st, _) = blk(&mut r, 13, 0, &range, 0);
                    if sector + u64::from(sectors) <= DISK_SECTORS {
                        prop_assert_eq!(st, 0);
                        let at = (sector * 512) as usize;
                        model[at..at + (sectors * 512) as usize].fill(0);
                    } else {
                        prop_assert_eq!(st, 1);
                    }
                }
                BlkOp::Flush => prop_assert_eq!(blk(&mut r, 4, 0, &[], 0).0, 0),
            }
        }
        prop_assert_eq!(img.read(), model);
    }
}
