//! Developer tasks for vmkit, run as `cargo xtask <task>`.
//!
//! The only task today is the nested lab (`cargo xtask lab ...`), which boots
//! real Linux guests under a real KVM: QEMU emulates an AMD machine with SVM
//! (L1) on this host (L0), L1 loads `kvm_amd`, and a VMM inside L1 runs the
//! test guest (L2). See [`lab`] for the subcommands and `lab-agent`, the
//! orchestrator that runs inside L1.
#![deny(missing_docs)]

mod agent;
mod lab;

use std::process::ExitCode;

/// What `cargo xtask` prints for `--help` or a bad command line.
const USAGE: &str = "\
usage: cargo xtask lab <subcommand>
  fetch                       download the Debian packages into the lab cache
  build                       extract the kernel, build the L2 and L1 initramfs
  run --vmm qemu|minivmm [--transport mmio|pci] [--cpus N] [--runs N] [--keep]
      [--snapshot]            boot L1, run the L2 checks once (or N times);
                              --snapshot (minivmm): snapshot L2 after its
                              checks, restore it in a new minivmm, check again
                              (once, whatever --runs says)
  check                       all checks on both transports, for minivmm (if
                              present) and the QEMU microvm baseline, with a
                              boot-time comparison; plus one minivmm snapshot
                              run (not compared)
environment: VMKIT_LAB_CACHE (cache dir, default <workspace>/target/lab-cache),
             VMKIT_LAB_RUNS (runs per configuration for check, default 5),
             VMKIT_LAB_VMMS (VMMs for check, default minivmm,qemu),
             VMKIT_LAB_MINIVMM (a prebuilt static minivmm to use),
             VMKIT_LAB_L2_APPEND (extra words for L2's kernel command line)
internal:    xtask lab-agent   (runs inside L1)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("lab") => lab::main(args.get(1..).unwrap_or_default()),
        Some("lab-agent") => agent::main(),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(lab::LabError::Usage(USAGE.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}
