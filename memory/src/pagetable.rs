//! Builders of guest page tables for booting a guest.
//!
//! [`build_identity_map`] writes 4-level long-mode tables that map
//! guest-virtual addresses `0..size` to the same guest-physical addresses with
//! 2 MiB or 1 GiB pages (1 GiB pages need CPUID.80000001H:EDX.Page1GB in the
//! guest). Entries are supervisor, writable and executable; the tables are
//! written through vm-memory into a caller-chosen, page-aligned area of guest
//! RAM, which is zeroed first.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

const PAGE: u64 = 4096;
const ENTRIES: u64 = 512;
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Bytes mapped by one PML4 entry (512 GiB).
const PML4E_SPAN: u64 = 1 << 39;
/// Bytes mapped by one PDPT entry (1 GiB).
const PDPTE_SPAN: u64 = 1 << 30;
/// Largest identity map a 4-level table can hold: the 48-bit address space.
pub const MAX_IDENTITY_MAP: u64 = 1 << 48;

/// Errors from building page tables.
#[derive(Debug, thiserror::Error)]
pub enum PageTableError {
    /// The size to map is zero, above [`MAX_IDENTITY_MAP`], or not a
    /// multiple of the leaf size.
    #[error("cannot identity-map {size:#x} bytes with {leaf:?} pages (non-zero multiple of the page size up to 2^48 needed)")]
    InvalidSize {
        /// Bytes requested.
        size: u64,
        /// Leaf size requested.
        leaf: LeafSize,
    },
    /// The table area is not page aligned.
    #[error("page-table area at {0:#x} is not 4 KiB aligned")]
    Unaligned(u64),
    /// The table area is too small.
    #[error("page tables need {needed:#x} bytes but the area at {base:#x} holds {available:#x}")]
    AreaTooSmall {
        /// Start of the area.
        base: u64,
        /// Bytes needed.
        needed: u64,
        /// Bytes given.
        available: u64,
    },
    /// Writing the tables to guest memory failed (the area is not RAM).
    #[error("cannot write page tables at {addr:#x}: {source}")]
    Memory {
        /// Guest address of the failed write.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Size of the leaf pages of an identity map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeafSize {
    /// 2 MiB pages: leaves in page directories.
    Size2M,
    /// 1 GiB pages: leaves in PDPTs.
    Size1G,
}

impl LeafSize {
    /// Bytes one leaf maps.
    pub fn bytes(self) -> u64 {
        match self {
            LeafSize::Size2M => 1 << 21,
            LeafSize::Size1G => 1 << 30,
        }
    }
}

/// What [`build_identity_map`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityMap {
    /// Value for CR3: the PML4's guest-physical address (PCD/PWT clear).
    pub cr3: u64,
    /// Bytes of guest memory the tables occupy from the area's start.
    pub tables_size: u64,
}

/// Bytes of page tables an identity map of `size` bytes with `leaf` pages
/// needs, or `None` for a size [`build_identity_map`] refuses.
pub fn identity_map_tables_size(size: u64, leaf: LeafSize) -> Option<u64> {
    if size == 0 || size > MAX_IDENTITY_MAP || size % leaf.bytes() != 0 {
        return None;
    }
    let pdpts = size.div_ceil(PML4E_SPAN);
    let pds = match leaf {
        LeafSize::Size2M => size.div_ceil(PDPTE_SPAN),
        LeafSize::Size1G => 0,
    };
    Some((1 + pdpts + pds) * PAGE)
}

/// Writes a long-mode identity map of `0..size` into guest memory at
/// `area`, which may use at most `area_len` bytes.
pub fn build_identity_map<M: GuestMemory>(
    memory: &M,
    area: GuestAddress,
    area_len: u64,
    size: u64,
    leaf: LeafSize,
) -> Result<IdentityMap, PageTableError> {
    let base = area.0;
    if base % PAGE != 0 {
        return Err(PageTableError::Unaligned(base));
    }
    let needed =
        identity_map_tables_size(size, leaf).ok_or(PageTableError::InvalidSize { size, leaf })?;
    if needed > area_len {
        return Err(PageTableError::AreaTooSmall {
            base,
            needed,
            available: area_len,
        });
    }
    let write = |addr: u64, value: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(|source| PageTableError::Memory { addr, source })
    };
    let zero_page = [0u8; PAGE as usize];
    for page in 0..needed / PAGE {
        let addr = base + page * PAGE;
        memory
            .write_slice(&zero_page, GuestAddress(addr))
            .map_err(|source| PageTableError::Memory { addr, source })?;
    }

    let pml4 = base;
    let pdpts = pml4 + PAGE;
    let pdpt_count = size.div_ceil(PML4E_SPAN);
    let pds = pdpts + pdpt_count * PAGE;
    for i in 0..pdpt_count {
        write(pml4 + i * 8, (pdpts + i * PAGE) | PRESENT | WRITABLE)?;
    }
    // Entry `n` of the flat array of PDPT entries maps the n-th GiB; the
    // PDPTs are contiguous, so that array starts at `pdpts`.
    let gibs = size.div_ceil(PDPTE_SPAN);
    for gib in 0..gibs {
        let entry = match leaf {
            LeafSize::Size1G => (gib * PDPTE_SPAN) | PRESENT | WRITABLE | PAGE_SIZE_BIT,
            LeafSize::Size2M => (pds + gib * PAGE) | PRESENT | WRITABLE,
        };
        write(pdpts + gib * 8, entry)?;
    }
    if leaf == LeafSize::Size2M {
        // Likewise the page directories form one flat array of 2 MiB leaves.
        let leaves = size / LeafSize::Size2M.bytes();
        debug_assert!(leaves <= gibs * ENTRIES);
        for n in 0..leaves {
            let entry = (n * LeafSize::Size2M.bytes()) | PRESENT | WRITABLE | PAGE_SIZE_BIT;
            write(pds + n * 8, entry)?;
        }
    }
    Ok(IdentityMap {
        cr3: pml4,
        tables_size: needed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MemoryLayout, MemoryOptions};

    /// A reference walk of 4-level tables (present and PS bits only).
    fn walk(mem: &crate::GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let mut table = cr3 & !0xfff;
        for level in (1..=4).rev() {
            let shift = 12 + 9 * (level - 1);
            let idx = (va >> shift) & 0x1ff;
            let e: u64 = mem.read_obj(GuestAddress(table + idx * 8)).ok()?;
            if e & PRESENT == 0 {
                return None;
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if (2..=3).contains(&level) && e & PAGE_SIZE_BIT != 0 {
                let mask = (1u64 << shift) - 1;
                return Some((addr & !mask) | (va & mask));
            }
            table = addr;
        }
        Some(table | (va & 0xfff))
    }

    fn memory() -> crate::GuestMemoryMmap {
        MemoryLayout::new(8 << 20)
            .unwrap()
            .create_memory(&MemoryOptions::default())
            .unwrap()
    }

    #[test]
    fn two_mib_identity_map_translates() {
        let mem = memory();
        let size = 4u64 << 30;
        let map = build_identity_map(&mem, GuestAddress(0x9000), 0x10000, size, LeafSize::Size2M)
            .unwrap();
        assert_eq!(map.cr3, 0x9000);
        assert_eq!(map.tables_size, (1 + 1 + 4) * PAGE);
        for va in [0, 0x1234, 0x20_0000, 0x3fff_ffff, 0x4000_0000, size - 1] {
            assert_eq!(walk(&mem, map.cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(walk(&mem, map.cr3, size), None);
    }

    #[test]
    fn one_gib_identity_map_translates_across_pml4_entries() {
        let mem = memory();
        let size = 1024u64 << 30;
        let map = build_identity_map(&mem, GuestAddress(0x10000), 0x3000, size, LeafSize::Size1G)
            .unwrap();
        assert_eq!(map.tables_size, 3 * PAGE);
        for va in [0, 0x4000_0123, (512u64 << 30) + 5, size - 1] {
            assert_eq!(walk(&mem, map.cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(walk(&mem, map.cr3, size), None);
    }

    #[test]
    fn bad_requests_are_refused() {
        let mem = memory();
        let g = GuestAddress(0x9000);
        assert!(matches!(
            build_identity_map(
                &mem,
                GuestAddress(0x9001),
                0x10000,
                1 << 30,
                LeafSize::Size2M
            ),
            Err(PageTableError::Unaligned(_))
        ));
        assert!(matches!(
            build_identity_map(&mem, g, 0x10000, 0, LeafSize::Size2M),
            Err(PageTableError::InvalidSize { .. })
        ));
        assert!(matches!(
            build_identity_map(&mem, g, 0x10000, 3 << 20, LeafSize::Size2M),
            Err(PageTableError::InvalidSize { .. })
        ));
        assert!(matches!(
            build_identity_map(&mem, g, 0x10000, 1 << 49, LeafSize::Size1G),
            Err(PageTableError::InvalidSize { .. })
        ));
        assert!(matches!(
            build_identity_map(&mem, g, 0x2000, 1 << 30, LeafSize::Size2M),
            Err(PageTableError::AreaTooSmall { .. })
        ));
        // The area lies beyond RAM.
        assert!(matches!(
            build_identity_map(
                &mem,
                GuestAddress(1 << 40),
                0x10000,
                1 << 30,
                LeafSize::Size2M
            ),
            Err(PageTableError::Memory { .. })
        ));
    }
}
