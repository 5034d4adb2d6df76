//! Shared helpers of the KVM integration tests: the loud skip, tiny guests
//! assembled at run time, and a recording device.
#![allow(dead_code, clippy::unwrap_used)]

pub mod kernel64;

use std::sync::{Arc, Mutex};

use iced_x86::code_asm::CodeAssembler;
use iced_x86::IcedError;
use vmkit_devices::{BusDevice, DeviceError, IoAction, IoBus};
use vmkit_memory::pagetable::{build_identity_map, LeafSize};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::MemoryLayout;
use vmkit_vcpu::{BootConfig, CpuMode, Vcpu, Vm, VmConfig};

/// Returns whether KVM can be used. Without it the test is skipped loudly,
/// or fails when `VMKIT_REQUIRE_KVM=1` (as in CI).
pub fn kvm_available(test: &str) -> bool {
    let err = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => return true,
        Err(e) => e,
    };
    if std::env::var("VMKIT_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: VMKIT_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {err}");
    }
    eprintln!("SKIPPED {test}: /dev/kvm cannot be opened ({err}); set VMKIT_REQUIRE_KVM=1 to fail instead");
    false
}

/// Skips the calling test (loudly) when KVM is unavailable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !common::kvm_available(module_path!()) {
            return;
        }
    };
}

pub const RAM: u64 = 2 << 20;
pub const GDT: u64 = 0x500;
pub const PAGE_TABLES: u64 = 0x1000;
pub const STACK: u64 = 0x8000;
pub const CODE: u64 = 0x10000;
/// The debug-exit port the guests leave through.
pub const EXIT_PORT: u16 = 0xf4;

/// Assembles guest code for `bitness` at `CODE`.
pub fn assemble(
    bitness: u32,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

/// A VM with `RAM` bytes, `code` at `CODE`, one vCPU configured for
/// `bitness` (16: real, 32: protected, 64: long with the low 4 GiB
/// identity-mapped by 2 MiB pages).
pub fn boot(bitness: u32, code: &[u8]) -> (Vm, Vcpu) {
    boot_with(bitness, code, VmConfig::default())
}

/// `RAM` bytes of guest memory with `code` at `CODE` and the low 4 GiB
/// identity-mapped by 2 MiB pages at `PAGE_TABLES`; returns CR3 too.
pub fn identity_mapped_memory(code: &[u8]) -> (vmkit_memory::GuestMemoryMmap, u64) {
    let memory = MemoryLayout::new(RAM)
        .unwrap()
        .create_memory(&Default::default())
        .unwrap();
    memory.write_slice(code, GuestAddress(CODE)).unwrap();
    let map = build_identity_map(
        &memory,
        GuestAddress(PAGE_TABLES),
        0x6000,
        4 << 30,
        LeafSize::Size2M,
    )
    .unwrap();
    (memory, map.cr3)
}

pub fn boot_with(bitness: u32, code: &[u8], config: VmConfig) -> (Vm, Vcpu) {
    let (memory, cr3) = identity_mapped_memory(code);
    let mode = match bitness {
        16 => CpuMode::Real,
        32 => CpuMode::Protected { gdt: GDT },
        64 => CpuMode::Long { gdt: GDT, cr3 },
        _ => panic!("no such mode"),
    };
    let vm = Vm::new(memory, config).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.configure(&BootConfig::new(mode, CODE, STACK)).unwrap();
    (vm, vcpu)
}

/// A bus with the debug-exit port at `EXIT_PORT`.
pub fn bus() -> IoBus {
    let bus = IoBus::new();
    bus.pio
        .insert(
            u64::from(EXIT_PORT),
            1,
            Arc::new(vmkit_devices::DebugExit::new()),
        )
        .unwrap();
    bus
}

/// A device that answers reads with a fixed value and records writes as
/// (offset, little-endian value, size).
#[derive(Default)]
pub struct Recorder {
    pub read_value: u64,
    pub writes: Mutex<Vec<(u64, u64, usize)>>,
    pub reads: Mutex<Vec<(u64, usize)>>,
}

impl Recorder {
    pub fn returning(read_value: u64) -> Arc<Self> {
        Arc::new(Recorder {
            read_value,
            ..Default::default()
        })
    }
    pub fn writes(&self) -> Vec<(u64, u64, usize)> {
        self.writes.lock().unwrap().clone()
    }
}

impl BusDevice for Recorder {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let bytes = self.read_value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
        self.reads.lock().unwrap().push((offset, data.len()));
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        self.writes
            .lock()
            .unwrap()
            .push((offset, u64::from_le_bytes(bytes), data.len()));
        Ok(IoAction::Continue)
    }
}

/// Assembles guest code for `bitness` at `base`.
pub fn assemble_at(
    bitness: u32,
    base: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a).unwrap();
    a.assemble(base).unwrap()
}

/// A port device that calls a closure with each value written to it.
pub struct Hook(pub Box<dyn Fn(u64) + Send + Sync>);

impl Hook {
    pub fn new(f: impl Fn(u64) + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Hook(Box::new(f)))
    }
}

impl BusDevice for Hook {
    fn read(&self, _offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }
    fn write(&self, _offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        (self.0)(u64::from_le_bytes(bytes));
        Ok(IoAction::Continue)
    }
}

/// Fails the whole test process if it is not dropped within `limit`: a
/// guest waiting in HLT for an interrupt that never comes would otherwise
/// hang the test run.
pub struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

pub fn watchdog(test: &'static str, limit: std::time::Duration) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("WATCHDOG: {test} did not finish within {limit:?}; failing the test run");
            std::process::exit(101);
        }
    });
    Watchdog(Some(tx))
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropping the sender wakes the watchdog thread with Disconnected.
        self.0.take();
    }
}

/// Writes `handler` at `at` and a 64-bit interrupt gate (selector 0x10,
/// BOOT_CS; present, DPL 0) for `vector` into the 256-entry IDT at `idt`,
/// and an IDTR image for that IDT at `idtr`.
pub fn install_handler(
    memory: &vmkit_memory::GuestMemoryMmap,
    idt: u64,
    idtr: u64,
    vector: u8,
    at: u64,
    handler: &[u8],
) {
    memory.write_slice(handler, GuestAddress(at)).unwrap();
    let low = (at & 0xFFFF) | (0x10 << 16) | (0x8E00 << 32) | (((at >> 16) & 0xFFFF) << 48);
    let gate = u128::from(low) | (u128::from(at >> 32) << 64);
    memory
        .write_obj(gate, GuestAddress(idt + 16 * u64::from(vector)))
        .unwrap();
    memory.write_obj(0xFFFu16, GuestAddress(idtr)).unwrap();
    memory.write_obj(idt, GuestAddress(idtr + 2)).unwrap();
}

/// A port device at `port` (4 bytes) that records every value written.
pub fn recording_port(bus: &IoBus, port: u16) -> Arc<Mutex<Vec<u64>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    bus.pio
        .insert(
            u64::from(port),
            4,
            Hook::new(move |v| s.lock().unwrap().push(v)),
        )
        .unwrap();
    seen
}

/// Emits a wait until the dword at `count` reaches `n`, halting between
/// checks. `sti; hlt`: STI's interrupt shadow covers HLT, so no wake-up is
/// lost in between. Leaves interrupts disabled.
pub fn hlt_until(a: &mut CodeAssembler, count: u64, n: u32) -> Result<(), IcedError> {
    use iced_x86::code_asm::dword_ptr;
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(dword_ptr(count), n)?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut done)
}

/// A VM with `RAM` bytes of blank memory and vCPU 0 created but not
/// configured: the target of a snapshot restore.
pub fn blank_vm(config: VmConfig) -> (Vm, Vcpu) {
    let memory = MemoryLayout::new(RAM)
        .unwrap()
        .create_memory(&Default::default())
        .unwrap();
    let vm = Vm::new(memory, config).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    (vm, vcpu)
}

/// Prints the one-line summary of an oracle test:
/// `oracle: NAME cases=N agree=N host-unrunnable=N`, where `cases` are
/// the cases compared with the oracle, `agree` those where vmkit and the
/// oracle agreed, and `host_unrunnable` the cases generated (or planned)
/// that this host cannot run, reported rather than silently dropped.
pub fn oracle_summary(name: &str, cases: usize, agree: usize, host_unrunnable: usize) {
    eprintln!("oracle: {name} cases={cases} agree={agree} host-unrunnable={host_unrunnable}");
}
