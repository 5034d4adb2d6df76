//! Interrupt lines devices use to signal the guest.
//!
//! [`InterruptLine`] is the abstraction; a KVM-backed implementation (irqfd,
//! `KVM_IRQ_LINE`) lives with the VMM. This module provides
//! [`CallbackLine`] for tests and non-KVM users, [`RecordingLine`] for tests
//! and [`NullLine`] for devices whose interrupts go nowhere.
//!
//! Message-signalled interrupts are described by [`MsiMessage`] (what the
//! guest programs into an MSI capability or an MSI-X table entry) and sent
//! through [`MsiVectors`], a device's set of vectors. The KVM implementation
//! (one GSI route and irqfd per vector) also lives with the VMM;
//! [`RecordingMsiVectors`] serves tests.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Errors delivering an interrupt.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// A vector index beyond the vectors a device has.
    #[error("MSI vector {index} out of range (the device has {count})")]
    VectorOutOfRange {
        /// The index asked for.
        index: u16,
        /// How many vectors exist.
        count: u16,
    },
    /// The host mechanism (for example an eventfd write) failed.
    #[error("interrupt delivery I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Any other delivery failure.
    #[error("interrupt delivery failed: {0}")]
    Other(String),
}

/// An interrupt line from a device to the guest's interrupt controller.
///
/// Devices call these methods while possibly holding their own internal
/// locks, so implementations must not call back into the device.
pub trait InterruptLine: Send + Sync {
    /// Raises the line (level high).
    fn assert(&self) -> Result<(), InterruptError>;
    /// Lowers the line (level low).
    fn deassert(&self) -> Result<(), InterruptError>;
    /// Edge: assert then deassert.
    fn trigger(&self) -> Result<(), InterruptError> {
        self.assert()?;
        self.deassert()
    }
}

/// Calls a closure with the new level (true = asserted). For tests and
/// non-KVM users.
pub struct CallbackLine {
    callback: Box<dyn Fn(bool) + Send + Sync>,
}

impl CallbackLine {
    /// Creates a line that calls `f(true)` on assert and `f(false)` on
    /// deassert.
    pub fn new(f: impl Fn(bool) + Send + Sync + 'static) -> Self {
        Self {
            callback: Box::new(f),
        }
    }
}

impl fmt::Debug for CallbackLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackLine").finish_non_exhaustive()
    }
}

impl InterruptLine for CallbackLine {
    fn assert(&self) -> Result<(), InterruptError> {
        (self.callback)(true);
        Ok(())
    }

    fn deassert(&self) -> Result<(), InterruptError> {
        (self.callback)(false);
        Ok(())
    }
}

/// A line that records its level and counts assert edges (for tests).
///
/// An assert edge is a transition from deasserted to asserted; asserting a
/// line that is already asserted does not count.
#[derive(Debug, Default)]
pub struct RecordingLine {
    level: AtomicBool,
    asserts: AtomicU64,
}

impl RecordingLine {
    /// Creates a deasserted line with no recorded edges.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current level (true = asserted).
    pub fn level(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }

    /// How many times the line went from deasserted to asserted.
    pub fn asserts(&self) -> u64 {
        self.asserts.load(Ordering::SeqCst)
    }
}

impl InterruptLine for RecordingLine {
    fn assert(&self) -> Result<(), InterruptError> {
        if !self.level.swap(true, Ordering::SeqCst) {
            self.asserts.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn deassert(&self) -> Result<(), InterruptError> {
        self.level.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// A line that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullLine;

impl InterruptLine for NullLine {
    fn assert(&self) -> Result<(), InterruptError> {
        Ok(())
    }

    fn deassert(&self) -> Result<(), InterruptError> {
        Ok(())
    }
}

/// The architectural base of the x86 MSI address window (`0xFEEx_xxxx`).
pub const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;

/// One message-signalled interrupt as the guest programs it: a 64-bit
/// address and 32-bit data, the memory write a device would make.
///
/// On x86 the address selects the destination (bits 31:20 are `0xFEE`,
/// 19:12 the destination APIC ID, bit 2 the redirection hint, bit 3 the
/// destination mode) and the data the vector, delivery mode and trigger
/// mode (Intel SDM Vol. 3A, 11.11). The fields are kept raw: interrupt
/// remapping or a non-x86 controller may interpret them differently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl MsiMessage {
    /// A message from its address and data.
    pub const fn new(address: u64, data: u32) -> Self {
        Self { address, data }
    }

    /// The x86 interrupt vector (data bits 7:0).
    pub const fn vector(&self) -> u8 {
        (self.data & 0xff) as u8
    }

    /// The x86 destination APIC ID (address bits 19:12).
    pub const fn destination(&self) -> u8 {
        ((self.address >> 12) & 0xff) as u8
    }

    /// True when the address lies in the x86 MSI window `0xFEEx_xxxx` and
    /// would be delivered to a local APIC. A guest can program anything into
    /// a table entry; a message outside the window is a write to memory that
    /// no interrupt controller sees.
    pub const fn is_x86_interrupt(&self) -> bool {
        self.address >> 20 == MSI_ADDRESS_BASE >> 20
    }
}

/// A device's set of message-signalled interrupt vectors (MSI or MSI-X).
///
/// The MSI/MSI-X capability logic (masking, pending bits) sits in front of
/// this trait: it programs a vector with [`set_message`](Self::set_message)
/// when the guest writes an unmasked entry, withdraws it with `None` when
/// the guest masks or disables it, and calls [`trigger`](Self::trigger) only
/// for vectors that may fire. Implementations therefore deliver what they
/// are told and keep no masking state of their own.
///
/// Methods take `&self` and may be called from any thread (device workers
/// as well as vCPU threads).
pub trait MsiVectors: Send + Sync {
    /// How many vectors there are (indices `0..count`).
    fn count(&self) -> u16;

    /// Programs vector `index` with `message`, or with `None` withdraws it
    /// so that a trigger delivers nothing.
    fn set_message(&self, index: u16, message: Option<MsiMessage>) -> Result<(), InterruptError>;

    /// Sends vector `index`'s message.
    fn trigger(&self, index: u16) -> Result<(), InterruptError>;
}

/// One event recorded by [`RecordingMsiVectors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsiEvent {
    /// A vector was programmed (or withdrawn, with `None`).
    Set(u16, Option<MsiMessage>),
    /// A vector fired with the message it held (`None` if it had none, in
    /// which case nothing would reach the guest).
    Fired(u16, Option<MsiMessage>),
}

/// [`MsiVectors`] that records every call, for tests.
#[derive(Debug)]
pub struct RecordingMsiVectors {
    messages: std::sync::Mutex<Vec<Option<MsiMessage>>>,
    events: std::sync::Mutex<Vec<MsiEvent>>,
}

impl RecordingMsiVectors {
    /// `count` vectors, none programmed.
    pub fn new(count: u16) -> Self {
        Self {
            messages: std::sync::Mutex::new(vec![None; usize::from(count)]),
            events: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Takes the events recorded so far.
    pub fn take_events(&self) -> Vec<MsiEvent> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// The message vector `index` holds now.
    pub fn message(&self, index: u16) -> Option<MsiMessage> {
        lock(&self.messages)
            .get(usize::from(index))
            .copied()
            .flatten()
    }

    fn check(&self, index: u16, len: usize) -> Result<usize, InterruptError> {
        let i = usize::from(index);
        if i < len {
            Ok(i)
        } else {
            // `count()` would take the lock the caller holds: use `len`.
            Err(InterruptError::VectorOutOfRange {
                index,
                count: u16::try_from(len).unwrap_or(u16::MAX),
            })
        }
    }
}

/// Locks a mutex, recovering the data if a holder panicked (the recorded
/// state stays meaningful).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MsiVectors for RecordingMsiVectors {
    fn count(&self) -> u16 {
        u16::try_from(lock(&self.messages).len()).unwrap_or(u16::MAX)
    }

    fn set_message(&self, index: u16, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut messages = lock(&self.messages);
        let i = self.check(index, messages.len())?;
        messages[i] = message;
        lock(&self.events).push(MsiEvent::Set(index, message));
        Ok(())
    }

    fn trigger(&self, index: u16) -> Result<(), InterruptError> {
        let messages = lock(&self.messages);
        let i = self.check(index, messages.len())?;
        lock(&self.events).push(MsiEvent::Fired(index, messages[i]));
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn callback_line_reports_levels_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let line = CallbackLine::new(move |level| s.lock().unwrap().push(level));
        line.assert().unwrap();
        line.deassert().unwrap();
        line.trigger().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![true, false, true, false]);
        assert!(format!("{line:?}").contains("CallbackLine"));
    }

    #[test]
    fn recording_line_tracks_level_and_counts_edges() {
        let line = RecordingLine::new();
        assert!(!line.level());
        assert_eq!(line.asserts(), 0);
        line.assert().unwrap();
        line.assert().unwrap();
        assert!(line.level());
        assert_eq!(line.asserts(), 1, "re-asserting a high line is not an edge");
        line.deassert().unwrap();
        assert!(!line.level());
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert!(!line.level());
        assert_eq!(line.asserts(), 3);
    }

    #[test]
    fn trait_objects_and_null_line() {
        let lines: Vec<Arc<dyn InterruptLine>> = vec![
            Arc::new(NullLine),
            Arc::new(RecordingLine::default()),
            Arc::new(CallbackLine::new(|_| {})),
        ];
        for line in &lines {
            line.trigger().unwrap();
            line.assert().unwrap();
            line.deassert().unwrap();
        }
    }

    #[test]
    fn default_trigger_stops_on_assert_error() {
        struct Failing(AtomicU64);
        impl InterruptLine for Failing {
            fn assert(&self) -> Result<(), InterruptError> {
                Err(InterruptError::Other("controller gone".into()))
            }
            fn deassert(&self) -> Result<(), InterruptError> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
        let line = Failing(AtomicU64::new(0));
        let err = line.trigger().unwrap_err();
        assert!(err.to_string().contains("controller gone"));
        assert_eq!(line.0.load(Ordering::SeqCst), 0);
        let io: InterruptError = std::io::Error::other("eventfd").into();
        assert!(io.to_string().contains("eventfd"));
    }

    #[test]
    fn msi_message_fields() {
        let m = MsiMessage::new(0xFEE0_3000, 0x4031);
        assert_eq!(m.vector(), 0x31);
        assert_eq!(m.destination(), 3);
        assert!(m.is_x86_interrupt());
        assert!(!MsiMessage::new(0x1000, 0x31).is_x86_interrupt());
        assert!(!MsiMessage::new(0x1_FEE0_0000, 0x31).is_x86_interrupt());
    }

    #[test]
    fn recording_msi_vectors_record_and_check_range() {
        let v = RecordingMsiVectors::new(2);
        assert_eq!(v.count(), 2);
        let m = MsiMessage::new(0xFEE0_0000, 0x40);
        v.trigger(0).unwrap();
        v.set_message(0, Some(m)).unwrap();
        v.trigger(0).unwrap();
        v.set_message(0, None).unwrap();
        assert_eq!(v.message(0), None);
        assert_eq!(
            v.take_events(),
            vec![
                MsiEvent::Fired(0, None),
                MsiEvent::Set(0, Some(m)),
                MsiEvent::Fired(0, Some(m)),
                MsiEvent::Set(0, None),
            ]
        );
        let err = v.trigger(2).unwrap_err();
        assert!(matches!(
            err,
            InterruptError::VectorOutOfRange { index: 2, count: 2 }
        ));
        assert!(v.set_message(9, Some(m)).is_err());
        assert!(v.take_events().is_empty());
    }
}
