//! vmkit's materialized shadow page tables (`ShadowMmu` in
//! `vmkit_memory::paging::shadow`) checked against the real CPU: a 64-bit
//! guest runs with CR3 = the shadow root, as under a VMM without EPT/NPT,
//! and every access it makes goes through tables the shadow MMU wrote.
//!
//! [`guest_runs_on_shadow_page_tables`]:
//! - The host builds two guest address spaces (the tables the guest OS
//!   believes in) with `PageTableBuilder`: 4 KiB and 2 MiB pages of random
//!   R/W, U/S and XD into a data pool, holes around them, and the guest's
//!   own kernel (GDT, TSS, IDT, code, stack, case table) identity-mapped by a
//!   2 MiB supervisor page plus one user page of access stubs. The kernel
//!   pages are pre-faulted into the shadow tables with `fault()`.
//! - The guest runs rounds of operations: reads, writes and fetches of pool
//!   cells from CPL0 and CPL3, `invlpg` (executed, then reported through a
//!   port) and CR3 loads (reported through a port; the VMM calls
//!   `load_cr3` and reloads the real CR3 with the new shadow root).
//! - Its #PF handler reports CR2 and the error code through a port; the
//!   VMM calls `fault()`: `Mapped` retries the access, `GuestFault` is the
//!   case's result (the handler records the injected error code and CR2),
//!   `Emulate` is done by the VMM (the write stored in guest memory) and
//!   the access skipped.
//! - Between rounds the host changes guest PTEs (unmap, restore, protect,
//!   unprotect, remap to another frame) and tells the shadow MMU, with
//!   `observe_write` of the entry (or of its whole table page) or by making
//!   the guest execute and report `invlpg` of the page before anything
//!   else; some rounds change the guest's CR0.WP (`set_control_regs`).
//! - Each round's outcomes are predicted by `walk(.., WalkMode::Update)` on
//!   a copy of guest memory taken before the round: every case's result
//!   (the value read, the fetched instruction's immediate, the #PF error
//!   code and CR2, emulation), the pool's bytes after the writes, every
//!   accessed/dirty bit of both guests' tables, and the number of shadow
//!   faults per access (at most one per access; none when the page was
//!   already mapped with the rights the access needs since the last
//!   invalidation).
//!
//! The hardware TLB on this host: `kvm_pvm` runs the guest on its own
//! shadow of our shadow tables, write-protecting the table pages against
//! *guest* writes only. The VMM writes shadow entries from the host, which
//! KVM cannot see, so an entry the shadow MMU clears could stay mapped in
//! KVM; and executing `invlpg` or loading CR3 in the guest does not make
//! KVM re-read a table it believes in sync. The VMM's "flush its own TLB
//! after any invalidation" is therefore done by moving the vCPU (its
//! registers) to a fresh VM over the same memory: nothing the test checks
//! can then come from a stale KVM entry. `VMKIT_SHADOW_KVM_ONE_VM=1` keeps
//! one VM for the whole run instead (only CR3 is reloaded), to observe that
//! staleness; the test then fails (seen here: 142 mismatches with the
//! default seed, CPL3 accesses reaching pages the shadow tables no longer
//! map, or the old frame of a remapped page; CPL0 accesses, which KVM
//! emulates with a fresh walk, were not affected in the sample printed).
//!
//! [`shadow_tables_compose_ept_stage2`] and
//! [`shadow_tables_compose_npt_stage2`]: the shadow tables compose a guest's
//! own tables with a stage-2 map built by `EptBuilder` / `NptBuilder` (the
//! shadow MMU's `HostMap` asks the EPT/NPT tables), which shuffles the
//! guest's data frames to other host pages. A guest reads and writes those
//! pages; every value must come from, and go to, the host page that guest
//! tables ∘ stage 2 (also computed by `walk_2d`) name, never the frame's
//! identity address. Then a guest PTE is remapped (`observe_write`) and a
//! stage-2 entry remapped (new `HostMap` generation and
//! `memory_map_changed`), and a second run must follow the new composition.
//! Each run uses a fresh VM, for the reason above.
//!
//! `VMKIT_ORACLE_SEED` picks another random seed (printed on failure).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};

use vmkit_memory::paging::{
    walk_2d, Access, AccessKind, ControlRegs, CpuFeatures, EptBuilder, EptCapabilities, EptContext,
    EptFlags, FaultOutcome, HostMap, IdentityMap, NptBuilder, NptContext, NptFlags, NptHost,
    PageFlags, PageSize, PageTableBuilder, PagingContext, Privilege, ShadowConfig, ShadowMmu,
    Stage2Access, Stage2Context, TableFormat, WalkError, WalkMode,
};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::GuestMemoryMmap;
use vmkit_vcpu::kvm_bindings::{kvm_regs, kvm_sregs};
use vmkit_vcpu::{StopReason, Vcpu, Vm};

use common::kernel64::{
    diff_qwords, emit_driver_entry, emit_stubs, enter_kernel, guest_paging, long_mode_vm,
    new_memory, oracle_seed, preset_accessed, stubs_at, user_stubs, write_descriptor_tables,
    write_driver_entry, Entry, Rng, StubWidth, Stubs, GDT, GUEST_DONE, GUEST_UNEXPECTED_VECTOR,
    KERNEL_CODE, POOL, POOL_END, RAM, USER_CODE, USER_STUBS,
};

fn seed() -> u64 {
    oracle_seed(0x0005_eed5_ad0e)
}

// ---------------------------------------------------------------------
// Layout. The kernel's structures are identity-mapped (gva == gpa) by one
// 2 MiB supervisor page at 0 in both address spaces.
// ---------------------------------------------------------------------

// The rest of the layout is [`common::kernel64`]'s.
/// The mailbox between the guest's handlers and the VMM.
const MB_CR2: u64 = 0x4100;
const MB_ERR: u64 = 0x4108;
const MB_VERDICT: u64 = 0x4110;
const MB_ARG: u64 = 0x4118;
const MB_OP: u64 = 0x4120;
const MB_RAX: u64 = 0x4128;
const COUNT: u64 = 0x4130;
const MB_DEBUG: u64 = 0x4140;
const OPS: u64 = 0x20000;
const OP_BYTES: u64 = 48;
const RESULTS: u64 = 0x30000;
const RESULT_BYTES: u64 = 40;
const MAX_OPS: u64 = (RESULTS - OPS) / OP_BYTES;
/// Kernel pages the VMM pre-faults (everything the guest touches besides
/// the test accesses).
const KERNEL_END: u64 = 0x40000;
/// `configure` writes a GDT here (never used: the test loads its own).
const SCRATCH_GDT: u64 = 0x7_0000;
/// The two guest address spaces' tables.
const TABLES: [u64; 2] = [0x20_0000, 0x28_0000];
const TABLES_LEN: u64 = 0x8_0000;
/// The shadow tables (not mapped in the guest's address spaces).
const SHADOW: u64 = 0x30_0000;
const SHADOW_LEN: u64 = 0x20_0000;

/// Debug-exit codes of the guest's requests to the VMM.
const REQ_FAULT: u32 = 0x10;
const REQ_INVLPG: u32 = 0x11;
const REQ_CR3: u32 = 0x12;

/// Verdicts of the VMM for a #PF, and result kinds.
const VERDICT_RETRY: u64 = 0;
const KIND_GUEST_PF: u64 = 14;
const KIND_EMULATED: u64 = 0xe0;
const KIND_DONE: u64 = 6;

/// A pool cell: `mov eax, imm32; ud2; nop` (8 bytes), so that a read sees
/// a value unique to the cell, a fetch executes it (and reports the
/// immediate in RAX), and a write of the immediate (at cell + 1) changes
/// what both see.
fn cell(gpa: u64) -> [u8; 8] {
    let id = (gpa as u32) ^ 0x5eed_0000;
    let b = id.to_le_bytes();
    [0xb8, b[0], b[1], b[2], b[3], 0x0f, 0x0b, 0x90]
}

/// A VM over (a clone of) `memory` with one vCPU configured for long mode
/// (the caller then loads its own registers).
fn vm_over(memory: &GuestMemoryMmap) -> (Vm, Vcpu) {
    long_mode_vm(memory, SCRATCH_GDT, SHADOW)
}

// ---------------------------------------------------------------------
// The guest.
// ---------------------------------------------------------------------

struct GuestCode {
    kernel: Vec<u8>,
    user: Vec<u8>,
    kernel_stubs: Stubs,
    user_stubs: Stubs,
    /// `invlpg [rbx]`, report it, `ud2`.
    invlpg: u64,
    invlpg_ud: u64,
    /// Report a CR3 load of `rbx`, `ud2`.
    cr3: u64,
    cr3_ud: u64,
    pf: u64,
    ud: u64,
    other: u64,
}

/// The driver loop runs operation `r12` (`COUNT` of them): it loads RBX
/// (the address, or the CR3 value), RAX (the value a write stores) and an
/// `iretq` frame (stub RIP, CS, RFLAGS, SS) and enters the stub at CPL0 or
/// CPL3. Every operation ends in an exception:
/// - #UD (the `ud2` after a data access or a report, or the `ud2` of the
///   fetched pool cell): recorded as done with RIP and RAX;
/// - #PF: CR2, the error code and the operation go to the mailbox and the
///   VMM is asked (`REQ_FAULT`); verdict 0 retries the access (the frame is
///   returned to), any other verdict is the result kind, recorded with the
///   error code and CR2 the VMM left in the mailbox.
fn guest_code() -> GuestCode {
    use iced_x86::code_asm::*;
    use iced_x86::BlockEncoderOptions;
    let port = common::EXIT_PORT as u32;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut next = a.create_label();
    let mut done = a.create_label();
    let mut pf = a.create_label();
    let mut give_up = a.create_label();
    let mut ud = a.create_label();
    let mut other = a.create_label();
    let mut invlpg = a.create_label();
    let mut invlpg_ud = a.create_label();
    let mut report_cr3 = a.create_label();
    let mut cr3_ud = a.create_label();
    let mut build = |a: &mut CodeAssembler| -> Result<[CodeLabel; 5], IcedError> {
        emit_driver_entry(a, &mut next, done, COUNT, OPS, OP_BYTES)?;

        // #PF: error code, RIP, CS, RFLAGS, RSP, SS on the stack.
        a.set_label(&mut pf)?;
        a.mov(qword_ptr(MB_RAX), rax)?;
        a.mov(rax, cr2)?;
        a.mov(qword_ptr(MB_CR2), rax)?;
        a.mov(rax, qword_ptr(rsp))?;
        a.mov(qword_ptr(MB_ERR), rax)?;
        a.mov(qword_ptr(MB_OP), r12)?;
        a.mov(al, REQ_FAULT)?;
        a.out(port, al)?;
        a.mov(rax, qword_ptr(MB_VERDICT))?;
        a.test(rax, rax)?;
        a.jnz(give_up)?;
        a.mov(rax, qword_ptr(MB_RAX))?;
        a.add(rsp, 8)?;
        a.iretq()?;
        a.set_label(&mut give_up)?;
        a.mov(rdx, rax)?;
        a.imul_3(rax, r12, RESULT_BYTES as i32)?;
        a.mov(qword_ptr(rax + RESULTS as i32), rdx)?;
        a.mov(rdx, qword_ptr(MB_ERR))?;
        a.mov(qword_ptr(rax + (RESULTS + 8) as i32), rdx)?;
        a.mov(rdx, qword_ptr(MB_CR2))?;
        a.mov(qword_ptr(rax + (RESULTS + 16) as i32), rdx)?;
        a.mov(rdx, qword_ptr(rsp + 8))?;
        a.mov(qword_ptr(rax + (RESULTS + 24) as i32), rdx)?;
        a.inc(r12)?;
        a.jmp(next)?;

        // #UD: RIP, ... (no error code).
        a.set_label(&mut ud)?;
        a.mov(rdx, rax)?;
        a.imul_3(rax, r12, RESULT_BYTES as i32)?;
        a.mov(qword_ptr(rax + RESULTS as i32), KIND_DONE as i32)?;
        a.mov(qword_ptr(rax + (RESULTS + 32) as i32), rdx)?;
        a.mov(rdx, qword_ptr(rsp))?;
        a.mov(qword_ptr(rax + (RESULTS + 24) as i32), rdx)?;
        a.inc(r12)?;
        a.jmp(next)?;

        a.set_label(&mut other)?;
        a.mov(rax, qword_ptr(rsp))?;
        a.mov(qword_ptr(MB_DEBUG), rax)?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.mov(qword_ptr(MB_DEBUG + 8), rax)?;
        a.mov(eax, GUEST_UNEXPECTED_VECTOR)?;
        a.out(port, al)?;
        a.set_label(&mut done)?;
        a.mov(eax, GUEST_DONE)?;
        a.out(port, al)?;

        a.set_label(&mut invlpg)?;
        a.invlpg(byte_ptr(rbx))?;
        a.mov(qword_ptr(MB_ARG), rbx)?;
        a.mov(al, REQ_INVLPG)?;
        a.out(port, al)?;
        a.set_label(&mut invlpg_ud)?;
        a.ud2()?;
        a.set_label(&mut report_cr3)?;
        a.mov(qword_ptr(MB_ARG), rbx)?;
        a.mov(al, REQ_CR3)?;
        a.out(port, al)?;
        a.set_label(&mut cr3_ud)?;
        a.ud2()?;
        emit_stubs(a, StubWidth::Wide)
    };
    let kernel_labels = build(&mut a).unwrap();
    let kernel = a
        .assemble_options(
            KERNEL_CODE,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    let (user, user_stubs) = user_stubs(StubWidth::Wide);
    let ip = |l: &CodeLabel| kernel.label_ip(l).unwrap();
    let code = GuestCode {
        kernel_stubs: stubs_at(&kernel, &kernel_labels),
        user_stubs,
        invlpg: ip(&invlpg),
        invlpg_ud: ip(&invlpg_ud),
        cr3: ip(&report_cr3),
        cr3_ud: ip(&cr3_ud),
        pf: ip(&pf),
        ud: ip(&ud),
        other: ip(&other),
        kernel: kernel.inner.code_buffer.clone(),
        user,
    };
    assert!(KERNEL_CODE + code.kernel.len() as u64 <= USER_CODE);
    code
}

/// GDT (null, null, kernel code/data, 64-bit TSS, user data/code), TSS
/// with RSP0, IDT with #UD/#PF handlers (every other exception vector
/// leaves the guest), code, and the pool of cells.
fn write_guest(memory: &GuestMemoryMmap, code: &GuestCode) {
    write_descriptor_tables(memory, |vector| match vector {
        6 => code.ud,
        14 => code.pf,
        _ => code.other,
    });
    memory
        .write_slice(&code.kernel, GuestAddress(KERNEL_CODE))
        .unwrap();
    memory
        .write_slice(&code.user, GuestAddress(USER_CODE))
        .unwrap();
    let pool: Vec<u8> = (POOL..POOL_END).step_by(8).flat_map(cell).collect();
    memory.write_slice(&pool, GuestAddress(POOL)).unwrap();
}

// ---------------------------------------------------------------------
// The guest's address spaces.
// ---------------------------------------------------------------------

/// A test page of a guest address space and its leaf entry.
#[derive(Debug, Clone, Copy)]
struct Page {
    gva: u64,
    size: PageSize,
    leaf: u64,
}

/// Clustered lower-half addresses (PML4 slot 0 is the kernel's), so that
/// mappings share tables and holes sit next to mapped pages.
fn random_gva(rng: &mut Rng, size: PageSize) -> u64 {
    let l4 = rng.pick(&[1u64, 2, 3, 255]);
    let l3 = rng.pick(&[0u64, 1, 511]);
    let l2 = rng.pick(&[0u64, 1, 2, 3, 511]);
    let l1 = if rng.chance(70) {
        rng.below(8)
    } else {
        rng.below(512)
    };
    ((l4 << 39) | (l3 << 30) | (l2 << 21) | (l1 << 12)) & !(size.bytes() - 1)
}

fn pool_frame(rng: &mut Rng, size: PageSize) -> u64 {
    POOL + rng.below((POOL_END - POOL) / size.bytes()) * size.bytes()
}

/// One guest address space: its root and test pages.
fn build_space(
    rng: &mut Rng,
    memory: &GuestMemoryMmap,
    features: &CpuFeatures,
    area: u64,
) -> (u64, Vec<Page>) {
    memory
        .write_slice(&vec![0u8; TABLES_LEN as usize], GuestAddress(area))
        .unwrap();
    let mut b =
        PageTableBuilder::new(memory, TableFormat::Level4, GuestAddress(area), TABLES_LEN).unwrap();
    let kernel = PageFlags::default();
    b.map(0, 0, PageSize::Size2M, kernel).unwrap();
    let stubs = PageFlags {
        writable: false,
        user: true,
        ..kernel
    };
    b.map(USER_STUBS, USER_CODE, PageSize::Size4K, stubs)
        .unwrap();
    let mut mapped = Vec::new();
    for _ in 0..48 {
        let size = if rng.chance(25) {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        let gva = random_gva(rng, size);
        let flags = PageFlags {
            writable: rng.chance(60),
            user: rng.chance(60),
            executable: rng.chance(60),
            pkey: 0,
        };
        if b.map(gva, pool_frame(rng, size), size, flags).is_ok() {
            mapped.push((gva, size));
        }
    }
    let root = b.root();
    let ctx = PagingContext::new(&guest_regs(root, true), features).unwrap();
    preset_accessed(memory, &ctx, 0);
    preset_accessed(memory, &ctx, USER_STUBS);
    let pages = mapped
        .into_iter()
        .map(|(gva, size)| {
            let t = ctx
                .walk(
                    memory,
                    gva,
                    Access::read(Privilege::Supervisor),
                    WalkMode::Probe,
                )
                .unwrap();
            Page {
                gva,
                size,
                leaf: t.entries.leaf().unwrap().gpa,
            }
        })
        .collect();
    (root, pages)
}

/// The control registers the guest believes in (IA-32e paging, NXE).
fn guest_regs(root: u64, wp: bool) -> ControlRegs {
    let mut cr0 = ControlRegs::CR0_PE | ControlRegs::CR0_PG;
    if wp {
        cr0 |= ControlRegs::CR0_WP;
    }
    ControlRegs {
        cr0,
        cr3: root,
        cr4: ControlRegs::CR4_PAE,
        efer: ControlRegs::EFER_LME | ControlRegs::EFER_LMA | ControlRegs::EFER_NXE,
        ..ControlRegs::default()
    }
}

// ---------------------------------------------------------------------
// Operations and their predicted outcomes.
// ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Op {
    Access {
        gva: u64,
        kind: AccessKind,
        user: bool,
        value: u32,
    },
    Invlpg {
        gva: u64,
    },
    LoadCr3 {
        space: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Success: RIP of the `ud2` that ended it, and RAX when it says
    /// something (the value read, the fetched cell's immediate).
    Done { rip: u64, rax: Option<u64> },
    /// The guest's own #PF, as the VMM injected it.
    PageFault { error_code: u64, cr2: u64 },
    /// The VMM emulated the access.
    Emulated,
    /// Anything else (the raw result record).
    Other([u64; 5]),
}

fn outcome_of(record: [u64; 5], expected: &Outcome) -> Outcome {
    match record[0] {
        KIND_DONE => Outcome::Done {
            rip: record[3],
            rax: match expected {
                Outcome::Done { rax: Some(_), .. } => Some(record[4]),
                _ => None,
            },
        },
        KIND_GUEST_PF => Outcome::PageFault {
            error_code: record[1],
            cr2: record[2],
        },
        KIND_EMULATED => Outcome::Emulated,
        _ => Outcome::Other(record),
    }
}

fn privilege(user: bool) -> Privilege {
    if user {
        Privilege::User
    } else {
        Privilege::Supervisor
    }
}

/// What `walk` predicts for `op` in `ctx`, applying its effects (A/D bits,
/// written bytes) to `sim`.
fn predict(ctx: &PagingContext, sim: &GuestMemoryMmap, op: &Op, code: &GuestCode) -> Outcome {
    match *op {
        Op::Invlpg { .. } => Outcome::Done {
            rip: code.invlpg_ud,
            rax: None,
        },
        Op::LoadCr3 { .. } => Outcome::Done {
            rip: code.cr3_ud,
            rax: None,
        },
        Op::Access {
            gva,
            kind,
            user,
            value,
        } => {
            let stubs = if user {
                code.user_stubs
            } else {
                code.kernel_stubs
            };
            match ctx.walk(
                sim,
                gva,
                Access::new(kind, privilege(user)),
                WalkMode::Update,
            ) {
                Ok(t) => match kind {
                    AccessKind::Read => Outcome::Done {
                        rip: stubs.read_ud,
                        rax: Some(sim.read_obj::<u64>(GuestAddress(t.gpa)).unwrap()),
                    },
                    AccessKind::Fetch => Outcome::Done {
                        rip: gva + 5,
                        rax: Some(u64::from(
                            sim.read_obj::<u32>(GuestAddress(t.gpa + 1)).unwrap(),
                        )),
                    },
                    AccessKind::Write => {
                        sim.write_obj(value, GuestAddress(t.gpa)).unwrap();
                        if t.writable {
                            Outcome::Done {
                                rip: stubs.write_ud,
                                rax: None,
                            }
                        } else {
                            // A supervisor write to a read-only page with
                            // the guest's CR0.WP = 0: the shadow tables
                            // cannot express it, the VMM emulates it.
                            Outcome::Emulated
                        }
                    }
                },
                Err(WalkError::PageFault {
                    error_code,
                    address,
                }) => Outcome::PageFault {
                    error_code: u64::from(error_code.bits()),
                    cr2: address,
                },
                Err(e) => panic!("walk failed on {op:x?}: {e}"),
            }
        }
    }
}

fn write_ops(memory: &GuestMemoryMmap, ops: &[Op], roots: &[u64; 2], code: &GuestCode) {
    assert!(ops.len() as u64 <= MAX_OPS);
    for (i, op) in ops.iter().enumerate() {
        let kernel = |rip: u64, rbx: u64| Entry {
            rbx,
            rip,
            user: false,
            rax: 0,
        };
        let entry = match *op {
            Op::Access {
                gva,
                kind,
                user,
                value,
            } => {
                let stubs = if user {
                    code.user_stubs
                } else {
                    code.kernel_stubs
                };
                Entry {
                    rbx: gva,
                    rip: stubs.entry(kind),
                    user,
                    rax: u64::from(value),
                }
            }
            Op::Invlpg { gva } => kernel(code.invlpg, gva),
            Op::LoadCr3 { space } => kernel(code.cr3, roots[space]),
        };
        write_driver_entry(memory, OPS + i as u64 * OP_BYTES, &entry);
        // Poison the result record.
        memory
            .write_obj(0xdead_u64, GuestAddress(RESULTS + i as u64 * RESULT_BYTES))
            .unwrap();
    }
    memory
        .write_obj(ops.len() as u64, GuestAddress(COUNT))
        .unwrap();
}

/// An access to a random cell of a mapped page (or of the holes around
/// them).
fn random_access(rng: &mut Rng, pages: &[Page]) -> Op {
    let gva = if rng.chance(85) {
        let p = rng.pick(pages);
        p.gva + (rng.below(p.size.bytes() / 8) * 8)
    } else {
        random_gva(rng, PageSize::Size4K) + rng.below(512) * 8
    };
    let kind = rng.pick(&[AccessKind::Read, AccessKind::Write, AccessKind::Fetch]);
    Op::Access {
        // A write stores the cell's immediate (bytes 1..5).
        gva: if kind == AccessKind::Write {
            gva + 1
        } else {
            gva
        },
        kind,
        user: rng.chance(50),
        value: rng.next() as u32,
    }
}

/// The 8-byte entries that differ between two copies of a memory range
/// starting at `base`.
fn diff_entries(base: u64, expected: &[u8], got: &[u8], what: &str) -> Vec<String> {
    diff_qwords(base, expected, got)
        .into_iter()
        .map(|(at, e, g)| {
            format!("{what}: qword at {at:#x}: walk(Update) {e:#x}, guest on shadow tables {g:#x}")
        })
        .collect()
}

fn read_range(memory: &GuestMemoryMmap, base: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    memory.read_slice(&mut v, GuestAddress(base)).unwrap();
    v
}

// ---------------------------------------------------------------------
// The VMM side.
// ---------------------------------------------------------------------

/// Counts of the whole run.
#[derive(Debug, Default)]
struct Counts {
    ops: usize,
    accesses: usize,
    shadow_faults: usize,
    mapped: usize,
    injected: usize,
    emulated: usize,
    invlpg_reports: usize,
    cr3_reports: usize,
    pte_changes: usize,
    observed_writes: usize,
    vm_switches: usize,
    /// Writes to a page mapped read-only because it was clean: one more
    /// fault, which sets D.
    dirty_faults: usize,
}

/// The vCPU and the VM it currently runs in.
struct Machine {
    memory: GuestMemoryMmap,
    vm: Vm,
    vcpu: Vcpu,
}

impl Machine {
    /// Moves the vCPU to a fresh VM over the same memory with CR3 =
    /// `shadow_root`: the VMM's "flush its own TLB" on this host (see the
    /// module documentation). With `one_vm`, only CR3 is reloaded.
    fn flush(&mut self, shadow_root: u64, one_vm: bool, counts: &mut Counts) {
        self.vcpu.complete_pending_io().unwrap();
        let regs = self.vcpu.regs().unwrap();
        let mut sregs = self.vcpu.sregs().unwrap();
        sregs.cr3 = shadow_root;
        if !one_vm {
            let (vm, vcpu) = vm_over(&self.memory);
            self.vm = vm;
            self.vcpu = vcpu;
            counts.vm_switches += 1;
        }
        self.load(&sregs, &regs);
    }

    fn load(&self, sregs: &kvm_sregs, regs: &kvm_regs) {
        self.vcpu.set_sregs(sregs).unwrap();
        self.vcpu.set_regs(regs).unwrap();
        let back = self.vcpu.sregs().unwrap();
        assert_eq!(back.cr3, sregs.cr3, "KVM did not take CR3");
    }
}

/// Pre-faults the kernel's pages into the shadow tables of the current
/// address space, and returns its shadow root.
fn prefault_kernel(mmu: &mut ShadowMmu<'_, GuestMemoryMmap>, memory: &GuestMemoryMmap) -> u64 {
    let host = IdentityMap(memory);
    let mut root = None;
    for page in (GDT..KERNEL_END).step_by(4096) {
        let access = Access::write(Privilege::Supervisor);
        match mmu.fault(&host, page, access).unwrap() {
            FaultOutcome::Mapped { shadow_root, .. } => root = Some(shadow_root),
            other => panic!("kernel page {page:#x}: {other:?}"),
        }
    }
    let stubs = mmu
        .fault(&host, USER_STUBS, Access::fetch(Privilege::User))
        .unwrap();
    assert!(matches!(stubs, FaultOutcome::Mapped { shadow_root, .. } if Some(shadow_root) == root));
    root.unwrap()
}

/// Per operation, what the VMM saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// #PF reports answered with `Mapped`.
    mapped: u32,
    /// Reports answered with `GuestFault` or `Emulate`.
    final_faults: u32,
    /// Reports at an address outside the operation's page.
    stray: Vec<u64>,
}

#[test]
fn guest_runs_on_shadow_page_tables() {
    require_kvm!();
    let _dog = common::watchdog(
        "guest_runs_on_shadow_page_tables",
        std::time::Duration::from_secs(240),
    );
    let seed = seed();
    let mut rng = Rng(seed);
    let one_vm = std::env::var("VMKIT_SHADOW_KVM_ONE_VM").as_deref() == Ok("1");
    let started = std::time::Instant::now();
    let code = guest_code();
    let bus = common::bus();
    let memory = new_memory();
    let (vm, vcpu) = vm_over(&memory);
    let features = guest_paging(&vcpu).features;
    write_guest(&memory, &code);
    let (root_a, pages_a) = build_space(&mut rng, &memory, &features, TABLES[0]);
    let (root_b, pages_b) = build_space(&mut rng, &memory, &features, TABLES[1]);
    let roots = [root_a, root_b];
    let host = IdentityMap(&memory);
    let config = ShadowConfig {
        capacity: 8192,
        max_spaces: 4,
        shadow_area: Some((GuestAddress(SHADOW), SHADOW_LEN)),
    };
    let mut wp = true;
    let mut mmu = ShadowMmu::new(&memory, &guest_regs(roots[0], wp), &features, &config).unwrap();
    let mut space = 0usize;
    let mut machine = Machine {
        memory: memory.clone(),
        vm,
        vcpu,
    };
    let mut counts = Counts::default();
    let mut mismatches: Vec<String> = Vec::new();
    let mut outcomes = BTreeMap::<String, usize>::new();
    let mut ad_updates = 0usize;
    let mut wp_off_rounds = 0usize;
    // Operations whose outcome in the guest differs from the prediction.
    let mut op_mismatches = 0usize;
    const ROUNDS: usize = 12;
    const OPS_PER_ROUND: usize = 160;

    for round in 0..ROUNDS {
        // --- Between rounds: the guest OS changes its tables. ---
        let mut invlpg_first = Vec::new();
        if round > 0 {
            if rng.chance(30) {
                wp = !wp;
                // What a MOV CR0 by the guest would report.
                let mut regs = *mmu.control_regs();
                regs.cr0 ^= ControlRegs::CR0_WP;
                mmu.set_control_regs(&regs, &features).unwrap();
            }
            for _ in 0..10 {
                let which = rng.below(2) as usize;
                let pages = if which == 0 { &pages_a } else { &pages_b };
                let page = rng.pick(pages);
                let old: u64 = memory.read_obj(GuestAddress(page.leaf)).unwrap();
                let addr_mask = ((1u64 << 52) - 1) & !(page.size.bytes() - 1);
                let new = match rng.below(6) {
                    0 => old & !1,
                    1 => old | 1,
                    2 => old & !2,
                    3 => old | 2 | 4,
                    4 => old ^ (1 << 63) ^ 4,
                    _ => (old & !addr_mask) | pool_frame(&mut rng, page.size),
                };
                memory.write_obj(new, GuestAddress(page.leaf)).unwrap();
                counts.pte_changes += 1;
                if which == space && rng.chance(50) {
                    // The guest will execute (and report) INVLPG of some
                    // address in the page before anything else.
                    invlpg_first.push(Op::Invlpg {
                        gva: page.gva + rng.below(page.size.bytes() / 8) * 8,
                    });
                } else if rng.chance(25) {
                    mmu.observe_write(page.leaf & !0xfff, 4096);
                    counts.observed_writes += 1;
                } else {
                    mmu.observe_write(page.leaf, 8);
                    counts.observed_writes += 1;
                }
            }
        }

        // --- The round's operations. ---
        let mut ops = invlpg_first;
        let switch_at = if rng.chance(80) {
            Some(ops.len() + rng.below(OPS_PER_ROUND as u64) as usize)
        } else {
            None
        };
        let mut cur = space;
        while ops.len() < OPS_PER_ROUND + 4 {
            if Some(ops.len()) == switch_at {
                let target = if rng.chance(80) { 1 - cur } else { cur };
                ops.push(Op::LoadCr3 { space: target });
                cur = target;
                continue;
            }
            let pages = if cur == 0 { &pages_a } else { &pages_b };
            if rng.chance(2) {
                let p = rng.pick(pages);
                ops.push(Op::Invlpg { gva: p.gva });
            } else {
                ops.push(random_access(&mut rng, pages));
            }
        }
        write_ops(&memory, &ops, &roots, &code);

        // The prediction, on a copy of guest memory taken before the run.
        let sim = new_memory();
        sim.write_slice(&read_range(&memory, 0, RAM), GuestAddress(0))
            .unwrap();
        let ctxs = [
            PagingContext::new(&guest_regs(roots[0], wp), &features).unwrap(),
            PagingContext::new(&guest_regs(roots[1], wp), &features).unwrap(),
        ];
        let mut cur = space;
        let expected: Vec<(usize, Outcome)> = ops
            .iter()
            .map(|op| {
                let at = cur;
                if let Op::LoadCr3 { space } = op {
                    cur = *space;
                }
                (at, predict(&ctxs[at], &sim, op, &code))
            })
            .collect();

        let tables_before = [
            read_range(&memory, TABLES[0], TABLES_LEN),
            read_range(&memory, TABLES[1], TABLES_LEN),
        ];
        if !wp {
            wp_off_rounds += 1;
        }

        // --- Run the round on a fresh VM over the shadow tables. ---
        let shadow_root = prefault_kernel(&mut mmu, &memory);
        if one_vm {
            machine.vcpu.complete_pending_io().unwrap();
        } else {
            let (vm, vcpu) = vm_over(&memory);
            machine.vm = vm;
            machine.vcpu = vcpu;
            counts.vm_switches += 1;
        }
        let mut sregs = machine.vcpu.sregs().unwrap();
        sregs.cr0 |= ControlRegs::CR0_WP;
        sregs.cr3 = shadow_root;
        sregs.efer |= ControlRegs::EFER_NXE;
        let mut regs = machine.vcpu.regs().unwrap();
        enter_kernel(&mut sregs, &mut regs);
        machine.load(&sregs, &regs);

        let mut seen = vec![Seen::default(); ops.len()];
        // (space, 4 KiB page) → the shadow leaf allows writes.
        let mut filled: HashMap<(usize, u64), bool> = HashMap::new();
        let mut fills_before: Vec<Option<bool>> = vec![None; ops.len()];
        let mut last_op = usize::MAX;
        let mut exits = 0usize;
        loop {
            exits += 1;
            assert!(exits < 100_000, "round {round}: the guest does not end");
            let stop = machine.vcpu.run(&bus).unwrap();
            let read = |at: u64| memory.read_obj::<u64>(GuestAddress(at)).unwrap();
            match stop {
                StopReason::Exit(GUEST_DONE) => break,
                StopReason::Exit(REQ_FAULT) => {
                    let (cr2, err, op) = (read(MB_CR2), read(MB_ERR), read(MB_OP) as usize);
                    if op != last_op && op < ops.len() {
                        if let Op::Access { gva, .. } = ops[op] {
                            fills_before[op] = filled.get(&(space, gva >> 12)).copied();
                        }
                        last_op = op;
                    }
                    let kind = if err & 0x10 != 0 {
                        AccessKind::Fetch
                    } else if err & 2 != 0 {
                        AccessKind::Write
                    } else {
                        AccessKind::Read
                    };
                    let access = Access::new(kind, privilege(err & 4 != 0));
                    counts.shadow_faults += 1;
                    let s = &mut seen[op.min(ops.len() - 1)];
                    if !matches!(ops.get(op), Some(Op::Access { gva, .. }) if gva >> 12 == cr2 >> 12)
                    {
                        s.stray.push(cr2);
                    }
                    let verdict = match mmu.fault(&host, cr2, access).unwrap() {
                        FaultOutcome::Mapped {
                            shadow_root,
                            translation,
                        } => {
                            assert_eq!(
                                shadow_root,
                                machine.vcpu.sregs().unwrap().cr3,
                                "round {round}: the shadow root moved under the running guest"
                            );
                            s.mapped += 1;
                            counts.mapped += 1;
                            filled.insert(
                                (space, cr2 >> 12),
                                translation.writable && translation.dirty,
                            );
                            VERDICT_RETRY
                        }
                        FaultOutcome::GuestFault {
                            error_code,
                            address,
                        } => {
                            s.final_faults += 1;
                            counts.injected += 1;
                            memory
                                .write_obj(u64::from(error_code.bits()), GuestAddress(MB_ERR))
                                .unwrap();
                            memory.write_obj(address, GuestAddress(MB_CR2)).unwrap();
                            KIND_GUEST_PF
                        }
                        FaultOutcome::Emulate { translation } => {
                            s.final_faults += 1;
                            counts.emulated += 1;
                            // Emulate the one write: store the operation's
                            // value where the guest's tables send it.
                            match (ops.get(op), translation.host) {
                                (
                                    Some(Op::Access {
                                        kind: AccessKind::Write,
                                        value,
                                        ..
                                    }),
                                    Some(h),
                                ) if kind == AccessKind::Write => {
                                    memory.write_obj(*value, GuestAddress(h)).unwrap();
                                }
                                _ => mismatches.push(format!(
                                    "round {round} op {op}: cannot emulate {access:?} at {cr2:#x}: {translation:?}"
                                )),
                            }
                            KIND_EMULATED
                        }
                        FaultOutcome::Mmio { gpa } => {
                            mismatches.push(format!(
                                "round {round} op {op}: MMIO at {gpa:#x} for {cr2:#x}"
                            ));
                            s.final_faults += 1;
                            0xbad
                        }
                    };
                    memory
                        .write_obj(verdict, GuestAddress(MB_VERDICT))
                        .unwrap();
                    if mmu.stats().shadow_resets != 0 {
                        panic!("round {round}: the shadow area filled up");
                    }
                }
                StopReason::Exit(REQ_INVLPG) => {
                    counts.invlpg_reports += 1;
                    mmu.invlpg(read(MB_ARG));
                    filled.clear();
                    let root = mmu.shadow_root().unwrap();
                    machine.flush(root, one_vm, &mut counts);
                }
                StopReason::Exit(REQ_CR3) => {
                    counts.cr3_reports += 1;
                    let cr3 = read(MB_ARG);
                    mmu.load_cr3(cr3).unwrap();
                    space = roots.iter().position(|&r| r == cr3).unwrap();
                    filled.clear();
                    let root = prefault_kernel(&mut mmu, &memory);
                    machine.flush(root, one_vm, &mut counts);
                }
                other => panic!(
                    "round {round}: guest stopped with {other:?}; mailbox debug {:#x} {:#x}; last op {last_op}",
                    read(MB_DEBUG),
                    read(MB_DEBUG + 8)
                ),
            }
        }

        // --- Compare. ---
        let what = format!("round {round} (wp {wp})");
        for (i, (op, (at, want))) in ops.iter().zip(&expected).enumerate() {
            let mut record = [0u64; 5];
            for (j, v) in record.iter_mut().enumerate() {
                let at = RESULTS + i as u64 * RESULT_BYTES + 8 * j as u64;
                *v = memory.read_obj(GuestAddress(at)).unwrap();
            }
            let got = outcome_of(record, want);
            let key = match want {
                Outcome::PageFault { error_code, .. } => format!("#PF {error_code:#04x}"),
                Outcome::Done { .. } => match op {
                    Op::Access { kind, .. } => format!("{kind:?}"),
                    Op::Invlpg { .. } => "invlpg".to_string(),
                    Op::LoadCr3 { .. } => "cr3".to_string(),
                },
                Outcome::Emulated => "emulated".to_string(),
                Outcome::Other(_) => "other".to_string(),
            };
            *outcomes.entry(key).or_default() += 1;
            if got != *want {
                op_mismatches += 1;
                mismatches.push(format!(
                    "{what}: op {i} {op:x?} in space {at}: guest {got:x?}, walk {want:x?}"
                ));
            }
            let s = &seen[i];
            if !s.stray.is_empty() {
                mismatches.push(format!(
                    "{what}: op {i} {op:x?}: faults at other addresses {:x?}",
                    s.stray
                ));
            }
            if let Op::Access { kind, .. } = op {
                counts.accesses += 1;
                // Faults per access: at most one shadow fault that maps
                // something, none when the page was already mapped with
                // the rights the access needs, and exactly one final
                // fault for an injected or emulated one.
                let finals = match want {
                    Outcome::PageFault { .. } | Outcome::Emulated => 1,
                    _ => 0,
                };
                let needs_write = *kind == AccessKind::Write;
                let max_mapped = match (want, fills_before[i]) {
                    (Outcome::Done { .. }, Some(rw)) if rw || !needs_write => 0,
                    (Outcome::Done { .. }, _) => 1,
                    _ => 0,
                };
                if needs_write && fills_before[i] == Some(false) && s.mapped == 1 {
                    counts.dirty_faults += 1;
                }
                if s.mapped > max_mapped || s.final_faults != finals {
                    mismatches.push(format!(
                        "{what}: op {i} {op:x?}: {} mapping faults (at most {max_mapped}), {} final faults (want {finals}); mapped before: {:?}",
                        s.mapped, s.final_faults, fills_before[i]
                    ));
                }
            }
        }
        // Accessed/dirty bits of both address spaces, and the pool's bytes.
        for (base, before) in TABLES.iter().zip(&tables_before) {
            let got = read_range(&memory, *base, TABLES_LEN);
            let want = read_range(&sim, *base, TABLES_LEN);
            mismatches.extend(diff_entries(*base, &want, &got, &what));
            ad_updates += diff_entries(*base, before, &got, "").len();
        }
        let got = read_range(&memory, POOL, POOL_END - POOL);
        let want = read_range(&sim, POOL, POOL_END - POOL);
        mismatches.extend(diff_entries(POOL, &want, &got, &format!("{what} pool")));
        counts.ops += ops.len();
        if mismatches.len() > 200 {
            break;
        }
    }
    let stats = mmu.stats();
    eprintln!(
        "shadow MMU under KVM (seed {seed:#x}, one VM: {one_vm}): {} ops ({} accesses) in {:?}; {} shadow faults: {} mapped ({} of them writes to clean pages), {} guest #PF injected, {} emulated; {} invalidated entries; {} invlpg and {} CR3 loads reported by the guest; {} PTE changes, {} observe_write; {} VM switches (TLB flushes); shadow stats {stats:?}; outcomes {outcomes:?}; {} mismatches",
        counts.ops,
        counts.accesses,
        started.elapsed(),
        counts.shadow_faults,
        counts.mapped,
        counts.dirty_faults,
        counts.injected,
        counts.emulated,
        stats.invalidations,
        counts.invlpg_reports,
        counts.cr3_reports,
        counts.pte_changes,
        counts.observed_writes,
        counts.vm_switches,
        mismatches.len()
    );
    common::oracle_summary("shadow_on_kvm", counts.ops, counts.ops - op_mismatches, 0);
    for m in mismatches.iter().take(30) {
        eprintln!("MISMATCH {m}");
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches (seed {seed:#x})",
        mismatches.len()
    );
    // Not vacuous: every path was taken.
    assert!(counts.accesses >= 1500, "{counts:?}");
    assert!(counts.mapped > 0 && counts.injected > 0, "{counts:?}");
    assert!(
        counts.invlpg_reports > 0 && counts.cr3_reports > 0,
        "{counts:?}"
    );
    assert!(
        counts.pte_changes > 0 && counts.observed_writes > 0,
        "{counts:?}"
    );
    assert!(wp_off_rounds == 0 || counts.emulated > 0, "{counts:?}");
    assert!(ad_updates > 0);
}

// ---------------------------------------------------------------------
// Shadow tables composed with a nested (EPT or NPT) stage-2 map.
// ---------------------------------------------------------------------

/// Guest-virtual pages the stage-2 guest reads and writes (4 KiB each).
const S2_GVA: u64 = 0x0000_4000_0000;
const S2_PAGES: u64 = 6;
/// Their guest-physical frames (the guest's own tables map page `i` to
/// frame `i`)...
const S2_GPA: u64 = 0x100_0000;
/// ...and where stage 2 puts those frames: frame `i` at host page
/// `S2_HOST + (i * 5 % 8) * 4 KiB` (non-identity, shuffled).
const S2_HOST: u64 = 0x180_0000;
/// Spare host pages for the stage-2 edit.
const S2_SPARE: u64 = 0x1c0_0000;
/// Stage-2 tables (EPT or NPT format).
const S2_TABLES: u64 = 0x60_0000;
const S2_TABLES_LEN: u64 = 0x10_0000;
/// Stage 2 maps `0..S2_IDENTITY` to itself: the kernel, the guest's page
/// tables, the shadow area and the stage-2 tables. The shadow MMU walks the
/// guest's tables in (host) memory at their guest-physical addresses, so
/// its table pages must be where stage 2 puts them.
const S2_IDENTITY: u64 = 0x80_0000;
/// Where the guest stores what it read.
const S2_RESULTS: u64 = RESULTS;

fn s2_host_of(frame: u64) -> u64 {
    S2_HOST + (frame * 5 % 8) * 4096
}

/// A value that says which host page (and which run) it sits in.
fn s2_marker(host_page: u64) -> u64 {
    0x5eed_0000_0000_0000 | host_page
}

/// Either stage-2 builder.
enum Stage2Tables<'m> {
    Ept(EptBuilder<'m, GuestMemoryMmap>),
    Npt(NptBuilder<'m, GuestMemoryMmap>),
}

impl Stage2Tables<'_> {
    fn map(&mut self, gpa: u64, hpa: u64, size: PageSize) {
        match self {
            Stage2Tables::Ept(b) => b.map(gpa, hpa, size, EptFlags::default()).unwrap(),
            Stage2Tables::Npt(b) => b.map(gpa, hpa, size, NptFlags::default()).unwrap(),
        }
    }

    fn unmap(&mut self, gpa: u64, size: PageSize) {
        match self {
            Stage2Tables::Ept(b) => b.unmap(gpa, size).unwrap(),
            Stage2Tables::Npt(b) => b.unmap(gpa, size).unwrap(),
        }
    }

    fn context(&self) -> Stage2Context {
        match self {
            Stage2Tables::Ept(b) => EptContext::new(b.eptp(false), &EptCapabilities::default())
                .unwrap()
                .into(),
            Stage2Tables::Npt(b) => NptContext::new(b.ncr3(), &NptHost::default())
                .unwrap()
                .into(),
        }
    }
}

/// The shadow MMU's [`HostMap`] through a stage-2 map: a guest-physical
/// page's final address is where the EPT/NPT tables (read from memory on
/// every question) put it. `generation` is raised after every stage-2
/// edit.
struct Stage2Map<'m> {
    stage2: Stage2Context,
    memory: &'m GuestMemoryMmap,
    generation: u64,
}

impl HostMap for Stage2Map<'_> {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn host_page(&self, gpa_page: u64) -> Option<u64> {
        let access = Stage2Access::Data(AccessKind::Write);
        self.stage2
            .translate(self.memory, gpa_page, access, None, WalkMode::Probe)
            .ok()
            .map(|t| t.hpa & !0xfff)
    }
}

/// The stage-2 guest: reads the first qword of every `S2_GVA` page into
/// `S2_RESULTS`, writes `s2_write_value(i)` to the second qword of each,
/// and reports `GUEST_DONE`.
fn s2_guest_code(run: u64) -> Vec<u8> {
    use iced_x86::code_asm::*;
    common::assemble_at(64, KERNEL_CODE, |a| {
        for i in 0..S2_PAGES {
            a.mov(rbx, S2_GVA + i * 4096)?;
            a.mov(rax, qword_ptr(rbx))?;
            a.mov(qword_ptr(S2_RESULTS + 8 * i), rax)?;
            a.mov(rax, s2_write_value(run, i))?;
            a.mov(qword_ptr(rbx + 8), rax)?;
        }
        a.mov(al, GUEST_DONE)?;
        a.out(u32::from(common::EXIT_PORT), al)?;
        a.hlt()?;
        Ok(())
    })
}

fn s2_write_value(run: u64, i: u64) -> u64 {
    0x00c0_ffee_0000_0000 | run << 16 | i
}

/// Fills every page the guest touches into the shadow tables (so the guest
/// runs without a fault handler) and returns the shadow root.
fn s2_prefault(mmu: &mut ShadowMmu<'_, GuestMemoryMmap>, host: &Stage2Map<'_>) -> u64 {
    let mut root = None;
    let kernel = (GDT..KERNEL_END).step_by(4096).chain([SCRATCH_GDT]);
    let data = (0..S2_PAGES).map(|i| S2_GVA + i * 4096);
    for page in kernel.chain(data) {
        match mmu
            .fault(host, page, Access::write(Privilege::Supervisor))
            .unwrap()
        {
            FaultOutcome::Mapped { shadow_root, .. } => {
                assert!(root.is_none_or(|r| r == shadow_root));
                root = Some(shadow_root);
            }
            other => panic!("page {page:#x}: {other:?}"),
        }
    }
    root.unwrap()
}

/// Runs the guest of `run` in a fresh VM over `memory` with CR3 =
/// `shadow_root`. A fresh VM every time: kvm_pvm keeps its own shadow of
/// our shadow tables and does not see the host's edits of them (module
/// documentation), so after an invalidation the vCPU moves to a new VM.
fn s2_run(memory: &GuestMemoryMmap, shadow_root: u64, run: u64) {
    memory
        .write_slice(&s2_guest_code(run), GuestAddress(KERNEL_CODE))
        .unwrap();
    let (_vm, mut vcpu) = vm_over(memory);
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cr3 = shadow_root;
    vcpu.set_sregs(&sregs).unwrap();
    let bus = common::bus();
    match vcpu.run(&bus).unwrap() {
        StopReason::Exit(GUEST_DONE) => {}
        other => panic!(
            "run {run}: the stage-2 guest stopped with {other:?} at rip {:#x}",
            vcpu.regs().unwrap().rip
        ),
    }
}

/// Checks that run `run` read and wrote, for every guest page `i`, the host
/// page `expected[i]` (and nothing at the identity address of its frame);
/// returns what went wrong, one line per page at most.
fn s2_check(
    memory: &GuestMemoryMmap,
    frames: &[u64],
    expected: &[u64],
    run: u64,
    what: &str,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (i, (&frame, &host_page)) in frames.iter().zip(expected).enumerate() {
        let i = i as u64;
        let read: u64 = memory.read_obj(GuestAddress(S2_RESULTS + 8 * i)).unwrap();
        let written: u64 = memory.read_obj(GuestAddress(host_page + 8)).unwrap();
        let identity: u64 = memory.read_obj(GuestAddress(frame + 8)).unwrap();
        if read != s2_marker(host_page) {
            wrong.push(format!(
                "{what}: page {i} (frame {frame:#x}) read {read:#x}, not host page {host_page:#x}'s marker"
            ));
        } else if written != s2_write_value(run, i) {
            wrong.push(format!(
                "{what}: page {i}'s write did not land at host {host_page:#x} (found {written:#x})"
            ));
        } else if identity != 0 {
            wrong.push(format!(
                "{what}: page {i}'s write reached its frame {frame:#x} untranslated"
            ));
        }
    }
    wrong
}

/// The guest's accesses land where guest tables ∘ stage 2 say, before and
/// after a guest PTE edit and a stage-2 edit, each with its invalidation.
fn shadow_tables_compose_stage2(ept: bool) {
    let memory = new_memory();
    let (_vm, vcpu) = vm_over(&memory);
    let features = guest_paging(&vcpu).features;
    drop((_vm, vcpu));
    // The guest's own tables: the kernel identity-mapped by a 2 MiB page,
    // data page i at frame S2_GPA + i * 4 KiB.
    let mut tables = PageTableBuilder::new(
        &memory,
        TableFormat::Level4,
        GuestAddress(TABLES[0]),
        TABLES_LEN,
    )
    .unwrap();
    tables
        .map(0, 0, PageSize::Size2M, PageFlags::default())
        .unwrap();
    let mut frames: Vec<u64> = (0..S2_PAGES).map(|i| S2_GPA + i * 4096).collect();
    for (i, &frame) in frames.iter().enumerate() {
        let gva = S2_GVA + i as u64 * 4096;
        tables
            .map(gva, frame, PageSize::Size4K, PageFlags::default())
            .unwrap();
    }
    // Stage 2: identity below S2_IDENTITY, the frames shuffled elsewhere.
    let mut stage2 = if ept {
        Stage2Tables::Ept(
            EptBuilder::new(&memory, false, GuestAddress(S2_TABLES), S2_TABLES_LEN).unwrap(),
        )
    } else {
        Stage2Tables::Npt(
            NptBuilder::new(&memory, false, GuestAddress(S2_TABLES), S2_TABLES_LEN).unwrap(),
        )
    };
    for page in (0..S2_IDENTITY).step_by(2 << 20) {
        stage2.map(page, page, PageSize::Size2M);
    }
    for frame in 0..8 {
        stage2.map(S2_GPA + frame * 4096, s2_host_of(frame), PageSize::Size4K);
    }
    // Every candidate host page says who it is; the frames' identity
    // addresses hold zeros (nothing may reach them).
    for page in (S2_HOST..S2_HOST + 8 * 4096).step_by(4096) {
        memory
            .write_obj(s2_marker(page), GuestAddress(page))
            .unwrap();
    }
    memory
        .write_obj(s2_marker(S2_SPARE), GuestAddress(S2_SPARE))
        .unwrap();
    let mut host = Stage2Map {
        stage2: stage2.context(),
        memory: &memory,
        generation: 0,
    };
    let regs = guest_regs(tables.root(), true);
    let guest_ctx = PagingContext::new(&regs, &features).unwrap();
    let config = ShadowConfig {
        capacity: 1024,
        max_spaces: 1,
        shadow_area: Some((GuestAddress(SHADOW), SHADOW_LEN)),
    };
    let mut mmu = ShadowMmu::new(&memory, &regs, &features, &config).unwrap();

    // The composition, by the 2-D walker, for comparison.
    let composed = |host: &Stage2Map<'_>| -> Vec<u64> {
        (0..S2_PAGES)
            .map(|i| {
                let gva = S2_GVA + i * 4096;
                let access = Access::read(Privilege::Supervisor);
                walk_2d(
                    &guest_ctx,
                    &host.stage2,
                    &memory,
                    gva,
                    access,
                    WalkMode::Probe,
                )
                .unwrap()
                .hpa
            })
            .collect()
    };

    // Run 1: the initial mapping.
    let mut expected: Vec<u64> = (0..S2_PAGES).map(s2_host_of).collect();
    assert_eq!(composed(&host), expected, "2-D walk of the initial map");
    let root = s2_prefault(&mut mmu, &host);
    for i in 0..S2_PAGES {
        let t = mmu.peek(S2_GVA + i * 4096).unwrap();
        assert_eq!(
            t.host,
            Some(expected[i as usize]),
            "cached composition of page {i}"
        );
    }
    s2_run(&memory, root, 1);
    let mut wrong = s2_check(&memory, &frames, &expected, 1, "initial map");
    let mut cases = frames.len();

    // Run 2: the guest remaps page 0 to frame 6 (a PTE write the VMM
    // observed), and the VMM remaps frame 1 to the spare host page (a
    // stage-2 edit: the memory map changed).
    let pte = guest_ctx
        .walk(
            &memory,
            S2_GVA,
            Access::read(Privilege::Supervisor),
            WalkMode::Probe,
        )
        .unwrap()
        .entries
        .leaf()
        .unwrap()
        .gpa;
    tables.unmap(S2_GVA, PageSize::Size4K).unwrap();
    frames[0] = S2_GPA + 6 * 4096;
    tables
        .map(S2_GVA, frames[0], PageSize::Size4K, PageFlags::default())
        .unwrap();
    mmu.observe_write(pte, 8);
    stage2.unmap(frames[1], PageSize::Size4K);
    stage2.map(frames[1], S2_SPARE, PageSize::Size4K);
    host.generation += 1;
    mmu.memory_map_changed();
    assert!(
        mmu.peek(S2_GVA).is_none(),
        "the observed PTE write drops page 0"
    );
    expected[0] = s2_host_of(6);
    expected[1] = S2_SPARE;
    assert_eq!(composed(&host), expected, "2-D walk of the edited maps");
    let root = s2_prefault(&mut mmu, &host);
    for i in 0..S2_PAGES {
        let t = mmu.peek(S2_GVA + i * 4096).unwrap();
        assert_eq!(t.host, Some(expected[i as usize]), "re-composed page {i}");
    }
    // The old host page of frame 1 keeps run 1's write (run 2 went to the
    // spare page).
    s2_run(&memory, root, 2);
    wrong.extend(s2_check(&memory, &frames, &expected, 2, "after the edits"));
    cases += frames.len();
    common::oracle_summary(
        if ept {
            "shadow_compose_ept"
        } else {
            "shadow_compose_npt"
        },
        cases,
        cases - wrong.len(),
        0,
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
    let old: u64 = memory.read_obj(GuestAddress(s2_host_of(1) + 8)).unwrap();
    assert_eq!(
        old,
        s2_write_value(1, 1),
        "run 2 wrote to frame 1's old host page"
    );
}

#[test]
fn shadow_tables_compose_ept_stage2() {
    require_kvm!();
    shadow_tables_compose_stage2(true);
}

#[test]
fn shadow_tables_compose_npt_stage2() {
    require_kvm!();
    shadow_tables_compose_stage2(false);
}
