//! minivmm end to end on this machine's KVM, with a tiny PVH "kernel"
//! assembled here (a real Linux kernel needs the nested lab): the image is
//! an ELF64 with a Xen PVH note, entered in 32-bit protected mode; it checks
//! the start info minivmm wrote (magic, command line, initrd module, RSDP
//! signature, memory map), reports over COM1 and reboots through the i8042,
//! after which minivmm must exit with status 0. Plus the user errors that
//! must give one clear line.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use iced_x86::code_asm::*;

/// The example binary cargo built next to this test.
fn minivmm() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/minivmm-<hash> → target/<profile>/examples/minivmm
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("examples").join("minivmm");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds examples; run the test through cargo",
        bin.display()
    );
    bin
}

fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("VMKIT_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("VMKIT_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("SKIPPED minivmm KVM test: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

const LOAD: u32 = 0x10_0000;
const COM1: u32 = 0x3f8;
const STRINGS: u32 = LOAD + 0x800;

/// Writes the byte in AL to COM1 once the transmitter is empty.
fn putc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    a.mov(ah, al)?;
    a.set_label(&mut wait)?;
    a.mov(dx, COM1 + 5)?;
    a.in_(al, dx)?;
    a.test(al, 0x20u32)?;
    a.jz(wait)?;
    a.mov(dx, COM1)?;
    a.mov(al, ah)?;
    a.out(dx, al)?;
    Ok(())
}

/// Prints the NUL-terminated string at ESI (at most 255 bytes).
fn puts(a: &mut CodeAssembler, putc_label: CodeLabel) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.mov(ecx, 255u32)?;
    a.set_label(&mut next)?;
    a.mov(al, byte_ptr(esi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.call(putc_label)?;
    a.inc(esi)?;
    a.dec(ecx)?;
    a.jnz(next)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// The guest: EBX = hvm_start_info.
fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut putc_fn = a.create_label();
    let mut bad = a.create_label();
    let mut reset = a.create_label();
    // 32-bit code cannot take a label's address RIP-relatively: the strings
    // live at fixed addresses after the code.
    let (s_magic, s_rsdp, s_e820, s_nl) = (STRINGS, STRINGS + 16, STRINGS + 32, STRINGS + 48);
    let (s_pci, s_no_pci) = (STRINGS + 64, STRINGS + 80);

    // PVH gives no stack.
    a.mov(esp, 0x9_0000u32).unwrap();
    // magic
    a.cmp(dword_ptr(ebx), 0x336e_c578u32).unwrap();
    a.jne(bad).unwrap();
    a.mov(esi, s_magic).unwrap();
    puts(&mut a, putc_fn).unwrap();
    // the command line
    a.mov(esi, dword_ptr(ebx + 24)).unwrap();
    puts(&mut a, putc_fn).unwrap();
    a.mov(esi, s_nl).unwrap();
    puts(&mut a, putc_fn).unwrap();
    // one module: print the start of the initrd
    a.cmp(dword_ptr(ebx + 12), 1u32).unwrap();
    a.jne(bad).unwrap();
    a.mov(eax, dword_ptr(ebx + 16)).unwrap();
    a.mov(esi, dword_ptr(eax)).unwrap();
    puts(&mut a, putc_fn).unwrap();
    a.mov(esi, s_nl).unwrap();
    puts(&mut a, putc_fn).unwrap();
    // the RSDP signature "RSD PTR "
    a.mov(eax, dword_ptr(ebx + 32)).unwrap();
    a.cmp(dword_ptr(eax), u32::from_le_bytes(*b"RSD ")).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(eax + 4), u32::from_le_bytes(*b"PTR "))
        .unwrap();
    a.jne(bad).unwrap();
    a.mov(esi, s_rsdp).unwrap();
    puts(&mut a, putc_fn).unwrap();
    // the memory map: at least 3 entries, the first one RAM at 0
    a.cmp(dword_ptr(ebx + 48), 3u32).unwrap();
    a.jb(bad).unwrap();
    a.mov(eax, dword_ptr(ebx + 40)).unwrap();
    a.cmp(dword_ptr(eax), 0u32).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(eax + 16), 1u32).unwrap();
    a.jne(bad).unwrap();
    a.mov(esi, s_e820).unwrap();
    puts(&mut a, putc_fn).unwrap();
    // PCI 00:01.0's vendor and device IDs through ECAM (bus 0 at
    // 0xE000_0000, device 1 at +1 << 15): virtio-blk (modern) is
    // 1AF4:1042; without a root complex the read floats to all ones.
    let mut no_pci = a.create_label();
    a.mov(eax, dword_ptr(0xE000_8000u32)).unwrap();
    a.cmp(eax, 0x1042_1af4u32).unwrap();
    a.jne(no_pci).unwrap();
    a.mov(esi, s_pci).unwrap();
    puts(&mut a, putc_fn).unwrap();
    a.jmp(reset).unwrap();
    a.set_label(&mut no_pci).unwrap();
    a.mov(esi, s_no_pci).unwrap();
    puts(&mut a, putc_fn).unwrap();
    a.jmp(reset).unwrap();

    a.set_label(&mut bad).unwrap();
    a.mov(al, b'!' as u32).unwrap();
    a.call(putc_fn).unwrap();
    a.set_label(&mut reset).unwrap();
    // Pulse the reset line through the i8042.
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64u32, al).unwrap();
    a.hlt().unwrap();

    a.set_label(&mut putc_fn).unwrap();
    putc(&mut a).unwrap();
    a.ret().unwrap();

    let mut image = a.assemble(u64::from(LOAD)).unwrap();
    assert!(image.len() <= (STRINGS - LOAD) as usize);
    image.resize((STRINGS - LOAD) as usize, 0);
    for text in [
        &b"PVH-MAGIC-OK\n"[..],
        b"RSDP-OK\n",
        b"E820-OK\n",
        b"\n",
        b"PCI-BLK-OK\n",
        b"NO-PCI\n",
    ] {
        let mut slot = [0u8; 16];
        slot[..text.len()].copy_from_slice(text);
        image.extend_from_slice(&slot);
    }
    image
}

/// An ELF64 executable with one loadable segment at LOAD and a PT_NOTE
/// holding XEN_ELFNOTE_PHYS32_ENTRY = LOAD.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&LOAD.to_le_bytes());
    let code_off = 0x1000usize;

    let mut f = vec![0u8; code_off];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    let put16 =
        |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 62); // EM_X86_64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, u64::from(LOAD)); // e_entry
    put64(&mut f, 32, EHDR as u64); // e_phoff
    put16(&mut f, 52, EHDR as u16);
    put16(&mut f, 54, PHDR as u16);
    put16(&mut f, 56, 2);
    // PT_LOAD
    let p = EHDR;
    put32(&mut f, p, 1);
    put32(&mut f, p + 4, 5); // R+X
    put64(&mut f, p + 8, code_off as u64);
    put64(&mut f, p + 16, u64::from(LOAD));
    put64(&mut f, p + 24, u64::from(LOAD));
    put64(&mut f, p + 32, code.len() as u64);
    put64(&mut f, p + 40, code.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    // PT_NOTE
    let p = EHDR + PHDR;
    put32(&mut f, p, 4);
    put32(&mut f, p + 4, 4);
    put64(&mut f, p + 8, note_off as u64);
    put64(&mut f, p + 32, note.len() as u64);
    put64(&mut f, p + 40, note.len() as u64);
    put64(&mut f, p + 48, 4);
    f[note_off..note_off + note.len()].copy_from_slice(&note);
    f.extend_from_slice(code);
    f
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("minivmm-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(minivmm())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn boot(transport: &str, pci_line: &str) {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new(transport);
    let kernel = s.file("kernel.elf", &pvh_elf(&guest()));
    let initrd = s.file("initrd", b"INITRD-CONTENTS-OK\0");
    let disk = s.file("disk.img", &vec![0u8; 1 << 20]);
    let out = run(&[
        "--kernel",
        p(&kernel),
        "--initrd",
        p(&initrd),
        "--cmdline",
        "console=ttyS0 hello-from-the-command-line",
        "--memory",
        "64M",
        "--cpus",
        "2",
        "--disk",
        p(&disk),
        "--rng",
        "--transport",
        transport,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for expected in [
        "PVH-MAGIC-OK",
        "console=ttyS0 hello-from-the-command-line",
        "INITRD-CONTENTS-OK",
        "RSDP-OK",
        "E820-OK",
        pci_line,
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains('!'),
        "the guest found a bad field:\n{stdout}"
    );
    assert!(stderr.contains("rebooted"), "{stderr}");
    assert!(stderr.contains("2 virtio device(s)"), "{stderr}");
}

#[test]
fn boots_a_pvh_image_over_mmio_and_exits_on_guest_reboot() {
    boot("mmio", "NO-PCI");
}

#[test]
fn boots_a_pvh_image_with_pci_and_finds_the_disk_in_config_space() {
    boot("pci", "PCI-BLK-OK");
}

/// One line on stderr, starting with "minivmm: ", exit status 1.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("minivmm: "), "{stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr}");
}

#[test]
fn user_errors_give_one_clear_line() {
    let s = Scratch::new("errors");
    let kernel = s.file("kernel.elf", &pvh_elf(&guest()));
    let not_kernel = s.file("notes.txt", b"just some text, not a kernel at all");
    let missing = s.0.join("no-such-file");

    let out = run(&["--kernel", p(&missing)]);
    assert_one_line_error(&out, "kernel: cannot open");

    let out = run(&["--kernel", p(&not_kernel)]);
    assert_one_line_error(&out, "is not a Linux kernel");

    let out = run(&["--kernel", p(&kernel), "--memory", "8M"]);
    assert_one_line_error(&out, "too little");

    let out = run(&["--kernel", p(&kernel), "--disk", p(&missing)]);
    assert_one_line_error(&out, "disk:");

    let out = run(&["--kernel", p(&kernel), "--initrd", p(&missing)]);
    assert_one_line_error(&out, "initrd: cannot open");
}

// Snapshot and restore across processes.

/// Lines the counting guest prints before it waits for input.
const COUNT_TO: u32 = 0x200;
/// Port reads between two lines (each an exit): slows the guest so that a
/// snapshot lands mid-count.
const DELAY_READS: u32 = 300;
/// The line after which the test asks for a snapshot.
const SNAPSHOT_AFTER: u32 = 0x28;

/// A guest that prints 0000, 0001, ... (hex, one per line) up to
/// `COUNT_TO - 1` with the count in EDI, then "READY", then waits for one
/// byte on COM1, prints "IN=<byte>" and reboots. A snapshot taken while it
/// counts and restored in another process must continue the sequence with
/// nothing lost or repeated, and the restored UART must take input again.
fn counting_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut putc_fn = a.create_label();
    let mut again = a.create_label();
    let mut nibble = a.create_label();
    let mut digit = a.create_label();
    let mut delay = a.create_label();
    let mut wait_input = a.create_label();
    let s_ready = STRINGS;

    a.mov(esp, 0x9_0000u32).unwrap();
    a.xor(edi, edi).unwrap();
    a.set_label(&mut again).unwrap();
    // Four hex digits of DI, most significant first.
    a.mov(ebx, edi).unwrap();
    a.shl(ebx, 16).unwrap();
    a.mov(esi, 4u32).unwrap();
    a.set_label(&mut nibble).unwrap();
    a.rol(ebx, 4).unwrap();
    a.mov(eax, ebx).unwrap();
    a.and(eax, 0xfu32).unwrap();
    a.add(al, b'0' as u32).unwrap();
    a.cmp(al, b'9' as u32).unwrap();
    a.jbe(digit).unwrap();
    a.add(al, (b'a' - b'0' - 10) as u32).unwrap();
    a.set_label(&mut digit).unwrap();
    a.call(putc_fn).unwrap();
    a.dec(esi).unwrap();
    a.jnz(nibble).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.call(putc_fn).unwrap();
    a.mov(ecx, DELAY_READS).unwrap();
    a.mov(dx, COM1 + 5).unwrap();
    a.set_label(&mut delay).unwrap();
    a.in_(al, dx).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(delay).unwrap();
    a.inc(edi).unwrap();
    a.cmp(edi, COUNT_TO).unwrap();
    a.jb(again).unwrap();

    a.mov(esi, s_ready).unwrap();
    puts(&mut a, putc_fn).unwrap();
    // Poll the line status register's data-ready bit.
    a.mov(dx, COM1 + 5).unwrap();
    a.set_label(&mut wait_input).unwrap();
    a.in_(al, dx).unwrap();
    a.test(al, 1u32).unwrap();
    a.jz(wait_input).unwrap();
    a.mov(dx, COM1).unwrap();
    a.in_(al, dx).unwrap();
    a.mov(bl, al).unwrap();
    a.mov(al, b'I' as u32).unwrap();
    a.call(putc_fn).unwrap();
    a.mov(al, b'N' as u32).unwrap();
    a.call(putc_fn).unwrap();
    a.mov(al, b'=' as u32).unwrap();
    a.call(putc_fn).unwrap();
    a.mov(al, bl).unwrap();
    a.call(putc_fn).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.call(putc_fn).unwrap();
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64u32, al).unwrap();
    a.hlt().unwrap();

    a.set_label(&mut putc_fn).unwrap();
    putc(&mut a).unwrap();
    a.ret().unwrap();

    let mut image = a.assemble(u64::from(LOAD)).unwrap();
    assert!(image.len() <= (STRINGS - LOAD) as usize);
    image.resize((STRINGS - LOAD) as usize, 0);
    image.extend_from_slice(b"READY\n\0");
    image
}

/// A running minivmm whose stdout lines arrive on a channel.
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Everything read so far, as raw bytes (a line cut by a snapshot
    /// continues in the next process's output).
    raw: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Running {
    fn spawn(args: &[&str]) -> Running {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(minivmm())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let raw = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let raw2 = raw.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        raw2.lock().unwrap().extend_from_slice(&buf);
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Running { child, lines, raw }
    }

    /// Waits (at most 60 s) for a line equal to `want`.
    fn wait_line(&mut self, want: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return,
                Ok(_) => {}
                Err(e) => {
                    let _ = self.child.kill();
                    let out = self.child.wait_with_output_now();
                    panic!("no line {want:?} ({e}); stderr:\n{out}");
                }
            }
        }
    }

    /// Waits (at most 60 s) for the exit; returns the status, all stdout
    /// bytes and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, Vec<u8>, String) {
        use std::io::Read;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "minivmm did not exit: {}",
                    self.child.wait_with_output_now()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let mut stderr = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        // The reader thread sees EOF once the process is gone.
        while self.lines.recv().is_ok() {}
        let raw = self.raw.lock().unwrap().clone();
        (status, raw, stderr)
    }
}

trait WaitNow {
    fn wait_with_output_now(&mut self) -> String;
}

impl WaitNow for std::process::Child {
    /// Reaps a killed child and returns its stderr.
    fn wait_with_output_now(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

/// The hex counts in a serial transcript, in order.
fn counts(transcript: &[u8]) -> Vec<u32> {
    String::from_utf8_lossy(transcript)
        .lines()
        .filter(|l| l.len() == 4)
        .filter_map(|l| u32::from_str_radix(l, 16).ok())
        .collect()
}

fn snapshot_and_restore(transport: &str) {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new(&format!("snap-{transport}"));
    let kernel = s.file("count.elf", &pvh_elf(&counting_guest()));
    let disk = s.file("disk.img", &vec![0u8; 1 << 20]);
    let snap = s.0.join("vm.snap");
    let machine = [
        "--memory",
        "64M",
        "--disk",
        p(&disk),
        "--rng",
        "--transport",
        transport,
    ];

    // First process: boot, count, snapshot on SIGUSR1.
    let mut first: Vec<&str> = vec!["--kernel", p(&kernel), "--snapshot", p(&snap)];
    first.extend(machine);
    let mut a = Running::spawn(&first);
    a.wait_line(&format!("{SNAPSHOT_AFTER:04x}"));
    // SAFETY: kill() only sends a signal; the pid is our unreaped child.
    let rc = unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(rc, 0);
    let (status, out_a, err_a) = a.finish();
    assert!(status.success(), "{status:?}\n{err_a}");
    eprint!("first process:\n{err_a}");
    assert!(
        err_a.contains("snapshot of") && err_a.contains("written to"),
        "{err_a}"
    );
    let size = std::fs::metadata(&snap).unwrap().len();
    assert!(size > 64 << 20, "a full snapshot holds all 64 MiB: {size}");
    let left: Vec<_> = std::fs::read_dir(&s.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    let before = counts(&out_a);
    let last = *before.last().unwrap();
    assert!(
        last >= SNAPSHOT_AFTER && last + 1 < COUNT_TO,
        "the snapshot should land mid-count, after {last:#x}"
    );

    // Second process: the same machine, no kernel; it counts on, then
    // takes a byte from stdin through the restored UART.
    let mut second: Vec<&str> = vec!["--restore", p(&snap)];
    second.extend(machine);
    let mut b = Running::spawn(&second);
    b.wait_line("READY");
    {
        use std::io::Write;
        let stdin = b.child.stdin.as_mut().unwrap();
        stdin.write_all(b"z").unwrap();
        stdin.flush().unwrap();
    }
    let (status, out_b, err_b) = b.finish();
    assert!(status.success(), "{status:?}\n{err_b}");
    eprint!("second process:\n{err_b}");
    assert!(err_b.contains("restored from"), "{err_b}");
    let after = String::from_utf8_lossy(&out_b);
    assert!(
        after.contains("IN=z"),
        "stdin did not reach the guest:\n{after}"
    );

    // Together: every count exactly once, in order.
    let mut all = out_a.clone();
    all.extend_from_slice(&out_b);
    let seen = counts(&all);
    let expected: Vec<u32> = (0..COUNT_TO).collect();
    assert_eq!(
        seen, expected,
        "counts across the restore (snapshot after {last:#x}) were lost or repeated"
    );
    // The second process printed the rest: its first whole line follows
    // the first process's last one (or the line a snapshot cut in two).
    let first_restored = counts(&out_b).first().copied();
    assert!(
        matches!(first_restored, Some(n) if n == last + 1 || n == last + 2),
        "the restored guest did not continue where the first stopped: {first_restored:?} after {last:#x}"
    );

    // The snapshot refuses another machine, and damage, in one line each.
    let out = run(&[
        "--restore",
        p(&snap),
        "--memory",
        "128M",
        "--disk",
        p(&disk),
        "--rng",
        "--transport",
        transport,
    ]);
    assert_one_line_error(&out, "is of another machine");
    let out = run(&[
        "--restore",
        p(&snap),
        "--memory",
        "64M",
        "--disk",
        p(&disk),
        "--transport",
        transport,
    ]);
    assert_one_line_error(&out, "is of another machine");
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let corrupt = s.file("corrupt.snap", &bytes);
    let mut args: Vec<&str> = vec!["--restore", p(&corrupt)];
    args.extend(machine);
    assert_one_line_error(&run(&args), "corrupt");
    bytes.truncate(mid);
    let truncated = s.file("truncated.snap", &bytes);
    let mut args: Vec<&str> = vec!["--restore", p(&truncated)];
    args.extend(machine);
    assert_one_line_error(&run(&args), "truncated");
}

#[test]
fn a_snapshot_taken_on_sigusr1_continues_in_a_new_process_over_mmio() {
    snapshot_and_restore("mmio");
}

#[test]
fn a_snapshot_taken_on_sigusr1_continues_in_a_new_process_over_pci() {
    snapshot_and_restore("pci");
}
