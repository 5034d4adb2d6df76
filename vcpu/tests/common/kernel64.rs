//! The 64-bit test kernel shared by the paging oracles (`paging_oracle`,
//! `shadow_kvm`): its memory layout, GDT/TSS/IDT, the access stubs it
//! enters at CPL0 or CPL3, the vCPU set-up and a few helpers around them.
//!
//! Layout (guest-physical, identity-mapped by the tests' own tables):
//! GDT at `GDT`, TSS at `TSS`, IDT at `IDT` with its IDTR image at `IDTR`,
//! a mailbox/counters page from `0x4100`, the kernel stack below
//! `KSTACK_TOP`, kernel code at `KERNEL_CODE`, the user stubs' page at
//! `USER_CODE` (mapped at `USER_STUBS`), and a pool of test pages
//! `POOL..POOL_END`.

use iced_x86::code_asm::{CodeAssembler, CodeAssemblerResult, CodeLabel};
use iced_x86::IcedError;
use vmkit_memory::paging::{
    Access, AccessKind, CpuFeatures, PagingContext, Privilege, Vendor, WalkMode,
};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::{GuestMemoryMmap, MemoryLayout};
use vmkit_vcpu::kvm_bindings::{kvm_regs, kvm_sregs};
use vmkit_vcpu::{BootConfig, CpuMode, Vcpu, Vm, VmConfig};

/// Guest RAM of every VM of these tests.
pub const RAM: u64 = 32 << 20;
pub const GDT: u64 = 0x1000;
/// Eight descriptors: null, null, kernel code/data, the 16-byte TSS
/// descriptor, user data/code.
pub const GDT_LIMIT: u16 = 8 * 8 - 1;
pub const TSS: u64 = 0x2000;
pub const IDT: u64 = 0x3000;
pub const IDTR: u64 = 0x4000;
pub const KSTACK_TOP: u64 = 0x8000;
pub const KERNEL_CODE: u64 = 0x10000;
/// The user stubs' page (physical); mapped at `USER_STUBS`.
pub const USER_CODE: u64 = 0x12000;
pub const USER_STUBS: u64 = 0x20_0000;
/// 4 KiB and 2 MiB test pages map into `POOL..POOL_END`.
pub const POOL: u64 = 0x80_0000;
pub const POOL_END: u64 = 0x100_0000;

pub const KERNEL_CS: u64 = 0x10;
pub const KERNEL_SS: u64 = 0x18;
pub const USER_SS: u64 = 0x30 | 3;
pub const USER_CS: u64 = 0x38 | 3;

/// Debug-exit codes of the guest.
pub const GUEST_DONE: u32 = 1;
pub const GUEST_UNEXPECTED_VECTOR: u32 = 0xee;

/// A small deterministic generator (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// `VMKIT_ORACLE_SEED` if set (and a number), else `default`.
pub fn oracle_seed(default: u64) -> u64 {
    std::env::var("VMKIT_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Paging-related properties of the vCPU, read from the CPUID table vmkit
/// gave it.
#[derive(Debug, Clone, Copy)]
pub struct GuestPaging {
    pub features: CpuFeatures,
    pub smep: bool,
    pub smap: bool,
    pub pku: bool,
    pub la57: bool,
}

pub fn guest_paging(vcpu: &Vcpu) -> GuestPaging {
    let cpuid = vcpu.cpuid().unwrap();
    let leaf = |function: u32, index: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
            .unwrap_or_default()
    };
    let vendor_ebx = leaf(0, 0).ebx;
    // "Auth" (AuthenticAMD) and "Hygo" (HygonGenuine).
    let vendor = if vendor_ebx == 0x6874_7541 || vendor_ebx == 0x6f67_7948 {
        Vendor::Amd
    } else {
        Vendor::Intel
    };
    let leaf7 = leaf(7, 0);
    GuestPaging {
        features: CpuFeatures {
            maxphyaddr: (leaf(0x8000_0008, 0).eax & 0xff) as u8,
            gbpages: leaf(0x8000_0001, 0).edx & (1 << 26) != 0,
            pse36: leaf(1, 0).edx & (1 << 17) != 0,
            vendor,
        },
        smep: leaf7.ebx & (1 << 7) != 0,
        smap: leaf7.ebx & (1 << 20) != 0,
        pku: leaf7.ecx & (1 << 3) != 0,
        la57: leaf7.ecx & (1 << 16) != 0,
    }
}

/// `RAM` bytes of blank guest memory.
pub fn new_memory() -> GuestMemoryMmap {
    MemoryLayout::new(RAM)
        .unwrap()
        .create_memory(&Default::default())
        .unwrap()
}

/// A VM over (a clone of) `memory` with one vCPU configured for long mode
/// by `configure` (which writes its own GDT at `scratch_gdt` and needs
/// `cr3`); the caller then loads its own registers.
pub fn long_mode_vm(memory: &GuestMemoryMmap, scratch_gdt: u64, cr3: u64) -> (Vm, Vcpu) {
    let vm = Vm::new(memory.clone(), VmConfig::default()).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.configure(&BootConfig::new(
        CpuMode::Long {
            gdt: scratch_gdt,
            cr3,
        },
        KERNEL_CODE,
        KSTACK_TOP,
    ))
    .unwrap();
    (vm, vcpu)
}

/// Points `sregs` at the kernel's GDT and TSS and `regs` at the kernel's
/// entry (RIP `KERNEL_CODE`, RSP `KSTACK_TOP`, interrupts off).
pub fn enter_kernel(sregs: &mut kvm_sregs, regs: &mut kvm_regs) {
    sregs.gdt.base = GDT;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.tr.base = TSS;
    regs.rip = KERNEL_CODE;
    regs.rsp = KSTACK_TOP;
    regs.rflags = 2;
}

/// Writes the GDT (null, null, kernel code/data, 64-bit TSS, user
/// data/code), the TSS with RSP0 = `KSTACK_TOP`, and an IDT whose
/// exception vectors 0..32 go to `handler(vector)`.
pub fn write_descriptor_tables(memory: &GuestMemoryMmap, handler: impl Fn(u8) -> u64) {
    let tss_low = 0x67 | (TSS & 0xff_ffff) << 16 | 0x89 << 40 | ((TSS >> 24) & 0xff) << 56;
    let gdt: [u64; 8] = [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10: kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x18: kernel data
        tss_low,               // 0x20: TSS
        TSS >> 32,
        0x00cf_f300_0000_ffff, // 0x30: user data, DPL 3
        0x00af_fb00_0000_ffff, // 0x38: user code, 64-bit, DPL 3
    ];
    for (i, d) in gdt.iter().enumerate() {
        memory
            .write_obj(*d, GuestAddress(GDT + 8 * i as u64))
            .unwrap();
    }
    memory.write_obj(KSTACK_TOP, GuestAddress(TSS + 4)).unwrap();
    for vector in 0..32u8 {
        super::install_handler(memory, IDT, IDTR, vector, handler(vector), &[]);
    }
}

/// Operand width of the access stubs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StubWidth {
    /// `mov al, [rbx]` / `mov [rbx], al`.
    Byte,
    /// `mov rax, [rbx]` / `mov [rbx], eax`.
    Wide,
}

/// Entry points of the stubs that make one access through `rbx` and end
/// in `ud2` (read, write) or jump to `rbx` (fetch).
#[derive(Debug, Clone, Copy)]
pub struct Stubs {
    pub read: u64,
    pub read_ud: u64,
    pub write: u64,
    pub write_ud: u64,
    pub fetch: u64,
}

impl Stubs {
    pub fn entry(&self, kind: AccessKind) -> u64 {
        match kind {
            AccessKind::Read => self.read,
            AccessKind::Write => self.write,
            AccessKind::Fetch => self.fetch,
        }
    }
}

/// Emits the access stubs; their addresses come from [`stubs_at`].
pub fn emit_stubs(a: &mut CodeAssembler, width: StubWidth) -> Result<[CodeLabel; 5], IcedError> {
    use iced_x86::code_asm::*;
    let mut labels = [(); 5].map(|_| a.create_label());
    a.set_label(&mut labels[0])?;
    match width {
        StubWidth::Byte => a.mov(al, byte_ptr(rbx))?,
        StubWidth::Wide => a.mov(rax, qword_ptr(rbx))?,
    }
    a.set_label(&mut labels[1])?;
    a.ud2()?;
    a.set_label(&mut labels[2])?;
    match width {
        StubWidth::Byte => a.mov(byte_ptr(rbx), al)?,
        StubWidth::Wide => a.mov(dword_ptr(rbx), eax)?,
    }
    a.set_label(&mut labels[3])?;
    a.ud2()?;
    a.set_label(&mut labels[4])?;
    a.jmp(rbx)?;
    Ok(labels)
}

/// The stubs' addresses in assembled code.
pub fn stubs_at(result: &CodeAssemblerResult, labels: &[CodeLabel; 5]) -> Stubs {
    let ip = |i: usize| result.label_ip(&labels[i]).unwrap();
    Stubs {
        read: ip(0),
        read_ud: ip(1),
        write: ip(2),
        write_ud: ip(3),
        fetch: ip(4),
    }
}

/// Emits the head of the kernel's driver loop: load the IDT, then for
/// entry `r12` of the `count` entries (a qword at `count_at`) of the table
/// at `table` (`entry_bytes` apart; see [`Entry`]) reset the stack, load
/// RBX and RAX and `iretq` into the entry's stub. `next` is bound to the
/// top of the loop (handlers jump there after `inc r12`); the loop jumps
/// to `done` once all entries ran.
pub fn emit_driver_entry(
    a: &mut CodeAssembler,
    next: &mut CodeLabel,
    done: CodeLabel,
    count_at: u64,
    table: u64,
    entry_bytes: u64,
) -> Result<(), IcedError> {
    use iced_x86::code_asm::*;
    let field = |n: u64| (table + 8 * n) as i32;
    a.lidt(ptr(IDTR))?;
    a.xor(r12d, r12d)?;
    a.set_label(next)?;
    a.mov(rsp, KSTACK_TOP)?;
    a.cmp(r12, qword_ptr(count_at))?;
    a.jae(done)?;
    a.imul_3(rax, r12, entry_bytes as i32)?;
    a.mov(rbx, qword_ptr(rax + field(0)))?;
    a.push(qword_ptr(rax + field(4)))?; // SS
    a.push(KSTACK_TOP as i32)?; // RSP (unused by the stubs)
    a.push(qword_ptr(rax + field(3)))?; // RFLAGS
    a.push(qword_ptr(rax + field(2)))?; // CS
    a.push(qword_ptr(rax + field(1)))?; // RIP
    a.mov(rax, qword_ptr(rax + field(5)))?;
    a.iretq()
}

/// One entry of the driver loop's table: run the stub at `rip` at CPL3
/// (`user`) or CPL0, with RBX = `rbx` and RAX = `rax`.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub rbx: u64,
    pub rip: u64,
    pub user: bool,
    pub rax: u64,
}

/// Writes `entry` at `at` in the layout [`emit_driver_entry`] reads: RBX,
/// RIP, CS, RFLAGS, SS, RAX.
pub fn write_driver_entry(memory: &GuestMemoryMmap, at: u64, entry: &Entry) {
    let (cs, ss) = if entry.user {
        (USER_CS, USER_SS)
    } else {
        (KERNEL_CS, KERNEL_SS)
    };
    let record: [u64; 6] = [entry.rbx, entry.rip, cs, 0x2, ss, entry.rax];
    for (j, v) in record.iter().enumerate() {
        memory
            .write_obj(*v, GuestAddress(at + 8 * j as u64))
            .unwrap();
    }
}

/// The user stubs assembled at `USER_STUBS` (to be written at
/// `USER_CODE`), and their addresses.
pub fn user_stubs(width: StubWidth) -> (Vec<u8>, Stubs) {
    let mut u = CodeAssembler::new(64).unwrap();
    let labels = emit_stubs(&mut u, width).unwrap();
    let user = u
        .assemble_options(
            USER_STUBS,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    let stubs = stubs_at(&user, &labels);
    (user.inner.code_buffer, stubs)
}

/// Sets the accessed (and, in the leaf, dirty) bit of every entry that
/// maps `gva` (4-level or 5-level tables), so that the kernel's own
/// accesses change no entry.
pub fn preset_accessed(memory: &GuestMemoryMmap, ctx: &PagingContext, gva: u64) {
    let t = ctx
        .walk(
            memory,
            gva,
            Access::read(Privilege::Supervisor),
            WalkMode::Probe,
        )
        .unwrap();
    let leaf = t.entries.leaf().unwrap().gpa;
    for e in t.entries.iter() {
        let bits = if e.gpa == leaf { 0x60 } else { 0x20 };
        memory
            .write_obj(e.value | bits, GuestAddress(e.gpa))
            .unwrap();
    }
}

/// The 8-byte words that differ between two copies of a range starting at
/// `base`: (address, expected, got).
pub fn diff_qwords(base: u64, expected: &[u8], got: &[u8]) -> Vec<(u64, u64, u64)> {
    expected
        .chunks_exact(8)
        .zip(got.chunks_exact(8))
        .enumerate()
        .filter(|(_, (e, g))| e != g)
        .map(|(i, (e, g))| {
            let e = u64::from_le_bytes(e.try_into().unwrap());
            let g = u64::from_le_bytes(g.try_into().unwrap());
            (base + 8 * i as u64, e, g)
        })
        .collect()
}
