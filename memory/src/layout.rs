//! Guest-physical memory layouts for x86 guests.
//!
//! A [`MemoryLayout`] turns "N bytes of RAM" into guest-physical RAM ranges that
//! leave the 32-bit MMIO gap free. The default gap is
//! [`DEFAULT_MMIO_GAP_START`]..[`MMIO_GAP_END`] (3 GiB to 4 GiB): it holds the
//! PCI 32-bit memory window, ECAM, the IOAPIC (0xFEC0_0000), the LAPIC
//! (0xFEE0_0000) and the reset vector's flash (just below 4 GiB). RAM that does
//! not fit below the gap continues at 4 GiB.
//!
//! The layout is pure arithmetic. [`MemoryLayout::create_memory`] then backs it
//! with host memory (anonymous no-reserve memory, optionally with transparent
//! huge pages, or a shared file) as a vm-memory [`GuestMemoryMmap`], optionally
//! with a dirty bitmap that records every write the VMM makes through
//! vm-memory. [`kvm_slots`] describes the regions of any such memory as KVM
//! memory slots (this crate never calls KVM), and [`MemoryLayout::e820`] gives
//! the map a firmware or boot loader hands the guest.

use std::fs::File;
use std::num::NonZeroUsize;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

/// Guest memory as vmkit builds it: vm-memory's mmap backend with an optional
/// dirty bitmap (`None` when dirty tracking is off).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<Option<AtomicBitmap>>;

/// The page size the layout aligns to and the dirty bitmap tracks.
pub const PAGE_SIZE: u64 = 4096;
/// Default start of the 32-bit MMIO gap (3 GiB).
pub const DEFAULT_MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO gap: 4 GiB.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Lowest start the MMIO gap may be given (1 GiB): below that too little
/// 32-bit RAM remains for a boot loader's tables.
pub const MIN_MMIO_GAP_START: u64 = 0x4000_0000;
/// Start of the extended BIOS data area, reported reserved in the e820 map.
pub const EBDA_START: u64 = 0x9_FC00;
/// Start of RAM above the legacy VGA/BIOS area (1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Largest guest-physical address the layout uses (exclusive): 2^52, the
/// architectural MAXPHYADDR limit.
pub const MAX_PHYS_ADDR: u64 = 1 << 52;

/// Errors from building a layout or backing it with memory.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The RAM size is zero.
    #[error("the RAM size is zero")]
    EmptyRam,
    /// A size or address is not a multiple of the page size.
    #[error("{what} {value:#x} is not a multiple of the page size ({PAGE_SIZE:#x})")]
    Unaligned {
        /// What was unaligned.
        what: &'static str,
        /// The value given.
        value: u64,
    },
    /// The MMIO gap start is outside `MIN_MMIO_GAP_START..MMIO_GAP_END`.
    #[error("MMIO gap start {start:#x} is outside {MIN_MMIO_GAP_START:#x}..{MMIO_GAP_END:#x}")]
    GapOutOfRange {
        /// The requested gap start.
        start: u64,
    },
    /// The RAM would extend past the largest guest-physical address.
    #[error("{ram_size:#x} bytes of RAM do not fit below {MAX_PHYS_ADDR:#x} with the MMIO gap")]
    RamTooLarge {
        /// The requested RAM size.
        ram_size: u64,
    },
    /// A reserved range is empty or wraps the address space.
    #[error("reserved range {base:#x}+{len:#x} is empty or wraps the address space")]
    InvalidReservation {
        /// Base of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// A reserved range overlaps RAM or another reserved range.
    #[error("reserved range {base:#x}..{end:#x} overlaps {other}")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// End (exclusive) of the refused range.
        end: u64,
        /// What it overlaps.
        other: String,
    },
    /// The backing file is too small for the layout.
    #[error("backing file holds {file_len:#x} bytes but the layout needs {needed:#x} from offset {offset:#x}")]
    FileTooSmall {
        /// Length of the file.
        file_len: u64,
        /// Bytes the layout needs.
        needed: u64,
        /// Offset in the file the RAM starts at.
        offset: u64,
    },
    /// A region does not fit in the host's address space.
    #[error("region of {0:#x} bytes does not fit in host memory")]
    HostSize(u64),
    /// Querying the backing file failed.
    #[error("cannot query the backing file: {0}")]
    File(#[source] std::io::Error),
    /// mmap of a region failed.
    #[error("cannot map {size:#x} bytes for guest RAM at {guest_addr:#x}: {source}")]
    Mmap {
        /// Guest address of the region.
        guest_addr: u64,
        /// Size of the region.
        size: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// madvise(MADV_HUGEPAGE) failed.
    #[error("cannot enable transparent huge pages for RAM at {guest_addr:#x}: {source}")]
    HugePages {
        /// Guest address of the region.
        guest_addr: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused the region set.
    #[error("vm-memory refused the regions: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
}

/// A half-open guest-physical range `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestRange {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRange {
    /// End of the range (exclusive). Ranges built by this crate never wrap.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }

    /// Whether two ranges share at least one byte.
    pub fn overlaps(&self, other: &GuestRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
}

/// Kind of an e820 entry (values as in the E820 specification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not usable by the OS.
    Reserved = 2,
    /// ACPI tables, reclaimable after they are read.
    Acpi = 3,
    /// ACPI non-volatile storage.
    Nvs = 4,
}

/// One entry of an e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

/// How guest RAM is backed on the host.
#[derive(Debug, Clone)]
pub enum Backing {
    /// Private anonymous memory mapped with `MAP_NORESERVE`: host pages are
    /// committed on first touch.
    Anonymous {
        /// Ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`).
        transparent_huge_pages: bool,
    },
    /// A file mapped `MAP_SHARED` (a memfd, a file on hugetlbfs or tmpfs, ...),
    /// so that another process can map the same guest RAM. RAM ranges are laid
    /// out in the file one after another, starting at `offset`. The file must
    /// already be large enough; it is never resized.
    SharedFile {
        /// The file.
        file: Arc<File>,
        /// Offset of the first RAM byte in the file (page aligned).
        offset: u64,
    },
}

impl Default for Backing {
    fn default() -> Self {
        Backing::Anonymous {
            transparent_huge_pages: false,
        }
    }
}

/// Options for [`MemoryLayout::create_memory`].
#[derive(Debug, Clone, Default)]
pub struct MemoryOptions {
    /// Host backing of guest RAM.
    pub backing: Backing,
    /// Attach a dirty bitmap (one bit per 4 KiB page) that records writes
    /// made through vm-memory. Guest writes are tracked by KVM's dirty log
    /// instead (see [`SlotFlags::log_dirty_pages`]).
    pub dirty_tracking: bool,
}

/// The guest-physical layout of RAM around the 32-bit MMIO gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    ram_size: u64,
    gap: GuestRange,
    ram: Vec<GuestRange>,
    reserved: Vec<(GuestRange, E820Kind)>,
}

impl MemoryLayout {
    /// Lays out `ram_size` bytes of RAM around the default MMIO gap.
    pub fn new(ram_size: u64) -> Result<Self, LayoutError> {
        Self::with_mmio_gap(ram_size, DEFAULT_MMIO_GAP_START)
    }

    /// Lays out `ram_size` bytes of RAM around an MMIO gap from `gap_start`
    /// to 4 GiB. `gap_start` must be page aligned and at least
    /// [`MIN_MMIO_GAP_START`].
    pub fn with_mmio_gap(ram_size: u64, gap_start: u64) -> Result<Self, LayoutError> {
        if ram_size == 0 {
            return Err(LayoutError::EmptyRam);
        }
        check_aligned("RAM size", ram_size)?;
        check_aligned("MMIO gap start", gap_start)?;
        if !(MIN_MMIO_GAP_START..MMIO_GAP_END).contains(&gap_start) {
            return Err(LayoutError::GapOutOfRange { start: gap_start });
        }
        let low = ram_size.min(gap_start);
        let mut ram = vec![GuestRange { base: 0, len: low }];
        let high = ram_size - low;
        if high > 0 {
            if high > MAX_PHYS_ADDR - MMIO_GAP_END {
                return Err(LayoutError::RamTooLarge { ram_size });
            }
            ram.push(GuestRange {
                base: MMIO_GAP_END,
                len: high,
            });
        }
        Ok(MemoryLayout {
            ram_size,
            gap: GuestRange {
                base: gap_start,
                len: MMIO_GAP_END - gap_start,
            },
            ram,
            reserved: Vec::new(),
        })
    }

    /// Total bytes of RAM.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// The 32-bit MMIO gap.
    pub fn mmio_gap(&self) -> GuestRange {
        self.gap
    }

    /// RAM ranges in ascending order: one below the gap, and one from 4 GiB
    /// if RAM does not fit below it.
    pub fn ram_ranges(&self) -> &[GuestRange] {
        &self.ram
    }

    /// End (exclusive) of the highest RAM range.
    pub fn ram_end(&self) -> u64 {
        self.ram.last().map_or(0, GuestRange::end)
    }

    /// Whether `[addr, addr + len)` lies entirely inside one RAM range.
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.ram.iter().any(|r| addr >= r.base && end <= r.end())
    }

    /// Records a non-RAM range for the e820 map (ECAM, ACPI tables placed
    /// outside RAM, ...). It must not overlap RAM or an earlier reservation.
    pub fn reserve(&mut self, base: u64, len: u64, kind: E820Kind) -> Result<(), LayoutError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(LayoutError::InvalidReservation { base, len })?;
        let range = GuestRange { base, len };
        if let Some(r) = self.ram.iter().find(|r| r.overlaps(&range)) {
            return Err(LayoutError::Overlap {
                base,
                end,
                other: format!("RAM {:#x}..{:#x}", r.base, r.end()),
            });
        }
        if let Some((r, _)) = self.reserved.iter().find(|(r, _)| r.overlaps(&range)) {
            return Err(LayoutError::Overlap {
                base,
                end,
                other: format!("reserved range {:#x}..{:#x}", r.base, r.end()),
            });
        }
        self.reserved.push((range, kind));
        self.reserved.sort_by_key(|(r, _)| r.base);
        Ok(())
    }

    /// The e820 map: RAM (with the legacy EBDA and VGA/BIOS area below 1 MiB
    /// carved out as a PC firmware would report it), then the reservations,
    /// sorted by address. The carved-out legacy area is still backed by RAM
    /// and part of the KVM slot; it is only withheld from the guest OS.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = Vec::new();
        for r in &self.ram {
            if r.base == 0 && r.len > HIGH_MEMORY_START {
                map.push(E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820Kind::Ram,
                });
                map.push(E820Entry {
                    addr: EBDA_START,
                    size: HIGH_MEMORY_START - EBDA_START,
                    kind: E820Kind::Reserved,
                });
                map.push(E820Entry {
                    addr: HIGH_MEMORY_START,
                    size: r.len - HIGH_MEMORY_START,
                    kind: E820Kind::Ram,
                });
            } else {
                map.push(E820Entry {
                    addr: r.base,
                    size: r.len,
                    kind: E820Kind::Ram,
                });
            }
        }
        map.extend(self.reserved.iter().map(|(r, kind)| E820Entry {
            addr: r.base,
            size: r.len,
            kind: *kind,
        }));
        map.sort_by_key(|e| e.addr);
        map
    }

    /// Maps host memory for every RAM range and returns it as guest memory.
    pub fn create_memory(&self, options: &MemoryOptions) -> Result<GuestMemoryMmap, LayoutError> {
        if let Backing::SharedFile { file, offset } = &options.backing {
            check_aligned("backing file offset", *offset)?;
            let file_len = file.metadata().map_err(LayoutError::File)?.len();
            let needed = self.ram_size;
            if offset.checked_add(needed).is_none_or(|end| end > file_len) {
                return Err(LayoutError::FileTooSmall {
                    file_len,
                    needed,
                    offset: *offset,
                });
            }
        }
        let mut regions = Vec::with_capacity(self.ram.len());
        let mut file_pos = 0u64;
        for r in &self.ram {
            let size = usize::try_from(r.len).map_err(|_| LayoutError::HostSize(r.len))?;
            let file_offset = match &options.backing {
                Backing::Anonymous { .. } => None,
                Backing::SharedFile { file, offset } => {
                    let fo = FileOffset::from_arc(file.clone(), offset + file_pos);
                    file_pos += r.len;
                    Some(fo)
                }
            };
            let build = |bitmap: Option<AtomicBitmap>| {
                let builder = MmapRegionBuilder::new_with_bitmap(size, bitmap)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
                let builder = match &file_offset {
                    None => builder.with_mmap_flags(
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    ),
                    Some(fo) => builder
                        .with_file_offset(fo.clone())
                        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE),
                };
                builder.build().map_err(|source| LayoutError::Mmap {
                    guest_addr: r.base,
                    size: r.len,
                    source,
                })
            };
            let mmap = map_huge_aligned(size, || {
                build(
                    options
                        .dirty_tracking
                        .then(|| AtomicBitmap::new(size, page_size_nz())),
                )
            })?;
            if let Backing::Anonymous {
                transparent_huge_pages: true,
            } = options.backing
            {
                // SAFETY: the range is exactly the mapping vm-memory just
                // created and still owns; MADV_HUGEPAGE is advice that changes
                // how the kernel backs the pages, never their contents or the
                // validity of the mapping.
                let rc = unsafe { libc::madvise(mmap.as_ptr().cast(), size, libc::MADV_HUGEPAGE) };
                if rc != 0 {
                    return Err(LayoutError::HugePages {
                        guest_addr: r.base,
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.base)).ok_or(
                LayoutError::RamTooLarge {
                    ram_size: self.ram_size,
                },
            )?;
            regions.push(region);
        }
        Ok(GuestMemoryMmap::from_regions(regions)?)
    }
}

/// Size of an x86-64 huge page mapped by one PMD (2 MiB).
const HUGE_PAGE: usize = 2 << 20;

/// How many times [`map_huge_aligned`] steers a mapping before it accepts
/// wherever the kernel put it.
const ALIGN_ATTEMPTS: usize = 4;

/// Maps a region with `map` so that its host address is 2 MiB aligned when
/// the region is at least that large.
///
/// KVM maps guest memory with 2 MiB (nested) page-table entries only where
/// the guest-physical and the host-virtual address agree modulo 2 MiB; a
/// memory slot whose host address is merely 4 KiB aligned gets 4 KiB
/// mappings throughout, whatever backs it, and every first guest touch of a
/// 4 KiB page then costs a nested page fault. Guest RAM regions start at
/// 2 MiB aligned guest addresses, so an aligned host address is what makes
/// transparent (or hugetlbfs) huge pages reach the guest. Kernels before 6.7
/// do not align large anonymous mappings by themselves, and vm-memory maps
/// with a null hint (it forbids `MAP_FIXED`), so the mapping is steered:
/// [`AlignedHole`] leaves exactly one free hole of the region's size at a
/// 2 MiB boundary, fenced by reserved address space, where the kernel's
/// allocator places the next mapping of that size. Another free gap of a
/// suitable size, or another thread mapping at the same moment, can still
/// win; such an attempt is kept mapped (so the next attempt cannot land in
/// the same gap) and the steering repeats, up to [`ALIGN_ATTEMPTS`] times,
/// after which the last mapping is used as it is. Alignment only affects
/// speed, never correctness.
fn map_huge_aligned<R: vm_memory::bitmap::Bitmap>(
    size: usize,
    mut map: impl FnMut() -> Result<vm_memory::mmap::MmapRegion<R>, LayoutError>,
) -> Result<vm_memory::mmap::MmapRegion<R>, LayoutError> {
    if size < HUGE_PAGE {
        return map();
    }
    let mut misplaced = Vec::new();
    loop {
        let hole = AlignedHole::new(size);
        let region = map()?;
        drop(hole);
        if (region.as_ptr() as usize) % HUGE_PAGE == 0 || misplaced.len() + 1 >= ALIGN_ATTEMPTS {
            return Ok(region);
        }
        misplaced.push(region);
    }
}

/// Reserved (`PROT_NONE`) address space around a free hole of exactly
/// `size` bytes that starts at a 2 MiB boundary. Dropping it releases the
/// reservation; whatever was mapped into the hole in between stays.
struct AlignedHole {
    /// The reservation below the hole (may be empty).
    below: (usize, usize),
    /// The reservation above the hole (never empty).
    above: (usize, usize),
}

impl AlignedHole {
    /// Reserves `size + 2 MiB` bytes and frees the aligned `size` bytes
    /// inside them. `None` when the address space or the kernel refuses,
    /// in which case nothing stays reserved.
    fn new(size: usize) -> Option<Self> {
        let total = size.checked_add(HUGE_PAGE)?;
        // SAFETY: a null hint without MAP_FIXED asks the kernel for fresh,
        // inaccessible address space; no existing mapping is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let start = base as usize;
        // mmap returns a page-aligned address, so the hole starts less than
        // 2 MiB into the reservation and ends at least one page before its
        // end: [hole, hole + size) lies strictly inside it.
        let hole = start.next_multiple_of(HUGE_PAGE);
        let end = start + total;
        // SAFETY: [hole, hole + size) is part of the reservation created
        // above, which this function alone knows about; unmapping it frees
        // address space and invalidates no reference.
        if unsafe { libc::munmap(hole as *mut libc::c_void, size) } != 0 {
            // SAFETY: the hole could not be made, so the whole reservation is
            // still ours and unused; releasing it invalidates no reference.
            unsafe { libc::munmap(base, total) };
            return None;
        }
        Some(AlignedHole {
            below: (start, hole - start),
            above: (hole + size, end - (hole + size)),
        })
    }
}

impl Drop for AlignedHole {
    fn drop(&mut self) {
        for (addr, len) in [self.below, self.above] {
            if len > 0 {
                // SAFETY: the range is one of the PROT_NONE pieces this
                // value reserved; no reference points into inaccessible
                // memory and nothing else maps over it without MAP_FIXED.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            }
        }
    }
}

fn page_size_nz() -> NonZeroUsize {
    NonZeroUsize::MIN.saturating_add(PAGE_SIZE as usize - 1)
}

fn check_aligned(what: &'static str, value: u64) -> Result<(), LayoutError> {
    if value % PAGE_SIZE != 0 {
        return Err(LayoutError::Unaligned { what, value });
    }
    Ok(())
}

/// Flags of a KVM memory slot, as the crate describes them (the values match
/// `KVM_MEM_LOG_DIRTY_PAGES` and `KVM_MEM_READONLY`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SlotFlags {
    /// Have KVM log guest writes to the slot (`KVM_MEM_LOG_DIRTY_PAGES`).
    pub log_dirty_pages: bool,
    /// Guest writes to the slot exit as MMIO writes (`KVM_MEM_READONLY`).
    pub read_only: bool,
}

impl SlotFlags {
    /// The flags as the `flags` field of `kvm_userspace_memory_region`.
    pub fn bits(&self) -> u32 {
        u32::from(self.log_dirty_pages) | (u32::from(self.read_only) << 1)
    }
}

/// A KVM memory slot for one guest memory region, ready to be turned into a
/// `kvm_userspace_memory_region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemorySlot {
    /// Slot number.
    pub slot: u32,
    /// Guest-physical start.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Host virtual address of the first byte.
    pub userspace_addr: u64,
    /// Slot flags.
    pub flags: SlotFlags,
}

/// Describes every region of `memory` as a KVM slot, numbered from
/// `first_slot` in ascending guest-physical order.
pub fn kvm_slots<R: GuestMemoryRegion>(
    memory: &vm_memory::GuestRegionCollection<R>,
    first_slot: u32,
    flags: SlotFlags,
) -> Vec<MemorySlot> {
    memory
        .iter()
        .zip(first_slot..)
        .filter_map(|(region, slot)| {
            // A region whose host address vm-memory cannot give is not
            // mmap-backed and cannot be a KVM slot.
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .ok()?;
            Some(MemorySlot {
                slot,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags,
            })
        })
        .collect()
}

/// Appends to `pages` the guest-physical address of every page whose bit is
/// set in `bitmap` (bit `n` of word `w` is page `w * 64 + n`, as in both
/// KVM's dirty log and vm-memory's `AtomicBitmap`), for a region at `base`.
pub fn pages_from_bitmap(base: u64, bitmap: &[u64], pages: &mut Vec<u64>) {
    for (word_index, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            pages.push(base + (word_index as u64 * 64 + bit) * PAGE_SIZE);
        }
    }
}

/// Guest-physical addresses of pages the VMM wrote through vm-memory since
/// the last call, clearing the bitmap as it reads it. Empty when the memory
/// has no dirty bitmap.
pub fn take_dirty_pages(memory: &GuestMemoryMmap) -> Vec<u64> {
    let mut pages = Vec::new();
    for region in memory.iter() {
        let mapping: &vm_memory::MmapRegion<Option<AtomicBitmap>> = region;
        if let Some(bitmap) = mapping.bitmap().as_ref() {
            pages_from_bitmap(
                region.start_addr().raw_value(),
                &bitmap.get_and_reset(),
                &mut pages,
            );
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_ram_is_one_range_below_the_gap() {
        let l = MemoryLayout::new(256 * MIB).unwrap();
        assert_eq!(
            l.ram_ranges(),
            &[GuestRange {
                base: 0,
                len: 256 * MIB
            }]
        );
        assert_eq!(
            l.mmio_gap(),
            GuestRange {
                base: 3 * GIB,
                len: GIB
            }
        );
    }

    #[test]
    fn large_ram_continues_at_4g() {
        let l = MemoryLayout::new(5 * GIB).unwrap();
        assert_eq!(
            l.ram_ranges(),
            &[
                GuestRange {
                    base: 0,
                    len: 3 * GIB
                },
                GuestRange {
                    base: 4 * GIB,
                    len: 2 * GIB
                }
            ]
        );
        assert_eq!(l.ram_end(), 6 * GIB);
        assert!(l.is_ram(3 * GIB - 4096, 4096));
        assert!(!l.is_ram(3 * GIB - 4096, 4097));
        assert!(!l.is_ram(u64::MAX, 2));
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        assert!(matches!(MemoryLayout::new(0), Err(LayoutError::EmptyRam)));
        assert!(matches!(
            MemoryLayout::new(4097),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::with_mmio_gap(GIB, 0x1000),
            Err(LayoutError::GapOutOfRange { .. })
        ));
        assert!(matches!(
            MemoryLayout::with_mmio_gap(GIB, MMIO_GAP_END),
            Err(LayoutError::GapOutOfRange { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(MAX_PHYS_ADDR),
            Err(LayoutError::RamTooLarge { .. })
        ));
        let mut l = MemoryLayout::new(5 * GIB).unwrap();
        assert!(matches!(
            l.reserve(3 * GIB - 4096, 8192, E820Kind::Reserved),
            Err(LayoutError::Overlap { .. })
        ));
        l.reserve(0xE000_0000, 256 * MIB, E820Kind::Reserved)
            .unwrap();
        assert!(matches!(
            l.reserve(0xEFFF_F000, 4096, E820Kind::Reserved),
            Err(LayoutError::Overlap { .. })
        ));
        assert!(matches!(
            l.reserve(u64::MAX, 2, E820Kind::Reserved),
            Err(LayoutError::InvalidReservation { .. })
        ));
        assert!(matches!(
            l.reserve(0xF000_0000, 0, E820Kind::Reserved),
            Err(LayoutError::InvalidReservation { .. })
        ));
    }

    #[test]
    fn e820_carves_legacy_area_and_lists_reservations() {
        let mut l = MemoryLayout::new(5 * GIB).unwrap();
        l.reserve(0xE000_0000, 256 * MIB, E820Kind::Reserved)
            .unwrap();
        let map = l.e820();
        let expect = [
            (0, EBDA_START, E820Kind::Ram),
            (
                EBDA_START,
                HIGH_MEMORY_START - EBDA_START,
                E820Kind::Reserved,
            ),
            (
                HIGH_MEMORY_START,
                3 * GIB - HIGH_MEMORY_START,
                E820Kind::Ram,
            ),
            (0xE000_0000, 256 * MIB, E820Kind::Reserved),
            (4 * GIB, 2 * GIB, E820Kind::Ram),
        ];
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn anonymous_memory_with_dirty_tracking() {
        let l = MemoryLayout::new(16 * MIB).unwrap();
        let mem = l
            .create_memory(&MemoryOptions {
                dirty_tracking: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(take_dirty_pages(&mem), Vec::<u64>::new());
        mem.write_obj(0xdead_beefu32, GuestAddress(0x5004)).unwrap();
        mem.write_slice(&[1; 4096], GuestAddress(0x9000)).unwrap();
        assert_eq!(take_dirty_pages(&mem), vec![0x5000, 0x9000]);
        assert_eq!(take_dirty_pages(&mem), Vec::<u64>::new());
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x5004)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn bitmap_bits_become_page_addresses() {
        let mut pages = vec![1];
        pages_from_bitmap(0x1_0000_0000, &[0b101, 0, 1 << 63], &mut pages);
        assert_eq!(
            pages,
            vec![
                1,
                0x1_0000_0000,
                0x1_0000_2000,
                0x1_0000_0000 + 191 * PAGE_SIZE
            ]
        );
    }

    #[test]
    fn memory_without_tracking_reports_nothing_dirty() {
        let mem = MemoryLayout::new(MIB)
            .unwrap()
            .create_memory(&MemoryOptions::default())
            .unwrap();
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        assert!(take_dirty_pages(&mem).is_empty());
    }

    #[test]
    fn transparent_huge_pages_backing_works() {
        let mem = MemoryLayout::new(4 * MIB)
            .unwrap()
            .create_memory(&MemoryOptions {
                backing: Backing::Anonymous {
                    transparent_huge_pages: true,
                },
                dirty_tracking: false,
            })
            .unwrap();
        mem.write_obj(7u64, GuestAddress(2 * MIB)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(2 * MIB)).unwrap(), 7);
    }

    #[test]
    fn large_regions_are_mapped_at_huge_page_boundaries() {
        // Both RAM regions (below the gap and above 4 GiB) of every backing
        // start at 2 MiB aligned host addresses, so KVM can map them with
        // 2 MiB nested-paging entries. Several layouts in a row: a region
        // steered into its hole must not leave a hole for the next. Sizes
        // that are not multiples of 2 MiB, which even kernels that align
        // large anonymous mappings themselves (6.7 and later) leave alone.
        let gib = 1u64 << 30;
        for (ram, gap) in [
            (64 * MIB, 3 * gib),
            (6 * MIB + PAGE_SIZE, 3 * gib),
            (gib + 4 * MIB + 3 * PAGE_SIZE, gib),
        ] {
            let l = MemoryLayout::with_mmio_gap(ram, gap).unwrap();
            let mem = l
                .create_memory(&MemoryOptions {
                    backing: Backing::Anonymous {
                        transparent_huge_pages: true,
                    },
                    dirty_tracking: true,
                })
                .unwrap();
            for region in mem.iter() {
                let host = region.as_ptr() as usize;
                if region.len() >= HUGE_PAGE as u64 {
                    assert_eq!(
                        host % HUGE_PAGE,
                        0,
                        "region at {:#x}",
                        region.start_addr().0
                    );
                }
            }
            // The memory works where the steering put it.
            let last = if ram > gap {
                GuestAddress(MMIO_GAP_END + (ram - gap) - 8)
            } else {
                GuestAddress(ram - 8)
            };
            mem.write_obj(0x55aa_u64, last).unwrap();
            assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x55aa);
        }
        let small = MemoryLayout::new(MIB)
            .unwrap()
            .create_memory(&MemoryOptions::default());
        assert!(small.is_ok());
    }

    #[test]
    fn shared_file_backing_reaches_the_file() {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(2 * MIB + 8192).unwrap();
        let file = Arc::new(file);
        let l = MemoryLayout::new(2 * MIB).unwrap();
        let mem = l
            .create_memory(&MemoryOptions {
                backing: Backing::SharedFile {
                    file: file.clone(),
                    offset: 8192,
                },
                dirty_tracking: false,
            })
            .unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x100)).unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, 8192 + 0x100).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1122_3344);

        let too_small = MemoryLayout::new(4 * MIB)
            .unwrap()
            .create_memory(&MemoryOptions {
                backing: Backing::SharedFile { file, offset: 0 },
                dirty_tracking: false,
            });
        assert!(matches!(too_small, Err(LayoutError::FileTooSmall { .. })));
    }

    #[test]
    fn slots_describe_the_regions() {
        let l = MemoryLayout::with_mmio_gap(2 * GIB, 0x4000_0000).unwrap();
        let mem = l.create_memory(&MemoryOptions::default()).unwrap();
        let flags = SlotFlags {
            log_dirty_pages: true,
            read_only: false,
        };
        let slots = kvm_slots(&mem, 3, flags);
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].slot, 3);
        assert_eq!((slots[0].guest_phys_addr, slots[0].memory_size), (0, GIB));
        assert_eq!(slots[1].slot, 4);
        assert_eq!(
            (slots[1].guest_phys_addr, slots[1].memory_size),
            (4 * GIB, GIB)
        );
        assert_eq!(slots[0].flags.bits(), 1);
        let host = mem.get_host_address(GuestAddress(4 * GIB)).unwrap();
        assert_eq!(slots[1].userspace_addr, host as u64);
        assert_eq!(
            SlotFlags {
                log_dirty_pages: false,
                read_only: true
            }
            .bits(),
            2
        );
    }

    proptest! {
        #[test]
        fn layout_invariants(pages in 1u64..(64 << 18), gap_pages in (MIN_MMIO_GAP_START / PAGE_SIZE)..(MMIO_GAP_END / PAGE_SIZE)) {
            let ram = pages * PAGE_SIZE;
            let gap_start = gap_pages * PAGE_SIZE;
            let l = MemoryLayout::with_mmio_gap(ram, gap_start).unwrap();
            let ranges = l.ram_ranges();
            // Exact RAM size.
            prop_assert_eq!(ranges.iter().map(|r| r.len).sum::<u64>(), ram);
            // Sorted, non-overlapping, non-empty, page aligned, gap respected.
            for w in ranges.windows(2) {
                prop_assert!(w[0].end() <= w[1].base);
            }
            for r in ranges {
                prop_assert!(r.len > 0);
                prop_assert_eq!(r.base % PAGE_SIZE, 0);
                prop_assert_eq!(r.len % PAGE_SIZE, 0);
                prop_assert!(!r.overlaps(&l.mmio_gap()));
                prop_assert!(r.end() <= MAX_PHYS_ADDR);
            }
            // RAM below the gap is used first.
            prop_assert_eq!(ranges[0].base, 0);
            if ranges.len() > 1 {
                prop_assert_eq!(ranges[0].end(), gap_start);
                prop_assert_eq!(ranges[1].base, MMIO_GAP_END);
            }
            // The e820 map's RAM never exceeds the layout's RAM and never
            // overlaps the gap; entries are sorted and disjoint.
            let map = l.e820();
            for w in map.windows(2) {
                prop_assert!(w[0].addr + w[0].size <= w[1].addr);
            }
            let e820_ram: u64 = map.iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
            prop_assert!(e820_ram <= ram);
            prop_assert!(ram - e820_ram <= HIGH_MEMORY_START - EBDA_START);
        }
    }
}
