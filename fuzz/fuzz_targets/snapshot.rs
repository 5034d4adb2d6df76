//! The snapshot parser (`Snapshot::from_bytes`) on raw bytes and on files
//! assembled from fuzzer-chosen sections with valid CRCs (so that the
//! checks behind the checksum are reached too). Checks that nothing panics
//! and that whatever parses re-encodes to bytes that parse to the same
//! encoding.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_vcpu::snapshot::{Snapshot, FORMAT_VERSION, MAGIC, STRUCT_SIZES};

const TAGS: [&[u8; 4]; 8] = [
    b"HEAD", b"VCPU", b"VMST", b"MEMF", b"MEMD", b"DEVS", b"END!", b"ZZZZ",
];

#[derive(Arbitrary, Debug)]
enum Part {
    /// A well-formed header.
    Head { parent: u64, bad_size: Option<(u8, u32)> },
    /// A VCPU section of the right length for its counts, filled with
    /// `fill`.
    Vcpu { id: u32, flags: u32, n_cpuid: u8, n_msrs: u8, fill: Vec<u8>, extra: i8 },
    /// A MEMD section for a region of `region_pages`.
    Dirty { base: u32, region_pages: u16, pages: Vec<u16> },
    /// Any tag, any payload.
    Raw { tag: u8, payload: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
enum Input {
    Bytes(Vec<u8>),
    Sections { version: u8, parts: Vec<Part>, trailing: Vec<u8> },
}

fn section(out: &mut Vec<u8>, tag: &[u8; 4], payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(tag);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn build(version: u8, parts: &[Part], trailing: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(FORMAT_VERSION + u32::from(version % 3) - 1).to_le_bytes());
    for part in parts.iter().take(16) {
        let mut p = Vec::new();
        match part {
            Part::Head { parent, bad_size } => {
                p.extend_from_slice(&1u32.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&7u64.to_le_bytes());
                p.extend_from_slice(&parent.to_le_bytes());
                p.extend_from_slice(&(STRUCT_SIZES.len() as u32).to_le_bytes());
                for (i, (_, size)) in STRUCT_SIZES.iter().enumerate() {
                    let size = match bad_size {
                        Some((at, v)) if usize::from(*at) % STRUCT_SIZES.len() == i => *v,
                        _ => *size as u32,
                    };
                    p.extend_from_slice(&size.to_le_bytes());
                }
                section(&mut out, b"HEAD", &p);
            }
            Part::Vcpu { id, flags, n_cpuid, n_msrs, fill, extra } => {
                for v in [*id, *flags, 0, u32::from(*n_cpuid), u32::from(*n_msrs)] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                let size = |i: usize| STRUCT_SIZES[i].1;
                let mut len: usize = (0..7).map(size).sum();
                if flags & 1 != 0 {
                    len += size(7);
                }
                len += usize::from(*n_cpuid) * size(8) + usize::from(*n_msrs) * size(9);
                let len = (len as isize + isize::from(*extra)).max(0) as usize;
                let fill = if fill.is_empty() { &[0u8][..] } else { fill };
                p.extend(fill.iter().cycle().take(len));
                section(&mut out, b"VCPU", &p);
            }
            Part::Dirty { base, region_pages, pages } => {
                p.extend_from_slice(&(u64::from(*base) << 12).to_le_bytes());
                p.extend_from_slice(&(u64::from(*region_pages) << 12).to_le_bytes());
                let pages = &pages[..pages.len().min(8)];
                p.extend_from_slice(&(pages.len() as u64).to_le_bytes());
                for page in pages {
                    p.extend_from_slice(&u64::from(*page).to_le_bytes());
                }
                p.resize(p.len() + pages.len() * 4096, 0x5a);
                section(&mut out, b"MEMD", &p);
            }
            Part::Raw { tag, payload } => {
                section(&mut out, TAGS[usize::from(*tag) % TAGS.len()], payload);
            }
        }
    }
    out.extend_from_slice(trailing);
    out
}

fuzz_target!(|input: Input| {
    let bytes = match input {
        Input::Bytes(b) => b,
        Input::Sections { version, parts, trailing } => build(version, &parts, &trailing),
    };
    if let Ok(snapshot) = Snapshot::from_bytes(&bytes) {
        let encoded = snapshot.to_bytes().expect("a parsed snapshot re-encodes");
        let again = Snapshot::from_bytes(&encoded).expect("a re-encoded snapshot parses");
        assert_eq!(again.to_bytes().expect("re-encodes"), encoded);
    }
});
