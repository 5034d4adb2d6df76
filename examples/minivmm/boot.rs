//! Loading a Linux kernel and its boot information into guest memory.
//!
//! Three ways in, chosen from the image:
//! - an ELF `vmlinux` with a Xen PVH note: entered in 32-bit protected mode
//!   at the PVH entry with EBX pointing at an `hvm_start_info` (the fastest:
//!   no decompression);
//! - an ELF `vmlinux` without the note: entered in 64-bit mode at its entry
//!   point with RSI pointing at a zero page (the 64-bit boot protocol);
//! - a bzImage: its protected-mode part loaded at 1 MiB and entered in
//!   64-bit mode at `startup_64` (load address + 0x200), RSI at a zero page
//!   holding the image's own setup header.
//!
//! `linux-loader` parses the images; this module decides where everything
//! goes and fills the boot structures.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vmkit_memory::layout::{E820Entry, HIGH_MEMORY_START};
use vmkit_memory::pagetable::{build_identity_map, LeafSize};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::{GuestMemoryMmap, MemoryLayout};
use vmkit_vcpu::{BootConfig, CpuMode};

use crate::Error;

/// The GDT the boot vCPU starts with.
const GDT: u64 = 0x500;
/// `hvm_start_info` (PVH) or the zero page (64-bit boot).
const BOOT_INFO: u64 = 0x7000;
/// PVH module list (the initrd).
const MODLIST: u64 = 0x6000;
/// PVH memory map (after the 56-byte start info).
const MEMMAP: u64 = 0x7100;
/// Identity-mapped page tables for 64-bit entry (PML4, PDPT, 4 PDs).
const PAGE_TABLES: u64 = 0x9000;
const PAGE_TABLES_SIZE: u64 = 0x6000;
/// The boot stack's top (below the page tables).
const BOOT_STACK: u64 = 0x8ff0;
/// The kernel command line.
const CMDLINE: u64 = 0x20000;
/// The longest command line minivmm passes (Linux's x86 limit is 2048 for
/// old kernels, 4096 or more for current ones; the setup header says).
pub const CMDLINE_MAX: usize = 4096;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// What the boot vCPU needs to start the kernel.
#[derive(Debug)]
pub struct Boot {
    /// Registers and mode for the boot vCPU.
    pub config: BootConfig,
    /// EBX at entry (the PVH protocol passes the start info there).
    pub rbx: u64,
    /// How the kernel is entered, for the log.
    pub protocol: &'static str,
}

enum Image {
    Elf,
    BzImage,
}

fn image_kind(file: &mut File, path: &Path) -> Result<Image, Error> {
    let mut head = [0u8; 0x208];
    let n = read_up_to(file, &mut head)
        .map_err(|e| Error::Kernel(format!("cannot read {}: {e}", path.display())))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Image::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes() {
        return Ok(Image::BzImage);
    }
    Err(Error::Kernel(format!(
        "{} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)",
        path.display()
    )))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The RAM below 4 GiB that starts at 1 MiB: `(start, end)`.
fn low_ram(layout: &MemoryLayout) -> (u64, u64) {
    let end = layout
        .ram_ranges()
        .iter()
        .find(|r| r.base == 0)
        .map(|r| r.end())
        .unwrap_or(0);
    (HIGH_MEMORY_START, end)
}

/// Loads the initrd as high as the kernel allows in low RAM above the
/// kernel, page aligned. Returns (address, size).
fn load_initrd(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), Error> {
    let mut file = File::open(path)
        .map_err(|e| Error::Initrd(format!("cannot open {}: {e}", path.display())))?;
    let size = file
        .metadata()
        .map_err(|e| Error::Initrd(format!("cannot stat {}: {e}", path.display())))?
        .len();
    let (_, low_end) = low_ram(layout);
    let top = low_end.min(addr_max.saturating_add(1));
    let start = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| {
            Error::Memory(format!(
                "the initrd ({size} bytes) does not fit between the kernel's end at {kernel_end:#x} and {top:#x}; give the guest more memory"
            ))
        })?;
    let len = usize::try_from(size).map_err(|_| Error::Initrd("initrd too large".into()))?;
    memory
        .read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|e| {
            Error::Initrd(format!(
                "cannot read {} into guest memory: {e}",
                path.display()
            ))
        })?;
    Ok((start, size))
}

fn e820_type(e: &E820Entry) -> u32 {
    e.kind as u32
}

/// Loads `kernel` (and `initrd`) into `memory`, writes the command line and
/// the boot information, and says how to start the boot vCPU.
pub fn load_kernel(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<Boot, Error> {
    let mut file = File::open(kernel)
        .map_err(|e| Error::Kernel(format!("cannot open {}: {e}", kernel.display())))?;
    let kind = image_kind(&mut file, kernel)?;
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let loaded = match kind {
        Image::Elf => Elf::load(memory, None, &mut file, highmem),
        Image::BzImage => BzImage::load(memory, None, &mut file, highmem),
    }
    .map_err(|e| Error::Kernel(format!("cannot load {}: {e}", kernel.display())))?;

    let mut line = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Cmdline(e.to_string()))?;
    line.insert_str(cmdline)
        .map_err(|e| Error::Cmdline(format!("{e} (at most {CMDLINE_MAX} bytes)")))?;
    load_cmdline(memory, GuestAddress(CMDLINE), &line)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    let cmdline_size = u32::try_from(cmdline.len() + 1).unwrap_or(u32::MAX);

    let kernel_end = loaded.kernel_end;
    let e820 = layout.e820();

    match (kind, loaded.pvh_boot_cap) {
        (Image::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            let initrd = match initrd {
                Some(p) => Some(load_initrd(
                    memory,
                    layout,
                    p,
                    kernel_end,
                    u64::from(u32::MAX),
                )?),
                None => None,
            };
            let mut start = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE,
                rsdp_paddr: rsdp,
                memmap_paddr: MEMMAP,
                memmap_entries: u32::try_from(e820.len()).unwrap_or(u32::MAX),
                ..Default::default()
            };
            let mut params = BootParams::new(&start, GuestAddress(BOOT_INFO));
            let map: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|e| hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e820_type(e),
                    reserved: 0,
                })
                .collect();
            params.set_sections(&map, GuestAddress(MEMMAP));
            if let Some((addr, size)) = initrd {
                start.nr_modules = 1;
                start.modlist_paddr = MODLIST;
                params = BootParams::new(&start, GuestAddress(BOOT_INFO));
                params.set_sections(&map, GuestAddress(MEMMAP));
                let module = hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(MODLIST));
            }
            PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, memory)
                .map_err(|e| Error::Memory(format!("cannot write the PVH start info: {e}")))?;
            let mut config = BootConfig::new(CpuMode::Protected { gdt: GDT }, entry.0, 0);
            config.rsi = 0;
            Ok(Boot {
                config,
                rbx: BOOT_INFO,
                protocol: "PVH (32-bit entry, no decompression)",
            })
        }
        (kind, _) => {
            // The 64-bit boot protocol (Documentation/arch/x86/boot.rst).
            let mut hdr = match loaded.setup_header {
                Some(h) => h,
                None => setup_header {
                    boot_flag: KERNEL_BOOT_FLAG_MAGIC,
                    header: KERNEL_HDR_MAGIC,
                    kernel_alignment: KERNEL_MIN_ALIGNMENT,
                    ..Default::default()
                },
            };
            let addr_max = if hdr.initrd_addr_max == 0 {
                0x37ff_ffff
            } else {
                u64::from(hdr.initrd_addr_max)
            };
            let kernel_max = hdr.cmdline_size;
            if kernel_max != 0 && cmdline_size > kernel_max {
                return Err(Error::Cmdline(format!(
                    "the command line is {} bytes; this kernel takes at most {kernel_max}",
                    cmdline_size - 1,
                )));
            }
            hdr.type_of_loader = KERNEL_LOADER_OTHER;
            hdr.cmd_line_ptr = CMDLINE as u32;
            hdr.cmdline_size = cmdline_size;
            if let Some(p) = initrd {
                let (addr, size) = load_initrd(memory, layout, p, kernel_end, addr_max)?;
                hdr.ramdisk_image =
                    u32::try_from(addr).map_err(|_| Error::Memory("initrd above 4 GiB".into()))?;
                hdr.ramdisk_size = u32::try_from(size)
                    .map_err(|_| Error::Initrd("initrd larger than 4 GiB".into()))?;
            }
            let mut zero = boot_params {
                hdr,
                acpi_rsdp_addr: rsdp,
                ..Default::default()
            };
            if e820.len() > zero.e820_table.len() {
                return Err(Error::Memory(format!(
                    "{} e820 entries; the zero page holds {}",
                    e820.len(),
                    zero.e820_table.len()
                )));
            }
            for (slot, e) in zero.e820_table.iter_mut().zip(&e820) {
                slot.addr = e.addr;
                slot.size = e.size;
                slot.r#type = e820_type(e);
            }
            zero.e820_entries = e820.len() as u8;
            let params = BootParams::new(&zero, GuestAddress(BOOT_INFO));
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, memory)
                .map_err(|e| Error::Memory(format!("cannot write the zero page: {e}")))?;
            let tables = build_identity_map(
                memory,
                GuestAddress(PAGE_TABLES),
                PAGE_TABLES_SIZE,
                4 << 30,
                LeafSize::Size2M,
            )
            .map_err(|e| Error::Memory(format!("cannot build the boot page tables: {e}")))?;
            let entry = match kind {
                Image::BzImage => loaded.kernel_load.0 + 0x200,
                Image::Elf => loaded.kernel_load.0,
            };
            let mut config = BootConfig::new(
                CpuMode::Long {
                    gdt: GDT,
                    cr3: tables.cr3,
                },
                entry,
                BOOT_STACK,
            );
            config.rsi = BOOT_INFO;
            Ok(Boot {
                config,
                rbx: 0,
                protocol: match kind {
                    Image::BzImage => "bzImage, 64-bit boot protocol",
                    Image::Elf => "ELF vmlinux without PVH note, 64-bit boot protocol",
                },
            })
        }
    }
}
