//! A minimal confined process for `ipc/tests/sandbox.rs`: it takes its control socket at fd 3,
//! locks down with the runtime policy (plus what `--allow` names), says `locked` on fd 3 and
//! waits there for one byte: `x` makes it exit 0, `t` makes it start a thread, join it and
//! answer `joined`, `p` makes it start a thread that panics, join it and answer `caught`. With the `confinement-selftest` feature and `ATOLL_SELFTEST` set, lockdown
//! runs the escape attempt instead (and exits).
//!
//! `--allow open,socket,exec,ptrace` adds those system calls to the allow-list, so that the
//! tests see the next layer (empty root, Landlock, namespaces) stop the attempt.

use ipc::inherit::take_inherited_fd;
use ipc::sandbox::{Policy, lockdown};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    ipc::logging::init("lockdown-probe", "warn");
    let ctl = match take_inherited_fd(3) {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("lockdown-probe: fd 3: {e}");
            return ExitCode::from(2);
        }
    };
    let mut policy = Policy::runtime("lockdown-probe")
        .allow(&[libc::SYS_read, libc::SYS_recvfrom, libc::SYS_sendto])
        .expect_fds([ctl.as_raw_fd()]);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, list] = args.as_slice()
        && flag == "--allow"
    {
        for what in list.split(',') {
            let nr = match what {
                "open" => libc::SYS_openat,
                "socket" => libc::SYS_socket,
                "exec" => libc::SYS_execve,
                "ptrace" => libc::SYS_ptrace,
                other => {
                    eprintln!("lockdown-probe: unknown --allow {other}");
                    return ExitCode::from(2);
                }
            };
            policy = policy.allow(&[nr]);
        }
    } else if !args.is_empty() {
        eprintln!("usage: lockdown-probe [--allow open,socket,exec,ptrace]");
        return ExitCode::from(2);
    }
    if cfg!(not(feature = "confinement-selftest")) && std::env::var_os("ATOLL_SELFTEST").is_some() {
        // Lockdown would ignore it: say so rather than wait for commands the test won't send.
        eprintln!("lockdown-probe: built without the confinement-selftest feature");
        return ExitCode::from(6);
    }
    let report = match lockdown(&policy) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lockdown-probe: lockdown failed: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            return ExitCode::from(3);
        }
    };
    let mut ctl = ctl;
    if writeln!(ctl, "locked {report}").is_err() {
        return ExitCode::from(4);
    }
    loop {
        let mut cmd = [0u8; 1];
        match ctl.read(&mut cmd) {
            Ok(1) if cmd[0] == b'x' => return ExitCode::SUCCESS,
            Ok(1) if cmd[0] == b't' => {
                let ok = std::thread::Builder::new()
                    .name("probe-thread".into())
                    .spawn(|| 7)
                    .map(|h| h.join().ok() == Some(7))
                    .unwrap_or(false);
                let answer: &[u8] = if ok { b"joined\n" } else { b"thread failed\n" };
                if ctl.write_all(answer).is_err() {
                    return ExitCode::from(4);
                }
            }
            Ok(1) if cmd[0] == b'p' => {
                // A panicking thread: the panic message and unwinding must work under the
                // filter (and must not resolve a backtrace, which would open files).
                let caught = std::thread::Builder::new()
                    .name("probe-panic".into())
                    .spawn(|| panic!("probe panic"))
                    .map(|h| h.join().is_err())
                    .unwrap_or(false);
                let answer: &[u8] = if caught { b"caught\n" } else { b"not caught\n" };
                if ctl.write_all(answer).is_err() {
                    return ExitCode::from(4);
                }
            }
            Ok(_) => return ExitCode::from(5),
            Err(_) => return ExitCode::from(4),
        }
    }
}
