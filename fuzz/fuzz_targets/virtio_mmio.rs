//! virtio-mmio register access sequences against a device that records
//! its activations. Checks that nothing panics, that DRIVER_OK is never
//! reported without FEATURES_OK, and that the device is never activated
//! twice without a reset in between.
#![no_main]

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_devices::{BusDevice, NullLine};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::MemoryLayout;
use vmkit_virtio::transport::{MmioOptions, MmioTransport};
use vmkit_virtio::{ActivateError, Activation, VirtioDevice};

struct Probe {
    active: Arc<AtomicI32>,
    config: [u8; 16],
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 256]
    }
    fn features(&self) -> u64 {
        0b1011
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        vmkit_virtio::device::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get_mut(o))
            {
                *slot = *b;
            }
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        assert_eq!(a.queues.len(), 2);
        let prev = self.active.fetch_add(1, Ordering::SeqCst);
        assert_eq!(prev, 0, "activated twice without reset");
        Ok(())
    }
    fn reset(&mut self) {
        self.active.store(0, Ordering::SeqCst);
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u16, len: u8 },
    Write { offset: u16, len: u8, value: u64 },
    /// A register write at a 4-byte aligned register offset below 0x100.
    Reg { reg: u8, value: u32 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    memory: Vec<u8>,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let Ok(layout) = MemoryLayout::new(1 << 20) else { return };
    let Ok(mem) = layout.create_memory(&Default::default()) else { return };
    let _ = mem.write_slice(&input.memory[..input.memory.len().min(0x4000)], GuestAddress(0));
    let active = Arc::new(AtomicI32::new(0));
    let dev = Probe {
        active: active.clone(),
        config: [0; 16],
    };
    let Ok(t) = MmioTransport::new(Box::new(dev), mem, Arc::new(NullLine), MmioOptions::default())
    else {
        return;
    };
    for op in input.ops.iter().take(2000) {
        match *op {
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; usize::from(len % 9)];
                let _ = t.read(u64::from(offset % 0x1000), &mut buf);
            }
            Op::Write { offset, len, value } => {
                let n = usize::from(len % 9);
                let _ = t.write(u64::from(offset % 0x1000), &value.to_le_bytes()[..n]);
            }
            Op::Reg { reg, value } => {
                let _ = t.write(u64::from(reg & 0xfc), &value.to_le_bytes());
            }
        }
        let status = t.status();
        if status & 4 != 0 {
            assert_ne!(status & 8, 0, "DRIVER_OK without FEATURES_OK");
        }
    }
});
