//! Whole-system checks on this host's own /dev/kvm with a tiny hand-assembled guest: `atoll run`
//! boots a 64-bit ELF "kernel" of a few instructions through the real launcher and core, and
//! the guest's port writes must reach the console, power the VM off, reboot it or triple-fault
//! it, each with its own exit code. A few dozen instructions run even on kvm_pvm, so this needs
//! no nested testbed; it fails loudly where /dev/kvm is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Load address and entry of the tiny kernel (the loader requires it at or above 1 MiB).
use atoll_tests::tiny::{elf, out, program};

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("ATOLL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --release`) or set ATOLL_BIN_DIR",
        p.display()
    );
    p
}

/// Guest code: write `msg` to COM1, then `tail`.
fn run_tiny(name: &str, code: &[u8], extra: &[&str]) -> Output {
    let dir = std::env::temp_dir().join(format!("atoll-tiny-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, elf(code)).unwrap();
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM (kvm_pvm is enough)"
    );
    let mut child = Command::new(bin("atoll"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--memory", "128M"])
        .args(extra)
        .env("ATOLL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The guest runs a few dozen instructions: anything beyond a minute is a hang.
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("atoll did not exit within 60 s for {name}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    out
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn console_output_then_acpi_poweroff_exits_0() {
    // SLP_TYP = 5 (the DSDT's _S5_) in bits 2..4, SLP_EN = bit 5.
    let out = run_tiny(
        "poweroff",
        &program("hello from L2\n", &out(0x600, (5 << 2) | (1 << 5))),
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from L2\n",
        "{}",
        describe(&out)
    );
}

#[test]
fn reset_register_exits_with_the_reboot_code() {
    let out = run_tiny("reboot", &program("r", &out(0xcf9, 0x06)), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

#[test]
fn triple_fault_exits_with_the_crash_code() {
    // ud2 with an empty IDT: #UD -> #DF -> triple fault.
    let out = run_tiny("triple", &program("t", &[0x0f, 0x0b]), &[]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("triple"),
        "{}",
        describe(&out)
    );
}

#[test]
fn unknown_ports_are_logged_once_and_not_fatal() {
    // Two reads and a write of an unassigned port, then power off.
    let mut tail = vec![0xe4, 0x99, 0xe4, 0x99, 0xe6, 0x99]; // in al,0x99; in al,0x99; out 0x99,al
    tail.extend(out(0x600, (5 << 2) | (1 << 5)));
    let out = run_tiny("unknown", &program("u", &tail), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("read at 0x99").count(), 1, "{}", describe(&out));
    assert_eq!(
        err.matches("write at 0x99").count(),
        1,
        "{}",
        describe(&out)
    );
}

#[test]
fn two_vcpus_start_and_poweroff_still_works() {
    let out = run_tiny(
        "smp",
        &program("s", &out(0x600, (5 << 2) | (1 << 5))),
        &["--cpus", "2"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}
