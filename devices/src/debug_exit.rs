//! A debug-exit device: lets a guest end the run with an exit code.
//!
//! This is the classic `isa-debug-exit` used by test kernels. The examples
//! register it on port `0xF4` with a length of 4, so that 1-, 2- and 4-byte
//! `out` instructions all decode:
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_devices::{DebugExit, IoAction, IoBus, StopRequest};
//!
//! let io = IoBus::new();
//! io.pio.insert(0xf4, 4, Arc::new(DebugExit::new())).unwrap();
//! assert_eq!(
//!     io.pio_write(0xf4, &0x1234u16.to_le_bytes()),
//!     IoAction::Stop(StopRequest::Exit(0x1234))
//! );
//! ```
//!
//! Unlike QEMU's device, the exit code is the written value itself, not
//! `(value << 1) | 1`.

use crate::bus::{BusDevice, DeviceError, IoAction, StopRequest};

/// A device whose every write of 1, 2 or 4 bytes asks the run loop to stop
/// with [`StopRequest::Exit`] carrying the little-endian value written.
///
/// The offset within the registered range is ignored. Reads return zeros.
/// Writes of other widths are refused with [`DeviceError::InvalidAccess`].
#[derive(Debug, Default, Clone, Copy)]
pub struct DebugExit;

impl DebugExit {
    /// Creates the device.
    pub fn new() -> Self {
        Self
    }
}

impl BusDevice for DebugExit {
    fn read(&self, _offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        let code = match *data {
            [a] => u32::from(a),
            [a, b] => u32::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            _ => {
                return Err(DeviceError::InvalidAccess {
                    offset,
                    len: data.len(),
                })
            }
        };
        Ok(IoAction::Stop(StopRequest::Exit(code)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_of_1_2_4_bytes_stop_with_le_value() {
        let d = DebugExit::new();
        let exit = |v| IoAction::Stop(StopRequest::Exit(v));
        assert_eq!(d.write(0, &[0x31]).unwrap(), exit(0x31));
        assert_eq!(d.write(0, &[0x34, 0x12]).unwrap(), exit(0x1234));
        assert_eq!(
            d.write(0, &[0x78, 0x56, 0x34, 0x12]).unwrap(),
            exit(0x1234_5678)
        );
        assert_eq!(d.write(0, &[0xff; 4]).unwrap(), exit(u32::MAX));
        assert_eq!(d.write(2, &[0]).unwrap(), exit(0));
    }

    #[test]
    fn other_widths_are_refused() {
        let d = DebugExit;
        for len in [0usize, 3, 5, 8] {
            let err = d.write(1, &vec![1; len]).unwrap_err();
            assert!(
                matches!(err, DeviceError::InvalidAccess { offset: 1, len: l } if l == len),
                "{err:?}"
            );
        }
    }

    #[test]
    fn reads_return_zeros() {
        fn make<T: Default>() -> T {
            T::default()
        }
        let d: DebugExit = make();
        let mut buf = [0xaau8; 4];
        d.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
    }
}
