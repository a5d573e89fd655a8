//! dev-blk confined as the launcher confines it (`ipc::sandbox`): inherited socket and image,
//! new namespaces, a dedicated uid when run as root, then dev-blk's own lockdown. Checked from
//! outside through /proc; with `--features confinement-selftest`, each escape attempt must
//! kill it with SIGSYS.

use ipc::sandbox::report::{ProcessSide, RootView, SeccompReport};
use ipc::sandbox::spawn::IdAllocator;
use ipc::sandbox::{ConfinedChild, ConfinedCommand, Mode};
use ipc::spawn::Inherit;
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_dev-blk");

struct Disk {
    dir: PathBuf,
    listener: UnixListener,
    image: std::fs::File,
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn disk(name: &str) -> Disk {
    let dir = std::env::temp_dir().join(format!("dev-blk-confine-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image_path = dir.join("disk.img");
    std::fs::write(&image_path, vec![0u8; 1 << 20]).unwrap();
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image_path)
        .unwrap();
    let listener = UnixListener::bind(dir.join("disk.sock")).unwrap();
    Disk {
        dir,
        listener,
        image,
    }
}

fn spawn(d: &Disk, env: &[(&str, &str)]) -> ConfinedChild {
    let mut cmd = ConfinedCommand::new("disk0", BIN);
    cmd.args(["--socket-fd", "3", "--image-fd", "4"])
        .ids(
            IdAllocator::for_launcher(std::process::id() + 7)
                .allocate()
                .unwrap(),
        )
        .rlimits(ipc::sandbox::report::Rlimits {
            nofile: 64,
            nproc: 64,
            core: 0,
            fsize: u64::MAX, // stderr may be a large log file
        })
        .no_cgroup("not wanted by this test");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn(&[
        Inherit {
            fd: d.listener.as_fd(),
            target: 3,
        },
        Inherit {
            fd: d.image.as_fd(),
            target: 4,
        },
    ])
    .unwrap()
}

/// The child's exit status; kills it (and fails) if it runs longer than `limit`.
#[cfg(feature = "confinement-selftest")]
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
fn confined_dev_blk_is_locked_down() {
    let d = disk("status");
    let mut child = spawn(&d, &[]);
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
        [0, 1, 2, 3, 4, 5],
        "stdio, socket, image, report pipe"
    );
    // The signal thread starts after lockdown; give it a moment, then check every thread.
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.pid();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(tasks.len() >= 2, "{tasks:?}");
    let own_uid = nix::unistd::getuid().as_raw().to_string();
    for t in &tasks {
        let s = status(&format!("/proc/{pid}/task/{t}/status"));
        assert_eq!(s["Seccomp"], "2", "task {t}: {s:?}");
        assert_eq!(s["NoNewPrivs"], "1", "task {t}");
        assert_eq!(s["CapEff"], "0000000000000000", "task {t}");
        assert_eq!(s["CapPrm"], "0000000000000000", "task {t}");
        assert_eq!(s["CapBnd"], "0000000000000000", "task {t}");
        assert_ne!(s["Uid"].split_whitespace().next(), Some(own_uid.as_str()));
    }
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
    assert_eq!(child.try_wait().unwrap(), None, "dev-blk died: {report}");
    child.kill().unwrap();
}

#[cfg(feature = "confinement-selftest")]
#[test]
fn escape_attempts_die_of_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    for what in ["open", "socket", "exec", "ptrace"] {
        let d = disk(what);
        let mut child = spawn(&d, &[("ATOLL_SELFTEST", what)]);
        let status = wait_at_most(&mut child, Duration::from_secs(20));
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{what}: {status:?}");
    }
}
