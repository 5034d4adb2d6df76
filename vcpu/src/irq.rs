//! Interrupt delivery into KVM's in-kernel irqchip: the GSI routing table,
//! irqfd-backed interrupt lines (edge, and level with a resample fd) and
//! MSI vectors.
//!
//! # The routing table
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`IrqRouter`] keeps
//! the complete picture: the routes KVM installs by default when the irqchip
//! is created (GSI 0–15 to the PIC pins and to the same IOAPIC pins, GSI
//! 16–23 to IOAPIC pins only) and one MSI route per allocated MSI GSI (from
//! 24 up). Every change that alters the table is written to KVM at once;
//! one that does not alter it costs no ioctl.
//!
//! # Lines
//!
//! [`IrqLine`] registers an eventfd as an irqfd on a GSI. An edge line
//! pulses the GSI for each write. A level line is registered with a resample
//! fd: a write raises the GSI and KVM holds it high until the guest EOIs the
//! interrupt, then lowers it and signals the resample fd. The line remembers
//! whether the device still asserts it, and
//! [`handle_resample`](IrqLine::handle_resample) raises it again if so. That
//! is how a level-triggered INTx stays pending while a device keeps its line
//! high. A [`ResampleWorker`] thread serves the resample fds of many lines.
//!
//! With the default `devices` feature, [`IrqLine`] implements
//! [`vmkit_devices::InterruptLine`] and [`KvmMsiVectors`] implements
//! [`vmkit_devices::MsiVectors`], so devices signal through them directly.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Cap, Kvm};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vm::VmShared;

/// The number of IOAPIC pins KVM's in-kernel IOAPIC has; GSIs below this
/// belong to the irqchip, MSI GSIs are allocated above.
pub const IOAPIC_PINS: u32 = 24;

/// Errors from interrupt set-up and delivery.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// The VM was created without the in-kernel irqchip.
    #[error("interrupt lines and MSI routes need the in-kernel irqchip (VmConfig::irqchip)")]
    NoIrqchip,
    /// KVM lacks a capability this kind of line needs.
    #[error("KVM lacks the capability {0}")]
    MissingCapability(&'static str),
    /// Every GSI KVM offers is in use.
    #[error("no free GSI for an MSI route (KVM offers {max} GSIs)")]
    GsiExhausted {
        /// The number of GSIs KVM supports.
        max: u32,
    },
    /// A line was asked for on a GSI KVM does not have.
    #[error("GSI {gsi} is out of range (KVM offers {max})")]
    GsiOutOfRange {
        /// The GSI asked for.
        gsi: u32,
        /// The number of GSIs KVM supports.
        max: u32,
    },
    /// The GSI is not an allocated MSI GSI.
    #[error("GSI {0} is not an allocated MSI GSI")]
    NotAnMsiGsi(u32),
    /// An MSI vector index beyond the vectors that exist.
    #[error("MSI vector {index} out of range (there are {count})")]
    VectorOutOfRange {
        /// The index asked for.
        index: u16,
        /// How many vectors exist.
        count: u16,
    },
    /// An ioctl on the VM failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// The error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd or epoll operation failed.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The router's state stays consistent across a panic in a holder: every
    // update is a single map operation followed by the ioctl.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> IrqError {
    move |source| IrqError::Io { op, source }
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> IrqError {
    move |source| IrqError::Ioctl { op, source }
}

/// An MSI route: the message address and data, as in
/// `vmkit_devices::MsiMessage`, kept here in raw form so the router does not
/// need the devices crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

#[derive(Debug, Default)]
struct RouterState {
    /// Allocated MSI GSIs and their routes (`None`: allocated, no route).
    msi: BTreeMap<u32, Option<MsiRoute>>,
    /// How many times the table was written to KVM.
    commits: u64,
}

/// The VM's GSI routing table (see the [module documentation](self)).
#[derive(Debug)]
pub struct IrqRouter {
    vm: Arc<VmShared>,
    max_gsi: u32,
    resample: bool,
    state: Mutex<RouterState>,
}

/// KVM's default routes, which it installs with the irqchip.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut routes = Vec::with_capacity(40);
    for gsi in 0..IOAPIC_PINS {
        routes.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    routes
}

fn msi_entry(gsi: u32, route: MsiRoute) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    // Truncation intended: the two halves of the 64-bit address.
    e.u.msi.address_lo = route.address as u32;
    e.u.msi.address_hi = (route.address >> 32) as u32;
    e.u.msi.data = route.data;
    e
}

impl IrqRouter {
    pub(crate) fn new(vm: Arc<VmShared>, kvm: &Kvm) -> Self {
        // KVM_CAP_IRQ_ROUTING answers with the number of routes (and GSIs)
        // the kernel supports.
        let max = kvm.check_extension_int(Cap::IrqRouting);
        let max_gsi = u32::try_from(max).unwrap_or(0).max(IOAPIC_PINS);
        IrqRouter {
            vm,
            max_gsi,
            resample: kvm.check_extension(Cap::IrqfdResample),
            state: Mutex::new(RouterState::default()),
        }
    }

    /// The number of GSIs KVM supports (valid GSIs are `0..max_gsi`).
    pub fn max_gsi(&self) -> u32 {
        self.max_gsi
    }

    /// How many times the routing table has been written to KVM.
    pub fn commits(&self) -> u64 {
        lock(&self.state).commits
    }

    /// Allocates a GSI for an MSI route (the lowest free one from
    /// [`IOAPIC_PINS`]). It has no route until [`set_msi`](Self::set_msi).
    pub fn allocate_msi_gsi(&self) -> Result<u32, IrqError> {
        let mut state = lock(&self.state);
        // The allocated GSIs are sorted: the first gap is the lowest free one.
        let mut candidate = IOAPIC_PINS;
        for &gsi in state.msi.keys() {
            if gsi != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.max_gsi {
            return Err(IrqError::GsiExhausted { max: self.max_gsi });
        }
        state.msi.insert(candidate, None);
        Ok(candidate)
    }

    /// Frees an MSI GSI, removing its route.
    pub fn release_msi_gsi(&self, gsi: u32) -> Result<(), IrqError> {
        let mut state = lock(&self.state);
        match state.msi.remove(&gsi) {
            None => Err(IrqError::NotAnMsiGsi(gsi)),
            Some(None) => Ok(()),
            Some(Some(_)) => self.commit(&mut state),
        }
    }

    /// Sets (or with `None` removes) the MSI route of an allocated GSI.
    /// Writes the table to KVM only if the route changed.
    pub fn set_msi(&self, gsi: u32, route: Option<MsiRoute>) -> Result<(), IrqError> {
        let mut state = lock(&self.state);
        let slot = state.msi.get_mut(&gsi).ok_or(IrqError::NotAnMsiGsi(gsi))?;
        if *slot == route {
            return Ok(());
        }
        let old = std::mem::replace(slot, route);
        let result = self.commit(&mut state);
        if result.is_err() {
            // Keep the model equal to what KVM has.
            state.msi.insert(gsi, old);
        }
        result
    }

    fn commit(&self, state: &mut RouterState) -> Result<(), IrqError> {
        let mut entries = default_routes();
        entries.extend(
            state
                .msi
                .iter()
                .filter_map(|(&gsi, route)| route.map(|r| msi_entry(gsi, r))),
        );
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| IrqError::GsiExhausted { max: self.max_gsi })?;
        self.vm
            .fd
            .set_gsi_routing(&table)
            .map_err(ioctl("KVM_SET_GSI_ROUTING"))?;
        state.commits += 1;
        Ok(())
    }
}

/// An interrupt line into a GSI through an irqfd (see the
/// [module documentation](self)). Unregistered when dropped.
#[derive(Debug)]
pub struct IrqLine {
    router: Arc<IrqRouter>,
    gsi: u32,
    event: EventFd,
    resample: Option<EventFd>,
    asserted: AtomicBool,
}

impl IrqLine {
    pub(crate) fn new(router: &Arc<IrqRouter>, gsi: u32, level: bool) -> Result<Self, IrqError> {
        if gsi >= router.max_gsi {
            return Err(IrqError::GsiOutOfRange {
                gsi,
                max: router.max_gsi,
            });
        }
        let event = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        let fd = &router.vm.fd;
        let resample = if level {
            if !router.resample {
                return Err(IrqError::MissingCapability("KVM_CAP_IRQFD_RESAMPLE"));
            }
            let resample = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
            fd.register_irqfd_with_resample(&event, &resample, gsi)
                .map_err(ioctl("KVM_IRQFD (resample)"))?;
            Some(resample)
        } else {
            fd.register_irqfd(&event, gsi).map_err(ioctl("KVM_IRQFD"))?;
            None
        };
        Ok(IrqLine {
            router: Arc::clone(router),
            gsi,
            event,
            resample,
            asserted: AtomicBool::new(false),
        })
    }

    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Whether this is a level line (with a resample fd).
    pub fn is_level(&self) -> bool {
        self.resample.is_some()
    }

    /// Whether the device currently asserts the line (always false for an
    /// edge line).
    pub fn is_asserted(&self) -> bool {
        self.asserted.load(Ordering::SeqCst)
    }

    /// The resample eventfd of a level line, for a VMM's own event loop;
    /// call [`handle_resample`](Self::handle_resample) when it is readable.
    pub fn resample_event(&self) -> Option<&EventFd> {
        self.resample.as_ref()
    }

    /// Pulses an edge line, or asserts a level line.
    pub fn trigger(&self) -> Result<(), IrqError> {
        if self.is_level() {
            self.set_level(true)
        } else {
            self.signal()
        }
    }

    /// Sets the level of a level line. Raising a low line signals KVM;
    /// lowering it takes effect at the guest's next EOI (KVM holds a
    /// resampled GSI high until then). On an edge line, `true` pulses the
    /// GSI and `false` does nothing.
    pub fn set_level(&self, high: bool) -> Result<(), IrqError> {
        if !self.is_level() {
            return if high { self.signal() } else { Ok(()) };
        }
        let was = self.asserted.swap(high, Ordering::SeqCst);
        if high && !was {
            self.signal()
        } else {
            Ok(())
        }
    }

    /// Serves the resample fd of a level line: consumes the event and, if
    /// the line is still asserted, raises the GSI again. Returns whether it
    /// re-raised. Harmless when no event is pending or on an edge line.
    pub fn handle_resample(&self) -> Result<bool, IrqError> {
        let Some(resample) = &self.resample else {
            return Ok(false);
        };
        match resample.read() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(io("resample eventfd read")(e)),
        }
        // The GSI was lowered at the EOI; `asserted` is the device's level
        // now. An assert racing with this read either sees `asserted` false
        // and signals itself, or is seen here.
        if self.asserted.load(Ordering::SeqCst) {
            self.signal()?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn signal(&self) -> Result<(), IrqError> {
        self.event.write(1).map_err(io("irqfd write"))
    }
}

impl Drop for IrqLine {
    fn drop(&mut self) {
        if let Err(e) = self.router.vm.fd.unregister_irqfd(&self.event, self.gsi) {
            log::warn!("unregistering the irqfd of GSI {}: {e}", self.gsi);
        }
    }
}

/// MSI vectors of one device, each an allocated GSI with an MSI route and
/// an irqfd. Routes are set and removed as the device's MSI/MSI-X logic
/// asks; a trigger of a vector without a route delivers nothing.
#[derive(Debug)]
pub struct KvmMsiVectors {
    router: Arc<IrqRouter>,
    vectors: Vec<(u32, EventFd)>,
}

impl KvmMsiVectors {
    pub(crate) fn new(router: &Arc<IrqRouter>, count: u16) -> Result<Self, IrqError> {
        let mut this = KvmMsiVectors {
            router: Arc::clone(router),
            vectors: Vec::with_capacity(usize::from(count)),
        };
        // On an error part-way, dropping `this` releases what was set up.
        for _ in 0..count {
            let gsi = router.allocate_msi_gsi()?;
            let event = match EventFd::new(EFD_NONBLOCK) {
                Ok(e) => e,
                Err(e) => {
                    let _ = router.release_msi_gsi(gsi);
                    return Err(io("eventfd")(e));
                }
            };
            if let Err(e) = router.vm.fd.register_irqfd(&event, gsi) {
                let _ = router.release_msi_gsi(gsi);
                return Err(ioctl("KVM_IRQFD")(e));
            }
            this.vectors.push((gsi, event));
        }
        Ok(this)
    }

    /// How many vectors there are.
    pub fn len(&self) -> u16 {
        // At most `count`, which was a u16.
        u16::try_from(self.vectors.len()).unwrap_or(u16::MAX)
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    fn vector(&self, index: u16) -> Result<&(u32, EventFd), IrqError> {
        self.vectors
            .get(usize::from(index))
            .ok_or(IrqError::VectorOutOfRange {
                index,
                count: self.len(),
            })
    }

    /// The GSI of vector `index`.
    pub fn gsi(&self, index: u16) -> Result<u32, IrqError> {
        Ok(self.vector(index)?.0)
    }

    /// The irqfd of vector `index`: a worker may write it directly to send
    /// the vector without going through this object.
    pub fn notifier(&self, index: u16) -> Result<&EventFd, IrqError> {
        Ok(&self.vector(index)?.1)
    }

    /// Sets (or with `None` removes) the route of vector `index`.
    pub fn set_route(&self, index: u16, route: Option<MsiRoute>) -> Result<(), IrqError> {
        let gsi = self.vector(index)?.0;
        self.router.set_msi(gsi, route)
    }

    /// Sends vector `index`.
    pub fn signal(&self, index: u16) -> Result<(), IrqError> {
        self.vector(index)?.1.write(1).map_err(io("irqfd write"))
    }
}

impl Drop for KvmMsiVectors {
    fn drop(&mut self) {
        for (gsi, event) in &self.vectors {
            if let Err(e) = self.router.vm.fd.unregister_irqfd(event, *gsi) {
                log::warn!("unregistering the irqfd of MSI GSI {gsi}: {e}");
            }
            if let Err(e) = self.router.release_msi_gsi(*gsi) {
                log::warn!("releasing MSI GSI {gsi}: {e}");
            }
        }
    }
}

/// Stack size of the resample thread.
const RESAMPLE_STACK_BYTES: usize = 256 * 1024;

/// A thread that serves the resample fds of level [`IrqLine`]s, re-raising
/// each line that is still asserted after the guest's EOI. Stopped and
/// joined when dropped.
#[derive(Debug)]
pub struct ResampleWorker {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ResampleWorker {
    /// Starts a worker for `lines` (edge lines among them are ignored).
    pub fn spawn(lines: Vec<Arc<IrqLine>>) -> Result<Self, IrqError> {
        let epoll = Epoll::new().map_err(io("epoll_create"))?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?);
        let lines: Vec<Arc<IrqLine>> = lines.into_iter().filter(|l| l.is_level()).collect();
        let stop_token = lines.len() as u64;
        for (i, line) in lines.iter().enumerate() {
            if let Some(fd) = line.resample_event() {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, i as u64),
                    )
                    .map_err(io("epoll_ctl"))?;
            }
        }
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, stop_token),
            )
            .map_err(io("epoll_ctl"))?;
        let thread = std::thread::Builder::new()
            .name("vmkit-resample".into())
            // It only waits and writes eventfds; a small stack also keeps
            // it out of transparent huge pages (see virtio's worker stacks).
            .stack_size(RESAMPLE_STACK_BYTES)
            .spawn(move || serve(&epoll, &lines, stop_token))
            .map_err(io("spawning the resample thread"))?;
        Ok(ResampleWorker {
            stop,
            thread: Some(thread),
        })
    }
}

fn serve(epoll: &Epoll, lines: &[Arc<IrqLine>], stop_token: u64) {
    let mut events = vec![EpollEvent::default(); lines.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("resample worker: epoll_wait failed, stopping: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let token = event.data();
            if token == stop_token {
                return;
            }
            let Some(line) = usize::try_from(token).ok().and_then(|i| lines.get(i)) else {
                continue;
            };
            if let Err(e) = line.handle_resample() {
                log::warn!("resampling GSI {}: {e}", line.gsi());
            }
        }
    }
}

impl Drop for ResampleWorker {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot stop the resample worker: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the resample worker panicked");
            }
        }
    }
}

#[cfg(feature = "devices")]
mod devices_impls {
    use super::*;
    use vmkit_devices::{InterruptError, InterruptLine, MsiMessage, MsiVectors};

    fn to_interrupt_error(e: IrqError) -> InterruptError {
        match e {
            IrqError::VectorOutOfRange { index, count } => {
                InterruptError::VectorOutOfRange { index, count }
            }
            IrqError::Io { source, .. } => InterruptError::Io(source),
            other => InterruptError::Other(other.to_string()),
        }
    }

    impl InterruptLine for IrqLine {
        fn assert(&self) -> Result<(), InterruptError> {
            self.set_level(true).map_err(to_interrupt_error)
        }

        fn deassert(&self) -> Result<(), InterruptError> {
            self.set_level(false).map_err(to_interrupt_error)
        }

        fn trigger(&self) -> Result<(), InterruptError> {
            // An edge line pulses once; a level line gets a full
            // assert/deassert, which KVM turns into one delivery.
            if self.is_level() {
                self.set_level(true).map_err(to_interrupt_error)?;
                self.set_level(false).map_err(to_interrupt_error)
            } else {
                self.signal().map_err(to_interrupt_error)
            }
        }
    }

    impl MsiVectors for KvmMsiVectors {
        fn count(&self) -> u16 {
            self.len()
        }

        fn set_message(
            &self,
            index: u16,
            message: Option<MsiMessage>,
        ) -> Result<(), InterruptError> {
            let route = message.map(|m| MsiRoute {
                address: m.address,
                data: m.data,
            });
            self.set_route(index, route).map_err(to_interrupt_error)
        }

        fn trigger(&self, index: u16) -> Result<(), InterruptError> {
            self.signal(index).map_err(to_interrupt_error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let routes = default_routes();
        // 16 GSIs on PIC and IOAPIC, 8 on IOAPIC only.
        assert_eq!(routes.len(), 16 * 2 + 8);
        for e in &routes {
            assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
            // SAFETY: every entry was built as an irqchip route, so the
            // `irqchip` member of the union is the initialised one.
            let irqchip = unsafe { e.u.irqchip };
            let (chip, pin) = (irqchip.irqchip, irqchip.pin);
            match chip {
                KVM_IRQCHIP_IOAPIC => assert_eq!(pin, e.gsi),
                KVM_IRQCHIP_PIC_MASTER => assert!(e.gsi < 8 && pin == e.gsi),
                KVM_IRQCHIP_PIC_SLAVE => assert!((8..16).contains(&e.gsi) && pin == e.gsi - 8),
                _ => panic!("unexpected chip {chip}"),
            }
        }
    }

    #[test]
    fn msi_entries_split_the_address() {
        let e = msi_entry(
            30,
            MsiRoute {
                address: 0x1_FEE0_1000,
                data: 0x4041,
            },
        );
        assert_eq!((e.gsi, e.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: built as an MSI route, so `msi` is the initialised member.
        let msi = unsafe { e.u.msi };
        assert_eq!(msi.address_lo, 0xFEE0_1000);
        assert_eq!(msi.address_hi, 1);
        assert_eq!(msi.data, 0x4041);
    }
}
