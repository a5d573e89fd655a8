//! The Debian kernel that serves as both L1 and L2 kernel: resolved from `linux-image-amd64`,
//! downloaded with `apt-get download` and extracted with `dpkg-deb -x`, cached by package name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmd::{CmdError, TimedCommand};
use crate::io_error::{IoError, io};

/// Errors of [`Kernel::fetch`].
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Command(#[from] CmdError),
    #[error(
        "`apt-cache depends linux-image-amd64` names no linux-image-* package \
         (were the apt lists updated with `apt-get update`?); it printed: {0:?}"
    )]
    Unresolved(String),
    #[error("`apt-get download {package}` left no {package}_*.deb in {dir}")]
    NoDeb { package: String, dir: PathBuf },
    #[error("the package {package} holds no boot/vmlinuz-*")]
    NoVmlinuz { package: String },
    #[error("the package {package} holds no lib/modules/{release}")]
    NoModules { package: String, release: String },
    #[error(transparent)]
    Io(#[from] IoError),
}

/// An extracted kernel package.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The Debian package, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` inside the extracted package.
    pub modules_dir: PathBuf,
}

const MARKER: &str = ".testbed-extracted";

impl Kernel {
    /// Resolves, downloads (once) and extracts (once) the kernel package under `cache`.
    /// `$ATOLL_TESTBED_KERNEL_PACKAGE` overrides the package name.
    pub fn fetch(cache: &Path) -> Result<Self, KernelError> {
        let package = match std::env::var("ATOLL_TESTBED_KERNEL_PACKAGE") {
            Ok(package) => package,
            Err(_) => resolve_package()?,
        };
        let root = cache.join(&package);
        if !root.join(MARKER).exists() {
            download_and_extract(&package, cache, &root)?;
        }
        Self::open(&package, &root)
    }

    fn open(package: &str, root: &Path) -> Result<Self, KernelError> {
        let boot = root.join("boot");
        let release = std::fs::read_dir(&boot)
            .map_err(io("reading", &boot))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .map(str::to_owned)
            })
            .next()
            .ok_or_else(|| KernelError::NoVmlinuz {
                package: package.to_owned(),
            })?;
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&release))
            .find(|d| d.is_dir())
            .ok_or_else(|| KernelError::NoModules {
                package: package.to_owned(),
                release: release.clone(),
            })?;
        Ok(Self {
            package: package.to_owned(),
            vmlinuz: boot.join(format!("vmlinuz-{release}")),
            release,
            modules_dir,
        })
    }
}

/// The first `linux-image-*` dependency of `linux-image-amd64` (the generic flavour).
fn resolve_package() -> Result<String, KernelError> {
    let out = TimedCommand::new("apt-cache", Duration::from_secs(60))
        .args(["depends", "linux-image-amd64"])
        .output_ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_depends(&text).ok_or(KernelError::Unresolved(text))
}

fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|dep| dep.starts_with("linux-image-") && !dep.contains('<'))
        .map(str::to_owned)
}

fn download_and_extract(package: &str, cache: &Path, root: &Path) -> Result<(), KernelError> {
    let download = cache.join(format!("{package}.download"));
    let staging = cache.join(format!("{package}.extracting-{}", std::process::id()));
    std::fs::create_dir_all(&download).map_err(io("creating", &download))?;
    eprintln!("testbed: downloading {package} into {}", download.display());
    TimedCommand::new("apt-get", Duration::from_secs(900))
        .args(["download", package])
        .current_dir(&download)
        .output_ok()?;
    let prefix = format!("{package}_");
    let deb = std::fs::read_dir(&download)
        .map_err(io("reading", &download))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| KernelError::NoDeb {
            package: package.to_owned(),
            dir: download.clone(),
        })?;
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;
    }
    TimedCommand::new("dpkg-deb", Duration::from_secs(600))
        .arg("-x")
        .arg(&deb)
        .arg(&staging)
        .output_ok()?;
    std::fs::write(staging.join(MARKER), package).map_err(io("writing", &staging))?;
    match std::fs::rename(&staging, root) {
        Ok(()) => {}
        // Another process finished first: its copy is as good as ours.
        Err(_) if root.join(MARKER).exists() => {
            std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;
        }
        Err(source) => {
            return Err(io("moving the extracted package to", root)(source).into());
        }
    }
    std::fs::remove_dir_all(&download).map_err(io("removing", &download))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_real_linux_image_dependency() {
        let text = "linux-image-amd64\n  Depends: <linux-image-virtual>\n  \
                    Depends: linux-image-6.1.0-56-amd64\n  Depends: linux-image-6.1.0-55-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }
}
