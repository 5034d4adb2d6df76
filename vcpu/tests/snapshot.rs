//! Snapshot tests: a counting guest continues exactly where it was saved
//! (in a fresh VM of this process and in a fresh process), XSAVE state and
//! incremental memory survive, and the file format refuses every damaged
//! input without panicking.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;
use proptest::prelude::*;
use vmkit_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmkit_vcpu::kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_lapic_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs,
};
use vmkit_vcpu::snapshot::{
    DeviceSection, DirtyRegionSnapshot, MemoryRegionSnapshot, FORMAT_VERSION,
};
use vmkit_vcpu::{
    MemorySnapshot, Snapshot, SnapshotError, StopReason, Vcpu, VcpuHandle, VcpuSnapshot, Vm,
    VmConfig, VmSnapshot,
};

/// The port the counting guest reports each value to.
const COUNT_PORT: u16 = 0x520;
/// Where the incremental test's guest scribbles (64 pages).
const SCRATCH: u64 = 0x10_0000;
/// The XSAVE test's xmm pattern and where the guest dumps the registers.
const PATTERN: u64 = 0x2_0000;
const DUMP: u64 = 0x3_0000;
/// The env var that turns `child_restores_the_snapshot_named_in_env` on.
const CHILD_ENV: &str = "VMKIT_SNAPSHOT_CHILD";

fn config() -> VmConfig {
    VmConfig {
        irqchip: true,
        pit: true,
        log_dirty_pages: true,
    }
}

/// A 64-bit guest: `eax` counts up from 1, each value goes to `COUNT_PORT`
/// and into the scratch page `value % 64`.
fn counter() -> Vec<u8> {
    assemble(64, |a| {
        let mut top = a.create_label();
        a.xor(eax, eax)?;
        a.mov(edx, u32::from(COUNT_PORT))?;
        a.set_label(&mut top)?;
        a.inc(eax)?;
        a.mov(ecx, eax)?;
        a.and(ecx, 0x3f)?;
        a.shl(ecx, 12)?;
        a.mov(dword_ptr(rcx + SCRATCH as i32), eax)?;
        a.out(dx, eax)?;
        a.jmp(top)
    })
}

/// A bus whose count port records values and kicks the vCPU when it
/// reports `kick_at`.
fn counting_bus(
    handle: VcpuHandle,
    kick_at: Arc<Mutex<u64>>,
) -> (vmkit_devices::IoBus, Arc<Mutex<Vec<u64>>>) {
    let bus = bus();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    bus.pio
        .insert(
            u64::from(COUNT_PORT),
            4,
            Hook::new(move |v| {
                s.lock().unwrap().push(v);
                if v == *kick_at.lock().unwrap() {
                    handle.kick().unwrap();
                }
            }),
        )
        .unwrap();
    (bus, seen)
}

/// Runs `vcpu` until the guest reports `until` (then it is kicked).
fn run_until(vcpu: &mut Vcpu, until: u64) -> Vec<u64> {
    let (bus, seen) = counting_bus(vcpu.handle(), Arc::new(Mutex::new(until)));
    let stop = vcpu.run(&bus).unwrap();
    assert!(matches!(stop, StopReason::Kicked), "{stop:?}");
    let seen = seen.lock().unwrap().clone();
    seen
}

fn assert_counts(seen: &[u64], first: u64) {
    assert!(!seen.is_empty(), "the guest reported nothing");
    assert_eq!(seen[0], first, "first value after the restore");
    for w in seen.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a value was lost or repeated");
    }
}

fn snapshot_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmkit-{name}-{}.snap", std::process::id()))
}

/// Runs a counting guest to 500, saves it (vCPU, VM, full memory) to a file.
/// Returns the file and the last value reported.
fn counting_snapshot(name: &str) -> (PathBuf, u64, Vm, Vcpu) {
    let (vm, mut vcpu) = boot_with(64, &counter(), config());
    let seen = run_until(&mut vcpu, 500);
    assert_counts(&seen, 1);
    let last = *seen.last().unwrap();
    assert_eq!(last, 500);
    let snap = Snapshot::capture_full(&vm, &[&vcpu]).unwrap();
    let path = snapshot_path(name);
    snap.write_to(&mut std::fs::File::create(&path).unwrap())
        .unwrap();
    (path, last, vm, vcpu)
}

/// Restores the snapshot at `path` into a fresh VM and returns what the
/// guest reports until `until`.
fn restore_and_count(path: &PathBuf, until: u64) -> Vec<u64> {
    let snap = Snapshot::read_from(&mut std::fs::File::open(path).unwrap()).unwrap();
    let (vm, mut vcpu) = blank_vm(config());
    snap.restore(&vm, &[&vcpu], None).unwrap();
    run_until(&mut vcpu, until)
}

#[test]
fn a_counting_guest_continues_exactly_in_a_fresh_vm() {
    require_kvm!();
    let _dog = watchdog("snapshot continuation", Duration::from_secs(60));
    let (path, last, _vm, _vcpu) = counting_snapshot("fresh-vm");
    let seen = restore_and_count(&path, last + 300);
    assert_counts(&seen, last + 1);
    assert_eq!(*seen.last().unwrap(), last + 300);
    // The same snapshot restores twice: it is not consumed.
    let again = restore_and_count(&path, last + 10);
    assert_counts(&again, last + 1);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_counting_guest_continues_exactly_in_a_fresh_process() {
    require_kvm!();
    let _dog = watchdog("snapshot in a child process", Duration::from_secs(120));
    let (path, last, _vm, _vcpu) = counting_snapshot("fresh-process");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_restores_the_snapshot_named_in_env",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let expected = format!("CHILD first={} last={} count=100", last + 1, last + 100);
    assert!(
        stdout.contains(&expected),
        "child did not report `{expected}`:\n{stdout}\n{stderr}"
    );
}

/// The child half of the test above: does nothing unless `CHILD_ENV` names
/// a snapshot file.
#[test]
fn child_restores_the_snapshot_named_in_env() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    // Peek at the last value through the saved registers: RAX holds it.
    let snap = Snapshot::read_from(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let last = snap.vcpus[0].regs.rax & 0xffff_ffff;
    let seen = restore_and_count(&path, last + 100);
    assert_counts(&seen, last + 1);
    println!(
        "CHILD first={} last={} count={}",
        seen[0],
        seen.last().unwrap(),
        seen.len()
    );
}

#[test]
fn an_io_exit_in_flight_is_refused_until_completed() {
    require_kvm!();
    // out EXIT_PORT (debug exit: the run loop returns with the OUT in
    // flight), then count.
    let code = assemble(64, |a| {
        let mut top = a.create_label();
        a.mov(al, 1u32)?;
        a.out(EXIT_PORT as u32, al)?;
        a.xor(eax, eax)?;
        a.mov(edx, u32::from(COUNT_PORT))?;
        a.set_label(&mut top)?;
        a.inc(eax)?;
        a.out(dx, eax)?;
        a.jmp(top)
    });
    let (vm, mut vcpu) = boot_with(64, &code, config());
    let (bus, _) = counting_bus(vcpu.handle(), Arc::new(Mutex::new(0)));
    assert!(matches!(vcpu.run(&bus).unwrap(), StopReason::Exit(_)));
    assert!(vcpu.io_in_flight());
    let err = vcpu.save_state().unwrap_err();
    assert!(
        matches!(err, SnapshotError::ExitInFlight { vcpu: 0 }),
        "{err}"
    );
    assert!(err.to_string().contains("complete_pending_io"), "{err}");
    assert!(Snapshot::capture_full(&vm, &[&vcpu]).is_err());
    vcpu.complete_pending_io().unwrap();
    assert!(!vcpu.io_in_flight());
    let snap = Snapshot::capture_full(&vm, &[&vcpu]).unwrap();
    // Restored, the guest goes on after the OUT: it counts from 1.
    let (vm2, mut vcpu2) = blank_vm(config());
    snap.restore(&vm2, &[&vcpu2], None).unwrap();
    let seen = run_until(&mut vcpu2, 5);
    assert_counts(&seen, 1);
}

#[test]
fn restore_refuses_a_vm_of_another_shape() {
    require_kvm!();
    let (vm, vcpu) = boot_with(64, &counter(), config());
    let snap = Snapshot::capture_full(&vm, &[&vcpu]).unwrap();
    let (vm2, vcpu2) = blank_vm(VmConfig::default());
    let err = snap.restore(&vm2, &[&vcpu2], None).unwrap_err();
    assert!(matches!(err, SnapshotError::Incompatible(_)), "{err}");
    let (vm3, _) = blank_vm(config());
    let other = vm3.create_vcpu(1).unwrap();
    let err = snap.restore(&vm3, &[&other], None).unwrap_err();
    assert!(err.to_string().contains("vCPU"), "{err}");
    // An unconfigured vCPU has no CPUID to save.
    let (_vm4, blank) = blank_vm(config());
    assert!(matches!(
        blank.save_state(),
        Err(SnapshotError::NotConfigured { vcpu: 0 })
    ));
}

#[test]
fn xsave_state_survives_a_restore() {
    require_kvm!();
    let _dog = watchdog("xsave", Duration::from_secs(60));
    // Load xmm0-15 from PATTERN, report, then (after the restore) store
    // them to DUMP and report again.
    let code = assemble(64, |a| {
        let regs = [
            xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
            xmm14, xmm15,
        ];
        for (i, r) in regs.iter().enumerate() {
            a.movdqu(*r, xmmword_ptr(PATTERN + 16 * i as u64))?;
        }
        a.mov(edx, u32::from(COUNT_PORT))?;
        a.mov(eax, 1u32)?;
        a.out(dx, eax)?;
        for (i, r) in regs.iter().enumerate() {
            a.movdqu(xmmword_ptr(DUMP + 16 * i as u64), *r)?;
        }
        a.mov(eax, 2u32)?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let (vm, mut vcpu) = boot_with(64, &code, config());
    let pattern: Vec<u8> = (0..256u32).map(|i| (i * 7 + 3) as u8).collect();
    vm.memory()
        .write_slice(&pattern, GuestAddress(PATTERN))
        .unwrap();
    let seen = run_until(&mut vcpu, 1);
    assert_eq!(seen, vec![1]);
    let snap = Snapshot::capture_full(&vm, &[&vcpu]).unwrap();
    let bytes = snap.to_bytes().unwrap();

    let snap = Snapshot::from_bytes(&bytes).unwrap();
    let (vm2, mut vcpu2) = blank_vm(config());
    snap.restore(&vm2, &[&vcpu2], None).unwrap();
    // A fresh vCPU has zeroed xmm registers: only the restore puts the
    // pattern there. Scrub the pattern's source too.
    vm2.memory()
        .write_slice(&[0u8; 256], GuestAddress(PATTERN))
        .unwrap();
    let seen = run_until(&mut vcpu2, 2);
    assert_eq!(seen, vec![2]);
    let mut dump = vec![0u8; 256];
    vm2.memory()
        .read_slice(&mut dump, GuestAddress(DUMP))
        .unwrap();
    assert_eq!(dump, pattern, "xmm registers lost in the restore");
    // And the registers KVM reports match what was saved.
    let restored = vcpu2.save_state().unwrap();
    assert_eq!(restored.xcrs, snap.vcpus[0].xcrs);
    assert_eq!(restored.sregs.cr3, snap.vcpus[0].sregs.cr3);
    assert_eq!(restored.sregs.efer, snap.vcpus[0].sregs.efer);
}

fn memory_image(vm: &Vm) -> Vec<(u64, Vec<u8>)> {
    vm.memory()
        .iter()
        .map(|r| {
            let mut data = vec![0u8; r.len() as usize];
            vm.memory().read_slice(&mut data, r.start_addr()).unwrap();
            (r.start_addr().0, data)
        })
        .collect()
}

#[test]
fn an_incremental_snapshot_on_top_of_a_full_one_restores_memory_and_execution() {
    require_kvm!();
    let _dog = watchdog("incremental", Duration::from_secs(60));
    let (vm, mut vcpu) = boot_with(64, &counter(), config());
    run_until(&mut vcpu, 100);
    let full = Snapshot::capture_full(&vm, &[&vcpu]).unwrap();
    let seen = run_until(&mut vcpu, 130);
    assert_counts(&seen, 101);
    let incremental = Snapshot::capture_incremental(&vm, &[&vcpu], &full).unwrap();
    assert_eq!(incremental.parent, Some(full.id));
    let Some(MemorySnapshot::Dirty(regions)) = &incremental.memory else {
        panic!("no dirty pages");
    };
    let dirty: usize = regions.iter().map(|r| r.pages.len()).sum();
    // 30 values touch 30 scratch pages; the page tables' accessed bits may
    // add a few; far fewer than the 512 pages of RAM.
    assert!((30..100).contains(&dirty), "{dirty} dirty pages");

    // Both go through the file format.
    let full = Snapshot::from_bytes(&full.to_bytes().unwrap()).unwrap();
    let incremental = Snapshot::from_bytes(&incremental.to_bytes().unwrap()).unwrap();

    let (vm2, mut vcpu2) = blank_vm(config());
    // Not on fresh memory, nor on the wrong base.
    let err = incremental.restore(&vm2, &[&vcpu2], None).unwrap_err();
    assert!(matches!(err, SnapshotError::WrongParent { .. }), "{err}");
    let err = incremental
        .restore(&vm2, &[&vcpu2], Some(incremental.id))
        .unwrap_err();
    assert!(err.to_string().contains("applies on top of"), "{err}");
    let base = full.restore_memory(vm2.memory(), None).unwrap();
    assert_eq!(base, full.id);
    incremental.restore(&vm2, &[&vcpu2], Some(base)).unwrap();
    assert!(
        memory_image(&vm2) == memory_image(&vm),
        "restored memory differs from the source's"
    );
    let seen = run_until(&mut vcpu2, 200);
    assert_counts(&seen, 131);
}

// ---------------------------------------------------------------------
// The format, without KVM.

/// A snapshot with every kind of section, made up (no KVM needed).
fn synthetic() -> Snapshot {
    let vcpu = VcpuSnapshot {
        id: 0,
        cpuid: vec![
            kvm_cpuid_entry2 {
                function: 1,
                eax: 0x800f12,
                ..Default::default()
            };
            3
        ],
        regs: kvm_regs {
            rip: 0x1234,
            rax: 42,
            ..Default::default()
        },
        sregs: Default::default(),
        xsave: (0..4096u32).map(|i| i as u8).collect(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        events: Default::default(),
        mp_state: Default::default(),
        lapic: Some(kvm_lapic_state::default()),
        msrs: vec![
            kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            };
            2
        ],
        tsc_khz: 2_000_000,
    };
    let mut chips = [kvm_irqchip::default(); 3];
    for (i, c) in chips.iter_mut().enumerate() {
        c.chip_id = i as u32;
    }
    Snapshot {
        id: 0x1111,
        parent: None,
        vcpus: vec![vcpu],
        vm: Some(VmSnapshot {
            clock: kvm_clock_data {
                clock: 5,
                ..Default::default()
            },
            irqchip: Some(chips),
            pit: Some(kvm_pit_state2::default()),
        }),
        memory: Some(MemorySnapshot::Full(vec![MemoryRegionSnapshot {
            base: 0x1000,
            data: vec![0xab; 4096],
        }])),
        devices: vec![DeviceSection {
            name: "uart0".into(),
            data: vec![1, 2, 3],
        }],
    }
}

#[test]
fn the_format_round_trips() {
    let s = synthetic();
    let bytes = s.to_bytes().unwrap();
    assert_eq!(&bytes[..8], b"VMKITSNP");
    let back = Snapshot::from_bytes(&bytes).unwrap();
    assert_eq!(back.id, s.id);
    assert_eq!(back.parent, None);
    assert_eq!(back.vcpus[0].regs, s.vcpus[0].regs);
    assert_eq!(back.vcpus[0].xsave, s.vcpus[0].xsave);
    assert_eq!(back.vcpus[0].msrs, s.vcpus[0].msrs);
    assert_eq!(back.vcpus[0].cpuid, s.vcpus[0].cpuid);
    assert_eq!(back.vcpus[0].tsc_khz, 2_000_000);
    assert_eq!(back.memory, s.memory);
    assert_eq!(back.device("uart0"), Some(&[1u8, 2, 3][..]));
    assert_eq!(back.to_bytes().unwrap(), bytes, "re-encoding differs");
    // Through a reader that hands out one byte at a time.
    struct Trickle<'a>(&'a [u8]);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let again = Snapshot::read_from(&mut Trickle(&bytes)).unwrap();
    assert_eq!(again.to_bytes().unwrap(), bytes);
    let err = Snapshot::read_from(&mut Trickle(&bytes[..bytes.len() - 3])).unwrap_err();
    assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");

    // An incremental one.
    let mut inc = synthetic();
    inc.parent = Some(0x1111);
    inc.id = 0x2222;
    inc.memory = Some(MemorySnapshot::Dirty(vec![DirtyRegionSnapshot {
        base: 0,
        len: 0x10_0000,
        pages: vec![1, 7, 255],
        data: vec![0x5a; 3 * 4096],
    }]));
    let bytes = inc.to_bytes().unwrap();
    let back = Snapshot::from_bytes(&bytes).unwrap();
    assert_eq!(back.parent, Some(0x1111));
    assert_eq!(back.memory, inc.memory);
}

#[test]
fn another_format_version_is_refused_naming_both() {
    let bytes = synthetic().to_bytes().unwrap();
    for (version, word) in [(0u32, "older"), (FORMAT_VERSION + 1, "newer")] {
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&version.to_le_bytes());
        let err = Snapshot::from_bytes(&b).unwrap_err();
        assert!(
            matches!(err, SnapshotError::UnsupportedVersion { found, supported }
                if found == version && supported == FORMAT_VERSION),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(word), "{msg}");
        assert!(msg.contains(&format!("version {version}")), "{msg}");
        assert!(msg.contains(&format!("version {FORMAT_VERSION}")), "{msg}");
    }
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(
        Snapshot::from_bytes(&b),
        Err(SnapshotError::BadMagic { .. })
    ));
}

/// Rewrites the CRC of the section at `offset` (after editing it).
fn fix_crc(bytes: &mut [u8], offset: usize) {
    let len = u64::from_le_bytes(bytes[offset + 4..offset + 12].try_into().unwrap()) as usize;
    let end = offset + 12 + len;
    let crc = crc32fast::hash(&bytes[offset..end]);
    bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Offset of the first section with `tag`.
fn section(bytes: &[u8], tag: &[u8; 4]) -> usize {
    let mut pos = 12;
    loop {
        let len = u64::from_le_bytes(bytes[pos + 4..pos + 12].try_into().unwrap()) as usize;
        if &bytes[pos..pos + 4] == tag {
            return pos;
        }
        pos += 16 + len;
    }
}

#[test]
fn inconsistent_contents_are_refused_even_with_a_valid_crc() {
    let bytes = synthetic().to_bytes().unwrap();
    let head = section(&bytes, b"HEAD");
    let vcpu = section(&bytes, b"VCPU");

    // Another struct size (kvm_sregs is the second entry).
    let mut b = bytes.clone();
    let at = head + 12 + 28 + 4;
    b[at..at + 4].copy_from_slice(&999u32.to_le_bytes());
    fix_crc(&mut b, head);
    let err = Snapshot::from_bytes(&b).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::StructSize {
                name: "kvm_sregs",
                file: 999,
                ..
            }
        ),
        "{err}"
    );

    // Another architecture.
    let mut b = bytes.clone();
    b[head + 12] = 7;
    fix_crc(&mut b, head);
    assert!(matches!(
        Snapshot::from_bytes(&b),
        Err(SnapshotError::Arch { found: 7, .. })
    ));

    // One MSR more than the section holds.
    let mut b = bytes.clone();
    let n_msrs = vcpu + 12 + 16;
    b[n_msrs..n_msrs + 4].copy_from_slice(&3u32.to_le_bytes());
    fix_crc(&mut b, vcpu);
    let err = Snapshot::from_bytes(&b).unwrap_err();
    assert!(matches!(err, SnapshotError::SectionLength { .. }), "{err}");

    // A count over its limit.
    let mut b = bytes.clone();
    let n_cpuid = vcpu + 12 + 12;
    b[n_cpuid..n_cpuid + 4].copy_from_slice(&100_000u32.to_le_bytes());
    fix_crc(&mut b, vcpu);
    let err = Snapshot::from_bytes(&b).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::Limit {
                what: "CPUID entries",
                count: 100_000,
                ..
            }
        ),
        "{err}"
    );

    // A section length far beyond the input.
    let mut b = bytes.clone();
    b[vcpu + 4..vcpu + 12].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        Snapshot::from_bytes(&b),
        Err(SnapshotError::Truncated { .. })
    ));

    // Unknown section.
    let mut b = bytes.clone();
    b[vcpu..vcpu + 4].copy_from_slice(b"ZZZZ");
    fix_crc(&mut b, vcpu);
    assert!(matches!(
        Snapshot::from_bytes(&b),
        Err(SnapshotError::UnknownSection { .. })
    ));

    // Trailing garbage.
    let mut b = bytes.clone();
    b.extend_from_slice(b"junk");
    let err = Snapshot::from_bytes(&b).unwrap_err();
    assert!(
        matches!(err, SnapshotError::TrailingData { len: 4, .. }),
        "{err}"
    );

    // No end marker.
    let end = section(&bytes, b"END!");
    assert!(matches!(
        Snapshot::from_bytes(&bytes[..end]),
        Err(SnapshotError::Truncated { .. })
    ));
}

fn assert_every_prefix_and_flip_is_refused(bytes: &[u8]) {
    for len in 0..bytes.len() {
        assert!(
            Snapshot::from_bytes(&bytes[..len]).is_err(),
            "a {len}-byte prefix of {} was accepted",
            bytes.len()
        );
    }
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.to_vec();
            b[i] ^= flip;
            assert!(
                Snapshot::from_bytes(&b).is_err(),
                "byte {i} ^ {flip:#x} was accepted"
            );
        }
    }
}

#[test]
fn every_truncation_and_single_byte_corruption_of_a_synthetic_snapshot_is_refused() {
    assert_every_prefix_and_flip_is_refused(&synthetic().to_bytes().unwrap());
}

#[test]
fn every_truncation_and_single_byte_corruption_of_a_real_snapshot_is_refused() {
    require_kvm!();
    let (vm, mut vcpu) = boot_with(64, &counter(), config());
    run_until(&mut vcpu, 10);
    // vCPU and VM state, no memory: small enough to try every byte.
    let mut snap = Snapshot::new();
    snap.vcpus.push(vcpu.save_state().unwrap());
    snap.vm = Some(vm.save_state().unwrap());
    let bytes = snap.to_bytes().unwrap();
    assert!(Snapshot::from_bytes(&bytes).is_ok());
    let err = Snapshot::from_bytes(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let mut b = bytes.clone();
    b[section(&bytes, b"VCPU") + 40] ^= 1;
    let err = Snapshot::from_bytes(&b).unwrap_err();
    assert!(matches!(err, SnapshotError::Checksum { .. }), "{err}");
    assert_every_prefix_and_flip_is_refused(&bytes);
}

#[test]
fn encoding_refuses_what_the_format_cannot_hold() {
    let mut s = synthetic();
    s.vcpus[0].xsave.pop();
    assert!(matches!(s.to_bytes(), Err(SnapshotError::Encode(_))));
    let mut s = synthetic();
    s.parent = Some(5);
    assert!(matches!(s.to_bytes(), Err(SnapshotError::Encode(_))));
    let mut s = synthetic();
    s.set_device("uart0", vec![9]);
    assert_eq!(s.devices.len(), 1);
    s.set_device(&"x".repeat(65), vec![]);
    assert!(matches!(s.to_bytes(), Err(SnapshotError::Encode(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Snapshot::from_bytes(&bytes);
        let mut with_magic = b"VMKITSNP\x01\0\0\0".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = Snapshot::from_bytes(&with_magic);
    }

    #[test]
    fn mutations_of_a_valid_snapshot_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
        insert in proptest::collection::vec(any::<u8>(), 0..16),
        at in any::<usize>(),
    ) {
        let bytes = synthetic().to_bytes().unwrap();
        let mut b = bytes.clone();
        for (i, v) in &edits {
            let i = i % b.len();
            b[i] = *v;
        }
        let changed = b != bytes;
        let r = Snapshot::from_bytes(&b);
        if changed {
            prop_assert!(r.is_err());
        }
        let _ = Snapshot::from_bytes(&b[..cut % (b.len() + 1)]);
        let at = at % (b.len() + 1);
        let mut c = b[..at].to_vec();
        c.extend_from_slice(&insert);
        c.extend_from_slice(&b[at..]);
        let _ = Snapshot::from_bytes(&c);
    }
}
