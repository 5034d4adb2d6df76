//! A vCPU: mode setup (real, protected, long), CPUID, MSRs and the run loop.

use std::fmt;
use std::mem::offset_of;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_run__bindgen_ty_1__bindgen_ty_2 as FailEntryExit,
    kvm_run__bindgen_ty_1__bindgen_ty_4 as IoExit, kvm_run__bindgen_ty_1__bindgen_ty_6 as MmioExit,
    kvm_segment, kvm_sregs, CpuId, Msrs, KVMIO,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::GuestMemoryMmap;

use crate::cpuid::{filter_cpuid, CpuidConfig};
use crate::handle::{HandleError, Interrupt, VcpuHandle, VcpuShared};
use crate::io::{IoAction, IoHandler};
use crate::snapshot::HostStateInfo;

/// The ioctl numbers vmkit issues itself.
mod ioctl_numbers {
    use super::KVMIO;
    // KVM_RUN is `_IO(KVMIO, 0x80)` (include/uapi/linux/kvm.h).
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
}
use ioctl_numbers::KVM_RUN;

/// Errors from configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// An ioctl on the vCPU failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The operation that failed.
        op: &'static str,
        /// The error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the MSRs.
    #[error("KVM_SET_MSRS stopped at MSR {msr:#x} ({set} of {total} set)")]
    Msr {
        /// The first MSR KVM refused.
        msr: u32,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        total: usize,
    },
    /// The GDT could not be written into guest memory.
    #[error("cannot write the GDT at guest {addr:#x}: {source}")]
    Gdt {
        /// Where the GDT was to go.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A boot setting is invalid for the chosen mode.
    #[error("invalid boot setting: {0}")]
    InvalidBoot(&'static str),
    /// `KVM_RUN` kept returning EAGAIN.
    #[error("KVM_RUN returned EAGAIN {0} times in a row")]
    Busy(u32),
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] kvm_ioctls::Error),
    /// KVM described an I/O exit whose data lies outside the `kvm_run`
    /// mapping (a kernel bug; never trusted).
    #[error("KVM reported I/O data at offset {offset:#x}, {len} bytes, outside the {size:#x}-byte kvm_run mapping")]
    BadExitData {
        /// Offset of the data in the mapping.
        offset: u64,
        /// Its length.
        len: u64,
        /// Size of the mapping.
        size: usize,
    },
    /// Setting up vCPU control (the kick signal) failed.
    #[error(transparent)]
    Handle(#[from] HandleError),
}

/// Selector of the code segment in the GDT vmkit writes (as Linux's
/// `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the data segment (as Linux's `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS (a 16-byte system descriptor in long mode).
pub const BOOT_TSS: u16 = 0x20;
/// Size in bytes of the GDT vmkit writes: null, unused, code, data and a
/// 16-byte TSS descriptor.
pub const GDT_SIZE: u64 = 48;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode. The entry point is a linear address: below 64 KiB
    /// it runs with CS = 0 and IP = entry; above, with CS = entry >> 4. DS,
    /// ES, FS, GS and SS are 0 (so the stack must lie below 64 KiB).
    Real,
    /// 32-bit protected mode, paging off, flat 4 GiB segments.
    Protected {
        /// Where to write the GDT ([`GDT_SIZE`] bytes of RAM).
        gdt: u64,
    },
    /// 64-bit long mode with 4-level paging.
    Long {
        /// Where to write the GDT ([`GDT_SIZE`] bytes of RAM).
        gdt: u64,
        /// CR3: the PML4's guest-physical address (see
        /// [`vmkit_memory::pagetable::build_identity_map`]).
        cr3: u64,
    },
}

/// How to start a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootConfig {
    /// The CPU mode.
    pub mode: CpuMode,
    /// RIP (a linear address).
    pub entry: u64,
    /// RSP.
    pub stack: u64,
    /// RSI (the Linux boot protocols pass the zero page here).
    pub rsi: u64,
    /// CPUID filtering.
    pub cpuid: CpuidConfig,
}

impl BootConfig {
    /// A configuration for `mode` entering at `entry` with stack `stack`,
    /// RSI zero and CPUID for a single vCPU.
    pub fn new(mode: CpuMode, entry: u64, stack: u64) -> Self {
        BootConfig {
            mode,
            entry,
            stack,
            rsi: 0,
            cpuid: CpuidConfig::default(),
        }
    }
}

/// Registers captured when a vCPU stops abnormally.
#[derive(Debug, Clone, Copy)]
pub struct RegisterDump {
    /// General registers (None if KVM could not read them).
    pub regs: Option<kvm_regs>,
    /// Segment and control registers (None if KVM could not read them).
    pub sregs: Option<kvm_sregs>,
}

impl fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.regs {
            Some(r) => {
                writeln!(
                    f,
                    "rip={:#018x} rsp={:#018x} rflags={:#010x}",
                    r.rip, r.rsp, r.rflags
                )?;
                writeln!(
                    f,
                    "rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
                    r.rax, r.rbx, r.rcx, r.rdx
                )?;
                writeln!(
                    f,
                    "rsi={:#018x} rdi={:#018x} rbp={:#018x} r8={:#018x}",
                    r.rsi, r.rdi, r.rbp, r.r8
                )?;
            }
            None => writeln!(f, "general registers unavailable")?,
        }
        match &self.sregs {
            Some(s) => write!(
                f,
                "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(base {:#x}, l={}, db={})",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base, s.cs.l, s.cs.db
            ),
            None => write!(f, "special registers unavailable"),
        }
    }
}

/// The kind of a `KVM_EXIT_SYSTEM_EVENT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// The guest asked to power off.
    Shutdown,
    /// The guest asked to reset.
    Reset,
    /// The guest crashed (e.g. a pvpanic-like report).
    Crash,
    /// Another event type.
    Other(u32),
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone)]
pub enum StopReason {
    /// A device asked to end the run with this exit code (e.g. the
    /// debug-exit port).
    Exit(u32),
    /// A device asked for a reset (e.g. the i8042's 0xFE command).
    Reset,
    /// A device asked to power off.
    PowerOff,
    /// The guest executed HLT (only seen without the in-kernel irqchip,
    /// which otherwise handles HLT itself).
    Hlt,
    /// Triple fault or another shutdown condition.
    Shutdown(Box<RegisterDump>),
    /// KVM reported a system event.
    SystemEvent {
        /// The event.
        kind: SystemEvent,
        /// The first data word (flags), 0 if none.
        data: u64,
    },
    /// KVM could not handle an exit (e.g. an instruction its emulator does
    /// not know).
    InternalError {
        /// `KVM_INTERNAL_ERROR_*` sub-error.
        suberror: u32,
        /// The first data words KVM supplied (up to 4).
        data: [u64; 4],
        /// Registers at the failure.
        registers: Box<RegisterDump>,
    },
    /// VM entry failed (invalid guest state).
    FailEntry {
        /// Hardware entry-failure reason.
        reason: u64,
        /// Host CPU the entry failed on.
        cpu: u32,
        /// Registers at the failure.
        registers: Box<RegisterDump>,
    },
    /// `KVM_RUN` returned EINTR because of a signal that was not a kick
    /// (see [`Kicked`](Self::Kicked)).
    Interrupted,
    /// A [`VcpuHandle::kick`] asked the run loop to return.
    Kicked,
    /// A [`VcpuHandle::stop`] asked the vCPU to stop.
    Stopped,
    /// An exit this run loop does not handle.
    Unhandled {
        /// `KVM_EXIT_*` reason.
        exit_reason: u32,
        /// Registers at the exit.
        registers: Box<RegisterDump>,
    },
}

/// How many EAGAINs in a row `run` tolerates (KVM returns it once to an AP
/// that has not been started yet).
const MAX_EAGAIN: u32 = 1000;

/// The vCPU's `kvm_run` mapping, only ever accessed through raw pointers
/// (see [`crate::handle`] for why).
#[derive(Debug)]
struct RunArea {
    ptr: NonNull<kvm_run>,
    size: usize,
}

// SAFETY: the mapping belongs to the VcpuFd next to it in `Vcpu`, which is
// Send and Sync; the run loop (the only reader and writer apart from the
// atomic `immediate_exit`) needs `&mut Vcpu`, so moving or sharing the
// pointer between threads cannot create unsynchronised access.
unsafe impl Send for RunArea {}
// SAFETY: as for Send: `&Vcpu` methods never touch the mapping.
unsafe impl Sync for RunArea {}

/// A vCPU of a [`Vm`](crate::Vm).
#[derive(Debug)]
pub struct Vcpu {
    // `shared` is retired in Drop before any field is dropped, so no handle
    // writes into the mapping once `fd` (which owns it) goes.
    shared: Arc<VcpuShared>,
    run_area: RunArea,
    // Dropped before `memory`: the guest memory outlives the vCPU fd.
    fd: VcpuFd,
    id: u32,
    memory: GuestMemoryMmap,
    supported_cpuid: CpuId,
    /// The VM has an in-kernel irqchip, so this vCPU has a LAPIC.
    pub(crate) has_lapic: bool,
    /// The CPUID table vmkit gave the vCPU (`KVM_GET_CPUID2` does not read
    /// it back faithfully on every host), kept for snapshots.
    pub(crate) cpuid: Mutex<Option<CpuId>>,
    /// What the VM learnt from KVM for saving state.
    pub(crate) host_state: HostStateInfo,
    /// The last `KVM_RUN` returned a port I/O or MMIO exit that KVM
    /// completes only at the next `KVM_RUN`.
    pub(crate) io_in_flight: bool,
}

/// Offset of the LVT LINT0 register in the LAPIC page.
const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery mode ExtINT (bits 8-10 = 0b111).
const APIC_DM_EXTINT: u32 = 0x700;
/// LVT delivery mode NMI (bits 8-10 = 0b100).
const APIC_DM_NMI: u32 = 0x400;
/// LVT delivery-mode field and mask bit.
const APIC_LVT_MODE_AND_MASK: u32 = 0x0001_0700;

impl Vcpu {
    pub(crate) fn new(
        mut fd: VcpuFd,
        id: u32,
        memory: GuestMemoryMmap,
        supported_cpuid: CpuId,
        has_lapic: bool,
        run_size: usize,
        host_state: HostStateInfo,
    ) -> Result<Self, VcpuError> {
        // The only reference to kvm_run ever created; it ends here, and from
        // now on the mapping is reached through this pointer alone.
        let ptr = NonNull::from(fd.get_kvm_run());
        let immediate_exit = ptr
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(offset_of!(kvm_run, immediate_exit));
        // SAFETY: `immediate_exit` points into the kvm_run mapping owned by
        // `fd`. `Vcpu::drop` retires `shared` before `fd` is dropped, so the
        // mapping outlives every use; vmkit touches the byte only through
        // `VcpuShared` (atomically) and never calls kvm-ioctls' `run` or
        // `set_kvm_immediate_exit`.
        let shared = Arc::new(unsafe { VcpuShared::new(immediate_exit) }?);
        Ok(Vcpu {
            shared,
            run_area: RunArea {
                ptr,
                size: run_size,
            },
            fd,
            id,
            memory,
            supported_cpuid,
            has_lapic,
            cpuid: Mutex::new(None),
            host_state,
            io_in_flight: false,
        })
    }

    /// A handle that kicks, pauses, resumes and stops this vCPU from other
    /// threads.
    pub fn handle(&self) -> VcpuHandle {
        VcpuHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Completes an I/O exit in flight without running guest code: enters
    /// `KVM_RUN` with `immediate_exit` set, which KVM requires before the
    /// vCPU's state is saved. A no-op when nothing is in flight.
    pub fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        let shared = Arc::clone(&self.shared);
        let _guard = shared.enter();
        self.shared.arm();
        let mut result = Err(VcpuError::Busy(MAX_EAGAIN));
        for _ in 0..MAX_EAGAIN {
            match self.kvm_run() {
                Err(e) if e.errno() == libc::EINTR => {
                    result = Ok(());
                    break;
                }
                // An AP not started yet, or (never seen) an exit despite
                // immediate_exit: try again, boundedly.
                Err(e) if e.errno() == libc::EAGAIN => {}
                Ok(()) => {}
                Err(e) => {
                    result = Err(VcpuError::Run(e));
                    break;
                }
            }
        }
        // Clears our arming unless a request arrived meanwhile (that one
        // stays pending for `run`).
        self.shared.disarm();
        result
    }

    /// One `KVM_RUN`. Records whether it left a port I/O or MMIO exit for
    /// the next `KVM_RUN` to complete (any `KVM_RUN` completes the previous
    /// one first, even with `immediate_exit` set).
    fn kvm_run(&mut self) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: KVM_RUN on a vCPU fd takes no argument; the kernel reads
        // and writes only the vCPU's own kvm_run mapping, which `self.fd`
        // keeps alive, and which vmkit accesses only through raw pointers
        // and atomics (never through a live reference).
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&self.fd, KVM_RUN()) };
        if ret == 0 {
            self.io_in_flight = matches!(
                self.exit_reason(),
                kvm_bindings::KVM_EXIT_IO | kvm_bindings::KVM_EXIT_MMIO
            );
            Ok(())
        } else {
            let err = kvm_ioctls::Error::last();
            // EAGAIN comes from an AP not yet started, before KVM looks at
            // a pending completion (and an AP that never ran has none).
            if err.errno() != libc::EAGAIN {
                self.io_in_flight = false;
            }
            Err(err)
        }
    }

    /// Whether a port I/O or MMIO exit is in flight: the run loop returned
    /// (e.g. [`StopReason::Exit`] from a device) before KVM completed the
    /// access. [`complete_pending_io`](Self::complete_pending_io) finishes
    /// it; the state must not be saved before.
    pub fn io_in_flight(&self) -> bool {
        self.io_in_flight
    }

    /// The vCPU's id (its APIC ID).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The KVM vCPU fd, for what this crate does not wrap. (It is shared:
    /// kvm-ioctls' `run`, which needs `&mut`, cannot be called through it,
    /// so nothing aliases the `kvm_run` mapping the run loop uses.)
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets up an application processor: CPUID, boot MSRs and FPU as for
    /// [`configure`](Self::configure), but no registers — the AP waits in
    /// KVM for the INIT/SIPI sequence its bootstrap processor sends, which
    /// sets CS:IP (real mode, at the SIPI vector's page). Its local
    /// interrupt pins stay as KVM resets them (masked), as on a PC where
    /// only the BSP's LINT0 is wired to the PIC. Needs the in-kernel
    /// irqchip, and a vCPU id other than the boot CPU's (0).
    pub fn configure_ap(&self, cpuid: &CpuidConfig) -> Result<(), VcpuError> {
        if !self.has_lapic {
            return Err(VcpuError::InvalidBoot(
                "an application processor waits for INIT/SIPI, which needs the in-kernel irqchip",
            ));
        }
        if self.id == 0 {
            return Err(VcpuError::InvalidBoot(
                "vCPU 0 is the bootstrap processor; configure it with `configure`",
            ));
        }
        self.set_cpuid(cpuid)?;
        self.set_boot_msrs()?;
        self.set_boot_fpu()
    }

    /// Sets CPUID, MSRs, FPU, segment/control registers and general
    /// registers for `boot` (the bootstrap processor, or a single-vCPU
    /// guest). Long and protected mode write a GDT into guest memory; long
    /// mode expects page tables at `cr3` already.
    pub fn configure(&self, boot: &BootConfig) -> Result<(), VcpuError> {
        self.set_cpuid(&boot.cpuid)?;
        self.set_boot_msrs()?;
        if self.has_lapic {
            self.set_local_interrupts()?;
        }
        self.set_boot_fpu()?;
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let mut rip = boot.entry;
        match boot.mode {
            CpuMode::Real => {
                if boot.stack > 0xffff {
                    return Err(VcpuError::InvalidBoot(
                        "real-mode stack must lie below 64 KiB",
                    ));
                }
                if boot.entry >= 0x10_0000 {
                    return Err(VcpuError::InvalidBoot(
                        "real-mode entry must lie below 1 MiB",
                    ));
                }
                let cs = if boot.entry < 0x1_0000 {
                    0
                } else {
                    (boot.entry >> 4) as u16
                };
                rip = boot.entry - (u64::from(cs) << 4);
                sregs.cs = real_segment(cs, 0xb);
                for seg in [
                    &mut sregs.ds,
                    &mut sregs.es,
                    &mut sregs.fs,
                    &mut sregs.gs,
                    &mut sregs.ss,
                ] {
                    *seg = real_segment(0, 0x3);
                }
                sregs.cr0 = CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
            CpuMode::Protected { gdt } => {
                self.load_flat_segments(&mut sregs, gdt, false)?;
                sregs.cr0 = CR0_PE | CR0_ET | CR0_NE;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
            CpuMode::Long { gdt, cr3 } => {
                if cr3 & 0xfff != 0 {
                    return Err(VcpuError::InvalidBoot("CR3 must be 4 KiB aligned"));
                }
                self.load_flat_segments(&mut sregs, gdt, true)?;
                sregs.cr3 = cr3;
                sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
                sregs.efer = EFER_LME | EFER_LMA;
                sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            }
        }
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip,
            rsp: boot.stack,
            rsi: boot.rsi,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))
    }

    fn set_cpuid(&self, config: &CpuidConfig) -> Result<(), VcpuError> {
        let mut cpuid = self.supported_cpuid.clone();
        filter_cpuid(
            &mut cpuid,
            &CpuidConfig {
                vcpu_id: self.id,
                ..*config
            },
        );
        self.set_cpuid_table(cpuid)
    }

    /// Sets `cpuid` with `KVM_SET_CPUID2` and remembers it for snapshots.
    pub(crate) fn set_cpuid_table(&self, cpuid: CpuId) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        *self.cpuid.lock().unwrap_or_else(PoisonError::into_inner) = Some(cpuid);
        Ok(())
    }

    /// The CPUID table vmkit set on this vCPU (by
    /// [`configure`](Self::configure), [`configure_ap`](Self::configure_ap)
    /// or a snapshot restore), if any.
    pub fn cpuid(&self) -> Option<CpuId> {
        self.cpuid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The x87/SSE state at reset: FCW 0x37F, MXCSR 0x1F80.
    fn set_boot_fpu(&self) -> Result<(), VcpuError> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))
    }

    /// The MSRs every boot sets: SYSENTER and SYSCALL MSRs cleared, fast
    /// strings enabled in IA32_MISC_ENABLE, MTRRs enabled with write-back as
    /// the default type.
    fn set_boot_msrs(&self) -> Result<(), VcpuError> {
        const MSRS: [(u32, u64); 10] = [
            (0x174, 0),               // IA32_SYSENTER_CS
            (0x175, 0),               // IA32_SYSENTER_ESP
            (0x176, 0),               // IA32_SYSENTER_EIP
            (0xc000_0081, 0),         // STAR
            (0xc000_0082, 0),         // LSTAR
            (0xc000_0083, 0),         // CSTAR
            (0xc000_0084, 0),         // SFMASK
            (0xc000_0102, 0),         // KERNEL_GS_BASE
            (0x1a0, 1),               // IA32_MISC_ENABLE: fast strings
            (0x2ff, (1 << 11) | 0x6), // IA32_MTRR_DEF_TYPE: enabled, WB
        ];
        let entries: Vec<kvm_msr_entry> = MSRS
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuError::InvalidBoot("too many MSRs"))?;
        let set = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msr {
                msr: entries.get(set).map_or(0, |e| e.index),
                set,
                total: entries.len(),
            });
        }
        Ok(())
    }

    fn load_flat_segments(
        &self,
        sregs: &mut kvm_sregs,
        gdt: u64,
        long: bool,
    ) -> Result<(), VcpuError> {
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: BOOT_CS,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: u8::from(!long),
            s: 1,
            l: u8::from(long),
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: BOOT_DS,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        let tss = kvm_segment {
            base: 0,
            limit: 0x67,
            selector: BOOT_TSS,
            type_: 0xb,
            present: 1,
            s: 0,
            ..Default::default()
        };
        let table: [u64; 6] = [0, 0, gdt_entry(&code), gdt_entry(&data), gdt_entry(&tss), 0];
        for (i, entry) in table.iter().enumerate() {
            let addr = gdt + i as u64 * 8;
            self.memory
                .write_obj(*entry, GuestAddress(addr))
                .map_err(|source| VcpuError::Gdt { addr, source })?;
        }
        sregs.gdt.base = gdt;
        sregs.gdt.limit = (GDT_SIZE - 1) as u16;
        // An empty IDT: any exception before the guest loads its own is a
        // triple fault, reported as StopReason::Shutdown.
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        Ok(())
    }

    /// Wires the LAPIC's local interrupt pins as a PC firmware leaves them:
    /// LINT0 in ExtINT mode (the 8259 PIC's output reaches the CPU through
    /// it) and LINT1 in NMI mode. Both stay unmasked.
    fn set_local_interrupts(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        for (offset, mode) in [
            (APIC_LVT_LINT0, APIC_DM_EXTINT),
            (APIC_LVT_LINT1, APIC_DM_NMI),
        ] {
            let value = lapic_reg(&lapic, offset);
            set_lapic_reg(&mut lapic, offset, (value & !APIC_LVT_MODE_AND_MASK) | mode);
        }
        self.fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
    }

    /// The in-kernel LAPIC's register at `offset` (None without an
    /// in-kernel irqchip or for an offset outside the register page).
    pub fn lapic_register(&self, offset: usize) -> Option<u32> {
        if !self.has_lapic || offset + 4 > 0x400 {
            return None;
        }
        let lapic = self.fd.get_lapic().ok()?;
        Some(lapic_reg(&lapic, offset))
    }

    /// The general registers.
    pub fn regs(&self) -> Result<kvm_regs, VcpuError> {
        self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))
    }

    /// Sets the general registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), VcpuError> {
        self.fd.set_regs(regs).map_err(ioctl("KVM_SET_REGS"))
    }

    /// The segment and control registers.
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))
    }

    /// Sets the segment and control registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        self.fd.set_sregs(sregs).map_err(ioctl("KVM_SET_SREGS"))
    }

    /// The registers, for a stop report.
    pub fn dump(&self) -> RegisterDump {
        RegisterDump {
            regs: self.fd.get_regs().ok(),
            sregs: self.fd.get_sregs().ok(),
        }
    }

    /// Runs the guest until it stops, handing port I/O and MMIO exits to
    /// `io`. I/O exits are handled without leaving the loop and without
    /// allocating; everything else returns a [`StopReason`]. A
    /// [`VcpuHandle`] can kick, pause or stop the loop from other threads.
    pub fn run<H: IoHandler + ?Sized>(&mut self, io: &H) -> Result<StopReason, VcpuError> {
        let shared = Arc::clone(&self.shared);
        let _guard = shared.enter();
        let mut eagain = 0;
        loop {
            match self.kvm_run() {
                Ok(()) => eagain = 0,
                Err(e) if e.errno() == libc::EINTR => match shared.interrupted() {
                    Interrupt::Continue => continue,
                    Interrupt::Kicked => return Ok(StopReason::Kicked),
                    Interrupt::Stopped => return Ok(StopReason::Stopped),
                    Interrupt::Foreign => return Ok(StopReason::Interrupted),
                },
                Err(e) if e.errno() == libc::EAGAIN => {
                    eagain += 1;
                    if eagain >= MAX_EAGAIN {
                        return Err(VcpuError::Busy(eagain));
                    }
                    continue;
                }
                Err(e) => return Err(VcpuError::Run(e)),
            }
            let action = match self.exit_reason() {
                kvm_bindings::KVM_EXIT_IO => self.handle_io(io)?,
                kvm_bindings::KVM_EXIT_MMIO => self.handle_mmio(io),
                kvm_bindings::KVM_EXIT_HLT => return Ok(StopReason::Hlt),
                kvm_bindings::KVM_EXIT_SHUTDOWN => {
                    return Ok(StopReason::Shutdown(Box::new(self.dump())))
                }
                kvm_bindings::KVM_EXIT_SYSTEM_EVENT => return Ok(self.system_event()),
                kvm_bindings::KVM_EXIT_INTERNAL_ERROR => return Ok(self.internal_error()),
                kvm_bindings::KVM_EXIT_FAIL_ENTRY => return Ok(self.fail_entry()),
                // KVM_EXIT_INTR: a signal arrived right at an exit.
                kvm_bindings::KVM_EXIT_INTR => IoAction::Continue,
                exit_reason => {
                    return Ok(StopReason::Unhandled {
                        exit_reason,
                        registers: Box::new(self.dump()),
                    })
                }
            };
            match action {
                IoAction::Continue => {}
                IoAction::Exit(code) => return Ok(StopReason::Exit(code)),
                IoAction::Reset => return Ok(StopReason::Reset),
                IoAction::PowerOff => return Ok(StopReason::PowerOff),
            }
        }
    }

    fn run_ptr(&self) -> *mut kvm_run {
        self.run_area.ptr.as_ptr()
    }

    /// A pointer to the exit member of type `T` in kvm_run's exit union
    /// (every member starts at the union's offset). Computing it reads
    /// nothing.
    fn exit_member<T>(&self) -> *const T {
        self.run_ptr()
            .cast::<u8>()
            .wrapping_add(offset_of!(kvm_run, __bindgen_anon_1))
            .cast::<T>()
    }

    fn exit_reason(&self) -> u32 {
        let field = self
            .run_ptr()
            .cast::<u8>()
            .wrapping_add(offset_of!(kvm_run, exit_reason))
            .cast::<u32>();
        // SAFETY: the mapping is live (owned by `self.fd`) and the field is
        // an aligned plain integer the kernel wrote before KVM_RUN returned,
        // read by value without creating a reference.
        unsafe { field.read_volatile() }
    }

    /// A port I/O exit: one handler call per repetition of a string
    /// instruction.
    fn handle_io<H: IoHandler + ?Sized>(&mut self, io: &H) -> Result<IoAction, VcpuError> {
        // SAFETY: exit_reason is KVM_EXIT_IO, for which the kernel filled
        // the `io` member; it is plain integers, copied out by value.
        let exit = unsafe { self.exit_member::<IoExit>().read_volatile() };
        let size = u64::from(exit.size);
        let len = size * u64::from(exit.count);
        let header = std::mem::size_of::<kvm_run>() as u64;
        let in_bounds = exit
            .data_offset
            .checked_add(len)
            .is_some_and(|end| end <= self.run_area.size as u64);
        if exit.data_offset < header || !in_bounds || !matches!(size, 1 | 2 | 4) {
            return Err(VcpuError::BadExitData {
                offset: exit.data_offset,
                len,
                size: self.run_area.size,
            });
        }
        let start = self
            .run_ptr()
            .cast::<u8>()
            .wrapping_add(exit.data_offset as usize);
        // SAFETY: checked above: `data_offset..data_offset + len` lies in
        // the mapping and after the kvm_run header, so the slice overlaps
        // neither `immediate_exit` nor anything else vmkit reads; the kernel
        // does not touch it until the next KVM_RUN, which needs `&mut self`,
        // so the slice is unaliased for its lifetime.
        let data = unsafe { std::slice::from_raw_parts_mut(start, len as usize) };
        let mut action = IoAction::Continue;
        for chunk in data.chunks_exact_mut(size as usize) {
            if u32::from(exit.direction) == kvm_bindings::KVM_EXIT_IO_OUT {
                action = io.pio_write(exit.port, chunk);
                if action != IoAction::Continue {
                    break;
                }
            } else {
                io.pio_read(exit.port, chunk);
            }
        }
        Ok(action)
    }

    /// An MMIO exit.
    fn handle_mmio<H: IoHandler + ?Sized>(&mut self, io: &H) -> IoAction {
        let member = self.exit_member::<MmioExit>();
        // SAFETY: exit_reason is KVM_EXIT_MMIO, for which the kernel filled
        // the `mmio` member: plain integers, copied out by value.
        let exit = unsafe { member.read_volatile() };
        let data = member
            .cast::<u8>()
            .wrapping_add(offset_of!(MmioExit, data))
            .cast_mut();
        let len = (exit.len as usize).min(exit.data.len());
        // SAFETY: the slice covers `len` <= 8 bytes of `mmio.data` inside the
        // live mapping, which overlaps no other field vmkit reads or writes;
        // the kernel leaves it alone until the next KVM_RUN (which needs
        // `&mut self`), so it is unaliased for its lifetime.
        let data = unsafe { std::slice::from_raw_parts_mut(data, len) };
        if exit.is_write != 0 {
            io.mmio_write(exit.phys_addr, data)
        } else {
            io.mmio_read(exit.phys_addr, data);
            IoAction::Continue
        }
    }

    fn system_event(&self) -> StopReason {
        // SAFETY: exit_reason is KVM_EXIT_SYSTEM_EVENT, for which the kernel
        // filled `system_event`: plain integers, copied out by value.
        let event = unsafe {
            self.exit_member::<kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_19>()
                .read_volatile()
        };
        let kind = match event.type_ {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
            other => SystemEvent::Other(other),
        };
        // SAFETY: `data` is the member KVM uses on x86 (ndata words); both
        // members are plain integers, valid for any bit pattern.
        let words = unsafe { event.__bindgen_anon_1.data };
        let data = if event.ndata > 0 { words[0] } else { 0 };
        StopReason::SystemEvent { kind, data }
    }

    fn fail_entry(&self) -> StopReason {
        // SAFETY: exit_reason is KVM_EXIT_FAIL_ENTRY, for which the kernel
        // filled `fail_entry`: plain integers, copied out by value.
        let fail = unsafe { self.exit_member::<FailEntryExit>().read_volatile() };
        StopReason::FailEntry {
            reason: fail.hardware_entry_failure_reason,
            cpu: fail.cpu,
            registers: Box::new(self.dump()),
        }
    }

    fn internal_error(&self) -> StopReason {
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, for which the
        // kernel filled the `internal` member: plain integers, copied out by
        // value.
        let internal = unsafe {
            self.exit_member::<kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_13>()
                .read_volatile()
        };
        let mut data = [0u64; 4];
        let n = (internal.ndata as usize)
            .min(data.len())
            .min(internal.data.len());
        data[..n].copy_from_slice(&internal.data[..n]);
        StopReason::InternalError {
            suberror: internal.suberror,
            data,
            registers: Box::new(self.dump()),
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // Before any field (and so the kvm_run mapping) is dropped.
        self.shared.retire();
    }
}

/// Reads a 32-bit LAPIC register; `offset` must be below 0x3FD.
fn lapic_reg(lapic: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    u32::from_le_bytes(bytes)
}

/// Writes a 32-bit LAPIC register; `offset` must be below 0x3FD.
fn set_lapic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, value: u32) {
    for (r, b) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *r = b as _;
    }
}

fn ioctl(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { op, source }
}

fn real_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    }
}

/// Encodes a segment as an 8-byte GDT descriptor (SDM Vol. 3A, 3.4.5).
fn gdt_entry(seg: &kvm_segment) -> u64 {
    let limit = if seg.g != 0 {
        seg.limit >> 12
    } else {
        seg.limit
    };
    let base = seg.base & 0xffff_ffff;
    let access = u64::from(seg.type_ & 0xf)
        | (u64::from(seg.s & 1) << 4)
        | (u64::from(seg.dpl & 3) << 5)
        | (u64::from(seg.present & 1) << 7);
    let flags = u64::from(seg.avl & 1)
        | (u64::from(seg.l & 1) << 1)
        | (u64::from(seg.db & 1) << 2)
        | (u64::from(seg.g & 1) << 3);
    (u64::from(limit) & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((u64::from(limit) >> 16) & 0xf) << 48)
        | (flags << 52)
        | ((base >> 24) << 56)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_registers_are_little_endian_words() {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT_LINT1, 0x0001_0400);
        assert_eq!(lapic.regs[APIC_LVT_LINT1] as u8, 0x00);
        assert_eq!(lapic.regs[APIC_LVT_LINT1 + 1] as u8, 0x04);
        assert_eq!(lapic.regs[APIC_LVT_LINT1 + 2] as u8, 0x01);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x0001_0400);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0);
    }

    #[test]
    fn gdt_entries_match_known_encodings() {
        let code64 = kvm_segment {
            limit: 0xffff_ffff,
            type_: 0xb,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        assert_eq!(gdt_entry(&code64), 0x00af_9b00_0000_ffff);
        let data = kvm_segment {
            type_: 0x3,
            db: 1,
            l: 0,
            ..code64
        };
        assert_eq!(gdt_entry(&data), 0x00cf_9300_0000_ffff);
        let code32 = kvm_segment {
            db: 1,
            l: 0,
            ..code64
        };
        assert_eq!(gdt_entry(&code32), 0x00cf_9b00_0000_ffff);
        let tss = kvm_segment {
            base: 0x1234_5678,
            limit: 0x67,
            type_: 0xb,
            present: 1,
            ..Default::default()
        };
        assert_eq!(gdt_entry(&tss), 0x1200_8b34_5678_0067);
    }
}
