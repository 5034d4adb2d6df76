//! An i8042 PS/2 controller with a keyboard and no mouse: enough for Linux
//! to probe it quietly, plus the CPU reset line.
//!
//! [`I8042`] is registered on five ports (typically `0x60..=0x64`); only the
//! first and the last are decoded:
//!
//! | offset | port | read | write |
//! |--------|------|------|-------|
//! | 0 | `0x60` | output buffer (pops a byte) | data: a controller command's parameter, else a keyboard command |
//! | 1-3 | `0x61..=0x63` | refused | refused |
//! | 4 | `0x64` | status register | controller command |
//!
//! Status register bits: 0 OBF (output buffer full), 1 IBF (always clear:
//! input is consumed at once), 2 SYS (command byte bit 2), 3 A2 (the last
//! write went to port `0x64`), 4 keyboard unlocked (always set), 5 AUX OBF
//! (the byte in the output buffer comes from the aux port), 6-7 clear.
//!
//! Controller commands (port `0x64`):
//!
//! | command | effect |
//! |---------|--------|
//! | `0x20` | read the command byte |
//! | `0x60` | write the command byte (next data byte) |
//! | `0xA7`/`0xA8` | disable/enable the aux port (command byte bit 5) |
//! | `0xA9` | aux interface test: `0x00` |
//! | `0xAA` | controller self-test: `0x55`; sets SYS |
//! | `0xAB` | keyboard interface test: `0x00` |
//! | `0xAD`/`0xAE` | disable/enable the keyboard (command byte bit 4) |
//! | `0xC0` | read the input port: `0x80` (keyboard not inhibited) |
//! | `0xD0` | read the output port |
//! | `0xD1` | write the output port (next data byte); bit 0 clear resets the CPU |
//! | `0xD2`/`0xD3` | the next data byte appears in the output buffer as if from the keyboard/aux port |
//! | `0xD4` | the next data byte goes to the aux device, which is absent: the reply is `0xFE` from the aux port |
//! | `0xF0`–`0xFF` | pulse output-port lines (low nibble, active low): with bit 0 clear (`0xFE` and every even command) the reset line is pulsed and the CPU resets; odd commands do nothing |
//! | other | ignored (logged at debug level) |
//!
//! Keyboard commands (data written to port `0x60` when no controller
//! command awaits a parameter): `0xFF` reset → `0xFA 0xAA`; `0xF2` identify
//! → `0xFA 0xAB 0x83`; `0xF4` (enable scanning), `0xF5` (disable scanning,
//! defaults), `0xF6` (defaults) → `0xFA`; `0xED` (LEDs), `0xF0` (scancode
//! set) and `0xF3` (typematic rate) → `0xFA`, then take a parameter byte
//! that is acknowledged with `0xFA` (`0xF0 0x00` also replies the current
//! set; sets other than 1-3 are refused with `0xFE`); `0xEE` echo → `0xEE`;
//! anything else → `0xFE` (resend).
//!
//! Behaviour worth knowing:
//!
//! * The output buffer is a bounded queue of [`OUTPUT_CAPACITY`] bytes
//!   shared by the controller, the keyboard and the aux port. Bytes that do
//!   not fit are dropped and counted ([`I8042::dropped_output`]). Reading the
//!   data port with an empty queue returns the last byte read.
//! * When a byte reaches the head of the queue (becomes the byte a guest
//!   read of port `0x60` returns) and the command byte enables its
//!   interrupt (bit 0 keyboard, bit 1 aux), the matching line is triggered
//!   (an edge: [`InterruptLine::trigger`]).
//! * Host key input ([`I8042::push_key`]) is dropped and counted while the
//!   keyboard is disabled (command byte bit 4) or not scanning. Scancodes are
//!   passed through unchanged; the translation bit (command byte bit 6) is
//!   only stored.
//! * The aux port is present (so its loopback and test commands work) but
//!   no mouse is attached: every byte sent to it with `0xD4` is answered
//!   with `0xFE`, which makes Linux's mouse probe fail quietly.
//! * The reset commands return [`IoAction::Stop`]`(`[`StopRequest::Reset`]`)`;
//!   the controller's state is not reset by them (the VMM rebuilds or
//!   resets the machine).
//! * Only 1-byte accesses at offsets 0 and 4 are decoded; anything else is
//!   refused with [`DeviceError::InvalidAccess`].
//!
//! # Snapshot state
//!
//! [`I8042::save_state`] returns an [`I8042State`]: the command byte, the
//! output port (bit 0 the reset line, bit 1 A20), the output buffer with
//! each byte's source, the last byte read, a controller or keyboard command
//! waiting for its parameter, the keyboard's scanning flag, scancode set,
//! LEDs and typematic rate, and the drop counters. The pending interrupt
//! is implied by it: the byte at the head of the output buffer, on the
//! line its source's command-byte bit enables. That line is an edge that
//! was already sent when the byte reached the head, so
//! [`I8042::restore_state`] does not send it again; the interrupt
//! controller's own saved state holds it if the guest had not taken it.
//!
//! # Locking
//!
//! All state is behind one mutex. Interrupt lines are triggered after it is
//! released.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::{BusDevice, DeviceError, IoAction, StopRequest};
use crate::interrupt::InterruptLine;
use crate::state::{StateError, StateReader, StateWriter};

/// Capacity of the output buffer queue, in bytes.
pub const OUTPUT_CAPACITY: usize = 16;

// Port offsets.
const DATA: u64 = 0;
const STATUS_COMMAND: u64 = 4;

// Status register bits.
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_A2: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_OBF: u8 = 0x20;

// Command byte bits.
const CMD_KBD_INT: u8 = 0x01;
const CMD_AUX_INT: u8 = 0x02;
const CMD_SYS: u8 = 0x04;
const CMD_KBD_DISABLE: u8 = 0x10;
const CMD_AUX_DISABLE: u8 = 0x20;
const CMD_XLATE: u8 = 0x40;
/// The command byte a PC BIOS leaves: translation, SYS, keyboard interrupt.
const CMD_RESET: u8 = CMD_XLATE | CMD_SYS | CMD_KBD_INT;

// Output port bits.
const OUTPUT_PORT_RESET: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;

/// Input port value: keyboard not inhibited.
const INPUT_PORT: u8 = 0x80;

// Keyboard replies.
const KBD_ACK: u8 = 0xFA;
const KBD_RESEND: u8 = 0xFE;
const KBD_SELF_TEST_OK: u8 = 0xAA;
const KBD_ECHO: u8 = 0xEE;
const KBD_ID: [u8; 2] = [0xAB, 0x83];
const DEFAULT_SCANCODE_SET: u8 = 2;

/// Where a byte in the output buffer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Keyboard,
    Aux,
}

/// A controller command waiting for its parameter on the data port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControllerParam {
    CommandByte,
    OutputPort,
    KeyboardBuffer,
    AuxBuffer,
    AuxDevice,
}

/// A keyboard command waiting for its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyboardParam {
    Leds,
    ScancodeSet,
    Typematic,
}

#[derive(Debug)]
struct State {
    command_byte: u8,
    output_port: u8,
    /// The last write went to the command port.
    a2: bool,
    output: VecDeque<(u8, Source)>,
    last_read: u8,
    dropped_output: u64,
    dropped_keys: u64,
    controller_param: Option<ControllerParam>,
    keyboard_param: Option<KeyboardParam>,
    scanning: bool,
    scancode_set: u8,
    leds: u8,
    typematic: u8,
}

/// Which interrupt lines to trigger once the state lock is released.
#[derive(Debug, Default, Clone, Copy)]
struct Triggers {
    keyboard: bool,
    aux: bool,
}

impl Triggers {
    fn add(&mut self, source: Option<Source>) {
        match source {
            Some(Source::Keyboard) => self.keyboard = true,
            Some(Source::Aux) => self.aux = true,
            None => {}
        }
    }
}

impl State {
    fn new() -> Self {
        Self {
            command_byte: CMD_RESET,
            output_port: OUTPUT_PORT_RESET | OUTPUT_PORT_A20,
            a2: false,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            last_read: 0,
            dropped_output: 0,
            dropped_keys: 0,
            controller_param: None,
            keyboard_param: None,
            scanning: true,
            scancode_set: DEFAULT_SCANCODE_SET,
            leds: 0,
            typematic: 0,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if let Some((_, source)) = self.output.front() {
            status |= STATUS_OBF;
            if *source == Source::Aux {
                status |= STATUS_AUX_OBF;
            }
        }
        if self.command_byte & CMD_SYS != 0 {
            status |= STATUS_SYS;
        }
        if self.a2 {
            status |= STATUS_A2;
        }
        status
    }

    /// The interrupt to raise for a byte from `source` that just reached
    /// the head of the output buffer, if the command byte enables it.
    fn interrupt_for(&self, source: Source) -> Option<Source> {
        let enable = match source {
            Source::Keyboard => CMD_KBD_INT,
            Source::Aux => CMD_AUX_INT,
        };
        (self.command_byte & enable != 0).then_some(source)
    }

    /// Queues bytes in the output buffer, dropping (and counting) those
    /// that do not fit.
    fn enqueue(&mut self, bytes: &[u8], source: Source, triggers: &mut Triggers) {
        for &byte in bytes {
            if self.output.len() >= OUTPUT_CAPACITY {
                self.dropped_output = self.dropped_output.saturating_add(1);
                log::debug!("i8042: output buffer full, dropping {byte:#04x}");
                continue;
            }
            self.output.push_back((byte, source));
            if self.output.len() == 1 {
                triggers.add(self.interrupt_for(source));
            }
        }
    }

    fn read_data(&mut self, triggers: &mut Triggers) -> u8 {
        if let Some((byte, _)) = self.output.pop_front() {
            self.last_read = byte;
            if let Some(&(_, next)) = self.output.front() {
                triggers.add(self.interrupt_for(next));
            }
        }
        self.last_read
    }

    fn command(&mut self, command: u8, triggers: &mut Triggers) -> IoAction {
        self.a2 = true;
        // A new command abandons one still waiting for its parameter.
        self.controller_param = None;
        let kbd = Source::Keyboard;
        match command {
            0x20 => self.enqueue(&[self.command_byte], kbd, triggers),
            0x60 => self.controller_param = Some(ControllerParam::CommandByte),
            0xA7 => self.command_byte |= CMD_AUX_DISABLE,
            0xA8 => self.command_byte &= !CMD_AUX_DISABLE,
            0xA9 | 0xAB => self.enqueue(&[0x00], kbd, triggers),
            0xAA => {
                self.command_byte |= CMD_SYS;
                self.enqueue(&[0x55], kbd, triggers);
            }
            0xAD => self.command_byte |= CMD_KBD_DISABLE,
            0xAE => self.command_byte &= !CMD_KBD_DISABLE,
            0xC0 => self.enqueue(&[INPUT_PORT], kbd, triggers),
            0xD0 => self.enqueue(&[self.output_port], kbd, triggers),
            0xD1 => self.controller_param = Some(ControllerParam::OutputPort),
            0xD2 => self.controller_param = Some(ControllerParam::KeyboardBuffer),
            0xD3 => self.controller_param = Some(ControllerParam::AuxBuffer),
            0xD4 => self.controller_param = Some(ControllerParam::AuxDevice),
            // Pulse output-port lines: the low nibble is an active-low mask,
            // and bit 0 is the CPU reset line (0xFE is the usual form).
            0xF0..=0xFF if command & 1 == 0 => return IoAction::Stop(StopRequest::Reset),
            0xF0..=0xFF => log::debug!("i8042: pulse command {command:#04x} touches no reset line"),
            _ => log::debug!("i8042: ignoring unknown command {command:#04x}"),
        }
        IoAction::Continue
    }

    fn write_data(&mut self, byte: u8, triggers: &mut Triggers) -> IoAction {
        self.a2 = false;
        match self.controller_param.take() {
            Some(ControllerParam::CommandByte) => self.command_byte = byte,
            Some(ControllerParam::OutputPort) => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_RESET == 0 {
                    return IoAction::Stop(StopRequest::Reset);
                }
            }
            Some(ControllerParam::KeyboardBuffer) => {
                self.enqueue(&[byte], Source::Keyboard, triggers);
            }
            Some(ControllerParam::AuxBuffer) => self.enqueue(&[byte], Source::Aux, triggers),
            Some(ControllerParam::AuxDevice) => {
                log::debug!("i8042: no aux device for byte {byte:#04x}");
                self.enqueue(&[KBD_RESEND], Source::Aux, triggers);
            }
            None => self.keyboard_write(byte, triggers),
        }
        IoAction::Continue
    }

    fn keyboard_defaults(&mut self) {
        self.scancode_set = DEFAULT_SCANCODE_SET;
        self.leds = 0;
        self.typematic = 0;
    }

    fn keyboard_write(&mut self, byte: u8, triggers: &mut Triggers) {
        let kbd = Source::Keyboard;
        if let Some(param) = self.keyboard_param.take() {
            match param {
                KeyboardParam::Leds => {
                    self.leds = byte & 0x07;
                    self.enqueue(&[KBD_ACK], kbd, triggers);
                }
                KeyboardParam::Typematic => {
                    self.typematic = byte & 0x7F;
                    self.enqueue(&[KBD_ACK], kbd, triggers);
                }
                KeyboardParam::ScancodeSet => match byte {
                    0 => self.enqueue(&[KBD_ACK, self.scancode_set], kbd, triggers),
                    1..=3 => {
                        self.scancode_set = byte;
                        self.enqueue(&[KBD_ACK], kbd, triggers);
                    }
                    _ => self.enqueue(&[KBD_RESEND], kbd, triggers),
                },
            }
            return;
        }
        match byte {
            0xFF => {
                self.keyboard_defaults();
                self.scanning = true;
                self.enqueue(&[KBD_ACK, KBD_SELF_TEST_OK], kbd, triggers);
            }
            0xF2 => self.enqueue(&[KBD_ACK, KBD_ID[0], KBD_ID[1]], kbd, triggers),
            0xF4 => {
                self.scanning = true;
                self.enqueue(&[KBD_ACK], kbd, triggers);
            }
            0xF5 => {
                self.keyboard_defaults();
                self.scanning = false;
                self.enqueue(&[KBD_ACK], kbd, triggers);
            }
            0xF6 => {
                self.keyboard_defaults();
                self.enqueue(&[KBD_ACK], kbd, triggers);
            }
            0xED | 0xF0 | 0xF3 => {
                self.keyboard_param = Some(match byte {
                    0xED => KeyboardParam::Leds,
                    0xF0 => KeyboardParam::ScancodeSet,
                    _ => KeyboardParam::Typematic,
                });
                self.enqueue(&[KBD_ACK], kbd, triggers);
            }
            0xEE => self.enqueue(&[KBD_ECHO], kbd, triggers),
            _ => {
                log::debug!("i8042: unknown keyboard command {byte:#04x}");
                self.enqueue(&[KBD_RESEND], kbd, triggers);
            }
        }
    }
}

/// An i8042 PS/2 controller; see the [module documentation](self) for its
/// behaviour.
pub struct I8042 {
    state: Mutex<State>,
    kbd_irq: Arc<dyn InterruptLine>,
    aux_irq: Arc<dyn InterruptLine>,
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042")
            .field("state", &*self.lock_state())
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// Creates a controller signalling keyboard bytes on `kbd_irq` (IRQ 1)
    /// and aux bytes on `aux_irq` (IRQ 12).
    pub fn new(kbd_irq: Arc<dyn InterruptLine>, aux_irq: Arc<dyn InterruptLine>) -> Self {
        Self {
            state: Mutex::new(State::new()),
            kbd_irq,
            aux_irq,
        }
    }

    /// Host → guest keyboard input: queues a scancode byte. Returns whether
    /// it was accepted; it is dropped (and counted in
    /// [`I8042::dropped_output`]) when the keyboard is disabled, not
    /// scanning, or the output buffer is full.
    pub fn push_key(&self, scancode: u8) -> bool {
        let mut triggers = Triggers::default();
        let accepted = {
            let mut st = self.lock_state();
            if st.command_byte & CMD_KBD_DISABLE != 0 || !st.scanning {
                st.dropped_keys = st.dropped_keys.saturating_add(1);
                false
            } else {
                let before = st.dropped_output;
                st.enqueue(&[scancode], Source::Keyboard, &mut triggers);
                st.dropped_output == before
            }
        };
        self.fire(triggers);
        accepted
    }

    /// How many bytes were dropped because the output buffer was full, plus
    /// host keys refused while the keyboard was disabled or not scanning.
    pub fn dropped_output(&self) -> u64 {
        let st = self.lock_state();
        st.dropped_output.saturating_add(st.dropped_keys)
    }

    /// The current command byte (bit 0 keyboard interrupt, bit 1 aux
    /// interrupt, bit 2 SYS, bit 4 keyboard disabled, bit 5 aux disabled,
    /// bit 6 translation).
    pub fn command_byte(&self) -> u8 {
        self.lock_state().command_byte
    }

    /// The state is consistent after every operation, so a poisoned lock is
    /// safe to recover.
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fire(&self, triggers: Triggers) {
        let lines = [
            (triggers.keyboard, &self.kbd_irq, "keyboard"),
            (triggers.aux, &self.aux_irq, "aux"),
        ];
        for (wanted, line, name) in lines {
            if wanted {
                if let Err(e) = line.trigger() {
                    log::warn!("i8042: failed to trigger the {name} interrupt: {e}");
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let mut triggers = Triggers::default();
        match data {
            [byte] if offset == DATA => *byte = self.lock_state().read_data(&mut triggers),
            [byte] if offset == STATUS_COMMAND => *byte = self.lock_state().status(),
            _ => {
                return Err(DeviceError::InvalidAccess {
                    offset,
                    len: data.len(),
                })
            }
        }
        self.fire(triggers);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        let mut triggers = Triggers::default();
        let action = match *data {
            [byte] if offset == DATA => self.lock_state().write_data(byte, &mut triggers),
            [byte] if offset == STATUS_COMMAND => self.lock_state().command(byte, &mut triggers),
            _ => {
                return Err(DeviceError::InvalidAccess {
                    offset,
                    len: data.len(),
                })
            }
        };
        self.fire(triggers);
        Ok(action)
    }
}

/// The guest-visible state of an [`I8042`], for snapshots (see the
/// [module documentation](self#snapshot-state)).
///
/// Encoding (tag `KBC8`, version 1; see [`crate::state`]): `command_byte`,
/// `output_port`, `a2` (bool), `last_read`, `controller_param`,
/// `keyboard_param`, `scanning` (bool), `scancode_set`, `leds`,
/// `typematic` (one byte each unless noted), `dropped_output`,
/// `dropped_keys` (u64 each), `output` (a count of at most
/// [`OUTPUT_CAPACITY`], then per byte the byte and its source: 0 keyboard,
/// 1 aux).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I8042State {
    /// The controller command byte.
    pub command_byte: u8,
    /// The output port: bit 0 the CPU reset line (1 = not in reset), bit 1
    /// the A20 gate.
    pub output_port: u8,
    /// The last write went to the command port (status bit 3).
    pub a2: bool,
    /// The byte a read of an empty output buffer returns.
    pub last_read: u8,
    /// The controller command waiting for a data byte: 0 none, 1 command
    /// byte (`0x60`), 2 output port (`0xD1`), 3 keyboard buffer (`0xD2`),
    /// 4 aux buffer (`0xD3`), 5 aux device (`0xD4`).
    pub controller_param: u8,
    /// The keyboard command waiting for a parameter: 0 none, 1 LEDs
    /// (`0xED`), 2 scancode set (`0xF0`), 3 typematic rate (`0xF3`).
    pub keyboard_param: u8,
    /// The keyboard is scanning (sends host keys).
    pub scanning: bool,
    /// The keyboard's scancode set, 1-3.
    pub scancode_set: u8,
    /// The keyboard LEDs (bits 0-2).
    pub leds: u8,
    /// The typematic rate and delay (bits 0-6).
    pub typematic: u8,
    /// Bytes dropped because the output buffer was full.
    pub dropped_output: u64,
    /// Host keys refused while the keyboard was disabled or not scanning.
    pub dropped_keys: u64,
    /// The output buffer, head first: each byte and whether it comes from
    /// the aux port.
    pub output: Vec<(u8, bool)>,
}

const I8042_TAG: [u8; 4] = *b"KBC8";
const I8042_VERSION: u8 = 1;

fn controller_param_code(p: Option<ControllerParam>) -> u8 {
    match p {
        None => 0,
        Some(ControllerParam::CommandByte) => 1,
        Some(ControllerParam::OutputPort) => 2,
        Some(ControllerParam::KeyboardBuffer) => 3,
        Some(ControllerParam::AuxBuffer) => 4,
        Some(ControllerParam::AuxDevice) => 5,
    }
}

fn controller_param_from(code: u8) -> Option<Option<ControllerParam>> {
    Some(match code {
        0 => None,
        1 => Some(ControllerParam::CommandByte),
        2 => Some(ControllerParam::OutputPort),
        3 => Some(ControllerParam::KeyboardBuffer),
        4 => Some(ControllerParam::AuxBuffer),
        5 => Some(ControllerParam::AuxDevice),
        _ => return None,
    })
}

fn keyboard_param_code(p: Option<KeyboardParam>) -> u8 {
    match p {
        None => 0,
        Some(KeyboardParam::Leds) => 1,
        Some(KeyboardParam::ScancodeSet) => 2,
        Some(KeyboardParam::Typematic) => 3,
    }
}

fn keyboard_param_from(code: u8) -> Option<Option<KeyboardParam>> {
    Some(match code {
        0 => None,
        1 => Some(KeyboardParam::Leds),
        2 => Some(KeyboardParam::ScancodeSet),
        3 => Some(KeyboardParam::Typematic),
        _ => return None,
    })
}

impl I8042State {
    /// Encodes the state (tag `KBC8`, version 1).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(I8042_TAG, I8042_VERSION);
        w.u8(self.command_byte)
            .u8(self.output_port)
            .bool(self.a2)
            .u8(self.last_read)
            .u8(self.controller_param)
            .u8(self.keyboard_param)
            .bool(self.scanning)
            .u8(self.scancode_set)
            .u8(self.leds)
            .u8(self.typematic)
            .u64(self.dropped_output)
            .u64(self.dropped_keys)
            .count(self.output.len());
        for &(byte, aux) in &self.output {
            w.u8(byte).bool(aux);
        }
        w.finish()
    }

    /// Decodes and checks a state written by [`to_bytes`](Self::to_bytes):
    /// parameter codes, the scancode set, LED and typematic bits and the
    /// output buffer's length must be values the controller can reach.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("i8042", bytes, I8042_TAG, I8042_VERSION)?;
        let command_byte = r.u8()?;
        let output_port = r.u8()?;
        let a2 = r.bool("a2")?;
        let last_read = r.u8()?;
        let controller_param = r.u8()?;
        if controller_param_from(controller_param).is_none() {
            return Err(r.invalid("controller_param", format!("code {controller_param}")));
        }
        let keyboard_param = r.u8()?;
        if keyboard_param_from(keyboard_param).is_none() {
            return Err(r.invalid("keyboard_param", format!("code {keyboard_param}")));
        }
        let scanning = r.bool("scanning")?;
        let scancode_set = r.u8()?;
        if !(1..=3).contains(&scancode_set) {
            return Err(r.invalid("scancode_set", format!("set {scancode_set}")));
        }
        let leds = r.u8()?;
        if leds & !0x07 != 0 {
            return Err(r.invalid("leds", format!("{leds:#04x} has bits above 2")));
        }
        let typematic = r.u8()?;
        if typematic & 0x80 != 0 {
            return Err(r.invalid("typematic", format!("{typematic:#04x} has bit 7")));
        }
        let dropped_output = r.u64()?;
        let dropped_keys = r.u64()?;
        let n = r.count("output", 2, OUTPUT_CAPACITY)?;
        let mut output = Vec::with_capacity(n);
        for _ in 0..n {
            let byte = r.u8()?;
            let aux = r.bool("output source")?;
            output.push((byte, aux));
        }
        r.finish()?;
        Ok(Self {
            command_byte,
            output_port,
            a2,
            last_read,
            controller_param,
            keyboard_param,
            scanning,
            scancode_set,
            leds,
            typematic,
            dropped_output,
            dropped_keys,
            output,
        })
    }
}

impl I8042 {
    /// The controller and keyboard state, for a snapshot.
    pub fn save_state(&self) -> I8042State {
        let st = self.lock_state();
        I8042State {
            command_byte: st.command_byte,
            output_port: st.output_port,
            a2: st.a2,
            last_read: st.last_read,
            controller_param: controller_param_code(st.controller_param),
            keyboard_param: keyboard_param_code(st.keyboard_param),
            scanning: st.scanning,
            scancode_set: st.scancode_set,
            leds: st.leds,
            typematic: st.typematic,
            dropped_output: st.dropped_output,
            dropped_keys: st.dropped_keys,
            output: st
                .output
                .iter()
                .map(|&(b, src)| (b, src == Source::Aux))
                .collect(),
        }
    }

    /// Restores a state from [`save_state`](Self::save_state). A state
    /// with values the controller cannot reach is refused and the
    /// controller is left unchanged. No interrupt line is triggered (see
    /// the [module documentation](self#snapshot-state)).
    pub fn restore_state(&self, state: &I8042State) -> Result<(), StateError> {
        // Re-check: the state may have been built in memory.
        I8042State::from_bytes(&state.to_bytes())?;
        let (Some(controller_param), Some(keyboard_param)) = (
            controller_param_from(state.controller_param),
            keyboard_param_from(state.keyboard_param),
        ) else {
            return Err(StateError::Invalid {
                what: "i8042",
                field: "param",
                reason: "unknown parameter code".into(),
            });
        };
        let mut st = self.lock_state();
        st.command_byte = state.command_byte;
        st.output_port = state.output_port;
        st.a2 = state.a2;
        st.last_read = state.last_read;
        st.controller_param = controller_param;
        st.keyboard_param = keyboard_param;
        st.scanning = state.scanning;
        st.scancode_set = state.scancode_set;
        st.leds = state.leds;
        st.typematic = state.typematic;
        st.dropped_output = state.dropped_output;
        st.dropped_keys = state.dropped_keys;
        st.output.clear();
        st.output.extend(
            state
                .output
                .iter()
                .map(|&(b, aux)| (b, if aux { Source::Aux } else { Source::Keyboard })),
        );
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
