//! Helpers shared by the launcher's process tests.

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A scratch directory removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("atoll-launcher-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// An executable shell script.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        // A stand-in device closes the launcher's confinement-report pipe at once (a real one
        // sends its report there when it locks down).
        let p = self.file(
            name,
            format!(
                "#!/bin/sh\n[ -n \"$ATOLL_CONFINE_REPORT_FD\" ] && eval \"exec $ATOLL_CONFINE_REPORT_FD>&-\"\n{body}"
            )
            .as_bytes(),
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first 4 KiB of a bzImage: boot-sector signature, "HdrS", boot protocol `protocol`.
pub fn bzimage(protocol: u16) -> Vec<u8> {
    let mut h = vec![0u8; 0x1000];
    h[510..512].copy_from_slice(&0xaa55u16.to_le_bytes());
    h[0x202..0x206].copy_from_slice(b"HdrS");
    h[0x206..0x208].copy_from_slice(&protocol.to_le_bytes());
    h[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    h
}

/// An ELF64 x86-64 executable header (enough for atoll's check, not to boot).
pub fn elf_vmlinux() -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    h[16..18].copy_from_slice(&2u16.to_le_bytes());
    h[18..20].copy_from_slice(&62u16.to_le_bytes());
    h
}

/// `atoll` with a clean environment for the variables it reads; the core binary points at a
/// path that does not exist, so a test that wrongly passes validation fails with exit code 1.
pub fn atoll() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atoll"));
    cmd.env_remove("ATOLL_LOG")
        .env_remove("ATOLL_KVM_DEVICE")
        .env_remove("ATOLL_DEV_BLK_BIN")
        .env("ATOLL_CORE_BIN", "/nonexistent/vmm-core")
        .stdin(Stdio::null());
    cmd
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

/// What atoll wrote to stderr, without its confinement lines (one report per process and
/// the host's warnings, `atoll: confinement...`), which depend on the host.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("atoll: confinement"))
        .collect()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test with a clear message when this host's KVM device cannot be opened.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev/kvm"))
    {
        panic!("this test needs a usable /dev/kvm (kvm_pvm is enough): {e}");
    }
}
