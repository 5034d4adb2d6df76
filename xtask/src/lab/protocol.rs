//! What L0, the L1 agent and the L2 init script agree on: the run plan on
//! L1's kernel command line, the guest's marker lines and the agent's
//! machine-readable result lines.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The prefix of every check line the L2 init script prints on its serial
/// console: `VMKIT-CHECK <name> ok [detail]` or `VMKIT-CHECK <name> fail <reason>`.
pub const CHECK_PREFIX: &str = "VMKIT-CHECK ";
/// The prefix of the agent's result line for one L2 run.
pub const RESULT_PREFIX: &str = "VMKIT-LAB-RESULT ";
/// Printed by the agent when every planned run is done.
pub const DONE_LINE: &str = "VMKIT-LAB-DONE";
/// The prefix of lines the L1 init script prints about L1 itself.
pub const L1_PREFIX: &str = "VMKIT-LAB-L1 ";

/// The checks the L2 guest must report `ok`, in the order it runs them.
pub const GUEST_CHECKS: &[&str] = &[
    "init-reached",
    "serial",
    "cpus",
    "blk-read",
    "blk-write",
    "blk-dd",
    "net",
    "rng",
    "console",
    "done",
];
/// The checks the agent adds from the host side of L2's devices.
pub const HOST_CHECKS: &[&str] = &[
    "vmm-exit",
    "host-blk-write",
    "host-console-echo",
    "host-net-payload",
];
/// The extra checks of a snapshot run ([`PlanEntry::snapshot`]), guest and
/// host, in order: L2 announces it is ready (after its normal checks), the
/// agent's SIGUSR1 makes minivmm write the snapshot and exit 0
/// (`host-snapshot`), a second minivmm continues L2 from it, L2 echoes the
/// line the agent typed on the restored serial console (the agent compares
/// it with what it sent) and checks its disk and network again.
pub const SNAPSHOT_CHECKS: &[&str] = &[
    "snapshot-ready",
    "host-snapshot",
    "restored-echo",
    "restored-blk",
    "restored-net",
];
/// The word on L2's kernel command line that asks for a snapshot run.
pub const SNAPSHOT_CMDLINE: &str = "vmkit.snap=1";

/// The tap device the agent creates in L1 for L2's network card.
pub const TAP_NAME: &str = "vmkit0";
/// L1's address on the tap (the ping target and payload server).
pub const HOST_IP: [u8; 4] = [10, 0, 2, 1];
/// L2's address.
pub const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
/// The TCP port of the agent's payload server.
pub const PAYLOAD_PORT: u16 = 5555;
/// L2's network card's MAC address.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// L2's kernel command line (the same for every VMM). `reboot=t` makes
/// `reboot -f` a triple fault, which every VMM sees at once: QEMU's microvm
/// has no i8042, and the kernel's default keyboard-controller reset then
/// spins on port 0x64 for minutes.
pub const L2_CMDLINE: &str = "console=ttyS0 quiet panic=-1 noxsave reboot=t rdinit=/init";
/// Guest memory for L2.
pub const L2_MEMORY: &str = "256M";

/// The VMM that runs L2 inside L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Vmm {
    /// `examples/minivmm`, built from vmkit.
    Minivmm,
    /// QEMU `-M microvm` with KVM: the baseline.
    Qemu,
}

impl fmt::Display for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vmm::Minivmm => "minivmm",
            Vmm::Qemu => "qemu",
        })
    }
}

impl FromStr for Vmm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "minivmm" => Ok(Vmm::Minivmm),
            "qemu" => Ok(Vmm::Qemu),
            _ => Err(format!("unknown VMM {s:?} (want qemu or minivmm)")),
        }
    }
}

/// The virtio transport L2's devices use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    /// virtio-mmio, described to the guest in ACPI.
    Mmio,
    /// virtio-pci on a PCIe root bus.
    Pci,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        })
    }
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmio" => Ok(Transport::Mmio),
            "pci" => Ok(Transport::Pci),
            _ => Err(format!("unknown transport {s:?} (want mmio or pci)")),
        }
    }
}

/// One configuration to run L2 with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanEntry {
    /// The VMM.
    pub vmm: Vmm,
    /// The virtio transport.
    pub transport: Transport,
    /// L2's vCPU count.
    pub cpus: u32,
    /// A snapshot run (minivmm only): after its checks L2 is snapshotted,
    /// continued in a new minivmm process, and checked again
    /// ([`SNAPSHOT_CHECKS`]). Written `vmm:transport:cpus:snap`.
    pub snapshot: bool,
}

impl fmt::Display for PlanEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.vmm, self.transport, self.cpus)?;
        if self.snapshot {
            f.write_str(":snap")?;
        }
        Ok(())
    }
}

impl FromStr for PlanEntry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let (Some(vmm), Some(transport), Some(cpus), option, None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(format!("plan entry {s:?}: want vmm:transport:cpus[:snap]"));
        };
        let cpus = cpus
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=8).contains(n))
            .ok_or_else(|| format!("plan entry {s:?}: cpus must be 1..=8"))?;
        let snapshot = match option {
            None => false,
            Some("snap") => true,
            Some(other) => {
                return Err(format!(
                    "plan entry {s:?}: unknown option {other:?} (want snap)"
                ))
            }
        };
        let vmm: Vmm = vmm.parse()?;
        if snapshot && vmm != Vmm::Minivmm {
            return Err(format!("plan entry {s:?}: snapshot runs are minivmm only"));
        }
        Ok(PlanEntry {
            vmm,
            transport: transport.parse()?,
            cpus,
            snapshot,
        })
    }
}

impl PlanEntry {
    /// Every check a run of this entry must pass.
    pub fn required_checks(&self) -> impl Iterator<Item = &'static str> {
        let extra: &[&str] = if self.snapshot { SNAPSHOT_CHECKS } else { &[] };
        GUEST_CHECKS.iter().chain(HOST_CHECKS).chain(extra).copied()
    }
}

/// What the agent in L1 is asked to do, carried on L1's kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The configurations, run in order.
    pub entries: Vec<PlanEntry>,
    /// Runs per configuration.
    pub runs: u32,
    /// Seconds before an L2 run is declared hung and its VMM killed.
    pub timeout_secs: u32,
    /// Extra words for L2's kernel command line (profiling, e.g.
    /// `loglevel=8 initcall_debug`), appended after [`L2_CMDLINE`].
    pub l2_append: Vec<String>,
}

impl Plan {
    /// The kernel command-line words carrying this plan.
    pub fn to_cmdline(&self) -> String {
        let entries: Vec<String> = self.entries.iter().map(ToString::to_string).collect();
        let mut words = format!(
            "vmkit.plan={} vmkit.runs={} vmkit.timeout={}",
            entries.join(","),
            self.runs,
            self.timeout_secs
        );
        if !self.l2_append.is_empty() {
            words.push_str(" vmkit.l2append=");
            words.push_str(&self.l2_append.join(","));
        }
        words
    }

    /// How many runs `entry` gets: [`Plan::runs`], except a snapshot run,
    /// which is a check rather than a measurement and runs once (it costs
    /// a whole extra boot).
    pub fn runs_for(&self, entry: &PlanEntry) -> u32 {
        if entry.snapshot {
            self.runs.min(1)
        } else {
            self.runs
        }
    }

    /// L2's kernel command line: [`L2_CMDLINE`] plus [`Plan::l2_append`].
    pub fn l2_cmdline(&self) -> String {
        let mut line = L2_CMDLINE.to_string();
        for word in &self.l2_append {
            line.push(' ');
            line.push_str(word);
        }
        line
    }

    /// Reads a plan back from a kernel command line (`/proc/cmdline`).
    pub fn from_cmdline(cmdline: &str) -> Result<Self, String> {
        let mut entries = None;
        let mut runs = 1;
        let mut timeout_secs = 60;
        let mut l2_append = Vec::new();
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("vmkit.plan=") {
                let parsed: Result<Vec<PlanEntry>, String> = v.split(',').map(str::parse).collect();
                entries = Some(parsed?);
            } else if let Some(v) = word.strip_prefix("vmkit.runs=") {
                runs = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=50).contains(n))
                    .ok_or_else(|| format!("vmkit.runs={v}: want 1..=50"))?;
            } else if let Some(v) = word.strip_prefix("vmkit.timeout=") {
                timeout_secs = v
                    .parse()
                    .ok()
                    .filter(|n| (5..=600).contains(n))
                    .ok_or_else(|| format!("vmkit.timeout={v}: want 5..=600"))?;
            } else if let Some(v) = word.strip_prefix("vmkit.l2append=") {
                l2_append = v
                    .split(',')
                    .filter(|w| !w.is_empty())
                    .map(String::from)
                    .collect();
            }
        }
        let entries = entries.ok_or("no vmkit.plan= on the kernel command line")?;
        if entries.is_empty() || entries.len() > 16 {
            return Err(format!(
                "vmkit.plan has {} entries: want 1..=16",
                entries.len()
            ));
        }
        Ok(Plan {
            entries,
            runs,
            timeout_secs,
            l2_append,
        })
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckStatus {
    /// Passed (with optional detail).
    Ok,
    /// Failed, with the reason.
    Fail(String),
}

/// Parses a guest check line (`VMKIT-CHECK name ok|fail [reason]`); lines
/// without a status word (`VMKIT-CHECK init-reached`) count as `ok`.
pub fn parse_check(line: &str) -> Option<(String, CheckStatus)> {
    let start = line.find(CHECK_PREFIX)?;
    let rest = line.get(start + CHECK_PREFIX.len()..)?.trim();
    let mut words = rest.splitn(3, ' ');
    let name = words.next().filter(|n| !n.is_empty())?.to_string();
    let status = match words.next() {
        None | Some("ok") => CheckStatus::Ok,
        Some("fail") => CheckStatus::Fail(words.next().unwrap_or("unspecified").to_string()),
        Some(other) => CheckStatus::Fail(format!("unknown status {other:?}")),
    };
    Some((name, status))
}

/// The agent's report on one L2 run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// The configuration.
    pub entry: PlanEntry,
    /// 1-based run number within the configuration.
    pub run: u32,
    /// Milliseconds from VMM start to L2's `init-reached` marker.
    pub boot_to_init_ms: Option<f64>,
    /// Milliseconds from VMM start to VMM exit after L2 rebooted.
    pub full_cycle_ms: Option<f64>,
    /// L2's sequential read throughput from its virtio-blk disk, MiB/s.
    pub blk_dd_mib_s: Option<f64>,
    /// The VMM's peak resident memory beyond guest RAM, KiB.
    pub rss_extra_kib: Option<f64>,
    /// Snapshot runs: milliseconds from SIGUSR1 to the VMM's exit, the
    /// snapshot written.
    pub snapshot_ms: Option<f64>,
    /// Snapshot runs: milliseconds from starting the restoring VMM to L2's
    /// echo of the line typed on its console.
    pub restore_ms: Option<f64>,
    /// Snapshot runs: the snapshot file's size, MiB.
    pub snapshot_mib: Option<f64>,
    /// Every check, guest and host, with its status.
    pub checks: BTreeMap<String, CheckStatus>,
}

impl RunResult {
    /// The checks that are missing or not `ok` (empty when the run passed).
    pub fn failures(&self) -> Vec<String> {
        self.entry
            .required_checks()
            .filter_map(|name| match self.checks.get(name) {
                Some(CheckStatus::Ok) => None,
                Some(CheckStatus::Fail(reason)) => Some(format!("{name}: {reason}")),
                None => Some(format!("{name}: missing")),
            })
            .collect()
    }

    /// Formats the machine-readable line the L0 side parses.
    pub fn to_line(&self) -> String {
        let ms = |v: Option<f64>| v.map_or_else(|| "none".to_string(), |v| format!("{v:.1}"));
        let checks: Vec<String> = self
            .checks
            .iter()
            .map(|(name, status)| match status {
                CheckStatus::Ok => format!("{name}:ok"),
                CheckStatus::Fail(_) => format!("{name}:fail"),
            })
            .collect();
        let failures = self.failures();
        let snapshot = if self.entry.snapshot {
            format!(
                " snapshot_ms={} restore_ms={} snapshot_mib={}",
                ms(self.snapshot_ms),
                ms(self.restore_ms),
                ms(self.snapshot_mib)
            )
        } else {
            String::new()
        };
        format!(
            "{RESULT_PREFIX}entry={} run={} status={} boot_to_init_ms={} full_cycle_ms={} blk_dd_mib_s={} rss_extra_kib={}{snapshot} checks={} failures={}",
            self.entry,
            self.run,
            if failures.is_empty() { "pass" } else { "fail" },
            ms(self.boot_to_init_ms),
            ms(self.full_cycle_ms),
            ms(self.blk_dd_mib_s),
            ms(self.rss_extra_kib),
            checks.join(","),
            sanitize(&failures.join("; ")),
        )
    }

    /// Parses a line made by [`RunResult::to_line`]; the failure reasons are
    /// not carried back (the agent prints them in full on its own lines).
    pub fn from_line(line: &str) -> Option<Self> {
        let start = line.find(RESULT_PREFIX)?;
        let rest = line.get(start + RESULT_PREFIX.len()..)?;
        let mut entry = None;
        let mut run = None;
        let mut boot = None;
        let mut cycle = None;
        let mut dd = None;
        let mut rss = None;
        let (mut snap, mut restore, mut snap_mib) = (None, None, None);
        let mut checks = BTreeMap::new();
        for word in rest.split(' ') {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "entry" => entry = value.parse().ok(),
                "run" => run = value.parse().ok(),
                "boot_to_init_ms" => boot = value.parse().ok(),
                "full_cycle_ms" => cycle = value.parse().ok(),
                "blk_dd_mib_s" => dd = value.parse().ok(),
                "rss_extra_kib" => rss = value.parse().ok(),
                "snapshot_ms" => snap = value.parse().ok(),
                "restore_ms" => restore = value.parse().ok(),
                "snapshot_mib" => snap_mib = value.parse().ok(),
                "checks" => {
                    for item in value.split(',').filter(|s| !s.is_empty()) {
                        let (name, status) = item.split_once(':')?;
                        let status = if status == "ok" {
                            CheckStatus::Ok
                        } else {
                            CheckStatus::Fail("reported failed by the agent".into())
                        };
                        checks.insert(name.to_string(), status);
                    }
                }
                _ => {}
            }
        }
        Some(RunResult {
            entry: entry?,
            run: run?,
            boot_to_init_ms: boot,
            full_cycle_ms: cycle,
            blk_dd_mib_s: dd,
            rss_extra_kib: rss,
            snapshot_ms: snap,
            restore_ms: restore,
            snapshot_mib: snap_mib,
            checks,
        })
    }
}

/// Replaces spaces so a free-text field stays one word of a result line.
fn sanitize(s: &str) -> String {
    if s.is_empty() {
        return "none".into();
    }
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plan_round_trips_through_cmdline() {
        let mut plan = Plan {
            l2_append: Vec::new(),
            entries: vec![
                PlanEntry {
                    vmm: Vmm::Qemu,
                    transport: Transport::Mmio,
                    cpus: 1,
                    snapshot: false,
                },
                PlanEntry {
                    vmm: Vmm::Minivmm,
                    transport: Transport::Pci,
                    cpus: 2,
                    snapshot: false,
                },
                PlanEntry {
                    vmm: Vmm::Minivmm,
                    transport: Transport::Mmio,
                    cpus: 1,
                    snapshot: true,
                },
            ],
            runs: 3,
            timeout_secs: 45,
        };
        let cmdline = format!("console=ttyS0 quiet {} rdinit=/init", plan.to_cmdline());
        assert_eq!(Plan::from_cmdline(&cmdline).unwrap(), plan);
        assert_eq!(plan.l2_cmdline(), L2_CMDLINE);
        plan.l2_append = vec!["loglevel=8".into(), "initcall_debug".into()];
        let cmdline = format!("console=ttyS0 {}", plan.to_cmdline());
        let back = Plan::from_cmdline(&cmdline).unwrap();
        assert_eq!(back, plan);
        assert_eq!(
            back.l2_cmdline(),
            format!("{L2_CMDLINE} loglevel=8 initcall_debug")
        );
        assert!(Plan::from_cmdline("console=ttyS0").is_err());
        assert!(Plan::from_cmdline("vmkit.plan=qemu:mmio:9").is_err());
        assert!(Plan::from_cmdline("vmkit.plan=qemu:isa:1").is_err());
        assert!(Plan::from_cmdline("vmkit.plan=qemu:mmio:1 vmkit.runs=0").is_err());
        assert!(cmdline.contains("minivmm:mmio:1:snap"), "{cmdline}");
        assert_eq!(plan.runs_for(&plan.entries[1]), 3);
        assert_eq!(plan.runs_for(&plan.entries[2]), 1);
        assert!(Plan::from_cmdline("vmkit.plan=minivmm:mmio:1:snapshot").is_err());
        assert!(Plan::from_cmdline("vmkit.plan=qemu:mmio:1:snap").is_err());
        assert!(Plan::from_cmdline("vmkit.plan=minivmm:mmio:1:snap:x").is_err());
    }

    #[test]
    fn check_lines_parse() {
        assert_eq!(
            parse_check("VMKIT-CHECK init-reached").unwrap(),
            ("init-reached".into(), CheckStatus::Ok)
        );
        assert_eq!(
            parse_check("[junk]VMKIT-CHECK net fail ping timed out").unwrap(),
            ("net".into(), CheckStatus::Fail("ping timed out".into()))
        );
        assert_eq!(
            parse_check("VMKIT-CHECK rng ok source=virtio").unwrap().1,
            CheckStatus::Ok
        );
        assert!(matches!(
            parse_check("VMKIT-CHECK rng maybe").unwrap().1,
            CheckStatus::Fail(_)
        ));
        assert!(parse_check("VMKIT-CHECK ").is_none());
        assert!(parse_check("hello").is_none());
    }

    #[test]
    fn result_line_round_trips_and_reports_missing_checks() {
        let mut checks = BTreeMap::new();
        for name in GUEST_CHECKS.iter().chain(HOST_CHECKS) {
            checks.insert(name.to_string(), CheckStatus::Ok);
        }
        let entry = PlanEntry {
            vmm: Vmm::Qemu,
            transport: Transport::Pci,
            cpus: 1,
            snapshot: false,
        };
        let mut result = RunResult {
            entry,
            run: 2,
            boot_to_init_ms: Some(1234.5),
            full_cycle_ms: Some(4321.0),
            blk_dd_mib_s: Some(87.5),
            rss_extra_kib: None,
            snapshot_ms: None,
            restore_ms: None,
            snapshot_mib: None,
            checks,
        };
        assert!(result.failures().is_empty());
        let line = result.to_line();
        assert!(line.contains("status=pass"), "{line}");
        assert_eq!(RunResult::from_line(&line).unwrap(), result);

        result.checks.remove("net");
        result
            .checks
            .insert("rng".into(), CheckStatus::Fail("short read".into()));
        let line = result.to_line();
        assert!(line.contains("status=fail"), "{line}");
        let parsed = RunResult::from_line(&line).unwrap();
        let failures = parsed.failures();
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures.iter().any(|f| f.starts_with("net: missing")));
        assert!(failures.iter().any(|f| f.starts_with("rng: ")));
    }

    #[test]
    fn snapshot_runs_need_their_checks_and_carry_their_timings() {
        let entry: PlanEntry = "minivmm:mmio:1:snap".parse().unwrap();
        assert!(entry.snapshot);
        let mut checks: BTreeMap<String, CheckStatus> = GUEST_CHECKS
            .iter()
            .chain(HOST_CHECKS)
            .map(|n| (n.to_string(), CheckStatus::Ok))
            .collect();
        let mut result = RunResult {
            entry,
            run: 1,
            boot_to_init_ms: Some(900.0),
            full_cycle_ms: Some(9000.0),
            blk_dd_mib_s: None,
            rss_extra_kib: None,
            snapshot_ms: Some(812.5),
            restore_ms: Some(1500.5),
            snapshot_mib: Some(256.1),
            checks: checks.clone(),
        };
        // The normal checks alone do not pass a snapshot run.
        assert_eq!(result.failures().len(), SNAPSHOT_CHECKS.len());
        for name in SNAPSHOT_CHECKS {
            checks.insert(name.to_string(), CheckStatus::Ok);
        }
        result.checks = checks;
        assert!(result.failures().is_empty());
        let line = result.to_line();
        assert!(
            line.contains("entry=minivmm:mmio:1:snap ")
                && line.contains(" snapshot_ms=812.5 restore_ms=1500.5 snapshot_mib=256.1 "),
            "{line}"
        );
        let back = RunResult::from_line(&line).unwrap();
        assert_eq!(back.entry, entry);
        assert_eq!(back.snapshot_ms, Some(812.5));
        assert_eq!(back.snapshot_mib, Some(256.1));
        assert!(back.failures().is_empty());
        // Ordinary runs keep their line as it was.
        let plain = RunResult {
            entry: PlanEntry {
                snapshot: false,
                ..entry
            },
            ..result
        };
        assert!(!plain.to_line().contains("snapshot_ms"));
    }
}
