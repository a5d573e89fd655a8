//! vmm-core confined as the launcher confines it (`ipc::sandbox`): its control socket at fd 3,
//! new namespaces, a dedicated uid when run as root, then the core's own lockdown (before it
//! reads `Start`). Checked from outside through /proc; with `--features
//! confinement-selftest`, each escape attempt must kill it with SIGSYS.

use ipc::sandbox::report::{ProcessSide, RootView, SeccompReport};
use ipc::sandbox::spawn::IdAllocator;
use ipc::sandbox::{ConfinedChild, ConfinedCommand, Mode};
use ipc::spawn::Inherit;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vmm-core");

/// The launcher's end of the control channel and the confined core.
fn spawn(env: &[(&str, &str)]) -> (OwnedFd, ConfinedChild) {
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let mut cmd = ConfinedCommand::new("vmm-core", BIN);
    cmd.ids(
        IdAllocator::for_launcher(std::process::id() + 11)
            .allocate()
            .unwrap(),
    )
    .rlimits(ipc::sandbox::report::Rlimits {
        nofile: 256,
        nproc: 256,
        core: 0,
        fsize: u64::MAX, // stderr may be a large log file
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
    (ours, child)
}

/// The child's exit status; kills it (and fails) if it runs longer than `limit`.
fn wait_at_most(child: &mut ConfinedChild, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{} still runs after {limit:?}", child.name());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(path: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn confined_core_is_locked_down_before_start() {
    let (control, mut child) = spawn(&[]);
    let report = child.read_report(Duration::from_secs(10));
    println!("{report}");
    let ProcessSide::Reported(p) = &report.process else {
        panic!("{report}");
    };
    assert_eq!(p.mode, Mode::Full);
    assert_eq!(p.root, RootView::EmptyReadOnly);
    assert!(matches!(p.seccomp, SeccompReport::Kill { .. }), "{report}");
    assert_eq!(
        p.open_fds,
        [0, 1, 2, 3, 4],
        "stdio, control socket, report pipe"
    );
    // It now waits for Start.
    let pid = child.pid();
    let s = status(&format!("/proc/{pid}/status"));
    assert_eq!(s["Seccomp"], "2", "{s:?}");
    assert_eq!(s["NoNewPrivs"], "1");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(s[caps], "0000000000000000", "{caps}");
    }
    let own_uid = nix::unistd::getuid().as_raw().to_string();
    assert_ne!(s["Uid"].split_whitespace().next(), Some(own_uid.as_str()));
    for ns in ["user", "pid", "mnt", "net", "ipc", "uts"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns}"
        );
    }
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "{root:?}");
    assert_eq!(child.try_wait().unwrap(), None, "vmm-core died: {report}");
    // Closing the control socket ends it the ordinary way (no Start: an internal error),
    // not by a seccomp kill.
    drop(control);
    let st = wait_at_most(&mut child, Duration::from_secs(20));
    assert_eq!(st.code(), Some(1), "{st:?}");
}

#[cfg(feature = "confinement-selftest")]
#[test]
fn escape_attempts_die_of_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    for what in ["open", "socket", "exec", "ptrace"] {
        let (_control, mut child) = spawn(&[("ATOLL_SELFTEST", what)]);
        let status = wait_at_most(&mut child, Duration::from_secs(20));
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{what}: {status:?}");
    }
}
