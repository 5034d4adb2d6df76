//! Getting an ELF `vmlinux` out of a bzImage, and the bits of ELF the lab
//! reads (the Xen PVH entry note, `PT_INTERP`, named sections).
//!
//! A bzImage is real-mode setup code followed by a compressed payload whose
//! place the setup header gives (`payload_offset`, `payload_length`, boot
//! protocol 2.08+). The payload is the kernel's ELF image, compressed and
//! followed by its uncompressed size as a little-endian `u32`. Booting that
//! ELF through its PVH entry skips decompression, which is slow under TCG.

use std::io::Write;
use std::process::{Command, Stdio};

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point note.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Magic of an LZ4 legacy frame (as a little-endian `u32`).
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Largest uncompressed block of an LZ4 legacy frame.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Largest plausible kernel (bounds the output of a corrupt size field).
const MAX_VMLINUX: usize = 512 << 20;
/// `PT_INTERP`: the program header naming a dynamic loader.
const PT_INTERP: u32 = 3;
/// `PT_NOTE`.
const PT_NOTE: u32 = 4;

/// Why a kernel image was not usable.
#[derive(Debug, thiserror::Error)]
pub enum KernelImageError {
    /// The bzImage header is missing or too old.
    #[error("not a bzImage with boot protocol 2.08+: {0}")]
    NotBzImage(String),
    /// The payload is compressed in a format the lab does not handle.
    #[error("unsupported payload compression (first bytes {0:02x?})")]
    UnsupportedCompression(Vec<u8>),
    /// The compressed data is corrupt.
    #[error("corrupt {format} payload: {reason}")]
    Corrupt {
        /// The compression format.
        format: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The decompressed payload is not a usable ELF file.
    #[error("ELF: {0}")]
    BadElf(String),
    /// The external decompressor failed.
    #[error("xz: {0}")]
    Xz(String),
}

fn u16_at(data: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(data: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The compressed payload of a bzImage (without the trailing size word) and
/// the uncompressed size the kernel build recorded after it.
pub fn payload(bz: &[u8]) -> Result<(&[u8], u32), KernelImageError> {
    let bad = |m: &str| KernelImageError::NotBzImage(m.to_string());
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad("no HdrS signature at 0x202"));
    }
    let version = u16_at(bz, 0x206).ok_or_else(|| bad("truncated header"))?;
    if version < 0x208 {
        return Err(bad(&format!("boot protocol {version:#x}")));
    }
    let setup_sects = match bz.get(0x1f1).copied() {
        Some(0) => 4,
        Some(n) => usize::from(n),
        None => return Err(bad("truncated header")),
    };
    let offset = u32_at(bz, 0x248).ok_or_else(|| bad("truncated header"))?;
    let length = u32_at(bz, 0x24c).ok_or_else(|| bad("truncated header"))?;
    let start = (setup_sects + 1) * 512 + offset as usize;
    let all = start
        .checked_add(length as usize)
        .and_then(|end| bz.get(start..end))
        .ok_or_else(|| bad("payload_offset/length point past the file"))?;
    let split = all
        .len()
        .checked_sub(4)
        .ok_or_else(|| bad("payload shorter than its size word"))?;
    let (data, size) = all.split_at(split);
    let size = u32_at(size, 0).ok_or_else(|| bad("no size word"))?;
    Ok((data, size))
}

/// Decompresses LZ4 legacy frames (what the kernel's `lz4 -l` writes): a
/// magic, then blocks of `u32` compressed length + data, each at most 8 MiB
/// uncompressed; a magic may start a new frame.
pub fn decompress_lz4_legacy(data: &[u8]) -> Result<Vec<u8>, KernelImageError> {
    let corrupt = |reason: String| KernelImageError::Corrupt {
        format: "lz4 legacy",
        reason,
    };
    if u32_at(data, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(corrupt("no legacy frame magic".into()));
    }
    let mut pos = 4usize;
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    // Every iteration consumes at least 4 bytes, so this ends.
    while let Some(len) = u32_at(data, pos) {
        pos += 4;
        if len == LZ4_LEGACY_MAGIC {
            continue;
        }
        let input = pos
            .checked_add(len as usize)
            .and_then(|end| data.get(pos..end))
            .ok_or_else(|| {
                corrupt(format!(
                    "block at {pos:#x} of {len} bytes runs past the end"
                ))
            })?;
        let n = lz4_flex::block::decompress_into(input, &mut block)
            .map_err(|e| corrupt(format!("block at {pos:#x}: {e}")))?;
        out.extend_from_slice(block.get(..n).unwrap_or_default());
        if out.len() > MAX_VMLINUX {
            return Err(corrupt("more than 512 MiB of output".into()));
        }
        pos += len as usize;
    }
    if pos != data.len() {
        return Err(corrupt(format!(
            "{} stray bytes at the end",
            data.len() - pos
        )));
    }
    Ok(out)
}

/// Decompresses an XZ stream with Debian's `xz` (the generic kernel's format).
fn decompress_xz(data: &[u8]) -> Result<Vec<u8>, KernelImageError> {
    let err = |e: std::io::Error| KernelImageError::Xz(e.to_string());
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(err)?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| KernelImageError::Xz("no stdin pipe".into()))?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().map_err(err)?;
    let written = writer
        .join()
        .map_err(|_| KernelImageError::Xz("writer thread panicked".into()))?;
    if !output.status.success() {
        return Err(KernelImageError::Xz(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    written.map_err(err)?;
    Ok(output.stdout)
}

/// Extracts the ELF `vmlinux` from a bzImage and checks it has a PVH entry.
/// Returns the ELF and the PVH entry address.
pub fn extract_vmlinux(bz: &[u8]) -> Result<(Vec<u8>, u32), KernelImageError> {
    let (data, size) = payload(bz)?;
    let elf = match data.get(..6) {
        Some([0x02, 0x21, 0x4c, 0x18, ..]) => decompress_lz4_legacy(data)?,
        Some([0xfd, b'7', b'z', b'X', b'Z', 0x00]) => decompress_xz(data)?,
        other => {
            return Err(KernelImageError::UnsupportedCompression(
                other.unwrap_or_default().to_vec(),
            ))
        }
    };
    if elf.len() != size as usize {
        return Err(KernelImageError::BadElf(format!(
            "{} bytes decompressed, the image says {size}",
            elf.len()
        )));
    }
    let entry = pvh_entry(&elf)?;
    Ok((elf, entry))
}

/// One program header: type, file offset, file size.
fn program_headers(elf: &[u8]) -> Result<Vec<(u32, usize, usize)>, KernelImageError> {
    let bad = |m: &str| KernelImageError::BadElf(m.to_string());
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(bad("no ELF magic"));
    }
    if elf.get(4..6) != Some(&[2, 1]) {
        return Err(bad("not a 64-bit little-endian ELF"));
    }
    let phoff = u64_at(elf, 0x20).ok_or_else(|| bad("truncated header"))? as usize;
    let phentsize = usize::from(u16_at(elf, 0x36).ok_or_else(|| bad("truncated header"))?);
    let phnum = usize::from(u16_at(elf, 0x38).ok_or_else(|| bad("truncated header"))?);
    if phnum > 0 && phentsize < 0x38 {
        return Err(bad("program header entries too small"));
    }
    (0..phnum)
        .map(|i| {
            let at = phoff
                .checked_add(i * phentsize)
                .ok_or_else(|| bad("program header offset overflows"))?;
            let p_type = u32_at(elf, at).ok_or_else(|| bad("program header past the end"))?;
            let offset = u64_at(elf, at + 8).ok_or_else(|| bad("program header past the end"))?;
            let filesz = u64_at(elf, at + 32).ok_or_else(|| bad("program header past the end"))?;
            Ok((p_type, offset as usize, filesz as usize))
        })
        .collect()
}

/// The entry address in the ELF's Xen PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub fn pvh_entry(elf: &[u8]) -> Result<u32, KernelImageError> {
    for (p_type, offset, filesz) in program_headers(elf)? {
        if p_type != PT_NOTE {
            continue;
        }
        let notes = offset
            .checked_add(filesz)
            .and_then(|end| elf.get(offset..end))
            .ok_or_else(|| KernelImageError::BadElf("PT_NOTE past the end".into()))?;
        let mut pos = 0usize;
        // Every note consumes at least its 12-byte header.
        while let (Some(namesz), Some(descsz), Some(kind)) = (
            u32_at(notes, pos),
            u32_at(notes, pos + 4),
            u32_at(notes, pos + 8),
        ) {
            let name_at = pos + 12;
            let desc_at = name_at + (namesz as usize).next_multiple_of(4);
            let next = desc_at + (descsz as usize).next_multiple_of(4);
            let name = notes.get(name_at..name_at + namesz as usize);
            if name == Some(b"Xen\0") && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                return u32_at(notes, desc_at)
                    .ok_or_else(|| KernelImageError::BadElf("PVH note without an address".into()));
            }
            pos = next;
        }
    }
    Err(KernelImageError::BadElf(
        "no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); the kernel needs CONFIG_PVH".into(),
    ))
}

/// Whether an ELF executable is statically linked (has no `PT_INTERP`).
pub fn is_static(elf: &[u8]) -> Result<bool, KernelImageError> {
    Ok(program_headers(elf)?
        .iter()
        .all(|(t, _, _)| *t != PT_INTERP))
}

/// The contents of the ELF section called `name` (for a module's `.modinfo`).
pub fn section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, KernelImageError> {
    let bad = |m: &str| KernelImageError::BadElf(m.to_string());
    program_headers(elf)?; // validates the identification bytes (modules have no program headers)
    let shoff = u64_at(elf, 0x28).ok_or_else(|| bad("truncated header"))? as usize;
    let shentsize = usize::from(u16_at(elf, 0x3a).ok_or_else(|| bad("truncated header"))?);
    let shnum = usize::from(u16_at(elf, 0x3c).ok_or_else(|| bad("truncated header"))?);
    let shstrndx = usize::from(u16_at(elf, 0x3e).ok_or_else(|| bad("truncated header"))?);
    if shentsize < 0x40 {
        return Err(bad("section header entries too small"));
    }
    let header = |i: usize| -> Result<(usize, &'a [u8]), KernelImageError> {
        let at = shoff
            .checked_add(i.checked_mul(shentsize).ok_or_else(|| bad("overflow"))?)
            .ok_or_else(|| bad("overflow"))?;
        let name = u32_at(elf, at).ok_or_else(|| bad("section header past the end"))?;
        let offset = u64_at(elf, at + 0x18).ok_or_else(|| bad("section header past the end"))?;
        let size = u64_at(elf, at + 0x20).ok_or_else(|| bad("section header past the end"))?;
        let data = (offset as usize)
            .checked_add(size as usize)
            .and_then(|end| elf.get(offset as usize..end))
            .ok_or_else(|| bad("section past the end"))?;
        Ok((name as usize, data))
    };
    let (_, strtab) = header(shstrndx)?;
    for i in 0..shnum {
        let (name_off, data) = header(i)?;
        let Some(rest) = strtab.get(name_off..) else {
            continue;
        };
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        if rest.get(..end) == Some(name.as_bytes()) {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A minimal 64-bit ELF with one PT_NOTE segment holding `notes` and one
    /// section (`.modinfo`) holding `modinfo`.
    pub(crate) fn tiny_elf(notes: &[u8], modinfo: &[u8], interp: bool) -> Vec<u8> {
        let mut elf = vec![0u8; 0x40];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[6] = 1;
        let phnum = if interp { 2 } else { 1 };
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&(phnum as u16).to_le_bytes());
        let data_at = 0x40 + 0x38 * phnum;
        let mut ph = vec![0u8; 0x38];
        ph[..4].copy_from_slice(&PT_NOTE.to_le_bytes());
        ph[8..16].copy_from_slice(&(data_at as u64).to_le_bytes());
        ph[32..40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(&ph);
        if interp {
            let mut ph = vec![0u8; 0x38];
            ph[..4].copy_from_slice(&PT_INTERP.to_le_bytes());
            elf.extend_from_slice(&ph);
        }
        elf.extend_from_slice(notes);
        // Sections: null, .modinfo, .shstrtab.
        let modinfo_at = elf.len();
        elf.extend_from_slice(modinfo);
        let strtab_at = elf.len();
        let strtab = b"\0.modinfo\0.shstrtab\0";
        elf.extend_from_slice(strtab);
        let shoff = elf.len();
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        for (name, at, len) in [
            (0u32, 0usize, 0usize),
            (1, modinfo_at, modinfo.len()),
            (10, strtab_at, strtab.len()),
        ] {
            let mut sh = vec![0u8; 0x40];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(at as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(len as u64).to_le_bytes());
            elf.extend_from_slice(&sh);
        }
        elf
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    /// A bzImage-shaped file around `compressed` (+ the size word).
    fn tiny_bzimage(compressed: &[u8], size: u32) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut bz = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        bz[0x1f1] = setup_sects;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        let payload_offset = 0x40u32;
        bz[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(compressed.len() as u32 + 4).to_le_bytes());
        bz.resize(bz.len() + payload_offset as usize, 0xcc);
        bz.extend_from_slice(compressed);
        bz.extend_from_slice(&size.to_le_bytes());
        bz.extend_from_slice(b"trailing junk");
        bz
    }

    fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out
    }

    #[test]
    fn pvh_note_is_found_among_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8]);
        notes.extend(note(b"Xen\0", 5, b"linux\0"));
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0aa0u32.to_le_bytes(),
        ));
        let elf = tiny_elf(&notes, b"", false);
        assert_eq!(pvh_entry(&elf).unwrap(), 0x0100_0aa0);
        let without = tiny_elf(&note(b"Xen\0", 5, b"linux\0"), b"", false);
        assert!(matches!(
            pvh_entry(&without),
            Err(KernelImageError::BadElf(_))
        ));
        assert!(pvh_entry(b"\x7fELF").is_err());
        // A note whose sizes point past the segment ends the walk safely.
        let mut broken = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[]);
        broken[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(pvh_entry(&tiny_elf(&broken, b"", false)).is_err());
    }

    #[test]
    fn extracts_lz4_legacy_payload_with_several_blocks() {
        let notes = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &0x1234u32.to_le_bytes());
        let mut elf = tiny_elf(&notes, b"", false);
        elf.extend((0..100_000u32).map(|i| (i % 251) as u8));
        // Small blocks exercise the multi-block path (real ones are 8 MiB).
        let bz = tiny_bzimage(&lz4_legacy(&elf, 30_000), elf.len() as u32);
        let (out, entry) = extract_vmlinux(&bz).unwrap();
        assert_eq!(entry, 0x1234);
        assert_eq!(out, elf);
        // A wrong size word is caught.
        let bz = tiny_bzimage(&lz4_legacy(&elf, 30_000), elf.len() as u32 + 1);
        assert!(extract_vmlinux(&bz).is_err());
    }

    #[test]
    fn corrupt_inputs_are_errors() {
        let data = vec![7u8; 50_000];
        let mut frame = lz4_legacy(&data, 50_000);
        assert_eq!(decompress_lz4_legacy(&frame).unwrap(), data);
        frame.truncate(frame.len() - 3);
        assert!(decompress_lz4_legacy(&frame).is_err());
        assert!(decompress_lz4_legacy(b"nope").is_err());
        let bz = tiny_bzimage(b"\x1f\x8b\x08\x00gzip", 10);
        assert!(matches!(
            extract_vmlinux(&bz),
            Err(KernelImageError::UnsupportedCompression(_))
        ));
        let mut bz = tiny_bzimage(b"x", 1);
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(payload(&bz), Err(KernelImageError::NotBzImage(_))));
        assert!(payload(&[0u8; 100]).is_err());
    }

    #[test]
    fn static_and_section_lookup() {
        let elf = tiny_elf(b"", b"name=foo\0depends=bar\0", false);
        assert!(is_static(&elf).unwrap());
        assert!(!is_static(&tiny_elf(b"", b"", true)).unwrap());
        assert_eq!(
            section(&elf, ".modinfo").unwrap(),
            Some(&b"name=foo\0depends=bar\0"[..])
        );
        assert_eq!(section(&elf, ".text").unwrap(), None);
        // A relocatable object (a kernel module) has no program headers.
        let mut module = elf.clone();
        module[0x36..0x3a].copy_from_slice(&[0; 4]);
        assert_eq!(
            section(&module, ".modinfo").unwrap(),
            Some(&b"name=foo\0depends=bar\0"[..])
        );
    }
}
