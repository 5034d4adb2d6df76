use super::*;
use crate::interrupt::{NullLine, RecordingLine};
use proptest::prelude::*;

struct Kbc {
    dev: I8042,
    kbd: Arc<RecordingLine>,
    aux: Arc<RecordingLine>,
}

impl Kbc {
    fn new() -> Self {
        let kbd = Arc::new(RecordingLine::new());
        let aux = Arc::new(RecordingLine::new());
        let dev = I8042::new(kbd.clone(), aux.clone());
        Self { dev, kbd, aux }
    }
    fn command(&self, cmd: u8) -> IoAction {
        self.dev.write(4, &[cmd]).unwrap()
    }
    fn data(&self, byte: u8) -> IoAction {
        self.dev.write(0, &[byte]).unwrap()
    }
    fn status(&self) -> u8 {
        let mut b = [0u8];
        self.dev.read(4, &mut b).unwrap();
        b[0]
    }
    fn read_data(&self) -> u8 {
        let mut b = [0u8];
        self.dev.read(0, &mut b).unwrap();
        b[0]
    }
    /// Pops every queued byte.
    fn drain(&self) -> Vec<u8> {
        let mut out = Vec::new();
        while self.status() & STATUS_OBF != 0 {
            out.push(self.read_data());
            assert!(out.len() <= OUTPUT_CAPACITY, "output never drains");
        }
        out
    }
}

#[test]
fn initial_status_and_command_byte() {
    let k = Kbc::new();
    assert_eq!(k.status(), STATUS_UNLOCKED | STATUS_SYS);
    assert_eq!(k.dev.command_byte(), 0x45);
    assert_eq!(k.command(0x20), IoAction::Continue);
    assert_eq!(
        k.status() & (STATUS_OBF | STATUS_A2),
        STATUS_OBF | STATUS_A2
    );
    assert_eq!(k.drain(), vec![0x45]);
    // Reading an empty buffer repeats the last byte.
    assert_eq!(k.read_data(), 0x45);
}

#[test]
fn self_test_replies_0x55_and_sets_sys() {
    let k = Kbc::new();
    k.command(0x60);
    k.data(0x00);
    assert_eq!(k.status() & STATUS_SYS, 0);
    k.command(0xAA);
    assert_eq!(k.status() & STATUS_SYS, STATUS_SYS);
    assert_eq!(k.drain(), vec![0x55]);
    k.command(0xAB);
    k.command(0xA9);
    assert_eq!(k.drain(), vec![0x00, 0x00]);
}

#[test]
fn command_byte_round_trip() {
    let k = Kbc::new();
    k.command(0x60);
    assert_ne!(k.status() & STATUS_A2, 0);
    assert_eq!(k.data(0x33), IoAction::Continue);
    assert_eq!(k.status() & STATUS_A2, 0);
    assert_eq!(k.dev.command_byte(), 0x33);
    k.command(0x20);
    assert_eq!(k.drain(), vec![0x33]);
    // Enable/disable commands flip bits 4 and 5.
    k.command(0xAD);
    k.command(0xA7);
    assert_eq!(k.dev.command_byte(), 0x33 | 0x30);
    k.command(0xAE);
    k.command(0xA8);
    assert_eq!(k.dev.command_byte(), 0x03);
    // The keyboard command path was not involved: nothing queued.
    assert_eq!(k.drain(), Vec::<u8>::new());
}

#[test]
fn keyboard_reset_identify_and_parameters() {
    let k = Kbc::new();
    k.data(0xFF);
    assert_eq!(k.drain(), vec![0xFA, 0xAA]);
    k.data(0xF2);
    assert_eq!(k.drain(), vec![0xFA, 0xAB, 0x83]);
    for cmd in [0xF4, 0xF5, 0xF6] {
        k.data(cmd);
        assert_eq!(k.drain(), vec![0xFA], "command {cmd:#x}");
    }
    k.data(0xED);
    k.data(0x07);
    assert_eq!(k.drain(), vec![0xFA, 0xFA]);
    k.data(0xF3);
    k.data(0x20);
    assert_eq!(k.drain(), vec![0xFA, 0xFA]);
    k.data(0xF0);
    k.data(0x00);
    assert_eq!(k.drain(), vec![0xFA, 0xFA, 0x02]);
    k.data(0xF0);
    k.data(0x03);
    k.data(0xF0);
    k.data(0x00);
    assert_eq!(k.drain(), vec![0xFA, 0xFA, 0xFA, 0xFA, 0x03]);
    k.data(0xF0);
    k.data(0x09);
    assert_eq!(k.drain(), vec![0xFA, 0xFE]);
    k.data(0xEE);
    assert_eq!(k.drain(), vec![0xEE]);
    k.data(0x12);
    assert_eq!(k.drain(), vec![0xFE]);
    // Reset restores scancode set 2.
    k.data(0xFF);
    k.data(0xF0);
    k.data(0x00);
    assert_eq!(k.drain(), vec![0xFA, 0xAA, 0xFA, 0xFA, 0x02]);
}

#[test]
fn ports_and_output_port() {
    let k = Kbc::new();
    k.command(0xC0);
    k.command(0xD0);
    assert_eq!(k.drain(), vec![0x80, 0x03]);
    k.command(0xD1);
    assert_eq!(k.data(0x0F), IoAction::Continue);
    k.command(0xD0);
    assert_eq!(k.drain(), vec![0x0F]);
}

#[test]
fn reset_commands_stop_the_run_loop() {
    let k = Kbc::new();
    assert_eq!(k.command(0xFE), IoAction::Stop(StopRequest::Reset));
    k.command(0xD1);
    assert_eq!(k.data(0x02), IoAction::Stop(StopRequest::Reset));
    // Every pulse command with bit 0 clear pulses the reset line...
    for cmd in [0xF0, 0xF2, 0xFC] {
        assert_eq!(
            k.command(cmd),
            IoAction::Stop(StopRequest::Reset),
            "{cmd:#x}"
        );
    }
    // ...and those with bit 0 set leave it alone.
    for cmd in [0xF1, 0xFD, 0xFF] {
        assert_eq!(k.command(cmd), IoAction::Continue, "{cmd:#x}");
    }
    // Unknown commands too, and they leave nothing queued.
    assert_eq!(k.command(0x05), IoAction::Continue);
    assert_eq!(k.drain(), Vec::<u8>::new());
}

#[test]
fn write_buffers_and_missing_aux_device() {
    let k = Kbc::new();
    k.command(0x60);
    k.data(0x03); // both interrupts on
    k.command(0xD2);
    k.data(0x1C);
    assert_eq!(k.status() & (STATUS_OBF | STATUS_AUX_OBF), STATUS_OBF);
    assert_eq!(k.drain(), vec![0x1C]);
    assert_eq!((k.kbd.asserts(), k.aux.asserts()), (1, 0));
    k.command(0xD3);
    k.data(0x5A);
    assert_eq!(
        k.status() & (STATUS_OBF | STATUS_AUX_OBF),
        STATUS_OBF | STATUS_AUX_OBF
    );
    assert_eq!(k.drain(), vec![0x5A]);
    assert_eq!((k.kbd.asserts(), k.aux.asserts()), (1, 1));
    // A byte for the mouse: no device, answered with 0xFE from aux.
    k.command(0xD4);
    k.data(0xF2);
    assert_ne!(k.status() & STATUS_AUX_OBF, 0);
    assert_eq!(k.drain(), vec![0xFE]);
    assert_eq!((k.kbd.asserts(), k.aux.asserts()), (1, 2));
}

#[test]
fn output_buffer_is_bounded_and_overflow_counted() {
    let k = Kbc::new();
    for i in 0..20 {
        k.command(0xD2);
        k.data(i);
    }
    assert_eq!(k.dev.dropped_output(), 4);
    let out = k.drain();
    assert_eq!(out, (0..16).collect::<Vec<u8>>());
    assert!(k.dev.push_key(0x1E));
    assert_eq!(k.drain(), vec![0x1E]);
}

#[test]
fn irq1_is_triggered_only_when_enabled() {
    let k = Kbc::new();
    // Reset command byte enables the keyboard interrupt.
    assert!(k.dev.push_key(0x1E));
    assert_eq!(k.kbd.asserts(), 1);
    assert!(!k.kbd.level(), "edge: the line is lowered again");
    // A second byte behind the first raises IRQ1 when it reaches the head.
    assert!(k.dev.push_key(0x9E));
    assert_eq!(k.kbd.asserts(), 1);
    assert_eq!(k.read_data(), 0x1E);
    assert_eq!(k.kbd.asserts(), 2);
    assert_eq!(k.read_data(), 0x9E);
    assert_eq!(k.kbd.asserts(), 2);
    // Disable the keyboard interrupt.
    k.command(0x60);
    k.data(0x44);
    assert!(k.dev.push_key(0x1E));
    k.data(0xF2);
    assert_eq!(k.drain(), vec![0x1E, 0xFA, 0xAB, 0x83]);
    assert_eq!(k.kbd.asserts(), 2);
    assert_eq!(k.aux.asserts(), 0);
}

#[test]
fn keys_are_refused_while_disabled_or_not_scanning() {
    let k = Kbc::new();
    k.command(0xAD);
    assert!(!k.dev.push_key(0x1E));
    k.command(0xAE);
    k.data(0xF5);
    assert_eq!(k.drain(), vec![0xFA]);
    assert!(!k.dev.push_key(0x1E));
    assert_eq!(k.dev.dropped_output(), 2);
    k.data(0xF4);
    assert!(k.dev.push_key(0x1E));
    assert_eq!(k.drain(), vec![0xFA, 0x1E]);
}

#[test]
fn bad_accesses_are_refused() {
    let k = Kbc::new();
    for offset in 1..=3 {
        assert!(k.dev.read(offset, &mut [0u8]).is_err());
        assert!(k.dev.write(offset, &[0]).is_err());
    }
    assert!(k.dev.read(0, &mut [0u8; 2]).is_err());
    assert!(k.dev.write(4, &[0xFE, 0xFE]).is_err());
    assert!(k.dev.write(4, &[]).is_err());
    assert!(k.dev.read(5, &mut [0u8]).is_err());
    assert!(format!("{:?}", k.dev).contains("I8042"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_traffic_never_panics_and_stays_bounded(
        ops in proptest::collection::vec(
            (0u64..6, proptest::collection::vec(any::<u8>(), 0..3), any::<bool>()),
            1..200,
        ),
    ) {
        let dev = I8042::new(Arc::new(NullLine), Arc::new(NullLine));
        for (offset, data, is_read) in ops {
            let valid = (offset == 0 || offset == 4) && data.len() == 1;
            if is_read {
                let mut buf = data.clone();
                prop_assert_eq!(dev.read(offset, &mut buf).is_ok(), valid);
            } else {
                let res = dev.write(offset, &data);
                prop_assert_eq!(res.is_ok(), valid);
                if let Ok(IoAction::Stop(stop)) = res {
                    prop_assert_eq!(stop, StopRequest::Reset);
                }
            }
            dev.push_key(0x1E);
            prop_assert!(dev.lock_state().output.len() <= OUTPUT_CAPACITY);
        }
    }
}
