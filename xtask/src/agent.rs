//! `xtask lab-agent`: the orchestrator inside L1.
//!
//! It reads its plan from L1's kernel command line, creates the tap L2's
//! network card uses, serves the network payload, and for each planned run:
//! writes the disk image's read pattern, starts the VMM, connects to the
//! virtio-console socket the VMM listens on, timestamps every line L2 prints (monotonic clock,
//! from just before the VMM starts), collects L2's check markers, kills the
//! VMM if it overruns its time, checks the disk pattern L2 wrote, and prints
//! one machine-readable result line for L0.
//!
//! A snapshot run (`minivmm:...:snap`) starts minivmm with `--snapshot`;
//! when L2 reports `snapshot-ready` the agent sends SIGUSR1, waits for
//! minivmm to write the snapshot and exit 0, starts `minivmm --restore`
//! with the same machine, types a token line on its serial console and
//! requires L2 to echo it (then L2 checks its disk and network again).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::lab::protocol::{self, CheckStatus, Plan, PlanEntry, RunResult, Transport, Vmm};
use crate::lab::{io_err, patterns, LabError};

/// Where the agent keeps per-run files in L1.
const WORK_DIR: &str = "/tmp/lab";
/// The kernel and initramfs for L2, as L1's init script finds them.
const L2_KERNEL: &str = "/lab/vmlinux";
const L2_INITRD: &str = "/lab/l2.cpio";
const MINIVMM: &str = "/lab/minivmm";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// `TUNSETIFF`: attach to (or create) a tun/tap device (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETPERSIST`: keep the device when its last file closes.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;

/// `struct ifreq`: a name and a 24-byte union (flags or a `sockaddr`).
#[repr(C)]
#[derive(Debug)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, LabError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        let bytes = name.as_bytes();
        let slot = req
            .name
            .get_mut(..bytes.len())
            .filter(|_| bytes.len() < libc::IFNAMSIZ)
            .ok_or_else(|| LabError::Usage(format!("interface name {name:?} too long")))?;
        slot.copy_from_slice(bytes);
        Ok(req)
    }

    /// Puts an IPv4 `sockaddr_in` into the union.
    fn set_ipv4(&mut self, addr: [u8; 4]) {
        self.data = [0; 24];
        let family = (libc::AF_INET as u16).to_ne_bytes();
        self.data[..2].copy_from_slice(&family);
        self.data[4..8].copy_from_slice(&addr);
    }
}

/// One `ioctl` on an interface request, with the error named.
fn ifreq_ioctl(
    fd: &impl AsRawFd,
    request: libc::c_ulong,
    req: &mut IfReq,
    what: &str,
) -> Result<(), LabError> {
    // SAFETY: every request used here (TUNSETIFF and the SIOC[GS]IF* family)
    // reads or writes at most a `struct ifreq`, which `IfReq` lays out with
    // the kernel's size (16 + 24 bytes); `req` is exclusively borrowed and
    // outlives the call, and `fd` is an open descriptor.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut IfReq) };
    if rc < 0 {
        return Err(io_err(what.to_string())(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Creates the persistent tap `name`, gives it `addr`/24 and brings it up.
fn create_tap(name: &str, addr: [u8; 4]) -> Result<(), LabError> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(io_err("opening /dev/net/tun"))?;
    let mut req = IfReq::new(name)?;
    req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    ifreq_ioctl(&tun, TUNSETIFF, &mut req, "TUNSETIFF")?;
    // SAFETY: TUNSETPERSIST takes its argument by value (an integer, not a
    // pointer); `tun` is an open tun file attached to the device above.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(io_err("TUNSETPERSIST")(std::io::Error::last_os_error()));
    }
    drop(tun);

    // Any AF_INET socket will do for the interface ioctls.
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(io_err("creating an AF_INET socket"))?;
    let mut req = IfReq::new(name)?;
    req.set_ipv4(addr);
    ifreq_ioctl(&sock, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR")?;
    req.set_ipv4([255, 255, 255, 0]);
    ifreq_ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK")?;
    let mut req = IfReq::new(name)?;
    ifreq_ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | libc::IFF_UP as i16;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ifreq_ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")?;
    Ok(())
}

/// A background thread that stops when told to.
#[derive(Debug)]
struct Worker {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU32>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn count(&self) -> u32 {
        self.count.load(Ordering::SeqCst)
    }

    fn stop(mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.count()
    }
}

/// Serves the payload to every TCP connection on the payload port.
fn payload_server() -> Result<Worker, LabError> {
    let listener = TcpListener::bind(("0.0.0.0", protocol::PAYLOAD_PORT))
        .map_err(io_err("binding the payload port"))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("payload listener"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU32::new(0));
    let (stop2, count2) = (stop.clone(), count.clone());
    let payload = patterns::payload();
    let handle = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let sent = stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(10))))
                        .and_then(|()| stream.write_all(&payload))
                        .and_then(|()| stream.shutdown(Shutdown::Write));
                    match sent {
                        Ok(()) => {
                            count2.fetch_add(1, Ordering::SeqCst);
                            println!(
                                "lab-agent: served {} payload bytes to {peer}",
                                payload.len()
                            );
                        }
                        Err(e) => println!("lab-agent: payload to {peer} failed: {e}"),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => {
                    println!("lab-agent: payload accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
    Ok(Worker {
        stop,
        count,
        handle: Some(handle),
    })
}

/// Connects to the virtio-console socket the VMM listens on (retrying
/// until the VMM has created it) and answers each `VMKIT-PING <token>` line
/// with `VMKIT-PONG <token>`.
fn console_client(path: &Path) -> Result<Worker, LabError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("removing {}", path.display()))(e)),
    }
    let path = path.to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU32::new(0));
    let (stop2, count2) = (stop.clone(), count.clone());
    let handle = std::thread::spawn(move || {
        let mut conn = None;
        while !stop2.load(Ordering::SeqCst) && conn.is_none() {
            match UnixStream::connect(&path) {
                Ok(s) => conn = Some(s),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        let Some(mut stream) = conn else { return };
        if stream.set_nonblocking(false).is_err()
            || stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .is_err()
        {
            return;
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        while !stop2.load(Ordering::SeqCst) {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => pending.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            }
            // Bounded: each pass removes one line; a guest can't make a line longer than 64 KiB.
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                println!("lab-agent: hvc0 <- {text}");
                if let Some(token) = text.strip_prefix("VMKIT-PING ") {
                    if stream
                        .write_all(format!("VMKIT-PONG {token}\n").as_bytes())
                        .is_ok()
                    {
                        count2.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            if pending.len() > 64 << 10 {
                pending.clear();
            }
        }
    });
    Ok(Worker {
        stop,
        count,
        handle: Some(handle),
    })
}

/// minivmm's machine: everything but what to start it from (a kernel or
/// a snapshot). A restore must give the same.
fn minivmm_machine(c: &mut Command, entry: &PlanEntry, disk: &Path, socket: &Path) {
    c.args([
        "--memory",
        protocol::L2_MEMORY,
        "--cpus",
        &entry.cpus.to_string(),
    ])
    .arg("--disk")
    .arg(disk)
    .args([
        "--net",
        &format!("tap={},mac={}", protocol::TAP_NAME, protocol::GUEST_MAC),
    ])
    .args(["--rng", "--console", "serial"])
    .arg("--vconsole")
    .arg(format!("socket={}", socket.display()))
    .args(["--transport", &entry.transport.to_string(), "--boot-timer"]);
}

/// The command continuing a snapshot run's L2 from `snapshot`.
fn restore_command(entry: &PlanEntry, disk: &Path, socket: &Path, snapshot: &Path) -> Command {
    let mut c = Command::new(MINIVMM);
    c.arg("--restore").arg(snapshot);
    minivmm_machine(&mut c, entry, disk, socket);
    c
}

/// The VMM command line for one run; `snapshot` (minivmm only) is where
/// SIGUSR1 makes it save L2.
fn vmm_command(
    entry: &PlanEntry,
    l2_cmdline: &str,
    disk: &Path,
    socket: &Path,
    snapshot: Option<&Path>,
) -> Command {
    match entry.vmm {
        Vmm::Minivmm => {
            let mut c = Command::new(MINIVMM);
            c.args([
                "--kernel",
                L2_KERNEL,
                "--initrd",
                L2_INITRD,
                "--cmdline",
                l2_cmdline,
            ]);
            minivmm_machine(&mut c, entry, disk, socket);
            if let Some(path) = snapshot {
                c.arg("--snapshot").arg(path);
            }
            c
        }
        Vmm::Qemu => {
            let (machine, bus) = match entry.transport {
                Transport::Mmio => ("microvm,rtc=on,acpi=on", "device"),
                Transport::Pci => ("microvm,rtc=on,acpi=on,pcie=on", "pci"),
            };
            let rom = if entry.transport == Transport::Pci {
                ",romfile="
            } else {
                ""
            };
            let mut c = Command::new(QEMU);
            c.args(["-enable-kvm", "-M", machine, "-cpu", "host,-xsave"])
                .args(["-smp", &entry.cpus.to_string(), "-m", protocol::L2_MEMORY])
                .args([
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-monitor",
                    "none",
                    "-no-reboot",
                ])
                .args([
                    "-kernel", L2_KERNEL, "-initrd", L2_INITRD, "-append", l2_cmdline,
                ])
                .arg("-drive")
                .arg(format!(
                    "id=disk0,file={},format=raw,if=none",
                    disk.display()
                ))
                .args(["-device", &format!("virtio-blk-{bus},drive=disk0")])
                .args([
                    "-netdev",
                    &format!(
                        "tap,id=net0,ifname={},script=no,downscript=no",
                        protocol::TAP_NAME
                    ),
                ])
                .args([
                    "-device",
                    &format!(
                        "virtio-net-{bus},netdev=net0,mac={}{rom}",
                        protocol::GUEST_MAC
                    ),
                ])
                .args(["-object", "rng-random,id=rng0,filename=/dev/urandom"])
                .args(["-device", &format!("virtio-rng-{bus},rng=rng0")])
                .arg("-chardev")
                .arg(format!(
                    "socket,id=vcon0,path={},server=on,wait=off",
                    socket.display()
                ))
                .args(["-device", &format!("virtio-serial-{bus},max_ports=1")])
                .args(["-device", "virtconsole,chardev=vcon0"]);
            c
        }
    }
}

/// A fresh disk image: the read pattern at 0, zeros elsewhere.
fn prepare_disk(path: &Path) -> Result<(), LabError> {
    let mut f = File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
    f.write_all(&patterns::blk_read_pattern())
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.set_len(patterns::DISK_SIZE)
        .map_err(io_err(format!("sizing {}", path.display())))?;
    f.sync_all()
        .map_err(io_err(format!("syncing {}", path.display())))
}

/// Whether L2 left its write pattern on the disk.
fn verify_disk(path: &Path) -> CheckStatus {
    let mut got = vec![0u8; patterns::BLK_WRITE_LEN];
    let read = File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(patterns::BLK_WRITE_OFFSET))
                .map(|_| f)
        })
        .and_then(|mut f| f.read_exact(&mut got));
    match read {
        Err(e) => CheckStatus::Fail(format!("reading {}: {e}", path.display())),
        Ok(()) if got == patterns::blk_write_pattern() => CheckStatus::Ok,
        Ok(()) => {
            let first = got
                .iter()
                .zip(patterns::blk_write_pattern())
                .position(|(a, b)| *a != b);
            CheckStatus::Fail(format!("write pattern differs from byte {first:?}"))
        }
    }
}

/// Whether L2's command line asks for a profiling run (`vmkit.dmesg`).
fn profiling(l2_cmdline: &str) -> bool {
    l2_cmdline.split_whitespace().any(|w| w == "vmkit.dmesg")
}

/// Prints the VMM's mappings with at least 256 KiB resident, with their
/// transparent-huge-page share (profiling runs): where the memory beyond
/// guest RAM goes, and whether guest RAM got huge pages.
fn print_resident_mappings(pid: libc::pid_t) {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return;
    };
    let mut header = "";
    let mut rss = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            header = line;
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            rss = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("AnonHugePages:") {
            if rss >= 256 {
                println!(
                    "lab-agent: rss {rss:7} kB, anon huge {:>8} | {header}",
                    rest.trim()
                );
            }
        }
    }
}

/// Prints the CPU time of each of the VMM's threads (profiling runs): in
/// L1's single CPU, whatever the VMM's own threads use is taken from L2.
fn print_thread_times(pid: libc::pid_t) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // comm is in parentheses and may hold spaces; fields follow ")".
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat.get(open + 1..close).unwrap_or("?");
        let fields: Vec<&str> = stat.get(close + 2..).unwrap_or("").split(' ').collect();
        // After ")": state is field 3, utime 14, stime 15, guest_time 43.
        let get = |n: usize| fields.get(n - 3).copied().unwrap_or("?");
        println!(
            "lab-agent: thread {} ({comm}): utime {} stime {} guest {} (ticks)",
            task.file_name().to_string_lossy(),
            get(14),
            get(15),
            get(43)
        );
    }
}

/// Prints L1 KVM's counters for the VMM's VM (profiling runs): how many
/// exits of each kind the guest has taken so far, from debugfs (mounted
/// here if L1's init did not).
fn print_kvm_stats(pid: libc::pid_t) {
    let root = Path::new("/sys/kernel/debug/kvm");
    if !root.exists() {
        let _ = std::fs::create_dir_all("/sys/kernel/debug");
        // SAFETY: the arguments are NUL-terminated literals; mounting
        // debugfs changes no memory of this process.
        let rc = unsafe {
            libc::mount(
                c"debugfs".as_ptr(),
                c"/sys/kernel/debug".as_ptr(),
                c"debugfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            println!("lab-agent: no debugfs: {}", std::io::Error::last_os_error());
            return;
        }
    }
    let Ok(vms) = std::fs::read_dir(root) else {
        return;
    };
    let prefix = format!("{pid}-");
    for vm in vms.flatten() {
        if !vm.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let mut line = String::new();
        for stat in [
            "exits",
            "io_exits",
            "mmio_exits",
            "halt_exits",
            "irq_exits",
            "irq_window_exits",
            "signal_exits",
            "request_irq_exits",
            "insn_emulation",
            "pf_taken",
            "pf_fixed",
            "hypercalls",
            "irq_injections",
            "pages_4k",
            "pages_2m",
        ] {
            if let Ok(v) = std::fs::read_to_string(vm.path().join(stat)) {
                line.push_str(&format!(" {stat}={}", v.trim()));
            }
        }
        println!("lab-agent: kvm stats{line}");
    }
}

/// Prints the kernel log L2 left on its disk (profiling runs).
fn print_dmesg(disk: &Path) {
    let mut buf = vec![0u8; patterns::DMESG_MAX as usize];
    let read = File::open(disk)
        .and_then(|mut f| f.seek(SeekFrom::Start(patterns::DMESG_OFFSET)).map(|_| f))
        .and_then(|mut f| f.read_exact(&mut buf));
    if let Err(e) = read {
        println!("lab-agent: no L2 kernel log on the disk: {e}");
        return;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let log = String::from_utf8_lossy(&buf[..end]);
    for line in log.lines() {
        println!("L2-dmesg | {line}");
    }
    if let Some(lag) = log.lines().find_map(early_clock_lag_ms) {
        println!(
            "lab-agent: L2's timestamps ran {lag} ms behind kvm-clock before its \
             clocksource switch (add that to uptime for the kernel's real run time)"
        );
    }
}

/// How far L2's early clock fell behind its kvm-clock, in ms, from the
/// kernel's `sched_clock: Marking stable (A, B)->(C, D)` line (A: time
/// since boot, C: raw sched_clock, both ns). Until the clocksource switch
/// (an fs_initcall) timekeeping counts timer ticks, and printk timestamps
/// are clamped to the last tick, so a tick delivered late (as under
/// nested TCG, where an exit takes tenths of a millisecond) is time lost
/// from both dmesg and `/proc/uptime`: in this lab 0.4 to 1 s of a boot.
fn early_clock_lag_ms(line: &str) -> Option<i64> {
    let rest = line.split("sched_clock: Marking stable (").nth(1)?;
    let (boot, rest) = rest.split_once(',')?;
    let raw = rest.split(")->(").nth(1)?.split(',').next()?;
    let boot: i64 = boot.trim().parse().ok()?;
    let raw: i64 = raw.trim().parse().ok()?;
    Some((raw - boot) / 1_000_000)
}

/// MiB/s from a `blk-dd ok ms=<ms> mib=<MiB>` check line.
fn dd_throughput(line: &str) -> Option<f64> {
    let field = |key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    let (ms, mib) = (field("ms=")?, field("mib=")?);
    (ms > 0.0).then(|| mib * 1000.0 / ms)
}

/// L2's RAM in bytes ([`protocol::L2_MEMORY`], e.g. `256M`).
fn l2_memory_bytes() -> u64 {
    let m = protocol::L2_MEMORY;
    m.strip_suffix('M')
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(0, |n| n << 20)
}

/// KiB resident in a process's mappings other than guest RAM, from its
/// `/proc/PID/smaps`. Guest RAM is every mapping at least `guest_bytes`
/// long: both minivmm and QEMU map a small guest's RAM in one piece, and
/// nothing else of theirs that large is resident. `None` when no such
/// mapping exists (the split would be meaningless).
fn rss_beyond_guest_kib(smaps: &str, guest_bytes: u64) -> Option<u64> {
    let mut total = 0u64;
    let mut in_guest = false;
    let mut found_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                in_guest = guest_bytes > 0 && hi.saturating_sub(lo) >= guest_bytes;
                found_guest |= in_guest;
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            if !in_guest {
                total += kib;
            }
        }
    }
    found_guest.then_some(total)
}

/// What the VMM's output threads and its waiter report.
#[derive(Debug)]
enum Event {
    Line(Instant, &'static str, String),
    Exit(Instant, std::io::Result<ExitStatus>),
}

fn relay(stream: impl Read + Send + 'static, name: &'static str, tx: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send(Event::Line(at, name, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Starts a VMM with its output relayed to `tx` line by line and its exit
/// reported there; returns its pid and, if `with_stdin`, its stdin (else
/// it reads nothing).
fn spawn_vmm(
    mut cmd: Command,
    tx: &mpsc::Sender<Event>,
    with_stdin: bool,
) -> std::io::Result<(libc::pid_t, Option<ChildStdin>)> {
    cmd.stdin(if with_stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    if let Some(out) = child.stdout.take() {
        relay(out, "L2", tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        relay(err, "L2-stderr", tx.clone());
    }
    let stdin = child.stdin.take();
    let waiter = tx.clone();
    std::thread::spawn(move || {
        let status = child.wait();
        let _ = waiter.send(Event::Exit(Instant::now(), status));
    });
    Ok((pid, stdin))
}

/// Where a snapshot run is.
#[derive(Debug)]
enum SnapshotPhase {
    /// L2 has not reported `snapshot-ready` (or this is no snapshot run).
    Booting,
    /// SIGUSR1 went to the first VMM at this time.
    Signalled(Instant),
    /// The restoring VMM started at `at`; `token` was typed on its
    /// console, whose pipe stays open until the run ends.
    Restored {
        at: Instant,
        token: String,
        _stdin: Option<ChildStdin>,
    },
    /// The snapshot or the restore failed.
    Failed,
}

impl SnapshotPhase {
    /// Asks the VMM `pid` for its snapshot (once).
    fn request(self, pid: libc::pid_t) -> Self {
        let Self::Booting = self else {
            return self;
        };
        // SAFETY: kill() has no memory-safety preconditions; `pid` is our
        // child, which has just printed a line and was not reaped (its
        // waiter thread reports the exit, which moves the run on).
        let rc = unsafe { libc::kill(pid, libc::SIGUSR1) };
        if rc != 0 {
            println!(
                "lab-agent: SIGUSR1 to {pid} failed: {}",
                std::io::Error::last_os_error()
            );
            return Self::Failed;
        }
        println!("lab-agent: SIGUSR1 sent to {pid}: snapshot requested");
        Self::Signalled(Instant::now())
    }

    /// The restoring VMM started at `at`: types a fresh token line on its
    /// serial console.
    fn restored(at: Instant, stdin: Option<ChildStdin>) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let token = format!("restored-{}-{nanos:09}", std::process::id());
        let mut stdin = stdin;
        let typed = stdin.as_mut().map(|s| {
            s.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| s.flush())
        });
        match typed {
            Some(Ok(())) => println!("lab-agent: typed {token:?} on the restored console"),
            Some(Err(e)) => println!("lab-agent: typing on the restored console failed: {e}"),
            None => println!("lab-agent: the restored VMM has no stdin"),
        }
        Self::Restored {
            at,
            token,
            _stdin: stdin,
        }
    }

    /// Judges L2's `restored-echo` line (arriving at `at`): it must carry
    /// the typed token; records the restore time.
    fn echo(&self, at: Instant, line: &str, result: &mut RunResult) -> CheckStatus {
        let Self::Restored {
            at: started, token, ..
        } = self
        else {
            return CheckStatus::Fail("echo before any restore".into());
        };
        let echoed = echo_detail(line);
        if echoed == Some(token.as_str()) {
            result.restore_ms = Some(at.duration_since(*started).as_secs_f64() * 1e3);
            CheckStatus::Ok
        } else {
            CheckStatus::Fail(format!("echoed {echoed:?}, typed {token:?}"))
        }
    }
}

/// The line L2 echoed: what follows `restored-echo ok `.
fn echo_detail(line: &str) -> Option<&str> {
    let start = line.find("restored-echo ")?;
    let rest = line.get(start + "restored-echo ".len()..)?;
    rest.strip_prefix("ok")
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Whether the snapshotted VMM did its part: exit status 0 and the file
/// in place.
fn snapshot_outcome(status: &std::io::Result<ExitStatus>, file: &Path) -> CheckStatus {
    match status {
        Err(e) => CheckStatus::Fail(format!("wait: {e}")),
        Ok(s) if !s.success() => CheckStatus::Fail(format!("VMM exited with {s} on SIGUSR1")),
        Ok(_) => match std::fs::metadata(file) {
            Ok(m) if m.len() > 0 => CheckStatus::Ok,
            Ok(_) => CheckStatus::Fail(format!("{} is empty", file.display())),
            Err(e) => CheckStatus::Fail(format!("{}: {e}", file.display())),
        },
    }
}

/// Records a check, keeping a failure over a later success.
fn record(checks: &mut BTreeMap<String, CheckStatus>, name: &str, status: CheckStatus) {
    match checks.get(name) {
        Some(CheckStatus::Fail(_)) => {}
        _ => {
            checks.insert(name.to_string(), status);
        }
    }
}

/// One L2 run.
fn run_once(
    entry: &PlanEntry,
    l2_cmdline: &str,
    run: u32,
    timeout: Duration,
    payloads: &Worker,
) -> RunResult {
    let mut checks = BTreeMap::new();
    let mut result = RunResult {
        entry: *entry,
        run,
        boot_to_init_ms: None,
        full_cycle_ms: None,
        blk_dd_mib_s: None,
        rss_extra_kib: None,
        snapshot_ms: None,
        restore_ms: None,
        snapshot_mib: None,
        checks: BTreeMap::new(),
    };
    let dir = Path::new(WORK_DIR);
    let disk = dir.join("disk.img");
    let socket = dir.join("vconsole.sock");
    let prepared = std::fs::create_dir_all(dir)
        .map_err(io_err(format!("creating {WORK_DIR}")))
        .and_then(|()| prepare_disk(&disk))
        .and_then(|()| console_client(&socket));
    let console = match prepared {
        Ok(c) => c,
        Err(e) => {
            record(
                &mut checks,
                "vmm-exit",
                CheckStatus::Fail(format!("setup: {e}")),
            );
            result.checks = checks;
            return result;
        }
    };
    let served_before = payloads.count();

    // L2's init checks that it sees this many processors.
    let mut l2_cmdline = format!("{l2_cmdline} vmkit.cpus={}", entry.cpus);
    let snap_file = dir.join("l2.snap");
    if entry.snapshot {
        l2_cmdline.push(' ');
        l2_cmdline.push_str(protocol::SNAPSHOT_CMDLINE);
        // A snapshot of an earlier run must not pass for this one's.
        let _ = std::fs::remove_file(&snap_file);
    }
    let l2_cmdline = l2_cmdline.as_str();
    let snapshot_arg = entry.snapshot.then_some(snap_file.as_path());
    let cmd = vmm_command(entry, l2_cmdline, &disk, &socket, snapshot_arg);
    println!("lab-agent: {entry} run {run}: {cmd:?}");
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel();
    let mut timed_out = false;
    let mut exit: Option<(Instant, std::io::Result<ExitStatus>)> = None;
    match spawn_vmm(cmd, &tx, false) {
        Err(e) => record(
            &mut checks,
            "vmm-exit",
            CheckStatus::Fail(format!("spawn: {e}")),
        ),
        Ok((mut pid, _)) => {
            // A snapshot run starts a second VMM from this loop: keep a
            // sender for it until then.
            let mut spare_tx = entry.snapshot.then(|| tx.clone());
            drop(tx);
            let mut snap = SnapshotPhase::Booting;
            let mut deadline = t0 + timeout;
            loop {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(Event::Line(at, stream, text)) => {
                        let ms = at.duration_since(t0).as_secs_f64() * 1e3;
                        println!("{stream} +{ms:9.1}ms | {text}");
                        if stream == "L2" {
                            if let Some((name, mut status)) = protocol::parse_check(&text) {
                                if name == "init-reached" {
                                    result.boot_to_init_ms.get_or_insert(ms);
                                    if profiling(l2_cmdline) {
                                        print_thread_times(pid);
                                        print_kvm_stats(pid);
                                    }
                                }
                                if name == "done" && profiling(l2_cmdline) {
                                    print_resident_mappings(pid);
                                }
                                if name == "blk-dd" && status == CheckStatus::Ok {
                                    result.blk_dd_mib_s = dd_throughput(&text);
                                }
                                if name == "snapshot-ready" && entry.snapshot {
                                    snap = snap.request(pid);
                                }
                                if name == "restored-echo" {
                                    status = snap.echo(at, &text, &mut result);
                                }
                                // Sampled at every check, after the I/O each
                                // one caused: the peak over the run.
                                if let Some(kib) =
                                    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
                                        .ok()
                                        .and_then(|s| rss_beyond_guest_kib(&s, l2_memory_bytes()))
                                {
                                    let kib = kib as f64;
                                    if result.rss_extra_kib.is_none_or(|m| kib > m) {
                                        result.rss_extra_kib = Some(kib);
                                    }
                                }
                                record(&mut checks, &name, status);
                            }
                        }
                    }
                    Ok(Event::Exit(at, status)) => {
                        let SnapshotPhase::Signalled(signalled) = snap else {
                            // The run's last VMM (or one that ended before
                            // its snapshot): nothing more to start.
                            spare_tx = None;
                            exit = Some((at, status));
                            continue;
                        };
                        let saved = snapshot_outcome(&status, &snap_file);
                        if let CheckStatus::Ok = saved {
                            result.snapshot_ms =
                                Some(at.duration_since(signalled).as_secs_f64() * 1e3);
                            result.snapshot_mib = std::fs::metadata(&snap_file)
                                .ok()
                                .map(|m| m.len() as f64 / f64::from(1u32 << 20));
                        }
                        let ok = saved == CheckStatus::Ok;
                        record(&mut checks, "host-snapshot", saved);
                        let restored = match (ok, spare_tx.take()) {
                            (true, Some(tx)) => {
                                let cmd = restore_command(entry, &disk, &socket, &snap_file);
                                println!("lab-agent: {entry} run {run}: restoring: {cmd:?}");
                                let started = Instant::now();
                                spawn_vmm(cmd, &tx, true).map(|spawned| (started, spawned))
                            }
                            _ => Err(std::io::Error::other("no snapshot to restore")),
                        };
                        match restored {
                            Ok((started, (restored_pid, stdin))) => {
                                pid = restored_pid;
                                deadline = Instant::now() + timeout;
                                snap = SnapshotPhase::restored(started, stdin);
                            }
                            Err(e) => {
                                println!("lab-agent: {entry} run {run}: no restore: {e}");
                                snap = SnapshotPhase::Failed;
                                exit = Some((at, status));
                            }
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if timed_out || exit.is_some() {
                            // The VMM is gone (or unkillable) but something still
                            // holds its output pipes: stop waiting.
                            break;
                        }
                        timed_out = true;
                        spare_tx = None;
                        println!(
                            "lab-agent: {entry} run {run}: timed out after {} s; killing the VMM",
                            timeout.as_secs()
                        );
                        // SAFETY: kill() has no memory-safety preconditions; `pid`
                        // is our child, not yet reaped (no Exit event arrived), so
                        // it cannot name an unrelated process.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        deadline = Instant::now() + Duration::from_secs(5);
                    }
                }
            }
            drop(snap);
            let status = match &exit {
                _ if timed_out => {
                    CheckStatus::Fail(format!("timed out after {} s (killed)", timeout.as_secs()))
                }
                None => CheckStatus::Fail("no exit status".into()),
                Some((_, Err(e))) => CheckStatus::Fail(format!("wait: {e}")),
                Some((_, Ok(s))) if s.success() => CheckStatus::Ok,
                Some((_, Ok(s))) => CheckStatus::Fail(format!("VMM exited with {s}")),
            };
            if status == CheckStatus::Ok {
                result.full_cycle_ms = exit
                    .as_ref()
                    .map(|(at, _)| at.duration_since(t0).as_secs_f64() * 1e3);
            }
            record(&mut checks, "vmm-exit", status);
        }
    }
    if entry.snapshot {
        // 256 MiB of L1's RAM.
        let _ = std::fs::remove_file(&snap_file);
    }
    let echoes = console.stop();
    record(
        &mut checks,
        "host-console-echo",
        if echoes > 0 {
            CheckStatus::Ok
        } else {
            CheckStatus::Fail("no VMKIT-PING line reached the agent".into())
        },
    );
    let served = payloads.count().saturating_sub(served_before);
    record(
        &mut checks,
        "host-net-payload",
        if served > 0 {
            CheckStatus::Ok
        } else {
            CheckStatus::Fail("L2 never fetched the payload".into())
        },
    );
    record(&mut checks, "host-blk-write", verify_disk(&disk));
    if profiling(l2_cmdline) {
        print_dmesg(&disk);
    }
    result.checks = checks;
    for failure in result.failures() {
        println!("lab-agent: {entry} run {run}: FAIL {failure}");
    }
    result
}

fn agent() -> Result<(), LabError> {
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(io_err("reading /proc/cmdline"))?;
    let plan = Plan::from_cmdline(&cmdline).map_err(LabError::Usage)?;
    create_tap(protocol::TAP_NAME, protocol::HOST_IP)?;
    println!("lab-agent: tap {} up; plan {plan:?}", protocol::TAP_NAME);
    let payloads = payload_server()?;
    let timeout = Duration::from_secs(u64::from(plan.timeout_secs));
    let l2_cmdline = plan.l2_cmdline();
    // Run-major order: the configurations take turns, so a change in the
    // host's load (L1 is emulated, the host is shared) hits them alike.
    let mut broken = vec![false; plan.entries.len()];
    for run in 1..=plan.runs {
        for (entry, broken) in plan.entries.iter().zip(broken.iter_mut()) {
            if *broken || run > plan.runs_for(entry) {
                continue;
            }
            let result = run_once(entry, &l2_cmdline, run, timeout, &payloads);
            println!("{}", result.to_line());
            if !result.failures().is_empty() && run < plan.runs {
                // Keep CI bounded: a broken configuration would likely time
                // out again. L0 reports the skipped runs as missing.
                println!(
                    "lab-agent: {entry}: skipping runs {}..={} after a failure",
                    run + 1,
                    plan.runs
                );
                *broken = true;
            }
        }
    }
    payloads.stop();
    Ok(())
}

/// Runs the agent; prints [`protocol::DONE_LINE`] even when setup failed so
/// L0 stops waiting (it then finds the results missing).
pub fn main() -> Result<(), LabError> {
    let result = agent();
    if let Err(e) = &result {
        println!("lab-agent: error: {e}");
    }
    println!("{}", protocol::DONE_LINE);
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn early_clock_lag_from_the_sched_clock_line() {
        let line = "[    1.854123] sched_clock: Marking stable \
                    (1268646181, 31008748)->(1854123810, -554468881)";
        assert_eq!(early_clock_lag_ms(line), Some(585));
        assert_eq!(
            early_clock_lag_ms("[    0.1] sched_clock: Marking stable"),
            None
        );
        assert_eq!(
            early_clock_lag_ms("clocksource: Switched to clocksource kvm-clock"),
            None
        );
    }

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn vmm_commands_follow_the_transport() {
        let disk = Path::new("/tmp/lab/disk.img");
        let sock = Path::new("/tmp/lab/v.sock");
        let pci = PlanEntry {
            vmm: Vmm::Qemu,
            transport: Transport::Pci,
            cpus: 2,
            snapshot: false,
        };
        let a = args(&vmm_command(&pci, protocol::L2_CMDLINE, disk, sock, None)).join(" ");
        assert!(a.contains("microvm,rtc=on,acpi=on,pcie=on"), "{a}");
        assert!(
            a.contains("virtio-blk-pci,drive=disk0") && !a.contains("-device virtio-blk-device"),
            "{a}"
        );
        assert!(
            a.contains("-smp 2") && a.contains("host,-xsave") && a.contains("-no-reboot"),
            "{a}"
        );
        let mmio = PlanEntry {
            transport: Transport::Mmio,
            ..pci
        };
        let a = args(&vmm_command(&mmio, protocol::L2_CMDLINE, disk, sock, None)).join(" ");
        assert!(
            a.contains("virtio-net-device,netdev=net0") && !a.contains("pcie=on"),
            "{a}"
        );
        let mini = PlanEntry {
            vmm: Vmm::Minivmm,
            ..mmio
        };
        let c = vmm_command(&mini, protocol::L2_CMDLINE, disk, sock, None);
        assert_eq!(c.get_program(), MINIVMM);
        let a = args(&c);
        let expect = [
            "--kernel",
            L2_KERNEL,
            "--initrd",
            L2_INITRD,
            "--cmdline",
            protocol::L2_CMDLINE,
            "--memory",
            "256M",
            "--cpus",
            "2",
            "--disk",
            "/tmp/lab/disk.img",
            "--net",
            "tap=vmkit0,mac=52:54:00:12:34:56",
            "--rng",
            "--console",
            "serial",
            "--vconsole",
            "socket=/tmp/lab/v.sock",
            "--transport",
            "mmio",
            "--boot-timer",
        ];
        assert_eq!(a, expect);

        // A snapshot run: the same machine, plus where to save; the
        // restore gives the same machine and no kernel.
        let snap = Path::new("/tmp/lab/l2.snap");
        let a = args(&vmm_command(
            &mini,
            protocol::L2_CMDLINE,
            disk,
            sock,
            Some(snap),
        ));
        assert_eq!(a[..expect.len()], expect);
        assert_eq!(a[expect.len()..], ["--snapshot", "/tmp/lab/l2.snap"]);
        let c = restore_command(&mini, disk, sock, snap);
        assert_eq!(c.get_program(), MINIVMM);
        let r = args(&c);
        assert_eq!(r[..2], ["--restore", "/tmp/lab/l2.snap"]);
        // Everything after --kernel/--initrd/--cmdline and their values.
        assert_eq!(r[2..], expect[6..]);
    }

    #[test]
    fn restored_echo_lines_are_judged_against_the_typed_token() {
        assert_eq!(
            echo_detail("VMKIT-CHECK restored-echo ok restored-1-000000042"),
            Some("restored-1-000000042")
        );
        assert_eq!(echo_detail("VMKIT-CHECK restored-echo ok "), None);
        assert_eq!(echo_detail("VMKIT-CHECK restored-echo fail x"), None);
        let entry: PlanEntry = "minivmm:mmio:1:snap".parse().unwrap();
        let mut result = RunResult {
            entry,
            run: 1,
            boot_to_init_ms: None,
            full_cycle_ms: None,
            blk_dd_mib_s: None,
            rss_extra_kib: None,
            snapshot_ms: None,
            restore_ms: None,
            snapshot_mib: None,
            checks: BTreeMap::new(),
        };
        let now = Instant::now();
        let line = "VMKIT-CHECK restored-echo ok tok";
        assert!(matches!(
            SnapshotPhase::Booting.echo(now, line, &mut result),
            CheckStatus::Fail(_)
        ));
        let phase = SnapshotPhase::Restored {
            at: now,
            token: "tok".into(),
            _stdin: None,
        };
        let later = now + Duration::from_millis(1500);
        assert_eq!(phase.echo(later, line, &mut result), CheckStatus::Ok);
        assert_eq!(result.restore_ms, Some(1500.0));
        assert!(matches!(
            phase.echo(later, "VMKIT-CHECK restored-echo ok other", &mut result),
            CheckStatus::Fail(_)
        ));
    }

    #[test]
    fn a_snapshot_needs_exit_status_zero_and_a_file() {
        use std::os::unix::process::ExitStatusExt;
        let path = std::env::temp_dir().join(format!("xtask-agent-snap-{}", std::process::id()));
        let ok = || Ok(ExitStatus::from_raw(0));
        assert!(matches!(
            snapshot_outcome(&ok(), &path),
            CheckStatus::Fail(_)
        ));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            snapshot_outcome(&ok(), &path),
            CheckStatus::Fail(_)
        ));
        std::fs::write(&path, b"VMKITSNP").unwrap();
        assert_eq!(snapshot_outcome(&ok(), &path), CheckStatus::Ok);
        let failed = Ok(ExitStatus::from_raw(1 << 8));
        assert!(matches!(
            snapshot_outcome(&failed, &path),
            CheckStatus::Fail(_)
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn disk_pattern_round_trip() {
        let path = std::env::temp_dir().join(format!("xtask-agent-disk-{}", std::process::id()));
        prepare_disk(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), patterns::DISK_SIZE);
        assert!(matches!(verify_disk(&path), CheckStatus::Fail(_)));
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(patterns::BLK_WRITE_OFFSET)).unwrap();
        f.write_all(&patterns::blk_write_pattern()).unwrap();
        drop(f);
        assert_eq!(verify_disk(&path), CheckStatus::Ok);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn console_client_waits_for_the_vmm_socket_and_echoes_ping_lines() {
        use std::os::unix::net::UnixListener;
        let path = std::env::temp_dir().join(format!("xtask-agent-vc-{}", std::process::id()));
        std::fs::write(&path, b"stale").unwrap();
        let client = console_client(&path).unwrap();
        // The VMM creates its socket only after the agent started waiting.
        std::thread::sleep(Duration::from_millis(50));
        let listener = UnixListener::bind(&path).unwrap();
        let (mut vmm, _) = listener.accept().unwrap();
        vmm.write_all(b"noise\nVMKIT-PING abc123\n").unwrap();
        vmm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = String::new();
        BufReader::new(vmm.try_clone().unwrap())
            .read_line(&mut reply)
            .unwrap();
        assert_eq!(reply, "VMKIT-PONG abc123\n");
        assert_eq!(client.stop(), 1);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn smaps_split_leaves_out_guest_ram() {
        let smaps = "\
55d0a000-55d0c000 r-xp 00000000 00:15 12   /lab/minivmm
Size:                  8 kB
Rss:                   8 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              150000 kB
7ffd0000-7ffd2000 rw-p 00000000 00:00 0   [stack]
Size:                  8 kB
Rss:                   4 kB
";
        assert_eq!(rss_beyond_guest_kib(smaps, 256 << 20), Some(12));
        // No mapping as large as guest RAM: no answer rather than a wrong one.
        assert_eq!(rss_beyond_guest_kib(smaps, 512 << 20), None);
        assert_eq!(l2_memory_bytes(), 256 << 20);
    }

    #[test]
    fn dd_lines_give_throughput() {
        let line = "VMKIT-CHECK blk-dd ok ms=2000 mib=256";
        assert_eq!(dd_throughput(line), Some(128.0));
        assert_eq!(dd_throughput("VMKIT-CHECK blk-dd ok ms=0 mib=256"), None);
        assert_eq!(dd_throughput("VMKIT-CHECK blk-dd ok"), None);
    }

    #[test]
    fn ifreq_names_are_bounded() {
        assert!(IfReq::new("vmkit0").is_ok());
        assert!(IfReq::new("a-name-that-is-too-long").is_err());
        let mut r = IfReq::new("x").unwrap();
        r.set_ipv4([10, 0, 2, 1]);
        assert_eq!(&r.data[4..8], &[10, 0, 2, 1]);
    }
}
