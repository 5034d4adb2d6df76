//! An in-process backend: two ends of a `SOCK_SEQPACKET` socket pair, so
//! that two net devices exchange frames (each frame stays one datagram).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::{offload, FrameBufs, NetBackend};

/// Creates pairs of connected [`PairBackend`]s.
#[derive(Debug)]
pub struct NetPair;

impl NetPair {
    /// Two backends joined to each other: a frame sent by one is received
    /// by the other, header and all.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> io::Result<(PairBackend, PairBackend)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, a valid
        // array of two ints; no other memory is touched.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socketpair succeeded, so fds[0] is an open descriptor that
        // nothing else owns.
        let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above, for fds[1].
        let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        Ok((PairBackend::from_fd(a), PairBackend::from_fd(b)))
    }
}

/// One end of a [`NetPair`].
#[derive(Debug)]
pub struct PairBackend {
    sock: OwnedFd,
    supported: u32,
    offloads: Arc<AtomicU32>,
}

impl PairBackend {
    fn from_fd(sock: OwnedFd) -> Self {
        Self {
            sock,
            supported: offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN,
            offloads: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Limits the [`offload`] flags this end claims to support (all by
    /// default: frames pass unchanged, and the receiving device drops what
    /// its guest did not accept).
    pub fn with_supported_offloads(mut self, flags: u32) -> Self {
        self.supported = flags;
        self
    }

    /// The [`offload`] flags last set by the device (shared, so it can be
    /// read after the backend moved into a device).
    pub fn offloads_set(&self) -> Arc<AtomicU32> {
        self.offloads.clone()
    }
}

impl NetBackend for PairBackend {
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn recv(&mut self, bufs: &mut FrameBufs<'_>) -> io::Result<usize> {
        let fd = self.sock.as_raw_fd();
        let n = bufs.with_iovecs(|iov| {
            // SAFETY: an all-zero msghdr is valid (null pointers, zero
            // lengths).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr().cast_mut();
            msg.msg_iovlen = iov.len();
            // SAFETY: `msg` points at `iov`, whose entries are valid for
            // writes of their lengths while this closure runs
            // (FrameBufs::with_iovecs); recvmsg writes only there. MSG_TRUNC
            // makes it return the datagram's full length.
            unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) }
        });
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            // A SEQPACKET socket reads 0 once the peer is gone.
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "net pair: peer closed",
            ));
        }
        // n > 0.
        Ok(n as usize)
    }

    fn send(&mut self, bufs: &mut FrameBufs<'_>) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        let n = bufs.with_iovecs(|iov| {
            // SAFETY: an all-zero msghdr is valid (null pointers, zero
            // lengths).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr().cast_mut();
            msg.msg_iovlen = iov.len();
            // SAFETY: `msg` points at `iov`, whose entries are valid for
            // reads of their lengths while this closure runs; sendmsg only
            // reads them.
            unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
        });
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send_batch(&mut self, frames: &mut [FrameBufs<'_>]) -> io::Result<usize> {
        let fd = self.sock.as_raw_fd();
        let n = FrameBufs::with_batch_iovecs(frames, |iov, ranges| {
            let mut msgs: Vec<libc::mmsghdr> = ranges
                .iter()
                .filter_map(|r| iov.get(r.clone()))
                .map(|v| {
                    // SAFETY: an all-zero mmsghdr is valid (null pointers,
                    // zero lengths).
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = v.as_ptr().cast_mut();
                    m.msg_hdr.msg_iovlen = v.len();
                    m
                })
                .collect();
            // At most MAX_BATCH_IOVECS messages, which fits in a c_uint.
            let count = msgs.len() as libc::c_uint;
            // SAFETY: each header points at iovecs valid for reads of
            // their lengths until this closure returns
            // (FrameBufs::with_batch_iovecs); sendmmsg only reads them and
            // writes the headers' msg_len fields, inside `msgs`.
            unsafe {
                libc::sendmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    count,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            }
        });
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // 0 ≤ n ≤ the number of messages.
        Ok(n as usize)
    }

    fn supported_offloads(&self) -> u32 {
        self.supported
    }

    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        self.offloads.store(flags, Ordering::Relaxed);
        Ok(())
    }
}
