//! virtio-blk (virtio 1.2, 5.2) over a raw image file.
//!
//! Requests: read, write, flush (`fdatasync`, so an acknowledged flush has
//! reached stable storage), get-id, discard (hole punching) and
//! write-zeroes. A read-only device refuses writes, discards and
//! write-zeroes with `VIRTIO_BLK_S_IOERR`. The capacity is the file size
//! rounded down to whole sectors.
//!
//! Limits advertised in the configuration space and enforced: at most
//! `seg_max` data segments per request, no segment longer than `size_max`,
//! at most `max_discard_seg` / `max_write_zeroes_seg` ranges per request,
//! each at most `max_discard_sectors` / `max_write_zeroes_sectors` long.
//! A request that breaks them, is malformed, or reaches past the end of
//! the disk fails with `VIRTIO_BLK_S_IOERR`; an unknown request type gets
//! `VIRTIO_BLK_S_UNSUPP`. A chain with no writable byte for the status
//! cannot be answered and is returned with length 0.
//!
//! With [`BlockOptions::direct`] the file is opened with `O_DIRECT` and
//! data goes through a sector-aligned bounce buffer, as O_DIRECT needs
//! aligned memory and guest buffers need not be.
//!
//! By default every request is one `preadv`/`pwritev` straight between the
//! file and guest memory. With [`BlockOptions::map_reads`] (opt-in) the
//! image is also mapped read-only and reads become memory copies from the
//! page cache, with no system call: see that option for the price.
//!
//! # Why mapped reads are not the default
//!
//! On the benchmark (`benches/block.rs`, tmpfs image, 64-request batches)
//! mapped reads are what reach half of memcpy bandwidth at 4 KiB and a
//! million requests per second at 512 B; `preadv` costs 1–2 µs per call on
//! the virtualised hosts measured and stays near a third of memcpy and
//! 0.4–0.6M requests per second (a bare loop of the same reads, with no
//! device at all, manages 0.75–1.3M; io_uring was slower there, 2.0–2.7 µs
//! per 512 B read from tmpfs). They still stay opt-in, because:
//!
//! - a mapping turns someone else's truncation of the image into `SIGBUS`,
//!   which kills the whole VMM, where `preadv` returns an error that the
//!   guest sees as `VIRTIO_BLK_S_IOERR`. Linux cannot forbid truncating an
//!   ordinary file; `F_SEAL_SHRINK` exists only for memfds, and a lease
//!   breaks only on open or `truncate(2)`, not on `ftruncate` of an
//!   already open descriptor. A library cannot know whether the image is
//!   private to it; the caller can;
//! - reading holes of a sparse image through the mapping fills the page
//!   cache (on tmpfs: memory) where `preadv` of a hole does not;
//! - `O_DIRECT` users asked to bypass the page cache, which a mapping
//!   cannot do.
//!
//! Writes never go through the mapping, even with the option: a store into
//! a hole of a sparse image on a full file system raises `SIGBUS` instead
//! of `ENOSPC`, and a store gives no error at all for the guest to see.
//! `pwritev` reports both, and `fdatasync` (FLUSH) then makes the data
//! durable; the shared mapping sees the written pages at once.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};
use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use crate::device::{read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice};
use crate::device_type;
use crate::queue::{ChainReader, ChainWriter, DescChain};
use crate::worker::{
    Completion, ServedQueue, Worker, WorkerHandler, WorkerOptions, DEFAULT_POLL_US, MAX_POLL_US,
};

/// Bytes per sector (virtio-blk addresses in 512-byte units whatever the
/// block size).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial number returned by GET_ID.
pub const ID_LEN: usize = 20;
const HEADER_LEN: usize = 16;
const CONFIG_LEN: usize = 60;
/// Bounce buffer piece for O_DIRECT.
const BOUNCE: usize = 1 << 20;
const ALIGN: usize = 4096;

/// Errors opening a block backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The image size could not be read.
    #[error("cannot get the size of disk image {path}: {source}")]
    Size {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The image could not be mapped for [`BlockOptions::map_reads`].
    #[error("cannot map disk image ({len} bytes) for reads: {reason}")]
    Map {
        /// Bytes to map.
        len: u64,
        /// What failed.
        reason: String,
    },
    /// An option is out of range.
    #[error("invalid block option: {0}")]
    Option(String),
}

/// How a block device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOptions {
    /// Refuse writes (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Open with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
    /// Serve reads by copying from a shared read-only mapping of the image
    /// instead of `preadv` (no system call per read; writes, flushes and
    /// discards still go through the file, and the mapping sees them).
    ///
    /// **Opt-in, because it trades a guarantee for speed:** if anything
    /// truncates the image file below its size at open while the device
    /// runs, the next read of the lost range raises `SIGBUS` and kills the
    /// VMM (the kernel offers no way to refuse truncation of an ordinary
    /// file). Use it only for images nobody else writes, e.g. a private
    /// copy or a memfd sealed with `F_SEAL_SHRINK`. Reading a hole of a
    /// sparse image through the mapping fills page cache (on tmpfs, memory)
    /// where `preadv` would not. Not combinable with `direct`.
    pub map_reads: bool,
    /// Serial number for GET_ID (at most 20 bytes are used).
    pub id: String,
    /// Queue size (a power of two).
    pub queue_size: u16,
    /// Largest data segment in bytes.
    pub size_max: u32,
    /// Most data segments per request (at most queue size − 2).
    pub seg_max: u32,
    /// Most sectors per discard range.
    pub max_discard_sectors: u32,
    /// Most ranges per discard request.
    pub max_discard_seg: u32,
    /// Most sectors per write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// Most ranges per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Longest time in microseconds the worker polls the queue for new
    /// requests before it blocks (0: never poll; at most
    /// [`MAX_POLL_US`]). The window adapts to the load, so an idle disk
    /// does not poll; see [`crate::worker`].
    pub poll_us: u32,
}

impl Default for BlockOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: false,
            map_reads: false,
            id: String::new(),
            queue_size: 256,
            size_max: 1 << 20,
            seg_max: 254,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 32,
            poll_us: DEFAULT_POLL_US,
        }
    }
}

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    file: File,
    options: BlockOptions,
    capacity: u64,
    config: [u8; CONFIG_LEN],
    sizes: [u16; 1],
    /// The read mapping of [`BlockOptions::map_reads`].
    map: Option<Arc<MmapRegion<()>>>,
    worker: Option<Worker>,
}

impl Block {
    /// Opens `path` as the disk image.
    pub fn open(path: &Path, options: BlockOptions) -> Result<Self, BlockError> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!options.read_only);
        if options.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?
            .len();
        Self::from_file(file, len, options)
    }

    /// Uses an open file of `len` bytes as the disk image.
    pub fn from_file(file: File, len: u64, options: BlockOptions) -> Result<Self, BlockError> {
        let q = options.queue_size;
        if q < 4 || !q.is_power_of_two() {
            return Err(BlockError::Option(format!("queue size {q}")));
        }
        if options.seg_max == 0 || options.seg_max > u32::from(q) - 2 {
            return Err(BlockError::Option(format!(
                "seg_max {} must be 1..={}",
                options.seg_max,
                q - 2
            )));
        }
        if options.poll_us > MAX_POLL_US {
            return Err(BlockError::Option(format!(
                "poll_us {} above {MAX_POLL_US}",
                options.poll_us
            )));
        }
        if options.size_max < SECTOR_SIZE as u32 {
            return Err(BlockError::Option(format!("size_max {}", options.size_max)));
        }
        let capacity = len / SECTOR_SIZE;
        let map = if options.map_reads {
            if options.direct {
                return Err(BlockError::Option(
                    "map_reads cannot be combined with direct".into(),
                ));
            }
            map_image(&file, capacity * SECTOR_SIZE)?
        } else {
            None
        };
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[8..12].copy_from_slice(&options.size_max.to_le_bytes());
        config[12..16].copy_from_slice(&options.seg_max.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config[34..36].copy_from_slice(&1u16.to_le_bytes());
        config[36..40].copy_from_slice(&options.max_discard_sectors.to_le_bytes());
        config[40..44].copy_from_slice(&options.max_discard_seg.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&options.max_write_zeroes_sectors.to_le_bytes());
        config[52..56].copy_from_slice(&options.max_write_zeroes_seg.to_le_bytes());
        config[56] = 1;
        Ok(Self {
            file,
            sizes: [q],
            capacity,
            config,
            options,
            map,
            worker: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Serves one request chain synchronously, exactly as the worker does,
    /// for the negotiated `features` (for fuzzing and tests that want no
    /// thread). Returns what the worker would put in the used ring; fails
    /// only if the image file cannot be duplicated.
    pub fn process_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: &DescChain,
        features: u64,
    ) -> io::Result<Completion> {
        let mut disk = Disk {
            file: self.file.try_clone()?,
            capacity: self.capacity,
            options: self.options.clone(),
            features,
            bounce: Vec::new(),
            map: self.map.clone(),
        };
        Ok(disk.request(mem, chain))
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.options.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = activation.queues.len();
        let Some(Some(active)) = activation.queues.into_iter().next() else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        let file = self.file.try_clone().map_err(ActivateError::Backend)?;
        let queue = ServedQueue::new(active).polled();
        let source = queue.source(0);
        let worker = BlockWorker {
            disk: Disk {
                file,
                capacity: self.capacity,
                options: self.options.clone(),
                features: activation.features,
                bounce: Vec::new(),
                map: self.map.clone(),
            },
            mem: activation.mem,
            interrupt: activation.interrupt,
            queue,
        };
        let options = WorkerOptions {
            poll_us: self.options.poll_us,
        };
        self.worker = Some(
            Worker::spawn_with("virtio-blk", &[source], worker, options)
                .map_err(ActivateError::Backend)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    fn pause(&mut self) -> Option<Vec<Option<crate::queue::Queue>>> {
        // The worker completes every chain it pops before returning to
        // epoll, so its queue has nothing in flight once it is joined.
        let worker = self.worker.take()?.stop_and_take::<BlockWorker>()?;
        Some(vec![Some(worker.queue.queue)])
    }
}

struct BlockWorker {
    disk: Disk,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queue: ServedQueue,
}

impl WorkerHandler for BlockWorker {
    fn handle(&mut self, _token: u64, _events: EventSet) -> ControlFlow<()> {
        let mem = &self.mem;
        let disk = &mut self.disk;
        self.queue
            .serve(mem, &*self.interrupt, |chain| disk.request(mem, chain));
        ControlFlow::Continue(())
    }

    fn poll(&mut self) -> bool {
        let mem = &self.mem;
        let disk = &mut self.disk;
        self.queue
            .poll(mem, &*self.interrupt, |chain| disk.request(mem, chain))
    }

    fn park(&mut self) -> bool {
        let mem = &self.mem;
        let disk = &mut self.disk;
        self.queue
            .park(mem, &*self.interrupt, |chain| disk.request(mem, chain))
    }
}

/// Why a request failed (logged; the guest sees a status byte).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("sectors {sector}+{count} beyond capacity {capacity}")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest buffer: {0}")]
    Guest(io::Error),
    #[error("disk I/O: {0}")]
    Io(io::Error),
}

struct Disk {
    file: File,
    capacity: u64,
    options: BlockOptions,
    /// The negotiated features.
    features: u64,
    bounce: Vec<u8>,
    /// The whole-sector part of the image, mapped for reads.
    map: Option<Arc<MmapRegion<()>>>,
}

impl Disk {
    fn request(&mut self, mem: &GuestMemoryMmap, chain: &DescChain) -> Completion {
        let mut writer = chain.writer(mem);
        let Some(mut status) = writer.split_tail(1) else {
            log::warn!("virtio-blk: request without a status byte dropped");
            return Completion::Used(0);
        };
        let mut reader = chain.reader(mem);
        let (code, data_len) = match self.execute(chain, &mut reader, &mut writer) {
            Ok(()) => (VIRTIO_BLK_S_OK, writer.bytes_written()),
            Err(RequestError::Unsupported(t)) => {
                log::debug!("virtio-blk: unsupported request type {t}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
            Err(e) => {
                log::warn!("virtio-blk: {e}");
                (VIRTIO_BLK_S_IOERR, writer.bytes_written())
            }
        };
        if let Err(e) = status.write_all(&[code as u8]) {
            log::warn!("virtio-blk: status byte not writable: {e}");
            return Completion::Used(0);
        }
        // data_len < the chain's total length, which fits in u32.
        Completion::Used(data_len as u32 + 1)
    }

    fn check_range(&self, sector: u64, bytes: u64) -> Result<u64, RequestError> {
        if bytes % SECTOR_SIZE != 0 {
            return Err(RequestError::Malformed("length not a multiple of 512"));
        }
        let count = bytes / SECTOR_SIZE;
        match sector.checked_add(count) {
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(RequestError::OutOfRange {
                sector,
                count,
                capacity: self.capacity,
            }),
        }
    }

    fn check_segments(&self, chain: &DescChain) -> Result<(), RequestError> {
        // Header and status share descriptors with nothing else in the
        // usual layout; count everything else as data segments.
        let descs = chain.descriptors();
        let data = descs.len().saturating_sub(2);
        if data > self.options.seg_max as usize {
            return Err(RequestError::Limit("more segments than seg_max"));
        }
        if descs.iter().any(|d| d.len > self.options.size_max) {
            return Err(RequestError::Limit("segment larger than size_max"));
        }
        Ok(())
    }

    fn execute(
        &mut self,
        chain: &DescChain,
        reader: &mut ChainReader<'_>,
        writer: &mut ChainWriter<'_>,
    ) -> Result<(), RequestError> {
        let mut header = [0u8; HEADER_LEN];
        reader
            .read_exact(&mut header)
            .map_err(|_| RequestError::Malformed("header shorter than 16 bytes"))?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        match kind {
            VIRTIO_BLK_T_IN => {
                self.check_segments(chain)?;
                let len = writer.available();
                let pos = self.check_range(sector, len as u64)?;
                self.read(pos, len, writer)
            }
            VIRTIO_BLK_T_OUT => {
                if self.options.read_only {
                    return Err(RequestError::ReadOnly);
                }
                self.check_segments(chain)?;
                let len = reader.available();
                let pos = self.check_range(sector, len as u64)?;
                self.write(pos, len, reader)
            }
            VIRTIO_BLK_T_FLUSH => self.file.sync_data().map_err(RequestError::Io),
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_LEN];
                let src = self.options.id.as_bytes();
                let n = src.len().min(ID_LEN);
                id[..n].copy_from_slice(&src[..n]);
                let n = writer.available().min(ID_LEN);
                writer.write_all(&id[..n]).map_err(RequestError::Guest)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                // Only when the driver accepted the feature (virtio 1.2,
                // 5.2.6.2).
                let bit = if kind == VIRTIO_BLK_T_DISCARD {
                    VIRTIO_BLK_F_DISCARD
                } else {
                    VIRTIO_BLK_F_WRITE_ZEROES
                };
                if self.features & (1 << bit) == 0 {
                    return Err(RequestError::Unsupported(kind));
                }
                if self.options.read_only {
                    return Err(RequestError::ReadOnly);
                }
                self.ranges(kind, reader)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    fn read(
        &mut self,
        pos: u64,
        len: usize,
        writer: &mut ChainWriter<'_>,
    ) -> Result<(), RequestError> {
        if self.options.direct {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(BOUNCE);
                let buf = aligned(&mut self.bounce, n);
                self.file
                    .read_exact_at(buf, pos + done as u64)
                    .map_err(RequestError::Io)?;
                writer.write_all(buf).map_err(RequestError::Guest)?;
                done += n;
            }
            return Ok(());
        }
        if let Some(map) = &self.map {
            // check_range put pos + len inside the capacity, which the
            // mapping covers; a failure here is a logic error, reported as
            // an I/O error rather than a panic.
            let src = usize::try_from(pos)
                .ok()
                .and_then(|p| map.get_slice(p, len).ok())
                .ok_or_else(|| {
                    RequestError::Io(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "read outside the image mapping",
                    ))
                })?;
            return writer
                .write_volatile_slice(&src)
                .map_err(RequestError::Guest);
        }
        writer
            .read_from_file_at(&self.file, pos, len)
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidInput => RequestError::Guest(e),
                _ => RequestError::Io(e),
            })
    }

    fn write(
        &mut self,
        pos: u64,
        len: usize,
        reader: &mut ChainReader<'_>,
    ) -> Result<(), RequestError> {
        if self.options.direct {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(BOUNCE);
                let buf = aligned(&mut self.bounce, n);
                reader.read_exact(buf).map_err(RequestError::Guest)?;
                self.file
                    .write_all_at(buf, pos + done as u64)
                    .map_err(RequestError::Io)?;
                done += n;
            }
            return Ok(());
        }
        reader
            .write_to_file_at(&self.file, pos, len)
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidInput => RequestError::Guest(e),
                _ => RequestError::Io(e),
            })
    }

    fn ranges(&mut self, kind: u32, reader: &mut ChainReader<'_>) -> Result<(), RequestError> {
        let (max_seg, max_sectors) = if kind == VIRTIO_BLK_T_DISCARD {
            (
                self.options.max_discard_seg,
                self.options.max_discard_sectors,
            )
        } else {
            (
                self.options.max_write_zeroes_seg,
                self.options.max_write_zeroes_sectors,
            )
        };
        let bytes = reader.available();
        if bytes == 0 || bytes % 16 != 0 {
            return Err(RequestError::Malformed(
                "range list not a multiple of 16 bytes",
            ));
        }
        if bytes / 16 > max_seg as usize {
            return Err(RequestError::Limit("too many ranges"));
        }
        let mut ranges = Vec::with_capacity(bytes / 16);
        for _ in 0..bytes / 16 {
            let sector = reader.read_u64().map_err(RequestError::Guest)?;
            let count = reader.read_u32().map_err(RequestError::Guest)?;
            let flags = reader.read_u32().map_err(RequestError::Guest)?;
            if count > max_sectors {
                return Err(RequestError::Limit("range longer than the maximum"));
            }
            // Only the unmap flag is defined, and only for write-zeroes.
            if (kind == VIRTIO_BLK_T_DISCARD && flags != 0) || flags & !1 != 0 {
                return Err(RequestError::Malformed("reserved range flags set"));
            }
            let pos = self.check_range(sector, u64::from(count) * SECTOR_SIZE)?;
            ranges.push((pos, u64::from(count) * SECTOR_SIZE, flags & 1 != 0));
        }
        for (pos, len, unmap) in ranges {
            if kind == VIRTIO_BLK_T_DISCARD {
                // Discard is a hint: a file system without hole punching
                // keeps the data, which is allowed.
                match fallocate(&self.file, PUNCH, pos, len) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    Err(e) => return Err(RequestError::Io(e)),
                }
            } else {
                self.zero(pos, len, unmap)?;
            }
        }
        Ok(())
    }

    fn zero(&mut self, pos: u64, len: u64, unmap: bool) -> Result<(), RequestError> {
        let mode = if unmap {
            PUNCH
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.file, mode, pos, len) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(RequestError::Io(e)),
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(BOUNCE as u64) as usize;
            let buf = aligned(&mut self.bounce, n);
            buf.fill(0);
            self.file
                .write_all_at(buf, pos + done)
                .map_err(RequestError::Io)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Maps the first `len` bytes of `file` shared and read-only (`None` for
/// an empty image). The file must hold them now; see
/// [`BlockOptions::map_reads`] for what happens if it later does not.
fn map_image(file: &File, len: u64) -> Result<Option<Arc<MmapRegion<()>>>, BlockError> {
    if len == 0 {
        return Ok(None);
    }
    let err = |reason: String| BlockError::Map { len, reason };
    let size = file
        .metadata()
        .map_err(|e| err(format!("cannot read the file size: {e}")))?
        .len();
    if size < len {
        return Err(err(format!("the file holds only {size} bytes")));
    }
    let bytes = usize::try_from(len).map_err(|_| err("too large to map".into()))?;
    let dup = file
        .try_clone()
        .map_err(|e| err(format!("cannot duplicate the file: {e}")))?;
    let region = MmapRegion::<()>::build(
        Some(FileOffset::new(dup, 0)),
        bytes,
        libc::PROT_READ,
        libc::MAP_SHARED,
    )
    .map_err(|e| err(e.to_string()))?;
    Ok(Some(Arc::new(region)))
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn fallocate(file: &File, mode: i32, pos: u64, len: u64) -> io::Result<()> {
    let (Ok(pos), Ok(len)) = (i64::try_from(pos), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is owned
    // by `file` and open for the duration of the call.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, pos, len) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A `len`-byte slice of `buf` starting at an `ALIGN`-aligned address
/// (grows `buf` as needed). O_DIRECT needs aligned memory; a `Vec<u8>` has
/// no alignment guarantee, so over-allocate and start at the first aligned
/// byte.
fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + ALIGN {
        buf.resize(len + ALIGN, 0);
    }
    let skip = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
    &mut buf[skip..skip + len]
}
