//! Every atoll process is confined (DESIGN.md §3), checked from outside on this host's KVM
//! with a tiny guest that halts, one disk (`dev-blk`) and one network card (`dev-net` on a tap
//! this test creates):
//! - each process's `/proc/PID/status` shows seccomp in filter mode, `no_new_privs`, no
//!   effective capabilities and a uid other than the launcher's; its pid, mount and network
//!   namespaces are not the launcher's; its root directory is empty;
//! - binaries built with the test-only `confinement-selftest` feature (scripts/test.sh builds
//!   them into `target/selftest/`) attempt, right after their lockdown, to open a host file,
//!   create an AF_INET socket, execve and ptrace: this test checks that each attempt kills
//!   the process with `SIGSYS` (the allow-lists list none of those calls).
//!
//! Needs root (it creates a tap) and the release binaries.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use atoll_tests::tiny::{elf, program};

fn bin_in(dir: &str, name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(dir)
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --workspace` and the selftest build of \
         scripts/test.sh first",
        p.display()
    );
    p
}

/// A private directory, a halting guest, a disk image and a tap, all removed on drop.
struct Setup {
    dir: PathBuf,
    kernel: PathBuf,
    image: PathBuf,
    tap: String,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("atoll-confine-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("tiny.elf");
        std::fs::write(&kernel, elf(&program("up\n", &[]))).unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let tap = format!("atc{}{}", std::process::id() % 100_000, &tag[..1]);
        let made = Command::new("ip")
            .args(["tuntap", "add", &tap, "mode", "tap"])
            .status()
            .expect("run ip");
        assert!(
            made.success(),
            "cannot create tap {tap}: this test needs root"
        );
        Self {
            dir,
            kernel,
            image,
            tap,
        }
    }

    /// `atoll run` of the halting guest with the disk and the card, stderr piped.
    fn atoll(&self, env: &[(&str, &Path)]) -> (Child, mpsc::Receiver<String>) {
        self.atoll_with(env, &[])
    }

    fn atoll_with(&self, env: &[(&str, &Path)], extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
        assert!(Path::new("/dev/kvm").exists(), "/dev/kvm is missing");
        let mut cmd = Command::new(bin_in("release", "atoll"));
        cmd.args(["run", "--kernel"])
            .arg(&self.kernel)
            .args(["--memory", "128M", "--disk"])
            .arg(format!("path={}", self.image.display()))
            .args(["--net", &format!("tap={}", self.tap)])
            .args(extra)
            .env("ATOLL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.tap]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Reads lines until `done` says so or `limit` passes; returns them all.
fn lines_until(
    rx: &mpsc::Receiver<String>,
    limit: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut lines = Vec::new();
    while !done(&lines) {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    lines
}

/// The `name -> pid` of each `atoll: confinement: NAME (pid N): ...` line.
fn reported_pids(lines: &[String]) -> Vec<(String, u32)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("atoll: confinement: "))
        .filter_map(|l| {
            let (name, rest) = l.split_once(" (pid ")?;
            let pid = rest.split_once(')')?.0.parse().ok()?;
            Some((name.to_owned(), pid))
        })
        .collect()
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
}

#[test]
fn every_process_is_confined() {
    let s = Setup::new("status");
    let (child, rx) = s.atoll(&[]);
    let lines = lines_until(&rx, Duration::from_secs(60), |l| {
        reported_pids(l).len() >= 3
    });
    let pids = reported_pids(&lines);
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    let all = lines.join("\n");
    assert_eq!(names, ["disk0", "net0", "vmm-core"], "{all}");
    let own_uid =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()).to_string();
    let own_ns = |ns: &str| std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
    for (name, pid) in &pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("{name} (pid {pid}) is gone: {e}\n{all}"));
        let why = format!("{name} (pid {pid}):\n{status}\n{all}");
        assert_eq!(status_field(&status, "Seccomp"), "2", "{why}");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{why}");
        assert_eq!(status_field(&status, "CapEff"), "0000000000000000", "{why}");
        let uid = status_field(&status, "Uid");
        assert_ne!(
            uid.split_whitespace().next(),
            Some(own_uid.as_str()),
            "{why}"
        );
        for ns in ["pid", "mnt", "net"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            assert_ne!(theirs, own_ns(ns), "{name}'s {ns} namespace: {why}");
        }
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap_or_else(|e| panic!("{name}'s root: {e}"))
            .collect();
        assert!(root.is_empty(), "{name}'s root is not empty: {root:?}");
    }
    stop(child);
}

/// One escape attempt by one process: the outcome the launcher reports.
fn attempt(binary: &str, what: &str) -> String {
    let s = Setup::new(&format!("{}{what}", &binary[4..5]));
    let target = bin_in("selftest/release", binary);
    // A wrapper that sets ATOLL_SELFTEST for this binary only (the launcher starts the
    // wrapper confined; it execs the selftest build before lockdown).
    let wrapper = s.dir.join(format!("{binary}-selftest"));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nATOLL_SELFTEST={what} exec {} \"$@\"\n",
            target.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // The wrapper must be readable by the process's dedicated uid.
    std::fs::set_permissions(&s.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env_name = match binary {
        "vmm-core" => "ATOLL_CORE_BIN",
        "dev-blk" => "ATOLL_DEV_BLK_BIN",
        _ => "ATOLL_DEV_NET_BIN",
    };
    let (child, rx) = s.atoll(&[(env_name, &wrapper)]);
    let lines = lines_until(&rx, Duration::from_secs(60), |l| {
        l.iter()
            .any(|l| l.contains(" died: ") || l.contains("selftest "))
    });
    stop(child);
    lines.join("\n")
}

#[test]
fn escape_attempts_are_killed_by_sigsys() {
    for binary in ["vmm-core", "dev-blk", "dev-net"] {
        for what in ["open", "socket", "exec", "ptrace"] {
            let out = attempt(binary, what);
            assert!(
                out.contains("died: signal: 31 (SIGSYS)"),
                "{binary}'s {what} attempt was not killed by SIGSYS:\n{out}"
            );
            assert!(
                !out.contains("SUCCEEDED"),
                "{binary}'s {what} attempt escaped:\n{out}"
            );
        }
    }
}

/// `--debug-device` changes only the process it names: `disk0` runs unconfined, `net0` under
/// a wrapper (`env`, which execs the device), and `vmm-core` stays fully confined.
#[test]
fn debug_device_modes_apply_to_one_process_only() {
    let s = Setup::new("debug");
    let (child, rx) = s.atoll_with(
        &[],
        &[
            "--debug-device",
            "disk0=unconfined",
            "--debug-device",
            "net0=wrap:'env ATOLL_WRAPPED=1'",
        ],
    );
    let lines = lines_until(&rx, Duration::from_secs(60), |l| {
        reported_pids(l).len() >= 3
    });
    let all = lines.join("\n");
    let line = |name: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("atoll: confinement: {name} (pid ")))
            .unwrap_or_else(|| panic!("no confinement line for {name}:\n{all}"))
            .clone()
    };
    assert!(line("disk0").contains("UNCONFINED (debug)"), "{all}");
    assert!(
        line("net0").contains("under wrapper `env ATOLL_WRAPPED=1` (debug)"),
        "{all}"
    );
    assert!(line("vmm-core").contains("seccomp kill"), "{all}");
    let pids = reported_pids(&lines);
    let pid = |name: &str| {
        pids.iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .unwrap()
    };
    let status = |p: u32| std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
    assert_eq!(status_field(&status(pid("disk0")), "Seccomp"), "0", "{all}");
    assert_eq!(
        status_field(&status(pid("vmm-core")), "Seccomp"),
        "2",
        "{all}"
    );
    stop(child);
}

/// `--net fd=N`: a tap descriptor opened by a management layer (here this test) and inherited
/// by atoll serves the card; atoll opens no tap itself.
#[test]
fn a_tap_descriptor_from_a_management_layer_serves_the_card() {
    let s = Setup::new("fd");
    let tap = ipc::tap::open_tap(&s.tap, 1).expect("open the test's tap");
    let mut cmd = Command::new(bin_in("release", "atoll"));
    cmd.args(["run", "--kernel"])
        .arg(&s.kernel)
        .args(["--memory", "128M", "--net", "fd=7,mac=52:54:00:00:00:07"])
        .env("ATOLL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = ipc::spawn::spawn_with_fds(
        &mut cmd,
        &[ipc::spawn::Inherit {
            fd: std::os::fd::AsFd::as_fd(&tap.fds[0]),
            target: 7,
        }],
    )
    .unwrap();
    drop(tap);
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let lines = lines_until(&rx, Duration::from_secs(60), |l| {
        l.iter().any(|l| l.contains("virtio-net device plugged")) || reported_pids(l).len() >= 2
    });
    let all = lines.join("\n");
    assert!(
        all.contains(&format!("starting dev-net device=net0 tap={}", s.tap)),
        "atoll did not start dev-net on the inherited tap:\n{all}"
    );
    assert!(all.contains("mac=52:54:00:00:00:07"), "{all}");
    stop(child);
}

/// `--strict` refuses to start on a host that lacks a confinement measure (exit 2, naming
/// each missing one), and starts as usual on a host that has them all.
#[test]
fn strict_refuses_exactly_when_the_host_lacks_something() {
    let s = Setup::new("strict");
    let missing = ipc::sandbox::probe().warnings();
    let (mut child, rx) = s.atoll_with(&[], &["--strict"]);
    if missing.is_empty() {
        let lines = lines_until(&rx, Duration::from_secs(60), |l| {
            reported_pids(l).len() >= 3
        });
        assert_eq!(reported_pids(&lines).len(), 3, "{}", lines.join("\n"));
        stop(child);
        return;
    }
    let status = child.wait().unwrap();
    let lines: Vec<String> = rx.iter().collect();
    let all = lines.join("\n");
    assert_eq!(status.code(), Some(2), "{all}");
    assert!(all.contains("--strict: refusing to start: "), "{all}");
    for m in &missing {
        assert!(all.contains(m.as_str()), "{m:?} not named:\n{all}");
    }
    assert!(reported_pids(&lines).is_empty(), "nothing may start: {all}");
}
