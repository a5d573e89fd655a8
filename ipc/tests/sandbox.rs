//! Confinement on this host: confined children (`ipc::sandbox::spawn`) seen from inside and
//! from the launcher's side, and the process-side lockdown of `examples/lockdown_probe.rs`
//! with its escape attempts (`confinement-selftest` feature).
//!
//! Needs user namespaces (as root, or unprivileged ones enabled). `cargo test -p ipc` builds
//! the example next to the test binaries.

use ipc::sandbox::report::{CgroupReport, ProcessSide, RootView, SeccompReport};
use ipc::sandbox::spawn::{Confinement, HostIds, IdAllocator, SpawnError};
use ipc::sandbox::{ConfinedChild, ConfinedCommand, Mode};
use ipc::spawn::Inherit;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

/// An example binary built by `cargo test` beside this test (`target/<profile>/examples`).
fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let p = profile_dir.join("examples").join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with cargo test -p ipc (which builds examples)",
        p.display()
    );
    p
}

fn probe_bin() -> PathBuf {
    example_bin("lockdown_probe")
}

/// Fields of a /proc/PID/status text.
fn status_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn proc_status(pid: u32) -> BTreeMap<String, String> {
    status_fields(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap())
}

fn ns_inode(pid: &str, ns: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .unwrap()
        .display()
        .to_string()
}

const NAMESPACES: [&str; 7] = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"];

fn launcher_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The host ids a confined child should get: dedicated when root, else ours.
fn test_ids() -> HostIds {
    // A block no real launcher of this test's pid range would pick (pid + 1).
    IdAllocator::for_launcher(std::process::id() + 1)
        .allocate()
        .unwrap()
}

/// A confined /bin/sh with a report pipe at fd 5 and a "go" pipe at fd 4.
fn confined_shell(script: &str) -> (ConfinedChild, OwnedFd, std::fs::File) {
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let (go_r, go_w) = nix::unistd::pipe().unwrap();
    let mut cmd = ConfinedCommand::new("shell", "/bin/sh");
    cmd.args(["-c", script])
        .ids(test_ids())
        .expect_report(false);
    let child = cmd
        .spawn(&[
            Inherit {
                fd: go_r.as_fd(),
                target: 4,
            },
            Inherit {
                fd: out_w.as_fd(),
                target: 5,
            },
        ])
        .unwrap();
    (child, go_w, std::fs::File::from(out_r))
}

#[test]
fn confined_shell_gets_namespaces_ids_and_only_its_fds() {
    let (mut child, go, mut out) = confined_shell(
        "{ cat /proc/self/status; echo FDS $(ls /proc/self/fd); } >&5; read x <&4; exit 9",
    );
    // While the shell waits on fd 4, look at it from the launcher's side.
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("\nFDS ") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "the shell ended early: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    while !text.ends_with('\n') {
        let n = out.read(&mut buf).unwrap();
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let pid = child.pid();
    let outside = proc_status(pid);
    let uid_outside: Vec<&str> = outside["Uid"].split_whitespace().collect();
    if nix::unistd::geteuid().is_root() {
        let uid = test_ids().uid.to_string();
        assert_eq!(uid_outside, [uid.as_str(); 4], "{outside:?}");
        assert_eq!(
            outside["Groups"], "",
            "supplementary groups were not dropped"
        );
    } else {
        assert_eq!(uid_outside[0], launcher_uid().to_string());
    }
    assert_ne!(uid_outside[0], "0");
    for ns in NAMESPACES {
        assert_ne!(
            ns_inode(&pid.to_string(), ns),
            ns_inode("self", ns),
            "{ns} namespace is the launcher's"
        );
    }
    // The shell is pid 1 of its namespace.
    assert_eq!(outside["NSpid"], format!("{pid}\t1"), "{outside:?}");
    // Inside (the status is `cat`'s, a child of the shell): uid 0 of its own namespace,
    // no_new_privs inherited, a pid in two namespaces.
    let inside = status_fields(&text);
    assert_eq!(inside["Uid"], "0\t0\t0\t0", "{text}");
    assert_eq!(inside["NoNewPrivs"], "1", "{text}");
    assert_eq!(inside["NSpid"].split_whitespace().count(), 2, "{text}");
    // Exactly stdio, the two listed fds, and the one `ls` opened for /proc/self/fd.
    let fds: Vec<i32> = text
        .lines()
        .find_map(|l| l.strip_prefix("FDS "))
        .unwrap()
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    for fd in [0, 1, 2, 4, 5] {
        assert!(fds.contains(&fd), "{text}");
    }
    assert_eq!(fds.len(), 6, "{text}");
    assert_eq!(child.try_wait().unwrap(), None);
    drop(go);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(9));
    let report = child.read_report(Duration::from_secs(1));
    assert_eq!(report.launcher.namespaces, NAMESPACES);
    assert!(matches!(report.process, ProcessSide::Missing(_)));
}

#[test]
fn pid_one_of_its_namespace_ignores_sigterm_but_not_sigkill() {
    let (mut child, _go, _out) = confined_shell("read x <&4");
    // An init process without a handler does not get SIGTERM from an ancestor namespace:
    // atoll's binaries block (dev-blk) or handle it, or are stopped over their control socket.
    child.signal(Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(child.try_wait().unwrap(), None);
    let status = child.kill().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // Once reaped: the same status again, and signals fail with ESRCH.
    assert_eq!(child.try_wait().unwrap(), Some(status));
    assert!(matches!(
        child.signal(Signal::SIGKILL),
        Err(SpawnError::Signal {
            source: nix::errno::Errno::ESRCH,
            ..
        })
    ));
}

#[test]
fn exec_failure_names_the_step_and_program() {
    let mut cmd = ConfinedCommand::new("missing", "/nonexistent/atoll-probe");
    cmd.ids(test_ids()).expect_report(false);
    let err = cmd.spawn(&[]).unwrap_err();
    assert!(
        matches!(&err, SpawnError::Child { step: "execve", source, .. }
            if source.raw_os_error() == Some(libc::ENOENT)),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "missing: the child failed at execve before exec of /nonexistent/atoll-probe"
    );
}

#[test]
fn unconfined_child_still_gets_a_pidfd_and_nothing_else() {
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let mut cmd = ConfinedCommand::new("plain", "/bin/sh");
    cmd.args([
        "-c",
        "grep -E '^(NoNewPrivs|Uid):' /proc/self/status >&3; echo ${ATOLL_CONFINE}>&3",
    ])
    .confinement(Confinement::Unconfined)
    .ids(test_ids())
    .expect_report(false);
    let mut child = cmd
        .spawn(&[Inherit {
            fd: out_w.as_fd(),
            target: 3,
        }])
        .unwrap();
    drop(out_w);
    let mut text = String::new();
    std::fs::File::from(out_r)
        .read_to_string(&mut text)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let uid = launcher_uid();
    assert_eq!(
        text,
        format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nNoNewPrivs:\t0\nnone\n")
    );
    let r = child.read_report(Duration::from_millis(10));
    assert_eq!(r.launcher.mode, Mode::Unconfined);
    assert!(r.launcher.namespaces.is_empty() && r.launcher.ids.is_none());
    assert_eq!(r.launcher.cgroup, CgroupReport::None("debug mode".into()));
}

/// A lockdown probe started confined, with its control socket.
struct Probe {
    child: ConfinedChild,
    ctl: BufReader<UnixStream>,
}

fn start_probe(confinement: Confinement, env: &[(&str, &str)], args: &[&str]) -> Probe {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = ConfinedCommand::new("lockdown-probe", probe_bin());
    cmd.args(args)
        .confinement(confinement)
        .ids(test_ids())
        .rlimits(ipc::sandbox::report::Rlimits {
            nofile: 64,
            nproc: 64,
            core: 0,
            fsize: 1 << 34, // stderr may be a large log file
        })
        .no_cgroup("not wanted by this test");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn(&[Inherit {
            fd: theirs.as_fd(),
            target: 3,
        }])
        .unwrap();
    Probe {
        child,
        ctl: BufReader::new(ours),
    }
}

impl Probe {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.ctl.read_line(&mut l).unwrap();
        l
    }

    fn send(&mut self, b: u8) {
        self.ctl.get_mut().write_all(&[b]).unwrap();
    }
}

#[test]
fn full_lockdown_as_seen_from_outside() {
    let mut p = start_probe(Confinement::Full, &[], &[]);
    let report = p.child.read_report(Duration::from_secs(10));
    let line = p.line();
    assert!(line.starts_with("locked "), "{line}");
    let ProcessSide::Reported(pr) = &report.process else {
        panic!("{report}");
    };
    assert_eq!(pr.mode, Mode::Full);
    assert_eq!(pr.root, RootView::EmptyReadOnly);
    assert!(pr.no_new_privs && pr.caps_dropped);
    assert_eq!(pr.bounding_caps_left, 0);
    assert!(matches!(pr.seccomp, SeccompReport::Kill { syscalls } if syscalls > 20));
    assert_eq!(pr.open_fds, [0, 1, 2, 3, 4], "stdio, control, report pipe");
    let text = report.to_string();
    assert!(
        text.starts_with(&format!(
            "lockdown-probe (pid {}): uid {} gid {}",
            p.child.pid(),
            report.launcher.ids.unwrap().uid,
            report.launcher.ids.unwrap().gid
        )),
        "{text}"
    );
    assert!(
        text.contains("ns user+pid+mnt+net+ipc+uts+cgroup, empty root, landlock ABI"),
        "{text}"
    );
    assert!(text.contains("caps none, seccomp kill ("), "{text}");
    assert!(
        text.contains("rlimits nofile 64 nproc 64 core 0 fsize 17179869184"),
        "{text}"
    );

    let pid = p.child.pid();
    let s = proc_status(pid);
    assert_eq!(s["Seccomp"], "2", "{s:?}");
    assert_eq!(s["NoNewPrivs"], "1", "{s:?}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(s[caps], "0000000000000000", "{caps}: {s:?}");
    }
    let uid: Vec<&str> = s["Uid"].split_whitespace().collect();
    if nix::unistd::geteuid().is_root() {
        assert_ne!(uid[0], launcher_uid().to_string(), "{s:?}");
    } else {
        // An unprivileged launcher can only map its own uid.
        assert_eq!(uid[0], launcher_uid().to_string(), "{s:?}");
    }
    for ns in NAMESPACES {
        assert_ne!(ns_inode(&pid.to_string(), ns), ns_inode("self", ns), "{ns}");
    }
    // Its root, seen from here, is empty.
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(root.is_empty(), "{root:?}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 64 ")),
        "{limits}"
    );
    // Threads still work under the filter (clone3 falls back to clone).
    p.send(b't');
    assert_eq!(p.line(), "joined\n");
    p.send(b'x');
    assert_eq!(p.child.wait().unwrap().code(), Some(0));
}

#[cfg(feature = "confinement-selftest")]
#[test]
fn escape_attempts_outside_the_allow_list_die_of_sigsys() {
    for what in ["open", "socket", "exec", "ptrace"] {
        let Probe { mut child, ctl } =
            start_probe(Confinement::Full, &[("ATOLL_SELFTEST", what)], &[]);
        // A probe that somehow got past the attempt sees end of file and exits: no hang.
        drop(ctl);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{what}: {status:?}");
    }
}

/// With the system call allowed, the next layer must stop it: each (attempt, errno name)
/// with the probe started by `configure`d commands.
#[cfg(feature = "confinement-selftest")]
fn layered_attempts(configure: impl Fn(&mut ConfinedCommand), expected: &[(&str, &str)]) {
    for &(what, errno) in expected {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (err_r, err_w) = nix::unistd::pipe().unwrap();
        let mut cmd = ConfinedCommand::new("lockdown-probe", probe_bin());
        cmd.args(["--allow", what])
            .ids(test_ids())
            .env("ATOLL_SELFTEST", what);
        configure(&mut cmd);
        let mut child = cmd
            .spawn(&[
                Inherit {
                    fd: theirs.as_fd(),
                    target: 3,
                },
                Inherit {
                    fd: err_w.as_fd(),
                    target: 2,
                },
            ])
            .unwrap();
        drop(err_w);
        drop(ours);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::fs::File::from(err_r)
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(
            stderr,
            format!("selftest {what}: failed: {errno}\n"),
            "{:?} {what}",
            cmd.mode()
        );
        assert_eq!(
            status.code(),
            Some(ipc::sandbox::selftest::EXIT_BLOCKED),
            "{what}"
        );
    }
}

#[cfg(feature = "confinement-selftest")]
#[test]
fn allowed_escape_attempts_fail_at_the_next_layer() {
    // Empty root: nothing to open or exec; pid 1 of its namespace cannot attach to itself;
    // an AF_INET socket would work in the empty network namespace, so it stays unlisted.
    layered_attempts(
        |_| {},
        &[("open", "ENOENT"), ("exec", "ENOENT"), ("ptrace", "EPERM")],
    );
}

#[cfg(feature = "confinement-selftest")]
#[test]
fn seccomp_log_mode_logs_and_lets_the_next_layer_refuse() {
    // Unlisted calls are only logged: the same outcomes as when they are allowed.
    let Probe { mut child, ctl } =
        start_probe(Confinement::SeccompLog, &[("ATOLL_SELFTEST", "open")], &[]);
    drop(ctl);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(ipc::sandbox::selftest::EXIT_BLOCKED));
    let mut p = start_probe(Confinement::SeccompLog, &[], &[]);
    let r = p.child.read_report(Duration::from_secs(10));
    let ProcessSide::Reported(pr) = &r.process else {
        panic!("{r}");
    };
    assert!(matches!(pr.seccomp, SeccompReport::Log { .. }), "{r}");
    assert!(r.to_string().contains("seccomp-log (debug)"), "{r}");
    assert_eq!(p.line().split_whitespace().next(), Some("locked"));
    p.send(b'x');
    assert!(p.child.wait().unwrap().success());
}

#[cfg(feature = "confinement-selftest")]
#[test]
fn without_namespaces_landlock_refuses_the_host_filesystem() {
    // Started as if by hand (no ATOLL_CONFINE): no pivot_root, so Landlock is what stops
    // open and exec of host files.
    layered_attempts(
        |cmd| {
            cmd.without_namespaces("test");
            assert_eq!(cmd.mode(), Mode::Standalone);
        },
        &[("open", "EACCES"), ("exec", "EACCES")],
    );
}

#[test]
fn lockdown_refuses_full_mode_in_the_host_namespaces() {
    // ATOLL_CONFINE=full without the launcher's namespaces must not touch the host's mounts.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (err_r, err_w) = nix::unistd::pipe().unwrap();
    // The spawn sets ATOLL_CONFINE itself: a shell overrides it for the probe.
    let mut sh = ConfinedCommand::new("sh", "/bin/sh");
    sh.args([
        "-c",
        &format!("ATOLL_CONFINE=full exec {}", probe_bin().display()),
    ])
    .confinement(Confinement::Unconfined)
    .expect_report(false);
    let mut child = sh
        .spawn(&[
            Inherit {
                fd: theirs.as_fd(),
                target: 3,
            },
            Inherit {
                fd: err_w.as_fd(),
                target: 2,
            },
        ])
        .unwrap();
    drop(err_w);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::fs::File::from(err_r)
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("runs in the host's user namespace: refusing to touch the host's mounts"),
        "{stderr}"
    );
    drop(ours);
}

#[test]
fn child_starts_in_its_cgroup_leaf() {
    use ipc::sandbox::cgroup::{CgroupLimits, CgroupTree, Controllers, own_cgroup};
    // Any cgroup2 hierarchy this test may write (on the development hosts: the hybrid
    // /sys/fs/cgroup/unified, without memory and pids controllers) shows the placement.
    let delegated = own_cgroup().expect("this process is in a cgroup2 hierarchy");
    let tree = CgroupTree::create_requiring(&delegated, Controllers::default())
        .expect("create the launcher's cgroup subtree");
    let leaf = tree.leaf("probe", CgroupLimits::default()).unwrap();
    let (mut child, go, _out) = {
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let (go_r, go_w) = nix::unistd::pipe().unwrap();
        let mut cmd = ConfinedCommand::new("shell", "/bin/sh");
        cmd.args(["-c", "read x <&4"])
            .ids(test_ids())
            .cgroup(leaf.clone())
            .expect_report(false);
        let child = cmd
            .spawn(&[
                Inherit {
                    fd: go_r.as_fd(),
                    target: 4,
                },
                Inherit {
                    fd: out_w.as_fd(),
                    target: 5,
                },
            ])
            .unwrap();
        (child, go_w, out_r)
    };
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", child.pid())).unwrap();
    let rel = leaf.path().strip_prefix(&delegated).unwrap();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let base = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    let expected = PathBuf::from(base).join(rel);
    assert!(
        cg.lines()
            .any(|l| l.strip_prefix("0::").map(PathBuf::from) == Some(expected.clone())),
        "{cg} (expected 0::{})",
        expected.display()
    );
    let r = child.read_report(Duration::from_millis(1));
    assert!(
        matches!(&r.launcher.cgroup, CgroupReport::Leaf { path, .. } if path == &leaf.path().display().to_string())
    );
    drop(go);
    child.wait().unwrap();
    let tree_dir = tree.path().to_owned();
    drop(leaf);
    drop(tree);
    assert!(!tree_dir.exists(), "the subtree was not removed");
}

#[test]
fn child_dies_with_its_launcher_even_with_a_dedicated_uid() {
    // `confine` plays the launcher: it spawns a confined shell (dedicated uid: the euid
    // change must not disarm the parent-death signal) and is then killed.
    let mut launcher = std::process::Command::new(example_bin("confine"))
        .args(["--no-report", "--", "/bin/sleep", "60"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let children = format!("/proc/{0}/task/{0}/children", launcher.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let child: u32 = loop {
        let text = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next() {
            break pid.parse().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no confined child appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // Until it has exec'd, the child may not have switched to its uid yet.
    while std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default() != "sleep\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the child did not exec"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let uid = proc_status(child)["Uid"].clone();
    if nix::unistd::geteuid().is_root() {
        assert!(!uid.starts_with("0\t"), "{uid}");
    }
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{child}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the confined child {child} outlived its launcher"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_panicking_thread_unwinds_under_the_filter_even_with_rust_backtrace() {
    // Resolving a backtrace opens the binary's files, which no allow-list lists: lockdown
    // turns RUST_BACKTRACE off in kill mode so that a panic stays a panic.
    for env in [
        &[("RUST_BACKTRACE", "0")][..],
        &[("RUST_BACKTRACE", "1")][..],
    ] {
        let mut p = start_probe(Confinement::Full, env, &[]);
        assert!(p.line().starts_with("locked "));
        p.send(b'p');
        assert_eq!(p.line(), "caught\n", "{env:?}");
        p.send(b'x');
        assert_eq!(p.child.wait().unwrap().code(), Some(0), "{env:?}");
    }
}
