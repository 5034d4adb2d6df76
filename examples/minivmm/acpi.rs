//! ACPI tables for the guest: RSDP, XSDT, FADT, MADT, MCFG and a DSDT.
//!
//! The platform is "hardware-reduced" ACPI (no PM timer, no SCI, no GPE
//! blocks), as in Firecracker and Cloud Hypervisor; the legacy PC devices
//! (8259 PICs, COM1, CMOS RTC) are still there and described. The i8042 is
//! there only for its reset line (Linux's reboot writes its command port
//! whether or not it found a controller), so it is not described: with no
//! PS/2 device in the DSDT and the 8042 flag clear in the FADT, Linux skips
//! probing a keyboard nobody can type on, as on QEMU's microvm.
//! Debian's kernels build virtio-mmio as a module without command-line
//! device support, so the DSDT is the only way they find virtio-mmio
//! devices: each one is a `LNRO0005` device with its registers and its
//! interrupt. With PCI, the DSDT has the host bridge (`PNP0A08`) with its
//! windows and INTx routing, and the MCFG announces ECAM, the only way to
//! configuration space (see [`crate::platform`]).
//!
//! `acpi_tables` (rust-vmm) writes the fixed tables and the AML; the MADT is
//! assembled here because that crate's MADT lacks x86 interrupt source
//! overrides and the PC-AT flag.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::GuestMemoryMmap;

use crate::Error;

/// Where the RSDP goes: the BIOS area Linux also scans (0xE0000..0xFFFFF).
pub const RSDP_ADDR: u64 = 0xE_0000;
/// The end of the area the tables may use.
const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"VMKIT ";
const OEM_TABLE_ID: [u8; 8] = *b"MINIVMM ";
const OEM_REVISION: u32 = 1;

/// The I/O APIC's MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;

/// A virtio-mmio device for the DSDT.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    /// Register block base.
    pub base: u64,
    /// Register block length.
    pub len: u64,
    /// Its GSI (level-triggered, active high).
    pub gsi: u32,
}

/// Length of the ECAM area of one bus (32 devices x 8 functions x 4 KiB).
const ECAM_LEN: u64 = 1 << 20;

/// The PCI host bridge for the DSDT and MCFG.
#[derive(Debug, Clone, Copy)]
pub struct PciHost {
    /// ECAM base (one bus: 1 MiB).
    pub ecam: u64,
    /// The I/O-port window for BARs `(base, len)`.
    pub io: (u64, u64),
    /// The 32-bit memory window `(base, len)`.
    pub mem32: (u64, u64),
    /// The 64-bit memory window `(base, len)`.
    pub mem64: (u64, u64),
    /// INTx GSIs: device `d`'s INTA goes to `intx[d % intx.len()]`.
    pub intx: &'static [u32],
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct Platform {
    /// vCPUs (APIC IDs 0..n).
    pub cpus: u8,
    /// virtio-mmio devices.
    pub mmio: Vec<MmioDevice>,
    /// The PCI host bridge, if there is PCI.
    pub pci: Option<PciHost>,
}

/// Places the tables one after another, 16-byte aligned.
struct Placer<'a> {
    memory: &'a GuestMemoryMmap,
    next: u64,
}

impl Placer<'_> {
    fn place(&mut self, what: &str, bytes: &[u8]) -> Result<u64, Error> {
        let addr = self.next;
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(Error::Memory(format!(
                "the ACPI tables do not fit below 1 MiB (at the {what})"
            )));
        }
        self.memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("cannot write the {what}: {e}")))?;
        self.next = (end + 15) & !15;
        Ok(addr)
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The MADT: one local APIC per vCPU, the I/O APIC, the ISA overrides
/// (IRQ 0 on GSI 2, as on every PC) and the LINT1 NMI.
fn madt(cpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 3, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present
    for id in 0..cpus {
        // Processor local APIC: type 0, length 8, UID, APIC ID, enabled.
        t.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, ID, reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, cpus, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // Interrupt source override: type 2, length 10, bus 0 (ISA), IRQ 0 →
    // GSI 2, flags 0 (conforms to the bus: edge, active high).
    let mut iso = vec![2, 10, 0, 0];
    iso.extend_from_slice(&2u32.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    t.append_slice(&iso);
    // Local APIC NMI: type 4, length 6, all processors (0xFF), flags 0,
    // LINT1.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t.as_slice().to_vec()
}

fn dsdt(platform: &Platform) -> Vec<u8> {
    let mut body: Vec<u8> = Vec::new();

    // Legacy PC devices.
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, 4);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    let rtc_io = aml::IO::new(0x70, 0x70, 1, 2);
    let rtc_irq = aml::Interrupt::new(true, true, false, false, 8);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new("_CRS".into(), &rtc_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    // virtio-mmio devices.
    for (i, dev) in platform.mmio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
        let irq = aml::Interrupt::new(true, false, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let uid = i as u32;
        let name = format!("_SB_.V{i:03X}");
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    // The PCI host bridge.
    if let Some(pci) = &platform.pci {
        let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
        let io = aml::AddressSpace::new_io(pci.io.0 as u16, (pci.io.0 + pci.io.1 - 1) as u16, None);
        let mem32 = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            pci.mem32.0 as u32,
            (pci.mem32.0 + pci.mem32.1 - 1) as u32,
            None,
        );
        let mem64 = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            pci.mem64.0,
            pci.mem64.0 + pci.mem64.1 - 1,
            None,
        );
        let crs = aml::ResourceTemplate::new(vec![&bus, &io, &mem32, &mem64]);
        // _PRT: (device << 16 | 0xFFFF, pin 0 = INTA, source 0, GSI).
        let entries: Vec<(u32, u32)> = (0..32u32)
            .map(|d| {
                let gsi = pci.intx[d as usize % pci.intx.len()];
                ((d << 16) | 0xffff, gsi)
            })
            .collect();
        let zero = 0u8;
        let prt_packages: Vec<aml::Package> = entries
            .iter()
            .map(|(addr, gsi)| aml::Package::new(vec![addr, &zero, &zero, gsi]))
            .collect();
        let prt_refs: Vec<&dyn Aml> = prt_packages.iter().map(|p| p as &dyn Aml).collect();
        let prt = aml::Package::new(prt_refs);
        aml::Device::new(
            "_SB_.PCI0".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
                &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
                &aml::Name::new("_ADR".into(), &aml::ZERO),
                &aml::Name::new("_SEG".into(), &aml::ZERO),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new("_BBN".into(), &aml::ZERO),
                &aml::Name::new("_CRS".into(), &crs),
                &aml::Name::new("_PRT".into(), &prt),
            ],
        )
        .to_aml_bytes(&mut body);

        // ECAM as a motherboard resource: without the 0xCF8 ports, Linux
        // accepts the MCFG's area only when ACPI reserves it this way
        // (its e820 check needs type-1 access to run).
        let ecam = aml::Memory32Fixed::new(true, pci.ecam as u32, ECAM_LEN as u32);
        let ecam_crs = aml::ResourceTemplate::new(vec![&ecam]);
        aml::Device::new(
            "_SB_.MRES".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new("_CRS".into(), &ecam_crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// Writes all tables at [`RSDP_ADDR`] and returns the RSDP's address.
pub fn write_tables(memory: &GuestMemoryMmap, platform: &Platform) -> Result<u64, Error> {
    let mut placer = Placer {
        memory,
        next: RSDP_ADDR + 64,
    };
    let dsdt_addr = placer.place("DSDT", &dsdt(platform))?;
    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .finalize();
    let fadt_addr = placer.place("FADT", &bytes_of(&fadt))?;
    let madt_addr = placer.place("MADT", &madt(platform.cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(pci) = &platform.pci {
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(pci.ecam, 0, 0, 0);
        let mcfg_addr = placer.place("MCFG", &bytes_of(&mcfg))?;
        xsdt.add_entry(mcfg_addr);
    }
    let xsdt_addr = placer.place("XSDT", &bytes_of(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    memory
        .write_slice(&bytes_of(&rsdp), GuestAddress(RSDP_ADDR))
        .map_err(|e| Error::Memory(format!("cannot write the RSDP: {e}")))?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let platform = Platform {
            cpus: 2,
            mmio: vec![MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 16,
            }],
            pci: Some(PciHost {
                ecam: 0xe000_0000,
                io: (0x1000, 0xf000),
                mem32: (0xc000_0000, 0x1000_0000),
                mem64: (1 << 36, 1 << 36),
                intx: &[16, 17],
            }),
        };
        let m = madt(2);
        assert_eq!(sum(&m), 0);
        assert_eq!(
            u32::from_le_bytes([m[4], m[5], m[6], m[7]]) as usize,
            m.len()
        );
        let d = dsdt(&platform);
        assert_eq!(sum(&d), 0);
        assert_eq!(
            u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize,
            d.len()
        );
        // The virtio-mmio device's _HID string is in the AML.
        assert!(d.windows(8).any(|w| w == b"LNRO0005"));
        // No PS/2 controller is described; the ECAM area is a motherboard
        // resource (EISA ids compress to 4 bytes: PNP0303, PNP0C02).
        assert!(!d.windows(4).any(|w| w == [0x41, 0xd0, 0x03, 0x03]));
        assert!(d.windows(4).any(|w| w == [0x41, 0xd0, 0x0c, 0x02]));
    }
}
