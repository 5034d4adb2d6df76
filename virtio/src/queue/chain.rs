//! Descriptor chains as the device sees them, independent of the ring
//! format, and bounded readers and writers over their buffers.

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, WriteVolatile};
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
    pub(crate) descs: Vec<Descriptor>,
}

impl DescChain {
    /// Creates a chain from its parts (for ring implementations outside
    /// this crate and for tests).
    pub fn new(token: ChainToken, descs: Vec<Descriptor>) -> Self {
        Self { token, descs }
    }

    /// The token to hand back to [`crate::queue::Queue::add_used`].
    pub fn token(&self) -> ChainToken {
        self.token
    }

    /// All descriptors in chain order.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descs
    }

    /// The device-readable descriptors (they come first).
    pub fn readable(&self) -> &[Descriptor] {
        let n = self.descs.iter().take_while(|d| !d.writable).count();
        &self.descs[..n]
    }

    /// The device-writable descriptors (they come last).
    pub fn writable(&self) -> &[Descriptor] {
        let n = self.descs.iter().take_while(|d| !d.writable).count();
        &self.descs[n..]
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

/// Reads or writes past the end of a chain's buffers, or into memory the
/// guest does not have.
fn short(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

fn mem_err(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

fn total_len(descs: &[Descriptor]) -> usize {
    let t: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    usize::try_from(t).unwrap_or(usize::MAX)
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
            self.mem
                .read_slice(&mut buf[pos..pos + n], addr)
                .map_err(mem_err)?;
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

    /// Writes all of `buf`, or fails with `UnexpectedEof` when the chain is
    /// too short (what fitted stays written).
    pub fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut pos = 0;
        while pos < buf.len() {
            let (addr, n) = self
                .step(buf.len() - pos)
                .ok_or_else(|| short("descriptor chain too short"))?;
            self.mem
                .write_slice(&buf[pos..pos + n], addr)
                .map_err(mem_err)?;
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
