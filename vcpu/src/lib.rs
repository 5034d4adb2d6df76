//! KVM VM and vCPU control for vmkit VMMs.
//!
//! - [`Vm`] opens `/dev/kvm`, checks the API version and the capabilities it
//!   needs (an error names a missing one), registers a
//!   [`vmkit_memory`] guest memory map as memory slots and optionally creates
//!   the in-kernel irqchip and PIT.
//! - [`Vcpu`] is set up for real, 32-bit protected or 64-bit long mode from a
//!   [`BootConfig`], with CPUID from KVM's supported list through the
//!   documented filter in [`cpuid`], and runs the guest: [`Vcpu::run`] hands
//!   port I/O and MMIO exits to an [`IoHandler`] (any bus; with the default
//!   `devices` feature, [`vmkit_devices::IoBus`]) and returns a typed
//!   [`StopReason`] for everything else.
//! - [`irq`] delivers interrupts into the in-kernel irqchip: irqfd-backed
//!   edge and level lines ([`IrqLine`], with a [`ResampleWorker`] for level
//!   lines), MSI vectors ([`KvmMsiVectors`]) and the GSI routing table they
//!   share ([`IrqRouter`]).
//! - [`snapshot`] saves and restores vCPUs ([`Vcpu::save_state`]), the VM's
//!   irqchip, PIT and clock ([`Vm::save_state`]) and guest memory (full or
//!   incremental from the dirty log) in a versioned, checksummed format
//!   ([`Snapshot`]).
//!
//! # Example
//! ```no_run
//! use vmkit_devices::{DebugExit, IoBus};
//! use vmkit_memory::vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::MemoryLayout;
//! use vmkit_vcpu::{BootConfig, CpuMode, StopReason, Vm, VmConfig};
//! use std::sync::Arc;
//!
//! let memory = MemoryLayout::new(1 << 20)?.create_memory(&Default::default())?;
//! // Real-mode guest at 0x1000: mov al, 7; out 0xf4, al
//! memory.write_slice(&[0xb0, 0x07, 0xe6, 0xf4], GuestAddress(0x1000))?;
//! let vm = Vm::new(memory, VmConfig::default())?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! vcpu.configure(&BootConfig::new(CpuMode::Real, 0x1000, 0x8000))?;
//! let bus = IoBus::new();
//! bus.pio.insert(0xf4, 1, Arc::new(DebugExit::new()))?;
//! assert!(matches!(vcpu.run(&bus)?, StopReason::Exit(7)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod cpuid;
pub mod handle;
pub mod io;
pub mod irq;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use cpuid::CpuidConfig;
pub use handle::{pause_all, resume_all, set_kick_signal, HandleError, VcpuHandle, VcpuState};
pub use io::{IoAction, IoHandler};
pub use irq::{IrqError, IrqLine, IrqRouter, KvmMsiVectors, MsiRoute, ResampleWorker};
pub use snapshot::{MemorySnapshot, Snapshot, SnapshotError, VcpuSnapshot, VmSnapshot};
pub use vcpu::{BootConfig, CpuMode, RegisterDump, StopReason, SystemEvent, Vcpu, VcpuError};
pub use vm::{Vm, VmConfig, VmError};
pub use {kvm_bindings, kvm_ioctls};
