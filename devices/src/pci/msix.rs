//! MSI-X: the capability, the vector table and the pending-bit array (PBA).
//!
//! [`Msix`] sits between a device's guest-visible MSI-X structures and an
//! [`MsiVectors`] sink. A device
//!
//! 1. creates an [`Msix`] with a [`MsixLayout`] that places the table and
//!    the PBA in its BARs, and adds its capability with
//!    [`Msix::add_capability`];
//! 2. after each guest configuration write, calls
//!    [`Msix::config_written`] (or [`Msix::set_control`]) so that the
//!    Enable and Function Mask bits take effect;
//! 3. forwards guest accesses to the table and the PBA to
//!    [`Msix::table_read`], [`Msix::table_write`] and [`Msix::pba_read`];
//! 4. signals interrupts with [`Msix::notify`].
//!
//! A vector is *deliverable* when MSI-X is enabled, the function mask is
//! clear and the vector's own mask bit is clear. The sink holds a message
//! exactly for the deliverable vectors: [`MsiVectors::set_message`] is
//! called when a vector becomes deliverable, stops being deliverable or has
//! its address or data rewritten while deliverable, and never when nothing
//! changed. Notifying a vector that is not deliverable sets its pending bit;
//! the message is sent when the vector becomes deliverable.
//!
//! Reference: PCI Express Base Specification, 7.7.2 (MSI-X capability and
//! table structures).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::config::{ConfigSpace, NUM_BARS};
use super::PciError;
use crate::interrupt::{MsiMessage, MsiVectors};
use crate::state::{StateError, StateReader, StateWriter};

/// Capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// The most vectors an MSI-X function can have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Size of one table entry in bytes.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message Control: MSI-X Enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message Control: Function Mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control: the per-vector mask bit.
const VECTOR_MASKED: u32 = 1;

/// Where the table and the PBA live: a BAR index (BIR) and an 8-byte
/// aligned offset within it, each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table within that BAR.
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA within that BAR.
    pub pba_offset: u32,
}

/// One table entry as the guest programs it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Message Address (low dword), Message Upper Address, Message Data,
    /// Vector Control.
    dwords: [u32; 4],
}

impl Entry {
    const MASKED: Self = Self {
        dwords: [0, 0, 0, VECTOR_MASKED],
    };

    fn message(&self) -> MsiMessage {
        MsiMessage::new(
            u64::from(self.dwords[1]) << 32 | u64::from(self.dwords[0]),
            self.dwords[2],
        )
    }

    fn masked(&self) -> bool {
        self.dwords[3] & VECTOR_MASKED != 0
    }

    fn write(&mut self, dword: usize, value: u32) {
        let value = match dword {
            // The address is dword aligned: bits 1:0 read as zero.
            0 => value & !0x3,
            // Only the mask bit of Vector Control is implemented.
            3 => value & VECTOR_MASKED,
            _ => value,
        };
        if let Some(d) = self.dwords.get_mut(dword) {
            *d = value;
        }
    }
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    /// What the sink was last told for each vector.
    programmed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_mask: bool,
}

impl State {
    fn pending(&self, vector: usize) -> bool {
        self.pending
            .get(vector / 64)
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }

    fn set_pending(&mut self, vector: usize, pending: bool) {
        if let Some(w) = self.pending.get_mut(vector / 64) {
            let bit = 1 << (vector % 64);
            if pending {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }

    fn deliverable(&self, vector: usize) -> bool {
        self.enabled && !self.function_mask && self.entries.get(vector).is_some_and(|e| !e.masked())
    }
}

/// The MSI-X structures of one function in front of an [`MsiVectors`]
/// sink. See the [module documentation](self).
pub struct Msix {
    vectors: u16,
    layout: MsixLayout,
    sink: Arc<dyn MsiVectors>,
    state: Mutex<State>,
}

impl fmt::Debug for Msix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("Msix")
            .field("vectors", &self.vectors)
            .field("layout", &self.layout)
            .field("enabled", &state.enabled)
            .field("function_mask", &state.function_mask)
            .finish_non_exhaustive()
    }
}

/// Converts a vector index below [`MSIX_MAX_VECTORS`] to `u16`.
fn index_u16(vector: usize) -> u16 {
    u16::try_from(vector).unwrap_or(u16::MAX)
}

impl Msix {
    /// MSI-X with `vectors` vectors (`1..=2048`, at most `sink.count()`),
    /// all masked, MSI-X disabled.
    ///
    /// Refuses a BAR index above 5, an offset not 8-byte aligned, and a
    /// table and PBA that overlap in the same BAR.
    pub fn new(
        sink: Arc<dyn MsiVectors>,
        vectors: u16,
        layout: MsixLayout,
    ) -> Result<Self, PciError> {
        let bad_count = |reason| PciError::MsixVectorCount {
            count: vectors,
            reason,
        };
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(bad_count("MSI-X functions have 1 to 2048 vectors"));
        }
        if vectors > sink.count() {
            return Err(bad_count("the interrupt sink has fewer vectors"));
        }
        let msix = Self {
            vectors,
            layout,
            sink,
            state: Mutex::new(State {
                entries: vec![Entry::MASKED; usize::from(vectors)],
                pending: vec![0; usize::from(vectors).div_ceil(64)],
                programmed: vec![None; usize::from(vectors)],
                enabled: false,
                function_mask: false,
            }),
        };
        for (structure, bar, offset) in [
            ("table", layout.table_bar, layout.table_offset),
            ("PBA", layout.pba_bar, layout.pba_offset),
        ] {
            let bad = |reason| PciError::MsixLayout {
                structure,
                bar,
                offset,
                reason,
            };
            if bar >= NUM_BARS {
                return Err(bad("the BAR indicator must be 0 to 5"));
            }
            if offset % 8 != 0 {
                return Err(bad("the offset must be 8-byte aligned"));
            }
        }
        let table =
            u64::from(layout.table_offset)..u64::from(layout.table_offset) + msix.table_size();
        let pba = u64::from(layout.pba_offset)..u64::from(layout.pba_offset) + msix.pba_size();
        if layout.table_bar == layout.pba_bar && table.start < pba.end && pba.start < table.end {
            return Err(PciError::MsixLayout {
                structure: "PBA",
                bar: layout.pba_bar,
                offset: layout.pba_offset,
                reason: "it overlaps the table",
            });
        }
        Ok(msix)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent between statements.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The number of vectors.
    pub fn vectors(&self) -> u16 {
        self.vectors
    }

    /// Where the table and the PBA live.
    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// Size of the table in bytes (16 per vector).
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// Size of the PBA in bytes (a whole number of qwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// The Message Control word: table size (vectors - 1) in bits 10:0,
    /// Function Mask in bit 14, Enable in bit 15.
    pub fn control(&self) -> u16 {
        let state = self.state();
        let mut control = self.vectors - 1;
        if state.enabled {
            control |= MSIX_CONTROL_ENABLE;
        }
        if state.function_mask {
            control |= MSIX_CONTROL_FUNCTION_MASK;
        }
        control
    }

    /// The capability body (Message Control, Table Offset/BIR, PBA
    /// Offset/BIR: the bytes after the ID and next pointer) and its
    /// writable mask (only Enable and Function Mask), for
    /// [`ConfigSpace::add_capability`] with [`MSIX_CAPABILITY_ID`].
    pub fn capability_body(&self) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[..2].copy_from_slice(&self.control().to_le_bytes());
        let table = self.layout.table_offset | u32::from(self.layout.table_bar);
        let pba = self.layout.pba_offset | u32::from(self.layout.pba_bar);
        body[2..6].copy_from_slice(&table.to_le_bytes());
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        let mut writable = [0u8; 10];
        writable[..2]
            .copy_from_slice(&(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_le_bytes());
        (body, writable)
    }

    /// Adds the MSI-X capability to `config` and returns its offset.
    pub fn add_capability(&self, config: &mut ConfigSpace) -> Result<u16, PciError> {
        let (body, writable) = self.capability_body();
        config.add_capability(MSIX_CAPABILITY_ID, &body, &writable)
    }

    /// Applies the Message Control word of the capability at `cap_offset`
    /// in `config` (call after every guest configuration write).
    pub fn config_written(&self, config: &ConfigSpace, cap_offset: u16) {
        self.set_control(config.read_u16(cap_offset.saturating_add(2)));
    }

    /// Applies a new Message Control word: its Enable and Function Mask
    /// bits (the rest is ignored). Vectors that become deliverable are
    /// programmed and their pending messages sent; vectors that stop being
    /// deliverable are withdrawn.
    pub fn set_control(&self, control: u16) {
        let mut state = self.state();
        let enabled = control & MSIX_CONTROL_ENABLE != 0;
        let function_mask = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_mask) == (state.enabled, state.function_mask) {
            return;
        }
        state.enabled = enabled;
        state.function_mask = function_mask;
        for vector in 0..usize::from(self.vectors) {
            self.update(&mut state, vector);
        }
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.state().enabled
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.state().function_mask
    }

    /// Whether `vector`'s own mask bit is set (`None` if out of range).
    pub fn vector_masked(&self, vector: u16) -> Option<bool> {
        self.state()
            .entries
            .get(usize::from(vector))
            .map(Entry::masked)
    }

    /// Whether `vector`'s pending bit is set (`false` if out of range).
    pub fn pending(&self, vector: u16) -> bool {
        self.state().pending(usize::from(vector))
    }

    /// Brings the sink in line with `vector`'s state, and delivers its
    /// pending message if it is now deliverable.
    fn update(&self, state: &mut State, vector: usize) {
        let deliverable = state.deliverable(vector);
        let wanted = if deliverable {
            state.entries.get(vector).map(Entry::message)
        } else {
            None
        };
        let index = index_u16(vector);
        if let Some(programmed) = state.programmed.get_mut(vector) {
            if *programmed != wanted {
                *programmed = wanted;
                if let Err(err) = self.sink.set_message(index, wanted) {
                    log::warn!("MSI-X: programming vector {index} failed: {err}");
                }
            }
        }
        if deliverable && state.pending(vector) {
            state.set_pending(vector, false);
            if let Err(err) = self.sink.trigger(index) {
                log::warn!("MSI-X: delivering pending vector {index} failed: {err}");
            }
        }
    }

    /// Signals `vector`: sends its message if it is deliverable, otherwise
    /// sets its pending bit.
    pub fn notify(&self, vector: u16) -> Result<(), PciError> {
        if vector >= self.vectors {
            return Err(PciError::VectorOutOfRange {
                vector,
                count: self.vectors,
            });
        }
        let mut state = self.state();
        let v = usize::from(vector);
        if state.deliverable(v) {
            self.sink
                .trigger(vector)
                .map_err(|source| PciError::Interrupt { vector, source })
        } else {
            state.set_pending(v, true);
            Ok(())
        }
    }

    /// The entry and first dword an access at `offset` within the table
    /// reaches, if it is an aligned 4- or 8-byte access inside the table.
    fn table_target(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let len = u64::try_from(len).ok()?;
        if !matches!(len, 4 | 8) || offset % len != 0 || offset >= self.table_size() {
            return None;
        }
        // offset < 2048 * 16, so these fit.
        let entry = usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?;
        let dword = usize::try_from((offset % MSIX_ENTRY_SIZE) / 4).ok()?;
        Some((entry, dword))
    }

    /// Guest read of the table at `offset` (relative to the table start).
    /// Anything but an aligned 4- or 8-byte read inside the table reads
    /// all-ones.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let Some((entry, dword)) = self.table_target(offset, data.len()) else {
            data.fill(0xFF);
            return;
        };
        let state = self.state();
        let Some(entry) = state.entries.get(entry) else {
            data.fill(0xFF);
            return;
        };
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            let value = entry.dwords.get(dword + i).copied().unwrap_or(u32::MAX);
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Guest write of the table at `offset` (relative to the table start).
    /// Anything but an aligned 4- or 8-byte write inside the table is
    /// dropped.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let Some((vector, dword)) = self.table_target(offset, data.len()) else {
            log::debug!(
                "MSI-X: dropped {}-byte table write at {offset:#x}",
                data.len()
            );
            return;
        };
        let mut state = self.state();
        let Some(entry) = state.entries.get_mut(vector) else {
            return;
        };
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            entry.write(dword + i, u32::from_le_bytes(b));
        }
        self.update(&mut state, vector);
    }

    /// Guest read of the PBA at `offset` (relative to the PBA start).
    /// Anything but an aligned 4- or 8-byte read inside the PBA reads
    /// all-ones. The PBA is read-only: there is no write method, so the
    /// device should drop PBA writes.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let valid = u64::try_from(data.len())
            .is_ok_and(|len| matches!(len, 4 | 8) && offset % len == 0)
            && offset < self.pba_size();
        let word = usize::try_from(offset / 8).ok();
        let state = self.state();
        match word.and_then(|w| state.pending.get(w)) {
            Some(&bits) if valid => {
                let bytes = bits.to_le_bytes();
                // Offset is 4- or 8-aligned: start at byte 0 or 4.
                let start = usize::from(offset % 8 != 0) * 4;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(start + i).copied().unwrap_or(0xFF);
                }
            }
            _ => data.fill(0xFF),
        }
    }
}

/// The MSI-X state of a function, for snapshots.
///
/// Encoding (tag `MSIX`, version 1; see [`crate::state`]): `enabled`,
/// `function_mask` (bools), `entries` (count, then per vector four u32:
/// address low, address high, data, vector control), `pending` (count,
/// then u64 words of the PBA, vector 0 in bit 0 of the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixState {
    /// MSI-X Enable.
    pub enabled: bool,
    /// Function Mask.
    pub function_mask: bool,
    /// The table: per vector, address low, address high, data, vector
    /// control.
    pub entries: Vec<[u32; 4]>,
    /// The pending-bit array, 64 vectors per word.
    pub pending: Vec<u64>,
}

const MSIX_TAG: [u8; 4] = *b"MSIX";
const MSIX_VERSION: u8 = 1;

impl MsixState {
    /// Encodes the state.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(MSIX_TAG, MSIX_VERSION);
        self.write(&mut w);
        w.finish()
    }

    /// Writes the fields into a nested encoding.
    pub fn write(&self, w: &mut StateWriter) {
        w.bool(self.enabled).bool(self.function_mask);
        w.count(self.entries.len());
        for e in &self.entries {
            for d in e {
                w.u32(*d);
            }
        }
        w.count(self.pending.len());
        for p in &self.pending {
            w.u64(*p);
        }
    }

    /// Decodes and checks a state.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("MSI-X", bytes, MSIX_TAG, MSIX_VERSION)?;
        let state = Self::read(&mut r)?;
        r.finish()?;
        Ok(state)
    }

    /// Reads and checks the fields of a nested encoding: 1 to 2048
    /// vectors, a PBA of exactly the vectors' words with no bit beyond the
    /// last vector, address bits 1:0 and reserved vector-control bits
    /// clear.
    pub fn read(r: &mut StateReader<'_>) -> Result<Self, StateError> {
        let enabled = r.bool("enabled")?;
        let function_mask = r.bool("function_mask")?;
        let n = r.count("entries", 16, usize::from(MSIX_MAX_VECTORS))?;
        if n == 0 {
            return Err(r.invalid("entries", "no vectors".into()));
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let e = [r.u32()?, r.u32()?, r.u32()?, r.u32()?];
            if e[0] & 0x3 != 0 {
                return Err(r.invalid("entries", format!("vector {i}: address not dword aligned")));
            }
            if e[3] & !VECTOR_MASKED != 0 {
                return Err(r.invalid(
                    "entries",
                    format!("vector {i}: reserved vector control bits {:#x}", e[3]),
                ));
            }
            entries.push(e);
        }
        let words = r.count("pending", 8, usize::from(MSIX_MAX_VECTORS) / 64)?;
        if words != n.div_ceil(64) {
            return Err(r.invalid("pending", format!("{words} PBA words for {n} vectors")));
        }
        let mut pending = Vec::with_capacity(words);
        for _ in 0..words {
            pending.push(r.u64()?);
        }
        let tail = n % 64;
        if let (true, Some(last)) = (tail != 0, pending.last()) {
            if last >> tail != 0 {
                return Err(r.invalid("pending", "pending bit beyond the last vector".into()));
            }
        }
        Ok(Self {
            enabled,
            function_mask,
            entries,
            pending,
        })
    }
}

impl Msix {
    /// The MSI-X state, for a snapshot.
    pub fn save_state(&self) -> MsixState {
        let state = self.state();
        MsixState {
            enabled: state.enabled,
            function_mask: state.function_mask,
            entries: state.entries.iter().map(|e| e.dwords).collect(),
            pending: state.pending.clone(),
        }
    }

    /// Restores a state from [`save_state`](Self::save_state) of a
    /// function with the same number of vectors, and brings the sink in
    /// line: deliverable vectors are programmed, and a pending vector that
    /// is deliverable is sent. Refuses (unchanged) a state with another
    /// vector count or invalid fields.
    pub fn restore_state(&self, saved: &MsixState) -> Result<(), StateError> {
        // Re-check fields of a state built in memory.
        let mut w = StateWriter::nested();
        saved.write(&mut w);
        let bytes = w.finish();
        let mut r = StateReader::nested("MSI-X", &bytes);
        MsixState::read(&mut r)?;
        if saved.entries.len() != usize::from(self.vectors) {
            return Err(StateError::Mismatch {
                what: "MSI-X",
                reason: format!(
                    "{} vectors, this function has {}",
                    saved.entries.len(),
                    self.vectors
                ),
            });
        }
        let mut state = self.state();
        state.enabled = saved.enabled;
        state.function_mask = saved.function_mask;
        for (entry, dwords) in state.entries.iter_mut().zip(&saved.entries) {
            entry.dwords = *dwords;
        }
        state.pending.clone_from(&saved.pending);
        for vector in 0..usize::from(self.vectors) {
            self.update(&mut state, vector);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
