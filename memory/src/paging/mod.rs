//! A software x86 MMU: paging contexts, page walks and page-table builders.
//!
//! - [`context`]: [`PagingContext`], built from the control registers
//!   ([`ControlRegs`]) and CPU properties ([`CpuFeatures`]); it decides the
//!   paging mode (none, 32-bit with PSE/PSE-36, PAE, 4-level, 5-level) and
//!   precomputes the reserved-bit masks and permission table of a walk.
//! - [`walk`](mod@walk): translation of a guest-virtual address for an [`Access`]
//!   following Intel SDM Vol. 3A chapter 4 — canonical check, reserved bits,
//!   effective rights (R/W, U/S, XD across levels; CR0.WP; SMEP; SMAP with
//!   EFLAGS.AC and implicit accesses; protection keys with PKRU/PKRS),
//!   page-fault error codes, and accessed/dirty updates by
//!   compare-and-exchange ([`WalkMode::Update`]) or none at all
//!   ([`WalkMode::Probe`]).
//! - [`builder`]: [`PageTableBuilder`] maps, unmaps and re-protects pages in
//!   any of the four formats with tables taken from a caller-given area.
//! - [`nested`]: stage-2 translation for nested paging — Intel EPT
//!   ([`EptContext`]: violations with their exit qualification,
//!   misconfigurations, execute-only, EPT A/D) and AMD NPT ([`NptContext`]:
//!   #NPF error codes, user-access rules) — the two-dimensional walk
//!   [`walk_2d`] that reports which stage faulted and counts memory
//!   references, and the builders [`EptBuilder`] and [`NptBuilder`].
//! - [`nested_tlb`]: [`Stage2Tlb`], a cache of stage-2 translations that
//!   must be invalidated like INVEPT, and [`walk_2d_cached`], the 2-D walk
//!   that uses it.
//!
//! - [`shadow`]: [`ShadowMmu`], a translation cache (guest-virtual →
//!   guest-physical → host through a [`HostMap`]) keyed by address space,
//!   invalidated by INVLPG, CR3 loads, observed page-table writes and
//!   memory-map changes, that also materializes shadow page tables.
//!
//! Entries are always read and written through vm-memory; nothing keeps a
//! reference into guest memory, and guest-controlled values never panic.
//!
//! # Example
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_memory::paging::{
//!     Access, CpuFeatures, PageFlags, PageSize, PageTableBuilder, PagingContext, Privilege,
//!     TableFormat, WalkError, WalkMode,
//! };
//!
//! let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)])?;
//! let mut tables =
//!     PageTableBuilder::new(&memory, TableFormat::Level4, GuestAddress(0x10_0000), 0x10_0000)?;
//! let user_rw = PageFlags { user: true, ..PageFlags::default() };
//! tables.map(0x7fff_0000_0000, 0x20_0000, PageSize::Size2M, user_rw)?;
//!
//! let ctx = PagingContext::new(&tables.control_regs()?, &CpuFeatures::default())?;
//! let t = ctx.walk(&memory, 0x7fff_0000_1234, Access::write(Privilege::User), WalkMode::Update)?;
//! assert_eq!(t.gpa, 0x20_1234);
//! assert_eq!(t.page_size, PageSize::Size2M);
//!
//! // Nothing is mapped at 0: a not-present user read fault (P = 0, U/S = 1).
//! let err = ctx.walk(&memory, 0, Access::read(Privilege::User), WalkMode::Probe).unwrap_err();
//! assert!(matches!(err, WalkError::PageFault { error_code, .. } if error_code.bits() == 0b100));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

/// The raw-value accessors, `contains` and `|` of a flag word: a
/// single-field tuple struct over an unsigned integer (#PF error codes, EPT
/// exit qualifications, #NPF error codes).
macro_rules! flag_word {
    ($name:ident, $raw:ty, $what:literal) => {
        impl $name {
            #[doc = concat!("The raw value of the ", $what, ".")]
            pub const fn bits(self) -> $raw {
                self.0
            }

            #[doc = concat!("A ", $what, " from its raw value (all bits kept).")]
            pub const fn from_bits(bits: $raw) -> $name {
                $name(bits)
            }

            /// Whether all bits of `other` are set.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }
        }

        impl std::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }
    };
}

pub mod builder;
pub mod context;
pub mod nested;
pub mod nested_tlb;
pub mod shadow;
pub mod walk;

pub use builder::{BuildError, PageFlags, PageTableBuilder, TableFormat};
pub use context::{ControlRegs, CpuFeatures, PagingContext, PagingError, PagingMode, Vendor};
pub use nested::{
    walk_2d, walk_2d_counted, EptBuilder, EptCapabilities, EptContext, EptFlags, EptMemoryType,
    EptMisconfigReason, EptQualification, NestedError, NestedStats, NestedTranslation,
    NestedWalkError, NpfErrorCode, NptBuilder, NptContext, NptFlags, NptHost, Stage2Access,
    Stage2BuildError, Stage2Context, Stage2Error, Stage2Fault, Stage2FaultKind, Stage2Phase,
    Stage2Translation,
};
pub use nested_tlb::{walk_2d_cached, Stage2Tlb, Stage2TlbStats};
pub use shadow::{
    CachedEntry, FaultOutcome, HostMap, IdentityMap, ShadowConfig, ShadowError, ShadowMmu,
    ShadowStats, ShadowTranslation, SpaceInfo,
};
pub use walk::{
    walk, Access, AccessKind, PageSize, PfErrorCode, Privilege, Translation, WalkEntries,
    WalkEntry, WalkError, WalkMode, MAX_AD_RETRIES,
};
