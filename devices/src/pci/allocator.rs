//! First-fit allocation of address ranges.

use std::collections::BTreeMap;

use super::PciError;

/// A first-fit, alignment-aware allocator over `base..base + size`.
///
/// Allocation walks the gaps between the allocations in address order, so
/// its work is bounded by the number of live allocations (which only the
/// VMM creates). No arithmetic overflows, even for a range reaching the top
/// of the 64-bit address space.
#[derive(Debug, Clone)]
pub struct AddressAllocator {
    base: u64,
    size: u64,
    /// Live allocations: base -> size (both non-zero-sized and disjoint).
    allocations: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// An allocator over `base..base + size`. An empty range (size 0) is
    /// allowed and never allocates; a range past `u64::MAX` is refused.
    pub fn new(base: u64, size: u64) -> Result<Self, PciError> {
        if size > 0 && base.checked_add(size - 1).is_none() {
            return Err(PciError::InvalidWindow {
                window: "allocator",
                base,
                size,
                reason: "extends past the top of the address space",
            });
        }
        Ok(Self {
            base,
            size,
            allocations: BTreeMap::new(),
        })
    }

    /// The first address of the range.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The size of the range.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Allocates `size` bytes aligned to `align` (a power of two) at the
    /// lowest address that fits, or `None` if no gap is large enough or the
    /// arguments are invalid (zero size, alignment not a power of two).
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() || self.size == 0 {
            return None;
        }
        let last = self.base + (self.size - 1);
        // Try the gap that starts at `cursor` and ends just before `end`
        // (exclusive) or at `last` (inclusive, for the final gap).
        let fits = |cursor: u64, limit_inclusive: u64| -> Option<u64> {
            let start = align_up(cursor, align)?;
            let end = start.checked_add(size - 1)?;
            (start >= cursor && end <= limit_inclusive).then_some(start)
        };
        let mut cursor = Some(self.base);
        for (&base, &len) in &self.allocations {
            if let Some(c) = cursor {
                if base > c {
                    if let Some(found) = fits(c, base - 1) {
                        self.allocations.insert(found, size);
                        return Some(found);
                    }
                }
            }
            // `None` once an allocation reaches the top of the space.
            cursor = base.checked_add(len);
        }
        let found = fits(cursor?, last)?;
        self.allocations.insert(found, size);
        Some(found)
    }

    /// Frees the allocation starting at `base`; returns whether there was
    /// one.
    pub fn free(&mut self, base: u64) -> bool {
        self.allocations.remove(&base).is_some()
    }

    /// The live allocations as `(base, size)`, in address order.
    pub fn allocations(&self) -> Vec<(u64, u64)> {
        self.allocations.iter().map(|(&b, &s)| (b, s)).collect()
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two), or `None`
/// on overflow.
fn align_up(value: u64, align: u64) -> Option<u64> {
    let mask = align - 1;
    value.checked_add(mask).map(|v| v & !mask)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aligned_first_fit() {
        let mut a = AddressAllocator::new(0x1000, 0x10000).unwrap();
        assert_eq!(a.allocate(0x10, 0x10), Some(0x1000));
        // Natural alignment of a 0x4000-byte BAR skips to 0x4000.
        assert_eq!(a.allocate(0x4000, 0x4000), Some(0x4000));
        // The gap below 0x4000 is reused first.
        assert_eq!(a.allocate(0x100, 0x100), Some(0x1100));
        assert_eq!(a.allocate(0x1000, 1), Some(0x1200));
        assert_eq!(a.base(), 0x1000);
        assert_eq!(a.size(), 0x10000);
    }

    #[test]
    fn exhaustion_free_and_reuse() {
        let mut a = AddressAllocator::new(0, 0x100).unwrap();
        for i in 0..4 {
            assert_eq!(a.allocate(0x40, 0x40), Some(i * 0x40));
        }
        assert_eq!(a.allocate(1, 1), None);
        assert!(a.free(0x40));
        assert!(!a.free(0x40));
        assert!(!a.free(0x41));
        assert_eq!(a.allocate(0x80, 1), None);
        assert_eq!(a.allocate(0x40, 0x40), Some(0x40));
        assert_eq!(a.allocations().len(), 4);
    }

    #[test]
    fn invalid_arguments() {
        let mut a = AddressAllocator::new(0, 0x100).unwrap();
        assert_eq!(a.allocate(0, 1), None);
        assert_eq!(a.allocate(1, 0), None);
        assert_eq!(a.allocate(1, 3), None);
        assert_eq!(a.allocate(0x101, 1), None);
        let mut empty = AddressAllocator::new(0x1000, 0).unwrap();
        assert_eq!(empty.allocate(1, 1), None);
        assert!(AddressAllocator::new(u64::MAX, 2).is_err());
    }

    #[test]
    fn top_of_address_space_is_overflow_safe() {
        let mut a = AddressAllocator::new(u64::MAX - 0xFFF, 0x1000).unwrap();
        assert_eq!(a.allocate(0x800, 0x800), Some(u64::MAX - 0x7FF - 0x800));
        assert_eq!(a.allocate(0x800, 0x800), Some(u64::MAX - 0x7FF));
        assert_eq!(a.allocate(1, 1), None);
        assert_eq!(a.allocate(u64::MAX, 1 << 63), None);
        let mut whole = AddressAllocator::new(0, u64::MAX).unwrap();
        assert_eq!(whole.allocate(1 << 63, 1 << 63), Some(0));
        // The range ends at u64::MAX - 1, so the upper half does not fit.
        assert_eq!(whole.allocate(1 << 63, 1 << 63), None);
        assert_eq!(whole.allocate(1 << 62, 1 << 63), Some(1 << 63));
        assert_eq!(whole.allocate(1 << 62, 1 << 62), None);
        assert_eq!(whole.allocate(1 << 61, 1), Some(3 << 62));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64, u32),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u64..0x3000, 0u32..14).prop_map(|(s, a)| Op::Alloc(s, a)),
            1 => any::<usize>().prop_map(Op::Free),
        ]
    }

    proptest! {
        #[test]
        fn allocations_stay_in_range_and_never_overlap(
            base in prop_oneof![0u64..0x10_0000, (u64::MAX - 0xFFFF)..=u64::MAX - 0x7FFF],
            size in 0u64..0x8000,
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let mut a = AddressAllocator::new(base, size).unwrap();
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(s, align_log) => {
                        let align = 1u64 << align_log;
                        if let Some(at) = a.allocate(s, align) {
                            prop_assert_eq!(at % align, 0);
                            prop_assert!(at >= base);
                            prop_assert!(at - base + s <= size);
                            for &(b, l) in &live {
                                prop_assert!(at + s <= b || b + l <= at, "overlap");
                            }
                            live.push((at, s));
                        }
                    }
                    Op::Free(i) => {
                        if !live.is_empty() {
                            let (b, _) = live.remove(i % live.len());
                            prop_assert!(a.free(b));
                        }
                    }
                }
            }
            live.sort_unstable();
            prop_assert_eq!(a.allocations(), live);
        }
    }
}
