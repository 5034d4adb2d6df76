//! A writer for the `newc` cpio format the kernel unpacks as initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex
//! fields), the NUL-terminated name padded to 4 bytes, and the data padded
//! to 4 bytes; a `TRAILER!!!` entry ends the archive. The kernel does not
//! create missing parent directories, so the writer adds them itself.

use std::collections::BTreeSet;
use std::io::{self, Write};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams a newc archive into `W`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
    dirs: BTreeSet<String>,
}

/// Strips leading slashes: archive names are relative to the root.
fn clean(path: &str) -> &str {
    path.trim_start_matches('/')
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
            dirs: BTreeSet::new(),
        }
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..n])?;
        self.written += n as u64;
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: over 4 GiB"))
        })?;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let ino = self.next_ino;
        self.next_ino += 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            0,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// Adds the parent directories of `path` that are not in the archive yet.
    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let mut components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        components.pop();
        for c in components {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if self.dirs.insert(prefix.clone()) {
                let name = prefix.clone();
                self.entry(&name, S_IFDIR | 0o755, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = clean(path);
        self.parents(path)?;
        if self.dirs.insert(path.to_string()) {
            self.entry(path, S_IFDIR | (perm & 0o7777), (0, 0), &[])?;
        }
        Ok(())
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = clean(path);
        self.parents(path)?;
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = clean(path);
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Adds a character device node (such as `/dev/console`, 5:1).
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = clean(path);
        self.parents(path)?;
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the output and the archive's size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// One parsed entry: name, mode, rdev major/minor, data.
    type Entry = (String, u32, u32, u32, Vec<u8>);

    /// An independent newc reader, strict about magic and alignment.
    fn parse(mut a: &[u8]) -> Vec<Entry> {
        let total = a.len();
        let mut out = Vec::new();
        loop {
            assert_eq!((total - a.len()) % 4, 0, "entry not 4-aligned");
            assert_eq!(&a[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&a[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(a[110 + namesize - 1], 0);
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = a[data_at..data_at + size].to_vec();
            a = &a[(data_at + size).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(a.is_empty());
                return out;
            }
            out.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn archive_round_trips_with_parents_and_alignment() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/lab/deep/dir/file.bin", 0o644, b"hello").unwrap();
        w.file("/lab/deep/other", 0o755, b"1234").unwrap();
        w.dir("/lab", 0o700).unwrap(); // already implied: not repeated
        w.symlink("/bin/sh", "busybox").unwrap();
        w.char_device("/dev/console", 0o600, 5, 1).unwrap();
        let (bytes, size) = w.finish().unwrap();
        assert_eq!(size as usize, bytes.len());
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "lab",
                "lab/deep",
                "lab/deep/dir",
                "lab/deep/dir/file.bin",
                "lab/deep/other",
                "bin",
                "bin/sh",
                "dev",
                "dev/console"
            ]
        );
        let file = &entries[3];
        assert_eq!(
            (file.1, file.4.as_slice()),
            (S_IFREG | 0o644, &b"hello"[..])
        );
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(
            (entries[6].1, entries[6].4.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
        assert_eq!(
            (entries[8].1, entries[8].2, entries[8].3),
            (S_IFCHR | 0o600, 5, 1)
        );
    }
}
