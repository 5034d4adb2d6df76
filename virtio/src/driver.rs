//! A driver-side model of virtio: sets up rings in guest memory and drives
//! a transport through its registers, the way a guest driver does.
//!
//! It exists to test devices and transports without a guest: [`Driver`]
//! negotiates features, lays out split or packed rings, submits descriptor
//! chains (direct or through an indirect table), notifies, and polls the
//! used ring. [`DriverTransport`] hides the transport's register interface
//! ([`MmioDriver`] for virtio-mmio, [`PciDriver`] for virtio-pci). Tests that play a hostile driver write
//! raw descriptors with [`Driver::write_split_desc`] /
//! [`Driver::write_packed_desc`] and publish them with
//! [`Driver::publish_split`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmkit_devices::pci::{
    PciAddress, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY_SPACE,
    STATUS_CAPABILITIES_LIST,
};
use vmkit_devices::{BusDevice, IoBus, MsiMessage};
use vmkit_memory::GuestMemoryMmap;

use crate::queue::RingFormat;
use crate::transport::MmioTransport;
use crate::{features, status};

/// Errors of the driver model.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A register access failed.
    #[error("register access at {offset:#x}: {reason}")]
    Register {
        /// Register offset.
        offset: u64,
        /// What failed.
        reason: String,
    },
    /// The device did not accept the features.
    #[error("device refused features {0:#x}")]
    FeaturesRefused(u64),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// No free descriptors.
    #[error("queue {0} is full")]
    Full(u16),
    /// The queue does not exist or was not set up.
    #[error("no queue {0}")]
    NoQueue(u16),
    /// Nothing came back in time.
    #[error("queue {0}: no used buffer within the timeout")]
    Timeout(u16),
    /// The device set DEVICE_NEEDS_RESET.
    #[error("device needs reset")]
    NeedsReset,
    /// A PCI function is not a usable virtio-pci device.
    #[error("virtio-pci probe of {address}: {reason}")]
    Probe {
        /// The function.
        address: vmkit_devices::PciAddress,
        /// What is missing or wrong.
        reason: String,
    },
}

/// The register-level operations a driver needs from a transport.
pub trait DriverTransport {
    /// Reads the device status.
    fn status(&self) -> Result<u32, DriverError>;
    /// Writes the device status (0 resets).
    fn set_status(&self, v: u32) -> Result<(), DriverError>;
    /// The device's 64 feature bits.
    fn device_features(&self) -> Result<u64, DriverError>;
    /// Writes the driver's 64 feature bits.
    fn set_driver_features(&self, f: u64) -> Result<(), DriverError>;
    /// Number of queues (the first index whose maximum size is 0).
    fn num_queues(&self) -> Result<u16, DriverError>;
    /// Maximum size of queue `q`.
    fn queue_max(&self, q: u16) -> Result<u16, DriverError>;
    /// Programs queue `q` and enables it.
    fn setup_queue(
        &self,
        q: u16,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), DriverError>;
    /// Notifies queue `q`.
    fn notify(&self, q: u16) -> Result<(), DriverError>;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DriverError>;
    /// Reads and acknowledges the interrupt status (bit 0 used buffer,
    /// bit 1 configuration change).
    fn take_interrupt(&self) -> Result<u32, DriverError>;
    /// Reads the configuration generation.
    fn config_generation(&self) -> Result<u32, DriverError>;
}

/// [`DriverTransport`] over a virtio-mmio register window.
#[derive(Debug, Clone)]
pub struct MmioDriver {
    dev: Arc<dyn BusDeviceDebug>,
}

/// A bus device that can be printed (for the driver model's `Debug`).
pub trait BusDeviceDebug: BusDevice + std::fmt::Debug {}
impl<T: BusDevice + std::fmt::Debug> BusDeviceDebug for T {}

impl MmioDriver {
    /// Drives `transport` directly through its `BusDevice` methods.
    pub fn new(transport: Arc<MmioTransport>) -> Self {
        Self { dev: transport }
    }

    /// Drives any virtio-mmio register window (e.g. one reached through a
    /// bus at a base address).
    pub fn with_device(dev: Arc<dyn BusDeviceDebug>) -> Self {
        Self { dev }
    }

    fn r(&self, offset: u32) -> Result<u32, DriverError> {
        let mut b = [0u8; 4];
        self.dev
            .read(u64::from(offset), &mut b)
            .map_err(|e| DriverError::Register {
                offset: offset.into(),
                reason: e.to_string(),
            })?;
        Ok(u32::from_le_bytes(b))
    }

    fn w(&self, offset: u32, v: u32) -> Result<(), DriverError> {
        self.dev
            .write(u64::from(offset), &v.to_le_bytes())
            .map(|_| ())
            .map_err(|e| DriverError::Register {
                offset: offset.into(),
                reason: e.to_string(),
            })
    }
}

impl DriverTransport for MmioDriver {
    fn status(&self) -> Result<u32, DriverError> {
        self.r(VIRTIO_MMIO_STATUS)
    }
    fn set_status(&self, v: u32) -> Result<(), DriverError> {
        self.w(VIRTIO_MMIO_STATUS, v)
    }
    fn device_features(&self) -> Result<u64, DriverError> {
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)?;
        let lo = self.r(VIRTIO_MMIO_DEVICE_FEATURES)?;
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)?;
        let hi = self.r(VIRTIO_MMIO_DEVICE_FEATURES)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }
    fn set_driver_features(&self, f: u64) -> Result<(), DriverError> {
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)?;
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, f as u32)?;
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)?;
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32)
    }
    fn num_queues(&self) -> Result<u16, DriverError> {
        for q in 0..u16::MAX {
            if self.queue_max(q)? == 0 {
                return Ok(q);
            }
        }
        Ok(u16::MAX)
    }
    fn queue_max(&self, q: u16) -> Result<u16, DriverError> {
        self.w(VIRTIO_MMIO_QUEUE_SEL, q.into())?;
        Ok(self.r(VIRTIO_MMIO_QUEUE_NUM_MAX)? as u16)
    }
    fn setup_queue(
        &self,
        q: u16,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), DriverError> {
        self.w(VIRTIO_MMIO_QUEUE_SEL, q.into())?;
        self.w(VIRTIO_MMIO_QUEUE_NUM, size.into())?;
        self.w(VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32)?;
        self.w(VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32)?;
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, driver as u32)?;
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (driver >> 32) as u32)?;
        self.w(VIRTIO_MMIO_QUEUE_USED_LOW, device as u32)?;
        self.w(VIRTIO_MMIO_QUEUE_USED_HIGH, (device >> 32) as u32)?;
        self.w(VIRTIO_MMIO_QUEUE_READY, 1)
    }
    fn notify(&self, q: u16) -> Result<(), DriverError> {
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, q.into())
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DriverError> {
        self.dev
            .read(u64::from(VIRTIO_MMIO_CONFIG) + offset, data)
            .map_err(|e| DriverError::Register {
                offset,
                reason: e.to_string(),
            })
    }
    fn take_interrupt(&self) -> Result<u32, DriverError> {
        let isr = self.r(VIRTIO_MMIO_INTERRUPT_STATUS)?;
        self.w(VIRTIO_MMIO_INTERRUPT_ACK, isr)?;
        Ok(isr)
    }
    fn config_generation(&self) -> Result<u32, DriverError> {
        self.r(VIRTIO_MMIO_CONFIG_GENERATION)
    }
}

/// How a [`PciDriver`] reaches configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciConfigAccess {
    /// The legacy mechanism: `CONFIG_ADDRESS` at port 0xCF8, data at
    /// 0xCFC..=0xCFF.
    Ports,
    /// ECAM for bus 0 at this MMIO base.
    Ecam(u64),
}

/// Where a [`PciDriver`] found the virtio structures: guest-physical
/// addresses (from the BARs at probe time) and capability offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciLayout {
    /// Common configuration.
    pub common: u64,
    /// Notification area.
    pub notify: u64,
    /// `notify_off_multiplier`.
    pub notify_multiplier: u32,
    /// ISR status.
    pub isr: u64,
    /// Device configuration (0 if the device has none).
    pub device: u64,
    /// Offset of the COMMON_CFG capability in configuration space.
    pub common_cap: u16,
    /// Offset of the NOTIFY_CFG capability.
    pub notify_cap: u16,
    /// Offset of the ISR_CFG capability.
    pub isr_cap: u16,
    /// Offset of the DEVICE_CFG capability (0 if absent).
    pub device_cap: u16,
    /// Offset of the PCI_CFG capability (0 if absent).
    pub pci_cfg_cap: u16,
    /// Offset of the MSI-X capability (0 if absent).
    pub msix_cap: u16,
    /// MSI-X table address (0 without MSI-X).
    pub msix_table: u64,
    /// MSI-X PBA address (0 without MSI-X).
    pub msix_pba: u64,
    /// MSI-X table size in vectors (0 without MSI-X).
    pub msix_vectors: u16,
}

/// [`DriverTransport`] over a modern virtio-pci function, reached as a
/// guest reaches it: configuration space through ports 0xCF8/0xCFC or ECAM
/// and the structures through the MMIO bus at the addresses the BARs hold.
///
/// [`PciDriver::probe`] does what Linux's `virtio_pci_modern` probe does:
/// checks the IDs, enables memory decoding and bus mastering, walks the
/// capability list for the first COMMON, NOTIFY, ISR, DEVICE and PCI_CFG
/// structures in a memory BAR, and finds the MSI-X table. Queue set-up
/// writes the 64-bit addresses as two 32-bit halves, reads
/// `queue_notify_off` for the notify address, and with
/// [`PciDriver::assign_msix`] programs and checks the MSI-X vectors.
#[derive(Debug)]
pub struct PciDriver {
    bus: Arc<IoBus>,
    address: PciAddress,
    access: PciConfigAccess,
    layout: PciLayout,
    /// Notify address of each queue set up.
    notify_addrs: Mutex<HashMap<u16, u64>>,
    /// Config vector and per-queue vectors to program at set-up.
    vectors: Mutex<Option<(u16, Vec<u16>)>>,
}

/// Most capabilities a walk follows (256 bytes of 4-byte aligned
/// capabilities after the header), so that a looping list ends.
const MAX_CAPABILITIES: usize = 48;

impl PciDriver {
    /// Probes the virtio-pci function at `address` on `bus`.
    pub fn probe(
        bus: Arc<IoBus>,
        address: PciAddress,
        access: PciConfigAccess,
    ) -> Result<Self, DriverError> {
        let mut d = Self {
            bus,
            address,
            access,
            layout: PciLayout::default(),
            notify_addrs: Mutex::new(HashMap::new()),
            vectors: Mutex::new(None),
        };
        let fail = |reason: String| DriverError::Probe { address, reason };
        let vendor = d.config_read16(0x00);
        let device = d.config_read16(0x02);
        if vendor != 0x1AF4 || !(0x1040..=0x107F).contains(&device) {
            return Err(fail(format!(
                "{vendor:04x}:{device:04x} is not a modern virtio device"
            )));
        }
        // pci_enable_device + pci_set_master.
        let command = d.config_read16(0x04);
        d.config_write16(0x04, command | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
        if d.config_read16(0x06) & STATUS_CAPABILITIES_LIST == 0 {
            return Err(fail("no capability list".into()));
        }
        let mut l = PciLayout::default();
        let mut ptr = d.config_read8(0x34) & !3;
        for _ in 0..MAX_CAPABILITIES {
            if ptr == 0 {
                break;
            }
            let at = u16::from(ptr);
            match d.config_read8(at) {
                0x09 => {
                    let cfg_type = d.config_read8(at + 3);
                    let bar = d.config_read8(at + 4);
                    let offset = d.config_read32(at + 8);
                    let (slot, addr) = match cfg_type {
                        1 => (&mut l.common_cap, &mut l.common),
                        2 => (&mut l.notify_cap, &mut l.notify),
                        3 => (&mut l.isr_cap, &mut l.isr),
                        4 => (&mut l.device_cap, &mut l.device),
                        5 => {
                            if l.pci_cfg_cap == 0 {
                                l.pci_cfg_cap = at;
                            }
                            ptr = d.config_read8(at + 1) & !3;
                            continue;
                        }
                        _ => {
                            ptr = d.config_read8(at + 1) & !3;
                            continue;
                        }
                    };
                    // The first structure of each type in a memory BAR,
                    // as Linux picks it.
                    if *slot == 0 {
                        if let Some(base) = d.memory_bar(bar) {
                            *slot = at;
                            *addr = base + u64::from(offset);
                            if cfg_type == 2 {
                                l.notify_multiplier = d.config_read32(at + 16);
                            }
                        }
                    }
                }
                0x11 if l.msix_cap == 0 => {
                    let control = d.config_read16(at + 2);
                    let table = d.config_read32(at + 4);
                    let pba = d.config_read32(at + 8);
                    if let (Some(t), Some(p)) = (
                        d.memory_bar((table & 7) as u8),
                        d.memory_bar((pba & 7) as u8),
                    ) {
                        l.msix_cap = at;
                        l.msix_vectors = (control & 0x7FF) + 1;
                        l.msix_table = t + u64::from(table & !7);
                        l.msix_pba = p + u64::from(pba & !7);
                    }
                }
                _ => {}
            }
            ptr = d.config_read8(at + 1) & !3;
        }
        if l.common_cap == 0 || l.notify_cap == 0 || l.isr_cap == 0 {
            return Err(fail("missing common, notify or ISR capability".into()));
        }
        d.layout = l;
        Ok(d)
    }

    /// The function's address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The bus the driver uses.
    pub fn bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    /// Where the structures were found.
    pub fn layout(&self) -> PciLayout {
        self.layout
    }

    /// The base address of BAR `index` if it is an enabled memory BAR.
    fn memory_bar(&self, index: u8) -> Option<u64> {
        if index > 5 {
            return None;
        }
        let reg = 0x10 + 4 * u16::from(index);
        let low = self.config_read32(reg);
        if low & 1 != 0 {
            return None;
        }
        let mut base = u64::from(low & !0xF);
        if (low >> 1) & 3 == 2 {
            if index == 5 {
                return None;
            }
            base |= u64::from(self.config_read32(reg + 4)) << 32;
        }
        Some(base)
    }

    /// Reads configuration space (accesses of 1, 2 or 4 bytes within one
    /// dword; others read all-ones).
    pub fn config_read(&self, offset: u16, data: &mut [u8]) {
        match self.access {
            PciConfigAccess::Ports => {
                let reg = u8::try_from(offset & 0xFC).unwrap_or(0);
                self.bus
                    .pio_write(0xCF8, &self.address.config_address(reg).to_le_bytes());
                self.bus.pio_read(0xCFC + (offset & 3), data);
            }
            PciConfigAccess::Ecam(base) => self
                .bus
                .mmio_read(base + self.address.ecam_offset(offset), data),
        }
    }

    /// Writes configuration space.
    pub fn config_write(&self, offset: u16, data: &[u8]) {
        match self.access {
            PciConfigAccess::Ports => {
                let reg = u8::try_from(offset & 0xFC).unwrap_or(0);
                self.bus
                    .pio_write(0xCF8, &self.address.config_address(reg).to_le_bytes());
                self.bus.pio_write(0xCFC + (offset & 3), data);
            }
            PciConfigAccess::Ecam(base) => {
                self.bus
                    .mmio_write(base + self.address.ecam_offset(offset), data);
            }
        }
    }

    /// Reads a configuration byte.
    pub fn config_read8(&self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b);
        b[0]
    }

    /// Reads a configuration word.
    pub fn config_read16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a configuration dword.
    pub fn config_read32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a configuration word.
    pub fn config_write16(&self, offset: u16, v: u16) {
        self.config_write(offset, &v.to_le_bytes());
    }

    /// Writes a configuration dword.
    pub fn config_write32(&self, offset: u16, v: u32) {
        self.config_write(offset, &v.to_le_bytes());
    }

    /// Reads `width` (1, 2, 4 or 8) bytes of MMIO at `addr`.
    pub fn mmio_read(&self, addr: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        let n = width.min(8);
        self.bus.mmio_read(addr, &mut b[..n]);
        u64::from_le_bytes(b)
    }

    /// Writes the low `width` (1, 2, 4 or 8) bytes of `v` at `addr`.
    pub fn mmio_write(&self, addr: u64, width: usize, v: u64) {
        let n = width.min(8);
        self.bus.mmio_write(addr, &v.to_le_bytes()[..n]);
    }

    fn common_read(&self, field: u64, width: usize) -> u64 {
        self.mmio_read(self.layout.common + field, width)
    }

    fn common_write(&self, field: u64, width: usize, v: u64) {
        self.mmio_write(self.layout.common + field, width, v);
    }

    /// Sets or clears COMMAND.INTX_DISABLE.
    pub fn set_intx_disable(&self, disable: bool) {
        let command = self.config_read16(0x04);
        let command = if disable {
            command | COMMAND_INTX_DISABLE
        } else {
            command & !COMMAND_INTX_DISABLE
        };
        self.config_write16(0x04, command);
    }

    /// Enables (or disables) MSI-X with the function mask clear, as
    /// `pci_enable_msix` does. Fails without an MSI-X capability.
    pub fn set_msix_enabled(&self, enable: bool) -> Result<(), DriverError> {
        let cap = self.layout.msix_cap;
        if cap == 0 {
            return Err(DriverError::Probe {
                address: self.address,
                reason: "no MSI-X capability".into(),
            });
        }
        let control = self.config_read16(cap + 2) & !(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        let control = if enable {
            control | MSIX_ENABLE
        } else {
            control
        };
        self.config_write16(cap + 2, control);
        Ok(())
    }

    /// Programs MSI-X table entry `vector` with `message`, masked or not.
    pub fn set_msix_entry(&self, vector: u16, message: MsiMessage, masked: bool) {
        let at = self.layout.msix_table + 16 * u64::from(vector);
        self.mmio_write(at, 4, message.address & 0xFFFF_FFFF);
        self.mmio_write(at + 4, 4, message.address >> 32);
        self.mmio_write(at + 8, 4, u64::from(message.data));
        self.mmio_write(at + 12, 4, u64::from(masked));
    }

    /// Sets or clears the mask bit of MSI-X table entry `vector`.
    pub fn set_msix_masked(&self, vector: u16, masked: bool) {
        let at = self.layout.msix_table + 16 * u64::from(vector) + 12;
        self.mmio_write(at, 4, u64::from(masked));
    }

    /// Whether `vector`'s pending bit is set in the PBA.
    pub fn msix_pending(&self, vector: u16) -> bool {
        let word = self.mmio_read(self.layout.msix_pba + 8 * u64::from(vector / 64), 8);
        word & (1 << (vector % 64)) != 0
    }

    /// Asks for MSI-X vector `config` for configuration changes and
    /// `queues[i]` for queue `i` at the next set-up: the configuration
    /// vector is written when the driver sets FEATURES_OK (the vectors
    /// read back as NO_VECTOR after a reset), each queue's vector in
    /// [`DriverTransport::setup_queue`], and each is read back as Linux
    /// does; a refused vector fails the set-up.
    pub fn assign_msix(&self, config: u16, queues: &[u16]) {
        *lock_ignoring_poison(&self.vectors) = Some((config, queues.to_vec()));
    }

    /// Writes `config_msix_vector` and returns what it reads back.
    pub fn set_config_vector(&self, vector: u16) -> u16 {
        self.common_write(0x10, 2, u64::from(vector));
        self.common_read(0x10, 2) as u16
    }

    /// Writes queue `q`'s `queue_msix_vector` and returns what it reads
    /// back.
    pub fn set_queue_vector(&self, q: u16, vector: u16) -> u16 {
        self.common_write(0x16, 2, u64::from(q));
        self.common_write(0x1A, 2, u64::from(vector));
        self.common_read(0x1A, 2) as u16
    }

    fn refused_vector(&self, what: &str, vector: u16) -> DriverError {
        DriverError::Probe {
            address: self.address,
            reason: format!("{what}: MSI-X vector {vector} refused"),
        }
    }
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const MSI_NO_VECTOR: u16 = 0xFFFF;

impl DriverTransport for PciDriver {
    fn status(&self) -> Result<u32, DriverError> {
        Ok(self.common_read(0x14, 1) as u32)
    }
    fn set_status(&self, v: u32) -> Result<(), DriverError> {
        self.common_write(0x14, 1, u64::from(v & 0xFF));
        if v == 0 {
            // The reset is complete when the status reads back 0.
            let mut tries = 0u32;
            while self.status()? != 0 {
                tries += 1;
                if tries > 1000 {
                    return Err(DriverError::Register {
                        offset: 0x14,
                        reason: "device reset did not complete".into(),
                    });
                }
                std::thread::yield_now();
            }
            lock_ignoring_poison(&self.notify_addrs).clear();
        } else if v & status::FEATURES_OK != 0 && v & status::DRIVER_OK == 0 {
            let wanted = lock_ignoring_poison(&self.vectors)
                .as_ref()
                .map(|(c, _)| *c);
            if let Some(c) = wanted {
                if self.set_config_vector(c) != c {
                    return Err(self.refused_vector("configuration", c));
                }
            }
        }
        Ok(())
    }
    fn device_features(&self) -> Result<u64, DriverError> {
        self.common_write(0x00, 4, 0);
        let lo = self.common_read(0x04, 4);
        self.common_write(0x00, 4, 1);
        let hi = self.common_read(0x04, 4);
        Ok(lo | (hi << 32))
    }
    fn set_driver_features(&self, f: u64) -> Result<(), DriverError> {
        self.common_write(0x08, 4, 0);
        self.common_write(0x0C, 4, f & 0xFFFF_FFFF);
        self.common_write(0x08, 4, 1);
        self.common_write(0x0C, 4, f >> 32);
        Ok(())
    }
    fn num_queues(&self) -> Result<u16, DriverError> {
        Ok(self.common_read(0x12, 2) as u16)
    }
    fn queue_max(&self, q: u16) -> Result<u16, DriverError> {
        self.common_write(0x16, 2, u64::from(q));
        Ok(self.common_read(0x18, 2) as u16)
    }
    fn setup_queue(
        &self,
        q: u16,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), DriverError> {
        self.common_write(0x16, 2, u64::from(q));
        self.common_write(0x18, 2, u64::from(size));
        for (field, v) in [(0x20, desc), (0x28, driver), (0x30, device)] {
            self.common_write(field, 4, v & 0xFFFF_FFFF);
            self.common_write(field + 4, 4, v >> 32);
        }
        let off = self.common_read(0x1E, 2);
        let addr = self.layout.notify + off * u64::from(self.layout.notify_multiplier);
        lock_ignoring_poison(&self.notify_addrs).insert(q, addr);
        let wanted = lock_ignoring_poison(&self.vectors)
            .as_ref()
            .map(|(_, qs)| qs.get(usize::from(q)).copied().unwrap_or(MSI_NO_VECTOR));
        if let Some(v) = wanted {
            if self.set_queue_vector(q, v) != v {
                return Err(self.refused_vector("queue", v));
            }
        }
        self.common_write(0x1C, 2, 1);
        Ok(())
    }
    fn notify(&self, q: u16) -> Result<(), DriverError> {
        let known = lock_ignoring_poison(&self.notify_addrs).get(&q).copied();
        let addr = match known {
            Some(a) => a,
            None => {
                self.common_write(0x16, 2, u64::from(q));
                let off = self.common_read(0x1E, 2);
                self.layout.notify + off * u64::from(self.layout.notify_multiplier)
            }
        };
        self.mmio_write(addr, 2, u64::from(q));
        Ok(())
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DriverError> {
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let width = [4usize, 2, 1]
                .into_iter()
                .find(|&w| rest.len() >= w && at % w as u64 == 0)
                .unwrap_or(1);
            let (chunk, tail) = rest.split_at_mut(width);
            self.bus.mmio_read(self.layout.device + at, chunk);
            at += width as u64;
            rest = tail;
        }
        Ok(())
    }
    fn take_interrupt(&self) -> Result<u32, DriverError> {
        Ok(self.mmio_read(self.layout.isr, 1) as u32)
    }
    fn config_generation(&self) -> Result<u32, DriverError> {
        Ok(self.common_read(0x15, 1) as u32)
    }
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// Driver-side state of one queue.
#[derive(Debug)]
struct DriverQueue {
    format: RingFormat,
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    /// Split: free descriptor indices; packed: free buffer IDs.
    free: Vec<u16>,
    /// Split: descriptors of each in-flight head; packed: ring slots of
    /// each in-flight buffer ID. Indexed by head / ID (`size` entries);
    /// empty when not in flight (a chain has at least one descriptor).
    /// The vectors keep their capacity, so a steady stream of requests
    /// allocates nothing.
    inflight: Vec<Vec<u16>>,
    /// Split: our avail idx; packed: next ring slot.
    next_avail: u16,
    avail_wrap: bool,
    /// Split: last used idx seen; packed: next used slot.
    last_used: u16,
    used_wrap: bool,
    /// Packed: ring slots still in use (a slot is freed when its buffer is
    /// used).
    slots_in_use: u16,
}

/// A virtio driver model over a [`DriverTransport`].
#[derive(Debug)]
pub struct Driver<T> {
    transport: T,
    mem: GuestMemoryMmap,
    alloc_next: u64,
    queues: Vec<Option<DriverQueue>>,
    features: u64,
    /// Reused by [`Driver::submit`] for the chain it builds.
    scratch: Vec<(u64, u32, u16)>,
}

/// A descriptor as hostile tests write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Split: `next`; packed: buffer ID.
    pub id_or_next: u16,
    /// Flags (NEXT 1, WRITE 2, INDIRECT 4).
    pub flags: u16,
}

/// Shorthand for a [`RawDesc`].
pub fn raw(addr: u64, len: u32, flags: u16, id_or_next: u16) -> RawDesc {
    RawDesc {
        addr,
        len,
        id_or_next,
        flags,
    }
}

/// One buffer of a chain to submit: guest-physical address and length.
pub type Buf = (u64, u32);

impl<T: DriverTransport> Driver<T> {
    /// A driver that allocates rings and buffers upward from `heap` in
    /// `mem`.
    pub fn new(transport: T, mem: GuestMemoryMmap, heap: u64) -> Self {
        Self {
            transport,
            mem,
            alloc_next: heap,
            queues: Vec::new(),
            features: 0,
            scratch: Vec::new(),
        }
    }

    /// Moves the driver, with its rings' bookkeeping (free descriptors,
    /// chains in flight, ring positions), onto another transport and
    /// guest memory: for snapshot tests that restore a device into a
    /// fresh transport over a copy of guest memory and continue.
    pub fn rebind<U: DriverTransport>(self, transport: U, mem: GuestMemoryMmap) -> Driver<U> {
        Driver {
            transport,
            mem,
            alloc_next: self.alloc_next,
            queues: self.queues,
            features: self.features,
            scratch: self.scratch,
        }
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Allocates `len` bytes (16-aligned) of guest memory, zeroed.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = (self.alloc_next + 15) & !15;
        self.alloc_next = at + len.max(1);
        let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
        // Allocation is a test convenience: a region outside memory shows
        // up as a failed access later.
        let _ = self.mem.write_slice(&zeros, GuestAddress(at));
        at
    }

    /// Resets the device and runs the initialisation sequence (virtio 1.2,
    /// 3.1.1): acknowledges it, accepts `VERSION_1`, the ring features it
    /// offers, `RING_PACKED` for `format` and the device features in
    /// `wanted`, sets up every queue at its maximum size (at most 256) and
    /// sets DRIVER_OK. Returns the negotiated features.
    pub fn negotiate(&mut self, format: RingFormat, wanted: u64) -> Result<u64, DriverError> {
        self.negotiate_with(format, wanted, None)
    }

    /// Like [`Driver::negotiate`] with an explicit queue size.
    pub fn negotiate_with(
        &mut self,
        format: RingFormat,
        wanted: u64,
        queue_size: Option<u16>,
    ) -> Result<u64, DriverError> {
        let t = &self.transport;
        t.set_status(0)?;
        t.set_status(status::ACKNOWLEDGE)?;
        t.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
        let offered = t.device_features()?;
        let mut want = wanted
            | (1 << features::VERSION_1)
            | (1 << features::RING_INDIRECT_DESC)
            | (1 << features::RING_EVENT_IDX);
        if format == RingFormat::Packed {
            want |= 1 << features::RING_PACKED;
        }
        let f = offered & want;
        if f & (1 << features::VERSION_1) == 0
            || (format == RingFormat::Packed && f & (1 << features::RING_PACKED) == 0)
        {
            return Err(DriverError::FeaturesRefused(want));
        }
        t.set_driver_features(f)?;
        t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)?;
        if t.status()? & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused(f));
        }
        self.features = f;
        let n = self.transport.num_queues()?;
        self.queues.clear();
        for q in 0..n {
            let max = self.transport.queue_max(q)?;
            let size = queue_size.unwrap_or(max.min(256)).min(max);
            let qs = u64::from(size);
            let (desc, driver, device) = match format {
                RingFormat::Split => (
                    self.alloc(16 * qs),
                    self.alloc(6 + 2 * qs),
                    self.alloc(6 + 8 * qs),
                ),
                RingFormat::Packed => (self.alloc(16 * qs), self.alloc(4), self.alloc(4)),
            };
            self.transport.setup_queue(q, size, desc, driver, device)?;
            let free = match format {
                RingFormat::Split => (0..size).rev().collect(),
                RingFormat::Packed => (0..size).rev().collect(),
            };
            self.queues.push(Some(DriverQueue {
                format,
                size,
                desc,
                driver,
                device,
                free,
                inflight: vec![Vec::new(); usize::from(size)],
                next_avail: 0,
                avail_wrap: true,
                last_used: 0,
                used_wrap: true,
                slots_in_use: 0,
            }));
        }
        self.transport.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        )?;
        if self.transport.status()? & status::DEVICE_NEEDS_RESET != 0 {
            return Err(DriverError::NeedsReset);
        }
        Ok(f)
    }

    fn queue(&mut self, q: u16) -> Result<&mut DriverQueue, DriverError> {
        self.queues
            .get_mut(usize::from(q))
            .and_then(Option::as_mut)
            .ok_or(DriverError::NoQueue(q))
    }

    /// The ring addresses of queue `q`: descriptors, driver area, device
    /// area.
    pub fn ring_addresses(&self, q: u16) -> Option<(u64, u64, u64)> {
        let dq = self.queues.get(usize::from(q))?.as_ref()?;
        Some((dq.desc, dq.driver, dq.device))
    }

    /// Submits a chain of `readable` then `writable` buffers on queue `q`
    /// as direct descriptors. Returns its head index / buffer ID.
    pub fn submit(
        &mut self,
        q: u16,
        readable: &[Buf],
        writable: &[Buf],
    ) -> Result<u16, DriverError> {
        let mut descs = std::mem::take(&mut self.scratch);
        descs.clear();
        descs.extend(
            readable
                .iter()
                .map(|&(a, l)| (a, l, 0))
                .chain(writable.iter().map(|&(a, l)| (a, l, F_WRITE))),
        );
        let r = match self.queue(q).map(|dq| dq.format) {
            Ok(RingFormat::Split) => self.submit_split(q, &descs),
            Ok(RingFormat::Packed) => self.submit_packed(q, &descs),
            Err(e) => Err(e),
        };
        self.scratch = descs;
        r
    }

    /// Submits a chain through one indirect descriptor table.
    pub fn submit_indirect(
        &mut self,
        q: u16,
        readable: &[Buf],
        writable: &[Buf],
    ) -> Result<u16, DriverError> {
        let n = readable.len() + writable.len();
        let table = self.alloc(16 * n as u64);
        let format = self.queue(q)?.format;
        for (i, (&(addr, len), flags)) in readable
            .iter()
            .map(|b| (b, 0u16))
            .chain(writable.iter().map(|b| (b, F_WRITE)))
            .enumerate()
        {
            let next = if format == RingFormat::Split && i + 1 < n {
                F_NEXT
            } else {
                0
            };
            let at = table + 16 * i as u64;
            match format {
                RingFormat::Split => {
                    write_split(&self.mem, at, addr, len, flags | next, (i + 1) as u16)?
                }
                RingFormat::Packed => write_packed(&self.mem, at, addr, len, 0, flags)?,
            }
        }
        let entry = [(table, (16 * n) as u32, F_INDIRECT)];
        match format {
            RingFormat::Split => self.submit_split(q, &entry),
            RingFormat::Packed => self.submit_packed(q, &entry),
        }
    }

    fn submit_split(&mut self, q: u16, descs: &[(u64, u32, u16)]) -> Result<u16, DriverError> {
        let Self { mem, queues, .. } = self;
        let dq = queues
            .get_mut(usize::from(q))
            .and_then(Option::as_mut)
            .ok_or(DriverError::NoQueue(q))?;
        if descs.is_empty() || dq.free.len() < descs.len() {
            return Err(DriverError::Full(q));
        }
        let Some(&head) = dq.free.last() else {
            return Err(DriverError::Full(q));
        };
        // The head's list is empty (the head was free); fill it in place,
        // reusing its capacity.
        let mut idx = std::mem::take(&mut dq.inflight[usize::from(head)]);
        idx.clear();
        idx.extend((0..descs.len()).filter_map(|_| dq.free.pop()));
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (next, nf) = match idx.get(i + 1) {
                Some(&n) => (n, F_NEXT),
                None => (0, 0),
            };
            write_split(
                mem,
                dq.desc + 16 * u64::from(idx[i]),
                addr,
                len,
                flags | nf,
                next,
            )?;
        }
        dq.inflight[usize::from(head)] = idx;
        let slot = dq.driver + 4 + 2 * u64::from(dq.next_avail % dq.size);
        write_bytes(mem, slot, &head.to_le_bytes())?;
        dq.next_avail = dq.next_avail.wrapping_add(1);
        mem.store(
            dq.next_avail.to_le(),
            GuestAddress(dq.driver + 2),
            Ordering::Release,
        )?;
        Ok(head)
    }

    fn submit_packed(&mut self, q: u16, descs: &[(u64, u32, u16)]) -> Result<u16, DriverError> {
        let mem = self.mem.clone();
        let dq = self.queue(q)?;
        let n = descs.len() as u16;
        if descs.is_empty() || dq.size - dq.slots_in_use < n {
            return Err(DriverError::Full(q));
        }
        let id = dq.free.pop().ok_or(DriverError::Full(q))?;
        let mut slots = std::mem::take(&mut dq.inflight[usize::from(id)]);
        slots.clear();
        let mut head_flags = 0;
        let head = dq.next_avail;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let slot = dq.next_avail;
            let mut f = flags;
            if i + 1 < descs.len() {
                f |= F_NEXT;
            }
            f |= if dq.avail_wrap { F_AVAIL } else { F_USED };
            let at = dq.desc + 16 * u64::from(slot);
            if i == 0 {
                head_flags = f;
                write_packed(&mem, at, addr, len, id, 0)?;
                // Make the head unavailable until the rest is written.
                let unavailable = if dq.avail_wrap { F_USED } else { F_AVAIL };
                mem.store(
                    unavailable.to_le(),
                    GuestAddress(at + 14),
                    Ordering::Relaxed,
                )?;
            } else {
                write_packed(&mem, at, addr, len, id, f)?;
            }
            slots.push(slot);
            dq.next_avail += 1;
            if dq.next_avail == dq.size {
                dq.next_avail = 0;
                dq.avail_wrap = !dq.avail_wrap;
            }
        }
        dq.slots_in_use += n;
        dq.inflight[usize::from(id)] = slots;
        mem.store(
            head_flags.to_le(),
            GuestAddress(dq.desc + 16 * u64::from(head) + 14),
            Ordering::Release,
        )?;
        Ok(id)
    }

    /// Notifies queue `q`.
    pub fn notify(&self, q: u16) -> Result<(), DriverError> {
        self.transport.notify(q)
    }

    /// Takes the next used buffer of queue `q`, if any: `(id, len)`.
    pub fn used(&mut self, q: u16) -> Result<Option<(u16, u32)>, DriverError> {
        let Self { mem, queues, .. } = self;
        let dq = queues
            .get_mut(usize::from(q))
            .and_then(Option::as_mut)
            .ok_or(DriverError::NoQueue(q))?;
        match dq.format {
            RingFormat::Split => {
                let idx: u16 = mem
                    .load::<u16>(GuestAddress(dq.device + 2), Ordering::Acquire)?
                    .to_le();
                if idx == dq.last_used {
                    return Ok(None);
                }
                let at = dq.device + 4 + 8 * u64::from(dq.last_used % dq.size);
                let mut elem = [0u8; 8];
                read_bytes(mem, at, &mut elem)?;
                let [i0, i1, i2, i3, l0, l1, l2, l3] = elem;
                let id = u32::from_le_bytes([i0, i1, i2, i3]);
                let len = u32::from_le_bytes([l0, l1, l2, l3]);
                dq.last_used = dq.last_used.wrapping_add(1);
                let id = id as u16;
                if let Some(descs) = dq.inflight.get_mut(usize::from(id)) {
                    dq.free.append(descs);
                }
                // Ask for an interrupt on every used buffer.
                write_bytes(
                    mem,
                    dq.driver + 4 + 2 * u64::from(dq.size),
                    &dq.last_used.to_le_bytes(),
                )?;
                Ok(Some((id, len)))
            }
            RingFormat::Packed => {
                let at = dq.desc + 16 * u64::from(dq.last_used);
                let flags =
                    u16::from_le(mem.load::<u16>(GuestAddress(at + 14), Ordering::Acquire)?);
                let avail = flags & F_AVAIL != 0;
                let used = flags & F_USED != 0;
                if avail != dq.used_wrap || used != dq.used_wrap {
                    return Ok(None);
                }
                let len = u32::from_le(mem.read_obj(GuestAddress(at + 8))?);
                let id = u16::from_le(mem.read_obj(GuestAddress(at + 12))?);
                let n = match dq.inflight.get_mut(usize::from(id)) {
                    Some(s) if !s.is_empty() => {
                        let n = s.len() as u16;
                        s.clear();
                        n
                    }
                    _ => 1,
                };
                dq.free.push(id);
                dq.slots_in_use = dq.slots_in_use.saturating_sub(n);
                let next = u32::from(dq.last_used) + u32::from(n);
                if next >= u32::from(dq.size) {
                    dq.last_used = (next - u32::from(dq.size)) as u16;
                    dq.used_wrap = !dq.used_wrap;
                } else {
                    dq.last_used = next as u16;
                }
                Ok(Some((id, len)))
            }
        }
    }

    /// Polls queue `q` until a used buffer arrives or `timeout` passes.
    /// Fails early when the device sets DEVICE_NEEDS_RESET.
    pub fn wait_used(&mut self, q: u16, timeout: Duration) -> Result<(u16, u32), DriverError> {
        let start = Instant::now();
        let mut polls = 0u32;
        let mut waited = Duration::ZERO;
        loop {
            if let Some(u) = self.used(q)? {
                return Ok(u);
            }
            // A register read and a clock read cost more than a look at
            // the ring: while spinning, check them on every 16th miss (the
            // first included), every time once spinning is over.
            if polls % 16 == 0 || polls >= 1000 {
                if self.transport.status()? & status::DEVICE_NEEDS_RESET != 0 {
                    return Err(DriverError::NeedsReset);
                }
                waited = start.elapsed();
                if waited > timeout {
                    return Err(DriverError::Timeout(q));
                }
            }
            // Spin briefly (a device worker usually answers within
            // microseconds), then yield, then sleep.
            polls = polls.saturating_add(1);
            if polls < 1000 {
                std::hint::spin_loop();
            } else if waited < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Writes split descriptor `index` of queue `q` verbatim (for hostile
    /// chains); `desc.id_or_next` is the `next` field.
    pub fn write_split_desc(
        &mut self,
        q: u16,
        index: u16,
        desc: RawDesc,
    ) -> Result<(), DriverError> {
        let mem = self.mem.clone();
        let dq = self.queue(q)?;
        let at = dq.desc + 16 * u64::from(index);
        write_split(&mem, at, desc.addr, desc.len, desc.flags, desc.id_or_next)
    }

    /// Puts `head` in the split available ring of queue `q` (no checks).
    pub fn publish_split(&mut self, q: u16, head: u16) -> Result<(), DriverError> {
        let mem = self.mem.clone();
        let dq = self.queue(q)?;
        let slot = dq.driver + 4 + 2 * u64::from(dq.next_avail % dq.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))?;
        dq.next_avail = dq.next_avail.wrapping_add(1);
        mem.store(
            dq.next_avail.to_le(),
            GuestAddress(dq.driver + 2),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// Writes packed descriptor slot `index` of queue `q` verbatim, with
    /// the AVAIL/USED bits for the driver's current wrap counter added to
    /// `desc.flags` when `available` (for hostile chains);
    /// `desc.id_or_next` is the buffer ID.
    pub fn write_packed_desc(
        &mut self,
        q: u16,
        index: u16,
        desc: RawDesc,
        available: bool,
    ) -> Result<(), DriverError> {
        let mem = self.mem.clone();
        let dq = self.queue(q)?;
        let mut f = desc.flags & !(F_AVAIL | F_USED);
        if available {
            f |= if dq.avail_wrap { F_AVAIL } else { F_USED };
        }
        let at = dq.desc + 16 * u64::from(index);
        write_packed(&mem, at, desc.addr, desc.len, desc.id_or_next, f)
    }

    /// Reads the device configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DriverError> {
        self.transport.read_config(offset, data)
    }
}

fn write_split(
    mem: &GuestMemoryMmap,
    at: u64,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), DriverError> {
    // struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    write_bytes(mem, at, &b)
}

/// Writes `b` at `at`: one bounds-checked copy into the region holding it
/// (the common case), or through the memory map when it straddles
/// regions.
fn write_bytes(mem: &GuestMemoryMmap, at: u64, b: &[u8]) -> Result<(), DriverError> {
    match mem.get_slice(GuestAddress(at), b.len()) {
        Ok(s) => s
            .write_slice(b, 0)
            .map_err(vm_memory::GuestMemoryError::from)?,
        Err(_) => mem.write_slice(b, GuestAddress(at))?,
    }
    Ok(())
}

/// Reads `b.len()` bytes at `at` (as [`write_bytes`]).
fn read_bytes(mem: &GuestMemoryMmap, at: u64, b: &mut [u8]) -> Result<(), DriverError> {
    match mem.get_slice(GuestAddress(at), b.len()) {
        Ok(s) => s
            .read_slice(b, 0)
            .map_err(vm_memory::GuestMemoryError::from)?,
        Err(_) => mem.read_slice(b, GuestAddress(at))?,
    }
    Ok(())
}

fn write_packed(
    mem: &GuestMemoryMmap,
    at: u64,
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
) -> Result<(), DriverError> {
    // struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&id.to_le_bytes());
    b[14..16].copy_from_slice(&flags.to_le_bytes());
    write_bytes(mem, at, &b)
}
