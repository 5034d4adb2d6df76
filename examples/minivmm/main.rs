//! minivmm: a small VMM that boots a stock Linux kernel, built only from
//! vmkit's public APIs and well-kept rust-vmm crates.
//!
//! ```text
//! minivmm --kernel vmlinux --initrd initrd.cpio --memory 256M --cpus 2 \
//!         --disk disk.img --rng --transport mmio --snapshot vm.snap
//! kill -USR1 <pid>          # writes vm.snap and exits
//! minivmm --restore vm.snap --memory 256M --cpus 2 --disk disk.img --rng \
//!         --transport mmio   # continues the guest where it stopped
//! ```
//!
//! The platform is a minimal PC: KVM's in-kernel LAPICs, I/O APIC, PICs and
//! PIT; a 16550A on COM1 (the console, on this terminal); an i8042 (the
//! guest reboots through it; minivmm then exits); a CMOS RTC; ACPI tables
//! describing all of it; and virtio devices on virtio-mmio (found through
//! the DSDT) or virtio-pci (found by enumeration), with queue notifications
//! through ioeventfds and interrupts through irqfds.
//!
//! Real Linux needs a KVM that runs guest kernels natively: see the nested
//! lab (`cargo xtask lab run`) on machines whose KVM cannot.
//!
//! The modules: [`boot`] loads the kernel and its boot information,
//! [`acpi`] writes the ACPI tables, [`mptable`] the MP table, [`platform`] assembles memory, devices
//! and vCPUs, [`snapshot`] saves and restores the whole machine,
//! [`terminal`] puts the host terminal into raw mode and restores it (and
//! catches the signals minivmm reacts to).

// Built a second time as the `minivmm-units` test target, where `main` and
// what only it reaches are unused.
#![cfg_attr(test, allow(dead_code))]

mod acpi;
mod boot;
mod mptable;
mod platform;
mod snapshot;
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

/// Everything that can stop minivmm, each with one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image.
    #[error("kernel: {0}")]
    Kernel(String),
    /// The initrd.
    #[error("initrd: {0}")]
    Initrd(String),
    /// The command line.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Guest memory and its layout.
    #[error("memory: {0}")]
    Memory(String),
    /// A disk.
    #[error("disk: {0}")]
    Disk(String),
    /// A network device.
    #[error("net: {0}")]
    Net(String),
    /// A virtio console.
    #[error("console: {0}")]
    Console(String),
    /// KVM, the VM or a vCPU.
    #[error("kvm: {0}")]
    Kvm(String),
    /// A device.
    #[error("device: {0}")]
    Device(String),
    /// The guest stopped in a way that is not a reboot or power-off.
    #[error("guest: {0}")]
    Guest(String),
    /// Taking, writing, reading or restoring a snapshot.
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// Which virtio transport carries the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// virtio-mmio, described in the ACPI DSDT.
    Mmio,
    /// virtio-pci on the PCI host bridge (configuration space through ECAM).
    Pci,
}

/// Where the guest console is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsoleKind {
    /// COM1 (ttyS0) on this terminal.
    Serial,
    /// A virtio console (hvc0) on this terminal; COM1 output still shows.
    Virtio,
}

/// A disk: `PATH[,ro]`.
#[derive(Debug, Clone)]
pub struct DiskArg {
    /// The image file.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

fn parse_disk(s: &str) -> Result<DiskArg, String> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or("empty path")?;
    let mut read_only = false;
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            other => return Err(format!("unknown disk option {other:?} (expected ro)")),
        }
    }
    Ok(DiskArg {
        path: PathBuf::from(path),
        read_only,
    })
}

/// A network device: `tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone)]
pub struct NetArg {
    /// The tap device's name.
    pub tap: String,
    /// The guest's MAC address (a fixed locally administered one if absent).
    pub mac: Option<[u8; 6]>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts
            .next()
            .ok_or(format!("MAC {s:?} has fewer than 6 bytes"))?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("bad MAC byte {part:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("MAC {s:?} has more than 6 bytes"));
    }
    Ok(mac)
}

fn parse_net(s: &str) -> Result<NetArg, String> {
    let mut tap = None;
    let mut mac = None;
    for opt in s.split(',') {
        match opt.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
            Some(("mac", m)) => mac = Some(parse_mac(m)?),
            _ => {
                return Err(format!(
                    "unknown net option {opt:?} (expected tap=NAME or mac=MAC)"
                ))
            }
        }
    }
    Ok(NetArg {
        tap: tap.ok_or("tap=NAME is required")?,
        mac,
    })
}

/// A virtio console backend: `socket=PATH` or `file=PATH`.
#[derive(Debug, Clone)]
pub enum VconsoleArg {
    /// A Unix socket minivmm listens on.
    Socket(PathBuf),
    /// A file the guest's output is appended to.
    File(PathBuf),
}

fn parse_vconsole(s: &str) -> Result<VconsoleArg, String> {
    match s.split_once('=') {
        Some(("socket", p)) if !p.is_empty() => Ok(VconsoleArg::Socket(p.into())),
        Some(("file", p)) if !p.is_empty() => Ok(VconsoleArg::File(p.into())),
        _ => Err(format!("expected socket=PATH or file=PATH, got {s:?}")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 20),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 256M, 1G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// minivmm's command line.
#[derive(Debug, Parser)]
#[command(version, about = "A small VMM built from vmkit: boots a Linux kernel")]
pub struct Args {
    /// The kernel: an ELF vmlinux (booted through its PVH entry if it has
    /// one) or a bzImage. Not needed (and not loaded) with --restore.
    #[arg(long, required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// An initramfs (not loaded with --restore).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (minivmm adds nothing to it).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    /// Guest RAM (K, M or G suffix; M if none).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// vCPUs (1 to 32).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cpus: u8,
    /// A virtio-blk disk: PATH[,ro]. Repeatable.
    #[arg(long, value_parser = parse_disk)]
    pub disk: Vec<DiskArg>,
    /// A virtio-net device on a tap: tap=NAME[,mac=MAC]. Repeatable.
    #[arg(long, value_parser = parse_net)]
    pub net: Vec<NetArg>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// Where the guest console is.
    #[arg(long, value_enum, default_value = "serial")]
    pub console: ConsoleKind,
    /// An extra virtio console (hvc0, or hvc1 with --console virtio):
    /// socket=PATH (minivmm listens) or file=PATH (output only).
    #[arg(long, value_parser = parse_vconsole)]
    pub vconsole: Option<VconsoleArg>,
    /// The virtio transport.
    #[arg(long, value_enum, default_value = "mmio")]
    pub transport: Transport,
    /// Report the time until the guest writes 123 to the boot-timer device
    /// (MMIO, address printed at start).
    #[arg(long)]
    pub boot_timer: bool,
    /// Hide XSAVE from the guest (needed under nested SVM on QEMU TCG, which
    /// cannot virtualise XCR0).
    #[arg(long)]
    pub no_xsave: bool,
    /// On SIGUSR1: pause the guest, write a full snapshot of it to PATH
    /// (atomically: a temporary file renamed into place) and exit with
    /// status 0.
    #[arg(long, value_name = "PATH")]
    pub snapshot: Option<PathBuf>,
    /// Continue the guest saved in PATH instead of booting a kernel. The
    /// machine arguments (--memory, --cpus, --transport, --console, the
    /// virtio devices) must be the ones the snapshot was taken with.
    #[arg(long, value_name = "PATH")]
    pub restore: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match platform::run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("minivmm: {e}");
            ExitCode::FAILURE
        }
    }
}
