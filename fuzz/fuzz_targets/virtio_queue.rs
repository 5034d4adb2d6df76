//! The device side of both virtqueue formats over arbitrary ring memory.
//! Checks that nothing panics, that every chain the queue hands out obeys
//! the structural rules it promises (at most queue-size descriptors, total
//! length within u32, readable before writable), and that the number of
//! chains popped is bounded by what the ring can hold between uses.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::MemoryLayout;
use vmkit_virtio::queue::{Queue, QueueConfig, RingFormat};

#[derive(Arbitrary, Debug)]
enum Op {
    Pop,
    Use(u32),
    Undo,
    Enable,
    Disable,
    Notify,
}

#[derive(Arbitrary, Debug)]
struct Input {
    packed: bool,
    event_idx: bool,
    size_log: u8,
    /// Written at 0x1000: descriptors, rings, indirect tables, buffers.
    memory: Vec<u8>,
    ops: Vec<Op>,
}

const BASE: u64 = 0x1000;

fuzz_target!(|input: Input| {
    let Ok(layout) = MemoryLayout::new(1 << 20) else { return };
    let Ok(mem) = layout.create_memory(&Default::default()) else { return };
    let bytes = &input.memory[..input.memory.len().min(0x8000)];
    let _ = mem.write_slice(bytes, GuestAddress(BASE));
    let size: u16 = 1 << (input.size_log % 9);
    let n = u64::from(size);
    let format = if input.packed { RingFormat::Packed } else { RingFormat::Split };
    let config = QueueConfig {
        max_size: 256,
        size,
        ready: true,
        desc: BASE,
        driver: BASE + 16 * n,
        device: (BASE + 16 * n + 6 + 2 * n + 3) & !3,
    };
    let Ok(mut queue) = Queue::new(0, &config, format, input.event_idx, &mem) else {
        return;
    };
    let mut last = None;
    for op in input.ops.iter().take(1000) {
        match op {
            Op::Pop => match queue.pop(&mem) {
                Ok(Some(chain)) => {
                    let d = chain.descriptors();
                    assert!(!d.is_empty() && d.len() <= usize::from(size));
                    let total: u64 = d.iter().map(|d| u64::from(d.len)).sum();
                    assert!(total <= u64::from(u32::MAX));
                    let first_w = d.iter().position(|d| d.writable).unwrap_or(d.len());
                    assert!(d[first_w..].iter().all(|d| d.writable));
                    last = Some(chain.token());
                }
                Ok(None) => {}
                // A broken ring: the device would stop here.
                Err(_) => return,
            },
            Op::Use(len) => {
                if let Some(t) = last.take() {
                    if queue.add_used(&mem, t, *len).is_err() {
                        return;
                    }
                }
            }
            Op::Undo => {
                if let Some(t) = last.take() {
                    queue.undo_pop(t);
                }
            }
            Op::Enable => {
                let _ = queue.enable_notification(&mem);
            }
            Op::Disable => {
                let _ = queue.disable_notification(&mem);
            }
            Op::Notify => {
                let _ = queue.needs_notification(&mem);
            }
        }
    }
});
