//! The walker against a reference model.
//!
//! `reference` below is a deliberately naive walker written from the text of
//! the Intel SDM (Vol. 3A chapter 4), separately from `vmkit_memory::paging`
//! and sharing no code with it: it checks bits one by one, spells out the
//! access-rights rules of §4.6 as nested conditions, and builds the #PF
//! error code from §4.7. The property compares both over random page tables,
//! random control registers and random accesses: same outcome, same error
//! code, same accessed/dirty writes to guest memory.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{
    walk, Access, AccessKind, ControlRegs, CpuFeatures, PagingContext, Privilege, Vendor,
    WalkError, WalkMode,
};

/// A naive model of SDM Vol. 3A chapter 4.
mod reference {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Read,
        Write,
        Fetch,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Who {
        User,
        Supervisor,
        Implicit,
    }

    #[derive(Debug, Clone, Copy)]
    pub struct Cpu {
        pub cr0: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub efer: u64,
        pub pkru: u32,
        pub pkrs: u32,
        pub pdptrs: [u64; 4],
        pub maxphyaddr: u32,
        pub gbpages: bool,
        pub pse36: bool,
        pub amd: bool,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Outcome {
        /// The context is invalid (a MOV to a control register would #GP).
        BadContext,
        Translated {
            gpa: u64,
            page_bytes: u64,
            writable: bool,
            user: bool,
            executable: bool,
            pkey: Option<u8>,
        },
        PageFault {
            code: u32,
            address: u64,
        },
        NonCanonical,
        /// A paging-structure entry is not in guest memory.
        Unreadable,
    }

    fn bit(value: u64, n: u32) -> bool {
        (value >> n) & 1 == 1
    }

    /// Whether any of bits lo..=hi is set.
    fn any(value: u64, lo: u32, hi: u32) -> bool {
        let mut n = lo;
        while n <= hi {
            if bit(value, n) {
                return true;
            }
            n += 1;
        }
        false
    }

    /// Bits lo..=hi of value, shifted down.
    fn field(value: u64, lo: u32, hi: u32) -> u64 {
        let mut out = 0;
        let mut n = hi;
        loop {
            out = (out << 1) | u64::from(bit(value, n));
            if n == lo {
                return out;
            }
            n -= 1;
        }
    }

    struct Used {
        address: u64,
        value: u64,
        four_bytes: bool,
        /// The PAE PDPTE: a register, not updated.
        register: bool,
    }

    enum Stop {
        NotPresent,
        Reserved,
        Unreadable,
    }

    struct Leaf {
        page_base: u64,
        page_bytes: u64,
    }

    fn read64(memory: &GuestMemoryMmap, address: u64) -> Option<u64> {
        memory.read_obj::<u64>(GuestAddress(address)).ok()
    }

    fn read32(memory: &GuestMemoryMmap, address: u64) -> Option<u64> {
        memory
            .read_obj::<u32>(GuestAddress(address))
            .ok()
            .map(u64::from)
    }

    /// §4.3: 32-bit paging.
    fn walk_32(
        cpu: &Cpu,
        memory: &GuestMemoryMmap,
        la: u64,
        used: &mut Vec<Used>,
    ) -> Result<Leaf, Stop> {
        let pde_address = (field(cpu.cr3, 12, 31) << 12) | (field(la, 22, 31) << 2);
        let pde = read32(memory, pde_address).ok_or(Stop::Unreadable)?;
        used.push(Used {
            address: pde_address,
            value: pde,
            four_bytes: true,
            register: false,
        });
        if !bit(pde, 0) {
            return Err(Stop::NotPresent);
        }
        if bit(cpu.cr4, 4) && bit(pde, 7) {
            // Table 4-4: a 4-MByte page. Bits (M-20):13 are physical address
            // bits (M-1):32 where M = min(MAXPHYADDR, 40) with PSE-36, and
            // bits 21:(M-19) are reserved. Without PSE-36 all of 21:13 are.
            let m = if cpu.pse36 {
                cpu.maxphyaddr.min(40)
            } else {
                32
            };
            if any(pde, m - 19, 21) {
                return Err(Stop::Reserved);
            }
            let high = if m > 32 { field(pde, 13, m - 20) } else { 0 };
            return Ok(Leaf {
                page_base: (field(pde, 22, 31) << 22) | (high << 32),
                page_bytes: 4 << 20,
            });
        }
        let pte_address = (field(pde, 12, 31) << 12) | (field(la, 12, 21) << 2);
        let pte = read32(memory, pte_address).ok_or(Stop::Unreadable)?;
        used.push(Used {
            address: pte_address,
            value: pte,
            four_bytes: true,
            register: false,
        });
        if !bit(pte, 0) {
            return Err(Stop::NotPresent);
        }
        Ok(Leaf {
            page_base: field(pte, 12, 31) << 12,
            page_bytes: 4096,
        })
    }

    /// §4.4: PAE paging.
    fn walk_pae(
        cpu: &Cpu,
        memory: &GuestMemoryMmap,
        la: u64,
        used: &mut Vec<Used>,
    ) -> Result<Leaf, Stop> {
        let m = cpu.maxphyaddr;
        let nxe = bit(cpu.efer, 11);
        let i = field(la, 30, 31);
        let pdpte = cpu.pdptrs[i as usize];
        used.push(Used {
            address: (field(cpu.cr3, 5, 31) << 5) + 8 * i,
            value: pdpte,
            four_bytes: false,
            register: true,
        });
        if !bit(pdpte, 0) {
            return Err(Stop::NotPresent);
        }
        // Tables 4-9 to 4-11: bits 62:M reserved; bit 63 reserved unless NXE.
        let bad = |e: u64| any(e, m, 62) || (!nxe && bit(e, 63));
        let pde_address = (field(pdpte, 12, m - 1) << 12) | (field(la, 21, 29) << 3);
        let pde = read64(memory, pde_address).ok_or(Stop::Unreadable)?;
        used.push(Used {
            address: pde_address,
            value: pde,
            four_bytes: false,
            register: false,
        });
        if !bit(pde, 0) {
            return Err(Stop::NotPresent);
        }
        if bit(pde, 7) {
            if bad(pde) || any(pde, 13, 20) {
                return Err(Stop::Reserved);
            }
            return Ok(Leaf {
                page_base: field(pde, 21, m - 1) << 21,
                page_bytes: 2 << 20,
            });
        }
        if bad(pde) {
            return Err(Stop::Reserved);
        }
        let pte_address = (field(pde, 12, m - 1) << 12) | (field(la, 12, 20) << 3);
        let pte = read64(memory, pte_address).ok_or(Stop::Unreadable)?;
        used.push(Used {
            address: pte_address,
            value: pte,
            four_bytes: false,
            register: false,
        });
        if !bit(pte, 0) {
            return Err(Stop::NotPresent);
        }
        if bad(pte) {
            return Err(Stop::Reserved);
        }
        Ok(Leaf {
            page_base: field(pte, 12, m - 1) << 12,
            page_bytes: 4096,
        })
    }

    /// §4.5: 4-level and 5-level paging.
    fn walk_ia32e(
        cpu: &Cpu,
        memory: &GuestMemoryMmap,
        la: u64,
        five: bool,
        used: &mut Vec<Used>,
    ) -> Result<Leaf, Stop> {
        let m = cpu.maxphyaddr;
        let nxe = bit(cpu.efer, 11);
        // Bits 51:M reserved in every entry; bit 63 reserved without NXE.
        let common = |e: u64| (m < 52 && any(e, m, 51)) || (!nxe && bit(e, 63));
        let mut table = field(cpu.cr3, 12, m - 1) << 12;
        let names: &[u32] = if five {
            &[5, 4, 3, 2, 1]
        } else {
            &[4, 3, 2, 1]
        };
        for &level in names {
            let shift = 12 + 9 * (level - 1);
            let address = table | (field(la, shift, shift + 8) << 3);
            let e = read64(memory, address).ok_or(Stop::Unreadable)?;
            used.push(Used {
                address,
                value: e,
                four_bytes: false,
                register: false,
            });
            if !bit(e, 0) {
                return Err(Stop::NotPresent);
            }
            match level {
                5 | 4 => {
                    // PS is reserved in PML5Es and PML4Es; AMD also reserves
                    // bit 8 there.
                    if common(e) || bit(e, 7) || (cpu.amd && bit(e, 8)) {
                        return Err(Stop::Reserved);
                    }
                }
                3 if bit(e, 7) => {
                    if !cpu.gbpages || common(e) || any(e, 13, 29) {
                        return Err(Stop::Reserved);
                    }
                    return Ok(Leaf {
                        page_base: field(e, 30, m - 1) << 30,
                        page_bytes: 1 << 30,
                    });
                }
                2 if bit(e, 7) => {
                    if common(e) || any(e, 13, 20) {
                        return Err(Stop::Reserved);
                    }
                    return Ok(Leaf {
                        page_base: field(e, 21, m - 1) << 21,
                        page_bytes: 2 << 20,
                    });
                }
                1 => {
                    if common(e) {
                        return Err(Stop::Reserved);
                    }
                    return Ok(Leaf {
                        page_base: field(e, 12, m - 1) << 12,
                        page_bytes: 4096,
                    });
                }
                _ => {
                    if common(e) {
                        return Err(Stop::Reserved);
                    }
                }
            }
            table = field(e, 12, m - 1) << 12;
        }
        unreachable!("level 1 always returns")
    }

    pub fn translate(
        cpu: &Cpu,
        memory: &GuestMemoryMmap,
        address: u64,
        kind: Kind,
        who: Who,
        ac: bool,
        update: bool,
    ) -> Outcome {
        let pg = bit(cpu.cr0, 31);
        let pae = bit(cpu.cr4, 5);
        let ia32e = pg && (bit(cpu.efer, 8) || bit(cpu.efer, 10));
        if pg && !bit(cpu.cr0, 0) {
            return Outcome::BadContext;
        }
        if ia32e && !pae {
            return Outcome::BadContext;
        }
        if !pg {
            return Outcome::Translated {
                gpa: address & 0xffff_ffff,
                page_bytes: 4096,
                writable: true,
                user: true,
                executable: true,
                pkey: None,
            };
        }
        let five = ia32e && bit(cpu.cr4, 12);
        let m = cpu.maxphyaddr;
        if ia32e && m < 52 && any(cpu.cr3, m, 51) {
            return Outcome::BadContext;
        }
        if pae && !ia32e {
            // §4.4.1: loading PDPTEs with P = 1 and reserved bits set faults.
            for &p in &cpu.pdptrs {
                if bit(p, 0) && (any(p, 1, 2) || any(p, 5, 8) || any(p, m, 63)) {
                    return Outcome::BadContext;
                }
            }
        }
        let la = if ia32e {
            // §3.3.7.1: canonical means bits 63:47 (or 63:56) all equal.
            let top = if five { 56 } else { 47 };
            let all_set = (top..=63).all(|n| bit(address, n));
            let all_clear = (top..=63).all(|n| !bit(address, n));
            if !all_set && !all_clear {
                return Outcome::NonCanonical;
            }
            address
        } else {
            address & 0xffff_ffff
        };

        // §4.7 error code, without P/RSVD/PK.
        let nxe = bit(cpu.efer, 11);
        let smep = bit(cpu.cr4, 20);
        let mut code = 0u32;
        if kind == Kind::Write {
            code |= 2;
        }
        if who == Who::User {
            code |= 4;
        }
        if kind == Kind::Fetch && (smep || (pae && nxe)) {
            code |= 16;
        }

        let mut used = Vec::new();
        let walked = if !pae {
            walk_32(cpu, memory, la, &mut used)
        } else if !ia32e {
            walk_pae(cpu, memory, la, &mut used)
        } else {
            walk_ia32e(cpu, memory, la, five, &mut used)
        };
        let leaf = match walked {
            Ok(leaf) => leaf,
            Err(Stop::Unreadable) => return Outcome::Unreadable,
            Err(Stop::NotPresent) => return Outcome::PageFault { code, address: la },
            Err(Stop::Reserved) => {
                return Outcome::PageFault {
                    code: code | 1 | 8,
                    address: la,
                }
            }
        };

        // §4.6.1: rights come from every entry except PAE PDPTEs.
        let rights: Vec<u64> = used
            .iter()
            .filter(|u| !u.register)
            .map(|u| u.value)
            .collect();
        let user_page = rights.iter().all(|&e| bit(e, 2));
        let writable = rights.iter().all(|&e| bit(e, 1));
        let executable = !(pae && nxe && rights.iter().any(|&e| bit(e, 63)));
        let wp = bit(cpu.cr0, 16);
        let smap = bit(cpu.cr4, 21);

        let allowed = match (who, kind) {
            (Who::User, Kind::Read) => user_page,
            (Who::User, Kind::Write) => user_page && writable,
            (Who::User, Kind::Fetch) => user_page && executable,
            (_, Kind::Fetch) => {
                if user_page && smep {
                    false
                } else {
                    executable
                }
            }
            (_, Kind::Read) => {
                if !user_page || !smap {
                    true
                } else {
                    who == Who::Supervisor && ac
                }
            }
            (_, Kind::Write) => {
                let smap_ok = !user_page || !smap || (who == Who::Supervisor && ac);
                smap_ok && (!wp || writable)
            }
        };

        // §4.6.2: protection keys, IA-32e paging only, data accesses only.
        let leaf_entry = rights.last().copied().unwrap_or(0);
        let key = field(leaf_entry, 59, 62) as u32;
        let register = if !ia32e {
            None
        } else if user_page && bit(cpu.cr4, 22) {
            Some(cpu.pkru)
        } else if !user_page && bit(cpu.cr4, 24) {
            Some(cpu.pkrs)
        } else {
            None
        };
        let mut key_violation = false;
        if let Some(r) = register {
            if kind != Kind::Fetch {
                let access_disable = (r >> (2 * key)) & 1 == 1;
                let write_disable = (r >> (2 * key + 1)) & 1 == 1;
                if access_disable {
                    key_violation = true;
                }
                if write_disable && kind == Kind::Write && (who == Who::User || wp) {
                    key_violation = true;
                }
            }
        }
        if !allowed || key_violation {
            let pk = if key_violation { 32 } else { 0 };
            return Outcome::PageFault {
                code: code | 1 | pk,
                address: la,
            };
        }

        if update {
            // §4.8: accessed flag in every entry used, dirty flag in the
            // entry mapping the page on a write.
            let last = used.len() - 1;
            for (i, u) in used.iter().enumerate() {
                if u.register {
                    continue;
                }
                let mut v = u.value | 0x20;
                if i == last && kind == Kind::Write {
                    v |= 0x40;
                }
                if v != u.value {
                    if u.four_bytes {
                        memory.write_obj(v as u32, GuestAddress(u.address)).unwrap();
                    } else {
                        memory.write_obj(v, GuestAddress(u.address)).unwrap();
                    }
                }
            }
        }
        Outcome::Translated {
            gpa: leaf.page_base + (la % leaf.page_bytes),
            page_bytes: leaf.page_bytes,
            writable,
            user: user_page,
            executable,
            pkey: register.map(|_| key as u8),
        }
    }
}

const MEM_SIZE: u64 = 1 << 20;
/// Table pages: level L's table is at TABLES + L * 4096.
const TABLES: u64 = 0x8_0000;
/// Only table pages are ever non-zero (other pages hold no present entries,
/// so no walk writes them): A/D writes are compared over this window, and it
/// is cleared between cases.
const WINDOW: std::ops::Range<u64> = TABLES..TABLES + 0x6000;

fn table_page(level: u32) -> u64 {
    TABLES + u64::from(level) * 0x1000
}

#[derive(Debug, Clone)]
struct Case {
    mode: u8,
    flags: u32,
    maxphyaddr: u8,
    pkru: u32,
    pkrs: u32,
    gva: u64,
    cr3_junk: u64,
    /// Per level 1..=5: (shape, random bits, selector).
    entries: [(u64, u64, u8); 5],
    accesses: Vec<(u8, u8, bool, bool)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (0u8..20, any::<u32>(), 36u8..=52, any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u8>(), any::<u64>()),
        any::<[(u64, u64, u8); 5]>(),
        prop::collection::vec((0u8..3, 0u8..3, any::<bool>(), any::<bool>()), 1..4),
    )
        .prop_map(
            |((mode, flags, maxphyaddr, pkru, pkrs), (gva, canon, cr3_junk), entries, accesses)| {
                Case {
                    mode,
                    flags,
                    maxphyaddr,
                    pkru,
                    pkrs,
                    gva: if canon < 240 {
                        // Mostly canonical for the mode's width.
                        let shift = if (14..=18).contains(&mode) && canon % 4 != 0 {
                            7
                        } else {
                            16
                        };
                        (((gva << shift) as i64) >> shift) as u64
                    } else {
                        gva
                    },
                    cr3_junk,
                    entries,
                    accesses,
                }
            },
        )
}

fn pick(byte: u8, percent: u8) -> bool {
    u32::from(byte) * 100 < u32::from(percent) * 256
}

/// Builds the entry for `level` from random material: mostly a present
/// entry pointing at the next table, with a chance of every kind of
/// reserved bit, large pages and odd pointers.
fn entry(level: u32, case: &Case, wide: bool) -> u64 {
    let (shape, random, sel) = case.entries[level as usize - 1];
    let m = u32::from(case.maxphyaddr);
    let sel2 = (shape >> 8) as u8;
    let sel3 = (shape >> 16) as u8;
    let sel4 = (shape >> 24) as u8;
    let sel5 = (shape >> 32) as u8;
    // Flag bits 0..=11 (P mostly set; R/W and U/S often set).
    let mut e = random & 0xfff;
    if pick(sel, 90) {
        e |= 1;
    }
    if pick((random >> 56) as u8, 50) {
        e |= 0b110;
    }
    // Most entries carry no reserved bit beyond what the shape picks below.
    let clean = pick((shape >> 56) as u8, 90);
    let nxe = (case.flags >> 1) & 1 == 1;
    if !pick(sel2, if level >= 4 { 8 } else { 35 }) {
        e &= !(1 << 7);
    }
    let next = if level > 1 {
        table_page(level - 1)
    } else {
        0x4_0000
    };
    let pointer = if pick(sel3, 85) {
        next
    } else if pick(sel3, 95) {
        ((random >> 12) % MEM_SIZE) & !0xfff
    } else {
        ((random >> 12) << 12) & ((1 << m) - 1)
    };
    e |= pointer;
    if !wide {
        return e & 0xffff_ffff
            | if !clean {
                (random >> 32) & 0x003f_e000
            } else {
                0
            };
    }
    if e & (1 << 7) != 0 && pick(sel4, 70) {
        // A large-page address: random bits 12..=29 (PAT, address bits,
        // and for unclean entries reserved ones).
        e |= if !clean {
            random & 0x3fff_f000
        } else if level == 2 {
            random & 0x3fe0_1000
        } else {
            random & 0x1000
        };
    }
    if !clean && m < 52 && pick(sel5, 30) {
        e |= 1 << (m + (random >> 40) as u32 % (52 - m));
    }
    if !clean && pick((shape >> 40) as u8, 40) {
        e |= random & (0x7f << 52);
    }
    // Protection key (ignored bits outside leaves and without PKE/PKS;
    // reserved in PAE entries).
    let long = (8..=18).contains(&case.mode);
    if long || !clean {
        e |= random & (0xf << 59);
    }
    if clean {
        // Bit 8 is reserved in non-leaf PML5Es/PML4Es on AMD.
        e &= !(1 << 8);
    }
    if (clean && nxe && pick((shape >> 48) as u8, 40)) || (!clean && pick((shape >> 48) as u8, 30))
    {
        e |= 1 << 63;
    }
    e
}

struct Setup {
    regs: ControlRegs,
    features: CpuFeatures,
    cpu: reference::Cpu,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

thread_local! {
    /// Guest memory for the real walker and for the model, reused across
    /// cases (mapping fresh memory per case dominates the run time).
    static MEMORIES: (GuestMemoryMmap, GuestMemoryMmap) = (memory(), memory());
}

fn clear_window(memory: &GuestMemoryMmap) {
    let zero = vec![0u8; (WINDOW.end - WINDOW.start) as usize];
    memory
        .write_slice(&zero, GuestAddress(WINDOW.start))
        .unwrap();
}

fn setup(case: &Case, memory: &GuestMemoryMmap) -> Setup {
    let f = case.flags;
    let flag = |n: u32| (f >> n) & 1 == 1;
    let mut regs = ControlRegs {
        cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG,
        pkru: case.pkru,
        pkrs: case.pkrs,
        ..ControlRegs::default()
    };
    if flag(0) {
        regs.cr0 |= ControlRegs::CR0_WP;
    }
    if flag(1) {
        regs.efer |= ControlRegs::EFER_NXE;
    }
    for (n, bit) in [
        (2, ControlRegs::CR4_SMEP),
        (3, ControlRegs::CR4_SMAP),
        (4, ControlRegs::CR4_PKE),
        (5, ControlRegs::CR4_PKS),
        (6, ControlRegs::CR4_PSE),
    ] {
        if flag(n) {
            regs.cr4 |= bit;
        }
    }
    let features = CpuFeatures {
        maxphyaddr: case.maxphyaddr,
        gbpages: flag(7),
        pse36: flag(8),
        vendor: if flag(9) { Vendor::Amd } else { Vendor::Intel },
    };
    let (levels, wide) = match case.mode {
        0..=3 => (2, false),
        4..=7 => (3, true),
        8..=13 => (4, true),
        14..=18 => (5, true),
        _ => (0, true),
    };
    match levels {
        0 => regs.cr0 &= !ControlRegs::CR0_PG,
        2 => regs.cr3 = table_page(2) | (case.cr3_junk & 0xfff),
        3 => {
            regs.cr4 |= ControlRegs::CR4_PAE;
            regs.cr3 = table_page(3) | (case.cr3_junk & 0xfe0);
        }
        _ => {
            regs.cr4 |= ControlRegs::CR4_PAE;
            regs.efer |= if flag(10) {
                ControlRegs::EFER_LMA
            } else {
                ControlRegs::EFER_LME
            };
            if levels == 5 {
                regs.cr4 |= ControlRegs::CR4_LA57;
            }
            regs.cr3 = table_page(levels) | (case.cr3_junk & 0xfff);
            if flag(11) && flag(12) && flag(13) && flag(19) && case.maxphyaddr < 52 {
                // Rarely, a CR3 with a bit above MAXPHYADDR.
                regs.cr3 |= 1 << case.maxphyaddr;
            }
        }
    }
    if flag(14) && flag(15) && flag(16) && flag(17) && flag(20) {
        // Rarely, invalid combinations.
        if flag(18) {
            regs.cr0 &= !ControlRegs::CR0_PE;
        } else {
            regs.cr4 &= !ControlRegs::CR4_PAE;
        }
    }
    // Write the path of entries for the address.
    for level in 1..=levels.max(1) {
        if levels == 0 {
            break;
        }
        let value = entry(level, case, wide);
        let gva = case.gva & if levels <= 3 { 0xffff_ffff } else { u64::MAX };
        let address = if !wide {
            let shift = 12 + 10 * (level - 1);
            table_page(level) + ((gva >> shift) & 0x3ff) * 4
        } else if levels == 3 && level == 3 {
            (regs.cr3 & 0xfe0) + table_page(3) + ((gva >> 30) & 3) * 8
        } else {
            let shift = 12 + 9 * (level - 1);
            table_page(level) + ((gva >> shift) & 0x1ff) * 8
        };
        if wide {
            let value = if levels == 3 && level == 3 && pick(case.entries[2].2, 85) {
                // Keep PAE PDPTEs mostly valid: only P and the address.
                value & (0x0000_ffff_ffff_f000 & ((1 << case.maxphyaddr) - 1) | 1)
            } else {
                value
            };
            memory.write_obj(value, GuestAddress(address)).unwrap();
        } else {
            memory
                .write_obj(value as u32, GuestAddress(address))
                .unwrap();
        }
    }
    if levels == 3 {
        let base = regs.cr3 & 0xffff_ffe0;
        for i in 0..4 {
            regs.pdptrs[i] = memory.read_obj(GuestAddress(base + 8 * i as u64)).unwrap();
        }
    }
    let cpu = reference::Cpu {
        cr0: regs.cr0,
        cr3: regs.cr3,
        cr4: regs.cr4,
        efer: regs.efer,
        pkru: regs.pkru,
        pkrs: regs.pkrs,
        pdptrs: regs.pdptrs,
        maxphyaddr: u32::from(case.maxphyaddr),
        gbpages: features.gbpages,
        pse36: features.pse36,
        amd: features.vendor == Vendor::Amd,
    };
    Setup {
        regs,
        features,
        cpu,
    }
}

fn real_outcome(
    ctx: &Result<PagingContext, vmkit_memory::paging::PagingError>,
    memory: &GuestMemoryMmap,
    gva: u64,
    access: Access,
    mode: WalkMode,
) -> reference::Outcome {
    use reference::Outcome;
    let Ok(ctx) = ctx else {
        return Outcome::BadContext;
    };
    match walk(ctx, memory, gva, access, mode) {
        Ok(t) => Outcome::Translated {
            gpa: t.gpa,
            page_bytes: t.page_size.bytes(),
            writable: t.writable,
            user: t.user,
            executable: t.executable,
            pkey: t.pkey,
        },
        Err(WalkError::PageFault {
            error_code,
            address,
        }) => Outcome::PageFault {
            code: error_code.bits(),
            address,
        },
        Err(WalkError::NonCanonical { .. }) => Outcome::NonCanonical,
        Err(WalkError::Memory { .. }) => Outcome::Unreadable,
        Err(e @ WalkError::Contended { .. }) => panic!("no race in this test: {e}"),
    }
}

fn snapshot(memory: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0u8; (WINDOW.end - WINDOW.start) as usize];
    memory
        .read_slice(&mut bytes, GuestAddress(WINDOW.start))
        .unwrap();
    bytes
}

fn access_of(kind: u8, who: u8, ac: bool) -> (Access, reference::Kind, reference::Who) {
    let (k, rk) = match kind {
        0 => (AccessKind::Read, reference::Kind::Read),
        1 => (AccessKind::Write, reference::Kind::Write),
        _ => (AccessKind::Fetch, reference::Kind::Fetch),
    };
    let (p, rw) = match who {
        0 => (Privilege::User, reference::Who::User),
        1 => (Privilege::Supervisor, reference::Who::Supervisor),
        _ => (Privilege::SupervisorImplicit, reference::Who::Implicit),
    };
    (
        Access {
            kind: k,
            privilege: p,
            ac,
        },
        rk,
        rw,
    )
}

fn check_case(case: &Case) -> Result<reference::Outcome, TestCaseError> {
    MEMORIES.with(|(real_mem, model_mem)| {
        clear_window(real_mem);
        clear_window(model_mem);
        check_case_in(case, real_mem, model_mem)
    })
}

fn check_case_in(
    case: &Case,
    real_mem: &GuestMemoryMmap,
    model_mem: &GuestMemoryMmap,
) -> Result<reference::Outcome, TestCaseError> {
    let s = setup(case, real_mem);
    let s2 = setup(case, model_mem);
    prop_assert_eq!(s.regs, s2.regs);
    let ctx = PagingContext::new(&s.regs, &s.features);
    let mut last = reference::Outcome::BadContext;
    for &(kind, who, ac, probe) in &case.accesses {
        let (access, rk, rw) = access_of(kind, who, ac);
        let mode = if probe {
            WalkMode::Probe
        } else {
            WalkMode::Update
        };
        let before = snapshot(real_mem);
        let got = real_outcome(&ctx, real_mem, case.gva, access, mode);
        let want = reference::translate(&s.cpu, model_mem, case.gva, rk, rw, ac, !probe);
        prop_assert_eq!(&got, &want, "access {:?} regs {:x?}", access, s.regs);
        let after = snapshot(real_mem);
        if probe || !matches!(got, reference::Outcome::Translated { .. }) {
            prop_assert!(
                before == after,
                "guest memory changed without a successful update walk"
            );
        }
        prop_assert!(after == snapshot(model_mem), "accessed/dirty writes differ");
        last = want;
    }
    Ok(last)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    /// Same outcome, error code and A/D writes as the reference model.
    #[test]
    fn walker_matches_reference_model(case in case()) {
        check_case(&case)?;
    }
}

/// The generator reaches every kind of outcome in useful proportions.
#[test]
fn generator_covers_outcomes() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    use reference::Outcome;
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(Config::default().rng_algorithm),
    );
    let strategy = case();
    let (mut ok, mut not_present, mut rsvd, mut prot, mut pk) = (0, 0, 0, 0, 0);
    let (mut bad, mut noncanonical, mut unreadable) = (0, 0, 0);
    for _ in 0..2000 {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        match check_case(&case).unwrap() {
            Outcome::Translated { .. } => ok += 1,
            Outcome::PageFault { code, .. } if code & 1 == 0 => not_present += 1,
            Outcome::PageFault { code, .. } if code & 8 != 0 => {
                rsvd += 1;
                if std::env::var("DEBUG_GEN").is_ok() && rsvd < 30 {
                    let m = case.maxphyaddr;
                    let es: Vec<String> = (1..=5)
                        .map(|l| format!("{:#x}", entry(l, &case, case.mode >= 4)))
                        .collect();
                    eprintln!(
                        "mode {} flags {:#x} m {m} entries {es:?}",
                        case.mode, case.flags
                    );
                }
            }
            Outcome::PageFault { code, .. } if code & 32 != 0 => pk += 1,
            Outcome::PageFault { .. } => prot += 1,
            Outcome::BadContext => bad += 1,
            Outcome::NonCanonical => noncanonical += 1,
            Outcome::Unreadable => unreadable += 1,
        }
    }
    eprintln!(
        "ok={ok} not_present={not_present} rsvd={rsvd} prot={prot} pk={pk} \
         bad_context={bad} noncanonical={noncanonical} unreadable={unreadable}"
    );
    for (name, n) in [
        ("ok", ok),
        ("not present", not_present),
        ("reserved", rsvd),
        ("protection", prot),
        ("pk", pk),
    ] {
        assert!(n >= 40, "too few {name} outcomes: {n}");
    }
}
