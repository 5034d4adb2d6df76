//! The device's reading side of a split virtqueue (virtio 1.2, 2.7): the
//! available ring and the descriptor chains it names.
//!
//! The ring state (positions, notification suppression, the used ring) is
//! kept here too, in [`SplitRing`], rather than in `virtio-queue`'s
//! `Queue`, so that a batch of completions is published with one store of
//! the used index and one interrupt decision (see [`SplitRing`]). The
//! chain walk differs from `virtio-queue`'s for two reasons measured on
//! the block benchmark:
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

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor as RawDesc;
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

/// The device side of one split ring: where the three parts are, how far
/// the device got, and the notification bookkeeping (virtio 1.2, 2.7.7
/// and 2.7.10).
///
/// Used elements are written one by one ([`SplitRing::add_used`]) but the
/// used index is published only by [`SplitRing::publish_used`]: a batch of
/// completions costs one release store of `used.idx` (one cache line
/// handed to the driver) instead of one per chain, and the interrupt
/// decision ([`SplitRing::needs_notification`]) looks at the used index
/// before and after everything published since the last decision.
#[derive(Debug)]
pub(crate) struct SplitRing {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    event_idx: bool,
    /// The next available-ring entry to take (free-running).
    next_avail: u16,
    /// The available index last read from the ring.
    seen_avail: u16,
    /// Used elements written (free-running).
    next_used: u16,
    /// The used index last stored into the ring.
    published_used: u16,
    /// The used index at the last interrupt decision (where the ring
    /// started, before the first).
    signalled_used: u16,
}

impl SplitRing {
    /// A ring at the start, of `size` entries (a power of two; the caller
    /// checked the three areas lie in guest memory).
    pub(crate) fn new(
        size: u16,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
        event_idx: bool,
    ) -> Self {
        Self {
            size,
            desc,
            avail,
            used,
            event_idx,
            next_avail: 0,
            seen_avail: 0,
            next_used: 0,
            published_used: 0,
            signalled_used: 0,
        }
    }

    /// `(next_avail, next_used)`: the device's free-running positions.
    pub(crate) fn progress(&self) -> (u16, u16) {
        (self.next_avail, self.next_used)
    }

    /// Continues from the given positions (a restored snapshot; nothing
    /// is in flight between the device and the used ring).
    pub(crate) fn set_progress(&mut self, next_avail: u16, next_used: u16) {
        self.next_avail = next_avail;
        self.seen_avail = next_avail;
        self.next_used = next_used;
        self.published_used = next_used;
        self.signalled_used = next_used;
    }

    fn mem_err(index: u16) -> impl Fn(vm_memory::GuestMemoryError) -> QueueError {
        move |source| QueueError::Memory {
            queue: index,
            source,
        }
    }

    /// The available index, read with `order`.
    fn avail_idx(
        &self,
        index: u16,
        mem: &GuestMemoryMmap,
        order: Ordering,
    ) -> Result<u16, QueueError> {
        // `Queue::new` checked that the available ring's 6 + 2 * size bytes
        // lie in guest memory, so the address sums here cannot overflow.
        mem.load(GuestAddress(self.avail.0 + 2), order)
            .map(u16::from_le)
            .map_err(Self::mem_err(index))
    }

    /// Takes the next available chain (queue index `index`, for errors),
    /// `Ok(None)` when there is none.
    pub(crate) fn pop(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<DescChain>, QueueError> {
        let size = self.size;
        let next = self.next_avail;
        if self.seen_avail == next {
            // The acquire load orders the reads of the ring entries and
            // descriptors behind it (the driver publishes the index last,
            // with release semantics, virtio 1.2, 2.7.13).
            let idx = self.avail_idx(index, mem, Ordering::Acquire)?;
            // More chains than the ring holds: the driver is broken (this
            // also bounds the chains taken per read of the index).
            if idx.wrapping_sub(next) > size {
                return Err(QueueError::Ring {
                    queue: index,
                    source: virtio_queue::Error::InvalidAvailRingIndex,
                });
            }
            self.seen_avail = idx;
            if idx == next {
                return Ok(None);
            }
        }
        // size > 0 (a queue is never made with size 0).
        let slot = self.avail.0 + 4 + 2 * u64::from(next % size.max(1));
        let head: u16 = mem
            .read_obj::<u16>(GuestAddress(slot))
            .map(u16::from_le)
            .map_err(Self::mem_err(index))?;
        self.next_avail = next.wrapping_add(1);
        let descs = walk(index, size, self.desc, head, mem)?;
        Ok(Some(DescChain {
            token: ChainToken { id: head, slots: 1 },
            descs,
        }))
    }

    /// Puts back the chain `pop` just returned.
    pub(crate) fn undo_pop(&mut self) {
        self.next_avail = self.next_avail.wrapping_sub(1);
    }

    /// Writes the used element for `token` with `len` bytes written, without
    /// publishing it (see [`SplitRing::publish_used`]).
    pub(crate) fn add_used(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
        token: ChainToken,
        len: u32,
    ) -> Result<(), QueueError> {
        if token.id >= self.size {
            return Err(QueueError::BadToken {
                queue: index,
                id: token.id,
            });
        }
        // struct virtq_used_elem { le32 id; le32 len; }, inside the used
        // ring `Queue::new` checked.
        let at = self.used.0 + 4 + 8 * u64::from(self.next_used % self.size.max(1));
        let elem = (u64::from(len) << 32 | u64::from(token.id)).to_le();
        write_u64(mem, GuestAddress(at), elem).map_err(Self::mem_err(index))?;
        self.next_used = self.next_used.wrapping_add(1);
        Ok(())
    }

    /// Makes every used element written so far visible to the driver: one
    /// release store of `used.idx` (virtio 1.2, 2.7.8.2: the elements are
    /// written before the index). Nothing happens if there is nothing new.
    pub(crate) fn publish_used(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<(), QueueError> {
        if self.published_used == self.next_used {
            return Ok(());
        }
        mem.store(
            self.next_used.to_le(),
            GuestAddress(self.used.0 + 2),
            Ordering::Release,
        )
        .map_err(Self::mem_err(index))?;
        self.published_used = self.next_used;
        Ok(())
    }

    fn set_notification(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
        enable: bool,
    ) -> Result<(), QueueError> {
        if self.event_idx {
            // With EVENT_IDX notifications are off once one came; enabling
            // them means publishing avail_event (at the end of the used
            // ring) as the entry the device waits for.
            if enable {
                let at = self.used.0 + 4 + 8 * u64::from(self.size);
                mem.store(self.next_avail.to_le(), GuestAddress(at), Ordering::Relaxed)
                    .map_err(Self::mem_err(index))?;
            }
            return Ok(());
        }
        let flags: u16 = if enable {
            0
        } else {
            VRING_USED_F_NO_NOTIFY as u16
        };
        mem.store(flags.to_le(), self.used, Ordering::Relaxed)
            .map_err(Self::mem_err(index))
    }

    /// Asks the driver to notify again; returns whether chains are
    /// available beyond what the device took (then it should go on).
    pub(crate) fn enable_notification(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        self.set_notification(index, mem, true)?;
        // The store above must be visible before the index is read again,
        // or a chain the driver adds meanwhile may go unnoticed by both
        // sides (virtio 1.2, 2.7.13).
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(index, mem, Ordering::Relaxed)? != self.next_avail)
    }

    /// Tells the driver notifications are not needed for now.
    pub(crate) fn disable_notification(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<(), QueueError> {
        self.set_notification(index, mem, false)
    }

    /// Publishes the used elements written so far, then decides whether
    /// the driver wants an interrupt for everything published since the
    /// last decision: with EVENT_IDX, whether the used index went past
    /// `used_event` on its way from the index at that decision to the one
    /// now (virtio 1.2, 2.7.10); without, unless the driver set
    /// `VRING_AVAIL_F_NO_INTERRUPT` (2.7.7.2).
    pub(crate) fn needs_notification(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        self.publish_used(index, mem)?;
        let new = self.published_used;
        // The used index store must be visible before the driver's
        // suppression fields are read (the driver does the reverse).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let old = std::mem::replace(&mut self.signalled_used, new);
            let at = self.avail.0 + 4 + 2 * u64::from(self.size);
            let event: u16 = mem
                .load(GuestAddress(at), Ordering::Relaxed)
                .map(u16::from_le)
                .map_err(Self::mem_err(index))?;
            return Ok(super::passes_event(event, new, old));
        }
        let flags: u16 = mem
            .load(self.avail, Ordering::Relaxed)
            .map(u16::from_le)
            .map_err(Self::mem_err(index))?;
        Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }
}

/// Writes 8 bytes at `addr`: one bounds-checked copy into the region
/// holding them, or through the memory map if they straddle two regions.
fn write_u64(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    v: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    match mem.get_slice(addr, 8) {
        Ok(s) => s.write_obj(v, 0).map_err(Into::into),
        Err(_) => mem.write_obj(v, addr),
    }
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

    fn config(size: u16) -> QueueConfig {
        QueueConfig {
            max_size: size,
            size,
            ready: true,
            desc: DESC,
            driver: AVAIL,
            device: USED,
        }
    }

    fn queue(mem: &GuestMemoryMmap, size: u16) -> Queue {
        Queue::new(0, &config(size), RingFormat::Split, false, mem).unwrap()
    }

    /// A queue with `VIRTIO_F_EVENT_IDX` whose avail and used positions
    /// both start at `start` (as after a restore).
    fn event_queue(mem: &GuestMemoryMmap, size: u16, start: u16) -> Queue {
        let state = crate::queue::QueueState {
            next_avail: start,
            avail_wrap: false,
            next_used: start,
            used_wrap: false,
            signalled_used: 0,
        };
        Queue::restore(0, &config(size), RingFormat::Split, true, mem, &state).unwrap()
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap()
    }

    fn used_elem(mem: &GuestMemoryMmap, slot: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(slot);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Publishes `n` one-descriptor chains, heads `0..n`, starting at
    /// available index `start`, and pops them.
    fn pop_n(mem: &GuestMemoryMmap, q: &mut Queue, start: u16, n: u16) -> Vec<ChainToken> {
        let size = q.size();
        for i in 0..n {
            write_desc(mem, DESC + 16 * u64::from(i), 0x4000, 16, WRITE, 0);
            let idx = start.wrapping_add(i);
            publish(mem, idx % size, i, idx.wrapping_add(1));
        }
        (0..n)
            .map(|_| q.pop(mem).unwrap().unwrap().token())
            .collect()
    }

    /// Sets `used_event` (the driver's "interrupt me when the used index
    /// passes this").
    fn set_used_event(mem: &GuestMemoryMmap, size: u16, event: u16) {
        mem.write_obj(event, GuestAddress(AVAIL + 4 + 2 * u64::from(size)))
            .unwrap();
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

    #[test]
    fn a_batch_is_written_first_and_published_with_one_index_store() {
        let mem = memory();
        let mut q = queue(&mem, 8);
        let tokens = pop_n(&mem, &mut q, 0, 3);
        for (n, t) in tokens.iter().enumerate() {
            q.push_used(&mem, *t, 100 + n as u32).unwrap();
            // Each element is in the ring, but the driver is not told.
            assert_eq!(
                used_elem(&mem, n as u16),
                (u32::from(t.id()), 100 + n as u32)
            );
            assert_eq!(used_idx(&mem), 0);
        }
        q.publish_used(&mem).unwrap();
        assert_eq!(used_idx(&mem), 3);
        // Nothing new: no store (a value the device did not write stays).
        mem.write_obj(0x5555u16, GuestAddress(USED + 2)).unwrap();
        q.publish_used(&mem).unwrap();
        assert_eq!(used_idx(&mem), 0x5555);
        // add_used publishes at once.
        mem.write_obj(3u16, GuestAddress(USED + 2)).unwrap();
        let t = pop_n(&mem, &mut q, 3, 1)[0];
        q.add_used(&mem, t, 7).unwrap();
        assert_eq!(used_idx(&mem), 4);
        assert_eq!(q.state().next_used, 4);
    }

    #[test]
    fn needs_notification_publishes_before_it_decides() {
        let mem = memory();
        let mut q = queue(&mem, 8);
        let tokens = pop_n(&mem, &mut q, 0, 2);
        for t in tokens {
            q.push_used(&mem, t, 1).unwrap();
        }
        assert!(q.needs_notification(&mem).unwrap());
        assert_eq!(used_idx(&mem), 2);
        // VRING_AVAIL_F_NO_INTERRUPT is honoured without EVENT_IDX.
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(AVAIL))
            .unwrap();
        let t = pop_n(&mem, &mut q, 2, 1)[0];
        q.push_used(&mem, t, 1).unwrap();
        assert!(!q.needs_notification(&mem).unwrap());
        assert_eq!(used_idx(&mem), 3);
    }

    #[test]
    fn event_idx_interrupts_exactly_when_the_batch_passes_used_event() {
        // The batch moves the used index from 1 to 4: an interrupt is due
        // iff used_event is in [1, 4) (virtio 1.2, 2.7.10).
        for (event, due) in [
            (0u16, false),
            (1, true),
            (2, true),
            (3, true),
            (4, false),
            (9, false),
        ] {
            let mem = memory();
            let mut q = event_queue(&mem, 8, 0);
            let first = pop_n(&mem, &mut q, 0, 1)[0];
            q.push_used(&mem, first, 1).unwrap();
            // used_event 0 (the ring's start) is passed by 0 -> 1.
            assert!(q.needs_notification(&mem).unwrap());
            let batch = pop_n(&mem, &mut q, 1, 3);
            for t in batch {
                q.push_used(&mem, t, 1).unwrap();
            }
            set_used_event(&mem, 8, event);
            assert_eq!(
                q.needs_notification(&mem).unwrap(),
                due,
                "used_event {event}"
            );
            assert_eq!(used_idx(&mem), 4);
            // Nothing used since: never an interrupt.
            assert!(!q.needs_notification(&mem).unwrap());
        }
    }

    #[test]
    fn event_idx_and_used_ring_wrap_around_the_16_bit_index() {
        // Start two entries before the index wraps; a batch of four takes
        // the used index from 0xfffe to 2.
        for (event, due) in [
            (0xfffd_u16, false),
            (0xfffe, false),
            (0xffff, true),
            (0, true),
            (1, true),
            (2, false),
        ] {
            let mem = memory();
            let mut q = event_queue(&mem, 8, 0xfffe);
            let tokens = pop_n(&mem, &mut q, 0xfffe, 4);
            // A first batch, 0xfffe to 0xffff: it passes used_event
            // 0xfffe. The second batch then covers [0xffff, 2).
            let (first, rest) = tokens.split_at(1);
            q.push_used(&mem, first[0], 1).unwrap();
            set_used_event(&mem, 8, 0xfffe);
            assert!(q.needs_notification(&mem).unwrap());
            assert_eq!(used_idx(&mem), 0xffff);
            for t in rest {
                q.push_used(&mem, *t, 1).unwrap();
            }
            set_used_event(&mem, 8, event);
            assert_eq!(
                q.needs_notification(&mem).unwrap(),
                due,
                "used_event {event:#x}"
            );
            assert_eq!(used_idx(&mem), 2);
            // Ring slots follow the index modulo the size: 0xfffe % 8 = 6,
            // then 7, 0, 1.
            for (k, slot) in [6u16, 7, 0, 1].into_iter().enumerate() {
                assert_eq!(used_elem(&mem, slot).0, k as u32, "slot {slot}");
            }
        }
    }

    #[test]
    fn bad_tokens_are_refused_and_enable_notification_sees_new_chains() {
        let mem = memory();
        let mut q = event_queue(&mem, 8, 0);
        let bad = ChainToken { id: 8, slots: 1 };
        assert!(matches!(
            q.push_used(&mem, bad, 0),
            Err(QueueError::BadToken { id: 8, .. })
        ));
        let _ = pop_n(&mem, &mut q, 0, 2);
        // With EVENT_IDX, enabling publishes avail_event = next_avail.
        assert!(!q.enable_notification(&mem).unwrap());
        let avail_event: u16 = mem.read_obj(GuestAddress(USED + 4 + 8 * 8)).unwrap();
        assert_eq!(avail_event, 2);
        publish(&mem, 2, 0, 3);
        assert!(q.enable_notification(&mem).unwrap());
    }
}
