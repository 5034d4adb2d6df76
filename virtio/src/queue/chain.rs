//! Descriptor chains as the device sees them, independent of the ring
//! format, and bounded readers and writers over their buffers.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::{Bitmap, BitmapSlice, MS};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileSlice, WriteVolatile,
};
use vmkit_memory::GuestMemoryMmap;

/// One buffer of a descriptor chain, after indirect tables were flattened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// The device may write the buffer (`VIRTQ_DESC_F_WRITE`); otherwise it
    /// may only read it.
    pub writable: bool,
}

/// What the ring needs to give a chain back: the split ring's head index,
/// or the packed ring's buffer ID and the number of ring slots it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainToken {
    pub(crate) id: u16,
    pub(crate) slots: u16,
}

impl ChainToken {
    /// The head index (split) or buffer ID (packed).
    pub fn id(&self) -> u16 {
        self.id
    }
}

/// Descriptors a chain holds without a heap allocation; longer chains
/// (large requests) spill to a `Vec`.
const INLINE_DESCS: usize = 8;

/// The descriptors of one chain in order: inline for the usual short chain
/// (a block request is three descriptors), on the heap beyond
/// [`INLINE_DESCS`], so that popping a chain allocates nothing.
#[derive(Debug, Clone)]
pub(crate) struct DescList {
    inline: [Descriptor; INLINE_DESCS],
    len: usize,
    heap: Vec<Descriptor>,
    /// How many leading descriptors are device-readable.
    readable: usize,
}

const EMPTY_DESC: Descriptor = Descriptor {
    addr: GuestAddress(0),
    len: 0,
    writable: false,
};

impl DescList {
    /// An empty list.
    pub(crate) fn new() -> Self {
        Self {
            inline: [EMPTY_DESC; INLINE_DESCS],
            len: 0,
            heap: Vec::new(),
            readable: 0,
        }
    }

    /// Appends `d`.
    pub(crate) fn push(&mut self, d: Descriptor) {
        if self.len == self.readable && !d.writable {
            self.readable += 1;
        }
        match self.inline.get_mut(self.len) {
            Some(slot) if self.heap.is_empty() => *slot = d,
            _ => {
                if self.heap.is_empty() {
                    self.heap.extend_from_slice(&self.inline);
                }
                self.heap.push(d);
            }
        }
        self.len += 1;
    }

    /// Number of descriptors.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn as_slice(&self) -> &[Descriptor] {
        if self.heap.is_empty() {
            self.inline.get(..self.len).unwrap_or(&[])
        } else {
            &self.heap
        }
    }
}

impl PartialEq for DescList {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for DescList {}

/// A descriptor chain popped from a queue.
///
/// The ring layer has already checked its structure: no loops, every
/// descriptor index in range, at most one level of indirection, no more
/// descriptors than the queue size, a total length that fits in `u32`, and
/// every device-readable descriptor before every device-writable one
/// (virtio 1.2, 2.7.4.2 and 2.7.5.3). Buffer addresses are checked when the
/// device touches them: a buffer outside guest memory makes the reader or
/// writer fail, and the device answers with its own error status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescChain {
    pub(crate) token: ChainToken,
    pub(crate) descs: DescList,
}

impl DescChain {
    /// Creates a chain from its parts (for ring implementations outside
    /// this crate and for tests).
    pub fn new(token: ChainToken, descs: Vec<Descriptor>) -> Self {
        let mut list = DescList::new();
        for d in descs {
            list.push(d);
        }
        Self { token, descs: list }
    }

    /// The token to hand back to [`crate::queue::Queue::add_used`].
    pub fn token(&self) -> ChainToken {
        self.token
    }

    /// All descriptors in chain order.
    pub fn descriptors(&self) -> &[Descriptor] {
        self.descs.as_slice()
    }

    /// The device-readable descriptors (they come first).
    pub fn readable(&self) -> &[Descriptor] {
        let all = self.descs.as_slice();
        all.get(..self.descs.readable).unwrap_or(all)
    }

    /// The device-writable descriptors (they come last; for a chain made
    /// with [`DescChain::new`] that breaks the order, everything from the
    /// first writable one on).
    pub fn writable(&self) -> &[Descriptor] {
        let all = self.descs.as_slice();
        all.get(self.descs.readable..).unwrap_or(&[])
    }

    /// A reader over the readable part.
    pub fn reader<'a>(&'a self, mem: &'a GuestMemoryMmap) -> ChainReader<'a> {
        ChainReader::new(mem, self.readable())
    }

    /// A writer over the writable part.
    pub fn writer<'a>(&'a self, mem: &'a GuestMemoryMmap) -> ChainWriter<'a> {
        ChainWriter::new(mem, self.writable())
    }
}

/// Reads the device-readable buffers of a chain, in order.
///
/// Every access goes through vm-memory's checked accessors: a buffer that
/// points outside guest memory gives an error, never a fault.
#[derive(Debug, Clone)]
pub struct ChainReader<'a> {
    mem: &'a GuestMemoryMmap,
    descs: &'a [Descriptor],
    /// Index into `descs` and offset inside it.
    idx: usize,
    offset: u32,
    /// Bytes not yet read, including any limit set by `truncate`.
    left: usize,
    read: usize,
}

/// Buffers passed to one `preadv`/`pwritev` call at most.
const MAX_IOVECS: usize = 64;

/// Reads or writes past the end of a chain's buffers, or into memory the
/// guest does not have.
fn short(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

fn mem_err(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// Fills `buf` from guest memory at `addr`: one bounds-checked copy out of
/// the region holding it (the usual case: a header or a status byte), or
/// through the memory map when the range straddles regions.
fn read_guest(mem: &GuestMemoryMmap, addr: GuestAddress, buf: &mut [u8]) -> io::Result<()> {
    match mem.get_slice(addr, buf.len()) {
        Ok(s) => s
            .read_slice(buf, 0)
            .map_err(|e| mem_err(vm_memory::GuestMemoryError::from(e))),
        Err(_) => mem.read_slice(buf, addr).map_err(mem_err),
    }
}

/// Writes `buf` into guest memory at `addr` (as [`read_guest`]).
fn write_guest(mem: &GuestMemoryMmap, addr: GuestAddress, buf: &[u8]) -> io::Result<()> {
    match mem.get_slice(addr, buf.len()) {
        Ok(s) => s
            .write_slice(buf, 0)
            .map_err(|e| mem_err(vm_memory::GuestMemoryError::from(e))),
        Err(_) => mem.write_slice(buf, addr).map_err(mem_err),
    }
}

fn total_len(descs: &[Descriptor]) -> usize {
    let t: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    usize::try_from(t).unwrap_or(usize::MAX)
}

type GuestSlice<'a> = VolatileSlice<'a, MS<'a, GuestMemoryMmap>>;

/// The guest-memory slices of one vectored system call, on the stack (no
/// heap allocation per request).
struct Spans<'a> {
    slices: [Option<GuestSlice<'a>>; MAX_IOVECS],
    count: usize,
}

impl<'a> Spans<'a> {
    /// The slices holding the next `len` bytes of `descs` from
    /// `(index, offset)` (at most `MAX_IOVECS` of them, so possibly fewer
    /// bytes). Fails if there are none.
    fn gather(
        mem: &'a GuestMemoryMmap,
        descs: &[Descriptor],
        (mut idx, mut offset): (usize, u32),
        len: usize,
    ) -> io::Result<Self> {
        let mut slices: [Option<GuestSlice<'a>>; MAX_IOVECS] = std::array::from_fn(|_| None);
        let mut count = 0;
        let mut want = len;
        while want > 0 {
            let Some(slot) = slices.get_mut(count) else {
                break;
            };
            let Some((addr, n)) = next_span(descs, &mut idx, &mut offset, want) else {
                break;
            };
            *slot = Some(mem.get_slice(addr, n).map_err(mem_err)?);
            count += 1;
            // n ≤ the descriptor's remaining length, which fits in u32.
            offset += n as u32;
            want -= n;
        }
        if count == 0 {
            return Err(short("descriptor chain too short"));
        }
        Ok(Self { slices, count })
    }

    fn iter(&self) -> impl Iterator<Item = &GuestSlice<'a>> {
        self.slices.iter().take(self.count).flatten()
    }

    /// Calls `f` with one iovec per slice; each is valid for reads and
    /// writes of its length until `f` returns (the guards keep the
    /// pointers valid, vm-memory's contract, and `self` keeps the memory
    /// borrowed).
    fn with_iovecs<R>(&self, f: impl FnOnce(&[libc::iovec]) -> R) -> R {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS];
        let guards: [Option<_>; MAX_IOVECS] = std::array::from_fn(|i| {
            self.slices
                .get(i)
                .and_then(Option::as_ref)
                .map(|s| (s.ptr_guard_mut(), s.len()))
        });
        for (v, g) in iov.iter_mut().zip(&guards) {
            if let Some((guard, len)) = g {
                v.iov_base = guard.as_ptr().cast();
                v.iov_len = *len;
            }
        }
        f(iov.get(..self.count).unwrap_or(&[]))
    }
}

/// Position in a descriptor list: the next span of at most `max` bytes.
fn next_span(
    descs: &[Descriptor],
    idx: &mut usize,
    offset: &mut u32,
    max: usize,
) -> Option<(GuestAddress, usize)> {
    while let Some(d) = descs.get(*idx) {
        if *offset < d.len {
            let avail = (d.len - *offset) as usize;
            let addr = d.addr.0.wrapping_add(u64::from(*offset));
            return Some((GuestAddress(addr), avail.min(max)));
        }
        *idx += 1;
        *offset = 0;
    }
    None
}

impl<'a> ChainReader<'a> {
    /// A reader over `descs` (all of them are read, writable or not).
    pub fn new(mem: &'a GuestMemoryMmap, descs: &'a [Descriptor]) -> Self {
        Self {
            mem,
            descs,
            idx: 0,
            offset: 0,
            left: total_len(descs),
            read: 0,
        }
    }

    /// Bytes left to read.
    pub fn available(&self) -> usize {
        self.left
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> usize {
        self.read
    }

    fn step(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        if self.left == 0 {
            return None;
        }
        next_span(
            self.descs,
            &mut self.idx,
            &mut self.offset,
            max.min(self.left),
        )
    }

    fn consume(&mut self, n: usize) {
        // n ≤ the current span, which is ≤ u32::MAX.
        self.offset += n as u32;
        self.left -= n;
        self.read += n;
    }

    /// Fills `buf` completely, or fails with `UnexpectedEof` (the reader is
    /// then partly consumed).
    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut pos = 0;
        while pos < buf.len() {
            let (addr, n) = self
                .step(buf.len() - pos)
                .ok_or_else(|| short("descriptor chain too short"))?;
            read_guest(self.mem, addr, &mut buf[pos..pos + n])?;
            self.consume(n);
            pos += n;
        }
        Ok(())
    }

    /// Reads a little-endian `u32`.
    pub fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64`.
    pub fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Copies exactly `len` bytes from the chain to `dst` (a file, a
    /// socket, ...) straight out of guest memory.
    pub fn copy_to<W: WriteVolatile>(&mut self, dst: &mut W, len: usize) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let (addr, n) = self
                .step(left)
                .ok_or_else(|| short("descriptor chain too short"))?;
            let slice = self.mem.get_slice(addr, n).map_err(mem_err)?;
            let mut done = 0;
            while done < n {
                let sub = slice.subslice(done, n - done).map_err(io::Error::other)?;
                let w = dst.write_volatile(&sub).map_err(io::Error::other)?;
                if w == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "sink took no bytes",
                    ));
                }
                done += w;
            }
            self.consume(n);
            left -= n;
        }
        Ok(())
    }

    /// Writes exactly `len` bytes of the chain to `file` at `offset` with
    /// `pwritev`, straight out of guest memory: one system call for all
    /// the buffers of a typical request.
    pub fn write_to_file_at(&mut self, file: &File, offset: u64, len: usize) -> io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let spans = Spans::gather(
                self.mem,
                self.descs,
                (self.idx, self.offset),
                self.left.min(len - done),
            )?;
            let pos = i64::try_from(offset + done as u64)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let fd = file.as_raw_fd();
            let n = spans.with_iovecs(|iov| {
                // SAFETY: every iovec describes a range of guest memory that
                // vm-memory handed out as a VolatileSlice of exactly that
                // length, kept mapped by `spans` (borrowed from `self.mem`)
                // and its guards until after the call; pwritev only reads
                // those ranges. Guest memory is shared with the guest anyway,
                // so no Rust reference to it is invalidated.
                unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, pos) }
            });
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "file took no bytes",
                ));
            }
            // n > 0 and ≤ the bytes described.
            let n = n as usize;
            self.skip(n)?;
            done += n;
        }
        Ok(())
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize) -> io::Result<()> {
        let mut left = n;
        while left > 0 {
            let (_, k) = self
                .step(left)
                .ok_or_else(|| short("descriptor chain too short"))?;
            self.consume(k);
            left -= k;
        }
        Ok(())
    }
}

/// Writes the device-writable buffers of a chain, in order, and counts the
/// bytes written (the `len` the device reports in the used ring).
#[derive(Debug)]
pub struct ChainWriter<'a> {
    mem: &'a GuestMemoryMmap,
    descs: &'a [Descriptor],
    idx: usize,
    offset: u32,
    left: usize,
    written: usize,
}

impl<'a> ChainWriter<'a> {
    /// A writer over `descs` (all of them are written, whatever their
    /// flags say: the caller chose them).
    pub fn new(mem: &'a GuestMemoryMmap, descs: &'a [Descriptor]) -> Self {
        Self {
            mem,
            descs,
            idx: 0,
            offset: 0,
            left: total_len(descs),
            written: 0,
        }
    }

    /// Bytes that can still be written.
    pub fn available(&self) -> usize {
        self.left
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> usize {
        self.written
    }

    /// Stops the writer `n` bytes before the end of its buffers and returns
    /// a writer over those last `n` bytes (for a trailing status byte).
    /// `None` if fewer than `n` bytes are left.
    pub fn split_tail(&mut self, n: usize) -> Option<ChainWriter<'a>> {
        if n > self.left {
            return None;
        }
        // Walk to the position `left - n` bytes ahead.
        let mut idx = self.idx;
        let mut offset = self.offset;
        let mut skip = self.left - n;
        while let Some(d) = self.descs.get(idx) {
            let avail = (d.len - offset) as usize;
            if skip < avail {
                break;
            }
            skip -= avail;
            idx += 1;
            offset = 0;
        }
        let tail = ChainWriter {
            mem: self.mem,
            descs: self.descs,
            idx,
            offset: offset + skip as u32,
            left: n,
            written: 0,
        };
        self.left -= n;
        Some(tail)
    }

    fn step(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        if self.left == 0 {
            return None;
        }
        next_span(
            self.descs,
            &mut self.idx,
            &mut self.offset,
            max.min(self.left),
        )
    }

    fn consume(&mut self, n: usize) {
        self.offset += n as u32;
        self.left -= n;
        self.written += n;
    }

    /// Moves past `n` bytes that were filled behind the writer's back
    /// (by `preadv`), counting them as written.
    fn skip(&mut self, n: usize) -> io::Result<()> {
        let mut left = n;
        while left > 0 {
            let (_, k) = self
                .step(left)
                .ok_or_else(|| short("descriptor chain too short"))?;
            self.consume(k);
            left -= k;
        }
        Ok(())
    }

    /// Writes all of `buf`, or fails with `UnexpectedEof` when the chain is
    /// too short (what fitted stays written).
    pub fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut pos = 0;
        while pos < buf.len() {
            let (addr, n) = self
                .step(buf.len() - pos)
                .ok_or_else(|| short("descriptor chain too short"))?;
            write_guest(self.mem, addr, &buf[pos..pos + n])?;
            self.consume(n);
            pos += n;
        }
        Ok(())
    }

    /// Copies exactly `len` bytes from `src` into the chain, straight into
    /// guest memory. Fails with `UnexpectedEof` if `src` ends first.
    pub fn copy_from<R: ReadVolatile>(&mut self, src: &mut R, len: usize) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let (addr, n) = self
                .step(left)
                .ok_or_else(|| short("descriptor chain too short"))?;
            let slice = self.mem.get_slice(addr, n).map_err(mem_err)?;
            let mut done = 0;
            while done < n {
                let mut sub = slice.subslice(done, n - done).map_err(io::Error::other)?;
                let r = src.read_volatile(&mut sub).map_err(io::Error::other)?;
                if r == 0 {
                    return Err(short("source ended early"));
                }
                done += r;
            }
            self.consume(n);
            left -= n;
        }
        Ok(())
    }

    /// Reads exactly `len` bytes from `file` at `offset` into the chain
    /// with `preadv`, straight into guest memory (marked dirty for dirty
    /// tracking). Fails with `UnexpectedEof` if the file ends first.
    pub fn read_from_file_at(&mut self, file: &File, offset: u64, len: usize) -> io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let spans = Spans::gather(
                self.mem,
                self.descs,
                (self.idx, self.offset),
                self.left.min(len - done),
            )?;
            let pos = i64::try_from(offset + done as u64)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let fd = file.as_raw_fd();
            let n = spans.with_iovecs(|iov| {
                // SAFETY: every iovec describes a writable range of guest
                // memory that vm-memory handed out as a VolatileSlice of
                // exactly that length, kept mapped by `spans` (borrowed from
                // `self.mem`) and its guards until after the call; preadv
                // writes only inside those ranges. No Rust reference points
                // into guest memory, which the guest may change at any time
                // anyway.
                unsafe { libc::preadv(fd, iov.as_ptr(), iov.len() as i32, pos) }
            });
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(short("file ended early"));
            }
            // n > 0 and ≤ the bytes described: mark what was written dirty
            // and advance over it.
            let n = n as usize;
            let mut k = n;
            for s in spans.iter() {
                if k == 0 {
                    break;
                }
                let m = k.min(s.len());
                s.bitmap().mark_dirty(0, m);
                k -= m;
            }
            self.skip(n)?;
            done += n;
        }
        Ok(())
    }

    /// Copies all of `src` (host memory seen as a volatile slice, e.g. a
    /// file mapping) into the chain with plain memory copies, marking guest
    /// memory dirty. Fails with `UnexpectedEof` when the chain is too short
    /// (what fitted stays written).
    pub fn write_volatile_slice<B: BitmapSlice>(
        &mut self,
        src: &VolatileSlice<'_, B>,
    ) -> io::Result<()> {
        let mut pos = 0;
        while pos < src.len() {
            let (addr, n) = self
                .step(src.len() - pos)
                .ok_or_else(|| short("descriptor chain too short"))?;
            let dst = self.mem.get_slice(addr, n).map_err(mem_err)?;
            let piece = src.subslice(pos, n).map_err(io::Error::other)?;
            piece.copy_to_volatile_slice(dst);
            self.consume(n);
            pos += n;
        }
        Ok(())
    }

    /// Fills the next `len` bytes with `f(slice)` for each contiguous piece
    /// (e.g. random bytes); `f` returns an error to stop.
    pub fn fill_with<F>(&mut self, len: usize, mut f: F) -> io::Result<()>
    where
        F: FnMut(&mut [u8]) -> io::Result<()>,
    {
        let mut buf = [0u8; 4096];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            f(&mut buf[..n])?;
            self.write_all(&buf[..n])?;
            left -= n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(i: u64, writable: bool) -> Descriptor {
        Descriptor {
            addr: GuestAddress(0x1000 * i),
            len: i as u32 + 1,
            writable,
        }
    }

    #[test]
    fn desc_list_keeps_order_and_split_inline_and_spilled() {
        // Below, at and past the inline capacity.
        for n in [1usize, 3, INLINE_DESCS, INLINE_DESCS + 1, 3 * INLINE_DESCS] {
            for readable in [0, 1, n / 2, n] {
                let all: Vec<Descriptor> = (0..n).map(|i| desc(i as u64, i >= readable)).collect();
                let c = DescChain::new(ChainToken { id: 7, slots: 1 }, all.clone());
                assert_eq!(c.descriptors(), &all[..], "n={n}");
                assert_eq!(c.readable(), &all[..readable], "n={n} r={readable}");
                assert_eq!(c.writable(), &all[readable..], "n={n} r={readable}");
                assert_eq!(c.clone(), c);
            }
        }
    }

    #[test]
    fn out_of_order_chain_splits_at_the_first_writable() {
        let all = vec![desc(1, false), desc(2, true), desc(3, false)];
        let c = DescChain::new(ChainToken { id: 0, slots: 1 }, all.clone());
        assert_eq!(c.readable(), &all[..1]);
        assert_eq!(c.writable(), &all[1..]);
    }
}
