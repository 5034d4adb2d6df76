//! Decodes arbitrary bytes as each device state type: every input is
//! either refused with an error or decodes to a state that encodes back
//! to the same bytes. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmkit_devices::pci::{ConfigSpaceState, MsixState, PciRootState};
use vmkit_devices::{I8042State, RtcState, SerialState};
use vmkit_virtio::devices::console::ConsoleState;
use vmkit_virtio::devices::net::NetState;
use vmkit_virtio::transport::{MmioState, PciState};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SerialState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = ConfigSpaceState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = MsixState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = PciRootState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = MmioState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = PciState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = I8042State::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = RtcState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = ConsoleState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
    if let Ok(s) = NetState::from_bytes(data) {
        assert_eq!(s.to_bytes(), data);
    }
});
