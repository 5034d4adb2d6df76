//! virtio-pci configuration-space and BAR access sequences against an rng
//! device over arbitrary guest memory. Checks that nothing panics, that
//! DRIVER_OK is never reported without FEATURES_OK, that status bits only
//! disappear through a reset, and that the MSI-X and INTx paths survive
//! whatever the guest programs.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_devices::pci::PciDevice;
use vmkit_devices::{RecordingLine, RecordingMsiVectors};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::MemoryLayout;
use vmkit_virtio::devices::Rng;
use vmkit_virtio::transport::{PciOptions, PciTransport};

#[derive(Arbitrary, Debug)]
enum Op {
    ConfigRead {
        offset: u16,
        len: u8,
    },
    ConfigWrite {
        offset: u16,
        len: u8,
        value: u32,
    },
    BarRead {
        bar: u8,
        offset: u32,
        len: u8,
    },
    BarWrite {
        bar: u8,
        offset: u32,
        len: u8,
        value: u64,
    },
    /// A naturally sized write to a common-config field.
    Common {
        field: u8,
        value: u64,
    },
    /// The PCI_CFG window: BAR, offset, length, then a data access.
    Window {
        bar: u8,
        offset: u32,
        len: u32,
        write: Option<u32>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    packed: bool,
    vectors: u8,
    memory: Vec<u8>,
    ops: Vec<Op>,
}

/// Width of each common-config field, by offset.
fn common_width(field: u8) -> usize {
    match field {
        0x14 | 0x15 => 1,
        0x10..=0x1F => 2,
        _ => 4,
    }
}

fuzz_target!(|input: Input| {
    let Ok(layout) = MemoryLayout::new(1 << 20) else {
        return;
    };
    let Ok(mem) = layout.create_memory(&Default::default()) else {
        return;
    };
    let _ = mem.write_slice(
        &input.memory[..input.memory.len().min(0x8000)],
        GuestAddress(0x20000),
    );
    let vectors = u16::from(input.vectors % 5) + 1;
    let Ok(t) = PciTransport::new(
        Box::new(Rng::new()),
        mem,
        Arc::new(RecordingLine::new()),
        Arc::new(RecordingMsiVectors::new(vectors)),
        PciOptions {
            packed_ring: input.packed,
            ..Default::default()
        },
    ) else {
        return;
    };
    // Find the PCI_CFG capability as a driver would.
    let mut pci_cfg = 0u16;
    let mut ptr = {
        let mut b = [0u8];
        t.config_read(0x34, &mut b);
        b[0]
    };
    for _ in 0..48 {
        if ptr == 0 {
            break;
        }
        let mut cap = [0u8; 4];
        t.config_read(u16::from(ptr), &mut cap);
        if cap[0] == 0x09 && cap[3] == 5 {
            pci_cfg = u16::from(ptr);
        }
        ptr = cap[1];
    }
    assert_ne!(pci_cfg, 0, "no PCI_CFG capability");
    let mut last = 0u32;
    for op in input.ops.iter().take(1000) {
        match *op {
            Op::ConfigRead { offset, len } => {
                let mut buf = vec![0u8; usize::from(len % 9)];
                t.config_read(offset % 0x1001, &mut buf);
            }
            Op::ConfigWrite { offset, len, value } => {
                let n = usize::from(len % 5);
                t.config_write(offset % 0x1001, &value.to_le_bytes()[..n]);
            }
            Op::BarRead { bar, offset, len } => {
                let mut buf = vec![0u8; usize::from(len % 9)];
                let _ = t.bar_read(bar % 7, u64::from(offset % 0x10000), &mut buf);
            }
            Op::BarWrite {
                bar,
                offset,
                len,
                value,
            } => {
                let n = usize::from(len % 9);
                let _ = t.bar_write(
                    bar % 7,
                    u64::from(offset % 0x10000),
                    &value.to_le_bytes()[..n],
                );
            }
            Op::Common { field, value } => {
                let field = field % 0x40;
                let w = common_width(field);
                let _ = t.bar_write(0, u64::from(field), &value.to_le_bytes()[..w]);
            }
            Op::Window {
                bar,
                offset,
                len,
                write,
            } => {
                t.config_write(pci_cfg + 4, &[bar]);
                t.config_write(pci_cfg + 8, &offset.to_le_bytes());
                t.config_write(pci_cfg + 12, &len.to_le_bytes());
                match write {
                    Some(v) => t.config_write(pci_cfg + 16, &v.to_le_bytes()),
                    None => {
                        let mut b = [0u8; 4];
                        t.config_read(pci_cfg + 16, &mut b);
                    }
                }
            }
        }
        let status = t.status();
        if status & 4 != 0 {
            assert_ne!(status & 8, 0, "DRIVER_OK without FEATURES_OK");
        }
        let plain = status & !0x40;
        assert!(
            plain == 0 || plain & last == last,
            "status {last:#x} -> {plain:#x}"
        );
        last = plain;
        if t.active() {
            assert_ne!(status & 4, 0, "active without DRIVER_OK");
        }
    }
});
