//! The interface between the root complex and a PCI function.

use std::sync::{Mutex, MutexGuard, PoisonError};

use super::config::{Bar, ConfigSpace, ConfigSpaceState, PciHeader};
use crate::bus::{DeviceError, IoAction};
use crate::state::StateError;

/// A PCI function on the root complex.
///
/// Like [`BusDevice`](crate::BusDevice), every method takes `&self`; the
/// function keeps its state behind its own locks. All offsets, lengths and
/// data come from the guest: implementations must not panic on any of them.
///
/// The root complex calls [`config_write`](Self::config_write) and then
/// [`bars`](Self::bars) and [`command`](Self::command) to learn where the
/// function's BARs now are and whether they decode, and moves their bus
/// mappings to match. Implementations must not call back into the
/// [`PciRoot`](super::PciRoot) from these methods.
pub trait PciDevice: Send + Sync {
    /// Reads `data.len()` bytes of configuration space at `offset`.
    fn config_read(&self, offset: u16, data: &mut [u8]);

    /// Writes `data` to configuration space at `offset`.
    fn config_write(&self, offset: u16, data: &[u8]);

    /// Every implemented BAR with its kind, size and currently programmed
    /// address. The default is no BARs.
    fn bars(&self) -> Vec<Bar> {
        Vec::new()
    }

    /// The command register, whose I/O space (bit 0) and memory space
    /// (bit 1) bits say which BARs decode.
    fn command(&self) -> u16 {
        let mut b = [0u8; 2];
        self.config_read(super::config::COMMAND as u16, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads `data.len()` bytes at `offset` within BAR `bar`. The default
    /// refuses the access (the bus then reads all-ones).
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let _ = bar;
        Err(DeviceError::InvalidAccess {
            offset,
            len: data.len(),
        })
    }

    /// Writes `data` at `offset` within BAR `bar`. The default refuses the
    /// access (the bus then drops it).
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        let _ = bar;
        Err(DeviceError::InvalidAccess {
            offset,
            len: data.len(),
        })
    }
}

/// Vendor ID of the host bridge (Red Hat, as QEMU uses).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// Device ID of the host bridge (QEMU's generic PCIe host bridge).
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;

/// The host bridge at `00:00.0`: class 06/00/00, no BARs, no interrupt.
///
/// # Snapshot state
///
/// Its identity is read-only, but a guest can write the command and status
/// registers and the other writable header bytes (cache line size, latency
/// timer, interrupt line). [`save_state`](Self::save_state) returns the
/// whole configuration space as a [`ConfigSpaceState`] (tag `PCFG`), which
/// [`restore_state`](Self::restore_state) checks and copies back.
#[derive(Debug)]
pub struct HostBridge {
    config: Mutex<ConfigSpace>,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A host bridge with QEMU's generic PCIe host bridge IDs
    /// (`1b36:0008`).
    pub fn new() -> Self {
        let header = PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            revision: 0,
            class_code: (0x06, 0x00, 0x00),
            subsystem_vendor_id: HOST_BRIDGE_VENDOR_ID,
            subsystem_id: 0x1100,
            interrupt_pin: None,
        };
        Self {
            config: Mutex::new(ConfigSpace::new(&header)),
        }
    }

    /// The guest-writable configuration state, for a snapshot.
    pub fn save_state(&self) -> ConfigSpaceState {
        self.config().save_state()
    }

    /// Restores [`save_state`](Self::save_state) into a host bridge; a
    /// state of another function (different identity bytes) is refused
    /// with [`StateError::Mismatch`] and changes nothing.
    pub fn restore_state(&self, state: &ConfigSpaceState) -> Result<(), StateError> {
        self.config().restore_state(state)
    }

    fn config(&self) -> MutexGuard<'_, ConfigSpace> {
        // The space is only changed by non-panicking byte copies, so it is
        // consistent even after a panic elsewhere.
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PciDevice for HostBridge {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        self.config().write(offset, data);
    }

    fn command(&self) -> u16 {
        self.config().command()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_identity_is_read_only() {
        let hb = HostBridge::default();
        let mut id = [0u8; 4];
        hb.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        hb.config_write(0, &[0xff; 4]);
        hb.config_write(8, &[0xff; 4]);
        hb.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        hb.config_read(8, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0600_0000);
        assert!(hb.bars().is_empty());
        hb.config_write(4, &[0x06, 0]);
        assert_eq!(hb.command(), 0x06);
        let mut data = [0u8; 4];
        assert!(hb.bar_read(0, 0, &mut data).is_err());
        assert!(hb.bar_write(0, 0, &data).is_err());
        assert!(format!("{hb:?}").contains("0x1b36"));
    }

    #[test]
    fn host_bridge_state_round_trips() {
        let hb = HostBridge::new();
        hb.config_write(4, &[0x06, 0]);
        hb.config_write(0x3C, &[0x0B]);
        let state = hb.save_state();
        let bytes = state.to_bytes();
        let other = HostBridge::new();
        assert_eq!(other.command(), 0);
        other
            .restore_state(&ConfigSpaceState::from_bytes(&bytes).unwrap())
            .unwrap();
        assert_eq!(other.command(), 0x06);
        assert_eq!(other.save_state(), state);
        // A space with another vendor ID is not this bridge's.
        let mut foreign = state.clone();
        foreign.bytes[0] ^= 1;
        assert!(matches!(
            HostBridge::new().restore_state(&foreign),
            Err(StateError::Mismatch { .. })
        ));
    }
}
