//! The packed virtqueue (virtio 1.2, 2.8), device side.
//!
//! One ring of 16-byte descriptors `{addr: le64, len: le32, id: le16,
//! flags: le16}` is shared by driver and device. The driver makes a
//! descriptor available by setting its AVAIL flag equal to its wrap counter
//! and USED to the opposite; the device marks a buffer used by writing one
//! descriptor, at its own next-used position, whose AVAIL and USED flags
//! both equal the device's used wrap counter. Each side flips its wrap
//! counter when its position passes the end of the ring.
//!
//! Two 4-byte event-suppression structures `{off_wrap: le16, flags: le16}`
//! steer notifications: the driver's (read here) says when the device
//! should interrupt, the device's (written here) when the driver should
//! notify.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::GuestMemoryMmap;

use super::{passes_event, ChainToken, DescChain, DescList, Descriptor, QueueError};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// Event-suppression flags values.
const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;

const DESC_SIZE: u64 = 16;

#[derive(Debug, Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

#[derive(Debug)]
pub(crate) struct PackedRing {
    size: u16,
    desc: GuestAddress,
    driver_event: GuestAddress,
    device_event: GuestAddress,
    event_idx: bool,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// `next_used` when the driver was last considered for an interrupt.
    signalled_used: u16,
}

fn mem_err(queue: u16) -> impl Fn(vm_memory::GuestMemoryError) -> QueueError {
    move |source| QueueError::Memory { queue, source }
}

impl PackedRing {
    pub(crate) fn new(
        size: u16,
        desc: GuestAddress,
        driver_event: GuestAddress,
        device_event: GuestAddress,
        event_idx: bool,
    ) -> Self {
        Self {
            size,
            desc,
            driver_event,
            device_event,
            event_idx,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            signalled_used: 0,
        }
    }

    pub(crate) fn next_avail(&self) -> (u16, bool) {
        (self.next_avail, self.avail_wrap)
    }

    /// Progress for a snapshot: next avail position and wrap counter, next
    /// used position and wrap counter, and `signalled_used`.
    pub(crate) fn progress(&self) -> (u16, bool, u16, bool, u16) {
        (
            self.next_avail,
            self.avail_wrap,
            self.next_used,
            self.used_wrap,
            self.signalled_used,
        )
    }

    /// Restores [`progress`](Self::progress); the caller checked every
    /// position is below the ring size.
    pub(crate) fn set_progress(&mut self, p: (u16, bool, u16, bool, u16)) {
        (
            self.next_avail,
            self.avail_wrap,
            self.next_used,
            self.used_wrap,
            self.signalled_used,
        ) = p;
    }

    fn slot_addr(&self, idx: u16) -> GuestAddress {
        // idx < size ≤ 2^15, so this stays far from overflow; the ring's
        // range was checked against guest memory at activation.
        GuestAddress(self.desc.0 + u64::from(idx) * DESC_SIZE)
    }

    fn is_available(flags: u16, wrap: bool) -> bool {
        let avail = flags & F_AVAIL != 0;
        let used = flags & F_USED != 0;
        avail == wrap && used != wrap
    }

    fn read_desc(
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
    ) -> Result<RawDesc, vm_memory::GuestMemoryError> {
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, addr)?;
        Ok(RawDesc {
            addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            id: u16::from_le_bytes([b[12], b[13]]),
            flags: u16::from_le_bytes([b[14], b[15]]),
        })
    }

    fn flags_at(&self, queue: u16, mem: &GuestMemoryMmap, idx: u16) -> Result<u16, QueueError> {
        let addr = GuestAddress(self.slot_addr(idx).0 + 14);
        mem.load::<u16>(addr, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(mem_err(queue))
    }

    pub(crate) fn pop(
        &mut self,
        queue: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<DescChain>, QueueError> {
        let head = self.next_avail;
        // The acquire load of the head's flags orders the reads of the
        // descriptors behind it (the driver writes them first, then the
        // head's flags with release semantics).
        let flags = self.flags_at(queue, mem, head)?;
        if !Self::is_available(flags, self.avail_wrap) {
            return Ok(None);
        }
        let broken = |reason| QueueError::BrokenChain {
            queue,
            head,
            reason,
        };
        let mut idx = head;
        let mut wrap = self.avail_wrap;
        let mut slots: u16 = 0;
        let mut descs = DescList::new();
        let mut total: u32 = 0;
        let mut seen_write = false;
        let mut push = |d: &RawDesc, descs: &mut DescList| -> Result<(), QueueError> {
            total = total
                .checked_add(d.len)
                .ok_or(QueueError::ChainTooBig { queue, head })?;
            let writable = d.flags & F_WRITE != 0;
            if seen_write && !writable {
                return Err(QueueError::ReadAfterWrite { queue, head });
            }
            seen_write |= writable;
            descs.push(Descriptor {
                addr: GuestAddress(d.addr),
                len: d.len,
                writable,
            });
            Ok(())
        };
        let id;
        loop {
            if slots >= self.size {
                return Err(QueueError::ChainTooLong {
                    queue,
                    head,
                    max: self.size,
                });
            }
            let d = Self::read_desc(mem, self.slot_addr(idx))
                .map_err(|_| broken("descriptor not readable"))?;
            if slots > 0 && !Self::is_available(d.flags, wrap) {
                return Err(broken(
                    "chain continues into a descriptor that is not available",
                ));
            }
            slots += 1;
            idx += 1;
            if idx == self.size {
                idx = 0;
                wrap = !wrap;
            }
            if d.flags & F_INDIRECT != 0 {
                // virtio 1.2, 2.8.19: an indirect descriptor is the only
                // descriptor of its buffer and has no NEXT.
                if slots != 1 || d.flags & F_NEXT != 0 {
                    return Err(broken("indirect descriptor inside a chain"));
                }
                if d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 {
                    return Err(broken("indirect table length not a multiple of 16"));
                }
                let entries = u64::from(d.len) / DESC_SIZE;
                if entries > u64::from(self.size) {
                    return Err(QueueError::ChainTooLong {
                        queue,
                        head,
                        max: self.size,
                    });
                }
                for i in 0..entries {
                    let addr = d
                        .addr
                        .checked_add(i * DESC_SIZE)
                        .ok_or(broken("indirect table wraps the address space"))?;
                    let e = Self::read_desc(mem, GuestAddress(addr))
                        .map_err(|_| broken("indirect descriptor not readable"))?;
                    if e.flags & F_INDIRECT != 0 {
                        return Err(broken("nested indirect table"));
                    }
                    push(&e, &mut descs)?;
                }
                id = d.id;
                break;
            }
            push(&d, &mut descs)?;
            if d.flags & F_NEXT == 0 {
                // The buffer ID is in the last descriptor (2.8.6).
                id = d.id;
                break;
            }
        }
        self.next_avail = idx;
        self.avail_wrap = wrap;
        Ok(Some(DescChain {
            token: ChainToken { id, slots },
            descs,
        }))
    }

    pub(crate) fn undo_pop(&mut self, token: ChainToken) {
        let slots = token.slots.min(self.size);
        if self.next_avail >= slots {
            self.next_avail -= slots;
        } else {
            self.next_avail = self.next_avail + self.size - slots;
            self.avail_wrap = !self.avail_wrap;
        }
    }

    pub(crate) fn add_used(
        &mut self,
        queue: u16,
        mem: &GuestMemoryMmap,
        token: ChainToken,
        len: u32,
    ) -> Result<(), QueueError> {
        if token.slots == 0 || token.slots > self.size {
            return Err(QueueError::BadToken {
                queue,
                id: token.id,
            });
        }
        let at = self.slot_addr(self.next_used);
        let err = mem_err(queue);
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 8))
            .map_err(&err)?;
        mem.write_obj(token.id.to_le(), GuestAddress(at.0 + 12))
            .map_err(&err)?;
        let flags = if self.used_wrap { F_AVAIL | F_USED } else { 0 };
        // Release: the driver sees id and len once it sees the flags.
        mem.store(flags.to_le(), GuestAddress(at.0 + 14), Ordering::Release)
            .map_err(&err)?;
        let next = u32::from(self.next_used) + u32::from(token.slots);
        if next >= u32::from(self.size) {
            // slots ≤ size, so one subtraction brings it back in range.
            self.next_used = (next - u32::from(self.size)) as u16;
            self.used_wrap = !self.used_wrap;
        } else {
            self.next_used = next as u16;
        }
        Ok(())
    }

    fn write_device_event(
        &self,
        queue: u16,
        mem: &GuestMemoryMmap,
        flags: u16,
        off_wrap: Option<u16>,
    ) -> Result<(), QueueError> {
        let err = mem_err(queue);
        if let Some(ow) = off_wrap {
            mem.store(ow.to_le(), self.device_event, Ordering::Relaxed)
                .map_err(&err)?;
        }
        mem.store(
            flags.to_le(),
            GuestAddress(self.device_event.0 + 2),
            Ordering::Release,
        )
        .map_err(&err)
    }

    pub(crate) fn enable_notification(
        &mut self,
        queue: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        if self.event_idx {
            let off_wrap = self.next_avail | (u16::from(self.avail_wrap) << 15);
            self.write_device_event(queue, mem, EVENT_DESC, Some(off_wrap))?;
        } else {
            self.write_device_event(queue, mem, EVENT_ENABLE, None)?;
        }
        // Make the flags visible before looking at the ring again, so that
        // a buffer the driver added meanwhile is seen here or notified.
        fence(Ordering::SeqCst);
        let flags = self.flags_at(queue, mem, self.next_avail)?;
        Ok(Self::is_available(flags, self.avail_wrap))
    }

    pub(crate) fn disable_notification(
        &mut self,
        queue: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<(), QueueError> {
        self.write_device_event(queue, mem, EVENT_DISABLE, None)
    }

    pub(crate) fn needs_notification(
        &mut self,
        queue: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        // The used descriptors must be visible before the driver's
        // suppression fields are read.
        fence(Ordering::SeqCst);
        let old = self.signalled_used;
        let new = self.next_used;
        self.signalled_used = new;
        let err = mem_err(queue);
        let flags = mem
            .load::<u16>(GuestAddress(self.driver_event.0 + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(&err)?;
        match flags & 3 {
            EVENT_DISABLE => Ok(false),
            EVENT_DESC if self.event_idx => {
                let off_wrap = mem
                    .load::<u16>(self.driver_event, Ordering::Acquire)
                    .map(u16::from_le)
                    .map_err(&err)?;
                let mut event = off_wrap & 0x7fff;
                if (off_wrap >> 15 != 0) != self.used_wrap {
                    // The event names a position in the previous lap.
                    event = event.wrapping_sub(self.size);
                }
                Ok(passes_event(event, new, old))
            }
            // ENABLE, DESC without EVENT_IDX, and the reserved value: notify
            // (a spurious interrupt is harmless; a missing one hangs).
            _ => Ok(true),
        }
    }
}
