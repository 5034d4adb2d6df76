//! Saving the whole machine to a file and continuing it in a new process.
//!
//! `--snapshot PATH` arms SIGUSR1. When it arrives, [`platform`] pauses
//! every vCPU (an exit in flight is completed first), takes them out of
//! their run loops, closes the console input, and calls [`save`]: it stops
//! the virtio devices' workers (their queues handed back to the
//! transports, so nothing writes guest memory any more), captures vCPU, VM
//! and memory state with [`Snapshot::capture_full`], adds each device's
//! state under a stable name and writes the file atomically.
//!
//! `--restore PATH` builds the same machine from the same arguments, does
//! not load a kernel, and calls [`restore`] before any vCPU runs: memory,
//! then the VM (interrupt controllers, PIT, clock) and the vCPUs, then the
//! devices, whose restore may raise interrupt lines and restart workers
//! and so must see the restored memory and interrupt controllers. The
//! irqfds, ioeventfds and console input belong to the new process and are
//! set up as for a boot.
//!
//! | section | state |
//! |---|---|
//! | `minivmm@machine` | the machine the arguments describe (refused if they differ) |
//! | `serial@pio:0x3f8` | COM1 ([`SerialState`]) |
//! | `i8042@pio:0x60` | keyboard controller ([`I8042State`]) |
//! | `rtc@pio:0x70` | CMOS RTC ([`RtcState`]) |
//! | `virtio-mmio@0xd0000000`, ... | one per virtio-mmio device ([`MmioState`]) |
//! | `virtio-pci@00:01.0`, ... | one per virtio-pci function ([`PciState`]) |
//! | `pci-root@0` | the root complex's registers ([`PciRootState`]) |
//!
//! [`platform`]: crate::platform

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vmkit_devices::pci::{PciAddress, PciRoot, PciRootState};
use vmkit_devices::{I8042State, Rtc, RtcState, Serial, SerialState, StateError, I8042};
use vmkit_memory::GuestMemoryMmap;
use vmkit_vcpu::{Snapshot, Vcpu, Vm};
use vmkit_virtio::transport::mmio::{MmioState, MmioTransport};
use vmkit_virtio::transport::pci::{PciState, PciTransport};

use crate::{Args, Error};

/// The section describing the machine the snapshot was taken of.
const MACHINE: &str = "minivmm@machine";
const SERIAL: &str = "serial@pio:0x3f8";
const I8042_NAME: &str = "i8042@pio:0x60";
const RTC: &str = "rtc@pio:0x70";
const PCI_ROOT: &str = "pci-root@0";

/// A virtio transport and where the guest finds it.
pub enum VirtioSlot {
    /// virtio-mmio at a base address.
    Mmio(u64, Arc<MmioTransport>),
    /// virtio-pci at a PCI address.
    Pci(PciAddress, Arc<PciTransport>),
}

impl VirtioSlot {
    /// The snapshot section's name.
    fn name(&self) -> String {
        match self {
            VirtioSlot::Mmio(base, _) => format!("virtio-mmio@{base:#x}"),
            VirtioSlot::Pci(address, _) => format!("virtio-pci@{address}"),
        }
    }
}

/// Every device whose state a snapshot carries.
pub struct Devices {
    /// COM1.
    pub serial: Arc<Serial>,
    /// The keyboard controller.
    pub i8042: Arc<I8042>,
    /// The CMOS RTC.
    pub rtc: Arc<Rtc>,
    /// The virtio devices, in the order the command line gives them.
    pub virtio: Vec<VirtioSlot>,
    /// The PCI root complex (virtio-pci only).
    pub pci_root: Option<Arc<PciRoot>>,
}

/// What the arguments build, in one line: a snapshot only fits the same
/// machine. Backing paths (disk images, tap names) may differ; what the
/// guest sees may not.
pub fn machine_summary(args: &Args) -> String {
    let mut virtio: Vec<String> = args
        .disk
        .iter()
        .map(|d| if d.read_only { "blk(ro)" } else { "blk" }.to_string())
        .collect();
    virtio.extend(args.net.iter().map(|n| match n.mac {
        Some(m) => format!(
            "net({:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x})",
            m[0], m[1], m[2], m[3], m[4], m[5]
        ),
        None => "net".to_string(),
    }));
    if args.rng {
        virtio.push("rng".into());
    }
    if args.console == crate::ConsoleKind::Virtio {
        virtio.push("console(stdio)".into());
    }
    if args.vconsole.is_some() {
        virtio.push("console".into());
    }
    format!(
        "{} MiB, {} vCPU(s), {:?} console, virtio on {:?}: [{}]",
        args.memory >> 20,
        args.cpus,
        args.console,
        args.transport,
        virtio.join(" ")
    )
    .to_lowercase()
}

fn snap_err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Snapshot(format!("{what}: {e}"))
}

/// Reads the snapshot at `path` and checks that it was taken of the
/// machine `args` describe.
pub fn read(path: &Path, args: &Args) -> Result<Snapshot, Error> {
    let file = File::open(path).map_err(snap_err(&format!("cannot open {}", path.display())))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let snapshot =
        Snapshot::read_from(&mut reader).map_err(snap_err(&path.display().to_string()))?;
    let want = machine_summary(args);
    let Some(saved) = snapshot.device(MACHINE) else {
        return Err(Error::Snapshot(format!(
            "{} was not written by minivmm (no {MACHINE} section)",
            path.display()
        )));
    };
    let saved = String::from_utf8_lossy(saved);
    if saved != want {
        return Err(Error::Snapshot(format!(
            "{} is of another machine: it has {saved}; these arguments give {want}",
            path.display()
        )));
    }
    Ok(snapshot)
}

/// The state of a device the snapshot must have.
fn section<'a>(snapshot: &'a Snapshot, name: &str) -> Result<&'a [u8], Error> {
    snapshot.device(name).ok_or_else(|| {
        Error::Snapshot(format!(
            "no state for {name}: the snapshot's devices differ from these arguments"
        ))
    })
}

fn state_err(name: &str) -> impl Fn(StateError) -> Error + '_ {
    move |e| Error::Snapshot(format!("{name}: {e}"))
}

/// Puts `snapshot` into a freshly built machine whose vCPUs have been
/// created (with the snapshot's ids) but not configured and not run.
pub fn restore(
    snapshot: &Snapshot,
    vm: &Vm,
    memory: &GuestMemoryMmap,
    vcpus: &[&Vcpu],
    devices: &Devices,
) -> Result<(), Error> {
    // Memory first (device restores read rings from it), then the
    // interrupt controllers and vCPUs (device restores raise lines into
    // them), then the devices.
    snapshot
        .restore_memory(memory, None)
        .map_err(snap_err("guest memory"))?;
    snapshot
        .restore_machine(vm, vcpus)
        .map_err(snap_err("VM and vCPU state"))?;

    let serial = SerialState::from_bytes(section(snapshot, SERIAL)?).map_err(state_err(SERIAL))?;
    devices
        .serial
        .restore_state(&serial)
        .map_err(state_err(SERIAL))?;
    let i8042 =
        I8042State::from_bytes(section(snapshot, I8042_NAME)?).map_err(state_err(I8042_NAME))?;
    devices
        .i8042
        .restore_state(&i8042)
        .map_err(state_err(I8042_NAME))?;
    let rtc = RtcState::from_bytes(section(snapshot, RTC)?).map_err(state_err(RTC))?;
    devices.rtc.restore_state(&rtc).map_err(state_err(RTC))?;

    for slot in &devices.virtio {
        let name = slot.name();
        let bytes = section(snapshot, &name)?;
        match slot {
            VirtioSlot::Mmio(_, t) => {
                let state = MmioState::from_bytes(bytes).map_err(state_err(&name))?;
                t.restore_state(&state).map_err(state_err(&name))?;
            }
            VirtioSlot::Pci(_, t) => {
                let state = PciState::from_bytes(bytes).map_err(state_err(&name))?;
                t.restore_state(&state).map_err(state_err(&name))?;
            }
        }
    }
    // After the functions: the root maps their restored BARs.
    if let Some(root) = &devices.pci_root {
        let state =
            PciRootState::from_bytes(section(snapshot, PCI_ROOT)?).map_err(state_err(PCI_ROOT))?;
        root.restore_state(&state).map_err(state_err(PCI_ROOT))?;
    }
    // Sections this machine has no device for mean the sets differ.
    let mut known = vec![
        MACHINE.to_string(),
        SERIAL.to_string(),
        I8042_NAME.to_string(),
        RTC.to_string(),
    ];
    known.extend(devices.virtio.iter().map(VirtioSlot::name));
    if devices.pci_root.is_some() {
        known.push(PCI_ROOT.to_string());
    }
    if let Some(extra) = snapshot.devices.iter().find(|d| !known.contains(&d.name)) {
        return Err(Error::Snapshot(format!(
            "the snapshot has state for {}, which these arguments do not create",
            extra.name
        )));
    }
    Ok(())
}

/// What [`save`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Saved {
    /// The file's size in bytes.
    pub bytes: u64,
}

/// Saves the stopped machine to `path`. Every vCPU is out of its run loop
/// with no exit in flight, and nothing feeds the console any more.
pub fn save(
    path: &Path,
    args: &Args,
    vm: &Vm,
    vcpus: &[&Vcpu],
    devices: &Devices,
) -> Result<Saved, Error> {
    // Quiesce the virtio devices before copying memory: their workers
    // write used rings and buffers.
    for slot in &devices.virtio {
        let paused = match slot {
            VirtioSlot::Mmio(_, t) => t.pause(),
            VirtioSlot::Pci(_, t) => t.pause(),
        };
        paused.map_err(state_err(&slot.name()))?;
    }
    let mut snapshot = Snapshot::capture_full(vm, vcpus).map_err(snap_err("capturing the VM"))?;
    snapshot.set_device(MACHINE, machine_summary(args).into_bytes());
    snapshot.set_device(SERIAL, devices.serial.save_state().to_bytes());
    snapshot.set_device(I8042_NAME, devices.i8042.save_state().to_bytes());
    snapshot.set_device(RTC, devices.rtc.save_state().to_bytes());
    for slot in &devices.virtio {
        let name = slot.name();
        let bytes = match slot {
            VirtioSlot::Mmio(_, t) => t.save_state().map(|s| s.to_bytes()),
            VirtioSlot::Pci(_, t) => t.save_state().map(|s| s.to_bytes()),
        }
        .map_err(state_err(&name))?;
        snapshot.set_device(&name, bytes);
    }
    if let Some(root) = &devices.pci_root {
        snapshot.set_device(PCI_ROOT, root.save_state().to_bytes());
    }
    write_atomically(path, &snapshot)
}

/// A temporary name next to `path` (same directory, so the rename is
/// atomic).
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `snapshot` to a temporary file, syncs it, renames it to `path`
/// and syncs the directory: `path` holds either the old file or the whole
/// new one, also across a crash.
fn write_atomically(path: &Path, snapshot: &Snapshot) -> Result<Saved, Error> {
    let tmp = temporary(path);
    let written = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(snap_err(&format!("cannot create {}", tmp.display())))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        snapshot
            .write_to(&mut w)
            .map_err(snap_err(&tmp.display().to_string()))?;
        w.flush()
            .map_err(snap_err(&format!("writing {}", tmp.display())))?;
        let file = w
            .into_inner()
            .map_err(|e| Error::Snapshot(format!("writing {}: {}", tmp.display(), e.error())))?;
        file.sync_all()
            .map_err(snap_err(&format!("syncing {}", tmp.display())))?;
        let bytes = file
            .metadata()
            .map_err(snap_err(&tmp.display().to_string()))?
            .len();
        std::fs::rename(&tmp, path).map_err(snap_err(&format!(
            "renaming {} to {}",
            tmp.display(),
            path.display()
        )))?;
        Ok(Saved { bytes })
    })();
    if written.is_err() {
        // Whatever got written is of no use; a missing file is fine.
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(snap_err(&format!("syncing directory {}", dir.display())))?;
    written
}

/// Milliseconds since `start`, for messages.
pub fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    fn args(line: &str) -> Args {
        Args::try_parse_from(std::iter::once("minivmm").chain(line.split_whitespace())).unwrap()
    }

    #[test]
    fn machine_summary_names_what_the_guest_sees_not_the_backing_paths() {
        let a = args("--kernel k --memory 128M --cpus 2 --disk a.img --disk b.img,ro --rng");
        let b = args("--restore s --memory 128M --cpus 2 --disk x.img --disk y.img,ro --rng");
        assert_eq!(machine_summary(&a), machine_summary(&b));
        assert_eq!(
            machine_summary(&a),
            "128 mib, 2 vcpu(s), serial console, virtio on mmio: [blk blk(ro) rng]"
        );
        for other in [
            "--restore s --memory 256M --cpus 2 --disk x.img --disk y.img,ro --rng",
            "--restore s --memory 128M --cpus 1 --disk x.img --disk y.img,ro --rng",
            "--restore s --memory 128M --cpus 2 --disk x.img --disk y.img --rng",
            "--restore s --memory 128M --cpus 2 --disk x.img --disk y.img,ro",
            "--restore s --memory 128M --cpus 2 --disk x.img --disk y.img,ro --rng --transport pci",
        ] {
            assert_ne!(
                machine_summary(&a),
                machine_summary(&args(other)),
                "{other}"
            );
        }
    }

    #[test]
    fn the_kernel_is_needed_only_without_restore() {
        assert!(Args::try_parse_from(["minivmm", "--memory", "64M"]).is_err());
        let a = args("--restore vm.snap");
        assert!(a.kernel.is_none());
        assert_eq!(a.restore.as_deref(), Some(Path::new("vm.snap")));
    }

    #[test]
    fn atomic_write_leaves_no_temporary_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("minivmm-snap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.snap");
        std::fs::write(&path, b"an older file").unwrap();
        let mut snapshot = Snapshot::new();
        snapshot.set_device(MACHINE, b"m".to_vec());
        let saved = write_atomically(&path, &snapshot).unwrap();
        assert_eq!(saved.bytes, std::fs::metadata(&path).unwrap().len());
        let back = Snapshot::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.id, snapshot.id);
        assert_eq!(back.device(MACHINE), Some(&b"m"[..]));
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left: {names:?}");
        // A directory that does not exist: an error, nothing left behind.
        let bad = dir.join("missing").join("vm.snap");
        assert!(matches!(
            write_atomically(&bad, &snapshot),
            Err(Error::Snapshot(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
