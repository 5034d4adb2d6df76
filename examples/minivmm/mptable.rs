//! The Intel MultiProcessor Specification (1.4) table: how a guest booted
//! with `acpi=off` finds its CPUs, its I/O APIC and the ISA interrupt
//! wiring. With ACPI the kernel uses the MADT instead.
//!
//! The floating pointer and the configuration table sit in the last KiB of
//! conventional memory (the EBDA at 0x9FC00), one of the places Linux scans.

use vmkit_memory::layout::EBDA_START;
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::GuestMemoryMmap;

use crate::acpi::{IOAPIC_ADDR, LAPIC_ADDR};
use crate::Error;

/// The area the table must fit in (the EBDA, up to 640 KiB).
const AREA_END: u64 = 0xA_0000;
const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// ISA IRQs wired to the I/O APIC.
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and the configuration table for `cpus` CPUs
/// whose I/O APIC has ID `cpus`, placed at `base`.
pub fn build(base: u64, cpus: u8) -> Vec<u8> {
    let table_addr = base + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        // Processor: type 0, APIC ID, APIC version, flags (enabled, BSP),
        // signature (family 6), feature flags (FPU, APIC), reserved.
        let flags = 1 | if id == 0 { 2 } else { 0 };
        entries.extend_from_slice(&[0, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The I/O APIC, enabled.
    let ioapic_id = cpus;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // I/O interrupt assignments: the 8259's ExtINT on pin 0, then ISA IRQs
    // on the pins of the same number, except IRQ 0 (the PIT) on pin 2.
    let mut assign = |kind: u8, irq: u8, pin: u8| {
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    };
    assign(3, 0, 0);
    for irq in 0..ISA_IRQS {
        if irq == 2 {
            continue; // the cascade
        }
        let pin = if irq == 0 { 2 } else { irq };
        assign(0, irq, pin);
    }
    // Local interrupt assignments: ExtINT on LINT0, NMI on LINT1, all CPUs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMKIT   ");
    table.extend_from_slice(b"MINIVMM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REV);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: table present, no IMCR
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// Writes the MP table into the EBDA.
pub fn write(memory: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let bytes = build(EBDA_START, cpus);
    if EBDA_START + bytes.len() as u64 > AREA_END {
        return Err(Error::Memory(format!(
            "the MP table for {cpus} CPUs does not fit in the EBDA"
        )));
    }
    memory
        .write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|e| Error::Memory(format!("cannot write the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_lengths_and_counts() {
        for cpus in [1u8, 2, 32] {
            let bytes = build(EBDA_START, cpus);
            assert!(EBDA_START + bytes.len() as u64 <= AREA_END, "{cpus} CPUs");
            let (fp, table) = bytes.split_at(16);
            assert_eq!(&fp[..4], b"_MP_");
            assert_eq!(sum(fp), 0);
            let ptr = u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]);
            assert_eq!(u64::from(ptr), EBDA_START + 16);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(
                usize::from(u16::from_le_bytes([table[4], table[5]])),
                table.len()
            );
            assert_eq!(sum(table), 0);
            // CPUs + bus + I/O APIC + ExtINT + 15 ISA IRQs + 2 local.
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 1 + 15 + 2);
            // Exactly one boot processor.
            let bsps = table[44..]
                .chunks(20)
                .take(usize::from(cpus))
                .filter(|e| e[0] == 0 && e[3] & 2 != 0)
                .count();
            assert_eq!(bsps, 1);
        }
    }
}
