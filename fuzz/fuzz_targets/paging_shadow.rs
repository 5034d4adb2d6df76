//! The shadow MMU over arbitrary guest memory, control registers and
//! operation sequences. Checks that nothing panics, that every operation
//! ends, that each lookup agrees with a fresh walk, and that after every
//! operation each cached entry and each shadow leaf still agrees with a
//! fresh walk of its address space.
#![no_main]

use std::cell::Cell;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_memory::paging::{
    walk, Access, ControlRegs, CpuFeatures, HostMap, PagingContext, PagingMode, ShadowConfig,
    ShadowMmu, Vendor, WalkError, WalkMode,
};
use vmkit_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;
const SHADOW: u64 = 0x100_0000;
const SHADOW_PAGES: u64 = 12;

/// Identity plus `salt << 32`; pages above the first region are not RAM.
struct Map {
    generation: Cell<u64>,
    salt: Cell<u64>,
}

impl HostMap for Map {
    fn generation(&self) -> u64 {
        self.generation.get()
    }

    fn host_page(&self, gpa_page: u64) -> Option<u64> {
        (gpa_page < MEM as u64).then(|| gpa_page + (self.salt.get() << 32))
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Lookup { gva: u64, access: u8 },
    Fault { gva: u64, access: u8 },
    Invlpg(u64),
    LoadCr3(u64),
    SetCr4(u64),
    Write { gpa: u16, value: u64 },
    Remap(u8),
    FlushAll,
}

#[derive(Arbitrary, Debug)]
struct Input {
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    pkru: u32,
    maxphyaddr: u8,
    gbpages: bool,
    amd: bool,
    capacity: u8,
    spaces: u8,
    ops: Vec<Op>,
    memory: Vec<u8>,
}

/// A supervisor read with EFLAGS.AC: refused only for absent pages,
/// reserved bits and protection keys.
fn probe() -> Access {
    Access::read(vmkit_memory::paging::Privilege::Supervisor).with_ac(true)
}

fn pk(e: &WalkError) -> bool {
    e.pf_error_code().is_some_and(|c| c.protection_key())
}

fn check(mmu: &ShadowMmu<'_, GuestMemoryMmap>, mem: &GuestMemoryMmap, map: &Map, gvas: &[u64]) {
    for e in mmu.entries() {
        match walk(e.context, mem, e.gva, probe(), WalkMode::Probe) {
            Ok(f) => {
                let t = e.translation;
                assert_eq!(
                    (t.gpa, t.page_size, t.writable, t.user, t.executable),
                    (f.gpa, f.page_size, f.writable, f.user, f.executable),
                    "stale entry {:#x}",
                    e.gva
                );
                if let Some(host) = t.host {
                    assert_eq!(Some(host), map.host_page(f.gpa));
                }
            }
            Err(err) => assert!(pk(&err), "cached {:#x}, fresh walk: {err:?}", e.gva),
        }
    }
    for space in mmu.spaces() {
        let Some(root) = space.shadow_root else {
            continue;
        };
        let mut regs = ControlRegs {
            cr0: ControlRegs::CR0_PE | ControlRegs::CR0_PG | ControlRegs::CR0_WP,
            cr3: root,
            cr4: ControlRegs::CR4_PAE,
            efer: ControlRegs::EFER_LME | ControlRegs::EFER_LMA | ControlRegs::EFER_NXE,
            ..ControlRegs::default()
        };
        if space.context.mode() == PagingMode::Level5 {
            regs.cr4 |= ControlRegs::CR4_LA57;
        }
        let sctx = PagingContext::new(&regs, &CpuFeatures::default()).unwrap();
        for &gva in gvas {
            let Ok(s) = walk(&sctx, mem, gva, probe(), WalkMode::Probe) else {
                continue;
            };
            match walk(space.context, mem, gva, probe(), WalkMode::Probe) {
                Ok(f) => {
                    assert_eq!(Some(s.gpa & !0xfff), map.host_page(f.gpa & !0xfff));
                    assert!(!s.writable || f.writable, "shadow writable at {gva:#x}");
                    assert_eq!(s.user, f.user);
                    assert!(!s.executable || f.executable);
                }
                Err(err) => assert!(pk(&err), "shadow maps {gva:#x}, fresh walk: {err:?}"),
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), MEM),
        (GuestAddress(SHADOW), (SHADOW_PAGES * 4096) as usize),
    ])
    .unwrap();
    let take = input.memory.len().min(MEM);
    memory
        .write_slice(&input.memory[..take], GuestAddress(0))
        .unwrap();
    let regs = ControlRegs {
        cr0: input.cr0,
        cr3: input.cr3,
        cr4: input.cr4,
        efer: input.efer,
        pkru: input.pkru,
        pkrs: 0,
        pdptrs: [0; 4],
    };
    let features = CpuFeatures {
        maxphyaddr: input.maxphyaddr,
        gbpages: input.gbpages,
        pse36: true,
        vendor: if input.amd {
            Vendor::Amd
        } else {
            Vendor::Intel
        },
    };
    let config = ShadowConfig {
        capacity: usize::from(input.capacity % 64) + 1,
        max_spaces: usize::from(input.spaces % 4) + 1,
        shadow_area: Some((GuestAddress(SHADOW), SHADOW_PAGES * 4096)),
    };
    let Ok(mut mmu) = ShadowMmu::new(&memory, &regs, &features, &config) else {
        return;
    };
    let map = Map {
        generation: Cell::new(0),
        salt: Cell::new(0),
    };
    let mut gvas = Vec::new();
    for op in input.ops.iter().take(64) {
        match *op {
            Op::Lookup { gva, access } => {
                let access = Access::from_index(usize::from(access));
                let ctx = mmu.context().clone();
                let fresh = walk(&ctx, &memory, gva, access, WalkMode::Probe);
                let got = mmu.translate(&map, gva, access);
                match (&got, &fresh) {
                    (Ok(t), Ok(f)) => assert_eq!(
                        (t.gpa, t.writable, t.user, t.executable, t.pkey),
                        (f.gpa, f.writable, f.user, f.executable, f.pkey)
                    ),
                    (Err(e), Err(f)) => assert_eq!(e.pf_error_code(), f.pf_error_code()),
                    // A lost A/D race cannot happen with one thread.
                    _ => panic!("{gva:#x}: cache {got:?}, walk {fresh:?}"),
                }
                gvas.push(gva);
            }
            Op::Fault { gva, access } => {
                let _ = mmu.fault(&map, gva, Access::from_index(usize::from(access)));
                gvas.push(gva);
            }
            Op::Invlpg(gva) => mmu.invlpg(gva),
            Op::LoadCr3(cr3) => {
                let _ = mmu.load_cr3(cr3);
            }
            Op::SetCr4(cr4) => {
                let mut regs = *mmu.control_regs();
                regs.cr4 = cr4;
                let _ = mmu.set_control_regs(&regs, &features);
            }
            Op::Write { gpa, value } => {
                let gpa = u64::from(gpa) & !7;
                memory.write_obj(value, GuestAddress(gpa)).unwrap();
                mmu.observe_write(gpa, 8);
            }
            Op::Remap(salt) => {
                map.salt.set(u64::from(salt % 3));
                map.generation.set(map.generation.get() + 1);
                mmu.memory_map_changed();
            }
            Op::FlushAll => mmu.flush_all(),
        }
        gvas.truncate(32);
        check(&mmu, &memory, &map, &gvas);
    }
});
