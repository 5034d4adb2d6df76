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
    // PCI 00:01.0's vendor and device IDs through ports 0xCF8/0xCFC:
    // virtio-blk (modern) is 1AF4:1042; without a root complex the read
    // floats to all ones.
    let mut no_pci = a.create_label();
    a.mov(dx, 0xcf8u32).unwrap();
    a.mov(eax, 0x8000_0800u32).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(dx, 0xcfcu32).unwrap();
    a.in_(eax, dx).unwrap();
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
