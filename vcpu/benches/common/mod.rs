//! Pieces both comparison benchmarks use: the loud KVM check, the median,
//! and the raw kvm-ioctls VM that serves as the baseline.
#![allow(dead_code)]

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::{GuestMemoryMmap, MemoryLayout};

/// Where the real-mode guests start.
pub const ENTRY: u64 = 0x1000;

/// 1 MiB of guest memory with `guest` at `ENTRY`.
pub fn memory(guest: &[u8]) -> GuestMemoryMmap {
    let memory = MemoryLayout::new(1 << 20)
        .unwrap()
        .create_memory(&Default::default())
        .unwrap();
    memory.write_slice(guest, GuestAddress(ENTRY)).unwrap();
    memory
}

/// Whether KVM can be used; skips loudly (or panics under
/// `VMKIT_REQUIRE_KVM=1`) when it cannot.
pub fn kvm_or_skip(bench: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if std::env::var("VMKIT_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("VMKIT_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {bench}: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// The median of `v` (which must not be empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The baseline: a VM made with kvm-ioctls alone, `memory` as slot 0 and
/// one vCPU in real mode at `ENTRY` with CS = 0.
///
/// # Safety
///
/// The caller must keep `memory` mapped until both returned fds are
/// closed.
pub unsafe fn raw_vm(memory: &GuestMemoryMmap, irqchip: bool) -> (VmFd, VcpuFd) {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    if irqchip {
        vm.create_irq_chip().unwrap();
    }
    let host = vmkit_memory::layout::kvm_slots(memory, 0, Default::default())[0];
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: host.guest_phys_addr,
        memory_size: host.memory_size,
        userspace_addr: host.userspace_addr,
    };
    // SAFETY: the region is `memory`'s live mapping, which the caller keeps
    // until the VM and vCPU fds are closed (this function's contract).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = ENTRY;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    (vm, vcpu)
}
