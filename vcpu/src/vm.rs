//! The KVM virtual machine: capability checks, memory slots, irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmkit_memory::layout::{kvm_slots, pages_from_bitmap, MemorySlot, SlotFlags};
use vmkit_memory::GuestMemoryMmap;

use std::sync::Arc;

use crate::irq::{IrqError, IrqLine, IrqRouter, KvmMsiVectors};
use crate::snapshot::HostStateInfo;
use crate::vcpu::{Vcpu, VcpuError};

/// The KVM API version this crate is written against.
pub const KVM_API_VERSION: i32 = 12;

/// Guest-physical address of the three pages KVM needs for its real-mode TSS
/// on Intel (`KVM_SET_TSS_ADDR`), inside the default MMIO gap. Nothing else
/// may be mapped at `KVM_TSS_ADDRESS..KVM_TSS_ADDRESS + 0x3000`.
pub const KVM_TSS_ADDRESS: u64 = 0xFFFB_D000;
/// Guest-physical address of the page KVM uses for its identity-map page
/// table on Intel (`KVM_SET_IDENTITY_MAP_ADDR`), just below the TSS pages.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xFFFB_C000;

/// Errors from creating or configuring a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The kernel speaks another KVM API version.
    #[error("KVM API version {0} is not the supported version {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// A capability vmkit needs is missing.
    #[error("KVM lacks the capability {0}")]
    MissingCapability(&'static str),
    /// An ioctl on the VM failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The operation that failed.
        op: &'static str,
        /// The error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Registering a memory slot failed.
    #[error(
        "cannot register memory slot {slot} ({size:#x} bytes at guest {guest_addr:#x}): {source}"
    )]
    MemorySlot {
        /// Slot number.
        slot: u32,
        /// Guest-physical base.
        guest_addr: u64,
        /// Size in bytes.
        size: u64,
        /// The error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(&'static str),
    /// No memory slot has this number.
    #[error("no memory slot {0}")]
    NoSuchSlot(u32),
    /// KVM has fewer memory slots than the memory map needs.
    #[error("the memory map needs {needed} slots but KVM offers {available}")]
    TooManySlots {
        /// Slots needed.
        needed: usize,
        /// Slots KVM supports.
        available: usize,
    },
}

/// How to create a [`Vm`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmConfig {
    /// Create the in-kernel irqchip (PIC, IOAPIC and a LAPIC per vCPU).
    pub irqchip: bool,
    /// Create the in-kernel PIT (needs `irqchip`).
    pub pit: bool,
    /// Have KVM log guest writes to every RAM slot.
    pub log_dirty_pages: bool,
}

/// The VM file descriptor together with the guest memory its slots point
/// at. Everything that keeps the VM fd alive beyond the [`Vm`] (interrupt
/// lines, the GSI router) holds this, so the mappings always outlive the
/// slots that point at them.
#[derive(Debug)]
pub(crate) struct VmShared {
    // Dropped first: closing the VM fd tears down the slots before the
    // mappings in `memory` can be unmapped.
    pub(crate) fd: VmFd,
    memory: GuestMemoryMmap,
}

/// A KVM virtual machine with its guest memory registered.
#[derive(Debug)]
pub struct Vm {
    shared: Arc<VmShared>,
    kvm: Kvm,
    slots: Vec<MemorySlot>,
    supported_cpuid: CpuId,
    /// The MSR list and XSAVE size a snapshot needs.
    host_state: HostStateInfo,
    config: VmConfig,
    router: Option<Arc<IrqRouter>>,
    /// Size of each vCPU's kvm_run mapping.
    run_size: usize,
}

/// The capabilities a VM with `config` needs, with their KVM names.
fn required_capabilities(config: &VmConfig) -> Vec<(Cap, &'static str)> {
    let mut required = vec![
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ];
    if config.irqchip {
        required.push((Cap::Irqchip, "KVM_CAP_IRQCHIP"));
        required.push((Cap::Irqfd, "KVM_CAP_IRQFD"));
        required.push((Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"));
    }
    if config.pit {
        required.push((Cap::Pit2, "KVM_CAP_PIT2"));
    }
    required
}

/// Fails with the name of the first capability `has` denies.
fn check_capabilities(config: &VmConfig, has: impl Fn(Cap) -> bool) -> Result<(), VmError> {
    match required_capabilities(config)
        .into_iter()
        .find(|(cap, _)| !has(*cap))
    {
        Some((_, name)) => Err(VmError::MissingCapability(name)),
        None => Ok(()),
    }
}

impl Vm {
    /// Opens `/dev/kvm`, checks the API version and the capabilities the
    /// configuration needs, creates the VM and registers every region of
    /// `memory` as a memory slot (slots numbered from 0).
    pub fn new(memory: GuestMemoryMmap, config: VmConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        if config.pit && !config.irqchip {
            return Err(VmError::InvalidConfig(
                "the in-kernel PIT needs the in-kernel irqchip",
            ));
        }
        check_capabilities(&config, |cap| kvm.check_extension(cap))?;
        let mut supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|source| VmError::Ioctl {
                    op: "KVM_GET_SUPPORTED_CPUID",
                    source,
                })?;
        if config.irqchip && kvm.check_extension(Cap::TscDeadlineTimer) {
            add_tsc_deadline(&mut supported_cpuid);
        }
        let msr_index_list: Arc<[u32]> = kvm
            .get_msr_index_list()
            .map_err(|source| VmError::Ioctl {
                op: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .into();
        let fd = kvm.create_vm().map_err(|source| VmError::Ioctl {
            op: "KVM_CREATE_VM",
            source,
        })?;
        let ioctl = |op| move |source| VmError::Ioctl { op, source };
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        if config.irqchip {
            fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        }
        if config.pit {
            let pit = kvm_pit_config {
                // KVM_PIT_SPEAKER_DUMMY: port 0x61 is handled in the kernel.
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        }

        let flags = SlotFlags {
            log_dirty_pages: config.log_dirty_pages,
            read_only: false,
        };
        let slots = kvm_slots(&memory, 0, flags);
        let available = kvm.get_nr_memslots();
        if slots.len() > available {
            return Err(VmError::TooManySlots {
                needed: slots.len(),
                available,
            });
        }
        for s in &slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: s.flags.bits(),
                guest_phys_addr: s.guest_phys_addr,
                memory_size: s.memory_size,
                userspace_addr: s.userspace_addr,
            };
            // SAFETY: `userspace_addr..+memory_size` is a live read/write
            // mapping owned by a region of `memory`. `memory` is stored next
            // to `fd` in `VmShared`, which drops it only after `fd` (field
            // order) and is itself dropped only when the last holder of the
            // VM fd is gone; every Vcpu holds its own clone of `memory` for
            // as long as its fd lives. So the mapping outlives every user of
            // the slot in the kernel.
            unsafe { fd.set_user_memory_region(region) }.map_err(|source| VmError::MemorySlot {
                slot: s.slot,
                guest_addr: s.guest_phys_addr,
                size: s.memory_size,
                source,
            })?;
        }
        let xsave_size = usize::try_from(fd.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        let shared = Arc::new(VmShared { fd, memory });
        let router = if config.irqchip {
            Some(Arc::new(IrqRouter::new(Arc::clone(&shared), &kvm)))
        } else {
            None
        };
        let run_size = kvm
            .get_vcpu_mmap_size()
            .map_err(ioctl("KVM_GET_VCPU_MMAP_SIZE"))?;
        Ok(Vm {
            run_size,
            shared,
            kvm,
            slots,
            supported_cpuid,
            host_state: HostStateInfo {
                msr_index_list,
                xsave_size,
            },
            config,
            router,
        })
    }

    /// Creates vCPU `id` (its APIC ID). Set it up with
    /// [`Vcpu::configure`] before running it.
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu, VcpuError> {
        let fd = self
            .shared
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Ioctl {
                op: "KVM_CREATE_VCPU",
                source,
            })?;
        Vcpu::new(
            fd,
            id,
            self.shared.memory.clone(),
            self.supported_cpuid.clone(),
            self.config.irqchip,
            self.run_size,
            self.host_state.clone(),
        )
    }

    /// The KVM VM file descriptor, for what this crate does not wrap yet
    /// (ioeventfd, ...).
    pub fn fd(&self) -> &VmFd {
        &self.shared.fd
    }

    /// The GSI routing table of a VM with the in-kernel irqchip.
    pub fn irq_router(&self) -> Result<&Arc<IrqRouter>, IrqError> {
        self.router.as_ref().ok_or(IrqError::NoIrqchip)
    }

    /// An edge-triggered interrupt line into `gsi` through an irqfd: each
    /// [`trigger`](IrqLine::trigger) (or assert) pulses the GSI. Needs the
    /// in-kernel irqchip.
    pub fn edge_irq_line(&self, gsi: u32) -> Result<Arc<IrqLine>, IrqError> {
        IrqLine::new(self.irq_router()?, gsi, false).map(Arc::new)
    }

    /// A level-triggered interrupt line into `gsi` through an irqfd with a
    /// resample fd: while the line is asserted, the interrupt is raised again
    /// after each guest EOI. Someone must serve the resample events, usually
    /// a [`ResampleWorker`](crate::irq::ResampleWorker). Needs the in-kernel
    /// irqchip.
    pub fn level_irq_line(&self, gsi: u32) -> Result<Arc<IrqLine>, IrqError> {
        IrqLine::new(self.irq_router()?, gsi, true).map(Arc::new)
    }

    /// `count` MSI vectors, each with its own GSI route and irqfd. Needs
    /// the in-kernel irqchip.
    pub fn msi_vectors(&self, count: u16) -> Result<Arc<KvmMsiVectors>, IrqError> {
        KvmMsiVectors::new(self.irq_router()?, count).map(Arc::new)
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.shared.memory
    }

    /// The memory slots registered with KVM.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// The configuration the VM was created with.
    pub fn config(&self) -> VmConfig {
        self.config
    }

    /// The MSRs KVM lists as saveable (`KVM_GET_MSR_INDEX_LIST`).
    pub fn msr_index_list(&self) -> &[u32] {
        &self.host_state.msr_index_list
    }

    /// The CPUID entries KVM supports on this host, before any per-vCPU
    /// filtering: `KVM_GET_SUPPORTED_CPUID`, plus the TSC-deadline timer
    /// (leaf 1 ECX\[24\]) when the in-kernel LAPIC has one, which KVM
    /// reports only through `KVM_CAP_TSC_DEADLINE_TIMER`.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Guest-physical addresses of the pages the guest wrote in `slot` since
    /// the last call (needs [`VmConfig::log_dirty_pages`]).
    pub fn take_dirty_pages(&self, slot: u32) -> Result<Vec<u64>, VmError> {
        let s = self
            .slots
            .iter()
            .find(|s| s.slot == slot)
            .ok_or(VmError::NoSuchSlot(slot))?;
        // Slots are built from host mappings, so their size fits a usize.
        let size = usize::try_from(s.memory_size).map_err(|_| VmError::NoSuchSlot(slot))?;
        let bitmap = self
            .shared
            .fd
            .get_dirty_log(slot, size)
            .map_err(|source| VmError::Ioctl {
                op: "KVM_GET_DIRTY_LOG",
                source,
            })?;
        let mut pages = Vec::new();
        pages_from_bitmap(s.guest_phys_addr, &bitmap, &mut pages);
        Ok(pages)
    }
}

/// CPUID.1:ECX bit of the TSC-deadline timer mode of the local APIC.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Sets the TSC-deadline bit in leaf 1. KVM leaves it out of
/// `KVM_GET_SUPPORTED_CPUID` because only an in-kernel LAPIC implements
/// the mode (KVM API, KVM_GET_SUPPORTED_CPUID); without it a Linux guest
/// programs its timer through the slower one-shot TMICT path.
fn add_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_capability_is_named() {
        let config = VmConfig {
            irqchip: true,
            pit: true,
            log_dirty_pages: false,
        };
        assert!(check_capabilities(&config, |_| true).is_ok());
        let err = check_capabilities(&config, |cap| cap != Cap::Pit2).unwrap_err();
        assert!(matches!(err, VmError::MissingCapability("KVM_CAP_PIT2")));
        assert_eq!(err.to_string(), "KVM lacks the capability KVM_CAP_PIT2");
        // Without a PIT, its capability is not asked for.
        let no_pit = VmConfig {
            pit: false,
            ..config
        };
        assert!(check_capabilities(&no_pit, |cap| cap != Cap::Pit2).is_ok());
        let err = check_capabilities(&no_pit, |cap| cap != Cap::ImmediateExit).unwrap_err();
        assert!(matches!(
            err,
            VmError::MissingCapability("KVM_CAP_IMMEDIATE_EXIT")
        ));
    }

    #[test]
    fn tsc_deadline_goes_into_leaf_1_only() {
        let entry = |function, ecx| kvm_bindings::kvm_cpuid_entry2 {
            function,
            ecx,
            ..Default::default()
        };
        let mut cpuid = CpuId::from_entries(&[entry(0, 0), entry(1, 0x8000_0001), entry(7, 0)])
            .expect("three entries fit");
        add_tsc_deadline(&mut cpuid);
        let ecx: Vec<u32> = cpuid.as_slice().iter().map(|e| e.ecx).collect();
        assert_eq!(ecx, [0, 0x8100_0001, 0]);
    }
}
