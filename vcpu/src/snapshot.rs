//! Saving and restoring a VM: vCPU and VM state from KVM, guest memory (full
//! or incremental from the dirty log), and a versioned, checksummed file
//! format for all of it.
//!
//! # Taking and restoring a snapshot
//!
//! A snapshot is taken while no vCPU runs guest code and no port I/O or
//! MMIO exit is in flight: every vCPU has returned from
//! [`Vcpu::run`](crate::Vcpu::run) (a [`VcpuHandle::kick`](crate::VcpuHandle::kick)
//! or [`stop`](crate::VcpuHandle::stop) brings it out, with any access in
//! flight completed), and a vCPU whose run loop returned on a device's
//! request ([`StopReason::Exit`](crate::StopReason::Exit), ...) has been
//! through [`Vcpu::complete_pending_io`](crate::Vcpu::complete_pending_io).
//! The borrow checker enforces the first part ([`Vcpu::save_state`] takes
//! `&self`, `run` takes `&mut self`); the second is checked:
//! [`Vcpu::save_state`] fails with [`SnapshotError::ExitInFlight`]. With
//! several vCPUs, all must be out of `run` before any is saved
//! (`KVM_GET_VCPU_EVENTS` is not safe while other vCPUs run).
//!
//! [`Snapshot::capture_full`] saves every vCPU, the VM (irqchip, PIT,
//! clock) and all guest memory; [`Snapshot::capture_incremental`] saves the
//! same state but only the pages written since the previous capture (KVM's
//! dirty log, which needs [`VmConfig::log_dirty_pages`](crate::VmConfig),
//! together with the pages the VMM wrote through vm-memory when the memory
//! has a dirty bitmap). [`Snapshot::restore`] puts a snapshot into a fresh
//! VM with vCPUs created with the same ids and not configured (restore sets
//! their CPUID, which KVM allows only before the first `KVM_RUN`).
//!
//! # Restore order
//!
//! Memory first, then the VM, then each vCPU. The VM part sets the PIC
//! master, PIC slave and IOAPIC (`KVM_SET_IRQCHIP`), the PIT
//! (`KVM_SET_PIT2`) and the clock (`KVM_SET_CLOCK`, without
//! `KVM_CLOCK_REALTIME`: the guest's clock continues from the saved value, so
//! the time a snapshot spends on disk is invisible to the guest). The
//! guest's TSC is saved and restored as the `IA32_TSC` MSR, so on hardware
//! with TSC offsetting it too continues from the saved value and agrees
//! with the kvmclock; a KVM that cannot offset the TSC (such as `kvm_pvm`)
//! ignores that write, and there the guest's TSC is the host's: it stays
//! monotonic across a restore on the same host but includes the time
//! spent on disk, while the kvmclock does not. Each vCPU
//! is then restored in this order (the same facts the KVM API documentation,
//! QEMU, Firecracker and Cloud Hypervisor rely on):
//!
//! | step | ioctl | why here |
//! |---|---|---|
//! | 1 | `KVM_SET_CPUID2` | CPUID decides which MSRs, XCR0 bits and XSAVE components KVM accepts, so it comes before them; KVM refuses to change it after the first `KVM_RUN`, so it must come first. The table is the one vmkit set (remembered by the [`Vcpu`]), not `KVM_GET_CPUID2`'s view of it, which differs on some hosts. |
//! | 2 | `KVM_SET_MP_STATE` | Whether the vCPU is runnable, halted or waiting for INIT/SIPI; set early, as the references do, so that later steps see the final run state. |
//! | 3 | `KVM_SET_REGS` | Clears any pending exception as a side effect, so it must precede `KVM_SET_VCPU_EVENTS`, which restores it. |
//! | 4 | `KVM_SET_SREGS` | Control registers, EFER and the APIC base MSR; must precede the LAPIC. |
//! | 5 | `KVM_SET_XSAVE` | x87/SSE/AVX state (not `KVM_SET_FPU`, which does not restore xmm registers on every host). After CPUID, which sizes it. |
//! | 6 | `KVM_SET_XCRS` | XCR0; after CPUID, which says which bits are valid. |
//! | 7 | `KVM_SET_DEBUGREGS` | No dependencies. |
//! | 8 | `KVM_SET_LAPIC` | After SREGS (the APIC base decides where and whether the LAPIC is enabled), before the MSRs (the TSC-deadline MSR is only accepted once the LAPIC is in TSC-deadline mode). |
//! | 9 | `KVM_SET_TSC_KHZ` | Only when the saved TSC frequency differs from the vCPU's (scaling is not available everywhere; then the restore fails rather than run the guest with another TSC rate). Before the MSRs: KVM turns a written `IA32_TSC` value into a TSC offset with the scaling ratio in force at the time of the write and does not redo it when the ratio changes, so a frequency set afterwards would make the guest's TSC jump. |
//! | 10 | `KVM_SET_MSRS` | The MSRs `KVM_GET_MSR_INDEX_LIST` names that the vCPU accepted when saved: the TSC, kvmclock's system-time and wall-clock MSRs, SYSCALL/SYSENTER, PAT, MTRRs, ... |
//! | 11 | `KVM_SET_VCPU_EVENTS` | Last: pending exceptions, interrupts, NMIs and the interrupt shadow, which the steps above may reset. |
//!
//! Saving reads `KVM_GET_MP_STATE` first (it makes KVM process pending
//! INIT/SIPI events, which changes other state) and `KVM_GET_VCPU_EVENTS`
//! last.
//!
//! # File format (version 1)
//!
//! All integers are little-endian. KVM structs are stored as their raw
//! bytes: they are `repr(C)` structs of plain integers without padding, in
//! the host's (x86-64, little-endian) layout. The header records the size of
//! every struct kind, and a reader refuses a file whose sizes differ from
//! its own. Conversion to and from bytes uses `zerocopy` (kvm-bindings
//! derives its `IntoBytes`/`FromBytes` traits), whose derives check at
//! compile time that a struct has no padding and accepts every bit pattern,
//! so this module needs no `unsafe` to do it.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VMKITSNP` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | … | sections, the first `HEAD`, the last `END!` |
//!
//! Every section:
//!
//! | size | field |
//! |---|---|
//! | 4 | tag (ASCII) |
//! | 8 | payload length *L* |
//! | *L* | payload |
//! | 4 | CRC-32 (IEEE) of tag, length and payload |
//!
//! Payloads:
//!
//! | tag | count | payload |
//! |---|---|---|
//! | `HEAD` | exactly 1, first | arch `u32` (1 = x86-64), flags `u32` (0), snapshot id `u64` (non-zero), parent id `u64` (0 for a snapshot with full memory or none; else the id of the snapshot an incremental one applies to), *n* `u32` (13), *n* struct sizes `u32` in the order of [`STRUCT_SIZES`] |
//! | `VCPU` | 0..=[`MAX_VCPUS`] | vCPU id `u32`, flags `u32` (bit 0: has a LAPIC), TSC kHz `u32` (0: unknown), *c* `u32` CPUID entries (≤ [`MAX_CPUID_ENTRIES`]), *m* `u32` MSRs (≤ [`MAX_MSRS`]), then `kvm_regs`, `kvm_sregs`, `kvm_xsave`, `kvm_xcrs`, `kvm_debugregs`, `kvm_vcpu_events`, `kvm_mp_state`, `kvm_lapic_state` (if flagged), *c* × `kvm_cpuid_entry2`, *m* × `kvm_msr_entry` |
//! | `VMST` | 0..=1 | flags `u32` (bit 0: irqchip, bit 1: PIT), reserved `u32` (0), `kvm_clock_data`, 3 × `kvm_irqchip` (PIC master, PIC slave, IOAPIC; if flagged), `kvm_pit_state2` (if flagged) |
//! | `MEMF` | 0..=[`MAX_MEMORY_REGIONS`] | one region in full: guest-physical base `u64`, length `u64` (both page aligned), the bytes |
//! | `MEMD` | 0..=[`MAX_MEMORY_REGIONS`] | dirty pages of one region: base `u64`, region length `u64`, *k* `u64`, *k* page numbers `u64` (strictly increasing, inside the region), *k* × 4096 bytes |
//! | `DEVS` | 0..=[`MAX_DEVICE_SECTIONS`] | opaque device state: name length `u16` (1..=[`MAX_DEVICE_NAME`]), name (UTF-8, unique), the device's bytes |
//! | `END!` | exactly 1, last | empty |
//!
//! `MEMF` and `MEMD` do not mix; `MEMD` needs a parent id, `MEMF` forbids
//! one. Device models add their state as named `DEVS` sections (their own
//! versioning is theirs); the container does not interpret them.
//!
//! # Device state
//!
//! The bytes of a `DEVS` section are, for vmkit's own devices, the
//! encodings described in `vmkit_devices::state` (a 4-character tag, a
//! layout version, then fixed little-endian fields; decoding is strict):
//! for example `SerialState::to_bytes` (`UART`), `I8042State` (`KBC8`),
//! `RtcState` (`CMOS`), `PciRootState`, and the virtio transports'
//! `MmioState`/`PciState`, which carry the virtio device's own state
//! (`VCON`, `VNET`, ...) inside. This crate does not depend on those
//! crates, so it neither checks nor interprets them. Section names, by
//! convention, say what the device is and where the guest sees it, so that
//! a restore finds each state for the device created at the same place:
//! `<kind>@<location>`, e.g. `serial@pio:0x3f8`, `i8042@pio:0x60`,
//! `rtc@pio:0x70`, `pci-root@0`, `virtio-mmio@0xd0000000`,
//! `virtio-pci@00:03.0`. Pass them to [`Snapshot::set_device`] when saving
//! and read them back with [`Snapshot::device`].
//!
//! A reader refuses, with a [`SnapshotError`] saying what and where: another
//! magic; another format version (older or newer, naming both); another
//! architecture or struct size; truncated input; a checksum mismatch; a
//! section whose length disagrees with its contents; counts over the limits;
//! unknown tags, duplicates or a misplaced section; and anything after the
//! end marker. Every checksum is verified before a [`Snapshot`] is
//! returned, so nothing of a damaged file reaches a VM. The reader streams:
//! its buffers grow with the bytes actually read, at most 16 MiB ahead of
//! them, never with a length the input claims; and it never panics.
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//! use vmkit_devices::{DebugExit, IoBus};
//! use vmkit_memory::vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::MemoryLayout;
//! use vmkit_vcpu::snapshot::Snapshot;
//! use vmkit_vcpu::{BootConfig, CpuMode, Vm, VmConfig};
//!
//! // A real-mode guest that stops the run loop through the debug-exit port
//! // (mov al, 7; out 0xf4, al; hlt).
//! let memory = MemoryLayout::new(64 << 20)?.create_memory(&Default::default())?;
//! memory.write_slice(&[0xb0, 0x07, 0xe6, 0xf4, 0xf4], GuestAddress(0x1000))?;
//! let vm = Vm::new(memory, VmConfig { irqchip: true, ..Default::default() })?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! vcpu.configure(&BootConfig::new(CpuMode::Real, 0x1000, 0x8000))?;
//! let bus = IoBus::new();
//! bus.pio.insert(0xf4, 1, Arc::new(DebugExit::new()))?;
//! vcpu.run(&bus)?;
//! // The port write that stopped the loop is still in flight: finish it
//! // before saving.
//! vcpu.complete_pending_io()?;
//! let snapshot = Snapshot::capture_full(&vm, &[&vcpu])?;
//! snapshot.write_to(&mut std::fs::File::create("vm.snap")?)?;
//!
//! // Later, maybe in another process: the same memory layout, a fresh VM,
//! // vCPUs with the same ids, not configured.
//! let snapshot = Snapshot::read_from(&mut std::fs::File::open("vm.snap")?)?;
//! let memory = MemoryLayout::new(64 << 20)?.create_memory(&Default::default())?;
//! let vm = Vm::new(memory, VmConfig { irqchip: true, ..Default::default() })?;
//! let vcpu = vm.create_vcpu(0)?;
//! snapshot.restore(&vm, &[&vcpu], None)?;
//! // vcpu.run(&bus) continues where the source stopped.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_MAX_MSR_ENTRIES,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmkit_memory::layout::PAGE_SIZE;
use vmkit_memory::GuestMemoryMmap;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::Vm;

/// The first eight bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"VMKITSNP";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The architecture code of x86-64 in the header.
pub const ARCH_X86_64: u32 = 1;
/// At most this many `VCPU` sections (KVM's own limit on this host family).
pub const MAX_VCPUS: usize = 1024;
/// At most this many CPUID entries per vCPU (`KVM_MAX_CPUID_ENTRIES`).
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// At most this many MSRs per vCPU.
pub const MAX_MSRS: usize = 1024;
/// At most this many memory sections.
pub const MAX_MEMORY_REGIONS: usize = 4096;
/// At most this many device sections.
pub const MAX_DEVICE_SECTIONS: usize = 4096;
/// The longest device-section name, in bytes.
pub const MAX_DEVICE_NAME: usize = 64;
/// The size of a page in `MEMD` sections.
pub const SNAPSHOT_PAGE_SIZE: u64 = PAGE_SIZE;

const TAG_HEAD: [u8; 4] = *b"HEAD";
const TAG_VCPU: [u8; 4] = *b"VCPU";
const TAG_VM: [u8; 4] = *b"VMST";
const TAG_MEM_FULL: [u8; 4] = *b"MEMF";
const TAG_MEM_DIRTY: [u8; 4] = *b"MEMD";
const TAG_DEVICE: [u8; 4] = *b"DEVS";
const TAG_END: [u8; 4] = *b"END!";

const VCPU_FLAG_LAPIC: u32 = 1;
const VM_FLAG_IRQCHIP: u32 = 1;
const VM_FLAG_PIT: u32 = 2;
/// `chip_id`s of `KVM_GET_IRQCHIP`, in the order they are stored.
const IRQCHIP_IDS: [u32; 3] = [
    kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
    kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
    kvm_bindings::KVM_IRQCHIP_IOAPIC,
];
/// `KVM_SET_XSAVE` reads `sizeof(kvm_xsave)` bytes only while the guest's
/// XSAVE state fits in it.
const XSAVE_SIZE: usize = std::mem::size_of::<kvm_xsave>();

/// The KVM structs stored in a snapshot and their sizes in this build, in
/// the order the header lists them.
pub const STRUCT_SIZES: [(&str, usize); 13] = [
    ("kvm_regs", std::mem::size_of::<kvm_regs>()),
    ("kvm_sregs", std::mem::size_of::<kvm_sregs>()),
    ("kvm_xsave", XSAVE_SIZE),
    ("kvm_xcrs", std::mem::size_of::<kvm_xcrs>()),
    ("kvm_debugregs", std::mem::size_of::<kvm_debugregs>()),
    ("kvm_vcpu_events", std::mem::size_of::<kvm_vcpu_events>()),
    ("kvm_mp_state", std::mem::size_of::<kvm_mp_state>()),
    ("kvm_lapic_state", std::mem::size_of::<kvm_lapic_state>()),
    ("kvm_cpuid_entry2", std::mem::size_of::<kvm_cpuid_entry2>()),
    ("kvm_msr_entry", std::mem::size_of::<kvm_msr_entry>()),
    ("kvm_irqchip", std::mem::size_of::<kvm_irqchip>()),
    ("kvm_pit_state2", std::mem::size_of::<kvm_pit_state2>()),
    ("kvm_clock_data", std::mem::size_of::<kvm_clock_data>()),
];

/// A section tag, shown as text in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag(pub [u8; 4]);

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

fn older_or_newer(found: u32, supported: u32) -> &'static str {
    if found < supported {
        "older"
    } else {
        "newer"
    }
}

/// Errors from taking, encoding, decoding or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the snapshot stream failed.
    #[error("cannot {op} the snapshot: {source}")]
    Io {
        /// What was being done ("read", "write").
        op: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The input does not start with [`MAGIC`].
    #[error("not a vmkit snapshot: the magic is {} instead of \"VMKITSNP\"", .found.escape_ascii())]
    BadMagic {
        /// The first bytes of the input.
        found: [u8; 8],
    },
    /// The snapshot was written in another format version.
    #[error("snapshot format version {found} is {} than version {supported}, the only one this build reads", older_or_newer(*found, *supported))]
    UnsupportedVersion {
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The snapshot was taken on another architecture.
    #[error("the snapshot is for architecture {found}, this build handles {expected} (x86-64)")]
    Arch {
        /// Architecture code in the file.
        found: u32,
        /// The code this build handles.
        expected: u32,
    },
    /// A KVM struct has another size in the file than in this build.
    #[error("struct {name} is {file} bytes in the snapshot but {host} bytes in this build")]
    StructSize {
        /// The struct.
        name: &'static str,
        /// Its size in the file.
        file: u64,
        /// Its size here.
        host: u64,
    },
    /// The input ends early.
    #[error("the snapshot is truncated: {what} at offset {offset} needs {needed} bytes, {available} remain")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: usize,
        /// Bytes needed.
        needed: u64,
        /// Bytes left.
        available: usize,
    },
    /// A section's CRC does not match its contents.
    #[error("section {tag} at offset {offset} is corrupt: CRC-32 {stored:#010x} stored, {computed:#010x} computed")]
    Checksum {
        /// The section's tag (as read, perhaps itself corrupt).
        tag: Tag,
        /// Offset of the section.
        offset: usize,
        /// The CRC in the file.
        stored: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// A section has a tag this version does not define.
    #[error("unknown section {tag} at offset {offset}")]
    UnknownSection {
        /// The tag.
        tag: Tag,
        /// Offset of the section.
        offset: usize,
    },
    /// A section's length disagrees with what its contents need.
    #[error(
        "section {tag} at offset {offset} is {found} bytes long but its contents need {expected}"
    )]
    SectionLength {
        /// The section's tag.
        tag: Tag,
        /// Offset of the section.
        offset: usize,
        /// Length needed.
        expected: u64,
        /// Length in the file.
        found: u64,
    },
    /// A count is over its limit.
    #[error("{what}: {count} is over the limit of {max}")]
    Limit {
        /// What is counted.
        what: &'static str,
        /// The count.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// The contents are inconsistent.
    #[error("malformed snapshot at offset {offset}: {reason}")]
    Malformed {
        /// Where.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Bytes follow the end marker.
    #[error("{len} bytes of trailing data after the end marker at offset {offset}")]
    TrailingData {
        /// Offset of the first extra byte.
        offset: usize,
        /// How many there are.
        len: usize,
    },
    /// An in-memory snapshot cannot be written as it is.
    #[error("cannot encode the snapshot: {0}")]
    Encode(&'static str),
    /// A KVM ioctl failed while saving or restoring.
    #[error("{op} failed{}: {source}", vcpu_suffix(*.vcpu))]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The vCPU, for vCPU ioctls.
        vcpu: Option<u32>,
        /// The error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the MSRs.
    #[error("KVM_SET_MSRS on vCPU {vcpu} refused MSR {msr:#x} ({set} of {total} set)")]
    MsrRestore {
        /// The vCPU.
        vcpu: u32,
        /// The MSR refused.
        msr: u32,
        /// How many of the batch were set.
        set: usize,
        /// The batch size.
        total: usize,
    },
    /// The vCPU stopped with a port I/O or MMIO exit that KVM completes only
    /// at the next `KVM_RUN`.
    #[error(
        "vCPU {vcpu} has an I/O exit in flight; call Vcpu::complete_pending_io before saving it"
    )]
    ExitInFlight {
        /// The vCPU.
        vcpu: u32,
    },
    /// The vCPU has no CPUID set by vmkit.
    #[error("vCPU {vcpu} was never configured (no CPUID to save)")]
    NotConfigured {
        /// The vCPU.
        vcpu: u32,
    },
    /// The guest's XSAVE state does not fit the 4 KiB `kvm_xsave`.
    #[error("the XSAVE state is {size} bytes (KVM_CAP_XSAVE2), more than the {XSAVE_SIZE} bytes of kvm_xsave this version saves")]
    XsaveTooLarge {
        /// What KVM reports.
        size: usize,
    },
    /// The snapshot does not fit the VM or vCPU it is restored into.
    #[error("the snapshot does not fit: {0}")]
    Incompatible(String),
    /// An incremental snapshot was applied to memory that does not hold
    /// its parent.
    #[error("incremental snapshot {id:#x} applies on top of snapshot {parent:#x}, but the memory holds {}", match .base { Some(b) => format!("snapshot {b:#x}"), None => "no snapshot".to_string() })]
    WrongParent {
        /// The incremental snapshot.
        id: u64,
        /// Its parent.
        parent: u64,
        /// What the memory holds.
        base: Option<u64>,
    },
    /// Dirty pages were asked for, but the VM does not log them.
    #[error("an incremental snapshot needs a VM created with log_dirty_pages")]
    DirtyLogOff,
    /// Reading the dirty log failed.
    #[error("cannot read the dirty log: {0}")]
    DirtyLog(#[source] crate::vm::VmError),
    /// Guest memory could not be read or written.
    #[error("cannot access guest memory at {addr:#x}: {source}")]
    Memory {
        /// Guest-physical address.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Setting the remembered CPUID failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

fn vcpu_suffix(vcpu: Option<u32>) -> String {
    vcpu.map(|id| format!(" on vCPU {id}")).unwrap_or_default()
}

/// The state of one vCPU.
#[derive(Clone)]
pub struct VcpuSnapshot {
    /// The vCPU id (APIC ID).
    pub id: u32,
    /// The CPUID table vmkit set.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// The raw `kvm_xsave` (4096 bytes): x87, SSE, AVX, ... state.
    pub xsave: Vec<u8>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Run state (runnable, halted, waiting for SIPI, ...).
    pub mp_state: kvm_mp_state,
    /// The in-kernel LAPIC, when the VM has the in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// The MSRs KVM lists as saveable that the vCPU accepted.
    pub msrs: Vec<kvm_msr_entry>,
    /// The TSC frequency in kHz (0 when KVM could not say).
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSnapshot")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("cpuid_entries", &self.cpuid.len())
            .field("msrs", &self.msrs.len())
            .field("lapic", &self.lapic.is_some())
            .field("mp_state", &self.mp_state.mp_state)
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

/// The VM-wide state KVM keeps: irqchip, PIT, clock.
#[derive(Clone, Copy)]
pub struct VmSnapshot {
    /// The kvmclock (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave and IOAPIC, with the in-kernel irqchip.
    pub irqchip: Option<[kvm_irqchip; 3]>,
    /// The in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
}

impl std::fmt::Debug for VmSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSnapshot")
            .field("clock", &self.clock.clock)
            .field("irqchip", &self.irqchip.is_some())
            .field("pit", &self.pit.is_some())
            .finish()
    }
}

/// One guest memory region in full.
#[derive(Clone, PartialEq, Eq)]
pub struct MemoryRegionSnapshot {
    /// Guest-physical base.
    pub base: u64,
    /// Every byte of the region.
    pub data: Vec<u8>,
}

/// The pages of one region written since the previous capture.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyRegionSnapshot {
    /// Guest-physical base of the region.
    pub base: u64,
    /// Length of the region.
    pub len: u64,
    /// Page numbers inside the region, strictly increasing.
    pub pages: Vec<u64>,
    /// The pages' bytes, 4096 per page, in the order of `pages`.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for MemoryRegionSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemoryRegionSnapshot({:#x}, {:#x} bytes)",
            self.base,
            self.data.len()
        )
    }
}

impl std::fmt::Debug for DirtyRegionSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DirtyRegionSnapshot({:#x}, {:#x} bytes, {} dirty pages)",
            self.base,
            self.len,
            self.pages.len()
        )
    }
}

/// Guest memory in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemorySnapshot {
    /// Every region in full.
    Full(Vec<MemoryRegionSnapshot>),
    /// The pages written since the parent snapshot.
    Dirty(Vec<DirtyRegionSnapshot>),
}

/// Opaque state of one device, under a unique name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    /// The device's name (1..=[`MAX_DEVICE_NAME`] bytes).
    pub name: String,
    /// Its state, in the device's own format.
    pub data: Vec<u8>,
}

/// A whole snapshot: what the file format holds.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This snapshot's id (non-zero).
    pub id: u64,
    /// The snapshot an incremental one applies on top of.
    pub parent: Option<u64>,
    /// Every vCPU.
    pub vcpus: Vec<VcpuSnapshot>,
    /// The VM-wide state.
    pub vm: Option<VmSnapshot>,
    /// Guest memory.
    pub memory: Option<MemorySnapshot>,
    /// Device state, added by device models.
    pub devices: Vec<DeviceSection>,
}

/// What saving and restoring a vCPU needs to know about the host, read
/// once by [`Vm::new`].
#[derive(Debug, Clone)]
pub(crate) struct HostStateInfo {
    /// The MSRs KVM lists as saveable (`KVM_GET_MSR_INDEX_LIST`).
    pub(crate) msr_index_list: Arc<[u32]>,
    /// The guest XSAVE state's size as KVM reports it (`KVM_CAP_XSAVE2`;
    /// 0 when the capability is missing).
    pub(crate) xsave_size: usize,
}

/// A fresh, non-zero, process- and time-unique snapshot id.
fn fresh_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 40)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x.max(1)
}

fn kvm_err(op: &'static str, vcpu: Option<u32>) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { op, vcpu, source }
}

impl Vcpu {
    /// Saves the vCPU's state. It must not have an I/O exit in flight
    /// ([`SnapshotError::ExitInFlight`]; see
    /// [`complete_pending_io`](Vcpu::complete_pending_io)), and with
    /// several vCPUs none may be running.
    pub fn save_state(&self) -> Result<VcpuSnapshot, SnapshotError> {
        let id = self.id();
        if self.io_in_flight {
            return Err(SnapshotError::ExitInFlight { vcpu: id });
        }
        let cpuid = self
            .cpuid()
            .ok_or(SnapshotError::NotConfigured { vcpu: id })?;
        let fd = self.fd();
        let e = |op| kvm_err(op, Some(id));
        // First: makes KVM process pending INIT/SIPI events.
        let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        // KVM refuses KVM_GET_XSAVE (EINVAL) when the state is larger than
        // kvm_xsave, so nothing is silently cut off.
        let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
        let lapic = if self.has_lapic {
            Some(fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?)
        } else {
            None
        };
        let msrs = self.read_msrs()?;
        let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
        // Last: the GET ioctls above may change pending events.
        let events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuSnapshot {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            regs,
            sregs,
            xsave: xsave.as_bytes().to_vec(),
            xcrs,
            debugregs,
            events,
            mp_state,
            lapic,
            msrs,
            tsc_khz,
        })
    }

    /// Every MSR of KVM's saveable list that the vCPU lets `KVM_GET_MSRS`
    /// read (KVM stops a batch at the first MSR it refuses; that one is
    /// skipped and the rest read again).
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
        let id = self.id();
        let mut out = Vec::with_capacity(self.host_state.msr_index_list.len());
        let mut rest: &[u32] = &self.host_state.msr_index_list;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| SnapshotError::Encode("MSR batch larger than KVM_MAX_MSR_ENTRIES"))?;
            let read = self
                .fd()
                .get_msrs(&mut msrs)
                .map_err(kvm_err("KVM_GET_MSRS", Some(id)))?
                .min(batch.len());
            out.extend_from_slice(&msrs.as_slice()[..read]);
            let consumed = if read < batch.len() { read + 1 } else { read };
            rest = &rest[consumed..];
        }
        Ok(out)
    }

    /// Restores a state saved by [`save_state`](Self::save_state) into this
    /// vCPU, in the order the [module documentation](self) gives. The
    /// vCPU must have the same id, be created in a VM with the same
    /// irqchip setting and not have run yet.
    pub fn restore_state(&self, state: &VcpuSnapshot) -> Result<(), SnapshotError> {
        let id = self.id();
        if state.id != id {
            return Err(SnapshotError::Incompatible(format!(
                "vCPU snapshot {} restored into vCPU {id}",
                state.id
            )));
        }
        if state.lapic.is_some() != self.has_lapic {
            return Err(SnapshotError::Incompatible(format!(
                "vCPU {id}: the snapshot {} a LAPIC but the VM {} the in-kernel irqchip",
                if state.lapic.is_some() {
                    "has"
                } else {
                    "has no"
                },
                if self.has_lapic { "has" } else { "lacks" },
            )));
        }
        if self.host_state.xsave_size > XSAVE_SIZE {
            return Err(SnapshotError::XsaveTooLarge {
                size: self.host_state.xsave_size,
            });
        }
        let xsave = kvm_xsave::read_from_bytes(&state.xsave).map_err(|_| {
            SnapshotError::Incompatible(format!(
                "vCPU {id}: the XSAVE area is {} bytes, not {XSAVE_SIZE}",
                state.xsave.len()
            ))
        })?;
        let fd = self.fd();
        let e = |op| kvm_err(op, Some(id));
        let cpuid = CpuId::from_entries(&state.cpuid)
            .map_err(|_| SnapshotError::Encode("more CPUID entries than KVM_MAX_CPUID_ENTRIES"))?;
        self.set_cpuid_table(cpuid)?;
        fd.set_mp_state(state.mp_state)
            .map_err(e("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
        // SAFETY: KVM_SET_XSAVE copies the guest's XSAVE size (KVM's
        // `uabi_size`) from the pointer. Vm::new read that size
        // (KVM_CAP_XSAVE2) and it is at most sizeof(kvm_xsave) (checked
        // above), the size of `xsave`; vmkit never asks for dynamically
        // enabled XSAVE features (arch_prctl), which alone could grow it.
        unsafe { fd.set_xsave(&xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(e("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        if let Some(lapic) = &state.lapic {
            fd.set_lapic(lapic).map_err(e("KVM_SET_LAPIC"))?;
        }
        // Before the TSC MSR, which KVM converts with the current ratio.
        if state.tsc_khz != 0 && fd.get_tsc_khz().ok() != Some(state.tsc_khz) {
            fd.set_tsc_khz(state.tsc_khz)
                .map_err(e("KVM_SET_TSC_KHZ"))?;
        }
        for batch in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(batch)
                .map_err(|_| SnapshotError::Encode("MSR batch larger than KVM_MAX_MSR_ENTRIES"))?;
            let set = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
            if set < batch.len() {
                return Err(SnapshotError::MsrRestore {
                    vcpu: id,
                    msr: batch[set].index,
                    set,
                    total: batch.len(),
                });
            }
        }
        fd.set_vcpu_events(&state.events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl Vm {
    /// Saves the VM-wide state: the kvmclock, and the PIC master, PIC slave
    /// and IOAPIC and the PIT when the VM has them. Take it with every vCPU
    /// out of `run`.
    pub fn save_state(&self) -> Result<VmSnapshot, SnapshotError> {
        let fd = self.fd();
        let irqchip = if self.config().irqchip {
            let mut chips = [kvm_irqchip::new_zeroed(); 3];
            for (chip, id) in chips.iter_mut().zip(IRQCHIP_IDS) {
                chip.chip_id = id;
                fd.get_irqchip(chip)
                    .map_err(kvm_err("KVM_GET_IRQCHIP", None))?;
            }
            Some(chips)
        } else {
            None
        };
        let pit = if self.config().pit {
            Some(fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2", None))?)
        } else {
            None
        };
        let clock = fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK", None))?;
        Ok(VmSnapshot {
            clock,
            irqchip,
            pit,
        })
    }

    /// Restores the VM-wide state into a VM created with the same irqchip
    /// and PIT settings, before its vCPUs run. The clock continues from the
    /// saved value (`KVM_CLOCK_REALTIME` is not passed).
    pub fn restore_state(&self, state: &VmSnapshot) -> Result<(), SnapshotError> {
        let config = self.config();
        if state.irqchip.is_some() != config.irqchip || state.pit.is_some() != config.pit {
            return Err(SnapshotError::Incompatible(format!(
                "the snapshot has irqchip={} pit={}, the VM irqchip={} pit={}",
                state.irqchip.is_some(),
                state.pit.is_some(),
                config.irqchip,
                config.pit
            )));
        }
        let fd = self.fd();
        if let Some(chips) = &state.irqchip {
            for chip in chips {
                fd.set_irqchip(chip)
                    .map_err(kvm_err("KVM_SET_IRQCHIP", None))?;
            }
        }
        if let Some(pit) = &state.pit {
            fd.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2", None))?;
        }
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK", None))
    }
}

/// Copies every region of `vm`'s memory, after clearing the dirty logs (KVM's
/// and vm-memory's) so that a later [`save_memory_dirty`] sees the writes
/// made after this copy. Take it with every vCPU out of `run`.
pub fn save_memory_full(vm: &Vm) -> Result<MemorySnapshot, SnapshotError> {
    if vm.config().log_dirty_pages {
        for slot in vm.slots() {
            vm.take_dirty_pages(slot.slot)
                .map_err(SnapshotError::DirtyLog)?;
        }
    }
    vmkit_memory::layout::take_dirty_pages(vm.memory());
    let mut regions = Vec::new();
    for region in vm.memory().iter() {
        let base = region.start_addr().raw_value();
        let len = usize::try_from(region.len())
            .map_err(|_| SnapshotError::Encode("a memory region larger than the address space"))?;
        let mut data = vec![0u8; len];
        vm.memory()
            .read_slice(&mut data, GuestAddress(base))
            .map_err(|source| SnapshotError::Memory { addr: base, source })?;
        regions.push(MemoryRegionSnapshot { base, data });
    }
    Ok(MemorySnapshot::Full(regions))
}

/// Copies the pages written since the previous [`save_memory_full`] or
/// `save_memory_dirty`: those in KVM's dirty log (the VM needs
/// [`VmConfig::log_dirty_pages`](crate::VmConfig)) and those the VMM wrote
/// through vm-memory when the memory has a dirty bitmap.
pub fn save_memory_dirty(vm: &Vm) -> Result<MemorySnapshot, SnapshotError> {
    if !vm.config().log_dirty_pages {
        return Err(SnapshotError::DirtyLogOff);
    }
    let mut dirty: Vec<u64> = Vec::new();
    for slot in vm.slots() {
        dirty.extend(
            vm.take_dirty_pages(slot.slot)
                .map_err(SnapshotError::DirtyLog)?,
        );
    }
    dirty.extend(vmkit_memory::layout::take_dirty_pages(vm.memory()));
    let dirty: BTreeSet<u64> = dirty.into_iter().collect();
    let mut regions = Vec::new();
    for region in vm.memory().iter() {
        let base = region.start_addr().raw_value();
        let len = region.len();
        let pages: Vec<u64> = dirty
            .range(base..base.saturating_add(len))
            .map(|addr| (addr - base) / PAGE_SIZE)
            .collect();
        let mut data = vec![0u8; pages.len() * PAGE_SIZE as usize];
        for (page, buf) in pages.iter().zip(data.chunks_exact_mut(PAGE_SIZE as usize)) {
            let addr = base + page * PAGE_SIZE;
            vm.memory()
                .read_slice(buf, GuestAddress(addr))
                .map_err(|source| SnapshotError::Memory { addr, source })?;
        }
        regions.push(DirtyRegionSnapshot {
            base,
            len,
            pages,
            data,
        });
    }
    Ok(MemorySnapshot::Dirty(regions))
}

impl MemorySnapshot {
    /// Writes the saved bytes into `memory`, which must have the regions
    /// they were saved from (same bases and sizes; a full snapshot needs
    /// exactly the same regions).
    pub fn restore(&self, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let find = |base: u64, len: u64| {
            memory
                .iter()
                .any(|r| r.start_addr().raw_value() == base && r.len() == len)
        };
        match self {
            MemorySnapshot::Full(regions) => {
                if regions.len() != memory.num_regions() {
                    return Err(SnapshotError::Incompatible(format!(
                        "the snapshot has {} memory regions, the VM {}",
                        regions.len(),
                        memory.num_regions()
                    )));
                }
                for r in regions {
                    if !find(r.base, r.data.len() as u64) {
                        return Err(missing_region(r.base, r.data.len() as u64));
                    }
                    memory
                        .write_slice(&r.data, GuestAddress(r.base))
                        .map_err(|source| SnapshotError::Memory {
                            addr: r.base,
                            source,
                        })?;
                }
            }
            MemorySnapshot::Dirty(regions) => {
                for r in regions {
                    if !find(r.base, r.len) {
                        return Err(missing_region(r.base, r.len));
                    }
                    for (page, bytes) in r.pages.iter().zip(r.data.chunks_exact(PAGE_SIZE as usize))
                    {
                        let addr = r.base + page * PAGE_SIZE;
                        memory
                            .write_slice(bytes, GuestAddress(addr))
                            .map_err(|source| SnapshotError::Memory { addr, source })?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn missing_region(base: u64, len: u64) -> SnapshotError {
    SnapshotError::Incompatible(format!(
        "the VM has no memory region of {len:#x} bytes at {base:#x}"
    ))
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::new()
    }
}

impl Snapshot {
    /// An empty snapshot with a fresh id.
    pub fn new() -> Self {
        Snapshot {
            id: fresh_id(),
            parent: None,
            vcpus: Vec::new(),
            vm: None,
            memory: None,
            devices: Vec::new(),
        }
    }

    /// Saves `vcpus`, the VM state and all of guest memory (see
    /// [`save_memory_full`]). Every vCPU must be out of `run` with no I/O
    /// exit in flight.
    pub fn capture_full(vm: &Vm, vcpus: &[&Vcpu]) -> Result<Self, SnapshotError> {
        let mut s = Self::capture_machine(vm, vcpus)?;
        s.memory = Some(save_memory_full(vm)?);
        Ok(s)
    }

    /// Saves `vcpus`, the VM state and the pages written since `parent` (or
    /// a later capture of this VM) was taken (see [`save_memory_dirty`]).
    /// Restore it on top of memory that holds `parent`.
    pub fn capture_incremental(
        vm: &Vm,
        vcpus: &[&Vcpu],
        parent: &Snapshot,
    ) -> Result<Self, SnapshotError> {
        let mut s = Self::capture_machine(vm, vcpus)?;
        s.parent = Some(parent.id);
        s.memory = Some(save_memory_dirty(vm)?);
        Ok(s)
    }

    fn capture_machine(vm: &Vm, vcpus: &[&Vcpu]) -> Result<Self, SnapshotError> {
        let mut s = Self::new();
        for vcpu in vcpus {
            s.vcpus.push(vcpu.save_state()?);
        }
        s.vm = Some(vm.save_state()?);
        Ok(s)
    }

    /// Adds (or replaces) a device's opaque state.
    pub fn set_device(&mut self, name: &str, data: Vec<u8>) {
        match self.devices.iter_mut().find(|d| d.name == name) {
            Some(d) => d.data = data,
            None => self.devices.push(DeviceSection {
                name: name.to_string(),
                data,
            }),
        }
    }

    /// A device's state, if the snapshot has it.
    pub fn device(&self, name: &str) -> Option<&[u8]> {
        self.devices
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.data.as_slice())
    }

    /// Writes the guest memory into `memory`. `base` is the id of the
    /// snapshot the memory already holds (None for fresh memory); an
    /// incremental snapshot refuses any base but its parent. Returns this
    /// snapshot's id: what the memory holds now.
    pub fn restore_memory(
        &self,
        memory: &GuestMemoryMmap,
        base: Option<u64>,
    ) -> Result<u64, SnapshotError> {
        if let Some(parent) = self.parent {
            if base != Some(parent) {
                return Err(SnapshotError::WrongParent {
                    id: self.id,
                    parent,
                    base,
                });
            }
        }
        if let Some(m) = &self.memory {
            m.restore(memory)?;
        }
        Ok(self.id)
    }

    /// Restores the VM state, then every vCPU (each snapshot vCPU into the
    /// vCPU of `vcpus` with its id; both sets must match).
    pub fn restore_machine(&self, vm: &Vm, vcpus: &[&Vcpu]) -> Result<(), SnapshotError> {
        if vcpus.len() != self.vcpus.len() {
            return Err(SnapshotError::Incompatible(format!(
                "the snapshot has {} vCPUs, {} were given",
                self.vcpus.len(),
                vcpus.len()
            )));
        }
        if let Some(state) = &self.vm {
            vm.restore_state(state)?;
        }
        for state in &self.vcpus {
            let vcpu = vcpus.iter().find(|v| v.id() == state.id).ok_or_else(|| {
                SnapshotError::Incompatible(format!("no vCPU {} was given", state.id))
            })?;
            vcpu.restore_state(state)?;
        }
        Ok(())
    }

    /// [`restore_memory`](Self::restore_memory) into `vm`'s memory, then
    /// [`restore_machine`](Self::restore_machine). Returns this snapshot's
    /// id.
    pub fn restore(
        &self,
        vm: &Vm,
        vcpus: &[&Vcpu],
        base: Option<u64>,
    ) -> Result<u64, SnapshotError> {
        let id = self.restore_memory(vm.memory(), base)?;
        self.restore_machine(vm, vcpus)?;
        Ok(id)
    }

    /// Checks what the format cannot express, so that whatever
    /// [`write_to`](Self::write_to) writes, [`from_bytes`](Self::from_bytes)
    /// reads.
    fn check(&self) -> Result<(), SnapshotError> {
        let enc = |reason| Err(SnapshotError::Encode(reason));
        if self.id == 0 {
            return enc("the snapshot id is 0");
        }
        if self.parent == Some(0) {
            return enc("the parent id is 0");
        }
        if self.vcpus.len() > MAX_VCPUS {
            return enc("too many vCPUs");
        }
        let ids: BTreeSet<u32> = self.vcpus.iter().map(|v| v.id).collect();
        if ids.len() != self.vcpus.len() {
            return enc("two vCPUs have the same id");
        }
        for v in &self.vcpus {
            if v.cpuid.len() > MAX_CPUID_ENTRIES || v.msrs.len() > MAX_MSRS {
                return enc("too many CPUID entries or MSRs");
            }
            if v.xsave.len() != XSAVE_SIZE {
                return enc("an XSAVE area is not 4096 bytes");
            }
        }
        match &self.memory {
            Some(MemorySnapshot::Full(regions)) => {
                if self.parent.is_some() {
                    return enc("a full memory snapshot with a parent");
                }
                if regions.len() > MAX_MEMORY_REGIONS {
                    return enc("too many memory regions");
                }
                for r in regions {
                    let len = r.data.len() as u64;
                    if r.base % PAGE_SIZE != 0
                        || len % PAGE_SIZE != 0
                        || r.base.checked_add(len).is_none()
                    {
                        return enc("a memory region is not page aligned");
                    }
                }
            }
            Some(MemorySnapshot::Dirty(regions)) => {
                if self.parent.is_none() {
                    return enc("an incremental memory snapshot without a parent");
                }
                if regions.len() > MAX_MEMORY_REGIONS {
                    return enc("too many memory regions");
                }
                for r in regions {
                    if r.base % PAGE_SIZE != 0
                        || r.len % PAGE_SIZE != 0
                        || r.base.checked_add(r.len).is_none()
                    {
                        return enc("a memory region is not page aligned");
                    }
                    let in_order = r.pages.windows(2).all(|w| w[0] < w[1]);
                    let inside = r.pages.last().is_none_or(|&p| p < r.len / PAGE_SIZE);
                    if !in_order || !inside {
                        return enc("dirty pages out of order or outside their region");
                    }
                    if r.data.len() as u64 != r.pages.len() as u64 * PAGE_SIZE {
                        return enc("dirty page data does not match the page list");
                    }
                }
            }
            None => {}
        }
        if self.devices.len() > MAX_DEVICE_SECTIONS {
            return enc("too many device sections");
        }
        let names: BTreeSet<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
        if names.len() != self.devices.len() {
            return enc("two device sections have the same name");
        }
        if self
            .devices
            .iter()
            .any(|d| d.name.is_empty() || d.name.len() > MAX_DEVICE_NAME)
        {
            return enc("a device name is empty or too long");
        }
        Ok(())
    }

    /// Writes the snapshot in the format of the [module documentation](self).
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> Result<(), SnapshotError> {
        self.check()?;
        let io = |source| SnapshotError::Io {
            op: "write",
            source,
        };
        w.write_all(&MAGIC).map_err(io)?;
        w.write_all(&FORMAT_VERSION.to_le_bytes()).map_err(io)?;

        let mut head = Vec::new();
        put_u32(&mut head, ARCH_X86_64);
        put_u32(&mut head, 0);
        put_u64(&mut head, self.id);
        put_u64(&mut head, self.parent.unwrap_or(0));
        put_u32(&mut head, STRUCT_SIZES.len() as u32);
        for (_, size) in STRUCT_SIZES {
            put_u32(&mut head, size as u32);
        }
        write_section(w, TAG_HEAD, &[&head])?;

        for v in &self.vcpus {
            let mut p =
                Vec::with_capacity(
                    vcpu_payload_len(v.lapic.is_some(), v.cpuid.len(), v.msrs.len()) as usize,
                );
            put_u32(&mut p, v.id);
            put_u32(
                &mut p,
                if v.lapic.is_some() {
                    VCPU_FLAG_LAPIC
                } else {
                    0
                },
            );
            put_u32(&mut p, v.tsc_khz);
            put_u32(&mut p, v.cpuid.len() as u32);
            put_u32(&mut p, v.msrs.len() as u32);
            p.extend_from_slice(v.regs.as_bytes());
            p.extend_from_slice(v.sregs.as_bytes());
            p.extend_from_slice(&v.xsave);
            p.extend_from_slice(v.xcrs.as_bytes());
            p.extend_from_slice(v.debugregs.as_bytes());
            p.extend_from_slice(v.events.as_bytes());
            p.extend_from_slice(v.mp_state.as_bytes());
            if let Some(lapic) = &v.lapic {
                p.extend_from_slice(lapic.as_bytes());
            }
            p.extend_from_slice(v.cpuid.as_slice().as_bytes());
            p.extend_from_slice(v.msrs.as_slice().as_bytes());
            write_section(w, TAG_VCPU, &[&p])?;
        }

        if let Some(vm) = &self.vm {
            let mut p = Vec::new();
            let flags = if vm.irqchip.is_some() {
                VM_FLAG_IRQCHIP
            } else {
                0
            } | if vm.pit.is_some() { VM_FLAG_PIT } else { 0 };
            put_u32(&mut p, flags);
            put_u32(&mut p, 0);
            p.extend_from_slice(vm.clock.as_bytes());
            if let Some(chips) = &vm.irqchip {
                for chip in chips {
                    p.extend_from_slice(chip.as_bytes());
                }
            }
            if let Some(pit) = &vm.pit {
                p.extend_from_slice(pit.as_bytes());
            }
            write_section(w, TAG_VM, &[&p])?;
        }

        match &self.memory {
            Some(MemorySnapshot::Full(regions)) => {
                for r in regions {
                    let mut h = Vec::with_capacity(16);
                    put_u64(&mut h, r.base);
                    put_u64(&mut h, r.data.len() as u64);
                    write_section(w, TAG_MEM_FULL, &[&h, &r.data])?;
                }
            }
            Some(MemorySnapshot::Dirty(regions)) => {
                for r in regions {
                    let mut h = Vec::with_capacity(24 + 8 * r.pages.len());
                    put_u64(&mut h, r.base);
                    put_u64(&mut h, r.len);
                    put_u64(&mut h, r.pages.len() as u64);
                    for page in &r.pages {
                        put_u64(&mut h, *page);
                    }
                    write_section(w, TAG_MEM_DIRTY, &[&h, &r.data])?;
                }
            }
            None => {}
        }

        for d in &self.devices {
            let mut h = Vec::with_capacity(2 + d.name.len());
            h.extend_from_slice(&(d.name.len() as u16).to_le_bytes());
            h.extend_from_slice(d.name.as_bytes());
            write_section(w, TAG_DEVICE, &[&h, &d.data])?;
        }

        write_section(w, TAG_END, &[])?;
        w.flush().map_err(io)
    }

    /// The snapshot as bytes (see [`write_to`](Self::write_to)).
    pub fn to_bytes(&self) -> Result<Vec<u8>, SnapshotError> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Reads and checks a snapshot from `r`, up to its end marker, and
    /// fails if anything follows (see the [module documentation](self) for
    /// everything refused). Every checksum is verified before the snapshot
    /// is returned, so nothing of a corrupt snapshot is ever applied.
    /// Buffers grow with the bytes actually read (at most 16 MiB ahead of
    /// them), never with a length the input claims; it never panics.
    pub fn read_from<R: Read + ?Sized>(r: &mut R) -> Result<Self, SnapshotError> {
        let mut c = Input { r, pos: 0 };
        let magic: [u8; 8] = c.array("the magic")?;
        if magic != MAGIC {
            return Err(SnapshotError::BadMagic { found: magic });
        }
        let version = u32::from_le_bytes(c.array("the format version")?);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let mut snapshot: Option<Snapshot> = None;
        let mut vcpu_ids = BTreeSet::new();
        let mut device_names = BTreeSet::new();
        loop {
            let offset = c.pos;
            let tag: [u8; 4] = c.array("a section tag")?;
            let len_bytes: [u8; 8] = c.array("a section length")?;
            let len = u64::from_le_bytes(len_bytes);
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&tag);
            hasher.update(&len_bytes);
            // A full memory region's bytes are read straight into the
            // buffer that becomes the region (no second copy).
            let mem_header: Option<[u8; 16]> = if tag == TAG_MEM_FULL && len >= 16 {
                let h = c.array("a memory section header")?;
                hasher.update(&h);
                Some(h)
            } else {
                None
            };
            let body_len = len - if mem_header.is_some() { 16 } else { 0 };
            let payload = c.vec(body_len, "a section payload", &mut hasher)?;
            let stored = u32::from_le_bytes(c.array("a section CRC")?);
            let computed = hasher.finalize();
            if stored != computed {
                return Err(SnapshotError::Checksum {
                    tag: Tag(tag),
                    offset,
                    stored,
                    computed,
                });
            }
            let sec = Section {
                tag,
                offset,
                payload: &payload,
            };
            let Some(s) = snapshot.as_mut() else {
                if tag != TAG_HEAD {
                    return Err(SnapshotError::Malformed {
                        offset,
                        reason: "the first section is not HEAD",
                    });
                }
                snapshot = Some(parse_head(&sec)?);
                continue;
            };
            match tag {
                TAG_HEAD => {
                    return Err(SnapshotError::Malformed {
                        offset,
                        reason: "a second HEAD section",
                    })
                }
                TAG_VCPU => {
                    limit("vCPU sections", s.vcpus.len() + 1, MAX_VCPUS)?;
                    let v = parse_vcpu(&sec)?;
                    if !vcpu_ids.insert(v.id) {
                        return Err(SnapshotError::Malformed {
                            offset,
                            reason: "two vCPU sections have the same id",
                        });
                    }
                    s.vcpus.push(v);
                }
                TAG_VM => {
                    if s.vm.is_some() {
                        return Err(SnapshotError::Malformed {
                            offset,
                            reason: "a second VMST section",
                        });
                    }
                    s.vm = Some(parse_vm(&sec)?);
                }
                TAG_MEM_FULL => {
                    if s.parent.is_some() {
                        return Err(SnapshotError::Malformed {
                            offset,
                            reason: "full memory in a snapshot with a parent",
                        });
                    }
                    let base = parse_mem_full(&sec, mem_header, &payload)?;
                    match s
                        .memory
                        .get_or_insert_with(|| MemorySnapshot::Full(Vec::new()))
                    {
                        MemorySnapshot::Full(regions) => {
                            limit("memory sections", regions.len() + 1, MAX_MEMORY_REGIONS)?;
                            check_disjoint(
                                regions.iter().map(|r| (r.base, r.data.len() as u64)),
                                base,
                                payload.len() as u64,
                                offset,
                            )?;
                            regions.push(MemoryRegionSnapshot {
                                base,
                                data: payload,
                            });
                        }
                        MemorySnapshot::Dirty(_) => unreachable_mix(offset)?,
                    }
                }
                TAG_MEM_DIRTY => {
                    if s.parent.is_none() {
                        return Err(SnapshotError::Malformed {
                            offset,
                            reason: "dirty pages in a snapshot without a parent",
                        });
                    }
                    let region = parse_mem_dirty(&sec)?;
                    match s
                        .memory
                        .get_or_insert_with(|| MemorySnapshot::Dirty(Vec::new()))
                    {
                        MemorySnapshot::Dirty(regions) => {
                            limit("memory sections", regions.len() + 1, MAX_MEMORY_REGIONS)?;
                            check_disjoint(
                                regions.iter().map(|r| (r.base, r.len)),
                                region.base,
                                region.len,
                                offset,
                            )?;
                            regions.push(region);
                        }
                        MemorySnapshot::Full(_) => unreachable_mix(offset)?,
                    }
                }
                TAG_DEVICE => {
                    limit("device sections", s.devices.len() + 1, MAX_DEVICE_SECTIONS)?;
                    let d = parse_device(&sec)?;
                    if !device_names.insert(d.name.clone()) {
                        return Err(SnapshotError::Malformed {
                            offset,
                            reason: "two device sections have the same name",
                        });
                    }
                    s.devices.push(d);
                }
                TAG_END => {
                    if !payload.is_empty() {
                        return Err(SnapshotError::SectionLength {
                            tag: Tag(tag),
                            offset,
                            expected: 0,
                            found: len,
                        });
                    }
                    let extra = c.drain()?;
                    if extra > 0 {
                        return Err(SnapshotError::TrailingData {
                            offset: c.pos,
                            len: extra,
                        });
                    }
                    return snapshot.ok_or(SnapshotError::Malformed {
                        offset,
                        reason: "no HEAD section",
                    });
                }
                _ => {
                    return Err(SnapshotError::UnknownSection {
                        tag: Tag(tag),
                        offset,
                    })
                }
            }
        }
    }
}

impl Snapshot {
    /// Parses and checks a snapshot held in memory: [`read_from`](Self::read_from)
    /// over `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SnapshotError> {
        Self::read_from(&mut &bytes[..])
    }
}

fn unreachable_mix(offset: usize) -> Result<(), SnapshotError> {
    Err(SnapshotError::Malformed {
        offset,
        reason: "full and incremental memory sections mixed",
    })
}

fn limit(what: &'static str, count: usize, max: usize) -> Result<(), SnapshotError> {
    if count > max {
        return Err(SnapshotError::Limit {
            what,
            count: count as u64,
            max: max as u64,
        });
    }
    Ok(())
}

fn check_disjoint(
    existing: impl Iterator<Item = (u64, u64)>,
    base: u64,
    len: u64,
    offset: usize,
) -> Result<(), SnapshotError> {
    // Both ranges were checked not to overflow.
    for (b, l) in existing {
        if base < b + l && b < base + len {
            return Err(SnapshotError::Malformed {
                offset,
                reason: "memory sections overlap",
            });
        }
    }
    Ok(())
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// Writes one section: tag, length, the payload in `parts`, CRC.
fn write_section<W: Write + ?Sized>(
    w: &mut W,
    tag: [u8; 4],
    parts: &[&[u8]],
) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        op: "write",
        source,
    };
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let len_bytes = len.to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&tag);
    hasher.update(&len_bytes);
    w.write_all(&tag).map_err(io)?;
    w.write_all(&len_bytes).map_err(io)?;
    for p in parts {
        hasher.update(p);
        w.write_all(p).map_err(io)?;
    }
    w.write_all(&hasher.finalize().to_le_bytes()).map_err(io)
}

/// How far ahead of the bytes actually read a payload buffer may grow.
const READ_CHUNK: u64 = 16 << 20;

/// The input stream, with the offset reached (for errors).
struct Input<'r, R: Read + ?Sized> {
    r: &'r mut R,
    pos: usize,
}

impl<R: Read + ?Sized> Input<'_, R> {
    /// Reads until `buf` is full or the input ends; returns the count.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, SnapshotError> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(SnapshotError::Io { op: "read", source }),
            }
        }
        self.pos += n;
        Ok(n)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        let offset = self.pos;
        let got = self.fill(&mut a)?;
        if got < N {
            return Err(SnapshotError::Truncated {
                what,
                offset,
                needed: N as u64,
                available: got,
            });
        }
        Ok(a)
    }

    /// Reads `len` bytes into a new buffer, hashing them. The buffer grows
    /// geometrically from 64 KiB as bytes arrive, by at most
    /// [`READ_CHUNK`] at a time, so a length the input claims but does not
    /// hold costs at most that much memory.
    fn vec(
        &mut self,
        len: u64,
        what: &'static str,
        hasher: &mut crc32fast::Hasher,
    ) -> Result<Vec<u8>, SnapshotError> {
        let offset = self.pos;
        let mut v: Vec<u8> = Vec::new();
        while (v.len() as u64) < len {
            let step = (v.len() as u64)
                .clamp(64 << 10, READ_CHUNK)
                .min(len - v.len() as u64);
            // `step` <= READ_CHUNK, so it fits a usize.
            let step = step as usize;
            let old = v.len();
            v.try_reserve_exact(step)
                .map_err(|_| SnapshotError::Encode("out of memory for a section"))?;
            v.resize(old + step, 0);
            let got = self.fill(&mut v[old..])?;
            hasher.update(&v[old..old + got]);
            if got < step {
                return Err(SnapshotError::Truncated {
                    what,
                    offset,
                    needed: len,
                    available: old + got,
                });
            }
        }
        Ok(v)
    }

    /// Reads the rest of the input; returns how many bytes there were.
    fn drain(&mut self) -> Result<usize, SnapshotError> {
        let mut probe = [0u8; 1];
        let start = self.pos;
        if self.fill(&mut probe)? == 0 {
            return Ok(0);
        }
        let rest = std::io::copy(&mut self.r, &mut std::io::sink())
            .map_err(|source| SnapshotError::Io { op: "read", source })?;
        // Offsets in errors point at the first extra byte.
        self.pos = start;
        Ok(usize::try_from(rest)
            .unwrap_or(usize::MAX)
            .saturating_add(1))
    }
}

/// A checksummed section, for the payload parsers.
struct Section<'a> {
    tag: [u8; 4],
    offset: usize,
    payload: &'a [u8],
}

impl<'a> Section<'a> {
    /// A reader over the payload whose overruns are length errors.
    fn reader(&self) -> Payload<'a> {
        Payload {
            tag: self.tag,
            offset: self.offset,
            buf: self.payload,
            pos: 0,
        }
    }

    fn expect_len(&self, expected: Option<u64>) -> Result<(), SnapshotError> {
        let found = self.payload.len() as u64;
        if expected != Some(found) {
            return Err(SnapshotError::SectionLength {
                tag: Tag(self.tag),
                offset: self.offset,
                expected: expected.unwrap_or(u64::MAX),
                found,
            });
        }
        Ok(())
    }

    fn malformed(&self, reason: &'static str) -> SnapshotError {
        SnapshotError::Malformed {
            offset: self.offset,
            reason,
        }
    }
}

struct Payload<'a> {
    tag: [u8; 4],
    offset: usize,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(SnapshotError::SectionLength {
                tag: Tag(self.tag),
                offset: self.offset,
                expected: (self.pos as u64).saturating_add(n as u64),
                found: self.buf.len() as u64,
            }),
        }
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        self.take(4).map(|b| u32::from_le_bytes(le4(b)))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        self.take(8).map(|b| u64::from_le_bytes(le8(b)))
    }

    fn obj<T: FromBytes>(&mut self) -> Result<T, SnapshotError> {
        let size = std::mem::size_of::<T>();
        let bytes = self.take(size)?;
        T::read_from_bytes(bytes).map_err(|_| SnapshotError::Malformed {
            offset: self.offset,
            reason: "a struct of the wrong size",
        })
    }

    fn objs<T: FromBytes>(&mut self, count: usize) -> Result<Vec<T>, SnapshotError> {
        let size = std::mem::size_of::<T>();
        let bytes = self.take(count.saturating_mul(size))?;
        bytes
            .chunks_exact(size)
            .map(|b| {
                T::read_from_bytes(b).map_err(|_| SnapshotError::Malformed {
                    offset: self.offset,
                    reason: "a struct of the wrong size",
                })
            })
            .collect()
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    /// Fails unless the payload was consumed exactly.
    fn finish(&self) -> Result<(), SnapshotError> {
        if self.pos != self.buf.len() {
            return Err(SnapshotError::SectionLength {
                tag: Tag(self.tag),
                offset: self.offset,
                expected: self.pos as u64,
                found: self.buf.len() as u64,
            });
        }
        Ok(())
    }
}

fn parse_head(sec: &Section<'_>) -> Result<Snapshot, SnapshotError> {
    let mut p = sec.reader();
    let arch = p.u32()?;
    if arch != ARCH_X86_64 {
        return Err(SnapshotError::Arch {
            found: arch,
            expected: ARCH_X86_64,
        });
    }
    if p.u32()? != 0 {
        return Err(sec.malformed("unknown header flags"));
    }
    let id = p.u64()?;
    if id == 0 {
        return Err(sec.malformed("the snapshot id is 0"));
    }
    let parent = p.u64()?;
    let n = p.u32()?;
    if n as usize != STRUCT_SIZES.len() {
        return Err(sec.malformed(
            "the struct-size table has another number of entries than this version defines",
        ));
    }
    for (name, host) in STRUCT_SIZES {
        let file = p.u32()?;
        if file as usize != host {
            return Err(SnapshotError::StructSize {
                name,
                file: u64::from(file),
                host: host as u64,
            });
        }
    }
    p.finish()?;
    Ok(Snapshot {
        id,
        parent: (parent != 0).then_some(parent),
        vcpus: Vec::new(),
        vm: None,
        memory: None,
        devices: Vec::new(),
    })
}

const VCPU_FIXED_LEN: u64 = 5 * 4;

/// The payload length of a `VCPU` section (no overflow: the counts are
/// bounded by the limits).
fn vcpu_payload_len(lapic: bool, cpuid: usize, msrs: usize) -> u64 {
    let size = |i: usize| STRUCT_SIZES[i].1 as u64;
    let fixed: u64 = VCPU_FIXED_LEN + (0..7).map(size).sum::<u64>();
    fixed + if lapic { size(7) } else { 0 } + cpuid as u64 * size(8) + msrs as u64 * size(9)
}

fn parse_vcpu(sec: &Section<'_>) -> Result<VcpuSnapshot, SnapshotError> {
    let mut p = sec.reader();
    let id = p.u32()?;
    let flags = p.u32()?;
    if flags & !VCPU_FLAG_LAPIC != 0 {
        return Err(sec.malformed("unknown vCPU flags"));
    }
    let tsc_khz = p.u32()?;
    let n_cpuid = p.u32()? as usize;
    let n_msrs = p.u32()? as usize;
    limit("CPUID entries", n_cpuid, MAX_CPUID_ENTRIES)?;
    limit("MSRs", n_msrs, MAX_MSRS)?;
    let has_lapic = flags & VCPU_FLAG_LAPIC != 0;
    // The counts are bounded, so this cannot overflow.
    sec.expect_len(Some(vcpu_payload_len(has_lapic, n_cpuid, n_msrs)))?;
    let regs = p.obj()?;
    let sregs = p.obj()?;
    let xsave = p.take(XSAVE_SIZE)?.to_vec();
    let xcrs = p.obj()?;
    let debugregs = p.obj()?;
    let events = p.obj()?;
    let mp_state = p.obj()?;
    let lapic = if has_lapic { Some(p.obj()?) } else { None };
    let cpuid = p.objs(n_cpuid)?;
    let msrs = p.objs(n_msrs)?;
    p.finish()?;
    Ok(VcpuSnapshot {
        id,
        cpuid,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        events,
        mp_state,
        lapic,
        msrs,
        tsc_khz,
    })
}

fn parse_vm(sec: &Section<'_>) -> Result<VmSnapshot, SnapshotError> {
    let mut p = sec.reader();
    let flags = p.u32()?;
    if flags & !(VM_FLAG_IRQCHIP | VM_FLAG_PIT) != 0 {
        return Err(sec.malformed("unknown VM flags"));
    }
    if p.u32()? != 0 {
        return Err(sec.malformed("reserved VM field is not 0"));
    }
    let size = |i: usize| STRUCT_SIZES[i].1 as u64;
    let expected = 8
        + size(12)
        + if flags & VM_FLAG_IRQCHIP != 0 {
            3 * size(10)
        } else {
            0
        }
        + if flags & VM_FLAG_PIT != 0 {
            size(11)
        } else {
            0
        };
    sec.expect_len(Some(expected))?;
    let clock = p.obj()?;
    let irqchip = if flags & VM_FLAG_IRQCHIP != 0 {
        let mut chips = [kvm_irqchip::new_zeroed(); 3];
        for (chip, id) in chips.iter_mut().zip(IRQCHIP_IDS) {
            *chip = p.obj()?;
            if chip.chip_id != id {
                return Err(sec.malformed("irqchips out of order"));
            }
        }
        Some(chips)
    } else {
        None
    };
    let pit = if flags & VM_FLAG_PIT != 0 {
        Some(p.obj()?)
    } else {
        None
    };
    p.finish()?;
    Ok(VmSnapshot {
        clock,
        irqchip,
        pit,
    })
}

fn check_region(sec: &Section<'_>, base: u64, len: u64) -> Result<(), SnapshotError> {
    if base % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(sec.malformed("a memory region is not page aligned"));
    }
    if base.checked_add(len).is_none() {
        return Err(sec.malformed("a memory region wraps around"));
    }
    Ok(())
}

fn parse_mem_full(
    sec: &Section<'_>,
    header: Option<[u8; 16]>,
    data: &[u8],
) -> Result<u64, SnapshotError> {
    // Shorter than its header: the reader gave the header to the payload.
    let Some(h) = header else {
        return Err(SnapshotError::SectionLength {
            tag: Tag(sec.tag),
            offset: sec.offset,
            expected: 16,
            found: sec.payload.len() as u64,
        });
    };
    let base = u64::from_le_bytes(le8(&h[..8]));
    let len = u64::from_le_bytes(le8(&h[8..]));
    check_region(sec, base, len)?;
    if len != data.len() as u64 {
        return Err(SnapshotError::SectionLength {
            tag: Tag(sec.tag),
            offset: sec.offset,
            expected: len.saturating_add(16),
            found: data.len() as u64 + 16,
        });
    }
    Ok(base)
}

fn parse_mem_dirty(sec: &Section<'_>) -> Result<DirtyRegionSnapshot, SnapshotError> {
    let mut p = sec.reader();
    let base = p.u64()?;
    let len = p.u64()?;
    check_region(sec, base, len)?;
    let count = p.u64()?;
    let region_pages = len / PAGE_SIZE;
    if count > region_pages {
        return Err(SnapshotError::Limit {
            what: "dirty pages of a region",
            count,
            max: region_pages,
        });
    }
    // count <= len / 4096, so count * (8 + 4096) cannot overflow.
    sec.expect_len(Some(24 + count * (8 + PAGE_SIZE)))?;
    // The length check bounds `count` by the input size.
    let count = count as usize;
    let mut pages = Vec::with_capacity(count);
    for _ in 0..count {
        let page = p.u64()?;
        if page >= region_pages || pages.last().is_some_and(|&last| page <= last) {
            return Err(sec.malformed("dirty pages out of order or outside their region"));
        }
        pages.push(page);
    }
    let data = p.rest().to_vec();
    Ok(DirtyRegionSnapshot {
        base,
        len,
        pages,
        data,
    })
}

fn parse_device(sec: &Section<'_>) -> Result<DeviceSection, SnapshotError> {
    let mut p = sec.reader();
    let len_bytes = p.take(2)?;
    let name_len = usize::from(u16::from_le_bytes([len_bytes[0], len_bytes[1]]));
    if name_len == 0 || name_len > MAX_DEVICE_NAME {
        return Err(sec.malformed("a device name is empty or too long"));
    }
    let name = std::str::from_utf8(p.take(name_len)?)
        .map_err(|_| sec.malformed("a device name is not UTF-8"))?
        .to_string();
    let data = p.rest().to_vec();
    Ok(DeviceSection { name, data })
}
