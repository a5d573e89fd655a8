//! Kernel modules of an extracted kernel package, with their dependency closure read from each
//! module's `depends=` string (the package ships no `modules.dep`: `depmod` makes it at install).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmd::{CmdError, TimedCommand};
use crate::elf::{self, ElfError};
use crate::io_error::{IoError, io};

/// Errors of [`ModuleIndex`].
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("module {name} is neither in {dir} nor built into the kernel")]
    Unknown { name: String, dir: PathBuf },
    #[error("module {path}")]
    Elf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("decompressing module {path}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: CmdError,
    },
    #[error("module dependencies form a cycle through {0}")]
    Cycle(String),
}

/// A module ready to be put into an initramfs.
#[derive(Debug)]
pub struct Module {
    /// The module name with `-` as `_`, e.g. `kvm_amd`.
    pub name: String,
    /// The uncompressed `.ko` contents.
    pub bytes: Vec<u8>,
}

/// The modules of one kernel, by name.
#[derive(Debug)]
pub struct ModuleIndex {
    dir: PathBuf,
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// `kvm-amd` and `kvm_amd` name the same module.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file name such as `kvm-amd.ko.xz`.
fn module_name(file_name: &str) -> Option<String> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
        .map(normalize)
}

impl ModuleIndex {
    /// Indexes `lib/modules/<release>` (its `kernel/` tree and `modules.builtin`).
    pub fn open(dir: &Path) -> Result<Self, ModuleError> {
        let mut files = BTreeMap::new();
        let mut pending = vec![dir.join("kernel")];
        while let Some(current) = pending.pop() {
            let entries = std::fs::read_dir(&current).map_err(io("reading", &current))?;
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                    files.insert(name, path);
                }
            }
        }
        let builtin_list = dir.join("modules.builtin");
        let builtin = std::fs::read_to_string(&builtin_list)
            .map_err(io("reading", &builtin_list))?
            .lines()
            .filter_map(|line| line.rsplit('/').next().and_then(module_name))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            builtin,
        })
    }

    /// The named modules and everything they depend on, dependencies first (the order to
    /// `insmod` them in). Modules built into the kernel are left out.
    pub fn closure(&self, names: &[&str]) -> Result<Vec<Module>, ModuleError> {
        let mut done = BTreeSet::new();
        let mut order = Vec::new();
        for name in names {
            self.visit(&normalize(name), &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), ModuleError> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|n| n == name) {
            return Err(ModuleError::Cycle(name.to_owned()));
        }
        let Some(file) = self.files.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                return Ok(());
            }
            return Err(ModuleError::Unknown {
                name: name.to_owned(),
                dir: self.dir.clone(),
            });
        };
        let bytes = read_module(file)?;
        let depends = elf::module_depends(&bytes).map_err(|source| ModuleError::Elf {
            path: file.clone(),
            source,
        })?;
        path.push(name.to_owned());
        for dep in depends {
            self.visit(&normalize(&dep), done, path, order)?;
        }
        path.pop();
        done.insert(name.to_owned());
        order.push(Module {
            name: name.to_owned(),
            bytes,
        });
        Ok(())
    }
}

/// Reads a module, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` with the matching tool (busybox
/// `insmod` takes only plain `.ko` files).
fn read_module(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => {
            return Ok(std::fs::read(path).map_err(io("reading", path))?);
        }
    };
    TimedCommand::new(tool, Duration::from_secs(60))
        .arg("-dc")
        .arg(path)
        .output_ok()
        .map(|out| out.stdout)
        .map_err(|source| ModuleError::Decompress {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_modules_like_the_kernel() {
        assert_eq!(module_name("kvm-amd.ko").as_deref(), Some("kvm_amd"));
        assert_eq!(
            module_name("9pnet_virtio.ko.xz").as_deref(),
            Some("9pnet_virtio")
        );
        assert_eq!(module_name("modules.order"), None);
    }
}
