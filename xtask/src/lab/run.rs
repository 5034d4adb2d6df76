//! The L0 side: boots L1 under QEMU TCG with a plan on its command line,
//! relays its console, and parses what the agent reports.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::build::Artifacts;
use super::protocol::{self, Plan, PlanEntry, RunResult, Transport, Vmm};
use super::LabError;

/// Runs per configuration for `check` (5 keeps a full check, both VMMs and
/// both transports, well under ten minutes on a 2-core host).
pub const DEFAULT_CHECK_RUNS: u32 = 5;
/// Seconds an L2 run may take before the agent kills its VMM (a passing
/// run takes under 10 s).
const L2_TIMEOUT_SECS: u32 = 30;
/// Seconds L1 may take to boot, load KVM and start the agent.
const L1_BOOT_SECS: u64 = 180;
/// Seconds L1 may take to power off after the agent is done.
const L1_EXIT_SECS: u64 = 20;

/// What one boot of L1 produced.
#[derive(Debug, Default)]
struct L1Report {
    results: Vec<RunResult>,
    l1_init: Option<Duration>,
    l1_kvm_ready: Option<Duration>,
    total: Duration,
    done: bool,
}

/// Kills and reaps L1.
fn kill(child: &mut Child) {
    // Errors mean it already exited.
    let _ = child.kill();
    let _ = child.wait();
}

/// This host's TSC frequency in kHz (from `/proc/cpuinfo`), which is also
/// the frequency of L1's TSC: QEMU's TCG reads the host TSC for `rdtsc`.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&info)
}

/// The first `cpu MHz` of a `/proc/cpuinfo` text, in kHz.
fn parse_cpu_mhz(info: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0).round() as u64).filter(|khz| (100_000..20_000_000).contains(khz))
}

/// Boots L1 with `plan`, relaying its console (every line, as it comes).
fn boot_l1(artifacts: &Artifacts, plan: &Plan, keep: bool) -> Result<L1Report, LabError> {
    // microvm has no HPET or ACPI PM timer, so L1's kernel can calibrate
    // its TSC only against the PIT, and that fails when TCG runs slowly (a
    // busy host): the TSC is then marked unstable and boot hangs. Tell it
    // the frequency instead.
    let tsc = host_tsc_khz().map_or_else(String::new, |khz| {
        format!(" tsc_early_khz={khz} tsc=reliable")
    });
    let append = format!(
        "console=ttyS0 panic=-1 quiet rdinit=/init{tsc} {} vmkit.keep={}",
        plan.to_cmdline(),
        u8::from(keep)
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,rtc=on",
        "-accel",
        "tcg",
        "-cpu",
        "EPYC,+svm,+npt",
    ])
    .args([
        "-smp",
        "1",
        "-m",
        "2G",
        "-nographic",
        "-serial",
        "stdio",
        "-monitor",
        "none",
    ])
    .arg("-no-reboot")
    .arg("-kernel")
    .arg(&artifacts.vmlinux)
    .arg("-initrd")
    .arg(&artifacts.l1_cpio)
    .args(["-append", &append])
    .stdin(if keep {
        Stdio::inherit()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    println!("lab: booting L1: {cmd:?}");
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| LabError::Command {
        cmd: "qemu-system-x86_64 (L1)".into(),
        detail: format!("{e} (run .ci/lab-setup to install QEMU)"),
    })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| LabError::Run("no stdout pipe from QEMU".into()))?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let runs_total: u64 = plan
        .entries
        .iter()
        .map(|e| u64::from(plan.runs_for(e)))
        .sum();
    // A snapshot run starts two VMMs, each with its own timeout.
    let vmm_starts: u64 = plan
        .entries
        .iter()
        .map(|e| u64::from(plan.runs_for(e)) * if e.snapshot { 2 } else { 1 })
        .sum();
    let budget =
        Duration::from_secs(L1_BOOT_SECS + vmm_starts * (u64::from(plan.timeout_secs) + 15));
    let mut report = L1Report::default();
    let mut done_at: Option<Instant> = None;
    loop {
        let deadline = match (done_at, keep) {
            (_, true) => None,
            (Some(t), false) => Some(t + Duration::from_secs(L1_EXIT_SECS)),
            (None, false) => Some(started + budget),
        };
        let wait = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(line) => {
                println!("{line}");
                let now = started.elapsed();
                if line.contains(protocol::L1_PREFIX) {
                    if line.contains("init-reached") {
                        report.l1_init.get_or_insert(now);
                    } else if line.contains("modules-loaded") {
                        report.l1_kvm_ready.get_or_insert(now);
                    }
                } else if let Some(result) = RunResult::from_line(&line) {
                    report.results.push(result);
                } else if line.trim_end() == protocol::DONE_LINE {
                    report.done = true;
                    done_at = Some(Instant::now());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill(&mut child);
                report.total = started.elapsed();
                if done_at.is_some() {
                    println!("lab: L1 did not power off within {L1_EXIT_SECS} s after the agent finished; killed it");
                    break;
                }
                return Err(LabError::Run(format!(
                    "L1 timed out after {:.0} s ({} of {runs_total} L2 runs reported); killed QEMU",
                    report.total.as_secs_f64(),
                    report.results.len()
                )));
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| LabError::Run(format!("waiting for QEMU: {e}")))?;
    report.total = started.elapsed();
    if !report.done {
        return Err(LabError::Run(format!(
            "L1 exited ({status}) before the agent finished ({} of {runs_total} L2 runs reported)",
            report.results.len()
        )));
    }
    Ok(report)
}

/// The median of some values (`None` for none).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => values.get(n / 2).copied(),
        _ => Some((values.get(n / 2 - 1)? + values.get(n / 2)?) / 2.0),
    }
}

/// Checks that every planned run reported and passed; returns the failures.
fn verify(plan: &Plan, results: &[RunResult]) -> Vec<String> {
    let mut problems = Vec::new();
    for entry in &plan.entries {
        for run in 1..=plan.runs_for(entry) {
            match results.iter().find(|r| r.entry == *entry && r.run == run) {
                None => problems.push(format!("{entry} run {run}: no result")),
                Some(r) => problems.extend(
                    r.failures()
                        .into_iter()
                        .map(|f| format!("{entry} run {run}: {f}")),
                ),
            }
        }
    }
    problems
}

fn print_l1(report: &L1Report) {
    let s =
        |d: Option<Duration>| d.map_or_else(|| "?".into(), |d| format!("{:.1} s", d.as_secs_f64()));
    println!(
        "lab: L1 reached /init after {}, KVM ready after {}; L1 total {:.1} s",
        s(report.l1_init),
        s(report.l1_kvm_ready),
        report.total.as_secs_f64()
    );
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.1}"))
}

/// Extra words for L2's command line from `VMKIT_LAB_L2_APPEND`
/// (space-separated; for profiling a boot, e.g. `loglevel=8 initcall_debug`).
fn l2_append_from_env() -> Vec<String> {
    std::env::var("VMKIT_LAB_L2_APPEND")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// `lab run`: one configuration, `runs` times.
pub fn run(
    artifacts: &Artifacts,
    entries: &[PlanEntry],
    runs: u32,
    keep: bool,
) -> Result<(), LabError> {
    let plan = Plan {
        entries: entries.to_vec(),
        runs,
        timeout_secs: L2_TIMEOUT_SECS,
        l2_append: l2_append_from_env(),
    };
    let report = boot_l1(artifacts, &plan, keep)?;
    print_l1(&report);
    print_results(&report.results);
    let problems = verify(&plan, &report.results);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LabError::Run(problems.join("; ")))
    }
}

/// One summary line per run.
fn print_results(results: &[RunResult]) {
    for r in results {
        let snapshot = if r.entry.snapshot {
            format!(
                ", snapshot {} ms ({} MiB), restore to echo {} ms",
                fmt_ms(r.snapshot_ms),
                fmt_ms(r.snapshot_mib),
                fmt_ms(r.restore_ms)
            )
        } else {
            String::new()
        };
        println!(
            "lab: {} run {}: boot_to_init {} ms, full cycle {} ms, blk dd {} MiB/s, RSS beyond guest RAM {} KiB{snapshot}, {}",
            r.entry,
            r.run,
            fmt_ms(r.boot_to_init_ms),
            fmt_ms(r.full_cycle_ms),
            fmt_ms(r.blk_dd_mib_s),
            fmt_ms(r.rss_extra_kib),
            if r.failures().is_empty() {
                "all checks passed".to_string()
            } else {
                r.failures().join("; ")
            }
        );
    }
}

/// Reads one timing out of a run result.
type Metric = fn(&RunResult) -> Option<f64>;

/// The compare lines: medians for minivmm ("vmkit") against the baseline.
fn compare_lines(results: &[RunResult], transport: Option<Transport>) -> Vec<String> {
    let pick = |vmm: Vmm, f: Metric| {
        median(
            results
                .iter()
                .filter(|r| r.entry.vmm == vmm && r.entry.cpus == 1 && !r.entry.snapshot)
                .filter(|r| transport.is_none_or(|t| r.entry.transport == t))
                .filter_map(f)
                .collect(),
        )
    };
    let metrics: [(&str, Metric); 4] = [
        ("l2_boot_to_init_ms", |r| r.boot_to_init_ms),
        ("l2_full_cycle_ms", |r| r.full_cycle_ms),
        ("l2_blk_dd_mib_per_s", |r| r.blk_dd_mib_s),
        ("vmm_rss_beyond_guest_kib", |r| r.rss_extra_kib),
    ];
    metrics
        .iter()
        .map(|(name, f)| {
            let vmkit = pick(Vmm::Minivmm, *f);
            let base = pick(Vmm::Qemu, *f);
            let ratio = match (vmkit, base) {
                (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
                _ => "n/a".into(),
            };
            let scope = transport.map_or_else(String::new, |t| format!(" transport={t}"));
            format!(
                "{} {name}{scope} vmkit={} baseline(qemu microvm)={} ratio={ratio}",
                if transport.is_some() {
                    "detail:"
                } else {
                    "compare:"
                },
                fmt_ms(vmkit),
                fmt_ms(base)
            )
        })
        .collect()
}

/// `lab check`: every check on both transports for the baseline and (when
/// present) minivmm, `runs` times each, then the boot-time comparison.
/// `vmms` limits the VMMs (`VMKIT_LAB_VMMS`); minivmm is left out when
/// there is none.
pub fn check(artifacts: &Artifacts, runs: u32, vmms: &[Vmm]) -> Result<(), LabError> {
    let started = Instant::now();
    let mut entries = Vec::new();
    let vmms: Vec<Vmm> = vmms
        .iter()
        .copied()
        .filter(|v| *v != Vmm::Minivmm || artifacts.minivmm.is_some())
        .collect();
    if vmms.is_empty() {
        return Err(LabError::Usage("lab check: no VMM to check".into()));
    }
    for vmm in &vmms {
        for transport in [Transport::Mmio, Transport::Pci] {
            entries.push(PlanEntry {
                vmm: *vmm,
                transport,
                cpus: 1,
                snapshot: false,
            });
        }
    }
    if vmms.contains(&Vmm::Minivmm) {
        // Multi-vCPU boot (APs started by Linux through INIT/SIPI); not
        // part of the boot-time comparison, which is for 1 vCPU.
        entries.push(PlanEntry {
            vmm: Vmm::Minivmm,
            transport: Transport::Pci,
            cpus: 2,
            snapshot: false,
        });
        // Snapshot a running L2 and continue it in a new process (one run
        // is enough: it adds a boot's worth of time); not compared either.
        entries.push(PlanEntry {
            vmm: Vmm::Minivmm,
            transport: Transport::Mmio,
            cpus: 1,
            snapshot: true,
        });
    }
    if !vmms.contains(&Vmm::Minivmm) {
        println!("lab check: NOTE: minivmm not checked (none built, or VMKIT_LAB_VMMS): QEMU microvm baseline only");
    }
    let plan = Plan {
        entries,
        runs,
        timeout_secs: L2_TIMEOUT_SECS,
        l2_append: l2_append_from_env(),
    };
    let report = boot_l1(artifacts, &plan, false)?;
    print_l1(&report);
    print_results(&report.results);
    for transport in [Transport::Mmio, Transport::Pci] {
        for line in compare_lines(&report.results, Some(transport)) {
            println!("{line}");
        }
    }
    for line in compare_lines(&report.results, None) {
        println!("{line}");
    }
    let problems = verify(&plan, &report.results);
    println!(
        "lab check: {} L2 runs, {} problems, {:.1} s in all",
        report.results.len(),
        problems.len(),
        started.elapsed().as_secs_f64()
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LabError::Run(problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;
    use crate::lab::protocol::{CheckStatus, GUEST_CHECKS, HOST_CHECKS};

    fn result(vmm: Vmm, transport: Transport, run: u32, boot: f64, pass: bool) -> RunResult {
        let mut checks: BTreeMap<String, CheckStatus> = GUEST_CHECKS
            .iter()
            .chain(HOST_CHECKS)
            .map(|c| (c.to_string(), CheckStatus::Ok))
            .collect();
        if !pass {
            checks.remove("console");
        }
        RunResult {
            entry: PlanEntry {
                vmm,
                transport,
                cpus: 1,
                snapshot: false,
            },
            run,
            boot_to_init_ms: Some(boot),
            full_cycle_ms: Some(boot * 2.0),
            blk_dd_mib_s: Some(100_000.0 / boot),
            rss_extra_kib: Some(boot),
            snapshot_ms: None,
            restore_ms: None,
            snapshot_mib: None,
            checks,
        }
    }

    #[test]
    fn cpu_mhz_parses() {
        let info =
            "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.134\ncpu MHz\t\t: 1.0\n";
        assert_eq!(parse_cpu_mhz(info), Some(2_596_134));
        assert_eq!(parse_cpu_mhz("cpu MHz : fast"), None);
        assert_eq!(parse_cpu_mhz("cpu MHz : 0.5"), None);
        assert_eq!(parse_cpu_mhz(""), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn verify_finds_missing_and_failed_runs() {
        let q = PlanEntry {
            vmm: Vmm::Qemu,
            transport: Transport::Mmio,
            cpus: 1,
            snapshot: false,
        };
        let plan = Plan {
            entries: vec![q],
            runs: 3,
            timeout_secs: 60,
            l2_append: Vec::new(),
        };
        let results = vec![
            result(Vmm::Qemu, Transport::Mmio, 1, 100.0, true),
            result(Vmm::Qemu, Transport::Mmio, 2, 100.0, false),
        ];
        let problems = verify(&plan, &results);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("run 2") && problems[0].contains("console: missing"));
        assert!(problems[1].contains("run 3: no result"));
        let ok: Vec<RunResult> = (1..=3)
            .map(|i| result(Vmm::Qemu, Transport::Mmio, i, 1.0, true))
            .collect();
        assert!(verify(&plan, &ok).is_empty());
    }

    #[test]
    fn compare_uses_medians_per_vmm() {
        let results = vec![
            result(Vmm::Qemu, Transport::Mmio, 1, 2000.0, true),
            result(Vmm::Qemu, Transport::Pci, 1, 3000.0, true),
            result(Vmm::Qemu, Transport::Mmio, 2, 2500.0, true),
            result(Vmm::Minivmm, Transport::Mmio, 1, 1000.0, true),
            // A 2-vCPU run is checked but not compared.
            RunResult {
                entry: PlanEntry {
                    vmm: Vmm::Minivmm,
                    transport: Transport::Mmio,
                    cpus: 2,
                    snapshot: false,
                },
                ..result(Vmm::Minivmm, Transport::Mmio, 2, 9000.0, true)
            },
            // So is a snapshot run.
            RunResult {
                entry: PlanEntry {
                    vmm: Vmm::Minivmm,
                    transport: Transport::Mmio,
                    cpus: 1,
                    snapshot: true,
                },
                ..result(Vmm::Minivmm, Transport::Mmio, 3, 7000.0, true)
            },
        ];
        let lines = compare_lines(&results, None);
        assert_eq!(
            lines[0],
            "compare: l2_boot_to_init_ms vmkit=1000.0 baseline(qemu microvm)=2500.0 ratio=0.40"
        );
        assert!(lines[1]
            .starts_with("compare: l2_full_cycle_ms vmkit=2000.0 baseline(qemu microvm)=5000.0"));
        assert_eq!(
            lines[2],
            "compare: l2_blk_dd_mib_per_s vmkit=100.0 baseline(qemu microvm)=40.0 ratio=2.50"
        );
        assert!(lines[3].starts_with("compare: vmm_rss_beyond_guest_kib vmkit=1000.0"));
        let pci = compare_lines(&results, Some(Transport::Pci));
        assert_eq!(pci[0], "detail: l2_boot_to_init_ms transport=pci vmkit=n/a baseline(qemu microvm)=3000.0 ratio=n/a");
    }
}
