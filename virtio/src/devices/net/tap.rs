//! A Linux tap device as a net backend: `/dev/net/tun` opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking, with a 12-byte
//! virtio-net header on every frame.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{offload, FrameBufs, NetBackend, HDR_LEN};

/// Errors opening a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(#[source] io::Error),
    /// The interface name is too long or holds a NUL byte.
    #[error("invalid tap interface name {0:?}")]
    Name(String),
    /// A tun ioctl failed.
    #[error("{op} on tap {name:?} failed: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The interface name asked for.
        name: String,
        /// The OS error.
        source: io::Error,
    },
}

/// A tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap interface `name`, creating it if it does not
    /// exist (needs `CAP_NET_ADMIN`). An empty name lets the kernel pick
    /// one (`tap%d`); [`Tap::name`] tells which.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let ioctl_err = |op: &'static str| TapError::Ioctl {
            op,
            name: name.to_string(),
            source: io::Error::last_os_error(),
        };
        // SAFETY: ifreq is plain data (integers, arrays, a union of such and
        // a pointer), for which all-zero bytes are a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr`
        // is, for the duration of the call; the fd is open.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            return Err(ioctl_err("TUNSETIFF"));
        }
        let hdr = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // points at `hdr`.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) };
        if r < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ"));
        }
        let actual: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let tap = Self {
            file,
            name: String::from_utf8_lossy(&actual).into_owned(),
        };
        tap.offload(0).map_err(|source| TapError::Ioctl {
            op: "TUNSETOFFLOAD",
            name: name.to_string(),
            source,
        })?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no
        // memory of ours; the fd is open.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl NetBackend for Tap {
    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&mut self, bufs: &mut FrameBufs<'_>) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        let n = bufs.with_iovecs(|iov| {
            // SAFETY: the iovecs are valid for writes of their lengths
            // while this closure runs (FrameBufs::with_iovecs); readv writes
            // only there. At most MAX_IOVECS (64) entries fit in an int.
            unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as libc::c_int) }
        });
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // n ≥ 0.
        Ok(n as usize)
    }

    fn send(&mut self, bufs: &mut FrameBufs<'_>) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let n = bufs.with_iovecs(|iov| {
            // SAFETY: the iovecs are valid for reads of their lengths while
            // this closure runs; writev only reads them.
            unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) }
        });
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn supported_offloads(&self) -> u32 {
        offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN
    }

    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        self.offload(flags)
    }
}
