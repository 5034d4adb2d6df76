//! The exit path allocates nothing: a guest makes thousands of PIO and MMIO
//! exits through the vmkit run loop and bus while a counting global
//! allocator watches the vCPU thread.
#![allow(clippy::unwrap_used)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use common::*;
use iced_x86::code_asm::*;
use vmkit_devices::{NullLine, Serial};
use vmkit_vcpu::StopReason;

struct CountingAllocator;

thread_local! {
    // Per thread, so tests running in parallel do not see each other.
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // try_with: the allocator can be called while thread-locals are torn down.
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

/// Runs `f` and returns how many allocations this thread made meanwhile.
fn count_allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    ALLOCATIONS.with(|n| n.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, ALLOCATIONS.with(Cell::get))
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged, so the GlobalAlloc contract is the system allocator's;
// the only extra work is a thread-local counter update, which neither
// allocates nor unwinds.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded with the caller's layout, per the contract above.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: `ptr` was allocated by System (every allocation here is)
        // with `layout`, as the caller guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by System with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn io_exits_allocate_nothing() {
    require_kvm!();
    const ROUNDS: u32 = 500;
    let code = assemble(64, |a| {
        let mut again = a.create_label();
        a.mov(ecx, ROUNDS)?;
        a.mov(rbx, 0x3000_0000u64)?; // unbacked: the MMIO miss path
        a.set_label(&mut again)?;
        a.mov(dx, 0x3fdu32)?;
        a.in_(al, dx)?; // UART LSR
        a.mov(dx, 0x3f8u32)?;
        a.out(dx, al)?; // UART THR
        a.mov(eax, dword_ptr(rbx))?; // MMIO read miss
        a.mov(dword_ptr(rbx), eax)?; // MMIO write miss
        a.dec(ecx)?;
        a.jnz(again)?;
        a.mov(al, 0u32)?;
        a.out(EXIT_PORT as u32, al)
    });
    let (_vm, mut vcpu) = boot(64, &code);
    let bus = bus();
    let uart = Serial::new(Box::new(std::io::sink()), Arc::new(NullLine));
    bus.pio.insert(0x3f8, 8, Arc::new(uart)).unwrap();

    let (stop, allocations) = count_allocations(|| vcpu.run(&bus));

    assert!(matches!(stop, Ok(StopReason::Exit(0))), "{stop:?}");
    let stats = bus.stats();
    assert_eq!(stats.mmio_read_misses, u64::from(ROUNDS));
    assert_eq!(stats.mmio_write_misses, u64::from(ROUNDS));
    assert_eq!(
        allocations,
        0,
        "the run loop allocated during {} exits",
        4 * ROUNDS + 1
    );
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the test above against a counter that can never count.
    let (v, allocations) = count_allocations(|| std::hint::black_box(vec![1u8; 64]));
    drop(v);
    assert!(allocations >= 1);
}
