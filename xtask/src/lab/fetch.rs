//! `cargo xtask lab fetch`: the Debian packages the lab needs, downloaded
//! with `apt-get download` into the cache, verified against the package
//! index (size and SHA-256 from `apt-get download --print-uris`) and
//! extracted with `dpkg-deb -x`. Files that verify are reused.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::{build, io_err, modules::ModuleTree, LabError, Paths};

/// The kernel tried first (small, fast to boot, has the modules the lab needs).
pub const KERNEL_CLOUD: &str = "linux-image-cloud-amd64";
/// The fallback kernel when the cloud one lacks a needed module.
pub const KERNEL_GENERIC: &str = "linux-image-amd64";

/// One downloaded and extracted package.
#[derive(Debug, Clone)]
pub struct Package {
    /// The package name.
    pub name: String,
    /// Where it was extracted.
    pub root: PathBuf,
}

/// Everything `fetch` provides.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The kernel package (`linux-image-<version>-cloud-amd64` or generic).
    pub kernel: Package,
    /// The kernel version (`6.1.0-48-cloud-amd64`).
    pub kernel_version: String,
    /// `busybox-static`.
    pub busybox: Package,
    /// `qemu-system-x86` (for the baseline VMM inside L1).
    pub qemu: Package,
}

/// What the package index says about a package's `.deb`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DebInfo {
    filename: String,
    size: u64,
    sha256: String,
}

/// Runs a command and returns its standard output, or a [`LabError::Command`].
pub fn output(cmd: &mut Command) -> Result<String, LabError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| LabError::Command {
        cmd: shown.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(LabError::Command {
            cmd: shown,
            detail: format!(
                "{}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `apt-get` or `sudo apt-get`, depending on who we are.
fn apt_get() -> Command {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    }
}

/// Runs `apt-get update` when the package lists do not know busybox-static.
fn ensure_lists() -> Result<(), LabError> {
    let policy = output(Command::new("apt-cache").args(["policy", "busybox-static"]))?;
    if policy.contains("Candidate:") && !policy.contains("Candidate: (none)") {
        return Ok(());
    }
    println!("lab fetch: package lists lack busybox-static; running apt-get update");
    output(apt_get().args(["update", "-qq"]))?;
    Ok(())
}

/// Parses `apt-get download --print-uris` output: `'URI' FILE SIZE SHA256:HEX`.
fn parse_print_uris(package: &str, text: &str) -> Result<DebInfo, LabError> {
    let bad = |reason: String| LabError::Package {
        package: package.to_string(),
        reason,
    };
    let line = text
        .lines()
        .find(|l| l.starts_with('\''))
        .ok_or_else(|| bad(format!("apt-get --print-uris gave no URI: {text:?}")))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let [_, filename, size, hash] = words.as_slice() else {
        return Err(bad(format!("unexpected --print-uris line {line:?}")));
    };
    let size = size
        .parse()
        .map_err(|_| bad(format!("bad size in {line:?}")))?;
    let sha256 = hash
        .strip_prefix("SHA256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| bad(format!("no SHA256 in {line:?}")))?;
    if filename.contains('/') || !filename.ends_with(".deb") {
        return Err(bad(format!("odd file name in {line:?}")));
    }
    Ok(DebInfo {
        filename: filename.to_string(),
        size,
        sha256: sha256.to_ascii_lowercase(),
    })
}

/// The index entry of `package`'s candidate version.
fn deb_info(package: &str, scratch: &Path) -> Result<DebInfo, LabError> {
    // apt-get prints nothing for files already in its working directory, so
    // ask from an empty one.
    std::fs::create_dir_all(scratch).map_err(io_err(format!("creating {}", scratch.display())))?;
    let text = output(
        Command::new("apt-get")
            .args(["download", "--print-uris", package])
            .current_dir(scratch),
    )?;
    parse_print_uris(package, &text)
}

/// SHA-256 of a file, in lower-case hex.
fn file_sha256(path: &Path) -> Result<String, LabError> {
    let mut file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Whether `path` is the `.deb` the index describes.
fn verified(path: &Path, info: &DebInfo) -> Result<bool, LabError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == info.size => Ok(file_sha256(path)? == info.sha256),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(format!("stat {}", path.display()))(e)),
    }
}

/// Downloads (unless cached and verified) and extracts one package.
fn package(paths: &Paths, name: &str) -> Result<Package, LabError> {
    let debs = paths.debs();
    std::fs::create_dir_all(&debs).map_err(io_err(format!("creating {}", debs.display())))?;
    let info = deb_info(name, &paths.cache.join("print-uris"))?;
    let deb = debs.join(&info.filename);
    let started = Instant::now();
    let how = if verified(&deb, &info)? {
        "cached"
    } else {
        if deb.exists() {
            std::fs::remove_file(&deb).map_err(io_err(format!("removing {}", deb.display())))?;
        }
        output(apt_get().args(["download", "-q", name]).current_dir(&debs))?;
        if !verified(&deb, &info)? {
            return Err(LabError::Package {
                package: name.to_string(),
                reason: format!(
                    "{} does not match the index (size {}, sha256 {})",
                    deb.display(),
                    info.size,
                    info.sha256
                ),
            });
        }
        "downloaded"
    };
    let stem = info.filename.trim_end_matches(".deb");
    let root = paths.roots().join(stem);
    let marker = paths.roots().join(format!("{stem}.extracted"));
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(info.sha256.as_str()) {
        if root.exists() {
            std::fs::remove_dir_all(&root)
                .map_err(io_err(format!("removing {}", root.display())))?;
        }
        std::fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
        output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        std::fs::write(&marker, &info.sha256)
            .map_err(io_err(format!("writing {}", marker.display())))?;
    }
    println!(
        "lab fetch: {name}: {} ({:.1} MB) {how} in {:.2} s",
        info.filename,
        info.size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(Package {
        name: name.to_string(),
        root,
    })
}

/// The versioned image package a kernel metapackage depends on.
fn kernel_package(meta: &str) -> Result<String, LabError> {
    let text = output(Command::new("apt-cache").args(["depends", meta]))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| d.trim_matches(|c| c == '<' || c == '>').to_string())
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| LabError::Package {
            package: meta.to_string(),
            reason: "no linux-image-* dependency".into(),
        })
}

/// The single `lib/modules/<version>` directory of an extracted kernel.
pub fn kernel_version(root: &Path) -> Result<String, LabError> {
    let dir = root.join("lib/modules");
    let mut versions = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        versions.push(entry.file_name().to_string_lossy().into_owned());
    }
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(LabError::Module(format!(
            "{} holds {versions:?}, want one version",
            dir.display()
        ))),
    }
}

/// Fetches the kernel (cloud, or generic if the cloud one lacks a module),
/// busybox-static and qemu-system-x86.
pub fn fetch(paths: &Paths) -> Result<Fetched, LabError> {
    let started = Instant::now();
    ensure_lists()?;
    let mut chosen = None;
    for meta in [KERNEL_CLOUD, KERNEL_GENERIC] {
        let kernel = package(paths, &kernel_package(meta)?)?;
        let version = kernel_version(&kernel.root)?;
        let tree = ModuleTree::open(&kernel.root.join("lib/modules").join(&version))?;
        let missing: Vec<String> = [build::L2_MODULES, build::L1_MODULES]
            .concat()
            .iter()
            .filter_map(|m| tree.resolve(&[m]).err().map(|e| e.to_string()))
            .collect();
        if missing.is_empty() {
            chosen = Some((kernel, version));
            break;
        }
        println!(
            "lab fetch: {} lacks modules ({}); trying the next kernel",
            kernel.name,
            missing.join("; ")
        );
    }
    let (kernel, kernel_version) = chosen
        .ok_or_else(|| LabError::Module("no Debian kernel has the modules the lab needs".into()))?;
    let busybox = package(paths, "busybox-static")?;
    let qemu = package(paths, "qemu-system-x86")?;
    println!(
        "lab fetch: done in {:.1} s (cache {})",
        started.elapsed().as_secs_f64(),
        paths.cache.display()
    );
    Ok(Fetched {
        kernel,
        kernel_version,
        busybox,
        qemu,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn print_uris_lines_parse_and_bad_ones_fail() {
        let text = "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb' busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb 928188 SHA256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\n";
        let info = parse_print_uris("busybox-static", text).unwrap();
        assert_eq!(
            info.filename,
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
        assert_eq!(info.size, 928_188);
        assert_eq!(
            info.sha256,
            "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
        );
        assert!(parse_print_uris("x", "").is_err());
        assert!(parse_print_uris("x", "'u' f.deb 12 MD5Sum:abc").is_err());
        assert!(parse_print_uris("x", "'u' ../f.deb 12 SHA256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789").is_err());
    }

    #[test]
    fn file_hash_and_verification() {
        let path = std::env::temp_dir().join(format!("xtask-fetch-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        let good = DebInfo {
            filename: "f.deb".into(),
            size: 3,
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
        };
        assert!(verified(&path, &good).unwrap());
        assert!(!verified(
            &path,
            &DebInfo {
                size: 4,
                ..good.clone()
            }
        )
        .unwrap());
        let wrong = DebInfo {
            sha256: "00".repeat(32),
            ..good.clone()
        };
        assert!(!verified(&path, &wrong).unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(!verified(&path, &good).unwrap());
    }
}
