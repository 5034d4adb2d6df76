//! Nested paging: Intel EPT (SDM Vol. 3C chapter 29) and AMD nested paging
//! (APM Vol. 2 §15.25), their builders, and two-dimensional walks.
//!
//! With nested paging a guest-virtual address is translated in two stages:
//! stage 1 is the guest's own paging ([`PagingContext`]), which yields a
//! guest-physical address; stage 2 ([`EptContext`] or [`NptContext`])
//! translates guest-physical addresses into host-physical ones (for a VMM
//! running a nested guest, "host-physical" is its own guest-physical
//! address space). Every guest paging-structure entry lives at a
//! guest-physical address, so it is itself translated through stage 2
//! before it is read: a 4-level guest over 4-level stage-2 tables makes up
//! to 24 memory references per translation ([`walk_2d`]).
//!
//! # Readings of the manuals
//! - **EPT** (SDM §29.3): an entry is present when any of bits 2:0 is set.
//!   Bits 2:0 = 010b or 110b (write without read), 100b (execute-only)
//!   without the capability, a set reserved bit (bits 51:N, bits 7:3 of
//!   non-leaf entries, bits 29:12 / 20:12 of 1 GiB / 2 MiB leaves), a large
//!   page the processor does not support, or memory type 2, 3 or 7 in a
//!   leaf are *misconfigurations*; a not-present entry or missing
//!   permission is a *violation* (exit-qualification bits per Table 29-7).
//!   With EPTP bit 6, the accessed flag (bit 8) is set in every entry used
//!   and the dirty flag (bit 9) in the leaf on a write; and all processor
//!   accesses to guest paging-structure entries are treated as writes —
//!   reading an entry needs EPT write permission, sets the EPT dirty flag,
//!   and a violation reports both bit 0 and bit 1 (SDM §29.3.5 and the note
//!   to Table 29-7). The brief of this module asked for "writes when they
//!   set guest A/D bits"; the SDM says all of them, and that is what is
//!   implemented. Without EPTP bit 6 entry reads are data reads and guest
//!   A/D updates data writes. Mode-based execute control, sub-page write
//!   permissions, #VE and the "advanced" qualification bits (9 to 11) are
//!   not modelled; bits 3 to 5 of a qualification are the AND of the R/W/X
//!   bits of the entries used, including a not-present one (so a
//!   not-present violation reports 0 there).
//! - **NPT** (APM §15.25.5 to §15.25.7): the nested tables use the
//!   long-mode format of the *host* (the VMRUN caller): EFER.NXE, 1 GiB page
//!   support, MAXPHYADDR and CR4.LA57 come from [`NptHost`], never from the
//!   guest. Every nested access is a user access (so the U/S bit must be set
//!   at every level, and host SMEP/SMAP/CR0.WP do not matter). Protection
//!   keys do not apply to nested translations. #NPF EXITINFO1 carries the
//!   #PF-style P/RW/US/RSVD/ID bits (ID for fetches when the host has
//!   EFER.NXE, as for #PF) plus bit 32 (final guest-physical translation)
//!   or bit 33 (guest page-table access). Nested A bits are set in every
//!   entry used, D in the leaf on writes. Only long-mode host formats are
//!   supported (legacy and PAE hosts are not modelled).
//! - **NPT guest page-table accesses are user writes** (APM Vol. 2
//!   §15.25.5, "Nested Table Walk": "Table walks for guest page tables are
//!   always treated as user writes at the nested page table level", while
//!   the walk for the guest page itself "is always treated as a user
//!   access"; KVM agrees: `walk_addr_generic` in
//!   `arch/x86/kvm/mmu/paging_tmpl.h` translates every guest table address
//!   with `PFERR_USER_MASK | PFERR_WRITE_MASK` whenever the format has A/D
//!   bits, which long-mode NPT always has). So *reading* a guest
//!   paging-structure entry, not only setting its A/D bits, needs R/W = 1
//!   and U/S = 1 at every nested level, sets the nested D bit of the leaf
//!   (on an updating walk), and a failure reports EXITINFO1 W|U|bit 33
//!   (plus P for a protection or reserved-bit fault).
//!   The final guest-physical access keeps its own kind (read, write or
//!   fetch; always user).
//! - A guest-physical address beyond the reach of the stage-2 tables
//!   (bits at or above 48 with 4-level tables, 57 with 5-level) is reported
//!   as a not-present stage-2 fault with no entries visited.
//! - As in the 1-D walker, accessed/dirty bits are written only after an
//!   access is known to succeed at that stage: a stage-2 walk that succeeds
//!   sets its A/D bits even if the guest walk later faults; the guest's own
//!   A/D bits are set (through stage 2) before the final address is
//!   translated, as the processor does while translating the linear
//!   address.
//!
//! # Example
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_memory::paging::{
//!     walk_2d, Access, CpuFeatures, EptBuilder, EptCapabilities, EptContext, EptFlags,
//!     PageFlags, PageSize, PageTableBuilder, PagingContext, Privilege, Stage2Context,
//!     TableFormat, WalkMode,
//! };
//!
//! let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)])?;
//! // Guest tables at guest-physical 1 MiB, mapping a page to guest-physical 4 MiB.
//! let mut guest =
//!     PageTableBuilder::new(&memory, TableFormat::Level4, GuestAddress(0x10_0000), 0x10_0000)?;
//! guest.map(0x7000_0000, 0x40_0000, PageSize::Size4K, PageFlags::default())?;
//! let guest = PagingContext::new(&guest.control_regs()?, &CpuFeatures::default())?;
//! // EPT: the guest tables' 2 MiB identically, guest-physical 4 MiB at host 6 MiB.
//! let mut ept = EptBuilder::new(&memory, false, GuestAddress(0x20_0000), 0x1_0000)?;
//! ept.map(0, 0, PageSize::Size2M, EptFlags::default())?;
//! ept.map(0x40_0000, 0x60_0000, PageSize::Size2M, EptFlags::default())?;
//! let stage2 = Stage2Context::Ept(EptContext::new(ept.eptp(true), &EptCapabilities::default())?);
//!
//! let read = Access::read(Privilege::Supervisor);
//! let t = walk_2d(&guest, &stage2, &memory, 0x7000_0123, read, WalkMode::Update)?;
//! assert_eq!((t.stage1.gpa, t.hpa), (0x40_0123, 0x60_0123));
//! // Once the accessed bits are set: 4 guest entries, and a 3-entry stage-2
//! // walk for each of them and for the final address.
//! let t = walk_2d(&guest, &stage2, &memory, 0x7000_0123, read, WalkMode::Update)?;
//! assert_eq!(t.stats.references(), 4 + 5 * 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError};

use super::builder::{BuildError, PageTableBuilder, TableFormat};
use super::context::{bits, ControlRegs, CpuFeatures, PagingContext, PagingError, Vendor};
use super::walk::{
    compare_exchange, walk_once, walk_tables, Access, AccessKind, EntryReader, Outcome, PageSize,
    PfErrorCode, Privilege, Step, TableMemory, Translation, WalkEntries, WalkEntry, WalkError,
    WalkMode, MAX_AD_RETRIES, P, PS, RW, US, XD,
};

/// EPT read permission.
const EPT_R: u64 = 1 << 0;
/// EPT write permission.
const EPT_W: u64 = 1 << 1;
/// EPT execute permission.
const EPT_X: u64 = 1 << 2;
/// EPT "ignore PAT" bit of a leaf.
const EPT_IPAT: u64 = 1 << 6;
/// EPT accessed flag.
const EPT_A: u64 = 1 << 8;
/// EPT dirty flag.
const EPT_D: u64 = 1 << 9;
/// Accessed flag of an x86 (NPT) entry.
const NPT_A: u64 = 1 << 5;
/// Dirty flag of an x86 (NPT) entry.
const NPT_D: u64 = 1 << 6;

/// Errors from building a stage-2 context.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// EPTP bits 2:0 are not a memory type allowed for paging-structure
    /// accesses (0 = UC or 6 = WB).
    #[error(
        "EPTP {eptp:#x}: paging-structure memory type {memory_type} is neither UC (0) nor WB (6)"
    )]
    EptpMemoryType {
        /// The EPTP.
        eptp: u64,
        /// Its bits 2:0.
        memory_type: u8,
    },
    /// EPTP bits 5:3 (page-walk length minus 1) are not 3, or 4 with 5-level
    /// EPT support.
    #[error("EPTP {eptp:#x}: page-walk length {length} is not supported")]
    EptpWalkLength {
        /// The EPTP.
        eptp: u64,
        /// The page-walk length (bits 5:3 plus one).
        length: u8,
    },
    /// EPTP bit 6 enables accessed/dirty flags the processor lacks.
    #[error("EPTP {eptp:#x} enables EPT accessed/dirty flags, which are not supported")]
    EptpAccessedDirty {
        /// The EPTP.
        eptp: u64,
    },
    /// EPTP sets reserved bits (11:7, or bits at or above MAXPHYADDR).
    #[error("EPTP {eptp:#x} sets reserved bits {reserved:#x}")]
    EptpReserved {
        /// The EPTP.
        eptp: u64,
        /// The reserved bits set.
        reserved: u64,
    },
    /// MAXPHYADDR outside 32..=52.
    #[error("MAXPHYADDR {0} is outside 32..=52")]
    InvalidMaxPhyAddr(u8),
    /// nCR3 or the host features do not make a valid long-mode context.
    #[error("invalid nested paging context: {0}")]
    Npt(#[from] PagingError),
}

/// EPT features of the processor (IA32_VMX_EPT_VPID_CAP and CPUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptCapabilities {
    /// Execute-only translations (bits 2:0 = 100b) are allowed (bit 0).
    pub execute_only: bool,
    /// 2 MiB pages (bit 16).
    pub pages_2m: bool,
    /// 1 GiB pages (bit 17).
    pub pages_1g: bool,
    /// Accessed and dirty flags (bit 21).
    pub accessed_dirty: bool,
    /// Page-walk length 5 (bit 7).
    pub five_level: bool,
    /// MAXPHYADDR of the processor, 32..=52.
    pub maxphyaddr: u8,
}

impl Default for EptCapabilities {
    /// Everything supported, MAXPHYADDR 46.
    fn default() -> Self {
        EptCapabilities {
            execute_only: true,
            pages_2m: true,
            pages_1g: true,
            accessed_dirty: true,
            five_level: true,
            maxphyaddr: 46,
        }
    }
}

/// An EPT memory type (SDM §29.3.7; values 2, 3 and 7 are reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EptMemoryType {
    /// 0: uncacheable.
    Uncacheable,
    /// 1: write combining.
    WriteCombining,
    /// 4: write through.
    WriteThrough,
    /// 5: write protected.
    WriteProtected,
    /// 6: write back.
    WriteBack,
}

impl EptMemoryType {
    /// The type encoded as `bits` (bits 2:0 only), if it is not reserved.
    pub fn from_bits(bits: u8) -> Option<EptMemoryType> {
        match bits & 7 {
            0 => Some(EptMemoryType::Uncacheable),
            1 => Some(EptMemoryType::WriteCombining),
            4 => Some(EptMemoryType::WriteThrough),
            5 => Some(EptMemoryType::WriteProtected),
            6 => Some(EptMemoryType::WriteBack),
            _ => None,
        }
    }

    /// The encoding.
    pub fn bits(self) -> u8 {
        match self {
            EptMemoryType::Uncacheable => 0,
            EptMemoryType::WriteCombining => 1,
            EptMemoryType::WriteThrough => 4,
            EptMemoryType::WriteProtected => 5,
            EptMemoryType::WriteBack => 6,
        }
    }
}

/// What a stage-2 translation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage2Access {
    /// The access itself: the translation of a linear address's
    /// guest-physical address (or a guest-physical access such as DMA, when
    /// no guest-linear address is given).
    Data(AccessKind),
    /// Reading a guest paging-structure entry during a guest walk: a
    /// data read under EPT without A/D, a write under EPT with EPTP bit 6,
    /// and a user write under NPT (APM §15.25.5).
    TableRead,
    /// Setting accessed/dirty bits in a guest paging-structure entry (a
    /// write; a user write under NPT).
    TableUpdate,
}

impl Stage2Access {
    /// Whether this is an access to a guest paging structure.
    pub fn phase(self) -> Stage2Phase {
        match self {
            Stage2Access::Data(_) => Stage2Phase::Final,
            Stage2Access::TableRead | Stage2Access::TableUpdate => Stage2Phase::GuestTable,
        }
    }
}

/// When during a two-dimensional walk a stage-2 fault happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage2Phase {
    /// Translating the guest-physical address of a guest paging-structure
    /// entry (EPT qualification bit 8 clear, #NPF EXITINFO1 bit 33).
    GuestTable,
    /// Translating the final guest-physical address of the access (EPT
    /// qualification bit 8 set when the linear address is valid, #NPF
    /// EXITINFO1 bit 32).
    Final,
}

/// An EPT-violation exit qualification (SDM Vol. 3C Table 29-7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EptQualification(u64);

impl EptQualification {
    /// Bit 0: the access was a data read.
    pub const READ: EptQualification = EptQualification(1 << 0);
    /// Bit 1: the access was a data write.
    pub const WRITE: EptQualification = EptQualification(1 << 1);
    /// Bit 2: the access was an instruction fetch.
    pub const FETCH: EptQualification = EptQualification(1 << 2);
    /// Bit 3: the entries used allowed reads.
    pub const READABLE: EptQualification = EptQualification(1 << 3);
    /// Bit 4: the entries used allowed writes.
    pub const WRITABLE: EptQualification = EptQualification(1 << 4);
    /// Bit 5: the entries used allowed execution.
    pub const EXECUTABLE: EptQualification = EptQualification(1 << 5);
    /// Bit 7: the guest-linear-address field is valid.
    pub const GLA_VALID: EptQualification = EptQualification(1 << 7);
    /// Bit 8 (with bit 7): the access was to the translation of the linear
    /// address; clear for an access to a guest paging-structure entry.
    pub const LINEAR_TRANSLATION: EptQualification = EptQualification(1 << 8);
}

flag_word!(EptQualification, u64, "EPT exit qualification");

/// An #NPF error code, as stored in EXITINFO1 (APM Vol. 2 §15.25.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NpfErrorCode(u64);

impl NpfErrorCode {
    /// P: a protection or reserved-bit violation (else not present).
    pub const PRESENT: NpfErrorCode = NpfErrorCode(1 << 0);
    /// RW: a write (every guest page-table access is one, APM §15.25.5).
    pub const WRITE: NpfErrorCode = NpfErrorCode(1 << 1);
    /// US: a user access (always set: nested accesses are user accesses).
    pub const USER: NpfErrorCode = NpfErrorCode(1 << 2);
    /// RSVD: a reserved bit was set in a nested entry.
    pub const RSVD: NpfErrorCode = NpfErrorCode(1 << 3);
    /// ID: an instruction fetch.
    pub const FETCH: NpfErrorCode = NpfErrorCode(1 << 4);
    /// Bit 32: the fault happened translating the final guest-physical
    /// address.
    pub const FINAL: NpfErrorCode = NpfErrorCode(1 << 32);
    /// Bit 33: the fault happened translating a guest page-table access.
    pub const GUEST_TABLE: NpfErrorCode = NpfErrorCode(1 << 33);
}

flag_word!(NpfErrorCode, u64, "#NPF error code");

/// Why an EPT entry is a misconfiguration (SDM §29.3.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EptMisconfigReason {
    /// Bits 2:0 are 010b or 110b: writable but not readable.
    WriteWithoutRead,
    /// Bits 2:0 are 100b and execute-only translations are not supported.
    ExecuteOnly,
    /// Bit 7 maps a page at a level whose page size is not supported.
    LargePage,
    /// These reserved bits are set.
    Reserved(u64),
    /// A leaf's memory type (bits 5:3) is 2, 3 or 7.
    MemoryType(u8),
}

/// What went wrong in a stage-2 translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage2FaultKind {
    /// An EPT violation (VM exit reason 48).
    EptViolation {
        /// Its exit qualification.
        qualification: EptQualification,
    },
    /// An EPT misconfiguration (VM exit reason 49).
    EptMisconfig {
        /// Level of the offending entry (1 = PTE ... 5 = PML5E).
        level: u8,
        /// The entry's value.
        entry: u64,
        /// What is wrong with it.
        reason: EptMisconfigReason,
    },
    /// A nested page fault (#VMEXIT_NPF).
    NestedPageFault {
        /// EXITINFO1.
        error_code: NpfErrorCode,
    },
}

/// A stage-2 fault: the guest-physical address, the guest-linear address
/// when it is known, and at which point of a walk it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stage2Fault {
    /// The guest-physical address being translated (EPT: the
    /// guest-physical-address field; NPT: EXITINFO2).
    pub gpa: u64,
    /// The guest-linear address, when valid (EPT qualification bit 7).
    pub gla: Option<u64>,
    /// A guest paging-structure access or the final access.
    pub phase: Stage2Phase,
    /// Violation, misconfiguration or nested page fault.
    pub kind: Stage2FaultKind,
}

impl fmt::Display for Stage2Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Stage2FaultKind::EptViolation { qualification } => write!(
                f,
                "EPT violation at {:#x} (qualification {:#x})",
                self.gpa,
                qualification.bits()
            )?,
            Stage2FaultKind::EptMisconfig {
                level,
                entry,
                reason,
            } => write!(
                f,
                "EPT misconfiguration at {:#x}: level-{level} entry {entry:#x} ({reason:?})",
                self.gpa
            )?,
            Stage2FaultKind::NestedPageFault { error_code } => write!(
                f,
                "nested page fault at {:#x} (EXITINFO1 {:#x})",
                self.gpa,
                error_code.bits()
            )?,
        }
        let phase = match self.phase {
            Stage2Phase::GuestTable => "guest paging-structure access",
            Stage2Phase::Final => "final access",
        };
        match self.gla {
            Some(gla) => write!(f, " during the {phase} for linear address {gla:#x}"),
            None => write!(f, " during the {phase}"),
        }
    }
}

/// Why a stage-2 translation failed.
#[derive(Debug, thiserror::Error)]
pub enum Stage2Error {
    /// A violation, misconfiguration or nested page fault.
    #[error("{0}")]
    Fault(Stage2Fault),
    /// A stage-2 paging-structure entry lies outside memory.
    #[error("cannot access the level-{level} stage-2 entry at {address:#x}: {source}")]
    Memory {
        /// Level of the entry.
        level: u8,
        /// Its (host-physical) address.
        address: u64,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// Accessed/dirty updates kept losing races with another writer.
    #[error("stage-2 accessed/dirty update for {gpa:#x} lost {MAX_AD_RETRIES} races in a row")]
    Contended {
        /// The guest-physical address.
        gpa: u64,
    },
}

impl Stage2Error {
    /// The fault, if this is one.
    pub fn fault(&self) -> Option<&Stage2Fault> {
        match self {
            Stage2Error::Fault(fault) => Some(fault),
            _ => None,
        }
    }
}

/// A successful stage-2 translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stage2Translation {
    /// The host-physical address (for a nested guest: the L1-physical
    /// address).
    pub hpa: u64,
    /// Size of the stage-2 page.
    pub page_size: PageSize,
    /// Reads allowed (EPT: R in every entry; NPT: always).
    pub readable: bool,
    /// Writes allowed (EPT: W in every entry; NPT: R/W in every entry).
    pub writable: bool,
    /// Fetches allowed (EPT: X in every entry; NPT: no NX bit, or host NXE
    /// off).
    pub executable: bool,
    /// The leaf's EPT memory type (`None` for NPT).
    pub memory_type: Option<EptMemoryType>,
    /// The leaf's EPT "ignore PAT" bit (false for NPT).
    pub ignore_pat: bool,
    /// The entries used, top level first.
    pub entries: WalkEntries,
}

/// An EPT context, built from an EPTP and the processor's capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EptContext {
    root: u64,
    levels: u8,
    ad: bool,
    walk_memory_type: EptMemoryType,
    caps: EptCapabilities,
    addr_mask: u64,
    /// Bits 51:N.
    high: u64,
}

impl EptContext {
    /// EPTP bit 6: accessed and dirty flags enabled.
    pub const EPTP_AD: u64 = 1 << 6;

    /// Validates `eptp` as VM entry would (SDM §27.2.1.1): memory type UC
    /// or WB, page-walk length 4 (or 5 when supported), bit 6 only with A/D
    /// support, bits 11:7 and 63:N clear.
    pub fn new(eptp: u64, caps: &EptCapabilities) -> Result<EptContext, NestedError> {
        let m = caps.maxphyaddr;
        if !(32..=52).contains(&m) {
            return Err(NestedError::InvalidMaxPhyAddr(m));
        }
        let memory_type = (eptp & 7) as u8;
        let walk_memory_type = match memory_type {
            0 => EptMemoryType::Uncacheable,
            6 => EptMemoryType::WriteBack,
            _ => return Err(NestedError::EptpMemoryType { eptp, memory_type }),
        };
        let length = ((eptp >> 3) & 7) as u8 + 1;
        if !(length == 4 || (length == 5 && caps.five_level)) {
            return Err(NestedError::EptpWalkLength { eptp, length });
        }
        let ad = eptp & Self::EPTP_AD != 0;
        if ad && !caps.accessed_dirty {
            return Err(NestedError::EptpAccessedDirty { eptp });
        }
        let m32 = u32::from(m);
        let reserved = eptp & (bits(7, 11) | bits(m32, 63));
        if reserved != 0 {
            return Err(NestedError::EptpReserved { eptp, reserved });
        }
        let addr_mask = bits(12, m32 - 1);
        Ok(EptContext {
            root: eptp & addr_mask,
            levels: length,
            ad,
            walk_memory_type,
            caps: *caps,
            addr_mask,
            high: if m32 < 52 { bits(m32, 51) } else { 0 },
        })
    }

    /// Address of the top-level EPT table.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Number of levels (4 or 5).
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Whether accessed and dirty flags are enabled (EPTP bit 6).
    pub fn accessed_dirty(&self) -> bool {
        self.ad
    }

    /// Memory type of EPT paging-structure accesses (EPTP bits 2:0).
    pub fn walk_memory_type(&self) -> EptMemoryType {
        self.walk_memory_type
    }

    /// The capabilities the context was built with.
    pub fn capabilities(&self) -> &EptCapabilities {
        &self.caps
    }

    /// Translates `gpa` for `access`, reading the EPT tables from `memory`.
    /// `gla` is the guest-linear address the access belongs to, if any (it
    /// sets qualification bits 7 and 8).
    pub fn translate<M: GuestMemory + ?Sized>(
        &self,
        memory: &M,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        mode: WalkMode,
    ) -> Result<Stage2Translation, Stage2Error> {
        self.translate_in(&mut EntryReader::new(memory), gpa, access, gla, mode)
    }

    #[inline]
    fn translate_in<T: TableMemory<Error = WalkError>>(
        &self,
        tables: &mut T,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        mode: WalkMode,
    ) -> Result<Stage2Translation, Stage2Error> {
        for _ in 0..MAX_AD_RETRIES {
            if let Some(t) = self.walk_once(tables, gpa, access, gla, mode)? {
                return Ok(t);
            }
        }
        Err(Stage2Error::Contended { gpa })
    }

    /// One walk; `None` when an accessed/dirty update lost a race.
    #[inline]
    fn walk_once<T: TableMemory<Error = WalkError>>(
        &self,
        tables: &mut T,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        mode: WalkMode,
    ) -> Result<Option<Stage2Translation>, Stage2Error> {
        let mut entries = WalkEntries::default();
        let end = self.walk_core(tables, gpa, access, gla, &mut entries, None)?;
        let write = end.need == EPT_W;
        if mode == WalkMode::Update
            && self.ad
            && !update_ad(tables, &mut entries, EPT_A, EPT_D, write)?
        {
            return Ok(None);
        }
        Ok(Some(self.translation(end, gpa, entries)))
    }

    /// The translation of `gpa` by a walk that ended at `end` having used
    /// `entries`.
    #[inline]
    fn translation(&self, end: EptEnd, gpa: u64, entries: WalkEntries) -> Stage2Translation {
        let (page_size, hpa) = self.output(end, gpa);
        let leaf = end.leaf;
        let rights = end.rights;
        Stage2Translation {
            hpa,
            page_size,
            readable: rights & EPT_R != 0,
            writable: rights & EPT_W != 0,
            executable: rights & EPT_X != 0,
            memory_type: EptMemoryType::from_bits(((leaf >> 3) & 7) as u8),
            ignore_pat: leaf & EPT_IPAT != 0,
            entries,
        }
    }

    /// The host address of `gpa` for an access that sets no accessed/dirty
    /// flag (a [`WalkMode::Probe`] walk, or EPTP bit 6 clear), without
    /// recording entries; `memo` lets it start below upper levels read
    /// earlier in the same 2-D walk (see [`Stage2Memo`]).
    #[inline]
    fn lean_hpa<T: TableMemory<Error = WalkError>>(
        &self,
        tables: &mut T,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        memo: &mut Stage2Memo,
    ) -> Result<u64, Stage2Error> {
        let end = self.walk_core(tables, gpa, access, gla, &mut NoEntries, Some(memo))?;
        Ok(self.output(end, gpa).1)
    }

    /// Page size and host address of a walk that ended at `end`.
    #[inline]
    fn output(&self, end: EptEnd, gpa: u64) -> (PageSize, u64) {
        let page_size = match end.level {
            1 => PageSize::Size4K,
            2 => PageSize::Size2M,
            _ => PageSize::Size1G,
        };
        let base = end.leaf & self.addr_mask & !(page_size.bytes() - 1);
        (page_size, base | (gpa & (page_size.bytes() - 1)))
    }

    /// The walk itself: reads the entries (into `sink`), checks them and
    /// the rights, and sets no flag. With a non-empty `memo` the walk
    /// starts below the upper levels it shares with the walk the memo
    /// remembers (counting them in [`Stage2Memo::skipped`] and giving
    /// `sink` the remembered entries, so the list is the same as without a
    /// memo); a successful walk leaves its own path in it.
    #[inline(always)]
    fn walk_core<T: TableMemory<Error = WalkError>, S: EntrySink>(
        &self,
        tables: &mut T,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        sink: &mut S,
        memo: Option<&mut Stage2Memo>,
    ) -> Result<EptEnd, Stage2Error> {
        // What the access needs and how a violation describes it.
        let (need, mut qual) = self.need(access);
        if gla.is_some() {
            qual = qual | EptQualification::GLA_VALID;
            if access.phase() == Stage2Phase::Final {
                qual = qual | EptQualification::LINEAR_TRANSLATION;
            }
        }
        let fault = |kind| {
            Stage2Error::Fault(Stage2Fault {
                gpa,
                gla,
                phase: access.phase(),
                kind,
            })
        };
        let violation = |rights: u64| {
            fault(Stage2FaultKind::EptViolation {
                qualification: qual | EptQualification::from_bits((rights & 7) << 3),
            })
        };
        let width = 12 + 9 * u32::from(self.levels);
        if gpa >> width != 0 {
            return Err(violation(0));
        }

        let mut level = self.levels;
        let mut table = self.root;
        let mut rights = EPT_R | EPT_W | EPT_X;
        let mut memo = memo;
        if let Some(m) = memo.as_deref_mut() {
            let start = m.start(gpa, self.levels);
            if start < level {
                // The entries above `start` are the ones the memo holds:
                // same entry addresses (same index bits), values read in
                // this 2-D walk with no write since.
                for up in (start + 1..=self.levels).rev() {
                    let slot = usize::from(up & 7);
                    let shift = 12 + 9 * (u32::from(up) - 1);
                    sink.push(WalkEntry {
                        level: up,
                        gpa: m.table[slot] + ((gpa >> shift) & 0x1ff) * 8,
                        value: m.entry[slot],
                    });
                }
                let slot = usize::from(start & 7);
                table = m.table[slot];
                rights = m.rights[slot];
                level = start;
            }
            // Filled again below; empty until this walk succeeds.
            m.leaf = 0;
        }
        let start = level;
        let mut leaf;
        let mut large;
        loop {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let at = table + ((gpa >> shift) & 0x1ff) * 8;
            leaf = tables
                .read(true, level, at)
                .map_err(|e| stage2_memory(e, level, at))?;
            sink.push(WalkEntry {
                level,
                gpa: at,
                value: leaf,
            });
            if let Some(m) = memo.as_deref_mut() {
                let slot = usize::from(level & 7);
                m.table[slot] = table;
                m.rights[slot] = rights;
                m.entry[slot] = leaf;
            }
            rights &= leaf;
            if leaf & 7 == 0 {
                return Err(violation(rights));
            }
            large = self.check_entry(level, leaf).map_err(|reason| {
                fault(Stage2FaultKind::EptMisconfig {
                    level,
                    entry: leaf,
                    reason,
                })
            })?;
            if level == 1 || large {
                break;
            }
            table = leaf & self.addr_mask;
            level -= 1;
        }
        if rights & need == 0 {
            return Err(violation(rights));
        }

        if let Some(m) = memo {
            m.skipped = m.skipped.saturating_add(u32::from(self.levels - start));
            m.leaf = level;
            m.gpa = gpa;
        }
        Ok(EptEnd {
            level,
            leaf,
            rights,
            need,
        })
    }
}

impl EptContext {
    /// Checks the present entry `leaf` of `level` for misconfigurations
    /// (SDM §29.3.3.1); `Ok(true)` when it maps a large page, `Ok(false)`
    /// when it is a leaf at level 1 or points to a table.
    #[inline(always)]
    fn check_entry(&self, level: u8, leaf: u64) -> Result<bool, EptMisconfigReason> {
        if leaf & (EPT_R | EPT_W) == EPT_W {
            return Err(EptMisconfigReason::WriteWithoutRead);
        }
        if leaf & 7 == EPT_X && !self.caps.execute_only {
            return Err(EptMisconfigReason::ExecuteOnly);
        }
        let large = (level == 2 || level == 3) && leaf & PS != 0;
        if large
            && !(if level == 3 {
                self.caps.pages_1g
            } else {
                self.caps.pages_2m
            })
        {
            return Err(EptMisconfigReason::LargePage);
        }
        let reserved = self.high
            | match (level, large) {
                (1, _) => 0,
                (3, true) => bits(12, 29),
                (2, true) => bits(12, 20),
                _ => bits(3, 7),
            };
        if leaf & reserved != 0 {
            return Err(EptMisconfigReason::Reserved(leaf & reserved));
        }
        if level == 1 || large {
            let memory_type = ((leaf >> 3) & 7) as u8;
            if EptMemoryType::from_bits(memory_type).is_none() {
                return Err(EptMisconfigReason::MemoryType(memory_type));
            }
        }
        Ok(large)
    }

    /// The right a stage-2 access needs (one of R, W, X) and how a
    /// violation describes it, before the rights bits.
    #[inline(always)]
    fn need(&self, access: Stage2Access) -> (u64, EptQualification) {
        let table_write = self.ad && access.phase() == Stage2Phase::GuestTable;
        match access {
            Stage2Access::Data(AccessKind::Read) => (EPT_R, EptQualification::READ),
            Stage2Access::Data(AccessKind::Write) => (EPT_W, EptQualification::WRITE),
            Stage2Access::Data(AccessKind::Fetch) => (EPT_X, EptQualification::FETCH),
            _ if table_write => (EPT_W, EptQualification::READ | EptQualification::WRITE),
            Stage2Access::TableRead => (EPT_R, EptQualification::READ),
            Stage2Access::TableUpdate => (EPT_W, EptQualification::WRITE),
        }
    }

    /// The host address of `gpa` for an access needing `need`, on the fast
    /// path of a 2-D walk: the checks of [`EptContext::walk_core`] (same
    /// entries, same [`EptContext::check_entry`], same rights), starting
    /// below the levels `memo` shares with `gpa`, but with no fault
    /// details: `None` for anything but a successful translation (the
    /// general path then walks again and reports the fault). Adds the
    /// architectural reference count of the walk to `reads`.
    #[inline(always)]
    fn fast_hpa<M: GuestMemory + ?Sized>(
        &self,
        reader: &mut EntryReader<'_, M>,
        gpa: u64,
        need: u64,
        memo: &mut Stage2Memo,
        reads: &mut u32,
    ) -> Option<u64> {
        if gpa >> (12 + 9 * u32::from(self.levels)) != 0 {
            return None;
        }
        let mut level = memo.start(gpa, self.levels);
        let (mut table, mut rights) = if level < self.levels {
            let slot = usize::from(level & 7);
            (memo.table[slot], memo.rights[slot])
        } else {
            (self.root, EPT_R | EPT_W | EPT_X)
        };
        memo.leaf = 0;
        let mut leaf;
        loop {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let at = table + ((gpa >> shift) & 0x1ff) * 8;
            leaf = reader.read(true, level, at).ok()?;
            let slot = usize::from(level & 7);
            memo.table[slot] = table;
            memo.rights[slot] = rights;
            memo.entry[slot] = leaf;
            rights &= leaf;
            if leaf & 7 == 0 {
                return None;
            }
            let large = self.check_entry(level, leaf).ok()?;
            if level == 1 || large {
                break;
            }
            table = leaf & self.addr_mask;
            level -= 1;
        }
        if rights & need == 0 {
            return None;
        }
        memo.leaf = level;
        memo.gpa = gpa;
        *reads = reads.saturating_add(u32::from(self.levels - level) + 1);
        let size = match level {
            1 => PageSize::Size4K,
            2 => PageSize::Size2M,
            _ => PageSize::Size1G,
        }
        .bytes();
        Some((leaf & self.addr_mask & !(size - 1)) | (gpa & (size - 1)))
    }
}

/// Where an EPT walk records the entries it reads.
trait EntrySink {
    fn push(&mut self, entry: WalkEntry);
}

impl EntrySink for WalkEntries {
    #[inline]
    fn push(&mut self, entry: WalkEntry) {
        WalkEntries::push(self, entry);
    }
}

/// Records nothing: for walks whose entries nobody looks at.
struct NoEntries;

impl EntrySink for NoEntries {
    #[inline]
    fn push(&mut self, _: WalkEntry) {}
}

/// Where an EPT walk ended, without its entries.
#[derive(Clone, Copy)]
struct EptEnd {
    /// Level of the leaf.
    level: u8,
    /// The leaf entry.
    leaf: u64,
    /// R/W/X ANDed over the entries.
    rights: u64,
    /// The right the access needed.
    need: u64,
}

/// Sets the accessed flag `a` in every entry and the dirty flag `d` in the
/// leaf if `write`; `false` if an entry changed under us.
fn update_ad<T: TableMemory<Error = WalkError>>(
    tables: &mut T,
    entries: &mut WalkEntries,
    a: u64,
    d: u64,
    write: bool,
) -> Result<bool, Stage2Error> {
    let count = entries.len();
    for i in 0..count {
        let Some(&entry) = entries.get(i) else {
            break;
        };
        let mut new = entry.value | a;
        if write && i + 1 == count {
            new |= d;
        }
        if new == entry.value {
            continue;
        }
        let swapped = tables
            .compare_exchange(true, entry.level, entry.gpa, entry.value, new)
            .map_err(|e| stage2_memory(e, entry.level, entry.gpa))?;
        if !swapped {
            return Ok(false);
        }
        // A self-referencing table can use one entry at several levels.
        entries.update_from(i, entry.gpa, new);
    }
    Ok(true)
}

fn stage2_memory(e: WalkError, level: u8, address: u64) -> Stage2Error {
    match e {
        WalkError::Memory { level, gpa, source } => Stage2Error::Memory {
            level,
            address: gpa,
            source,
        },
        _ => Stage2Error::Memory {
            level,
            address,
            source: GuestMemoryError::InvalidGuestAddress(GuestAddress(address)),
        },
    }
}

/// The host's paging settings that govern nested page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NptHost {
    /// Host EFER.NXE: bit 63 of nested entries is the NX bit (else it is
    /// reserved).
    pub nxe: bool,
    /// 1 GiB pages (CPUID Fn8000_0001 EDX bit 26).
    pub gbpages: bool,
    /// Host MAXPHYADDR, 32..=52.
    pub maxphyaddr: u8,
    /// Host CR4.LA57: 5-level nested tables.
    pub five_level: bool,
}

impl Default for NptHost {
    /// NXE on, 1 GiB pages, MAXPHYADDR 48, 4-level tables.
    fn default() -> Self {
        NptHost {
            nxe: true,
            gbpages: true,
            maxphyaddr: 48,
            five_level: false,
        }
    }
}

/// An AMD nested-paging context: nCR3 and the host's paging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NptContext {
    ctx: PagingContext,
    width: u32,
    host: NptHost,
}

impl NptContext {
    /// A context for the nested tables at `ncr3` (bits 11:0 are PWT/PCD and
    /// ignored; bits at or above MAXPHYADDR are refused).
    pub fn new(ncr3: u64, host: &NptHost) -> Result<NptContext, NestedError> {
        if !(32..=52).contains(&host.maxphyaddr) {
            return Err(NestedError::InvalidMaxPhyAddr(host.maxphyaddr));
        }
        let mut regs = ControlRegs {
            cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG | ControlRegs::CR0_WP,
            cr3: ncr3,
            cr4: ControlRegs::CR4_PAE,
            efer: ControlRegs::EFER_LME | ControlRegs::EFER_LMA,
            ..ControlRegs::default()
        };
        if host.five_level {
            regs.cr4 |= ControlRegs::CR4_LA57;
        }
        if host.nxe {
            regs.efer |= ControlRegs::EFER_NXE;
        }
        let features = CpuFeatures {
            maxphyaddr: host.maxphyaddr,
            gbpages: host.gbpages,
            pse36: true,
            vendor: Vendor::Amd,
        };
        Ok(NptContext {
            ctx: PagingContext::new(&regs, &features)?,
            width: if host.five_level { 57 } else { 48 },
            host: *host,
        })
    }

    /// Address of the top-level nested table.
    pub fn root(&self) -> u64 {
        self.ctx.root()
    }

    /// The host settings the context was built with.
    pub fn host(&self) -> &NptHost {
        &self.host
    }

    /// Translates `gpa` for `access` (always as a user access; guest
    /// page-table accesses, [`Stage2Access::TableRead`] included, as user
    /// writes), reading the nested tables from `memory`.
    pub fn translate<M: GuestMemory + ?Sized>(
        &self,
        memory: &M,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        mode: WalkMode,
    ) -> Result<Stage2Translation, Stage2Error> {
        self.translate_in(&mut EntryReader::new(memory), gpa, access, gla, mode)
    }

    fn translate_in<T: TableMemory<Error = WalkError>>(
        &self,
        tables: &mut T,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        mode: WalkMode,
    ) -> Result<Stage2Translation, Stage2Error> {
        // APM §15.25.5: every guest page-table access, read or A/D update,
        // is a user write at the nested level; the final access keeps its
        // kind.
        let kind = match access {
            Stage2Access::Data(kind) => kind,
            Stage2Access::TableRead | Stage2Access::TableUpdate => AccessKind::Write,
        };
        let phase_bit = match access.phase() {
            Stage2Phase::Final => NpfErrorCode::FINAL,
            Stage2Phase::GuestTable => NpfErrorCode::GUEST_TABLE,
        };
        let fault = |code: PfErrorCode| {
            Stage2Error::Fault(Stage2Fault {
                gpa,
                gla,
                phase: access.phase(),
                kind: Stage2FaultKind::NestedPageFault {
                    error_code: NpfErrorCode(u64::from(code.bits())) | phase_bit,
                },
            })
        };
        let user_access = Access::new(kind, Privilege::User);
        if gpa >> self.width != 0 {
            let mut code = PfErrorCode::USER;
            if kind == AccessKind::Write {
                code |= PfErrorCode::WRITE;
            }
            if kind == AccessKind::Fetch && self.host.nxe {
                code |= PfErrorCode::FETCH;
            }
            return Err(fault(code));
        }
        let mut entries = WalkEntries::default();
        for _ in 0..MAX_AD_RETRIES {
            match walk_once(&self.ctx, tables, gpa, user_access, mode, &mut entries) {
                Ok(Step::Done(t)) => return Ok(npt_translation(t, entries)),
                Ok(Step::Retry) => {}
                Err(WalkError::PageFault { error_code, .. }) => return Err(fault(error_code)),
                Err(e) => return Err(stage2_memory(e, 0, gpa)),
            }
        }
        Err(Stage2Error::Contended { gpa })
    }
}

fn npt_translation(t: Outcome, entries: WalkEntries) -> Stage2Translation {
    Stage2Translation {
        hpa: t.gpa,
        page_size: t.page_size(),
        readable: true,
        writable: t.writable(),
        executable: t.executable(),
        memory_type: None,
        ignore_pat: false,
        entries,
    }
}

/// A stage-2 context: EPT or NPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage2Context {
    /// Intel EPT.
    Ept(EptContext),
    /// AMD nested paging.
    Npt(NptContext),
}

impl From<EptContext> for Stage2Context {
    fn from(ctx: EptContext) -> Self {
        Stage2Context::Ept(ctx)
    }
}

impl From<NptContext> for Stage2Context {
    fn from(ctx: NptContext) -> Self {
        Stage2Context::Npt(ctx)
    }
}

impl Stage2Context {
    /// Translates `gpa` for `access` through stage 2 (see
    /// [`EptContext::translate`] and [`NptContext::translate`]).
    pub fn translate<M: GuestMemory + ?Sized>(
        &self,
        memory: &M,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        mode: WalkMode,
    ) -> Result<Stage2Translation, Stage2Error> {
        self.translate_in(&mut EntryReader::new(memory), gpa, access, gla, mode)
    }

    #[inline]
    pub(crate) fn translate_in<T: TableMemory<Error = WalkError>>(
        &self,
        tables: &mut T,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
        mode: WalkMode,
    ) -> Result<Stage2Translation, Stage2Error> {
        match self {
            Stage2Context::Ept(ctx) => ctx.translate_in(tables, gpa, access, gla, mode),
            Stage2Context::Npt(ctx) => ctx.translate_in(tables, gpa, access, gla, mode),
        }
    }

    /// Reads the four PAE PDPTEs for guest `cr3` through stage 2, as a
    /// guest `MOV CR3` in PAE paging would (a stage-2 fault there has no
    /// valid guest-linear address).
    pub fn load_pdptrs<M: GuestMemory + ?Sized>(
        &self,
        memory: &M,
        cr3: u64,
        mode: WalkMode,
    ) -> Result<[u64; 4], NestedWalkError> {
        let base = cr3 & bits(5, 31);
        let mut out = [0u64; 4];
        let mut reader = EntryReader::new(memory);
        for (i, slot) in out.iter_mut().enumerate() {
            let gpa = base + 8 * i as u64;
            let t = self
                .translate_in(&mut reader, gpa, Stage2Access::TableRead, None, mode)
                .map_err(NestedWalkError::from_stage2)?;
            *slot = reader
                .read(true, 3, t.hpa)
                .map_err(|e| stage1_memory(e, 3, t.hpa))?;
        }
        Ok(out)
    }
}

/// Memory references of a two-dimensional walk, by stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NestedStats {
    /// Guest paging-structure entries read.
    pub stage1_reads: u32,
    /// Guest entries written (accessed/dirty updates, including lost
    /// races).
    pub stage1_writes: u32,
    /// Stage-2 entries read (for the guest's entries and the final address).
    pub stage2_reads: u32,
    /// Stage-2 entries written (accessed/dirty updates).
    pub stage2_writes: u32,
}

impl NestedStats {
    /// All memory references (saturating).
    pub fn references(&self) -> u32 {
        self.stage1_reads
            .saturating_add(self.stage1_writes)
            .saturating_add(self.stage2_reads)
            .saturating_add(self.stage2_writes)
    }
}

/// A successful two-dimensional translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NestedTranslation {
    /// The host-physical address.
    pub hpa: u64,
    /// The guest's translation (guest-physical address, rights, entries at
    /// guest-physical addresses).
    pub stage1: Translation,
    /// The stage-2 translation of the final guest-physical address.
    pub stage2: Stage2Translation,
    /// The memory references made.
    pub stats: NestedStats,
}

impl NestedTranslation {
    /// Bytes of the largest aligned region around the address that both
    /// stages map contiguously (the smaller of the two page sizes).
    pub fn page_bytes(&self) -> u64 {
        self.stage1
            .page_size
            .bytes()
            .min(self.stage2.page_size.bytes())
    }
}

/// Why a two-dimensional walk did not produce a translation.
#[derive(Debug, thiserror::Error)]
pub enum NestedWalkError {
    /// Stage 1: the guest takes a page fault, exactly as in the 1-D walk.
    #[error("stage-1 page fault at {address:#x}, error code {error_code}")]
    PageFault {
        /// The #PF error code.
        error_code: PfErrorCode,
        /// The faulting linear address (CR2).
        address: u64,
    },
    /// Stage 1: the linear address is not canonical.
    #[error("linear address {address:#x} is not canonical")]
    NonCanonical {
        /// The linear address.
        address: u64,
    },
    /// Stage 2: a VM exit (EPT violation or misconfiguration, #NPF).
    #[error("stage 2: {0}")]
    Stage2(Stage2Fault),
    /// An entry of either stage lies outside host memory.
    #[error("cannot access the stage-{stage} level-{level} entry at host address {address:#x}: {source}")]
    Memory {
        /// 1 for a guest entry, 2 for a stage-2 entry.
        stage: u8,
        /// Level of the entry.
        level: u8,
        /// Its host-physical address.
        address: u64,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// Accessed/dirty updates kept losing races with another writer.
    #[error("accessed/dirty update for {address:#x} lost {MAX_AD_RETRIES} races in a row")]
    Contended {
        /// The linear (stage 1) or guest-physical (stage 2) address.
        address: u64,
    },
}

impl NestedWalkError {
    pub(crate) fn from_stage2(e: Stage2Error) -> NestedWalkError {
        match e {
            Stage2Error::Fault(fault) => NestedWalkError::Stage2(fault),
            Stage2Error::Memory {
                level,
                address,
                source,
            } => NestedWalkError::Memory {
                stage: 2,
                level,
                address,
                source,
            },
            Stage2Error::Contended { gpa } => NestedWalkError::Contended { address: gpa },
        }
    }

    /// The guest #PF error code, if this is a stage-1 page fault.
    pub fn pf_error_code(&self) -> Option<PfErrorCode> {
        match self {
            NestedWalkError::PageFault { error_code, .. } => Some(*error_code),
            _ => None,
        }
    }

    /// The stage-2 fault, if this is one.
    pub fn stage2_fault(&self) -> Option<&Stage2Fault> {
        match self {
            NestedWalkError::Stage2(fault) => Some(fault),
            _ => None,
        }
    }
}

impl From<WalkError> for NestedWalkError {
    fn from(e: WalkError) -> Self {
        match e {
            WalkError::PageFault {
                error_code,
                address,
            } => NestedWalkError::PageFault {
                error_code,
                address,
            },
            WalkError::NonCanonical { address } => NestedWalkError::NonCanonical { address },
            WalkError::Memory { level, gpa, source } => NestedWalkError::Memory {
                stage: 1,
                level,
                address: gpa,
                source,
            },
            WalkError::Contended { address } => NestedWalkError::Contended { address },
        }
    }
}

pub(crate) fn stage1_memory(e: WalkError, level: u8, address: u64) -> NestedWalkError {
    match e {
        WalkError::Memory { source, .. } => NestedWalkError::Memory {
            stage: 1,
            level,
            address,
            source,
        },
        other => NestedWalkError::from(other),
    }
}

/// Counts the entries a stage-2 walk reads and writes.
pub(crate) struct Counting<'r, T> {
    pub(crate) inner: &'r mut T,
    pub(crate) reads: u32,
    pub(crate) writes: u32,
}

impl<T: TableMemory> TableMemory for Counting<'_, T> {
    type Error = T::Error;

    #[inline]
    fn read(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, T::Error> {
        self.reads = self.reads.saturating_add(1);
        self.inner.read(wide, level, gpa)
    }

    #[inline]
    fn compare_exchange(
        &mut self,
        wide: bool,
        level: u8,
        gpa: u64,
        old: u64,
        new: u64,
    ) -> Result<bool, T::Error> {
        self.writes = self.writes.saturating_add(1);
        self.inner.compare_exchange(wide, level, gpa, old, new)
    }
}

/// The path of the last successful EPT walk of one 2-D walk.
///
/// A 2-D walk makes up to six stage-2 walks (one per guest entry and one
/// for the final address), and guest tables usually sit close together, so
/// consecutive stage-2 walks share their upper entries (EPT PML4E, PDPTE,
/// often PDE). The memo keeps, for every level of the last walk, the table
/// it read there, the entry it read and the rights of the entries above;
/// a walk whose address has the same index bits above some level starts
/// at that level (the lowest such level not below the remembered leaf).
/// Like a processor's paging-structure caches it holds values read earlier
/// in the same 2-D walk; unlike them it is dropped whenever the walk writes
/// anything (an accessed/dirty update of either stage, or a lost race), so
/// it never answers differently from reading the entries again, except for
/// concurrent writers racing the walk (which the walk cannot tell from a
/// write that came a moment later). Statistics count the remembered levels
/// as read ([`Stage2Memo::skipped`]): they report the architectural
/// references, 24 for 4-level over 4-level.
#[derive(Debug, Clone, Copy, Default)]
struct Stage2Memo {
    /// Guest-physical address of the walk remembered.
    gpa: u64,
    /// Level of its leaf; 0 when empty.
    leaf: u8,
    /// Per level (indexed by the level, 1 to 5): the table read there.
    table: [u64; 8],
    /// Per level: the entry read there.
    entry: [u64; 8],
    /// Per level: R/W/X ANDed over the entries above it.
    rights: [u64; 8],
    /// Entry reads spared since last taken by the caller.
    skipped: u32,
}

impl Stage2Memo {
    #[inline]
    fn clear(&mut self) {
        self.leaf = 0;
    }

    /// The level a walk of `gpa` through `levels`-level tables starts at:
    /// `levels` (nothing shared) or a level at or below which the memo
    /// holds the table, the entries above it being shared.
    #[inline]
    fn start(&self, gpa: u64, levels: u8) -> u8 {
        if self.leaf == 0 {
            return levels;
        }
        let diff = gpa ^ self.gpa;
        let mut level = self.leaf;
        while level < levels && diff >> (12 + 9 * u32::from(level)) != 0 {
            level += 1;
        }
        level
    }
}

/// The guest's paging structures as seen through stage 2: every entry
/// address is translated (a stage-2 walk) before host memory is accessed.
struct NestedTables<'a, M: GuestMemory + ?Sized> {
    stage2: &'a Stage2Context,
    memory: &'a M,
    reader: EntryReader<'a, M>,
    gla: u64,
    mode: WalkMode,
    stats: &'a mut NestedStats,
    memo: Stage2Memo,
}

impl<M: GuestMemory + ?Sized> NestedTables<'_, M> {
    #[inline]
    fn stage2(
        &mut self,
        gpa: u64,
        access: Stage2Access,
        gla: Option<u64>,
    ) -> Result<Stage2Translation, NestedWalkError> {
        let mut counting = Counting {
            inner: &mut self.reader,
            reads: 0,
            writes: 0,
        };
        let result = self
            .stage2
            .translate_in(&mut counting, gpa, access, gla, self.mode);
        self.stats.stage2_reads = self.stats.stage2_reads.saturating_add(counting.reads);
        self.stats.stage2_writes = self.stats.stage2_writes.saturating_add(counting.writes);
        if counting.writes != 0 {
            // Our own write may have changed an entry the memo holds.
            self.memo.clear();
        }
        result.map_err(NestedWalkError::from_stage2)
    }
}

impl<M: GuestMemory + ?Sized> NestedTables<'_, M> {
    /// The host address of the guest paging-structure entry at `gpa`: the
    /// lean, memoized EPT walk when stage 2 sets no flag, else a full
    /// stage-2 walk. NPT always takes the full walk (never the memo), so a
    /// guest-table access is checked as the user write it is every time.
    #[inline]
    fn table(&mut self, gpa: u64, access: Stage2Access) -> Result<u64, NestedWalkError> {
        let gla = Some(self.gla);
        match self.stage2 {
            Stage2Context::Ept(ept) if !(self.mode == WalkMode::Update && ept.ad) => {
                let mut counting = Counting {
                    inner: &mut self.reader,
                    reads: 0,
                    writes: 0,
                };
                let result = ept.lean_hpa(&mut counting, gpa, access, gla, &mut self.memo);
                // The architecture reads every level; the memo only spared
                // reading again what this walk read moments ago.
                let reads = counting.reads.saturating_add(self.memo.skipped);
                self.memo.skipped = 0;
                self.stats.stage2_reads = self.stats.stage2_reads.saturating_add(reads);
                result.map_err(NestedWalkError::from_stage2)
            }
            _ => self.stage2(gpa, access, gla).map(|t| t.hpa),
        }
    }
}

impl<M: GuestMemory + ?Sized> TableMemory for NestedTables<'_, M> {
    type Error = NestedWalkError;

    fn read(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, NestedWalkError> {
        let hpa = self.table(gpa, Stage2Access::TableRead)?;
        self.stats.stage1_reads = self.stats.stage1_reads.saturating_add(1);
        self.reader
            .read(wide, level, hpa)
            .map_err(|e| stage1_memory(e, level, hpa))
    }

    fn compare_exchange(
        &mut self,
        wide: bool,
        level: u8,
        gpa: u64,
        old: u64,
        new: u64,
    ) -> Result<bool, NestedWalkError> {
        let hpa = self.table(gpa, Stage2Access::TableUpdate)?;
        self.stats.stage1_writes = self.stats.stage1_writes.saturating_add(1);
        // A guest table may share a page with stage-2 tables.
        self.memo.clear();
        compare_exchange(self.memory, wide, level, hpa, old, new)
            .map_err(|e| stage1_memory(e, level, hpa))
    }
}

/// Translates guest-virtual `gva` for `access` in two dimensions: the guest
/// walk of `guest` with every paging-structure access translated through
/// `stage2`, then the final guest-physical address through `stage2`.
///
/// Stage-1 faults are reported exactly as [`walk`](super::walk()) reports
/// them; stage-2 faults say whether they hit a guest paging-structure
/// access or the final access. With [`WalkMode::Update`] both stages set
/// accessed/dirty bits (guest A/D updates are stage-2 writes; under NPT
/// every guest paging-structure access is a user write, so the nested
/// leaves of guest table pages get their D bit too).
#[inline]
pub fn walk_2d<M: GuestMemory + ?Sized>(
    guest: &PagingContext,
    stage2: &Stage2Context,
    memory: &M,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> Result<NestedTranslation, NestedWalkError> {
    let mut stats = NestedStats::default();
    walk_2d_counted(guest, stage2, memory, gva, access, mode, &mut stats)
}

/// [`walk_2d`], adding the memory references it makes to `stats` whether or
/// not it succeeds.
#[inline]
pub fn walk_2d_counted<M: GuestMemory + ?Sized>(
    guest: &PagingContext,
    stage2: &Stage2Context,
    memory: &M,
    gva: u64,
    access: Access,
    mode: WalkMode,
    stats: &mut NestedStats,
) -> Result<NestedTranslation, NestedWalkError> {
    let gla = if guest.mode().is_long() {
        gva
    } else {
        gva & 0xffff_ffff
    };
    if let Stage2Context::Ept(ept) = stage2 {
        if !(mode == WalkMode::Update && ept.ad) {
            if let Some(mut t) = walk_2d_lean(guest, ept, memory, gva, gla, access, mode) {
                stats.stage1_reads = stats.stage1_reads.saturating_add(t.stats.stage1_reads);
                stats.stage2_reads = stats.stage2_reads.saturating_add(t.stats.stage2_reads);
                t.stats = *stats;
                return Ok(t);
            }
        }
    }
    walk_2d_general(guest, stage2, memory, gva, gla, access, mode, stats)
}

/// The general path of [`walk_2d_counted`]: any stage 2, any mode, full
/// fault reports.
#[allow(clippy::too_many_arguments)]
fn walk_2d_general<M: GuestMemory + ?Sized>(
    guest: &PagingContext,
    stage2: &Stage2Context,
    memory: &M,
    gva: u64,
    gla: u64,
    access: Access,
    mode: WalkMode,
    stats: &mut NestedStats,
) -> Result<NestedTranslation, NestedWalkError> {
    let mut tables = NestedTables {
        stage2,
        memory,
        reader: EntryReader::new(memory),
        gla,
        mode,
        stats,
        memo: Stage2Memo::default(),
    };
    let stage1 = walk_tables(guest, &mut tables, gva, access, mode)?;
    let stage2_t = tables.stage2(stage1.gpa, Stage2Access::Data(access.kind), Some(gla))?;
    Ok(NestedTranslation {
        hpa: stage2_t.hpa,
        stage1,
        stage2: stage2_t,
        stats: *tables.stats,
    })
}

/// The fast path of a 2-D walk gave up: the general path decides (and
/// reports any fault with all its details).
pub(crate) struct Slow;

impl From<WalkError> for Slow {
    #[inline]
    fn from(_: WalkError) -> Slow {
        Slow
    }
}

/// The guest's paging structures behind an EPT stage 2 that sets no flag,
/// for the fast path of a 2-D walk: entry addresses go through the lean,
/// memoized EPT walk, and anything but a plain read (a fault, a memory
/// error, a guest accessed/dirty update) gives up with [`Slow`], so the
/// path makes no write and can be abandoned at any point.
struct LeanTables<'a, M: GuestMemory + ?Sized> {
    ept: &'a EptContext,
    reader: EntryReader<'a, M>,
    /// The right a guest-table read needs.
    need: u64,
    memo: Stage2Memo,
    /// References made (the statistics of the walk if it succeeds).
    stats: NestedStats,
}

impl<M: GuestMemory + ?Sized> TableMemory for LeanTables<'_, M> {
    type Error = Slow;

    #[inline(always)]
    fn read(&mut self, wide: bool, level: u8, gpa: u64) -> Result<u64, Slow> {
        let hpa = self
            .ept
            .fast_hpa(
                &mut self.reader,
                gpa,
                self.need,
                &mut self.memo,
                &mut self.stats.stage2_reads,
            )
            .ok_or(Slow)?;
        self.stats.stage1_reads = self.stats.stage1_reads.saturating_add(1);
        self.reader.read(wide, level, hpa).map_err(|_| Slow)
    }

    #[inline]
    fn compare_exchange(&mut self, _: bool, _: u8, _: u64, _: u64, _: u64) -> Result<bool, Slow> {
        Err(Slow)
    }
}

/// The 2-D walk over an EPT stage 2 that sets no flag ([`WalkMode::Probe`]
/// or EPTP bit 6 clear) when it succeeds without writing guest memory:
/// the same translation and statistics as the general path, from the
/// same checks ([`walk_tables`] for stage 1; [`EptContext::check_entry`]
/// through [`EptContext::fast_hpa`] for the guest-table reads and
/// [`EptContext::walk_core`] for the final address, whose entries the
/// result lists), with every stage-2 walk after the first starting below
/// the levels it shares with the previous one ([`Stage2Memo`]). Its
/// errors carry nothing ([`Slow`]), so the hot loop moves no large error
/// values around. `None` when the general path must run (nothing was
/// written; a fault is found again and reported there). The statistics
/// are this walk's alone.
#[inline]
fn walk_2d_lean<M: GuestMemory + ?Sized>(
    guest: &PagingContext,
    ept: &EptContext,
    memory: &M,
    gva: u64,
    gla: u64,
    access: Access,
    mode: WalkMode,
) -> Option<NestedTranslation> {
    let mut tables = LeanTables {
        ept,
        reader: EntryReader::new(memory),
        need: ept.need(Stage2Access::TableRead).0,
        memo: Stage2Memo::default(),
        stats: NestedStats::default(),
    };
    let stage1 = walk_tables(guest, &mut tables, gva, access, mode).ok()?;
    let mut entries = WalkEntries::default();
    let mut counting = Counting {
        inner: &mut tables.reader,
        reads: 0,
        writes: 0,
    };
    let end = ept
        .walk_core(
            &mut counting,
            stage1.gpa,
            Stage2Access::Data(access.kind),
            Some(gla),
            &mut entries,
            Some(&mut tables.memo),
        )
        .ok()?;
    let reads = counting.reads.saturating_add(tables.memo.skipped);
    let mut stats = tables.stats;
    stats.stage2_reads = stats.stage2_reads.saturating_add(reads);
    let stage2 = ept.translation(end, stage1.gpa, entries);
    Some(NestedTranslation {
        hpa: stage2.hpa,
        stage1,
        stage2,
        stats,
    })
}

/// Rights and memory type of an EPT leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptFlags {
    /// Bit 0: reads allowed.
    pub read: bool,
    /// Bit 1: writes allowed (needs `read`).
    pub write: bool,
    /// Bit 2: instruction fetches allowed.
    pub execute: bool,
    /// Bits 5:3.
    pub memory_type: EptMemoryType,
    /// Bit 6: ignore the guest PAT.
    pub ignore_pat: bool,
}

impl Default for EptFlags {
    /// Read, write and execute; write-back; PAT honoured.
    fn default() -> Self {
        EptFlags {
            read: true,
            write: true,
            execute: true,
            memory_type: EptMemoryType::WriteBack,
            ignore_pat: false,
        }
    }
}

/// Rights of an NPT leaf (always present and user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NptFlags {
    /// R/W = 1.
    pub writable: bool,
    /// NX = 0 (needs host EFER.NXE to be cleared, else NX is reserved).
    pub executable: bool,
}

impl Default for NptFlags {
    /// Writable and executable.
    fn default() -> Self {
        NptFlags {
            writable: true,
            executable: true,
        }
    }
}

/// Errors from [`EptBuilder`] and [`NptBuilder`].
#[derive(Debug, thiserror::Error)]
pub enum Stage2BuildError {
    /// Stage 2 maps 4 KiB, 2 MiB and 1 GiB pages only.
    #[error("stage-2 tables have no {0:?} pages")]
    UnsupportedPageSize(PageSize),
    /// An address is not aligned to the page size.
    #[error("cannot map {gpa:#x} -> {hpa:#x} with {size:?} pages: not aligned")]
    Misaligned {
        /// Guest-physical address.
        gpa: u64,
        /// Host-physical address.
        hpa: u64,
        /// Page size.
        size: PageSize,
    },
    /// The guest-physical address is beyond the tables' reach, or the
    /// host-physical address beyond 52 bits.
    #[error("cannot map {gpa:#x} -> {hpa:#x}: address out of range")]
    OutOfRange {
        /// Guest-physical address.
        gpa: u64,
        /// Host-physical address.
        hpa: u64,
    },
    /// EPT rights that do not make a valid present entry (none, or write
    /// without read).
    #[error("EPT rights {0:?} are not present or write without read")]
    InvalidRights(EptFlags),
    /// Table allocation, overlap, missing mapping or memory errors (`gva`
    /// there is the guest-physical address).
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Common checks of the stage-2 builders.
fn check_stage2(levels: u8, gpa: u64, hpa: u64, size: PageSize) -> Result<(), Stage2BuildError> {
    if size == PageSize::Size4M {
        return Err(Stage2BuildError::UnsupportedPageSize(size));
    }
    if gpa % size.bytes() != 0 || hpa % size.bytes() != 0 {
        return Err(Stage2BuildError::Misaligned { gpa, hpa, size });
    }
    if gpa >> (12 + 9 * u32::from(levels)) != 0 || hpa >> 52 != 0 {
        return Err(Stage2BuildError::OutOfRange { gpa, hpa });
    }
    Ok(())
}

fn levels_format(five_level: bool) -> (u8, TableFormat) {
    if five_level {
        (5, TableFormat::Level5)
    } else {
        (4, TableFormat::Level4)
    }
}

/// Builds EPT tables (4- or 5-level) in memory, with tables taken from a
/// caller-given area. Non-leaf entries are created with R, W and X, so the
/// leaf alone decides a page's rights.
#[derive(Debug)]
pub struct EptBuilder<'m, M: GuestMemory + ?Sized> {
    tables: PageTableBuilder<'m, M>,
    levels: u8,
}

impl<'m, M: GuestMemory + ?Sized> EptBuilder<'m, M> {
    /// Starts empty tables in `area..area + len` (4 KiB aligned); the root
    /// is allocated at once.
    pub fn new(
        memory: &'m M,
        five_level: bool,
        area: GuestAddress,
        len: u64,
    ) -> Result<Self, Stage2BuildError> {
        let (levels, format) = levels_format(five_level);
        Ok(EptBuilder {
            tables: PageTableBuilder::with_entry_format(memory, format, area, len, true)?,
            levels,
        })
    }

    /// Address of the top-level table.
    pub fn root(&self) -> u64 {
        self.tables.root()
    }

    /// An EPTP for the tables: write-back paging-structure accesses, the
    /// tables' page-walk length, and EPT A/D flags if `accessed_dirty`.
    pub fn eptp(&self, accessed_dirty: bool) -> u64 {
        let ad = if accessed_dirty {
            EptContext::EPTP_AD
        } else {
            0
        };
        self.root() | (u64::from(self.levels) - 1) << 3 | 6 | ad
    }

    /// Bytes of the area used so far.
    pub fn tables_size(&self) -> u64 {
        self.tables.tables_size()
    }

    fn leaf(hpa: u64, size: PageSize, flags: EptFlags) -> Result<u64, Stage2BuildError> {
        if !flags.read && (flags.write || !flags.execute) {
            return Err(Stage2BuildError::InvalidRights(flags));
        }
        let mut value = hpa | u64::from(flags.memory_type.bits()) << 3;
        for (on, bit) in [
            (flags.read, EPT_R),
            (flags.write, EPT_W),
            (flags.execute, EPT_X),
            (flags.ignore_pat, EPT_IPAT),
            (size != PageSize::Size4K, PS),
        ] {
            if on {
                value |= bit;
            }
        }
        Ok(value)
    }

    /// Maps the guest-physical page of `size` at `gpa` to `hpa`. Refuses
    /// overlaps, misalignment and rights that are not a valid present entry
    /// (execute-only is accepted; whether it works is the processor's
    /// capability).
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        flags: EptFlags,
    ) -> Result<(), Stage2BuildError> {
        check_stage2(self.levels, gpa, hpa, size)?;
        let leaf = Self::leaf(hpa, size, flags)?;
        Ok(self.tables.install(gpa, size, leaf)?)
    }

    /// Removes the page of `size` mapped at `gpa`.
    pub fn unmap(&mut self, gpa: u64, size: PageSize) -> Result<(), Stage2BuildError> {
        check_stage2(self.levels, gpa, 0, size)?;
        let slot = self.tables.leaf_slot(gpa, size)?;
        Ok(self.tables.write(slot, 0)?)
    }

    /// Changes the rights and memory type of the page of `size` at `gpa`,
    /// keeping its address and accessed/dirty flags.
    pub fn protect(
        &mut self,
        gpa: u64,
        size: PageSize,
        flags: EptFlags,
    ) -> Result<(), Stage2BuildError> {
        check_stage2(self.levels, gpa, 0, size)?;
        let slot = self.tables.leaf_slot(gpa, size)?;
        let old = self.tables.read(slot)?;
        let keep = old & (bits(12, 51) | EPT_A | EPT_D);
        let fresh = Self::leaf(0, size, flags)?;
        Ok(self.tables.write(slot, keep | fresh)?)
    }
}

/// Builds AMD nested page tables (long-mode format, 4- or 5-level) in
/// memory. Every entry is user (nested accesses are user accesses);
/// non-leaf entries are writable and executable.
#[derive(Debug)]
pub struct NptBuilder<'m, M: GuestMemory + ?Sized> {
    tables: PageTableBuilder<'m, M>,
    levels: u8,
}

impl<'m, M: GuestMemory + ?Sized> NptBuilder<'m, M> {
    /// Starts empty tables in `area..area + len` (4 KiB aligned); the root
    /// is allocated at once.
    pub fn new(
        memory: &'m M,
        five_level: bool,
        area: GuestAddress,
        len: u64,
    ) -> Result<Self, Stage2BuildError> {
        let (levels, format) = levels_format(five_level);
        Ok(NptBuilder {
            tables: PageTableBuilder::new(memory, format, area, len)?,
            levels,
        })
    }

    /// The value for nCR3.
    pub fn ncr3(&self) -> u64 {
        self.tables.root()
    }

    /// Bytes of the area used so far.
    pub fn tables_size(&self) -> u64 {
        self.tables.tables_size()
    }

    fn leaf(hpa: u64, size: PageSize, flags: NptFlags) -> u64 {
        let mut value = hpa | P | US;
        if flags.writable {
            value |= RW;
        }
        if !flags.executable {
            value |= XD;
        }
        if size != PageSize::Size4K {
            value |= PS;
        }
        value
    }

    /// Maps the guest-physical page of `size` at `gpa` to `hpa`.
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        flags: NptFlags,
    ) -> Result<(), Stage2BuildError> {
        check_stage2(self.levels, gpa, hpa, size)?;
        Ok(self
            .tables
            .install(gpa, size, Self::leaf(hpa, size, flags))?)
    }

    /// Removes the page of `size` mapped at `gpa`.
    pub fn unmap(&mut self, gpa: u64, size: PageSize) -> Result<(), Stage2BuildError> {
        check_stage2(self.levels, gpa, 0, size)?;
        let slot = self.tables.leaf_slot(gpa, size)?;
        Ok(self.tables.write(slot, 0)?)
    }

    /// Changes the rights of the page of `size` at `gpa`, keeping its
    /// address and accessed/dirty bits.
    pub fn protect(
        &mut self,
        gpa: u64,
        size: PageSize,
        flags: NptFlags,
    ) -> Result<(), Stage2BuildError> {
        check_stage2(self.levels, gpa, 0, size)?;
        let slot = self.tables.leaf_slot(gpa, size)?;
        let old = self.tables.read(slot)?;
        let keep = old & (bits(12, 51) | NPT_A | NPT_D);
        Ok(self.tables.write(slot, keep | Self::leaf(0, size, flags))?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::paging::PageFlags;

    /// The fast path returns exactly what the general path returns (the
    /// translation with both entry lists, and the statistics) wherever it
    /// answers, and answers for every mapped address of a plain setup;
    /// where it gives up, the general path reports a fault.
    #[test]
    fn fast_path_matches_general_path() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut guest = PageTableBuilder::new(
            &memory,
            TableFormat::Level4,
            GuestAddress(0x20_0000),
            0x20_0000,
        )
        .unwrap();
        let mut mapped = Vec::new();
        for (i, l4) in [1u64, 2, 200].into_iter().enumerate() {
            let base = l4 << 39 | (i as u64) << 30;
            let flags = PageFlags {
                writable: i != 1,
                user: i != 2,
                ..PageFlags::default()
            };
            guest.map(base, 0x80_0000, PageSize::Size2M, flags).unwrap();
            mapped.push(base + 0x1234);
            for p in 0..8u64 {
                let gva = base + (3 << 21) + (p << 12);
                // Frame 7 lies outside the stage-2 map below.
                let gpa = 0xc0_0000 + (p << 12) + if p == 7 { 0x100_0000 } else { 0 };
                guest.map(gva, gpa, PageSize::Size4K, flags).unwrap();
                mapped.push(gva + 0x88);
            }
        }
        let guest =
            PagingContext::new(&guest.control_regs().unwrap(), &CpuFeatures::default()).unwrap();
        for ad in [false, true] {
            let mut ept =
                EptBuilder::new(&memory, false, GuestAddress(0x60_0000), 0x4_0000).unwrap();
            for page in (0..0x80_0000u64).step_by(4096) {
                ept.map(page, page, PageSize::Size4K, EptFlags::default())
                    .unwrap();
            }
            let read_only = EptFlags {
                write: false,
                execute: false,
                ..EptFlags::default()
            };
            ept.map(0x80_0000, 0x80_0000, PageSize::Size2M, read_only)
                .unwrap();
            ept.map(0xc0_0000, 0xe0_0000, PageSize::Size2M, EptFlags::default())
                .unwrap();
            let ept = EptContext::new(ept.eptp(ad), &EptCapabilities::default()).unwrap();
            let stage2 = Stage2Context::Ept(ept.clone());
            let mut answered = 0;
            for &gva in mapped.iter().chain(&[0x7000_0000, 1 << 47 | 5]) {
                for index in 0..Access::COUNT {
                    let access = Access::from_index(index);
                    let fast =
                        walk_2d_lean(&guest, &ept, &memory, gva, gva, access, WalkMode::Probe);
                    let mut stats = NestedStats::default();
                    let general = walk_2d_general(
                        &guest,
                        &stage2,
                        &memory,
                        gva,
                        gva,
                        access,
                        WalkMode::Probe,
                        &mut stats,
                    );
                    match (fast, general) {
                        (Some(f), Ok(g)) => {
                            assert_eq!(f, g, "{gva:#x} {access:?}");
                            answered += 1;
                        }
                        (None, Err(_)) => {}
                        (f, g) => panic!("{gva:#x} {access:?}: fast {f:?}, general {g:?}"),
                    }
                }
            }
            assert!(answered > 100, "{answered}");
        }
    }
}
