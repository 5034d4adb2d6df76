//! Builders of guest page tables in every x86 format: map, unmap and
//! protect pages, with the paging structures allocated from a caller-given
//! guest-physical area.
//!
//! Non-leaf entries are created present, writable, user and executable, so
//! the leaf alone decides a page's rights. Accessed/dirty bits are left
//! clear in new entries. Entries are written with atomic stores.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::context::{bits, ControlRegs, PagingContext, PagingError, PagingMode};
use super::walk::{is_canonical, PageSize, P, PS, RW, US, XD};

const PAGE: u64 = 4096;

/// The format of a set of page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableFormat {
    /// 32-bit paging: 4 KiB pages and (with CR4.PSE) 4 MiB pages.
    Bits32,
    /// PAE paging: 4 KiB and 2 MiB pages.
    Pae,
    /// 4-level paging: 4 KiB, 2 MiB and 1 GiB pages.
    Level4,
    /// 5-level paging: 4 KiB, 2 MiB and 1 GiB pages.
    Level5,
}

impl TableFormat {
    /// The paging mode that walks these tables.
    pub fn paging_mode(self) -> PagingMode {
        match self {
            TableFormat::Bits32 => PagingMode::Bits32,
            TableFormat::Pae => PagingMode::Pae,
            TableFormat::Level4 => PagingMode::Level4,
            TableFormat::Level5 => PagingMode::Level5,
        }
    }

    /// Whether the format can map pages of `size`.
    pub fn supports(self, size: PageSize) -> bool {
        matches!(
            (self, size),
            (_, PageSize::Size4K)
                | (TableFormat::Bits32, PageSize::Size4M)
                | (
                    TableFormat::Pae | TableFormat::Level4 | TableFormat::Level5,
                    PageSize::Size2M
                )
                | (TableFormat::Level4 | TableFormat::Level5, PageSize::Size1G)
        )
    }

    fn levels(self) -> u8 {
        self.paging_mode().levels()
    }

    fn wide(self) -> bool {
        self != TableFormat::Bits32
    }
}

/// Rights of a mapped page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageFlags {
    /// R/W = 1.
    pub writable: bool,
    /// U/S = 1.
    pub user: bool,
    /// XD = 0. Clearing it needs a format with XD (not 32-bit paging) and
    /// EFER.NXE in the guest, else XD is a reserved bit.
    pub executable: bool,
    /// Protection key (bits 62:59; 4- and 5-level formats only).
    pub pkey: u8,
}

impl Default for PageFlags {
    /// Supervisor, writable, executable, key 0.
    fn default() -> Self {
        PageFlags {
            writable: true,
            user: false,
            executable: true,
            pkey: 0,
        }
    }
}

/// Errors from [`PageTableBuilder`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The table area is not 4 KiB aligned or holds no page.
    #[error("page-table area {base:#x}+{len:#x} must be 4 KiB aligned and hold at least one page")]
    InvalidArea {
        /// Start of the area.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The format has no pages of this size.
    #[error("{format:?} paging has no {size:?} pages")]
    UnsupportedPageSize {
        /// The format.
        format: TableFormat,
        /// The page size asked for.
        size: PageSize,
    },
    /// The flags cannot be expressed in this format.
    #[error("{format:?} paging cannot express {flags:?} (no XD bit or no protection keys)")]
    UnsupportedFlags {
        /// The format.
        format: TableFormat,
        /// The flags asked for.
        flags: PageFlags,
    },
    /// The virtual or physical address is not aligned to the page size.
    #[error("cannot map {gva:#x} -> {gpa:#x} with {size:?} pages: not aligned")]
    Misaligned {
        /// Virtual address.
        gva: u64,
        /// Physical address.
        gpa: u64,
        /// Page size.
        size: PageSize,
    },
    /// The virtual address is not translatable in the format (not canonical
    /// or above 4 GiB), or the physical address does not fit in an entry.
    #[error("cannot map {gva:#x} -> {gpa:#x} in {format:?} paging: address out of range")]
    OutOfRange {
        /// The format.
        format: TableFormat,
        /// Virtual address.
        gva: u64,
        /// Physical address.
        gpa: u64,
    },
    /// The page would overlap an existing mapping.
    #[error("mapping {size:?} at {gva:#x} overlaps an existing mapping")]
    Overlap {
        /// Virtual address.
        gva: u64,
        /// Page size.
        size: PageSize,
    },
    /// Nothing is mapped with this page size at this address.
    #[error("no {size:?} page is mapped at {gva:#x}")]
    NotMapped {
        /// Virtual address.
        gva: u64,
        /// Page size.
        size: PageSize,
    },
    /// The table area has no free page left.
    #[error("page-table area {base:#x}+{len:#x} is full")]
    OutOfTableSpace {
        /// Start of the area.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Guest memory could not be accessed.
    #[error("cannot access page-table memory at {gpa:#x}: {source}")]
    Memory {
        /// Guest-physical address.
        gpa: u64,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// The paging context for the tables could not be built.
    #[error("cannot build a paging context for the tables: {0}")]
    Context(#[from] PagingError),
}

/// Builds page tables of one [`TableFormat`] in guest memory.
#[derive(Debug)]
pub struct PageTableBuilder<'m, M: GuestMemory + ?Sized> {
    memory: &'m M,
    format: TableFormat,
    root: u64,
    base: u64,
    len: u64,
    next: u64,
    /// EPT entry format (present = any of bits 2:0; tables referenced with
    /// R/W/X), for the stage-2 builder of the `nested` module.
    ept: bool,
}

impl<'m, M: GuestMemory + ?Sized> PageTableBuilder<'m, M> {
    /// Starts empty tables of `format`, taking table pages from the
    /// guest-physical area `area..area + len` (4 KiB aligned). The root table
    /// is allocated (and zeroed) at once.
    pub fn new(
        memory: &'m M,
        format: TableFormat,
        area: GuestAddress,
        len: u64,
    ) -> Result<Self, BuildError> {
        Self::with_entry_format(memory, format, area, len, false)
    }

    /// [`PageTableBuilder::new`], with EPT entries if `ept` (then `format`
    /// is [`TableFormat::Level4`] or [`TableFormat::Level5`] and only gives
    /// the number of levels).
    pub(crate) fn with_entry_format(
        memory: &'m M,
        format: TableFormat,
        area: GuestAddress,
        len: u64,
        ept: bool,
    ) -> Result<Self, BuildError> {
        let base = area.0;
        if base % PAGE != 0 || len < PAGE || base.checked_add(len).is_none() {
            return Err(BuildError::InvalidArea { base, len });
        }
        let mut builder = PageTableBuilder {
            memory,
            format,
            root: 0,
            base,
            len,
            next: base,
            ept,
        };
        builder.root = builder.allocate()?;
        Ok(builder)
    }

    /// The value for CR3 (PCD, PWT and PCID clear).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The format of the tables.
    pub fn format(&self) -> TableFormat {
        self.format
    }

    /// Bytes of the area used so far.
    pub fn tables_size(&self) -> u64 {
        self.next - self.base
    }

    /// Control registers that make a vCPU walk these tables: paging, WP and
    /// (where it exists) NXE on, CR4.PSE for 32-bit tables, the PDPTEs
    /// loaded for PAE tables. Load it again after mapping into a new 1 GiB
    /// region of PAE tables, as `MOV CR3` would.
    pub fn control_regs(&self) -> Result<ControlRegs, BuildError> {
        let mut regs = ControlRegs {
            cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG | ControlRegs::CR0_WP,
            cr3: self.root,
            ..ControlRegs::default()
        };
        match self.format {
            TableFormat::Bits32 => regs.cr4 = ControlRegs::CR4_PSE,
            TableFormat::Pae => {
                regs.cr4 = ControlRegs::CR4_PAE;
                regs.efer = ControlRegs::EFER_NXE;
                regs.pdptrs = PagingContext::load_pdptrs(self.memory, self.root)?;
            }
            TableFormat::Level4 | TableFormat::Level5 => {
                regs.cr4 = ControlRegs::CR4_PAE;
                if self.format == TableFormat::Level5 {
                    regs.cr4 |= ControlRegs::CR4_LA57;
                }
                regs.efer = ControlRegs::EFER_LME | ControlRegs::EFER_LMA | ControlRegs::EFER_NXE;
            }
        }
        Ok(regs)
    }

    /// Maps the page of `size` at `gva` to `gpa`.
    ///
    /// Refuses misaligned addresses, sizes the format lacks, and pages that
    /// would overlap an existing mapping (a table emptied by [`unmap`] does
    /// not count as a mapping; it is then replaced, and its page is not
    /// reused).
    ///
    /// [`unmap`]: PageTableBuilder::unmap
    pub fn map(
        &mut self,
        gva: u64,
        gpa: u64,
        size: PageSize,
        flags: PageFlags,
    ) -> Result<(), BuildError> {
        self.check(gva, size)?;
        if gpa % size.bytes() != 0 {
            return Err(BuildError::Misaligned { gva, gpa, size });
        }
        let gpa_limit: u64 = match (self.format, size) {
            (TableFormat::Bits32, PageSize::Size4M) => 1 << 40,
            (TableFormat::Bits32, _) => 1 << 32,
            _ => 1 << 52,
        };
        if gpa >= gpa_limit {
            return Err(BuildError::OutOfRange {
                format: self.format,
                gva,
                gpa,
            });
        }
        let leaf = self.leaf_value(gpa, size, flags)?;
        self.install(gva, size, leaf)
    }

    /// Writes the leaf entry `leaf` for the page of `size` at `gva` (already
    /// checked), creating tables on the way; refuses overlaps as
    /// [`PageTableBuilder::map`] does.
    pub(crate) fn install(
        &mut self,
        gva: u64,
        size: PageSize,
        leaf: u64,
    ) -> Result<(), BuildError> {
        let level = leaf_level(size);
        let slot = self
            .descend(gva, level, true)?
            .ok_or(BuildError::Overlap { gva, size })?;
        let old = self.read(slot)?;
        if self.present(old) {
            let table_below = level > 1 && old & PS == 0;
            if !table_below || !self.table_is_empty(self.table_address(old), level - 1)? {
                return Err(BuildError::Overlap { gva, size });
            }
        }
        self.write(slot, leaf)
    }

    /// Removes the page of `size` mapped at `gva`.
    pub fn unmap(&mut self, gva: u64, size: PageSize) -> Result<(), BuildError> {
        let slot = self.find_leaf(gva, size)?;
        self.write(slot, 0)
    }

    /// Changes the rights of the page of `size` mapped at `gva`, keeping its
    /// address and accessed/dirty bits.
    pub fn protect(
        &mut self,
        gva: u64,
        size: PageSize,
        flags: PageFlags,
    ) -> Result<(), BuildError> {
        let slot = self.find_leaf(gva, size)?;
        let old = self.read(slot)?;
        let keep = if self.format.wide() {
            old & bits(5, 58) & !PS
        } else {
            old & bits(5, 31) & !PS
        };
        let fresh = self.leaf_value(0, size, flags)?;
        self.write(slot, keep | fresh)
    }

    fn check(&self, gva: u64, size: PageSize) -> Result<(), BuildError> {
        if !self.format.supports(size) {
            return Err(BuildError::UnsupportedPageSize {
                format: self.format,
                size,
            });
        }
        if gva % size.bytes() != 0 {
            return Err(BuildError::Misaligned { gva, gpa: 0, size });
        }
        let ok = match self.format {
            TableFormat::Bits32 | TableFormat::Pae => gva <= u64::from(u32::MAX),
            TableFormat::Level4 => is_canonical(gva, 48),
            TableFormat::Level5 => is_canonical(gva, 57),
        };
        if !ok {
            return Err(BuildError::OutOfRange {
                format: self.format,
                gva,
                gpa: 0,
            });
        }
        Ok(())
    }

    fn leaf_value(&self, gpa: u64, size: PageSize, flags: PageFlags) -> Result<u64, BuildError> {
        let unsupported = match self.format {
            TableFormat::Bits32 => !flags.executable || flags.pkey != 0,
            TableFormat::Pae => flags.pkey != 0,
            TableFormat::Level4 | TableFormat::Level5 => flags.pkey > 15,
        };
        if unsupported {
            return Err(BuildError::UnsupportedFlags {
                format: self.format,
                flags,
            });
        }
        let mut value = P;
        if flags.writable {
            value |= RW;
        }
        if flags.user {
            value |= US;
        }
        if !flags.executable {
            value |= XD;
        }
        value |= u64::from(flags.pkey) << 59;
        if size != PageSize::Size4K {
            value |= PS;
        }
        value |= match (self.format, size) {
            (TableFormat::Bits32, PageSize::Size4M) => {
                (gpa & 0xffc0_0000) | ((gpa >> 32) & 0xff) << 13
            }
            _ => gpa,
        };
        Ok(value)
    }

    fn find_leaf(&mut self, gva: u64, size: PageSize) -> Result<u64, BuildError> {
        self.check(gva, size)?;
        self.leaf_slot(gva, size)
    }

    /// The address of the leaf entry mapping the page of `size` at `gva`
    /// (already checked).
    pub(crate) fn leaf_slot(&mut self, gva: u64, size: PageSize) -> Result<u64, BuildError> {
        let level = leaf_level(size);
        let slot = self
            .descend(gva, level, false)?
            .ok_or(BuildError::NotMapped { gva, size })?;
        let value = self.read(slot)?;
        if !self.present(value) || (level > 1 && value & PS == 0) {
            return Err(BuildError::NotMapped { gva, size });
        }
        Ok(slot)
    }

    /// The address of the entry for `gva` at `target` level, creating
    /// missing tables if `create`. `None` if a table is missing (and not
    /// created) or a larger page is in the way.
    fn descend(&mut self, gva: u64, target: u8, create: bool) -> Result<Option<u64>, BuildError> {
        let mut level = self.format.levels();
        let mut table = self.root;
        loop {
            let slot = table + self.index(gva, level) * self.entry_bytes();
            if level == target {
                return Ok(Some(slot));
            }
            let entry = self.read(slot)?;
            if !self.present(entry) {
                if !create {
                    return Ok(None);
                }
                let new = self.allocate()?;
                let pae_pdpte = self.format == TableFormat::Pae && level == 3;
                let flags = if self.ept {
                    // EPT: read, write and execute (bits 2:0).
                    0b111
                } else if pae_pdpte {
                    P
                } else {
                    P | RW | US
                };
                self.write(slot, new | flags)?;
                table = new;
            } else if level > 1
                && entry & PS != 0
                && !(self.format == TableFormat::Pae && level == 3)
            {
                return Ok(None);
            } else {
                table = self.table_address(entry);
            }
            level -= 1;
        }
    }

    /// Whether `entry` is present: P for x86 formats, any of R/W/X for EPT.
    fn present(&self, entry: u64) -> bool {
        if self.ept {
            entry & 0b111 != 0
        } else {
            entry & P != 0
        }
    }

    fn table_address(&self, entry: u64) -> u64 {
        if self.format.wide() {
            entry & bits(12, 51)
        } else {
            entry & 0xffff_f000
        }
    }

    /// Whether the table at `table`, holding entries of `level`, maps
    /// nothing (its present entries only lead to tables that map nothing).
    fn table_is_empty(&self, table: u64, level: u8) -> Result<bool, BuildError> {
        let entries = PAGE / self.entry_bytes();
        for i in 0..entries {
            let entry = self.read(table + i * self.entry_bytes())?;
            if !self.present(entry) {
                continue;
            }
            if level == 1 || entry & PS != 0 {
                return Ok(false);
            }
            if !self.table_is_empty(self.table_address(entry), level - 1)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn index(&self, gva: u64, level: u8) -> u64 {
        let level = u32::from(level);
        match self.format {
            TableFormat::Bits32 => (gva >> (12 + 10 * (level - 1))) & 0x3ff,
            TableFormat::Pae if level == 3 => (gva >> 30) & 3,
            _ => (gva >> (12 + 9 * (level - 1))) & 0x1ff,
        }
    }

    fn entry_bytes(&self) -> u64 {
        if self.format.wide() {
            8
        } else {
            4
        }
    }

    fn allocate(&mut self) -> Result<u64, BuildError> {
        if self.next + PAGE > self.base + self.len {
            return Err(BuildError::OutOfTableSpace {
                base: self.base,
                len: self.len,
            });
        }
        let page = self.next;
        self.memory
            .write_slice(&[0u8; PAGE as usize], GuestAddress(page))
            .map_err(|source| BuildError::Memory { gpa: page, source })?;
        self.next += PAGE;
        Ok(page)
    }

    pub(crate) fn read(&self, gpa: u64) -> Result<u64, BuildError> {
        let value = if self.format.wide() {
            self.memory
                .load::<u64>(GuestAddress(gpa), Ordering::Acquire)
                .map(u64::from_le)
        } else {
            self.memory
                .load::<u32>(GuestAddress(gpa), Ordering::Acquire)
                .map(|v| u64::from(u32::from_le(v)))
        };
        value.map_err(|source| BuildError::Memory { gpa, source })
    }

    pub(crate) fn write(&self, gpa: u64, value: u64) -> Result<(), BuildError> {
        let result = if self.format.wide() {
            self.memory
                .store(value.to_le(), GuestAddress(gpa), Ordering::Release)
        } else {
            // 32-bit entries hold 32-bit values.
            self.memory
                .store((value as u32).to_le(), GuestAddress(gpa), Ordering::Release)
        };
        result.map_err(|source| BuildError::Memory { gpa, source })
    }
}

pub(crate) fn leaf_level(size: PageSize) -> u8 {
    match size {
        PageSize::Size4K => 1,
        PageSize::Size2M | PageSize::Size4M => 2,
        PageSize::Size1G => 3,
    }
}
