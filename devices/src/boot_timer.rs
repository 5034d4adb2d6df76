//! A boot timer: the guest reports "I have booted" with one MMIO write.
//!
//! A guest's init writes the byte [`BOOT_MAGIC`] (123) at offset 0 of the
//! device's MMIO range when it reaches user space. The device records, once,
//! the wall-clock time and the VMM process's CPU time elapsed since the
//! timer was created (create it with the VM), logs them at info level and
//! calls an optional reporter. Other writes and all reads are harmless:
//! reads return zeros, other values are ignored.

use std::fmt;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bus::{BusDevice, DeviceError, IoAction};

/// The byte a guest writes to report that it has booted.
pub const BOOT_MAGIC: u8 = 123;

/// How long the guest took to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTime {
    /// Wall-clock time since the timer was created.
    pub wall: Duration,
    /// CPU time this process used since the timer was created (all
    /// threads: vCPUs and VMM).
    pub cpu: Duration,
}

impl fmt::Display for BootTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest boot time: {} us wall clock, {} us CPU",
            self.wall.as_micros(),
            self.cpu.as_micros()
        )
    }
}

type Reporter = Box<dyn Fn(BootTime) + Send + Sync>;

/// The boot-timer device; see the [module documentation](self).
pub struct BootTimer {
    start_wall: Instant,
    start_cpu: Option<Duration>,
    recorded: OnceLock<BootTime>,
    reporter: Mutex<Option<Reporter>>,
}

impl fmt::Debug for BootTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootTimer")
            .field("start_wall", &self.start_wall)
            .field("recorded", &self.recorded.get())
            .finish_non_exhaustive()
    }
}

impl Default for BootTimer {
    fn default() -> Self {
        Self::new()
    }
}

/// CPU time used by this process so far (`CLOCK_PROCESS_CPUTIME_ID`), or
/// None if the clock cannot be read.
pub fn process_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call,
    // and CLOCK_PROCESS_CPUTIME_ID is a clock id every Linux supports;
    // clock_gettime writes only into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    Some(Duration::new(secs, nanos))
}

impl BootTimer {
    /// Starts the timer now.
    pub fn new() -> Self {
        BootTimer {
            start_wall: Instant::now(),
            start_cpu: process_cpu_time(),
            recorded: OnceLock::new(),
            reporter: Mutex::new(None),
        }
    }

    /// Starts the timer now and calls `reporter` when the guest reports.
    pub fn with_reporter(reporter: impl Fn(BootTime) + Send + Sync + 'static) -> Self {
        let timer = Self::new();
        *timer.reporter.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(reporter));
        timer
    }

    /// The boot time the guest reported, if it has.
    pub fn boot_time(&self) -> Option<BootTime> {
        self.recorded.get().copied()
    }

    fn record(&self) {
        let wall = self.start_wall.elapsed();
        let cpu = match (self.start_cpu, process_cpu_time()) {
            (Some(start), Some(now)) => now.saturating_sub(start),
            _ => Duration::ZERO,
        };
        let time = BootTime { wall, cpu };
        // Only the first report counts; later ones are ignored.
        if self.recorded.set(time).is_ok() {
            log::info!("{time}");
            if let Some(report) = &*self.reporter.lock().unwrap_or_else(|e| e.into_inner()) {
                report(time);
            }
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&self, _offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        if offset == 0 && data.first() == Some(&BOOT_MAGIC) {
            self.record();
        }
        Ok(IoAction::Continue)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_magic_write_records_once() {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let sink = reports.clone();
        let timer = BootTimer::with_reporter(move |t| sink.lock().unwrap().push(t));
        assert_eq!(timer.boot_time(), None);
        // Other values, other offsets and reads do nothing.
        timer.write(0, &[122]).unwrap();
        timer.write(1, &[BOOT_MAGIC]).unwrap();
        let mut buf = [0xaa; 4];
        timer.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
        assert_eq!(timer.boot_time(), None);

        std::thread::sleep(Duration::from_millis(20));
        // Burn some CPU so the CPU clock visibly moves.
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert_eq!(timer.write(0, &[BOOT_MAGIC]).unwrap(), IoAction::Continue);
        let first = timer.boot_time().unwrap();
        assert!(first.wall >= Duration::from_millis(40), "{first}");
        assert!(first.cpu >= Duration::from_millis(10), "{first}");
        assert!(first.cpu <= first.wall * 4, "{first}");

        timer.write(0, &[BOOT_MAGIC, 0, 0, 0]).unwrap();
        assert_eq!(timer.boot_time(), Some(first));
        assert_eq!(*reports.lock().unwrap(), vec![first]);
        assert!(first.to_string().starts_with("guest boot time: "));
    }

    #[test]
    fn empty_writes_are_harmless() {
        let timer = BootTimer::new();
        assert_eq!(timer.write(0, &[]).unwrap(), IoAction::Continue);
        assert_eq!(timer.boot_time(), None);
    }
}
