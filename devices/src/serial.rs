//! A 16550A UART.
//!
//! [`Serial`] models the full 16550A register set at offsets `0..8` of its
//! bus range (typically port `0x3F8` for COM1, IRQ 4):
//!
//! | offset | DLAB=0 read | DLAB=0 write | DLAB=1 |
//! |--------|-------------|--------------|--------|
//! | 0 | RBR (pops the RX FIFO) | THR | DLL |
//! | 1 | IER | IER | DLM |
//! | 2 | IIR | FCR | (same as DLAB=0) |
//! | 3 | LCR | LCR | |
//! | 4 | MCR | MCR | |
//! | 5 | LSR (clears error bits) | ignored | |
//! | 6 | MSR (clears delta bits) | ignored | |
//! | 7 | SCR | SCR | |
//!
//! Behaviour worth knowing:
//!
//! * Transmission is instantaneous: a THR write goes straight to the host
//!   writer, so THRE and TEMT are always set. A write error from the host
//!   writer does not fail the guest's access; it is logged and counted
//!   ([`Serial::output_errors`]) and the byte is dropped.
//! * Host input ([`Serial::push_input`]) goes into a bounded receive buffer
//!   (64 bytes by default). Bytes beyond its capacity are dropped, counted
//!   ([`Serial::dropped_input`]) and flagged with the overrun bit in LSR. The
//!   buffer keeps its configured capacity even when the guest has not enabled
//!   the FIFOs (16450 mode), so that polling guests do not lose input.
//! * With FIFOs enabled, the received-data interrupt (IIR `0x4`) is reported
//!   when the FIFO holds at least the trigger level; when it holds fewer (but
//!   at least one) byte the character-timeout interrupt (IIR `0xC`) is
//!   reported instead. There is no timer, so the timeout indication is
//!   immediate rather than after four character times.
//! * In loopback mode (MCR bit 4) THR writes go to the receive FIFO instead
//!   of the host writer, MSR mirrors MCR (RTS→CTS, DTR→DSR, OUT1→RI,
//!   OUT2→DCD) and host input is disconnected (dropped and counted). Outside
//!   loopback MSR reports DCD, DSR and CTS asserted.
//! * The interrupt line has level semantics: it is asserted whenever an
//!   enabled interrupt is pending (IIR bit 0 clear) and deasserted when none
//!   is. As in QEMU, MCR OUT2 does not gate the line.
//! * Only 1-byte accesses at offsets `0..8` are decoded; anything else is
//!   refused with [`DeviceError::InvalidAccess`].
//!
//! # Locking
//!
//! Register state is behind one mutex and the host writer behind another.
//! The writer is never called with the state lock held, so a slow host
//! writer does not block other register accesses. The [`InterruptLine`] *is*
//! called with the state lock held (so that level changes are delivered in
//! order); interrupt line implementations must therefore not call back into
//! the `Serial`.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::{BusDevice, DeviceError, IoAction};
use crate::interrupt::InterruptLine;
use crate::state::{StateError, StateReader, StateWriter};

/// Default capacity of the receive FIFO, in bytes.
pub const DEFAULT_RX_CAPACITY: usize = 64;

// Register offsets.
const DATA: u64 = 0;
const IER: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

// IER bits.
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_RLS: u8 = 0x04;
const IER_MS: u8 = 0x08;
const IER_MASK: u8 = 0x0F;

// IIR values (bits 0-3) and FIFO flags (bits 6-7).
const IIR_NONE: u8 = 0x01;
const IIR_MS: u8 = 0x00;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_RLS: u8 = 0x06;
const IIR_TIMEOUT: u8 = 0x0C;
const IIR_FIFO_ENABLED: u8 = 0xC0;

// FCR bits.
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
const FCR_CLEAR_TX: u8 = 0x04;
/// Bits of FCR that are remembered: enable, DMA mode, trigger level.
const FCR_STORED: u8 = 0xC9;

// LCR bits.
const LCR_DLAB: u8 = 0x80;

// MCR bits.
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1F;

// LSR bits.
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_PE: u8 = 0x04;
const LSR_FE: u8 = 0x08;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LSR_RX_FIFO_ERROR: u8 = 0x80;
const LSR_ERRORS: u8 = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

// MSR bits. Each status bit (4-7) sits 4 bits above its delta bit (0-3).
const MSR_DELTAS: u8 = 0x0F;
const MSR_TERI: u8 = 0x04;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// Register state of the UART.
#[derive(Debug)]
struct State {
    ier: u8,
    lcr: u8,
    mcr: u8,
    /// Sticky LSR error bits (OE, PE, FE, BI); cleared by reading LSR.
    lsr_errors: u8,
    /// MSR delta bits (0-3); cleared by reading MSR.
    msr_delta: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fcr: u8,
    rx: VecDeque<u8>,
    rx_capacity: usize,
    /// A THR-empty interrupt is pending (see the module docs).
    thr_pending: bool,
    /// The level last successfully driven on the interrupt line.
    irq_level: bool,
    dropped_input: u64,
}

impl State {
    fn new(rx_capacity: usize) -> Self {
        Self {
            ier: 0,
            lcr: 0,
            mcr: 0,
            lsr_errors: 0,
            msr_delta: 0,
            scr: 0,
            // 115200 baud with the standard 1.8432 MHz clock.
            dll: 1,
            dlm: 0,
            fcr: 0,
            rx: VecDeque::with_capacity(rx_capacity),
            rx_capacity,
            thr_pending: false,
            irq_level: false,
            dropped_input: 0,
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    fn trigger_level(&self) -> usize {
        match self.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    /// MSR status bits (4-7) as a function of MCR.
    fn msr_status(&self) -> u8 {
        if self.loopback() {
            let mut s = 0;
            if self.mcr & MCR_RTS != 0 {
                s |= MSR_CTS;
            }
            if self.mcr & MCR_DTR != 0 {
                s |= MSR_DSR;
            }
            if self.mcr & MCR_OUT1 != 0 {
                s |= MSR_RI;
            }
            if self.mcr & MCR_OUT2 != 0 {
                s |= MSR_DCD;
            }
            s
        } else {
            MSR_DCD | MSR_DSR | MSR_CTS
        }
    }

    fn set_mcr(&mut self, value: u8) {
        let old = self.msr_status();
        self.mcr = value & MCR_MASK;
        let new = self.msr_status();
        let changed = old ^ new;
        // DCTS, DDSR and DDCD flag any change; TERI flags RI going inactive.
        let mut delta = (changed & (MSR_CTS | MSR_DSR | MSR_DCD)) >> 4;
        if old & MSR_RI != 0 && new & MSR_RI == 0 {
            delta |= MSR_TERI;
        }
        self.msr_delta |= delta & MSR_DELTAS;
    }

    fn lsr(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT | self.lsr_errors;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.fifo_enabled() && self.lsr_errors & (LSR_PE | LSR_FE | LSR_BI) != 0 {
            lsr |= LSR_RX_FIFO_ERROR;
        }
        lsr
    }

    /// The highest-priority pending interrupt (IIR bits 0-3).
    fn pending(&self) -> u8 {
        if self.ier & IER_RLS != 0 && self.lsr_errors & LSR_ERRORS != 0 {
            IIR_RLS
        } else if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            if self.fifo_enabled() && self.rx.len() < self.trigger_level() {
                IIR_TIMEOUT
            } else {
                IIR_RDA
            }
        } else if self.ier & IER_THRE != 0 && self.thr_pending {
            IIR_THRE
        } else if self.ier & IER_MS != 0 && self.msr_delta != 0 {
            IIR_MS
        } else {
            IIR_NONE
        }
    }

    fn iir(&self) -> u8 {
        let fifo = if self.fifo_enabled() {
            IIR_FIFO_ENABLED
        } else {
            0
        };
        self.pending() | fifo
    }

    /// Puts bytes into the receive FIFO; returns how many fit. The rest are
    /// dropped and flagged as an overrun.
    fn receive(&mut self, bytes: &[u8]) -> usize {
        let room = self.rx_capacity.saturating_sub(self.rx.len());
        let accepted = room.min(bytes.len());
        self.rx.extend(bytes.iter().take(accepted));
        if accepted < bytes.len() {
            self.lsr_errors |= LSR_OE;
        }
        accepted
    }

    fn count_dropped_input(&mut self, dropped: usize) {
        let dropped = u64::try_from(dropped).unwrap_or(u64::MAX);
        self.dropped_input = self.dropped_input.saturating_add(dropped);
    }

    fn write_fcr(&mut self, value: u8) {
        let mut value = value;
        // Changing the FIFO enable bit resets both FIFOs.
        if (value ^ self.fcr) & FCR_ENABLE != 0 {
            value |= FCR_CLEAR_RX | FCR_CLEAR_TX;
        }
        if value & FCR_CLEAR_RX != 0 {
            self.rx.clear();
        }
        // FCR_CLEAR_TX: the transmitter is always empty; nothing to do.
        self.fcr = value & FCR_STORED;
    }
}

/// A 16550A UART; see the [module documentation](self) for its behaviour.
pub struct Serial {
    state: Mutex<State>,
    out: Mutex<Box<dyn Write + Send>>,
    irq: Arc<dyn InterruptLine>,
    output_errors: AtomicU64,
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("state", &*self.lock_state())
            .field("output_errors", &self.output_errors())
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// Creates a UART writing guest output to `out` and signalling `irq`,
    /// with a receive FIFO of [`DEFAULT_RX_CAPACITY`] (64) bytes.
    pub fn new(out: Box<dyn Write + Send>, irq: Arc<dyn InterruptLine>) -> Self {
        Self::with_rx_capacity(out, irq, DEFAULT_RX_CAPACITY)
    }

    /// Creates a UART with a receive FIFO of `capacity` bytes. A capacity of
    /// zero drops all input.
    pub fn with_rx_capacity(
        out: Box<dyn Write + Send>,
        irq: Arc<dyn InterruptLine>,
        capacity: usize,
    ) -> Self {
        Self {
            state: Mutex::new(State::new(capacity)),
            out: Mutex::new(out),
            irq,
            output_errors: AtomicU64::new(0),
        }
    }

    /// How many input bytes the receive FIFO takes now (0 in loopback
    /// mode). A host feeding input from a stream pushes at most this many
    /// and waits for the guest to drain the FIFO, so nothing is dropped.
    pub fn input_space(&self) -> usize {
        let st = self.lock_state();
        if st.loopback() {
            0
        } else {
            st.rx_capacity.saturating_sub(st.rx.len())
        }
    }

    /// Host → guest input. Returns how many bytes were accepted; bytes beyond
    /// the bounded receive FIFO are dropped, counted and flagged with the
    /// overrun bit in LSR. In loopback mode the receiver is disconnected from
    /// host input: nothing is accepted and all bytes count as dropped.
    pub fn push_input(&self, bytes: &[u8]) -> usize {
        let mut st = self.lock_state();
        let accepted = if st.loopback() { 0 } else { st.receive(bytes) };
        st.count_dropped_input(bytes.len() - accepted);
        self.update_irq(&mut st);
        accepted
    }

    /// How many host input bytes have been dropped so far (bytes looped back
    /// from THR that overflow the FIFO only set the overrun bit).
    pub fn dropped_input(&self) -> u64 {
        self.lock_state().dropped_input
    }

    /// How many guest output bytes were lost to host writer errors.
    pub fn output_errors(&self) -> u64 {
        self.output_errors.load(Ordering::Relaxed)
    }

    /// The register state is kept consistent by every operation before any
    /// call that could panic, so a poisoned lock is safe to recover.
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives the interrupt line to match the pending state, if it changed.
    fn update_irq(&self, st: &mut State) {
        let want = st.pending() != IIR_NONE;
        if want == st.irq_level {
            return;
        }
        let result = if want {
            self.irq.assert()
        } else {
            self.irq.deassert()
        };
        match result {
            Ok(()) => st.irq_level = want,
            // The level is left unrecorded so the next state change retries.
            Err(e) => log::warn!("serial: failed to set interrupt line to {want}: {e}"),
        }
    }

    /// Sends one byte to the host writer. Errors are counted and logged,
    /// never reported to the guest.
    fn emit(&self, byte: u8) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let result = out.write_all(&[byte]).and_then(|()| out.flush());
        if let Err(e) = result {
            let previous = self.output_errors.fetch_add(1, Ordering::Relaxed);
            if previous == 0 {
                log::warn!("serial: output write failed, dropping byte: {e} (further failures are only counted)");
            } else {
                log::debug!("serial: output write failed, dropping byte: {e}");
            }
        }
    }

    fn write_thr(&self, byte: u8) {
        {
            let mut st = self.lock_state();
            // Writing THR clears a pending THRE interrupt...
            st.thr_pending = false;
            self.update_irq(&mut st);
            if st.loopback() {
                st.receive(&[byte]);
                // ...and the instantaneous transmission raises it again.
                st.thr_pending = true;
                self.update_irq(&mut st);
                return;
            }
        }
        self.emit(byte);
        let mut st = self.lock_state();
        st.thr_pending = true;
        self.update_irq(&mut st);
    }

    fn read_register(&self, offset: u64) -> Result<u8, DeviceError> {
        let mut st = self.lock_state();
        let value = match offset {
            DATA if st.dlab() => st.dll,
            DATA => st.rx.pop_front().unwrap_or(0),
            IER if st.dlab() => st.dlm,
            IER => st.ier,
            IIR_FCR => {
                let iir = st.iir();
                // Reading IIR clears a THRE interrupt when it is the one
                // reported.
                if iir & 0x0F == IIR_THRE {
                    st.thr_pending = false;
                }
                iir
            }
            LCR => st.lcr,
            MCR => st.mcr,
            LSR => {
                let lsr = st.lsr();
                st.lsr_errors = 0;
                lsr
            }
            MSR => {
                let msr = st.msr_status() | st.msr_delta;
                st.msr_delta = 0;
                msr
            }
            SCR => st.scr,
            _ => return Err(DeviceError::InvalidAccess { offset, len: 1 }),
        };
        self.update_irq(&mut st);
        Ok(value)
    }

    fn write_register(&self, offset: u64, value: u8) -> Result<(), DeviceError> {
        if offset == DATA && !self.lock_state().dlab() {
            // The state lock is released while the byte goes to the host
            // writer. (A concurrent DLAB change in between is a guest race
            // with either outcome being valid.)
            self.write_thr(value);
            return Ok(());
        }
        let mut st = self.lock_state();
        match offset {
            DATA => st.dll = value,
            IER if st.dlab() => st.dlm = value,
            IER => {
                let old = st.ier;
                st.ier = value & IER_MASK;
                // Enabling the THRE interrupt while THR is empty (always)
                // makes it pending immediately.
                if st.ier & IER_THRE != 0 && old & IER_THRE == 0 {
                    st.thr_pending = true;
                }
            }
            IIR_FCR => st.write_fcr(value),
            LCR => st.lcr = value,
            MCR => st.set_mcr(value),
            // LSR and MSR are read-only; writes (a factory test feature on
            // real parts) are ignored.
            LSR | MSR => {}
            SCR => st.scr = value,
            _ => return Err(DeviceError::InvalidAccess { offset, len: 1 }),
        }
        self.update_irq(&mut st);
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match data {
            [byte] if offset <= SCR => {
                *byte = self.read_register(offset)?;
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
            [byte] if offset <= SCR => {
                self.write_register(offset, byte)?;
                Ok(IoAction::Continue)
            }
            _ => Err(DeviceError::InvalidAccess {
                offset,
                len: data.len(),
            }),
        }
    }
}

/// The guest-visible state of a [`Serial`], for snapshots.
///
/// Encoding (tag `UART`, version 1; see [`crate::state`]): `ier`, `lcr`,
/// `mcr`, `lsr_errors`, `msr_delta`, `scr`, `dll`, `dlm`, `fcr` (one byte
/// each), `thr_pending` (bool), `dropped_input` (u64), `rx` (byte string,
/// oldest byte first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialState {
    /// Interrupt Enable Register (bits 0-3).
    pub ier: u8,
    /// Line Control Register.
    pub lcr: u8,
    /// Modem Control Register (bits 0-4).
    pub mcr: u8,
    /// Sticky LSR error bits (OE, PE, FE, BI).
    pub lsr_errors: u8,
    /// MSR delta bits (0-3).
    pub msr_delta: u8,
    /// Scratch register.
    pub scr: u8,
    /// Divisor latch, low byte.
    pub dll: u8,
    /// Divisor latch, high byte.
    pub dlm: u8,
    /// The remembered FCR bits (enable, DMA mode, trigger level).
    pub fcr: u8,
    /// A THR-empty interrupt is pending.
    pub thr_pending: bool,
    /// Host input bytes dropped so far.
    pub dropped_input: u64,
    /// The receive FIFO, oldest byte first.
    pub rx: Vec<u8>,
}

const SERIAL_TAG: [u8; 4] = *b"UART";
const SERIAL_VERSION: u8 = 1;
/// Largest receive FIFO a state may carry (far above any real capacity;
/// the device's own capacity is checked on restore).
const SERIAL_MAX_RX: usize = 1 << 20;

impl SerialState {
    /// Encodes the state (tag `UART`, version 1).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(SERIAL_TAG, SERIAL_VERSION);
        w.u8(self.ier)
            .u8(self.lcr)
            .u8(self.mcr)
            .u8(self.lsr_errors)
            .u8(self.msr_delta)
            .u8(self.scr)
            .u8(self.dll)
            .u8(self.dlm)
            .u8(self.fcr)
            .bool(self.thr_pending)
            .u64(self.dropped_input)
            .bytes(&self.rx);
        w.finish()
    }

    /// Decodes and checks a state written by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("serial", bytes, SERIAL_TAG, SERIAL_VERSION)?;
        let mut reg = |field: &'static str, mask: u8| -> Result<u8, StateError> {
            let v = r.u8()?;
            if v & !mask != 0 {
                return Err(r.invalid(field, format!("{v:#04x} has bits outside {mask:#04x}")));
            }
            Ok(v)
        };
        let state = Self {
            ier: reg("ier", IER_MASK)?,
            lcr: reg("lcr", 0xFF)?,
            mcr: reg("mcr", MCR_MASK)?,
            lsr_errors: reg("lsr_errors", LSR_ERRORS)?,
            msr_delta: reg("msr_delta", MSR_DELTAS)?,
            scr: reg("scr", 0xFF)?,
            dll: reg("dll", 0xFF)?,
            dlm: reg("dlm", 0xFF)?,
            fcr: reg("fcr", FCR_STORED)?,
            thr_pending: r.bool("thr_pending")?,
            dropped_input: r.u64()?,
            rx: r.bytes("rx", SERIAL_MAX_RX)?,
        };
        r.finish()?;
        Ok(state)
    }
}

impl Serial {
    /// The register state, receive FIFO included, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        let st = self.lock_state();
        SerialState {
            ier: st.ier,
            lcr: st.lcr,
            mcr: st.mcr,
            lsr_errors: st.lsr_errors,
            msr_delta: st.msr_delta,
            scr: st.scr,
            dll: st.dll,
            dlm: st.dlm,
            fcr: st.fcr,
            thr_pending: st.thr_pending,
            dropped_input: st.dropped_input,
            rx: st.rx.iter().copied().collect(),
        }
    }

    /// Restores a state from [`save_state`](Self::save_state) and drives
    /// the interrupt line to the level it implies. Refuses (leaving the
    /// UART unchanged) a state whose receive FIFO holds more bytes than
    /// this UART's capacity, or whose registers have bits a guest cannot
    /// set.
    pub fn restore_state(&self, state: &SerialState) -> Result<(), StateError> {
        // Re-check the registers: the state may have been built in memory
        // rather than decoded.
        SerialState::from_bytes(&state.to_bytes())?;
        let mut st = self.lock_state();
        if state.rx.len() > st.rx_capacity {
            return Err(StateError::Mismatch {
                what: "serial",
                reason: format!(
                    "{} bytes in the receive FIFO, capacity is {}",
                    state.rx.len(),
                    st.rx_capacity
                ),
            });
        }
        st.ier = state.ier;
        st.lcr = state.lcr;
        st.mcr = state.mcr;
        st.lsr_errors = state.lsr_errors;
        st.msr_delta = state.msr_delta;
        st.scr = state.scr;
        st.dll = state.dll;
        st.dlm = state.dlm;
        st.fcr = state.fcr;
        st.thr_pending = state.thr_pending;
        st.dropped_input = state.dropped_input;
        st.rx.clear();
        st.rx.extend(state.rx.iter().copied());
        // Drive the line whatever level was recorded before.
        st.irq_level = st.pending() == IIR_NONE;
        self.update_irq(&mut st);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
