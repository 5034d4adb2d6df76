use super::*;
use proptest::prelude::*;

fn header() -> PciHeader {
    PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        revision: 0x01,
        class_code: (0x02, 0x00, 0x00),
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
        interrupt_pin: Some(IntxPin::A),
    }
}

/// I/O BAR 0 (32 bytes), 64-bit prefetchable BAR 2 (4 KiB), 32-bit BAR 4
/// (256 bytes), and two capabilities.
fn sample() -> (ConfigSpace, u16, u16) {
    let mut c = ConfigSpace::new(&header());
    c.add_bar(0, BarKind::Io, 32).unwrap();
    c.add_bar(2, BarKind::Memory64 { prefetchable: true }, 0x1000)
        .unwrap();
    c.add_bar(
        4,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x100,
    )
    .unwrap();
    let cap1 = c
        .add_capability(0x09, &[0xAA, 0xBB, 0xCC], &[0xFF, 0x0F])
        .unwrap();
    let cap2 = c.add_capability(0x05, &[0; 12], &[0x01; 12]).unwrap();
    (c, cap1, cap2)
}

#[test]
fn header_fields() {
    let c = ConfigSpace::new(&header());
    assert_eq!(c.read_u32(0x00), 0x1041_1af4);
    assert_eq!(c.read_u32(0x08), 0x0200_0001);
    assert_eq!(c.read_u32(0x2C), 0x1100_1af4);
    assert_eq!(c.read_u8(0x3D), 1);
    assert_eq!(c.read_u8(0x0E), 0, "type-0 header, single function");
    assert_eq!(c.read_u16(0x06) & STATUS_CAPABILITIES_LIST, 0);
    assert_eq!(c.read_u8(0x34), 0);
    assert!(c.bars().is_empty());
    assert!(format!("{c:?}").contains("0x1af4"));
    let none = ConfigSpace::new(&PciHeader {
        interrupt_pin: None,
        ..header()
    });
    assert_eq!(none.read_u8(0x3D), 0);
    for (pin, v) in [(IntxPin::B, 2), (IntxPin::C, 3), (IntxPin::D, 4)] {
        assert_eq!(pin.register_value(), v);
    }
}

#[test]
fn command_status_and_interrupt_line() {
    let mut c = ConfigSpace::new(&header());
    c.write_u16(0x04, 0xFFFF);
    assert_eq!(
        c.command(),
        COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
    );
    c.write_u16(0x04, 0);
    assert_eq!(c.command(), 0);
    // Status error bits are write-1-to-clear; the device sets them.
    c.write_raw(0x06, &[0x10, 0xF9]).unwrap();
    c.write_u16(0x06, 0x0100 | 0x2000);
    assert_eq!(c.read_u16(0x06), 0xF910 & !0x2100);
    c.write_u16(0x06, 0);
    assert_eq!(
        c.read_u16(0x06),
        0xF910 & !0x2100,
        "writing zeroes clears nothing"
    );
    c.write_u16(0x06, 0xFFFF);
    assert_eq!(c.read_u16(0x06), 0x0010, "non-error bits are read-only");
    c.write_u8(0x3C, 0x0B);
    assert_eq!(c.read_u8(0x3C), 0x0B);
    c.write_u8(0x3D, 0x04);
    assert_eq!(c.read_u8(0x3D), 1);
}

#[test]
fn io_bar_sizing() {
    let mut c = ConfigSpace::new(&header());
    c.add_bar(1, BarKind::Io, 64).unwrap();
    assert_eq!(c.read_u32(0x14), 0x1);
    c.write_u32(0x14, 0xFFFF_FFFF);
    assert_eq!(c.read_u32(0x14), 0xFFFF_FFC1);
    c.write_u32(0x14, 0xC040);
    assert_eq!(c.read_u32(0x14), 0xC041);
    assert_eq!(
        c.bar(1),
        Some(Bar {
            index: 1,
            kind: BarKind::Io,
            size: 64,
            address: 0xC040
        })
    );
    // Bits below the size cannot be set.
    c.write_u32(0x14, 0xC07F);
    assert_eq!(c.bar(1).unwrap().address, 0xC040);
}

#[test]
fn mem32_bar_sizing_and_prefetch_bit() {
    let mut c = ConfigSpace::new(&header());
    c.add_bar(0, BarKind::Memory32 { prefetchable: true }, 0x10_0000)
        .unwrap();
    c.add_bar(
        1,
        BarKind::Memory32 {
            prefetchable: false,
        },
        16,
    )
    .unwrap();
    assert_eq!(c.read_u32(0x10), 0x8);
    c.write_u32(0x10, 0xFFFF_FFFF);
    assert_eq!(c.read_u32(0x10), 0xFFF0_0008);
    c.write_u32(0x14, 0xFFFF_FFFF);
    assert_eq!(c.read_u32(0x14), 0xFFFF_FFF0);
    c.write_u32(0x10, 0xE000_0000);
    assert_eq!(c.read_u32(0x10), 0xE000_0008);
    assert_eq!(c.bar(0).unwrap().address, 0xE000_0000);
}

#[test]
fn mem64_bar_sizing_both_halves() {
    let mut c = ConfigSpace::new(&header());
    let kind = BarKind::Memory64 {
        prefetchable: false,
    };
    c.add_bar(2, kind, 0x2_0000_0000).unwrap();
    assert_eq!(c.read_u32(0x18), 0x4);
    assert_eq!(c.read_u32(0x1C), 0);
    c.write_u32(0x18, 0xFFFF_FFFF);
    c.write_u32(0x1C, 0xFFFF_FFFF);
    assert_eq!(c.read_u32(0x18), 0x0000_0004, "8 GiB: no low address bits");
    assert_eq!(c.read_u32(0x1C), 0xFFFF_FFFE);
    c.set_bar_address(2, 0x40_0000_0000).unwrap();
    assert_eq!(c.read_u32(0x18), 0x4);
    assert_eq!(c.read_u32(0x1C), 0x40);

    let mut d = ConfigSpace::new(&header());
    d.add_bar(0, BarKind::Memory64 { prefetchable: true }, 0x4000)
        .unwrap();
    d.write_u32(0x10, 0xFFFF_FFFF);
    d.write_u32(0x14, 0xFFFF_FFFF);
    assert_eq!(d.read_u32(0x10), 0xFFFF_C00C);
    assert_eq!(d.read_u32(0x14), 0xFFFF_FFFF);
    d.write_u32(0x10, 0x8000_0000);
    d.write_u32(0x14, 0x1);
    assert_eq!(d.bar(0).unwrap().address, 0x1_8000_0000);
    assert_eq!(d.bar(1), None, "upper half is not a BAR of its own");
    assert!(d.set_bar_address(1, 0).is_err());
}

#[test]
fn unimplemented_bars_read_zero_and_ignore_writes() {
    let mut c = ConfigSpace::new(&header());
    c.add_bar(0, BarKind::Io, 4).unwrap();
    for offset in (0x14..0x28).step_by(4).chain([0x30]) {
        c.write_u32(offset, 0xFFFF_FFFF);
        assert_eq!(c.read_u32(offset), 0, "offset {offset:#x}");
    }
    assert_eq!(c.bar(3), None);
    assert_eq!(c.bar(6), None);
}

#[test]
fn bar_validation() {
    let mut c = ConfigSpace::new(&header());
    let m32 = BarKind::Memory32 {
        prefetchable: false,
    };
    let m64 = BarKind::Memory64 {
        prefetchable: false,
    };
    assert!(matches!(
        c.add_bar(6, m32, 16),
        Err(PciError::BarIndex { index: 6, .. })
    ));
    assert!(matches!(
        c.add_bar(0, m32, 24),
        Err(PciError::BarSize { .. })
    ));
    assert!(matches!(
        c.add_bar(0, m32, 8),
        Err(PciError::BarSize { .. })
    ));
    assert!(matches!(
        c.add_bar(0, m32, 0),
        Err(PciError::BarSize { .. })
    ));
    assert!(c.add_bar(0, m32, 1 << 32).is_err());
    assert!(c.add_bar(0, BarKind::Io, 2).is_err());
    assert!(c.add_bar(0, BarKind::Io, 512).is_err());
    assert!(c.add_bar(5, m64, 16).is_err());
    assert!(c.add_bar(0, m64, 8).is_err());
    c.add_bar(1, m64, 1 << 40).unwrap();
    let err = c.add_bar(2, BarKind::Io, 4).unwrap_err();
    assert!(
        matches!(
            err,
            PciError::BarInUse {
                index: 2,
                register: 2,
                existing: 1
            }
        ),
        "{err}"
    );
    assert!(c.add_bar(0, m64, 16).is_err(), "would take register 1");
    assert!(c.add_bar(1, BarKind::Io, 4).is_err());
    c.add_bar(0, m32, 16).unwrap();
    c.add_bar(3, BarKind::Io, 256).unwrap();
    c.add_bar(4, m64, 1 << 63).unwrap();
    assert_eq!(c.bars().len(), 4);
    let err = c.add_bar(4, m32, 16).unwrap_err();
    assert!(err.to_string().contains("BAR 4"), "{err}");
}

#[test]
fn set_bar_address_validation() {
    let mut c = ConfigSpace::new(&header());
    c.add_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    assert!(c.set_bar_address(0, 0x1_0000_0000).is_err());
    assert!(c.set_bar_address(0, 0x800).is_err());
    assert!(c.set_bar_address(1, 0x1000).is_err());
    assert!(c.set_bar_address(9, 0x1000).is_err());
    c.set_bar_address(0, 0xFEB0_0000).unwrap();
    assert_eq!(c.read_u32(0x10), 0xFEB0_0000);
}

/// Walks the capability list from 0x34, at most 48 steps.
fn walk(c: &ConfigSpace) -> Vec<(u16, u8)> {
    let mut found = Vec::new();
    if c.read_u16(0x06) & STATUS_CAPABILITIES_LIST == 0 {
        return found;
    }
    let mut ptr = u16::from(c.read_u8(0x34) & 0xFC);
    while ptr != 0 {
        assert!(found.len() < 48, "capability list does not terminate");
        found.push((ptr, c.read_u8(ptr)));
        ptr = u16::from(c.read_u8(ptr + 1) & 0xFC);
    }
    found
}

#[test]
fn capability_chain() {
    let (mut c, cap1, cap2) = sample();
    assert_eq!(cap1, 0x40);
    assert_eq!(cap2, 0x48, "5 bytes at 0x40, next dword at 0x48");
    assert_eq!(walk(&c), vec![(0x40, 0x09), (0x48, 0x05)]);
    assert_eq!(c.read_u32(0x40), 0xBBAA_4809);
    // ID and next pointer are read-only; the body follows its mask.
    c.write_u32(0x40, 0xFFFF_FFFF);
    assert_eq!(c.read_u32(0x40), 0xBFFF_4809);
    c.write_u8(0x44, 0xFF);
    assert_eq!(c.read_u8(0x44), 0xCC, "beyond the mask: read-only");
    c.write_u8(0x34, 0x80);
    assert_eq!(walk(&c).len(), 2);
    // Fill the rest of the legacy space.
    let mut count = 2;
    while c.add_capability(0x0A, &[0; 6], &[]).is_ok() {
        count += 1;
    }
    let chain = walk(&c);
    assert_eq!(chain.len(), count);
    assert_eq!(chain.last().unwrap().0, 0xF8);
    let err = c.add_capability(0x0A, &[], &[]).unwrap_err();
    assert!(
        matches!(
            err,
            PciError::CapabilitySpace {
                id: 0x0A,
                len: 2,
                available: 0
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0x0a"), "{err}");
}

#[test]
fn capability_errors() {
    let mut c = ConfigSpace::new(&header());
    assert!(matches!(
        c.add_capability(1, &[0; 2], &[0; 3]),
        Err(PciError::CapabilityMask { .. })
    ));
    assert!(matches!(
        c.add_capability(1, &[0; 255], &[]),
        Err(PciError::CapabilitySpace { available: 192, .. })
    ));
    assert_eq!(c.add_capability(1, &[0; 190], &[]).unwrap(), 0x40);
    assert!(c.add_capability(2, &[], &[]).is_err());
    assert_eq!(walk(&c), vec![(0x40, 1)]);
}

#[test]
fn crossing_and_out_of_range_accesses() {
    let (mut c, _, _) = sample();
    // A dword at 0x02 is device ID + command, byte by byte.
    c.write_u16(0x04, 0x0003);
    assert_eq!(c.read_u32(0x02), 0x0003_1041);
    c.write_u32(0x02, 0xFFFF_FFFF);
    assert_eq!(c.read_u16(0x02), 0x1041);
    assert_eq!(c.command(), 0x0407);
    // Past the end: all-ones, writes dropped, no panic.
    assert_eq!(c.read_u32(0x0FFE), 0xFFFF_0000);
    assert_eq!(c.read_u32(0xFFFF), 0xFFFF_FFFF);
    assert_eq!(c.read_u8(0x1000), 0xFF);
    c.write_u32(0x0FFE, 0xFFFF_FFFF);
    c.write_u32(0xFFFE, 0xFFFF_FFFF);
    let mut big = [0u8; 16];
    c.read(0xFFF8, &mut big);
    assert_eq!(big, [0xFF; 16]);
    // Extended space reads zero, ignores guest writes, holds device data.
    c.write_u32(0x100, 0xFFFF_FFFF);
    assert_eq!(c.read_u32(0x100), 0);
    c.write_raw(0x100, &[1, 2, 3, 4]).unwrap();
    assert_eq!(c.read_u32(0x100), 0x0403_0201);
    c.set_writable(0x104, &[0xFF]).unwrap();
    c.write_u16(0x104, 0xABCD);
    assert_eq!(c.read_u16(0x104), 0x00CD);
    assert!(matches!(
        c.write_raw(0x0FFE, &[0; 4]),
        Err(PciError::ConfigRange {
            offset: 0xFFE,
            len: 4
        })
    ));
    assert!(c.set_writable(0xFFFF, &[0]).is_err());
}

/// The writable and W1C bits of `sample()`'s space, from the
/// specification's register table rather than from the implementation.
fn model_masks(offset: usize) -> (u8, u8) {
    let (w, c) = match offset {
        // Command: I/O, memory, bus master; INTx disable.
        0x04 => (0x07, 0),
        0x05 => (0x04, 0),
        // Status: bit 8 and bits 15:11 are W1C.
        0x07 => (0, 0xF9),
        0x0C => (0xFF, 0),
        // I/O BAR 0, 32 bytes: address bits 31:5.
        0x10 => (0xE0, 0),
        0x11..=0x13 => (0xFF, 0),
        // 64-bit BAR 2 of 4 KiB: bits 63:12.
        0x19 => (0xF0, 0),
        0x1A..=0x1F => (0xFF, 0),
        // 32-bit BAR 4 of 256 bytes: bits 31:8.
        0x21..=0x23 => (0xFF, 0),
        0x3C => (0xFF, 0),
        // Capability 1 body: masks [0xFF, 0x0F].
        0x42 => (0xFF, 0),
        0x43 => (0x0F, 0),
        // Capability 2 body: 12 bytes with mask 0x01.
        0x4A..=0x55 => (0x01, 0),
        _ => (0, 0),
    };
    (w, c)
}

#[derive(Debug, Clone)]
enum Access {
    Write(u16, Vec<u8>),
    DeviceSetsStatus(u8),
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![
        6 => (0u16..0x60, proptest::collection::vec(any::<u8>(), 1..=4))
            .prop_map(|(o, d)| Access::Write(o, d)),
        1 => (any::<u16>(), proptest::collection::vec(any::<u8>(), 1..=8))
            .prop_map(|(o, d)| Access::Write(o, d)),
        1 => any::<u8>().prop_map(Access::DeviceSetsStatus),
    ]
}

proptest! {
    #[test]
    fn guest_writes_follow_the_masks(ops in proptest::collection::vec(access(), 1..64)) {
        let (mut c, _, _) = sample();
        let mut model = vec![0u8; CONFIG_SPACE_SIZE];
        c.read(0, &mut model);
        let ids = c.read_u32(0);
        let class = c.read_u32(8);
        for op in ops {
            match op {
                Access::Write(offset, data) => {
                    c.write(offset, &data);
                    for (i, v) in data.iter().enumerate() {
                        let o = usize::from(offset) + i;
                        if o < CONFIG_SPACE_SIZE {
                            let (w, w1c) = model_masks(o);
                            model[o] = ((model[o] & !w) | (v & w)) & !(v & w1c);
                        }
                    }
                }
                Access::DeviceSetsStatus(bits) => {
                    let status = c.read_u8(0x07) | bits;
                    c.write_raw(0x07, &[status]).unwrap();
                    model[0x07] = status;
                }
            }
            let mut actual = vec![0u8; CONFIG_SPACE_SIZE];
            c.read(0, &mut actual);
            prop_assert_eq!(&actual, &model);
            prop_assert_eq!(c.read_u32(0), ids);
            prop_assert_eq!(c.read_u32(8), class);
            prop_assert_eq!(walk(&c).len(), 2);
            prop_assert_eq!(c.read_u8(0x10) & 0x3, 0x1);
            prop_assert_eq!(c.read_u8(0x18) & 0xF, 0xC);
        }
    }

    #[test]
    fn any_access_is_the_bytewise_composition(offset: u16, len in 0usize..12, value: u64) {
        let (mut c, _, _) = sample();
        let mut whole = vec![0u8; len];
        c.read(offset, &mut whole);
        for (i, b) in whole.iter().enumerate() {
            let o = u32::from(offset) + i as u32;
            let expected = u16::try_from(o).map_or(0xFF, |o| c.read_u8(o));
            prop_assert_eq!(*b, expected);
        }
        let data: Vec<u8> = value.to_le_bytes().iter().cycle().take(len).copied().collect();
        let mut bytewise = c.clone();
        c.write(offset, &data);
        for (i, b) in data.iter().enumerate() {
            if let Ok(o) = u16::try_from(u32::from(offset) + i as u32) {
                bytewise.write_u8(o, *b);
            }
        }
        let (mut a, mut b) = (vec![0u8; CONFIG_SPACE_SIZE], vec![0u8; CONFIG_SPACE_SIZE]);
        c.read(0, &mut a);
        bytewise.read(0, &mut b);
        prop_assert_eq!(a, b);
    }
}
