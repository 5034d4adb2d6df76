//! Modern virtio-pci (virtio 1.2, 4.1), non-transitional.
//!
//! [`PciTransport`] is a `vmkit-devices` [`PciDevice`]: add it to a
//! [`PciRoot`](vmkit_devices::PciRoot), which assigns and maps its BAR.
//!
//! # Identity
//! Vendor `0x1AF4`, device `0x1040 + device type`, revision 1, subsystem
//! IDs from [`PciOptions`], header type 0, interrupt pin INTA#. The class
//! code follows the device type ([`class_code`]).
//!
//! # BAR 0
//! One 64-bit, non-prefetchable memory BAR ([`BAR_INDEX`]). It is not
//! prefetchable because reads have side effects: reading the ISR clears it
//! (virtio 1.2, 4.1.4.5), and the MSI-X table and PBA should not sit in
//! prefetchable space either (PCIe 7.7.2). It is 64-bit so that a VMM may
//! place it above 4 GiB; the root complex falls back to the 32-bit window.
//!
//! | offset | size | structure |
//! |---|---|---|
//! | [`COMMON_CFG_OFFSET`] | [`COMMON_CFG_LEN`] | common configuration ([`common_cfg`]) |
//! | [`ISR_OFFSET`] | 1 | ISR status (read clears) |
//! | [`DEVICE_CFG_OFFSET`] | [`DEVICE_CFG_LEN`] | device configuration |
//! | [`NOTIFY_OFFSET`] | 4 × queues | queue notify, queue *i* at `4 * i` |
//! | page-aligned after notify | 16 × vectors | MSI-X table |
//! | page-aligned after table | PBA | MSI-X pending bits |
//!
//! The capability list holds COMMON_CFG, NOTIFY_CFG (multiplier
//! [`NOTIFY_OFF_MULTIPLIER`]), ISR_CFG, DEVICE_CFG, PCI_CFG (the access
//! window of 4.1.4.9, which works whatever the BAR address and command
//! register say) and MSI-X with one vector per queue plus one for
//! configuration changes (at most the sink's count and 2048).
//!
//! # Registers
//! Common configuration fields take only their natural width (8-bit
//! status and generation, 16-bit fields, 32-bit features; 64-bit ring
//! addresses as two 32-bit halves or one 64-bit access). Anything else
//! reads as zero and is dropped on write. The status state machine,
//! feature negotiation, queue set-up checks and activation are those of
//! virtio-mmio (shared code): a bad queue set-up gives DEVICE_NEEDS_RESET at
//! DRIVER_OK, queue registers are frozen outside FEATURES_OK..DRIVER_OK and
//! while the queue is enabled, and writing 0 to `device_status` resets the
//! device (its workers joined) before the write returns. A
//! `queue_select` beyond `num_queues` reads zeros and drops writes.
//! `queue_reset` (`VIRTIO_F_RING_RESET`) is not offered.
//!
//! # Interrupts
//! With MSI-X enabled, a used buffer on queue *q* signals the vector in
//! *q*'s `queue_msix_vector`, a configuration change the one in
//! `config_msix_vector` ([`Msix`] handles masking and pending bits);
//! [`MSI_NO_VECTOR`] (also what a vector beyond the table reads back as)
//! sends nothing. With MSI-X disabled, the ISR bits (0 queue, 1
//! configuration) drive the INTx line, which is high while the ISR is
//! non-zero and COMMAND.INTX_DISABLE is clear; reading the ISR returns and
//! clears it and lowers the line. The ISR and the line change under one
//! lock, so an interrupt raised by a worker while the driver reads the ISR
//! is either returned by that read or keeps the line high.
//!
//! # Notifications and KVM ioeventfd
//! A write to queue *i*'s notify address signals its eventfd
//! ([`PciTransport::notify_eventfds`]), which the device's worker waits on.
//! A VMM on KVM passes a [`NotifyRegistrar`] in [`PciOptions`] that
//! registers those eventfds as ioeventfds (`KVM_IOEVENTFD` on MMIO, without
//! datamatch and with length 0 so that a write of any width matches; Linux
//! writes 16 bits). The transport keeps the registrations at the notify
//! addresses of the BAR as the guest programs it: it registers them when
//! memory decoding is turned on, moves them when the BAR moves and removes
//! them when decoding is turned off or the transport is dropped. A guest
//! write then never leaves the kernel; the transport's own notify handling
//! is the fallback.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmkit_devices::pci::{
    Bar, BarKind, ConfigSpace, IntxPin, Msix, MsixLayout, PciDevice, PciHeader,
    COMMAND_INTX_DISABLE, COMMAND_MEMORY_SPACE,
};
use vmkit_devices::{DeviceError, InterruptLine, IoAction, MsiVectors};
use vmkit_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::common::{queue_eventfds, Core, CoreState, RingAddress};
use super::TransportError;
use crate::device::{Interrupt, VirtioDevice};
use crate::{device_type, status};
use vmkit_devices::pci::{ConfigSpaceState, MsixState};
use vmkit_devices::state::{StateError, StateReader, StateWriter};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1AF4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// PCI capability ID of the virtio structures (vendor-specific).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// `cfg_type` of the common configuration structure.
pub const CAP_COMMON_CFG: u8 = 1;
/// `cfg_type` of the notification structure.
pub const CAP_NOTIFY_CFG: u8 = 2;
/// `cfg_type` of the ISR status.
pub const CAP_ISR_CFG: u8 = 3;
/// `cfg_type` of the device-specific configuration.
pub const CAP_DEVICE_CFG: u8 = 4;
/// `cfg_type` of the PCI configuration access window.
pub const CAP_PCI_CFG: u8 = 5;
/// "No vector" in `config_msix_vector` / `queue_msix_vector`.
pub const MSI_NO_VECTOR: u16 = 0xFFFF;
/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// The BAR holding every virtio structure and the MSI-X table and PBA.
pub const BAR_INDEX: u8 = 0;
/// Offset of the common configuration in the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0;
/// Length of the common configuration (up to `queue_device`; the 1.2
/// fields `queue_notif_config_data` and `queue_reset` are not offered).
pub const COMMON_CFG_LEN: u64 = 0x38;
/// Offset of the ISR status byte in the BAR.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration in the BAR.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length of the device configuration window.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in the BAR.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// `notify_off_multiplier`: queue *i*'s notify address is
/// `NOTIFY_OFFSET + i * 4` (`queue_notify_off` = *i*).
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// Offsets of the common configuration fields (virtio 1.2, 4.1.4.3).
pub mod common_cfg {
    /// le32, selects the device feature word.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// le32, read-only: the selected device feature word.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// le32, selects the driver feature word.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// le32: the selected driver feature word.
    pub const DRIVER_FEATURE: u64 = 0x0C;
    /// le16: MSI-X vector of configuration changes.
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// le16, read-only: number of queues.
    pub const NUM_QUEUES: u64 = 0x12;
    /// u8: device status.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// u8, read-only: configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// le16: selects the queue the `QUEUE_*` fields refer to.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// le16: queue size (the maximum until the driver writes it).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// le16: MSI-X vector of the queue.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1A;
    /// le16: write 1 to enable the queue.
    pub const QUEUE_ENABLE: u64 = 0x1C;
    /// le16, read-only: the queue's notify offset (in multiplier units).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1E;
    /// le64: descriptor area.
    pub const QUEUE_DESC: u64 = 0x20;
    /// le64: driver area.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// le64: device area.
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Layout of the `virtio_pci_cap` fields, as offsets from the capability
/// start (virtio 1.2, 4.1.4).
pub mod cap {
    /// u8: capability length.
    pub const LEN: u16 = 2;
    /// u8: structure type (`CAP_*_CFG`).
    pub const CFG_TYPE: u16 = 3;
    /// u8: the BAR holding the structure.
    pub const BAR: u16 = 4;
    /// le32: offset of the structure in the BAR.
    pub const OFFSET: u16 = 8;
    /// le32: length of the structure.
    pub const LENGTH: u16 = 12;
    /// le32, NOTIFY_CFG only: `notify_off_multiplier`.
    pub const NOTIFY_OFF_MULTIPLIER: u16 = 16;
    /// 4 bytes, PCI_CFG only: the data window.
    pub const PCI_CFG_DATA: u16 = 16;
}

/// The PCI class code (base, sub, programming interface) of a virtio
/// device type: mass storage/other for block (QEMU reports SCSI, 01/00/00,
/// a leftover of legacy virtio-blk), Ethernet for net, communication/other
/// for console (as QEMU), and "unassigned class" 0xFF for the rest (as
/// QEMU's virtio-rng-pci).
pub fn class_code(virtio_type: u32) -> (u8, u8, u8) {
    match virtio_type {
        device_type::BLOCK => (0x01, 0x80, 0x00),
        device_type::NET => (0x02, 0x00, 0x00),
        device_type::CONSOLE => (0x07, 0x80, 0x00),
        _ => (0xFF, 0x00, 0x00),
    }
}

/// Keeps queue notification eventfds registered at their guest-physical
/// notify addresses (on KVM: ioeventfds), for a [`PciTransport`] whose BAR
/// the guest may move.
///
/// Called from the vCPU thread that writes configuration space, with the
/// transport's registration lock held: implementations must not call back
/// into the transport or the root complex.
pub trait NotifyRegistrar: Send + Sync {
    /// Makes a guest write at `addr` (`len` bytes wide slot; match writes
    /// of any width within it at `addr`) signal `fd`.
    fn register(&self, addr: u64, len: u32, fd: &EventFd) -> io::Result<()>;
    /// Undoes [`register`](Self::register) with the same arguments.
    fn unregister(&self, addr: u64, len: u32, fd: &EventFd) -> io::Result<()>;
}

/// Options of a virtio-pci transport.
#[derive(Clone)]
pub struct PciOptions {
    /// Offer `VIRTIO_F_RING_PACKED` (the driver chooses).
    pub packed_ring: bool,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (non-transitional devices should use 0x40 or higher).
    pub subsystem_id: u16,
    /// Keeps the notify eventfds registered at the notify addresses.
    pub registrar: Option<Arc<dyn NotifyRegistrar>>,
}

impl Default for PciOptions {
    fn default() -> Self {
        Self {
            packed_ring: true,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x1100,
            registrar: None,
        }
    }
}

impl std::fmt::Debug for PciOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciOptions")
            .field("packed_ring", &self.packed_ring)
            .field("subsystem_vendor_id", &self.subsystem_vendor_id)
            .field("subsystem_id", &self.subsystem_id)
            .field("registrar", &self.registrar.is_some())
            .finish()
    }
}

/// Where the MSI-X structures and the end of the BAR are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarLayout {
    /// Length of the notification area (4 bytes per queue).
    pub notify_len: u64,
    /// Offset of the MSI-X table.
    pub msix_table_offset: u64,
    /// Offset of the MSI-X PBA.
    pub msix_pba_offset: u64,
    /// Number of MSI-X vectors.
    pub msix_vectors: u16,
    /// Size of the BAR (a power of two).
    pub bar_size: u64,
}

const PAGE: u64 = 0x1000;

fn page_align(v: u64) -> u64 {
    v.div_ceil(PAGE) * PAGE
}

impl BarLayout {
    fn new(queues: usize, vectors: u16) -> Self {
        let notify_len = 4 * queues as u64;
        let msix_table_offset = page_align(NOTIFY_OFFSET + notify_len);
        let msix_pba_offset = page_align(msix_table_offset + 16 * u64::from(vectors));
        let pba_len = u64::from(vectors).div_ceil(64) * 8;
        let bar_size = (msix_pba_offset + pba_len).next_power_of_two();
        Self {
            notify_len,
            msix_table_offset,
            msix_pba_offset,
            msix_vectors: vectors,
            bar_size,
        }
    }
}

struct IrqState {
    isr: u8,
    /// The level last put on the INTx line.
    level: bool,
}

/// Interrupt state shared by the transport (vCPU threads) and the device's
/// workers.
struct Shared {
    irq: Mutex<IrqState>,
    line: Arc<dyn InterruptLine>,
    msix: Msix,
    intx_disabled: AtomicBool,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    needs_reset: AtomicBool,
    generation: AtomicU32,
}

impl Shared {
    fn lock_irq(&self) -> MutexGuard<'_, IrqState> {
        // Two plain fields, consistent between statements.
        self.irq.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts the INTx line at the level the ISR, MSI-X and INTX_DISABLE
    /// call for; the caller holds the irq lock.
    fn sync_line(&self, st: &mut IrqState) {
        let want =
            st.isr != 0 && !self.msix.enabled() && !self.intx_disabled.load(Ordering::Acquire);
        if want == st.level {
            return;
        }
        let result = if want {
            self.line.assert()
        } else {
            self.line.deassert()
        };
        match result {
            Ok(()) => st.level = want,
            Err(e) => log::error!("virtio-pci: cannot set INTx to {want}: {e}"),
        }
    }

    fn raise(&self, bits: u8) {
        let mut st = self.lock_irq();
        st.isr |= bits;
        self.sync_line(&mut st);
    }

    fn read_isr(&self) -> u8 {
        let mut st = self.lock_irq();
        let v = std::mem::take(&mut st.isr);
        self.sync_line(&mut st);
        v
    }

    fn resync(&self) {
        let mut st = self.lock_irq();
        self.sync_line(&mut st);
    }

    fn isr_pending(&self) -> bool {
        self.lock_irq().isr != 0
    }

    fn clear(&self) {
        let mut st = self.lock_irq();
        st.isr = 0;
        self.sync_line(&mut st);
    }

    fn fire(&self, vector: u16) {
        if vector == MSI_NO_VECTOR {
            return;
        }
        if let Err(e) = self.msix.notify(vector) {
            log::warn!("virtio-pci: {e}");
        }
    }

    fn config_event(&self) {
        // The configuration bit is set with MSI-X too (virtio 1.2,
        // 4.1.4.5.1); sync_line keeps INTx low while MSI-X is on.
        self.raise(ISR_CONFIG);
        if self.msix.enabled() {
            self.fire(self.config_vector.load(Ordering::Acquire));
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix.vectors() {
            v
        } else {
            MSI_NO_VECTOR
        }
    }
}

impl Interrupt for Shared {
    fn signal_queue(&self, queue: u16) {
        if self.msix.enabled() {
            let v = self
                .queue_vectors
                .get(usize::from(queue))
                .map_or(MSI_NO_VECTOR, |v| v.load(Ordering::Acquire));
            self.fire(v);
        } else {
            self.raise(ISR_QUEUE);
        }
    }

    fn signal_config(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.config_event();
    }

    fn needs_reset(&self) {
        // As virtio-mmio: the interrupt first, so that a driver that sees
        // DEVICE_NEEDS_RESET also finds it pending.
        self.config_event();
        self.needs_reset.store(true, Ordering::Release);
    }
}

/// Offsets of the capabilities the transport needs after construction.
#[derive(Debug, Clone, Copy)]
struct Caps {
    msix: u16,
    pci_cfg: u16,
}

/// A virtio device behind a modern virtio-pci function.
pub struct PciTransport {
    state: Mutex<Core>,
    config: Mutex<ConfigSpace>,
    shared: Arc<Shared>,
    notify: Vec<Arc<EventFd>>,
    layout: BarLayout,
    caps: Caps,
    registrar: Option<Arc<dyn NotifyRegistrar>>,
    /// Base of the notify area where the eventfds are registered now.
    registered: Mutex<Option<u64>>,
    device_type: u32,
}

impl std::fmt::Debug for PciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciTransport")
            .field("device_type", &self.device_type)
            .field("queues", &self.notify.len())
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// A `virtio_pci_cap` body (the bytes after the ID and next pointer).
fn cap_body(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut b = vec![cap_len, cfg_type, BAR_INDEX, 0, 0, 0];
    // Offsets and lengths are below the BAR size, which fits in 32 bits
    // for every queue count (checked in new).
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl PciTransport {
    /// Puts `device` behind a virtio-pci function. `intx` is its INTx
    /// line, `msi` the sink of its MSI-X vectors (it gets one vector per
    /// queue plus one, at most `msi.count()` and 2048); `mem` the guest
    /// memory its rings live in.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        intx: Arc<dyn InterruptLine>,
        msi: Arc<dyn MsiVectors>,
        options: PciOptions,
    ) -> Result<Self, TransportError> {
        let notify = queue_eventfds(device.queue_max_sizes())?;
        let device_type = device.device_type();
        let device_id = u16::try_from(device_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(TransportError::DeviceType(device_type))?;
        let wanted = u16::try_from(notify.len() + 1).unwrap_or(u16::MAX);
        let vectors = wanted
            .min(msi.count())
            .min(vmkit_devices::pci::msix::MSIX_MAX_VECTORS);
        let layout = BarLayout::new(notify.len(), vectors);
        let msix = Msix::new(
            msi,
            vectors,
            MsixLayout {
                table_bar: BAR_INDEX,
                table_offset: layout.msix_table_offset as u32,
                pba_bar: BAR_INDEX,
                pba_offset: layout.msix_pba_offset as u32,
            },
        )
        .map_err(TransportError::Pci)?;

        let mut config = ConfigSpace::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: options.subsystem_vendor_id,
            subsystem_id: options.subsystem_id,
            interrupt_pin: Some(IntxPin::A),
        });
        config
            .add_bar(
                BAR_INDEX,
                BarKind::Memory64 {
                    prefetchable: false,
                },
                layout.bar_size,
            )
            .map_err(TransportError::Pci)?;
        let mut add = |body: Vec<u8>, writable: &[u8]| {
            config
                .add_capability(CAP_ID_VENDOR, &body, writable)
                .map_err(TransportError::Pci)
        };
        add(
            cap_body(CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LEN, &[]),
            &[],
        )?;
        add(
            cap_body(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                layout.notify_len,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        add(cap_body(CAP_ISR_CFG, ISR_OFFSET, 1, &[]), &[])?;
        add(
            cap_body(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, &[]),
            &[],
        )?;
        // PCI_CFG: bar, offset, length and the data window are the
        // driver's to write.
        let mut pci_cfg_mask = [0u8; 18];
        pci_cfg_mask[2] = 0xFF;
        pci_cfg_mask[6..18].fill(0xFF);
        let mut body = cap_body(CAP_PCI_CFG, 0, 0, &[0; 4]);
        // The window starts with no BAR selected.
        if let Some(b) = body.get_mut(2) {
            *b = 0;
        }
        let pci_cfg = add(body, &pci_cfg_mask)?;
        let msix_cap = msix
            .add_capability(&mut config)
            .map_err(TransportError::Pci)?;

        let queue_vectors = notify
            .iter()
            .map(|_| AtomicU16::new(MSI_NO_VECTOR))
            .collect();
        Ok(Self {
            state: Mutex::new(Core::new("virtio-pci", device, mem, options.packed_ring)),
            config: Mutex::new(config),
            shared: Arc::new(Shared {
                irq: Mutex::new(IrqState {
                    isr: 0,
                    level: false,
                }),
                line: intx,
                msix,
                intx_disabled: AtomicBool::new(false),
                config_vector: AtomicU16::new(MSI_NO_VECTOR),
                queue_vectors,
                needs_reset: AtomicBool::new(false),
                generation: AtomicU32::new(0),
            }),
            notify,
            layout,
            caps: Caps {
                msix: msix_cap,
                pci_cfg,
            },
            registrar: options.registrar,
            registered: Mutex::new(None),
            device_type,
        })
    }

    /// The notification eventfd of each queue, by index.
    pub fn notify_eventfds(&self) -> &[Arc<EventFd>] {
        &self.notify
    }

    /// The BAR layout.
    pub fn layout(&self) -> BarLayout {
        self.layout
    }

    /// The guest-physical notify address of queue `queue` while memory
    /// decoding is on (`None` otherwise or for a queue that does not
    /// exist).
    pub fn notify_address(&self, queue: u16) -> Option<u64> {
        if usize::from(queue) >= self.notify.len() {
            return None;
        }
        self.notify_base()
            .map(|base| base + u64::from(NOTIFY_OFF_MULTIPLIER) * u64::from(queue))
    }

    /// The base of the notify area where the transport has the eventfds
    /// registered through its [`NotifyRegistrar`] now.
    pub fn registered_notify_base(&self) -> Option<u64> {
        *self.lock_registered()
    }

    /// The device status as the driver last wrote it (plus
    /// DEVICE_NEEDS_RESET when the device asked for a reset).
    pub fn status(&self) -> u32 {
        let st = self.lock();
        st.status | self.needs_reset_bit()
    }

    /// Whether the device is active (DRIVER_OK accepted and the device
    /// started, no reset since).
    pub fn active(&self) -> bool {
        self.lock().active
    }

    /// The MSI-X state (enable, masks, pending bits).
    pub fn msix(&self) -> &Msix {
        &self.shared.msix
    }

    /// The interrupt path devices use (for a VMM that wants to signal a
    /// configuration change from outside the device).
    pub fn interrupt(&self) -> Arc<dyn Interrupt> {
        self.shared.clone()
    }

    fn needs_reset_bit(&self) -> u32 {
        if self.shared.needs_reset.load(Ordering::Acquire) {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // Register updates leave the state consistent between statements.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_config(&self) -> MutexGuard<'_, ConfigSpace> {
        // Only non-panicking byte copies change the space.
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_registered(&self) -> MutexGuard<'_, Option<u64>> {
        self.registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The notify area's guest-physical base, if memory decoding is on and
    /// the BAR range does not wrap.
    fn notify_base(&self) -> Option<u64> {
        let config = self.lock_config();
        if config.command() & COMMAND_MEMORY_SPACE == 0 {
            return None;
        }
        let bar = config.bar(BAR_INDEX)?;
        bar.address.checked_add(self.layout.bar_size)?;
        Some(bar.address + NOTIFY_OFFSET)
    }

    /// Moves the notify registrations to where the BAR decodes now.
    fn sync_notify(&self) {
        let Some(registrar) = &self.registrar else {
            return;
        };
        let mut current = self.lock_registered();
        let wanted = self.notify_base();
        if *current == wanted {
            return;
        }
        let slot = NOTIFY_OFF_MULTIPLIER;
        if let Some(old) = current.take() {
            for (i, fd) in self.notify.iter().enumerate() {
                let addr = old + u64::from(slot) * i as u64;
                if let Err(e) = registrar.unregister(addr, slot, fd) {
                    log::error!("virtio-pci: cannot unregister queue {i} notify at {addr:#x}: {e}");
                }
            }
        }
        let Some(new) = wanted else {
            return;
        };
        for (i, fd) in self.notify.iter().enumerate() {
            let addr = new + u64::from(slot) * i as u64;
            if let Err(e) = registrar.register(addr, slot, fd) {
                log::error!(
                    "virtio-pci: cannot register queue {i} notify at {addr:#x}: {e}; \
                     notifications go through the transport"
                );
                for (j, fd) in self.notify.iter().enumerate().take(i) {
                    let addr = new + u64::from(slot) * j as u64;
                    if let Err(e) = registrar.unregister(addr, slot, fd) {
                        log::error!("virtio-pci: cannot unregister queue {j} notify: {e}");
                    }
                }
                return;
            }
        }
        *current = Some(new);
    }

    fn unregister_all(&self) {
        let Some(registrar) = &self.registrar else {
            return;
        };
        let mut current = self.lock_registered();
        if let Some(old) = current.take() {
            for (i, fd) in self.notify.iter().enumerate() {
                let addr = old + u64::from(NOTIFY_OFF_MULTIPLIER) * i as u64;
                if let Err(e) = registrar.unregister(addr, NOTIFY_OFF_MULTIPLIER, fd) {
                    log::error!("virtio-pci: cannot unregister queue {i} notify: {e}");
                }
            }
        }
    }

    fn read_common(&self, st: &Core, offset: u64, len: usize) -> Option<u64> {
        use common_cfg::*;
        let sel = st.queue_sel as usize;
        let q = st.selected();
        let vector = self
            .shared
            .queue_vectors
            .get(sel)
            .map_or(0, |v| v.load(Ordering::Acquire));
        let addr = |f: fn(&crate::queue::QueueConfig) -> u64| q.map_or(0, f);
        let v = match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(st.device_features_sel),
            (DEVICE_FEATURE, 4) => u64::from(st.device_features_word()),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(st.driver_features_sel),
            (DRIVER_FEATURE, 4) => u64::from(st.driver_features_word()),
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.shared.config_vector.load(Ordering::Acquire)),
            (NUM_QUEUES, 2) => st.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from((st.status | self.needs_reset_bit()) & 0xFF),
            (CONFIG_GENERATION, 1) => {
                u64::from(self.shared.generation.load(Ordering::Acquire) & 0xFF)
            }
            (QUEUE_SELECT, 2) => u64::from(st.queue_sel & 0xFFFF),
            (QUEUE_SIZE, 2) => q.map_or(0, |q| u64::from(q.size)),
            (QUEUE_MSIX_VECTOR, 2) => u64::from(vector),
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.ready)),
            // queue_notify_off = queue index.
            (QUEUE_NOTIFY_OFF, 2) => q.map_or(0, |_| sel as u64),
            (QUEUE_DESC, 8) => addr(|q| q.desc),
            (QUEUE_DRIVER, 8) => addr(|q| q.driver),
            (QUEUE_DEVICE, 8) => addr(|q| q.device),
            (QUEUE_DESC, 4) => addr(|q| q.desc) & 0xFFFF_FFFF,
            (QUEUE_DRIVER, 4) => addr(|q| q.driver) & 0xFFFF_FFFF,
            (QUEUE_DEVICE, 4) => addr(|q| q.device) & 0xFFFF_FFFF,
            (o, 4) if o == QUEUE_DESC + 4 => addr(|q| q.desc) >> 32,
            (o, 4) if o == QUEUE_DRIVER + 4 => addr(|q| q.driver) >> 32,
            (o, 4) if o == QUEUE_DEVICE + 4 => addr(|q| q.device) >> 32,
            _ => return None,
        };
        Some(v)
    }

    fn write_common(&self, st: &mut Core, offset: u64, data: &[u8]) {
        use common_cfg::*;
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v64 = u64::from_le_bytes(b);
        let v = v64 as u32;
        let sel = st.queue_sel as usize;
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => st.device_features_sel = v,
            (DRIVER_FEATURE_SELECT, 4) => st.driver_features_sel = v,
            (DRIVER_FEATURE, 4) => st.write_driver_features(v),
            (CONFIG_MSIX_VECTOR, 2) => {
                let v = self.shared.valid_vector(v as u16);
                self.shared.config_vector.store(v, Ordering::Release);
            }
            (DEVICE_STATUS, 1) => self.write_status(st, v & 0xFF),
            (QUEUE_SELECT, 2) => st.queue_sel = v & 0xFFFF,
            (QUEUE_SIZE, 2) => {
                if let Some(q) = st.queue_writable() {
                    // Checked against the maximum and the ring format at
                    // DRIVER_OK.
                    q.size = v as u16;
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                if let Some(slot) = self.shared.queue_vectors.get(sel) {
                    slot.store(self.shared.valid_vector(v as u16), Ordering::Release);
                }
            }
            (QUEUE_ENABLE, 2) => {
                // Only 1 is valid; disabling a queue needs queue_reset,
                // which is not offered.
                if v == 1 {
                    if let Some(q) = st.queue_writable() {
                        q.ready = true;
                    }
                } else {
                    log::debug!("virtio-pci: queue_enable write of {v} ignored");
                }
            }
            (QUEUE_DESC, 8) | (QUEUE_DRIVER, 8) | (QUEUE_DEVICE, 8) => {
                let which = ring_field(offset);
                st.write_ring_address(which, false, v);
                st.write_ring_address(which, true, (v64 >> 32) as u32);
            }
            (o, 4) if (QUEUE_DESC..QUEUE_DEVICE + 8).contains(&o) && o % 4 == 0 => {
                st.write_ring_address(ring_field(o & !7), o % 8 == 4, v);
            }
            _ => log::debug!(
                "virtio-pci: {}-byte common config write at {offset:#x} ignored",
                data.len()
            ),
        }
    }

    fn write_status(&self, st: &mut Core, v: u32) {
        if v == 0 {
            st.reset(&self.notify);
            self.shared.needs_reset.store(false, Ordering::Release);
            self.shared
                .config_vector
                .store(MSI_NO_VECTOR, Ordering::Release);
            for v in &self.shared.queue_vectors {
                v.store(MSI_NO_VECTOR, Ordering::Release);
            }
            self.shared.clear();
        } else {
            st.write_status(v, &self.notify, self.shared.clone());
        }
    }

    /// A read of the BAR at `offset`.
    fn read_bar(&self, offset: u64, data: &mut [u8]) {
        let l = &self.layout;
        if offset < COMMON_CFG_OFFSET + PAGE {
            data.fill(0);
            let st = self.lock();
            if let Some(v) = self.read_common(&st, offset, data.len()) {
                let bytes = v.to_le_bytes();
                let n = data.len().min(8);
                data[..n].copy_from_slice(&bytes[..n]);
            }
        } else if offset < ISR_OFFSET + PAGE {
            data.fill(0);
            if offset == ISR_OFFSET {
                if let Some(b) = data.first_mut() {
                    *b = self.shared.read_isr();
                }
            }
        } else if offset < DEVICE_CFG_OFFSET + PAGE {
            self.lock()
                .device
                .read_config(offset - DEVICE_CFG_OFFSET, data);
        } else if offset < l.msix_table_offset {
            data.fill(0);
        } else if offset < l.msix_pba_offset {
            self.shared
                .msix
                .table_read(offset - l.msix_table_offset, data);
        } else if offset < l.bar_size {
            self.shared.msix.pba_read(offset - l.msix_pba_offset, data);
        } else {
            data.fill(0);
        }
    }

    /// A write of the BAR at `offset`.
    fn write_bar(&self, offset: u64, data: &[u8]) {
        let l = &self.layout;
        if offset < COMMON_CFG_OFFSET + PAGE {
            let mut st = self.lock();
            self.write_common(&mut st, offset, data);
        } else if offset < DEVICE_CFG_OFFSET {
            log::debug!("virtio-pci: write to the ISR at {offset:#x} ignored");
        } else if offset < DEVICE_CFG_OFFSET + PAGE {
            self.lock()
                .device
                .write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if offset < l.msix_table_offset {
            self.notify_write(offset - NOTIFY_OFFSET, data.len());
        } else if offset < l.msix_pba_offset {
            self.shared
                .msix
                .table_write(offset - l.msix_table_offset, data);
        } else {
            log::debug!("virtio-pci: write at {offset:#x} (PBA or beyond) ignored");
        }
    }

    fn notify_write(&self, rel: u64, len: usize) {
        let slot = u64::from(NOTIFY_OFF_MULTIPLIER);
        if rel % slot != 0 || !matches!(len, 1 | 2 | 4) {
            log::debug!("virtio-pci: {len}-byte notify write at {rel:#x} ignored");
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA the address names the queue.
        let Some(fd) = usize::try_from(rel / slot)
            .ok()
            .and_then(|q| self.notify.get(q))
        else {
            return;
        };
        if let Err(e) = fd.write(1) {
            log::error!("virtio-pci: queue notify failed: {e}");
        }
    }

    /// The BAR access the PCI_CFG window describes now, if it is valid
    /// (BAR 0, length 1, 2 or 4, offset aligned to it and inside the BAR).
    fn window_target(&self) -> Option<(u64, usize, [u8; 4])> {
        let config = self.lock_config();
        let at = self.caps.pci_cfg;
        let bar = config.read_u8(at + cap::BAR);
        let offset = u64::from(config.read_u32(at + cap::OFFSET));
        let len = config.read_u32(at + cap::LENGTH);
        let data = config.read_u32(at + cap::PCI_CFG_DATA).to_le_bytes();
        let valid = bar == BAR_INDEX
            && matches!(len, 1 | 2 | 4)
            && offset % u64::from(len) == 0
            && offset + u64::from(len) <= self.layout.bar_size;
        if !valid {
            log::debug!(
                "virtio-pci: PCI_CFG access to BAR {bar}, offset {offset:#x}, length {len} ignored"
            );
            return None;
        }
        Some((offset, len as usize, data))
    }

    fn touches_window(&self, offset: u16, len: usize) -> bool {
        let start = usize::from(self.caps.pci_cfg + cap::PCI_CFG_DATA);
        let offset = usize::from(offset);
        offset < start + 4 && offset.saturating_add(len) > start
    }
}

/// The state of a [`PciTransport`] and its device, for snapshots.
///
/// Encoding (tag `VPCI`, version 1; see `vmkit_devices::state`): `core`
/// (as [`CoreState`] documents), `isr` (u8, bits 0-1), `needs_reset`
/// (bool), `config_generation` (u32), `config_vector` (u16), `queue_vectors`
/// (count, then u16 each), `config` (the 4096-byte configuration space as
/// a byte string), `msix` (as [`MsixState`] documents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciState {
    /// Status, features, queues and the device's own state.
    pub core: CoreState,
    /// The ISR status byte.
    pub isr: u8,
    /// DEVICE_NEEDS_RESET is raised.
    pub needs_reset: bool,
    /// The configuration generation.
    pub config_generation: u32,
    /// `config_msix_vector`.
    pub config_vector: u16,
    /// `queue_msix_vector` of each queue.
    pub queue_vectors: Vec<u16>,
    /// The PCI configuration space (command register, BAR address,
    /// capability registers).
    pub config: ConfigSpaceState,
    /// The MSI-X table, pending bits, enable and function mask.
    pub msix: MsixState,
}

const PCI_TAG: [u8; 4] = *b"VPCI";
const PCI_VERSION: u8 = 1;

impl PciState {
    /// Encodes the state.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(PCI_TAG, PCI_VERSION);
        self.core.write(&mut w);
        w.u8(self.isr)
            .bool(self.needs_reset)
            .u32(self.config_generation)
            .u16(self.config_vector)
            .count(self.queue_vectors.len());
        for v in &self.queue_vectors {
            w.u16(*v);
        }
        self.config.write(&mut w);
        self.msix.write(&mut w);
        w.finish()
    }

    /// Decodes and checks a state: one vector per queue, and every vector
    /// either [`MSI_NO_VECTOR`] or inside the MSI-X table.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = StateReader::new("virtio-pci", bytes, PCI_TAG, PCI_VERSION)?;
        let core = CoreState::read(&mut r)?;
        let isr = r.u8()?;
        if isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(r.invalid("isr", format!("{isr:#x}")));
        }
        let needs_reset = r.bool("needs_reset")?;
        let config_generation = r.u32()?;
        let config_vector = r.u16()?;
        let n = r.count("queue_vectors", 2, usize::from(u16::MAX))?;
        if n != core.queues.len() {
            return Err(r.invalid(
                "queue_vectors",
                format!("{n} vectors for {} queues", core.queues.len()),
            ));
        }
        let mut queue_vectors = Vec::with_capacity(n);
        for _ in 0..n {
            queue_vectors.push(r.u16()?);
        }
        let config = ConfigSpaceState::read(&mut r)?;
        let msix = MsixState::read(&mut r)?;
        let table = msix.entries.len();
        for v in std::iter::once(&config_vector).chain(&queue_vectors) {
            if *v != MSI_NO_VECTOR && usize::from(*v) >= table {
                return Err(r.invalid(
                    "vectors",
                    format!("vector {v} beyond the {table}-entry MSI-X table"),
                ));
            }
        }
        r.finish()?;
        Ok(Self {
            core,
            isr,
            needs_reset,
            config_generation,
            config_vector,
            queue_vectors,
            config,
            msix,
        })
    }
}

impl PciTransport {
    /// Saves the transport, PCI function and device state. An active
    /// device is paused (its worker stopped, its queues held by the
    /// transport) and stays paused, so that guest memory can be copied
    /// consistently with the state: call it with the vCPUs paused, copy
    /// memory, then [`resume`](Self::resume). Fails
    /// with [`StateError::Unsupported`] for an active device that cannot
    /// hand back its queues.
    pub fn save_state(&self) -> Result<PciState, StateError> {
        let mut st = self.lock();
        let core = st.save()?;
        drop(st);
        Ok(PciState {
            core,
            isr: self.shared.lock_irq().isr,
            needs_reset: self.shared.needs_reset.load(Ordering::Acquire),
            config_generation: self.shared.generation.load(Ordering::Acquire),
            config_vector: self.shared.config_vector.load(Ordering::Acquire),
            queue_vectors: self
                .shared
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
            config: self.lock_config().save_state(),
            msix: self.shared.msix.save_state(),
        })
    }

    /// Stops an active device's work (as [`save_state`](Self::save_state)
    /// does) without saving anything. Fails with
    /// [`StateError::Unsupported`] for a device that cannot hand back its
    /// queues.
    pub fn pause(&self) -> Result<(), StateError> {
        self.lock().pause()
    }

    /// Lets a device paused by [`pause`](Self::pause) or
    /// [`save_state`](Self::save_state) run again, with the queues where
    /// it left them; each queue is notified once so that chains made
    /// available meanwhile are processed. Nothing to do if not paused.
    pub fn resume(&self) {
        self.lock().resume_paused(&self.notify, self.shared.clone());
    }

    /// Restores a state from [`save_state`](Self::save_state) into a newly
    /// created transport over the same kind of device: the configuration
    /// space (then the notify ioeventfds follow the restored BAR), MSI-X,
    /// vectors, ISR (the INTx line follows) and, for an active device,
    /// activation with the negotiated features and the queues at their
    /// saved progress. Refused, with the transport unchanged, when the
    /// state does not fit. Call [`PciRoot::resync`] (or
    /// [`PciRoot::restore_state`]) afterwards so that the root maps the
    /// restored BAR.
    ///
    /// [`PciRoot::resync`]: vmkit_devices::PciRoot::resync
    /// [`PciRoot::restore_state`]: vmkit_devices::PciRoot::restore_state
    pub fn restore_state(&self, state: &PciState) -> Result<(), StateError> {
        let mismatch = |reason: String| StateError::Mismatch {
            what: "virtio-pci",
            reason,
        };
        let checked = PciState::from_bytes(&state.to_bytes())?;
        if checked.queue_vectors.len() != self.shared.queue_vectors.len() {
            return Err(mismatch(format!(
                "{} queue vectors, the device has {} queues",
                checked.queue_vectors.len(),
                self.shared.queue_vectors.len()
            )));
        }
        if checked.msix.entries.len() != usize::from(self.shared.msix.vectors()) {
            return Err(mismatch(format!(
                "{} MSI-X vectors, this function has {}",
                checked.msix.entries.len(),
                self.shared.msix.vectors()
            )));
        }
        {
            // Check the config space fits before anything changes.
            let mut probe = self.lock_config().clone();
            probe.restore_state(&state.config)?;
        }
        let mut st = self.lock();
        let queues = st.restore(&state.core)?;
        {
            let mut config = self.lock_config();
            config.restore_state(&state.config)?;
            let disabled = config.command() & COMMAND_INTX_DISABLE != 0;
            self.shared.intx_disabled.store(disabled, Ordering::Release);
        }
        self.shared.msix.restore_state(&state.msix)?;
        self.shared
            .config_vector
            .store(state.config_vector, Ordering::Release);
        for (slot, v) in self.shared.queue_vectors.iter().zip(&state.queue_vectors) {
            slot.store(*v, Ordering::Release);
        }
        self.shared
            .generation
            .store(state.config_generation, Ordering::Release);
        self.shared
            .needs_reset
            .store(state.needs_reset, Ordering::Release);
        {
            let mut irq = self.shared.lock_irq();
            irq.isr |= state.isr;
            self.shared.sync_line(&mut irq);
        }
        if let Some(queues) = queues {
            st.start(queues, &self.notify, self.shared.clone());
        }
        drop(st);
        self.sync_notify();
        Ok(())
    }
}

fn ring_field(offset: u64) -> RingAddress {
    match offset {
        common_cfg::QUEUE_DESC => RingAddress::Desc,
        common_cfg::QUEUE_DRIVER => RingAddress::Driver,
        _ => RingAddress::Device,
    }
}

/// The PCI status register's offset and its Interrupt Status bit.
const STATUS_REGISTER: u16 = 0x06;
const STATUS_INTERRUPT: u8 = 1 << 3;

impl PciDevice for PciTransport {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        if self.touches_window(offset, data.len()) {
            if let Some((bar_offset, len, _)) = self.window_target() {
                let mut buf = [0u8; 4];
                self.read_bar(bar_offset, &mut buf[..len]);
                let at = self.caps.pci_cfg + cap::PCI_CFG_DATA;
                if let Err(e) = self.lock_config().write_raw(at, &buf[..len]) {
                    log::error!("virtio-pci: PCI_CFG window: {e}");
                }
            }
        }
        // Interrupt Status mirrors the ISR while INTx is in use (virtio
        // 1.2, 4.1.4.5.1).
        let intx_pending = self.shared.isr_pending() && !self.shared.msix.enabled();
        self.lock_config().read(offset, data);
        if let Some(b) = usize::from(STATUS_REGISTER)
            .checked_sub(usize::from(offset))
            .and_then(|i| data.get_mut(i))
        {
            if intx_pending {
                *b |= STATUS_INTERRUPT;
            }
        }
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        {
            let mut config = self.lock_config();
            config.write(offset, data);
            self.shared.msix.config_written(&config, self.caps.msix);
            let disabled = config.command() & COMMAND_INTX_DISABLE != 0;
            self.shared.intx_disabled.store(disabled, Ordering::Release);
        }
        if self.touches_window(offset, data.len()) {
            if let Some((bar_offset, len, buf)) = self.window_target() {
                self.write_bar(bar_offset, &buf[..len]);
            }
        }
        self.shared.resync();
        self.sync_notify();
    }

    fn bars(&self) -> Vec<Bar> {
        self.lock_config().bars()
    }

    fn command(&self) -> u16 {
        self.lock_config().command()
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if bar != BAR_INDEX {
            return Err(DeviceError::InvalidAccess {
                offset,
                len: data.len(),
            });
        }
        self.read_bar(offset, data);
        Ok(())
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        if bar != BAR_INDEX {
            return Err(DeviceError::InvalidAccess {
                offset,
                len: data.len(),
            });
        }
        self.write_bar(offset, data);
        Ok(IoAction::Continue)
    }
}

impl Drop for PciTransport {
    fn drop(&mut self) {
        // Stop the device's workers before the eventfds they wait on go,
        // and take the eventfds out of the hypervisor.
        self.lock().device.reset();
        self.unregister_all();
    }
}
