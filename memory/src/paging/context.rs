//! The paging context: which x86 paging mode a vCPU is in and everything a
//! walk needs from its control registers, precomputed once.
//!
//! The mode follows from CR0.PG, CR4.PAE, IA32_EFER.LME/LMA and CR4.LA57
//! (Intel SDM Vol. 3A §4.1.1, Table 4-1). [`PagingContext::new`] validates the
//! combination, checks the PAE PDPTRs the way `MOV CR3` would (§4.4.1) and
//! precomputes the reserved-bit masks of every level (§4.3–§4.5) and a
//! permission table (§4.6).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::walk::Access;

/// Errors from building a [`PagingContext`].
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// CR0.PG is set without CR0.PE (`MOV CR0` would raise #GP).
    #[error("CR0 {cr0:#x} enables paging (PG) without protected mode (PE)")]
    PagingWithoutProtection {
        /// The CR0 value.
        cr0: u64,
    },
    /// IA-32e mode (EFER.LME/LMA with CR0.PG) without CR4.PAE.
    #[error("IA-32e mode (EFER {efer:#x}) requires CR4.PAE, but CR4 is {cr4:#x}")]
    LongModeWithoutPae {
        /// The EFER value.
        efer: u64,
        /// The CR4 value.
        cr4: u64,
    },
    /// MAXPHYADDR outside 32..=52.
    #[error("MAXPHYADDR {0} is outside 32..=52")]
    InvalidMaxPhyAddr(u8),
    /// CR3 sets physical-address bits at or above MAXPHYADDR (IA-32e mode).
    #[error("CR3 {cr3:#x} sets bits at or above MAXPHYADDR {maxphyaddr}")]
    Cr3Reserved {
        /// The CR3 value.
        cr3: u64,
        /// MAXPHYADDR of the CPU.
        maxphyaddr: u8,
    },
    /// A present PAE PDPTE sets a reserved bit (loading CR3 would raise #GP,
    /// SDM Vol. 3A §4.4.1).
    #[error("PAE PDPTE {index} = {value:#x} is present and sets reserved bits {reserved:#x}")]
    PdpteReserved {
        /// Which of the four PDPTEs.
        index: usize,
        /// Its value.
        value: u64,
        /// The reserved bits it sets.
        reserved: u64,
    },
    /// Reading the PAE PDPTEs from guest memory failed.
    #[error("cannot read the PAE PDPTEs at {gpa:#x}: {source}")]
    PdpteRead {
        /// Guest-physical address of the PDPTE that could not be read.
        gpa: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The CPU vendor, for the few places where the paging rules differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Vendor {
    /// Intel (and compatible).
    #[default]
    Intel,
    /// AMD (and Hygon): bit 8 of non-leaf PML5Es/PML4Es is reserved.
    Amd,
}

/// The control registers and paging-related MSRs of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlRegs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// PKRU (user-mode protection keys; used with CR4.PKE).
    pub pkru: u32,
    /// IA32_PKRS (supervisor-mode protection keys; used with CR4.PKS).
    pub pkrs: u32,
    /// The four PAE PDPTE registers, as loaded when CR3 was last written
    /// (only used in PAE paging; see [`PagingContext::load_pdptrs`]).
    pub pdptrs: [u64; 4],
}

impl ControlRegs {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.WP: supervisor writes honour read-only pages.
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PSE: 4 MiB pages in 32-bit paging.
    pub const CR4_PSE: u64 = 1 << 4;
    /// CR4.PAE: PAE (and IA-32e) paging.
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4.LA57: 5-level paging in IA-32e mode.
    pub const CR4_LA57: u64 = 1 << 12;
    /// CR4.SMEP: supervisor-mode execution prevention.
    pub const CR4_SMEP: u64 = 1 << 20;
    /// CR4.SMAP: supervisor-mode access prevention.
    pub const CR4_SMAP: u64 = 1 << 21;
    /// CR4.PKE: protection keys for user-mode pages.
    pub const CR4_PKE: u64 = 1 << 22;
    /// CR4.PKS: protection keys for supervisor-mode pages.
    pub const CR4_PKS: u64 = 1 << 24;
    /// EFER.LME: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER.NXE: execute-disable bit enable.
    pub const EFER_NXE: u64 = 1 << 11;
}

/// Paging-related properties of the (virtual) CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// MAXPHYADDR (CPUID.80000008H:EAX bits 7:0), 32..=52.
    pub maxphyaddr: u8,
    /// 1 GiB pages (CPUID.80000001H:EDX.Page1GB).
    pub gbpages: bool,
    /// PSE-36 (CPUID.01H:EDX.PSE-36): 4 MiB pages above 4 GiB in 32-bit paging.
    pub pse36: bool,
    /// CPU vendor.
    pub vendor: Vendor,
}

impl Default for CpuFeatures {
    fn default() -> Self {
        CpuFeatures {
            maxphyaddr: 46,
            gbpages: true,
            pse36: true,
            vendor: Vendor::Intel,
        }
    }
}

/// The paging mode (SDM Vol. 3A Table 4-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// CR0.PG = 0: linear addresses (32 bits) are physical addresses.
    None,
    /// 32-bit paging (CR4.PAE = 0), with 4 MiB pages when CR4.PSE = 1.
    Bits32,
    /// PAE paging (CR4.PAE = 1 outside IA-32e mode).
    Pae,
    /// 4-level paging (IA-32e mode, CR4.LA57 = 0).
    Level4,
    /// 5-level paging (IA-32e mode, CR4.LA57 = 1).
    Level5,
}

impl PagingMode {
    /// Whether the mode is one of the IA-32e modes (4- or 5-level).
    pub fn is_long(self) -> bool {
        matches!(self, PagingMode::Level4 | PagingMode::Level5)
    }

    /// Number of paging-structure levels a walk visits (PAE counts its
    /// PDPTE register as a level).
    pub fn levels(self) -> u8 {
        match self {
            PagingMode::None => 0,
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }
}

/// Mask of bits `lo..=hi` (both below 64).
pub(crate) const fn bits(lo: u32, hi: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// Everything a walk needs, precomputed from [`ControlRegs`] and
/// [`CpuFeatures`].
///
/// Build it again whenever CR0, CR3, CR4, EFER, PKRU or PKRS change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagingContext {
    pub(crate) mode: PagingMode,
    /// Physical address of the top-level table (PAE: of the PDPT).
    pub(crate) root: u64,
    pub(crate) pdptrs: [u64; 4],
    /// Reserved bits of a present entry at `level` (index `level - 1`)
    /// referencing a table (`[0]`) or mapping a page (`[1]`).
    pub(crate) rsvd: [[u64; 2]; 5],
    /// Whether PS = 1 at `level` selects the page-mapping format (checked
    /// against `rsvd[..][1]`); otherwise PS is ignored or covered by
    /// `rsvd[..][0]`.
    pub(crate) large: [bool; 5],
    /// Physical-address bits of a 64-bit entry (12..MAXPHYADDR).
    pub(crate) addr_mask: u64,
    /// Per access (see `Access::index`), a bit per (U, W, X) page-rights
    /// combination that faults.
    pub(crate) perm: [u8; Access::COUNT],
    pub(crate) nxe: bool,
    pub(crate) wp: bool,
    pub(crate) smep: bool,
    /// I/D is reported in #PF error codes (SDM §4.7).
    pub(crate) report_fetch: bool,
    pub(crate) pke: bool,
    pub(crate) pks: bool,
    pub(crate) pkru: u32,
    pub(crate) pkrs: u32,
    pub(crate) features: CpuFeatures,
}

impl PagingContext {
    /// Builds the context for the given registers.
    ///
    /// IA-32e mode is taken to be active when CR0.PG = 1 and EFER.LMA or
    /// EFER.LME is set. Outside IA-32e mode only bits 31:0 of a linear
    /// address are used.
    pub fn new(regs: &ControlRegs, features: &CpuFeatures) -> Result<PagingContext, PagingError> {
        let m = features.maxphyaddr;
        if !(32..=52).contains(&m) {
            return Err(PagingError::InvalidMaxPhyAddr(m));
        }
        let m32 = u32::from(m);
        let pg = regs.cr0 & ControlRegs::CR0_PG != 0;
        if pg && regs.cr0 & ControlRegs::CR0_PE == 0 {
            return Err(PagingError::PagingWithoutProtection { cr0: regs.cr0 });
        }
        let pae = regs.cr4 & ControlRegs::CR4_PAE != 0;
        let long = pg && regs.efer & (ControlRegs::EFER_LME | ControlRegs::EFER_LMA) != 0;
        if long && !pae {
            return Err(PagingError::LongModeWithoutPae {
                efer: regs.efer,
                cr4: regs.cr4,
            });
        }
        let mode = if !pg {
            PagingMode::None
        } else if !pae {
            PagingMode::Bits32
        } else if !long {
            PagingMode::Pae
        } else if regs.cr4 & ControlRegs::CR4_LA57 != 0 {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        };
        let nxe = regs.efer & ControlRegs::EFER_NXE != 0;
        let smep = regs.cr4 & ControlRegs::CR4_SMEP != 0;
        let smap = regs.cr4 & ControlRegs::CR4_SMAP != 0;
        let wp = regs.cr0 & ControlRegs::CR0_WP != 0;
        let pse = regs.cr4 & ControlRegs::CR4_PSE != 0;
        let addr_mask = bits(12, m32 - 1);
        let high = if m32 < 52 { bits(m32, 51) } else { 0 };
        let xd = if nxe { 0 } else { 1 << 63 };
        let mut rsvd = [[0u64; 2]; 5];
        let mut large = [false; 5];
        let mut root = 0;
        let mut pdptrs = [0u64; 4];
        match mode {
            PagingMode::None => {}
            PagingMode::Bits32 => {
                root = regs.cr3 & bits(12, 31);
                if pse {
                    large[1] = true;
                    // Table 4-4: bits (M-20):13 hold physical-address bits
                    // (M-1):32 with M = min(MAXPHYADDR, 40) under PSE-36;
                    // the rest of 21:13 is reserved.
                    let pm = if features.pse36 { m32.min(40) } else { 32 };
                    rsvd[1][1] = bits(pm - 19, 21);
                }
            }
            PagingMode::Pae => {
                root = regs.cr3 & bits(5, 31);
                // Tables 4-8 to 4-11: bits 62:M are reserved, and bit 63
                // unless NXE; PDPTEs have no XD bit at all.
                let pae_high = bits(m32, 62);
                for (index, &value) in regs.pdptrs.iter().enumerate() {
                    let reserved = value & (pae_high | 1 << 63 | bits(1, 2) | bits(5, 8));
                    if value & 1 != 0 && reserved != 0 {
                        return Err(PagingError::PdpteReserved {
                            index,
                            value,
                            reserved,
                        });
                    }
                }
                pdptrs = regs.pdptrs;
                rsvd[1] = [pae_high | xd, pae_high | xd | bits(13, 20)];
                rsvd[0] = [pae_high | xd; 2];
                large[1] = true;
            }
            PagingMode::Level4 | PagingMode::Level5 => {
                if regs.cr3 & high != 0 {
                    return Err(PagingError::Cr3Reserved {
                        cr3: regs.cr3,
                        maxphyaddr: m,
                    });
                }
                root = regs.cr3 & addr_mask;
                let amd_bit8 = if features.vendor == Vendor::Amd {
                    1 << 8
                } else {
                    0
                };
                // Tables 4-14 to 4-20 (4-level) and their 5-level
                // counterparts: PS is reserved in PML5Es and PML4Es, and in
                // PDPTEs without 1 GiB page support.
                rsvd[4] = [high | xd | amd_bit8 | 1 << 7; 2];
                rsvd[3] = [high | xd | amd_bit8 | 1 << 7; 2];
                // PS = 1 in a PDPTE selects the 1 GiB format; without 1 GiB
                // page support that format has PS itself reserved.
                large[2] = true;
                rsvd[2] = [high | xd, high | xd | bits(13, 29)];
                if !features.gbpages {
                    rsvd[2][1] = high | xd | 1 << 7;
                }
                large[1] = true;
                rsvd[1] = [high | xd, high | xd | bits(13, 20)];
                rsvd[0] = [high | xd; 2];
            }
        }
        let mut perm = [0u8; Access::COUNT];
        for (index, slot) in perm.iter_mut().enumerate() {
            let access = Access::from_index(index);
            for rights in 0..8u8 {
                let user = rights & 4 != 0;
                let writable = rights & 2 != 0;
                let executable = rights & 1 != 0;
                if !permitted(access, user, writable, executable, wp, smep, smap) {
                    *slot |= 1 << rights;
                }
            }
        }
        Ok(PagingContext {
            mode,
            root,
            pdptrs,
            rsvd,
            large,
            addr_mask,
            perm,
            nxe,
            wp,
            smep,
            report_fetch: smep || (pae && nxe),
            pke: mode.is_long() && regs.cr4 & ControlRegs::CR4_PKE != 0,
            pks: mode.is_long() && regs.cr4 & ControlRegs::CR4_PKS != 0,
            pkru: regs.pkru,
            pkrs: regs.pkrs,
            features: *features,
        })
    }

    /// Reads the four PAE PDPTEs that `MOV CR3` would load for `cr3` (bits
    /// 31:5 address the 32-byte PDPT), to put into [`ControlRegs::pdptrs`].
    pub fn load_pdptrs<M: GuestMemory + ?Sized>(
        memory: &M,
        cr3: u64,
    ) -> Result<[u64; 4], PagingError> {
        let base = cr3 & bits(5, 31);
        let mut out = [0u64; 4];
        for (i, slot) in out.iter_mut().enumerate() {
            let gpa = base + 8 * i as u64;
            *slot = memory
                .read_obj::<u64>(GuestAddress(gpa))
                .map(u64::from_le)
                .map_err(|source| PagingError::PdpteRead { gpa, source })?;
        }
        Ok(out)
    }

    /// The paging mode.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Guest-physical address of the top-level paging structure (for PAE
    /// paging, of the PDPT).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The CPU features the context was built for.
    pub fn features(&self) -> &CpuFeatures {
        &self.features
    }

    /// Whether execute-disable (EFER.NXE) is on.
    pub fn nxe(&self) -> bool {
        self.nxe
    }
}

/// Access rights to a page (SDM Vol. 3A §4.6.1), without protection keys.
fn permitted(
    access: Access,
    user_page: bool,
    writable: bool,
    executable: bool,
    wp: bool,
    smep: bool,
    smap: bool,
) -> bool {
    use super::walk::{AccessKind, Privilege};
    match access.privilege {
        Privilege::User => {
            user_page
                && match access.kind {
                    AccessKind::Read => true,
                    AccessKind::Write => writable,
                    AccessKind::Fetch => executable,
                }
        }
        Privilege::Supervisor | Privilege::SupervisorImplicit => {
            let implicit = access.privilege == Privilege::SupervisorImplicit;
            match access.kind {
                AccessKind::Fetch => executable && !(smep && user_page),
                kind => {
                    if user_page && smap && (implicit || !access.ac) {
                        return false;
                    }
                    kind == AccessKind::Read || writable || !wp
                }
            }
        }
    }
}
