//! `atoll run` against `atoll-fake-core`, a stand-in for vmm-core that speaks the real control
//! protocol: the descriptors it receives, console pumping both ways, exit-code mapping, the
//! core dying, signals, and disk backends (shell-script stand-ins for dev-blk).

#![cfg(feature = "fake-core")]

mod common;

use common::{TestDir, atoll, bzimage, require_kvm, stderr, stdout};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A VM setup: a bzImage, an initramfs and the fake core reporting into the test directory.
struct Setup {
    dir: TestDir,
    kernel: PathBuf,
    initramfs: PathBuf,
    report: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Self {
        require_kvm();
        let dir = TestDir::new(tag);
        let kernel = dir.file("bzImage", &bzimage(0x020f));
        let initramfs = dir.file("initrd.cpio", b"070701 fake cpio");
        let report = dir.path("report");
        std::fs::create_dir(dir.path("run")).unwrap();
        Self {
            dir,
            kernel,
            initramfs,
            report,
        }
    }

    /// `atoll run --kernel .. <args>` with the fake core ending per `exit`.
    fn command(&self, exit: &str, args: &[&str]) -> Command {
        let mut cmd = atoll();
        cmd.env("ATOLL_CORE_BIN", env!("CARGO_BIN_EXE_atoll-fake-core"))
            .env("FAKE_CORE_EXIT", exit)
            .env("FAKE_CORE_REPORT", &self.report)
            .env("XDG_RUNTIME_DIR", self.dir.path("run"))
            .arg("run")
            .arg("--kernel")
            .arg(&self.kernel)
            // The stand-ins write into the test's directory, which a confined process (its
            // own uid, an empty root) cannot.
            .args(["--debug-device", "vmm-core=unconfined"])
            .args(args);
        let disks = args.windows(2).filter(|w| w[0] == "--disk").map(|w| w[1]);
        for (i, value) in disks.enumerate() {
            if value.starts_with("path=") {
                cmd.arg("--debug-device").arg(format!("disk{i}=unconfined"));
            }
        }
        cmd
    }

    fn report(&self) -> HashMap<String, String> {
        let text = std::fs::read_to_string(&self.report).expect("the fake core wrote a report");
        text.lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap_or((l, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    fn report_text(&self) -> String {
        std::fs::read_to_string(&self.report).unwrap()
    }

    /// Whether the runtime directory under `XDG_RUNTIME_DIR` is empty (removed at exit).
    fn runtime_dir_is_empty(&self) -> bool {
        std::fs::read_dir(self.dir.path("run"))
            .unwrap()
            .next()
            .is_none()
    }
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

#[test]
fn core_gets_exactly_its_descriptors_and_poweroff_exits_0() {
    let s = Setup::new("poweroff");
    let out = output(&mut s.command(
        "poweroff",
        &[
            "--initramfs",
            s.initramfs.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--cmdline",
            "console=ttyS0 quiet",
        ],
    ));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).is_empty(),
        "a power-off prints nothing: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "fake-core: console ok\n");
    let r = s.report();
    // Only stdio and the control socket cross the exec.
    assert_eq!(r["startup_fds"], "0,1,2,3");
    assert_eq!(r["cpus"], "2");
    assert_eq!(r["memory"], (128u64 << 20).to_string());
    assert_eq!(r["cmdline"], "console=ttyS0 quiet");
    assert_eq!(r["has_initramfs"], "true");
    assert_eq!(r["nfds"], "5");
    assert_eq!(r["kvm"], "/dev/kvm");
    assert!(r["ram"].starts_with("/memfd:"), "{}", r["ram"]);
    assert_eq!(r["ram_size"], (128u64 << 20).to_string());
    // F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW
    assert_eq!(r["ram_seals"], "0x7");
    assert_eq!(r["kernel"], s.kernel.display().to_string());
    // The kernel arrives positioned at its start.
    assert_eq!(r["kernel_head"], "[00, 00, 00, 00]");
    assert_eq!(r["initramfs"], s.initramfs.display().to_string());
    assert!(r["console"].starts_with("socket:"), "{}", r["console"]);
}

#[test]
fn defaults_are_one_cpu_512m_and_console_on_ttys0() {
    let s = Setup::new("defaults");
    let out = output(&mut s.command("poweroff", &[]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = s.report();
    assert_eq!(r["cpus"], "1");
    assert_eq!(r["memory"], (512u64 << 20).to_string());
    assert_eq!(r["cmdline"], "console=ttyS0");
    assert_eq!(r["has_initramfs"], "false");
    assert_eq!(r["nfds"], "4");
    assert!(!r.contains_key("initramfs"));
}

#[test]
fn exit_codes_follow_how_the_vm_ended() {
    let s = Setup::new("codes");
    for (exit, code, summary) in [
        ("reboot", 3, "atoll: the guest rebooted\n"),
        ("crash", 4, "atoll: the guest crashed: triple fault\n"),
        ("internal", 1, "atoll: vmm-core failed: fake failure\n"),
        ("die", 1, "atoll: vmm-core died: exit status: 3\n"),
    ] {
        let out = output(&mut s.command(exit, &[]));
        assert_eq!(out.status.code(), Some(code), "{exit}: {}", stderr(&out));
        assert_eq!(stderr(&out), summary, "{exit}");
    }
}

#[test]
fn console_input_reaches_the_guest_and_output_comes_back() {
    let s = Setup::new("echo");
    let mut child = s
        .command("poweroff", &[])
        .env("FAKE_CORE_ECHO", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ping\n").unwrap();
    // Not a terminal: Ctrl-A is data, not an escape, and EOF leaves the VM running.
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "fake-core: console ok\necho: ping\n");
    assert_eq!(s.report()["console_input"], "ping");
}

/// Spawns `cmd` with stderr read line by line on a thread.
fn spawn_watching_stderr(cmd: &mut Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
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

/// Waits until the fake core has written its report (it then waits for Shutdown).
fn wait_for_file(path: &Path) {
    for _ in 0..2000 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} never appeared", path.display());
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, sig).unwrap();
}

fn rest(rx: &mpsc::Receiver<String>) -> String {
    let mut s = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        if !line.starts_with("atoll: confinement") {
            s.push_str(&line);
            s.push('\n');
        }
    }
    s
}

#[test]
fn sigterm_asks_the_core_to_stop() {
    let s = Setup::new("sigterm");
    let (mut child, rx) = spawn_watching_stderr(&mut s.command("stop", &[]));
    wait_for_file(&s.report);
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();
    let err = rest(&rx);
    assert_eq!(status.code(), Some(130), "{err}");
    assert_eq!(err, "atoll: the VM was stopped\n");
    assert!(s.report_text().contains("got=Shutdown"));
}

#[test]
fn a_core_ignoring_shutdown_is_killed() {
    let s = Setup::new("ignore");
    let (mut child, rx) = spawn_watching_stderr(&mut s.command("ignore", &[]));
    wait_for_file(&s.report);
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = child.wait().unwrap();
    let err = rest(&rx);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("did not stop within 5s and was killed (signal: 9 (SIGKILL))"),
        "{err}"
    );
}

#[test]
fn disks_get_backends_with_the_right_descriptors() {
    let s = Setup::new("disks");
    let rw = s.dir.file("rw.img", &[0u8; 1 << 16]);
    let ro = s.dir.file("ro.img", &[0u8; 1 << 16]);
    // A stand-in dev-blk: records its arguments, what fd 3 and fd 4 are and fd 4's open
    // flags, then stays up until killed.
    let dev_blk = s.dir.script(
        "dev-blk",
        &format!(
            "n=$(basename \"$(readlink /proc/self/fd/4)\")\n\
             {{ echo \"args=$*\"; [ -S /proc/self/fd/3 ] && echo fd3=socket; \
             echo fd4=$(readlink /proc/self/fd/4); grep '^flags' /proc/self/fdinfo/4; \
             ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; }} > {dir}/tmp.$$\n\
             mv {dir}/tmp.$$ {dir}/blk$n\n\
             exec sleep 1000\n",
            dir = s.dir.0.display()
        ),
    );
    let disk0 = format!("path={}", rw.display());
    let disk1 = format!("path={},readonly=on,queues=2,serial=SN-1", ro.display());
    let (mut child, rx) = spawn_watching_stderr(
        s.command("stop", &["--disk", &disk0, "--disk", &disk1])
            .env("ATOLL_DEV_BLK_BIN", &dev_blk),
    );
    wait_for_file(&s.report);
    wait_for_file(&s.dir.path("blkrw.img"));
    wait_for_file(&s.dir.path("blkro.img"));
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();
    let err = rest(&rx);
    assert_eq!(status.code(), Some(130), "{err}");

    let report = s.report_text();
    let peers: Vec<&str> = report.lines().filter(|l| l.starts_with("disk ")).collect();
    assert_eq!(peers.len(), 2, "{report}");
    assert!(
        peers[0].starts_with("disk disk0 queues=1 peer="),
        "{report}"
    );
    assert!(peers[0].ends_with("/disk0.sock"), "{report}");
    assert!(
        peers[1].starts_with("disk disk1 queues=2 peer="),
        "{report}"
    );
    let sock = Path::new(peers[0].split_once("peer=").unwrap().1);
    let runtime = sock.parent().unwrap();
    assert_eq!(runtime.parent().unwrap(), s.dir.path("run"));
    assert!(s.report()["nfds"] == "6", "{report}");
    // The runtime directory (mode 0700 while it existed) is gone after exit.
    assert!(s.runtime_dir_is_empty(), "{}", runtime.display());

    let [rw_text, ro_text] =
        ["blkrw.img", "blkro.img"].map(|f| std::fs::read_to_string(s.dir.path(f)).unwrap());
    assert!(
        rw_text.contains("args=--socket-fd 3 --image-fd 4\n"),
        "{rw_text}"
    );
    assert!(rw_text.contains("fd3=socket\n"), "{rw_text}");
    assert!(
        rw_text.contains(&format!("fd4={}\n", rw.display())),
        "{rw_text}"
    );
    assert!(
        ro_text.contains("args=--socket-fd 3 --image-fd 4 --readonly --queues 2 --serial SN-1\n"),
        "{ro_text}"
    );
    // fdinfo flags are octal; the low two bits are the access mode (0 read-only, 2 read-write).
    let mode = |t: &str| {
        let flags = t
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        u32::from_str_radix(flags, 8).unwrap() & 3
    };
    assert_eq!(mode(&rw_text), 2, "{rw_text}");
    assert_eq!(mode(&ro_text), 0, "{ro_text}");
    // stdio, the socket, the image, and the fd `ls` uses for /proc/self/fd.
    for text in [&rw_text, &ro_text] {
        let fds: Vec<u32> = text
            .lines()
            .last()
            .unwrap()
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        assert_eq!(&fds[..5], [0, 1, 2, 3, 4], "{text}");
        assert!(fds.len() <= 6, "{text}");
    }
}

#[test]
fn external_backends_are_connected_not_started() {
    use std::os::unix::net::UnixListener;
    let s = Setup::new("extdisk");
    let img = s.dir.file("a.img", &[0u8; 1 << 16]);
    // The external backend: a socket this test listens on.
    let sock = s.dir.path("qsd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // dev-blk stand-in that leaves a mark for each start.
    let dev_blk = s.dir.script(
        "dev-blk",
        &format!(
            "echo \"$*\" >> {dir}/dev-blk-starts\nexec sleep 1000\n",
            dir = s.dir.0.display()
        ),
    );
    let image_disk = format!("path={}", img.display());
    let socket_disk = format!("socket={},queues=3", sock.display());
    let (mut child, rx) = spawn_watching_stderr(
        s.command("stop", &["--disk", &socket_disk, "--disk", &image_disk])
            .env("ATOLL_DEV_BLK_BIN", &dev_blk),
    );
    wait_for_file(&s.report);
    // atoll connected once; the connection is open while the VM runs.
    listener.set_nonblocking(true).unwrap();
    let (accepted, _) = listener.accept().expect("atoll connected to the backend");
    assert!(
        listener.accept().is_err(),
        "atoll connected to the backend more than once"
    );
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();
    let err = rest(&rx);
    assert_eq!(status.code(), Some(130), "{err}");

    let report = s.report_text();
    let peers: Vec<&str> = report.lines().filter(|l| l.starts_with("disk ")).collect();
    // The core got the connection as disk0, in command-line order, with its queue count.
    assert_eq!(peers.len(), 2, "{report}");
    assert_eq!(
        peers[0],
        format!("disk disk0 queues=3 peer={}", sock.display()),
        "{report}"
    );
    assert!(
        peers[1].starts_with("disk disk1 queues=1 peer="),
        "{report}"
    );
    assert!(peers[1].ends_with("/disk1.sock"), "{report}");
    assert_eq!(s.report()["nfds"], "6", "{report}");
    // Only the image disk got a dev-blk.
    let starts = std::fs::read_to_string(s.dir.path("dev-blk-starts")).unwrap();
    assert_eq!(starts, "--socket-fd 3 --image-fd 4\n");
    // atoll and the core are gone, and with them every copy of the connection: the backend
    // sees end of file.
    let mut buf = [0u8; 1];
    accepted.set_nonblocking(false).unwrap();
    accepted
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!((&accepted).read(&mut buf).unwrap(), 0);
    // The backend's socket is not atoll's to remove.
    assert!(sock.exists());
}

#[test]
fn an_external_backend_alone_starts_no_dev_blk() {
    use std::os::unix::net::UnixListener;
    let s = Setup::new("extonly");
    let sock = s.dir.path("b.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let disk = format!("socket={}", sock.display());
    // A dev-blk that cannot start: atoll must not try.
    let out = output(
        s.command("poweroff", &["--disk", &disk])
            .env("ATOLL_DEV_BLK_BIN", "/nonexistent/dev-blk"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = s.report_text();
    assert!(
        report.contains(&format!("disk disk0 queues=1 peer={}\n", sock.display())),
        "{report}"
    );
    assert!(s.runtime_dir_is_empty());
}

#[test]
fn a_dying_disk_backend_is_logged_with_device_pid_and_status_and_restarted() {
    let s = Setup::new("blkdies");
    let img = s.dir.file("a.img", &[0u8; 4096]);
    let dev_blk = s.dir.script("dev-blk", "exit 7\n");
    let disk = format!("path={}", img.display());
    let (mut child, rx) = spawn_watching_stderr(
        s.command("stop", &["--disk", &disk])
            .env("ATOLL_DEV_BLK_BIN", &dev_blk),
    );
    // Each death is logged and the device started again, with a new pid and a growing
    // backoff.
    let mut pids = Vec::new();
    for backoff in ["5ms", "10ms"] {
        let line = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("a log line about the device");
            if line.contains("device disk0") {
                break line;
            }
        };
        assert!(line.starts_with("atoll: "), "{line}");
        let pid = line
            .split_once("device disk0 (dev-blk pid ")
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(pid, _)| pid.to_owned())
            .unwrap_or_else(|| panic!("no device and pid in {line}"));
        assert!(
            line.contains(&format!(
                "died: exit status: 7; restarting it in {backoff} (restart "
            )),
            "{line}"
        );
        pids.push(pid);
    }
    assert_ne!(pids[0], pids[1], "the restarted device is a new process");
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{}", rest(&rx));
}

#[test]
fn a_missing_dev_blk_binary_is_an_internal_error() {
    let s = Setup::new("noblk");
    let img = s.dir.file("a.img", &[0u8; 4096]);
    let disk = format!("path={}", img.display());
    let out = output(
        s.command("poweroff", &["--disk", &disk])
            .env("ATOLL_DEV_BLK_BIN", "/nonexistent/dev-blk"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "atoll: error: cannot start dev-blk (/nonexistent/dev-blk; set ATOLL_DEV_BLK_BIN to its \
         path): No such file or directory (os error 2)\n"
    );
    assert!(s.runtime_dir_is_empty());
}

#[test]
fn terminal_is_raw_while_running_ctrl_a_x_stops_and_settings_are_restored() {
    use nix::sys::termios::{LocalFlags, tcgetattr};
    let s = Setup::new("tty");
    let pty = nix::pty::openpty(None, None).unwrap();
    let before = tcgetattr(&pty.slave).unwrap();
    assert!(before.local_flags.contains(LocalFlags::ICANON));
    let slave = || Stdio::from(pty.slave.try_clone().unwrap());
    let mut child = s
        .command("stop", &[])
        .stdin(slave())
        .stdout(slave())
        .stderr(slave())
        .spawn()
        .unwrap();
    let mut raw = false;
    for _ in 0..2000 {
        let now = tcgetattr(&pty.slave).unwrap();
        if !now
            .local_flags
            .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG)
        {
            raw = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(raw, "atoll never put the terminal in raw mode");
    wait_for_file(&s.report);
    nix::unistd::write(&pty.master, b"\x01x").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let after = tcgetattr(&pty.slave).unwrap();
    assert_eq!(after.local_flags, before.local_flags);
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);
    assert!(s.report_text().contains("got=Shutdown"));
    // What atoll wrote to the terminal: the guest's console, then the summary.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(pty.master.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(5000u16)).unwrap() == 0 {
            break;
        }
        match nix::unistd::read(&pty.master, &mut buf) {
            Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
        if out.ends_with(b"stopped\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("fake-core: console ok"), "{text:?}");
    assert!(text.ends_with("atoll: the VM was stopped\r\n"), "{text:?}");
}
