//! The device's reading side of a split virtqueue (virtio 1.2, 2.7): the
//! available ring and the descriptor chains it names.
//!
//! `virtio-queue` keeps the ring state (positions, notification
//! suppression, the used ring); this module replaces only its chain
//! iterator on the hot path, for two reasons measured on the block
//! benchmark:
//!
//! - `virtio-queue` re-reads the available index (a cache line the driver
//!   keeps writing) for every chain popped. Here the index is read once
//!   and the chains it covers are taken without touching it again; it is
//!   re-read only when they are used up.
//! - `virtio-queue` looks every descriptor up through the whole guest
//!   memory map. Here the descriptor table (and an indirect table) is
//!   resolved to one slice of guest memory once per chain, and each
//!   descriptor is a bounds-checked read from it. A table that spans two
//!   memory regions falls back to reading each descriptor through the map.
//!
//! The checks are those of the specification and of `virtio-queue`, made
//! explicit: at most `size` chains per available index read, every
//! descriptor index inside its table, at most one level of indirection,
//! indirect tables a non-zero multiple of 16 bytes and no longer than the
//! queue, no more descriptors per chain than the queue size (so a loop is
//! caught), a total length that fits in `u32`, and no device-readable
//! descriptor after a device-writable one. Any violation is an error, and
//! the device asks for a reset.

use std::sync::atomic::Ordering;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as RawDesc;
use virtio_queue::QueueT;
use vm_memory::bitmap::MS;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};
use vmkit_memory::GuestMemoryMmap;

use super::{ChainToken, DescChain, DescList, Descriptor, QueueError};

const DESC_SIZE: u64 = 16;

/// A descriptor table: one slice of guest memory when it lies in one
/// region, otherwise its guest address (each read then goes through the
/// memory map).
enum Table<'a> {
    Slice(VolatileSlice<'a, MS<'a, GuestMemoryMmap>>),
    Addr(GuestAddress),
}

impl<'a> Table<'a> {
    fn new(mem: &'a GuestMemoryMmap, addr: GuestAddress, entries: u64) -> Self {
        // entries ≤ 2^16, so the length fits in usize on every target.
        match mem.get_slice(addr, (entries * DESC_SIZE) as usize) {
            Ok(s) => Self::Slice(s),
            Err(_) => Self::Addr(addr),
        }
    }

    /// Descriptor `i` (the caller checked `i` against the table length).
    fn read(&self, mem: &GuestMemoryMmap, i: u16) -> Option<RawDesc> {
        let off = u64::from(i) * DESC_SIZE;
        match self {
            // off < the slice length, which is a usize.
            Self::Slice(s) => s.read_obj::<RawDesc>(off as usize).ok(),
            Self::Addr(a) => {
                let at = a.0.checked_add(off)?;
                mem.read_obj::<RawDesc>(GuestAddress(at)).ok()
            }
        }
    }
}

/// Takes the next available chain of `queue` (queue index `index`, for
/// errors), `Ok(None)` when there is none. `seen_avail` is the last
/// available index read from the ring (kept by the caller; set it to the
/// queue's `next_avail` whenever that is changed from outside).
pub(crate) fn pop(
    index: u16,
    queue: &mut virtio_queue::Queue,
    avail: GuestAddress,
    seen_avail: &mut u16,
    mem: &GuestMemoryMmap,
) -> Result<Option<DescChain>, QueueError> {
    // `Queue::new` checked that the available ring's 6 + 2 * size bytes lie
    // in guest memory, so the address sums below cannot overflow.
    let size = queue.size();
    let next = queue.next_avail();
    if *seen_avail == next {
        // The acquire load orders the reads of the ring entries and
        // descriptors behind it (the driver publishes the index last, with
        // release semantics, virtio 1.2, 2.7.13).
        let idx: u16 = mem
            .load(GuestAddress(avail.0 + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|source| QueueError::Memory {
                queue: index,
                source,
            })?;
        // More chains than the ring holds: the driver is broken (this also
        // bounds the chains taken per read of the index).
        if idx.wrapping_sub(next) > size {
            return Err(QueueError::Ring {
                queue: index,
                source: virtio_queue::Error::InvalidAvailRingIndex,
            });
        }
        *seen_avail = idx;
        if idx == next {
            return Ok(None);
        }
    }
    // size > 0 (a queue is never made with size 0).
    let slot = avail.0 + 4 + 2 * u64::from(next % size.max(1));
    let head: u16 = mem
        .read_obj::<u16>(GuestAddress(slot))
        .map(u16::from_le)
        .map_err(|source| QueueError::Memory {
            queue: index,
            source,
        })?;
    queue.set_next_avail(next.wrapping_add(1));
    let descs = walk(index, size, GuestAddress(queue.desc_table()), head, mem)?;
    Ok(Some(DescChain {
        token: ChainToken { id: head, slots: 1 },
        descs,
    }))
}

/// Collects the descriptors of the chain that starts at `head`.
fn walk(
    queue: u16,
    size: u16,
    desc_table: GuestAddress,
    head: u16,
    mem: &GuestMemoryMmap,
) -> Result<DescList, QueueError> {
    let broken = |reason| QueueError::BrokenChain {
        queue,
        head,
        reason,
    };
    let mut table = Table::new(mem, desc_table, u64::from(size));
    let mut table_len = size;
    let mut indirect = false;
    let mut idx = head;
    let mut descs = DescList::new();
    let mut total: u32 = 0;
    let mut seen_write = false;
    // Each turn either adds a descriptor (at most `size` of them, checked
    // below) or enters the one indirect table allowed: bounded.
    loop {
        if idx >= table_len {
            return Err(broken("descriptor index outside its table"));
        }
        let d = table
            .read(mem, idx)
            .ok_or(broken("descriptor not readable"))?;
        let flags = d.flags();
        if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
            if indirect {
                return Err(broken("nested indirect table"));
            }
            let len = u64::from(d.len());
            if len == 0 || len % DESC_SIZE != 0 {
                return Err(broken("indirect table length not a multiple of 16"));
            }
            let entries = len / DESC_SIZE;
            if entries > u64::from(size) {
                return Err(QueueError::ChainTooLong {
                    queue,
                    head,
                    max: size,
                });
            }
            table = Table::new(mem, d.addr(), entries);
            // entries ≤ size, a u16.
            table_len = entries as u16;
            indirect = true;
            idx = 0;
            continue;
        }
        if descs.len() >= usize::from(size) {
            return Err(QueueError::ChainTooLong {
                queue,
                head,
                max: size,
            });
        }
        total = total
            .checked_add(d.len())
            .ok_or(QueueError::ChainTooBig { queue, head })?;
        let writable = flags & VRING_DESC_F_WRITE as u16 != 0;
        if seen_write && !writable {
            return Err(QueueError::ReadAfterWrite { queue, head });
        }
        seen_write |= writable;
        descs.push(Descriptor {
            addr: d.addr(),
            len: d.len(),
            writable,
        });
        if flags & VRING_DESC_F_NEXT as u16 == 0 {
            return Ok(descs);
        }
        idx = d.next();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::queue::{Queue, QueueConfig, RingFormat};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// Two adjacent regions meeting at 0x10000, so a table can straddle
    /// them.
    fn memory() -> GuestMemoryMmap {
        let region = |base: u64| {
            let mmap = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(0x10000, None)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .build()
                .unwrap();
            vm_memory::GuestRegionMmap::new(mmap, GuestAddress(base)).unwrap()
        };
        GuestMemoryMmap::from_regions(vec![region(0), region(0x10000)]).unwrap()
    }

    fn queue(mem: &GuestMemoryMmap, size: u16) -> Queue {
        let config = QueueConfig {
            max_size: size,
            size,
            ready: true,
            desc: DESC,
            driver: AVAIL,
            device: USED,
        };
        Queue::new(0, &config, RingFormat::Split, false, mem).unwrap()
    }

    fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    fn publish(mem: &GuestMemoryMmap, slot: u16, head: u16, idx: u16) {
        mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        mem.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    }

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    #[test]
    fn takes_every_published_chain_once_and_reads_the_index_lazily() {
        let mem = memory();
        let mut q = queue(&mem, 8);
        // Chain 0 -> 1 -> 2: header, data, status.
        write_desc(&mem, DESC, 0x4000, 16, NEXT, 1);
        write_desc(&mem, DESC + 16, 0x5000, 4096, NEXT | WRITE, 2);
        write_desc(&mem, DESC + 32, 0x6000, 1, WRITE, 0);
        write_desc(&mem, DESC + 48, 0x7000, 8, 0, 0);
        publish(&mem, 0, 0, 1);
        publish(&mem, 1, 3, 2);
        let c = q.pop(&mem).unwrap().unwrap();
        assert_eq!(c.token().id(), 0);
        assert_eq!(c.readable().len(), 1);
        assert_eq!(c.writable().len(), 2);
        assert_eq!(c.writable()[0].len, 4096);
        // The index said two chains; garbage written to it now is not
        // read until both are taken.
        mem.write_obj(0xffffu16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(q.pop(&mem).unwrap().unwrap().token().id(), 3);
        // Then it is, and 0xffff - 2 chains do not fit in a ring of 8.
        assert!(matches!(q.pop(&mem), Err(QueueError::Ring { .. })));
    }

    #[test]
    fn empty_ring_gives_none_and_undo_pop_gives_the_chain_again() {
        let mem = memory();
        let mut q = queue(&mem, 4);
        assert!(q.pop(&mem).unwrap().is_none());
        write_desc(&mem, DESC, 0x4000, 16, 0, 0);
        publish(&mem, 0, 0, 1);
        let c = q.pop(&mem).unwrap().unwrap();
        q.undo_pop(c.token());
        assert_eq!(q.pop(&mem).unwrap().unwrap(), c);
        assert!(q.pop(&mem).unwrap().is_none());
    }

    #[test]
    fn hostile_chains_are_errors() {
        type Setup = fn(&GuestMemoryMmap);
        let cases: [(&str, Setup); 7] = [
            ("loop", |m| {
                write_desc(m, DESC, 0x4000, 1, NEXT, 1);
                write_desc(m, DESC + 16, 0x4000, 1, NEXT, 0);
            }),
            ("index out of range", |m| {
                write_desc(m, DESC, 0x4000, 1, NEXT, 9)
            }),
            ("read after write", |m| {
                write_desc(m, DESC, 0x4000, 1, NEXT | WRITE, 1);
                write_desc(m, DESC + 16, 0x4000, 1, 0, 0);
            }),
            ("over 4 GiB", |m| {
                write_desc(m, DESC, 0x4000, u32::MAX, NEXT, 1);
                write_desc(m, DESC + 16, 0x4000, 1, 0, 0);
            }),
            ("nested indirect", |m| {
                write_desc(m, DESC, 0x8000, 32, INDIRECT, 0);
                write_desc(m, 0x8000, 0x9000, 16, INDIRECT, 0);
            }),
            ("indirect length", |m| {
                write_desc(m, DESC, 0x8000, 24, INDIRECT, 0)
            }),
            ("indirect longer than the queue", |m| {
                write_desc(m, DESC, 0x8000, 16 * 9, INDIRECT, 0)
            }),
        ];
        for (name, setup) in cases {
            let mem = memory();
            let mut q = queue(&mem, 8);
            setup(&mem);
            publish(&mem, 0, 0, 1);
            assert!(q.pop(&mem).is_err(), "{name}");
        }
    }

    #[test]
    fn indirect_table_across_two_regions_is_read_through_the_map() {
        let mem = memory();
        let mut q = queue(&mem, 8);
        // Three entries, the second straddling 0x10000.
        let table = 0x10000 - 24;
        write_desc(&mem, DESC, table, 48, INDIRECT, 0);
        write_desc(&mem, table, 0x4000, 16, NEXT, 1);
        write_desc(&mem, table + 16, 0x5000, 512, NEXT | WRITE, 2);
        write_desc(&mem, table + 32, 0x6000, 1, WRITE, 0);
        publish(&mem, 0, 0, 1);
        let c = q.pop(&mem).unwrap().unwrap();
        let lens: Vec<u32> = c.descriptors().iter().map(|d| d.len).collect();
        assert_eq!(lens, [16, 512, 1]);
        assert_eq!(c.descriptors()[1].addr, GuestAddress(0x5000));
    }
}
