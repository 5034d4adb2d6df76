//! `cargo xtask lab build`: the L2 kernel and the two initramfs archives.
//!
//! - `vmlinux`: the ELF kernel out of Debian's bzImage (booted through its
//!   PVH entry, by L0's QEMU for L1 and by the VMM under test for L2).
//! - `l2.cpio`: busybox, the virtio modules and the test `/init`.
//! - `l1.cpio`: busybox, the KVM and tun modules, `vmlinux` and `l2.cpio`,
//!   QEMU with its shared libraries and firmware, the static agent (this
//!   program), the static minivmm if there is one, and L1's `/init`.
//!
//! Both archives are uncompressed newc: the kernel always accepts that, and
//! decompressing under TCG would only cost time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::cpio::CpioWriter;
use super::fetch::{output, Fetched};
use super::modules::{Module, ModuleTree};
use super::{bzimage, io_err, patterns, protocol, LabError, Paths};

/// The modules L2 loads (their dependencies are added).
pub const L2_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
];
/// The modules L1 loads, in order (dependencies such as `ccp`, if the
/// kernel's `kvm_amd` needs it, are added).
pub const L1_MODULES: &[&str] = &["irqbypass", "kvm", "kvm_amd", "tun"];
/// The firmware QEMU's microvm needs to boot a PVH kernel.
const QEMU_FIRMWARE: &[&str] = &["bios-microvm.bin", "pvh.bin", "linuxboot_dma.bin"];
/// Where QEMU looks for firmware (its compiled-in data directory).
const QEMU_DATADIR: &str = "/usr/share/qemu";
/// The Rust target of the static binaries run inside L1.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// L2's `/init`.
const L2_INIT: &str = include_str!("l2-init.sh");
/// L1's `/init`.
const L1_INIT: &str = include_str!("l1-init.sh");

/// What `build` produced.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The ELF kernel (used for both L1 and L2).
    pub vmlinux: PathBuf,
    /// L1's initramfs.
    pub l1_cpio: PathBuf,
    /// The static minivmm put into L1, if any.
    pub minivmm: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, LabError> {
    std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))
}

/// Fills in the `@NAME@` placeholders of an init script.
fn render(template: &str, modules: &[Module]) -> String {
    let ip = |a: [u8; 4]| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    template
        .replace("@MODULES@", &names.join(" "))
        .replace("@HOST_IP@", &ip(protocol::HOST_IP))
        .replace("@GUEST_IP@", &ip(protocol::GUEST_IP))
        .replace("@PAYLOAD_PORT@", &protocol::PAYLOAD_PORT.to_string())
        .replace(
            "@BLK_READ_BLOCKS@",
            &(patterns::BLK_READ_LEN / 4096).to_string(),
        )
        .replace(
            "@BLK_WRITE_SEEK@",
            &(patterns::BLK_WRITE_OFFSET / 4096).to_string(),
        )
        .replace("@RNG_BYTES@", "65536")
        .replace("@SNAPSHOT_CMDLINE@", protocol::SNAPSHOT_CMDLINE)
        .replace("@DD_MIB@", &patterns::DD_MIB.to_string())
        .replace("@DMESG_SEEK@", &(patterns::DMESG_OFFSET / 4096).to_string())
        .replace("@DMESG_MAX@", &(patterns::DMESG_MAX - 1).to_string())
}

/// Adds busybox and a symlink for each of its applets.
fn add_busybox<W: Write>(
    cpio: &mut CpioWriter<W>,
    busybox: &Path,
    applets: &[String],
) -> Result<(), LabError> {
    let wr = |e| io_err("writing the initramfs")(e);
    cpio.file("bin/busybox", 0o755, &read(busybox)?)
        .map_err(wr)?;
    for applet in applets.iter().filter(|a| a.as_str() != "busybox") {
        cpio.symlink(&format!("bin/{applet}"), "busybox")
            .map_err(wr)?;
    }
    Ok(())
}

/// The base of both archives: device node and mount points.
fn add_skeleton<W: Write>(cpio: &mut CpioWriter<W>) -> Result<(), LabError> {
    let wr = |e| io_err("writing the initramfs")(e);
    for dir in ["proc", "sys", "dev", "tmp", "run", "etc"] {
        cpio.dir(dir, 0o755).map_err(wr)?;
    }
    // Without /dev/console the kernel starts init with no stdout.
    cpio.char_device("dev/console", 0o600, 5, 1).map_err(wr)
}

/// Builds a static binary for L1 with cargo; returns its path.
fn cargo_static(paths: &Paths, args: &[&str], produced: &str) -> Result<PathBuf, LabError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    flags.push_str(" -C target-feature=+crt-static");
    let started = Instant::now();
    let status = Command::new(&cargo)
        .args(["build", "--release", "--target", STATIC_TARGET])
        .args(args)
        .env("RUSTFLAGS", flags.trim())
        .env("CARGO_TARGET_DIR", &paths.target)
        .current_dir(&paths.workspace)
        .status()
        .map_err(|e| LabError::Command {
            cmd: format!("{cargo} build {args:?}"),
            detail: e.to_string(),
        })?;
    if !status.success() {
        return Err(LabError::Command {
            cmd: format!(
                "{cargo} build --release --target {STATIC_TARGET} {}",
                args.join(" ")
            ),
            detail: status.to_string(),
        });
    }
    let path = paths
        .target
        .join(STATIC_TARGET)
        .join("release")
        .join(produced);
    let elf = read(&path)?;
    if !bzimage::is_static(&elf)? {
        return Err(LabError::Command {
            cmd: format!("cargo build {}", args.join(" ")),
            detail: format!("{} is dynamically linked", path.display()),
        });
    }
    println!(
        "lab build: static {produced} ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(path)
}

/// The static minivmm: `$VMKIT_LAB_MINIVMM`, or built from the `minivmm`
/// example when `examples/Cargo.toml` declares one; `None` otherwise.
fn minivmm(paths: &Paths) -> Result<Option<PathBuf>, LabError> {
    if let Some(path) = std::env::var_os("VMKIT_LAB_MINIVMM") {
        let path = PathBuf::from(path);
        if !bzimage::is_static(&read(&path)?)? {
            return Err(LabError::Usage(format!(
                "VMKIT_LAB_MINIVMM={}: not a static binary",
                path.display()
            )));
        }
        return Ok(Some(path));
    }
    let manifest = paths.workspace.join("examples/Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .map_err(io_err(format!("reading {}", manifest.display())))?;
    let declared = text
        .lines()
        .any(|l| l.split('#').next().unwrap_or("").replace(' ', "") == "name=\"minivmm\"");
    if !declared {
        println!("lab build: no `minivmm` example declared in examples/Cargo.toml: baseline only");
        return Ok(None);
    }
    cargo_static(
        paths,
        &["-p", "vmkit-examples", "--example", "minivmm"],
        "examples/minivmm",
    )
    .map(Some)
}

/// The shared libraries `ldd` lists for `binary`: (path as the loader
/// looks for it, file to copy).
fn shared_libraries(binary: &Path) -> Result<Vec<String>, LabError> {
    let text = output(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(LabError::Package {
                package: "qemu-system-x86".into(),
                reason: format!("ldd: {line} (run .ci/lab-setup to install QEMU and its libraries on this host)"),
            });
        }
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_string());
        }
    }
    Ok(libs)
}

/// Builds everything; see the module documentation. minivmm is looked for
/// only `with_minivmm` (so a QEMU-only run does not depend on it compiling).
pub fn build(paths: &Paths, fetched: &Fetched, with_minivmm: bool) -> Result<Artifacts, LabError> {
    let started = Instant::now();
    let out = paths.out();
    std::fs::create_dir_all(&out).map_err(io_err(format!("creating {}", out.display())))?;
    let version = &fetched.kernel_version;
    let kroot = &fetched.kernel.root;

    // The kernel.
    let t = Instant::now();
    let bz = read(&kroot.join("boot").join(format!("vmlinuz-{version}")))?;
    let (elf, entry) = bzimage::extract_vmlinux(&bz)?;
    let vmlinux = out.join("vmlinux");
    std::fs::write(&vmlinux, &elf).map_err(io_err(format!("writing {}", vmlinux.display())))?;
    println!(
        "lab build: vmlinux {version}: {:.1} MB ELF, PVH entry {entry:#x} ({:.2} s)",
        elf.len() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let config = std::fs::read_to_string(kroot.join("boot").join(format!("config-{version}")))
        .unwrap_or_default();
    if !config.lines().any(|l| l == "CONFIG_BLK_DEV_INITRD=y") {
        return Err(LabError::Module(format!(
            "{version}: no CONFIG_BLK_DEV_INITRD=y"
        )));
    }

    let tree = ModuleTree::open(&kroot.join("lib/modules").join(version))?;
    let busybox = fetched.busybox.root.join("bin/busybox");
    let applets: Vec<String> = output(Command::new(&busybox).arg("--list"))?
        .lines()
        .map(str::to_string)
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .collect();
    let wr = |e| io_err("writing the initramfs")(e);

    // L2's initramfs.
    let l2_modules = tree.resolve(L2_MODULES)?;
    let l2_cpio = out.join("l2.cpio");
    {
        let file =
            File::create(&l2_cpio).map_err(io_err(format!("creating {}", l2_cpio.display())))?;
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        add_skeleton(&mut cpio)?;
        add_busybox(&mut cpio, &busybox, &applets)?;
        cpio.file("init", 0o755, render(L2_INIT, &l2_modules).as_bytes())
            .map_err(wr)?;
        for m in &l2_modules {
            cpio.file(
                &format!("lib/modules/{}.ko", m.name),
                0o644,
                &read(&m.path)?,
            )
            .map_err(wr)?;
        }
        let blk_read = patterns::sha256_hex(&patterns::blk_read_pattern());
        cpio.file("etc/lab/blk-read.sha256", 0o644, blk_read.as_bytes())
            .map_err(wr)?;
        let payload = patterns::sha256_hex(&patterns::payload());
        cpio.file("etc/lab/payload.sha256", 0o644, payload.as_bytes())
            .map_err(wr)?;
        cpio.file(
            "etc/lab/blk-write.bin",
            0o644,
            &patterns::blk_write_pattern(),
        )
        .map_err(wr)?;
        let (_, size) = cpio.finish().map_err(wr)?;
        println!(
            "lab build: l2.cpio {:.1} MB, modules: {:?}",
            size as f64 / 1e6,
            l2_modules.iter().map(|m| &m.name).collect::<Vec<_>>()
        );
    }

    // The programs L1 runs.
    let agent = cargo_static(paths, &["-p", "xtask", "--bin", "xtask"], "xtask")?;
    let minivmm = if with_minivmm { minivmm(paths)? } else { None };
    let qemu = fetched.qemu.root.join("usr/bin/qemu-system-x86_64");
    let libs = shared_libraries(&qemu)?;

    // L1's initramfs.
    let l1_modules = tree.resolve(L1_MODULES)?;
    let l1_cpio = out.join("l1.cpio");
    {
        let file =
            File::create(&l1_cpio).map_err(io_err(format!("creating {}", l1_cpio.display())))?;
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        add_skeleton(&mut cpio)?;
        add_busybox(&mut cpio, &busybox, &applets)?;
        cpio.file("init", 0o755, render(L1_INIT, &l1_modules).as_bytes())
            .map_err(wr)?;
        for m in &l1_modules {
            cpio.file(
                &format!("lab/modules/{}.ko", m.name),
                0o644,
                &read(&m.path)?,
            )
            .map_err(wr)?;
        }
        cpio.file("lab/vmlinux", 0o644, &elf).map_err(wr)?;
        cpio.file("lab/l2.cpio", 0o644, &read(&l2_cpio)?)
            .map_err(wr)?;
        cpio.file("lab/agent", 0o755, &read(&agent)?).map_err(wr)?;
        if let Some(m) = &minivmm {
            cpio.file("lab/minivmm", 0o755, &read(m)?).map_err(wr)?;
        }
        cpio.file("usr/bin/qemu-system-x86_64", 0o755, &read(&qemu)?)
            .map_err(wr)?;
        for lib in &libs {
            cpio.file(lib, 0o755, &read(Path::new(lib))?).map_err(wr)?;
        }
        for fw in QEMU_FIRMWARE {
            let path = Path::new(QEMU_DATADIR).join(fw);
            cpio.file(&path.to_string_lossy(), 0o644, &read(&path)?)
                .map_err(wr)?;
        }
        let (_, size) = cpio.finish().map_err(wr)?;
        println!(
            "lab build: l1.cpio {:.1} MB (QEMU + {} libraries, modules {:?}, minivmm: {})",
            size as f64 / 1e6,
            libs.len(),
            l1_modules.iter().map(|m| &m.name).collect::<Vec<_>>(),
            minivmm
                .as_ref()
                .map_or_else(|| "none".to_string(), |p| p.display().to_string())
        );
    }
    println!(
        "lab build: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Artifacts {
        vmlinux,
        l1_cpio,
        minivmm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_scripts_have_every_placeholder_filled() {
        let modules = vec![Module {
            name: "virtio".into(),
            path: PathBuf::from("/x"),
        }];
        for script in [L2_INIT, L1_INIT] {
            let text = render(script, &modules);
            assert!(!text.contains('@'), "unfilled placeholder in:\n{text}");
            assert!(text.starts_with("#!/bin/busybox sh\n"));
        }
        let l2 = render(L2_INIT, &modules);
        assert!(l2.contains("for m in virtio;"));
        for check in protocol::GUEST_CHECKS {
            assert!(
                l2.contains(&format!("VMKIT-CHECK {check}"))
                    || l2.contains(&format!("check {check}")),
                "L2 init never reports {check}"
            );
        }
        assert!(l2.contains("10.0.2.1") && l2.contains("10.0.2.15"));
        // The snapshot checks the guest reports (the agent adds
        // host-snapshot), behind the command-line word the agent adds.
        for check in protocol::SNAPSHOT_CHECKS
            .iter()
            .filter(|c| !c.starts_with("host-"))
        {
            assert!(
                l2.contains(&format!("check {check}")),
                "L2 init never reports {check}"
            );
        }
        assert!(l2.contains(&format!("*\" {} \"*)", protocol::SNAPSHOT_CMDLINE)));
    }
}
