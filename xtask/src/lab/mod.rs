//! The nested lab: real Linux guests under a real KVM, one level down.
//!
//! - [`fetch`]: Debian packages (kernel, busybox, QEMU) into the lab cache.
//! - [`bzimage`]: the kernel's ELF `vmlinux` (with its PVH entry note) out
//!   of the bzImage.
//! - [`cpio`] and [`modules`]: initramfs archives and kernel-module
//!   dependency resolution.
//! - [`build`]: the L2 (test guest) and L1 (VMM host) initramfs.
//! - [`run`]: boots L1 under QEMU TCG on this machine and parses what the
//!   L1 agent reports.
//! - [`protocol`] and [`patterns`]: what L0, the L1 agent and the L2 init
//!   script agree on.

pub mod build;
pub mod bzimage;
pub mod cpio;
pub mod fetch;
pub mod modules;
pub mod patterns;
pub mod protocol;
pub mod run;

use std::path::{Path, PathBuf};

use protocol::{PlanEntry, Transport, Vmm};

/// Everything that can go wrong in the lab, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The command line was not understood.
    #[error("{0}")]
    Usage(String),
    /// A file or device operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external command could not run or reported failure.
    #[error("command `{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Exit status and the end of its error output.
        detail: String,
    },
    /// A Debian package could not be found, fetched or verified.
    #[error("package {package}: {reason}")]
    Package {
        /// The package name.
        package: String,
        /// What was wrong.
        reason: String,
    },
    /// The kernel image is not in a format the lab understands.
    #[error("kernel image: {0}")]
    Kernel(#[from] bzimage::KernelImageError),
    /// A kernel module or one of its dependencies is missing.
    #[error("kernel modules: {0}")]
    Module(String),
    /// A lab run failed: a check failed, a marker is missing, or it timed out.
    #[error("lab run failed: {0}")]
    Run(String),
}

/// A closure mapping an I/O error to [`LabError::Io`] with context.
pub fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// Where the lab keeps its downloads and build outputs.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The workspace root (the directory holding the root `Cargo.toml`).
    pub workspace: PathBuf,
    /// Cargo's target directory (`$CARGO_TARGET_DIR` or `<workspace>/target`).
    pub target: PathBuf,
    /// The cache: `$VMKIT_LAB_CACHE` or `<workspace>/target/lab-cache`.
    pub cache: PathBuf,
}

impl Paths {
    /// Resolves the paths from the environment.
    pub fn from_env() -> Self {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace.join("target"), PathBuf::from);
        let cache = std::env::var_os("VMKIT_LAB_CACHE")
            .map_or_else(|| workspace.join("target").join("lab-cache"), PathBuf::from);
        Paths {
            workspace,
            target,
            cache,
        }
    }

    /// Downloaded `.deb` files.
    pub fn debs(&self) -> PathBuf {
        self.cache.join("debs")
    }

    /// Extracted package trees, one directory per package.
    pub fn roots(&self) -> PathBuf {
        self.cache.join("roots")
    }

    /// Build outputs: `vmlinux`, `l2.cpio`, `l1.cpio`.
    pub fn out(&self) -> PathBuf {
        self.cache.join("out")
    }
}

/// Installs QEMU on this host (L0) through `.ci/lab-setup` when it is
/// missing, so that a fresh machine needs no manual step.
fn ensure_host_qemu(paths: &Paths) -> Result<(), LabError> {
    let present = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    let setup = paths.workspace.join(".ci").join("lab-setup");
    eprintln!("lab: QEMU is not installed; running {}", setup.display());
    let status = std::process::Command::new(&setup)
        .status()
        .map_err(|e| LabError::Command {
            cmd: setup.display().to_string(),
            detail: e.to_string(),
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            cmd: setup.display().to_string(),
            detail: status.to_string(),
        })
    }
}

/// Runs `cargo xtask lab <args>`.
pub fn main(args: &[String]) -> Result<(), LabError> {
    let paths = Paths::from_env();
    if matches!(
        args.first().map(String::as_str),
        Some("fetch" | "build" | "run" | "check")
    ) {
        ensure_host_qemu(&paths)?;
    }
    match args.first().map(String::as_str) {
        Some("fetch") => fetch::fetch(&paths).map(|_| ()),
        Some("build") => {
            let fetched = fetch::fetch(&paths)?;
            build::build(&paths, &fetched, true).map(|_| ())
        }
        Some("run") => {
            let opts = parse_run_args(args.get(1..).unwrap_or_default())?;
            let fetched = fetch::fetch(&paths)?;
            let artifacts = build::build(&paths, &fetched, opts.entry.vmm == Vmm::Minivmm)?;
            if opts.entry.vmm == Vmm::Minivmm && artifacts.minivmm.is_none() {
                return Err(LabError::Usage(
                    "--vmm minivmm: no minivmm (no `minivmm` example in examples/Cargo.toml \
                     and VMKIT_LAB_MINIVMM unset)"
                        .into(),
                ));
            }
            run::run(&artifacts, &[opts.entry], opts.runs, opts.keep)
        }
        Some("check") => {
            let runs = match std::env::var("VMKIT_LAB_RUNS") {
                Ok(v) => v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=50).contains(n))
                    .ok_or_else(|| LabError::Usage(format!("VMKIT_LAB_RUNS={v}: want 1..=50")))?,
                Err(_) => run::DEFAULT_CHECK_RUNS,
            };
            let vmms = match std::env::var("VMKIT_LAB_VMMS") {
                Ok(v) => v
                    .split(',')
                    .map(|s| s.trim().parse::<Vmm>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| LabError::Usage(format!("VMKIT_LAB_VMMS={v}: {e}")))?,
                Err(_) => vec![Vmm::Minivmm, Vmm::Qemu],
            };
            let fetched = fetch::fetch(&paths)?;
            let artifacts = build::build(&paths, &fetched, vmms.contains(&Vmm::Minivmm))?;
            run::check(&artifacts, runs, &vmms)
        }
        _ => Err(LabError::Usage(
            "usage: cargo xtask lab fetch|build|run|check (see cargo xtask --help)".into(),
        )),
    }
}

/// The options of `lab run`.
#[derive(Debug)]
struct RunOptions {
    entry: PlanEntry,
    runs: u32,
    keep: bool,
}

/// Parses `--vmm qemu|minivmm [--transport mmio|pci] [--cpus N] [--snapshot]
/// [--runs N] [--keep]`.
fn parse_run_args(args: &[String]) -> Result<RunOptions, LabError> {
    let mut vmm = None;
    let mut transport = Transport::Mmio;
    let mut cpus = 1u32;
    let mut snapshot = false;
    let mut runs = 1u32;
    let mut keep = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| LabError::Usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--vmm" => vmm = Some(value("--vmm")?.parse::<Vmm>().map_err(LabError::Usage)?),
            "--transport" => transport = value("--transport")?.parse().map_err(LabError::Usage)?,
            "--cpus" => {
                let v = value("--cpus")?;
                cpus = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=8).contains(n))
                    .ok_or_else(|| LabError::Usage(format!("--cpus {v}: want 1..=8")))?;
            }
            "--runs" => {
                let v = value("--runs")?;
                runs = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=50).contains(n))
                    .ok_or_else(|| LabError::Usage(format!("--runs {v}: want 1..=50")))?;
            }
            "--keep" => keep = true,
            "--snapshot" => snapshot = true,
            other => {
                return Err(LabError::Usage(format!(
                    "lab run: unknown argument {other}"
                )))
            }
        }
    }
    let vmm =
        vmm.ok_or_else(|| LabError::Usage("lab run: --vmm qemu|minivmm is required".into()))?;
    if snapshot && vmm != Vmm::Minivmm {
        return Err(LabError::Usage(
            "lab run: --snapshot needs --vmm minivmm".into(),
        ));
    }
    Ok(RunOptions {
        entry: PlanEntry {
            vmm,
            transport,
            cpus,
            snapshot,
        },
        runs,
        keep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_args_parse_and_reject() {
        let o = parse_run_args(&strings(&[
            "--vmm",
            "qemu",
            "--transport",
            "pci",
            "--cpus",
            "2",
        ]))
        .unwrap();
        assert_eq!(o.entry.vmm, Vmm::Qemu);
        assert_eq!(o.entry.transport, Transport::Pci);
        assert_eq!(o.entry.cpus, 2);
        assert!(!o.keep);
        assert!(parse_run_args(&strings(&["--transport", "pci"])).is_err());
        assert!(parse_run_args(&strings(&["--vmm", "bochs"])).is_err());
        assert!(parse_run_args(&strings(&["--vmm", "qemu", "--cpus", "0"])).is_err());
        assert!(parse_run_args(&strings(&["--vmm", "qemu", "--cpus"])).is_err());
        assert!(!o.entry.snapshot);
        let o = parse_run_args(&strings(&["--vmm", "minivmm", "--snapshot"])).unwrap();
        assert!(o.entry.snapshot);
        assert_eq!(o.entry.to_string(), "minivmm:mmio:1:snap");
        assert!(parse_run_args(&strings(&["--vmm", "qemu", "--snapshot"])).is_err());
    }
}
