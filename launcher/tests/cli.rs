//! `atoll` on bad input: every case exits with code 2 and one line on stderr naming the option
//! and the value; and `--help` documents every option.

mod common;

use common::{TestDir, atoll, bzimage, elf_vmlinux, require_kvm, run, stderr, stdout};
use std::ffi::OsStr;
use std::process::Command;

/// Runs `cmd`, expects exit code 2 and exactly one stderr line, returns that line.
fn one_line_usage_error(cmd: &mut Command) -> String {
    let out = run(cmd);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(&out));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(lines[0].starts_with("atoll: "), "{err}");
    lines[0].to_owned()
}

/// `atoll run --kernel <kernel> <args>` must fail with one line containing every `expect`.
fn rejects(kernel: &OsStr, args: &[&str], expect: &[&str]) {
    let mut cmd = atoll();
    cmd.arg("run").arg("--kernel").arg(kernel).args(args);
    let line = one_line_usage_error(&mut cmd);
    for e in expect {
        assert!(line.contains(e), "{line:?} lacks {e:?}");
    }
}

#[test]
fn missing_kernel_file() {
    rejects(
        OsStr::new("/nonexistent/bzImage"),
        &[],
        &["--kernel /nonexistent/bzImage: cannot open: No such file or directory"],
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = TestDir::new("notkernel");
    let k = dir.file("notes.txt", b"just some text, not a kernel\n");
    let line = format!(
        "--kernel {}: not a Linux kernel (bzImage or ELF vmlinux)",
        k.display()
    );
    rejects(k.as_os_str(), &[], &[&line]);
    let k = dir.file("old-bzImage", &bzimage(0x0204));
    rejects(
        k.as_os_str(),
        &[],
        &[&format!("--kernel {}", k.display()), "boot protocol 2.04"],
    );
    rejects(
        dir.0.as_os_str(),
        &[],
        &[
            &format!("--kernel {}", dir.0.display()),
            "not a regular file",
        ],
    );
}

#[test]
fn bad_memory_sizes() {
    let dir = TestDir::new("memory");
    let k = dir.file("bzImage", &bzimage(0x020f));
    for (value, why) in [
        ("12X", "unknown suffix 'X'"),
        ("1.5G", "not a size"),
        ("lots", "not a size"),
        ("", "empty size"),
        ("32M", "less than the minimum of 64 MiB"),
        ("67109376", "not a multiple of 4 KiB"),
        ("100T", "exceeds the host's total memory"),
        ("99999999999999999999", "too large"),
    ] {
        rejects(
            k.as_os_str(),
            &["--memory", value],
            &[&format!("--memory {value}:"), why],
        );
    }
}

#[test]
fn bad_cpu_counts() {
    let dir = TestDir::new("cpus");
    let k = dir.file("bzImage", &bzimage(0x020f));
    for (value, why) in [
        ("0", "at least 1 vCPU"),
        ("256", "more than the 255 vCPUs atoll supports"),
        ("two", "not a number"),
    ] {
        rejects(
            k.as_os_str(),
            &["--cpus", value],
            &[&format!("--cpus {value}:"), why],
        );
    }
    rejects(k.as_os_str(), &["--cpus=-1"], &["--cpus -1: not a number"]);
}

#[test]
fn bad_initramfs() {
    let dir = TestDir::new("initramfs");
    let k = dir.file("vmlinux", &elf_vmlinux());
    let empty = dir.file("empty.cpio", b"");
    rejects(
        k.as_os_str(),
        &["--initramfs", empty.to_str().unwrap()],
        &[&format!(
            "--initramfs {}: the file is empty",
            empty.display()
        )],
    );
    let missing = dir.path("missing.cpio");
    rejects(
        k.as_os_str(),
        &["--initramfs", missing.to_str().unwrap()],
        &[
            &format!("--initramfs {}", missing.display()),
            "No such file or directory",
        ],
    );
}

#[test]
fn cmdline_longer_than_the_kernel_accepts() {
    let dir = TestDir::new("cmdline");
    let k = dir.file("bzImage", &bzimage(0x020f));
    let long = "x".repeat(3000);
    rejects(
        k.as_os_str(),
        &["--cmdline", &long],
        &["--cmdline (3000 bytes)", "2047"],
    );
}

#[test]
fn bad_disk_options() {
    let dir = TestDir::new("disk");
    let k = dir.file("bzImage", &bzimage(0x020f));
    let img = dir.file("disk.img", &[0u8; 4096]);
    let img = img.to_str().unwrap();
    for (value, why) in [
        (format!("path={img},cache=none"), "unknown option 'cache'"),
        (format!("path={img},readonly=maybe"), "readonly=maybe"),
        (format!("path={img},queues=0"), "queues=0"),
        (format!("path={img},queues=65"), "queues=65"),
        (
            format!("path={img},serial=012345678901234567890"),
            "serial=012345678901234567890",
        ),
        (format!("path={img},path={img}"), "'path' is given twice"),
        (
            "readonly=on".to_owned(),
            "path=IMG or socket=PATH is required",
        ),
        (img.to_owned(), "is not key=value"),
        ("path=".to_owned(), "path= is empty"),
    ] {
        rejects(
            k.as_os_str(),
            &["--disk", &value],
            &[&format!("--disk {value}:"), why],
        );
    }
    let missing = dir.path("missing.img");
    let value = format!("path={}", missing.display());
    rejects(
        k.as_os_str(),
        &["--disk", &value],
        &[&format!(
            "--disk {value}: cannot open read-write: No such file or directory"
        )],
    );
    let value = format!("path={},readonly=on", dir.0.display());
    rejects(
        k.as_os_str(),
        &["--disk", &value],
        &[
            &format!("--disk {value}:"),
            "not a regular file or block device",
        ],
    );
    // The second disk is the bad one; the message names that one.
    let good = format!("path={img}");
    let bad = format!("path={img},queues=x");
    rejects(
        k.as_os_str(),
        &["--disk", &good, "--disk", &bad],
        &[&format!("--disk {bad}:")],
    );
}

#[test]
fn bad_external_backend_disks() {
    let dir = TestDir::new("socketdisk");
    let k = dir.file("bzImage", &bzimage(0x020f));
    let img = dir.file("disk.img", &[0u8; 4096]);
    let img = img.to_str().unwrap();
    let sock = dir.path("backend.sock");
    let sock = sock.to_str().unwrap();
    for (value, why) in [
        (
            format!("socket={sock},path={img}"),
            "socket= cannot be combined with path=",
        ),
        (
            format!("path={img},socket={sock}"),
            "socket= cannot be combined with path=",
        ),
        (
            format!("socket={sock},readonly=on"),
            "socket= cannot be combined with readonly=",
        ),
        (
            format!("socket={sock},direct=off"),
            "socket= cannot be combined with direct=",
        ),
        (
            format!("socket={sock},serial=SN"),
            "socket= cannot be combined with serial=",
        ),
        (format!("socket={sock},queues=65"), "queues=65"),
        ("socket=".to_owned(), "socket= is empty"),
        (
            format!("socket={sock},socket={sock}"),
            "'socket' is given twice",
        ),
    ] {
        rejects(
            k.as_os_str(),
            &["--disk", &value],
            &[&format!("--disk {value}:"), why],
        );
    }
    // Nothing there, a socket nobody listens on, and something that is not a socket: one
    // line naming --disk and the path, exit status 2, and nothing started.
    let value = format!("socket={sock}");
    rejects(
        k.as_os_str(),
        &["--disk", &value],
        &[&format!(
            "--disk {value}: cannot connect: No such file or directory (is a vhost-user-blk \
             backend listening there?)"
        )],
    );
    drop(std::os::unix::net::UnixListener::bind(sock).unwrap());
    rejects(
        k.as_os_str(),
        &["--disk", &value],
        &[&format!(
            "--disk {value}: cannot connect: Connection refused"
        )],
    );
    let value = format!("socket={img}");
    rejects(
        k.as_os_str(),
        &["--disk", &value],
        &[&format!("--disk {value}: not a UNIX socket")],
    );
    // The bad disk is the second one; the good image before it does not hide it.
    let good = format!("path={img}");
    let value = format!("socket={}", dir.path("other.sock").display());
    rejects(
        k.as_os_str(),
        &["--disk", &good, "--disk", &value],
        &[&format!("--disk {value}: cannot connect")],
    );
}

#[test]
fn missing_or_unusable_kvm_device() {
    let dir = TestDir::new("kvm");
    let k = dir.file("bzImage", &bzimage(0x020f));
    let line = one_line_usage_error(
        atoll()
            .env("ATOLL_KVM_DEVICE", "/nonexistent/kvm")
            .args(["run", "--kernel"])
            .arg(&k),
    );
    assert!(line.contains("/nonexistent/kvm: not found"), "{line}");
    assert!(line.contains("kvm_intel or kvm_amd"), "{line}");
    let line = one_line_usage_error(
        atoll()
            .env("ATOLL_KVM_DEVICE", "/dev/null")
            .args(["run", "--kernel"])
            .arg(&k),
    );
    assert!(line.contains("/dev/null: not a KVM device"), "{line}");
}

#[test]
fn clap_usage_errors_are_one_line_too() {
    let line = one_line_usage_error(atoll().args(["run", "--kernel", "k", "--bogus", "1"]));
    assert!(line.contains("'--bogus'"), "{line}");
    let line = one_line_usage_error(atoll().args(["run"]));
    assert!(line.contains("--kernel <PATH>"), "{line}");
    let line = one_line_usage_error(atoll().args(["run", "--kernel"]));
    assert!(line.contains("--kernel <PATH>"), "{line}");
    let line = one_line_usage_error(atoll().args(["fly"]));
    assert!(line.contains("'fly'"), "{line}");
}

#[test]
fn no_arguments_prints_help_and_exits_2() {
    let out = run(&mut atoll());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Usage: atoll <COMMAND>"));
}

#[test]
fn top_level_help_lists_run_and_exit_codes() {
    let out = run(atoll().arg("--help"));
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for needle in [
        "Usage: atoll <COMMAND>",
        "run",
        "ATOLL_LOG",
        "ATOLL_CORE_BIN",
        "ATOLL_DEV_BLK_BIN",
        "130",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn run_help_documents_every_option() {
    let out = run(atoll().args(["run", "--help"]));
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for needle in [
        "--kernel <PATH>",
        "bzImage",
        "vmlinux",
        "--initramfs <PATH>",
        "--cmdline <STR>",
        "[default: console=ttyS0]",
        "--cpus <N>",
        "[default: 1]",
        "255",
        "--memory <SIZE>",
        "[default: 512M]",
        "64M",
        "--disk <path=IMG",
        "readonly=on",
        "direct=on",
        "queues=N",
        "serial=ID",
        "|socket=PATH[,queues=N]>",
        "socket=PATH      the UNIX socket an external vhost-user-blk backend listens on",
        "qemu-storage-daemon",
        "Ctrl-A x",
        "ATOLL_KVM_DEVICE",
        "XDG_RUNTIME_DIR",
    ] {
        assert!(
            text.contains(needle),
            "run --help lacks {needle:?}:\n{text}"
        );
    }
}

#[test]
fn valid_input_gets_past_validation() {
    // Everything is valid, so atoll goes on to start the core, which is missing here: that is
    // an internal error (1), not a usage error, and it names the variable to set.
    require_kvm();
    let dir = TestDir::new("valid");
    let k = dir.file("bzImage", &bzimage(0x020f));
    let out = run(atoll()
        .args(["run", "--cpus", "1", "--memory", "64M", "--kernel"])
        .arg(&k));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot start vmm-core (/nonexistent/vmm-core; set ATOLL_CORE_BIN"),
        "{err}"
    );
}

#[test]
fn bad_net_options() {
    let dir = TestDir::new("net");
    let k = dir.file("bzImage", &bzimage(0x020f));
    for (value, why) in [
        (
            "tap=tap0,mac=52:54:00:12:34",
            "expected six hexadecimal bytes",
        ),
        ("tap=tap0,mac=01:00:5e:00:00:01", "a multicast address"),
        ("tap=tap0,mac=00:00:00:00:00:00", "the all-zero address"),
        ("tap=tap0,queues=0", "queues=0"),
        ("tap=tap0,queues=17", "queues=17"),
        ("tap=a/b", "not an interface name"),
        ("tap=abcdefghijklmnop", "not an interface name"),
        ("tap=tap0,fd=5", "tap= and fd= exclude each other"),
        ("fd=5,queues=2", "one fd= descriptor is one queue pair"),
        ("fd=1", "expected a descriptor number above 2"),
        ("mac=52:54:00:12:34:56", "tap=NAME or fd=N is required"),
        ("tap=tap0,vhost=on", "unknown option 'vhost'"),
        // Opening: a descriptor atoll was not given, an interface that is not a tap.
        ("fd=77", "descriptor 77 was not passed to atoll"),
        ("tap=lo", "not a tap"),
    ] {
        rejects(
            k.as_os_str(),
            &["--net", value],
            &[&format!("--net {value}:"), why],
        );
    }
}

/// A single-queue tap asked for two queue pairs: the message says how to make a multi-queue
/// one. (Creates a tap, so it needs CAP_NET_ADMIN, as CI has.)
#[test]
fn single_queue_tap_with_two_queue_pairs() {
    let dir = TestDir::new("netmq");
    let k = dir.file("bzImage", &bzimage(0x020f));
    let name = format!("atl{}", std::process::id() % 100_000);
    let made = Command::new("ip")
        .args(["tuntap", "add", &name, "mode", "tap"])
        .status()
        .expect("run ip");
    assert!(
        made.success(),
        "cannot create tap {name}: this test needs root"
    );
    let value = format!("tap={name},queues=2");
    let result = std::panic::catch_unwind(|| {
        rejects(
            k.as_os_str(),
            &["--net", &value],
            &[&format!("--net {value}:"), "multi_queue"],
        );
    });
    let _ = Command::new("ip").args(["link", "del", &name]).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
