//! Guest memory for vmkit VMMs.
//!
//! - [`layout`]: the guest-physical layout of RAM around the x86 32-bit MMIO
//!   gap, its host backing (anonymous no-reserve memory, transparent huge
//!   pages or a shared file) as vm-memory guest memory with optional dirty
//!   tracking, KVM memory-slot descriptions and the e820 map.
//! - [`pagetable`]: page tables for booting a guest (long-mode identity maps).
//! - [`paging`]: a software x86 MMU — paging contexts for every paging mode,
//!   SDM-exact page walks (rights, protection keys, #PF error codes,
//!   accessed/dirty bits) and page-table builders for every format.
//!
//! This crate never calls KVM: [`layout::kvm_slots`] only describes slots for
//! a crate that does (such as `vmkit-vcpu`).
//!
//! # Example
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::layout::{kvm_slots, MemoryLayout, MemoryOptions, SlotFlags};
//! use vmkit_memory::pagetable::{build_identity_map, LeafSize};
//!
//! let layout = MemoryLayout::new(64 << 20)?;
//! let memory = layout.create_memory(&MemoryOptions::default())?;
//! memory.write_obj(0x1234_5678u32, GuestAddress(0x1000))?;
//! let map = build_identity_map(&memory, GuestAddress(0x9000), 0x4000, 1 << 30, LeafSize::Size2M)?;
//! assert_eq!(map.cr3, 0x9000);
//! let slots = kvm_slots(&memory, 0, SlotFlags::default());
//! assert_eq!(slots[0].memory_size, 64 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod layout;
pub mod pagetable;
pub mod paging;

pub use layout::{GuestMemoryMmap, MemoryLayout, MemoryOptions};
pub use paging::{PagingContext, WalkError};
pub use vm_memory;
