//! The CPUID a vCPU is given: KVM's supported list through a documented filter.
//!
//! [`filter_cpuid`] starts from `KVM_GET_SUPPORTED_CPUID` (what the host CPU
//! and KVM can virtualise) and changes only what must describe *this* vCPU
//! rather than the host:
//!
//! | leaf | register | change |
//! |---|---|---|
//! | 0x1 | EBX\[31:24\] | initial APIC ID = the vCPU id |
//! | 0x1 | EBX\[23:16\], EDX\[28\] (HTT) | logical processor count = `vcpu_count`, HTT set when > 1 |
//! | 0x1 | ECX\[31\] | hypervisor present: set |
//! | 0x1 | ECX\[27\] (OSXSAVE) | cleared: KVM derives it from the guest's CR4 |
//! | 0x1, 0x7, 0xD | XSAVE/AVX family | cleared when `disable_xsave` (with leaf 0xD removed) |
//! | 0x4 | EAX\[31:26\] | cores per package − 1 = `vcpu_count` − 1 |
//! | 0xB, 0x1F | EDX | x2APIC ID = the vCPU id |
//! | 0x8000_001E | EAX | extended APIC ID = the vCPU id (AMD) |
//!
//! Everything else, the KVM paravirtual leaves (0x4000_0000..) included,
//! passes through unchanged. (The VM's supported list already carries the
//! TSC-deadline bit when its in-kernel LAPIC has the mode: see
//! `Vm::supported_cpuid`.) Topology is flat: every vCPU is one core of one
//! package.

use kvm_bindings::CpuId;

/// What [`filter_cpuid`] needs to know about the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidConfig {
    /// The vCPU's APIC ID.
    pub vcpu_id: u32,
    /// vCPUs in the VM (at least 1).
    pub vcpu_count: u32,
    /// Hide XSAVE and the features that depend on it (AVX, AVX-512, ...):
    /// for hosts (such as nested SVM under QEMU TCG) that cannot virtualise
    /// XCR0.
    pub disable_xsave: bool,
}

impl Default for CpuidConfig {
    fn default() -> Self {
        CpuidConfig {
            vcpu_id: 0,
            vcpu_count: 1,
            disable_xsave: false,
        }
    }
}

const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 7 EBX bits that need XSAVE-managed state: AVX2 (5) and AVX-512
/// (16, 17, 21, 26, 27, 28, 30, 31).
const LEAF7_EBX_XSAVE_DEPENDENT: u32 =
    (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (0b111 << 26) | (0b11 << 30);
/// Leaf 7 ECX bits that need XSAVE-managed state: AVX-512 VBMI (1), VBMI2
/// (6), GFNI's VEX forms are left alone; VAES (9), VPCLMULQDQ (10), VNNI
/// (11), BITALG (12), VPOPCNTDQ (14).
const LEAF7_ECX_XSAVE_DEPENDENT: u32 =
    (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// Leaf 7 EDX bits for AMX (22, 24, 25) and AVX-512 (2, 3, 8, 23).
const LEAF7_EDX_XSAVE_DEPENDENT: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);

/// Applies the filter described in the module documentation to `cpuid`.
pub fn filter_cpuid(cpuid: &mut CpuId, config: &CpuidConfig) {
    let count = config.vcpu_count.max(1);
    let id = config.vcpu_id;
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | ((id & 0xff) << 24)
                    | ((count.min(255) & 0xff) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                entry.ecx &= !LEAF1_ECX_OSXSAVE;
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
                if config.disable_xsave {
                    entry.ecx &=
                        !(LEAF1_ECX_XSAVE | LEAF1_ECX_AVX | LEAF1_ECX_FMA | LEAF1_ECX_F16C);
                }
            }
            // Only meaningful for sub-leaves that describe a cache.
            0x4 if entry.eax & 0x1f != 0 => {
                entry.eax = (entry.eax & 0x03ff_ffff) | (((count - 1).min(63)) << 26);
            }
            0x7 if config.disable_xsave && entry.index == 0 => {
                entry.ebx &= !LEAF7_EBX_XSAVE_DEPENDENT;
                entry.ecx &= !LEAF7_ECX_XSAVE_DEPENDENT;
                entry.edx &= !LEAF7_EDX_XSAVE_DEPENDENT;
            }
            0xb | 0x1f => entry.edx = id,
            0x8000_001e => entry.eax = id,
            _ => {}
        }
    }
    if config.disable_xsave {
        let kept: Vec<_> = cpuid
            .as_slice()
            .iter()
            .copied()
            .filter(|e| e.function != 0xd)
            .collect();
        if let Ok(filtered) = CpuId::from_entries(&kept) {
            *cpuid = filtered;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, f: u32, i: u32) -> Option<kvm_cpuid_entry2> {
        c.as_slice()
            .iter()
            .copied()
            .find(|e| e.function == f && e.index == i)
    }

    #[test]
    fn filter_sets_topology_and_hypervisor_bit() {
        let mut c = CpuId::from_entries(&[
            entry(
                0x1,
                0,
                0x800f12,
                0xff12_0800,
                LEAF1_ECX_OSXSAVE | LEAF1_ECX_XSAVE,
                0,
            ),
            entry(0x4, 0, 0x1c00_4121, 0, 0, 0),
            entry(0x4, 3, 0, 0, 0, 0),
            entry(0xb, 0, 1, 1, 0x100, 7),
            entry(0xb, 1, 4, 4, 0x201, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0, 0),
        ])
        .unwrap();
        filter_cpuid(
            &mut c,
            &CpuidConfig {
                vcpu_id: 3,
                vcpu_count: 4,
                disable_xsave: false,
            },
        );
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "brand/clflush bits kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_OSXSAVE, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_XSAVE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&c, 4, 0).unwrap().eax >> 26, 3);
        assert_eq!(
            find(&c, 4, 0).unwrap().eax & 0x03ff_ffff,
            0x1c00_4121 & 0x03ff_ffff
        );
        assert_eq!(find(&c, 4, 3).unwrap().eax, 0, "null cache leaf untouched");
        assert_eq!(find(&c, 0xb, 1).unwrap().edx, 3);
        assert_eq!(find(&c, 0x4000_0000, 0).unwrap().ebx, 0x4b4d_564b);
    }

    #[test]
    fn disable_xsave_removes_the_family() {
        let mut c = CpuId::from_entries(&[
            entry(
                0x1,
                0,
                0,
                0,
                LEAF1_ECX_XSAVE | LEAF1_ECX_AVX | 1,
                LEAF1_EDX_HTT,
            ),
            entry(0x7, 0, 0, (1 << 5) | (1 << 3), 0, 0),
            entry(0xd, 0, 7, 0x340, 0x340, 0),
            entry(0xd, 1, 1, 0, 0, 0),
        ])
        .unwrap();
        filter_cpuid(
            &mut c,
            &CpuidConfig {
                disable_xsave: true,
                ..Default::default()
            },
        );
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ecx, 1 | LEAF1_ECX_HYPERVISOR);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0, "one vCPU: no HTT");
        assert_eq!(find(&c, 7, 0).unwrap().ebx, 1 << 3, "BMI1 stays, AVX2 goes");
        assert!(find(&c, 0xd, 0).is_none());
        assert_eq!(c.as_slice().len(), 2);
    }
}
