//! Shared set-up for the virtio tests.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::{InterruptLine, RecordingLine};
use vmkit_memory::{GuestMemoryMmap, MemoryLayout};
use vmkit_virtio::driver::{Driver, MmioDriver};
use vmkit_virtio::queue::RingFormat;
use vmkit_virtio::transport::{MmioOptions, MmioTransport};
use vmkit_virtio::VirtioDevice;

pub const HEAP: u64 = 0x10_0000;
pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const FORMATS: [RingFormat; 2] = [RingFormat::Split, RingFormat::Packed];

pub fn memory() -> GuestMemoryMmap {
    MemoryLayout::new(16 << 20)
        .unwrap()
        .create_memory(&Default::default())
        .unwrap()
}

pub struct Rig {
    pub driver: Driver<MmioDriver>,
    pub transport: Arc<MmioTransport>,
    pub line: Arc<RecordingLine>,
}

/// A device on virtio-mmio with a driver that negotiated `format`.
pub fn rig(device: Box<dyn VirtioDevice>, format: RingFormat, wanted: u64) -> Rig {
    let mem = memory();
    let line = Arc::new(RecordingLine::new());
    let transport = Arc::new(
        MmioTransport::new(
            device,
            mem.clone(),
            line.clone() as Arc<dyn InterruptLine>,
            MmioOptions::default(),
        )
        .unwrap(),
    );
    let mut driver = Driver::new(MmioDriver::new(transport.clone()), mem, HEAP);
    driver.negotiate(format, wanted).unwrap();
    Rig {
        driver,
        transport,
        line,
    }
}

/// A scratch file of `len` bytes filled by `f(offset)`, removed on drop.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(len: usize, f: impl Fn(usize) -> u8) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vmkit-virtio-test-{}-{n}.img", std::process::id()));
        let data: Vec<u8> = (0..len).map(f).collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        Self { path }
    }

    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a block request came back with.
pub struct Reply {
    pub status: u8,
    pub used_len: u32,
    pub data: Vec<u8>,
}

/// One request: header, optional data out, `in_len` bytes in, status.
pub fn request(
    r: &mut Rig,
    kind: u32,
    sector: u64,
    out: &[u8],
    in_len: u32,
    indirect: bool,
) -> Reply {
    let d = &mut r.driver;
    let hdr = d.alloc(16);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem().write_slice(&h, GuestAddress(hdr)).unwrap();
    let mut readable = vec![(hdr, 16)];
    if !out.is_empty() {
        let b = d.alloc(out.len() as u64);
        d.mem().write_slice(out, GuestAddress(b)).unwrap();
        readable.push((b, out.len() as u32));
    }
    let inbuf = d.alloc(u64::from(in_len));
    let st = d.alloc(1);
    d.mem().write_slice(&[0xee], GuestAddress(st)).unwrap();
    let mut writable = vec![];
    if in_len > 0 {
        writable.push((inbuf, in_len));
    }
    writable.push((st, 1));
    if indirect {
        d.submit_indirect(0, &readable, &writable).unwrap();
    } else {
        d.submit(0, &readable, &writable).unwrap();
    }
    d.notify(0).unwrap();
    let (_, used_len) = d.wait_used(0, TIMEOUT).unwrap();
    let mut data = vec![0u8; in_len as usize];
    d.mem().read_slice(&mut data, GuestAddress(inbuf)).unwrap();
    let mut s = [0u8];
    d.mem().read_slice(&mut s, GuestAddress(st)).unwrap();
    Reply {
        status: s[0],
        used_len,
        data,
    }
}
