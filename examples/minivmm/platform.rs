//! Assembling the machine and running it.
//!
//! Guest-physical map (below 4 GiB; RAM above the 3 GiB MMIO gap continues
//! at 4 GiB):
//!
//! | range | what |
//! |---|---|
//! | `0x0000_0000..` | RAM (boot structures, ACPI tables at 0xE0000, kernel at 16 MiB) |
//! | `0xC000_0000..0xD000_0000` | PCI 32-bit BAR window |
//! | `0xD000_0000..` | virtio-mmio devices, 4 KiB each |
//! | `0xD100_0000` | boot-timer device |
//! | `0xE000_0000..0xE010_0000` | PCI ECAM (bus 0) |
//! | `0xFEC0_0000` | I/O APIC (in KVM) |
//! | `0xFEE0_0000` | local APICs (in KVM) |
//!
//! Interrupts: COM1 on GSI 4, the i8042 on 1 and 12 (edge); virtio-mmio
//! devices on GSIs 16.. (level, active high, re-raised on EOI while the
//! device still asserts them — KVM's irqfd resample).

use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmkit_devices::interrupt::{InterruptLine, MsiVectors};
use vmkit_devices::pci::{PciAddress, PciRoot, PciWindows, DEVICES_PER_BUS, ECAM_BUS_SIZE};
use vmkit_devices::{BootTimer, IoBus, Rtc, Serial, I8042};
use vmkit_memory::layout::{Backing, E820Kind, LayoutError, MemoryOptions};
use vmkit_memory::MemoryLayout;
use vmkit_vcpu::kvm_ioctls::{IoEventAddress, NoDatamatch};
use vmkit_vcpu::{
    pause_all, CpuidConfig, IrqLine, ResampleWorker, StopReason, SystemEvent, Vcpu, VcpuHandle, Vm,
    VmConfig,
};
use vmkit_virtio::devices::{
    Block, BlockOptions, Console, ConsoleBackend, ConsoleOptions, FdConsole, Net, NetOptions, Rng,
    SocketConsole, Tap,
};
use vmkit_virtio::transport::mmio::{self, MmioOptions, MmioTransport};
use vmkit_virtio::transport::pci::{NotifyRegistrar, PciOptions, PciTransport};
use vmkit_virtio::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, MmioDevice, PciHost, Platform};
use crate::boot;
use crate::mptable;
use crate::snapshot::{self, Devices, VirtioSlot};
use crate::terminal::{self, RawMode};
use crate::{Args, ConsoleKind, Error, Transport, VconsoleArg};

const COM1: u64 = 0x3f8;
const COM1_GSI: u32 = 4;
const I8042_PORT: u64 = 0x60;
const KBD_GSI: u32 = 1;
const AUX_GSI: u32 = 12;
const RTC_PORT: u64 = 0x70;
const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
const VIRTIO_FIRST_GSI: u32 = 16;
/// KVM's I/O APIC has 24 pins.
const IOAPIC_PINS: u32 = 24;
const BOOT_TIMER_ADDR: u64 = 0xD100_0000;
/// PCI: ECAM for bus 0, the BAR windows and the INTx GSIs.
const ECAM_BASE: u64 = 0xE000_0000;
const PCI_IO_WINDOW: (u64, u64) = (0x1000, 0xF000);
const PCI_MEM32_WINDOW: (u64, u64) = (0xC000_0000, 0x1000_0000);
const PCI_MEM64_MIN_BASE: u64 = 64 << 30;
const PCI_MEM64_SIZE: u64 = 64 << 30;
const PCI_INTX_GSIS: &[u32] = &[16, 17, 18, 19];
/// The least RAM minivmm starts a guest with: the kernel is loaded at
/// 16 MiB and needs room above it.
const MIN_MEMORY: u64 = 64 << 20;

/// Keeps virtio-pci notify addresses registered as KVM ioeventfds while
/// the guest moves BARs.
struct KvmNotify(Arc<Vm>);

impl NotifyRegistrar for KvmNotify {
    fn register(&self, addr: u64, _len: u32, fd: &EventFd) -> std::io::Result<()> {
        // Any write width at `addr` (Linux writes the 16-bit queue index).
        self.0
            .fd()
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, addr: u64, _len: u32, fd: &EventFd) -> std::io::Result<()> {
        self.0
            .fd()
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// What ends the run.
#[derive(Debug)]
enum Event {
    /// The guest reset itself (i8042, ACPI, triple fault).
    Reboot(&'static str),
    /// The guest powered off.
    PowerOff,
    /// A vCPU failed.
    Failed(String),
}

fn kvm<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Kvm(format!("{what}: {e}"))
}

/// Stack size of a vCPU thread: exits are handled by shallow device code,
/// and a stack below 2 MiB never becomes a transparent huge page (with
/// THP `always`, as in Debian's kernels, a 2 MiB aligned 2 MiB stack
/// would put 2 MiB in RSS).
const VCPU_STACK_BYTES: usize = 1024 * 1024;

/// One vCPU thread: runs until the guest resets or powers off, a stop is
/// requested, or something fails; reports terminal events on `events`.
/// Hands the vCPU back when it ends (for a snapshot).
fn vcpu_thread(
    mut vcpu: Vcpu,
    bus: Arc<IoBus>,
    events: mpsc::Sender<Event>,
) -> std::io::Result<JoinHandle<Vcpu>> {
    let name = format!("vcpu{}", vcpu.id());
    std::thread::Builder::new()
        .name(name)
        .stack_size(VCPU_STACK_BYTES)
        .spawn(move || loop {
            let event = match vcpu.run(&*bus) {
                Ok(StopReason::Kicked | StopReason::Interrupted | StopReason::Hlt) => continue,
                Ok(StopReason::Stopped) => return vcpu,
                Ok(StopReason::Reset) => Event::Reboot("the i8042 reset line"),
                Ok(StopReason::Shutdown(_)) => Event::Reboot("a triple fault"),
                Ok(StopReason::SystemEvent {
                    kind: SystemEvent::Reset,
                    ..
                }) => Event::Reboot("a system reset"),
                Ok(StopReason::PowerOff)
                | Ok(StopReason::SystemEvent {
                    kind: SystemEvent::Shutdown,
                    ..
                }) => Event::PowerOff,
                Ok(StopReason::Exit(code)) => Event::Failed(format!("exit request {code}")),
                Ok(other) => Event::Failed(format!("vCPU {} stopped: {other:?}", vcpu.id())),
                Err(e) => Event::Failed(format!("vCPU {}: {e}", vcpu.id())),
            };
            // The main thread may be gone already; nothing more to do then.
            let _ = events.send(event);
            return vcpu;
        })
}

/// Whether console input may still reach the UART. Closing it waits for
/// a push in progress, so that afterwards the UART's receive FIFO changes
/// only through the guest (a snapshot saves it).
#[derive(Debug, Default)]
struct InputGate {
    closed: Mutex<bool>,
}

impl InputGate {
    fn close(&self) {
        *self.closed.lock().unwrap_or_else(PoisonError::into_inner) = true;
    }

    /// Pushes what the UART has room for unless closed; None once closed.
    fn push(&self, serial: &Serial, bytes: &[u8]) -> Option<usize> {
        let closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        if *closed {
            return None;
        }
        let room = serial.input_space().min(bytes.len());
        Some(serial.push_input(bytes.get(..room).unwrap_or_default()))
    }
}

/// Feeds this process's stdin to the UART, never faster than the guest
/// drains its FIFO. Ends at EOF or once `gate` is closed.
fn stdin_to_serial(serial: Arc<Serial>, gate: Arc<InputGate>) {
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .stack_size(VCPU_STACK_BYTES / 4)
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let mut pending = buf.get(..n).unwrap_or_default();
                while !pending.is_empty() {
                    match gate.push(&serial, pending) {
                        None => return,
                        Some(0) => std::thread::sleep(Duration::from_millis(2)),
                        Some(taken) => pending = pending.get(taken..).unwrap_or_default(),
                    }
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("minivmm: no console input: {e}");
    }
}

/// The virtio devices the command line asks for, in a fixed order: disks,
/// network devices, rng.
/// A virtio device with a name for messages.
type NamedDevice = (String, Box<dyn VirtioDevice>);

fn virtio_devices(args: &Args) -> Result<Vec<NamedDevice>, Error> {
    let mut devices: Vec<NamedDevice> = Vec::new();
    for (i, disk) in args.disk.iter().enumerate() {
        let options = BlockOptions {
            read_only: disk.read_only,
            id: format!("minivmm-disk{i}"),
            ..Default::default()
        };
        let block = Block::open(&disk.path, options)
            .map_err(|e| Error::Disk(format!("{}: {e}", disk.path.display())))?;
        devices.push((
            format!("virtio-blk {}", disk.path.display()),
            Box::new(block),
        ));
    }
    for (i, net) in args.net.iter().enumerate() {
        let tap = Tap::open(&net.tap).map_err(|e| {
            Error::Net(format!(
                "tap {}: {e} (does it exist, and may this user open it?)",
                net.tap
            ))
        })?;
        // A fixed locally administered MAC per device unless one is given.
        let mac = net.mac.unwrap_or([0x02, 0x76, 0x6d, 0x6b, 0x00, i as u8]);
        let options = NetOptions {
            mac: Some(mac),
            ..Default::default()
        };
        let device = Net::new(Box::new(tap), options)
            .map_err(|e| Error::Net(format!("{}: {e}", net.tap)))?;
        devices.push((format!("virtio-net {}", net.tap), Box::new(device)));
    }
    if args.rng {
        devices.push(("virtio-rng".into(), Box::new(Rng::new())));
    }
    if args.console == ConsoleKind::Virtio {
        let backend =
            FdConsole::stdio().map_err(|e| Error::Console(format!("stdin/stdout: {e}")))?;
        let console = Console::new(Box::new(backend), ConsoleOptions::default())
            .map_err(|e| Error::Console(e.to_string()))?;
        devices.push(("virtio-console (stdio)".into(), Box::new(console)));
    }
    if let Some(vconsole) = &args.vconsole {
        let (name, backend): (String, Box<dyn ConsoleBackend>) = match vconsole {
            VconsoleArg::Socket(path) => {
                // A stale socket file from an earlier run would make bind fail.
                let _ = std::fs::remove_file(path);
                let b = SocketConsole::listen(path)
                    .map_err(|e| Error::Console(format!("socket {}: {e}", path.display())))?;
                (
                    format!("virtio-console (socket {})", path.display()),
                    Box::new(b),
                )
            }
            VconsoleArg::File(path) => {
                let b = FdConsole::file(path)
                    .map_err(|e| Error::Console(format!("file {}: {e}", path.display())))?;
                (
                    format!("virtio-console (file {})", path.display()),
                    Box::new(b),
                )
            }
        };
        let console = Console::new(backend, ConsoleOptions::default())
            .map_err(|e| Error::Console(e.to_string()))?;
        devices.push((name, Box::new(console)));
    }
    Ok(devices)
}

/// Builds the machine from `args` (booting a kernel, or continuing a
/// snapshot with `--restore`), runs it until the guest reboots or powers
/// off (exit status 0), a snapshot is taken (0) or something fails.
pub fn run(args: &Args) -> Result<ExitCode, Error> {
    let mut phases = Phases::new();
    if args.memory < MIN_MEMORY {
        return Err(Error::Memory(format!(
            "{} MiB is too little; minivmm needs at least {} MiB",
            args.memory >> 20,
            MIN_MEMORY >> 20
        )));
    }
    // A snapshot to continue is read and checked before anything is built.
    let restore = match &args.restore {
        Some(path) => {
            let started = Instant::now();
            let s = snapshot::read(path, args)?;
            Some((s, snapshot::ms_since(started)))
        }
        None => None,
    };
    if args.snapshot.is_some() {
        // Before any thread exists: they all inherit SIGUSR1 blocked.
        terminal::catch_snapshot_signal().map_err(Error::Snapshot)?;
    }
    let devices = virtio_devices(args)?;
    phases.mark("backends");
    let n_devices = devices.len();
    let max_devices = match args.transport {
        Transport::Mmio => (IOAPIC_PINS - VIRTIO_FIRST_GSI) as usize,
        // Device 0 is the host bridge.
        Transport::Pci => usize::from(DEVICES_PER_BUS) - 1,
    };
    if devices.len() > max_devices {
        return Err(Error::Device(format!(
            "{} virtio devices; at most {max_devices} fit on the {:?} transport",
            devices.len(),
            args.transport
        )));
    }

    // Memory and the guest image.
    let mut layout = MemoryLayout::new(args.memory).map_err(|e| Error::Memory(e.to_string()))?;
    let (mmio, pci) = match args.transport {
        Transport::Mmio => {
            let mmio: Vec<MmioDevice> = (0..devices.len())
                .map(|i| MmioDevice {
                    base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_STRIDE,
                    len: VIRTIO_MMIO_STRIDE,
                    gsi: VIRTIO_FIRST_GSI + i as u32,
                })
                .collect();
            (mmio, None)
        }
        Transport::Pci => {
            // Linux uses ECAM only where the e820 map reserves it.
            layout
                .reserve(ECAM_BASE, ECAM_BUS_SIZE, E820Kind::Reserved)
                .map_err(|e| Error::Memory(e.to_string()))?;
            let mem64_base = layout
                .ram_end()
                .max(PCI_MEM64_MIN_BASE)
                .next_multiple_of(1 << 30);
            let host = PciHost {
                ecam: ECAM_BASE,
                io: PCI_IO_WINDOW,
                mem32: PCI_MEM32_WINDOW,
                mem64: (mem64_base, PCI_MEM64_SIZE),
                intx: PCI_INTX_GSIS,
            };
            (Vec::new(), Some(host))
        }
    };
    // Transparent huge pages for guest RAM: every first touch of a guest
    // page is a nested-paging fault (an exit into the host kernel), and 2 MiB
    // pages make 512 times fewer of them (in the nested lab they cost the
    // guest's boot about a second). Hosts built without THP refuse the
    // advice: fall back to small pages there.
    let thp = MemoryOptions {
        backing: Backing::Anonymous {
            transparent_huge_pages: true,
        },
        ..Default::default()
    };
    let memory = match layout.create_memory(&thp) {
        Ok(m) => m,
        Err(LayoutError::HugePages { .. }) => layout
            .create_memory(&MemoryOptions::default())
            .map_err(|e| Error::Memory(e.to_string()))?,
        Err(e) => return Err(Error::Memory(e.to_string())),
    };
    phases.mark("memory");
    let platform = Platform {
        cpus: args.cpus,
        mmio: mmio.clone(),
        pci,
    };
    // The firmware tables and the kernel, unless the snapshot's memory
    // replaces them.
    let boot = match (&restore, &args.kernel) {
        (Some(_), _) => None,
        (None, None) => return Err(Error::Kernel("--kernel is required".into())),
        (None, Some(kernel)) => {
            let rsdp = acpi::write_tables(&memory, &platform)?;
            mptable::write(&memory, args.cpus)?;
            Some(boot::load_kernel(
                &memory,
                &layout,
                kernel,
                args.initrd.as_deref(),
                &args.cmdline,
                rsdp,
            )?)
        }
    };
    phases.mark("tables+kernel");

    // The VM with KVM's interrupt controllers and PIT.
    let vm = Vm::new(
        memory.clone(),
        VmConfig {
            irqchip: true,
            pit: true,
            log_dirty_pages: false,
        },
    )
    .map_err(kvm("creating the VM"))?;
    phases.mark("vm");

    // Legacy devices.
    let bus = Arc::new(IoBus::new());
    let serial_line = vm.edge_irq_line(COM1_GSI).map_err(kvm("COM1 interrupt"))?;
    let serial = Arc::new(Serial::new(
        Box::new(std::io::stdout()),
        serial_line as Arc<dyn InterruptLine>,
    ));
    let insert = |space: &str,
                  base: u64,
                  len: u64,
                  dev: Arc<dyn vmkit_devices::BusDevice>|
     -> Result<(), Error> {
        let target = if space == "pio" { &bus.pio } else { &bus.mmio };
        target
            .insert(base, len, dev)
            .map_err(|e| Error::Device(format!("{space} {base:#x}: {e}")))
    };
    insert("pio", COM1, 8, serial.clone())?;
    let kbd = vm.edge_irq_line(KBD_GSI).map_err(kvm("i8042 interrupt"))?;
    let aux = vm.edge_irq_line(AUX_GSI).map_err(kvm("i8042 interrupt"))?;
    let i8042 = Arc::new(I8042::new(
        kbd as Arc<dyn InterruptLine>,
        aux as Arc<dyn InterruptLine>,
    ));
    insert("pio", I8042_PORT, 5, i8042.clone())?;
    let rtc = Arc::new(Rtc::new());
    insert("pio", RTC_PORT, 2, rtc.clone())?;
    if args.boot_timer {
        let timer = BootTimer::with_reporter(|t| eprintln!("minivmm: {t}"));
        insert("mmio", BOOT_TIMER_ADDR, 1, Arc::new(timer))?;
        eprintln!("minivmm: boot timer at {BOOT_TIMER_ADDR:#x} (write 123 there)");
    }

    // virtio devices: notifications through ioeventfds, interrupts through
    // level irqfds (virtio-mmio, PCI INTx) or MSI routes (MSI-X).
    let vm = Arc::new(vm);
    let mut lines: Vec<Arc<IrqLine>> = Vec::new();
    let mut transports: Vec<Arc<dyn Send + Sync>> = Vec::new();
    // The same transports, for snapshots.
    let mut slots: Vec<VirtioSlot> = Vec::new();
    let mut pci_root = None;
    match pci {
        None => {
            for ((name, device), slot) in devices.into_iter().zip(&mmio) {
                let line = vm
                    .level_irq_line(slot.gsi)
                    .map_err(kvm("virtio interrupt"))?;
                lines.push(line.clone());
                let transport = Arc::new(
                    MmioTransport::new(
                        device,
                        memory.clone(),
                        line as Arc<dyn InterruptLine>,
                        MmioOptions::default(),
                    )
                    .map_err(|e| Error::Device(format!("{name}: {e}")))?,
                );
                for (queue, fd) in transport.notify_eventfds().iter().enumerate() {
                    vm.fd()
                        .register_ioevent(
                            fd,
                            &IoEventAddress::Mmio(slot.base + mmio::NOTIFY_OFFSET),
                            queue as u32,
                        )
                        .map_err(kvm("registering a queue ioeventfd"))?;
                }
                insert("mmio", slot.base, mmio::MMIO_SIZE, transport.clone())?;
                slots.push(VirtioSlot::Mmio(slot.base, transport.clone()));
                transports.push(transport);
            }
        }
        Some(host) => {
            let root = PciRoot::new(
                &bus,
                PciWindows {
                    io: host.io,
                    mem32: host.mem32,
                    mem64: host.mem64,
                },
            )
            .map_err(|e| Error::Device(format!("PCI root complex: {e}")))?;
            // Configuration space through ECAM only: one exit per access,
            // where the 0xCF8/0xCFC pair (`root.config_io_device()`) takes
            // two (address, then data), and Linux prefers that pair when it
            // answers. Linux finds ECAM through the MCFG and accepts it as
            // the DSDT reserves it (QEMU's microvm offers PCIe the same way).
            insert("mmio", host.ecam, ECAM_BUS_SIZE, root.ecam_device())?;
            let registrar: Arc<dyn NotifyRegistrar> = Arc::new(KvmNotify(vm.clone()));
            for (i, (name, device)) in devices.into_iter().enumerate() {
                // Device numbers from 1 (0 is the host bridge), as the
                // DSDT's _PRT assumes.
                let number =
                    u8::try_from(i + 1).map_err(|_| Error::Device("too many devices".into()))?;
                let address = PciAddress::new(0, number, 0)
                    .map_err(|e| Error::Device(format!("{name}: {e}")))?;
                let gsi = host.intx[usize::from(number) % host.intx.len()];
                let line = vm.level_irq_line(gsi).map_err(kvm("PCI INTx"))?;
                lines.push(line.clone());
                let vectors = u16::try_from(device.queue_max_sizes().len() + 1).unwrap_or(u16::MAX);
                let msi = vm.msi_vectors(vectors).map_err(kvm("MSI-X vectors"))?;
                let transport = Arc::new(
                    PciTransport::new(
                        device,
                        memory.clone(),
                        line as Arc<dyn InterruptLine>,
                        msi as Arc<dyn MsiVectors>,
                        PciOptions {
                            registrar: Some(registrar.clone()),
                            ..Default::default()
                        },
                    )
                    .map_err(|e| Error::Device(format!("{name}: {e}")))?,
                );
                root.add_device_at(address, transport.clone())
                    .map_err(|e| Error::Device(format!("{name} at {address}: {e}")))?;
                slots.push(VirtioSlot::Pci(address, transport.clone()));
                transports.push(transport);
            }
            pci_root = Some(root.clone());
            transports.push(root);
        }
    }
    let _resample = ResampleWorker::spawn(lines).map_err(kvm("interrupt resampling"))?;
    phases.mark("devices");
    let machine = Devices {
        serial: serial.clone(),
        i8042,
        rtc,
        virtio: slots,
        pci_root,
    };

    // vCPUs: the boot CPU starts at the kernel's entry; the others wait for
    // the kernel's INIT/SIPI.
    let cpuid = |id: u8| CpuidConfig {
        vcpu_id: u32::from(id),
        vcpu_count: u32::from(args.cpus),
        disable_xsave: args.no_xsave,
    };
    let mut vcpus = Vec::new();
    for id in 0..args.cpus {
        let vcpu = vm
            .create_vcpu(u32::from(id))
            .map_err(kvm("creating a vCPU"))?;
        let Some(boot) = &boot else {
            // Restoring: the snapshot sets everything, CPUID included.
            vcpus.push(vcpu);
            continue;
        };
        if id == 0 {
            let mut config = boot.config;
            config.cpuid = cpuid(0);
            vcpu.configure(&config)
                .map_err(kvm("setting up the boot vCPU"))?;
            if boot.rbx != 0 {
                let mut regs = vcpu.regs().map_err(kvm("reading registers"))?;
                regs.rbx = boot.rbx;
                vcpu.set_regs(&regs).map_err(kvm("setting registers"))?;
            }
        } else {
            vcpu.configure_ap(&cpuid(id))
                .map_err(kvm("setting up an application processor"))?;
        }
        vcpus.push(vcpu);
    }
    phases.mark("vcpus");
    let start = match (&restore, &boot) {
        (Some((snap, read_ms)), _) => {
            let started = Instant::now();
            let refs: Vec<&Vcpu> = vcpus.iter().collect();
            snapshot::restore(snap, &vm, &memory, &refs, &machine)?;
            format!(
                "restored from {} (read in {read_ms:.1} ms, restored in {:.1} ms)",
                args.restore.as_deref().unwrap_or(Path::new("?")).display(),
                snapshot::ms_since(started)
            )
        }
        (None, Some(boot)) => format!("kernel entered by {}", boot.protocol),
        (None, None) => return Err(Error::Kernel("--kernel is required".into())),
    };
    drop(restore);
    eprintln!(
        "minivmm: {} MiB, {} vCPU(s), {} virtio device(s) on {:?}; {start}",
        args.memory >> 20,
        args.cpus,
        n_devices,
        args.transport,
    );
    if args.boot_timer {
        eprintln!("minivmm: set-up {}", phases.report());
    }

    terminal::catch_signals().map_err(Error::Device)?;
    let raw = RawMode::enter();
    let input = Arc::new(InputGate::default());
    if args.console == ConsoleKind::Serial {
        stdin_to_serial(serial.clone(), input.clone());
    }

    let (tx, rx) = mpsc::channel();
    let mut handles: Vec<VcpuHandle> = Vec::new();
    let mut threads = Vec::new();
    for vcpu in vcpus {
        handles.push(vcpu.handle());
        let thread = vcpu_thread(vcpu, bus.clone(), tx.clone())
            .map_err(|e| Error::Kvm(format!("starting a vCPU thread: {e}")))?;
        threads.push(thread);
    }
    drop(tx);
    if args.snapshot.is_some() {
        // Only this thread takes SIGUSR1 (every other has it blocked).
        terminal::accept_snapshot_signal().map_err(Error::Snapshot)?;
    }

    // Wait for the end: a vCPU's event, or a signal.
    let outcome = loop {
        if terminal::interrupted() {
            break Err("interrupted".to_string());
        }
        if terminal::snapshot_requested() {
            break Ok(None);
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(event) => break Ok(Some(event)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err("every vCPU thread ended without a reason".to_string())
            }
        }
    };

    let snapshot_started = Instant::now();
    let snapshot_to = match (&outcome, &args.snapshot) {
        (Ok(None), Some(path)) => Some(path),
        _ => None,
    };
    // All parked together first (each completing an exit in flight), so
    // that no vCPU runs guest code while another is being stopped.
    let paused = match snapshot_to {
        Some(_) => pause_all(&handles).map_err(kvm("pausing the vCPUs")),
        None => Ok(()),
    };
    for h in &handles {
        // A vCPU that has already returned has nothing to stop.
        let _ = h.stop();
    }
    let mut stopped = Vec::new();
    for t in threads {
        if let Ok(vcpu) = t.join() {
            stopped.push(vcpu);
        }
    }
    input.close();
    let saved = snapshot_to.map(|path| {
        paused.and_then(|()| {
            take_snapshot(path, args, &vm, &stopped, &machine, &rx, snapshot_started)
        })
    });
    drop(stopped);
    // Workers stop and join as the transports go.
    drop(machine);
    drop(transports);
    drop(raw);
    // Everything the guest printed is out before the last message.
    let _ = std::io::stdout().flush();

    if let Some(saved) = saved {
        let (saved, paused_ms) = saved?;
        eprintln!(
            "minivmm: snapshot of {} bytes ({:.1} MiB) written to {} in {:.1} ms (vCPUs paused after {paused_ms:.1} ms); exiting",
            saved.bytes,
            saved.bytes as f64 / f64::from(1u32 << 20),
            args.snapshot.as_deref().unwrap_or(Path::new("?")).display(),
            snapshot::ms_since(snapshot_started)
        );
        return Ok(ExitCode::SUCCESS);
    }
    match outcome {
        Ok(None) => Err(Error::Guest(
            "stopped for a snapshot nobody asked for".into(),
        )),
        Ok(Some(Event::Reboot(how))) => {
            eprintln!("minivmm: the guest rebooted ({how}); exiting");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Some(Event::PowerOff)) => {
            eprintln!("minivmm: the guest powered off");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Some(Event::Failed(why))) => Err(Error::Guest(why)),
        Err(why) if why == "interrupted" => {
            eprintln!("minivmm: interrupted; the guest was stopped");
            Ok(ExitCode::from(130))
        }
        Err(why) => Err(Error::Guest(why)),
    }
}

/// Wall-clock time of each set-up step, reported with `--boot-timer` (where
/// a VMM's own share of the boot goes, and which step varies between runs).
struct Phases {
    start: Instant,
    last: Instant,
    marks: Vec<(&'static str, f64)>,
}

impl Phases {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            marks: Vec::new(),
        }
    }

    /// The step called `name` ended now.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks.push((name, snapshot::ms_since(self.last)));
        self.last = now;
    }

    /// `name 1.2 ms, ... (total 3.4 ms)`.
    fn report(&self) -> String {
        let steps: Vec<String> = self
            .marks
            .iter()
            .map(|(name, ms)| format!("{name} {ms:.1} ms"))
            .collect();
        format!(
            "{} (total {:.1} ms)",
            steps.join(", "),
            snapshot::ms_since(self.start)
        )
    }
}

/// Saves the stopped machine to `path` (see [`snapshot::save`]), unless
/// the guest ended on its own (reboot, failure) while it was being
/// stopped: then there is nothing consistent to save.
fn take_snapshot(
    path: &Path,
    args: &Args,
    vm: &Vm,
    vcpus: &[Vcpu],
    machine: &Devices,
    events: &mpsc::Receiver<Event>,
    started: Instant,
) -> Result<(snapshot::Saved, f64), Error> {
    if let Ok(event) = events.try_recv() {
        return Err(Error::Snapshot(format!(
            "the guest ended ({event:?}) while being paused; nothing saved"
        )));
    }
    if vcpus.len() != usize::from(args.cpus) {
        return Err(Error::Snapshot(format!(
            "{} of {} vCPU threads came back; nothing saved",
            vcpus.len(),
            args.cpus
        )));
    }
    let paused_ms = snapshot::ms_since(started);
    let refs: Vec<&Vcpu> = vcpus.iter().collect();
    let saved = snapshot::save(path, args, vm, &refs, machine)?;
    Ok((saved, paused_ms))
}
