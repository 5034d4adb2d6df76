//! Kernel modules: which files to put into an initramfs, in load order.
//!
//! Debian's kernel packages ship no `modules.dep` (`depmod` writes it at
//! install time), so dependencies come from where depmod reads them: the
//! `depends=` entry of each module's `.modinfo` section. Modules listed in
//! `modules.builtin` are part of the kernel and need no file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{bzimage, io_err, LabError};

/// A module to load: its name and its `.ko` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The module name (`-` normalised to `_`).
    pub name: String,
    /// The `.ko` file.
    pub path: PathBuf,
}

/// The modules of one kernel (`lib/modules/<version>`).
#[derive(Debug)]
pub struct ModuleTree {
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// Module names use `_` and `-` interchangeably.
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path such as `kernel/drivers/char/hw_random/virtio-rng.ko`.
fn name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    file.strip_suffix(".ko").map(normalise)
}

/// The `depends=` list of a module file.
fn depends(ko: &[u8]) -> Result<Vec<String>, bzimage::KernelImageError> {
    let Some(info) = bzimage::section(ko, ".modinfo")? else {
        return Ok(Vec::new());
    };
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .map(normalise)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

impl ModuleTree {
    /// Indexes the `.ko` files under `dir` (`.../lib/modules/<version>`).
    pub fn open(dir: &Path) -> Result<Self, LabError> {
        let mut files = BTreeMap::new();
        let mut stack = vec![(dir.join("kernel"), 0u32)];
        while let Some((d, depth)) = stack.pop() {
            if depth > 16 {
                continue;
            }
            for entry in
                std::fs::read_dir(&d).map_err(io_err(format!("reading {}", d.display())))?
            {
                let entry = entry.map_err(io_err(format!("reading {}", d.display())))?;
                let path = entry.path();
                let kind = entry
                    .file_type()
                    .map_err(io_err(format!("stat {}", path.display())))?;
                if kind.is_dir() {
                    stack.push((path, depth + 1));
                } else if let Some(name) = path.to_str().and_then(name_of) {
                    files.insert(name, path);
                }
            }
        }
        let builtin_path = dir.join("modules.builtin");
        let builtin = std::fs::read_to_string(&builtin_path)
            .map_err(io_err(format!("reading {}", builtin_path.display())))?
            .lines()
            .filter_map(name_of)
            .collect();
        Ok(ModuleTree { files, builtin })
    }

    /// `wanted` and everything they depend on, dependencies first, skipping
    /// built-in modules. A module that is neither a file nor built in is an
    /// error.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<Module>, LabError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            self.visit(&normalise(name), &mut Vec::new(), &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), LabError> {
        if done.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            return Err(LabError::Module(format!(
                "dependency cycle: {} -> {name}",
                path.join(" -> ")
            )));
        }
        let file = self.files.get(name).ok_or_else(|| {
            let via = if path.is_empty() {
                String::new()
            } else {
                format!(" (needed by {})", path.join(" -> "))
            };
            LabError::Module(format!("{name} is neither a module file nor built in{via}"))
        })?;
        let ko = std::fs::read(file).map_err(io_err(format!("reading {}", file.display())))?;
        let deps =
            depends(&ko).map_err(|e| LabError::Module(format!("{}: {e}", file.display())))?;
        path.push(name.to_string());
        for dep in deps {
            self.visit(&dep, path, done, order)?;
        }
        path.pop();
        done.insert(name.to_string());
        order.push(Module {
            name: name.to_string(),
            path: file.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::lab::bzimage::tests::tiny_elf;

    fn fake_tree(modules: &[(&str, &str)], builtin: &[&str]) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("xtask-modules-{}-{nanos}", std::process::id()));
        for (path, deps) in modules {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            let stem = name_of(path).unwrap();
            let info = format!("license=GPL\0depends={deps}\0name={stem}\0");
            std::fs::write(file, tiny_elf(b"", info.as_bytes(), false)).unwrap();
        }
        std::fs::write(dir.join("modules.builtin"), builtin.join("\n")).unwrap();
        dir
    }

    #[test]
    fn resolves_dependencies_first_and_skips_builtins() {
        let dir = fake_tree(
            &[
                ("kernel/drivers/virtio/virtio.ko", ""),
                ("kernel/drivers/virtio/virtio_ring.ko", ""),
                (
                    "kernel/drivers/net/virtio_net.ko",
                    "virtio_ring,virtio,net_failover",
                ),
                ("kernel/drivers/net/net_failover.ko", "failover"),
                ("kernel/net/core/failover.ko", ""),
                (
                    "kernel/drivers/char/hw_random/virtio-rng.ko",
                    "virtio,virtio_ring,rng-core",
                ),
            ],
            &["kernel/drivers/char/hw_random/rng-core.ko"],
        );
        let tree = ModuleTree::open(&dir).unwrap();
        let names: Vec<String> = tree
            .resolve(&["virtio_net", "virtio-rng", "virtio"])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng"
            ]
        );
        assert!(tree.resolve(&["rng-core"]).unwrap().is_empty());
        let err = tree.resolve(&["tun"]).unwrap_err().to_string();
        assert!(err.contains("tun"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cycles_and_missing_dependencies_are_errors() {
        let dir = fake_tree(
            &[
                ("kernel/a.ko", "b"),
                ("kernel/b.ko", "a"),
                ("kernel/c.ko", "missing"),
            ],
            &[],
        );
        let tree = ModuleTree::open(&dir).unwrap();
        assert!(tree
            .resolve(&["a"])
            .unwrap_err()
            .to_string()
            .contains("cycle"));
        let err = tree.resolve(&["c"]).unwrap_err().to_string();
        assert!(
            err.contains("missing") && err.contains("needed by c"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
