//! A writer for the `newc` cpio format the kernel unpacks as initramfs. Written here rather
//! than with the `cpio` tool so that device nodes (`/dev/console`) need no privileges.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Errors of [`CpioWriter`].
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("{path} is {len} bytes, more than a newc archive entry can hold")]
    TooLarge { path: String, len: usize },
    #[error("archive path {0:?} must be relative, without `..` or empty components")]
    BadPath(String),
}

/// Builds an uncompressed `newc` archive in memory. Parent directories are created implicitly.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        let path = Self::check(path)?;
        self.parents(path)?;
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, S_IFDIR | mode, 2, 0, 0, &[])?;
        }
        Ok(())
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        let path = Self::check(path)?;
        self.parents(path)?;
        self.entry(path, S_IFREG | mode, 1, 0, 0, data)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let path = Self::check(path)?;
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let path = Self::check(path)?;
        self.parents(path)?;
        self.entry(path, S_IFCHR | mode, 1, major, minor, &[])
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, 0, 0, &[])
            .expect("the trailer entry is empty");
        self.out
    }

    fn check(path: &str) -> Result<&str, CpioError> {
        let bad = path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|c| c.is_empty() || c == "..");
        if bad {
            Err(CpioError::BadPath(path.to_owned()))
        } else {
            Ok(path)
        }
    }

    fn parents(&mut self, path: &str) -> Result<(), CpioError> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev_major: u32,
        rdev_minor: u32,
        data: &[u8],
    ) -> Result<(), CpioError> {
        let too_large = || CpioError::TooLarge {
            path: path.to_owned(),
            len: data.len(),
        };
        let size = u32::try_from(data.len()).map_err(|_| too_large())?;
        let name_size = u32::try_from(path.len() + 1).map_err(|_| too_large())?;
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev_major,
            rdev_minor,
            name_size,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn cpio_tool_lists_what_was_written() {
        let mut cpio = CpioWriter::new();
        cpio.file("bin/busybox", 0o755, b"\x7fELF fake").unwrap();
        cpio.symlink("bin/sh", "busybox").unwrap();
        cpio.char_device("dev/console", 0o600, 5, 1).unwrap();
        cpio.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let archive = cpio.finish();
        assert_eq!(archive.len() % 4, 0);

        let dir = std::env::temp_dir().join(format!("atoll-cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.cpio");
        std::fs::write(&file, &archive).unwrap();
        let list = |options: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("cpio {options} < {}", file.display()))
                .output()
                .expect("the cpio tool (package cpio) is needed for this test");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let names = list("-it");
        let verbose = list("-itv");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            names.lines().collect::<Vec<_>>(),
            ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init"]
        );
        assert!(verbose.contains("bin/sh -> busybox"), "{verbose}");
        let console = verbose.lines().find(|l| l.contains("dev/console")).unwrap();
        assert!(
            console.starts_with("crw-------") && console.contains(" 5, "),
            "{console}"
        );
    }

    #[test]
    fn rejects_absolute_and_parent_paths() {
        let mut cpio = CpioWriter::new();
        assert!(cpio.file("/init", 0o755, b"").is_err());
        assert!(cpio.file("a/../b", 0o644, b"").is_err());
        assert!(cpio.dir("a//b", 0o755).is_err());
    }
}
