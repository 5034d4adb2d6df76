use super::*;
use crate::interrupt::RecordingLine;
use proptest::prelude::*;

/// A host writer whose output the test can inspect.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

struct FailingWriter;

impl Write for FailingWriter {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("pipe closed"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Uart {
    serial: Serial,
    out: SharedBuf,
    irq: Arc<RecordingLine>,
}

impl Uart {
    fn new() -> Self {
        Self::with_capacity(DEFAULT_RX_CAPACITY)
    }

    fn with_capacity(capacity: usize) -> Self {
        let out = SharedBuf::default();
        let irq = Arc::new(RecordingLine::new());
        let serial = Serial::with_rx_capacity(Box::new(out.clone()), irq.clone(), capacity);
        Self { serial, out, irq }
    }

    fn r(&self, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        self.serial.read(offset, &mut b).unwrap();
        b[0]
    }

    fn w(&self, offset: u64, value: u8) {
        assert_eq!(
            self.serial.write(offset, &[value]).unwrap(),
            IoAction::Continue
        );
    }
}

#[test]
fn reset_state() {
    let u = Uart::new();
    assert_eq!(u.r(LSR), LSR_THRE | LSR_TEMT);
    assert_eq!(u.r(IIR_FCR), IIR_NONE);
    assert_eq!(u.r(IER), 0);
    assert_eq!(u.r(MSR), MSR_DCD | MSR_DSR | MSR_CTS);
    assert!(!u.irq.level());
    assert_eq!(u.serial.dropped_input(), 0);
    assert!(format!("{:?}", u.serial).contains("Serial"));
}

#[test]
fn thr_write_goes_to_output_and_lsr_stays_empty() {
    let u = Uart::new();
    for &b in b"hi\n" {
        u.w(DATA, b);
        assert_eq!(u.r(LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    }
    assert_eq!(u.out.contents(), b"hi\n");
    assert!(!u.irq.level(), "no interrupt without IER");
}

#[test]
fn input_sets_dr_and_rbr_pops_in_order() {
    let u = Uart::new();
    assert_eq!(u.serial.push_input(b"ab"), 2);
    assert_eq!(u.r(LSR) & LSR_DR, LSR_DR);
    assert_eq!(u.r(DATA), b'a');
    assert_eq!(u.r(LSR) & LSR_DR, LSR_DR);
    assert_eq!(u.r(DATA), b'b');
    assert_eq!(u.r(LSR) & LSR_DR, 0);
    // Reading an empty receiver is harmless.
    assert_eq!(u.r(DATA), 0);
    assert_eq!(u.r(LSR), LSR_THRE | LSR_TEMT);
}

#[test]
fn rx_overflow_drops_counts_and_sets_overrun_until_lsr_read() {
    let u = Uart::with_capacity(4);
    assert_eq!(u.serial.push_input(b"abcdef"), 4);
    assert_eq!(u.serial.dropped_input(), 2);
    assert_eq!(u.serial.push_input(b"g"), 0);
    assert_eq!(u.serial.dropped_input(), 3);
    let lsr = u.r(LSR);
    assert_eq!(lsr & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
    // OE is cleared by the LSR read; DR stays.
    assert_eq!(u.r(LSR) & (LSR_OE | LSR_DR), LSR_DR);
    let got: Vec<u8> = (0..4).map(|_| u.r(DATA)).collect();
    assert_eq!(got, b"abcd");
    assert_eq!(u.serial.push_input(b"xy"), 2);
    assert_eq!(u.r(LSR) & LSR_OE, 0);
}

#[test]
fn default_capacity_is_64() {
    let u = Uart {
        serial: Serial::new(Box::new(std::io::sink()), Arc::new(RecordingLine::new())),
        out: SharedBuf::default(),
        irq: Arc::new(RecordingLine::new()),
    };
    assert_eq!(u.serial.push_input(&[b'x'; 100]), 64);
    assert_eq!(u.serial.dropped_input(), 36);
}

#[test]
fn zero_capacity_drops_everything() {
    let u = Uart::with_capacity(0);
    assert_eq!(u.serial.push_input(b"abc"), 0);
    assert_eq!(u.serial.dropped_input(), 3);
    assert_eq!(u.r(LSR) & (LSR_OE | LSR_DR), LSR_OE);
}

#[test]
fn dlab_switches_offsets_0_and_1_to_divisor_latch() {
    let u = Uart::new();
    u.w(IER, 0x05);
    u.w(LCR, 0x83); // DLAB + 8 data bits
    u.w(DATA, 0x0c); // DLL: 9600 baud
    u.w(IER, 0x00); // DLM
    assert_eq!(u.r(DATA), 0x0c);
    assert_eq!(u.r(IER), 0x00);
    assert!(u.out.contents().is_empty(), "DLL write must not transmit");
    u.w(LCR, 0x03);
    assert_eq!(u.r(LCR), 0x03);
    assert_eq!(u.r(IER), 0x05, "DLM write must not disturb IER");
    // Input is not consumed by a DLL read.
    u.serial.push_input(b"z");
    u.w(LCR, 0x83);
    assert_eq!(u.r(DATA), 0x0c);
    u.w(LCR, 0x03);
    assert_eq!(u.r(DATA), b'z');
    u.w(DATA, b'!');
    assert_eq!(u.out.contents(), b"!");
}

#[test]
fn loopback_routes_thr_to_rbr_and_mirrors_mcr_in_msr() {
    let u = Uart::new();
    u.w(MCR, MCR_LOOP);
    u.w(DATA, 0x55);
    assert!(u.out.contents().is_empty());
    assert_eq!(u.r(LSR) & LSR_DR, LSR_DR);
    assert_eq!(u.r(DATA), 0x55);
    assert_eq!(u.r(LSR) & LSR_DR, 0);

    // Entering loopback dropped CTS, DSR and DCD: their deltas are set.
    assert_eq!(u.r(MSR), 0x0B);
    assert_eq!(u.r(MSR), 0x00, "delta bits clear on read");

    u.w(MCR, MCR_LOOP | MCR_RTS);
    assert_eq!(u.r(MSR), MSR_CTS | 0x01);
    u.w(MCR, MCR_LOOP | MCR_DTR);
    assert_eq!(u.r(MSR), MSR_DSR | 0x03);
    u.w(MCR, MCR_LOOP | MCR_OUT1);
    assert_eq!(u.r(MSR), MSR_RI | 0x02, "RI rising sets no TERI");
    u.w(MCR, MCR_LOOP | MCR_OUT2);
    assert_eq!(
        u.r(MSR),
        MSR_DCD | MSR_TERI | 0x08,
        "RI trailing edge sets TERI"
    );
    u.w(MCR, MCR_LOOP | 0x0F);
    assert_eq!(u.r(MSR) & 0xF0, 0xF0);

    // Host input is disconnected in loopback.
    assert_eq!(u.serial.push_input(b"q"), 0);
    assert_eq!(u.serial.dropped_input(), 1);
    assert_eq!(u.r(LSR) & (LSR_DR | LSR_OE), 0);

    // Leaving loopback restores the modem lines and output.
    u.w(MCR, 0);
    assert_eq!(u.r(MSR) & 0xF0, MSR_DCD | MSR_DSR | MSR_CTS);
    u.w(DATA, b'k');
    assert_eq!(u.out.contents(), b"k");
    assert_eq!(u.r(MCR), 0);
    u.w(MCR, 0xFF);
    assert_eq!(u.r(MCR), MCR_MASK, "reserved MCR bits read as zero");
}

#[test]
fn iir_priorities() {
    let u = Uart::with_capacity(2);
    u.w(IER, 0x0F);
    // THRE becomes pending as soon as it is enabled.
    assert_eq!(u.r(IIR_FCR), IIR_THRE);
    assert_eq!(u.r(IIR_FCR), IIR_NONE, "THRE cleared by reading IIR");
    // Make everything pending: overrun, data, THRE, modem status.
    u.serial.push_input(b"abc");
    u.w(DATA, b'x');
    u.w(MCR, MCR_LOOP); // modem status change
    u.w(MCR, 0);
    assert!(u.irq.level());
    assert_eq!(u.r(IIR_FCR), IIR_RLS);
    u.r(LSR); // clears OE
    assert_eq!(u.r(IIR_FCR), IIR_RDA);
    assert_eq!(u.r(DATA), b'a');
    assert_eq!(u.r(IIR_FCR), IIR_RDA);
    assert_eq!(u.r(DATA), b'b');
    assert_eq!(u.r(IIR_FCR), IIR_THRE);
    // Reading IIR cleared THRE; modem status is next.
    assert_eq!(u.r(IIR_FCR), IIR_MS);
    assert!(u.irq.level());
    u.r(MSR);
    assert_eq!(u.r(IIR_FCR), IIR_NONE);
    assert!(!u.irq.level());
    assert_eq!(u.out.contents(), b"x");
}

#[test]
fn masked_sources_are_not_reported() {
    let u = Uart::with_capacity(1);
    u.serial.push_input(b"ab"); // data + overrun
    u.w(MCR, MCR_LOOP); // modem deltas
    assert_eq!(u.r(IIR_FCR), IIR_NONE);
    assert!(!u.irq.level());
    u.w(IER, IER_MS);
    assert_eq!(u.r(IIR_FCR), IIR_MS);
    u.w(IER, IER_MS | IER_RDA);
    assert_eq!(u.r(IIR_FCR), IIR_RDA);
    u.w(IER, IER_MS | IER_RDA | IER_RLS);
    assert_eq!(u.r(IIR_FCR), IIR_RLS);
    u.w(IER, 0xFF);
    assert_eq!(u.r(IER), IER_MASK, "reserved IER bits read as zero");
}

#[test]
fn thre_interrupt_clear_on_iir_read_and_rearm_on_thr_write() {
    let u = Uart::new();
    u.w(IER, IER_THRE);
    assert!(u.irq.level());
    assert_eq!(u.irq.asserts(), 1);
    assert_eq!(u.r(IIR_FCR), IIR_THRE);
    assert!(!u.irq.level(), "IIR read cleared the THRE interrupt");
    assert_eq!(u.r(IIR_FCR), IIR_NONE);
    u.w(DATA, b'1');
    assert!(u.irq.level());
    assert_eq!(u.irq.asserts(), 2);
    // A second write while still pending produces a fresh edge.
    u.w(DATA, b'2');
    assert_eq!(u.irq.asserts(), 3);
    assert!(u.irq.level());
    // Disabling the source lowers the line.
    u.w(IER, 0);
    assert!(!u.irq.level());
    assert_eq!(u.r(IIR_FCR), IIR_NONE);
    // Re-enabling with THR empty raises it again.
    u.w(IER, IER_THRE);
    assert!(u.irq.level());
    assert_eq!(u.out.contents(), b"12");
}

#[test]
fn iir_thre_not_cleared_when_not_the_reported_source() {
    let u = Uart::new();
    u.w(IER, IER_THRE | IER_RDA);
    u.serial.push_input(b"a");
    assert_eq!(u.r(IIR_FCR), IIR_RDA);
    u.r(DATA);
    assert_eq!(u.r(IIR_FCR), IIR_THRE, "THRE survived the earlier IIR read");
    assert_eq!(u.r(IIR_FCR), IIR_NONE);
}

#[test]
fn fcr_enable_and_clears() {
    let u = Uart::new();
    u.w(IIR_FCR, FCR_ENABLE);
    assert_eq!(u.r(IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
    u.serial.push_input(b"abc");
    // Clear TX: receive side untouched.
    u.w(IIR_FCR, FCR_ENABLE | FCR_CLEAR_TX);
    assert_eq!(u.r(LSR), LSR_DR | LSR_THRE | LSR_TEMT);
    // Clear RX.
    u.w(IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
    assert_eq!(u.r(LSR), LSR_THRE | LSR_TEMT);
    assert_eq!(u.r(DATA), 0);
    // Disabling the FIFOs also flushes them.
    u.serial.push_input(b"d");
    u.w(IIR_FCR, 0);
    assert_eq!(u.r(LSR) & LSR_DR, 0);
    assert_eq!(u.r(IIR_FCR), IIR_NONE);
    // Enabling does too, and only then.
    u.serial.push_input(b"e");
    u.w(IIR_FCR, FCR_ENABLE);
    assert_eq!(u.r(LSR) & LSR_DR, 0);
    u.serial.push_input(b"f");
    u.w(IIR_FCR, FCR_ENABLE | 0x40);
    assert_eq!(u.r(DATA), b'f');
}

#[test]
fn fcr_clear_rx_lowers_data_interrupt() {
    let u = Uart::new();
    u.w(IIR_FCR, FCR_ENABLE);
    u.w(IER, IER_RDA);
    u.serial.push_input(b"abc");
    assert!(u.irq.level());
    u.w(IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
    assert!(!u.irq.level());
}

#[test]
fn rx_trigger_levels_and_character_timeout() {
    for (bits, level) in [(0u8, 1usize), (1, 4), (2, 8), (3, 14)] {
        let u = Uart::new();
        u.w(IIR_FCR, FCR_ENABLE | (bits << 6));
        u.w(IER, IER_RDA);
        assert_eq!(u.r(IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        u.serial.push_input(&vec![b'x'; level - 1]);
        let expect = if level == 1 { IIR_NONE } else { IIR_TIMEOUT };
        assert_eq!(u.r(IIR_FCR), IIR_FIFO_ENABLED | expect, "level {level}");
        assert_eq!(u.irq.level(), level > 1);
        u.serial.push_input(b"y");
        assert_eq!(u.r(IIR_FCR), IIR_FIFO_ENABLED | IIR_RDA, "level {level}");
        assert!(u.irq.level());
        // Dropping below the trigger turns it back into a timeout.
        u.r(DATA);
        let expect = if level == 1 { IIR_NONE } else { IIR_TIMEOUT };
        assert_eq!(u.r(IIR_FCR), IIR_FIFO_ENABLED | expect, "level {level}");
    }
}

#[test]
fn without_fifo_any_data_is_rda() {
    let u = Uart::new();
    u.w(IIR_FCR, 0xC0); // trigger bits without enable: no FIFO mode
    u.w(IER, IER_RDA);
    u.serial.push_input(b"a");
    assert_eq!(u.r(IIR_FCR), IIR_RDA);
}

#[test]
fn irq_line_follows_pending_state() {
    let u = Uart::new();
    u.w(IER, IER_RDA | IER_RLS);
    assert!(!u.irq.level());
    u.serial.push_input(b"ab");
    assert!(u.irq.level());
    assert_eq!(u.irq.asserts(), 1);
    u.r(DATA);
    assert!(u.irq.level(), "still data");
    u.r(DATA);
    assert!(!u.irq.level());
    u.serial.push_input(b"c");
    assert_eq!(u.irq.asserts(), 2);
    u.w(IER, 0);
    assert!(!u.irq.level(), "masking lowers the line");
    u.w(IER, IER_RDA);
    assert!(u.irq.level());
    assert_eq!(u.irq.asserts(), 3);
}

#[test]
fn out2_does_not_gate_the_line() {
    let u = Uart::new();
    u.w(MCR, 0);
    u.w(IER, IER_RDA);
    u.serial.push_input(b"a");
    assert!(u.irq.level());
}

#[test]
fn scratch_register() {
    let u = Uart::new();
    for v in [0x00, 0x5a, 0xa5, 0xff] {
        u.w(SCR, v);
        assert_eq!(u.r(SCR), v);
    }
    u.w(LCR, 0x80);
    assert_eq!(u.r(SCR), 0xff, "SCR unaffected by DLAB");
}

#[test]
fn lcr_readback_and_read_only_registers() {
    let u = Uart::new();
    u.w(LCR, 0x1b);
    assert_eq!(u.r(LCR), 0x1b);
    u.w(LSR, 0xff);
    assert_eq!(u.r(LSR), LSR_THRE | LSR_TEMT);
    u.w(MSR, 0x0f);
    assert_eq!(u.r(MSR), MSR_DCD | MSR_DSR | MSR_CTS);
}

#[test]
fn invalid_offsets_and_widths_are_errors() {
    let u = Uart::new();
    let mut one = [0u8; 1];
    let mut two = [0u8; 2];
    for offset in [8u64, 9, 0x100, u64::MAX] {
        assert!(matches!(
            u.serial.read(offset, &mut one),
            Err(DeviceError::InvalidAccess { offset: o, len: 1 }) if o == offset
        ));
        assert!(matches!(
            u.serial.write(offset, &[1]),
            Err(DeviceError::InvalidAccess { .. })
        ));
    }
    assert!(matches!(
        u.serial.read(0, &mut two),
        Err(DeviceError::InvalidAccess { offset: 0, len: 2 })
    ));
    assert!(matches!(
        u.serial.write(0, &[1, 2, 3, 4]),
        Err(DeviceError::InvalidAccess { len: 4, .. })
    ));
    assert!(matches!(
        u.serial.read(0, &mut []),
        Err(DeviceError::InvalidAccess { len: 0, .. })
    ));
    assert!(u.serial.write(3, &[]).is_err());
    assert!(u.out.contents().is_empty());
}

#[test]
fn host_write_errors_do_not_fail_the_guest() {
    let serial = Serial::new(Box::new(FailingWriter), Arc::new(RecordingLine::new()));
    for &b in b"abc" {
        assert_eq!(serial.write(DATA, &[b]).unwrap(), IoAction::Continue);
    }
    assert_eq!(serial.output_errors(), 3);
    let mut lsr = [0u8];
    serial.read(LSR, &mut lsr).unwrap();
    assert_eq!(lsr[0], LSR_THRE | LSR_TEMT);
}

#[test]
fn interrupt_line_errors_are_retried_not_fatal() {
    use crate::interrupt::InterruptError;
    use std::sync::atomic::AtomicBool;
    struct Flaky {
        fail: AtomicBool,
        level: AtomicBool,
    }
    impl InterruptLine for Flaky {
        fn assert(&self) -> Result<(), InterruptError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(InterruptError::Other("no route".into()));
            }
            self.level.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn deassert(&self) -> Result<(), InterruptError> {
            self.level.store(false, Ordering::SeqCst);
            Ok(())
        }
    }
    let line = Arc::new(Flaky {
        fail: AtomicBool::new(true),
        level: AtomicBool::new(false),
    });
    let serial = Serial::new(Box::new(std::io::sink()), line.clone());
    serial.write(IER, &[IER_RDA]).unwrap();
    serial.push_input(b"a");
    assert!(!line.level.load(Ordering::SeqCst));
    line.fail.store(false, Ordering::SeqCst);
    serial.push_input(b"b");
    assert!(line.level.load(Ordering::SeqCst), "assert retried");
}

#[test]
fn works_behind_the_io_bus() {
    let io = crate::IoBus::new();
    let out = SharedBuf::default();
    let irq = Arc::new(RecordingLine::new());
    let serial = Arc::new(Serial::new(Box::new(out.clone()), irq.clone()));
    io.pio.insert(0x3f8, 8, serial.clone()).unwrap();
    for &b in b"ok" {
        io.pio_write(0x3f8, &[b]);
    }
    assert_eq!(out.contents(), b"ok");
    // A 2-byte access is refused by the device and counted.
    let mut w = [0u8; 2];
    io.pio_read(0x3f8, &mut w);
    assert_eq!(w, [0xff, 0xff]);
    assert_eq!(io.stats().device_errors, 1);
    serial.push_input(b"k");
    let mut b = [0u8];
    io.pio_read(0x3f8, &mut b);
    assert_eq!(b, *b"k");
}

#[derive(Debug, Clone)]
enum UartOp {
    Read(u64, usize),
    Write(u64, Vec<u8>),
    Push(Vec<u8>),
}

fn uart_op() -> impl Strategy<Value = UartOp> {
    let offset = prop_oneof![8 => 0u64..8, 1 => 8u64..16, 1 => any::<u64>()];
    let len = prop_oneof![8 => Just(1usize), 1 => 0usize..5];
    prop_oneof![
        4 => (offset.clone(), len).prop_map(|(o, l)| UartOp::Read(o, l)),
        4 => (offset, proptest::collection::vec(any::<u8>(), 0..3))
            .prop_map(|(o, d)| UartOp::Write(o, d)),
        2 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(UartOp::Push),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_register_traffic_never_panics_and_keeps_invariants(
        capacity in 0usize..20,
        ops in proptest::collection::vec(uart_op(), 1..120),
    ) {
        let u = Uart::with_capacity(capacity);
        let mut expected_dropped = 0u64;
        for op in ops {
            match op {
                UartOp::Read(offset, len) => {
                    let mut buf = vec![0u8; len];
                    let res = u.serial.read(offset, &mut buf);
                    prop_assert_eq!(res.is_ok(), offset < 8 && len == 1);
                }
                UartOp::Write(offset, data) => {
                    let res = u.serial.write(offset, &data);
                    prop_assert_eq!(res.is_ok(), offset < 8 && data.len() == 1);
                }
                UartOp::Push(bytes) => {
                    let accepted = u.serial.push_input(&bytes);
                    prop_assert!(accepted <= bytes.len());
                    expected_dropped += (bytes.len() - accepted) as u64;
                }
            }
            let st = u.serial.lock_state();
            prop_assert!(st.rx.len() <= capacity, "rx {} > capacity {}", st.rx.len(), capacity);
            prop_assert_eq!(u.irq.level(), st.pending() != IIR_NONE);
            prop_assert_eq!(st.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
            prop_assert_eq!(st.dropped_input, expected_dropped);
        }
    }
}

#[test]
fn input_space_tracks_the_fifo_and_loopback() {
    let u = Uart::with_capacity(4);
    assert_eq!(u.serial.input_space(), 4);
    assert_eq!(u.serial.push_input(b"abc"), 3);
    assert_eq!(u.serial.input_space(), 1);
    // The guest reads one byte: one more fits.
    assert_eq!(u.r(DATA), b'a');
    assert_eq!(u.serial.input_space(), 2);
    // Pushing no more than the space never drops.
    assert_eq!(u.serial.push_input(b"de"), 2);
    assert_eq!(u.serial.input_space(), 0);
    assert_eq!(u.serial.dropped_input(), 0);
    // Loopback disconnects host input.
    u.w(MCR, MCR_LOOP);
    assert_eq!(u.serial.input_space(), 0);
}
