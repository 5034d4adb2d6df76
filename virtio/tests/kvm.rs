//! End to end on KVM: a tiny 64-bit guest negotiates a virtio-rng device
//! over virtio-mmio, submits a buffer, notifies through an ioeventfd (no
//! exit to the VMM), takes the used-buffer interrupt through an irqfd line
//! into its IDT handler, and checks the used ring.
#![allow(clippy::unwrap_used)]

// The vcpu crate's KVM test helpers: loud skip, guest assembly, boot.
#[path = "../../vcpu/tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;
use vmkit_devices::{BusDevice, DeviceError, InterruptLine, IoAction};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_vcpu::kvm_ioctls::IoEventAddress;
use vmkit_vcpu::{StopReason, VmConfig};
use vmkit_virtio::devices::Rng;
use vmkit_virtio::transport::{MmioOptions, MmioTransport, MMIO_SIZE, NOTIFY_OFFSET};

const MMIO_BASE: u32 = 0xD000_0000;
const GSI: u32 = 5;
const VECTOR: u8 = 0x40;
const IDT: u64 = 0x20000;
const IDTR: u64 = 0x21000;
const COUNT: u64 = 0x21100;
const ISR_SEEN: u64 = 0x21108;
const HANDLER: u64 = 0x11000;
const DESC: u32 = 0x30000;
const AVAIL: u32 = 0x31000;
const USED: u32 = 0x32000;
const BUF: u32 = 0x33000;
const BUF_LEN: u32 = 32;
const IOAPIC: u32 = 0xFEC0_0000;
const LAPIC: u32 = 0xFEE0_0000;

/// Counts the notify-register writes that reach the transport (they must
/// not, with the ioeventfd registered) and forwards everything.
struct Counting {
    inner: Arc<MmioTransport>,
    notifies: AtomicU64,
}

impl BusDevice for Counting {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<IoAction, DeviceError> {
        if offset == NOTIFY_OFFSET {
            self.notifies.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.write(offset, data)
    }
}

/// Exit codes of the guest.
const OK: u32 = 1;
const FEATURES_REFUSED: u32 = 0xE1;
const BAD_USED: u32 = 0xE2;

fn guest(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut refused = a.create_label();
    let mut bad = a.create_label();
    // PIC masked, IDT loaded, LAPIC on, IOAPIC pin GSI -> VECTOR (edge).
    a.mov(al, 0xFFu32)?;
    a.out(0x21u32, al)?;
    a.out(0xA1u32, al)?;
    a.lidt(ptr(IDTR))?;
    a.mov(ebx, LAPIC)?;
    a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?;
    a.mov(ebx, IOAPIC)?;
    a.mov(dword_ptr(rbx), 0x10 + 2 * GSI)?;
    a.mov(dword_ptr(rbx + 0x10), u32::from(VECTOR))?;
    a.mov(dword_ptr(rbx), 0x11 + 2 * GSI)?;
    a.mov(dword_ptr(rbx + 0x10), 0u32)?;

    // virtio-mmio initialisation (virtio 1.2, 3.1.1 and 4.2.3.1).
    a.mov(ebx, MMIO_BASE)?;
    a.mov(dword_ptr(rbx + 0x70), 1u32)?; // ACKNOWLEDGE
    a.mov(dword_ptr(rbx + 0x70), 3u32)?; // | DRIVER
    a.mov(dword_ptr(rbx + 0x24), 1u32)?; // DriverFeaturesSel = 1
    a.mov(dword_ptr(rbx + 0x20), 1u32)?; // VERSION_1 (bit 32)
    a.mov(dword_ptr(rbx + 0x24), 0u32)?;
    a.mov(dword_ptr(rbx + 0x20), 0u32)?;
    a.mov(dword_ptr(rbx + 0x70), 0xBu32)?; // | FEATURES_OK
    a.mov(eax, dword_ptr(rbx + 0x70))?;
    a.test(eax, 8u32)?;
    a.jz(refused)?;
    a.mov(dword_ptr(rbx + 0x30), 0u32)?; // QueueSel
    a.mov(dword_ptr(rbx + 0x38), 8u32)?; // QueueNum
    a.mov(dword_ptr(rbx + 0x80), DESC)?;
    a.mov(dword_ptr(rbx + 0x84), 0u32)?;
    a.mov(dword_ptr(rbx + 0x90), AVAIL)?;
    a.mov(dword_ptr(rbx + 0x94), 0u32)?;
    a.mov(dword_ptr(rbx + 0xA0), USED)?;
    a.mov(dword_ptr(rbx + 0xA4), 0u32)?;
    a.mov(dword_ptr(rbx + 0x44), 1u32)?; // QueueReady
    a.mov(dword_ptr(rbx + 0x70), 0xFu32)?; // | DRIVER_OK

    // Descriptor 0: BUF, BUF_LEN bytes, device-writable; avail ring [0].
    a.mov(dword_ptr(u64::from(DESC)), BUF)?;
    a.mov(dword_ptr(u64::from(DESC) + 4), 0u32)?;
    a.mov(dword_ptr(u64::from(DESC) + 8), BUF_LEN)?;
    a.mov(dword_ptr(u64::from(DESC) + 12), 2u32)?; // flags WRITE, next 0
    a.mov(word_ptr(u64::from(AVAIL) + 4), 0u32)?;
    a.mov(word_ptr(u64::from(AVAIL) + 2), 1u32)?; // avail idx = 1
    a.mov(dword_ptr(rbx + 0x50), 0u32)?; // QueueNotify(0): ioeventfd

    hlt_until(a, COUNT, 1)?;
    // Used ring: idx 1, element {id 0, len BUF_LEN}.
    a.movzx(eax, word_ptr(u64::from(USED) + 2))?;
    a.cmp(eax, 1u32)?;
    a.jne(bad)?;
    a.mov(eax, dword_ptr(u64::from(USED) + 4))?;
    a.test(eax, eax)?;
    a.jnz(bad)?;
    a.mov(eax, dword_ptr(u64::from(USED) + 8))?;
    a.cmp(eax, BUF_LEN)?;
    a.jne(bad)?;
    a.mov(eax, OK)?;
    a.out(EXIT_PORT as u32, al)?;
    a.set_label(&mut refused)?;
    a.mov(eax, FEATURES_REFUSED)?;
    a.out(EXIT_PORT as u32, al)?;
    a.set_label(&mut bad)?;
    a.mov(eax, BAD_USED)?;
    a.out(EXIT_PORT as u32, al)
}

/// The interrupt handler: read InterruptStatus, acknowledge it, record
/// it, count, EOI.
fn handler(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.push(rax)?;
    a.push(rbx)?;
    a.mov(ebx, MMIO_BASE)?;
    a.mov(eax, dword_ptr(rbx + 0x60))?;
    a.mov(dword_ptr(rbx + 0x64), eax)?;
    a.or(dword_ptr(ISR_SEEN), eax)?;
    a.inc(dword_ptr(COUNT))?;
    a.mov(ebx, LAPIC)?;
    a.mov(dword_ptr(rbx + 0xB0), 0u32)?;
    a.pop(rbx)?;
    a.pop(rax)?;
    a.iretq()
}

#[test]
fn guest_drives_virtio_rng_over_mmio_with_ioeventfd_and_irqfd() {
    require_kvm!();
    let _dog = watchdog("virtio-mmio rng guest", Duration::from_secs(30));
    let code = assemble(64, guest);
    let (vm, mut vcpu) = boot_with(
        64,
        &code,
        VmConfig {
            irqchip: true,
            ..Default::default()
        },
    );
    let handler_code = assemble_at(64, HANDLER, handler);
    install_handler(vm.memory(), IDT, IDTR, VECTOR, HANDLER, &handler_code);

    let line = vm.edge_irq_line(GSI).unwrap();
    let transport = Arc::new(
        MmioTransport::new(
            Box::new(Rng::new()),
            vm.memory().clone(),
            line as Arc<dyn InterruptLine>,
            MmioOptions::default(),
        )
        .unwrap(),
    );
    for (i, fd) in transport.notify_eventfds().iter().enumerate() {
        vm.fd()
            .register_ioevent(
                fd,
                &IoEventAddress::Mmio(u64::from(MMIO_BASE) + NOTIFY_OFFSET),
                i as u32,
            )
            .unwrap();
    }
    let counting = Arc::new(Counting {
        inner: transport.clone(),
        notifies: AtomicU64::new(0),
    });
    let bus = bus();
    bus.mmio
        .insert(u64::from(MMIO_BASE), MMIO_SIZE, counting.clone())
        .unwrap();

    let stop = vcpu.run(&bus).unwrap();
    assert!(matches!(stop, StopReason::Exit(OK)), "guest said {stop:?}");
    // The notification went through the ioeventfd, not through the VMM.
    assert_eq!(counting.notifies.load(Ordering::SeqCst), 0);
    // The handler saw the used-buffer bit.
    let isr: u32 = vm.memory().read_obj(GuestAddress(ISR_SEEN)).unwrap();
    assert_eq!(isr & 1, 1);
    // The device filled the buffer (32 random bytes are all zero with
    // probability 2^-256).
    let mut buf = [0u8; BUF_LEN as usize];
    vm.memory()
        .read_slice(&mut buf, GuestAddress(u64::from(BUF)))
        .unwrap();
    assert!(buf.iter().any(|&b| b != 0));
    assert_eq!(bus.stats().device_errors, 0);
}
