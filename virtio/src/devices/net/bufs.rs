//! The buffers of one frame as a backend sees them: guest memory (or a
//! device-owned bounce buffer) described as iovecs for one vectored system
//! call.

use vm_memory::bitmap::{Bitmap, MS};
use vm_memory::{GuestMemoryBackend, VolatileSlice};
use vmkit_memory::GuestMemoryMmap;

use crate::queue::Descriptor;

/// Most buffers one frame is handed to a backend in (a chain with more
/// goes through the device's bounce buffer).
pub const MAX_IOVECS: usize = 64;

/// Most iovecs [`FrameBufs::with_batch_iovecs`] hands over at once.
pub const MAX_BATCH_IOVECS: usize = 1024;

type GuestSlice<'a> = VolatileSlice<'a, MS<'a, GuestMemoryMmap>>;

// Lives on the stack for one frame: boxing the large variant would cost
// a heap allocation per frame, which is what it avoids.
#[allow(clippy::large_enum_variant)]
enum Inner<'a> {
    /// Pieces of guest memory, in order, then optionally a host buffer
    /// that takes what does not fit them.
    Guest {
        slices: [Option<GuestSlice<'a>>; MAX_IOVECS],
        count: usize,
        tail: &'a mut [u8],
    },
    /// One host buffer.
    Host(&'a mut [u8]),
}

/// The buffers one frame (virtio-net header plus Ethernet frame) is read
/// into or written from, borrowed for `'a`.
///
/// A [`NetBackend`](super::NetBackend) moves bytes with
/// [`FrameBufs::with_iovecs`] (for `readv`/`writev`/`sendmsg`) or with the
/// safe copies [`FrameBufs::copy_from`] / [`FrameBufs::copy_to`].
pub struct FrameBufs<'a> {
    inner: Inner<'a>,
    len: usize,
}

impl std::fmt::Debug for FrameBufs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pieces = match &self.inner {
            Inner::Guest { count, tail, .. } => *count + usize::from(!tail.is_empty()),
            Inner::Host(_) => 1,
        };
        f.debug_struct("FrameBufs")
            .field("len", &self.len)
            .field("pieces", &pieces)
            .finish()
    }
}

/// Why a chain's buffers cannot be handed to a backend directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BufsError {
    /// More than [`MAX_IOVECS`] non-empty buffers.
    TooMany,
    /// A buffer is not inside guest memory (or crosses a region boundary).
    Memory,
}

impl<'a> FrameBufs<'a> {
    /// One host buffer (for backends that stage frames, and for tests).
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        let len = buf.len();
        Self {
            inner: Inner::Host(buf),
            len,
        }
    }

    /// The guest buffers `descs` (empty ones skipped), at most `limit`
    /// bytes of them.
    pub(crate) fn from_guest(
        mem: &'a GuestMemoryMmap,
        descs: &[Descriptor],
        limit: usize,
    ) -> Result<Self, BufsError> {
        let mut slices: [Option<GuestSlice<'a>>; MAX_IOVECS] = std::array::from_fn(|_| None);
        let mut count = 0;
        let mut len = 0usize;
        for d in descs {
            let want = (d.len as usize).min(limit - len);
            if want == 0 {
                continue;
            }
            let slot = slices.get_mut(count).ok_or(BufsError::TooMany)?;
            *slot = Some(mem.get_slice(d.addr, want).map_err(|_| BufsError::Memory)?);
            count += 1;
            len += want;
            if len == limit {
                break;
            }
        }
        Ok(Self {
            inner: Inner::Guest {
                slices,
                count,
                tail: &mut [],
            },
            len,
        })
    }

    /// The guest buffers `descs` (as [`FrameBufs::from_guest`], at most
    /// `limit` bytes), followed by the host buffer `tail` for the bytes of
    /// a frame that do not fit them: one system call fills the guest
    /// buffers directly and the overflow lands in `tail`.
    pub(crate) fn from_guest_with_tail(
        mem: &'a GuestMemoryMmap,
        descs: &[Descriptor],
        limit: usize,
        tail: &'a mut [u8],
    ) -> Result<Self, BufsError> {
        let mut bufs = Self::from_guest(mem, descs, limit)?;
        if let Inner::Guest { tail: t, .. } = &mut bufs.inner {
            bufs.len += tail.len();
            *t = tail;
        }
        Ok(bufs)
    }

    /// Total bytes the buffers hold.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffers hold no byte at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` with iovecs describing the buffers, in order.
    ///
    /// Each iovec is valid for reads and writes of `iov_len` bytes until
    /// `f` returns (the memory stays mapped because it is borrowed for
    /// `'a`); a backend passes them to one `readv`/`writev`-style system
    /// call. Guest memory may change under the call (the guest owns it), so
    /// no Rust reference may be made into it.
    pub fn with_iovecs<R>(&mut self, f: impl FnOnce(&[libc::iovec]) -> R) -> R {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS + 1];
        match &mut self.inner {
            Inner::Guest {
                slices,
                count,
                tail,
            } => {
                // The guards keep each pointer valid (vm-memory's contract)
                // until they drop after `f`.
                let guards: [Option<_>; MAX_IOVECS] = std::array::from_fn(|i| {
                    slices[i].as_ref().map(|s| (s.ptr_guard_mut(), s.len()))
                });
                for (v, g) in iov.iter_mut().zip(&guards) {
                    if let Some((guard, len)) = g {
                        v.iov_base = guard.as_ptr().cast();
                        v.iov_len = *len;
                    }
                }
                let mut n = (*count).min(MAX_IOVECS);
                if !tail.is_empty() {
                    iov[n] = libc::iovec {
                        iov_base: tail.as_mut_ptr().cast(),
                        iov_len: tail.len(),
                    };
                    n += 1;
                }
                f(&iov[..n])
            }
            Inner::Host(buf) => {
                iov[0] = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                f(&iov[..1])
            }
        }
    }

    /// Calls `f` with the iovecs of every frame in `frames`, all in one
    /// array, and the range of that array each frame's iovecs occupy (for
    /// a batch send such as `sendmmsg`). The iovecs are valid for **reads
    /// only** until `f` returns (otherwise as in
    /// [`FrameBufs::with_iovecs`]); `f` gets ranges only for the frames
    /// whose iovecs fit in the first [`MAX_BATCH_IOVECS`].
    pub fn with_batch_iovecs<R>(
        frames: &[FrameBufs<'_>],
        f: impl FnOnce(&[libc::iovec], &[std::ops::Range<usize>]) -> R,
    ) -> R {
        let mut iov: Vec<libc::iovec> = Vec::new();
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::with_capacity(frames.len());
        // Guards keep every guest pointer valid until `f` returns.
        let mut guards = Vec::new();
        for frame in frames.iter() {
            let start = iov.len();
            match &frame.inner {
                Inner::Guest {
                    slices,
                    count,
                    tail,
                } => {
                    if start + count + 1 > MAX_BATCH_IOVECS {
                        break;
                    }
                    for s in slices.iter().take(*count).flatten() {
                        let g = s.ptr_guard_mut();
                        iov.push(libc::iovec {
                            iov_base: g.as_ptr().cast(),
                            iov_len: s.len(),
                        });
                        guards.push(g);
                    }
                    if !tail.is_empty() {
                        iov.push(libc::iovec {
                            iov_base: tail.as_ptr().cast_mut().cast(),
                            iov_len: tail.len(),
                        });
                    }
                }
                Inner::Host(buf) => {
                    if start + 1 > MAX_BATCH_IOVECS {
                        break;
                    }
                    iov.push(libc::iovec {
                        iov_base: buf.as_ptr().cast_mut().cast(),
                        iov_len: buf.len(),
                    });
                }
            }
            ranges.push(start..iov.len());
        }
        let r = f(&iov, &ranges);
        drop(guards);
        r
    }

    /// Records that a backend wrote the first `n` bytes through the iovecs
    /// (for dirty-page tracking of guest memory; bytes past the guest
    /// buffers went to the host tail).
    pub fn mark_written(&self, n: usize) {
        if let Inner::Guest { slices, .. } = &self.inner {
            let mut left = n;
            for s in slices.iter().flatten() {
                if left == 0 {
                    break;
                }
                let m = left.min(s.len());
                s.bitmap().mark_dirty(0, m);
                left -= m;
            }
        }
    }

    /// Copies `src` into the buffers (as much as fits); returns the bytes
    /// copied.
    pub fn copy_from(&mut self, src: &[u8]) -> usize {
        match &mut self.inner {
            Inner::Guest { slices, tail, .. } => {
                let mut done = 0;
                for s in slices.iter().flatten() {
                    let Some(rest) = src.get(done..) else { break };
                    if rest.is_empty() {
                        break;
                    }
                    let m = rest.len().min(s.len());
                    s.copy_from(&rest[..m]);
                    done += m;
                }
                let rest = src.get(done..).unwrap_or(&[]);
                let m = rest.len().min(tail.len());
                tail[..m].copy_from_slice(&rest[..m]);
                done + m
            }
            Inner::Host(buf) => {
                let m = src.len().min(buf.len());
                buf[..m].copy_from_slice(&src[..m]);
                m
            }
        }
    }

    /// Copies the buffers into `dst` (as much as fits); returns the bytes
    /// copied.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        match &self.inner {
            Inner::Guest { slices, tail, .. } => {
                let mut done = 0;
                for s in slices.iter().flatten() {
                    let Some(rest) = dst.get_mut(done..) else {
                        break;
                    };
                    if rest.is_empty() {
                        break;
                    }
                    done += s.copy_to(rest);
                }
                let rest = dst.get_mut(done..).unwrap_or(&mut []);
                let m = rest.len().min(tail.len());
                rest[..m].copy_from_slice(&tail[..m]);
                done + m
            }
            Inner::Host(buf) => {
                let m = dst.len().min(buf.len());
                dst[..m].copy_from_slice(&buf[..m]);
                m
            }
        }
    }
}
