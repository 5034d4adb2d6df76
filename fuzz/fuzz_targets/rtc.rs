//! CMOS RTC register sequences through ports 0x70/0x71 with an arbitrary
//! host clock. Checks that nothing panics, that register D always reports
//! valid RAM and time, and that plain CMOS RAM bytes read back what the
//! guest wrote.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_devices::{BusDevice, Rtc};

#[derive(Arbitrary, Debug)]
enum Op {
    Select(u8),
    Read,
    Write(u8),
    /// An access of odd size or at an odd offset.
    Raw { offset: u8, len: u8, value: u8, write: bool },
}

#[derive(Arbitrary, Debug)]
struct Input {
    clock_secs: u64,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let secs = input.clock_secs % (1 << 40);
    let rtc = Rtc::with_clock(Box::new(move || UNIX_EPOCH + Duration::from_secs(secs)));
    // What the guest last wrote to each plain RAM byte (0x0E..=0x7F except
    // the century byte 0x32).
    let mut model: [Option<u8>; 128] = [None; 128];
    let mut index = 0u8;
    for op in input.ops.into_iter().take(4096) {
        match op {
            Op::Select(i) => {
                index = i & 0x7F;
                let _ = rtc.write(0, &[i]);
            }
            Op::Read => {
                let mut b = [0u8; 1];
                rtc.read(1, &mut b).unwrap();
                if index == 0x0D {
                    assert_eq!(b[0] & 0x80, 0x80, "register D must report VRT");
                }
                if let Some(v) = model[usize::from(index)] {
                    assert_eq!(b[0], v, "CMOS RAM byte {index:#x}");
                }
            }
            Op::Write(v) => {
                let _ = rtc.write(1, &[v]);
                if (0x0E..0x80).contains(&index) && index != 0x32 {
                    model[usize::from(index)] = Some(v);
                }
            }
            Op::Raw { offset, len, value, write } => {
                let mut buf = vec![value; usize::from(len % 9)];
                if write {
                    if rtc.write(u64::from(offset), &buf).is_ok() && offset == 0 && buf.len() == 1 {
                        index = value & 0x7F;
                    }
                    if offset == 1 && buf.len() == 1 && (0x0E..0x80).contains(&index) && index != 0x32 {
                        model[usize::from(index)] = Some(value);
                    }
                } else {
                    let _ = rtc.read(u64::from(offset), &mut buf);
                }
            }
        }
    }
});
