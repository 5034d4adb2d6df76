//! An MC146818-compatible CMOS real-time clock with 128 bytes of CMOS RAM.
//!
//! [`Rtc`] is registered on two ports (typically `0x70..=0x71`):
//!
//! | offset | read | write |
//! |--------|------|-------|
//! | 0 (`0x70`) | `0xFF` (the index port is write-only) | index: bit 7 = NMI mask, bits 0-6 = register |
//! | 1 (`0x71`) | the selected register | the selected register |
//!
//! Registers (selected by the index):
//!
//! | index | register | notes |
//! |-------|----------|-------|
//! | `0x00` | seconds | from the clock |
//! | `0x01` | seconds alarm | RAM; `0xC0..=0xFF` = "don't care" |
//! | `0x02` | minutes | from the clock |
//! | `0x03` | minutes alarm | RAM; `0xC0..=0xFF` = "don't care" |
//! | `0x04` | hours | from the clock; in 12-hour mode `1..=12`, bit 7 = PM |
//! | `0x05` | hours alarm | RAM; `0xC0..=0xFF` = "don't care" |
//! | `0x06` | day of week | `1` = Sunday, derived from the date |
//! | `0x07` | day of month | from the clock |
//! | `0x08` | month | from the clock |
//! | `0x09` | year | two digits, from the clock |
//! | `0x0A` | register A | bit 7 UIP (read-only), bits 0-6 divider/rate (stored); reset `0x26` |
//! | `0x0B` | register B | bit 7 SET, 6 PIE, 5 AIE, 4 UIE, 3 SQWE, 2 DM (1 = binary), 1 24/12 (1 = 24 h), 0 DSE; reset `0x02` |
//! | `0x0C` | register C | bit 7 IRQF, 6 PF, 5 AF, 4 UF; read-only, cleared by reading |
//! | `0x0D` | register D | bit 7 VRT, always `0x80`; read-only |
//! | `0x32` | century | from the clock |
//! | other | CMOS RAM | plain guest-readable and -writable bytes |
//!
//! Behaviour worth knowing:
//!
//! * The clock is the host clock (UTC, [`SystemTime`]) plus an offset that
//!   the guest changes by setting the time. The clock source can be injected
//!   ([`Rtc::with_clock`]). Dates use the proleptic Gregorian calendar; the
//!   clock saturates at `0000-01-01 00:00:00` and `9999-12-31 23:59:59`.
//! * Values are presented in BCD or binary (register B bit 2) and in 24- or
//!   12-hour form (register B bit 1) at the time of each read.
//! * While SET (register B bit 7) is set, the time registers (`0x00`,
//!   `0x02`, `0x04`, `0x06..=0x09`, `0x32`) are frozen: they hold the time at
//!   the moment SET was set (in the formats register B selected before that
//!   write) and the guest may overwrite them with any byte,
//!   which reads back unchanged. When SET is cleared, those bytes are decoded
//!   in the data mode and hour mode of the new register B value and become
//!   the clock's time, at the start of that second (the day of week is
//!   recomputed from the date). If they do not form a valid date and time
//!   (invalid BCD digits, a field out of range, a day past the end of its
//!   month), the clock keeps running unchanged and the event is logged.
//! * Outside SET, a write to one of the time registers is applied at once in
//!   the same way, with the other fields taken from the current time.
//! * UIP (register A bit 7) is set during the last 244 µs of each second of
//!   the clock (never while SET is set). The divider bits do not stop the
//!   clock.
//! * There is no timer: the RTC raises no interrupt. Register C computes its
//!   flags when read, relative to the previous read: UF if a second
//!   boundary of the clock was crossed, PF if the rate in register A is
//!   non-zero and at least one period elapsed, AF if the current time
//!   matches the three alarm registers (UF and AF are never set while SET is
//!   set). IRQF is set if any of these flags is set together with its enable
//!   bit in register B.
//! * Only 1-byte accesses at offsets `0..2` are decoded; anything else is
//!   refused with [`DeviceError::InvalidAccess`].
//!
//! # Snapshot state
//!
//! [`Rtc::save_state`] returns an [`RtcState`]: the index register and NMI
//! mask, all 128 bytes of CMOS RAM (which hold registers A and B, the
//! alarm registers, the frozen time while SET is set, and the plain RAM),
//! and the clock as an offset from host time. A restored RTC therefore
//! shows host time plus the guest's offset: it keeps counting across the
//! snapshot (time spent saved counts as time passed, as on a machine that
//! was switched off) and never jumps back to the moment of the save.
//! Register C's reference point is saved relative to the clock's time at
//! the save, so flags that were due before the save are still reported.
//! Register D is constant and C is computed on read, so neither has RAM
//! state (their RAM bytes must be 0).
//!
//! # Locking
//!
//! All state is behind one mutex. The clock function is called with that
//! mutex held, so it must not call back into the `Rtc`.

use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::{BusDevice, DeviceError, IoAction};
use crate::state::{StateError, StateReader, StateWriter};

/// Size of the CMOS RAM (including the clock registers), in bytes.
pub const CMOS_SIZE: usize = 128;

// Port offsets.
const INDEX_PORT: u64 = 0;
const DATA_PORT: u64 = 1;

// Register indices.
const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;
const REG_CENTURY: u8 = 0x32;

const TIME_REGS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

// Register A bits.
const A_UIP: u8 = 0x80;
const A_WRITABLE: u8 = 0x7F;
const A_RATE: u8 = 0x0F;
const A_RESET: u8 = 0x26;

// Register B bits.
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const B_RESET: u8 = B_24H;

// Register C bits.
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;

// Register D bits.
const D_VRT: u8 = 0x80;

/// Alarm register values at or above this mean "don't care".
const ALARM_DONT_CARE: u8 = 0xC0;
/// 12-hour mode: PM flag in the hours register.
const HOURS_PM: u8 = 0x80;

const NANOS_PER_SEC: i128 = 1_000_000_000;
/// UIP is set during this many nanoseconds before each second boundary.
const UIP_WINDOW_NANOS: i128 = 244_000;
const SECS_PER_DAY: i64 = 86_400;

/// Unix seconds of 0000-01-01T00:00:00 (proleptic Gregorian).
pub(crate) const MIN_SECS: i64 = -62_167_219_200;
/// Unix seconds of 9999-12-31T23:59:59.
pub(crate) const MAX_SECS: i64 = 253_402_300_799;

/// Errors of the host-side [`Rtc`] API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RtcError {
    /// The index is beyond the 128 bytes of CMOS RAM.
    #[error("CMOS index {0:#x} is out of range (the CMOS has 128 bytes)")]
    OutOfRange(usize),
    /// The index is a clock or control register, not plain RAM.
    #[error("CMOS index {0:#x} is a clock register, not RAM")]
    ClockRegister(usize),
}

/// A calendar date and time of day (proleptic Gregorian, UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    pub(crate) year: i64,
    pub(crate) month: u8,
    pub(crate) day: u8,
    pub(crate) hour: u8,
    pub(crate) minute: u8,
    pub(crate) second: u8,
    /// 0 = Sunday.
    pub(crate) weekday: u8,
}

/// Converts days since 1970-01-01 to (year, month 1-12, day 1-31).
pub(crate) fn civil_from_days(days: i64) -> (i64, u8, u8) {
    // Shift the epoch to 0000-03-01 so that leap days end the year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365, from March 1
    let mp = (5 * doy + 2) / 153; // 0 = March .. 11 = February
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // month is 1..=12 and day 1..=31 by construction.
    (year, month as u8, day as u8)
}

/// Converts a date to days since 1970-01-01. `month` must be 1-12.
pub(crate) fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (i64::from(month) + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

pub(crate) fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl DateTime {
    /// The date and time `secs` seconds after the Unix epoch, saturated to
    /// years 0-9999.
    pub(crate) fn from_unix(secs: i64) -> Self {
        let secs = secs.clamp(MIN_SECS, MAX_SECS);
        let days = secs.div_euclid(SECS_PER_DAY);
        let tod = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            // All three are < 60 (or < 24) by construction.
            hour: (tod / 3600) as u8,
            minute: (tod / 60 % 60) as u8,
            second: (tod % 60) as u8,
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }

    /// Seconds since the Unix epoch, if every field is in range.
    pub(crate) fn to_unix(self) -> Option<i64> {
        let valid = (0..=9999).contains(&self.year)
            && (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= days_in_month(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60;
        valid.then(|| {
            days_from_civil(self.year, self.month, self.day) * SECS_PER_DAY
                + i64::from(self.hour) * 3600
                + i64::from(self.minute) * 60
                + i64::from(self.second)
        })
    }
}

/// Encodes `value` (0-99) in BCD.
fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// Decodes a BCD byte; `None` if either digit is above 9.
fn from_bcd(byte: u8) -> Option<u8> {
    let (hi, lo) = (byte >> 4, byte & 0x0F);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

/// The register data format selected by register B.
#[derive(Debug, Clone, Copy)]
struct Format {
    binary: bool,
    hours24: bool,
}

impl Format {
    fn from_b(b: u8) -> Self {
        Self {
            binary: b & B_DM_BINARY != 0,
            hours24: b & B_24H != 0,
        }
    }

    /// Encodes a value 0-99.
    fn encode(self, value: u8) -> u8 {
        if self.binary {
            value
        } else {
            to_bcd(value)
        }
    }

    fn decode(self, byte: u8) -> Option<u8> {
        if self.binary {
            Some(byte)
        } else {
            from_bcd(byte)
        }
    }

    /// Encodes an hour 0-23.
    fn encode_hour(self, hour: u8) -> u8 {
        if self.hours24 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    /// Decodes an hours register byte to 0-23.
    fn decode_hour(self, byte: u8) -> Option<u8> {
        if self.hours24 {
            return self.decode(byte).filter(|h| *h < 24);
        }
        let h12 = self
            .decode(byte & !HOURS_PM)
            .filter(|h| (1..=12).contains(h))?;
        let pm = if byte & HOURS_PM != 0 { 12 } else { 0 };
        Some(h12 % 12 + pm)
    }

    /// The time register `reg` for `t`.
    fn time_register(self, reg: u8, t: &DateTime) -> u8 {
        // The year is 0..=9999, so both halves are 0..=99.
        let year = t.year.clamp(0, 9999);
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((year % 100) as u8),
            REG_CENTURY => self.encode((year / 100) as u8),
            _ => 0,
        }
    }
}

/// Nanoseconds since the Unix epoch (negative before it).
fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => i128::try_from(e.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    }
}

/// The periodic-interrupt period for a rate select value, in nanoseconds.
fn period_nanos(rate: u8) -> Option<i128> {
    match rate {
        0 => None,
        1 => Some(3_906_250),
        2 => Some(7_812_500),
        r => Some((NANOS_PER_SEC << (r - 1)) / 32_768),
    }
}

type Clock = Box<dyn Fn() -> SystemTime + Send + Sync>;

#[derive(Debug)]
struct State {
    /// The selected register (0-127).
    index: u8,
    nmi_masked: bool,
    /// CMOS RAM. Entries for registers A and B hold their values; entries
    /// for the time registers hold the frozen time while SET is set; C and
    /// D are unused.
    ram: [u8; CMOS_SIZE],
    /// Clock time minus host time, in nanoseconds.
    offset_nanos: i128,
    /// Clock time of the last register C read, in nanoseconds.
    last_c_read: i128,
}

/// An MC146818-compatible RTC with CMOS RAM; see the
/// [module documentation](self) for its behaviour.
pub struct Rtc {
    state: Mutex<State>,
    clock: Clock,
}

impl fmt::Debug for Rtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rtc")
            .field("state", &*self.lock_state())
            .finish_non_exhaustive()
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// Creates an RTC following the host clock ([`SystemTime::now`]).
    pub fn new() -> Self {
        Self::with_clock(Box::new(SystemTime::now))
    }

    /// Creates an RTC following `clock` instead of the host clock. The
    /// clock is called on accesses that need the time, with the RTC's lock
    /// held.
    pub fn with_clock(clock: Box<dyn Fn() -> SystemTime + Send + Sync>) -> Self {
        let mut ram = [0u8; CMOS_SIZE];
        ram[usize::from(REG_A)] = A_RESET;
        ram[usize::from(REG_B)] = B_RESET;
        let now = unix_nanos(clock());
        Self {
            state: Mutex::new(State {
                index: 0,
                nmi_masked: false,
                ram,
                offset_nanos: 0,
                last_c_read: now,
            }),
            clock,
        }
    }

    /// Whether the guest last wrote the index port with bit 7 (NMI
    /// disable) set.
    pub fn nmi_masked(&self) -> bool {
        self.lock_state().nmi_masked
    }

    fn check_ram_index(index: usize) -> Result<usize, RtcError> {
        if index >= CMOS_SIZE {
            return Err(RtcError::OutOfRange(index));
        }
        let is_clock = (index <= usize::from(REG_D) && !Self::is_alarm(index))
            || index == usize::from(REG_CENTURY);
        if is_clock {
            return Err(RtcError::ClockRegister(index));
        }
        Ok(index)
    }

    fn is_alarm(index: usize) -> bool {
        [REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM]
            .iter()
            .any(|r| usize::from(*r) == index)
    }

    /// Presets a byte of CMOS RAM (for example the memory-size bytes
    /// `0x34`/`0x35` and `0x5B..=0x5D`, or the alarm registers). Refuses
    /// indices beyond the 128 bytes and the clock and control registers
    /// (`0x00`, `0x02`, `0x04`, `0x06..=0x0D`, `0x32`).
    pub fn set_cmos_byte(&self, index: usize, value: u8) -> Result<(), RtcError> {
        let index = Self::check_ram_index(index)?;
        if let Some(byte) = self.lock_state().ram.get_mut(index) {
            *byte = value;
        }
        Ok(())
    }

    /// Reads a byte of CMOS RAM, with the same restrictions as
    /// [`Rtc::set_cmos_byte`].
    pub fn cmos_byte(&self, index: usize) -> Result<u8, RtcError> {
        let index = Self::check_ram_index(index)?;
        Ok(self.lock_state().ram.get(index).copied().unwrap_or(0))
    }

    /// The state is consistent after every operation, so a poisoned lock is
    /// safe to recover.
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clock's current time in nanoseconds since the Unix epoch.
    fn now_nanos(&self, st: &State) -> i128 {
        unix_nanos((self.clock)()).saturating_add(st.offset_nanos)
    }

    fn ram(st: &State, reg: u8) -> u8 {
        st.ram.get(usize::from(reg)).copied().unwrap_or(0)
    }

    fn set_ram(st: &mut State, reg: u8, value: u8) {
        if let Some(byte) = st.ram.get_mut(usize::from(reg)) {
            *byte = value;
        }
    }

    fn setting(st: &State) -> bool {
        Self::ram(st, REG_B) & B_SET != 0
    }

    fn current_time(&self, st: &State) -> DateTime {
        let secs = self.now_nanos(st).div_euclid(NANOS_PER_SEC);
        let secs = i64::try_from(secs).unwrap_or(if secs < 0 { MIN_SECS } else { MAX_SECS });
        DateTime::from_unix(secs)
    }

    /// Copies the current time into the time registers' RAM bytes in
    /// `format`.
    fn snapshot(&self, st: &mut State, format: Format) {
        let t = self.current_time(st);
        for reg in TIME_REGS {
            Self::set_ram(st, reg, format.time_register(reg, &t));
        }
    }

    /// Decodes the time registers' RAM bytes in `format` and makes them the
    /// clock's time. Returns whether they were valid.
    fn apply_time(&self, st: &mut State, format: Format) -> bool {
        let get = |reg| Self::ram(st, reg);
        let year = format
            .decode(get(REG_CENTURY))
            .filter(|c| *c <= 99)
            .zip(format.decode(get(REG_YEAR)).filter(|y| *y <= 99))
            .map(|(c, y)| i64::from(c) * 100 + i64::from(y));
        let hour = format.decode_hour(get(REG_HOURS));
        let fields = (|| {
            Some(DateTime {
                year: year?,
                month: format.decode(get(REG_MONTH))?,
                day: format.decode(get(REG_DAY))?,
                hour: hour?,
                minute: format.decode(get(REG_MINUTES))?,
                second: format.decode(get(REG_SECONDS))?,
                weekday: 0,
            })
        })();
        match fields.and_then(DateTime::to_unix) {
            Some(secs) => {
                let host = unix_nanos((self.clock)());
                st.offset_nanos = (i128::from(secs) * NANOS_PER_SEC).saturating_sub(host);
                true
            }
            None => {
                log::debug!("rtc: guest set an invalid date or time; clock unchanged");
                false
            }
        }
    }

    fn read_c(&self, st: &mut State) -> u8 {
        let now = self.now_nanos(st);
        let last = st.last_c_read;
        st.last_c_read = now;
        let a = Self::ram(st, REG_A);
        let b = Self::ram(st, REG_B);
        let mut flags = 0;
        if period_nanos(a & A_RATE).is_some_and(|p| now.abs_diff(last) >= p.unsigned_abs()) {
            flags |= C_PF;
        }
        if !Self::setting(st) {
            if now.div_euclid(NANOS_PER_SEC) != last.div_euclid(NANOS_PER_SEC) {
                flags |= C_UF;
            }
            let format = Format::from_b(b);
            let t = self.current_time(st);
            let alarm = [
                (REG_SECONDS_ALARM, REG_SECONDS),
                (REG_MINUTES_ALARM, REG_MINUTES),
                (REG_HOURS_ALARM, REG_HOURS),
            ]
            .iter()
            .all(|(alarm, reg)| {
                let value = Self::ram(st, *alarm);
                value >= ALARM_DONT_CARE || value == format.time_register(*reg, &t)
            });
            if alarm {
                flags |= C_AF;
            }
        }
        // PIE, AIE and UIE sit at the same bit positions as PF, AF and UF.
        if flags & b & (B_PIE | B_AIE | B_UIE) != 0 {
            flags |= C_IRQF;
        }
        flags
    }

    fn read_register(&self, st: &mut State) -> u8 {
        let reg = st.index;
        match reg {
            REG_A => {
                let mut a = Self::ram(st, REG_A) & A_WRITABLE;
                let sub = self.now_nanos(st).rem_euclid(NANOS_PER_SEC);
                if !Self::setting(st) && sub >= NANOS_PER_SEC - UIP_WINDOW_NANOS {
                    a |= A_UIP;
                }
                a
            }
            REG_C => self.read_c(st),
            REG_D => D_VRT,
            _ if TIME_REGS.contains(&reg) && !Self::setting(st) => {
                let format = Format::from_b(Self::ram(st, REG_B));
                format.time_register(reg, &self.current_time(st))
            }
            _ => Self::ram(st, reg),
        }
    }

    fn write_register(&self, st: &mut State, value: u8) {
        let reg = st.index;
        match reg {
            REG_A => Self::set_ram(st, REG_A, value & A_WRITABLE),
            REG_B => {
                let old = Self::ram(st, REG_B);
                let (was_set, now_set) = (old & B_SET != 0, value & B_SET != 0);
                if !was_set && now_set {
                    self.snapshot(st, Format::from_b(old));
                }
                Self::set_ram(st, REG_B, value);
                if was_set && !now_set {
                    self.apply_time(st, Format::from_b(value));
                }
            }
            REG_C | REG_D => {}
            _ if TIME_REGS.contains(&reg) && !Self::setting(st) => {
                let format = Format::from_b(Self::ram(st, REG_B));
                self.snapshot(st, format);
                Self::set_ram(st, reg, value);
                self.apply_time(st, format);
            }
            _ => Self::set_ram(st, reg, value),
        }
    }
}

impl BusDevice for Rtc {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match data {
            [byte] if offset == INDEX_PORT => {
                *byte = 0xFF;
                Ok(())
            }
            [byte] if offset == DATA_PORT => {
                let mut st = self.lock_state();
                *byte = self.read_register(&mut st);
                Ok(())
            }
            _ => Err(DeviceError::InvalidAccess {
                offset,
                len: data.len(),
            }),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        match *data {
            [byte] if offset == INDEX_PORT => {
                let mut st = self.lock_state();
                st.nmi_masked = byte & 0x80 != 0;
                st.index = byte & 0x7F;
                Ok(IoAction::Continue)
            }
            [byte] if offset == DATA_PORT => {
                let mut st = self.lock_state();
                self.write_register(&mut st, byte);
                Ok(IoAction::Continue)
            }
            _ => Err(DeviceError::InvalidAccess {
                offset,
                len: data.len(),
            }),
        }
    }
}

/// The state of an [`Rtc`], for snapshots (see the
/// [module documentation](self#snapshot-state)).
///
/// Encoding (tag `CMOS`, version 1; see [`crate::state`]): `index` (one
/// byte, 0-127), `nmi_masked` (bool), `ram` (exactly [`CMOS_SIZE`] bytes,
/// no count), `offset_nanos`, `since_c_read_nanos` (i128 each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcState {
    /// The selected register, 0-127.
    pub index: u8,
    /// The NMI mask bit of the last index write.
    pub nmi_masked: bool,
    /// CMOS RAM, registers included (A without UIP; C and D zero).
    pub ram: [u8; CMOS_SIZE],
    /// The guest's clock minus host time, in nanoseconds.
    pub offset_nanos: i128,
    /// The guest's clock at the save minus its time at the previous read
    /// of register C, in nanoseconds.
    pub since_c_read_nanos: i128,
}

const RTC_TAG: [u8; 4] = *b"CMOS";
const RTC_VERSION: u8 = 1;
/// Largest offset (either sign) a state may carry: far beyond any pair of
/// a 0000-9999 guest date and a host time `SystemTime` can represent.
const MAX_OFFSET_NANOS: i128 = 1 << 100;

impl RtcState {
    /// Encodes the state (tag `CMOS`, version 1).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(RTC_TAG, RTC_VERSION);
        w.u8(self.index)
            .bool(self.nmi_masked)
            .raw(&self.ram)
            .i128(self.offset_nanos)
            .i128(self.since_c_read_nanos);
        w.finish()
    }

    /// Decodes and checks a state written by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("rtc", bytes, RTC_TAG, RTC_VERSION)?;
        let index = r.u8()?;
        if usize::from(index) >= CMOS_SIZE {
            return Err(r.invalid("index", format!("{index:#x} is beyond the CMOS")));
        }
        let nmi_masked = r.bool("nmi_masked")?;
        let ram: [u8; CMOS_SIZE] = r.array()?;
        let byte = |reg: u8| ram.get(usize::from(reg)).copied().unwrap_or(0);
        if byte(REG_A) & A_UIP != 0 {
            return Err(r.invalid("ram", "register A has UIP stored".into()));
        }
        if byte(REG_C) != 0 || byte(REG_D) != 0 {
            return Err(r.invalid("ram", "registers C and D keep no RAM byte".into()));
        }
        let offset_nanos = r.i128()?;
        let since_c_read_nanos = r.i128()?;
        for (field, v) in [
            ("offset_nanos", offset_nanos),
            ("since_c_read_nanos", since_c_read_nanos),
        ] {
            if v.unsigned_abs() > MAX_OFFSET_NANOS.unsigned_abs() {
                return Err(r.invalid(field, format!("{v} ns is beyond any clock")));
            }
        }
        r.finish()?;
        Ok(Self {
            index,
            nmi_masked,
            ram,
            offset_nanos,
            since_c_read_nanos,
        })
    }
}

impl Rtc {
    /// The RTC's state, for a snapshot.
    pub fn save_state(&self) -> RtcState {
        let st = self.lock_state();
        let now = self.now_nanos(&st);
        RtcState {
            index: st.index,
            nmi_masked: st.nmi_masked,
            ram: st.ram,
            offset_nanos: st.offset_nanos,
            since_c_read_nanos: now
                .saturating_sub(st.last_c_read)
                .clamp(-MAX_OFFSET_NANOS, MAX_OFFSET_NANOS),
        }
    }

    /// Restores a state from [`save_state`](Self::save_state): the guest's
    /// clock continues from host time plus the saved offset. A state with
    /// values the RTC cannot produce is refused and the RTC is left
    /// unchanged.
    pub fn restore_state(&self, state: &RtcState) -> Result<(), StateError> {
        // Re-check: the state may have been built in memory.
        RtcState::from_bytes(&state.to_bytes())?;
        let mut st = self.lock_state();
        st.index = state.index;
        st.nmi_masked = state.nmi_masked;
        st.ram = state.ram;
        st.offset_nanos = state.offset_nanos;
        let now = self.now_nanos(&st);
        st.last_c_read = now.saturating_sub(state.since_c_read_nanos);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
