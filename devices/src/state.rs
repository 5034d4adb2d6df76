//! Device state for snapshots: a small, explicit binary encoding.
//!
//! Every device that can be snapshotted has a plain state struct (for
//! example [`SerialState`](crate::serial::SerialState)) with `to_bytes` and
//! `from_bytes`. The bytes are what a VMM stores in a snapshot's device
//! section. Each encoding is
//!
//! | bytes | field |
//! |---|---|
//! | 4 | tag: four ASCII characters naming the state type |
//! | 1 | version of that type's layout |
//! | rest | the fields, in the order each type documents |
//!
//! Fields are little-endian integers of fixed width (signed ones in two's
//! complement); `bool` is one byte
//! that must be 0 or 1; a variable-length field (a byte string or a list)
//! is a `u32` count followed by its elements. Nested states (a transport
//! holding a queue) are written inline without their own tag.
//!
//! Decoding is strict: a wrong tag, an unknown version, a count larger than
//! the bytes that follow, trailing bytes, a `bool` other than 0 or 1, and a
//! value the device could never have produced are all refused with a
//! [`StateError`]; decoding never panics and never allocates more than the
//! input's size.
//!
//! Restoring is done into a freshly constructed device of the same
//! configuration (same FIFO capacity, same vector count, same capability
//! layout); a state that does not fit that device is refused with
//! [`StateError::Mismatch`] and leaves the device unchanged.

/// Why a state could not be decoded or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The input ends before a field.
    #[error("{what} state: truncated at byte {offset}: {needed} more bytes needed")]
    Truncated {
        /// The state type.
        what: &'static str,
        /// Where the missing field starts.
        offset: usize,
        /// How many bytes are missing.
        needed: usize,
    },
    /// Bytes are left after the last field.
    #[error("{what} state: {extra} unexpected trailing bytes")]
    Trailing {
        /// The state type.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// The input does not start with the type's tag.
    #[error("{what} state: wrong tag {found:?} (expected {expected:?})")]
    Tag {
        /// The state type.
        what: &'static str,
        /// The tag found.
        found: [u8; 4],
        /// The tag of this type.
        expected: [u8; 4],
    },
    /// A layout version this build does not read.
    #[error("{what} state: unsupported version {found} (this build reads version {supported})")]
    Version {
        /// The state type.
        what: &'static str,
        /// The version found.
        found: u8,
        /// The version this build reads and writes.
        supported: u8,
    },
    /// A field holds a value the device cannot have produced.
    #[error("{what} state: invalid {field}: {reason}")]
    Invalid {
        /// The state type.
        what: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The state is valid but does not fit the device it is restored into
    /// (another configuration, or a device that is not freshly created).
    #[error("{what} state does not fit this device: {reason}")]
    Mismatch {
        /// The state type.
        what: &'static str,
        /// What differs.
        reason: String,
    },
    /// The device cannot save its state now (for example a virtio device
    /// whose implementation cannot hand back its queues).
    #[error("{what}: cannot save state: {reason}")]
    Unsupported {
        /// The state type.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Builds an encoding: tag and version first, then fields in order.
#[derive(Debug)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// Starts an encoding with `tag` and `version`.
    pub fn new(tag: [u8; 4], version: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&tag);
        buf.push(version);
        Self { buf }
    }

    /// Starts a nested encoding (no tag or version).
    pub fn nested() -> Self {
        Self { buf: Vec::new() }
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a `bool` as one byte, 0 or 1.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `i128` (two's complement, 16 bytes).
    pub fn i128(&mut self, v: i128) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a count (a `u32`; lengths above `u32::MAX` are saturated,
    /// which no device state reaches).
    pub fn count(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Appends a byte string: its length as a `u32`, then the bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.count(v.len());
        self.buf.extend_from_slice(v);
        self
    }

    /// Appends raw bytes without a length (for nested encodings).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// The encoding.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads an encoding field by field; every read is checked.
#[derive(Debug)]
pub struct StateReader<'a> {
    what: &'static str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> StateReader<'a> {
    /// Checks the tag and version of `data` and returns a reader at the
    /// first field.
    pub fn new(
        what: &'static str,
        data: &'a [u8],
        tag: [u8; 4],
        version: u8,
    ) -> Result<Self, StateError> {
        let mut r = Self::nested(what, data);
        let found: [u8; 4] = r.array()?;
        if found != tag {
            return Err(StateError::Tag {
                what,
                found,
                expected: tag,
            });
        }
        let v = r.u8()?;
        if v != version {
            return Err(StateError::Version {
                what,
                found: v,
                supported: version,
            });
        }
        Ok(r)
    }

    /// A reader of untagged fields (a nested state).
    pub fn nested(what: &'static str, data: &'a [u8]) -> Self {
        Self { what, data, pos: 0 }
    }

    /// The state type name used in errors.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(StateError::Truncated {
                what: self.what,
                offset: self.pos,
                needed: n.saturating_sub(self.remaining()),
            });
        };
        let s = self.data.get(self.pos..end).ok_or(StateError::Truncated {
            what: self.what,
            offset: self.pos,
            needed: n,
        })?;
        self.pos = end;
        Ok(s)
    }

    /// Reads a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }

    /// Reads a `bool` (a byte that must be 0 or 1).
    pub fn bool(&mut self, field: &'static str) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(field, format!("boolean byte {v}"))),
        }
    }

    /// Reads a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `i128`.
    pub fn i128(&mut self) -> Result<i128, StateError> {
        Ok(i128::from_le_bytes(self.array()?))
    }

    /// Reads a count of elements of at least `min_element_size` bytes
    /// each, refusing counts above `max` or larger than the rest of the
    /// input could hold.
    pub fn count(
        &mut self,
        field: &'static str,
        min_element_size: usize,
        max: usize,
    ) -> Result<usize, StateError> {
        let n = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        if n > max {
            return Err(self.invalid(field, format!("count {n} above the limit {max}")));
        }
        if n.saturating_mul(min_element_size) > self.remaining() {
            return Err(StateError::Truncated {
                what: self.what,
                offset: self.pos,
                needed: n
                    .saturating_mul(min_element_size)
                    .saturating_sub(self.remaining()),
            });
        }
        Ok(n)
    }

    /// Reads a byte string of at most `max` bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, StateError> {
        let n = self.count(field, 1, max)?;
        Ok(self.take(n)?.to_vec())
    }

    /// An [`StateError::Invalid`] for `field` of this state type.
    pub fn invalid(&self, field: &'static str, reason: String) -> StateError {
        StateError::Invalid {
            what: self.what,
            field,
            reason,
        }
    }

    /// Ends decoding: refuses trailing bytes.
    pub fn finish(self) -> Result<(), StateError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(StateError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let mut w = StateWriter::new(*b"TEST", 3);
        w.u8(1)
            .bool(true)
            .u16(0x1234)
            .u32(7)
            .u64(u64::MAX)
            .i128(-5)
            .bytes(b"abc");
        let bytes = w.finish();
        let mut r = StateReader::new("test", &bytes, *b"TEST", 3).unwrap();
        assert_eq!(r.u8().unwrap(), 1);
        assert!(r.bool("b").unwrap());
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert_eq!(r.i128().unwrap(), -5);
        assert_eq!(r.bytes("s", 3).unwrap(), b"abc");
        r.finish().unwrap();

        assert!(matches!(
            StateReader::new("test", &bytes, *b"TEST", 4),
            Err(StateError::Version { found: 3, .. })
        ));
        assert!(matches!(
            StateReader::new("test", &bytes, *b"NOPE", 3),
            Err(StateError::Tag { .. })
        ));
        assert!(matches!(
            StateReader::new("test", &bytes[..3], *b"TEST", 3),
            Err(StateError::Truncated { .. })
        ));
        // A count larger than the input is refused before allocating.
        let mut r = StateReader::nested("test", &[0xFF, 0xFF, 0xFF, 0x7F, 1]);
        assert!(matches!(
            r.bytes("s", usize::MAX),
            Err(StateError::Truncated { .. })
        ));
        let mut r = StateReader::nested("test", &[2]);
        assert!(matches!(r.bool("b"), Err(StateError::Invalid { .. })));
        let r = StateReader::nested("test", &[2]);
        assert!(matches!(
            r.finish(),
            Err(StateError::Trailing { extra: 1, .. })
        ));
    }
}
