//! Interrupt lines devices use to signal the guest.
//!
//! [`InterruptLine`] is the abstraction; a KVM-backed implementation (irqfd,
//! `KVM_IRQ_LINE`) lives with the VMM. This module provides
//! [`CallbackLine`] for tests and non-KVM users, [`RecordingLine`] for tests
//! and [`NullLine`] for devices whose interrupts go nowhere.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Errors delivering an interrupt.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
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
}
