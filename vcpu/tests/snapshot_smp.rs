//! Snapshots of a running multi-vCPU guest: the bootstrap processor wakes
//! application processors with INIT/SIPI through the in-kernel LAPIC, every
//! vCPU counts in its own page, and the host pauses them all together,
//! saves them (full and incremental) and restores them into fresh VMs.
//! Also the guest's clocks across a restore, and many pause/capture/resume
//! rounds in a row.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;
use vmkit_devices::IoBus;
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::MemoryLayout;
use vmkit_vcpu::kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use vmkit_vcpu::{
    pause_all, resume_all, BootConfig, CpuMode, CpuidConfig, MemorySnapshot, Snapshot, StopReason,
    Vcpu, VcpuHandle, Vm, VmConfig,
};

/// The bootstrap processor and three application processors; AP 3 is
/// started only when the host sets `GO`.
const CPUS: u32 = 4;
const LATE_AP: u32 = 3;
/// APs write their APIC ID here once, when they start.
const REPORT_PORT: u16 = 0x510;
/// vCPU n reports every 16th value of its counter to `TICK_BASE + 4 * n`.
const TICK_BASE: u16 = 0x540;
const REPORT_EVERY: u64 = 16;
/// vCPU n counts in the dword at `COUNTS + 0x1000 * n` (one page each,
/// below 64 KiB so that real-mode APs reach it with DS = 0).
const COUNTS: u64 = 0xC000;
/// The host writes 1 here to make the BSP start the late AP; the BSP
/// writes 2 once it has. On the BSP's counter page, which it dirties
/// anyway.
const GO: u64 = COUNTS + 0x100;
const SIPI_VECTOR: u32 = 0x0A;
const TRAMPOLINE: u64 = (SIPI_VECTOR as u64) << 12;
const LAPIC: u32 = 0xFEE0_0000;
/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

fn config() -> VmConfig {
    VmConfig {
        irqchip: true,
        pit: false,
        log_dirty_pages: true,
    }
}

fn slot(id: u32) -> u64 {
    COUNTS + 0x1000 * u64::from(id)
}

/// INIT then SIPI to the APIC ID `id` (physical destination, level
/// assert); `rbx` holds the LAPIC base.
fn init_sipi(a: &mut CodeAssembler, id: u32) -> Result<(), IcedError> {
    a.mov(dword_ptr(rbx + 0x310), id << 24)?;
    a.mov(dword_ptr(rbx + 0x300), 0x0000_4500u32)?;
    a.mov(dword_ptr(rbx + 0x310), id << 24)?;
    a.mov(dword_ptr(rbx + 0x300), 0x0000_4600u32 | SIPI_VECTOR)
}

/// The 64-bit BSP: enables its LAPIC, starts APs 1 and 2, then counts in
/// its slot, reporting every 16th value, and starts AP 3 when `GO` is 1.
fn bsp_code() -> Vec<u8> {
    assemble(64, |a| {
        let mut top = a.create_label();
        let mut count = a.create_label();
        a.mov(ebx, LAPIC)?;
        a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?;
        for id in 1..LATE_AP {
            init_sipi(a, id)?;
        }
        a.set_label(&mut top)?;
        a.cmp(dword_ptr(GO), 1)?;
        a.jne(count)?;
        init_sipi(a, LATE_AP)?;
        a.mov(dword_ptr(GO), 2u32)?;
        a.set_label(&mut count)?;
        a.inc(dword_ptr(slot(0)))?;
        a.mov(eax, dword_ptr(slot(0)))?;
        a.test(eax, (REPORT_EVERY - 1) as u32)?;
        a.jnz(top)?;
        a.mov(edx, u32::from(TICK_BASE))?;
        a.out(dx, eax)?;
        a.jmp(top)
    })
}

/// Real-mode AP code at the SIPI page: reports its APIC ID (CPUID leaf
/// 1), then counts in its slot and reports every 16th value on its tick
/// port.
fn ap_code() -> Vec<u8> {
    assemble_at(16, 0, |a| {
        let mut top = a.create_label();
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 24u32)?;
        a.mov(eax, ebx)?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        // dx = TICK_BASE + 4 * id, bx = COUNTS + 0x1000 * id.
        a.mov(dx, bx)?;
        a.shl(dx, 2u32)?;
        a.add(dx, u32::from(TICK_BASE))?;
        a.shl(bx, 12u32)?;
        a.add(bx, COUNTS as u32)?;
        a.set_label(&mut top)?;
        a.inc(dword_ptr(bx))?;
        a.mov(eax, dword_ptr(bx))?;
        a.test(eax, (REPORT_EVERY - 1) as u32)?;
        a.jnz(top)?;
        a.out(dx, eax)?;
        a.jmp(top)
    })
}

/// What the guest's vCPUs reported, per vCPU.
#[derive(Default)]
struct Reports {
    ticks: Vec<Mutex<Vec<u64>>>,
    ids: Mutex<Vec<u64>>,
}

impl Reports {
    fn ticks(&self, id: u32) -> Vec<u64> {
        self.ticks[id as usize].lock().unwrap().clone()
    }
    fn count(&self, id: u32) -> usize {
        self.ticks[id as usize].lock().unwrap().len()
    }
    fn last(&self, id: u32) -> u64 {
        self.ticks(id).last().copied().unwrap_or(0)
    }
    fn ids(&self) -> Vec<u64> {
        self.ids.lock().unwrap().clone()
    }
}

fn smp_bus() -> (Arc<IoBus>, Arc<Reports>) {
    let bus = bus();
    let reports = Arc::new(Reports {
        ticks: (0..CPUS).map(|_| Mutex::new(Vec::new())).collect(),
        ids: Mutex::new(Vec::new()),
    });
    let r = reports.clone();
    bus.pio
        .insert(
            u64::from(REPORT_PORT),
            4,
            Hook::new(move |v| r.ids.lock().unwrap().push(v)),
        )
        .unwrap();
    for id in 0..CPUS {
        let r = reports.clone();
        bus.pio
            .insert(
                u64::from(TICK_BASE) + 4 * u64::from(id),
                4,
                Hook::new(move |v| r.ticks[id as usize].lock().unwrap().push(v)),
            )
            .unwrap();
    }
    (Arc::new(bus), reports)
}

fn memory() -> vmkit_memory::GuestMemoryMmap {
    MemoryLayout::new(RAM)
        .unwrap()
        .create_memory(&Default::default())
        .unwrap()
}

/// A VM running the SMP guest from its start: BSP in long mode, APs
/// waiting for INIT/SIPI.
fn boot_smp() -> (Vm, Vec<Vcpu>) {
    let (memory, page_root) = identity_mapped_memory(&bsp_code());
    memory
        .write_slice(&ap_code(), GuestAddress(TRAMPOLINE))
        .unwrap();
    let vm = Vm::new(memory, config()).unwrap();
    let cpuid = CpuidConfig {
        vcpu_count: CPUS,
        ..Default::default()
    };
    let vcpus = (0..CPUS)
        .map(|id| {
            let vcpu = vm.create_vcpu(id).unwrap();
            if id == 0 {
                let mode = CpuMode::Long {
                    gdt: GDT,
                    cr3: page_root,
                };
                vcpu.configure(&BootConfig {
                    cpuid,
                    ..BootConfig::new(mode, CODE, STACK)
                })
                .unwrap();
            } else {
                vcpu.configure_ap(&cpuid).unwrap();
            }
            vcpu
        })
        .collect();
    (vm, vcpus)
}

/// A fresh VM with `CPUS` vCPUs created and not configured: the target
/// of a restore.
fn blank_smp() -> (Vm, Vec<Vcpu>) {
    let vm = Vm::new(memory(), config()).unwrap();
    let vcpus = (0..CPUS).map(|id| vm.create_vcpu(id).unwrap()).collect();
    (vm, vcpus)
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One thread per vCPU. [`freeze`](Fleet::freeze) pauses them all
/// together and takes the vCPUs out of their run loops so that they can
/// be saved; [`thaw`](Fleet::thaw) hands them back.
struct Fleet {
    handles: Vec<VcpuHandle>,
    parked: Receiver<Vcpu>,
    back: Vec<Sender<Option<Vcpu>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Fleet {
    fn start(vcpus: Vec<Vcpu>, bus: &Arc<IoBus>) -> Fleet {
        let (parked_tx, parked) = channel();
        let mut back = Vec::new();
        let mut threads = Vec::new();
        let handles = vcpus.iter().map(Vcpu::handle).collect();
        for mut vcpu in vcpus {
            let (tx, rx) = channel::<Option<Vcpu>>();
            back.push(tx);
            let parked_tx = parked_tx.clone();
            let bus = bus.clone();
            threads.push(std::thread::spawn(move || loop {
                match vcpu.run(&*bus).unwrap() {
                    StopReason::Kicked => {
                        parked_tx.send(vcpu).unwrap();
                        match rx.recv().unwrap() {
                            Some(v) => vcpu = v,
                            None => return,
                        }
                    }
                    other => panic!("vCPU {} stopped with {other:?}", vcpu.id()),
                }
            }));
        }
        Fleet {
            handles,
            parked,
            back,
            threads,
        }
    }

    /// `pause_all`, then calls `while_paused` (every vCPU parked, none
    /// running guest code), then kicks and resumes them: a kick made while
    /// parked arms `immediate_exit`, so each run loop returns `Kicked`
    /// without running guest code again. Returns the vCPUs, by id.
    fn freeze(&self, while_paused: impl FnOnce()) -> Vec<Vcpu> {
        pause_all(&self.handles).unwrap();
        while_paused();
        for h in &self.handles {
            h.kick().unwrap();
        }
        resume_all(&self.handles).unwrap();
        let mut vcpus: Vec<Vcpu> = (0..self.handles.len())
            .map(|_| self.parked.recv_timeout(WAIT).unwrap())
            .collect();
        vcpus.sort_by_key(Vcpu::id);
        vcpus
    }

    fn thaw(&self, vcpus: Vec<Vcpu>) {
        for v in vcpus {
            self.back[v.id() as usize].send(Some(v)).unwrap();
        }
    }

    /// Freezes and ends every thread; returns the vCPUs.
    fn stop(self) -> Vec<Vcpu> {
        let vcpus = self.freeze(|| {});
        for tx in &self.back {
            tx.send(None).unwrap();
        }
        for t in self.threads {
            t.join().unwrap();
        }
        vcpus
    }
}

fn refs(vcpus: &[Vcpu]) -> Vec<&Vcpu> {
    vcpus.iter().collect()
}

/// The dword at `addr` in a full memory snapshot.
fn snapshot_dword(snap: &Snapshot, addr: u64) -> u64 {
    let Some(MemorySnapshot::Full(regions)) = &snap.memory else {
        panic!("not a full snapshot");
    };
    let r = regions
        .iter()
        .find(|r| r.base <= addr && addr + 4 <= r.base + r.data.len() as u64)
        .unwrap();
    let at = (addr - r.base) as usize;
    u64::from(u32::from_le_bytes(r.data[at..at + 4].try_into().unwrap()))
}

fn dword(vm: &Vm, addr: u64) -> u64 {
    u64::from(vm.memory().read_obj::<u32>(GuestAddress(addr)).unwrap())
}

fn mp_state(snap: &Snapshot, id: u32) -> u32 {
    snap.vcpus
        .iter()
        .find(|v| v.id == id)
        .unwrap()
        .mp_state
        .mp_state
}

/// Checks that `reports` is the sequence 16, 32, ... continued from
/// `last` (the last value reported before the snapshot): nothing lost,
/// nothing repeated.
fn assert_continues(id: u32, reports: &[u64], last: u64) {
    assert!(!reports.is_empty(), "vCPU {id} reported nothing");
    let expected: Vec<u64> = (1..=reports.len() as u64)
        .map(|k| last + k * REPORT_EVERY)
        .collect();
    assert_eq!(
        reports, expected,
        "vCPU {id} did not continue from its snapshotted count {last}"
    );
}

/// What the source VM reported up to a snapshot, per vCPU.
fn lasts(reports: &Reports) -> Vec<u64> {
    (0..CPUS).map(|id| reports.last(id)).collect()
}

/// The saved count of vCPU `id` agrees with what it reported: the counter
/// is at most 16 past the last report (the report of a multiple of 16
/// follows the increment, so the counter may already hold the next one).
fn assert_count_matches_reports(id: u32, count: u64, last: u64) {
    assert!(
        count >= last && count <= last + REPORT_EVERY,
        "vCPU {id}: saved count {count} does not follow its last report {last}"
    );
}

#[test]
fn smp_guest_continues_exactly_after_full_and_incremental_restores() {
    require_kvm!();
    let _dog = watchdog("smp snapshot", Duration::from_secs(90));
    let (vm, vcpus) = boot_smp();
    let (bus, reports) = smp_bus();
    let fleet = Fleet::start(vcpus, &bus);
    let early = || 0..LATE_AP;
    wait_until("the BSP and APs 1 and 2 to count", || {
        early().all(|id| reports.count(id) >= 3)
    });
    let mut ids = reports.ids();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2], "APs 1 and 2 start once each, AP 3 waits");
    assert_eq!(reports.count(LATE_AP), 0);

    // Pause all together; nothing reports while they are parked.
    let mut frozen = Vec::new();
    let vcpus = fleet.freeze(|| {
        frozen = lasts(&reports);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(frozen, lasts(&reports), "a vCPU ran while all were paused");
    });
    assert_eq!(frozen, lasts(&reports), "a vCPU ran between pause and save");
    let full = Snapshot::capture_full(&vm, &refs(&vcpus)).unwrap();
    let full = Snapshot::from_bytes(&full.to_bytes().unwrap()).unwrap();
    fleet.thaw(vcpus);
    for id in early() {
        assert_eq!(mp_state(&full, id), KVM_MP_STATE_RUNNABLE, "vCPU {id}");
        assert_count_matches_reports(id, snapshot_dword(&full, slot(id)), frozen[id as usize]);
    }
    assert_eq!(
        mp_state(&full, LATE_AP),
        KVM_MP_STATE_UNINITIALIZED,
        "AP 3 waits for INIT/SIPI"
    );
    assert_eq!(snapshot_dword(&full, slot(LATE_AP)), 0);
    assert_eq!(snapshot_dword(&full, GO), 0);

    // The source runs on, and starts AP 3, before the incremental capture.
    wait_until("the source to count on", || {
        early().all(|id| reports.last(id) >= frozen[id as usize] + 3 * REPORT_EVERY)
    });
    vm.memory().write_obj(1u32, GuestAddress(GO)).unwrap();
    wait_until("AP 3 to start in the source", || {
        reports.count(LATE_AP) >= 3 && dword(&vm, GO) == 2
    });
    let mut later = Vec::new();
    let vcpus = fleet.freeze(|| later = lasts(&reports));
    assert_eq!(later, lasts(&reports), "a vCPU ran between pause and save");
    let incremental = Snapshot::capture_incremental(&vm, &refs(&vcpus), &full).unwrap();
    let incremental = Snapshot::from_bytes(&incremental.to_bytes().unwrap()).unwrap();
    assert_eq!(incremental.parent, Some(full.id));
    let Some(MemorySnapshot::Dirty(dirty)) = &incremental.memory else {
        panic!("not an incremental snapshot");
    };
    let dirty_pages: usize = dirty.iter().map(|r| r.pages.len()).sum();
    // The four counter pages at least, and far from all of memory.
    assert!(
        (4..64).contains(&dirty_pages),
        "{dirty_pages} dirty pages for four counters"
    );
    for id in 0..CPUS {
        assert_eq!(
            mp_state(&incremental, id),
            KVM_MP_STATE_RUNNABLE,
            "vCPU {id}"
        );
        assert_count_matches_reports(id, dword(&vm, slot(id)), later[id as usize]);
    }
    fleet.thaw(vcpus);
    drop(fleet.stop());
    let ids = reports.ids();
    assert_eq!(ids.len(), 3, "the BSP started AP 3 once: {ids:?}");
    assert_eq!(ids[2], u64::from(LATE_AP), "AP 3 started last: {ids:?}");

    // Restore the full snapshot: everyone continues from their count, and
    // AP 3 still waits until the BSP starts it.
    {
        let (vm2, vcpus2) = blank_smp();
        full.restore(&vm2, &refs(&vcpus2), None).unwrap();
        for v in &vcpus2 {
            let expected = if v.id() == LATE_AP {
                KVM_MP_STATE_UNINITIALIZED
            } else {
                KVM_MP_STATE_RUNNABLE
            };
            assert_eq!(
                v.fd().get_mp_state().unwrap().mp_state,
                expected,
                "restored MP state of vCPU {}",
                v.id()
            );
        }
        let (bus2, reports2) = smp_bus();
        let fleet2 = Fleet::start(vcpus2, &bus2);
        wait_until("the restored vCPUs to count", || {
            early().all(|id| reports2.count(id) >= 5)
        });
        assert_eq!(reports2.count(LATE_AP), 0, "AP 3 ran before its SIPI");
        assert!(reports2.ids().is_empty(), "an AP was started again");
        vm2.memory().write_obj(1u32, GuestAddress(GO)).unwrap();
        wait_until("AP 3 to start after the restore", || {
            reports2.count(LATE_AP) >= 3
        });
        drop(fleet2.stop());
        for id in early() {
            assert_continues(id, &reports2.ticks(id), frozen[id as usize]);
        }
        assert_continues(LATE_AP, &reports2.ticks(LATE_AP), 0);
        assert_eq!(reports2.ids(), vec![u64::from(LATE_AP)]);
    }

    // Restore the full snapshot's memory and the incremental on top: the
    // later state, with AP 3 running.
    {
        let (vm3, vcpus3) = blank_smp();
        let base = full.restore_memory(vm3.memory(), None).unwrap();
        // The incremental snapshot refuses memory that does not hold its
        // parent.
        let (vm_wrong, vcpus_wrong) = blank_smp();
        assert!(incremental
            .restore(&vm_wrong, &refs(&vcpus_wrong), None)
            .is_err());
        incremental
            .restore(&vm3, &refs(&vcpus3), Some(base))
            .unwrap();
        for v in &vcpus3 {
            assert_eq!(
                v.fd().get_mp_state().unwrap().mp_state,
                KVM_MP_STATE_RUNNABLE,
                "vCPU {}",
                v.id()
            );
        }
        let (bus3, reports3) = smp_bus();
        let fleet3 = Fleet::start(vcpus3, &bus3);
        wait_until("the vCPUs restored from the incremental to count", || {
            (0..CPUS).all(|id| reports3.count(id) >= 5)
        });
        drop(fleet3.stop());
        for id in 0..CPUS {
            assert_continues(id, &reports3.ticks(id), later[id as usize]);
        }
        assert!(reports3.ids().is_empty(), "an AP was started again");
        assert_eq!(dword(&vm3, GO), 2);
    }
}

/// Many rounds of pause_all → save → resume_all while every vCPU does
/// port I/O (AP 3 waits in KVM for its SIPI the whole time): no round
/// hangs (the watchdog fails the run), every saved state parses back
/// equal, the counters only move forward, and across all the rounds no
/// vCPU loses or repeats a report.
#[test]
fn many_pause_capture_resume_rounds_with_port_io() {
    require_kvm!();
    const ROUNDS: u32 = 250;
    let _dog = watchdog("pause/capture/resume rounds", Duration::from_secs(60));
    let (vm, vcpus) = boot_smp();
    let (bus, reports) = smp_bus();
    let fleet = Fleet::start(vcpus, &bus);
    wait_until("the vCPUs to count", || {
        (0..LATE_AP).all(|id| reports.count(id) >= 1)
    });
    let started = Instant::now();
    let mut previous = vec![0u64; CPUS as usize];
    let mut capture_time = Duration::ZERO;
    for round in 0..ROUNDS {
        let mut frozen = Vec::new();
        let vcpus = fleet.freeze(|| frozen = lasts(&reports));
        assert_eq!(frozen, lasts(&reports), "round {round}: a vCPU ran");
        let t = Instant::now();
        // Mostly vCPU and VM state; every 50th round guest memory too.
        let snap = if round % 50 == 0 {
            Snapshot::capture_full(&vm, &refs(&vcpus)).unwrap()
        } else {
            let mut s = Snapshot::new();
            for v in &vcpus {
                s.vcpus.push(v.save_state().unwrap());
            }
            s.vm = Some(vm.save_state().unwrap());
            s
        };
        let parsed = Snapshot::from_bytes(&snap.to_bytes().unwrap()).unwrap();
        capture_time += t.elapsed();
        assert_eq!(parsed.id, snap.id);
        assert_eq!(parsed.memory, snap.memory);
        assert_eq!(parsed.vcpus.len(), CPUS as usize);
        for (p, s) in parsed.vcpus.iter().zip(&snap.vcpus) {
            assert_eq!(p.id, s.id);
            assert_eq!(p.regs, s.regs, "round {round}: vCPU {} registers", s.id);
            assert_eq!(p.sregs, s.sregs);
            assert_eq!(p.mp_state, s.mp_state);
            assert_eq!(p.msrs.len(), s.msrs.len());
            assert_eq!(p.xsave, s.xsave);
            let (pl, sl) = (p.lapic.unwrap(), s.lapic.unwrap());
            assert_eq!(pl.regs[..], sl.regs[..]);
        }
        for id in 0..CPUS {
            let count = dword(&vm, slot(id));
            assert!(
                count >= previous[id as usize],
                "round {round}: vCPU {id} went back"
            );
            if id != LATE_AP {
                assert_count_matches_reports(id, count, frozen[id as usize]);
            }
            previous[id as usize] = count;
        }
        assert_eq!(mp_state(&parsed, LATE_AP), KVM_MP_STATE_UNINITIALIZED);
        fleet.thaw(vcpus);
        // Vary how long the vCPUs run between rounds (0-2 ms).
        std::thread::sleep(Duration::from_millis(u64::from(round % 3)));
    }
    let elapsed = started.elapsed();
    drop(fleet.stop());
    eprintln!(
        "{ROUNDS} pause/capture/resume rounds with {CPUS} vCPUs: {elapsed:?} in all, {:?} per round, {:?} of it saving and parsing",
        elapsed / ROUNDS,
        capture_time / ROUNDS
    );
    for id in 0..LATE_AP {
        let ticks = reports.ticks(id);
        assert_continues(id, &ticks, 0);
        assert!(
            previous[id as usize] > ticks[0],
            "vCPU {id} did not run between the rounds"
        );
    }
    assert_eq!(reports.count(LATE_AP), 0);
}

/// Runs a one-vCPU counting guest on a thread; returns how its run loop
/// ended, or `None` if it did not within five seconds (then it is
/// stopped).
fn run_returns(vcpu: Vcpu, bus: &Arc<IoBus>, handle: &VcpuHandle) -> (Vcpu, Option<StopReason>) {
    let (tx, rx) = channel();
    let bus = bus.clone();
    let t = std::thread::spawn(move || {
        let mut vcpu = vcpu;
        let stop = vcpu.run(&*bus).unwrap();
        tx.send(()).unwrap();
        (vcpu, stop)
    });
    let in_time = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    if !in_time {
        handle.stop().unwrap();
    }
    let (vcpu, stop) = t.join().unwrap();
    (vcpu, in_time.then_some(stop))
}

/// The race the pause/capture rounds found: a kick made while a pause is
/// pending but not yet taken (the vCPU thread between two `run` calls, as
/// after `pause_all` found it idle) was answered with the pause alone, and
/// after `resume` the vCPU ran on with the kick lost. Likewise a kick that
/// came with a stop.
#[test]
fn a_kick_made_together_with_a_pause_or_stop_is_not_lost() {
    require_kvm!();
    let _dog = watchdog("kick with pause", Duration::from_secs(60));
    let (_vm, vcpus) = boot_smp();
    let (bus, reports) = smp_bus();
    let mut vcpus = vcpus.into_iter();
    let vcpu = vcpus.next().unwrap();
    let handle = vcpu.handle();

    // Pause and kick while no thread runs the vCPU; the run that follows
    // parks; after resume it must return Kicked.
    handle.pause().unwrap();
    handle.kick().unwrap();
    let h = handle.clone();
    let resumer = std::thread::spawn(move || {
        assert!(h.wait_for(vmkit_vcpu::VcpuState::Paused, WAIT));
        h.resume().unwrap();
    });
    let (vcpu, stop) = run_returns(vcpu, &bus, &handle);
    resumer.join().unwrap();
    assert!(
        matches!(stop, Some(StopReason::Kicked)),
        "the kick made with the pause was lost: {stop:?}"
    );

    // Stop and kick: the first run stops, the next returns Kicked.
    handle.stop().unwrap();
    handle.kick().unwrap();
    let (vcpu, stop) = run_returns(vcpu, &bus, &handle);
    assert!(matches!(stop, Some(StopReason::Stopped)), "{stop:?}");
    let (_vcpu, stop) = run_returns(vcpu, &bus, &handle);
    assert!(
        matches!(stop, Some(StopReason::Kicked)),
        "the kick made with the stop was lost: {stop:?}"
    );
    // Neither run let the guest go far: both ended at once.
    assert!(reports.count(0) < 1000);
}

const TSC_PORT: u16 = 0x520;
const TSC_LAST: u64 = 0x2_0000;
const TSC_COUNT: u64 = 0x2_0008;
const MSR_IA32_TSC: u32 = 0x10;

/// A 64-bit guest that reads the TSC, stores it at `TSC_LAST`, counts in
/// `TSC_COUNT` and reports the count.
fn tsc_guest() -> Vec<u8> {
    assemble(64, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(qword_ptr(TSC_LAST), rax)?;
        a.inc(dword_ptr(TSC_COUNT))?;
        a.mov(eax, dword_ptr(TSC_COUNT))?;
        a.mov(edx, u32::from(TSC_PORT))?;
        a.out(dx, eax)?;
        a.jmp(top)
    })
}

/// Runs the TSC guest until it reports `until`.
fn run_tsc_until(vcpu: &mut Vcpu, until: u64) {
    let handle = vcpu.handle();
    let bus = bus();
    bus.pio
        .insert(
            u64::from(TSC_PORT),
            4,
            Hook::new(move |v| {
                if v == until {
                    handle.kick().unwrap();
                }
            }),
        )
        .unwrap();
    assert!(matches!(vcpu.run(&bus).unwrap(), StopReason::Kicked));
}

fn msr_tsc(vcpu: &Vcpu) -> u64 {
    use vmkit_vcpu::kvm_bindings::{kvm_msr_entry, Msrs};
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.fd().get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

/// Cycles in `d` at `khz`, with 10 % and 5 ms of slack.
fn cycles_bound(d: Duration, khz: u32) -> u64 {
    let ns = d.as_nanos() as u64 * 11 / 10 + 5_000_000;
    ns * u64::from(khz) / 1_000_000
}

/// The guest's clocks across a save, 300 ms "on disk", and a restore.
/// The snapshot holds `IA32_TSC` (not earlier than the guest's last
/// `rdtsc`) and the kvmclock; the restored kvmclock continues from the
/// saved value (the gap is invisible). The guest's TSC after the restore is
/// later than before it and not later than the host time elapsed allows.
/// Whether the gap shows in it depends on whether KVM honoured the
/// `IA32_TSC` write, which the test reads back: on hardware with TSC
/// offsetting the gap is hidden, on `kvm_pvm` (no TSC control) the write is
/// ignored and the guest sees the host's TSC.
#[test]
fn guest_clocks_across_a_save_and_restore() {
    require_kvm!();
    const GAP: Duration = Duration::from_millis(300);
    let _dog = watchdog("clocks", Duration::from_secs(60));
    let cfg = VmConfig {
        irqchip: true,
        pit: true,
        log_dirty_pages: false,
    };
    let start = Instant::now();
    let (vm, mut vcpu) = boot_with(64, &tsc_guest(), cfg);
    run_tsc_until(&mut vcpu, 50);
    let tsc_before: u64 = vm.memory().read_obj(GuestAddress(TSC_LAST)).unwrap();
    let snap = Snapshot::capture_full(&vm, &[&vcpu]).unwrap();
    let saved_at = start.elapsed();
    let state = &snap.vcpus[0];
    let khz = state.tsc_khz;
    assert!(khz > 0, "KVM_GET_TSC_KHZ gave nothing");
    let saved_tsc = state
        .msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .expect("IA32_TSC is not in the snapshot")
        .data;
    assert!(
        saved_tsc >= tsc_before,
        "saved TSC is before the guest's last rdtsc"
    );
    assert!(saved_tsc - tsc_before <= cycles_bound(saved_at, khz));
    let saved_clock = snap.vm.unwrap().clock.clock;

    std::thread::sleep(GAP);
    let restore_started = Instant::now();
    let (vm2, mut vcpu2) = blank_vm(cfg);
    snap.restore(&vm2, &[&vcpu2], None).unwrap();
    let clock = vm2.fd().get_clock().unwrap().clock;
    let restored_tsc = msr_tsc(&vcpu2);
    let since_restore = restore_started.elapsed();
    // kvmclock: continues from the saved value; the gap is not in it.
    assert!(clock >= saved_clock, "kvmclock went back");
    assert!(
        clock - saved_clock <= since_restore.as_nanos() as u64 + 20_000_000,
        "kvmclock advanced {} ns across a restore that took {since_restore:?}",
        clock - saved_clock
    );
    let honoured = restored_tsc.abs_diff(saved_tsc) <= cycles_bound(since_restore, khz);

    run_tsc_until(&mut vcpu2, 52);
    let total = start.elapsed();
    let tsc_after: u64 = vm2.memory().read_obj(GuestAddress(TSC_LAST)).unwrap();
    assert!(
        tsc_after > tsc_before,
        "the guest's TSC went back across the restore"
    );
    let advance = tsc_after - tsc_before;
    assert!(
        advance <= cycles_bound(total, khz),
        "the guest's TSC advanced {advance} cycles in {total:?}"
    );
    let gap = GAP.as_nanos() as u64 * u64::from(khz) / 1_000_000;
    if honoured {
        assert!(advance < gap, "the TSC was restored but the gap shows");
    } else {
        assert!(
            advance >= gap,
            "the TSC write was ignored but the gap is hidden"
        );
    }
    eprintln!(
        "clocks: kvmclock advanced {} us across the restore ({since_restore:?}); IA32_TSC write {}; guest TSC advanced {:.1} ms across a {GAP:?} gap",
        (clock - saved_clock) / 1000,
        if honoured { "honoured" } else { "ignored (no TSC offsetting)" },
        advance as f64 / f64::from(khz)
    );

    // A snapshot from a host with another TSC rate: the rate is set (before
    // the TSC MSR) or the restore fails naming KVM_SET_TSC_KHZ.
    let mut other = snap.clone();
    other.vcpus[0].tsc_khz = khz + khz / 100;
    let (vm3, vcpu3) = blank_vm(cfg);
    match other.restore(&vm3, &[&vcpu3], None) {
        Ok(_) => assert_eq!(vcpu3.fd().get_tsc_khz().unwrap(), khz + khz / 100),
        Err(e) => assert!(e.to_string().contains("KVM_SET_TSC_KHZ"), "{e}"),
    }
}
