//! Runs one program confined the way the launcher confines its children
//! (`ipc::sandbox::ConfinedCommand`), passing its own inherited descriptors through at the
//! same numbers, forwarding termination signals through the pidfd, and exiting the way the
//! child did (same exit code, or the same signal). For trying the confinement on atoll's
//! binaries before the launcher does it, e.g.
//!
//! ```text
//! ATOLL_CORE_BIN=/path/to/script-that-runs:  confine --name vmm-core --fds 3 -- vmm-core
//! confine --fds 3,4 --fsize 1073741824 -- dev-blk --socket-fd 3 --image-fd 4
//! ```
//!
//! Options: `--name NAME`, `--mode full|seccomp-log|unconfined|wrap:CMD`, `--fds N,M,..`,
//! `--same-uid` (map the namespace's root to this process's uid instead of a dedicated one),
//! `--fsize BYTES`, `--nproc N`, `--nofile N`, `--print-report` (the one-line confinement
//! report on stderr), `--no-report` (the program does not call lockdown). `confine --probe`
//! prints what the host supports and the warnings `atoll` would print.

use anyhow::{Context, bail};
use ipc::inherit::take_inherited_fd;
use ipc::sandbox::report::Rlimits;
use ipc::sandbox::spawn::{Confinement, IdAllocator, parse_debug_device};
use ipc::sandbox::{ConfinedCommand, Mode};
use ipc::spawn::Inherit;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

struct Options {
    name: String,
    confinement: Confinement,
    fds: Vec<RawFd>,
    same_uid: bool,
    rlimits: Rlimits,
    print_report: bool,
    report: bool,
    program: OsString,
    args: Vec<OsString>,
}

fn parse() -> anyhow::Result<Options> {
    let mut args = std::env::args_os().skip(1);
    let mut o = Options {
        name: String::new(),
        confinement: Confinement::Full,
        fds: Vec::new(),
        same_uid: false,
        rlimits: Rlimits {
            nofile: 1024,
            nproc: 4096,
            core: 0,
            fsize: u64::MAX,
        },
        print_report: false,
        report: true,
        program: OsString::new(),
        args: Vec::new(),
    };
    let value = |flag: &str, args: &mut dyn Iterator<Item = OsString>| {
        args.next()
            .and_then(|v| v.into_string().ok())
            .with_context(|| format!("{flag} needs a value"))
    };
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--name") => o.name = value("--name", &mut args)?,
            Some("--mode") => {
                let m = value("--mode", &mut args)?;
                o.confinement = match m.as_str() {
                    "full" => Confinement::Full,
                    other => parse_debug_device(&format!("x={other}"))?.1,
                };
            }
            Some("--fds") => {
                for f in value("--fds", &mut args)?.split(',') {
                    o.fds.push(f.parse().with_context(|| format!("--fds {f}"))?);
                }
            }
            Some("--same-uid") => o.same_uid = true,
            Some("--fsize") => o.rlimits.fsize = value("--fsize", &mut args)?.parse()?,
            Some("--nproc") => o.rlimits.nproc = value("--nproc", &mut args)?.parse()?,
            Some("--nofile") => o.rlimits.nofile = value("--nofile", &mut args)?.parse()?,
            Some("--print-report") => o.print_report = true,
            Some("--no-report") => o.report = false,
            Some("--") => {
                o.program = args.next().context("no program after --")?;
                o.args = args.collect();
                break;
            }
            _ => bail!("unknown argument {a:?} (see the source for the options)"),
        }
    }
    if o.program.is_empty() {
        bail!("usage: confine [options] -- PROGRAM [ARGS...]");
    }
    if o.name.is_empty() {
        o.name = std::path::Path::new(&o.program)
            .file_name()
            .map_or_else(|| "child".into(), |n| n.to_string_lossy().into_owned());
    }
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--probe") {
        let support = ipc::sandbox::probe();
        println!("{support}");
        for w in support.warnings() {
            println!("warning: {w}");
        }
        return Ok(());
    }
    let o = parse()?;
    let fds: Vec<(RawFd, OwnedFd)> = o
        .fds
        .iter()
        .map(|&fd| {
            Ok((
                fd,
                take_inherited_fd(fd).with_context(|| format!("--fds {fd}"))?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let inherit: Vec<Inherit<'_>> = fds
        .iter()
        .map(|(target, fd)| Inherit {
            fd: fd.as_fd(),
            target: *target,
        })
        .collect();

    // Termination signals are forwarded to the child, not acted on here.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;
    let sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).context("signalfd")?;

    let mut cmd = ConfinedCommand::new(o.name.clone(), o.program.clone());
    cmd.args(o.args.iter().cloned())
        .confinement(o.confinement.clone())
        .rlimits(o.rlimits)
        .expect_report(o.report)
        .no_cgroup("not requested");
    if !o.same_uid {
        cmd.ids(IdAllocator::for_this_launcher().allocate()?);
    }
    let mut child = cmd.spawn(&inherit)?;
    drop(inherit);
    drop(fds);
    let report = child.read_report(Duration::from_secs(10));
    if o.print_report {
        eprintln!("{report}");
    }
    if cmd.mode() == Mode::Unconfined && o.print_report {
        eprintln!("confine: {} runs unconfined", o.name);
    }

    let status = loop {
        let mut pfds = [
            PollFd::new(child.pidfd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut pfds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => bail!("poll: {e}"),
        }
        if pfds[1].revents().is_some_and(|r| !r.is_empty())
            && let Ok(Some(info)) = sfd.read_signal()
            && let Ok(sig) = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0))
        {
            // ESRCH: it has just exited; the pidfd reports it next.
            let _ = child.signal(sig);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
    };
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    let sig = status.signal().unwrap_or(libc::SIGKILL);
    // Die the same way: default action, no core file, signal unblocked.
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    if let Ok(s) = Signal::try_from(sig) {
        // SAFETY: restoring the default action of a signal; no handler is involved.
        let _ = unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl) };
        let mut one = SigSet::empty();
        one.add(s);
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&one), None);
        let _ = nix::sys::signal::raise(s);
    }
    std::process::exit(128 + sig);
}
