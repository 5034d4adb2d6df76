//! The software page walker over arbitrary guest memory and arbitrary
//! control registers. Checks that nothing panics, that every walk ends, that
//! a probe walk writes nothing, and that an updating walk only ever sets
//! accessed/dirty bits.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_memory::paging::{
    walk, Access, AccessKind, ControlRegs, CpuFeatures, PagingContext, Privilege, Vendor, WalkMode,
};
use vmkit_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;

#[derive(Arbitrary, Debug)]
struct Walk {
    gva: u64,
    kind: u8,
    privilege: u8,
    ac: bool,
    probe: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    pkru: u32,
    pkrs: u32,
    pdptrs: [u64; 4],
    maxphyaddr: u8,
    gbpages: bool,
    pse36: bool,
    amd: bool,
    /// Start of a second RAM region (page-aligned, above the first).
    second_region: u32,
    walks: Vec<Walk>,
    memory: Vec<u8>,
}

fn snapshot(memory: &GuestMemoryMmap, base: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; MEM];
    memory.read_slice(&mut bytes, GuestAddress(base)).unwrap();
    bytes
}

fuzz_target!(|input: Input| {
    let second = (u64::from(input.second_region) << 12).max(MEM as u64);
    let memory =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM), (GuestAddress(second), MEM)])
            .unwrap();
    for (i, chunk) in input.memory.chunks(MEM).take(2).enumerate() {
        let base = if i == 0 { 0 } else { second };
        memory.write_slice(chunk, GuestAddress(base)).unwrap();
    }
    let regs = ControlRegs {
        cr0: input.cr0,
        cr3: input.cr3,
        cr4: input.cr4,
        efer: input.efer,
        pkru: input.pkru,
        pkrs: input.pkrs,
        pdptrs: input.pdptrs,
    };
    let features = CpuFeatures {
        maxphyaddr: input.maxphyaddr,
        gbpages: input.gbpages,
        pse36: input.pse36,
        vendor: if input.amd {
            Vendor::Amd
        } else {
            Vendor::Intel
        },
    };
    let Ok(ctx) = PagingContext::new(&regs, &features) else {
        return;
    };
    for w in input.walks.iter().take(64) {
        let kind = match w.kind % 3 {
            0 => AccessKind::Read,
            1 => AccessKind::Write,
            _ => AccessKind::Fetch,
        };
        let privilege = match w.privilege % 3 {
            0 => Privilege::User,
            1 => Privilege::Supervisor,
            _ => Privilege::SupervisorImplicit,
        };
        let access = Access {
            kind,
            privilege,
            ac: w.ac,
        };
        let mode = if w.probe {
            WalkMode::Probe
        } else {
            WalkMode::Update
        };
        let before = [snapshot(&memory, 0), snapshot(&memory, second)];
        let result = walk(&ctx, &memory, w.gva, access, mode);
        let after = [snapshot(&memory, 0), snapshot(&memory, second)];
        for (old, new) in before.iter().zip(&after) {
            for (i, (&o, &n)) in old.iter().zip(new).enumerate() {
                if o == n {
                    continue;
                }
                assert!(
                    !w.probe && result.is_ok(),
                    "memory written by {mode:?} walk: {result:?}"
                );
                assert!(
                    i % 4 == 0 && n & !o & !0x60 == 0 && o & !n == 0,
                    "byte {i}: {o:#x} -> {n:#x}"
                );
            }
        }
    }
});
