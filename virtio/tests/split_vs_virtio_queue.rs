//! Differential property test: vmkit's split ring against rust-vmm's
//! `virtio-queue`, which serves as the oracle.
//!
//! Each case builds two identical guest memories and one queue on each: a
//! vmkit [`Queue`] (split format) on the first, a `virtio_queue::Queue` on
//! the second, both of the same size (1 to 256), with or without
//! `VIRTIO_F_EVENT_IDX`, and starting at the same free-running index
//! (often just below the 16-bit wrap, as after a snapshot restore). A
//! driver model then applies the same actions to both memories (descriptor
//! chains of 1 to 4 descriptors, direct or indirect, readable then
//! writable; available-index bumps; `used_event`;
//! `VRING_AVAIL_F_NO_INTERRUPT`), and the same device operations run on both
//! queues. What is compared:
//!
//! - **pop**: the head and every descriptor (address, length, write flag,
//!   in order) of both sides, and both against the chain the model wrote;
//!   the `NEXT` flag of what `virtio-queue` yields is set exactly on all but
//!   the last descriptor. `undo_pop` against `go_to_previous_position`.
//! - **used ring**: after every operation the flags, the elements and
//!   `avail_event` are byte-equal, and vmkit's `used.idx` equals
//!   `virtio-queue`'s minus the chains vmkit pushed but has not published
//!   yet (so equal right after every publish, `add_used` and
//!   `needs_notification`). Both sides' positions (`next_avail`,
//!   `next_used`) agree after every operation. At the end, after a final
//!   publish, the two memories are byte-equal as a whole.
//! - **needs_notification**, called on both sides at the same points: vmkit
//!   publishes first, so both have the same used index; both take as the
//!   batch's start the used index at their previous `needs_notification`
//!   call (vmkit's `signalled_used`, `virtio-queue`'s `next_used -
//!   num_added`), or the start of the ring. With EVENT_IDX the booleans
//!   must be equal at every call. Without EVENT_IDX they legitimately
//!   differ: `virtio-queue` always answers `true`, vmkit answers `true`
//!   exactly when the driver has not set `VRING_AVAIL_F_NO_INTERRUPT`;
//!   both facts are asserted.
//! - **enable/disable notification**: the returned "more available" (also
//!   against the model) and the used ring bytes (flags or `avail_event`).
//!
//! Documented differences, asserted rather than avoided, each ending the
//! case because vmkit's device would then ask for a reset: a broken chain
//! (a loop, a `next` outside the table, a readable descriptor after a
//! writable one, an indirect table of bad length, nested or longer than the
//! queue) is an error from vmkit, while `virtio-queue` returns a chain
//! whose descriptors are checked against what its truncating walk yields;
//! an available index more than the queue size ahead is an error from
//! vmkit while `virtio-queue`'s `pop_descriptor_chain` returns `None` (and
//! its `iter` the error). Descriptor tables are placed so that some cross a
//! memory-region boundary, which takes vmkit's slower lookup path.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::GuestMemoryMmap;
use vmkit_virtio::queue::{ChainToken, Queue, QueueConfig, QueueError, QueueState, RingFormat};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
const NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Three adjacent 64 KiB regions.
const REGION: u64 = 0x10000;
const MEM_END: u64 = 3 * REGION;
/// Descriptor table: in the first region, or crossing into the second
/// (for a queue of more than 128 entries).
const DESC_LOW: u64 = 0x1000;
const DESC_CROSSING: u64 = REGION - 0x800;
const AVAIL: u64 = 0x6000;
const USED: u64 = 0x7000;
/// Per-head indirect tables (64 bytes each) start at this address plus a
/// random multiple of 16, so that some of them cross 2 * REGION.
const INDIRECT_AREA: u64 = 2 * REGION - 0x4000;
/// The one indirect table longer than the queue a case may write.
const LONG_TABLE: u64 = 2 * REGION + 0x8000;

/// A descriptor as both sides report it: address, length, device-writable.
type Desc = (u64, u32, bool);

fn memory() -> GuestMemoryMmap {
    let region = |base: u64| {
        let mmap = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(REGION as usize, None)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .build()
            .unwrap();
        vm_memory::GuestRegionMmap::new(mmap, GuestAddress(base)).unwrap()
    };
    GuestMemoryMmap::from_regions(vec![region(0), region(REGION), region(2 * REGION)]).unwrap()
}

fn write_desc(mem: &GuestMemoryMmap, at: u64, (addr, len, flags, next): (u64, u32, u16, u16)) {
    mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
}

/// A chain the driver may write that vmkit refuses.
#[derive(Debug, Clone)]
enum Broken {
    /// A descriptor whose `next` is itself.
    SelfLoop,
    /// `next` at least the queue size (the offset above it).
    NextOutOfRange(u16),
    /// A writable descriptor followed by a readable one.
    ReadAfterWrite,
    /// An indirect descriptor whose length is 0 or not a multiple of 16.
    IndirectBadLen(u32),
    /// An indirect table with one entry more than the queue size.
    IndirectTooLong,
    /// An indirect table whose entry is itself indirect.
    NestedIndirect,
}

#[derive(Debug, Clone)]
struct Shape {
    /// Buffer address and length of each descriptor (never dereferenced).
    bufs: Vec<(u64, u32)>,
    /// Picks how many of the descriptors are readable (the rest writable).
    readable: u8,
    indirect: bool,
    /// Set NEXT on the indirect descriptor too (both sides ignore it).
    indirect_next: bool,
    /// Picks descriptor indices from the free list.
    pick: u32,
    /// The `next` field of the last descriptor (ignored without NEXT).
    noise: u16,
    broken: Option<Broken>,
}

#[derive(Debug, Clone)]
enum UsedEvent {
    /// Relative to the device's used index.
    Near(i16),
    Any(u16),
}

#[derive(Debug, Clone)]
enum Op {
    Add(Shape),
    Bump,
    SetUsedEvent(UsedEvent),
    SetNoInterrupt(bool),
    Pop,
    Undo,
    /// Return an in-flight chain; `publish` uses vmkit's `add_used`
    /// instead of `push_used`.
    Used {
        pick: usize,
        len: u32,
        publish: bool,
    },
    Publish,
    NeedsNotification,
    Enable,
    Disable,
}

fn broken() -> impl Strategy<Value = Broken> {
    prop_oneof![
        Just(Broken::SelfLoop),
        any::<u16>().prop_map(Broken::NextOutOfRange),
        Just(Broken::ReadAfterWrite),
        prop_oneof![Just(0u32), 1u32..16, (1u32..16).prop_map(|r| 16 + r)]
            .prop_map(Broken::IndirectBadLen),
        Just(Broken::IndirectTooLong),
        Just(Broken::NestedIndirect),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop::collection::vec((any::<u64>(), 0u32..0x10_0000), 1..=4),
        any::<u8>(),
        prop::bool::weighted(0.3),
        any::<bool>(),
        any::<u32>(),
        any::<u16>(),
        prop::option::weighted(0.03, broken()),
    )
        .prop_map(
            |(bufs, readable, indirect, indirect_next, pick, noise, broken)| Shape {
                bufs,
                readable,
                indirect,
                indirect_next,
                pick,
                noise,
                broken,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => shape().prop_map(Op::Add),
        3 => Just(Op::Bump),
        3 => prop_oneof![
            4 => (-2i16..=4).prop_map(UsedEvent::Near),
            1 => any::<u16>().prop_map(UsedEvent::Any),
        ]
        .prop_map(Op::SetUsedEvent),
        1 => any::<bool>().prop_map(Op::SetNoInterrupt),
        6 => Just(Op::Pop),
        1 => Just(Op::Undo),
        6 => (any::<usize>(), any::<u32>(), any::<bool>())
            .prop_map(|(pick, len, publish)| Op::Used { pick, len, publish }),
        2 => Just(Op::Publish),
        3 => Just(Op::NeedsNotification),
        1 => Just(Op::Enable),
        1 => Just(Op::Disable),
    ]
}

/// What popping a chain the model wrote must give.
#[derive(Debug)]
enum Expect {
    Valid(Vec<Desc>),
    /// vmkit refuses it (checked by `refused`); `virtio-queue` yields these.
    Broken {
        kind: Broken,
        yields: Vec<Desc>,
    },
}

fn refused(kind: &Broken, err: &QueueError) -> bool {
    match kind {
        Broken::SelfLoop | Broken::IndirectTooLong => {
            matches!(err, QueueError::ChainTooLong { .. })
        }
        Broken::ReadAfterWrite => matches!(err, QueueError::ReadAfterWrite { .. }),
        Broken::NextOutOfRange(_) | Broken::IndirectBadLen(_) | Broken::NestedIndirect => {
            matches!(err, QueueError::BrokenChain { .. })
        }
    }
}

/// Whether the case goes on after an operation.
#[derive(PartialEq)]
enum Flow {
    Continue,
    Stop,
}

struct Rig {
    /// `mems[0]` belongs to vmkit's queue, `mems[1]` to `virtio-queue`'s.
    mems: [GuestMemoryMmap; 2],
    size: u16,
    event_idx: bool,
    desc: u64,
    indirect_base: u64,
    // Driver model.
    free: Vec<u16>,
    owned: HashMap<u16, Vec<u16>>,
    expect: HashMap<u16, Expect>,
    avail_next: u16,
    unpublished: VecDeque<u16>,
    ready: VecDeque<u16>,
    broken_added: bool,
    no_interrupt: bool,
    // The two devices.
    vm: Queue,
    vq: virtio_queue::Queue,
    in_flight: Vec<(u16, ChainToken)>,
    last_op_popped: bool,
    /// Chains vmkit pushed but has not published.
    pending: u16,
}

impl Rig {
    fn new(size: u16, event_idx: bool, start: u16, crossing: bool, indirect_off: u64) -> Self {
        let mems = [memory(), memory()];
        let desc = if crossing { DESC_CROSSING } else { DESC_LOW };
        for m in &mems {
            m.write_obj(start.to_le(), GuestAddress(AVAIL + 2)).unwrap();
            m.write_obj(start.to_le(), GuestAddress(USED + 2)).unwrap();
        }
        let config = QueueConfig {
            max_size: size,
            size,
            ready: true,
            desc,
            driver: AVAIL,
            device: USED,
        };
        let state = QueueState {
            next_avail: start,
            avail_wrap: false,
            next_used: start,
            used_wrap: false,
            signalled_used: 0,
        };
        let vm =
            Queue::restore(0, &config, RingFormat::Split, event_idx, &mems[0], &state).unwrap();
        let mut vq = virtio_queue::Queue::new(size).unwrap();
        vq.set_size(size);
        vq.try_set_desc_table_address(GuestAddress(desc)).unwrap();
        vq.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        vq.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        vq.set_event_idx(event_idx);
        vq.set_next_avail(start);
        vq.set_next_used(start);
        vq.set_ready(true);
        assert!(vq.is_valid(&mems[1]));
        Self {
            mems,
            size,
            event_idx,
            desc,
            indirect_base: INDIRECT_AREA + 16 * indirect_off,
            free: (0..size).collect(),
            owned: HashMap::new(),
            expect: HashMap::new(),
            avail_next: start,
            unpublished: VecDeque::new(),
            ready: VecDeque::new(),
            broken_added: false,
            no_interrupt: false,
            vm,
            vq,
            in_flight: Vec::new(),
            last_op_popped: false,
            pending: 0,
        }
    }

    /// Applies a driver write to both memories.
    fn both(&self, f: impl Fn(&GuestMemoryMmap)) {
        self.mems.iter().for_each(f);
    }

    fn take(&mut self, pick: u32) -> Option<u16> {
        if self.free.is_empty() {
            return None;
        }
        let i = pick as usize % self.free.len();
        Some(self.free.swap_remove(i))
    }

    fn desc_at(&self, i: u16) -> u64 {
        self.desc + 16 * u64::from(i)
    }

    /// Writes one chain of shape `s` and puts its head in the available
    /// ring (not yet published). Does nothing if the table is full.
    fn add(&mut self, s: &Shape) {
        let broken = if self.broken_added {
            None
        } else {
            s.broken.clone()
        };
        let (a0, l0) = s.bufs[0];
        let (head, owned, expect) = match broken {
            None => {
                let n = if s.indirect {
                    s.bufs.len().min(usize::from(self.size))
                } else {
                    s.bufs.len().min(self.free.len())
                };
                if n == 0 || self.free.is_empty() {
                    return;
                }
                let readable = usize::from(s.readable) % (n + 1);
                let descs: Vec<Desc> = s.bufs[..n]
                    .iter()
                    .enumerate()
                    .map(|(i, &(a, l))| (a, l, i >= readable))
                    .collect();
                let flags = |i: usize| {
                    let mut f = if descs[i].2 { WRITE } else { 0 };
                    if i + 1 < n {
                        f |= NEXT;
                    }
                    f
                };
                if s.indirect {
                    let h = self.take(s.pick).unwrap();
                    let table = self.indirect_base + 64 * u64::from(h);
                    for (i, &(addr, len, _)) in descs.iter().enumerate() {
                        let next = if i + 1 < n { i as u16 + 1 } else { s.noise };
                        let d = (addr, len, flags(i), next);
                        self.both(|m| write_desc(m, table + 16 * i as u64, d));
                    }
                    let f = INDIRECT | if s.indirect_next { NEXT } else { 0 };
                    let d = (table, 16 * n as u32, f, s.noise);
                    self.both(|m| write_desc(m, self.desc_at(h), d));
                    (h, vec![h], Expect::Valid(descs))
                } else {
                    let idx: Vec<u16> = (0..n)
                        .map(|i| self.take(s.pick.wrapping_add(7919 * i as u32)).unwrap())
                        .collect();
                    for (i, (&(addr, len, _), &at)) in descs.iter().zip(&idx).enumerate() {
                        let next = idx.get(i + 1).copied().unwrap_or(s.noise);
                        let d = (addr, len, flags(i), next);
                        self.both(|m| write_desc(m, self.desc_at(at), d));
                    }
                    (idx[0], idx, Expect::Valid(descs))
                }
            }
            Some(kind) => {
                if self.free.len() < 2 && matches!(kind, Broken::ReadAfterWrite) {
                    return;
                }
                let Some(h) = self.take(s.pick) else {
                    return;
                };
                let mut owned = vec![h];
                let yields = match kind {
                    Broken::SelfLoop => {
                        self.both(|m| write_desc(m, self.desc_at(h), (a0, l0, NEXT, h)));
                        // virtio-queue stops after `size` descriptors.
                        vec![(a0, l0, false); usize::from(self.size)]
                    }
                    Broken::NextOutOfRange(r) => {
                        let span = 0x1_0000 - u32::from(self.size);
                        let next = (u32::from(self.size) + u32::from(r) % span) as u16;
                        self.both(|m| write_desc(m, self.desc_at(h), (a0, l0, NEXT, next)));
                        vec![(a0, l0, false)]
                    }
                    Broken::ReadAfterWrite => {
                        let b = self.take(s.pick.wrapping_add(1)).unwrap();
                        owned.push(b);
                        self.both(|m| {
                            write_desc(m, self.desc_at(h), (a0, l0, WRITE | NEXT, b));
                            write_desc(m, self.desc_at(b), (a0, l0, 0, s.noise));
                        });
                        vec![(a0, l0, true), (a0, l0, false)]
                    }
                    Broken::IndirectBadLen(len) => {
                        let table = self.indirect_base + 64 * u64::from(h);
                        self.both(|m| write_desc(m, self.desc_at(h), (table, len, INDIRECT, 0)));
                        Vec::new()
                    }
                    Broken::IndirectTooLong => {
                        let n = self.size + 1;
                        for i in 0..n {
                            let f = if i + 1 < n { NEXT } else { 0 };
                            let d = (a0, l0, f, i + 1);
                            self.both(|m| write_desc(m, LONG_TABLE + 16 * u64::from(i), d));
                        }
                        let d = (LONG_TABLE, 16 * u32::from(n), INDIRECT, 0);
                        self.both(|m| write_desc(m, self.desc_at(h), d));
                        vec![(a0, l0, false); usize::from(n)]
                    }
                    Broken::NestedIndirect => {
                        let table = self.indirect_base + 64 * u64::from(h);
                        self.both(|m| {
                            write_desc(m, table, (LONG_TABLE, 16, INDIRECT, 0));
                            write_desc(m, self.desc_at(h), (table, 16, INDIRECT, 0));
                        });
                        Vec::new()
                    }
                };
                self.broken_added = true;
                (h, owned, Expect::Broken { kind, yields })
            }
        };
        self.owned.insert(head, owned);
        self.expect.insert(head, expect);
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_next % self.size);
        self.both(|m| m.write_obj(head.to_le(), GuestAddress(slot)).unwrap());
        self.avail_next = self.avail_next.wrapping_add(1);
        self.unpublished.push_back(head);
    }

    fn pop(&mut self) -> Flow {
        let vm = self.vm.pop(&self.mems[0]);
        let vq = self.vq.pop_descriptor_chain(&self.mems[1]);
        let Some(head) = self.ready.pop_front() else {
            assert!(
                matches!(vm, Ok(None)),
                "vmkit popped {vm:?} from an empty ring"
            );
            assert!(vq.is_none(), "virtio-queue popped from an empty ring");
            return Flow::Continue;
        };
        let vq = vq.expect("virtio-queue found no chain");
        assert_eq!(vq.head_index(), head);
        let raw: Vec<_> = vq.collect();
        let vq_descs: Vec<Desc> = raw
            .iter()
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        match self.expect.get(&head).unwrap() {
            Expect::Valid(descs) => {
                let c = vm.unwrap().expect("vmkit found no chain");
                assert_eq!(c.token().id(), head);
                let vm_descs: Vec<Desc> = c
                    .descriptors()
                    .iter()
                    .map(|d| (d.addr.0, d.len, d.writable))
                    .collect();
                assert_eq!(&vm_descs, descs, "vmkit chain at head {head}");
                assert_eq!(&vq_descs, descs, "virtio-queue chain at head {head}");
                for (i, d) in raw.iter().enumerate() {
                    assert_eq!(d.has_next(), i + 1 < raw.len());
                    assert!(!d.refers_to_indirect_table());
                }
                self.in_flight.push((head, c.token()));
                self.last_op_popped = true;
                Flow::Continue
            }
            Expect::Broken { kind, yields } => {
                let err = vm.expect_err("vmkit accepted a broken chain");
                assert!(refused(kind, &err), "{kind:?} refused as {err}");
                assert_eq!(&vq_descs, yields, "virtio-queue's walk of {kind:?}");
                Flow::Stop
            }
        }
    }

    fn used(&mut self, pick: usize, len: u32, publish: bool) {
        if self.in_flight.is_empty() {
            return;
        }
        let (head, token) = self.in_flight.remove(pick % self.in_flight.len());
        if publish {
            self.vm.add_used(&self.mems[0], token, len).unwrap();
            self.pending = 0;
        } else {
            self.vm.push_used(&self.mems[0], token, len).unwrap();
            self.pending += 1;
        }
        self.vq.add_used(&self.mems[1], head, len).unwrap();
        self.free.extend(self.owned.remove(&head).unwrap());
        self.expect.remove(&head);
    }

    fn run(&mut self, op: &Op) -> Flow {
        let popped = std::mem::replace(&mut self.last_op_popped, false);
        match op {
            Op::Add(s) => self.add(s),
            Op::Bump => {
                let idx = self.avail_next;
                self.both(|m| m.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).unwrap());
                self.ready.extend(self.unpublished.drain(..));
            }
            Op::SetUsedEvent(e) => {
                let v = match *e {
                    UsedEvent::Near(d) => self.vq.next_used().wrapping_add(d as u16),
                    UsedEvent::Any(v) => v,
                };
                let at = AVAIL + 4 + 2 * u64::from(self.size);
                self.both(|m| m.write_obj(v.to_le(), GuestAddress(at)).unwrap());
            }
            Op::SetNoInterrupt(on) => {
                self.no_interrupt = *on;
                let f = if *on { NO_INTERRUPT } else { 0 };
                self.both(|m| m.write_obj(f.to_le(), GuestAddress(AVAIL)).unwrap());
            }
            Op::Pop => return self.pop(),
            Op::Undo => {
                if popped {
                    let (head, token) = self.in_flight.pop().unwrap();
                    self.vm.undo_pop(token);
                    self.vq.go_to_previous_position();
                    self.ready.push_front(head);
                }
            }
            Op::Used { pick, len, publish } => self.used(*pick, *len, *publish),
            Op::Publish => {
                self.vm.publish_used(&self.mems[0]).unwrap();
                self.pending = 0;
            }
            Op::NeedsNotification => {
                let vm = self.vm.needs_notification(&self.mems[0]).unwrap();
                self.pending = 0;
                let vq = self.vq.needs_notification(&self.mems[1]).unwrap();
                if self.event_idx {
                    assert_eq!(vm, vq, "needs_notification with EVENT_IDX");
                } else {
                    // virtio-queue does not implement NO_INTERRUPT.
                    assert!(vq);
                    assert_eq!(vm, !self.no_interrupt, "needs_notification, NO_INTERRUPT");
                }
            }
            Op::Enable => {
                let vm = self.vm.enable_notification(&self.mems[0]).unwrap();
                let vq = self.vq.enable_notification(&self.mems[1]).unwrap();
                assert_eq!(vm, vq, "enable_notification: more available");
                assert_eq!(vm, !self.ready.is_empty());
            }
            Op::Disable => {
                self.vm.disable_notification(&self.mems[0]).unwrap();
                self.vq.disable_notification(&self.mems[1]).unwrap();
            }
        }
        Flow::Continue
    }

    fn used_ring(&self, m: usize) -> Vec<u8> {
        let mut buf = vec![0u8; 6 + 8 * usize::from(self.size)];
        self.mems[m]
            .read_slice(&mut buf, GuestAddress(USED))
            .unwrap();
        buf
    }

    /// The invariants that hold after every operation.
    fn check(&self) {
        let (vm, vq) = (self.used_ring(0), self.used_ring(1));
        let idx = |b: &[u8]| u16::from_le_bytes([b[2], b[3]]);
        assert_eq!(vm[..2], vq[..2], "used flags");
        assert_eq!(vm[4..], vq[4..], "used elements and avail_event");
        assert_eq!(
            idx(&vm),
            idx(&vq).wrapping_sub(self.pending),
            "used.idx with {} unpublished",
            self.pending
        );
        let state = self.vm.state();
        assert_eq!(state.next_avail, self.vq.next_avail(), "next_avail");
        assert_eq!(state.next_used, self.vq.next_used(), "next_used");
    }

    /// Pops what is left, then makes the available index claim more chains
    /// than the ring holds (`ahead` picks how many more).
    fn bogus_avail(&mut self, ahead: u16) {
        for _ in 0..=self.size {
            if self.ready.is_empty() {
                break;
            }
            let flow = self.pop();
            self.check();
            if flow == Flow::Stop {
                // A broken chain came first and was compared.
                return;
            }
        }
        let size = u32::from(self.size);
        let ahead = size + 1 + u32::from(ahead) % (0xffff - size);
        let idx = self.vq.next_avail().wrapping_add(ahead as u16);
        self.both(|m| m.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).unwrap());
        let vm = self.vm.pop(&self.mems[0]);
        assert!(matches!(vm, Err(QueueError::Ring { .. })), "{vm:?}");
        assert!(matches!(
            self.vq.iter(&self.mems[1]),
            Err(virtio_queue::Error::InvalidAvailRingIndex)
        ));
        assert!(self.vq.pop_descriptor_chain(&self.mems[1]).is_none());
        self.check();
    }

    /// After a last publish, the two memories hold the same bytes.
    fn finish(&mut self) {
        self.vm.publish_used(&self.mems[0]).unwrap();
        let read = |m: &GuestMemoryMmap| {
            let mut buf = vec![0u8; MEM_END as usize];
            m.read_slice(&mut buf, GuestAddress(0)).unwrap();
            buf
        };
        assert!(
            read(&self.mems[0]) == read(&self.mems[1]),
            "memories differ"
        );
    }
}

fn start() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(0u16),
        any::<u16>(),
        (1u16..=8).prop_map(|d| 0u16.wrapping_sub(d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn split_ring_matches_virtio_queue(
        size_log in 0u32..=8,
        event_idx in any::<bool>(),
        start in start(),
        crossing in any::<bool>(),
        indirect_off in 0u64..1024,
        ops in prop::collection::vec(op(), 1..160),
        bogus in prop::option::weighted(0.2, any::<u16>()),
    ) {
        let mut rig = Rig::new(1 << size_log, event_idx, start, crossing, indirect_off);
        let mut stopped = false;
        for op in &ops {
            let flow = rig.run(op);
            rig.check();
            if flow == Flow::Stop {
                stopped = true;
                break;
            }
        }
        if let (false, Some(ahead)) = (stopped, bogus) {
            rig.bogus_avail(ahead);
        }
        rig.finish();
    }
}
