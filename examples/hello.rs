//! hello: the smallest complete vmkit VMM.
//!
//! It assembles a tiny 64-bit guest at run time, boots it straight into long
//! mode, and gives it two devices on the port-I/O bus: a 16550A UART at
//! 0x3F8 whose output goes to this process's stdout, and a debug-exit port at
//! 0xF4. The guest prints a greeting by polling the UART's line status
//! register and then writes its exit code to the debug-exit port; this
//! program exits with that code.
//!
//! Run it with `cargo run --release --example hello`.

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

use iced_x86::code_asm::*;
use vmkit_devices::{DebugExit, IoBus, NullLine, Serial};
use vmkit_memory::pagetable::{build_identity_map, LeafSize};
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::MemoryLayout;
use vmkit_vcpu::{BootConfig, CpuMode, StopReason, Vm, VmConfig};

/// Guest-physical layout of this tiny guest.
const RAM_SIZE: u64 = 2 << 20;
const GDT: u64 = 0x500;
const PAGE_TABLES: u64 = 0x1000;
const STACK_TOP: u64 = 0x8000;
const ENTRY: u64 = 0x10000;

const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;

/// The guest: for each byte of the message, wait until the UART's transmit
/// holding register is empty (LSR bit 5), write the byte to THR; then leave
/// through the debug-exit port with code 0.
fn guest_code() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut message = a.create_label();
    let mut next_byte = a.create_label();
    let mut wait_thre = a.create_label();
    let mut done = a.create_label();

    a.lea(rsi, ptr(message))?;
    a.set_label(&mut next_byte)?;
    a.mov(bl, byte_ptr(rsi))?;
    a.test(bl, bl)?;
    a.jz(done)?;
    a.set_label(&mut wait_thre)?;
    a.mov(dx, u32::from(COM1 + 5))?; // LSR
    a.in_(al, dx)?;
    a.test(al, 0x20u32)?; // THRE
    a.jz(wait_thre)?;
    a.mov(dx, u32::from(COM1))?; // THR
    a.mov(al, bl)?;
    a.out(dx, al)?;
    a.inc(rsi)?;
    a.jmp(next_byte)?;
    a.set_label(&mut done)?;
    a.mov(al, 0u32)?;
    a.out(u32::from(DEBUG_EXIT), al)?;
    a.set_label(&mut message)?;
    a.db(b"Hello from a vmkit guest\n\0")?;
    a.assemble(ENTRY)
}

fn main() -> Result<ExitCode, Box<dyn Error>> {
    // 1. Guest memory: 2 MiB of anonymous RAM, the guest code at ENTRY and
    //    an identity map of the first GiB for long mode.
    let memory = MemoryLayout::new(RAM_SIZE)?.create_memory(&Default::default())?;
    memory.write_slice(&guest_code()?, GuestAddress(ENTRY))?;
    let tables = build_identity_map(
        &memory,
        GuestAddress(PAGE_TABLES),
        0x3000,
        1 << 30,
        LeafSize::Size2M,
    )?;

    // 2. The VM and its single vCPU, started in long mode at ENTRY.
    let vm = Vm::new(memory, VmConfig::default())?;
    let mut vcpu = vm.create_vcpu(0)?;
    let mode = CpuMode::Long {
        gdt: GDT,
        cr3: tables.cr3,
    };
    vcpu.configure(&BootConfig::new(mode, ENTRY, STACK_TOP))?;

    // 3. Devices: the UART writes to stdout; its interrupt line goes nowhere
    //    because this guest polls.
    let bus = IoBus::new();
    let uart = Serial::new(Box::new(std::io::stdout()), Arc::new(NullLine));
    bus.pio.insert(u64::from(COM1), 8, Arc::new(uart))?;
    bus.pio
        .insert(u64::from(DEBUG_EXIT), 1, Arc::new(DebugExit::new()))?;

    // 4. Run until the guest stops.
    match vcpu.run(&bus)? {
        StopReason::Exit(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))),
        other => {
            eprintln!("guest stopped unexpectedly: {other:?}");
            Ok(ExitCode::from(2))
        }
    }
}
